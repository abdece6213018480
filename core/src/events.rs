//! Durable session events: what the ordered log stores and replays, each with its author.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::github::PrLink;
use crate::ids::{Actor, Role};
use crate::queue::Prompt;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockReleaseReason {
    Released,
    Expired,
    Forced,
    Left,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum EventKind {
    #[serde(rename = "session.created")]
    SessionCreated {
        title: String,
        repository: Option<String>,
        owner: String,
    },
    #[serde(rename = "session.ended")]
    SessionEnded,
    #[serde(rename = "member.joined")]
    MemberJoined {
        user: String,
        name: String,
        role: Role,
    },
    #[serde(rename = "member.left")]
    MemberLeft { user: String },
    /// The owner replaced the session's invite (the old share link admits nobody).
    #[serde(rename = "invite.rotated")]
    InviteRotated,
    #[serde(rename = "lock.acquired")]
    LockAcquired {
        resource: String,
        holder: String,
        expires_at: u64,
    },
    #[serde(rename = "lock.released")]
    LockReleased {
        resource: String,
        holder: String,
        reason: LockReleaseReason,
    },
    #[serde(rename = "prompt.queued")]
    PromptQueued { prompt: Prompt },
    #[serde(rename = "prompt.reprioritized")]
    PromptReprioritized { id: String, priority: i32 },
    #[serde(rename = "prompt.cancelled")]
    PromptCancelled { id: String },
    #[serde(rename = "prompt.started")]
    PromptStarted { id: String, author: String },
    #[serde(rename = "prompt.stopped")]
    PromptStopped { id: String },
    #[serde(rename = "prompt.finished")]
    PromptFinished {
        id: String,
        ok: bool,
        reason: Option<String>,
        /// The branch holding the prompt's work, pushed to the repository's remote.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        branch: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        commit: Option<String>,
        /// The work as a patch when it could not be pushed (a fork's pull request).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        patch: Option<String>,
    },
    /// Output of the agent for a running prompt (text is batched token deltas).
    #[serde(rename = "agent.text")]
    AgentText { prompt: String, text: String },
    /// The sandbox's stage: spawning, syncing, synced, ready, lost, failed, …
    #[serde(rename = "sandbox.status")]
    SandboxStatus { stage: String, detail: String },
    /// A tool call of the agent: running (with input), completed (output) or error.
    #[serde(rename = "agent.tool")]
    AgentTool {
        prompt: String,
        call: String,
        tool: String,
        status: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output: Option<Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<Value>,
    },
    /// One model step finished, with its token counts and cost.
    #[serde(rename = "agent.step")]
    AgentStep {
        prompt: String,
        reason: Option<String>,
        tokens: Value,
        cost: Value,
    },
    #[serde(rename = "agent.error")]
    AgentError { prompt: String, message: String },
    /// A write was held back until the checkout has synced; the agent was told why.
    #[serde(rename = "agent.blocked")]
    AgentBlocked { tool: String, message: String },
    /// The session's owner changed the hosts its sandboxes may reach (beyond the repository's).
    #[serde(rename = "egress.changed")]
    EgressChanged { allow: Vec<String> },
    /// The sandbox's egress proxy refused a connection to a host outside the session's allowlist.
    #[serde(rename = "egress.blocked")]
    EgressBlocked {
        host: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tool: Option<String>,
    },
    /// A background agent this session spawned changed status (the parent shows its children live).
    #[serde(rename = "background.child")]
    BackgroundChild {
        id: String,
        status: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        branch: Option<String>,
    },
    /// The session's pull request was opened in the prompting person's name (or an open one on
    /// the session's branch was found).
    #[serde(rename = "pr.opened")]
    PrOpened { pull_request: PrLink },
    /// The pull request changed (new commits, title, draft, reopened).
    #[serde(rename = "pr.updated")]
    PrUpdated { pull_request: PrLink },
    #[serde(rename = "pr.merged")]
    PrMerged { pull_request: PrLink },
    /// Closed without merging.
    #[serde(rename = "pr.closed")]
    PrClosed { pull_request: PrLink },
    /// The pull request could not be opened in the person's name: what they can do instead.
    #[serde(rename = "pr.action")]
    PrAction(PullRequestAction),
    /// Review comments on the session's pull request became one prompt (fenced as untrusted
    /// input in its text; here as people read them).
    #[serde(rename = "pr.comment.received")]
    PrCommentReceived {
        repository: String,
        number: u64,
        prompt: String,
        comments: Vec<PrCommentNote>,
        /// Comments left out of the prompt to keep it bounded.
        #[serde(default, skip_serializing_if = "is_zero")]
        omitted: usize,
    },
    /// The prompt's work was pushed (or nothing changed) and each thread got its answer.
    #[serde(rename = "pr.comment.addressed")]
    PrCommentAddressed {
        repository: String,
        number: u64,
        prompt: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        commit: Option<String>,
        replies: Vec<PrReplyNote>,
    },
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// What review comments did in a session, as a command carries it to the log.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ReviewNote {
    Received {
        repository: String,
        number: u64,
        prompt: String,
        comments: Vec<PrCommentNote>,
        omitted: usize,
    },
    Addressed {
        repository: String,
        number: u64,
        prompt: String,
        commit: Option<String>,
        replies: Vec<PrReplyNote>,
    },
}

impl ReviewNote {
    /// The event it is logged as.
    pub fn event(self) -> EventKind {
        match self {
            ReviewNote::Received {
                repository,
                number,
                prompt,
                comments,
                omitted,
            } => EventKind::PrCommentReceived {
                repository,
                number,
                prompt,
                comments,
                omitted,
            },
            ReviewNote::Addressed {
                repository,
                number,
                prompt,
                commit,
                replies,
            } => EventKind::PrCommentAddressed {
                repository,
                number,
                prompt,
                commit,
                replies,
            },
        }
    }
}

/// One reviewer's comment as the session log shows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PrCommentNote {
    pub id: u64,
    /// The thread's root comment (the comment itself when it starts the thread).
    pub root: u64,
    pub author: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lines: Option<String>,
    /// The comment's text, cut to 1 KiB.
    pub body: String,
    pub url: String,
}

