//! The object-to-object protocol: every internal path, body, answer and header name the Worker's routers and the Durable Objects send one another, typed once and used by both ends.
//!
//! Objects are reachable only through the Worker, so these messages never cross the public API
//! (the public shapes are `core::wire`'s). Each object has a route enum (`*Route`): the caller
//! takes `method()` and `path()` from it, the receiver matches `parse(method, path)`, so both
//! ends name one item. Each body and answer is a serde struct; a receiver reads it with
//! [`read_body`] and a caller with [`read_answer`], and a malformed one is refused with
//! [`ObjectError`] (code `internal`, the message naming the path), never a panic.
//!
//! Wire shapes: the structs encode exactly as the `json!` bodies they replace (fields in
//! alphabetical order where `json!` sorted them; the tests pin every shape), except
//! `SpawnBody`, whose two callers sent different field sets: it now always sends all of them
//! (the receiver reads both old forms the same, pinned too). Headers carrying a value (the
//! identity, the agent link) are unchanged.

use nightshift_core::ids::Identity;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;
use worker::Method;

use crate::error::{ApiError, ApiResult, EdgeError};

/// The verified identity, from the Worker (or the scheduler, for an agent) to an object.
pub const IDENTITY_HEADER: &str = "x-nightshift-identity";
/// The id of the session being created (`/create`): the object's own name.
pub const SESSION_HEADER: &str = "x-nightshift-session";
/// The [`AgentLink`] of a background agent's session (`/create`, set only by the scheduler).
pub const BACKGROUND_HEADER: &str = "x-nightshift-background";
/// Who asks a scheduler shard ([`Viewer`]); set only by the Worker and the objects.
pub const VIEWER_HEADER: &str = "x-nightshift-viewer";
/// The shard a scheduler object is (its name; objects cannot read their own name).
pub const SHARD_HEADER: &str = "x-nightshift-shard";
/// Where a people's event stream resumes (server-sent events' standard header, passed on).
pub const LAST_EVENT_ID_HEADER: &str = "last-event-id";

/// A body or an answer between two objects that is not what the protocol says.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ObjectError {
    #[error("the body sent to {path} is malformed ({reason}); both ends must speak the same object protocol")]
    Body { path: String, reason: String },
    #[error("the answer of {path} is malformed ({reason}); both ends must speak the same object protocol")]
    Answer { path: String, reason: String },
    #[error("the {what} header is malformed ({reason})")]
    Header { what: &'static str, reason: String },
}

impl From<ObjectError> for ApiError {
    /// A fault of ours: it keeps the code `internal` that a client sees.
    fn from(e: ObjectError) -> ApiError {
        EdgeError::internal(e).into()
    }
}

/// The bytes of a body or an answer.
pub fn encode<T: Serialize>(message: &T) -> ApiResult<Vec<u8>> {
    serde_json::to_vec(message).map_err(ApiError::internal)
}

/// A body as the receiver at `path` reads it.
pub fn decode_body<T: DeserializeOwned>(path: &str, bytes: &[u8]) -> Result<T, ObjectError> {
    serde_json::from_slice(bytes).map_err(|e| ObjectError::Body {
        path: path.to_string(),
        reason: e.to_string(),
    })
}

/// An answer as the caller of `path` reads it.
pub fn decode_answer<T: DeserializeOwned>(path: &str, bytes: &[u8]) -> Result<T, ObjectError> {
    serde_json::from_slice(bytes).map_err(|e| ObjectError::Answer {
        path: path.to_string(),
        reason: e.to_string(),
    })
}

/// Reads the body of a request between objects.
pub async fn read_body<T: DeserializeOwned>(req: &mut worker::Request) -> ApiResult<T> {
    let bytes = req.bytes().await.map_err(|_| EdgeError::UnreadableBody)?;
    Ok(decode_body(&req.path(), &bytes)?)
}

/// Reads an object's answer to a call of `path`.
pub async fn read_answer<T: DeserializeOwned>(
    resp: &mut worker::Response,
    path: &str,
) -> ApiResult<T> {
    let bytes = resp.bytes().await.map_err(ApiError::internal)?;
    Ok(decode_answer(path, &bytes)?)
}

/// `path` with the caller's query (`?a=1`, or empty) after it.
pub fn with_query(path: &str, query: &str) -> String {
    format!("{path}{query}")
}

/// A path's segments (`/agents/bg_1/output` → `["agents", "bg_1", "output"]`).
fn segments(path: &str) -> Vec<&str> {
    path.split('/').filter(|s| !s.is_empty()).collect()
}

// ---------------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------------

/// `UserIndex` (one per person): the sessions they own or joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserIndexRoute {
    /// [`SessionEntry`] → the entry.
    Add,
    /// [`RemoveSession`] → [`Removed`].
    Remove,
    /// [`StatusChange`] → [`Updated`] (a session ended).
    Status,
    /// → `{"sessions": [SessionEntry…]}` (passed on to people as it is).
    List,
    /// [`BeginSignIn`] → `signin::SignIn` (a new sign-in, its `sid` for the token).
    SignInBegin,
    /// [`SignInRef`] → `signin::SignIn`, or the `signin::SignInError` refusal (401).
    SignInCheck,
    /// [`SignInRef`] → [`OkAnswer`]: sign-out; the sign-in admits nothing from now on.
    SignInEnd,
    /// [`RedeemTicket`] → [`OkAnswer`], or 401 `ticket_used` / the sign-in's refusal.
    TicketRedeem,
    /// [`LinkGithub`] → [`GithubAccount`]: the person's GitHub identity and tokens (sealed).
    GithubLink,
    /// → [`GithubAccount`], or 404 `github_not_linked`.
    GithubAccountGet,
    /// [`TokenAsk`] → [`UserToken`]: a user token good for 5 minutes at least (refreshed,
    /// once at a time).
    GithubToken,
    /// [`RoleAsk`] → [`RoleAnswer`]: the person's permission on a repository (cached briefly).
    GithubRole,
    /// [`QuotaAsk`] → [`OkAnswer`], or 429 `quota_exceeded` with `Retry-After`.
    Quota,
}

impl UserIndexRoute {
    const ALL: [(UserIndexRoute, Method, &'static str); 13] = [
        (UserIndexRoute::Add, Method::Post, "/add"),
        (UserIndexRoute::Remove, Method::Post, "/remove"),
        (UserIndexRoute::Status, Method::Post, "/status"),
        (UserIndexRoute::List, Method::Get, "/list"),
        (UserIndexRoute::SignInBegin, Method::Post, "/signin/begin"),
        (UserIndexRoute::SignInCheck, Method::Post, "/signin/check"),
        (UserIndexRoute::SignInEnd, Method::Post, "/signin/end"),
        (UserIndexRoute::TicketRedeem, Method::Post, "/ticket/redeem"),
        (UserIndexRoute::GithubLink, Method::Post, "/github/link"),
        (UserIndexRoute::GithubAccountGet, Method::Get, "/github"),
        (UserIndexRoute::GithubToken, Method::Post, "/github/token"),
        (UserIndexRoute::GithubRole, Method::Post, "/github/role"),
        (UserIndexRoute::Quota, Method::Post, "/quota"),
    ];

    pub fn method(self) -> Method {
        fixed(&Self::ALL, self).0
    }

    pub fn path(self) -> &'static str {
        fixed(&Self::ALL, self).1
    }

    pub fn parse(method: &Method, path: &str) -> Option<UserIndexRoute> {
        parse_fixed(&Self::ALL, method, path)
    }
}

/// `RepositoryIndex` (one, `all`): the registered names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepositoryIndexRoute {
    /// [`RepositoryName`] → [`Added`].
    Add,
    /// [`RepositoryName`] → [`Removed`] (a registration that did not complete).
    Remove,
    /// → [`Names`].
    List,
}

impl RepositoryIndexRoute {
    const ALL: [(RepositoryIndexRoute, Method, &'static str); 3] = [
        (RepositoryIndexRoute::Add, Method::Post, "/add"),
        (RepositoryIndexRoute::Remove, Method::Post, "/remove"),
        (RepositoryIndexRoute::List, Method::Get, "/list"),
    ];

    pub fn method(self) -> Method {
        fixed(&Self::ALL, self).0
    }

    pub fn path(self) -> &'static str {
        fixed(&Self::ALL, self).1
    }

