//! The SchedulerObject Durable Object: one per tenant shard — background agents' limits, fair queue and statuses (rules in core `background`); each agent runs as its own session.

use futures_util::lock::Mutex;
use futures_util::stream;
use nightshift_core::background::{BgError, Scheduler, Spawn, Status, Transition};
use nightshift_core::budget::{Holding, Request as SlotRequest};
use nightshift_core::ids::Identity;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use worker::*;

use crate::auth::encode_identity;
use crate::config;
use crate::error::{json_of, ApiError, ApiResult, EdgeError};
use crate::http::{call, index_add, session_stub};
use crate::objects::{
    encode, read_answer, read_body, with_query, AgentList, AgentOutcome, AgentOutput,
    AgentOutputView, AgentPrompt, AgentResult, AgentSession, AgentView, BudgetRoute, ChildUpdate,
    Finished, OkAnswer, ParentEnded, SchedulerRoute, SessionRoute, SlotAnswer, SlotAsk, Viewer,
    BACKGROUND_HEADER, IDENTITY_HEADER, LAST_EVENT_ID_HEADER, SESSION_HEADER, SHARD_HEADER,
    VIEWER_HEADER,
};
pub use crate::objects::{AgentLink, SpawnBody};
use crate::platform::{new_id, now_ms, random_hex};

/// A tenant name: the scheduler shard's key and part of every agent id.
pub fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 40
        && t.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The shard an agent id names (`bg_<tenant>_<hex>`).
pub(crate) fn shard_of(id: &str) -> ApiResult<String> {
    let mut parts = id.splitn(3, '_');
    match (parts.next(), parts.next(), parts.next()) {
        (Some("bg"), Some(t), Some(rest))
            if valid_tenant(t)
                && !rest.is_empty()
                && rest.chars().all(|c| c.is_ascii_hexdigit()) =>
        {
            Ok(t.to_string())
        }
        _ => Err(EdgeError::NoSuchAgent.into()),
    }
}

pub(crate) fn scheduler_stub(env: &Env, shard: &str) -> ApiResult<Stub> {
    Ok(env.durable_object("SCHEDULER")?.get_by_name(shard)?)
}

/// Wakes each shard on the budget's behalf (it asks again or reports); a shard that cannot be
/// reached is logged with `why` and the next wake (or the budget's alarm) tries again.
pub(crate) async fn wake_shards(env: &Env, shards: impl IntoIterator<Item = String>, why: &str) {
    for shard in shards {
        let route = SchedulerRoute::Wake;
        let woke = on_shard(env, &shard, &Viewer::Budget, &route, "", None, None).await;
        if let Err(e) = woke {
            console_error!("{why}: waking shard {shard}: {}", e.message);
        }
    }
}

/// Calls a shard's `route` (with the people's `query`, `?…` or empty) on behalf of a viewer; a
/// people's event stream passes its `Last-Event-ID` on.
pub(crate) async fn on_shard(
    env: &Env,
    shard: &str,
    viewer: &Viewer,
    route: &SchedulerRoute,
    query: &str,
    body: Option<Vec<u8>>,
    last_event_id: Option<String>,
) -> ApiResult<Response> {
    let headers = Headers::new();
    headers.set(VIEWER_HEADER, &viewer.header())?;
    headers.set(SHARD_HEADER, shard)?;
    if let Some(last) = last_event_id {
        headers.set(LAST_EVENT_ID_HEADER, &last)?;
    }
    call(
        &scheduler_stub(env, shard)?,
        route.method(),
        &with_query(&route.path(), query),
        Some(headers),
        body,
    )
    .await
}

/// Everything kept about one agent beside the core's scheduling state.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: String,
    identity: Identity,
    title: String,
    prompt: String,
    repository: Option<String>,
    model: Option<String>,
    parent: Option<String>,
    status: Status,
    session: Option<String>,
    created_at: u64,
    started_at: Option<u64>,
    finished_at: Option<u64>,
    /// Its [`AgentOutcome`] once it ended (kept as stored: people see it as it is).
    result: Option<Value>,
}

/// One row of the `events` table: an agent's status changed. The agent's event stream sends the
/// stored text as it is (`data:`), so its keys stay in this (alphabetical) order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StatusEvent {
    at: u64,
    from: Option<Status>,
    id: String,
    session: Option<String>,
    status: Status,
    #[serde(rename = "type")]
    kind: StatusEventType,
}

/// The `type` of a [`StatusEvent`] (its stream's `event:` name): the only kind of row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum StatusEventType {
    Status,
}

#[derive(Deserialize)]
struct BodyRow {
    body: String,
}

#[derive(Deserialize)]
struct KvRow {
    k: String,
    body: String,
}

