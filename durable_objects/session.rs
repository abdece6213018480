//! The Session Durable Object: one per session. Loads from SQLite, applies commands through the core, persists, then broadcasts over hibernating WebSockets.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeSet, VecDeque};

use nightshift_core::events::Event;
use nightshift_core::hosted::{
    CloseCode, DownFrame, Effect, Entropy, HostedSession, Input, LinkTiming, PollAnswer, SandboxOp,
    SpawnAnswer,
};
use nightshift_core::ids::{Cursor, Identity};
use nightshift_core::session::{
    Meta, Outcome, Session, SessionStatus, PRESENCE_DELTA_MAX, PRESENCE_SNAPSHOT_MAX,
};
use nightshift_core::signing::sha256_hex;
use nightshift_core::wire::{
    self, ClientMessage, CreateSession, CursorUpdate, ErrorBody, JoinSession, LockRequest,
    PresenceEntry, PromptRequest, Reprioritize, ServerMessage, UnlockRequest,
};
use nightshift_core::CoreResult;
use serde::{Deserialize, Serialize};
use worker::*;

use crate::auth::decode_identity;
use crate::config;
use crate::error::{json_of, ApiError, ApiResult, EdgeError};
use crate::platform::{new_id, now_ms, random_hex};
use crate::provider;
use crate::runner::{self, PromptRunner};
use crate::{agent_session, sandbox_start, snapshots, store};

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
        let text = match message {
            WebSocketIncomingMessage::String(s) => s,
            WebSocketIncomingMessage::Binary(_) => {
                send_frame(&ws, &edge_frame(EdgeError::BinaryNotSupported));
                return Ok(());
            }
        };
        let (reference, parsed) = wire::parse_client_message(&text);
        let msg = match parsed {
            Ok(m) => m,
            Err(e) => {
                send_frame(&ws, &error_frame(reference, e.code, &e.message));
                return Ok(());
            }
        };
        let reply = self.on_client_message(&att, msg).await;
        let frame = match reply {
            Ok(result) => ServerMessage::Ack { reference, result },
            Err(e) => error_frame(reference, &e.code, &e.message),
        };
        send_frame(&ws, &frame);
        Ok(())
    }

    async fn websocket_close(
        &self,
        ws: WebSocket,
        _code: usize,
        _reason: String,
        _was_clean: bool,
    ) -> Result<()> {
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
    req.headers()
        .get("authorization")
        .ok()
        .flatten()
        .and_then(|h| h.strip_prefix("Bearer ").map(str::to_string))
        .unwrap_or_default()
}

fn send_frame(ws: &WebSocket, frame: &ServerMessage) {
    if let Ok(text) = serde_json::to_string(frame) {
        let _ = ws.send_with_str(text);
    }
}

/// An error frame of the edge's own, answering no client frame.
fn edge_frame(e: EdgeError) -> ServerMessage {
    let e = ApiError::from(e);
    error_frame(None, &e.code, &e.message)
}

fn error_frame(reference: Option<String>, code: &str, message: &str) -> ServerMessage {
    ServerMessage::Error {
        reference,
        error: ErrorBody {
            code: code.to_string(),
            message: message.to_string(),
        },
    }
}

#[derive(Deserialize, Default)]
struct EventsQuery {
    since: Option<String>,
    limit: Option<String>,
}

fn query_u64(v: Option<&String>, name: &str, default: u64) -> ApiResult<u64> {
    match v {
        None => Ok(default),
        Some(s) => s
            .parse()
            .map_err(|_| EdgeError::QueryNotInteger(name.to_string()).into()),
    }
}

/// New sandbox tokens from the platform's randomness.
struct Tokens;

impl Entropy for Tokens {
    fn token(&mut self) -> String {
        random_hex(32)
    }
}

/// What a command's answer needs from its effects, read before they are carried out (so the
/// effects themselves are moved, never copied).
struct Applied {
    /// The prompt the command stopped.
    stopped: Option<String>,
    /// The command stored at least one event.
    stored_events: bool,
}

impl Applied {
    fn of(effects: &[Effect]) -> Applied {
        Applied {
            stopped: effects.iter().find_map(|e| match e {
                Effect::ToSandbox(DownFrame::Stop { prompt }) | Effect::RunnerAbort { prompt } => {
                    Some(prompt.clone())
                }
                _ => None,
            }),
            stored_events: effects
                .iter()
                .any(|e| matches!(e, Effect::Store { events, .. } if !events.is_empty())),
        }
    }
}

/// What the provider answered to the last spawn an execution carried out: its status and body
/// (a refusal is answered as `sandbox_failed`), or the error that kept it from answering.
type SpawnResult = Option<ApiResult<(u16, serde_json::Value)>>;

/// The provider's answers an execution's caller may answer with: the last spawn's, and the
/// last snapshot's (its id, or why it was not taken).
#[derive(Default)]
struct Answers {
    spawned: SpawnResult,
    snapshot: Option<ApiResult<String>>,
}

impl SessionObject {
    fn sql(&self) -> SqlStorage {
        self.state.storage().sql()
    }

    fn runner(&self) -> Box<dyn PromptRunner> {
        runner::from_config(&config::runner(&self.env), config::echo_run_ms(&self.env))
    }

    fn timing(&self) -> LinkTiming {
        LinkTiming {
            heartbeat_timeout_ms: config::sandbox_heartbeat_timeout_ms(&self.env),
            grace_ms: config::sandbox_grace_ms(&self.env),
        }
    }

    fn uses_sandboxes(&self) -> bool {
        config::runner(&self.env) == "sandbox"
    }

