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
    #[error("this session has no sandbox")]
    NoSandbox,
    #[error("this token does not belong to this session's sandbox")]
    BadSandboxToken,
    #[error("this sandbox is no longer the session's sandbox")]
    SandboxRetired,
    #[error("the session's sandbox is being created; {0}")]
    SandboxSpawning(&'static str),
    #[error("a prompt is running in the session's sandbox; wait for it to finish (or stop it), then restore")]
    PromptRunning,
    #[error("this session has no repository, so it has no sandbox and prompts cannot run; create a session with `repository` set")]
    NoRepository,
    #[error("event {got} arrived but {expected} is next")]
    OutOfOrder { got: u64, expected: u64 },
    #[error("a snapshot of this session is being taken; retry in a moment")]
    SnapshotInProgress,
    #[error("the session already holds {limit} edit locks; release one first")]
    LockLimit { limit: u32 },
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
            CoreError::NoSandbox => "no_sandbox",
            CoreError::BadSandboxToken => "bad_sandbox_token",
            CoreError::SandboxRetired => "sandbox_retired",
            CoreError::SandboxSpawning(_) => "sandbox_spawning",
            CoreError::PromptRunning => "prompt_running",
            CoreError::NoRepository => "no_repository",
            CoreError::OutOfOrder { .. } => "out_of_order",
            CoreError::SnapshotInProgress => "snapshot_in_progress",
            CoreError::LockLimit { .. } => "lock_limit",
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
            | CoreError::SessionEnded
            | CoreError::SandboxSpawning(_)
            | CoreError::PromptRunning
            | CoreError::OutOfOrder { .. }
            | CoreError::SnapshotInProgress => 409,
            CoreError::NoSandbox => 404,
            CoreError::BadSandboxToken => 401,
            CoreError::SandboxRetired => 410,
            CoreError::NoRepository => 400,
            CoreError::ClientLimit { .. }
            | CoreError::MemberLimit { .. }
            | CoreError::QueueFull { .. }
            | CoreError::LockLimit { .. } => 429,
            CoreError::Invalid(_) => 400,
        }
    }
}

pub type CoreResult<T> = Result<T, CoreError>;

/// A refusal at the wire level: stable code plus a message that says what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    pub code: &'static str,
    pub message: String,
}

impl WireError {
    pub fn new(code: &'static str, message: impl Into<String>) -> WireError {
        WireError {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes and statuses are the public contract of every refusal: pinned here, unique.
    #[test]
    fn every_refusal_has_its_stable_code_and_status() {
        let s = || "x".to_string();
        let table = [
            (CoreError::NotMember, "not_member", 403),
            (CoreError::OwnerOnly, "owner_only", 403),
            (CoreError::OwnerCannotLeave, "owner_cannot_leave", 409),
            (CoreError::BadInvite, "bad_invite", 403),
            (CoreError::ClientLimit { limit: 1 }, "client_limit", 429),
            (CoreError::MemberLimit { limit: 1 }, "member_limit", 429),
            (CoreError::UnknownClient(s()), "unknown_client", 404),
            (CoreError::NotYourClient(s()), "not_your_client", 403),
            (
                CoreError::LockHeld {
                    resource: s(),
                    holder: s(),
                    expires_at: 1,
                },
                "lock_held",
                409,
            ),
            (CoreError::LockNotHeld(s()), "lock_not_held", 409),
            (CoreError::QueueFull { max: 1 }, "queue_full", 429),
            (CoreError::PromptNotFound(s()), "prompt_not_found", 404),
            (CoreError::NotYourPrompt(s()), "not_your_prompt", 403),
            (
                CoreError::PromptNotQueued {
                    id: s(),
                    status: s(),
                },
                "prompt_not_queued",
                409,
            ),
            (CoreError::NothingRunning, "nothing_running", 409),
            (CoreError::Invalid(s()), "invalid_input", 400),
            (CoreError::SessionEnded, "session_ended", 409),
            (CoreError::NoSandbox, "no_sandbox", 404),
            (CoreError::BadSandboxToken, "bad_sandbox_token", 401),
            (CoreError::SandboxRetired, "sandbox_retired", 410),
            (CoreError::SandboxSpawning("x"), "sandbox_spawning", 409),
            (CoreError::PromptRunning, "prompt_running", 409),
            (CoreError::NoRepository, "no_repository", 400),
            (
                CoreError::OutOfOrder {
                    got: 3,
                    expected: 2,
                },
                "out_of_order",
                409,
            ),
            (CoreError::SnapshotInProgress, "snapshot_in_progress", 409),
            (CoreError::LockLimit { limit: 1 }, "lock_limit", 429),
        ];
        let mut codes = std::collections::BTreeSet::new();
        for (error, code, status) in &table {
            assert_eq!((error.code(), error.status()), (*code, *status), "{error}");
            assert!(codes.insert(*code), "{code} twice");
        }
    }
}