#[derive(Deserialize)]
struct EventRow {
    seq: i64,
    body: String,
}

/// A person sees their own agents; a sandbox only the agents its session spawned (an agent's
/// session and the budget see none: they only report and wake).
fn sees(viewer: &Viewer, r: &Record) -> bool {
    match viewer {
        Viewer::Person(u) => &r.identity.user == u,
        Viewer::Session(s) => r.parent.as_deref() == Some(s.as_str()),
        Viewer::Agent(_) | Viewer::Budget => false,
    }
}

#[durable_object]
pub struct SchedulerObject {
    state: State,
    env: Env,
    /// Wakes the agents' event streams when an event is stored (instead of polling storage).
    stored: Notify,
    /// One exchange with the global budget at a time: each exchange's report then counts every
    /// earlier answer (core `budget`).
    budget_turn: Mutex<()>,
}

impl DurableObject for SchedulerObject {
    fn new(state: State, env: Env) -> Self {
        SchedulerObject {
            state,
            env,
            stored: Notify::default(),
            budget_turn: Mutex::new(()),
        }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        match self.route(req).await {
            Ok(r) => Ok(r),
            Err(e) => e.into_response(),
        }
    }
}

fn bg(e: BgError) -> ApiError {
    e.into()
}

fn sql_of(state: &State) -> ApiResult<SqlStorage> {
    let sql = state.storage().sql();
    sql.exec(
        "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, body TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS agents (id TEXT PRIMARY KEY, parent TEXT, body TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY AUTOINCREMENT, agent TEXT NOT NULL, body TEXT NOT NULL);",
        None,
    )?;
    Ok(sql)
}

impl SchedulerObject {
    fn sql(&self) -> ApiResult<SqlStorage> {
        sql_of(&self.state)
    }

    fn shard(&self, req: &Request) -> String {
        req.headers()
            .get(SHARD_HEADER)
            .ok()
            .flatten()
            .unwrap_or_else(|| "default".into())
    }

    /// The scheduler as stored, with the limits of the configuration (they may change between
    /// deploys).
    fn stored_scheduler(&self) -> ApiResult<Scheduler> {
        let rows: Vec<BodyRow> = self
            .sql()?
            .exec("SELECT body FROM kv WHERE k = 'scheduler'", None)?
            .to_array()?;
        let mut s: Scheduler = match rows.first() {
            Some(r) => serde_json::from_str(&r.body).map_err(ApiError::internal)?,
            None => Scheduler::default(),
        };
        s.limits = config::background_limits(&self.env);
        Ok(s)
    }

    /// The scheduler to act with: it runs at most as many agents as the shard holds slots of
    /// the global budget.
    fn scheduler(&self) -> ApiResult<Scheduler> {
        let mut s = self.stored_scheduler()?;
        s.hold(self.holding()?.held);
        Ok(s)
    }

    /// The shard's holding of the global budget (`kv` keys `held` and `budget_seq`).
    fn holding(&self) -> ApiResult<Holding> {
        let rows: Vec<KvRow> = self
            .sql()?
            .exec(
                "SELECT k, body FROM kv WHERE k IN ('held', 'budget_seq')",
                None,
            )?
            .to_array()?;
        let value = |k: &str| rows.iter().find(|r| r.k == k).map(|r| r.body.as_str());
        Ok(Holding {
            held: value("held").and_then(|b| b.parse().ok()).unwrap_or(0),
            seq: value("budget_seq")
                .and_then(|b| b.parse().ok())
                .unwrap_or(0),
        })
    }

    fn save_holding(&self, h: &Holding) -> ApiResult<()> {
        let sql = self.sql()?;
        for (k, v) in [
            ("held", h.held.to_string()),
            ("budget_seq", h.seq.to_string()),
        ] {
            sql.exec(
                "INSERT OR REPLACE INTO kv (k, body) VALUES (?, ?)",
                vec![k.into(), v.into()],
            )?;
        }
        Ok(())
    }