    /// Makes sure the cache holds the stored session; false when there is none.
    fn ensure_loaded(&self) -> ApiResult<bool> {
        if self.cache.borrow().is_some() {
            return Ok(true);
        }
        let sql = self.sql();
        let Some((mut session, last_seq)) = store::load(&sql)? else {
            return Ok(false);
        };
        // Clients whose socket is gone (the process restarted) are no longer present.
        let live: BTreeSet<String> = self
            .state
            .get_websockets()
            .iter()
            .filter_map(|ws| ws.deserialize_attachment::<Attachment>().ok().flatten())
            .map(|a| a.client)
            .collect();
        let gone: Vec<String> = session
            .clients
            .keys()
            .filter(|c| !live.contains(*c))
            .cloned()
            .collect();
        for c in &gone {
            session.disconnect(c);
        }
        let dirty = session.take_dirty();
        store::persist(&sql, &session, &dirty)?;
        let link = store::load_link(&sql)?;
        let hosted = HostedSession::new(session, link, self.timing(), self.uses_sandboxes())
            .with_snapshots(
                snapshots::load(&sql)?,
                config::snapshot_margin_ms(&self.env),
            );
        *self.cache.borrow_mut() = Some(Loaded { hosted, last_seq });
        Ok(true)
    }

    fn require_loaded(&self) -> ApiResult<()> {
        if self.ensure_loaded()? {
            Ok(())
        } else {
            Err(EdgeError::SessionNotFound.into())
        }
    }

    /// Reads from the cached session (which must be loaded).
    fn read<T>(&self, f: impl FnOnce(&Session, u64) -> T) -> ApiResult<T> {
        self.read_hosted(|h, seq| f(&h.session, seq))
    }

    /// Reads from the cached hosted session (which must be loaded).
    fn read_hosted<T>(&self, f: impl FnOnce(&HostedSession, u64) -> T) -> ApiResult<T> {
        let cache = self.cache.borrow();
        let l = cache
            .as_ref()
            .ok_or_else(|| ApiError::internal("session not loaded"))?;
        Ok(f(&l.hosted, l.last_seq))
    }

    /// Hands one step to the core (synchronously, the borrow released before anything awaits).
    fn decide<T>(
        &self,
        f: impl FnOnce(&mut HostedSession, u64, &mut dyn Entropy) -> T,
    ) -> ApiResult<T> {
        let now = now_ms();
        let mut cache = self.cache.borrow_mut();
        let l = cache
            .as_mut()
            .ok_or_else(|| ApiError::internal("session not loaded"))?;
        Ok(f(&mut l.hosted, now, &mut Tokens))
    }

    /// Applies one command: the core decides, then its effects are carried out.
    async fn apply(
        &self,
        f: impl FnOnce(&mut Session, u64) -> CoreResult<Outcome>,
    ) -> ApiResult<Applied> {
        self.require_loaded()?;
        let effects = self.decide(|h, now, tokens| h.command(now, tokens, f))??;
        let applied = Applied::of(&effects);
        self.execute(effects).await?;
        Ok(applied)
    }

    /// Hands an input to the core and carries out its effects.
    async fn input(&self, input: Input) -> ApiResult<Answers> {
        self.require_loaded()?;
        let effects = self.decide(|h, now, tokens| h.handle(input, now, tokens))?;
        self.execute(effects).await
    }