    pub fn parse(method: &Method, path: &str) -> Option<RepositoryIndexRoute> {
        parse_fixed(&Self::ALL, method, path)
    }
}

/// `InstallationIndex` (one, `github`): the GitHub App's installations, the webhook
/// deliveries seen (each processed once), pull request → session, and installation tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallationRoute {
    /// [`WebhookDelivery`] (signature already verified) → [`DeliveryAnswer`].
    Delivery,
    /// [`PullLink`] → [`OkAnswer`]: the session that opened a pull request.
    LinkPull,
    /// [`RepositoryLink`] → [`OkAnswer`]: a registered repository's GitHub name.
    LinkRepository,
    /// [`InstallationAsk`] → [`InstallationAnswer`], or 403 `app_not_installed`.
    Installation,
    /// [`InstallationTokenAsk`] → [`InstallationTokenAnswer`] (cached until shortly before it
    /// expires).
    Token,
    /// No body → [`Redelivered`]: asks GitHub again for deliveries that failed.
    Redeliver,
    /// [`InstallationQuotaAsk`] → [`OkAnswer`], or 429 `quota_exceeded` with `Retry-After`.
    Quota,
    /// [`PrSessionAsk`] → [`PrSessionAnswer`]: a pull request's session (started if asked).
    PrSession,
    /// [`PersonRecord`] → [`OkAnswer`]: a person signed in with GitHub under these verified emails.
    PersonRecord,
    /// [`PersonFind`] → [`PersonFound`]: who signed in with this verified email.
    PersonFind,
}

/// `InstallationIndex` `/people`: a person who signed in with GitHub, by the verified emails
/// GitHub gave (what links a Slack account to them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonRecord {
    pub emails: Vec<String>,
    pub person: Identity,
}

/// `InstallationIndex` `/people/find`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonFind {
    pub email: String,
}

/// The answer of `/people/find`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonFound {
    #[serde(default)]
    pub person: Option<Identity>,
}

/// `InstallationIndex` `/pr-session`: the session of pull request `number` of `repository`
/// (`owner/name`); with `start`, that person starts one on its branch when there is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrSessionAsk {
    pub repository: String,
    pub number: u64,
    #[serde(default)]
    pub start: Option<nightshift_core::ids::Identity>,
}

/// The answer of `/pr-session`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrSessionAnswer {
    pub session: Option<String>,
    /// True when this ask started it.
    pub started: bool,
}

impl InstallationRoute {
    const ALL: [(InstallationRoute, Method, &'static str); 10] = [
        (InstallationRoute::Delivery, Method::Post, "/delivery"),
        (InstallationRoute::LinkPull, Method::Post, "/pulls/link"),
        (
            InstallationRoute::LinkRepository,
            Method::Post,
            "/repositories/link",
        ),
        (
            InstallationRoute::Installation,
            Method::Post,
            "/installation",
        ),
        (InstallationRoute::Token, Method::Post, "/token"),
        (InstallationRoute::Redeliver, Method::Post, "/redeliver"),
        (InstallationRoute::Quota, Method::Post, "/quota"),
        (InstallationRoute::PrSession, Method::Post, "/pr-session"),
        (InstallationRoute::PersonRecord, Method::Post, "/people"),
        (InstallationRoute::PersonFind, Method::Post, "/people/find"),
    ];

    pub fn method(self) -> Method {
        fixed(&Self::ALL, self).0
    }

    pub fn path(self) -> &'static str {
        fixed(&Self::ALL, self).1
    }

    pub fn parse(method: &Method, path: &str) -> Option<InstallationRoute> {
        parse_fixed(&Self::ALL, method, path)
    }
}

/// A verified webhook delivery, as the Worker hands it over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookDelivery {
    pub guid: String,
    pub event: String,
    /// The raw JSON body, as GitHub signed it.
    pub body: String,
}

/// The answer to a delivery: `duplicate` when this `X-GitHub-Delivery` was seen before
/// (nothing done again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryAnswer {
    pub guid: String,
    pub duplicate: bool,
    /// What was done: `installation`, `pull_request`, `build`, `ignored`, or `pending` when
    /// processing failed and will be retried.
    pub outcome: String,
}

/// A pull request opened by a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullLink {
    pub repository: String,
    pub number: u64,
    pub session: String,
}

/// A registered repository (`name`) is the GitHub repository `full_name`, whose images come
/// from `base_branch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryLink {
    pub full_name: String,
    pub name: String,
    #[serde(default = "main_branch")]
    pub base_branch: String,
}

fn main_branch() -> String {
    "main".into()
}

/// Which installation serves `repository` (`owner/name`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallationAsk {
    pub repository: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallationAnswer {
    pub id: u64,
    pub account: String,
}

/// `InstallationIndex` `/quota`: take one of `what` under `limit` for the installation of
/// the GitHub repository `repository` (nothing to take when the App is not installed there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallationQuotaAsk {
    pub repository: String,
    pub what: nightshift_core::quota::QuotaKind,
    pub limit: nightshift_core::quota::Limit,
}

/// An installation token for one repository with the least permission.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallationTokenAsk {
    pub repository: String,
    pub access: nightshift_core::github::Access,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallationTokenAnswer {
    pub token: String,
    /// ms since the epoch.
    pub expires_at: u64,
}

/// How many failed deliveries were asked for again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Redelivered {
    pub requested: u32,
}

/// `SessionObject` `/pull-request`: GitHub's word on the session's pull request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullUpdate {
    pub repository: String,
    pub pull: nightshift_core::github::Pull,
}

/// `GlobalBudget` (one, `global`): slots lent to scheduler shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetRoute {
    /// [`SlotAsk`] → [`SlotAnswer`] with `granted`.
    Acquire,
    /// [`SlotAsk`] → [`SlotAnswer`] without `granted`.
    Release,
    /// → [`BudgetStatus`].
    Status,
}

impl BudgetRoute {
    const ALL: [(BudgetRoute, Method, &'static str); 3] = [
        (BudgetRoute::Acquire, Method::Post, "/acquire"),
        (BudgetRoute::Release, Method::Post, "/release"),
        (BudgetRoute::Status, Method::Get, "/status"),
    ];

    pub fn method(self) -> Method {
        fixed(&Self::ALL, self).0
    }

    pub fn path(self) -> &'static str {
        fixed(&Self::ALL, self).1
    }

    pub fn parse(method: &Method, path: &str) -> Option<BudgetRoute> {
        parse_fixed(&Self::ALL, method, path)
    }
}

/// The session object's paths that only the Worker's routers and other objects call (the
/// people's paths, `/join`, `/prompt`, … are forwarded as people wrote them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRoute {
    /// Creates the session: [`IDENTITY_HEADER`], [`SESSION_HEADER`], optionally
    /// [`BACKGROUND_HEADER`]; body `core::wire::CreateSession` (an agent's: [`AgentSession`]).
    Create,
    /// A prompt (an agent's: [`AgentPrompt`]; people's are forwarded).
    Prompt,
    /// A sandbox dials its session (the `authorization` and `upgrade` headers passed on).
    SandboxLink,
    /// The sandbox's agent tools (the `authorization` header passed on; the tool request body).
    SandboxTools,
    /// [`ChildUpdate`] → [`OkAnswer`]: one of the session's agents changed status.
    BackgroundChild,
    /// No body → [`OkAnswer`]: the agent this session runs was cancelled.
    BackgroundCancel,
    /// → [`AgentOutput`]: the agent's final message and changed files.
    BackgroundOutput,
    /// [`PullUpdate`] → [`OkAnswer`]: GitHub's word on the session's pull request.
    PullRequest,
    /// → [`SessionRepository`]: which repository the session works on (access checks).
    Repository,
    /// [`ReviewPromptAsk`] → [`ReviewPromptAnswer`]: review comments as one follow-up prompt
    /// of the reviewer's (from the installation index, which checked who may trigger).
    ReviewPrompt,
    /// [`ContinueBranch`] → [`OkAnswer`]: a session started on a pull request works on (and
    /// pushes to) that pull request's branch.
    ContinueBranch,
}

/// The branch a session started on a pull request continues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContinueBranch {
    pub branch: String,
}

/// Review comments as a prompt of the reviewer's in the pull request's session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewPromptAsk {
    pub author: nightshift_core::ids::Identity,
    pub text: String,
    /// The prompt's idempotency key: one prompt per review, however often it is fired.
    pub key: String,
    pub round: nightshift_core::pr_review::ReviewRound,
    pub comments: Vec<nightshift_core::events::PrCommentNote>,
    #[serde(default)]
    pub omitted: usize,
}

