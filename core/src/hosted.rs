//! The hosted session: a session composed with its sandbox link, as one pure state machine (named after `specs/HostedAgent.tla`).
//!
//! [`HostedSession`] takes one input at a time — a command on the session, the sandbox dialling
//! in, a frame from it, its socket closing, a provider's answer, the alarm — with the time passed
//! in, and returns the [`Effect`]s the session object carries out, in order: store rows and
//! events (then broadcast them), save the link, send frames, close sockets, call the provider.
//! Provider answers come back as inputs. Every timer is in [`HostedSession::next_deadline`].
//!
//! The rules it adds to the session's own (`crate::session`):
//! - A running prompt always ends, or is handed to a new sandbox: a sandbox that fails to start
//!   fails the prompt it was for (and only that one: the next prompt's spawn backs off); a
//!   sandbox that dies *after* it acknowledged the prompt (sent an event for it) fails that
//!   prompt with the reason; one that dies before it ever acknowledged it hands the prompt to
//!   the next sandbox (restored from the newest snapshot) instead of failing it.
//! - A retired sandbox (lost, failed, stopped, replaced) never changes the queue: its frames are
//!   refused by the link generation they carry.
//! - Every acknowledged event is stored once, in order: the acknowledgement follows the store.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, CoreResult};
use crate::events::EventKind;
use crate::ids::{Actor, ClientId, Cursor, Identity};
use crate::sandbox::{AgentEvent, SandboxLink, SandboxMessage, Stage};
use crate::session::{presence_batch_ms, Dirty, Outcome, PromptSubmission, Session, Submitted};
use crate::signing::{sha256_hex, token_matches};
use crate::snapshot::{Snap, Snapshots};

/// Most times a prompt is handed to a new sandbox because the last one died before it started it.
pub const MAX_HANDOVERS: u32 = 2;
/// First wait before a spawn is tried again after a failed one (doubling, up to [`MAX_RETRY_MS`]).
pub const FIRST_RETRY_MS: u64 = 1_000;
/// Longest wait between two spawns after failures.
pub const MAX_RETRY_MS: u64 = 60_000;

/// How much one prompt's agent may send before it is stopped: its events are stored, so an
/// agent (or a hostile repository steering it) that floods the session would otherwise grow
/// the log without end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventLimit {
    pub events: u64,
    pub bytes: u64,
}

impl Default for EventLimit {
    fn default() -> EventLimit {
        EventLimit {
            events: 20_000,
            bytes: 16 * 1024 * 1024,
        }
    }
}

/// How long a sandbox may be silent or disconnected before it counts as lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkTiming {
    pub heartbeat_timeout_ms: u64,
    pub grace_ms: u64,
}

/// Fresh secrets for new sandboxes (randomness is injected).
pub trait Entropy {
    /// A new sandbox token (secret; only its hash is kept).
    fn token(&mut self) -> String;
}

/// Why the session's sandbox socket is closed (WebSocket close codes of the sandbox link).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// A newer connection of the same sandbox replaced this one.
    Replaced,
    /// Events arrived out of order: reconnect and resend from the acknowledged number.
    OutOfOrder,
    /// This socket's sandbox is not (or no longer) the session's sandbox.
    Refused,
    /// The sandbox was declared lost.
    Lost,
    /// The sandbox was stopped, terminated or replaced through the API.
    Retired,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Replaced => 4001,
            CloseCode::OutOfOrder => 4002,
            CloseCode::Refused => 4003,
            CloseCode::Lost => 4004,
            CloseCode::Retired => 4005,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Replaced => "replaced by a newer sandbox connection",
            CloseCode::OutOfOrder => "out of order; reconnect and resend",
            CloseCode::Refused => "refused: this sandbox is not the session's sandbox",
            CloseCode::Lost => "refused: the sandbox was declared lost",
            CloseCode::Retired => "refused: the sandbox was stopped through the API",
        }
    }

    /// The close code as the sandbox receives it (`None`: not one of the session's).
    pub fn from_code(code: u16) -> Option<CloseCode> {
        [
            CloseCode::Replaced,
            CloseCode::OutOfOrder,
            CloseCode::Refused,
            CloseCode::Lost,
            CloseCode::Retired,
        ]
        .into_iter()
        .find(|c| c.code() == code)
    }

    /// The sandbox must not reconnect after this close (its supervisor gives up).
    pub fn is_refusal(self) -> bool {
        matches!(
            self,
            CloseCode::Refused | CloseCode::Lost | CloseCode::Retired
        )
    }
}

/// The running prompt as the sandbox receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptFrame {
    pub id: String,
    pub text: String,
    pub author_name: String,
    pub author_email: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// Frames the session sends down to its sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DownFrame {
    /// First frame after the sandbox dials in: the highest event number stored.
    Welcome {
        last_n: u64,
    },
    /// Events up to `n` are stored.
    Ack {
        n: u64,
    },
    Prompt {
        prompt: PromptFrame,
    },
    /// Abort this prompt.
    Stop {
        prompt: String,
    },
    /// A refused frame, with its stable code.
    Error {
        error: DownError,
    },
    /// Credentials for the supervisor's own `git` (fetch and push of the session's branch): an
    /// installation token scoped to the repository, kept in the supervisor's memory only —
    /// never in the checkout, the agent's processes, an image or a snapshot.
    GitCredentials {
        token: String,
        expires_at: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownError {
    pub code: String,
    pub message: String,
}

/// What the provider answered to a spawn (restore, claim or cold start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpawnAnswer {
    /// The provider has the sandbox (`how`: restored, claimed or started, for the session's log).
    Created {
        sandbox: String,
        expires_at: Option<u64>,
        how: String,
    },
    /// The provider refused or could not be reached.
    Failed { message: String },
}

/// What the provider says about a sandbox that has not dialled in yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollAnswer {
    /// `failed` or `terminated` at the provider, with its error.
    Failed { code: String, message: String },
    /// The provider no longer knows it.
    Gone,
    /// Still coming up (or the provider did not answer): ask again later.
    Pending,
}

/// What the session object does with the sandbox: stop, terminate or start it (`POST /sandbox/:id/...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SandboxOp {
    Stop,
    Terminate,
    Start,
    Other,
}

impl SandboxOp {
    pub fn parse(op: &str) -> SandboxOp {
        match op {
            "stop" => SandboxOp::Stop,
            "terminate" => SandboxOp::Terminate,
            "start" => SandboxOp::Start,
            _ => SandboxOp::Other,
        }
    }
}

