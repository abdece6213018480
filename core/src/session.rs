//! The session state machine: membership and roles, clients and presence, edit locks, and the prompt queue.
//!
//! Every command checks everything first and mutates only when it succeeds, so a refused
//! command leaves the state exactly as it was. Mutations record which stored rows changed
//! (`take_dirty`) so the shell can persist precisely those rows.
//!
//! State is bounded: the queue keeps the terminal prompts of a window
//! ([`crate::queue::terminal_window`]) and prunes older ones (their rows are named dirty, so the
//! shell deletes them; their events stay in the log).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::error::{CoreError, CoreResult};
use crate::events::{EventKind, LockReleaseReason, PullRequestAction};
use crate::github::{Applied, PrLink, PrState, Pull};
use crate::ids::{Actor, ClientId, Cursor, Identity, Role, UserId};
use crate::queue::{NewPrompt, PromptId, PromptQueue};
use crate::sandbox::AgentEvent;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    Active,
    Ended,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    pub user: UserId,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub role: Role,
    pub joined_at: u64,
}

/// One connected client (a browser tab, the Slack bot, the extension, ...).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Client {
    pub id: ClientId,
    pub user: UserId,
    pub name: String,
    pub kind: String,
    pub color: String,
    pub connected_at: u64,
    pub last_seen: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<Cursor>,
    #[serde(default)]
    pub typing: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lock {
    pub resource: String,
    pub holder: UserId,
    pub acquired_at: u64,
    pub expires_at: u64,
}

/// Configurable limits of one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Limits {
    pub max_clients_per_user: u32,
    pub max_members: u32,
    pub max_queued: u32,
    pub max_lock_ttl_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub max_prompt_bytes: usize,
    /// Live edit locks a session holds at most (sessions stored before this limit get the default).
    #[serde(default = "default_max_locks")]
    pub max_locks: u32,
}

fn default_max_locks() -> u32 {
    Limits::default().max_locks
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_clients_per_user: 8,
            max_members: 200,
            max_queued: 50,
            max_lock_ttl_ms: 10 * 60 * 1000,
            heartbeat_timeout_ms: 60 * 1000,
            max_prompt_bytes: 32 * 1024,
            max_locks: 256,
        }
    }
}

/// Which stored row a mutation touched.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dirty {
    Meta,
    Member(UserId),
    Client(ClientId),
    Lock(String),
    Prompt(PromptId),
}

/// What a successful command produced, for the shell to carry out.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcome {
    /// Durable events, to be stored in order and then broadcast.
    pub events: Vec<(Actor, EventKind)>,
    /// Presence (clients, cursors, typing) changed: broadcast a presence update.
    pub presence_changed: bool,
    /// Clients whose connection must be closed.
    pub disconnect: Vec<ClientId>,
    /// A prompt that became running: hand it to the runner.
    pub start: Option<PromptId>,
    /// A running prompt that was stopped: abort it in the runner.
    pub abort: Option<PromptId>,
}

impl Outcome {
    fn event(&mut self, actor: Actor, kind: EventKind) {
        self.events.push((actor, kind));
    }

    /// Adds a later outcome to this one (events in order; the later start/abort wins).
    pub fn absorb(&mut self, later: Outcome) {
        self.events.extend(later.events);
        self.presence_changed |= later.presence_changed;
        self.disconnect.extend(later.disconnect);
        if later.start.is_some() {
            self.start = later.start;
        }
        if later.abort.is_some() {
            self.abort = later.abort;
        }
    }
}

/// A prompt as its author submits it (`Session::submit_prompt`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptSubmission {
    /// The id it gets if it is new.
    pub id: PromptId,
    pub text: String,
    pub priority: i32,
    pub model: Option<String>,
    /// The author's idempotency key: 1-128 bytes of printable ASCII.
    pub key: Option<String>,
}

/// What a submission did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submitted {
    /// A new prompt was queued.
    Queued(PromptId),
    /// The author's key already named this prompt; nothing changed.
    Existing(PromptId),
}

impl Submitted {
    pub fn id(&self) -> &str {
        match self {
            Submitted::Queued(id) | Submitted::Existing(id) => id,
        }
    }

    pub fn is_new(&self) -> bool {
        matches!(self, Submitted::Queued(_))
    }
}

/// Session metadata that lives in one row.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Meta {
    pub id: String,
    pub title: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    pub owner: UserId,
    pub invite: String,
    pub created_at: u64,
    pub status: SessionStatus,
    pub limits: Limits,
    pub next_arrival: u64,
    /// The session's model; prompts without one use it (None: the deployment's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The session's pull request, as GitHub last said (newer deliveries only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<PrLink>,
    /// When the pull request could not be opened in the person's name: the compare link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request_action: Option<PullRequestAction>,
}

/// A pull request to open for a prompt's pushed work, in the prompting person's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequestDue {
    /// The prompting person (their token opens it).
    pub author: UserId,
    pub branch: String,
    pub title: String,
    pub body: String,
}

/// A pull request title: the prompt's first line, at most this many characters.
pub const PR_TITLE_MAX: usize = 72;
/// The prompt quoted in a pull request body: at most this many characters.
pub const PR_PROMPT_MAX: usize = 2_000;