    /// Holds as many global slots as the shard can use now (core `Scheduler::slots_wanted`, with
    /// `extra` agents about to be spawned): asks for more or gives back the rest, in one
    /// exchange that carries the shard's report (with nothing to change, it still reports when
    /// `report`: woken by the budget). Wakes the shards the answer names. Returns whether it got
    /// more.
    async fn rebalance(&self, shard: &str, extra: u32, report: bool) -> ApiResult<bool> {
        let (got, wake) = {
            let _turn = self.budget_turn.lock().await;
            let wanted = self.stored_scheduler()?.slots_wanted(extra);
            let mut holding = self.holding()?;
            let Some(ex) = holding.ask(wanted, report) else {
                return Ok(false);
            };
            // Stored before asking: released slots are given up whatever the call's fate, and
            // the exchange number is never reused.
            self.save_holding(&holding)?;
            let route = match ex.request {
                SlotRequest::Acquire(_) => BudgetRoute::Acquire,
                SlotRequest::Release(_) => BudgetRoute::Release,
            };
            let ask = SlotAsk {
                held: Some(ex.report.held),
                n: ex.request.n(),
                seq: Some(ex.report.seq),
                shard: shard.to_string(),
            };
            let budget = self.env.durable_object("BUDGET")?.get_by_name("global")?;
            let mut resp = call(
                &budget,
                route.method(),
                route.path(),
                None,
                Some(encode(&ask)?),
            )
            .await?;
            let answer: SlotAnswer = read_answer(&mut resp, route.path()).await?;
            let mut holding = self.holding()?;
            let got = holding.granted(answer.granted.unwrap_or(0));
            self.save_holding(&holding)?;
            (got, answer.wake)
        };
        wake_shards(&self.env, wake, "budget answer").await;
        Ok(got)
    }

    /// After a change: settle the slots, and start whatever newly granted slots allow (`report`:
    /// the first exchange reports even with nothing to change).
    async fn rebalanced(&self, shard: &str, report: bool) -> ApiResult<()> {
        let mut report = report;
        for _ in 0..4 {
            if !self.rebalance(shard, 0, report).await? {
                return Ok(());
            }
            report = false;
            let mut s = self.scheduler()?;
            let ts = s.schedule();
            self.save_scheduler(&s)?;
            if ts.is_empty() {
                return Ok(());
            }
            self.settle(ts).await?;
        }
        Ok(())
    }

    fn save_scheduler(&self, s: &Scheduler) -> ApiResult<()> {
        let body = serde_json::to_string(s).map_err(ApiError::internal)?;
        self.sql()?.exec(
            "INSERT OR REPLACE INTO kv (k, body) VALUES ('scheduler', ?)",
            vec![body.into()],
        )?;
        Ok(())
    }

    fn record(&self, id: &str) -> ApiResult<Option<Record>> {
        let rows: Vec<BodyRow> = self
            .sql()?
            .exec("SELECT body FROM agents WHERE id = ?", vec![id.into()])?
            .to_array()?;
        match rows.first() {
            Some(r) => Ok(Some(
                serde_json::from_str(&r.body).map_err(ApiError::internal)?,
            )),
            None => Ok(None),
        }
    }

    fn save_record(&self, r: &Record) -> ApiResult<()> {
        let body = serde_json::to_string(r).map_err(ApiError::internal)?;
        self.sql()?.exec(
            "INSERT OR REPLACE INTO agents (id, parent, body) VALUES (?, ?, ?)",
            vec![
                r.id.as_str().into(),
                r.parent
                    .clone()
                    .map(Into::into)
                    .unwrap_or(SqlStorageValue::Null),
                body.into(),
            ],
        )?;
        Ok(())
    }

    fn event(&self, agent: &str, event: &StatusEvent) -> ApiResult<()> {
        let body = serde_json::to_string(event).map_err(ApiError::internal)?;
        self.sql()?.exec(
            "INSERT INTO events (agent, body) VALUES (?, ?)",
            vec![agent.into(), body.into()],
        )?;
        self.stored.notify();
        Ok(())
    }

    /// Applies the core's transitions to the records and the event log (one synchronous block).
    fn record_transitions(&self, ts: &[Transition], now: u64) -> ApiResult<Vec<Record>> {
        let mut changed = Vec::new();
        for t in ts {
            let Some(mut r) = self.record(&t.id)? else {
                continue;
            };
            r.status = t.to;
            if t.to == Status::Starting {
                r.started_at = Some(now);
            }
            if t.to.is_terminal() {
                r.finished_at = Some(now);
            }
            self.save_record(&r)?;
            let event = StatusEvent {
                at: now,
                from: t.from,
                id: t.id.clone(),
                session: r.session.clone(),
                status: t.to,
                kind: StatusEventType::Status,
            };
            self.event(&t.id, &event)?;
            changed.push(r);
        }
        Ok(changed)
    }

    /// Who reads agents: a person or a session's sandbox (anyone else is refused).
    fn viewer(req: &Request) -> ApiResult<Viewer> {
        let header = req
            .headers()
            .get(VIEWER_HEADER)
            .ok()
            .flatten()
            .ok_or(EdgeError::Unauthenticated)?;
        match Viewer::parse(&header) {
            Ok(viewer @ (Viewer::Person(_) | Viewer::Session(_))) => Ok(viewer),
            _ => Err(EdgeError::Unauthenticated.into()),
        }
    }

