//! The session object's HTTP API as types: each route decoded into a request (bodies parsed by `wire`), and each answer a typed view of the session.
//!
//! The session object passes a request's method, path, query, idempotency header and body to
//! [`decode`]; a person's command goes to [`HostedSession::run`], and [`answer`] renders what
//! the command did as the route's view. Nothing here does I/O.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::error::{CoreError, CoreResult};
use crate::events::Event;
use crate::hosted::{Command, Done, HostedSession};
use crate::ids::{ClientId, Cursor, Identity, Role};
use crate::queue::Prompt;
use crate::session::{
    Limits, Lock, Member, PromptSubmission, Session, SessionStatus, PRESENCE_DELTA_MAX,
    PRESENCE_SNAPSHOT_MAX,
};
use crate::snapshot::Snap;
use crate::wire::{
    self, ClientMessage, CreateSession, CursorUpdate, JoinSession, LockRequest, PresenceEntry,
    PromptRequest, Reprioritize, SandboxAuthorize, SandboxRestore, ServerMessage, SessionEgress,
    SnapshotNow, UnlockRequest, WireError,
};

/// Events one `GET /events` answers with at most (and by default 1,000).
pub const MAX_EVENTS_PAGE: u32 = 5000;
const DEFAULT_EVENTS_PAGE: u32 = 1000;

/// What a route of the session object asks.
#[derive(Debug, Clone)]
pub enum SessionRequest {
    /// `POST /create`.
    Create(CreateSession),
    /// A person's command, and the view its answer shows.
    Command(Command, Answer),
    /// `GET /snapshot`: the session with its snapshots.
    Snapshot,
    Prompts,
    Locks,
    Presence,
    Events {
        since: u64,
        limit: u32,
    },
    /// `GET /ws`: a person's socket, replaying the events after `since`.
    Socket {
        since: u64,
        client: Option<String>,
        kind: String,
    },
    SandboxEnsure,
    SandboxSnapshot(SnapshotNow),
    SandboxRestore(SandboxRestore),
    SandboxAuthorize(SandboxAuthorize),
}

/// The view a command's answer shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The session as its member sees it (`201` when a join added a member).
    Session,
    Left,
    Ok,
    /// The prompt (`202` when a submission queued a new one).
    Prompt(Option<String>),
    Stopped,
    Lock(String),
    Released(String),
    /// The egress list (and whether a live sandbox took it, decided by the object).
    Egress(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// No route has this method and path.
    NoRoute,
    /// The body or query is not acceptable.
    Wire(WireError),
}

impl From<WireError> for RouteError {
    fn from(e: WireError) -> Self {
        RouteError::Wire(e)
    }
}

fn query_u64(query: &[(String, String)], name: &str) -> Result<Option<u64>, WireError> {
    match query.iter().find(|(k, _)| k == name) {
        None => Ok(None),
        Some((_, v)) => v.parse().map(Some).map_err(|_| {
            WireError::new(
                "invalid_query",
                format!("{name} must be a non-negative integer"),
            )
        }),
    }
}

fn query_str(query: &[(String, String)], name: &str) -> Option<String> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

