//! The edge's errors: `EdgeError`, every refusal the Worker and its objects make, with its code and status; `ApiError`, the rendered body; and `ALL_CODES`, every code the API answers with.

use nightshift_core::background::BgError;
use nightshift_core::error::WireError;
use nightshift_core::repository::RepoError;
use nightshift_core::signing::SignError;
use nightshift_core::token::TokenError;
use nightshift_core::wire::{error_json, MAX_BODY_BYTES};
use nightshift_core::CoreError;
use thiserror::Error;
use worker::{Headers, Response};

/// A refusal made by the edge itself (the core's refusals are `CoreError`, `BgError`,
/// `RepoError`, `WireError` and `TokenError`). Codes are part of the public API: never rename
/// one. A new variant gets its code and status below, a sample in the tests, and its code in
/// `ALL_CODES` and `src/openapi.json` (the tests check all three).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EdgeError {
    /// Something of the named kind (`route`, `session`, `prompt`) is not there.
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("no route {method} {path}; the API is described at /openapi.json")]
    NoRoute { method: String, path: String },
    #[error("dev sign-in is disabled in this deployment; sign in with GitHub")]
    DevSignInDisabled,
    #[error("sign in first: send Authorization: Bearer <token>")]
    Unauthenticated,
    #[error("use Authorization: Bearer <token>")]
    NotBearer,
    #[error("user must be 1-64 characters of a-z, 0-9, '-', '_' or '.'")]
    InvalidUser,
    /// A field out of its bounds; the text names the field and the bounds.
    #[error("{0}")]
    InvalidInput(&'static str),
    /// A query parameter that is missing or malformed; the text says which and how.
    #[error("{0}")]
    InvalidQuery(&'static str),
    #[error("request body is larger than {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    #[error("could not read the request body")]
    UnreadableBody,
    #[error("no such session; check the id or create one with POST /sessions")]
    SessionNotFound,
    #[error("this session already exists")]
    SessionExists,
    #[error("connect with a WebSocket (Upgrade: websocket)")]
    UpgradeRequired,
    /// Sent as a WebSocket error frame only.
    #[error("send JSON text frames")]
    BinaryNotSupported,
    /// A fault of ours, storage or the platform. A bad body between two of our objects is one
    /// too: it keeps the code `internal` that a client sees today.
    #[error("internal error: {0}; retry, and report it if it persists")]
    Internal(String),
    #[error("set PROVIDER_URL and PROVIDER_SECRET to run prompts in sandboxes")]
    ProviderNotConfigured,
    #[error("the provider at {base} did not answer: {error}")]
    ProviderSilent { base: String, error: String },
    #[error("the provider could not look up snapshot {id} ({status}): {answer}")]
    SnapshotLookupFailed {
        id: String,
        status: u16,
        answer: String,
    },
    /// A request to the provider could not be signed.
    #[error("{0}")]
    Signing(SignError),
    #[error("this session has no live snapshot {0}")]
    NoLiveSnapshot(String),
    #[error("this session has no live snapshot {0} (unknown, expired, deleted or another session's); GET /sessions/:id lists its snapshots")]
    SnapshotNotRestorable(String),
    #[error("this session has no live snapshot; take one with POST /sandbox/:id/snapshot")]
    NoRestorableSnapshot,
    #[error("no snapshot {0}")]
    NoSnapshot(String),
    #[error("the provider no longer has snapshot {0}")]
    SnapshotGone(String),
    /// The provider did not take a snapshot: its status, and its code and message when it gave
    /// them (passed through).
    #[error("{}", .message.as_deref().unwrap_or("the provider did not take the snapshot"))]
    SnapshotRefused {
        status: u16,
        code: Option<String>,
        message: Option<String>,
    },
    #[error("no sandbox {0}")]
    SandboxNotFound(String),
    #[error("a service is a name such as `supervisor` or `opencode`")]
    InvalidService,
    #[error("sandbox {id} is {status}; its checkout is gone, so it cannot be snapshotted; restore one of the session's snapshots instead")]
    SandboxTerminated { id: String, status: String },
    #[error("the session has no live sandbox")]
    NoLiveSandbox,
    /// The provider refused to create the sandbox; the text says how.
    #[error("{0}")]
    SandboxFailed(String),
    #[error("agent tools work only while one of this session's prompts runs")]
    NoRunningPrompt,
    #[error("{0}")]
    InvalidToolRequest(String),
    #[error("no such repository")]
    RepositoryNotFound,
    #[error("no such repository; register it with POST /repositories")]
    RepositoryNotRegistered,
    #[error("this pull request has no session yet; POST /pr-session starts one")]
    PrSessionNotFound,
    #[error("{0} is already registered; change it with PATCH")]
    RepositoryExists(String),
    #[error("no such build")]
    BuildNotFound,
    #[error("the provider refused the build ({status}): {reason}")]
    BuildRefused { status: u16, reason: String },
    #[error("no such background agent; ids look like bg_<tenant>_<hex>")]
    NoSuchAgent,
    /// The agent's `what` (its session, its prompt) was refused with `answer`.
    #[error("the agent's {what} was refused: {answer}")]
    AgentStartFailed { what: &'static str, answer: String },
    #[error("Last-Event-ID must be an event number")]
    InvalidEventId,
    #[error("event {after} is not one this agent's stream has sent (its newest is {newest}); resume from 0 to get everything")]
    StaleEventId { after: i64, newest: i64 },
    #[error("this deployment has no GitHub App; set GITHUB_APP_CLIENT_ID and GITHUB_APP_CLIENT_SECRET (README, \"Deploy for a team\")")]
    GithubNotConfigured,
    #[error("GitHub did not answer: {0}; retry in a moment")]
    GithubUnreachable(String),
    #[error("GitHub no longer accepts your sign-in; sign in with GitHub again")]
    GithubTokenInvalid,
    #[error("GitHub says you cannot see or change this repository; ask an admin of it for access")]
    GithubNoAccess,
    #[error("GitHub refused: {0}")]
    GithubRefused(String),
    #[error("GitHub refused the sign-in ({0}); start again from the sign-in button")]
    OAuthRefused(String),
    #[error("the GitHub App's private key cannot be used: {0}; set GITHUB_APP_PRIVATE_KEY to the PEM GitHub gave you")]
    GithubAppKey(String),
    #[error("{0}")]
    OAuthFlow(nightshift_core::signin::FlowError),
    #[error("{0}")]
    Ticket(nightshift_core::signin::TicketError),
    #[error("{0}")]
    SignIn(nightshift_core::signin::SignInError),
    #[error("TOKEN_ENCRYPTION_KEY is not set, so GitHub tokens cannot be stored; set it with wrangler secret put")]
    TokenKeyNotConfigured,
    #[error("dev sign-in works only from this machine (a loopback address); sign in with GitHub")]
    DevSignInLocalOnly,
    #[error("sign in with GitHub to use this repository (dev sign-ins have no GitHub identity)")]
    GithubNotLinked,
    #[error("this needs {0} permission on the repository on GitHub")]
    RoleRequired(&'static str),
    #[error(
        "the Nightshift GitHub App is not installed on {0}; install it on the repository first"
    )]
    AppNotInstalled(String),
    #[error("repositories in this deployment come from GitHub: register one with `github: \"owner/name\"`")]
    GithubRepositoryRequired,
    /// A quota (`what`) is used up until `retry_after_s` seconds from now.
    #[error("{what}: quota reached; retry in {retry_after_s} s")]
    QuotaExceeded {
        what: &'static str,
        retry_after_s: u64,
    },
    #[error("{0}")]
    Webhook(nightshift_core::github::WebhookError),
    /// A request from Slack that cannot be trusted or read, or Slack is not configured.
    #[error("{0}")]
    Slack(nightshift_core::slack::SlackError),
    #[error(
        "this Slack link is unknown, used or expired: ask the bot again in Slack for a new one"
    )]
    SlackLinkUnknown,
}

