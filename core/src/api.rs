//! The session object's HTTP API as types: each route decoded into a request (bodies parsed by `wire`), and each answer a typed view of the session.
//!
//! The session object passes a request's method, path, query, idempotency header and body to
//! [`decode`]; a person's command goes to [`HostedSession::run`], and [`answer`] renders what
//! the command did as the route's view. Nothing here does I/O.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::error::{CoreError, CoreResult};
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
        ("DELETE", ["members", user]) => command(
            Command::RemoveMember {
                user: (*user).to_string(),
            },
            Answer::Session,
        ),
        ("POST", ["invite"]) => command(Command::RotateInvite, Answer::Session),
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
        _ if !s.is_member(&who.user) => Err(CoreError::NotMember),
        // Running commands in the sandbox, or stopping, starting and ending it, is the owner's:
        // an invitee reads and prompts, but gets no shell.
        SessionRequest::SandboxAuthorize(b)
            if OWNER_SANDBOX_OPS.contains(&b.op.as_str()) && s.meta.owner != who.user =>
        {
            Err(CoreError::OwnerOnly)
        }
        _ => Ok(()),
    }
}

/// Sandbox operations only the session's owner may do.
pub const OWNER_SANDBOX_OPS: [&str; 5] = ["exec", "stop", "start", "terminate", "git.sync"];

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
    /// The person no longer has read access to the session's GitHub repository.
    AccessLost,
}

