//! The Session Durable Object: the executor of one `HostedSession`. It decodes a request or frame, hands it to the core, carries out the effects the core returns in order (store, then broadcast; sockets; provider and object calls), feeds each answer back as an input, and sets its alarm from the core's next deadline.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, VecDeque};

use nightshift_core::api::{
    self, Answer, PeopleClose, RouteError, SessionRequest, SessionView, View,
};
use nightshift_core::events::Event;
use nightshift_core::hosted::{
    CloseCode, Command, Done, Effect, Entropy, HostedSession, Input, LinkTiming, SandboxOp,
};
use nightshift_core::ids::Identity;
use nightshift_core::session::{Meta, Session, SessionStatus};
use nightshift_core::store::{self, Kv, Rows, Stored, Written};
use nightshift_core::wire::{
    self, ClientMessage, CreateSession, ErrorBody, PresenceEntry, ServerMessage,
};
use serde::{Deserialize, Serialize};
use worker::*;

use crate::auth::decode_identity;
use crate::config;
use crate::error::{json_of, ApiError, ApiResult, EdgeError};
use crate::objects::{self, ChildUpdate, OkAnswer, SessionRoute, StatusChange, UserIndexRoute};
use crate::platform::{new_id, now_ms, random_hex};
use crate::provider;
use crate::session_provider::{self, Answers, Context, SpawnResult};
use crate::store::SqlRows;
use crate::{agent_session, store as sql_store};

/// Events replayed per frame when a client catches up.
const REPLAY_CHUNK: u32 = 500;

/// What each accepted socket remembers across hibernation.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Attachment {
    client: String,
    conn: String,
    identity: Identity,
}

/// What the sandbox's socket remembers across hibernation: the link generation (its token's
/// hash) it was opened for.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SandboxAttachment {
    #[serde(default)]
    link: Option<String>,
    conn: String,
}

/// Tag of every person's socket (broadcasts go to these, never to the sandbox).
const PEOPLE: &str = "people";
/// Tag of the sandbox's socket.
const SANDBOX: &str = "sandbox";

/// The tag of one client's sockets. Prefixed, so no client id or user name can ever equal a
/// reserved tag (`people`, `sandbox`); at most 7 + 128 bytes (the core bounds client ids), so the
/// runtime's 256-byte limit on a tag (which it would answer with a panic) is never reached.
fn client_tag(client: &str) -> String {
    format!("client:{client}")
}

struct Loaded {
    hosted: HostedSession,
    last_seq: u64,
}

#[durable_object]
pub struct SessionObject {
    state: State,
    env: Env,
    /// Cache of the stored session; rebuilt from SQLite whenever the object wakes.
    cache: RefCell<Option<Loaded>>,
    /// The alarm time this instance last set (None: unknown).
    alarm_at: Cell<Option<u64>>,
}

impl DurableObject for SessionObject {
    fn new(state: State, env: Env) -> Self {
        SessionObject {
            state,
            env,
            cache: RefCell::new(None),
            alarm_at: Cell::new(None),
        }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        match self.route(req).await {
            Ok(r) => Ok(r),
            Err(e) => e.into_response(),
        }
    }

    async fn websocket_message(
        &self,
        ws: WebSocket,
        message: WebSocketIncomingMessage,
    ) -> Result<()> {
        let Ok(Some(att)) = ws.deserialize_attachment::<Attachment>() else {
            if let Ok(Some(sa)) = ws.deserialize_attachment::<SandboxAttachment>() {
                if let WebSocketIncomingMessage::String(text) = message {
                    if let Err(e) = self.on_sandbox_message(&sa, &text).await {
                        send_frame(&ws, &error_frame(None, &e.code, &e.message));
                    }
                }
                return Ok(());
            }
            let _ = ws.close(Some(1008), Some("unknown connection; reconnect"));
            return Ok(());
        };
        let WebSocketIncomingMessage::String(text) = message else {
            let e = ApiError::from(EdgeError::BinaryNotSupported);
            send_frame(&ws, &error_frame(None, &e.code, &e.message));
            return Ok(());
        };
        let (reference, parsed) = wire::parse_client_message(&text);
        let frame = match parsed {
            Err(e) => error_frame(reference, e.code, &e.message),
            Ok(msg) => match self.on_client_message(&att, msg).await {
                Ok(result) => ServerMessage::Ack { reference, result },
                Err(e) => error_frame(reference, &e.code, &e.message),
            },
        };
        send_frame(&ws, &frame);
        Ok(())
    }