/// Decodes one request to the session object. `id` is the id a new prompt gets.
pub fn decode(
    method: &str,
    path: &str,
    query: &[(String, String)],
    idempotency_key: Option<String>,
    body: &[u8],
    new_prompt_id: impl FnOnce() -> String,
) -> Result<SessionRequest, RouteError> {
    use SessionRequest as R;
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let command = |c: Command, a: Answer| Ok(R::Command(c, a));
    match (method, segs.as_slice()) {
        ("POST", ["create"]) => Ok(R::Create(wire::parse_body(body)?)),
        ("POST", ["join"]) => {
            let b: JoinSession = wire::parse_body(body)?;
            command(Command::Join { invite: b.invite }, Answer::Session)
        }
        ("GET", ["snapshot"]) => Ok(R::Snapshot),
        ("POST", ["leave"]) => command(Command::Leave, Answer::Left),
        ("PUT", ["egress"]) => {
            let b: SessionEgress = wire::parse_body(body)?;
            let allow = b.allow.clone();
            command(Command::SetEgress { allow: b.allow }, Answer::Egress(allow))
        }
        ("POST", ["end"]) => command(Command::End, Answer::Session),
        ("PUT", ["cursor"]) => {
            let b: CursorUpdate = wire::parse_body(body)?;
            let cursor = Cursor {
                file: b.file,
                line: b.line,
                column: b.column,
            };
            let client = b.client;
            command(Command::Cursor { client, cursor }, Answer::Ok)
        }
        ("POST", ["prompt"]) => {
            let b: PromptRequest = wire::parse_body(body)?;
            let key = b.idempotency_key(idempotency_key)?;
            wire::check_model(b.model.as_deref())?;
            let submission = PromptSubmission {
                id: new_prompt_id(),
                text: b.text,
                priority: b.priority,
                model: b.model,
                key,
            };
            command(Command::Submit(submission), Answer::Prompt(None))
        }
        ("DELETE", ["prompt", id]) => {
            let prompt = id.to_string();
            command(
                Command::Cancel { prompt },
                Answer::Prompt(Some(id.to_string())),
            )
        }
        ("PATCH", ["prompt", id]) => {
            let b: Reprioritize = wire::parse_body(body)?;
            let prompt = id.to_string();
            let priority = b.priority;
            command(
                Command::Reprioritize { prompt, priority },
                Answer::Prompt(Some(id.to_string())),
            )
        }
        ("GET", ["prompts"]) => Ok(R::Prompts),
        ("POST", ["stop"]) => command(Command::Stop, Answer::Stopped),
        ("POST", ["lock"]) => {
            let b: LockRequest = wire::parse_body(body)?;
            let resource = b.resource.clone();
            let lock = Command::Lock {
                resource: b.resource,
                ttl_ms: b.ttl_ms,
            };
            command(lock, Answer::Lock(resource))
        }
        ("POST", ["unlock"]) => {
            let b: UnlockRequest = wire::parse_body(body)?;
            let resource = b.resource.clone();
            command(
                Command::Unlock {
                    resource: b.resource,
                },
                Answer::Released(resource),
            )
        }
        ("GET", ["locks"]) => Ok(R::Locks),
        ("GET", ["presence"]) => Ok(R::Presence),
        ("GET", ["events"]) => {
            let since = query_u64(query, "since")?.unwrap_or(0);
            let limit = query_u64(query, "limit")?.unwrap_or(u64::from(DEFAULT_EVENTS_PAGE));
            let limit = limit.clamp(1, u64::from(MAX_EVENTS_PAGE)) as u32;
            Ok(R::Events { since, limit })
        }
        ("GET", ["ws"]) => {
            let since = query_u64(query, "since")?.unwrap_or(0);
            let kind = query_str(query, "kind").unwrap_or_else(|| "web".into());
            if kind.is_empty() || kind.len() > 32 {
                return Err(WireError::new("invalid_query", "kind must be 1-32 bytes").into());
            }
            let client = query_str(query, "client");
            Ok(R::Socket {
                since,
                client,
                kind,
            })
        }
        ("POST", ["sandbox", "ensure"]) => Ok(R::SandboxEnsure),
        ("POST", ["sandbox", "snapshot"]) => Ok(R::SandboxSnapshot(wire::parse_body(body)?)),
        ("POST", ["sandbox", "restore"]) => Ok(R::SandboxRestore(wire::parse_body(body)?)),
        ("POST", ["sandbox", "authorize"]) => Ok(R::SandboxAuthorize(wire::parse_body(body)?)),
        _ => Err(RouteError::NoRoute),
    }
}

/// May `who` make `request`? Reads, sockets and sandbox routes are for members; a command is
/// checked by the session itself (a join makes a member), a create by the object's emptiness.
pub fn check_access(s: &Session, who: &Identity, request: &SessionRequest) -> CoreResult<()> {
    match request {
        SessionRequest::Command(..) | SessionRequest::Create(_) => Ok(()),
        _ if s.is_member(&who.user) => Ok(()),
        _ => Err(CoreError::NotMember),
    }
}

/// Why the session closes a person's socket (WebSocket close codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeopleClose {
    /// The person was removed from the session: do not reconnect.
    Removed,
    /// A newer socket of the same client id replaced this one.
    Replaced,
    /// The replay reached its bound for one connect: reconnect at once with `since` = the
    /// last event received; the replay continues from there (nothing is missed or repeated).
    ReplayContinues,
}

impl PeopleClose {
    pub fn code(self) -> u16 {
        match self {
            PeopleClose::Removed => 4000,
            PeopleClose::Replaced => 4001,
            PeopleClose::ReplayContinues => 4002,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            PeopleClose::Removed => "removed from session",
            PeopleClose::Replaced => "replaced by a newer connection",
            PeopleClose::ReplayContinues => {
                "replay continues: reconnect with since = the last event received"
            }
        }
    }
}