/// One thing that happened to the hosted session.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The session's sandbox dialled in (its token was admitted by [`HostedSession::admit`]).
    SandboxConnected,
    /// A frame from a sandbox socket opened for link generation `link` (its token's hash).
    SandboxFrame {
        link: String,
        message: SandboxMessage,
    },
    /// The last open socket of link generation `link` closed.
    SandboxClosed { link: String },
    /// The provider answered the spawn of link generation `link`.
    Spawned { link: String, answer: SpawnAnswer },
    /// The provider answered a start of the stopped `sandbox`.
    Started { sandbox: String, ok: bool },
    /// The provider answered a poll of the spawning `sandbox`.
    Polled { sandbox: String, answer: PollAnswer },
    /// The provider took the snapshot of `turn` (`TakeSnapshot`).
    SnapshotTaken {
        turn: u64,
        id: String,
        expires_at: u64,
    },
    /// The provider did not take the snapshot of `turn` (refused, unreachable, no sandbox).
    SnapshotNotTaken { turn: u64 },
    /// The provider deleted (or no longer had) these snapshots.
    SnapshotsDeleted { ids: Vec<String> },
    /// A spawn found these snapshots gone at the provider.
    SnapshotsLost { ids: Vec<String> },
    /// Someone started typing: get a sandbox before the prompt arrives.
    Typing,
    /// The alarm rang.
    Alarm,
}

/// What the session object carries out, in this order.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Store the session's changed rows and append these events, then broadcast them.
    Store {
        dirty: Vec<Dirty>,
        events: Vec<(Actor, EventKind)>,
    },
    /// Store the sandbox link as it is now.
    SaveLink,
    /// Close these people's sockets (removed from the session).
    Disconnect(Vec<ClientId>),
    /// Send a frame to the sandbox's open socket, if any.
    ToSandbox(DownFrame),
    /// Close every sandbox socket of the session.
    CloseSandbox(CloseCode),
    /// Close the sockets opened for link generation `link` (not the session's live sandbox):
    /// refused.
    Refuse { link: String },
    /// Ask the provider for a sandbox with this token (restore `snapshot` only, when named);
    /// answer with [`Input::Spawned`] for link `sha256(token)`.
    Spawn {
        token: String,
        snapshot: Option<String>,
    },
    /// Start a stopped sandbox again; answer with [`Input::Started`].
    StartStopped { sandbox: String },
    /// Ask the provider about a spawning sandbox; answer with [`Input::Polled`].
    Poll { sandbox: String },
    /// Terminate a sandbox at the provider (best effort; nothing waits for it).
    Terminate { sandbox: String },
    /// Snapshot `sandbox` (none: the session has no live one) for `turn`; answer with
    /// [`Input::SnapshotTaken`] or [`Input::SnapshotNotTaken`].
    TakeSnapshot { sandbox: Option<String>, turn: u64 },
    /// Delete these snapshots at the provider; answer with [`Input::SnapshotsDeleted`].
    DeleteSnapshots { ids: Vec<String> },
    /// Store the session's snapshot list as it is now.
    SaveSnapshots,
    /// Terminate every sandbox the provider holds for this session (one whose id the session
    /// never learned: its create was never answered, or it never dialled in).
    SweepSandboxes,
    /// The echo runner's job for `prompt`: due at that time, or none (stored, so it survives
    /// eviction).
    SaveRunnerJob { prompt: String, due: Option<u64> },
    /// The session's work was pushed to this branch (a later cold start continues it).
    RememberBranch(String),
    /// Stop the sandbox at the provider (its disk kept; a start boots it again).
    StopSandbox { sandbox: String },
    /// Answer with the provider's record of the session's live sandbox.
    Describe { sandbox: String },
    /// Store the session's egress allow-list (a later sandbox starts with it).
    SaveEgress(Vec<String>),
    /// Give the live sandbox the new egress allow-list at once.
    ApplyEgress { sandbox: String, allow: Vec<String> },
    /// The session ended: its members' indexes mark it ended, and a background agent's child
    /// sessions end with it.
    Ended { members: Vec<String> },
}

/// A person's command (over HTTP or their socket), or an object's on their behalf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Join {
        invite: String,
    },
    Leave,
    End,
    SetEgress {
        allow: Vec<String>,
    },
    Connect {
        client: String,
        kind: String,
    },
    Disconnect {
        client: String,
    },
    Heartbeat {
        client: String,
    },
    Cursor {
        client: String,
        cursor: Cursor,
    },
    /// Typing started or stopped; a start warms a sandbox up before the prompt arrives.
    Typing {
        client: String,
        typing: bool,
    },
    Submit(PromptSubmission),
    Cancel {
        prompt: String,
    },
    Reprioritize {
        prompt: String,
        priority: i32,
    },
    Stop,
    /// The owner removes a member.
    RemoveMember {
        user: String,
    },
    /// The owner replaces the invite.
    RotateInvite,
    Lock {
        resource: String,
        ttl_ms: u64,
    },
    Unlock {
        resource: String,
    },
    /// A background agent's child session changed (from the scheduler object).
    BackgroundChild {
        id: String,
        status: String,
        session: Option<String>,
        title: Option<String>,
        branch: Option<String>,
    },
    /// The background agent was cancelled: its running prompt stops, as if by the owner
    /// (nothing running is fine: the agent may not have started yet).
    BackgroundCancel,
    /// GitHub said this about the session's pull request on `repository` (`owner/name`).
    PullRequest {
        repository: String,
        pull: Box<crate::github::Pull>,
    },
    /// The pull request could not be opened in the person's name.
    PullRequestAction(crate::events::PullRequestAction),
    /// What review comments did: `pr.comment.received` or `pr.comment.addressed`.
    PullRequestReview(crate::events::ReviewNote),
}

/// What a command did, for its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Done {
    /// Nothing beyond its effects.
    Applied,
    /// A join stored a new member (false: already one).
    Joined { new: bool },
    /// A prompt submission: the prompt, and whether it is new (a repeated key: not).
    Submitted(Submitted),
    /// The prompt a stop stopped, if any.
    Stopped(Option<String>),
}

/// A session with its sandbox link.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostedSession {
    pub session: Session,
    pub link: Option<SandboxLink>,
    pub timing: LinkTiming,
    /// Prompts run in sandboxes; otherwise in the object's runner.
    pub sandboxes: bool,
    /// Clients whose presence changed since the last presence frame.
    pub presence: BTreeSet<ClientId>,
    /// When the pending presence changes were first recorded.
    presence_since: Option<u64>,
    /// The most one prompt's agent may send.
    pub event_limit: EventLimit,
    /// The session's snapshots (stored; restored from, kept at most `KEEP`).
    pub snapshots: Snapshots,
    /// How long before the sandbox's lifetime ends its work is snapshotted.
    pub snapshot_margin_ms: u64,
    /// A snapshot is being taken (memory only: after a restart the alarm asks again).
    snapshot_in_flight: bool,
    /// Snapshots whose deletion the provider has been asked for.
    deleting: bool,
    /// Without sandboxes: the echo runner answers each prompt this long after it starts (None:
    /// running prompts wait for compute).
    pub echo_ms: Option<u64>,
    /// The echo runner's jobs: prompt → when it is answered.
    pub jobs: BTreeMap<String, u64>,
    /// A live sandbox with nothing to do for this long is snapshotted and stopped (None: never).
    pub idle_ms: Option<u64>,
    /// Since when the live sandbox has had nothing to do (memory only: a woken object counts
    /// from when it woke). A running prompt is work however quiet it is — a long tool call or
    /// test run is not idleness — and typing counts as about to work.
    idle_since: Option<u64>,
}