impl EdgeError {
    /// A fault of ours (storage, serialization, a bad body between our objects).
    pub fn internal(e: impl std::fmt::Display) -> EdgeError {
        EdgeError::Internal(e.to_string())
    }

    /// Stable machine-readable code.
    pub fn code(&self) -> &str {
        match self {
            EdgeError::NotFound(_) | EdgeError::NoRoute { .. } | EdgeError::DevSignInDisabled => {
                "not_found"
            }
            EdgeError::Unauthenticated => "unauthenticated",
            EdgeError::NotBearer => "token_malformed",
            EdgeError::InvalidUser => "invalid_user",
            EdgeError::InvalidInput(_) => "invalid_input",
            EdgeError::InvalidQuery(_) => "invalid_query",
            EdgeError::BodyTooLarge => "body_too_large",
            EdgeError::UnreadableBody => "invalid_body",
            EdgeError::SessionNotFound => "session_not_found",
            EdgeError::SessionExists => "session_exists",
            EdgeError::UpgradeRequired => "upgrade_required",
            EdgeError::BinaryNotSupported => "binary_not_supported",
            EdgeError::Internal(_) => "internal",
            EdgeError::ProviderNotConfigured => "provider_not_configured",
            EdgeError::ProviderSilent { .. } | EdgeError::SnapshotLookupFailed { .. } => {
                "provider_unavailable"
            }
            EdgeError::Signing(e) => e.code(),
            EdgeError::NoLiveSnapshot(_)
            | EdgeError::SnapshotNotRestorable(_)
            | EdgeError::NoRestorableSnapshot
            | EdgeError::NoSnapshot(_)
            | EdgeError::SnapshotGone(_) => "snapshot_not_found",
            EdgeError::SnapshotRefused { code, .. } => code.as_deref().unwrap_or("snapshot_failed"),
            EdgeError::SandboxNotFound(_) => "sandbox_not_found",
            EdgeError::InvalidService => "invalid_service",
            EdgeError::SandboxTerminated { .. } => "sandbox_terminated",
            EdgeError::NoLiveSandbox => "no_sandbox",
            EdgeError::SandboxFailed(_) => "sandbox_failed",
            EdgeError::NoRunningPrompt => "no_running_prompt",
            EdgeError::InvalidToolRequest(_) => "invalid_tool_request",
            EdgeError::RepositoryNotFound | EdgeError::RepositoryNotRegistered => {
                "repository_not_found"
            }
            EdgeError::RepositoryExists(_) => "repository_exists",
            EdgeError::PrSessionNotFound => "pr_session_not_found",
            EdgeError::BuildNotFound => "image_not_found",
            EdgeError::BuildRefused { .. } => "build_refused",
            EdgeError::NoSuchAgent => "agent_not_found",
            EdgeError::AgentStartFailed { .. } => "agent_start_failed",
            EdgeError::InvalidEventId => "invalid_event_id",
            EdgeError::StaleEventId { .. } => "stale_event_id",
            EdgeError::GithubNotConfigured => "github_not_configured",
            EdgeError::GithubUnreachable(_) => "github_unavailable",
            EdgeError::GithubTokenInvalid => "github_token_invalid",
            EdgeError::GithubNoAccess => "github_no_access",
            EdgeError::GithubRefused(_) => "github_refused",
            EdgeError::OAuthRefused(_) => "oauth_refused",
            EdgeError::GithubAppKey(_) => "github_app_key",
            EdgeError::OAuthFlow(e) => e.code(),
            EdgeError::Ticket(e) => e.code(),
            EdgeError::SignIn(e) => e.code(),
            EdgeError::TokenKeyNotConfigured => "token_key_not_configured",
            EdgeError::DevSignInLocalOnly => "dev_sign_in_local_only",
            EdgeError::GithubNotLinked => "github_not_linked",
            EdgeError::RoleRequired(_) => "repository_role_required",
            EdgeError::AppNotInstalled(_) => "app_not_installed",
            EdgeError::GithubRepositoryRequired => "github_repository_required",
            EdgeError::QuotaExceeded { .. } => "quota_exceeded",
            EdgeError::Webhook(e) => e.code(),
            EdgeError::Slack(e) => e.code(),
            EdgeError::SlackLinkUnknown => "slack_link_unknown",
        }
    }