    async fn websocket_close(&self, ws: WebSocket, _: usize, _: String, _: bool) -> Result<()> {
        self.drop_socket(&ws).await;
        Ok(())
    }

    async fn websocket_error(&self, ws: WebSocket, _error: Error) -> Result<()> {
        self.drop_socket(&ws).await;
        Ok(())
    }

    async fn alarm(&self) -> Result<Response> {
        self.alarm_at.set(None);
        if let Err(e) = self.on_alarm().await {
            console_error!("session alarm failed: {}", e.message);
        }
        Response::ok("ok")
    }
}

/// Only the sandbox's bearer token (checked against the live link by the core).
fn bearer(req: &Request) -> String {
    let header = req.headers().get("authorization").ok().flatten();
    header
        .and_then(|h| h.strip_prefix("Bearer ").map(str::to_string))
        .unwrap_or_default()
}

fn send_text(sockets: &[WebSocket], frame: &ServerMessage) {
    if let Ok(text) = serde_json::to_string(frame) {
        for ws in sockets {
            let _ = ws.send_with_str(&text);
        }
    }
}

fn send_frame(ws: &WebSocket, frame: &ServerMessage) {
    send_text(std::slice::from_ref(ws), frame);
}

fn error_frame(reference: Option<String>, code: &str, message: &str) -> ServerMessage {
    let (code, message) = (code.to_string(), message.to_string());
    let error = ErrorBody { code, message };
    ServerMessage::Error { reference, error }
}

/// Who an object's call to the session acts as.
fn system() -> Identity {
    let actor = nightshift_core::ids::Actor::system();
    Identity {
        user: actor.user,
        name: actor.name,
        email: None,
    }
}

fn not_loaded() -> ApiError {
    ApiError::internal("session not loaded")
}

/// New sandbox tokens from the platform's randomness.
struct Tokens;

impl Entropy for Tokens {
    fn token(&mut self) -> String {
        random_hex(32)
    }
}

impl SessionObject {
    fn sql(&self) -> SqlStorage {
        self.state.storage().sql()
    }

    fn rows(&self) -> SqlRows {
        SqlRows(self.sql())
    }

    /// The hosted session for a stored (or new) session, with this deployment's settings.
    fn hosted(&self, stored: Stored) -> HostedSession {
        let env = &self.env;
        let timing = LinkTiming {
            heartbeat_timeout_ms: config::sandbox_heartbeat_timeout_ms(env),
            grace_ms: config::sandbox_grace_ms(env),
        };
        let runner = config::runner(env);
        let hosted = HostedSession::new(stored.session, stored.link, timing, runner == "sandbox")
            .with_snapshots(stored.snapshots, config::snapshot_margin_ms(env))
            .with_idle(config::sandbox_idle_ms(env));
        match runner.as_str() {
            "echo" => hosted.with_echo(config::echo_run_ms(env), stored.jobs),
            _ => hosted,
        }
    }

    /// Makes sure the cache holds the stored session; false when there is none.
    fn ensure_loaded(&self) -> ApiResult<bool> {
        if self.cache.borrow().is_some() {
            return Ok(true);
        }
        let mut rows = self.rows();
        if !rows.exists()? {
            return Ok(false);
        }
        // Tables added since the session was created are created once, here.
        rows.create()?;
        let Some(stored) = store::load(&rows)? else {
            return Ok(false);
        };
        let mut last_seq = stored.last_seq;
        let mut hosted = self.hosted(stored);
        let live: BTreeSet<String> = self
            .state
            .get_websockets_with_tag(PEOPLE)
            .iter()
            .filter_map(|ws| ws.deserialize_attachment::<Attachment>().ok().flatten())
            .map(|a| a.client)
            .collect();
        for effect in hosted.woke(&live) {
            store::write(&mut rows, &hosted, &mut last_seq, now_ms(), effect)?;
        }
        *self.cache.borrow_mut() = Some(Loaded { hosted, last_seq });
        Ok(true)
    }