impl HostedSession {
    pub fn new(
        session: Session,
        link: Option<SandboxLink>,
        timing: LinkTiming,
        sandboxes: bool,
    ) -> HostedSession {
        HostedSession {
            session,
            link,
            timing,
            sandboxes,
            presence: BTreeSet::new(),
            presence_since: None,
            event_limit: EventLimit::default(),
            snapshots: Snapshots::default(),
            snapshot_margin_ms: 0,
            snapshot_in_flight: false,
            deleting: false,
            echo_ms: None,
            jobs: BTreeMap::new(),
            idle_ms: None,
            idle_since: None,
        }
    }

    /// A live sandbox idle for `idle_ms` is snapshotted and stopped (0: never).
    pub fn with_idle(mut self, idle_ms: u64) -> HostedSession {
        self.idle_ms = (idle_ms > 0).then_some(idle_ms);
        self
    }

    /// Without sandboxes, the echo runner: answers each prompt `run_ms` after it starts; `jobs`
    /// are the stored ones.
    pub fn with_echo(mut self, run_ms: u64, jobs: BTreeMap<String, u64>) -> HostedSession {
        self.echo_ms = Some(run_ms);
        self.jobs = jobs;
        self
    }

    /// The session's snapshots and how long before a sandbox's end its work is snapshotted.
    pub fn with_snapshots(mut self, snapshots: Snapshots, margin_ms: u64) -> HostedSession {
        self.snapshots = snapshots;
        self.snapshot_margin_ms = margin_ms;
        self
    }

    /// `POST /sandbox/:id/snapshot`: snapshot `sandbox` now, recorded like a turn's snapshot.
    pub fn request_snapshot(&mut self, sandbox: &str) -> CoreResult<Vec<Effect>> {
        if self.snapshot_in_flight {
            return Err(CoreError::SnapshotInProgress);
        }
        let turn = self
            .snapshots
            .requested()
            .ok_or(CoreError::SnapshotInProgress)?;
        self.snapshot_in_flight = true;
        Ok(vec![
            Effect::SaveSnapshots,
            Effect::TakeSnapshot {
                sandbox: Some(sandbox.to_string()),
                turn,
            },
        ])
    }

    /// The snapshot a restore may use: `id`, or the newest live one.
    pub fn restorable(&self, id: Option<&str>, now: u64) -> Option<&Snap> {
        self.snapshots.restorable(id, now)
    }

    /// Runs a command on the session and composes what it started or stopped with the sandbox.
    pub fn command(
        &mut self,
        now: u64,
        entropy: &mut dyn Entropy,
        f: impl FnOnce(&mut Session, u64) -> CoreResult<Outcome>,
    ) -> CoreResult<Vec<Effect>> {
        let out = f(&mut self.session, now)?;
        let mut effects = Vec::new();
        self.carry(out, now, entropy, &mut effects);
        Ok(effects)
    }

    /// Runs a person's command: the session decides, then what it started or stopped is
    /// composed with the sandbox (or the echo runner).
    pub fn run(
        &mut self,
        who: &Identity,
        command: Command,
        now: u64,
        entropy: &mut dyn Entropy,
    ) -> CoreResult<(Done, Vec<Effect>)> {
        let s = &mut self.session;
        let mut done = Done::Applied;
        let mut warm = false;
        let mut egress = None;
        let out = match command {
            Command::Join { invite } => {
                let out = s.join(who, &invite, now)?;
                done = Done::Joined {
                    new: !out.events.is_empty(),
                };
                out
            }
            Command::Leave => s.leave(who)?,
            Command::RemoveMember { user } => s.remove_member(who, &user)?,
            Command::RotateInvite => s.rotate_invite(who, entropy.token())?,
            Command::End => s.end(who, now)?,
            Command::SetEgress { allow } => {
                let out = s.set_egress(who, &allow)?;
                egress = Some(allow);
                out
            }
            Command::Connect { client, kind } => s.connect(who, &client, &kind, now)?,
            Command::Disconnect { client } => s.disconnect(&client),
            Command::Heartbeat { client } => s.heartbeat(who, &client, now)?,
            Command::Cursor { client, cursor } => s.set_cursor(who, &client, cursor, now)?,
            Command::Typing { client, typing } => {
                warm = typing;
                s.set_typing(who, &client, typing, now)?
            }
            Command::Submit(submission) => {
                if self.sandboxes && s.meta.repository.is_none() {
                    return Err(CoreError::NoRepository);
                }
                let (submitted, out) = s.submit_prompt(who, submission, now)?;
                done = Done::Submitted(submitted);
                out
            }
            Command::Cancel { prompt } => s.cancel_prompt(who, &prompt, now)?,
            Command::Reprioritize { prompt, priority } => {
                s.reprioritize_prompt(who, &prompt, priority)?
            }
            Command::Stop => {
                let out = s.stop_prompt(who, now)?;
                done = Done::Stopped(out.abort.clone());
                out
            }
            Command::Lock { resource, ttl_ms } => s.acquire_lock(who, &resource, ttl_ms, now)?,
            Command::Unlock { resource } => s.release_lock(who, &resource)?,
            Command::BackgroundChild {
                id,
                status,
                session,
                title,
                branch,
            } => s.background_child(id, status, session, title, branch),
            Command::PullRequest { repository, pull } => s.pull_request(&repository, &pull),
            Command::PullRequestAction(action) => s.pull_request_action(action),
            Command::PullRequestReview(kind) => s.pull_request_review(kind),
            Command::BackgroundCancel => {
                let owner = s.members.get(&s.meta.owner).map(|m| Identity {
                    user: m.user.clone(),
                    name: m.name.clone(),
                    email: m.email.clone(),
                });
                owner
                    .and_then(|owner| s.stop_prompt(&owner, now).ok())
                    .unwrap_or_default()
            }
        };
        let mut effects = Vec::new();
        self.carry(out, now, entropy, &mut effects);
        if warm {
            self.warm_up(now, entropy, &mut effects);
        }
        self.track_idle(now, warm);
        if let Some(allow) = egress {
            // Stored for a later sandbox's start; a live sandbox gets the new list at once.
            effects.push(Effect::SaveEgress(allow.clone()));
            if let Some(sandbox) = self.live_sandbox() {
                effects.push(Effect::ApplyEgress {
                    sandbox: sandbox.to_string(),
                    allow,
                });
            }
        }
        Ok((done, effects))
    }

    /// The object woke with these people's sockets still open: everyone else recorded as
    /// present left while it was away (their process restarted).
    pub fn woke(&mut self, live: &BTreeSet<ClientId>) -> Vec<Effect> {
        let gone: Vec<ClientId> = self
            .session
            .clients
            .keys()
            .filter(|client| !live.contains(*client))
            .cloned()
            .collect();
        for client in &gone {
            self.session.disconnect(client);
        }
        let dirty = self.session.take_dirty();
        if dirty.is_empty() {
            return Vec::new();
        }
        vec![Effect::Store {
            dirty,
            events: Vec::new(),
        }]
    }

