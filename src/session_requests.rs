//! The session object's requests: its HTTP routes and people's socket frames, decoded by `core::api` into commands and reads, answered with the core's typed views. A child module of the object (`durable_objects/session.rs`), whose executor carries out what the core decides.

use nightshift_core::api::{
    self, Answer, PeopleClose, RouteError, SessionRequest, SessionView, View,
};
use nightshift_core::error::CoreError;
use nightshift_core::events::Event;
use nightshift_core::hosted::{Command, SandboxOp};
use nightshift_core::ids::Identity;
use nightshift_core::session::{Meta, Session, SessionStatus};
use nightshift_core::store::{self, Kv, Rows, Stored};
use nightshift_core::wire::{self, ClientMessage, CreateSession, PresenceEntry, ServerMessage};
use worker::*;

use super::{bearer, system, Loaded, SessionObject};
use crate::auth::decode_identity;
use crate::config;
use crate::error::{json_of, ApiError, ApiResult, EdgeError};
use crate::objects::{self, ChildUpdate, OkAnswer, SessionRoute};
use crate::platform::{new_id, now_ms, random_hex};
use crate::provider;
use crate::session_provider::SpawnResult;
use crate::session_sockets as sockets;
use crate::{agent_session, store as sql_store};

/// Events replayed per frame when a client catches up.
const REPLAY_CHUNK: u32 = 500;

impl SessionObject {
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
    /// True when `who` is an admin of the session's GitHub repository (asked of GitHub afresh:
    /// this grants a shell).
    async fn is_repository_admin(&self, who: &Identity) -> ApiResult<bool> {
        if crate::config::github(&self.env).is_none() {
            return Ok(false);
        }
        let Some(repository) = self.read(|h, _| h.session.meta.repository.clone())? else {
            return Ok(false);
        };
        let Some(full_name) = crate::access::settings(&self.env, &repository)
            .await?
            .and_then(|s| s.github)
        else {
            return Ok(false);
        };
        let role = crate::access::role(&self.env, who, &full_name, true).await?;
        Ok(role == nightshift_core::github::Role::Admin)
    }

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

    pub(super) async fn route(&self, mut req: Request) -> ApiResult<Response> {
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
            Some(SessionRoute::Repository) => {
                self.require_loaded()?;
                let repository = self.read(|h, _| h.session.meta.repository.clone())?;
                return json_of(200, &objects::SessionRepository { repository });
            }
            Some(SessionRoute::ContinueBranch) => {
                self.require_loaded()?;
                let bytes = req.bytes().await.map_err(|_| EdgeError::UnreadableBody)?;
                let ask: objects::ContinueBranch = objects::decode_body(&path, &bytes)?;
                if !nightshift_core::repository::valid_branch_name(&ask.branch) {
                    return Err(EdgeError::InvalidInput("branch: not a branch name").into());
                }
                sql_store::kv_put(&self.sql(), nightshift_core::store::Kv::Branch, &ask.branch)?;
                return json_of(200, &OkAnswer::yes());
            }
            Some(SessionRoute::ReviewPrompt) => {
                let bytes = req.bytes().await.map_err(|_| EdgeError::UnreadableBody)?;
                let ask: objects::ReviewPromptAsk = objects::decode_body(&path, &bytes)?;
                return json_of(200, &self.review_prompt(ask).await?);
            }
            Some(SessionRoute::PullRequest) => {
                self.require_loaded()?;
                let bytes = req.bytes().await.map_err(|_| EdgeError::UnreadableBody)?;
                let update: objects::PullUpdate = objects::decode_body(&path, &bytes)?;
                let command = Command::PullRequest {
                    repository: update.repository,
                    pull: Box::new(update.pull),
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
        match self.read(|h, _| api::check_access(&h.session, &who, &request))? {
            Ok(()) => {}
            // The sandbox's shell and lifecycle are the owner's, and its repository's admins'.
            Err(CoreError::OwnerOnly)
                if matches!(request, SessionRequest::SandboxAuthorize(_))
                    && self.is_repository_admin(&who).await? => {}
            Err(e) => return Err(e.into()),
        }
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
            pull_request: None,
            pull_request_action: None,
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
        let pair = self.sockets().accept_person(&client, who)?;
        let server = &pair.server;
        // Hello, then every event after `since`, then a presence snapshot; live events follow.
        let seq = self.read(|_, seq| seq)?;
        let user = who.user.clone();
        sockets::send(server, &ServerMessage::Hello { client, user, seq });
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
            sockets::send(server, &ServerMessage::Events { events });
        }
        sockets::send(server, &self.read(|h, _| api::presence_frame(&h.session))?);
        Response::from_websocket(pair.client).map_err(ApiError::from)
    }

    pub(super) async fn on_client_message(
        &self,
        att: &sockets::Attachment,
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