    fn visible(&self, viewer: &Viewer, id: &str) -> ApiResult<Record> {
        let r = self
            .record(id)?
            .ok_or_else(|| bg(BgError::NotFound(id.into())))?;
        if sees(viewer, &r) {
            Ok(r)
        } else {
            // Another person's or another tree's agent is not even said to exist.
            Err(bg(BgError::NotFound(id.into())))
        }
    }

    async fn route(&self, mut req: Request) -> ApiResult<Response> {
        let Some(route) = SchedulerRoute::parse(&req.method(), &req.path()) else {
            return Err(EdgeError::NotFound("route").into());
        };
        match route {
            SchedulerRoute::Spawn => {
                let shard = self.shard(&req);
                let b: SpawnBody = read_body(&mut req).await?;
                self.rebalance(&shard, 1, false).await?;
                let r = self.spawn(b, &shard).await;
                self.rebalanced(&shard, false).await?;
                r
            }
            SchedulerRoute::Wake => {
                let shard = self.shard(&req);
                self.rebalanced(&shard, true).await?;
                json_of(200, &OkAnswer::yes())
            }
            SchedulerRoute::Agents => {
                let viewer = Self::viewer(&req)?;
                let url = req.url()?;
                let q = |k: &str| {
                    url.query_pairs()
                        .find(|(n, _)| n == k)
                        .map(|(_, v)| v.into_owned())
                };
                let (parent, status, user) = (q("parent"), q("status"), q("user"));
                let rows: Vec<BodyRow> = self
                    .sql()?
                    .exec(
                        "SELECT body FROM agents ORDER BY rowid DESC LIMIT 1000",
                        None,
                    )?
                    .to_array()?;
                let mut agents = Vec::new();
                for row in rows {
                    let r: Record = serde_json::from_str(&row.body).map_err(ApiError::internal)?;
                    let mine = sees(&viewer, &r);
                    let wanted = parent.as_ref().is_none_or(|p| r.parent.as_ref() == Some(p))
                        && status.as_ref().is_none_or(|s| r.status.as_str() == s)
                        && user.as_ref().is_none_or(|u| &r.identity.user == u);
                    if mine && wanted {
                        agents.push(agent_view(&r));
                    }
                }
                json_of(200, &AgentList { agents })
            }
            SchedulerRoute::Agent(id) => {
                let viewer = Self::viewer(&req)?;
                json_of(200, &agent_view(&self.visible(&viewer, &id)?))
            }
            SchedulerRoute::AgentOutput(id) => {
                let viewer = Self::viewer(&req)?;
                let r = self.visible(&viewer, &id)?;
                self.output(&r).await
            }
            SchedulerRoute::AgentCancel(id) => {
                let viewer = Self::viewer(&req)?;
                let r = self.visible(&viewer, &id)?;
                let mut s = self.scheduler()?;
                let ts = s.cancel(&r.id).map_err(bg)?;
                self.save_scheduler(&s)?;
                self.settle(ts).await?;
                self.rebalanced(&self.shard(&req), false).await?;
                let r = self.visible(&viewer, &id)?;
                json_of(200, &agent_view(&r))
            }
            SchedulerRoute::AgentEvents(id) => {
                let viewer = Self::viewer(&req)?;
                let r = self.visible(&viewer, &id)?;
                let after = req
                    .headers()
                    .get(LAST_EVENT_ID_HEADER)
                    .ok()
                    .flatten()
                    .or_else(|| {
                        req.url().ok().and_then(|u| {
                            u.query_pairs()
                                .find(|(k, _)| k == "after")
                                .map(|(_, v)| v.into_owned())
                        })
                    });
                self.events(&r, after.as_deref())
            }
            SchedulerRoute::Finished => {
                let shard = self.shard(&req);
                let finished: Finished = read_body(&mut req).await?;
                let r = self
                    .finished(&finished.id, finished.ok, finished.result)
                    .await;
                self.rebalanced(&shard, false).await?;
                r
            }
            SchedulerRoute::ParentEnded => {
                let ended: ParentEnded = read_body(&mut req).await?;
                let mut s = self.scheduler()?;
                let ts = s.cancel_children_of(&ended.session);
                self.save_scheduler(&s)?;
                self.settle(ts).await?;
                self.rebalanced(&self.shard(&req), false).await?;
                json_of(200, &OkAnswer::yes())
            }
        }
    }

