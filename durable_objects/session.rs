//! The Session Durable Object: the executor of one `HostedSession`. It decodes a request or frame, hands it to the core, carries out the effects the core returns in order (store, then broadcast; sockets; provider and object calls), feeds each answer back as an input, and sets its alarm from the core's next deadline.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;

use nightshift_core::api::{self, PeopleClose};
use nightshift_core::events::Event;
use nightshift_core::hosted::{
    CloseCode, Command, Done, DownFrame, Effect, Entropy, HostedSession, Input, LinkTiming,
};
use nightshift_core::ids::Identity;
use nightshift_core::session::PullRequestDue;
use nightshift_core::store::{self, Rows, Stored, Written};
use nightshift_core::wire::{self, ServerMessage};
use worker::*;

use crate::agent_session;
use crate::config;
use crate::error::{ApiError, ApiResult, EdgeError};
use crate::objects::{self, StatusChange, UserIndexRoute};
use crate::platform::{now_ms, random_hex};
use crate::session_provider::{self, Answers, Context};
use crate::session_sockets::{self as sockets, error_frame, SandboxAttachment, Socket, Sockets};
use crate::store::SqlRows;

#[path = "../src/session_requests.rs"]
mod requests;
#[path = "../src/session_reviews.rs"]
mod reviews;

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
    /// A pull request that stored events call for, opened once the effects are carried out.
    pull_due: RefCell<Option<PullRequestDue>>,
    /// Review replies that stored events call for, posted once the effects are carried out.
    replies_due: Cell<bool>,
}

