//! The Session Durable Object: one per session. Loads from SQLite, applies commands through the core, persists, then broadcasts over hibernating WebSockets.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;

use nightshift_core::events::Event;
use nightshift_core::ids::{Cursor, Identity};
use nightshift_core::sandbox::{self as link, SandboxLink, SandboxMessage, Stage};
use nightshift_core::session::{
    presence_batch_ms, Dirty, Meta, Outcome, Session, SessionStatus, PRESENCE_DELTA_MAX,
    PRESENCE_SNAPSHOT_MAX,
};
use nightshift_core::signing::{sha256_hex, token_matches};
use nightshift_core::wire::{
    self, ClientMessage, CreateSession, CursorUpdate, ErrorBody, JoinSession, LockRequest,
    PresenceEntry, PromptRequest, Reprioritize, ServerMessage, UnlockRequest,
};
use nightshift_core::CoreResult;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
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

/// What the sandbox's socket remembers across hibernation.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SandboxAttachment {
    sandbox_link: String,
    conn: String,
}

/// Tag of every person's socket (broadcasts go to these, never to the sandbox).
const PEOPLE: &str = "people";
/// Tag of the sandbox's socket.
const SANDBOX: &str = "sandbox";

struct Loaded {
    session: Session,
    last_seq: u64,
}

#[durable_object]
pub struct SessionObject {
    state: State,
    env: Env,
    /// Cache of the stored session; rebuilt from SQLite whenever the object wakes.
    cache: RefCell<Option<Loaded>>,
    /// Clients whose presence changed since the last presence broadcast.
    presence_changes: RefCell<BTreeSet<String>>,
    /// The alarm time this instance last set (None: unknown).
    alarm_at: Cell<Option<u64>>,
    /// A snapshot asked for through the API is being taken (its request records it, not the alarm).
    snapshot_requested: Cell<bool>,
}