    async fn spawn(&self, b: SpawnBody, shard: &str) -> ApiResult<Response> {
        let prompt = b.prompt.trim().to_string();
        if prompt.is_empty() || prompt.len() > 32 * 1024 {
            return Err(bg(BgError::Invalid("prompt: 1 to 32768 bytes".into())));
        }
        let now = now_ms();
        let id = format!("bg_{shard}_{}", random_hex(10));
        let title = b.title.clone().unwrap_or_else(|| {
            let first: String = prompt
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(60)
                .collect();
            format!("Background: {first}")
        });
        let mut s = self.scheduler()?;
        let ts = s
            .spawn(Spawn {
                id: id.clone(),
                user: b.identity.user.clone(),
                parent: b.parent.clone(),
                parent_depth: b.parent_depth,
            })
            .map_err(bg)?;
        let record = Record {
            id: id.clone(),
            identity: b.identity,
            title,
            prompt,
            repository: b.repository,
            model: b.model,
            parent: b.parent,
            status: Status::Queued,
            session: None,
            created_at: now,
            started_at: None,
            finished_at: None,
            result: None,
        };
        self.save_record(&record)?;
        self.save_scheduler(&s)?;
        self.settle(ts).await?;
        let r = self
            .record(&id)?
            .ok_or_else(|| ApiError::internal("lost record"))?;
        json_of(201, &agent_view(&r))
    }

    /// Records transitions, starts the agents that became `starting`, stops the cancelled
    /// ones, and tells parents. Starting may finish or free more (loops until quiet).
    async fn settle(&self, mut ts: Vec<Transition>) -> ApiResult<()> {
        while !ts.is_empty() {
            let now = now_ms();
            let changed = self.record_transitions(&ts, now)?;
            let mut next = Vec::new();
            for r in &changed {
                self.tell_parent(r).await;
                match r.status {
                    Status::Starting => next.extend(self.start(r).await?),
                    Status::Cancelled => self.stop_session(r).await,
                    _ => {}
                }
            }
            ts = next;
        }
        Ok(())
    }

    /// Creates the agent's session and sends its prompt; the agent is then running.
    async fn start(&self, r: &Record) -> ApiResult<Vec<Transition>> {
        let sid = new_id("ses");
        let link = AgentLink {
            agent: r.id.clone(),
            shard: shard_of(&r.id)?,
            depth: self.scheduler()?.agents.get(&r.id).map_or(1, |a| a.depth),
        };
        // Attached before its prompt is sent: children it spawns at once are already in its tree.
        let mut s = self.scheduler()?;
        s.attach(&r.id, &sid).map_err(bg)?;
        self.save_scheduler(&s)?;
        if let Some(mut rec) = self.record(&r.id)? {
            rec.session = Some(sid.clone());
            self.save_record(&rec)?;
        }
        let started = async {
            let stub = session_stub(&self.env, &sid)?;
            let headers = Headers::new();
            headers.set(IDENTITY_HEADER, &encode_identity(&r.identity))?;
            headers.set(SESSION_HEADER, &sid)?;
            headers.set(BACKGROUND_HEADER, &link.header()?)?;
            let body = AgentSession {
                model: r.model.clone(),
                repository: r.repository.clone(),
                title: r.title.clone(),
            };
            let create = SessionRoute::Create;
            let mut created = call(
                &stub,
                create.method(),
                create.path(),
                Some(headers.clone()),
                Some(encode(&body)?),
            )
            .await?;
            let status = created.status_code();
            let snap: Value = created.json().await.unwrap_or(Value::Null);
            if status != 201 {
                return Err(EdgeError::AgentStartFailed {
                    what: "session",
                    answer: snap.to_string(),
                }
                .into());
            }
            index_add(&self.env, &r.identity.user, &snap).await?;
            let prompt = AgentPrompt {
                text: r.prompt.clone(),
            };
            let send = SessionRoute::Prompt;
            let mut queued = call(
                &stub,
                send.method(),
                send.path(),
                Some(headers),
                Some(encode(&prompt)?),
            )
            .await?;
            if queued.status_code() != 202 {
                let v: Value = queued.json().await.unwrap_or(Value::Null);
                return Err(EdgeError::AgentStartFailed {
                    what: "prompt",
                    answer: v.to_string(),
                }
                .into());
            }
            Ok::<(), ApiError>(())
        }
        .await;
        let mut s = self.scheduler()?;
        let ts = match started {
            Ok(()) => s.transition(&r.id, Status::Running),
            Err(e) => {
                if let Some(mut rec) = self.record(&r.id)? {
                    let outcome = AgentOutcome::Ended {
                        ok: false,
                        reason: e.message,
                    };
                    rec.result = Some(outcome.value());
                    self.save_record(&rec)?;
                }
                s.transition(&r.id, Status::Failed)
            }
        };
        self.save_scheduler(&s)?;
        // Cancelled while it started: the transition is refused and the session is stopped.
        match ts {
            Ok(ts) => Ok(ts),
            Err(_) => {
                if let Some(rec) = self.record(&r.id)? {
                    self.stop_session(&rec).await;
                }
                Ok(Vec::new())
            }
        }
    }