    /// HTTP status the edge answers with.
    pub fn status(&self) -> u16 {
        match self {
            EdgeError::InvalidUser
            | EdgeError::InvalidInput(_)
            | EdgeError::InvalidQuery(_)
            | EdgeError::UnreadableBody
            | EdgeError::BinaryNotSupported
            | EdgeError::InvalidService
            | EdgeError::InvalidToolRequest(_)
            | EdgeError::InvalidEventId
            | EdgeError::OAuthRefused(_)
            | EdgeError::OAuthFlow(_)
            | EdgeError::GithubRepositoryRequired => 400,
            EdgeError::Unauthenticated
            | EdgeError::NotBearer
            | EdgeError::GithubTokenInvalid
            | EdgeError::Ticket(_)
            | EdgeError::SignIn(_) => 401,
            EdgeError::GithubNoAccess
            | EdgeError::DevSignInLocalOnly
            | EdgeError::GithubNotLinked
            | EdgeError::RoleRequired(_)
            | EdgeError::AppNotInstalled(_) => 403,
            EdgeError::GithubNotConfigured => 404,
            EdgeError::QuotaExceeded { .. } => 429,
            EdgeError::GithubUnreachable(_) | EdgeError::GithubRefused(_) => 502,
            EdgeError::GithubAppKey(_) | EdgeError::TokenKeyNotConfigured => 500,
            // Like an unconfigured GitHub webhook: this deployment has no such endpoint.
            EdgeError::Slack(nightshift_core::slack::SlackError::NotConfigured) => 404,
            EdgeError::Slack(e) => e.status(),
            EdgeError::SlackLinkUnknown => 404,
            EdgeError::Webhook(e) => match e {
                nightshift_core::github::WebhookError::NotConfigured => 404,
                nightshift_core::github::WebhookError::BadPayload(_) => 400,
                nightshift_core::github::WebhookError::UnknownEvent => 202,
                _ => 401,
            },
            EdgeError::NotFound(_)
            | EdgeError::NoRoute { .. }
            | EdgeError::DevSignInDisabled
            | EdgeError::SessionNotFound
            | EdgeError::NoLiveSnapshot(_)
            | EdgeError::SnapshotNotRestorable(_)
            | EdgeError::NoRestorableSnapshot
            | EdgeError::NoSnapshot(_)
            | EdgeError::SnapshotGone(_)
            | EdgeError::SandboxNotFound(_)
            | EdgeError::RepositoryNotFound
            | EdgeError::RepositoryNotRegistered
            | EdgeError::PrSessionNotFound
            | EdgeError::BuildNotFound
            | EdgeError::NoSuchAgent => 404,
            EdgeError::SessionExists
            | EdgeError::SandboxTerminated { .. }
            | EdgeError::NoLiveSandbox
            | EdgeError::NoRunningPrompt
            | EdgeError::RepositoryExists(_)
            | EdgeError::StaleEventId { .. } => 409,
            EdgeError::BodyTooLarge => 413,
            EdgeError::UpgradeRequired => 426,
            EdgeError::Internal(_) => 500,
            EdgeError::ProviderSilent { .. }
            | EdgeError::SnapshotLookupFailed { .. }
            | EdgeError::SandboxFailed(_)
            | EdgeError::BuildRefused { .. }
            | EdgeError::AgentStartFailed { .. } => 502,
            EdgeError::ProviderNotConfigured | EdgeError::Signing(_) => 503,
            EdgeError::SnapshotRefused { status, .. } => *status,
        }
    }

