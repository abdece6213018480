//! The one error type of the core: every refusal has a stable code and an HTTP status.

use thiserror::Error;

/// Why a command was refused. Codes are part of the public API: never rename one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CoreError {
    #[error(
        "you are not a member of this session; ask a member for the share link and join first"
    )]
    NotMember,
    #[error("only the session owner may do this")]
    OwnerOnly,
    #[error("the owner cannot leave the session; end it instead")]
    OwnerCannotLeave,
    #[error("the invite code is wrong; ask a member for a fresh share link")]
    BadInvite,
    #[error("you already have {limit} clients connected to this session; close one first")]
    ClientLimit { limit: u32 },
    #[error("the session already has {limit} members")]
    MemberLimit { limit: u32 },
    #[error("unknown client {0}")]
    UnknownClient(String),
    #[error("client {0} belongs to someone else")]
    NotYourClient(String),
    #[error("{resource} is locked by {holder} until {expires_at}; wait or ask them to release it")]
    LockHeld {
        resource: String,
        holder: String,
        expires_at: u64,
    },
    #[error("you do not hold the lock on {0}")]
    LockNotHeld(String),
    #[error("the queue already holds {max} prompts; wait for some to run or cancel one")]
    QueueFull { max: u32 },
    #[error("no prompt {0} in this session")]
    PromptNotFound(String),
    #[error("prompt {0} was queued by someone else; only its author or the owner may change it")]
    NotYourPrompt(String),
    #[error("prompt {id} is {status}, not queued")]
    PromptNotQueued { id: String, status: String },
    #[error("nothing is running")]
    NothingRunning,
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("the session has ended")]
    SessionEnded,
}

impl CoreError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            CoreError::NotMember => "not_member",
            CoreError::OwnerOnly => "owner_only",
            CoreError::OwnerCannotLeave => "owner_cannot_leave",
            CoreError::BadInvite => "bad_invite",
            CoreError::ClientLimit { .. } => "client_limit",
            CoreError::MemberLimit { .. } => "member_limit",
            CoreError::UnknownClient(_) => "unknown_client",
            CoreError::NotYourClient(_) => "not_your_client",
            CoreError::LockHeld { .. } => "lock_held",
            CoreError::LockNotHeld(_) => "lock_not_held",
            CoreError::QueueFull { .. } => "queue_full",
            CoreError::PromptNotFound(_) => "prompt_not_found",
            CoreError::NotYourPrompt(_) => "not_your_prompt",
            CoreError::PromptNotQueued { .. } => "prompt_not_queued",
            CoreError::NothingRunning => "nothing_running",
            CoreError::Invalid(_) => "invalid_input",
            CoreError::SessionEnded => "session_ended",
        }
    }

    /// HTTP status the edge answers with.
    pub fn status(&self) -> u16 {
        match self {
            CoreError::NotMember | CoreError::OwnerOnly | CoreError::NotYourClient(_) => 403,
            CoreError::NotYourPrompt(_) | CoreError::BadInvite => 403,
            CoreError::UnknownClient(_) | CoreError::PromptNotFound(_) => 404,
            CoreError::LockHeld { .. }
            | CoreError::LockNotHeld(_)
            | CoreError::PromptNotQueued { .. }
            | CoreError::NothingRunning
            | CoreError::OwnerCannotLeave
            | CoreError::SessionEnded => 409,
            CoreError::ClientLimit { .. }
            | CoreError::MemberLimit { .. }
            | CoreError::QueueFull { .. } => 429,
            CoreError::Invalid(_) => 400,
        }
    }
}

pub type CoreResult<T> = Result<T, CoreError>;