    /// Handles one input.
    pub fn handle(&mut self, input: Input, now: u64, entropy: &mut dyn Entropy) -> Vec<Effect> {
        let mut fx = Vec::new();
        let typing = input == Input::Typing;
        match input {
            Input::SandboxConnected => self.connected(now, &mut fx),
            Input::SandboxFrame { link, message } => {
                self.frame(&link, message, now, entropy, &mut fx)
            }
            Input::SandboxClosed { link } => {
                if let Some(l) = self.link.as_mut().filter(|l| l.token_hash == link) {
                    l.disconnected_at = Some(now);
                    fx.push(Effect::SaveLink);
                }
            }
            Input::Spawned { link, answer } => self.spawned(&link, answer, now, entropy, &mut fx),
            Input::Started { sandbox, ok } => self.started(&sandbox, ok, now, entropy, &mut fx),
            Input::Polled { sandbox, answer } => {
                self.polled(&sandbox, answer, now, entropy, &mut fx)
            }
            Input::SnapshotTaken {
                turn,
                id,
                expires_at,
            } => {
                self.snapshot_in_flight = false;
                self.snapshots.taken(turn, &id, now, expires_at);
                // A turn that ended while this one was copied is snapshotted next.
                self.snapshots.near_limit();
                fx.push(Effect::SaveSnapshots);
            }
            Input::SnapshotNotTaken { turn } => {
                self.snapshot_in_flight = false;
                self.snapshots.not_taken(turn);
                fx.push(Effect::SaveSnapshots);
            }
            Input::SnapshotsDeleted { ids } => {
                self.deleting = false;
                self.snapshots.deleted(&ids);
                fx.push(Effect::SaveSnapshots);
            }
            Input::SnapshotsLost { ids } => {
                for id in &ids {
                    self.snapshots.forget(id);
                }
                fx.push(Effect::SaveSnapshots);
            }
            Input::Typing => self.warm_up(now, entropy, &mut fx),
            Input::Alarm => self.alarm(now, entropy, &mut fx),
        }
        self.track_idle(now, typing);
        fx
    }

    /// Notes whether the live sandbox has work: none since `now` if it had some (or someone
    /// is typing).
    fn track_idle(&mut self, now: u64, typing: bool) {
        if self.idle_ms.is_none() {
            return;
        }
        let working = self.session.queue.running.is_some();
        let live = self.link.as_ref().is_some_and(|l| l.stage.is_live());
        if working || !live {
            self.idle_since = None;
        } else if typing || self.idle_since.is_none() {
            self.idle_since = Some(now);
        }
    }

    /// Snapshots `sandbox`'s work before it goes away (unless a snapshot is being taken right
    /// now: it holds the same work).
    fn snapshot_work(&mut self, sandbox: &str, fx: &mut Vec<Effect>) {
        if let (false, Some(turn)) = (self.snapshot_in_flight, self.snapshots.requested()) {
            self.snapshot_in_flight = true;
            fx.push(Effect::SaveSnapshots);
            fx.push(Effect::TakeSnapshot {
                sandbox: Some(sandbox.to_string()),
                turn,
            });
        }
    }

    /// A live sandbox idle for `idle_ms`: its work is snapshotted, then it is stopped (its disk
    /// kept); the next prompt starts it again.
    fn idle_stop(&mut self, now: u64, entropy: &mut dyn Entropy, fx: &mut Vec<Effect>) {
        let (Some(idle_ms), Some(since)) = (self.idle_ms, self.idle_since) else {
            return;
        };
        if since.saturating_add(idle_ms) > now || self.session.queue.running.is_some() {
            return;
        }
        let Some(sandbox) = self.live_sandbox().map(str::to_string) else {
            return;
        };
        self.snapshot_work(&sandbox, fx);
        let idle = match idle_ms {
            ms if ms < 120_000 => format!("{} s", ms.div_ceil(1000)),
            ms => format!("{} min", ms.div_ceil(60_000)),
        };
        let detail = format!(
            "the sandbox had nothing to do for {idle}: its work was snapshotted and it was stopped; the next prompt starts it again"
        );
        // Stopped at the provider before its socket is closed: a supervisor that exits on its
        // own first would be seen by the provider as having died.
        fx.push(Effect::StopSandbox { sandbox });
        self.retire(Stage::Stopped, "stopped", detail, None, now, entropy, fx);
        self.idle_since = None;
    }

    /// May a sandbox holding `token` use the session's sandbox routes (dial in, call tools)? Only
    /// the live sandbox's token opens anything; a retired sandbox's token opens nothing.
    pub fn admit(&self, token: &str) -> CoreResult<String> {
        let l = self.link.as_ref().ok_or(CoreError::NoSandbox)?;
        if token.is_empty() || !token_matches(token, &l.token_hash) {
            return Err(CoreError::BadSandboxToken);
        }
        if !l.stage.is_live() {
            return Err(CoreError::SandboxRetired);
        }
        Ok(l.token_hash.clone())
    }

    /// `POST /sandbox`: a new sandbox unless the session has a live one (the caller answers
    /// with it) or one on its way.
    pub fn ensure(&mut self, now: u64, entropy: &mut dyn Entropy) -> CoreResult<Vec<Effect>> {
        if let Some(sandbox) = self.live_sandbox() {
            let sandbox = sandbox.to_string();
            return Ok(vec![Effect::Describe { sandbox }]);
        }
        if let Some(l) = &self.link {
            if l.stage == Stage::Spawning {
                return Err(CoreError::SandboxSpawning("list it in a moment"));
            }
        }
        let mut fx = Vec::new();
        self.spawn(None, now, entropy, &mut fx)?;
        Ok(fx)
    }

    /// `POST /sandbox/restore` of `snapshot` (checked live by the caller): the current sandbox is
    /// retired and terminated, and a new one restores the snapshot.
    pub fn restore(
        &mut self,
        who: &str,
        snapshot: &str,
        now: u64,
        entropy: &mut dyn Entropy,
    ) -> CoreResult<Vec<Effect>> {
        self.check_restore()?;
        let mut fx = Vec::new();
        if let Some(l) = self.link.clone() {
            let detail = format!("{who} restored snapshot {snapshot}; this sandbox is retired");
            self.retire(
                Stage::None,
                "terminated",
                detail,
                None,
                now,
                entropy,
                &mut fx,
            );
            if let Some(id) = l.sandbox {
                fx.push(Effect::Terminate { sandbox: id });
            }
        }
        self.spawn(Some(snapshot.to_string()), now, entropy, &mut fx)?;
        Ok(fx)
    }

    /// What refuses a restore, checked before anything (the provider included) is asked.
    pub fn check_restore(&self) -> CoreResult<()> {
        if self.session.queue.running.is_some() {
            return Err(CoreError::PromptRunning);
        }
        if self
            .link
            .as_ref()
            .is_some_and(|l| l.stage == Stage::Spawning)
        {
            return Err(CoreError::SandboxSpawning("restore once it is ready"));
        }
        Ok(())
    }