impl DurableObject for SessionObject {
    fn new(state: State, env: Env) -> Self {
        SessionObject {
            state,
            env,
            cache: RefCell::new(None),
            presence_changes: RefCell::new(BTreeSet::new()),
            alarm_at: Cell::new(None),
            snapshot_requested: Cell::new(false),
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
            if let Ok(Some(_)) = ws.deserialize_attachment::<SandboxAttachment>() {
                if let WebSocketIncomingMessage::String(text) = message {
                    if let Err(e) = self.on_sandbox_message(&ws, &text).await {
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

/// Only the session's own sandbox holds the token (compared by hash, constant time).
fn check_sandbox_token(req: &Request, l: &SandboxLink) -> ApiResult<()> {
    let token = req
        .headers()
        .get("authorization")
        .ok()
        .flatten()
        .and_then(|h| h.strip_prefix("Bearer ").map(str::to_string))
        .unwrap_or_default();
    if token.is_empty() || !token_matches(&token, &l.token_hash) {
        return Err(EdgeError::BadSandboxToken.into());
    }
    Ok(())
}

fn send_frame_text(ws: &WebSocket, text: &str) {
    let _ = ws.send_with_str(text);
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

impl SessionObject {
    fn sql(&self) -> SqlStorage {
        self.state.storage().sql()
    }

    fn runner(&self) -> Box<dyn PromptRunner> {
        runner::from_config(&config::runner(&self.env), config::echo_run_ms(&self.env))
    }

    /// Makes sure the cache holds the stored session; false when there is none.
    fn ensure_loaded(&self) -> ApiResult<bool> {
        if self.cache.borrow().is_some() {
            return Ok(true);
        }
        let Some((mut session, last_seq)) = store::load(&self.sql())? else {
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
        store::persist(&self.sql(), &session, &dirty)?;
        *self.cache.borrow_mut() = Some(Loaded { session, last_seq });
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
        let cache = self.cache.borrow();
        let l = cache
            .as_ref()
            .ok_or_else(|| ApiError::internal("session not loaded"))?;
        Ok(f(&l.session, l.last_seq))
    }

    /// Applies one command: core decides, then store, then broadcast, then side effects.
    async fn apply(
        &self,
        f: impl FnOnce(&mut Session, u64) -> CoreResult<Outcome>,
    ) -> ApiResult<(Outcome, Vec<Event>)> {
        self.require_loaded()?;
        let now = now_ms();
        let result = {
            let mut cache = self.cache.borrow_mut();
            let l = cache
                .as_mut()
                .ok_or_else(|| ApiError::internal("session not loaded"))?;
            match f(&mut l.session, now) {
                Err(e) => Err(ApiError::from(e)),
                Ok(mut out) => {
                    let dirty = l.session.take_dirty();
                    if out.presence_changed {
                        let mut changes = self.presence_changes.borrow_mut();
                        for d in &dirty {
                            if let Dirty::Client(c) = d {
                                changes.insert(c.clone());
                            }
                        }
                    }
                    let sql = self.sql();
                    let stored = store::persist(&sql, &l.session, &dirty).and_then(|_| {
                        store::append(&sql, &mut l.last_seq, now, std::mem::take(&mut out.events))
                    });
                    match stored {
                        Ok(events) => Ok((out, events)),
                        Err(e) => Err(e),
                    }
                }
            }
        };
        let (out, events) = match result {
            Ok(v) => v,
            Err(e) => {
                if e.status >= 500 {
                    // Storage failed: forget the cache so the next request reloads what is stored.
                    *self.cache.borrow_mut() = None;
                }
                return Err(e);
            }
        };
        self.after(&out, &events, now).await?;
        Ok((out, events))
    }

    /// Broadcast and side effects of a stored command.
    async fn after(&self, out: &Outcome, events: &[Event], now: u64) -> ApiResult<()> {
        self.broadcast_events(events);
        if let Some((ok, result)) = agent_session::ending(events) {
            if let Some(link) = agent_session::link(&self.sql())? {
                if let Err(e) = agent_session::report_end(&self.env, &link, ok, result).await {
                    console_error!("reporting agent {} ended: {}", link.agent, e.message);
                }
            }
        }
        for c in &out.disconnect {
            for ws in self.state.get_websockets_with_tag(c) {
                let _ = ws.close(Some(4000), Some("removed from session"));
            }
        }
        let sql = self.sql();
        if self.uses_sandboxes() {
            if let Some(id) = &out.abort {
                let frame = serde_json::json!({"type": "stop", "prompt": id}).to_string();
                for ws in self.state.get_websockets_with_tag(SANDBOX) {
                    let _ = ws.send_with_str(&frame);
                }
            }
            if let Some(id) = &out.start {
                self.dispatch(id.clone()).await?;
            }
            return self.schedule_alarm(now).await;
        }
        let runner = self.runner();
        if let Some(id) = &out.abort {
            runner.abort(&sql, id)?;
        }
        if let Some(id) = &out.start {
            runner.start(&sql, id, now)?;
        }
        self.schedule_alarm(now).await
    }

    fn uses_sandboxes(&self) -> bool {
        config::runner(&self.env) == "sandbox"
    }

    /// The running prompt as the sandbox receives it.
    fn prompt_frame(&self, id: &str) -> ApiResult<Option<String>> {
        self.read(|s, _| {
            let p = s.queue.prompts.get(id)?;
            let email = s
                .members
                .get(&p.author)
                .and_then(|m| m.email.clone())
                .unwrap_or_else(|| format!("{}@users.nightshift.local", p.author));
            Some(
                serde_json::json!({"type": "prompt", "prompt": {
                    "id": p.id, "text": p.text, "author_name": p.author_name,
                    "author_email": email, "model": p.model.clone().or_else(|| s.meta.model.clone())}})
                .to_string(),
            )
        })
    }

    /// Hands a prompt that became running to the session's sandbox, spawning one when there is none.
    fn dispatch(&self, id: String) -> Pin<Box<dyn Future<Output = ApiResult<()>> + '_>> {
        Box::pin(async move {
            let sql = self.sql();
            if let Some(mut l) = store::load_link(&sql)? {
                if l.stage == Stage::Stopped {
                    if let Some(sbx) = l.sandbox.clone() {
                        let path = format!("/v1/sandboxes/{sbx}/start");
                        if let Ok((200, _)) =
                            provider::call(&self.env, Method::Post, &path, None).await
                        {
                            l.stage = Stage::Spawning;
                            l.last_seen = now_ms();
                            l.disconnected_at = None;
                            store::save_link(&sql, &l)?;
                            self.apply(|s, _| {
                                Ok(s.sandbox_status(
                                    "starting",
                                    "starting the stopped sandbox again".into(),
                                ))
                            })
                            .await?;
                            return Ok(());
                        }
                    }
                }
                if l.stage.is_live() {
                    if let Some(frame) = self.prompt_frame(&id)? {
                        for ws in self.state.get_websockets_with_tag(SANDBOX) {
                            let _ = ws.send_with_str(&frame);
                        }
                    }
                    // Not connected yet: the prompt is sent when the sandbox dials in.
                    return Ok(());
                }
            }
            self.spawn_sandbox(Some(&id), None).await.map(|_| ())
        })
    }

    /// Gets the session a new sandbox (`src/sandbox_start.rs`) and makes it the session's link;
    /// `snapshot` restores exactly that snapshot (`POST /sandbox/restore`).
    async fn spawn_sandbox(
        &self,
        prompt: Option<&str>,
        snapshot: Option<&str>,
    ) -> ApiResult<(u16, serde_json::Value)> {
        let sql = self.sql();
        let now = now_ms();
        let repository = self.read(|s, _| s.meta.repository.clone())?;
        let Some(repository) = repository else {
            if let Some(p) = prompt {
                self.fail_running(
                    p,
                    "no_repository: this session has no repository to work in",
                )
                .await?;
            }
            return Err(EdgeError::NoRepositoryForSandbox.into());
        };
        let token = random_hex(32);
        let mut l = SandboxLink::spawning(sha256_hex(token.as_bytes()), now);
        store::save_link(&sql, &l)?;
        self.apply(|s, _| {
            Ok(s.sandbox_status("spawning", "asking the provider for a sandbox".into()))
        })
        .await?;
        let session_id = self.read(|s, _| s.meta.id.clone())?;
        let answer = sandbox_start::start(
            &self.env,
            &sql,
            &session_id,
            &repository,
            &token,
            now,
            snapshot,
        )
        .await;
        match answer.map(|a| (a.status, a.sandbox, a.how)) {
            Ok((201, v, how)) => {
                l.sandbox = v["id"].as_str().map(String::from);
                l.expires_at = v["expires_at"].as_u64();
                // The sandbox may already have dialled in and moved the link on: keep its progress.
                if let Some(mut current) = store::load_link(&sql)? {
                    if current.token_hash == l.token_hash {
                        current.sandbox = l.sandbox.clone();
                        current.expires_at = l.expires_at;
                        l = current;
                    }
                }
                store::save_link(&sql, &l)?;
                self.apply(|s, _| Ok(s.sandbox_status("spawning", how)))
                    .await?;
                Ok((201, v))
            }
            Ok((status, v, _)) => {
                let msg = format!(
                    "the provider refused the sandbox ({status}): {}",
                    v["error"]["message"].as_str().unwrap_or("no reason given")
                );
                self.sandbox_failed(&mut l, prompt, &msg).await?;
                Ok(EdgeError::SandboxFailed(msg).answer())
            }
            Err(e) => {
                self.sandbox_failed(&mut l, prompt, &e.message).await?;
                Err(e)
            }
        }
    }

    async fn sandbox_failed(
        &self,
        l: &mut SandboxLink,
        prompt: Option<&str>,
        msg: &str,
    ) -> ApiResult<()> {
        l.stage = Stage::Failed;
        store::save_link(&self.sql(), l)?;
        let detail = msg.to_string();
        self.apply(|s, _| Ok(s.sandbox_status("failed", detail)))
            .await?;
        match prompt {
            Some(p) => {
                self.fail_running(p, &format!("sandbox_failed: {msg}"))
                    .await
            }
            None => Ok(()),
        }
    }

    /// Ends the running prompt as failed (it is never silently dropped).
    async fn fail_running(&self, prompt: &str, reason: &str) -> ApiResult<()> {
        let running = self.read(|s, _| s.queue.running.as_deref() == Some(prompt))?;
        if running {
            let reason = reason.to_string();
            let p = prompt.to_string();
            self.apply(move |s, now| s.finish_prompt(&p, false, Some(reason), now))
                .await?;
        }
        Ok(())
    }

    /// The sandbox dials in with its token; one live sandbox socket per session.
    async fn accept_sandbox(&self, req: &Request) -> ApiResult<Response> {
        if !self.ensure_loaded()? {
            return Err(EdgeError::NotFound("session").into());
        }
        let sql = self.sql();
        let Some(mut l) = store::load_link(&sql)? else {
            return Err(EdgeError::NoSandbox.into());
        };
        check_sandbox_token(req, &l)?;
        if !l.stage.is_live() {
            return Err(EdgeError::SandboxRetired.into());
        }
        let older = self.state.get_websockets_with_tag(SANDBOX);
        let pair = WebSocketPair::new().map_err(ApiError::from)?;
        let server = pair.server;
        self.state.accept_websocket_with_tags(&server, &[SANDBOX]);
        server
            .serialize_attachment(SandboxAttachment {
                sandbox_link: l.sandbox.clone().unwrap_or_default(),
                conn: random_hex(8),
            })
            .map_err(ApiError::from)?;
        for ws in older {
            let _ = ws.close(Some(4001), Some("replaced by a newer sandbox connection"));
        }
        l.disconnected_at = None;
        l.last_seen = now_ms();
        store::save_link(&sql, &l)?;
        send_frame_text(
            &server,
            &serde_json::json!({"type": "welcome", "last_n": l.last_n}).to_string(),
        );
        let running = self.read(|s, _| s.queue.running.clone())?;
        if let Some(id) = running {
            if let Some(frame) = self.prompt_frame(&id)? {
                send_frame_text(&server, &frame);
            }
        }
        self.schedule_alarm(now_ms()).await?;
        Response::from_websocket(pair.client).map_err(ApiError::from)
    }

    /// One frame from the sandbox: events are stored in order, then acknowledged.
    async fn on_sandbox_message(&self, ws: &WebSocket, text: &str) -> ApiResult<()> {
        self.require_loaded()?;
        let sql = self.sql();
        let Some(mut l) = store::load_link(&sql)? else {
            let _ = ws.close(Some(4003), Some("refused: no sandbox"));
            return Ok(());
        };
        if !l.stage.is_live() {
            let _ = ws.close(Some(4003), Some("refused: this sandbox was retired"));
            return Ok(());
        }
        let now = now_ms();
        l.last_seen = now;
        let msg = wire::parse_sandbox_message(text)?;
        match msg {
            SandboxMessage::Hello { sandbox } => {
                if l.sandbox.is_none() {
                    l.sandbox = Some(sandbox);
                }
                store::save_link(&sql, &l)
            }
            SandboxMessage::Heartbeat => store::save_link(&sql, &l),
            SandboxMessage::Events(batch) => {
                let intake = l.intake(batch);
                let accepted = intake.accepted;
                let turn_ended = accepted
                    .iter()
                    .any(|e| matches!(e, link::AgentEvent::Done { .. }));
                let pushed = accepted.iter().find_map(|e| match e {
                    link::AgentEvent::Done {
                        branch: Some(b), ..
                    } => Some(b.clone()),
                    _ => None,
                });
                if !accepted.is_empty() {
                    // Output of a prompt that is no longer running is skipped by the core.
                    if let Err(e) = self
                        .apply(move |s, now| Ok(s.agent_events(accepted, now)))
                        .await
                    {
                        if e.status >= 500 {
                            // Not stored: not acknowledged; the sandbox resends.
                            return Err(e);
                        }
                    }
                }
                l.last_n = intake.last_n;
                if let Some(stage) = intake.stage {
                    l.stage = stage;
                }
                store::save_link(&sql, &l)?;
                send_frame_text(
                    ws,
                    &serde_json::json!({"type": "ack", "n": l.last_n}).to_string(),
                );
                if let Some(b) = pushed {
                    // A later cold start continues this branch (src/sandbox_start.rs).
                    store::kv_put(&sql, sandbox_start::BRANCH, &b)?;
                }
                if turn_ended && snapshots::turn_ended(&sql)? {
                    // Taken by the alarm, so the acknowledgement never waits for a copy.
                    self.schedule_alarm(now).await?;
                }
                if l.stage == Stage::Failed {
                    if let Some(p) = self.read(|s, _| s.queue.running.clone())? {
                        self.fail_running(
                            &p,
                            "sandbox_failed: the sandbox could not start the agent; see its logs",
                        )
                        .await?;
                    }
                }
                if let Some((got, expected)) = intake.gap {
                    let _ = ws.close(Some(4002), Some("out of order; reconnect and resend"));
                    return Err(EdgeError::OutOfOrder { got, expected }.into());
                }
                Ok(())
            }
        }
    }

    /// Every member's list of sessions shows this one as ended (best effort: a failure is logged).
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

    /// The sandbox's agent tools: checked by the sandbox token, run for the running prompt's author.
    async fn sandbox_tools(&self, req: &mut Request) -> ApiResult<Response> {
        if !self.ensure_loaded()? {
            return Err(EdgeError::NotFound("session").into());
        }
        let sql = self.sql();
        let l = store::load_link(&sql)?.ok_or(EdgeError::NoSandbox)?;
        check_sandbox_token(req, &l)?;
        let bytes = req.bytes().await.map_err(|_| EdgeError::UnreadableBody)?;
        let tool: agent_session::ToolRequest =
            serde_json::from_slice(&bytes).map_err(agent_session::bad_tool_request)?;
        let (session, repository, author) = self.read(|s, _| {
            let author = s
                .queue
                .running
                .as_ref()
                .and_then(|p| s.queue.prompts.get(p))
                .map(|p| Identity {
                    user: p.author.clone(),
                    name: p.author_name.clone(),
                    email: s.members.get(&p.author).and_then(|m| m.email.clone()),
                });
            (s.meta.id.clone(), s.meta.repository.clone(), author)
        })?;
        let author = author.ok_or(EdgeError::NoRunningPrompt)?;
        let (status, v) =
            agent_session::tool(&self.env, &sql, &session, repository, author, tool).await?;
        json_of(status, &v)
    }

    /// Someone started typing (`prompt.typing`): get the session a sandbox before the prompt is sent.
    async fn warm_up(&self) -> ApiResult<()> {
        if !self.uses_sandboxes() || self.read(|s, _| s.meta.repository.is_none())? {
            return Ok(());
        }
        let has = store::load_link(&self.sql())?
            .is_some_and(|l| l.stage.is_live() || l.stage == Stage::Stopped);
        if has {
            return Ok(());
        }
        match self.spawn_sandbox(None, None).await {
            Ok(_) => self.schedule_alarm(now_ms()).await,
            // Visible as a sandbox status; typing itself never fails.
            Err(e) => {
                console_error!("warm-up on typing: {}", e.message);
                Ok(())
            }
        }
    }

    /// `POST /sandbox`: the session's live sandbox, or a new one.
    async fn ensure_sandbox(&self, who: &Identity) -> ApiResult<Response> {
        self.require_member(who)?;
        if let Some(l) = store::load_link(&self.sql())? {
            if let (true, Some(id)) = (l.stage.is_live(), l.sandbox.as_ref()) {
                let (st, v) =
                    provider::call(&self.env, Method::Get, &format!("/v1/sandboxes/{id}"), None)
                        .await?;
                return json_of(st, &v);
            }
            if l.stage == Stage::Spawning {
                return Err(EdgeError::SandboxSpawning("list it in a moment").into());
            }
        }
        let (st, v) = self.spawn_sandbox(None, None).await?;
        json_of(st, &v)
    }

    /// `POST /sandbox/:id/snapshot`: snapshots one of the session's sandboxes now and records it in
    /// the session's list, through the same path as a turn's snapshot (`snapshots::take`).
    async fn snapshot_now(&self, who: &Identity, b: wire::SnapshotNow) -> ApiResult<Response> {
        self.require_member(who)?;
        let sql = self.sql();
        let Some(turn) = snapshots::request(&sql)? else {
            return Err(EdgeError::SnapshotInProgress.into());
        };
        self.snapshot_requested.set(true);
        let taken = snapshots::take(&self.env, &sql, Some(&b.sandbox), turn, now_ms()).await;
        self.snapshot_requested.set(false);
        // Snapshots beyond `KEEP` (and a turn that ended meanwhile) are the alarm's to handle.
        self.schedule_alarm(now_ms()).await?;
        json_of(201, &taken??)
    }

    /// `POST /sandbox/restore`: a new sandbox for the session from one of its live snapshots (the
    /// newest when none is named). It becomes the session's sandbox the way a follow-up's restore
    /// does (`spawn_sandbox`); the sandbox it replaces is retired and terminated. Everything that
    /// can refuse is checked before anything changes.
    async fn restore_sandbox(
        &self,
        who: &Identity,
        b: wire::SandboxRestore,
    ) -> ApiResult<Response> {
        self.require_member(who)?;
        let sql = self.sql();
        let now = now_ms();
        let snaps = snapshots::load(&sql)?;
        let snap = snaps.restorable(b.snapshot.as_deref(), now).cloned();
        let Some(snap) = snap else {
            return Err(match b.snapshot {
                Some(id) => EdgeError::SnapshotNotRestorable(id),
                None => EdgeError::NoRestorableSnapshot,
            }
            .into());
        };
        if self.read(|s, _| s.queue.running.is_some())? {
            return Err(EdgeError::PromptRunning.into());
        }
        let link = store::load_link(&sql)?;
        if link.as_ref().is_some_and(|l| l.stage == Stage::Spawning) {
            return Err(EdgeError::SandboxSpawning("restore once it is ready").into());
        }
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
        // One sandbox per session: the current one is retired before the restored one takes its place.
        if let Some(l) = link {
            let old = l.sandbox.clone();
            let detail = format!(
                "{} restored snapshot {}; this sandbox is retired",
                who.name, snap.id
            );
            self.retire_sandbox(l, Stage::None, "terminated", detail, None)
                .await?;
            if let Some(id) = old {
                if let Err(e) = provider::terminate(&self.env, &id).await {
                    console_error!("terminating replaced sandbox {id}: {}", e.message);
                }
            }
        }
        let (st, v) = self.spawn_sandbox(None, Some(&snap.id)).await?;
        json_of(st, &v)
    }

    /// Retires the session's sandbox (`stage` is `Stopped` or `None`): its socket is refused, the
    /// session says so (`what`), and a running prompt fails with `reason`. The provider is not
    /// asked anything here.
    async fn retire_sandbox(
        &self,
        mut l: SandboxLink,
        stage: Stage,
        what: &str,
        detail: String,
        reason: Option<String>,
    ) -> ApiResult<()> {
        let sql = self.sql();
        if l.stage.is_live() {
            l.stage = stage;
            store::save_link(&sql, &l)?;
            for ws in self.state.get_websockets_with_tag(SANDBOX) {
                let _ = ws.close(
                    Some(4005),
                    Some("refused: the sandbox was stopped through the API"),
                );
            }
            self.apply(|s, _| Ok(s.sandbox_status(what, detail)))
                .await?;
            if let (Some(p), Some(reason)) = (self.read(|s, _| s.queue.running.clone())?, reason) {
                self.fail_running(&p, &reason).await?;
            }
        } else if stage == Stage::None && l.stage == Stage::Stopped {
            l.stage = Stage::None;
            store::save_link(&sql, &l)?;
        }
        Ok(())
    }

    /// May `who` do `op` on this session's sandbox? Stop and terminate of the session's own sandbox retire it first.
    async fn authorize_sandbox(
        &self,
        who: &Identity,
        b: wire::SandboxAuthorize,
    ) -> ApiResult<Response> {
        self.require_member(who)?;
        let sql = self.sql();
        let Some(mut l) = store::load_link(&sql)? else {
            return json_of(200, &serde_json::json!({"ok": true}));
        };
        if b.sandbox.is_none() || l.sandbox != b.sandbox {
            return json_of(200, &serde_json::json!({"ok": true}));
        }
        let (stage, what) = match b.op.as_str() {
            "stop" => (Stage::Stopped, "stopped"),
            "terminate" => (Stage::None, "terminated"),
            "start" => {
                if l.stage == Stage::Stopped {
                    l.stage = Stage::Spawning;
                    l.last_seen = now_ms();
                    l.disconnected_at = None;
                    store::save_link(&sql, &l)?;
                }
                return json_of(200, &serde_json::json!({"ok": true}));
            }
            _ => return json_of(200, &serde_json::json!({"ok": true})),
        };
        let detail = format!("{} {what} the sandbox", who.name);
        let reason = format!(
            "sandbox_{what}: {} {what} the sandbox while this prompt ran",
            who.name
        );
        self.retire_sandbox(l, stage, what, detail, Some(reason))
            .await?;
        json_of(200, &serde_json::json!({"ok": true}))
    }

    /// A sandbox that has not dialled in yet: the provider says whether it failed (a missing
    /// repository, a failed clone) so the prompt waiting for it fails with the reason.
    async fn poll_spawning(&self, mut l: SandboxLink, now: u64) -> ApiResult<()> {
        let sql = self.sql();
        let running = self.read(|s, _| s.queue.running.clone())?;
        if l.spawn_timed_out(now) {
            return self
                .sandbox_failed(
                    &mut l,
                    running.as_deref(),
                    "the sandbox did not start within 3 minutes",
                )
                .await;
        }
        let Some(id) = l.sandbox.clone() else {
            l.last_seen = now;
            return store::save_link(&sql, &l);
        };
        let answer =
            provider::call(&self.env, Method::Get, &format!("/v1/sandboxes/{id}"), None).await;
        // Reload: the sandbox may have dialled in while the provider answered.
        let Some(mut l) = store::load_link(&sql)? else {
            return Ok(());
        };
        if l.stage != Stage::Spawning || l.sandbox.as_deref() != Some(id.as_str()) {
            return Ok(());
        }
        match answer {
            Ok((200, v)) if v["status"] == "failed" || v["status"] == "terminated" => {
                let msg = format!(
                    "the provider could not start the sandbox: {}: {}",
                    v["error"]["code"].as_str().unwrap_or("unknown"),
                    v["error"]["message"].as_str().unwrap_or("no reason given")
                );
                self.sandbox_failed(&mut l, running.as_deref(), &msg).await
            }
            Ok((404, _)) => {
                self.sandbox_failed(
                    &mut l,
                    running.as_deref(),
                    "the provider no longer knows this sandbox",
                )
                .await
            }
            _ => {
                l.last_seen = now;
                store::save_link(&sql, &l)
            }
        }
    }

    /// The sandbox stopped answering: say so, fail its running prompt, and retire it.
    async fn check_sandbox(&self, now: u64) -> ApiResult<()> {
        let sql = self.sql();
        let Some(mut l) = store::load_link(&sql)? else {
            return Ok(());
        };
        let hb = config::sandbox_heartbeat_timeout_ms(&self.env);
        let grace = config::sandbox_grace_ms(&self.env);
        if l.needs_spawn_poll(now) {
            return self.poll_spawning(l, now).await;
        }
        if !l.is_lost(now, hb, grace) {
            return Ok(());
        }
        l.stage = Stage::Lost;
        store::save_link(&sql, &l)?;
        for ws in self.state.get_websockets_with_tag(SANDBOX) {
            let _ = ws.close(Some(4004), Some("refused: the sandbox was declared lost"));
        }
        let detail =
            "the sandbox stopped responding; the next prompt gets a new sandbox".to_string();
        self.apply(|s, _| Ok(s.sandbox_status("lost", detail)))
            .await?;
        if let Some(p) = self.read(|s, _| s.queue.running.clone())? {
            self.fail_running(
                &p,
                "sandbox_lost: the sandbox stopped while this prompt ran; send it again to retry",
            )
            .await?;
        }
        if let Some(id) = &l.sandbox {
            if let Err(e) = provider::terminate(&self.env, id).await {
                console_error!("terminating lost sandbox {id}: {}", e.message);
            }
        }
        Ok(())
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

    /// Sets the alarm to the earliest deadline: presence flush, sweeps, lock expiry, runner.
    async fn schedule_alarm(&self, now: u64) -> ApiResult<()> {
        let (mut next, clients) = self.read(|s, _| (s.next_deadline(), s.clients.len()))?;
        if !self.presence_changes.borrow().is_empty() {
            let flush = now + presence_batch_ms(clients);
            next = Some(next.map_or(flush, |n| n.min(flush)));
        }
        if let Some(due) = self.runner().next_due(&self.sql())? {
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        if self.uses_sandboxes() {
            let l = store::load_link(&self.sql())?;
            if let Some(l) = &l {
                let hb = config::sandbox_heartbeat_timeout_ms(&self.env);
                let grace = config::sandbox_grace_ms(&self.env);
                if let Some(due) = l.deadline(hb, grace) {
                    next = Some(next.map_or(due, |n| n.min(due)));
                }
            }
            let requested = self.snapshot_requested.get();
            if let Some(due) =
                snapshots::deadline(&self.env, &self.sql(), l.as_ref(), now, requested)?
            {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
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

    async fn on_alarm(&self) -> ApiResult<()> {
        if !self.ensure_loaded()? {
            return Ok(());
        }
        let now = now_ms();
        // Runner completions that are due.
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
        if self.uses_sandboxes() {
            self.check_sandbox(now).await?;
            let l = store::load_link(&self.sql())?;
            let requested = self.snapshot_requested.get();
            snapshots::upkeep(&self.env, &self.sql(), l.as_ref(), now, requested).await?;
        }
        // Heartbeat sweep and lock expiry.
        self.apply(|s, now| Ok(s.sweep(now))).await?;
        self.flush_presence();
        self.schedule_alarm(now_ms()).await
    }

    /// Sends coalesced presence changes to every socket.
    fn flush_presence(&self) {
        let changed: BTreeSet<String> = std::mem::take(&mut *self.presence_changes.borrow_mut());
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
                let others = self.state.get_websockets_with_tag(SANDBOX).iter().any(|o| {
                    o.deserialize_attachment::<SandboxAttachment>()
                        .ok()
                        .flatten()
                        .is_some_and(|a| a.conn != sa.conn)
                });
                if !others {
                    if let Ok(Some(mut l)) = store::load_link(&self.sql()) {
                        l.disconnected_at = Some(now_ms());
                        let _ = store::save_link(&self.sql(), &l);
                        let _ = self.schedule_alarm(now_ms()).await;
                    }
                }
            }
            return;
        };
        // A reconnect with the same client id may already have replaced this socket.
        let replaced = self
            .state
            .get_websockets_with_tag(&att.client)
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
                let (out, _) = self.apply(|s, now| s.join(&who, &body.invite, now)).await?;
                let snapshot = self.snapshot(&who)?;
                json_of(if out.events.is_empty() { 200 } else { 201 }, &snapshot)
            }
            (Method::Get, ["snapshot"]) => {
                let mut v = self.snapshot(&who)?;
                // Where the work can be restored from if the sandbox goes away.
                v["snapshots"] = serde_json::to_value(snapshots::load(&self.sql())?.snaps)
                    .map_err(ApiError::internal)?;
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
                if let Some(l) = store::load_link(&sql)? {
                    if let (true, Some(id)) = (l.stage.is_live(), l.sandbox.as_ref()) {
                        applied = sandbox_start::apply_egress(&self.env, id, &b.allow).await;
                    }
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
                let b: PromptRequest = Self::body(&mut req).await?;
                let p = self.enqueue(&who, b.text, b.priority, b.model).await?;
                json_of(202, &p)
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
                let (out, _) = self.apply(|s, now| s.stop_prompt(&who, now)).await?;
                json_of(200, &serde_json::json!({ "stopped": out.abort }))
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
        *self.cache.borrow_mut() = Some(Loaded { session, last_seq });
        json_of(201, &self.snapshot(who)?)
    }

    async fn enqueue(
        &self,
        who: &Identity,
        text: String,
        priority: i32,
        model: Option<String>,
    ) -> ApiResult<serde_json::Value> {
        wire::check_model(model.as_deref())?;
        if self.uses_sandboxes() && self.read(|s, _| s.meta.repository.is_none())? {
            return Err(EdgeError::NoRepositoryForPrompts.into());
        }
        let id = new_id("prm");
        let pid = id.clone();
        self.apply(move |s, now| s.enqueue_prompt(who, pid, text, priority, model, now))
            .await?;
        self.prompt_json(&id)
    }

    fn prompt_json(&self, id: &str) -> ApiResult<serde_json::Value> {
        self.read(|s, _| {
            s.queue
                .prompts
                .get(id)
                .map(|p| serde_json::to_value(p).unwrap_or_default())
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
        let older = self.state.get_websockets_with_tag(&client);
        let pair = WebSocketPair::new().map_err(ApiError::from)?;
        let server = pair.server;
        self.state
            .accept_websocket_with_tags(&server, &[client.as_str(), who.user.as_str(), PEOPLE]);
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
                    self.warm_up().await?;
                }
                Ok(None)
            }
            ClientMessage::Prompt {
                text,
                priority,
                model,
            } => Ok(Some(self.enqueue(who, text, priority, model).await?)),
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
    serde_json::json!({ "running": running, "queued": queued, "recent": recent })
}
