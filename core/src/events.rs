//! Durable session events: what the ordered log stores and replays, each with its author.

use serde::{Deserialize, Serialize};

use crate::queue::Prompt;
use crate::session::Role;

/// Who caused an event: a person, or the system (sweeps, expiry, runner).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Actor {
    pub user: String,
    pub name: String,
}

impl Actor {
    pub fn system() -> Actor {
        Actor {
            user: "system".into(),
            name: "Nightshift".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockReleaseReason {
    Released,
    Expired,
    Forced,
    Left,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
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
    },
    /// Output of the agent for a running prompt (text is batched token deltas).
    #[serde(rename = "agent.text")]
    AgentText { prompt: String, text: String },
}

impl EventKind {
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::SessionCreated { .. } => "session.created",
            EventKind::SessionEnded => "session.ended",
            EventKind::MemberJoined { .. } => "member.joined",
            EventKind::MemberLeft { .. } => "member.left",
            EventKind::LockAcquired { .. } => "lock.acquired",
            EventKind::LockReleased { .. } => "lock.released",
            EventKind::PromptQueued { .. } => "prompt.queued",
            EventKind::PromptReprioritized { .. } => "prompt.reprioritized",
            EventKind::PromptCancelled { .. } => "prompt.cancelled",
            EventKind::PromptStarted { .. } => "prompt.started",
            EventKind::PromptStopped { .. } => "prompt.stopped",
            EventKind::PromptFinished { .. } => "prompt.finished",
            EventKind::AgentText { .. } => "agent.text",
        }
    }
}

/// One entry of the ordered log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub at: u64,
    pub actor: Actor,
    #[serde(flatten)]
    pub kind: EventKind,
}