/// The prompt review comments became, and whether it is new.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewPromptAnswer {
    pub prompt: String,
    pub new: bool,
}

/// The answer of the session's `/repository`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRepository {
    #[serde(default)]
    pub repository: Option<String>,
}

impl SessionRoute {
    const ALL: [(SessionRoute, Method, &'static str); 11] = [
        (SessionRoute::PullRequest, Method::Post, "/pull-request"),
        (
            SessionRoute::ContinueBranch,
            Method::Post,
            "/continue-branch",
        ),
        (SessionRoute::ReviewPrompt, Method::Post, "/review-prompt"),
        (SessionRoute::Repository, Method::Get, "/repository"),
        (SessionRoute::Create, Method::Post, "/create"),
        (SessionRoute::Prompt, Method::Post, "/prompt"),
        (SessionRoute::SandboxLink, Method::Get, "/sandbox-link"),
        (
            SessionRoute::SandboxTools,
            Method::Post,
            "/sandbox/background",
        ),
        (
            SessionRoute::BackgroundChild,
            Method::Post,
            "/background/child",
        ),
        (
            SessionRoute::BackgroundCancel,
            Method::Post,
            "/background/cancel",
        ),
        (
            SessionRoute::BackgroundOutput,
            Method::Get,
            "/background/output",
        ),
    ];

    pub fn method(self) -> Method {
        fixed(&Self::ALL, self).0
    }

    pub fn path(self) -> &'static str {
        fixed(&Self::ALL, self).1
    }

    /// `None`: a people's path (or none at all).
    pub fn parse(method: &Method, path: &str) -> Option<SessionRoute> {
        parse_fixed(&Self::ALL, method, path)
    }
}

/// `RepositoryObject` (one per registered repository).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepositoryRoute {
    /// `core::repository::Settings` → 201 and the repository's info, or nothing stored.
    Register,
    /// → the repository's info (as people see it).
    Info,
    /// A people's `core::repository::Change`, forwarded.
    Settings,
    /// Starts a build.
    Builds,
    /// A build's log (`?follow=1` passed on).
    BuildLogs(String),
    /// A people's rollback body, forwarded.
    Rollback,
    /// `?at=<ms>` → [`CronAnswer`].
    Cron,
    /// [`ClaimRequest`] → [`ClaimAnswer`].
    Claim,
}

impl RepositoryRoute {
    pub fn method(&self) -> Method {
        match self {
            RepositoryRoute::Info | RepositoryRoute::BuildLogs(_) => Method::Get,
            RepositoryRoute::Settings => Method::Patch,
            RepositoryRoute::Register
            | RepositoryRoute::Builds
            | RepositoryRoute::Rollback
            | RepositoryRoute::Cron
            | RepositoryRoute::Claim => Method::Post,
        }
    }

    pub fn path(&self) -> String {
        match self {
            RepositoryRoute::Register => "/register".into(),
            RepositoryRoute::Info => "/info".into(),
            RepositoryRoute::Settings => "/settings".into(),
            RepositoryRoute::Builds => "/builds".into(),
            RepositoryRoute::BuildLogs(image) => format!("/builds/{image}/logs"),
            RepositoryRoute::Rollback => "/rollback".into(),
            RepositoryRoute::Cron => "/cron".into(),
            RepositoryRoute::Claim => "/claim".into(),
        }
    }

    /// The cron's call for the slot of `at_ms`.
    pub fn cron_at(at_ms: u64) -> String {
        format!("/cron?at={at_ms}")
    }

    pub fn parse(method: &Method, path: &str) -> Option<RepositoryRoute> {
        let route = match segments(path).as_slice() {
            ["register"] => RepositoryRoute::Register,
            ["info"] => RepositoryRoute::Info,
            ["settings"] => RepositoryRoute::Settings,
            ["builds"] => RepositoryRoute::Builds,
            ["builds", image, "logs"] => RepositoryRoute::BuildLogs((*image).to_string()),
            ["rollback"] => RepositoryRoute::Rollback,
            ["cron"] => RepositoryRoute::Cron,
            ["claim"] => RepositoryRoute::Claim,
            _ => return None,
        };
        (route.method() == *method).then_some(route)
    }
}

/// `SchedulerObject` (one per tenant shard); every call carries [`VIEWER_HEADER`] and
/// [`SHARD_HEADER`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SchedulerRoute {
    /// [`SpawnBody`] → 201 and the agent (as people see it).
    Spawn,
    /// No body → [`OkAnswer`]: report to the budget (and ask again if waiting).
    Wake,
    /// The viewer's agents (people's query passed on).
    Agents,
    Agent(String),
    AgentOutput(String),
    AgentCancel(String),
    /// Server-sent events ([`LAST_EVENT_ID_HEADER`] or `?after=`).
    AgentEvents(String),
    /// [`Finished`] → [`OkAnswer`]: an agent's session says its prompt ended.
    Finished,
    /// [`ParentEnded`] → [`OkAnswer`]: cancel the agents a session spawned.
    ParentEnded,
}

impl SchedulerRoute {
    pub fn method(&self) -> Method {
        match self {
            SchedulerRoute::Agents
            | SchedulerRoute::Agent(_)
            | SchedulerRoute::AgentOutput(_)
            | SchedulerRoute::AgentEvents(_) => Method::Get,
            SchedulerRoute::Spawn
            | SchedulerRoute::Wake
            | SchedulerRoute::AgentCancel(_)
            | SchedulerRoute::Finished
            | SchedulerRoute::ParentEnded => Method::Post,
        }
    }

    pub fn path(&self) -> String {
        match self {
            SchedulerRoute::Spawn => "/spawn".into(),
            SchedulerRoute::Wake => "/wake".into(),
            SchedulerRoute::Agents => "/agents".into(),
            SchedulerRoute::Agent(id) => format!("/agents/{id}"),
            SchedulerRoute::AgentOutput(id) => format!("/agents/{id}/output"),
            SchedulerRoute::AgentCancel(id) => format!("/agents/{id}/cancel"),
            SchedulerRoute::AgentEvents(id) => format!("/agents/{id}/events"),
            SchedulerRoute::Finished => "/finished".into(),
            SchedulerRoute::ParentEnded => "/parent-ended".into(),
        }
    }

    pub fn parse(method: &Method, path: &str) -> Option<SchedulerRoute> {
        let id = |s: &str| s.to_string();
        let route = match segments(path).as_slice() {
            ["spawn"] => SchedulerRoute::Spawn,
            ["wake"] => SchedulerRoute::Wake,
            ["agents"] => SchedulerRoute::Agents,
            ["agents", a] => SchedulerRoute::Agent(id(a)),
            ["agents", a, "output"] => SchedulerRoute::AgentOutput(id(a)),
            ["agents", a, "cancel"] => SchedulerRoute::AgentCancel(id(a)),
            ["agents", a, "events"] => SchedulerRoute::AgentEvents(id(a)),
            ["finished"] => SchedulerRoute::Finished,
            ["parent-ended"] => SchedulerRoute::ParentEnded,
            _ => return None,
        };
        (route.method() == *method).then_some(route)
    }
}

/// `SlackWorkspace` (one per Slack workspace, by team id): events and clicks seen once, the
/// work they ask for done from its alarm, threads ↔ sessions, linked people, settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlackWorkspaceRoute {
    /// [`SlackEventAsk`] (signature verified) → [`SlackAck`].
    Event,
    /// [`SlackInteractionAsk`] (signature verified) → [`SlackAck`].
    Interaction,
    /// → [`SlackSettings`].
    SettingsGet,
    /// [`SlackSettings`] → [`SlackSettings`].
    SettingsPut,
    /// [`SlackLinkAsk`] → [`SlackLinkAnswer`], or 404 `slack_link_unknown`.
    Link,
}

impl SlackWorkspaceRoute {
    const ALL: [(SlackWorkspaceRoute, Method, &'static str); 5] = [
        (SlackWorkspaceRoute::Event, Method::Post, "/event"),
        (
            SlackWorkspaceRoute::Interaction,
            Method::Post,
            "/interaction",
        ),
        (SlackWorkspaceRoute::SettingsGet, Method::Get, "/settings"),
        (SlackWorkspaceRoute::SettingsPut, Method::Put, "/settings"),
        (SlackWorkspaceRoute::Link, Method::Post, "/link"),
    ];

    pub fn method(self) -> Method {
        fixed(&Self::ALL, self).0
    }

    pub fn path(self) -> &'static str {
        fixed(&Self::ALL, self).1
    }