    fn require_loaded(&self) -> ApiResult<()> {
        match self.ensure_loaded()? {
            true => Ok(()),
            false => Err(EdgeError::SessionNotFound.into()),
        }
    }

    /// Reads from the cached hosted session (which must be loaded).
    fn read<T>(&self, f: impl FnOnce(&HostedSession, u64) -> T) -> ApiResult<T> {
        let cache = self.cache.borrow();
        let loaded = cache.as_ref().ok_or_else(not_loaded)?;
        Ok(f(&loaded.hosted, loaded.last_seq))
    }

    /// Hands one step to the core (synchronously, the borrow released before anything awaits).
    fn decide<T>(
        &self,
        f: impl FnOnce(&mut HostedSession, u64, &mut dyn Entropy) -> T,
    ) -> ApiResult<T> {
        let now = now_ms();
        let mut cache = self.cache.borrow_mut();
        let loaded = cache.as_mut().ok_or_else(not_loaded)?;
        Ok(f(&mut loaded.hosted, now, &mut Tokens))
    }

    /// Runs a person's command and carries out its effects.
    async fn run(&self, who: &Identity, command: Command) -> ApiResult<(Done, Answers)> {
        self.require_loaded()?;
        let (done, effects) = self.decide(|h, now, tokens| h.run(who, command, now, tokens))??;
        Ok((done, self.execute(effects).await?))
    }

    /// Hands an input to the core and carries out its effects.
    async fn input(&self, input: Input) -> ApiResult<Answers> {
        self.require_loaded()?;
        let effects = self.decide(|h, now, tokens| h.handle(input, now, tokens))?;
        self.execute(effects).await
    }

    /// Carries out effects in order, feeding each answer back to the core and carrying out
    /// what it decides next (before the rest), then sets the alarm. A failed store forgets the
    /// cache (the next request reloads what is stored) and stops: nothing after it (an
    /// acknowledgement included) is carried out. The alarm is set whatever happens.
    async fn execute(&self, effects: Vec<Effect>) -> ApiResult<Answers> {
        let mut queue: VecDeque<Effect> = effects.into();
        let mut answers = Answers::default();
        while let Some(effect) = queue.pop_front() {
            let next = match self.carry_out(effect, &mut answers).await {
                Ok(next) => next,
                Err(e) => {
                    if e.status >= 500 {
                        *self.cache.borrow_mut() = None;
                    }
                    let _ = self.schedule_alarm().await;
                    return Err(e);
                }
            };
            for input in next.into_iter().rev() {
                let more = self.decide(|h, now, tokens| h.handle(input, now, tokens))?;
                for e in more.into_iter().rev() {
                    queue.push_front(e);
                }
            }
        }
        self.schedule_alarm().await?;
        Ok(answers)
    }

    /// Carries out one effect; a provider call answers with the inputs that report it.
    async fn carry_out(&self, effect: Effect, answers: &mut Answers) -> ApiResult<Vec<Input>> {
        let written = {
            let mut cache = self.cache.borrow_mut();
            let loaded = cache.as_mut().ok_or_else(not_loaded)?;
            let (hosted, seq) = (&loaded.hosted, &mut loaded.last_seq);
            store::write(&mut self.rows(), hosted, seq, now_ms(), effect)?
        };
        let effect = match written {
            Written::Stored(events) => {
                self.stored(&events).await?;
                return Ok(Vec::new());
            }
            Written::Other(effect) => effect,
        };
        let sandbox = || self.state.get_websockets_with_tag(SANDBOX);
        match effect {
            Effect::Disconnect(clients) => {
                for client in &clients {
                    for ws in self.state.get_websockets_with_tag(&client_tag(client)) {
                        let removed = PeopleClose::Removed;
                        let _ = ws.close(Some(removed.code()), Some(removed.reason()));
                    }
                }
            }
            Effect::ToSandbox(frame) => {
                let text = serde_json::to_string(&frame).map_err(ApiError::internal)?;
                for ws in sandbox() {
                    let _ = ws.send_with_str(&text);
                }
            }
            Effect::CloseSandbox(code) => {
                for ws in sandbox() {
                    let _ = ws.close(Some(code.code()), Some(code.reason()));
                }
            }
            Effect::Refuse { link } => {
                let refused = CloseCode::Refused;
                for ws in sandbox() {
                    let att = ws.deserialize_attachment::<SandboxAttachment>();
                    if att.ok().flatten().and_then(|a| a.link).unwrap_or_default() == link {
                        let _ = ws.close(Some(refused.code()), Some(refused.reason()));
                    }
                }
            }
            Effect::Ended { members } => self.ended(members).await,
            other => {
                let ctx = self.read(|h, _| Context::of(h))?;
                let (env, sql) = (&self.env, &self.sql());
                return session_provider::carry_out(env, sql, ctx, other, answers, now_ms()).await;
            }
        }
        Ok(Vec::new())
    }