/// One answer posted in a thread (or the PR's conversation).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PrReplyNote {
    pub root: u64,
    pub body: String,
}

/// What a person can do when the session could not open the pull request in their name: open
/// it themselves from the compare page.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PullRequestAction {
    /// `create_pull_request`.
    pub kind: String,
    pub url: String,
    pub reason: String,
}

impl EventKind {
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::SessionCreated { .. } => "session.created",
            EventKind::SessionEnded => "session.ended",
            EventKind::MemberJoined { .. } => "member.joined",
            EventKind::MemberLeft { .. } => "member.left",
            EventKind::InviteRotated => "invite.rotated",
            EventKind::LockAcquired { .. } => "lock.acquired",
            EventKind::LockReleased { .. } => "lock.released",
            EventKind::PromptQueued { .. } => "prompt.queued",
            EventKind::PromptReprioritized { .. } => "prompt.reprioritized",
            EventKind::PromptCancelled { .. } => "prompt.cancelled",
            EventKind::PromptStarted { .. } => "prompt.started",
            EventKind::PromptStopped { .. } => "prompt.stopped",
            EventKind::PromptFinished { .. } => "prompt.finished",
            EventKind::AgentText { .. } => "agent.text",
            EventKind::SandboxStatus { .. } => "sandbox.status",
            EventKind::AgentTool { .. } => "agent.tool",
            EventKind::AgentStep { .. } => "agent.step",
            EventKind::AgentError { .. } => "agent.error",
            EventKind::AgentBlocked { .. } => "agent.blocked",
            EventKind::EgressBlocked { .. } => "egress.blocked",
            EventKind::EgressChanged { .. } => "egress.changed",
            EventKind::BackgroundChild { .. } => "background.child",
            EventKind::PrOpened { .. } => "pr.opened",
            EventKind::PrUpdated { .. } => "pr.updated",
            EventKind::PrMerged { .. } => "pr.merged",
            EventKind::PrClosed { .. } => "pr.closed",
            EventKind::PrAction(_) => "pr.action",
            EventKind::PrCommentReceived { .. } => "pr.comment.received",
            EventKind::PrCommentAddressed { .. } => "pr.comment.addressed",
        }
    }
}

/// One entry of the ordered log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at: u64,
    pub actor: Actor,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[cfg(test)]
mod name_tests {
    use super::*;

    /// `name()` is the same string the event is serialized under (`type`).
    #[test]
    fn an_events_name_is_its_wire_type() {
        let kinds = [
            EventKind::SessionEnded,
            EventKind::EgressChanged { allow: Vec::new() },
            EventKind::EgressBlocked {
                host: "h".into(),
                tool: None,
            },
            EventKind::BackgroundChild {
                id: "bg".into(),
                status: "queued".into(),
                session: None,
                title: None,
                branch: None,
            },
        ];
        for kind in &kinds {
            let wire = serde_json::to_value(kind).unwrap_or_default();
            assert_eq!(wire["type"].as_str(), Some(kind.name()), "{wire}");
        }
    }
}