    pub fn parse(method: &Method, path: &str) -> Option<SlackWorkspaceRoute> {
        parse_fixed(&Self::ALL, method, path)
    }
}

/// One verified Events API callback, as the Worker hands it over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlackEventAsk {
    pub event_id: String,
    /// The callback as Slack sent it (compact JSON of `core::slack::EventCallback`).
    pub callback: String,
    /// The Worker's origin (`https://…`): links in messages point there.
    pub origin: String,
}

/// One verified click (`block_actions`), as the Worker hands it over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlackInteractionAsk {
    /// A key seen once per click (its trigger id).
    pub key: String,
    /// The payload (compact JSON of `core::slack::BlockActions`).
    pub payload: String,
    pub origin: String,
}

/// Whether the event or click was new (a duplicate does nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlackAck {
    pub duplicate: bool,
}

/// A workspace's settings: each channel's default repository and the routing rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlackSettings {
    /// The workspace (`T…`); set by the object, ignored when put.
    #[serde(default)]
    pub team: String,
    /// Channel id (`C…`) → a registered repository's name.
    #[serde(default)]
    pub channel_defaults: std::collections::BTreeMap<String, String>,
    /// In order: a request containing `pattern` (whole words) goes to `repository`.
    #[serde(default)]
    pub routing_rules: Vec<nightshift_core::slack::RoutingRule>,
}

/// A one-time link code redeemed by the signed-in person it links the Slack account to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlackLinkAsk {
    pub code: String,
    pub person: Identity,
}

/// The Slack account a link code linked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlackLinkAnswer {
    pub team: String,
    pub slack_user: String,
    /// Whether a request waiting for the link was resumed.
    pub resumed: bool,
}

/// A session's prompt from another object (Slack), credited to the person in the identity header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptAsk {
    pub text: String,
    /// The prompt's idempotency key: one prompt however often it is asked.
    pub key: String,
}

/// A page of a session's events (`/events?since=&limit=`), as the session answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsPage {
    pub last_seq: u64,
    pub events: Vec<nightshift_core::events::Event>,
}

/// The answer of a session's `/prompt`: the prompt's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptAnswer {
    pub id: String,
}

/// A route with one method and one path (every object's route enum but the ones with ids in
/// their paths): what [`crate::http::ask`] calls.
pub trait FixedRoute: Copy {
    fn method(self) -> Method;
    fn path(self) -> &'static str;
}

macro_rules! fixed_route {
    ($($route:ty),*) => {$(
        impl FixedRoute for $route {
            fn method(self) -> Method {
                <$route>::method(self)
            }
            fn path(self) -> &'static str {
                <$route>::path(self)
            }
        }
    )*};
}

fixed_route!(
    UserIndexRoute,
    InstallationRoute,
    SessionRoute,
    SlackWorkspaceRoute
);

fn fixed<R: Copy + PartialEq>(
    all: &[(R, Method, &'static str)],
    route: R,
) -> (Method, &'static str) {
    all.iter()
        .find(|(r, _, _)| *r == route)
        .map_or((Method::Get, "/"), |(_, m, p)| (m.clone(), *p))
}

fn parse_fixed<R: Copy>(
    all: &[(R, Method, &'static str)],
    method: &Method,
    path: &str,
) -> Option<R> {
    all.iter()
        .find(|(_, m, p)| m == method && *p == path)
        .map(|(r, _, _)| *r)
}

// ---------------------------------------------------------------------------------------------
// Who asks a scheduler shard
// ---------------------------------------------------------------------------------------------

/// The [`VIEWER_HEADER`]: a person (sees their own agents), a session's sandbox (sees the
/// agents its session spawned), an agent's session (reports its end) or the budget (wakes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    Person(String),
    Session(String),
    Agent(String),
    Budget,
}

impl Viewer {
    /// The header's value: `user:<id>`, `session:<id>`, `agent:<id>`, `budget:`.
    pub fn header(&self) -> String {
        match self {
            Viewer::Person(user) => format!("user:{user}"),
            Viewer::Session(session) => format!("session:{session}"),
            Viewer::Agent(agent) => format!("agent:{agent}"),
            Viewer::Budget => "budget:".into(),
        }
    }

    pub fn parse(value: &str) -> Result<Viewer, ObjectError> {
        match value.split_once(':') {
            Some(("user", user)) if !user.is_empty() => Ok(Viewer::Person(user.to_string())),
            Some(("session", id)) if !id.is_empty() => Ok(Viewer::Session(id.to_string())),
            Some(("agent", id)) if !id.is_empty() => Ok(Viewer::Agent(id.to_string())),
            Some(("budget", "")) => Ok(Viewer::Budget),
            _ => Err(ObjectError::Header {
                what: VIEWER_HEADER,
                reason: format!("{value:?} is not user:, session:, agent: or budget:"),
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies and answers
// ---------------------------------------------------------------------------------------------

/// `{"ok": true}`, or `{"ok": false, "why": …}` when nothing changed (an agent already ended).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OkAnswer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

impl OkAnswer {
    pub fn yes() -> OkAnswer {
        OkAnswer {
            ok: true,
            why: None,
        }
    }
}

/// A person's entry for a session (`UserIndex` `/add`; also the stored row, pinned in
/// `durable_objects/user_index.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEntry {
    pub id: String,
    pub title: String,
    #[serde(default)]
    pub repository: Option<String>,
    pub role: String,
    pub joined_at: u64,
    /// `active` or `ended`, kept up to date by the session when it ends.
    #[serde(default = "active")]
    pub status: String,
}

fn active() -> String {
    "active".into()
}

/// `UserIndex` `/remove`: the person left (or the session was not created).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveSession {
    pub id: String,
}

/// `UserIndex` `/signin/begin`: how the person signed in (`github`, `dev`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BeginSignIn {
    pub via: String,
}

/// `UserIndex` `/signin/check` and `/signin/end`: which sign-in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignInRef {
    pub sid: String,
}

/// `UserIndex` `/ticket/redeem`: a WebSocket ticket's nonce, used once, while its sign-in is
/// good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedeemTicket {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    pub nonce: String,
    pub exp: u64,
}

/// A person's GitHub identity, as their index keeps it (no tokens).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GithubAccount {
    pub id: u64,
    pub login: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub linked_at: u64,
}

/// `UserIndex` `/github/link`: the identity GitHub answered for, and the tokens it granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkGithub {
    pub account: GithubAccount,
    pub tokens: nightshift_core::github::UserTokens,
}

/// `UserIndex` `/github/token`: `refresh` asks for a new pair even if the token looks good
/// (GitHub answered 401 to it).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TokenAsk {
    #[serde(default)]
    pub refresh: bool,
}

/// A person's user token (never leaves the control plane).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserToken {
    pub token: String,
    pub login: String,
}

/// `UserIndex` `/github/role`: the person's permission on `repository` (`owner/name`);
/// `fresh` skips the cache (a join re-checks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleAsk {
    pub repository: String,
    #[serde(default)]
    pub fresh: bool,
}

/// The answer of `/github/role`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleAnswer {
    pub role: nightshift_core::github::Role,
    pub checked_at: u64,
}

/// `UserIndex` `/quota`: take one of `what` under `limit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaAsk {
    pub what: nightshift_core::quota::QuotaKind,
    pub limit: nightshift_core::quota::Limit,
}

/// The answer of a `/remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub removed: bool,
}

/// `UserIndex` `/status`: the session's new status (`ended`) in a member's index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusChange {
    pub id: String,
    #[serde(default = "active")]
    pub status: String,
}

impl StatusChange {
    /// What a session sends to every member's index when it ends.
    pub fn ended(id: &str) -> StatusChange {
        StatusChange {
            id: id.to_string(),
            status: "ended".into(),
        }
    }
}

/// The answer of `/status`: whether the person's index had the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Updated {
    pub updated: bool,
}

/// `RepositoryIndex` `/add` and `/remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryName {
    pub name: String,
}

/// The answer of `RepositoryIndex` `/add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Added {
    pub added: bool,
}