    /// The status and JSON body of this refusal, for code that passes answers on as values.
    pub fn answer(&self) -> (u16, serde_json::Value) {
        /// `{"error": {"code", "message"}}`, as every HTTP refusal's body.
        #[derive(serde::Serialize)]
        struct Refusal {
            error: nightshift_core::wire::ErrorBody,
        }
        let refusal = Refusal {
            error: nightshift_core::wire::ErrorBody {
                code: self.code().to_string(),
                message: self.to_string(),
            },
        };
        // Two strings: encoding cannot fail.
        let body = serde_json::to_value(&refusal).unwrap_or_default();
        (self.status(), body)
    }
}

/// Every code the API answers with, over HTTP or in a WebSocket error frame: the edge's
/// (`EdgeError`, with the two `SignError`s signing can give) and the core's (`CoreError`,
/// `WireError`, `TokenError`, `BgError`, `RepoError`). Sorted, each once. `src/openapi.json`
/// lists the same codes (`x-error-codes` on the Error schema's `code`); the tests check both
/// directions, and that this is exactly the codes of the enums. A refusal of the compute
/// provider may pass through with its own code (`EdgeError::SnapshotRefused`,
/// docs/provider-contract.md); those are the provider's, not listed here.
#[cfg_attr(not(test), allow(dead_code))]
pub const ALL_CODES: &[&str] = &[
    "agent_not_found",
    "agent_start_failed",
    "app_not_installed",
    "auth_not_configured",
    "bad_invite",
    "bad_sandbox_token",
    "binary_not_supported",
    "body_too_large",
    "build_refused",
    "client_limit",
    "dev_sign_in_local_only",
    "frame_too_large",
    "github_app_key",
    "github_no_access",
    "github_not_configured",
    "github_not_linked",
    "github_refused",
    "github_repository_required",
    "github_token_invalid",
    "github_unavailable",
    "image_not_found",
    "image_not_ready",
    "internal",
    "invalid_body",
    "invalid_command",
    "invalid_event",
    "invalid_event_id",
    "invalid_input",
    "invalid_json",
    "invalid_message",
    "invalid_model",
    "invalid_query",
    "invalid_repository",
    "invalid_service",
    "invalid_tool_request",
    "invalid_transition",
    "invalid_user",
    "lock_held",
    "lock_limit",
    "lock_not_held",
    "malformed_json",
    "member_limit",
    "message_too_large",
    "no_repository",
    "no_running_prompt",
    "no_sandbox",
    "not_found",
    "not_member",
    "not_your_agent",
    "not_your_client",
    "not_your_prompt",
    "nothing_running",
    "oauth_flow_missing",
    "oauth_refused",
    "oauth_state_mismatch",
    "out_of_order",
    "owner_cannot_leave",
    "owner_only",
    "pr_session_not_found",
    "prompt_not_found",
    "prompt_not_queued",
    "prompt_running",
    "provider_not_configured",
    "provider_unavailable",
    "queue_full",
    "quota_exceeded",
    "repository_exists",
    "repository_not_found",
    "repository_role_required",
    "sandbox_failed",
    "sandbox_not_found",
    "sandbox_retired",
    "sandbox_spawning",
    "sandbox_terminated",
    "session_ended",
    "session_exists",
    "session_not_found",
    "sign_in_expired",
    "sign_in_unknown",
    "signature_invalid",
    "signature_malformed",
    "signature_missing",
    "signed_out",
    "slack_link_unknown",
    "slack_not_configured",
    "slack_payload_invalid",
    "slack_signature_invalid",
    "slack_signature_malformed",
    "slack_signature_missing",
    "slack_timestamp_missing",
    "slack_timestamp_stale",
    "snapshot_failed",
    "snapshot_in_progress",
    "snapshot_not_found",
    "stale_event_id",
    "ticket_expired",
    "ticket_invalid",
    "ticket_used",
    "ticket_wrong_session",
    "token_expired",
    "token_invalid",
    "token_key_not_configured",
    "token_malformed",
    "too_deep",
    "too_many_children",
    "unauthenticated",
    "unknown_client",
    "unknown_message_type",
    "unknown_type",
    "unsigned",
    "upgrade_required",
    "webhook_not_configured",
    "webhook_payload_invalid",
];