    /// The agent's prompt ended (its session says so).
    async fn finished(&self, id: &str, ok: bool, result: Value) -> ApiResult<Response> {
        let mut s = self.scheduler()?;
        let to = if ok {
            Status::Completed
        } else {
            Status::Failed
        };
        match s.transition(id, to) {
            Ok(ts) => {
                if let Some(mut rec) = self.record(id)? {
                    rec.result = Some(result);
                    self.save_record(&rec)?;
                }
                self.save_scheduler(&s)?;
                self.settle(ts).await?;
                json_of(200, &OkAnswer::yes())
            }
            // Already cancelled (or ended): nothing changes.
            Err(e) => json_of(
                200,
                &OkAnswer {
                    ok: false,
                    why: Some(e.to_string()),
                },
            ),
        }
    }

    async fn stop_session(&self, r: &Record) {
        let Some(sid) = &r.session else { return };
        let result = async {
            let stub = session_stub(&self.env, sid)?;
            let cancel = SessionRoute::BackgroundCancel;
            call(&stub, cancel.method(), cancel.path(), None, None).await
        }
        .await;
        if let Err(e) = result {
            console_error!("stopping agent {}'s session {sid}: {}", r.id, e.message);
        }
    }

    async fn tell_parent(&self, r: &Record) {
        let Some(parent) = &r.parent else { return };
        let update = ChildUpdate {
            branch: r.result.as_ref().and_then(|v| AgentResult::of(v).branch),
            id: r.id.clone(),
            session: r.session.clone(),
            status: r.status.as_str().to_string(),
            title: Some(r.title.clone()),
        };
        let result = async {
            let stub = session_stub(&self.env, parent)?;
            let tell = SessionRoute::BackgroundChild;
            call(
                &stub,
                tell.method(),
                tell.path(),
                None,
                Some(encode(&update)?),
            )
            .await
        }
        .await;
        if let Err(e) = result {
            console_error!("telling {parent} about agent {}: {}", r.id, e.message);
        }
    }

    /// Final message, branch and changed files (from the agent's session).
    async fn output(&self, r: &Record) -> ApiResult<Response> {
        let mut output: Option<AgentOutput> = None;
        if let Some(sid) = &r.session {
            let stub = session_stub(&self.env, sid)?;
            let ask = SessionRoute::BackgroundOutput;
            let mut resp = call(&stub, ask.method(), ask.path(), None, None).await?;
            if resp.status_code() == 200 {
                output = Some(read_answer(&mut resp, ask.path()).await?);
            }
        }
        json_of(200, &output_view(r, output))
    }

    /// Server-sent events of one agent from after `after` (the `Last-Event-ID`), streaming
    /// until the agent has ended.
    fn events(&self, r: &Record, after: Option<&str>) -> ApiResult<Response> {
        let sql = self.sql()?;
        let head: Vec<EventRow> = sql
            .exec(
                "SELECT seq, body FROM events WHERE agent = ? ORDER BY seq DESC LIMIT 1",
                vec![r.id.as_str().into()],
            )?
            .to_array()?;
        let newest = head.first().map_or(0, |e| e.seq);
        let after: i64 = match after {
            None => 0,
            Some(a) => a.trim().parse().map_err(|_| EdgeError::InvalidEventId)?,
        };
        let max_seq: Vec<EventRow> = sql
            .exec(
                "SELECT seq, '' AS body FROM events ORDER BY seq DESC LIMIT 1",
                None,
            )?
            .to_array()?;
        if after < 0 || after > max_seq.first().map_or(0, |e| e.seq) {
            return Err(EdgeError::StaleEventId { after, newest }.into());
        }
        let agent = r.id.clone();
        let state = (sql, agent, after, false, self.stored.clone());
        let s = stream::unfold(state, |(sql, agent, mut after, done, stored)| async move {
            if done {
                return None;
            }
            loop {
                // Read before looking, so an event stored after the query still wakes us.
                let seen = stored.generation();
                let rows: Vec<EventRow> = sql
                    .exec(
                        "SELECT seq, body FROM events WHERE agent = ? AND seq > ? ORDER BY seq LIMIT 100",
                        vec![agent.as_str().into(), SqlStorageValue::Integer(after)],
                    )
                    .and_then(|c| c.to_array())
                    .unwrap_or_default();
                if !rows.is_empty() {
                    let mut text = String::new();
                    let mut ended = false;
                    for e in rows {
                        after = e.seq;
                        let event = serde_json::from_str::<StatusEvent>(&e.body).ok();
                        ended |= event.is_some_and(|ev| ev.status.is_terminal());
                        text.push_str(&format!(
                            "id: {}\nevent: status\ndata: {}\n\n",
                            e.seq, e.body
                        ));
                    }
                    return Some((
                        Ok::<Vec<u8>, Error>(text.into_bytes()),
                        (sql, agent, after, ended, stored),
                    ));
                }
                let ended: Vec<BodyRow> = sql
                    .exec(
                        "SELECT body FROM agents WHERE id = ?",
                        vec![agent.as_str().into()],
                    )
                    .and_then(|c| c.to_array())
                    .unwrap_or_default();
                let over = ended.first().is_some_and(|r| {
                    serde_json::from_str::<Record>(&r.body).is_ok_and(|r| r.status.is_terminal())
                });
                if over {
                    return None;
                }
                // Until the next stored event (at most a minute, as a safety net).
                let wake = Box::pin(stored.changed(seen));
                let timeout = Box::pin(Delay::from(std::time::Duration::from_secs(60)));
                futures_util::future::select(wake, timeout).await;
            }
        });
        let headers = Headers::new();
        headers.set("content-type", "text/event-stream")?;
        headers.set("cache-control", "no-cache")?;
        Ok(Response::from_stream(s)?.with_headers(headers))
    }
}