    /// Events were stored: every person sees them; a background agent's session that ended its
    /// prompt tells its agent.
    async fn stored(&self, events: &[Event]) -> ApiResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let frame = ServerMessage::Events {
            events: events.to_vec(),
        };
        send_text(&self.state.get_websockets_with_tag(PEOPLE), &frame);
        if let Some((ok, result)) = agent_session::ending(events) {
            if let Some(link) = agent_session::link(&self.sql())? {
                if let Err(e) = agent_session::report_end(&self.env, &link, ok, result).await {
                    console_error!("reporting agent {} ended: {}", link.agent, e.message);
                }
            }
        }
        Ok(())
    }

    /// The session ended: each member's index marks it ended; the agents it spawned end too.
    async fn ended(&self, members: Vec<String>) {
        let Ok(id) = self.read(|h, _| h.session.meta.id.clone()) else {
            return;
        };
        let route = UserIndexRoute::Status;
        let Ok(body) = objects::encode(&StatusChange::ended(&id)) else {
            return;
        };
        for user in members {
            let result = async {
                let stub = self.env.durable_object("USER_INDEX")?.get_by_name(&user)?;
                let body = Some(body.clone());
                crate::http::call(&stub, route.method(), route.path(), None, body).await
            }
            .await;
            if let Err(e) = result {
                console_error!("marking session {id} ended for {user}: {}", e.message);
            }
        }
        agent_session::end_children(&self.env, &self.sql(), &id).await;
    }

    /// The sandbox dials in with its token; one live sandbox socket per session.
    async fn accept_sandbox(&self, req: &Request) -> ApiResult<Response> {
        if !self.ensure_loaded()? {
            return Err(EdgeError::NotFound("session").into());
        }
        let link = self.read(|h, _| h.admit(&bearer(req)))??;
        let older = self.state.get_websockets_with_tag(SANDBOX);
        let pair = WebSocketPair::new().map_err(ApiError::from)?;
        self.state
            .accept_websocket_with_tags(&pair.server, &[SANDBOX]);
        let conn = random_hex(8);
        let attachment = SandboxAttachment {
            link: Some(link),
            conn,
        };
        pair.server
            .serialize_attachment(attachment)
            .map_err(ApiError::from)?;
        let replaced = CloseCode::Replaced;
        for ws in older {
            let _ = ws.close(Some(replaced.code()), Some(replaced.reason()));
        }
        self.input(Input::SandboxConnected).await?;
        Response::from_websocket(pair.client).map_err(ApiError::from)
    }

    /// The link generation a sandbox socket was opened for (sockets from before generations
    /// were recorded count as the current one).
    fn socket_link(&self, att: &SandboxAttachment) -> ApiResult<String> {
        match &att.link {
            Some(link) => Ok(link.clone()),
            None => self
                .read(|h, _| h.link.as_ref().map(|l| l.token_hash.clone()))
                .map(Option::unwrap_or_default),
        }
    }

    /// One frame from a sandbox socket: parsed here, decided by the core.
    async fn on_sandbox_message(&self, att: &SandboxAttachment, text: &str) -> ApiResult<()> {
        self.require_loaded()?;
        let message = wire::parse_sandbox_message(text)?;
        let link = self.socket_link(att)?;
        self.input(Input::SandboxFrame { link, message }).await?;
        Ok(())
    }

    /// The sandbox's agent tools: checked by the live sandbox's token, run for the running
    /// prompt's author (a retired sandbox's token opens nothing).
    async fn sandbox_tools(&self, req: &mut Request) -> ApiResult<Response> {
        if !self.ensure_loaded()? {
            return Err(EdgeError::NotFound("session").into());
        }
        self.read(|h, _| h.admit(&bearer(req)))??;
        let bytes = req.bytes().await.map_err(|_| EdgeError::UnreadableBody)?;
        let tool: agent_session::ToolRequest =
            serde_json::from_slice(&bytes).map_err(agent_session::bad_tool_request)?;
        let (session, repository, author) = self.read(|h, _| {
            let meta = &h.session.meta;
            (meta.id.clone(), meta.repository.clone(), h.running_author())
        })?;
        let author = author.ok_or(EdgeError::NoRunningPrompt)?;
        let sql = self.sql();
        let (status, v) =
            agent_session::tool(&self.env, &sql, &session, repository, author, tool).await?;
        json_of(status, &v)
    }

    /// Answers with what the last spawn of an execution got from the provider.
    fn spawn_answer(spawned: SpawnResult) -> ApiResult<Response> {
        match spawned {
            Some(Ok((status, v))) => json_of(status, &v),
            Some(Err(e)) => Err(e),
            None => Err(ApiError::internal("no sandbox was asked for")),
        }
    }

    /// `POST /sandbox`: the session's live sandbox, or a new one.
    async fn ensure_sandbox(&self) -> ApiResult<Response> {
        let effects = self.decide(|h, now, tokens| h.ensure(now, tokens))??;
        Self::spawn_answer(self.execute(effects).await?.spawned)
    }

    async fn snapshot_now(&self, b: wire::SnapshotNow) -> ApiResult<Response> {
        let effects = self.decide(|h, _, _| h.request_snapshot(&b.sandbox))??;
        let taken = self.execute(effects).await?.snapshot;
        let id = taken.ok_or_else(|| ApiError::internal("no snapshot was taken"))??;
        let snap = self.read(|h, _| h.snapshots.snaps.iter().find(|s| s.id == id).cloned())?;
        let snap = snap.ok_or_else(|| ApiError::internal("the snapshot was not recorded"))?;
        json_of(201, &snap)
    }

    /// `POST /sandbox/restore`: a new sandbox for the session from one of its live snapshots (the
    /// newest when none is named). It becomes the session's sandbox the way a follow-up's restore
    /// does; the sandbox it replaces is retired and terminated. Everything that can refuse is
    /// checked before anything changes.
    async fn restore_sandbox(
        &self,
        who: &Identity,
        b: wire::SandboxRestore,
    ) -> ApiResult<Response> {
        let now = now_ms();
        let snap = self.read(|h, _| h.restorable(b.snapshot.as_deref(), now).cloned())?;
        let Some(snap) = snap else {
            return Err(match b.snapshot {
                Some(id) => EdgeError::SnapshotNotRestorable(id),
                None => EdgeError::NoRestorableSnapshot,
            }
            .into());
        };
        self.read(|h, _| h.check_restore())??;
        // The provider may have lost it before its time.
        match provider::get_snapshot(&self.env, &snap.id).await? {
            Ok(_) => {}
            Err(refused) if refused.is_not_found() => {
                return Err(EdgeError::SnapshotGone(snap.id).into())
            }
            Err(refused) => {
                let (status, answer) = (refused.status, refused.body.to_string());
                let id = snap.id;
                return Err(EdgeError::SnapshotLookupFailed { id, status, answer }.into());
            }
        }
        let name = who.name.clone();
        let effects = self.decide(|h, now, tokens| h.restore(&name, &snap.id, now, tokens))??;
        Self::spawn_answer(self.execute(effects).await?.spawned)
    }

    /// May `who` do `op` on this session's sandbox? Stop and terminate of the session's own
    /// sandbox retire it first (the core decides).
    async fn authorize_sandbox(
        &self,
        who: &Identity,
        b: wire::SandboxAuthorize,
    ) -> ApiResult<Response> {
        let op = SandboxOp::parse(&b.op);
        let (name, sandbox) = (who.name.clone(), b.sandbox.as_deref());
        let effects = self.decide(|h, now, tokens| h.authorize(&name, sandbox, op, now, tokens))?;
        self.execute(effects).await?;
        json_of(200, &OkAnswer::yes())
    }

    /// Sets the alarm to the core's next deadline (unless an earlier one is already set).
    async fn schedule_alarm(&self) -> ApiResult<()> {
        let Some(next) = self.read(|h, _| h.next_deadline())? else {
            return Ok(());
        };
        if self.alarm_at.get().is_some_and(|current| current <= next) {
            return Ok(());
        }
        let now = now_ms();
        let at = next.max(now + 1);
        let offset = i64::try_from(at - now).unwrap_or(0);
        self.state.storage().set_alarm(offset).await?;
        self.alarm_at.set(Some(at));
        Ok(())
    }

    /// The alarm: the core's timers, then the presence batch. Whatever fails, the alarm is set
    /// again.
    async fn on_alarm(&self) -> ApiResult<()> {
        if !self.ensure_loaded()? {
            return Ok(());
        }
        let result = self.input(Input::Alarm).await.map(drop);
        self.flush_presence();
        let rearmed = match self.ensure_loaded() {
            Ok(true) => self.schedule_alarm().await,
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        result.and(rearmed)
    }

    /// Sends coalesced presence changes to every socket.
    fn flush_presence(&self) {
        let delta = self.decide(|h, _, _| {
            let changed = h.take_presence();
            api::presence_delta(&h.session, changed)
        });
        if let Ok(Some(frame)) = delta {
            send_text(&self.state.get_websockets_with_tag(PEOPLE), &frame);
        }
    }

    async fn drop_socket(&self, ws: &WebSocket) {
        let _ = ws.close(Some(1000), Some("closed"));
        let Ok(Some(att)) = ws.deserialize_attachment::<Attachment>() else {
            if let Ok(Some(sa)) = ws.deserialize_attachment::<SandboxAttachment>() {
                self.drop_sandbox_socket(&sa).await;
            }
            return;
        };
        // A reconnect with the same client id may already have replaced this socket.
        let sockets = self.state.get_websockets_with_tag(&client_tag(&att.client));
        let replaced = sockets.iter().any(|other| {
            let other = other.deserialize_attachment::<Attachment>().ok().flatten();
            other.is_some_and(|a| a.conn != att.conn)
        });
        if !replaced {
            let client = att.client.clone();
            let _ = self
                .run(&att.identity, Command::Disconnect { client })
                .await;
        }
    }

    async fn drop_sandbox_socket(&self, sa: &SandboxAttachment) {
        if !matches!(self.ensure_loaded(), Ok(true)) {
            return;
        }
        let Ok(link) = self.socket_link(sa) else {
            return;
        };
        // Another socket of the same sandbox (a reconnect) keeps it connected.
        let others = self.state.get_websockets_with_tag(SANDBOX).iter().any(|o| {
            let other = o
                .deserialize_attachment::<SandboxAttachment>()
                .ok()
                .flatten();
            other.is_some_and(|a| {
                a.conn != sa.conn && self.socket_link(&a).ok() == Some(link.clone())
            })
        });
        if !others {
            let _ = self.input(Input::SandboxClosed { link }).await;
        }
    }

    async fn route(&self, mut req: Request) -> ApiResult<Response> {
        let path = req.path();
        let method = req.method();
        // Reached only from other objects (the Worker never forwards these paths).
        match SessionRoute::parse(&method, &path) {
            Some(SessionRoute::SandboxLink) => return self.accept_sandbox(&req).await,
            Some(SessionRoute::SandboxTools) => return self.sandbox_tools(&mut req).await,
            Some(SessionRoute::BackgroundChild) => {
                let bytes = req.bytes().await.map_err(|_| EdgeError::UnreadableBody)?;
                let b: ChildUpdate = objects::decode_body(&path, &bytes)?;
                let command = Command::BackgroundChild {
                    id: b.id,
                    status: b.status,
                    session: b.session,
                    title: b.title,
                    branch: b.branch,
                };
                self.run(&system(), command).await?;
                return json_of(200, &OkAnswer::yes());
            }
            Some(SessionRoute::BackgroundCancel) => {
                self.run(&system(), Command::BackgroundCancel).await?;
                return json_of(200, &OkAnswer::yes());
            }
            Some(SessionRoute::BackgroundOutput) => {
                return json_of(200, &agent_session::output(&self.sql())?)
            }
            _ => {}
        }
        let who = decode_identity(&req).ok_or(EdgeError::Unauthenticated)?;
        if path != SessionRoute::Create.path() {
            self.require_loaded()?;
        }
        let url = req.url().map_err(ApiError::from)?;
        let query: Vec<(String, String)> = url
            .query_pairs()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let key = req
            .headers()
            .get(wire::IDEMPOTENCY_KEY_HEADER)
            .ok()
            .flatten();
        let body = match method {
            Method::Get | Method::Head => Vec::new(),
            _ => req.bytes().await.map_err(|_| EdgeError::UnreadableBody)?,
        };
        let request = api::decode(method.as_ref(), &path, &query, key, &body, || new_id("prm"))
            .map_err(|e| match e {
                RouteError::NoRoute => ApiError::from(EdgeError::NotFound("route")),
                RouteError::Wire(e) => ApiError::from(e),
            })?;
        if let SessionRequest::Create(body) = request {
            return self.create(&who, body, &req).await;
        }
        self.read(|h, _| api::check_access(&h.session, &who, &request))??;
        match request {
            SessionRequest::Command(command, answer) => self.command(&who, command, answer).await,
            SessionRequest::Snapshot => self.read(|h, seq| {
                let mut view = SessionView::of(&h.session, &who, seq);
                view.snapshots = Some(&h.snapshots.snaps);
                json_of(200, &view)
            })?,
            SessionRequest::Prompts => {
                self.read(|h, _| json_of(200, &api::QueueView::of(&h.session)))?
            }
            SessionRequest::Locks => self.read(|h, _| {
                json_of(
                    200,
                    &api::LocksView {
                        locks: h.session.locks.values().collect(),
                    },
                )
            })?,
            SessionRequest::Presence => self.read(|h, _| {
                let clients: Vec<PresenceEntry> = h
                    .session
                    .clients
                    .values()
                    .map(PresenceEntry::from)
                    .collect();
                json_of(
                    200,
                    &api::PresenceView {
                        total: clients.len(),
                        clients,
                    },
                )
            })?,
            SessionRequest::Events { since, limit } => {
                let bodies = sql_store::events_after(&self.sql(), since, limit)?;
                let last_seq = self.read(|_, seq| seq)?;
                crate::error::json_response(200, api::events_page(last_seq, &bodies))
                    .map_err(ApiError::from)
            }
            SessionRequest::Socket {
                since,
                client,
                kind,
            } => self.accept_socket(&who, since, client, kind).await,
            SessionRequest::SandboxEnsure => self.ensure_sandbox().await,
            SessionRequest::SandboxSnapshot(b) => self.snapshot_now(b).await,
            SessionRequest::SandboxRestore(b) => self.restore_sandbox(&who, b).await,
            SessionRequest::SandboxAuthorize(b) => self.authorize_sandbox(&who, b).await,
            SessionRequest::Create(_) => Err(EdgeError::SessionExists.into()),
        }
    }

    /// Runs a command and renders its answer's view.
    async fn answered<T>(
        &self,
        who: &Identity,
        command: Command,
        answer: &Answer,
        f: impl FnOnce(u16, View) -> ApiResult<T>,
    ) -> ApiResult<T> {
        let (done, answers) = self.run(who, command).await?;
        let applied = answers.egress_applied;
        self.read(
            |h, seq| match api::answer(h, who, answer, &done, seq, applied) {
                Ok((status, view)) => f(status, view),
                Err(api::ViewError::NotMember) => Err(nightshift_core::CoreError::NotMember.into()),
                Err(api::ViewError::NoPrompt) => Err(EdgeError::NotFound("prompt").into()),
            },
        )?
    }

    async fn command(
        &self,
        who: &Identity,
        command: Command,
        answer: Answer,
    ) -> ApiResult<Response> {
        self.answered(who, command, &answer, |status, view| json_of(status, &view))
            .await
    }

    async fn create(
        &self,
        who: &Identity,
        body: CreateSession,
        req: &Request,
    ) -> ApiResult<Response> {
        let mut rows = self.rows();
        if rows.exists()? {
            return Err(EdgeError::SessionExists.into());
        }
        let title = body.check()?;
        let header = |name: &str| req.headers().get(name).ok().flatten();
        let id = header(objects::SESSION_HEADER)
            .ok_or_else(|| ApiError::internal("missing session id"))?;
        let now = now_ms();
        let meta = Meta {
            id,
            title,
            repository: body.repository,
            owner: who.user.clone(),
            invite: random_hex(16),
            created_at: now,
            status: SessionStatus::Active,
            limits: config::limits(&self.env),
            next_arrival: 0,
            model: body.model,
        };
        let (mut session, out) = Session::create(meta, who);
        let events = store::create(&mut rows, &mut session, now, out.events)?;
        // A background agent's session knows its agent (set only by the scheduler object).
        if let Some(link) = header(objects::BACKGROUND_HEADER) {
            let link = objects::AgentLink::from_header(&link)?;
            store::put(&mut rows, &store::Key::Kv(Kv::AgentLink), Some(&link))?;
        }
        let last_seq = events.last().map_or(0, |e| e.seq);
        let stored = Stored {
            session,
            link: None,
            snapshots: Default::default(),
            jobs: Default::default(),
            last_seq,
        };
        let hosted = self.hosted(stored);
        *self.cache.borrow_mut() = Some(Loaded { hosted, last_seq });
        self.read(|h, seq| json_of(201, &SessionView::of(&h.session, who, seq)))?
    }

    async fn accept_socket(
        &self,
        who: &Identity,
        since: u64,
        client: Option<String>,
        kind: String,
    ) -> ApiResult<Response> {
        let client = client.unwrap_or_else(|| new_id("cli"));
        // Registers the client (membership and per-user limit checked by the core).
        self.run(
            who,
            Command::Connect {
                client: client.clone(),
                kind,
            },
        )
        .await?;
        // Close an older socket of the same client id: this one replaces it.
        let tag = client_tag(&client);
        let older = self.state.get_websockets_with_tag(&tag);
        let pair = WebSocketPair::new().map_err(ApiError::from)?;
        let server = pair.server;
        self.state
            .accept_websocket_with_tags(&server, &[tag.as_str(), PEOPLE]);
        let conn = random_hex(8);
        let identity = who.clone();
        let attachment = Attachment {
            client: client.clone(),
            conn,
            identity,
        };
        server
            .serialize_attachment(attachment)
            .map_err(ApiError::from)?;
        for ws in older {
            let replaced = PeopleClose::Replaced;
            let _ = ws.close(Some(replaced.code()), Some(replaced.reason()));
        }
        // Hello, then every event after `since`, then a presence snapshot; live events follow.
        let seq = self.read(|_, seq| seq)?;
        let user = who.user.clone();
        send_frame(&server, &ServerMessage::Hello { client, user, seq });
        let (mut cursor, mut sent) = (since, 0);
        let max = config::replay_max_events(&self.env);
        while cursor < seq {
            let page = api::replay_page(sent, max, REPLAY_CHUNK);
            if page == 0 {
                // Bounded work per connect: the client reconnects from `cursor` at once.
                let close = PeopleClose::ReplayContinues;
                let _ = server.close(Some(close.code()), Some(close.reason()));
                return Response::from_websocket(pair.client).map_err(ApiError::from);
            }
            let bodies = sql_store::events_after(&self.sql(), cursor, page)?;
            if bodies.is_empty() {
                break;
            }
            sent += bodies.len() as u64;
            let mut events = Vec::with_capacity(bodies.len());
            for body in bodies {
                let event: Event = serde_json::from_str(&body).map_err(ApiError::internal)?;
                cursor = event.seq;
                events.push(event);
            }
            send_frame(&server, &ServerMessage::Events { events });
        }
        send_frame(&server, &self.read(|h, _| api::presence_frame(&h.session))?);
        Response::from_websocket(pair.client).map_err(ApiError::from)
    }

    async fn on_client_message(
        &self,
        att: &Attachment,
        msg: ClientMessage,
    ) -> ApiResult<Option<serde_json::Value>> {
        let (command, answer) = api::client_command(msg, &att.client, || new_id("prm"))?;
        let to_value = |_: u16, view: View| serde_json::to_value(view).map_err(ApiError::internal);
        let value = self
            .answered(&att.identity, command, &answer, to_value)
            .await?;
        Ok(matches!(answer, Answer::Prompt(_)).then_some(value))
    }
}