impl PullRequestDue {
    fn of(
        prompt: &crate::queue::Prompt,
        branch: &str,
        commit: Option<&str>,
        session: &str,
    ) -> Self {
        let first = prompt.text.lines().map(str::trim).find(|l| !l.is_empty());
        let mut title: String = first
            .unwrap_or("Nightshift session work")
            .chars()
            .take(PR_TITLE_MAX)
            .collect();
        if first.is_some_and(|l| l.chars().count() > PR_TITLE_MAX) {
            title.pop();
            title.push('…');
        }
        let quoted: String = prompt.text.chars().take(PR_PROMPT_MAX).collect();
        let more = if prompt.text.chars().count() > PR_PROMPT_MAX {
            "\n>\n> (the prompt continues in the session)"
        } else {
            ""
        };
        let quoted = quoted
            .lines()
            .map(|l| format!("> {l}"))
            .collect::<Vec<_>>()
            .join("\n");
        let commit = commit
            .map(|c| format!(" Latest commit: `{c}`."))
            .unwrap_or_default();
        PullRequestDue {
            author: prompt.author.clone(),
            branch: branch.to_string(),
            title,
            body: format!(
                "Prompted by {} in Nightshift session `{session}`:\n\n{quoted}{more}\n\nThe work is on `{branch}`.{commit}",
                prompt.author_name
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Session {
    pub meta: Meta,
    pub members: BTreeMap<UserId, Member>,
    pub clients: BTreeMap<ClientId, Client>,
    pub locks: BTreeMap<String, Lock>,
    pub queue: PromptQueue,
    dirty: BTreeSet<Dirty>,
    /// Terminal prompts kept, when not the default for the session's limits (tests and model
    /// checks set a small one: [`Session::with_terminal_window`]).
    keep_terminal: Option<usize>,
}

const COLORS: [&str; 12] = [
    "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
    "#800000", "#469990", "#000075", "#808000",
];

/// Most presence entries in the snapshot a socket gets on connect (`total` gives the full count).
pub const PRESENCE_SNAPSHOT_MAX: usize = 32;
/// Most entries of each list in one presence delta (`truncated` and `total` say the rest): a
/// burst in a large session costs each socket a small, bounded frame.
pub const PRESENCE_DELTA_MAX: usize = 16;

/// How long presence changes are coalesced before one delta goes to every socket, for a session
/// with `clients` connected: one millisecond per client, at least 40 ms and at most one second.
/// Every delta is one frame to each socket, so this keeps presence at about 1,000 frames per
/// second per session up to 1,000 clients (a fixed window would grow that with the session),
/// while small sessions still see typing and cursors within 40 ms.
pub fn presence_batch_ms(clients: usize) -> u64 {
    u64::try_from(clients).unwrap_or(u64::MAX).clamp(40, 1000)
}

/// A stable color per user (FNV-1a of the id), so a person looks the same on every client.
pub fn color_for(user: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in user.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    COLORS[(h as usize) % COLORS.len()].to_string()
}

pub const MAX_RESOURCE_LEN: usize = 512;
pub const MAX_TITLE_LEN: usize = 200;

impl Session {
    /// A new session owned by `owner`.
    pub fn create(meta: Meta, owner: &Identity) -> (Session, Outcome) {
        let mut s = Session {
            members: BTreeMap::new(),
            clients: BTreeMap::new(),
            locks: BTreeMap::new(),
            queue: PromptQueue {
                next_arrival: meta.next_arrival,
                ..PromptQueue::default()
            },
            meta,
            dirty: BTreeSet::new(),
            keep_terminal: None,
        };
        let now = s.meta.created_at;
        s.members.insert(
            owner.user.clone(),
            Member {
                user: owner.user.clone(),
                name: owner.name.clone(),
                email: owner.email.clone(),
                role: Role::Owner,
                joined_at: now,
            },
        );
        s.dirty.insert(Dirty::Meta);
        s.dirty.insert(Dirty::Member(owner.user.clone()));
        let mut out = Outcome::default();
        out.event(
            owner.actor(),
            EventKind::SessionCreated {
                title: s.meta.title.clone(),
                repository: s.meta.repository.clone(),
                owner: owner.user.clone(),
            },
        );
        out.event(
            owner.actor(),
            EventKind::MemberJoined {
                user: owner.user.clone(),
                name: owner.name.clone(),
                role: Role::Owner,
            },
        );
        (s, out)
    }

    /// Rebuilds a session from its stored rows. Rows beyond the window of terminal prompts (a
    /// session stored before the window existed) are pruned at once and named dirty, so the
    /// shell's next write deletes them.
    pub fn restore(
        meta: Meta,
        members: Vec<Member>,
        clients: Vec<Client>,
        locks: Vec<Lock>,
        prompts: Vec<crate::queue::Prompt>,
    ) -> Session {
        let running = prompts
            .iter()
            .find(|p| p.status == crate::queue::PromptStatus::Running)
            .map(|p| p.id.clone());
        let mut session = Session {
            queue: PromptQueue {
                next_arrival: meta.next_arrival,
                running,
                prompts: prompts.into_iter().map(|p| (p.id.clone(), p)).collect(),
            },
            meta,
            members: members.into_iter().map(|m| (m.user.clone(), m)).collect(),
            clients: clients.into_iter().map(|c| (c.id.clone(), c)).collect(),
            locks: locks.into_iter().map(|l| (l.resource.clone(), l)).collect(),
            dirty: BTreeSet::new(),
            keep_terminal: None,
        };
        session.prune_terminal();
        session
    }

    /// The same session keeping `window` terminal prompts instead of the default (for tests and
    /// model checks, where the default is out of reach); prunes to it at once.
    pub fn with_terminal_window(mut self, window: usize) -> Session {
        self.keep_terminal = Some(window);
        self.prune_terminal();
        self
    }

    /// How many terminal prompts the queue keeps: [`crate::queue::terminal_window`] of the
    /// session's queue bound, unless set by [`Session::with_terminal_window`].
    pub fn terminal_window(&self) -> usize {
        self.keep_terminal
            .unwrap_or_else(|| crate::queue::terminal_window(self.meta.limits.max_queued))
    }

    /// Drops the terminal prompts beyond the window (their rows become dirty: deleted).
    fn prune_terminal(&mut self) {
        let window = self.terminal_window();
        for id in self.queue.prune_terminal(window) {
            self.dirty.insert(Dirty::Prompt(id));
        }
    }

    /// Rows changed since the last call.
    pub fn take_dirty(&mut self) -> Vec<Dirty> {
        std::mem::take(&mut self.dirty).into_iter().collect()
    }

    pub fn is_member(&self, user: &str) -> bool {
        self.members.contains_key(user)
    }

    pub fn is_owner(&self, user: &str) -> bool {
        self.members
            .get(user)
            .is_some_and(|m| m.role == Role::Owner)
    }

    fn require_active(&self) -> CoreResult<()> {
        if self.meta.status == SessionStatus::Ended {
            return Err(CoreError::SessionEnded);
        }
        Ok(())
    }

    fn require_member(&self, user: &str) -> CoreResult<()> {
        if self.is_member(user) {
            Ok(())
        } else {
            Err(CoreError::NotMember)
        }
    }

    fn require_client_of(&self, user: &str, client: &str) -> CoreResult<()> {
        match self.clients.get(client) {
            None => Err(CoreError::UnknownClient(client.to_string())),
            Some(c) if c.user != user => Err(CoreError::NotYourClient(client.to_string())),
            Some(_) => Ok(()),
        }
    }

    pub fn clients_of(&self, user: &str) -> usize {
        self.clients.values().filter(|c| c.user == user).count()
    }

    // ---- membership -------------------------------------------------------------------

    /// Joins with the session's invite code; joining again is a no-op.
    pub fn join(&mut self, who: &Identity, invite: &str, now: u64) -> CoreResult<Outcome> {
        self.require_active()?;
        if self.is_member(&who.user) {
            return Ok(Outcome::default());
        }
        let good: bool = self.meta.invite.as_bytes().ct_eq(invite.as_bytes()).into();
        if !good {
            return Err(CoreError::BadInvite);
        }
        if self.members.len() >= self.meta.limits.max_members as usize {
            return Err(CoreError::MemberLimit {
                limit: self.meta.limits.max_members,
            });
        }
        self.members.insert(
            who.user.clone(),
            Member {
                user: who.user.clone(),
                name: who.name.clone(),
                email: who.email.clone(),
                role: Role::Member,
                joined_at: now,
            },
        );
        self.dirty.insert(Dirty::Member(who.user.clone()));
        let mut out = Outcome::default();
        out.event(
            who.actor(),
            EventKind::MemberJoined {
                user: who.user.clone(),
                name: who.name.clone(),
                role: Role::Member,
            },
        );
        Ok(out)
    }

    /// Leaves: closes the person's clients and releases their locks. Queued prompts stay.
    pub fn leave(&mut self, who: &Identity) -> CoreResult<Outcome> {
        self.require_member(&who.user)?;
        if self.is_owner(&who.user) {
            return Err(CoreError::OwnerCannotLeave);
        }
        let mut out = Outcome::default();
        self.drop_member(&who.user, &who.actor(), LockReleaseReason::Left, &mut out);
        Ok(out)
    }

    /// The owner removes a member: their locks are released, their sockets closed (4000, do
    /// not reconnect), and they are no longer a member. The invite stays as it is: rotate it
    /// too if it may have leaked.
    pub fn remove_member(&mut self, owner: &Identity, user: &str) -> CoreResult<Outcome> {
        self.require_member(&owner.user)?;
        if !self.is_owner(&owner.user) {
            return Err(CoreError::OwnerOnly);
        }
        if user == owner.user {
            return Err(CoreError::OwnerCannotLeave);
        }
        if !self.is_member(user) {
            return Err(CoreError::Invalid(format!(
                "{user} is not a member of this session"
            )));
        }
        let mut out = Outcome::default();
        self.drop_member(user, &owner.actor(), LockReleaseReason::Left, &mut out);
        Ok(out)
    }

    /// The owner replaces the invite: the old share link admits nobody from now on (members
    /// stay). The event does not carry the new invite.
    pub fn rotate_invite(&mut self, owner: &Identity, invite: String) -> CoreResult<Outcome> {
        self.require_active()?;
        if !self.is_owner(&owner.user) {
            return Err(CoreError::OwnerOnly);
        }
        self.meta.invite = invite;
        self.dirty.insert(Dirty::Meta);
        let mut out = Outcome::default();
        out.event(owner.actor(), EventKind::InviteRotated);
        Ok(out)
    }

    fn drop_member(
        &mut self,
        user: &str,
        actor: &Actor,
        reason: LockReleaseReason,
        out: &mut Outcome,
    ) {
        self.release_all_of(user, reason, actor, out);
        let gone: Vec<ClientId> = self
            .clients
            .values()
            .filter(|c| c.user == user)
            .map(|c| c.id.clone())
            .collect();
        for c in &gone {
            self.clients.remove(c);
            self.dirty.insert(Dirty::Client(c.clone()));
        }
        if !gone.is_empty() {
            out.presence_changed = true;
        }
        out.disconnect = gone;
        self.members.remove(user);
        self.dirty.insert(Dirty::Member(user.to_string()));
        out.event(
            actor.clone(),
            EventKind::MemberLeft {
                user: user.to_string(),
            },
        );
    }

    /// Sets the hosts this session's sandboxes may reach beyond their repository's egress
    /// allowlist (owner only; patterns as in a repository's `egress`). Refused input changes
    /// nothing; the change is an event, so every member sees who opened what.
    pub fn set_egress(&mut self, who: &Identity, allow: &[String]) -> CoreResult<Outcome> {
        self.require_active()?;
        if !self.is_owner(&who.user) {
            return Err(CoreError::OwnerOnly);
        }
        if !crate::egress::valid_list(allow) {
            return Err(CoreError::Invalid(format!(
                "allow: at most {} host patterns like `example.com`, `*.example.com` or `host:port`",
                crate::egress::MAX_PATTERNS
            )));
        }
        let mut out = Outcome::default();
        out.event(
            who.actor(),
            EventKind::EgressChanged {
                allow: allow.to_vec(),
            },
        );
        Ok(out)
    }

    /// Ends the session (owner only); terminal.
    pub fn end(&mut self, who: &Identity, now: u64) -> CoreResult<Outcome> {
        self.require_active()?;
        if !self.is_owner(&who.user) {
            return Err(CoreError::OwnerOnly);
        }
        let mut out = Outcome::default();
        if let Some(id) = self.queue.running.clone() {
            self.queue.stop(&who.user, true, now)?;
            self.dirty.insert(Dirty::Prompt(id.clone()));
            out.event(who.actor(), EventKind::PromptStopped { id: id.clone() });
            out.abort = Some(id);
        }
        let queued: Vec<PromptId> = self
            .queue
            .queued_in_order()
            .iter()
            .map(|p| p.id.clone())
            .collect();
        for id in queued {
            self.queue.cancel(&id, &who.user, true, now)?;
            self.dirty.insert(Dirty::Prompt(id.clone()));
            out.event(who.actor(), EventKind::PromptCancelled { id });
        }
        self.meta.status = SessionStatus::Ended;
        self.dirty.insert(Dirty::Meta);
        self.prune_terminal();
        out.event(who.actor(), EventKind::SessionEnded);
        Ok(out)
    }

    // ---- clients and presence ---------------------------------------------------------

    /// Registers a connected client of a member, within the per-user limit.
    pub fn connect(
        &mut self,
        who: &Identity,
        client: &str,
        kind: &str,
        now: u64,
    ) -> CoreResult<Outcome> {
        self.require_member(&who.user)?;
        if client.is_empty() || client.len() > 128 {
            return Err(CoreError::Invalid("client id must be 1..128 bytes".into()));
        }
        if let Some(existing) = self.clients.get(client) {
            if existing.user != who.user {
                return Err(CoreError::NotYourClient(client.to_string()));
            }
        } else if self.clients_of(&who.user) >= self.meta.limits.max_clients_per_user as usize {
            return Err(CoreError::ClientLimit {
                limit: self.meta.limits.max_clients_per_user,
            });
        }
        self.clients.insert(
            client.to_string(),
            Client {
                id: client.to_string(),
                user: who.user.clone(),
                name: who.name.clone(),
                kind: kind.to_string(),
                color: color_for(&who.user),
                connected_at: now,
                last_seen: now,
                cursor: None,
                typing: false,
            },
        );
        self.dirty.insert(Dirty::Client(client.to_string()));
        Ok(Outcome {
            presence_changed: true,
            ..Outcome::default()
        })
    }

    /// Forgets a client whose connection closed. Unknown clients are ignored.
    pub fn disconnect(&mut self, client: &str) -> Outcome {
        if self.clients.remove(client).is_some() {
            self.dirty.insert(Dirty::Client(client.to_string()));
            Outcome {
                presence_changed: true,
                ..Outcome::default()
            }
        } else {
            Outcome::default()
        }
    }

    pub fn heartbeat(&mut self, who: &Identity, client: &str, now: u64) -> CoreResult<Outcome> {
        self.require_client_of(&who.user, client)?;
        if let Some(c) = self.clients.get_mut(client) {
            c.last_seen = now;
            self.dirty.insert(Dirty::Client(client.to_string()));
        }
        Ok(Outcome::default())
    }

    pub fn set_cursor(
        &mut self,
        who: &Identity,
        client: &str,
        cursor: Cursor,
        now: u64,
    ) -> CoreResult<Outcome> {
        self.require_client_of(&who.user, client)?;
        if cursor
            .file
            .as_ref()
            .is_some_and(|f| f.len() > MAX_RESOURCE_LEN)
        {
            return Err(CoreError::Invalid("cursor file path too long".into()));
        }
        if let Some(c) = self.clients.get_mut(client) {
            c.cursor = Some(cursor);
            c.last_seen = now;
            self.dirty.insert(Dirty::Client(client.to_string()));
        }
        Ok(Outcome {
            presence_changed: true,
            ..Outcome::default()
        })
    }

    pub fn set_typing(
        &mut self,
        who: &Identity,
        client: &str,
        typing: bool,
        now: u64,
    ) -> CoreResult<Outcome> {
        self.require_client_of(&who.user, client)?;
        let mut changed = false;
        if let Some(c) = self.clients.get_mut(client) {
            changed = c.typing != typing;
            c.typing = typing;
            c.last_seen = now;
            self.dirty.insert(Dirty::Client(client.to_string()));
        }
        Ok(Outcome {
            presence_changed: changed,
            ..Outcome::default()
        })
    }

    /// Removes clients that missed their heartbeat and expires locks past their time.
    pub fn sweep(&mut self, now: u64) -> Outcome {
        let mut out = Outcome::default();
        let timeout = self.meta.limits.heartbeat_timeout_ms;
        let stale: Vec<ClientId> = self
            .clients
            .values()
            .filter(|c| c.last_seen.saturating_add(timeout) <= now)
            .map(|c| c.id.clone())
            .collect();
        for c in &stale {
            self.clients.remove(c);
            self.dirty.insert(Dirty::Client(c.clone()));
        }
        out.presence_changed = !stale.is_empty();
        out.disconnect = stale;
        let expired: Vec<String> = self
            .locks
            .values()
            .filter(|l| l.expires_at <= now)
            .map(|l| l.resource.clone())
            .collect();
        for r in expired {
            if let Some(l) = self.locks.remove(&r) {
                self.dirty.insert(Dirty::Lock(r.clone()));
                out.event(
                    Actor::system(),
                    EventKind::LockReleased {
                        resource: r,
                        holder: l.holder,
                        reason: LockReleaseReason::Expired,
                    },
                );
            }
        }
        out
    }

    /// The earliest time at which `sweep` would change something.
    pub fn next_deadline(&self) -> Option<u64> {
        let timeout = self.meta.limits.heartbeat_timeout_ms;
        let c = self
            .clients
            .values()
            .map(|c| c.last_seen.saturating_add(timeout))
            .min();
        let l = self.locks.values().map(|l| l.expires_at).min();
        match (c, l) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---- edit locks ---------------------------------------------------------------------

    fn release_all_of(
        &mut self,
        user: &str,
        reason: LockReleaseReason,
        actor: &Actor,
        out: &mut Outcome,
    ) {
        let held: Vec<String> = self
            .locks
            .values()
            .filter(|l| l.holder == user)
            .map(|l| l.resource.clone())
            .collect();
        for r in held {
            self.locks.remove(&r);
            self.dirty.insert(Dirty::Lock(r.clone()));
            out.event(
                actor.clone(),
                EventKind::LockReleased {
                    resource: r,
                    holder: user.to_string(),
                    reason: reason.clone(),
                },
            );
        }
    }

    /// Takes (or renews) the single-writer lock on a resource for `ttl_ms`.
    pub fn acquire_lock(
        &mut self,
        who: &Identity,
        resource: &str,
        ttl_ms: u64,
        now: u64,
    ) -> CoreResult<Outcome> {
        self.require_active()?;
        self.require_member(&who.user)?;
        if resource.is_empty() || resource.len() > MAX_RESOURCE_LEN {
            return Err(CoreError::Invalid(format!(
                "resource must be 1..{MAX_RESOURCE_LEN} bytes"
            )));
        }
        if ttl_ms == 0 || ttl_ms > self.meta.limits.max_lock_ttl_ms {
            return Err(CoreError::Invalid(format!(
                "ttl_ms must be between 1 and {}",
                self.meta.limits.max_lock_ttl_ms
            )));
        }
        // A new lock counts against the session's bound; live locks only (expired ones go at
        // the next sweep, or to whoever takes the resource).
        let renewing = self.locks.get(resource).is_some_and(|l| l.expires_at > now);
        let live = self.locks.values().filter(|l| l.expires_at > now).count();
        if !renewing && live >= self.meta.limits.max_locks as usize {
            return Err(CoreError::LockLimit {
                limit: self.meta.limits.max_locks,
            });
        }
        let mut out = Outcome::default();
        if let Some(l) = self.locks.get(resource) {
            if l.holder != who.user {
                if l.expires_at > now {
                    return Err(CoreError::LockHeld {
                        resource: resource.to_string(),
                        holder: l.holder.clone(),
                        expires_at: l.expires_at,
                    });
                }
                out.event(
                    Actor::system(),
                    EventKind::LockReleased {
                        resource: resource.to_string(),
                        holder: l.holder.clone(),
                        reason: LockReleaseReason::Expired,
                    },
                );
            }
        }
        let expires_at = now.saturating_add(ttl_ms);
        let acquired_at = match self.locks.get(resource) {
            Some(l) if l.holder == who.user => l.acquired_at,
            _ => now,
        };
        self.locks.insert(
            resource.to_string(),
            Lock {
                resource: resource.to_string(),
                holder: who.user.clone(),
                acquired_at,
                expires_at,
            },
        );
        self.dirty.insert(Dirty::Lock(resource.to_string()));
        out.event(
            who.actor(),
            EventKind::LockAcquired {
                resource: resource.to_string(),
                holder: who.user.clone(),
                expires_at,
            },
        );
        Ok(out)
    }

    /// Releases a lock the caller holds; an owner may force-release anyone's.
    pub fn release_lock(&mut self, who: &Identity, resource: &str) -> CoreResult<Outcome> {
        self.require_member(&who.user)?;
        let l = self
            .locks
            .get(resource)
            .ok_or_else(|| CoreError::LockNotHeld(resource.to_string()))?;
        let reason = if l.holder == who.user {
            LockReleaseReason::Released
        } else if self.is_owner(&who.user) {
            LockReleaseReason::Forced
        } else {
            return Err(CoreError::LockNotHeld(resource.to_string()));
        };
        let holder = l.holder.clone();
        self.locks.remove(resource);
        self.dirty.insert(Dirty::Lock(resource.to_string()));
        let mut out = Outcome::default();
        out.event(
            who.actor(),
            EventKind::LockReleased {
                resource: resource.to_string(),
                holder,
                reason,
            },
        );
        Ok(out)
    }

    // ---- prompt queue -------------------------------------------------------------------

    fn start_next(&mut self, now: u64, out: &mut Outcome) {
        if let Some(id) = self.queue.start_next(now) {
            self.dirty.insert(Dirty::Prompt(id.clone()));
            let author = self
                .queue
                .prompts
                .get(&id)
                .map(|p| (p.author.clone(), p.author_name.clone()))
                .unwrap_or_default();
            out.event(
                Actor {
                    user: author.0.clone(),
                    name: author.1,
                },
                EventKind::PromptStarted {
                    id: id.clone(),
                    author: author.0,
                },
            );
            out.start = Some(id);
        }
    }

    /// Queues a prompt; starts it at once when nothing is running.
    pub fn enqueue_prompt(
        &mut self,
        who: &Identity,
        id: PromptId,
        text: String,
        priority: i32,
        model: Option<String>,
        now: u64,
    ) -> CoreResult<Outcome> {
        let submission = PromptSubmission {
            id,
            text,
            priority,
            model,
            key: None,
        };
        self.submit_prompt(who, submission, now).map(|(_, out)| out)
    }

    /// Queues a prompt unless its author already stored one under the same client key: then
    /// that prompt answers (whatever its status now) and nothing changes — no new prompt, no
    /// event. Keys are per author and last as long as the queue holds their prompt: a prompt
    /// pruned from the window of terminal ones ([`crate::queue::terminal_window`] prompts ended
    /// after it) takes its key along, and the key is then new again. The same
    /// key with a different text is refused (a key names one prompt). A refused submission
    /// stores nothing, so its retry is a first submission.
    pub fn submit_prompt(
        &mut self,
        who: &Identity,
        submission: PromptSubmission,
        now: u64,
    ) -> CoreResult<(Submitted, Outcome)> {
        let PromptSubmission {
            id,
            text,
            priority,
            model,
            key,
        } = submission;
        if let Some(key) = &key {
            crate::queue::check_client_key(key)?;
            let stored = self
                .queue
                .find_by_key(&who.user, key)
                .filter(|_| self.is_member(&who.user));
            if let Some(p) = stored {
                if p.text != text {
                    return Err(CoreError::Invalid(
                        "this idempotency key already names a prompt with a different text; \
                         use a new key for a new prompt"
                            .into(),
                    ));
                }
                return Ok((Submitted::Existing(p.id.clone()), Outcome::default()));
            }
        }
        self.require_active()?;
        self.require_member(&who.user)?;
        if text.len() > self.meta.limits.max_prompt_bytes {
            return Err(CoreError::Invalid(format!(
                "prompt is longer than {} bytes",
                self.meta.limits.max_prompt_bytes
            )));
        }
        let max = self.meta.limits.max_queued;
        let prompt = self
            .queue
            .enqueue(
                NewPrompt {
                    id: id.clone(),
                    author: who.user.clone(),
                    author_name: who.name.clone(),
                    text,
                    priority,
                    model,
                    client_key: key,
                },
                now,
                max,
            )?
            .public();
        self.meta.next_arrival = self.queue.next_arrival;
        self.dirty.insert(Dirty::Meta);
        self.dirty.insert(Dirty::Prompt(id.clone()));
        let mut out = Outcome::default();
        out.event(who.actor(), EventKind::PromptQueued { prompt });
        self.start_next(now, &mut out);
        Ok((Submitted::Queued(id), out))
    }

    pub fn cancel_prompt(&mut self, who: &Identity, id: &str, now: u64) -> CoreResult<Outcome> {
        self.require_member(&who.user)?;
        let owner = self.is_owner(&who.user);
        self.queue.cancel(id, &who.user, owner, now)?;
        self.dirty.insert(Dirty::Prompt(id.to_string()));
        self.prune_terminal();
        let mut out = Outcome::default();
        out.event(
            who.actor(),
            EventKind::PromptCancelled { id: id.to_string() },
        );
        Ok(out)
    }

    pub fn reprioritize_prompt(
        &mut self,
        who: &Identity,
        id: &str,
        priority: i32,
    ) -> CoreResult<Outcome> {
        self.require_member(&who.user)?;
        let owner = self.is_owner(&who.user);
        self.queue.reprioritize(id, &who.user, owner, priority)?;
        self.dirty.insert(Dirty::Prompt(id.to_string()));
        let mut out = Outcome::default();
        out.event(
            who.actor(),
            EventKind::PromptReprioritized {
                id: id.to_string(),
                priority,
            },
        );
        Ok(out)
    }

    /// Stops the running prompt and starts the next one.
    pub fn stop_prompt(&mut self, who: &Identity, now: u64) -> CoreResult<Outcome> {
        self.require_member(&who.user)?;
        let owner = self.is_owner(&who.user);
        let id = self.queue.stop(&who.user, owner, now)?;
        self.dirty.insert(Dirty::Prompt(id.clone()));
        let mut out = Outcome::default();
        out.event(who.actor(), EventKind::PromptStopped { id: id.clone() });
        out.abort = Some(id);
        self.start_next(now, &mut out);
        self.prune_terminal();
        Ok(out)
    }

    /// The runner reports the running prompt's end; the next one starts.
    pub fn finish_prompt(
        &mut self,
        id: &str,
        ok: bool,
        reason: Option<String>,
        now: u64,
    ) -> CoreResult<Outcome> {
        self.finish_prompt_with(id, ok, reason, None, now)
    }

    /// Ends the running prompt, recording where its work went (branch, commit).
    pub fn finish_prompt_with(
        &mut self,
        id: &str,
        ok: bool,
        reason: Option<String>,
        work: Option<(String, String)>,
        now: u64,
    ) -> CoreResult<Outcome> {
        self.finish_prompt_with_patch(id, ok, reason, work, None, now)
    }

    /// [`Session::finish_prompt_with`], with the work as a patch when it was not pushed.
    pub fn finish_prompt_with_patch(
        &mut self,
        id: &str,
        ok: bool,
        reason: Option<String>,
        work: Option<(String, String)>,
        patch: Option<String>,
        now: u64,
    ) -> CoreResult<Outcome> {
        self.queue.finish(id, ok, reason.clone(), now)?;
        let (branch, commit) = match work {
            Some((b, c)) => (Some(b), Some(c)),
            None => (None, None),
        };
        let patch = patch.map(|p| crate::sandbox::cut_patch(&p));
        self.dirty.insert(Dirty::Prompt(id.to_string()));
        let mut out = Outcome::default();
        out.event(
            Actor::system(),
            EventKind::PromptFinished {
                id: id.to_string(),
                ok,
                reason,
                branch,
                commit,
                patch,
            },
        );
        self.start_next(now, &mut out);
        self.prune_terminal();
        Ok(out)
    }

    /// Agent output for the running prompt.
    pub fn agent_text(&mut self, id: &str, text: String) -> CoreResult<Outcome> {
        if self.queue.running.as_deref() != Some(id) {
            return Err(CoreError::PromptNotQueued {
                id: id.to_string(),
                status: "not running".into(),
            });
        }
        let mut out = Outcome::default();
        out.event(
            Actor::system(),
            EventKind::AgentText {
                prompt: id.to_string(),
                text,
            },
        );
        Ok(out)
    }

    /// A numbered event from the session's sandbox (already checked to be the next in order).
    /// Prompt-scoped events must name the running prompt; late output of a stopped prompt is refused.
    pub fn agent_event(&mut self, ev: AgentEvent, now: u64) -> CoreResult<Outcome> {
        if let Some(p) = ev.prompt() {
            if self.queue.running.as_deref() != Some(p) {
                return Err(CoreError::PromptNotQueued {
                    id: p.to_string(),
                    status: "not running".into(),
                });
            }
        }
        let mut out = Outcome::default();
        let kind = match ev {
            AgentEvent::Done {
                prompt,
                ok,
                reason,
                branch,
                commit,
                patch,
            } => {
                let work = branch.zip(commit);
                return self.finish_prompt_with_patch(&prompt, ok, reason, work, patch, now);
            }
            // The link records it (`SandboxLink::working_on`); the log has the agent's own output.
            AgentEvent::Accepted { .. } => return Ok(out),
            AgentEvent::Text { prompt, text } => EventKind::AgentText { prompt, text },
            AgentEvent::Status { stage, detail } => EventKind::SandboxStatus { stage, detail },
            AgentEvent::Tool {
                prompt,
                call,
                tool,
                status,
                input,
                output,
                error,
            } => EventKind::AgentTool {
                prompt,
                call,
                tool,
                status,
                input,
                output,
                error,
            },
            AgentEvent::Step {
                prompt,
                reason,
                tokens,
                cost,
            } => EventKind::AgentStep {
                prompt,
                reason,
                tokens,
                cost,
            },
            AgentEvent::Error { prompt, message } => EventKind::AgentError { prompt, message },
            AgentEvent::Blocked { tool, message } => EventKind::AgentBlocked { tool, message },
            AgentEvent::EgressBlocked { host, tool } => EventKind::EgressBlocked { host, tool },
        };
        out.event(Actor::system(), kind);
        Ok(out)
    }

    /// A batch of sandbox events, in order. Refused ones (output of a prompt that is no longer
    /// running) change nothing and are skipped; the rest become one outcome.
    pub fn agent_events(&mut self, evs: Vec<AgentEvent>, now: u64) -> Outcome {
        let mut out = Outcome::default();
        for ev in evs {
            if let Ok(o) = self.agent_event(ev, now) {
                out.absorb(o);
            }
        }
        out
    }

    /// A background agent spawned from this session changed status.
    pub fn background_child(
        &mut self,
        id: String,
        status: String,
        session: Option<String>,
        title: Option<String>,
        branch: Option<String>,
    ) -> Outcome {
        let mut out = Outcome::default();
        out.event(
            Actor::system(),
            EventKind::BackgroundChild {
                id,
                status,
                session,
                title,
                branch,
            },
        );
        out
    }

    /// GitHub said this about the session's pull request (opened by the session, or a webhook).
    /// An older state than the one kept changes nothing (deliveries arrive out of order); a
    /// different number replaces the link (a new pull request on the session's branch).
    pub fn pull_request(&mut self, repository: &str, pull: &Pull) -> Outcome {
        let mut out = Outcome::default();
        let kind = match &mut self.meta.pull_request {
            Some(link) if link.number == pull.number && link.repository == repository => {
                match link.apply(pull) {
                    Applied::Changed => Some(link.clone()),
                    Applied::Same | Applied::Stale => None,
                }
                .map(|link| match link.state {
                    PrState::Merged => EventKind::PrMerged { pull_request: link },
                    PrState::Closed => EventKind::PrClosed { pull_request: link },
                    PrState::Open => EventKind::PrUpdated { pull_request: link },
                })
            }
            _ => {
                let link = PrLink::from_pull(repository, pull);
                self.meta.pull_request = Some(link.clone());
                Some(EventKind::PrOpened { pull_request: link })
            }
        };
        if let Some(kind) = kind {
            self.meta.pull_request_action = None;
            self.dirty.insert(Dirty::Meta);
            out.event(Actor::system(), kind);
        }
        out
    }

    /// Whether these just-stored events call for opening the session's pull request: a prompt
    /// finished with its work pushed to a branch, the session works on a repository, and it
    /// has no pull request yet (an open one follows later pushes by itself). The pull request
    /// is the prompting person's: it is opened with their token, in their name.
    pub fn pull_request_due(&self, events: &[crate::events::Event]) -> Option<PullRequestDue> {
        if self.meta.pull_request.is_some() {
            return None;
        }
        self.meta.repository.as_ref()?;
        events.iter().rev().find_map(|event| match &event.kind {
            EventKind::PromptFinished {
                id,
                ok: true,
                branch: Some(branch),
                commit,
                ..
            } => {
                let prompt = self.queue.get(id).ok()?;
                Some(PullRequestDue::of(
                    prompt,
                    branch,
                    commit.as_deref(),
                    &self.meta.id,
                ))
            }
            _ => None,
        })
    }

    /// Review comments became a prompt, or were answered: the log says so.
    pub fn pull_request_review(&mut self, note: crate::events::ReviewNote) -> Outcome {
        let mut out = Outcome::default();
        out.event(Actor::system(), note.event());
        out
    }

    /// The pull request could not be opened in the person's name: offer the compare link.
    pub fn pull_request_action(&mut self, action: PullRequestAction) -> Outcome {
        let mut out = Outcome::default();
        if self.meta.pull_request.is_some()
            || self.meta.pull_request_action.as_ref() == Some(&action)
        {
            return out;
        }
        self.meta.pull_request_action = Some(action.clone());
        self.dirty.insert(Dirty::Meta);
        out.event(Actor::system(), EventKind::PrAction(action));
        out
    }

    /// A stage of the sandbox as seen by the control plane (spawning, lost, failed).
    pub fn sandbox_status(&mut self, stage: &str, detail: String) -> Outcome {
        let mut out = Outcome::default();
        out.event(
            Actor::system(),
            EventKind::SandboxStatus {
                stage: stage.to_string(),
                detail,
            },
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn person(user: &str) -> Identity {
        Identity {
            user: user.into(),
            name: user.into(),
            email: None,
        }
    }

    /// Ada owns it, Bob is a member; at most `max_queued` prompts wait.
    fn session(max_queued: u32) -> Session {
        let meta = Meta {
            id: "ses".into(),
            title: "t".into(),
            repository: None,
            owner: "ada".into(),
            invite: "inv".into(),
            created_at: 0,
            status: SessionStatus::Active,
            limits: Limits {
                max_queued,
                ..Limits::default()
            },
            next_arrival: 0,
            model: None,
            pull_request: None,
            pull_request_action: None,
        };
        let (mut s, _) = Session::create(meta, &person("ada"));
        s.join(&person("bob"), "inv", 0).expect("bob joins");
        s.take_dirty();
        s
    }

    #[test]
    fn a_session_holds_at_most_its_bound_of_live_locks() {
        let mut s = session(5);
        s.meta.limits.max_locks = 2;
        let ada = person("ada");
        s.acquire_lock(&ada, "a", 100, 0).expect("a");
        s.acquire_lock(&person("bob"), "b", 50, 0).expect("b");
        let before = s.clone();
        assert_eq!(
            s.acquire_lock(&ada, "c", 100, 10).err(),
            Some(CoreError::LockLimit { limit: 2 })
        );
        assert_eq!(s, before, "a refused lock changes nothing");
        // Renewing a lock it holds is not a new one.
        s.acquire_lock(&ada, "a", 100, 10).expect("renew a");
        // Once b has expired (not yet swept) it no longer counts.
        s.acquire_lock(&ada, "c", 100, 50)
            .expect("c after b expired");
        assert_eq!(
            s.acquire_lock(&person("bob"), "d", 100, 50).err(),
            Some(CoreError::LockLimit { limit: 2 })
        );
    }

    fn submit(
        s: &mut Session,
        who: &str,
        id: &str,
        text: &str,
        key: Option<&str>,
    ) -> CoreResult<(Submitted, Outcome)> {
        let submission = PromptSubmission {
            id: id.into(),
            text: text.into(),
            priority: 0,
            model: None,
            key: key.map(String::from),
        };
        s.submit_prompt(&person(who), submission, 1)
    }

    fn queued_events(out: &Outcome) -> Vec<&crate::queue::Prompt> {
        out.events
            .iter()
            .filter_map(|(_, k)| match k {
                EventKind::PromptQueued { prompt } => Some(prompt),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_same_key_twice_is_one_prompt_with_one_event() {
        let mut s = session(5);
        let (first, out) = submit(&mut s, "bob", "p1", "fix it", Some("k1")).expect("first");
        assert_eq!(first, Submitted::Queued("p1".into()));
        assert!(first.is_new());
        let shown = queued_events(&out);
        assert_eq!(shown.len(), 1);
        assert_eq!(
            shown[0].client_key, None,
            "the event does not carry the key"
        );
        assert_eq!(s.queue.prompts["p1"].client_key.as_deref(), Some("k1"));
        assert!(!s.take_dirty().is_empty());
        let before = s.clone();
        let (again, out) = submit(&mut s, "bob", "p2", "fix it", Some("k1")).expect("retry");
        assert_eq!(again, Submitted::Existing("p1".into()));
        assert!(!again.is_new());
        assert_eq!(again.id(), "p1");
        assert_eq!(out, Outcome::default(), "no event, nothing to run");
        assert_eq!(s, before, "nothing changed");
        assert!(s.take_dirty().is_empty(), "nothing to store");
        // It answers with its current status, even once it has run.
        s.finish_prompt("p1", true, None, 2).expect("finish");
        let (again, out) = submit(&mut s, "bob", "p3", "fix it", Some("k1")).expect("later");
        assert_eq!((again.id(), out.events.len()), ("p1", 0));
        assert_eq!(s.queue.prompts.len(), 1);
        // A key names one prompt: another text under it is refused and changes nothing.
        let before = s.clone();
        assert!(matches!(
            submit(&mut s, "bob", "p4", "something else", Some("k1")),
            Err(CoreError::Invalid(_))
        ));
        assert_eq!(s, before);
        // Without a key every submission is new.
        submit(&mut s, "bob", "p5", "fix it", None).expect("unkeyed");
        submit(&mut s, "bob", "p6", "fix it", None).expect("unkeyed");
        assert_eq!(s.queue.prompts.len(), 3);
    }

    #[test]
    fn the_same_key_from_someone_else_is_another_prompt() {
        let mut s = session(5);
        let (a, _) = submit(&mut s, "ada", "p1", "fix it", Some("k")).expect("ada");
        let (b, out) = submit(&mut s, "bob", "p2", "fix it", Some("k")).expect("bob");
        assert_eq!(
            (a, b),
            (
                Submitted::Queued("p1".into()),
                Submitted::Queued("p2".into())
            )
        );
        assert_eq!(queued_events(&out).len(), 1);
        assert_eq!(s.queue.prompts.len(), 2);
        // A non-member cannot read someone's prompt back through their key, nor their own.
        let (again, _) = submit(&mut s, "bob", "p3", "fix it", Some("k")).expect("bob again");
        assert_eq!(again.id(), "p2");
        s.leave(&person("bob")).expect("bob leaves");
        assert!(matches!(
            submit(&mut s, "bob", "p3", "fix it", Some("k")),
            Err(CoreError::NotMember)
        ));
        assert!(matches!(
            submit(&mut s, "cy", "p3", "fix it", Some("k")),
            Err(CoreError::NotMember)
        ));
    }

    #[test]
    fn a_refused_keyed_submission_stores_nothing_and_its_retry_stores_once() {
        let mut s = session(1);
        submit(&mut s, "ada", "p1", "runs", None).expect("runs at once");
        submit(&mut s, "ada", "p2", "waits", None).expect("waits");
        s.take_dirty();
        let before = s.clone();
        assert_eq!(
            submit(&mut s, "bob", "p3", "mine", Some("k")).map(|_| ()),
            Err(CoreError::QueueFull { max: 1 })
        );
        assert_eq!(s, before, "a refusal changes nothing");
        assert!(s.take_dirty().is_empty());
        assert_eq!(s.queue.find_by_key("bob", "k"), None);
        // Room frees up: the retry is a first submission, and the one after it a repeat.
        s.cancel_prompt(&person("ada"), "p2", 2).expect("cancel");
        let (first, out) = submit(&mut s, "bob", "p4", "mine", Some("k")).expect("retry");
        assert_eq!(first, Submitted::Queued("p4".into()));
        assert_eq!(queued_events(&out).len(), 1);
        let (again, out) = submit(&mut s, "bob", "p5", "mine", Some("k")).expect("repeat");
        assert_eq!(
            (again, out.events.len()),
            (Submitted::Existing("p4".into()), 0)
        );
        let mine: Vec<_> = s
            .queue
            .prompts
            .values()
            .filter(|p| p.author == "bob")
            .collect();
        assert_eq!(mine.len(), 1);
    }

    #[test]
    fn a_bad_key_is_refused_before_anything_else() {
        let mut s = session(5);
        for bad in ["", "caf\u{e9}", "new\nline"] {
            assert!(matches!(
                submit(&mut s, "bob", "p1", "x", Some(bad)),
                Err(CoreError::Invalid(_))
            ));
        }
        let long = "k".repeat(129);
        assert!(matches!(
            submit(&mut s, "bob", "p1", "x", Some(&long)),
            Err(CoreError::Invalid(_))
        ));
        assert!(s.queue.prompts.is_empty());
        assert!(s.take_dirty().is_empty());
    }

    #[test]
    fn a_stored_prompt_answers_its_key_after_the_session_ends() {
        let mut s = session(5);
        submit(&mut s, "ada", "p1", "one", None).expect("running");
        submit(&mut s, "bob", "p2", "two", Some("k")).expect("queued");
        s.end(&person("ada"), 3).expect("end");
        let (again, out) = submit(&mut s, "bob", "p3", "two", Some("k")).expect("stored");
        assert_eq!((again.id(), out.events.len()), ("p2", 0));
        assert_eq!(
            s.queue.prompts["p2"].status,
            crate::queue::PromptStatus::Cancelled
        );
        assert_eq!(
            submit(&mut s, "bob", "p4", "two", Some("new")).map(|_| ()),
            Err(CoreError::SessionEnded)
        );
    }

    #[test]
    fn presence_window_grows_with_the_session_and_is_bounded() {
        assert_eq!(presence_batch_ms(0), 40);
        assert_eq!(presence_batch_ms(40), 40);
        assert_eq!(presence_batch_ms(200), 200);
        assert_eq!(presence_batch_ms(1000), 1000);
        assert_eq!(presence_batch_ms(100_000), 1000);
        // Frames per second to all sockets stay about 1,000 up to 1,000 clients.
        for n in [40usize, 100, 500, 1000] {
            let per_second = n as u64 * 1000 / presence_batch_ms(n);
            assert!(per_second <= 1000, "{n} clients: {per_second} frames/s");
        }
        // Never shrinks as the session grows.
        let mut last = 0;
        for n in (0..5000).step_by(7) {
            let w = presence_batch_ms(n);
            assert!(w >= last, "window shrank at {n} clients");
            last = w;
        }
    }

    // ---- survivors of the mutation run (issue 14) ----------------------------------------

    fn cursor(file: Option<String>) -> Cursor {
        Cursor {
            file,
            line: 1,
            column: 2,
        }
    }

    fn kinds(out: &Outcome) -> Vec<EventKind> {
        out.events.iter().map(|(_, k)| k.clone()).collect()
    }

    fn released(resource: &str, holder: &str, reason: LockReleaseReason) -> EventKind {
        EventKind::LockReleased {
            resource: resource.into(),
            holder: holder.into(),
            reason,
        }
    }

    #[test]
    fn absorb_appends_in_order_ors_presence_and_the_later_start_wins() {
        let status = |s: &str| EventKind::SandboxStatus {
            stage: s.into(),
            detail: String::new(),
        };
        let mut first = Outcome {
            events: vec![(Actor::system(), status("a"))],
            presence_changed: false,
            disconnect: vec!["c1".into()],
            start: Some("p1".into()),
            abort: Some("p0".into()),
        };
        first.absorb(Outcome {
            events: vec![(Actor::system(), status("b"))],
            presence_changed: true,
            disconnect: vec!["c2".into()],
            start: Some("p2".into()),
            abort: None,
        });
        assert_eq!(kinds(&first), vec![status("a"), status("b")]);
        assert!(first.presence_changed);
        assert_eq!(first.disconnect, vec!["c1".to_string(), "c2".to_string()]);
        assert_eq!(first.start.as_deref(), Some("p2"));
        assert_eq!(first.abort.as_deref(), Some("p0"));
        // A later outcome without presence, start or abort clears none of them.
        first.absorb(Outcome::default());
        assert!(first.presence_changed);
        assert_eq!(first.start.as_deref(), Some("p2"));
        assert_eq!(first.abort.as_deref(), Some("p0"));
        first.absorb(Outcome {
            abort: Some("p3".into()),
            ..Outcome::default()
        });
        assert_eq!(first.abort.as_deref(), Some("p3"));
    }

    #[test]
    fn a_users_color_is_fnv1a_of_their_id() {
        assert_eq!(color_for("ada"), "#9a6324");
        assert_eq!(color_for("bob"), "#800000");
        assert_eq!(color_for("cy"), "#3cb44b");
        assert_eq!(color_for("dee"), "#469990");
        let mut s = session(5);
        s.connect(&person("bob"), "c1", "web", 1).expect("connect");
        assert_eq!(s.clients["c1"].color, "#800000");
    }

    #[test]
    fn a_session_continues_the_arrival_counter_of_its_meta() {
        let mut meta = session(5).meta;
        meta.next_arrival = 7;
        let (mut s, _) = Session::create(meta, &person("ada"));
        submit(&mut s, "ada", "p1", "x", None).expect("submit");
        assert_eq!(s.queue.prompts["p1"].arrival, 7);
        assert_eq!(s.meta.next_arrival, 8);
    }

    #[test]
    fn restore_rebuilds_the_session_and_finds_the_running_prompt() {
        let mut s = session(5);
        s.connect(&person("bob"), "c1", "web", 1).expect("connect");
        s.acquire_lock(&person("bob"), "r", 10, 1).expect("lock");
        submit(&mut s, "ada", "p1", "runs", None).expect("p1");
        submit(&mut s, "bob", "p2", "waits", None).expect("p2");
        s.take_dirty();
        let restored = Session::restore(
            s.meta.clone(),
            s.members.values().cloned().collect(),
            s.clients.values().cloned().collect(),
            s.locks.values().cloned().collect(),
            s.queue.prompts.values().cloned().collect(),
        );
        assert_eq!(restored.queue.running.as_deref(), Some("p1"));
        assert_eq!(restored, s);
    }

    #[test]
    fn take_dirty_names_exactly_the_rows_each_command_changed() {
        let (mut s, _) = Session::create(session(5).meta, &person("ada"));
        assert_eq!(
            s.take_dirty(),
            vec![Dirty::Meta, Dirty::Member("ada".into())]
        );
        assert_eq!(s.take_dirty(), vec![]);
        s.join(&person("bob"), "inv", 1).expect("join");
        assert_eq!(s.take_dirty(), vec![Dirty::Member("bob".into())]);
        s.connect(&person("bob"), "c1", "web", 1).expect("connect");
        assert_eq!(s.take_dirty(), vec![Dirty::Client("c1".into())]);
        s.acquire_lock(&person("bob"), "r", 10, 1).expect("lock");
        assert_eq!(s.take_dirty(), vec![Dirty::Lock("r".into())]);
        submit(&mut s, "bob", "p1", "x", None).expect("submit");
        assert_eq!(
            s.take_dirty(),
            vec![Dirty::Meta, Dirty::Prompt("p1".into())]
        );
        s.leave(&person("bob")).expect("leave");
        assert_eq!(
            s.take_dirty(),
            vec![
                Dirty::Member("bob".into()),
                Dirty::Client("c1".into()),
                Dirty::Lock("r".into())
            ]
        );
    }

    #[test]
    fn only_the_owner_ends_the_session_or_opens_egress() {
        let mut s = session(5);
        assert!(s.is_owner("ada"));
        assert!(!s.is_owner("bob"));
        assert!(!s.is_owner("cy"));
        let allow = vec!["example.com".to_string()];
        let before = s.clone();
        assert_eq!(
            s.set_egress(&person("bob"), &allow),
            Err(CoreError::OwnerOnly)
        );
        assert_eq!(s.end(&person("bob"), 1), Err(CoreError::OwnerOnly));
        assert_eq!(s.leave(&person("ada")), Err(CoreError::OwnerCannotLeave));
        assert!(matches!(
            s.set_egress(&person("ada"), &["not a host!".to_string()]),
            Err(CoreError::Invalid(_))
        ));
        assert_eq!(s, before, "refusals change nothing");
        let out = s.set_egress(&person("ada"), &allow).expect("owner");
        assert_eq!(kinds(&out), vec![EventKind::EgressChanged { allow }]);
        let out = s.end(&person("ada"), 1).expect("owner ends");
        assert_eq!(kinds(&out), vec![EventKind::SessionEnded]);
        assert_eq!(s.meta.status, SessionStatus::Ended);
    }

    #[test]
    fn an_ended_session_refuses_new_work() {
        let mut s = session(5);
        s.end(&person("ada"), 1).expect("end");
        s.take_dirty();
        let before = s.clone();
        let ended = Err(CoreError::SessionEnded);
        assert_eq!(s.join(&person("cy"), "inv", 2), ended);
        assert_eq!(s.set_egress(&person("ada"), &[]), ended);
        assert_eq!(s.end(&person("ada"), 2), ended);
        assert_eq!(s.acquire_lock(&person("bob"), "r", 10, 2), ended);
        assert_eq!(
            s.enqueue_prompt(&person("bob"), "p1".into(), "x".into(), 0, None, 2),
            ended
        );
        assert_eq!(s, before);
    }

    #[test]
    fn joining_needs_the_invite_and_room() {
        let mut s = session(5);
        s.meta.limits.max_members = 3;
        let before = s.clone();
        assert_eq!(s.join(&person("cy"), "wrong", 1), Err(CoreError::BadInvite));
        assert_eq!(s, before);
        let out = s.join(&person("cy"), "inv", 1).expect("third member");
        assert_eq!(
            kinds(&out),
            vec![EventKind::MemberJoined {
                user: "cy".into(),
                name: "cy".into(),
                role: Role::Member
            }]
        );
        assert_eq!(s.join(&person("cy"), "inv", 2), Ok(Outcome::default()));
        assert_eq!(
            s.join(&person("dee"), "inv", 2),
            Err(CoreError::MemberLimit { limit: 3 })
        );
    }

    #[test]
    fn leaving_reports_presence_only_when_it_closed_clients() {
        let mut s = session(5);
        let out = s.leave(&person("bob")).expect("leave");
        assert!(!out.presence_changed);
        assert!(out.disconnect.is_empty());
        s.join(&person("bob"), "inv", 1).expect("rejoin");
        s.connect(&person("bob"), "c1", "web", 1).expect("connect");
        s.acquire_lock(&person("bob"), "r", 10, 1).expect("lock");
        let out = s.leave(&person("bob")).expect("leave");
        assert!(out.presence_changed);
        assert_eq!(out.disconnect, vec!["c1".to_string()]);
        assert_eq!(
            kinds(&out),
            vec![
                released("r", "bob", LockReleaseReason::Left),
                EventKind::MemberLeft { user: "bob".into() }
            ]
        );
        assert!(s.clients.is_empty() && s.locks.is_empty());
    }

    #[test]
    fn a_client_belongs_to_its_user_up_to_the_per_user_limit() {
        let mut s = session(5);
        s.meta.limits.max_clients_per_user = 2;
        let bob = person("bob");
        let ada = person("ada");
        s.connect(&bob, "c1", "web", 1).expect("first");
        assert_eq!((s.clients_of("bob"), s.clients_of("ada")), (1, 0));
        s.connect(&bob, "c2", "web", 1).expect("at the limit");
        assert_eq!(s.clients_of("bob"), 2);
        assert_eq!(
            s.connect(&bob, "c3", "web", 1),
            Err(CoreError::ClientLimit { limit: 2 })
        );
        s.connect(&bob, "c1", "slack", 2)
            .expect("reconnecting is not another");
        assert_eq!(s.clients_of("bob"), 2);
        s.take_dirty();
        let before = s.clone();
        let theirs = Err(CoreError::NotYourClient("c1".into()));
        assert_eq!(s.connect(&ada, "c1", "web", 3), theirs);
        assert_eq!(s.heartbeat(&ada, "c1", 3), theirs);
        assert_eq!(s.set_cursor(&ada, "c1", cursor(None), 3), theirs);
        assert_eq!(s.set_typing(&ada, "c1", true, 3), theirs);
        assert_eq!(
            s.heartbeat(&bob, "c9", 3),
            Err(CoreError::UnknownClient("c9".into()))
        );
        assert_eq!(s, before);
        assert_eq!(s.heartbeat(&bob, "c1", 3), Ok(Outcome::default()));
        assert_eq!(s.clients["c1"].last_seen, 3);
    }

    #[test]
    fn a_client_id_is_1_to_128_bytes() {
        let mut s = session(5);
        let bob = person("bob");
        assert!(matches!(
            s.connect(&bob, "", "web", 1),
            Err(CoreError::Invalid(_))
        ));
        s.connect(&bob, &"c".repeat(128), "web", 1)
            .expect("128 bytes");
        assert!(matches!(
            s.connect(&bob, &"c".repeat(129), "web", 1),
            Err(CoreError::Invalid(_))
        ));
        assert_eq!(s.clients.len(), 1);
    }

    #[test]
    fn connect_disconnect_cursor_and_typing_report_presence() {
        let mut s = session(5);
        let bob = person("bob");
        assert!(
            s.connect(&bob, "c1", "web", 1)
                .expect("connect")
                .presence_changed
        );
        let out = s.set_cursor(&bob, "c1", cursor(None), 2).expect("cursor");
        assert!(out.presence_changed);
        assert_eq!(s.clients["c1"].last_seen, 2);
        assert!(
            s.set_typing(&bob, "c1", true, 3)
                .expect("typing")
                .presence_changed
        );
        assert!(s.clients["c1"].typing);
        assert!(
            !s.set_typing(&bob, "c1", true, 4)
                .expect("still")
                .presence_changed
        );
        assert!(
            s.set_typing(&bob, "c1", false, 5)
                .expect("stops")
                .presence_changed
        );
        assert!(!s.heartbeat(&bob, "c1", 6).expect("beat").presence_changed);
        s.take_dirty();
        let out = s.disconnect("c1");
        assert!(out.presence_changed);
        assert!(s.clients.is_empty());
        assert_eq!(s.take_dirty(), vec![Dirty::Client("c1".into())]);
        assert_eq!(s.disconnect("c1"), Outcome::default());
        assert!(s.take_dirty().is_empty());
    }

    #[test]
    fn a_cursor_file_path_is_at_most_the_resource_limit() {
        let mut s = session(5);
        let bob = person("bob");
        s.connect(&bob, "c1", "web", 1).expect("connect");
        let at = "f".repeat(MAX_RESOURCE_LEN);
        s.set_cursor(&bob, "c1", cursor(Some("src/main.rs".into())), 2)
            .expect("short path");
        s.set_cursor(&bob, "c1", cursor(Some(at.clone())), 2)
            .expect("at the limit");
        assert_eq!(s.clients["c1"].cursor, Some(cursor(Some(at))));
        let before = s.clone();
        let long = "f".repeat(MAX_RESOURCE_LEN + 1);
        assert!(matches!(
            s.set_cursor(&bob, "c1", cursor(Some(long)), 3),
            Err(CoreError::Invalid(_))
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn a_sweep_at_exactly_the_deadline_expires_the_lock_and_drops_the_client() {
        let mut s = session(5);
        s.meta.limits.heartbeat_timeout_ms = 100;
        assert_eq!(s.next_deadline(), None);
        s.connect(&person("bob"), "c1", "web", 0).expect("c1");
        s.connect(&person("ada"), "c2", "web", 10).expect("c2");
        s.acquire_lock(&person("bob"), "a", 50, 0).expect("a");
        s.acquire_lock(&person("ada"), "b", 50, 10).expect("b");
        s.take_dirty();
        assert_eq!(s.next_deadline(), Some(50));
        let before = s.clone();
        assert_eq!(s.sweep(49), Outcome::default());
        assert_eq!(s, before);

        let out = s.sweep(50);
        assert_eq!(
            kinds(&out),
            vec![released("a", "bob", LockReleaseReason::Expired)]
        );
        assert!(!out.presence_changed && out.disconnect.is_empty());
        assert_eq!(s.locks.keys().collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(s.take_dirty(), vec![Dirty::Lock("a".into())]);
        assert_eq!(s.next_deadline(), Some(60));
        s.sweep(60);
        assert!(s.locks.is_empty());
        assert_eq!(s.next_deadline(), Some(100));

        assert_eq!(s.sweep(99), Outcome::default());
        s.take_dirty();
        let out = s.sweep(100);
        assert!(out.presence_changed);
        assert_eq!(out.disconnect, vec!["c1".to_string()]);
        assert!(out.events.is_empty());
        assert_eq!(s.clients.keys().collect::<Vec<_>>(), vec!["c2"]);
        assert_eq!(s.take_dirty(), vec![Dirty::Client("c1".into())]);
        assert_eq!(s.next_deadline(), Some(110));
        s.sweep(110);
        assert!(s.clients.is_empty());
        assert_eq!(s.next_deadline(), None);

        // Locks alone set the deadline too.
        s.acquire_lock(&person("bob"), "c", 30, 200).expect("c");
        assert_eq!(s.next_deadline(), Some(230));
    }

    #[test]
    fn a_lock_names_1_to_512_bytes_for_1_ms_to_the_longest_lease() {
        let mut s = session(5);
        s.meta.limits.max_lock_ttl_ms = 100;
        let bob = person("bob");
        let invalid = |r: CoreResult<Outcome>| matches!(r, Err(CoreError::Invalid(_)));
        assert!(invalid(s.acquire_lock(&bob, "", 10, 0)));
        let long = "r".repeat(MAX_RESOURCE_LEN + 1);
        assert!(invalid(s.acquire_lock(&bob, &long, 10, 0)));
        assert!(invalid(s.acquire_lock(&bob, "r", 0, 0)));
        assert!(invalid(s.acquire_lock(&bob, "r", 101, 0)));
        assert!(s.locks.is_empty());
        s.acquire_lock(&bob, "r", 1, 0).expect("1 ms");
        s.acquire_lock(&bob, "s", 100, 0)
            .expect("the longest lease");
        s.acquire_lock(&bob, &"r".repeat(MAX_RESOURCE_LEN), 10, 0)
            .expect("512 bytes");
        assert_eq!(s.locks["r"].expires_at, 1);
        assert_eq!(s.locks["s"].expires_at, 100);
        assert_eq!(s.locks.len(), 3);
    }

    #[test]
    fn a_lock_is_held_until_exactly_its_expiry_and_a_renewal_keeps_its_start() {
        let mut s = session(5);
        let (ada, bob) = (person("ada"), person("bob"));
        s.acquire_lock(&bob, "r", 10, 0).expect("bob");
        let before = s.clone();
        assert_eq!(
            s.acquire_lock(&ada, "r", 10, 9),
            Err(CoreError::LockHeld {
                resource: "r".into(),
                holder: "bob".into(),
                expires_at: 10
            })
        );
        assert_eq!(s, before);
        let out = s.acquire_lock(&ada, "r", 10, 10).expect("expired at 10");
        assert_eq!(
            kinds(&out),
            vec![
                released("r", "bob", LockReleaseReason::Expired),
                EventKind::LockAcquired {
                    resource: "r".into(),
                    holder: "ada".into(),
                    expires_at: 20
                }
            ]
        );
        assert_eq!(s.locks["r"].acquired_at, 10, "a new holder starts now");
        let out = s.acquire_lock(&ada, "r", 10, 15).expect("renew");
        assert_eq!(out.events.len(), 1, "a renewal releases nothing");
        assert_eq!(
            (s.locks["r"].acquired_at, s.locks["r"].expires_at),
            (10, 25),
            "a renewal keeps when it was taken"
        );
    }

    #[test]
    fn a_lock_is_released_by_its_holder_or_forced_by_the_owner() {
        let mut s = session(5);
        let (ada, bob) = (person("ada"), person("bob"));
        s.acquire_lock(&bob, "r", 10, 0).expect("bob");
        let out = s.release_lock(&bob, "r").expect("holder");
        assert_eq!(
            kinds(&out),
            vec![released("r", "bob", LockReleaseReason::Released)]
        );
        s.acquire_lock(&bob, "r", 10, 0).expect("bob again");
        let out = s.release_lock(&ada, "r").expect("owner");
        assert_eq!(
            kinds(&out),
            vec![released("r", "bob", LockReleaseReason::Forced)]
        );
        s.acquire_lock(&ada, "q", 10, 0).expect("ada");
        assert_eq!(
            s.release_lock(&bob, "q"),
            Err(CoreError::LockNotHeld("q".into()))
        );
        assert_eq!(
            s.release_lock(&bob, "none"),
            Err(CoreError::LockNotHeld("none".into()))
        );
        assert!(s.locks.contains_key("q"));
    }

    #[test]
    fn a_prompt_is_at_most_the_byte_limit() {
        let mut s = session(5);
        s.meta.limits.max_prompt_bytes = 10;
        let bob = person("bob");
        s.enqueue_prompt(&bob, "p1".into(), "a".repeat(10), 0, None, 1)
            .expect("at the limit");
        assert!(matches!(
            s.enqueue_prompt(&bob, "p2".into(), "a".repeat(11), 0, None, 1),
            Err(CoreError::Invalid(_))
        ));
        assert_eq!(s.queue.prompts.len(), 1);
    }

    #[test]
    fn agent_output_is_taken_only_for_the_running_prompt() {
        let mut s = session(5);
        submit(&mut s, "ada", "p1", "runs", None).expect("p1");
        submit(&mut s, "bob", "p2", "waits", None).expect("p2");
        let text = |p: &str, t: &str| EventKind::AgentText {
            prompt: p.into(),
            text: t.into(),
        };
        let out = s.agent_text("p1", "hi".into()).expect("running");
        assert_eq!(kinds(&out), vec![text("p1", "hi")]);
        assert!(s.agent_text("p2", "no".into()).is_err());
        let ev = |p: &str, t: &str| AgentEvent::Text {
            prompt: p.into(),
            text: t.into(),
        };
        let out = s.agent_event(ev("p1", "a"), 2).expect("running");
        assert_eq!(kinds(&out), vec![text("p1", "a")]);
        assert!(s.agent_event(ev("p2", "b"), 2).is_err());
        let status = AgentEvent::Status {
            stage: "ready".into(),
            detail: "d".into(),
        };
        let done = AgentEvent::Done {
            prompt: "p1".into(),
            ok: true,
            reason: None,
            branch: None,
            commit: None,
            patch: None,
        };
        let out = s.agent_events(vec![ev("p1", "c"), ev("p2", "late"), status, done], 3);
        assert_eq!(
            kinds(&out),
            vec![
                text("p1", "c"),
                EventKind::SandboxStatus {
                    stage: "ready".into(),
                    detail: "d".into()
                },
                EventKind::PromptFinished {
                    id: "p1".into(),
                    ok: true,
                    reason: None,
                    branch: None,
                    commit: None,
                    patch: None,
                },
                EventKind::PromptStarted {
                    id: "p2".into(),
                    author: "bob".into()
                },
            ]
        );
        assert_eq!(out.start.as_deref(), Some("p2"));
    }

    #[test]
    fn background_children_and_sandbox_stages_are_system_events() {
        let mut s = session(5);
        let out = s.background_child(
            "bg1".into(),
            "running".into(),
            Some("ses2".into()),
            Some("t".into()),
            Some("b".into()),
        );
        assert_eq!(
            out.events,
            vec![(
                Actor::system(),
                EventKind::BackgroundChild {
                    id: "bg1".into(),
                    status: "running".into(),
                    session: Some("ses2".into()),
                    title: Some("t".into()),
                    branch: Some("b".into()),
                }
            )]
        );
        let out = s.sandbox_status("lost", "gone".into());
        assert_eq!(
            out.events,
            vec![(
                Actor::system(),
                EventKind::SandboxStatus {
                    stage: "lost".into(),
                    detail: "gone".into()
                }
            )]
        );
    }
}