/// A wake-up for everything waiting on this object's stored events: a generation counter and the
/// wakers of the futures waiting for it to move (one object, one thread: no locking).
#[derive(Debug, Default, Clone)]
struct Notify {
    inner: std::rc::Rc<std::cell::RefCell<(u64, Vec<std::task::Waker>)>>,
}

impl Notify {
    fn generation(&self) -> u64 {
        self.inner.borrow().0
    }

    /// Something was stored: every waiter wakes.
    fn notify(&self) {
        let wakers = {
            let mut inner = self.inner.borrow_mut();
            inner.0 += 1;
            std::mem::take(&mut inner.1)
        };
        for w in wakers {
            w.wake();
        }
    }

    /// Ready once something was stored after generation `seen`.
    fn changed(&self, seen: u64) -> impl std::future::Future<Output = ()> {
        let inner = self.inner.clone();
        std::future::poll_fn(move |cx| {
            let mut inner = inner.borrow_mut();
            if inner.0 != seen {
                return std::task::Poll::Ready(());
            }
            inner.1.push(cx.waker().clone());
            std::task::Poll::Pending
        })
    }
}

/// An agent as the API shows it.
fn agent_view(r: &Record) -> AgentView {
    AgentView {
        created_at: r.created_at,
        finished_at: r.finished_at,
        id: r.id.clone(),
        model: r.model.clone(),
        parent: r.parent.clone(),
        prompt: r.prompt.clone(),
        repository: r.repository.clone(),
        result: r.result.clone(),
        session: r.session.clone(),
        started_at: r.started_at,
        status: r.status,
        title: r.title.clone(),
        user: r.identity.user.clone(),
    }
}

/// What an agent did: its session's `output` (when it answered) and, once it ended, the branch
/// and commit of its result.
fn output_view(r: &Record, output: Option<AgentOutput>) -> AgentOutputView {
    let agent_result = r.result.as_ref().map(AgentResult::of);
    let (message, files) = match output {
        Some(o) => (Some(o.message), o.files),
        None => (None, Vec::new()),
    };
    AgentOutputView {
        branch: agent_result.as_ref().map(|a| a.branch.clone()),
        commit: agent_result.map(|a| a.commit),
        files,
        id: r.id.clone(),
        message,
        result: r.result.clone(),
        session: r.session.clone(),
        status: r.status,
    }
}

/// The agents' rows (`agents` table, with the outcome kept in their `result`), their status
/// events (`events` table) and the link a session keeps (its `kv` key `background`).
#[cfg(test)]
mod stored_formats {
    use super::{AgentLink, AgentOutcome, Record, StatusEvent};
    use crate::store::stored_formats::pinned;