    /// A member stops, terminates or starts one of the session's sandboxes through the sandbox
    /// API: stop and terminate of the session's own sandbox retire it first.
    pub fn authorize(
        &mut self,
        who: &str,
        sandbox: Option<&str>,
        op: SandboxOp,
        now: u64,
        entropy: &mut dyn Entropy,
    ) -> Vec<Effect> {
        let mut fx = Vec::new();
        let Some(l) = self.link.as_mut() else {
            return fx;
        };
        if sandbox.is_none() || l.sandbox.as_deref() != sandbox {
            return fx;
        }
        let (stage, what) = match op {
            SandboxOp::Stop => (Stage::Stopped, "stopped"),
            SandboxOp::Terminate => (Stage::None, "terminated"),
            SandboxOp::Start => {
                if l.stage == Stage::Stopped {
                    l.stage = Stage::Spawning;
                    l.last_seen = now;
                    l.disconnected_at = None;
                    fx.push(Effect::SaveLink);
                }
                return fx;
            }
            SandboxOp::Other => return fx,
        };
        let detail = format!("{who} {what} the sandbox");
        let reason = format!("sandbox_{what}: {who} {what} the sandbox while this prompt ran");
        self.retire(stage, what, detail, Some(reason), now, entropy, &mut fx);
        // The provider's stop (or terminate), asked next, ends the supervisor and its socket:
        // closing the socket first would make a supervisor that exits on the close look as if
        // it had died before the provider recorded the stop.
        fx.retain(|e| !matches!(e, Effect::CloseSandbox(CloseCode::Retired)));
        fx
    }

    /// The provider's id of the session's live sandbox, if it has one.
    pub fn live_sandbox(&self) -> Option<&str> {
        self.link
            .as_ref()
            .filter(|l| l.stage.is_live())
            .and_then(|l| l.sandbox.as_deref())
    }

    /// The running prompt as its sandbox receives it.
    pub fn prompt_frame(&self, id: &str) -> Option<DownFrame> {
        let s = &self.session;
        let p = s.queue.prompts.get(id)?;
        let email = s
            .members
            .get(&p.author)
            .and_then(|m| m.email.clone())
            .unwrap_or_else(|| format!("{}@users.nightshift.local", p.author));
        Some(DownFrame::Prompt {
            prompt: PromptFrame {
                id: p.id.clone(),
                text: p.text.clone(),
                author_name: p.author_name.clone(),
                author_email: email,
                model: p.model.clone().or_else(|| s.meta.model.clone()),
            },
        })
    }

    /// The author of the running prompt, for whom the sandbox's tools act.
    pub fn running_author(&self) -> Option<Identity> {
        let s = &self.session;
        let p = s
            .queue
            .running
            .as_ref()
            .and_then(|p| s.queue.prompts.get(p))?;
        Some(Identity {
            user: p.author.clone(),
            name: p.author_name.clone(),
            email: s.members.get(&p.author).and_then(|m| m.email.clone()),
        })
    }

    /// Takes the pending presence changes (for one `presence.delta` frame).
    pub fn take_presence(&mut self) -> BTreeSet<ClientId> {
        self.presence_since = None;
        std::mem::take(&mut self.presence)
    }

    /// The earliest time the alarm must ring: sweeps and lock expiry, the presence batch, the
    /// sandbox's heartbeat, grace and spawn poll, and a spawn's retry after a failure.
    pub fn next_deadline(&self) -> Option<u64> {
        let mut next = self.session.next_deadline();
        let mut at = |t: u64| next = Some(next.map_or(t, |n: u64| n.min(t)));
        if let Some(due) = self.jobs.values().min() {
            at(*due);
        }
        if let (Some(idle_ms), Some(since), true) = (self.idle_ms, self.idle_since, self.sandboxes)
        {
            at(since.saturating_add(idle_ms));
        }
        if let Some(since) = self.presence_since {
            at(since + presence_batch_ms(self.session.clients.len()));
        }
        if let Some(l) = &self.link {
            if let Some(t) = l.deadline(self.timing.heartbeat_timeout_ms, self.timing.grace_ms) {
                at(t);
            }
            if let (Some(t), true) = (l.retry_at, self.waiting_for_retry()) {
                at(t);
            }
        }
        if self.sandboxes {
            let s = &self.snapshots;
            if let Some(t) = s.next_expiry() {
                at(t);
            }
            // Owed work is due at once (0: as soon as the alarm can ring).
            if (s.taking.is_some() && !self.snapshot_in_flight)
                || (!s.to_delete.is_empty() && !self.deleting)
            {
                at(0);
            }
            let live = self.link.as_ref().filter(|l| l.stage.is_live());
            if let Some(end) = live.and_then(|l| l.expires_at) {
                if !s.holds_current() {
                    at(end.saturating_sub(self.snapshot_margin_ms));
                }
            }
        }
        next
    }

    // ---- composition ------------------------------------------------------------------

    /// Turns a session outcome into effects: store, close removed clients, then hand a started
    /// prompt to the sandbox (or runner) and tell it about a stopped one.
    fn carry(&mut self, out: Outcome, now: u64, entropy: &mut dyn Entropy, fx: &mut Vec<Effect>) {
        let ended = out
            .events
            .iter()
            .any(|(_, kind)| matches!(kind, EventKind::SessionEnded));
        let dirty = self.session.take_dirty();
        if out.presence_changed {
            for d in &dirty {
                if let Dirty::Client(c) = d {
                    self.presence.insert(c.clone());
                }
            }
            if !self.presence.is_empty() && self.presence_since.is_none() {
                self.presence_since = Some(now);
            }
        }
        if !dirty.is_empty() || !out.events.is_empty() {
            fx.push(Effect::Store {
                dirty,
                events: out.events,
            });
        }
        if !out.disconnect.is_empty() {
            fx.push(Effect::Disconnect(out.disconnect));
        }
        if let Some(id) = out.abort {
            if self.sandboxes {
                fx.push(Effect::ToSandbox(DownFrame::Stop { prompt: id }));
            } else if self.jobs.remove(&id).is_some() {
                fx.push(Effect::SaveRunnerJob {
                    prompt: id,
                    due: None,
                });
            }
        }
        if let Some(id) = out.start {
            if self.sandboxes {
                self.dispatch(&id, now, entropy, fx);
            } else if let Some(run_ms) = self.echo_ms {
                let due = now.saturating_add(run_ms);
                self.jobs.insert(id.clone(), due);
                fx.push(Effect::SaveRunnerJob {
                    prompt: id,
                    due: Some(due),
                });
            }
        }
        if ended {
            self.end_sandbox(now, entropy, fx);
            fx.push(Effect::Ended {
                members: self.session.members.keys().cloned().collect(),
            });
        }
    }

    /// The session ended: its sandbox's work is snapshotted, then the sandbox is terminated.
    fn end_sandbox(&mut self, now: u64, entropy: &mut dyn Entropy, fx: &mut Vec<Effect>) {
        let Some(l) = self.link.as_mut() else {
            return;
        };
        if !(l.stage.is_live() || l.stage == Stage::Stopped) {
            return;
        }
        // A sandbox still being created is terminated when the provider answers (`spawned`).
        let sandbox = l.sandbox.clone();
        l.stage = Stage::None;
        fx.push(Effect::SaveLink);
        fx.push(Effect::CloseSandbox(CloseCode::Retired));
        let detail =
            "the session ended: the sandbox's work was snapshotted and the sandbox terminated";
        self.status("terminated", detail.into(), now, entropy, fx);
        if let Some(sandbox) = sandbox {
            self.snapshot_work(&sandbox, fx);
            fx.push(Effect::Terminate { sandbox });
        }
    }