/// The rendered refusal: status, code and message, as every error body carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: String,
    pub message: String,
    /// Seconds to wait before asking again (a quota's `Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: u16, code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.to_string(),
            message: message.into(),
            retry_after: None,
        }
    }

    /// The refusal another object answered with (its error body), kept as it was.
    pub fn refused(status: u16, body: &[u8], retry_after: Option<u64>) -> ApiError {
        #[derive(serde::Deserialize)]
        struct Refusal {
            error: nightshift_core::wire::ErrorBody,
        }
        match serde_json::from_slice::<Refusal>(body) {
            Ok(refusal) => ApiError {
                status,
                code: refusal.error.code,
                message: refusal.error.message,
                retry_after,
            },
            Err(_) => {
                ApiError::internal(format!("an object answered {status} without an error body"))
            }
        }
    }

    /// Shorthand for `EdgeError::internal(e)`, rendered.
    pub fn internal(e: impl std::fmt::Display) -> ApiError {
        EdgeError::internal(e).into()
    }

    pub fn into_response(self) -> worker::Result<Response> {
        let resp = json_response(self.status, error_json(&self.code, &self.message))?;
        if let Some(seconds) = self.retry_after {
            resp.headers().set("retry-after", &seconds.to_string())?;
        }
        Ok(resp)
    }
}

impl From<EdgeError> for ApiError {
    fn from(e: EdgeError) -> Self {
        let mut error = ApiError::new(e.status(), e.code(), e.to_string());
        if let EdgeError::QuotaExceeded { retry_after_s, .. } = e {
            error.retry_after = Some(retry_after_s.max(1));
        }
        error
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        ApiError::new(e.status(), e.code(), e.to_string())
    }
}

impl From<BgError> for ApiError {
    fn from(e: BgError) -> Self {
        ApiError::new(e.status(), e.code(), e.to_string())
    }
}