/// The answer of `RepositoryIndex` `/list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Names {
    pub names: Vec<String>,
}

/// The answer of a repository's `/cron`: built (with the build), or why not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CronAnswer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<Value>,
    pub built: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

impl CronAnswer {
    pub fn not_built(why: &str) -> CronAnswer {
        CronAnswer {
            build: None,
            built: false,
            why: Some(why.to_string()),
        }
    }
}

/// A session asks its repository for a sandbox: a warm one is assigned to it at once, or it is
/// told how to start one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    pub control_url: String,
    pub sandbox_token: String,
    pub session_id: String,
    /// `false`: only say how to start one (the session continues pushed work, which a
    /// pooled sandbox synced to the base does not have).
    #[serde(default = "yes")]
    pub take: bool,
    /// Labels a claimed sandbox gains (the session's sandbox labels).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

/// The answer of `/claim`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimAnswer {
    /// The pooled sandbox now working for the session; `None`: start one (from `image`).
    pub sandbox: Option<String>,
    pub expires_at: Option<u64>,
    pub image: Option<String>,
    pub clone_url: String,
    pub base_branch: String,
    /// The repository's egress allowlist (beyond the provider's defaults).
    #[serde(default)]
    pub egress: Vec<String>,
}

/// What a session keeps when it runs a background agent (its `kv` key `background`, pinned in
/// `durable_objects/scheduler.rs`), sent in the [`BACKGROUND_HEADER`] when it is created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentLink {
    pub agent: String,
    pub shard: String,
    pub depth: u32,
}

impl AgentLink {
    /// The [`BACKGROUND_HEADER`] value.
    pub fn header(&self) -> ApiResult<String> {
        serde_json::to_string(self).map_err(ApiError::internal)
    }

    pub fn from_header(value: &str) -> Result<AgentLink, ObjectError> {
        serde_json::from_str(value).map_err(|e| ObjectError::Header {
            what: BACKGROUND_HEADER,
            reason: e.to_string(),
        })
    }
}

/// A spawn request as a scheduler shard receives it: from a person (`POST /background/spawn`,
/// no parent) or from a session's agent tools (with its parent and depth, no title).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnBody {
    pub identity: Identity,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub parent_depth: u32,
    pub prompt: String,
    #[serde(default)]
    pub repository: Option<String>,
    #[serde(default)]
    pub title: Option<String>,
}

/// What a spawn answered, as the agent tools read it (the whole agent goes back to the sandbox).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Spawned {
    pub id: String,
}

/// The agent's session, as the scheduler creates it (read as `core::wire::CreateSession`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSession {
    pub model: Option<String>,
    pub repository: Option<String>,
    pub title: String,
}

/// The agent's prompt, as the scheduler sends it (read as `core::wire::PromptRequest`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPrompt {
    pub text: String,
}

/// An agent's session tells its shard that the agent's prompt ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    pub id: String,
    pub ok: bool,
    /// The agent's result as people see it (`{ok, reason, branch, commit}`, see [`AgentResult`]).
    #[serde(default)]
    pub result: Value,
}

/// The fields of an agent's result a reader needs (the result itself stays as it was stored,
/// and as people see it, since `branch` and `commit` are absent or null by case).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct AgentResult {
    #[serde(default)]
    pub branch: Option<String>,
    #[serde(default)]
    pub commit: Option<String>,
}

impl AgentResult {
    /// Reads a stored result leniently (anything else reads as no branch, no commit).
    pub fn of(result: &Value) -> AgentResult {
        AgentResult::deserialize(result).unwrap_or_default()
    }
}

/// A session ended: cancel the agents it spawned in this shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentEnded {
    pub session: String,
}

/// One of a session's agents changed status (the scheduler tells the parent session).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildUpdate {
    pub branch: Option<String>,
    pub id: String,
    pub session: Option<String>,
    pub status: String,
    #[serde(default)]
    pub title: Option<String>,
}

/// An agent's final message (its last prompt's text) and the files it changed (the session's
/// answer of `/background/output`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentOutput {
    pub files: Vec<String>,
    pub message: String,
}

// ---- Background agents as people (and a sandbox's agent tools) see them ---------------------
//
// The scheduler answers with these; the Worker passes them on to people unchanged, and a
// session's agent tools read them back for the sandbox. Fields are declared in alphabetical
// order: the order of the `json!` objects they replace.

/// How an agent ended: its record's `result` (stored in the scheduler's `agents` rows, sent in
/// [`Finished`], shown to people). The two forms differ by whether `branch` and `commit` are
/// there at all (a finished prompt's are, null when it pushed none), as they always did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum AgentOutcome {
    /// It ended without a prompt finishing: stopped, or its start failed.
    Ended { ok: bool, reason: String },
    /// Its prompt finished, with the branch and commit it pushed.
    Finished {
        branch: Option<String>,
        commit: Option<String>,
        ok: bool,
        reason: Option<String>,
    },
}

impl AgentOutcome {
    /// The outcome as a record keeps it (strings and booleans only: encoding cannot fail).
    pub fn value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// An agent (`GET /background/:id`, the answer of a spawn and a cancel, and each agent of a list).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentView {
    pub created_at: u64,
    pub finished_at: Option<u64>,
    pub id: String,
    pub model: Option<String>,
    pub parent: Option<String>,
    pub prompt: String,
    pub repository: Option<String>,
    /// Its [`AgentOutcome`] as stored, once it ended.
    pub result: Option<Value>,
    pub session: Option<String>,
    pub started_at: Option<u64>,
    pub status: nightshift_core::background::Status,
    pub title: String,
    /// The person it works for.
    pub user: String,
}

/// `GET /background`: the agents a viewer sees, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentList {
    pub agents: Vec<AgentView>,
}

/// `GET /background/:id/output` ([`AgentOutputView`]) and the answer of the sandbox's
/// `check_session` tool ([`ChildrenAnswer`]): the agent tools' protocol, shared with the
/// supervisor.
pub use nightshift_core::tools::{AgentOutputView, ChildrenAnswer};

// ---- Repositories as people see them -------------------------------------------------------

/// A repository (`GET /repositories/:name`, and the answer of a registration and a change):
/// its settings, its builds (newest first, with their tags) and its warm pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepositoryInfo {
    pub builds: Vec<TaggedBuild>,
    pub latest_image: Option<String>,
    pub pool: PoolView,
    pub repository: nightshift_core::repository::Settings,
}

/// A build with its tags (`latest`, `commit:…`, `built:…`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaggedBuild {
    #[serde(flatten)]
    pub build: nightshift_core::repository::Build,
    pub tags: Vec<String>,
}

/// A repository's warm pool: its target, its image and its sandboxes counted by slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolView {
    /// Requested or booting.
    pub booting: usize,
    pub claimed: usize,
    pub draining: usize,
    pub image: Option<String>,
    pub ready: usize,
    pub sandboxes: Vec<nightshift_core::pool::Pooled>,
    pub target: u32,
}

/// An exchange of a shard with the global budget: `n` slots, with its report (`seq`, `held`;
/// absent from shards that predate reconciling).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotAsk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<u32>,
    pub n: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub shard: String,
}

/// The budget's answer: `granted` (to an acquire) and the shards to wake because slots came back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotAnswer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted: Option<u32>,
    #[serde(default)]
    pub wake: Vec<String>,
}