    /// Hands the running prompt `id` to the session's sandbox: the live one, the stopped one
    /// started again, or a new one. After a failed spawn it waits for the retry time.
    fn dispatch(&mut self, id: &str, now: u64, entropy: &mut dyn Entropy, fx: &mut Vec<Effect>) {
        if let Some(l) = &self.link {
            if l.stage == Stage::Stopped {
                if let Some(sandbox) = l.sandbox.clone() {
                    fx.push(Effect::StartStopped { sandbox });
                    return;
                }
            }
            if l.stage.is_live() {
                // Not connected yet: the prompt is sent when the sandbox dials in.
                if let Some(frame) = self.prompt_frame(id) {
                    fx.push(Effect::ToSandbox(frame));
                }
                return;
            }
            if l.stage == Stage::Failed && l.retry_at.is_some_and(|t| now < t) {
                // The alarm retries at `retry_at`.
                return;
            }
        }
        // A refusal (no repository) has already failed the prompt.
        let _ = self.spawn(None, now, entropy, fx);
    }

    /// Starts a new link and asks the provider for its sandbox (`snapshot`: restore exactly that).
    fn spawn(
        &mut self,
        snapshot: Option<String>,
        now: u64,
        entropy: &mut dyn Entropy,
        fx: &mut Vec<Effect>,
    ) -> CoreResult<()> {
        if self.session.meta.repository.is_none() {
            self.fail_running(
                "no_repository: this session has no repository to work in",
                now,
                entropy,
                fx,
            );
            return Err(CoreError::NoRepository);
        }
        let token = entropy.token();
        let failures = self.link.as_ref().map_or(0, |l| l.failures);
        let mut link = SandboxLink::spawning(sha256_hex(token.as_bytes()), now);
        link.failures = failures;
        self.link = Some(link);
        fx.push(Effect::SaveLink);
        self.status(
            "spawning",
            "asking the provider for a sandbox".into(),
            now,
            entropy,
            fx,
        );
        fx.push(Effect::Spawn { token, snapshot });
        Ok(())
    }

    fn spawned(
        &mut self,
        link: &str,
        answer: SpawnAnswer,
        now: u64,
        entropy: &mut dyn Entropy,
        fx: &mut Vec<Effect>,
    ) {
        let Some(l) = self.link.as_mut().filter(|l| l.token_hash == link) else {
            return;
        };
        match answer {
            SpawnAnswer::Created {
                sandbox,
                expires_at,
                how,
            } => {
                if !l.stage.is_live() {
                    // Retired while the provider created it (ended, restored over, failed).
                    fx.push(Effect::Terminate { sandbox });
                    return;
                }
                // The sandbox may already have dialled in and moved the link on: keep its progress.
                l.sandbox = Some(sandbox);
                l.expires_at = expires_at;
                fx.push(Effect::SaveLink);
                self.status("spawning", how, now, entropy, fx);
            }
            SpawnAnswer::Failed { message } => self.failed(&message, now, entropy, fx),
        }
    }

    /// The link's sandbox could not start: the running prompt fails with the reason, and the
    /// next spawn waits a while (so one provider fault fails one prompt, not the whole queue).
    fn failed(&mut self, message: &str, now: u64, entropy: &mut dyn Entropy, fx: &mut Vec<Effect>) {
        let Some(l) = self.link.as_mut() else {
            return;
        };
        l.stage = Stage::Failed;
        l.failures = l.failures.saturating_add(1);
        let wait = FIRST_RETRY_MS
            .saturating_mul(1 << l.failures.saturating_sub(1).min(16))
            .min(MAX_RETRY_MS);
        l.retry_at = Some(now + wait);
        let sandbox = l.sandbox.clone();
        fx.push(Effect::SaveLink);
        // A sandbox that could not start is of no more use; its resources go back.
        fx.push(match sandbox {
            Some(sandbox) => Effect::Terminate { sandbox },
            None => Effect::SweepSandboxes,
        });
        self.status("failed", message.to_string(), now, entropy, fx);
        self.fail_running(&format!("sandbox_failed: {message}"), now, entropy, fx);
    }

    fn started(
        &mut self,
        sandbox: &str,
        ok: bool,
        now: u64,
        entropy: &mut dyn Entropy,
        fx: &mut Vec<Effect>,
    ) {
        let Some(l) = self
            .link
            .as_mut()
            .filter(|l| l.stage == Stage::Stopped && l.sandbox.as_deref() == Some(sandbox))
        else {
            return;
        };
        if ok {
            l.stage = Stage::Spawning;
            l.last_seen = now;
            l.disconnected_at = None;
            fx.push(Effect::SaveLink);
            self.status(
                "starting",
                "starting the stopped sandbox again".into(),
                now,
                entropy,
                fx,
            );
        } else if let Some(id) = self.session.queue.running.clone() {
            // Gone at the provider: a new sandbox for the running prompt.
            l.stage = Stage::None;
            fx.push(Effect::SaveLink);
            self.dispatch(&id, now, entropy, fx);
        }
    }

    fn polled(
        &mut self,
        sandbox: &str,
        answer: PollAnswer,
        now: u64,
        entropy: &mut dyn Entropy,
        fx: &mut Vec<Effect>,
    ) {
        // The sandbox may have dialled in while the provider answered.
        let spawning = self
            .link
            .as_ref()
            .is_some_and(|l| l.stage == Stage::Spawning && l.sandbox.as_deref() == Some(sandbox));
        if !spawning {
            return;
        }
        match answer {
            PollAnswer::Failed { code, message } => {
                let msg = format!("the provider could not start the sandbox: {code}: {message}");
                self.failed(&msg, now, entropy, fx);
            }
            PollAnswer::Gone => self.failed(
                "the provider no longer knows this sandbox",
                now,
                entropy,
                fx,
            ),
            PollAnswer::Pending => {}
        }
    }

    fn connected(&mut self, now: u64, fx: &mut Vec<Effect>) {
        let Some(l) = self.link.as_mut() else {
            return;
        };
        l.disconnected_at = None;
        l.last_seen = now;
        let last_n = l.last_n;
        fx.push(Effect::SaveLink);
        fx.push(Effect::ToSandbox(DownFrame::Welcome { last_n }));
        if let Some(frame) = self
            .session
            .queue
            .running
            .clone()
            .and_then(|id| self.prompt_frame(&id))
        {
            fx.push(Effect::ToSandbox(frame));
        }
    }