    /// Carries out effects in order — store (then broadcast), sockets, network — feeding each
    /// provider answer back to the core and carrying out what it decides next, then sets the
    /// alarm. A failed store forgets the cache (the next request reloads what is stored) and
    /// stops: nothing after it (an acknowledgement included) is carried out.
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
                    let _ = self.schedule_alarm(now_ms()).await;
                    return Err(e);
                }
            };
            let mut more = Vec::new();
            for input in next {
                more.extend(self.decide(|h, now, tokens| h.handle(input, now, tokens))?);
            }
            for e in more.into_iter().rev() {
                queue.push_front(e);
            }
        }
        self.schedule_alarm(now_ms()).await?;
        Ok(answers)
    }

    /// Carries out one effect; a provider call answers with the input that reports it.
    async fn carry_out(&self, effect: Effect, answers: &mut Answers) -> ApiResult<Vec<Input>> {
        let sql = self.sql();
        match effect {
            Effect::Store { dirty, events } => {
                let now = now_ms();
                let stored = {
                    let mut cache = self.cache.borrow_mut();
                    let l = cache
                        .as_mut()
                        .ok_or_else(|| ApiError::internal("session not loaded"))?;
                    store::persist(&sql, &l.hosted.session, &dirty)?;
                    store::append(&sql, &mut l.last_seq, now, events)?
                };
                self.broadcast_events(&stored);
                if let Some((ok, result)) = agent_session::ending(&stored) {
                    if let Some(link) = agent_session::link(&sql)? {
                        if let Err(e) =
                            agent_session::report_end(&self.env, &link, ok, result).await
                        {
                            console_error!("reporting agent {} ended: {}", link.agent, e.message);
                        }
                    }
                }
            }
            Effect::SaveLink => {
                if let Some(link) = self.read_hosted(|h, _| h.link.clone())? {
                    store::save_link(&sql, &link)?;
                }
            }
            Effect::Disconnect(clients) => {
                for c in &clients {
                    for ws in self.state.get_websockets_with_tag(&client_tag(c)) {
                        let _ = ws.close(Some(4000), Some("removed from session"));
                    }
                }
            }
            Effect::ToSandbox(frame) => {
                let text = serde_json::to_string(&frame).map_err(ApiError::internal)?;
                for ws in self.state.get_websockets_with_tag(SANDBOX) {
                    let _ = ws.send_with_str(&text);
                }
            }
            Effect::CloseSandbox(code) => {
                for ws in self.state.get_websockets_with_tag(SANDBOX) {
                    let _ = ws.close(Some(code.code()), Some(code.reason()));
                }
            }
            Effect::Refuse { link } => {
                let refused = CloseCode::Refused;
                for ws in self.state.get_websockets_with_tag(SANDBOX) {
                    let att = ws
                        .deserialize_attachment::<SandboxAttachment>()
                        .ok()
                        .flatten();
                    if att.is_some_and(|a| a.link.as_deref().unwrap_or_default() == link) {
                        let _ = ws.close(Some(refused.code()), Some(refused.reason()));
                    }
                }
            }
            Effect::Spawn { token, snapshot } => {
                let link = sha256_hex(token.as_bytes());
                let (session_id, repository) =
                    self.read(|s, _| (s.meta.id.clone(), s.meta.repository.clone()))?;
                let repository = repository.unwrap_or_default();
                let snaps = self.read_hosted(|h, _| h.snapshots.clone())?;
                let started = sandbox_start::start(
                    &self.env,
                    &sql,
                    &snaps,
                    &session_id,
                    &repository,
                    &token,
                    now_ms(),
                    snapshot.as_deref(),
                )
                .await;
                let mut lost = Vec::new();
                let answer = match started {
                    Ok(s) if s.status == 201 => {
                        lost = s.lost;
                        answers.spawned = Some(Ok((201, s.sandbox.clone())));
                        SpawnAnswer::Created {
                            sandbox: s.sandbox["id"].as_str().unwrap_or_default().to_string(),
                            expires_at: s.sandbox["expires_at"].as_u64(),
                            how: s.how,
                        }
                    }
                    Ok(s) => {
                        lost = s.lost;
                        let message = format!(
                            "the provider refused the sandbox ({}): {}",
                            s.status,
                            s.sandbox["error"]["message"]
                                .as_str()
                                .unwrap_or("no reason given")
                        );
                        answers.spawned =
                            Some(Ok(EdgeError::SandboxFailed(message.clone()).answer()));
                        SpawnAnswer::Failed { message }
                    }
                    Err(e) => {
                        let message = e.message.clone();
                        answers.spawned = Some(Err(e));
                        SpawnAnswer::Failed { message }
                    }
                };
                let mut next = vec![Input::Spawned { link, answer }];
                if !lost.is_empty() {
                    next.insert(0, Input::SnapshotsLost { ids: lost });
                }
                return Ok(next);
            }
            Effect::StartStopped { sandbox } => {
                let path = format!("/v1/sandboxes/{sandbox}/start");
                let ok = matches!(
                    provider::call(&self.env, Method::Post, &path, None).await,
                    Ok((200, _))
                );
                return Ok(vec![Input::Started { sandbox, ok }]);
            }
            Effect::Poll { sandbox } => {
                let path = format!("/v1/sandboxes/{sandbox}");
                let answer = match provider::call(&self.env, Method::Get, &path, None).await {
                    Ok((200, v)) if v["status"] == "failed" || v["status"] == "terminated" => {
                        PollAnswer::Failed {
                            code: v["error"]["code"].as_str().unwrap_or("unknown").into(),
                            message: v["error"]["message"]
                                .as_str()
                                .unwrap_or("no reason given")
                                .into(),
                        }
                    }
                    Ok((404, _)) => PollAnswer::Gone,
                    _ => PollAnswer::Pending,
                };
                return Ok(vec![Input::Polled { sandbox, answer }]);
            }
            Effect::TakeSnapshot { sandbox, turn } => {
                let taken = snapshots::take(&self.env, sandbox.as_deref(), now_ms()).await;
                let next = match &taken {
                    Ok((id, expires_at)) => Input::SnapshotTaken {
                        turn,
                        id: id.clone(),
                        expires_at: *expires_at,
                    },
                    Err(e) => {
                        console_error!("snapshot of turn {turn}: {}", e.message);
                        Input::SnapshotNotTaken { turn }
                    }
                };
                answers.snapshot = Some(taken.map(|(id, _)| id));
                return Ok(vec![next]);
            }
            Effect::DeleteSnapshots { ids } => {
                let gone = snapshots::delete(&self.env, &ids).await;
                return Ok(vec![Input::SnapshotsDeleted { ids: gone }]);
            }
            Effect::SweepSandboxes => {
                let session = self.read(|s, _| s.meta.id.clone())?;
                let keep = self.read_hosted(|h, _| h.live_sandbox().map(str::to_string))?;
                let path = format!("/v1/sandboxes?session_id={session}");
                if let Ok((200, v)) = provider::call(&self.env, Method::Get, &path, None).await {
                    let listed = v["sandboxes"].as_array().cloned().unwrap_or_default();
                    for sandbox in listed {
                        let id = sandbox["id"].as_str().unwrap_or_default();
                        if id.is_empty()
                            || Some(id) == keep.as_deref()
                            || sandbox["status"] == "terminated"
                        {
                            continue;
                        }
                        if let Err(e) = provider::terminate(&self.env, id).await {
                            console_error!("terminating stray sandbox {id}: {}", e.message);
                        }
                    }
                }
            }
            Effect::SaveSnapshots => {
                let snaps = self.read_hosted(|h, _| h.snapshots.clone())?;
                snapshots::save(&sql, &snaps)?;
            }
            Effect::Terminate { sandbox } => {
                if let Err(e) = provider::terminate(&self.env, &sandbox).await {
                    console_error!("terminating sandbox {sandbox}: {}", e.message);
                }
            }
            Effect::RunnerStart { prompt } => self.runner().start(&sql, &prompt, now_ms())?,
            Effect::RunnerAbort { prompt } => self.runner().abort(&sql, &prompt)?,
            Effect::RememberBranch(branch) => {
                // A later cold start continues this branch (src/sandbox_start.rs).
                store::kv_put(&sql, sandbox_start::BRANCH, &branch)?;
            }
        }
        Ok(Vec::new())
    }

    /// The sandbox dials in with its token; one live sandbox socket per session.
    async fn accept_sandbox(&self, req: &Request) -> ApiResult<Response> {
        if !self.ensure_loaded()? {
            return Err(EdgeError::NotFound("session").into());
        }
        let token = bearer(req);
        let link = self.read_hosted(|h, _| h.admit(&token))??;
        let older = self.state.get_websockets_with_tag(SANDBOX);
        let pair = WebSocketPair::new().map_err(ApiError::from)?;
        let server = pair.server;
        self.state.accept_websocket_with_tags(&server, &[SANDBOX]);
        server
            .serialize_attachment(SandboxAttachment {
                link: Some(link),
                conn: random_hex(8),
            })
            .map_err(ApiError::from)?;
        for ws in older {
            let _ = ws.close(
                Some(CloseCode::Replaced.code()),
                Some(CloseCode::Replaced.reason()),
            );
        }
        self.input(Input::SandboxConnected).await?;
        Response::from_websocket(pair.client).map_err(ApiError::from)
    }

    /// The link generation a sandbox socket was opened for (sockets from before generations
    /// were recorded count as the current one).
    fn socket_link(&self, att: &SandboxAttachment) -> ApiResult<String> {
        match &att.link {
            Some(link) => Ok(link.clone()),
            None => self.read_hosted(|h, _| {
                h.link
                    .as_ref()
                    .map(|l| l.token_hash.clone())
                    .unwrap_or_default()
            }),
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

    async fn mark_ended_in_indexes(&self) {
        let Ok((id, users)) = self.read(|s, _| {
            (
                s.meta.id.clone(),
                s.members.keys().cloned().collect::<Vec<_>>(),
            )
        }) else {
            return;
        };
        let body = serde_json::json!({"id": id, "status": "ended"})
            .to_string()
            .into_bytes();
        for user in users {
            let result = async {
                let stub = self.env.durable_object("USER_INDEX")?.get_by_name(&user)?;
                crate::http::call(&stub, Method::Post, "/status", None, Some(body.clone())).await
            }
            .await;
            if let Err(e) = result {
                console_error!("marking session {id} ended for {user}: {}", e.message);
            }
        }
    }

    /// The sandbox's agent tools: checked by the live sandbox's token, run for the running
    /// prompt's author (a retired sandbox's token opens nothing).
    async fn sandbox_tools(&self, req: &mut Request) -> ApiResult<Response> {
        if !self.ensure_loaded()? {
            return Err(EdgeError::NotFound("session").into());
        }
        let token = bearer(req);
        self.read_hosted(|h, _| h.admit(&token))??;
        let sql = self.sql();
        let bytes = req.bytes().await.map_err(|_| EdgeError::UnreadableBody)?;
        let tool: agent_session::ToolRequest =
            serde_json::from_slice(&bytes).map_err(agent_session::bad_tool_request)?;
        let (session, repository, author) = self.read_hosted(|h, _| {
            let s = &h.session;
            (
                s.meta.id.clone(),
                s.meta.repository.clone(),
                h.running_author(),
            )
        })?;
        let author = author.ok_or(EdgeError::NoRunningPrompt)?;
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
    async fn ensure_sandbox(&self, who: &Identity) -> ApiResult<Response> {
        self.require_member(who)?;
        let live = self.read_hosted(|h, _| h.live_sandbox().map(str::to_string))?;
        if let Some(id) = live {
            let (st, v) =
                provider::call(&self.env, Method::Get, &format!("/v1/sandboxes/{id}"), None)
                    .await?;
            return json_of(st, &v);
        }
        let effects = self.decide(|h, now, tokens| h.ensure(now, tokens))??;
        Self::spawn_answer(self.execute(effects).await?.spawned)
    }

    async fn snapshot_now(&self, who: &Identity, b: wire::SnapshotNow) -> ApiResult<Response> {
        self.require_member(who)?;
        let effects = self.decide(|h, _, _| h.request_snapshot(&b.sandbox))??;
        let taken = self.execute(effects).await?.snapshot;
        let id = taken.ok_or_else(|| ApiError::internal("no snapshot was taken"))??;
        let snap =
            self.read_hosted(|h, _| h.snapshots.snaps.iter().find(|s| s.id == id).cloned())?;
        json_of(
            201,
            &snap.ok_or_else(|| ApiError::internal("the snapshot was not recorded"))?,
        )
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
        self.require_member(who)?;
        let now = now_ms();
        let snap = self.read_hosted(|h, _| h.restorable(b.snapshot.as_deref(), now).cloned())?;
        let Some(snap) = snap else {
            return Err(match b.snapshot {
                Some(id) => EdgeError::SnapshotNotRestorable(id),
                None => EdgeError::NoRestorableSnapshot,
            }
            .into());
        };
        self.read_hosted(|h, _| h.check_restore())??;
        // The provider may have lost it before its time.
        let path = format!("/v1/snapshots/{}", snap.id);
        match provider::call(&self.env, Method::Get, &path, None).await? {
            (200, _) => {}
            (404, _) => return Err(EdgeError::SnapshotGone(snap.id).into()),
            (status, v) => {
                return Err(EdgeError::SnapshotLookupFailed {
                    id: snap.id,
                    status,
                    answer: v.to_string(),
                }
                .into())
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
        self.require_member(who)?;
        let op = SandboxOp::parse(&b.op);
        let name = who.name.clone();
        let effects = self
            .decide(|h, now, tokens| h.authorize(&name, b.sandbox.as_deref(), op, now, tokens))?;
        self.execute(effects).await?;
        json_of(200, &serde_json::json!({"ok": true}))
    }

    fn broadcast_events(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let frame = ServerMessage::Events {
            events: events.to_vec(),
        };
        let Ok(text) = serde_json::to_string(&frame) else {
            return;
        };
        for ws in self.state.get_websockets_with_tag(PEOPLE) {
            let _ = ws.send_with_str(&text);
        }
    }

    /// Sets the alarm to the earliest deadline: the hosted session's (presence, sweeps, locks,
    /// the sandbox's heartbeat, grace, spawn poll and retry), the runner's and the snapshots'.
    async fn schedule_alarm(&self, now: u64) -> ApiResult<()> {
        let mut next = self.read_hosted(|h, _| h.next_deadline())?;
        if let Some(due) = self.runner().next_due(&self.sql())? {
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        let Some(next) = next else { return Ok(()) };
        if let Some(current) = self.alarm_at.get() {
            if current <= next {
                return Ok(());
            }
        }
        let at = next.max(now + 1);
        let offset = i64::try_from(at.saturating_sub(now_ms())).unwrap_or(0);
        self.state.storage().set_alarm(offset).await?;
        self.alarm_at.set(Some(at));
        Ok(())
    }

    /// The alarm: runner completions that are due, the hosted session's timers, snapshot
    /// upkeep, the presence batch. Whatever fails, the alarm is set again.
    async fn on_alarm(&self) -> ApiResult<()> {
        if !self.ensure_loaded()? {
            return Ok(());
        }
        let result = self.alarm_steps().await;
        self.flush_presence();
        let rearmed = match self.ensure_loaded() {
            Ok(true) => self.schedule_alarm(now_ms()).await,
            Ok(false) => Ok(()),
            Err(e) => Err(e),
        };
        result.and(rearmed)
    }

    async fn alarm_steps(&self) -> ApiResult<()> {
        let now = now_ms();
        let runner = self.runner();
        for (prompt, due) in runner.jobs(&self.sql())? {
            if due > now {
                continue;
            }
            let text = self.read(|s, _| s.queue.prompts.get(&prompt).map(|p| p.text.clone()))?;
            store::runner_cancel(&self.sql(), &prompt)?;
            if let Some(text) = text {
                let reply = runner.reply(&text);
                let p = prompt.clone();
                let _ = self
                    .apply(move |s, now| {
                        let mut out = s.agent_text(&p, reply)?;
                        let fin = s.finish_prompt(&p, true, None, now)?;
                        out.events.extend(fin.events);
                        out.start = fin.start;
                        Ok(out)
                    })
                    .await;
            }
        }
        self.input(Input::Alarm).await?;
        Ok(())
    }

    /// Sends coalesced presence changes to every socket.
    fn flush_presence(&self) {
        let Ok(changed) = self.decide(|h, _, _| h.take_presence()) else {
            return;
        };
        if changed.is_empty() {
            return;
        }
        let Ok(frame) = self.read(|s, _| {
            let mut updated = Vec::new();
            let mut left = Vec::new();
            let mut truncated = false;
            for c in changed {
                match s.clients.get(&c) {
                    Some(_) if updated.len() >= PRESENCE_DELTA_MAX => truncated = true,
                    Some(client) => updated.push(PresenceEntry::from(client)),
                    None if left.len() >= PRESENCE_DELTA_MAX => truncated = true,
                    None => left.push(c),
                }
            }
            ServerMessage::PresenceDelta {
                updated,
                left,
                total: s.clients.len(),
                truncated,
            }
        }) else {
            return;
        };
        let Ok(text) = serde_json::to_string(&frame) else {
            return;
        };
        for ws in self.state.get_websockets_with_tag(PEOPLE) {
            let _ = ws.send_with_str(&text);
        }
    }

    async fn drop_socket(&self, ws: &WebSocket) {
        let Ok(Some(att)) = ws.deserialize_attachment::<Attachment>() else {
            if let Ok(Some(sa)) = ws.deserialize_attachment::<SandboxAttachment>() {
                let _ = ws.close(Some(1000), Some("closed"));
                if !matches!(self.ensure_loaded(), Ok(true)) {
                    return;
                }
                let Ok(link) = self.socket_link(&sa) else {
                    return;
                };
                // Another socket of the same sandbox (a reconnect) keeps it connected.
                let others = self.state.get_websockets_with_tag(SANDBOX).iter().any(|o| {
                    o.deserialize_attachment::<SandboxAttachment>()
                        .ok()
                        .flatten()
                        .is_some_and(|a| {
                            a.conn != sa.conn && self.socket_link(&a).ok().as_ref() == Some(&link)
                        })
                });
                if !others {
                    let _ = self.input(Input::SandboxClosed { link }).await;
                }
            }
            return;
        };
        // A reconnect with the same client id may already have replaced this socket.
        let replaced = self
            .state
            .get_websockets_with_tag(&client_tag(&att.client))
            .iter()
            .any(|other| {
                other
                    .deserialize_attachment::<Attachment>()
                    .ok()
                    .flatten()
                    .is_some_and(|a| a.conn != att.conn)
            });
        let _ = ws.close(Some(1000), Some("closed"));
        if replaced {
            return;
        }
        let client = att.client.clone();
        let _ = self.apply(move |s, _| Ok(s.disconnect(&client))).await;
    }

    fn identity(req: &Request) -> ApiResult<Identity> {
        decode_identity(req).ok_or_else(|| EdgeError::Unauthenticated.into())
    }

    async fn body<T: serde::de::DeserializeOwned>(req: &mut Request) -> ApiResult<T> {
        let bytes = req.bytes().await.map_err(|_| EdgeError::UnreadableBody)?;
        Ok(wire::parse_body(&bytes)?)
    }

    async fn route(&self, mut req: Request) -> ApiResult<Response> {
        let path = req.path();
        let method = req.method();
        if path == "/sandbox-link" {
            return self.accept_sandbox(&req).await;
        }
        // Reached only from other objects (the Worker never forwards these paths).
        match (method.clone(), path.as_str()) {
            (Method::Post, "/sandbox/background") => return self.sandbox_tools(&mut req).await,
            (Method::Post, "/background/child") => {
                let v: serde_json::Value = req.json().await.map_err(ApiError::internal)?;
                self.require_loaded()?;
                let s = |k: &str| v[k].as_str().map(String::from);
                let (id, status) = (s("id").unwrap_or_default(), s("status").unwrap_or_default());
                let (session, title, branch) = (s("session"), s("title"), s("branch"));
                self.apply(move |x, _| Ok(x.background_child(id, status, session, title, branch)))
                    .await?;
                return json_of(200, &serde_json::json!({"ok": true}));
            }
            (Method::Post, "/background/cancel") => {
                self.require_loaded()?;
                let owner = self.read(|s, _| {
                    s.members.get(&s.meta.owner).map(|m| Identity {
                        user: m.user.clone(),
                        name: m.name.clone(),
                        email: m.email.clone(),
                    })
                })?;
                if let Some(who) = owner {
                    // Nothing running is fine: the agent may not have started its prompt yet.
                    let _ = self.apply(|s, now| s.stop_prompt(&who, now)).await;
                }
                return json_of(200, &serde_json::json!({"ok": true}));
            }
            (Method::Get, "/background/output") => {
                return json_of(200, &agent_session::output(&self.sql())?);
            }
            _ => {}
        }
        let who = Self::identity(&req)?;
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        if segs.as_slice() == ["create"] && method == Method::Post {
            let body: CreateSession = Self::body(&mut req).await?;
            return self.create(&who, body, &req).await;
        }
        self.require_loaded()?;
        match (method, segs.as_slice()) {
            (Method::Post, ["join"]) => {
                let body: JoinSession = Self::body(&mut req).await?;
                let applied = self.apply(|s, now| s.join(&who, &body.invite, now)).await?;
                let snapshot = self.snapshot(&who)?;
                json_of(if applied.stored_events { 201 } else { 200 }, &snapshot)
            }
            (Method::Get, ["snapshot"]) => {
                let mut v = self.snapshot(&who)?;
                // Where the work can be restored from if the sandbox goes away.
                let snaps = self.read_hosted(|h, _| h.snapshots.snaps.clone())?;
                v["snapshots"] = serde_json::to_value(snaps).map_err(ApiError::internal)?;
                json_of(200, &v)
            }
            (Method::Post, ["leave"]) => {
                self.apply(|s, _| s.leave(&who)).await?;
                json_of(200, &serde_json::json!({ "left": true }))
            }
            (Method::Put, ["egress"]) => {
                let b: wire::SessionEgress = Self::body(&mut req).await?;
                self.apply(|s, _| s.set_egress(&who, &b.allow)).await?;
                let sql = self.sql();
                store::kv_put(&sql, sandbox_start::EGRESS, &b.allow)?;
                // A live sandbox gets the new list at once; a later one at its start.
                let mut applied = false;
                let live = self.read_hosted(|h, _| h.live_sandbox().map(str::to_string))?;
                if let Some(id) = live {
                    applied = sandbox_start::apply_egress(&self.env, &id, &b.allow).await;
                }
                json_of(
                    200,
                    &serde_json::json!({"allow": b.allow, "applied_to_live_sandbox": applied}),
                )
            }
            (Method::Post, ["end"]) => {
                self.apply(|s, now| s.end(&who, now)).await?;
                self.mark_ended_in_indexes().await;
                let id = self.read(|s, _| s.meta.id.clone())?;
                agent_session::end_children(&self.env, &self.sql(), &id).await;
                json_of(200, &self.snapshot(&who)?)
            }
            (Method::Put, ["cursor"]) => {
                let b: CursorUpdate = Self::body(&mut req).await?;
                let cursor = Cursor {
                    file: b.file,
                    line: b.line,
                    column: b.column,
                };
                let client = b.client.clone();
                self.apply(|s, now| s.set_cursor(&who, &client, cursor, now))
                    .await?;
                json_of(200, &serde_json::json!({ "ok": true }))
            }
            (Method::Post, ["prompt"]) => {
                let header = req
                    .headers()
                    .get(wire::IDEMPOTENCY_KEY_HEADER)
                    .ok()
                    .flatten();
                let b: PromptRequest = Self::body(&mut req).await?;
                let key = b.idempotency_key(header)?;
                let (p, new) = self.enqueue(&who, b.text, b.priority, b.model, key).await?;
                // A repeat of a stored key answers 200 with the stored prompt.
                json_of(if new { 202 } else { 200 }, &p)
            }
            (Method::Delete, ["prompt", id]) => {
                let id = id.to_string();
                self.apply(|s, now| s.cancel_prompt(&who, &id, now)).await?;
                json_of(200, &self.prompt_json(&id)?)
            }
            (Method::Patch, ["prompt", id]) => {
                let b: Reprioritize = Self::body(&mut req).await?;
                let id = id.to_string();
                self.apply(|s, _| s.reprioritize_prompt(&who, &id, b.priority))
                    .await?;
                json_of(200, &self.prompt_json(&id)?)
            }
            (Method::Get, ["prompts"]) => {
                self.require_member(&who)?;
                json_of(200, &self.read(queue_json)?)
            }
            (Method::Post, ["stop"]) => {
                let applied = self.apply(|s, now| s.stop_prompt(&who, now)).await?;
                json_of(200, &serde_json::json!({ "stopped": applied.stopped }))
            }
            (Method::Post, ["lock"]) => {
                let b: LockRequest = Self::body(&mut req).await?;
                self.apply(|s, now| s.acquire_lock(&who, &b.resource, b.ttl_ms, now))
                    .await?;
                json_of(200, &self.read(|s, _| s.locks.get(&b.resource).cloned())?)
            }
            (Method::Post, ["unlock"]) => {
                let b: UnlockRequest = Self::body(&mut req).await?;
                self.apply(|s, _| s.release_lock(&who, &b.resource)).await?;
                json_of(200, &serde_json::json!({ "released": b.resource }))
            }
            (Method::Get, ["locks"]) => {
                self.require_member(&who)?;
                json_of(
                    200,
                    &self.read(
                        |s, _| serde_json::json!({ "locks": s.locks.values().collect::<Vec<_>>() }),
                    )?,
                )
            }
            (Method::Get, ["presence"]) => {
                self.require_member(&who)?;
                let all: Vec<PresenceEntry> =
                    self.read(|s, _| s.clients.values().map(PresenceEntry::from).collect())?;
                json_of(
                    200,
                    &serde_json::json!({ "total": all.len(), "clients": all }),
                )
            }
            (Method::Get, ["events"]) => {
                self.require_member(&who)?;
                let q: EventsQuery = req.query().unwrap_or_default();
                let since = query_u64(q.since.as_ref(), "since", 0)?;
                let limit = query_u64(q.limit.as_ref(), "limit", 1000)?.clamp(1, 5000) as u32;
                let rows = store::events_after(&self.sql(), since, limit)?;
                let last_seq = self.read(|_, seq| seq)?;
                let body = format!(
                    "{{\"last_seq\":{last_seq},\"events\":[{}]}}",
                    rows.join(",")
                );
                crate::error::json_response(200, body).map_err(ApiError::from)
            }
            (Method::Get, ["ws"]) => self.accept_socket(&who, &req).await,
            (Method::Post, ["sandbox", "ensure"]) => self.ensure_sandbox(&who).await,
            (Method::Post, ["sandbox", "snapshot"]) => {
                let b: wire::SnapshotNow = Self::body(&mut req).await?;
                self.snapshot_now(&who, b).await
            }
            (Method::Post, ["sandbox", "restore"]) => {
                let b: wire::SandboxRestore = Self::body(&mut req).await?;
                self.restore_sandbox(&who, b).await
            }
            (Method::Post, ["sandbox", "authorize"]) => {
                let b: wire::SandboxAuthorize = Self::body(&mut req).await?;
                self.authorize_sandbox(&who, b).await
            }
            _ => Err(EdgeError::NotFound("route").into()),
        }
    }

    fn require_member(&self, who: &Identity) -> ApiResult<()> {
        if self.read(|s, _| s.is_member(&who.user))? {
            Ok(())
        } else {
            Err(nightshift_core::CoreError::NotMember.into())
        }
    }

    async fn create(
        &self,
        who: &Identity,
        body: CreateSession,
        req: &Request,
    ) -> ApiResult<Response> {
        if store::exists(&self.sql())? {
            return Err(EdgeError::SessionExists.into());
        }
        let title = body.check()?;
        let id = req
            .headers()
            .get("x-nightshift-session")
            .ok()
            .flatten()
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
        let sql = self.sql();
        store::create_schema(&sql)?;
        let dirty = session.take_dirty();
        store::persist(&sql, &session, &dirty)?;
        // A background agent's session knows its agent (set only by the scheduler object).
        if let Some(link) = req.headers().get("x-nightshift-background").ok().flatten() {
            let link: crate::scheduler::AgentLink =
                serde_json::from_str(&link).map_err(ApiError::internal)?;
            store::kv_put(&sql, agent_session::LINK, &link)?;
        }
        let mut last_seq = 0;
        store::append(&sql, &mut last_seq, now, out.events)?;
        let hosted = HostedSession::new(session, None, self.timing(), self.uses_sandboxes())
            .with_snapshots(Default::default(), config::snapshot_margin_ms(&self.env));
        *self.cache.borrow_mut() = Some(Loaded { hosted, last_seq });
        json_of(201, &self.snapshot(who)?)
    }

    async fn enqueue(
        &self,
        who: &Identity,
        text: String,
        priority: i32,
        model: Option<String>,
        key: Option<String>,
    ) -> ApiResult<(serde_json::Value, bool)> {
        wire::check_model(model.as_deref())?;
        if self.uses_sandboxes() && self.read(|s, _| s.meta.repository.is_none())? {
            return Err(EdgeError::NoRepositoryForPrompts.into());
        }
        // The core decides whether the key names a stored prompt; this only passes it on.
        let submission = nightshift_core::session::PromptSubmission {
            id: new_id("prm"),
            text,
            priority,
            model,
            key,
        };
        let mut submitted = None;
        self.apply(|s, now| {
            let (done, out) = s.submit_prompt(who, submission, now)?;
            submitted = Some(done);
            Ok(out)
        })
        .await?;
        let done = submitted.ok_or_else(|| ApiError::internal("prompt not submitted"))?;
        Ok((self.prompt_json(done.id())?, done.is_new()))
    }

    fn prompt_json(&self, id: &str) -> ApiResult<serde_json::Value> {
        self.read(|s, _| {
            s.queue
                .prompts
                .get(id)
                .map(|p| serde_json::to_value(p.public()).unwrap_or_default())
        })?
        .ok_or_else(|| EdgeError::NotFound("prompt").into())
    }

    /// Everything a member needs to render the session.
    fn snapshot(&self, who: &Identity) -> ApiResult<serde_json::Value> {
        self.require_member(who)?;
        self.read(|s, last_seq| {
            let presence = presence_frame(s);
            serde_json::json!({
                "id": s.meta.id,
                "title": s.meta.title,
                "repository": s.meta.repository,
                "model": s.meta.model,
                "owner": s.meta.owner,
                "status": s.meta.status,
                "created_at": s.meta.created_at,
                "invite": s.meta.invite,
                "limits": s.meta.limits,
                "role": s.members.get(&who.user).map(|m| m.role),
                "members": s.members.values().collect::<Vec<_>>(),
                "presence": presence,
                "locks": s.locks.values().collect::<Vec<_>>(),
                "queue": queue_json(s, last_seq),
                "last_seq": last_seq,
            })
        })
    }

    async fn accept_socket(&self, who: &Identity, req: &Request) -> ApiResult<Response> {
        let url = req.url().map_err(ApiError::from)?;
        let q = |k: &str| {
            url.query_pairs()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.into_owned())
        };
        let since = query_u64(q("since").as_ref(), "since", 0)?;
        let client = q("client").unwrap_or_else(|| new_id("cli"));
        let kind = q("kind").unwrap_or_else(|| "web".into());
        if kind.is_empty() || kind.len() > 32 {
            return Err(EdgeError::InvalidQuery("kind must be 1-32 bytes").into());
        }
        // Registers the client (membership and per-user limit checked by the core).
        let (c2, k2) = (client.clone(), kind.clone());
        self.apply(|s, now| s.connect(who, &c2, &k2, now)).await?;
        // Close an older socket of the same client id: this one replaces it.
        let tag = client_tag(&client);
        let older = self.state.get_websockets_with_tag(&tag);
        let pair = WebSocketPair::new().map_err(ApiError::from)?;
        let server = pair.server;
        self.state
            .accept_websocket_with_tags(&server, &[tag.as_str(), PEOPLE]);
        server
            .serialize_attachment(Attachment {
                client: client.clone(),
                conn: random_hex(8),
                identity: who.clone(),
            })
            .map_err(ApiError::from)?;
        for ws in older {
            let _ = ws.close(Some(4001), Some("replaced by a newer connection"));
        }
        // Hello, then every event after `since`, then a presence snapshot; live events follow.
        let last_seq = self.read(|_, seq| seq)?;
        send_frame(
            &server,
            &ServerMessage::Hello {
                client: client.clone(),
                user: who.user.clone(),
                seq: last_seq,
            },
        );
        let mut cursor = since;
        while cursor < last_seq {
            let rows = store::events_after(&self.sql(), cursor, REPLAY_CHUNK)?;
            if rows.is_empty() {
                break;
            }
            let mut events = Vec::with_capacity(rows.len());
            for r in rows {
                let ev: Event = serde_json::from_str(&r).map_err(ApiError::internal)?;
                cursor = ev.seq;
                events.push(ev);
            }
            send_frame(&server, &ServerMessage::Events { events });
        }
        let presence = self.read(|s, _| presence_frame(s))?;
        send_frame(&server, &presence);
        Response::from_websocket(pair.client).map_err(ApiError::from)
    }

    async fn on_client_message(
        &self,
        att: &Attachment,
        msg: ClientMessage,
    ) -> ApiResult<Option<serde_json::Value>> {
        let who = &att.identity;
        let client = att.client.as_str();
        match msg {
            ClientMessage::Ping => {
                self.apply(|s, now| s.heartbeat(who, client, now)).await?;
                Ok(None)
            }
            m @ ClientMessage::Cursor { .. } => {
                let cursor = m
                    .cursor()
                    .ok_or_else(|| ApiError::internal("cursor message without cursor"))?;
                self.apply(|s, now| s.set_cursor(who, client, cursor, now))
                    .await?;
                Ok(None)
            }
            ClientMessage::Typing { typing } => {
                self.apply(|s, now| s.set_typing(who, client, typing, now))
                    .await?;
                if typing {
                    // Visible as a sandbox status; typing itself never fails.
                    if let Err(e) = self.input(Input::Typing).await {
                        console_error!("warm-up on typing: {}", e.message);
                    }
                }
                Ok(None)
            }
            ClientMessage::Prompt {
                text,
                priority,
                model,
                key,
            } => Ok(Some(self.enqueue(who, text, priority, model, key).await?.0)),
            ClientMessage::Cancel { id } => {
                self.apply(|s, now| s.cancel_prompt(who, &id, now)).await?;
                Ok(None)
            }
            ClientMessage::Reprioritize { id, priority } => {
                self.apply(|s, _| s.reprioritize_prompt(who, &id, priority))
                    .await?;
                Ok(None)
            }
            ClientMessage::Stop => {
                self.apply(|s, now| s.stop_prompt(who, now)).await?;
                Ok(None)
            }
            ClientMessage::LockAcquire { resource, ttl_ms } => {
                self.apply(|s, now| s.acquire_lock(who, &resource, ttl_ms, now))
                    .await?;
                Ok(None)
            }
            ClientMessage::LockRelease { resource } => {
                self.apply(|s, _| s.release_lock(who, &resource)).await?;
                Ok(None)
            }
        }
    }
}

fn presence_frame(s: &Session) -> ServerMessage {
    ServerMessage::Presence {
        clients: s
            .clients
            .values()
            .take(PRESENCE_SNAPSHOT_MAX)
            .map(PresenceEntry::from)
            .collect(),
        total: s.clients.len(),
    }
}

fn queue_json(s: &Session, _last_seq: u64) -> serde_json::Value {
    let running = s
        .queue
        .running
        .as_ref()
        .and_then(|id| s.queue.prompts.get(id));
    let queued = s.queue.queued_in_order();
    let mut recent: Vec<_> = s
        .queue
        .prompts
        .values()
        .filter(|p| p.status.is_terminal())
        .collect();
    recent.sort_by_key(|p| std::cmp::Reverse(p.arrival));
    recent.truncate(20);
    // As members see prompts: without their authors' idempotency keys.
    use nightshift_core::queue::Prompt;
    let public = |ps: Vec<&Prompt>| ps.into_iter().map(Prompt::public).collect::<Vec<_>>();
    serde_json::json!({
        "running": running.map(Prompt::public),
        "queued": public(queued),
        "recent": public(recent),
    })
}