impl PeopleClose {
    pub fn code(self) -> u16 {
        match self {
            PeopleClose::Removed => 4000,
            PeopleClose::Replaced => 4001,
            PeopleClose::ReplayContinues => 4002,
            PeopleClose::AccessLost => 4003,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            PeopleClose::Removed => "removed from session",
            PeopleClose::Replaced => "replaced by a newer connection",
            PeopleClose::ReplayContinues => {
                "replay continues: reconnect with since = the last event received"
            }
            PeopleClose::AccessLost => {
                "your GitHub access to this session's repository ended; ask for read access again"
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
    /// The session's pull request (null until one is opened).
    pub pull_request: &'a Option<crate::github::PrLink>,
    /// When the pull request could not be opened in the person's name: the compare link.
    pub pull_request_action: &'a Option<crate::events::PullRequestAction>,
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
            pull_request: &m.pull_request,
            pull_request_action: &m.pull_request_action,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn decoded(method: &str, path: &str, query: &[(&str, &str)], body: &str) -> SessionRequest {
        let query: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        decode(method, path, &query, None, body.as_bytes(), || {
            "prm_1".into()
        })
        .unwrap_or_else(|e| panic!("{method} {path}: {e:?}"))
    }

    fn refused(method: &str, path: &str, query: &[(&str, &str)], body: &str) -> String {
        let query: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match decode(method, path, &query, None, body.as_bytes(), || {
            "prm_1".into()
        }) {
            Err(RouteError::NoRoute) => "no_route".into(),
            Err(RouteError::Wire(e)) => e.code.to_string(),
            Ok(r) => panic!("{method} {path} was taken: {r:?}"),
        }
    }

    #[test]
    fn each_route_decodes_to_its_command_and_answer() {
        let command = |r: SessionRequest| match r {
            SessionRequest::Command(c, a) => (c, a),
            other => panic!("not a command: {other:?}"),
        };
        assert_eq!(
            command(decoded("POST", "/join", &[], r#"{"invite":"i"}"#)),
            (Command::Join { invite: "i".into() }, Answer::Session)
        );
        assert_eq!(
            command(decoded(
                "POST",
                "/prompt",
                &[],
                r#"{"text":"hi","priority":2}"#
            )),
            (
                Command::Submit(PromptSubmission {
                    id: "prm_1".into(),
                    text: "hi".into(),
                    priority: 2,
                    model: None,
                    key: None,
                }),
                Answer::Prompt(None)
            )
        );
        assert_eq!(
            command(decoded("DELETE", "/prompt/p7", &[], "")),
            (
                Command::Cancel {
                    prompt: "p7".into()
                },
                Answer::Prompt(Some("p7".into()))
            )
        );
        assert_eq!(
            command(decoded("POST", "/lock", &[], r#"{"resource":"a.rs"}"#)),
            (
                Command::Lock {
                    resource: "a.rs".into(),
                    ttl_ms: 60_000
                },
                Answer::Lock("a.rs".into())
            )
        );
        assert_eq!(
            command(decoded("PUT", "/egress", &[], r#"{"allow":["x.com"]}"#)),
            (
                Command::SetEgress {
                    allow: vec!["x.com".into()]
                },
                Answer::Egress(vec!["x.com".into()])
            )
        );
        assert!(matches!(
            decoded("GET", "/events", &[("since", "7"), ("limit", "99999")], ""),
            SessionRequest::Events {
                since: 7,
                limit: MAX_EVENTS_PAGE
            }
        ));
        assert!(matches!(
            decoded("GET", "/events", &[], ""),
            SessionRequest::Events {
                since: 0,
                limit: DEFAULT_EVENTS_PAGE
            }
        ));
        match decoded("GET", "/ws", &[("since", "3"), ("client", "c1")], "") {
            SessionRequest::Socket {
                since,
                client,
                kind,
            } => assert_eq!(
                (since, client.as_deref(), kind.as_str()),
                (3, Some("c1"), "web")
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_requests_are_refused_with_their_codes() {
        assert_eq!(refused("GET", "/nope", &[], ""), "no_route");
        assert_eq!(refused("PATCH", "/join", &[], ""), "no_route");
        assert_eq!(refused("POST", "/join", &[], "{"), "malformed_json");
        assert_eq!(refused("POST", "/join", &[], r#"{"x":1}"#), "invalid_body");
        assert_eq!(
            refused("GET", "/events", &[("since", "-1")], ""),
            "invalid_query"
        );
        assert_eq!(
            refused("GET", "/ws", &[("kind", &"k".repeat(33))], ""),
            "invalid_query"
        );
        assert_eq!(refused("GET", "/ws", &[("kind", "")], ""), "invalid_query");
        assert_eq!(
            refused("POST", "/prompt", &[], r#"{"text":"t","model":"nope"}"#),
            "invalid_model"
        );
    }

    #[test]
    fn the_header_and_body_keys_must_agree() {
        let ask = |header: Option<&str>, body: &str| {
            decode(
                "POST",
                "/prompt",
                &[],
                header.map(str::to_string),
                body.as_bytes(),
                || "prm_1".into(),
            )
        };
        let key = |r: Result<SessionRequest, RouteError>| match r {
            Ok(SessionRequest::Command(Command::Submit(s), _)) => s.key,
            other => panic!("{other:?}"),
        };
        assert_eq!(key(ask(Some("k1"), r#"{"text":"t"}"#)), Some("k1".into()));
        assert_eq!(
            key(ask(None, r#"{"text":"t","key":"k2"}"#)),
            Some("k2".into())
        );
        assert!(ask(Some("k1"), r#"{"text":"t","key":"k2"}"#).is_err());
    }

    #[test]
    fn a_replay_page_is_bounded_by_the_frame_and_the_connect() {
        assert_eq!(replay_page(0, 10_000, 500), 500);
        assert_eq!(replay_page(9_800, 10_000, 500), 200);
        assert_eq!(replay_page(10_000, 10_000, 500), 0);
        assert_eq!(replay_page(12_000, 10_000, 500), 0);
        assert_eq!(replay_page(0, 25, 500), 25);
    }

    #[test]
    fn people_close_codes_are_stable() {
        let codes: Vec<u16> = [
            PeopleClose::Removed,
            PeopleClose::Replaced,
            PeopleClose::ReplayContinues,
            PeopleClose::AccessLost,
        ]
        .iter()
        .map(|c| c.code())
        .collect();
        assert_eq!(codes, vec![4000, 4001, 4002, 4003]);
    }

    fn person(user: &str) -> Identity {
        Identity {
            user: user.into(),
            name: user.into(),
            email: None,
        }
    }

    fn hosted() -> HostedSession {
        let meta = crate::session::Meta {
            id: "ses_1".into(),
            title: "t".into(),
            repository: None,
            owner: "alice".into(),
            invite: "inv".into(),
            created_at: 0,
            status: SessionStatus::Active,
            limits: Limits::default(),
            next_arrival: 0,
            model: None,
            pull_request: None,
            pull_request_action: None,
        };
        let (session, _) = Session::create(meta, &person("alice"));
        let timing = crate::hosted::LinkTiming {
            heartbeat_timeout_ms: 1,
            grace_ms: 1,
        };
        HostedSession::new(session, None, timing, false)
    }

    struct Fixed;

    impl crate::hosted::Entropy for Fixed {
        fn token(&mut self) -> String {
            "t".into()
        }
    }

    #[test]
    fn answers_carry_the_status_the_command_earned() {
        let mut h = hosted();
        let bob = person("bob");
        let join = Command::Join {
            invite: "inv".into(),
        };
        let (done, _) = h.run(&bob, join.clone(), 1, &mut Fixed).expect("join");
        let status = |h: &HostedSession, done: &Done, a: &Answer| {
            answer(h, &bob, a, done, 0, false).map(|(s, _)| s)
        };
        assert_eq!(status(&h, &done, &Answer::Session), Ok(201));
        let (again, _) = h.run(&bob, join, 2, &mut Fixed).expect("join again");
        assert_eq!(status(&h, &again, &Answer::Session), Ok(200));
        let submit = |key: &str| {
            Command::Submit(PromptSubmission {
                id: format!("p-{key}"),
                text: "t".into(),
                priority: 0,
                model: None,
                key: Some(key.into()),
            })
        };
        let (new, _) = h.run(&bob, submit("k"), 3, &mut Fixed).expect("submit");
        assert_eq!(status(&h, &new, &Answer::Prompt(None)), Ok(202));
        let (repeat, _) = h.run(&bob, submit("k"), 4, &mut Fixed).expect("repeat");
        assert_eq!(status(&h, &repeat, &Answer::Prompt(None)), Ok(200));
        assert_eq!(
            status(&h, &Done::Applied, &Answer::Prompt(Some("nope".into()))),
            Err(ViewError::NoPrompt)
        );
        h.run(&bob, Command::Leave, 5, &mut Fixed).expect("leave");
        assert_eq!(
            status(&h, &Done::Applied, &Answer::Session),
            Err(ViewError::NotMember)
        );
        // Reads are for members; commands are the session's to check.
        assert!(check_access(&h.session, &bob, &SessionRequest::Locks).is_err());
        assert!(check_access(&h.session, &person("alice"), &SessionRequest::Locks).is_ok());
        let leave = SessionRequest::Command(Command::Leave, Answer::Left);
        assert!(check_access(&h.session, &bob, &leave).is_ok());
    }

    #[test]
    fn only_the_owner_gets_a_shell_or_ends_the_sandbox() {
        let mut h = hosted();
        let bob = person("bob");
        let invite = h.session.meta.invite.clone();
        h.run(&bob, Command::Join { invite }, 2, &mut Fixed)
            .expect("join");
        let op = |op: &str| {
            SessionRequest::SandboxAuthorize(wire::SandboxAuthorize {
                sandbox: Some("sbx_1".into()),
                op: op.into(),
            })
        };
        for owner_only in OWNER_SANDBOX_OPS {
            assert_eq!(
                check_access(&h.session, &bob, &op(owner_only)),
                Err(CoreError::OwnerOnly),
                "{owner_only}"
            );
            assert_eq!(
                check_access(&h.session, &person("alice"), &op(owner_only)),
                Ok(())
            );
            assert_eq!(
                check_access(&h.session, &person("eve"), &op(owner_only)),
                Err(CoreError::NotMember)
            );
        }
        for member_may in ["get", "list", "logs", "git", "snapshot"] {
            assert_eq!(
                check_access(&h.session, &bob, &op(member_may)),
                Ok(()),
                "{member_may}"
            );
        }
    }

    #[test]
    fn every_route_is_taken_by_its_own_request() {
        let name = |r: &SessionRequest| match r {
            SessionRequest::Create(_) => "create".to_string(),
            SessionRequest::Command(c, _) => format!("{c:?}")
                .split([' ', '(', '{'])
                .next()
                .unwrap_or_default()
                .to_string(),
            SessionRequest::Snapshot => "snapshot".into(),
            SessionRequest::Prompts => "prompts".into(),
            SessionRequest::Locks => "locks".into(),
            SessionRequest::Presence => "presence".into(),
            SessionRequest::Events { .. } => "events".into(),
            SessionRequest::Socket { .. } => "socket".into(),
            SessionRequest::SandboxEnsure => "ensure".into(),
            SessionRequest::SandboxSnapshot(_) => "sandbox snapshot".into(),
            SessionRequest::SandboxRestore(_) => "restore".into(),
            SessionRequest::SandboxAuthorize(_) => "authorize".into(),
        };
        let routes = [
            ("POST", "/create", r#"{"title":"t"}"#, "create"),
            ("POST", "/join", r#"{"invite":"i"}"#, "Join"),
            ("GET", "/snapshot", "", "snapshot"),
            ("POST", "/leave", "", "Leave"),
            ("DELETE", "/members/bob", "", "RemoveMember"),
            ("POST", "/invite", "", "RotateInvite"),
            ("PUT", "/egress", r#"{"allow":[]}"#, "SetEgress"),
            ("POST", "/end", "", "End"),
            (
                "PUT",
                "/cursor",
                r#"{"client":"c","line":1,"column":2}"#,
                "Cursor",
            ),
            ("POST", "/prompt", r#"{"text":"t"}"#, "Submit"),
            ("DELETE", "/prompt/p1", "", "Cancel"),
            ("PATCH", "/prompt/p1", r#"{"priority":1}"#, "Reprioritize"),
            ("GET", "/prompts", "", "prompts"),
            ("POST", "/stop", "", "Stop"),
            ("POST", "/lock", r#"{"resource":"r"}"#, "Lock"),
            ("POST", "/unlock", r#"{"resource":"r"}"#, "Unlock"),
            ("GET", "/locks", "", "locks"),
            ("GET", "/presence", "", "presence"),
            ("GET", "/events", "", "events"),
            ("GET", "/ws", "", "socket"),
            ("POST", "/sandbox/ensure", "", "ensure"),
            (
                "POST",
                "/sandbox/snapshot",
                r#"{"sandbox":"s"}"#,
                "sandbox snapshot",
            ),
            (
                "POST",
                "/sandbox/restore",
                r#"{"session_id":"s"}"#,
                "restore",
            ),
            (
                "POST",
                "/sandbox/authorize",
                r#"{"op":"stop"}"#,
                "authorize",
            ),
        ];
        for (method, path, body, want) in routes {
            assert_eq!(
                name(&decoded(method, path, &[], body)),
                want,
                "{method} {path}"
            );
        }
        // A client kind of 32 bytes is taken, 33 is not.
        let kind = "k".repeat(32);
        assert!(matches!(
            decoded("GET", "/ws", &[("kind", &kind)], ""),
            SessionRequest::Socket { .. }
        ));
    }

    #[test]
    fn close_reasons_say_what_to_do() {
        let all = [
            PeopleClose::Removed,
            PeopleClose::Replaced,
            PeopleClose::ReplayContinues,
        ];
        let reasons: std::collections::BTreeSet<&str> = all.iter().map(|c| c.reason()).collect();
        assert_eq!(reasons.len(), 3, "{reasons:?}");
        assert!(PeopleClose::ReplayContinues.reason().contains("reconnect"));
        assert!(PeopleClose::Removed.reason().contains("removed"));
        // Close reasons must fit a close frame (123 bytes).
        assert!(all.iter().all(|c| c.reason().len() <= 123));
    }

    #[test]
    fn an_events_page_is_the_stored_bodies_as_they_are() {
        let bodies = vec![r#"{"seq":1}"#.to_string(), r#"{"seq":2}"#.to_string()];
        assert_eq!(
            events_page(9, &bodies),
            r#"{"last_seq":9,"events":[{"seq":1},{"seq":2}]}"#
        );
        assert_eq!(events_page(0, &[]), r#"{"last_seq":0,"events":[]}"#);
    }

    #[test]
    fn a_stop_answers_with_the_prompt_it_stopped() {
        let h = hosted();
        let alice = person("alice");
        let view = |done: &Done| {
            let (_, view) = answer(&h, &alice, &Answer::Stopped, done, 0, false).expect("view");
            serde_json::to_string(&view).expect("json")
        };
        assert_eq!(
            view(&Done::Stopped(Some("p1".into()))),
            r#"{"stopped":"p1"}"#
        );
        assert_eq!(view(&Done::Stopped(None)), r#"{"stopped":null}"#);
        assert_eq!(view(&Done::Applied), r#"{"stopped":null}"#);
    }

    #[test]
    fn presence_deltas_are_bounded_per_list_and_say_so() {
        let mut h = hosted();
        let alice = person("alice");
        assert!(presence_delta(&h.session, BTreeSet::new()).is_none());
        let n = PRESENCE_DELTA_MAX + 3;
        for i in 0..n {
            let connect = Command::Connect {
                client: format!("c{i:02}"),
                kind: "web".into(),
            };
            // The per-person client limit does not apply to this test's count.
            h.session.meta.limits.max_clients_per_user = 100;
            h.run(&alice, connect, 1, &mut Fixed).expect("connect");
        }
        let mut changed: BTreeSet<ClientId> = (0..n).map(|i| format!("c{i:02}")).collect();
        let delta = |changed: BTreeSet<ClientId>, h: &HostedSession| match presence_delta(
            &h.session, changed,
        ) {
            Some(ServerMessage::PresenceDelta {
                updated,
                left,
                total,
                truncated,
            }) => (updated.len(), left.len(), total, truncated),
            other => panic!("{other:?}"),
        };
        assert_eq!(delta(changed.clone(), &h), (PRESENCE_DELTA_MAX, 0, n, true));
        let few: BTreeSet<ClientId> = changed.iter().take(2).cloned().collect();
        assert_eq!(delta(few, &h), (2, 0, n, false));
        // Clients that left are listed by id, bounded the same way.
        for i in 0..n {
            changed.insert(format!("gone{i:02}"));
        }
        assert_eq!(
            delta(changed, &h),
            (PRESENCE_DELTA_MAX, PRESENCE_DELTA_MAX, n, true)
        );
        let gone: BTreeSet<ClientId> = ["gone".to_string()].into_iter().collect();
        assert_eq!(delta(gone, &h), (0, 1, n, false));
    }
}