    /// One frame from a sandbox socket: refused unless it is the live link's; events are stored
    /// in order, then acknowledged.
    fn frame(
        &mut self,
        link: &str,
        message: SandboxMessage,
        now: u64,
        entropy: &mut dyn Entropy,
        fx: &mut Vec<Effect>,
    ) {
        let live = self
            .link
            .as_ref()
            .is_some_and(|l| l.token_hash == link && l.stage.is_live());
        if !live {
            fx.push(Effect::Refuse {
                link: link.to_string(),
            });
            return;
        }
        let running = self.session.queue.running.clone();
        let Some(l) = self.link.as_mut() else {
            return;
        };
        l.last_seen = now;
        let batch = match message {
            SandboxMessage::Hello { sandbox } => {
                if l.sandbox.is_none() {
                    l.sandbox = Some(sandbox);
                }
                fx.push(Effect::SaveLink);
                return;
            }
            SandboxMessage::Heartbeat => {
                fx.push(Effect::SaveLink);
                return;
            }
            SandboxMessage::Events(batch) => batch,
        };
        let intake = l.intake(batch);
        let mut accepted = intake.accepted;
        let mut flooded = None;
        if let Some(id) = &running {
            if accepted.iter().any(|e| e.prompt() == Some(id.as_str())) {
                if l.working_on.as_deref() != Some(id.as_str()) {
                    l.prompt_events = 0;
                    l.prompt_bytes = 0;
                }
                l.working_on = Some(id.clone());
                l.handovers = 0;
            }
            // The running prompt's output counts against its limit; past it, the rest of the
            // batch's output for it is acknowledged and dropped, and the prompt is stopped.
            let limit = self.event_limit;
            let mut kept = Vec::with_capacity(accepted.len());
            for e in accepted {
                if e.prompt() != Some(id.as_str()) || matches!(e, AgentEvent::Done { .. }) {
                    kept.push(e);
                    continue;
                }
                let size = serde_json::to_vec(&e).map_or(0, |v| v.len() as u64);
                if flooded.is_none()
                    && (l.prompt_events >= limit.events || l.prompt_bytes + size > limit.bytes)
                {
                    flooded = Some(id.clone());
                }
                if flooded.is_none() {
                    l.prompt_events += 1;
                    l.prompt_bytes += size;
                    kept.push(e);
                }
            }
            accepted = kept;
        }
        let turn_ended = accepted
            .iter()
            .any(|e| matches!(e, AgentEvent::Done { .. }));
        let pushed = accepted.iter().find_map(|e| match e {
            AgentEvent::Done {
                branch: Some(b), ..
            } => Some(b.clone()),
            _ => None,
        });
        l.last_n = intake.last_n;
        if let Some(stage) = intake.stage {
            l.stage = stage;
            if stage == Stage::Ready {
                l.failures = 0;
                l.retry_at = None;
            }
        }
        let stage = l.stage;
        let last_n = l.last_n;
        if !accepted.is_empty() {
            // Output of a prompt that is no longer running is skipped by the session.
            let out = self.session.agent_events(accepted, now);
            self.carry(out, now, entropy, fx);
        }
        fx.push(Effect::SaveLink);
        fx.push(Effect::ToSandbox(DownFrame::Ack { n: last_n }));
        if let Some(b) = pushed {
            fx.push(Effect::RememberBranch(b));
        }
        if turn_ended {
            // Taken by the alarm (a deadline of now), so the acknowledgement never waits.
            self.snapshots.turn_ended();
            fx.push(Effect::SaveSnapshots);
        }
        if let Some(id) = flooded {
            let limit = self.event_limit;
            let message = format!(
                "the agent sent more than {} events or {} bytes for this prompt; it was stopped so the session stays usable — split the task into smaller prompts",
                limit.events, limit.bytes
            );
            let error = AgentEvent::Error {
                prompt: id.clone(),
                message,
            };
            if let Ok(out) = self.session.agent_event(error, now) {
                self.carry(out, now, entropy, fx);
            }
            fx.push(Effect::ToSandbox(DownFrame::Stop { prompt: id }));
            self.fail_running(
                "event_limit: the agent's output for this prompt passed the session's limit",
                now,
                entropy,
                fx,
            );
        }
        if stage == Stage::Failed {
            if let Some(sandbox) = self.link.as_ref().and_then(|l| l.sandbox.clone()) {
                fx.push(Effect::Terminate { sandbox });
            }
            self.fail_running(
                "sandbox_failed: the sandbox could not start the agent; see its logs",
                now,
                entropy,
                fx,
            );
        }
        if let Some((got, expected)) = intake.gap {
            let refusal = CoreError::OutOfOrder { got, expected };
            fx.push(Effect::ToSandbox(DownFrame::Error {
                error: DownError {
                    code: refusal.code().into(),
                    message: refusal.to_string(),
                },
            }));
            fx.push(Effect::CloseSandbox(CloseCode::OutOfOrder));
        }
    }

    /// Someone is typing: a sandbox for the prompt to come, unless the session has one (live or
    /// stopped), has no repository, or its last spawn failed (no new spawn until someone acts).
    fn warm_up(&mut self, now: u64, entropy: &mut dyn Entropy, fx: &mut Vec<Effect>) {
        if !self.sandboxes || self.session.meta.repository.is_none() {
            return;
        }
        let has = self.link.as_ref().is_some_and(|l| {
            l.stage.is_live() || l.stage == Stage::Stopped || l.stage == Stage::Failed
        });
        if !has {
            let _ = self.spawn(None, now, entropy, fx);
        }
    }

    /// The alarm: sweeps, the sandbox's liveness, and a spawn's retry.
    fn alarm(&mut self, now: u64, entropy: &mut dyn Entropy, fx: &mut Vec<Effect>) {
        self.echo_due(now, entropy, fx);
        self.check_link(now, entropy, fx);
        if self.waiting_for_retry()
            && self
                .link
                .as_ref()
                .and_then(|l| l.retry_at)
                .is_some_and(|t| t <= now)
        {
            if let Some(id) = self.session.queue.running.clone() {
                self.dispatch(&id, now, entropy, fx);
            }
        }
        let out = self.session.sweep(now);
        self.carry(out, now, entropy, fx);
        if self.sandboxes {
            self.snapshot_upkeep(now, fx);
            self.idle_stop(now, entropy, fx);
        }
    }