/// The budget's `/status`: the cap and what each shard holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetStatus {
    pub cap: u32,
    pub holds: Vec<ShardHold>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardHold {
    pub held: i64,
    pub shard: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes `message`, checks the exact bytes, and reads them back as the receiver does.
    fn shape<T>(message: &T, literal: &str)
    where
        T: Serialize + DeserializeOwned + PartialEq + Clone + std::fmt::Debug,
    {
        let bytes = encode(message).unwrap_or_default();
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            literal,
            "the wire shape changed"
        );
        assert_eq!(decode_body::<T>("/test", &bytes), Ok(message.clone()));
    }

    fn bytes<T: Serialize>(message: &T) -> Vec<u8> {
        encode(message).unwrap_or_default()
    }

    fn ada() -> Identity {
        Identity {
            user: "ada".into(),
            name: "Ada".into(),
            email: Some("ada@example.com".into()),
        }
    }

    #[test]
    fn every_route_parses_back_from_its_method_and_path() {
        for (route, _, _) in UserIndexRoute::ALL {
            assert_eq!(
                UserIndexRoute::parse(&route.method(), route.path()),
                Some(route)
            );
        }
        for (route, _, _) in RepositoryIndexRoute::ALL {
            assert_eq!(
                RepositoryIndexRoute::parse(&route.method(), route.path()),
                Some(route)
            );
        }
        for (route, _, _) in BudgetRoute::ALL {
            assert_eq!(
                BudgetRoute::parse(&route.method(), route.path()),
                Some(route)
            );
        }
        for (route, _, _) in SessionRoute::ALL {
            assert_eq!(
                SessionRoute::parse(&route.method(), route.path()),
                Some(route)
            );
        }
        for route in [
            RepositoryRoute::Register,
            RepositoryRoute::Info,
            RepositoryRoute::Settings,
            RepositoryRoute::Builds,
            RepositoryRoute::BuildLogs("img_1".into()),
            RepositoryRoute::Rollback,
            RepositoryRoute::Cron,
            RepositoryRoute::Claim,
        ] {
            assert_eq!(
                RepositoryRoute::parse(&route.method(), &route.path()),
                Some(route)
            );
        }
        for route in [
            SchedulerRoute::Spawn,
            SchedulerRoute::Wake,
            SchedulerRoute::Agents,
            SchedulerRoute::Agent("bg_a_1".into()),
            SchedulerRoute::AgentOutput("bg_a_1".into()),
            SchedulerRoute::AgentCancel("bg_a_1".into()),
            SchedulerRoute::AgentEvents("bg_a_1".into()),
            SchedulerRoute::Finished,
            SchedulerRoute::ParentEnded,
        ] {
            assert_eq!(
                SchedulerRoute::parse(&route.method(), &route.path()),
                Some(route)
            );
        }
    }

    #[test]
    fn paths_are_the_ones_both_ends_used() {
        let paths = [
            UserIndexRoute::Add.path(),
            UserIndexRoute::Remove.path(),
            UserIndexRoute::Status.path(),
            UserIndexRoute::List.path(),
            RepositoryIndexRoute::Add.path(),
            RepositoryIndexRoute::List.path(),
            BudgetRoute::Acquire.path(),
            BudgetRoute::Release.path(),
            BudgetRoute::Status.path(),
            SessionRoute::Create.path(),
            SessionRoute::Prompt.path(),
            SessionRoute::SandboxLink.path(),
            SessionRoute::SandboxTools.path(),
            SessionRoute::BackgroundChild.path(),
            SessionRoute::BackgroundCancel.path(),
            SessionRoute::BackgroundOutput.path(),
        ];
        assert_eq!(
            paths,
            [
                "/add",
                "/remove",
                "/status",
                "/list",
                "/add",
                "/list",
                "/acquire",
                "/release",
                "/status",
                "/create",
                "/prompt",
                "/sandbox-link",
                "/sandbox/background",
                "/background/child",
                "/background/cancel",
                "/background/output",
            ]
        );
        assert_eq!(
            RepositoryRoute::BuildLogs("img_1".into()).path(),
            "/builds/img_1/logs"
        );
        assert_eq!(
            RepositoryRoute::cron_at(1700000000000),
            "/cron?at=1700000000000"
        );
        assert_eq!(
            SchedulerRoute::AgentOutput("bg_a_1".into()).path(),
            "/agents/bg_a_1/output"
        );
        assert_eq!(SchedulerRoute::ParentEnded.path(), "/parent-ended");
        assert_eq!(
            with_query("/agents", "?status=running"),
            "/agents?status=running"
        );
    }

    #[test]
    fn a_wrong_method_or_an_unknown_path_is_no_route() {
        assert_eq!(UserIndexRoute::parse(&Method::Get, "/add"), None);
        assert_eq!(SessionRoute::parse(&Method::Post, "/join"), None);
        assert_eq!(
            SchedulerRoute::parse(&Method::Get, "/agents/bg_a_1/cancel"),
            None
        );
        assert_eq!(
            RepositoryRoute::parse(&Method::Post, "/builds/img_1/logs"),
            None
        );
        assert_eq!(RepositoryRoute::parse(&Method::Get, "/nothing"), None);
    }

    #[test]
    fn header_names_are_unchanged() {
        assert_eq!(
            [
                IDENTITY_HEADER,
                SESSION_HEADER,
                BACKGROUND_HEADER,
                VIEWER_HEADER,
                SHARD_HEADER
            ],
            [
                "x-nightshift-identity",
                "x-nightshift-session",
                "x-nightshift-background",
                "x-nightshift-viewer",
                "x-nightshift-shard",
            ]
        );
    }

    #[test]
    fn viewers_round_trip_and_a_bad_one_is_refused() {
        for (viewer, header) in [
            (Viewer::Person("ada".into()), "user:ada"),
            (Viewer::Session("ses_1".into()), "session:ses_1"),
            (Viewer::Agent("bg_a_1".into()), "agent:bg_a_1"),
            (Viewer::Budget, "budget:"),
        ] {
            assert_eq!(viewer.header(), header);
            assert_eq!(Viewer::parse(header), Ok(viewer));
        }
        for bad in ["", "ada", "user:", "robot:1", "budget:x"] {
            let e = Viewer::parse(bad)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("x-nightshift-viewer"), "{bad}: {e}");
        }
    }

    #[test]
    fn user_index_bodies() {
        shape(
            &SessionEntry {
                id: "ses_1".into(),
                title: "Fix the login".into(),
                repository: None,
                role: "owner".into(),
                joined_at: 1700000000000,
                status: "active".into(),
            },
            r#"{"id":"ses_1","title":"Fix the login","repository":null,"role":"owner","joined_at":1700000000000,"status":"active"}"#,
        );
        shape(&RemoveSession { id: "ses_1".into() }, r#"{"id":"ses_1"}"#);
        shape(&Removed { removed: true }, r#"{"removed":true}"#);
        shape(
            &StatusChange::ended("ses_1"),
            r#"{"id":"ses_1","status":"ended"}"#,
        );
        shape(&Updated { updated: false }, r#"{"updated":false}"#);
        // A status change without a status marks the session active, as before.
        assert_eq!(
            decode_body::<StatusChange>("/status", br#"{"id":"ses_1"}"#).map(|s| s.status),
            Ok("active".to_string())
        );
    }

    #[test]
    fn repository_bodies() {
        shape(
            &RepositoryName {
                name: "demo".into(),
            },
            r#"{"name":"demo"}"#,
        );
        shape(&Added { added: true }, r#"{"added":true}"#);
        shape(
            &Names {
                names: vec!["a".into(), "b".into()],
            },
            r#"{"names":["a","b"]}"#,
        );
        shape(
            &CronAnswer::not_built("a build is running"),
            r#"{"built":false,"why":"a build is running"}"#,
        );
        shape(
            &CronAnswer {
                build: Some(serde_json::json!({"image": "img_1"})),
                built: true,
                why: None,
            },
            r#"{"build":{"image":"img_1"},"built":true}"#,
        );
        shape(
            &ClaimRequest {
                control_url: "https://cp".into(),
                sandbox_token: "tok".into(),
                session_id: "ses_1".into(),
                take: false,
                labels: Default::default(),
            },
            r#"{"control_url":"https://cp","sandbox_token":"tok","session_id":"ses_1","take":false}"#,
        );
        // `take` defaults to true (older sessions did not send it).
        assert_eq!(
            decode_body::<ClaimRequest>(
                "/claim",
                br#"{"session_id":"ses_1","control_url":"https://cp","sandbox_token":"tok"}"#
            )
            .map(|c| c.take),
            Ok(true)
        );
        shape(
            &ClaimAnswer {
                sandbox: Some("sbx_1".into()),
                expires_at: Some(1700000000000),
                image: Some("img_1".into()),
                clone_url: "https://git/demo".into(),
                base_branch: "main".into(),
                egress: vec!["pypi.org".into()],
            },
            r#"{"sandbox":"sbx_1","expires_at":1700000000000,"image":"img_1","clone_url":"https://git/demo","base_branch":"main","egress":["pypi.org"]}"#,
        );
    }

    #[test]
    fn scheduler_bodies() {
        let link = AgentLink {
            agent: "bg_acme_1f".into(),
            shard: "acme".into(),
            depth: 2,
        };
        assert_eq!(
            link.header().as_deref(),
            Ok(r#"{"agent":"bg_acme_1f","shard":"acme","depth":2}"#)
        );
        assert_eq!(
            AgentLink::from_header(&link.header().unwrap_or_default()),
            Ok(link)
        );
        shape(
            &SpawnBody {
                identity: ada(),
                model: None,
                parent: Some("ses_1".into()),
                parent_depth: 1,
                prompt: "Add tests".into(),
                repository: Some("acme/web".into()),
                title: None,
            },
            r#"{"identity":{"user":"ada","name":"Ada","email":"ada@example.com"},"model":null,"parent":"ses_1","parent_depth":1,"prompt":"Add tests","repository":"acme/web","title":null}"#,
        );
        // The two forms callers sent before (a person's, with a title and no parent; the agent
        // tools', with a parent and no title) read as they did.
        let person: Result<SpawnBody, _> = decode_body(
            "/spawn",
            br#"{"identity":{"email":"ada@example.com","name":"Ada","user":"ada"},"model":null,"prompt":"Add tests","repository":null,"title":"Tests"}"#,
        );
        assert_eq!(
            person.map(|b| (b.parent, b.parent_depth, b.title)),
            Ok((None, 0, Some("Tests".into())))
        );
        let tools: Result<SpawnBody, _> = decode_body(
            "/spawn",
            br#"{"identity":{"email":"ada@example.com","name":"Ada","user":"ada"},"model":null,"parent":"ses_1","parent_depth":1,"prompt":"Add tests","repository":"acme/web"}"#,
        );
        assert_eq!(
            tools.map(|b| (b.parent, b.parent_depth, b.title)),
            Ok((Some("ses_1".into()), 1, None))
        );
        shape(
            &AgentSession {
                model: None,
                repository: Some("acme/web".into()),
                title: "Background: Add tests".into(),
            },
            r#"{"model":null,"repository":"acme/web","title":"Background: Add tests"}"#,
        );
        shape(
            &AgentPrompt {
                text: "Add tests".into(),
            },
            r#"{"text":"Add tests"}"#,
        );
        shape(
            &Finished {
                id: "bg_acme_1f".into(),
                ok: true,
                result: serde_json::json!({"branch": "nightshift/ses_2", "commit": null, "ok": true, "reason": "done"}),
            },
            r#"{"id":"bg_acme_1f","ok":true,"result":{"branch":"nightshift/ses_2","commit":null,"ok":true,"reason":"done"}}"#,
        );
        shape(
            &ParentEnded {
                session: "ses_1".into(),
            },
            r#"{"session":"ses_1"}"#,
        );
        shape(
            &ChildUpdate {
                branch: None,
                id: "bg_acme_1f".into(),
                session: Some("ses_2".into()),
                status: "running".into(),
                title: Some("Write tests".into()),
            },
            r#"{"branch":null,"id":"bg_acme_1f","session":"ses_2","status":"running","title":"Write tests"}"#,
        );
        shape(
            &AgentOutput {
                files: vec!["src/a.rs".into()],
                message: "Done.".into(),
            },
            r#"{"files":["src/a.rs"],"message":"Done."}"#,
        );
        shape(&OkAnswer::yes(), r#"{"ok":true}"#);
        shape(
            &OkAnswer {
                ok: false,
                why: Some("already ended".into()),
            },
            r#"{"ok":false,"why":"already ended"}"#,
        );
        assert_eq!(
            AgentResult::of(&serde_json::json!({"ok": true, "branch": "b", "commit": null})),
            AgentResult {
                branch: Some("b".into()),
                commit: None
            }
        );
        assert_eq!(AgentResult::of(&Value::Null), AgentResult::default());
    }

    #[test]
    fn budget_bodies() {
        shape(
            &SlotAsk {
                held: Some(1),
                n: 2,
                seq: Some(7),
                shard: "acme".into(),
            },
            r#"{"held":1,"n":2,"seq":7,"shard":"acme"}"#,
        );
        // Shards that predate reconciling sent no report.
        assert_eq!(
            decode_body::<SlotAsk>("/acquire", br#"{"shard":"acme","n":1}"#)
                .map(|a| (a.held, a.seq)),
            Ok((None, None))
        );
        shape(
            &SlotAnswer {
                granted: Some(1),
                wake: vec!["b".into()],
            },
            r#"{"granted":1,"wake":["b"]}"#,
        );
        shape(
            &SlotAnswer {
                granted: None,
                wake: vec![],
            },
            r#"{"wake":[]}"#,
        );
        shape(
            &BudgetStatus {
                cap: 4,
                holds: vec![ShardHold {
                    held: 2,
                    shard: "acme".into(),
                }],
            },
            r#"{"cap":4,"holds":[{"held":2,"shard":"acme"}]}"#,
        );
    }

    /// Bodies built with `json!` before this module sorted their keys: the structs encode the
    /// very same bytes.
    #[test]
    fn structs_encode_as_the_json_bodies_they_replace() {
        let same = |typed: Vec<u8>, old: Value| {
            assert_eq!(String::from_utf8_lossy(&typed), old.to_string());
        };
        same(
            bytes(&ChildUpdate {
                branch: Some("b".into()),
                id: "bg_a_1".into(),
                session: None,
                status: "completed".into(),
                title: Some("T".into()),
            }),
            serde_json::json!({"id": "bg_a_1", "status": "completed", "session": null, "title": "T", "branch": "b"}),
        );
        same(
            bytes(&SlotAsk {
                held: Some(0),
                n: 1,
                seq: Some(3),
                shard: "a".into(),
            }),
            serde_json::json!({"shard": "a", "n": 1, "held": 0, "seq": 3}),
        );
        same(
            bytes(&Finished {
                id: "bg_a_1".into(),
                ok: false,
                result: serde_json::json!({"ok": false}),
            }),
            serde_json::json!({"id": "bg_a_1", "ok": false, "result": {"ok": false}}),
        );
        same(
            bytes(&StatusChange::ended("ses_1")),
            serde_json::json!({"id": "ses_1", "status": "ended"}),
        );
        same(
            bytes(&AgentSession {
                model: Some("m".into()),
                repository: None,
                title: "T".into(),
            }),
            serde_json::json!({"title": "T", "repository": null, "model": "m"}),
        );
        same(
            bytes(&ClaimRequest {
                control_url: "c".into(),
                sandbox_token: "t".into(),
                session_id: "s".into(),
                take: true,
                labels: Default::default(),
            }),
            serde_json::json!({"session_id": "s", "control_url": "c", "sandbox_token": "t", "take": true}),
        );
        same(
            bytes(&SlotAnswer {
                granted: Some(0),
                wake: vec![],
            }),
            serde_json::json!({"granted": 0, "wake": Vec::<String>::new()}),
        );
    }

    #[test]
    fn a_malformed_body_is_refused_with_a_clear_error_naming_the_path() {
        let cases: Vec<(&str, Result<(), ObjectError>)> = vec![
            (
                "/add",
                decode_body::<SessionEntry>("/add", b"{\"id\":1}").map(drop),
            ),
            (
                "/remove",
                decode_body::<RemoveSession>("/remove", b"").map(drop),
            ),
            (
                "/status",
                decode_body::<StatusChange>("/status", b"{}").map(drop),
            ),
            (
                "/spawn",
                decode_body::<SpawnBody>("/spawn", br#"{"prompt":"x"}"#).map(drop),
            ),
            (
                "/spawn",
                decode_body::<SpawnBody>(
                    "/spawn",
                    br#"{"identity":{"user":"a","name":"A"},"prompt":"x","extra":1}"#,
                )
                .map(drop),
            ),
            (
                "/finished",
                decode_body::<Finished>("/finished", br#"{"id":"x"}"#).map(drop),
            ),
            (
                "/parent-ended",
                decode_body::<ParentEnded>("/parent-ended", b"[]").map(drop),
            ),
            (
                "/background/child",
                decode_body::<ChildUpdate>("/background/child", br#"{"status":"running"}"#)
                    .map(drop),
            ),
            (
                "/acquire",
                decode_body::<SlotAsk>("/acquire", br#"{"shard":"a","n":-1}"#).map(drop),
            ),
            (
                "/claim",
                decode_body::<ClaimRequest>("/claim", br#"{"session_id":"s"}"#).map(drop),
            ),
            (
                "/add",
                decode_body::<RepositoryName>("/add", b"not json").map(drop),
            ),
        ];
        for (path, result) in cases {
            let Err(e) = result else {
                panic!("{path}: a malformed body was accepted");
            };
            assert!(matches!(e, ObjectError::Body { .. }), "{path}: {e:?}");
            let api: ApiError = e.clone().into();
            assert_eq!((api.status, api.code.as_str()), (500, "internal"), "{path}");
            assert!(api.message.contains(path), "{path}: {}", api.message);
        }
        let answer = decode_answer::<SlotAnswer>("/acquire", b"<html>").err();
        let named =
            |e: &ObjectError| matches!(e, ObjectError::Answer { path, .. } if path == "/acquire");
        assert!(answer.as_ref().is_some_and(named), "{answer:?}");
        let header = AgentLink::from_header("{\"agent\":1}")
            .err()
            .map(|e| e.to_string());
        assert!(header.is_some_and(|e| e.contains(BACKGROUND_HEADER)));
    }
}

/// The people-facing views encode as the `json!` objects they replaced (each old literal is
/// written out below, built from the same values), and the agent outcome reads back as stored.
#[cfg(test)]
mod view_tests {
    use super::*;
    use nightshift_core::background::Status;
    use nightshift_core::pool::{Pooled, Slot};
    use nightshift_core::repository::{Build, Settings};
    use serde_json::json;

    fn text<T: Serialize>(view: &T) -> String {
        serde_json::to_string(view).unwrap_or_default()
    }

    #[test]
    fn an_agent_outcome_is_the_result_it_replaced() {
        let (branch, commit, reason) = (Some("nightshift/ses_2"), None::<&str>, Some("done"));
        let finished = AgentOutcome::Finished {
            branch: branch.map(String::from),
            commit: None,
            ok: true,
            reason: reason.map(String::from),
        };
        let old = json!({"ok": true, "reason": reason, "branch": branch, "commit": commit});
        assert_eq!(text(&finished), old.to_string());
        assert_eq!(finished.value(), old);
        let stopped = AgentOutcome::Ended {
            ok: false,
            reason: "stopped: someone stopped the agent's prompt".into(),
        };
        let old = json!({"ok": false, "reason": "stopped: someone stopped the agent's prompt"});
        assert_eq!(text(&stopped), old.to_string());
        // Both forms read back as the form they are (no `branch` is added to an ended one).
        let read = |v: &Value| serde_json::from_value::<AgentOutcome>(v.clone()).ok();
        assert_eq!(read(&old), Some(stopped));
        assert_eq!(read(&finished.value()), Some(finished));
        // The reader of a branch reads both.
        assert_eq!(AgentResult::of(&old), AgentResult::default());
    }

    fn view(status: Status, result: Option<Value>) -> AgentView {
        AgentView {
            created_at: 1,
            finished_at: None,
            id: "bg_acme_1f".into(),
            model: None,
            parent: Some("ses_1".into()),
            prompt: "Add tests".into(),
            repository: Some("acme/web".into()),
            result,
            session: Some("ses_2".into()),
            started_at: Some(2),
            status,
            title: "Background: Add tests".into(),
            user: "ada".into(),
        }
    }

    #[test]
    fn an_agent_view_is_the_json_it_replaced() {
        let result = Some(json!({"ok": false, "reason": "stopped"}));
        let r = view(Status::Failed, result.clone());
        let (model, finished_at): (Option<String>, Option<u64>) = (None, None);
        let old = json!({
            "id": r.id, "status": "failed", "title": r.title, "prompt": r.prompt,
            "repository": r.repository, "model": model, "parent": r.parent, "session": r.session,
            "user": "ada", "created_at": 1, "started_at": Some(2),
            "finished_at": finished_at, "result": result,
        });
        assert_eq!(text(&r), old.to_string());
        let list = AgentList {
            agents: vec![r.clone()],
        };
        assert_eq!(text(&list), json!({"agents": [old]}).to_string());
        let back: Option<AgentList> = serde_json::from_str(&text(&list)).ok();
        assert_eq!(back, Some(list));
    }

    #[test]
    fn an_agent_output_is_the_json_it_replaced() {
        // Running, its session answered, no result yet: no `branch` or `commit` keys.
        let running = AgentOutputView {
            branch: None,
            commit: None,
            files: vec!["src/a.rs".into()],
            id: "bg_acme_1f".into(),
            message: Some("Done.".into()),
            result: None,
            session: Some("ses_2".into()),
            status: Status::Running,
        };
        let mut old = json!({"id": "bg_acme_1f", "status": "running", "session": "ses_2",
            "result": null, "message": null, "files": []});
        old["message"] = Value::String("Done.".into());
        old["files"] = json!(["src/a.rs"]);
        assert_eq!(text(&running), old.to_string());
        // Ended without a branch, its session gone: `branch` and `commit` there and null.
        let res = json!({"ok": false, "reason": "stopped"});
        let ended = AgentOutputView {
            branch: Some(None),
            commit: Some(None),
            files: Vec::new(),
            message: None,
            result: Some(res.clone()),
            status: Status::Failed,
            session: None,
            ..running.clone()
        };
        let mut old = json!({"id": "bg_acme_1f", "status": "failed", "session": null,
            "result": res, "message": null, "files": []});
        old["branch"] = res["branch"].clone();
        old["commit"] = res["commit"].clone();
        assert_eq!(text(&ended), old.to_string());
        // The agent tools read them back as the scheduler wrote them (absent ≠ null).
        let children = ChildrenAnswer {
            children: vec![running, ended],
        };
        let encoded = text(&children);
        let back: Option<ChildrenAnswer> = serde_json::from_str(&encoded).ok();
        assert_eq!(back.as_ref(), Some(&children));
        let old_children = json!({"children": [
            serde_json::to_value(&children.children[0]).unwrap_or_default(),
            old,
        ]});
        assert_eq!(encoded, old_children.to_string());
    }

    #[test]
    fn a_repository_info_is_the_json_it_replaced() {
        let s = Settings {
            name: "acme/web".into(),
            github: None,
            clone_url: "https://example.com/acme/web.git".into(),
            base_branch: "main".into(),
            setup: vec!["npm ci".into()],
            test: None,
            pool_size: 1,
            build_every_min: 30,
            egress: Vec::new(),
            review_mentions_only: false,
            description: String::new(),
            topics: Vec::new(),
        };
        let b = Build {
            image: "im_1".into(),
            status: "ready".into(),
            reason: "registered".into(),
            started_at: 1,
            finished_at: Some(2),
            commit: Some("4f2c9e1".into()),
            test_exit_code: Some(0),
            error: None,
        };
        let tags = vec![
            "latest".to_string(),
            "commit:4f2c9e1".into(),
            "built:2".into(),
        ];
        let sandbox = Pooled {
            sandbox: Some("sb_1".into()),
            image: Some("im_1".into()),
            slot: Slot::Ready,
            since: 3,
        };
        let info = RepositoryInfo {
            builds: vec![TaggedBuild {
                build: b.clone(),
                tags: tags.clone(),
            }],
            latest_image: Some("im_1".into()),
            pool: PoolView {
                booting: 0,
                claimed: 1,
                draining: 0,
                image: Some("im_1".into()),
                ready: 1,
                sandboxes: vec![sandbox.clone()],
                target: 1,
            },
            repository: s.clone(),
        };
        let mut build = serde_json::to_value(&b).unwrap_or(Value::Null);
        build["tags"] = json!(tags);
        let old = json!({
            "repository": s,
            "latest_image": "im_1",
            "builds": [build],
            "pool": {
                "target": 1,
                "image": "im_1",
                "ready": 1,
                "booting": 0,
                "draining": 0,
                "claimed": 1,
                "sandboxes": [&sandbox],
            },
        });
        // The same keys and values (nested structs now keep their declared key order).
        assert_eq!(serde_json::to_value(&info).ok(), Some(old));
        let back: Option<RepositoryInfo> = serde_json::from_str(&text(&info)).ok();
        assert_eq!(back, Some(info));
    }

    /// `EdgeError::answer`'s body (its tests live here: `src/error.rs` is another's).
    #[test]
    fn an_edge_refusal_is_the_body_it_replaced() {
        let e = EdgeError::NoSuchAgent;
        let old = json!({ "error": { "code": e.code(), "message": e.to_string() } });
        assert_eq!(e.answer(), (404, old.clone()));
        assert_eq!(e.answer().1.to_string(), old.to_string());
    }
}