    #[test]
    fn agent_outcome_format_unchanged() {
        pinned::<AgentOutcome>(
            r#"{"branch":"nightshift/ses_2","commit":"4f2c9e1","ok":true,"reason":"done"}"#,
        );
        pinned::<AgentOutcome>(r#"{"branch":null,"commit":null,"ok":false,"reason":null}"#);
        pinned::<AgentOutcome>(
            r#"{"ok":false,"reason":"stopped: someone stopped the agent's prompt"}"#,
        );
    }

    #[test]
    fn status_event_format_unchanged() {
        pinned::<StatusEvent>(
            r#"{"at":1700000001000,"from":"queued","id":"bg_acme_1f","session":null,"status":"starting","type":"status"}"#,
        );
        pinned::<StatusEvent>(
            r#"{"at":1700000000000,"from":null,"id":"bg_acme_1f","session":null,"status":"queued","type":"status"}"#,
        );
    }

    #[test]
    fn agent_link_format_unchanged() {
        pinned::<AgentLink>(r#"{"agent":"bg_acme_1f","shard":"acme","depth":2}"#);
    }

    #[test]
    fn record_format_unchanged() {
        pinned::<Record>(
            r#"{"id":"bg_acme_1f","identity":{"user":"u_ada","name":"Ada","email":"ada@example.com"},"title":"Write tests","prompt":"Add tests for the login form","repository":"acme/web","model":"claude-sonnet","parent":"ses_1","status":"completed","session":"ses_2","created_at":1700000000000,"started_at":1700000001000,"finished_at":1700000009000,"result":{"branch":"nightshift/ses_2","commit":"4f2c9e1","ok":true,"reason":"done"}}"#,
        );
    }
}

/// The views encode as the `json!` objects they replaced (written out as they were).
#[cfg(test)]
mod view_tests {
    use super::*;
    use serde_json::json;

    fn record(result: Option<Value>) -> Record {
        Record {
            id: "bg_acme_1f".into(),
            identity: Identity {
                user: "u_ada".into(),
                name: "Ada".into(),
                email: None,
            },
            title: "Write tests".into(),
            prompt: "Add tests for the login form".into(),
            repository: Some("acme/web".into()),
            model: None,
            parent: Some("ses_1".into()),
            status: Status::Completed,
            session: Some("ses_2".into()),
            created_at: 1,
            started_at: Some(2),
            finished_at: Some(3),
            result,
        }
    }

    fn text<T: Serialize>(view: &T) -> String {
        serde_json::to_string(view).unwrap_or_default()
    }

    #[test]
    fn an_agent_is_shown_as_before() {
        let outcome = AgentOutcome::Finished {
            branch: Some("nightshift/ses_2".into()),
            commit: None,
            ok: true,
            reason: None,
        };
        let r = record(Some(outcome.value()));
        let old = json!({
            "id": r.id, "status": r.status.as_str(), "title": r.title, "prompt": r.prompt,
            "repository": r.repository, "model": r.model, "parent": r.parent, "session": r.session,
            "user": r.identity.user, "created_at": r.created_at, "started_at": r.started_at,
            "finished_at": r.finished_at, "result": r.result,
        });
        assert_eq!(text(&agent_view(&r)), old.to_string());
    }

    #[test]
    fn an_agents_output_is_shown_as_before() {
        let stopped = AgentOutcome::Ended {
            ok: false,
            reason: "stopped".into(),
        };
        for r in [record(None), record(Some(stopped.value()))] {
            for output in [
                None,
                Some(AgentOutput {
                    files: vec!["src/a.rs".into()],
                    message: "Done.".into(),
                }),
            ] {
                let mut out = json!({"id": r.id, "status": r.status.as_str(), "session": r.session,
                    "result": r.result, "message": null, "files": []});
                if let Some(output) = output.clone() {
                    out["message"] = Value::String(output.message);
                    out["files"] = json!(output.files);
                }
                if let Some(res) = &r.result {
                    out["branch"] = res["branch"].clone();
                    out["commit"] = res["commit"].clone();
                }
                assert_eq!(text(&output_view(&r, output)), out.to_string());
            }
        }
    }

    #[test]
    fn a_status_event_is_stored_as_before() {
        let t = Transition {
            id: "bg_acme_1f".into(),
            from: Some(Status::Queued),
            to: Status::Starting,
        };
        let (now, session) = (7u64, None::<String>);
        let event = StatusEvent {
            at: now,
            from: t.from,
            id: t.id.clone(),
            session: session.clone(),
            status: t.to,
            kind: StatusEventType::Status,
        };
        let old = json!({"type": "status", "id": t.id, "from": t.from.map(Status::as_str),
            "status": t.to.as_str(), "at": now, "session": session});
        assert_eq!(text(&event), old.to_string());
    }
}

#[cfg(test)]
mod notify_tests {
    use super::Notify;
    use std::future::Future;
    use std::task::{Context, Poll, Waker};

    #[test]
    fn a_waiting_stream_wakes_when_an_event_is_stored_and_not_before() {
        let stored = Notify::default();
        let seen = stored.generation();
        let mut waiting = Box::pin(stored.changed(seen));
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(waiting.as_mut().poll(&mut cx), Poll::Pending);
        assert_eq!(
            waiting.as_mut().poll(&mut cx),
            Poll::Pending,
            "nothing stored yet"
        );
        stored.notify();
        assert_eq!(waiting.as_mut().poll(&mut cx), Poll::Ready(()));
        // Stored between the look and the wait: the wait returns at once.
        let late = stored.generation() - 1;
        assert_eq!(
            Box::pin(stored.changed(late)).as_mut().poll(&mut cx),
            Poll::Ready(())
        );
    }
}