    /// The echo runner answers the prompts whose time has come (a clearly labelled local
    /// stand-in for compute: `echo: <prompt>`).
    fn echo_due(&mut self, now: u64, entropy: &mut dyn Entropy, fx: &mut Vec<Effect>) {
        let due: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(prompt, _)| prompt.clone())
            .collect();
        for prompt in due {
            self.jobs.remove(&prompt);
            fx.push(Effect::SaveRunnerJob {
                prompt: prompt.clone(),
                due: None,
            });
            let Some(text) = self
                .session
                .queue
                .prompts
                .get(&prompt)
                .map(|p| p.text.clone())
            else {
                continue;
            };
            let answered = self
                .session
                .agent_text(&prompt, format!("echo: {text}"))
                .and_then(|mut out| {
                    let fin = self.session.finish_prompt(&prompt, true, None, now)?;
                    out.events.extend(fin.events);
                    out.start = fin.start;
                    Ok(out)
                });
            // A prompt stopped meanwhile has nothing to answer.
            if let Ok(out) = answered {
                self.carry(out, now, entropy, fx);
            }
        }
    }

    /// Takes an owed snapshot (a turn, or the sandbox nearing its lifetime), drops expired
    /// ones and deletes what was dropped at the provider.
    fn snapshot_upkeep(&mut self, now: u64, fx: &mut Vec<Effect>) {
        let before = self.snapshots.clone();
        self.snapshots.expire(now);
        let live = self
            .link
            .as_ref()
            .filter(|l| l.stage.is_live())
            .map(|l| (l.sandbox.clone(), l.expires_at));
        if let Some((_, Some(end))) = &live {
            if end.saturating_sub(self.snapshot_margin_ms) <= now {
                self.snapshots.near_limit();
            }
        }
        if let (Some(turn), false) = (self.snapshots.taking, self.snapshot_in_flight) {
            match live.and_then(|(sandbox, _)| sandbox) {
                Some(sandbox) => {
                    self.snapshot_in_flight = true;
                    fx.push(Effect::TakeSnapshot {
                        sandbox: Some(sandbox),
                        turn,
                    });
                }
                // The sandbox that did the turn is gone: nothing holds its work to copy.
                None => self.snapshots.not_taken(turn),
            }
        }
        if self.snapshots != before {
            fx.push(Effect::SaveSnapshots);
        }
        if !self.snapshots.to_delete.is_empty() && !self.deleting {
            self.deleting = true;
            fx.push(Effect::DeleteSnapshots {
                ids: self.snapshots.to_delete.clone(),
            });
        }
    }

    /// A running prompt waits for a spawn's retry (its last spawn failed).
    fn waiting_for_retry(&self) -> bool {
        self.sandboxes
            && self.session.queue.running.is_some()
            && self.link.as_ref().is_some_and(|l| l.stage == Stage::Failed)
    }

    fn check_link(&mut self, now: u64, entropy: &mut dyn Entropy, fx: &mut Vec<Effect>) {
        let timing = self.timing;
        let Some(l) = self.link.as_mut() else {
            return;
        };
        if l.needs_spawn_poll(now) {
            if l.spawn_timed_out(now) {
                self.failed(
                    "the sandbox did not start within 3 minutes",
                    now,
                    entropy,
                    fx,
                );
                return;
            }
            // Asked again a poll interval from now, whatever the provider answers (or not).
            l.last_seen = now;
            fx.push(Effect::SaveLink);
            if let Some(sandbox) = l.sandbox.clone() {
                fx.push(Effect::Poll { sandbox });
            }
            return;
        }
        if !l.is_lost(now, timing.heartbeat_timeout_ms, timing.grace_ms) {
            return;
        }
        l.stage = Stage::Lost;
        let sandbox = l.sandbox.clone();
        let working_on = l.working_on.clone();
        let handovers = l.handovers;
        fx.push(Effect::SaveLink);
        fx.push(Effect::CloseSandbox(CloseCode::Lost));
        let running = self.session.queue.running.clone();
        match running {
            // The sandbox never started it: the next sandbox runs it.
            Some(id) if working_on.as_deref() != Some(id.as_str()) && handovers < MAX_HANDOVERS => {
                let detail = format!(
                    "the sandbox stopped responding before it started prompt {id}; a new sandbox runs it"
                );
                self.status("lost", detail, now, entropy, fx);
                if let Some(sandbox) = sandbox {
                    fx.push(Effect::Terminate { sandbox });
                }
                self.dispatch(&id, now, entropy, fx);
                if let Some(l) = self.link.as_mut() {
                    l.handovers = handovers + 1;
                }
            }
            _ => {
                let detail =
                    "the sandbox stopped responding; the next prompt gets a new sandbox".into();
                self.status("lost", detail, now, entropy, fx);
                self.fail_running(
                    "sandbox_lost: the sandbox stopped while this prompt ran; send it again to retry",
                    now,
                    entropy,
                    fx,
                );
                if let Some(sandbox) = sandbox {
                    fx.push(Effect::Terminate { sandbox });
                }
            }
        }
    }

    /// Retires the session's sandbox (`stage` is `Stopped` or `None`): its socket is refused, the
    /// session says so (`what`), and a running prompt fails with `reason`.
    #[allow(clippy::too_many_arguments)]
    fn retire(
        &mut self,
        stage: Stage,
        what: &str,
        detail: String,
        reason: Option<String>,
        now: u64,
        entropy: &mut dyn Entropy,
        fx: &mut Vec<Effect>,
    ) {
        let Some(l) = self.link.as_mut() else {
            return;
        };
        if l.stage.is_live() {
            l.stage = stage;
            fx.push(Effect::SaveLink);
            fx.push(Effect::CloseSandbox(CloseCode::Retired));
            self.status(what, detail, now, entropy, fx);
            if let Some(reason) = reason {
                self.fail_running(&reason, now, entropy, fx);
            }
        } else if stage == Stage::None && l.stage == Stage::Stopped {
            l.stage = Stage::None;
            fx.push(Effect::SaveLink);
        }
    }

    /// Ends the running prompt as failed (it is never silently dropped); the next one starts.
    fn fail_running(
        &mut self,
        reason: &str,
        now: u64,
        entropy: &mut dyn Entropy,
        fx: &mut Vec<Effect>,
    ) {
        let Some(id) = self.session.queue.running.clone() else {
            return;
        };
        if let Ok(out) = self
            .session
            .finish_prompt(&id, false, Some(reason.to_string()), now)
        {
            self.carry(out, now, entropy, fx);
        }
    }

    fn status(
        &mut self,
        stage: &str,
        detail: String,
        now: u64,
        entropy: &mut dyn Entropy,
        fx: &mut Vec<Effect>,
    ) {
        let out = self.session.sandbox_status(stage, detail);
        self.carry(out, now, entropy, fx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_are_the_links_4001_to_4005_and_say_whether_to_come_back() {
        let all = [
            (CloseCode::Replaced, 4001, false),
            (CloseCode::OutOfOrder, 4002, false),
            (CloseCode::Refused, 4003, true),
            (CloseCode::Lost, 4004, true),
            (CloseCode::Retired, 4005, true),
        ];
        for (close, code, refusal) in all {
            assert_eq!(close.code(), code);
            assert_eq!(CloseCode::from_code(code), Some(close));
            assert_eq!(close.is_refusal(), refusal, "{close:?}");
            assert_eq!(close.reason().starts_with("refused"), refusal, "{close:?}");
        }
        assert_eq!(CloseCode::from_code(1000), None);
        assert_eq!(CloseCode::from_code(4000), None);
    }

    #[test]
    fn down_frames_keep_their_wire_shape() {
        let frames = [
            (
                DownFrame::Welcome { last_n: 3 },
                r#"{"type":"welcome","last_n":3}"#,
            ),
            (DownFrame::Ack { n: 4 }, r#"{"type":"ack","n":4}"#),
            (
                DownFrame::Stop {
                    prompt: "p1".into(),
                },
                r#"{"type":"stop","prompt":"p1"}"#,
            ),
            (
                DownFrame::Error {
                    error: DownError {
                        code: "out_of_order".into(),
                        message: "m".into(),
                    },
                },
                r#"{"type":"error","error":{"code":"out_of_order","message":"m"}}"#,
            ),
        ];
        for (frame, text) in frames {
            assert_eq!(serde_json::to_string(&frame).ok().as_deref(), Some(text));
            assert_eq!(serde_json::from_str::<DownFrame>(text).ok(), Some(frame));
        }
    }
}