/// How many events the next replay page of a connect holds: at most `chunk` per frame and
/// `max` per connect (`sent` so far); 0 when the connect's replay has reached its bound.
pub fn replay_page(sent: u64, max: u64, chunk: u32) -> u32 {
    let left = max.saturating_sub(sent);
    u32::try_from(left.min(u64::from(chunk))).unwrap_or(chunk)
}

// ---- views ------------------------------------------------------------------------------

/// The prompt queue as members see it: the running prompt, the queued ones in order, and the
/// 20 newest that ended (without their authors' idempotency keys).
#[derive(Debug, Clone, Serialize)]
pub struct QueueView {
    pub running: Option<Prompt>,
    pub queued: Vec<Prompt>,
    pub recent: Vec<Prompt>,
}

impl QueueView {
    pub fn of(s: &Session) -> QueueView {
        let running = s
            .queue
            .running
            .as_ref()
            .and_then(|id| s.queue.prompts.get(id));
        let mut recent: Vec<&Prompt> = s
            .queue
            .prompts
            .values()
            .filter(|p| p.status.is_terminal())
            .collect();
        recent.sort_by_key(|p| std::cmp::Reverse(p.arrival));
        recent.truncate(crate::queue::RECENT_PROMPTS);
        QueueView {
            running: running.map(Prompt::public),
            queued: s
                .queue
                .queued_in_order()
                .into_iter()
                .map(Prompt::public)
                .collect(),
            recent: recent.into_iter().map(Prompt::public).collect(),
        }
    }
}

/// Everything a member needs to render the session.
#[derive(Debug, Clone, Serialize)]
pub struct SessionView<'a> {
    pub id: &'a str,
    pub title: &'a str,
    pub repository: &'a Option<String>,
    pub model: &'a Option<String>,
    pub owner: &'a str,
    pub status: SessionStatus,
    pub created_at: u64,
    pub invite: &'a str,
    pub limits: &'a Limits,
    pub role: Option<Role>,
    pub members: Vec<&'a Member>,
    pub presence: ServerMessage,
    pub locks: Vec<&'a Lock>,
    pub queue: QueueView,
    pub last_seq: u64,
    /// Where the work can be restored from if the sandbox goes away (`GET /snapshot` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<&'a [Snap]>,
}