impl From<RepoError> for ApiError {
    fn from(e: RepoError) -> Self {
        ApiError::new(e.status(), e.code(), e.to_string())
    }
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        let status = if e.code == "body_too_large" { 413 } else { 400 };
        ApiError::new(status, e.code, e.message)
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        let status = if e == TokenError::NoSecret { 500 } else { 401 };
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl From<worker::Error> for ApiError {
    fn from(e: worker::Error) -> Self {
        ApiError::internal(e)
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON response with a status.
pub fn json_response(status: u16, body: String) -> worker::Result<Response> {
    let headers = Headers::new();
    headers.set("content-type", "application/json; charset=utf-8")?;
    headers.set("cache-control", "no-store")?;
    Ok(Response::ok(body)?
        .with_status(status)
        .with_headers(headers))
}

/// Serializes a value as a JSON response.
pub fn json_of<T: serde::Serialize>(status: u16, value: &T) -> ApiResult<Response> {
    let body = serde_json::to_string(value).map_err(ApiError::internal)?;
    json_response(status, body).map_err(ApiError::from)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;

    fn s() -> String {
        "x".to_string()
    }

    /// One of each `EdgeError` variant, with the code and status it must answer with.
    fn edge_samples() -> Vec<(EdgeError, &'static str, u16)> {
        use nightshift_core::github::WebhookError;
        use nightshift_core::signin::{FlowError, SignInError, TicketError};
        use nightshift_core::slack::SlackError;
        use EdgeError::*;
        vec![
            (NotFound("route"), "not_found", 404),
            (
                NoRoute {
                    method: s(),
                    path: s(),
                },
                "not_found",
                404,
            ),
            (DevSignInDisabled, "not_found", 404),
            (Unauthenticated, "unauthenticated", 401),
            (NotBearer, "token_malformed", 401),
            (InvalidUser, "invalid_user", 400),
            (InvalidInput("x"), "invalid_input", 400),
            (InvalidQuery("x"), "invalid_query", 400),
            (BodyTooLarge, "body_too_large", 413),
            (UnreadableBody, "invalid_body", 400),
            (SessionNotFound, "session_not_found", 404),
            (SessionExists, "session_exists", 409),
            (UpgradeRequired, "upgrade_required", 426),
            (BinaryNotSupported, "binary_not_supported", 400),
            (Internal(s()), "internal", 500),
            (ProviderNotConfigured, "provider_not_configured", 503),
            (
                ProviderSilent {
                    base: s(),
                    error: s(),
                },
                "provider_unavailable",
                502,
            ),
            (
                SnapshotLookupFailed {
                    id: s(),
                    status: 500,
                    answer: s(),
                },
                "provider_unavailable",
                502,
            ),
            // Signing gives only these two (a nonce the edge made is always well formed).
            (Signing(SignError::Missing), "unsigned", 503),
            (Signing(SignError::NoSecret), "provider_not_configured", 503),
            (NoLiveSnapshot(s()), "snapshot_not_found", 404),
            (SnapshotNotRestorable(s()), "snapshot_not_found", 404),
            (NoRestorableSnapshot, "snapshot_not_found", 404),
            (NoSnapshot(s()), "snapshot_not_found", 404),
            (SnapshotGone(s()), "snapshot_not_found", 404),
            (
                SnapshotRefused {
                    status: 502,
                    code: None,
                    message: None,
                },
                "snapshot_failed",
                502,
            ),
            (SandboxNotFound(s()), "sandbox_not_found", 404),
            (InvalidService, "invalid_service", 400),
            (
                SandboxTerminated {
                    id: s(),
                    status: s(),
                },
                "sandbox_terminated",
                409,
            ),
            (NoLiveSandbox, "no_sandbox", 409),
            (SandboxFailed(s()), "sandbox_failed", 502),
            (NoRunningPrompt, "no_running_prompt", 409),
            (InvalidToolRequest(s()), "invalid_tool_request", 400),
            (RepositoryNotFound, "repository_not_found", 404),
            (RepositoryNotRegistered, "repository_not_found", 404),
            (RepositoryExists(s()), "repository_exists", 409),
            (PrSessionNotFound, "pr_session_not_found", 404),
            (BuildNotFound, "image_not_found", 404),
            (
                BuildRefused {
                    status: 500,
                    reason: s(),
                },
                "build_refused",
                502,
            ),
            (NoSuchAgent, "agent_not_found", 404),
            (
                AgentStartFailed {
                    what: "prompt",
                    answer: s(),
                },
                "agent_start_failed",
                502,
            ),
            (InvalidEventId, "invalid_event_id", 400),
            (
                StaleEventId {
                    after: 9,
                    newest: 1,
                },
                "stale_event_id",
                409,
            ),
            (GithubNotConfigured, "github_not_configured", 404),
            (GithubUnreachable(s()), "github_unavailable", 502),
            (GithubTokenInvalid, "github_token_invalid", 401),
            (GithubNoAccess, "github_no_access", 403),
            (GithubRefused(s()), "github_refused", 502),
            (OAuthRefused(s()), "oauth_refused", 400),
            (GithubAppKey(s()), "github_app_key", 500),
            (OAuthFlow(FlowError::NoFlow), "oauth_flow_missing", 400),
            (
                OAuthFlow(FlowError::StateMismatch),
                "oauth_state_mismatch",
                400,
            ),
            (Ticket(TicketError::Invalid), "ticket_invalid", 401),
            (Ticket(TicketError::Expired), "ticket_expired", 401),
            (
                Ticket(TicketError::WrongSession),
                "ticket_wrong_session",
                401,
            ),
            (Ticket(TicketError::Used), "ticket_used", 401),
            (SignIn(SignInError::SignedOut), "signed_out", 401),
            (SignIn(SignInError::TooOld), "sign_in_expired", 401),
            (SignIn(SignInError::Unknown), "sign_in_unknown", 401),
            (TokenKeyNotConfigured, "token_key_not_configured", 500),
            (DevSignInLocalOnly, "dev_sign_in_local_only", 403),
            (GithubNotLinked, "github_not_linked", 403),
            (RoleRequired("read"), "repository_role_required", 403),
            (AppNotInstalled(s()), "app_not_installed", 403),
            (GithubRepositoryRequired, "github_repository_required", 400),
            (
                QuotaExceeded {
                    what: "x",
                    retry_after_s: 1,
                },
                "quota_exceeded",
                429,
            ),
            (
                Webhook(WebhookError::NotConfigured),
                "webhook_not_configured",
                404,
            ),
            (Webhook(WebhookError::Missing), "signature_missing", 401),
            (Webhook(WebhookError::Malformed), "signature_malformed", 401),
            (
                Webhook(WebhookError::BadSignature),
                "signature_invalid",
                401,
            ),
            (
                Webhook(WebhookError::BadPayload(s())),
                "webhook_payload_invalid",
                400,
            ),
            (
                Slack(SlackError::NotConfigured),
                "slack_not_configured",
                404,
            ),
            (
                Slack(SlackError::TimestampMissing),
                "slack_timestamp_missing",
                401,
            ),
            (
                Slack(SlackError::TimestampStale),
                "slack_timestamp_stale",
                401,
            ),
            (
                Slack(SlackError::SignatureMissing),
                "slack_signature_missing",
                401,
            ),
            (
                Slack(SlackError::SignatureMalformed),
                "slack_signature_malformed",
                401,
            ),
            (
                Slack(SlackError::SignatureInvalid),
                "slack_signature_invalid",
                401,
            ),
            (
                Slack(SlackError::BadPayload(s())),
                "slack_payload_invalid",
                400,
            ),
            (SlackLinkUnknown, "slack_link_unknown", 404),
        ]
    }

    fn core_samples() -> Vec<CoreError> {
        use CoreError::*;
        vec![
            NotMember,
            OwnerOnly,
            OwnerCannotLeave,
            BadInvite,
            ClientLimit { limit: 1 },
            MemberLimit { limit: 1 },
            UnknownClient(s()),
            NotYourClient(s()),
            LockHeld {
                resource: s(),
                holder: s(),
                expires_at: 1,
            },
            LockNotHeld(s()),
            QueueFull { max: 1 },
            PromptNotFound(s()),
            NotYourPrompt(s()),
            PromptNotQueued {
                id: s(),
                status: s(),
            },
            NothingRunning,
            Invalid(s()),
            SessionEnded,
            NoSandbox,
            BadSandboxToken,
            SandboxRetired,
            SandboxSpawning("x"),
            PromptRunning,
            NoRepository,
            OutOfOrder {
                got: 3,
                expected: 2,
            },
            SnapshotInProgress,
            LockLimit { limit: 1 },
        ]
    }

    fn token_samples() -> Vec<TokenError> {
        use TokenError::*;
        vec![Malformed, BadSignature, Expired, NoSecret]
    }

    fn bg_samples() -> Vec<BgError> {
        use BgError::*;
        vec![
            QueueFull { max: 1 },
            TooDeep { depth: 2, max: 1 },
            TooManyChildren { max: 1 },
            NotFound(s()),
            InvalidTransition {
                id: s(),
                status: s(),
                to: s(),
            },
            NotYours(s()),
            Invalid(s()),
        ]
    }

    fn repo_samples() -> Vec<RepoError> {
        use RepoError::*;
        vec![
            Invalid(s()),
            ImageNotFound(s()),
            ImageNotReady {
                id: s(),
                status: s(),
            },
        ]
    }

    /// Rendered through the same `From` the edge answers with.
    fn rendered() -> Vec<ApiError> {
        let mut out: Vec<ApiError> = edge_samples().into_iter().map(|(e, ..)| e.into()).collect();
        out.extend(core_samples().into_iter().map(ApiError::from));
        out.extend(token_samples().into_iter().map(ApiError::from));
        out.extend(bg_samples().into_iter().map(ApiError::from));
        out.extend(repo_samples().into_iter().map(ApiError::from));
        out.extend(
            wire_codes()
                .into_iter()
                .map(|c| ApiError::from(WireError::new(c, "x"))),
        );
        out
    }

    fn root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR"))
    }

    fn read(path: &str) -> String {
        std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The variants `enum <name>` declares in a rustfmt-formatted source file: the lines inside
    /// its braces indented by exactly four spaces that start with a capital letter.
    fn declared_variants(source: &str, name: &str) -> Vec<String> {
        let start = format!("pub enum {name} {{");
        let body = source
            .split_once(&start)
            .map(|(_, rest)| rest)
            .unwrap_or_else(|| panic!("no `{start}`"));
        let body = body.split("\n}").next().unwrap_or_default();
        body.lines()
            .filter_map(|l| l.strip_prefix("    "))
            .filter(|l| l.starts_with(|c: char| c.is_ascii_uppercase()))
            .map(|l| l.chars().take_while(char::is_ascii_alphanumeric).collect())
            .collect()
    }

    fn variant_name(e: &impl std::fmt::Debug) -> String {
        format!("{e:?}")
            .chars()
            .take_while(char::is_ascii_alphanumeric)
            .collect()
    }

    /// The source without its `mod tests { … }` (rustfmt closes it at the start of a line):
    /// what tests construct is not an answer of the API.
    fn without_tests(text: &str) -> String {
        const START: &str = "#[cfg(test)]\nmod tests {";
        match text.split_once(START) {
            Some((before, after)) => {
                let after = after.split_once("\n}\n").map_or("", |(_, rest)| rest);
                format!("{before}{}", without_tests(after))
            }
            None => text.to_string(),
        }
    }

    /// Every code given to `WireError::new` outside tests in the core and the Worker (it must
    /// be a literal: the scan refuses anything else).
    fn wire_codes() -> BTreeSet<&'static str> {
        let mut codes = BTreeSet::new();
        for dir in ["core/src", "src", "durable_objects"] {
            let entries =
                std::fs::read_dir(root().join(dir)).unwrap_or_else(|e| panic!("{dir}: {e}"));
            for entry in entries {
                let path = entry.unwrap_or_else(|e| panic!("{dir}: {e}")).path();
                if path.extension().is_none_or(|x| x != "rs") {
                    continue;
                }
                let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{e}"));
                let text = without_tests(&text);
                for (i, m) in text.match_indices("WireError::new(") {
                    let rest = text[i + m.len()..].trim_start();
                    let code = rest
                        .strip_prefix('"')
                        .and_then(|r| r.split_once('"'))
                        .map(|(c, _)| c)
                        .unwrap_or_else(|| {
                            panic!("{}: WireError::new without a literal code", path.display())
                        });
                    codes.insert(String::leak(code.to_string()) as &str);
                }
            }
        }
        codes
    }

    /// The codes and statuses of the edge's refusals are public: pinned here.
    #[test]
    fn every_edge_refusal_has_its_stable_code_and_status() {
        for (e, code, status) in edge_samples() {
            assert_eq!((e.code(), e.status()), (code, status), "{e:?}");
            let rendered = ApiError::from(e.clone());
            assert_eq!((rendered.code.as_str(), rendered.status), (code, status));
            assert_eq!(rendered.message, e.to_string());
        }
    }

    /// A variant without a sample above would be a code nobody checked: refused.
    #[test]
    fn every_variant_has_a_sample() {
        let check = |file: &str, name: &str, sampled: Vec<String>| {
            let sampled: BTreeSet<String> = sampled.into_iter().collect();
            let declared: BTreeSet<String> =
                declared_variants(&read(file), name).into_iter().collect();
            let unsampled: Vec<_> = declared.difference(&sampled).collect();
            assert!(
                unsampled.is_empty(),
                "{name}: no sample in src/error.rs tests for {unsampled:?}"
            );
            // The scan found the enum's variants (all of them, as the samples are of real ones).
            assert_eq!(
                declared, sampled,
                "{name}: the scan of {file} misread the enum"
            );
        };
        check(
            "src/error.rs",
            "EdgeError",
            edge_samples()
                .iter()
                .map(|(e, ..)| variant_name(e))
                .collect(),
        );
        check(
            "core/src/error.rs",
            "CoreError",
            core_samples().iter().map(variant_name).collect(),
        );
        check(
            "core/src/token.rs",
            "TokenError",
            token_samples().iter().map(variant_name).collect(),
        );
        check(
            "core/src/background.rs",
            "BgError",
            bg_samples().iter().map(variant_name).collect(),
        );
        check(
            "core/src/repository.rs",
            "RepoError",
            repo_samples().iter().map(variant_name).collect(),
        );
    }

    /// `ALL_CODES` is exactly the codes the error types make: none missing, none extra.
    #[test]
    fn the_code_table_is_every_code_the_errors_make() {
        assert!(
            ALL_CODES.windows(2).all(|w| w[0] < w[1]),
            "ALL_CODES: sort it, each code once"
        );
        let table: BTreeSet<&str> = ALL_CODES.iter().copied().collect();
        let made: BTreeSet<String> = rendered().into_iter().map(|e| e.code).collect();
        let made: BTreeSet<&str> = made.iter().map(String::as_str).collect();
        let missing: Vec<_> = made.difference(&table).collect();
        let extra: Vec<_> = table.difference(&made).collect();
        assert!(
            missing.is_empty(),
            "codes missing from ALL_CODES: {missing:?}"
        );
        assert!(
            extra.is_empty(),
            "codes in ALL_CODES that no error makes: {extra:?}"
        );
    }

    /// `src/openapi.json` documents exactly the codes of `ALL_CODES`.
    #[test]
    fn the_code_table_and_openapi_agree() {
        let doc: serde_json::Value =
            serde_json::from_str(&read("src/openapi.json")).unwrap_or_else(|e| panic!("{e}"));
        let listed = &doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]
            ["code"]["x-error-codes"];
        let listed: BTreeSet<&str> = listed
            .as_array()
            .unwrap_or_else(|| panic!("openapi.json: no x-error-codes on Error.error.code"))
            .iter()
            .map(|c| c.as_str().unwrap_or_else(|| panic!("not a string: {c}")))
            .collect();
        let table: BTreeSet<&str> = ALL_CODES.iter().copied().collect();
        let undocumented: Vec<_> = table.difference(&listed).collect();
        let unknown: Vec<_> = listed.difference(&table).collect();
        assert!(
            undocumented.is_empty(),
            "codes missing from src/openapi.json: {undocumented:?}"
        );
        assert!(
            unknown.is_empty(),
            "codes in src/openapi.json the API never answers with: {unknown:?}"
        );
    }
}