impl DurableObject for SessionObject {
    fn new(state: State, env: Env) -> Self {
        SessionObject {
            state,
            env,
            cache: RefCell::new(None),
            alarm_at: Cell::new(None),
            pull_due: RefCell::new(None),
            replies_due: Cell::new(false),
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
        let text = match message {
            WebSocketIncomingMessage::String(text) => text,
            WebSocketIncomingMessage::Binary(_) => {
                let e = ApiError::from(EdgeError::BinaryNotSupported);
                sockets::send(&ws, &error_frame(None, &e.code, &e.message));
                return Ok(());
            }
        };
        match Socket::of(&ws) {
            Socket::Person(person) => {
                let (reference, parsed) = wire::parse_client_message(&text);
                let frame = match parsed {
                    Err(e) => error_frame(reference, e.code, &e.message),
                    Ok(msg) => match self.on_client_message(&person, msg).await {
                        Ok(result) => ServerMessage::Ack { reference, result },
                        Err(e) => error_frame(reference, &e.code, &e.message),
                    },
                };
                sockets::send(&ws, &frame);
            }
            Socket::Sandbox(sandbox) => {
                if let Err(e) = self.on_sandbox_message(&sandbox, &text).await {
                    sockets::send(&ws, &error_frame(None, &e.code, &e.message));
                }
            }
            Socket::Unknown => {
                let _ = ws.close(Some(1008), Some("unknown connection; reconnect"));
            }
        }
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

    fn sockets(&self) -> Sockets<'_> {
        Sockets(&self.state)
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
        for effect in hosted.woke(&self.sockets().live_clients()) {
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
        loop {
            let Some(effect) = queue.pop_front() else {
                // The effects are done: a pull request they called for is opened now, and
                // what it recorded is carried out like any other effect.
                let due = self.pull_due.borrow_mut().take();
                if let Some(due) = due {
                    queue.extend(self.open_pull_request(&due).await);
                    continue;
                }
                // Then the review threads get their answers (after the pull request: a
                // reply may name the commit the pull request shows).
                if self.replies_due.replace(false) {
                    match self.post_replies().await {
                        Ok(more) => queue.extend(more),
                        Err(e) => console_error!("posting review replies: {}", e.message),
                    }
                    continue;
                }
                break;
            };
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
        let sockets = self.sockets();
        match effect {
            Effect::Disconnect(clients) => sockets.close_clients(&clients, PeopleClose::Removed),
            Effect::ToSandbox(frame) => {
                // The supervisor's git gets a fresh scoped token before it syncs or pushes.
                if matches!(frame, DownFrame::Welcome { .. } | DownFrame::Prompt { .. }) {
                    self.send_git_credentials(&sockets).await;
                }
                sockets.to_sandbox(&serde_json::to_string(&frame).map_err(ApiError::internal)?)
            }
            Effect::CloseSandbox(code) => sockets.close_sandbox(code, None),
            Effect::Refuse { link } => sockets.close_sandbox(CloseCode::Refused, Some(&link)),
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
        self.sockets().to_people(&frame);
        if let Ok(Some(due)) = self.read(|h, _| h.session.pull_request_due(events)) {
            *self.pull_due.borrow_mut() = Some(due);
        }
        if events.iter().any(|e| {
            matches!(
                e.kind,
                nightshift_core::events::EventKind::PromptStarted { .. }
            )
        }) {
            self.drop_people_without_access().await;
        }
        match self.review_prompts_finished(events) {
            Ok(true) => self.replies_due.set(true),
            Ok(false) => {}
            Err(e) => console_error!("answering review comments: {}", e.message),
        }
        if let Some((ok, result)) = agent_session::ending(events) {
            if let Some(link) = agent_session::link(&self.sql())? {
                if let Err(e) = agent_session::report_end(&self.env, &link, ok, result).await {
                    console_error!("reporting agent {} ended: {}", link.agent, e.message);
                }
            }
        }
        Ok(())
    }

    /// Closes the sockets of people who lost read access to the session's GitHub repository
    /// (asked when a prompt starts, from each person's minute-long cache): what the session
    /// shows from then on is not theirs to see. A failure to ask is logged and closes nothing.
    async fn drop_people_without_access(&self) {
        if config::github(&self.env).is_none() {
            return;
        }
        let Ok(Some(repository)) = self.read(|h, _| h.session.meta.repository.clone()) else {
            return;
        };
        let full_name = match crate::access::settings(&self.env, &repository).await {
            Ok(Some(settings)) => settings.github,
            _ => None,
        };
        let Some(full_name) = full_name else {
            return;
        };
        let Ok(people) = self.read(|h, _| {
            let mut people: Vec<(String, String, Vec<String>)> = Vec::new();
            for client in h.session.clients.values() {
                match people.iter_mut().find(|(user, _, _)| *user == client.user) {
                    Some((_, _, ids)) => ids.push(client.id.clone()),
                    None => people.push((
                        client.user.clone(),
                        client.name.clone(),
                        vec![client.id.clone()],
                    )),
                }
            }
            people
        }) else {
            return;
        };
        for (user, name, clients) in people {
            let who = Identity {
                user,
                name,
                email: None,
            };
            match crate::access::role(&self.env, &who, &full_name, false).await {
                Ok(role) if role < nightshift_core::github::Role::Read => {
                    self.sockets()
                        .close_clients(&clients, PeopleClose::AccessLost);
                }
                Ok(_) => {}
                Err(e) => console_error!("access of {} to {full_name}: {}", who.user, e.message),
            }
        }
    }

    /// Sends the sandbox an installation token for its repository (contents:write, this one
    /// repository), when the repository is GitHub's. A failure is logged: the push then fails
    /// and says so.
    async fn send_git_credentials(&self, sockets: &Sockets<'_>) {
        let Ok(Some(repository)) = self.read(|h, _| h.session.meta.repository.clone()) else {
            return;
        };
        let write = nightshift_core::github::Access::Write;
        match crate::repository_tokens::for_registered(&self.env, &repository, write).await {
            Ok(Some(token)) => {
                let frame = DownFrame::GitCredentials {
                    token: token.token,
                    expires_at: token.expires_at,
                };
                if let Ok(text) = serde_json::to_string(&frame) {
                    sockets.to_sandbox(&text);
                }
            }
            Ok(None) => {}
            Err(e) => console_error!("git credentials for {repository}: {}", e.message),
        }
    }

    /// Opens the pull request in the prompting person's name; the effects of recording what
    /// happened (a failure is logged and leaves the work on its branch).
    async fn open_pull_request(&self, due: &PullRequestDue) -> Vec<Effect> {
        let Ok((id, Some(repository))) =
            self.read(|h, _| (h.session.meta.id.clone(), h.session.meta.repository.clone()))
        else {
            return Vec::new();
        };
        let command = match crate::pull_requests::open(&self.env, &id, &repository, due).await {
            Ok(Some(command)) => command,
            Ok(None) => return Vec::new(),
            Err(e) => {
                console_error!("opening the pull request of {id}: {}", e.message);
                return Vec::new();
            }
        };
        match self.decide(|h, now, tokens| h.run(&system(), command, now, tokens)) {
            Ok(Ok((_, effects))) => effects,
            _ => Vec::new(),
        }
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
        let pair = self.sockets().accept_sandbox(link)?;
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

    /// Sets the alarm to the core's next deadline (unless an earlier one is already set).
    async fn schedule_alarm(&self) -> ApiResult<()> {
        let core = self.read(|h, _| h.next_deadline())?;
        // Replies GitHub did not take are posted again at their own time.
        let replies = self.reviews()?.retry_at;
        let Some(next) = core.into_iter().chain(replies).min() else {
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
        if self.reviews()?.retry_at.is_some_and(|at| at <= now_ms()) {
            self.replies_due.set(true);
            if let Err(e) = self.execute(Vec::new()).await {
                console_error!("posting review replies: {}", e.message);
            }
        }
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
            self.sockets().to_people(&frame);
        }
    }

    async fn drop_socket(&self, ws: &WebSocket) {
        let _ = ws.close(Some(1000), Some("closed"));
        match Socket::of(ws) {
            // A reconnect with the same client id may already have replaced this socket.
            Socket::Person(person) if !self.sockets().replaced(&person) => {
                let client = person.client.clone();
                let _ = self
                    .run(&person.identity, Command::Disconnect { client })
                    .await;
            }
            Socket::Sandbox(sandbox) => self.drop_sandbox_socket(&sandbox).await,
            _ => {}
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
        let generation = |other: &SandboxAttachment| self.socket_link(other).ok();
        if !self.sockets().sandbox_still_open(sa, &link, generation) {
            let _ = self.input(Input::SandboxClosed { link }).await;
        }
    }
}