impl<'a> SessionView<'a> {
    pub fn of(s: &'a Session, who: &Identity, last_seq: u64) -> SessionView<'a> {
        let m = &s.meta;
        SessionView {
            id: &m.id,
            title: &m.title,
            repository: &m.repository,
            model: &m.model,
            owner: &m.owner,
            status: m.status,
            created_at: m.created_at,
            invite: &m.invite,
            limits: &m.limits,
            role: s.members.get(&who.user).map(|member| member.role),
            members: s.members.values().collect(),
            presence: presence_frame(s),
            locks: s.locks.values().collect(),
            queue: QueueView::of(s),
            last_seq,
            snapshots: None,
        }
    }
}

/// The presence snapshot frame (capped at [`PRESENCE_SNAPSHOT_MAX`] entries, with the total).
pub fn presence_frame(s: &Session) -> ServerMessage {
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

#[derive(Debug, Clone, Serialize)]
pub struct LocksView<'a> {
    pub locks: Vec<&'a Lock>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PresenceView {
    pub total: usize,
    pub clients: Vec<PresenceEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Left {
    pub left: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Okay {
    pub ok: bool,
}

pub const OKAY: Okay = Okay { ok: true };

#[derive(Debug, Clone, Serialize)]
pub struct Stopped {
    pub stopped: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Released {
    pub released: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct EgressSet {
    pub allow: Vec<String>,
    pub applied_to_live_sandbox: bool,
}

/// A page of the event log (`GET /events`), its bodies as stored.
pub fn events_page(last_seq: u64, bodies: &[String]) -> String {
    format!(
        "{{\"last_seq\":{last_seq},\"events\":[{}]}}",
        bodies.join(",")
    )
}

/// One of the views a command answers with.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum View<'a> {
    Session(Box<SessionView<'a>>),
    Prompt(Prompt),
    Lock(Option<&'a Lock>),
    Left(Left),
    Okay(Okay),
    Stopped(Stopped),
    Released(Released),
    Egress(EgressSet),
}

/// Why a command's view cannot be shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewError {
    /// The person is not (or no longer) a member.
    NotMember,
    /// The prompt is not known.
    NoPrompt,
}

/// The status and view a command's answer shows, from the session after the command.
/// `applied` says whether a live sandbox took a new egress list.
pub fn answer<'a>(
    hosted: &'a HostedSession,
    who: &Identity,
    answer: &Answer,
    done: &Done,
    last_seq: u64,
    applied: bool,
) -> Result<(u16, View<'a>), ViewError> {
    let s = &hosted.session;
    let prompt = |id: &str| {
        s.queue
            .prompts
            .get(id)
            .map(Prompt::public)
            .ok_or(ViewError::NoPrompt)
    };
    Ok(match answer {
        Answer::Session => {
            if !s.is_member(&who.user) {
                return Err(ViewError::NotMember);
            }
            let status = if matches!(done, Done::Joined { new: true }) {
                201
            } else {
                200
            };
            (
                status,
                View::Session(Box::new(SessionView::of(s, who, last_seq))),
            )
        }
        Answer::Left => (200, View::Left(Left { left: true })),
        Answer::Ok => (200, View::Okay(OKAY)),
        Answer::Prompt(Some(id)) => (200, View::Prompt(prompt(id)?)),
        Answer::Prompt(None) => match done {
            Done::Submitted(submitted) => {
                let status = if submitted.is_new() { 202 } else { 200 };
                (status, View::Prompt(prompt(submitted.id())?))
            }
            _ => return Err(ViewError::NoPrompt),
        },
        Answer::Stopped => {
            let stopped = match done {
                Done::Stopped(id) => id.clone(),
                _ => None,
            };
            (200, View::Stopped(Stopped { stopped }))
        }
        Answer::Lock(resource) => (200, View::Lock(s.locks.get(resource))),
        Answer::Released(resource) => (
            200,
            View::Released(Released {
                released: resource.clone(),
            }),
        ),
        Answer::Egress(allow) => (
            200,
            View::Egress(EgressSet {
                allow: allow.clone(),
                applied_to_live_sandbox: applied,
            }),
        ),
    })
}

/// A replay page of events as one socket frame.
pub fn events_frame(events: Vec<Event>) -> ServerMessage {
    ServerMessage::Events { events }
}

/// A client's socket frame as a command; `Answer::Prompt` for a prompt (its ack carries the
/// prompt), `Answer::Ok` otherwise (a bare ack).
pub fn client_command(
    msg: ClientMessage,
    client: &str,
    new_prompt_id: impl FnOnce() -> String,
) -> Result<(Command, Answer), WireError> {
    let client = client.to_string();
    let ok = |c: Command| Ok((c, Answer::Ok));
    match msg {
        ClientMessage::Ping => ok(Command::Heartbeat { client }),
        ClientMessage::Cursor { file, line, column } => ok(Command::Cursor {
            client,
            cursor: Cursor { file, line, column },
        }),
        ClientMessage::Typing { typing } => ok(Command::Typing { client, typing }),
        ClientMessage::Prompt {
            text,
            priority,
            model,
            key,
        } => {
            wire::check_model(model.as_deref())?;
            let submission = PromptSubmission {
                id: new_prompt_id(),
                text,
                priority,
                model,
                key,
            };
            Ok((Command::Submit(submission), Answer::Prompt(None)))
        }
        ClientMessage::Cancel { id } => ok(Command::Cancel { prompt: id }),
        ClientMessage::Reprioritize { id, priority } => ok(Command::Reprioritize {
            prompt: id,
            priority,
        }),
        ClientMessage::Stop => ok(Command::Stop),
        ClientMessage::LockAcquire { resource, ttl_ms } => ok(Command::Lock { resource, ttl_ms }),
        ClientMessage::LockRelease { resource } => ok(Command::Unlock { resource }),
    }
}

/// The coalesced presence changes as one `presence.delta` frame (None: nothing changed), at
/// most [`PRESENCE_DELTA_MAX`] entries per list.
pub fn presence_delta(s: &Session, changed: BTreeSet<ClientId>) -> Option<ServerMessage> {
    if changed.is_empty() {
        return None;
    }
    let mut updated = Vec::new();
    let mut left = Vec::new();
    let mut truncated = false;
    for id in changed {
        match s.clients.get(&id) {
            Some(_) if updated.len() >= PRESENCE_DELTA_MAX => truncated = true,
            Some(client) => updated.push(PresenceEntry::from(client)),
            None if left.len() >= PRESENCE_DELTA_MAX => truncated = true,
            None => left.push(id),
        }
    }
    Some(ServerMessage::PresenceDelta {
        updated,
        left,
        total: s.clients.len(),
        truncated,
    })
}
