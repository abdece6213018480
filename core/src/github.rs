//! GitHub's wire formats and the pure helpers around them: webhook signatures and payloads, PR state with an out-of-order guard, REST types, OAuth with PKCE, App JWT pieces and PEM private keys. Used by both the Worker and the fake GitHub; no I/O.

use std::collections::BTreeMap;

use base64::alphabet;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::signing::{hex, unhex};
type HmacSha256 = Hmac<Sha256>;

// ---------------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------------

/// The REST API version every request names in `X-GitHub-Api-Version`.
pub const API_VERSION: &str = "2022-11-28";
/// The `Accept` header of REST requests.
pub const ACCEPT: &str = "application/vnd.github+json";
/// The `User-Agent` header of every request (GitHub refuses requests without one).
pub const USER_AGENT: &str = "nightshift";

// ---------------------------------------------------------------------------------------------
// Webhook signatures
// ---------------------------------------------------------------------------------------------

/// Header carrying `sha256=<hex HMAC-SHA256 of the body>`.
pub const SIGNATURE_HEADER: &str = "x-hub-signature-256";
/// Header naming the event (`pull_request`, `push`, …).
pub const EVENT_HEADER: &str = "x-github-event";
/// Header carrying the delivery's GUID.
pub const DELIVERY_HEADER: &str = "x-github-delivery";

/// Why a webhook delivery was refused or ignored.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WebhookError {
    /// No webhook secret is configured, so no delivery can be trusted.
    #[error("no GitHub webhook secret is configured")]
    NotConfigured,
    /// The delivery carries no signature header.
    #[error(
        "the delivery is not signed: GitHub sends {SIGNATURE_HEADER} when the webhook has a secret"
    )]
    Missing,
    /// The signature header is not `sha256=<64 hex digits>`.
    #[error("the {SIGNATURE_HEADER} header is not `sha256=<64 hex digits>`")]
    Malformed,
    /// The signature does not match the body.
    #[error("the webhook signature does not match; check the webhook secret on both sides")]
    BadSignature,
    /// The body is not the JSON the event name promises.
    #[error("the webhook payload is not valid: {0}")]
    BadPayload(String),
    /// An event this service does not handle (answered 202, ignored).
    #[error("this webhook event is not handled and was ignored")]
    UnknownEvent,
}

impl WebhookError {
    /// A stable machine-readable code for the error.
    pub fn code(&self) -> &'static str {
        match self {
            WebhookError::NotConfigured => "webhook_not_configured",
            WebhookError::Missing => "signature_missing",
            WebhookError::Malformed => "signature_malformed",
            WebhookError::BadSignature => "signature_invalid",
            WebhookError::BadPayload(_) => "webhook_payload_invalid",
            WebhookError::UnknownEvent => "webhook_event_ignored",
        }
    }
}

fn webhook_mac(secret: &[u8], body: &[u8]) -> Option<HmacSha256> {
    // HMAC takes keys of any length, so this never fails in practice.
    let mut mac = HmacSha256::new_from_slice(secret).ok()?;
    mac.update(body);
    Some(mac)
}

/// The value of [`SIGNATURE_HEADER`] for `body`: `sha256=<lowercase hex HMAC-SHA256>`.
pub fn sign_webhook(secret: &[u8], body: &[u8]) -> String {
    match webhook_mac(secret, body) {
        Some(mac) => format!("sha256={}", hex(&mac.finalize().into_bytes())),
        None => String::new(),
    }
}

/// Checks a delivery's signature header against its body, in constant time.
pub fn verify_webhook(
    secret: &[u8],
    body: &[u8],
    header: Option<&str>,
) -> Result<(), WebhookError> {
    if secret.is_empty() {
        return Err(WebhookError::NotConfigured);
    }
    let header = header
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .ok_or(WebhookError::Missing)?;
    let digest = header
        .strip_prefix("sha256=")
        .filter(|hex_digits| hex_digits.len() == 64)
        .and_then(unhex)
        .ok_or(WebhookError::Malformed)?;
    webhook_mac(secret, body)
        .ok_or(WebhookError::NotConfigured)?
        .verify_slice(&digest)
        .map_err(|_| WebhookError::BadSignature)
}

/// True for a plausible delivery id: 1 to 64 characters of `[A-Za-z0-9-]` (GitHub sends a GUID).
pub fn valid_delivery_id(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

// ---------------------------------------------------------------------------------------------
// Webhook payloads
// ---------------------------------------------------------------------------------------------

/// A user, organisation or bot as GitHub embeds it in payloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    /// The account's login (`octocat`).
    pub login: String,
    /// GitHub's numeric id, stable across renames.
    pub id: u64,
    /// `User`, `Organization` or `Bot`.
    #[serde(rename = "type", default)]
    pub kind: String,
}

/// A repository as embedded in webhook payloads and pull request branches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoRef {
    /// GitHub's numeric id.
    pub id: u64,
    /// `owner/name`.
    pub full_name: String,
    /// The name without the owner.
    #[serde(default)]
    pub name: String,
    /// The owning account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<Account>,
    /// The default branch (`main`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_branch: Option<String>,
    /// Whether the repository is private.
    #[serde(default)]
    pub private: bool,
}

/// The App installation a delivery is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallationRef {
    /// The installation id.
    pub id: u64,
}

/// One end of a pull request (`head` or `base`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branch {
    /// The branch name (`feature/x`, without `refs/heads/`).
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The commit the branch points at.
    pub sha: String,
    /// The repository holding the branch; missing when a fork was deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<RepoRef>,
}

/// A pull request, as in webhook payloads and REST answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pull {
    /// GitHub's numeric id.
    pub id: u64,
    /// The number within the repository.
    pub number: u64,
    /// `open` or `closed` (a merged PR is `closed` with `merged` true).
    pub state: String,
    /// Whether it is a draft.
    #[serde(default)]
    pub draft: bool,
    /// Whether it was merged.
    #[serde(default)]
    pub merged: bool,
    /// When it was merged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_at: Option<String>,
    /// The title.
    pub title: String,
    /// The description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The PR's web page.
    pub html_url: String,
    /// Last change, ISO 8601 (`2026-12-01T10:00:00Z`).
    pub updated_at: String,
    /// When it was closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<String>,
    /// Who opened it.
    pub user: Account,
    /// The branch with the changes.
    pub head: Branch,
    /// The branch the changes go into.
    pub base: Branch,
}

impl Pull {
    /// Whether the head branch lives in another repository than the base (a fork). A missing
    /// head repository (a deleted fork) counts as a fork, and so does a missing base repository:
    /// when in doubt the PR is treated as foreign.
    pub fn is_fork(&self) -> bool {
        match (&self.head.repo, &self.base.repo) {
            (Some(head), Some(base)) => head.id != base.id,
            _ => true,
        }
    }
}

/// The `pull_request` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequestEvent {
    /// `opened`, `closed`, `synchronize`, `reopened`, `edited`, …
    pub action: String,
    /// The PR's number.
    pub number: u64,
    /// The PR as it is after the action.
    pub pull_request: Pull,
    /// The base repository.
    pub repository: RepoRef,
    /// Who caused the event.
    pub sender: Account,
    /// The App installation the delivery is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installation: Option<InstallationRef>,
}

/// An installation as described by `installation*` events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallationInfo {
    /// The installation id.
    pub id: u64,
    /// The account the App is installed on.
    pub account: Account,
    /// `all` or `selected`.
    #[serde(default)]
    pub repository_selection: String,
    /// The App's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<u64>,
    /// The App's slug.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_slug: Option<String>,
}

/// A repository as listed by installation events and access tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoName {
    /// GitHub's numeric id.
    pub id: u64,
    /// The name without the owner.
    pub name: String,
    /// `owner/name`.
    pub full_name: String,
    /// Whether the repository is private.
    #[serde(default)]
    pub private: bool,
}

/// The `installation` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallationEvent {
    /// `created`, `deleted`, `suspend`, `unsuspend` or `new_permissions_accepted`.
    pub action: String,
    /// The installation.
    pub installation: InstallationInfo,
    /// The repositories it covers (on `created` with a selection).
    #[serde(default)]
    pub repositories: Vec<RepoName>,
    /// Who caused the event.
    pub sender: Account,
}

/// The `installation_repositories` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallationRepositoriesEvent {
    /// `added` or `removed`.
    pub action: String,
    /// The installation.
    pub installation: InstallationInfo,
    /// Repositories added to the installation.
    #[serde(default)]
    pub repositories_added: Vec<RepoName>,
    /// Repositories removed from the installation.
    #[serde(default)]
    pub repositories_removed: Vec<RepoName>,
    /// Who caused the event.
    pub sender: Account,
}

/// The `push` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushEvent {
    /// The full ref pushed (`refs/heads/main`, `refs/tags/v1`).
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The commit before the push (all zeros for a new ref).
    pub before: String,
    /// The commit after the push (all zeros for a deleted ref).
    pub after: String,
    /// The repository pushed to.
    pub repository: RepoRef,
    /// The App installation the delivery is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installation: Option<InstallationRef>,
    /// Who pushed.
    pub sender: Account,
}

impl PushEvent {
    /// The branch pushed, or `None` for a tag or other ref.
    pub fn branch(&self) -> Option<&str> {
        self.git_ref
            .strip_prefix("refs/heads/")
            .filter(|name| !name.is_empty())
    }
}

/// The largest delivery GitHub sends (payloads are capped at 25 MB).
pub const MAX_WEBHOOK_BYTES: usize = 25 * 1024 * 1024;

/// A parsed webhook delivery, by its event name.
// One value per delivery, matched on at once: unboxed variants keep the shape the fake GitHub and
// the Worker share.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookEvent {
    /// `pull_request`.
    PullRequest(PullRequestEvent),
    /// `installation`.
    Installation(InstallationEvent),
    /// `installation_repositories`.
    InstallationRepositories(InstallationRepositoriesEvent),
    /// `push`.
    Push(PushEvent),
    /// `ping`, sent when the webhook is created.
    Ping,
}

fn parse_payload<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, WebhookError> {
    serde_json::from_slice(body).map_err(|error| WebhookError::BadPayload(error.to_string()))
}

impl WebhookEvent {
    /// Parses a delivery's body by its [`EVENT_HEADER`]; an event not handled here is
    /// [`WebhookError::UnknownEvent`], a body that does not fit is [`WebhookError::BadPayload`].
    pub fn parse(event: &str, body: &[u8]) -> Result<WebhookEvent, WebhookError> {
        match event.trim() {
            "pull_request" => parse_payload(body).map(WebhookEvent::PullRequest),
            "installation" => parse_payload(body).map(WebhookEvent::Installation),
            "installation_repositories" => {
                parse_payload(body).map(WebhookEvent::InstallationRepositories)
            }
            "push" => parse_payload(body).map(WebhookEvent::Push),
            "ping" => parse_payload::<serde_json::Map<String, serde_json::Value>>(body)
                .map(|_| WebhookEvent::Ping),
            _ => Err(WebhookError::UnknownEvent),
        }
    }

    /// The payload as compact JSON holding only the fields Nightshift reads (what a Durable
    /// Object stores: a delivery may be 25 MB, a stored value at most 2 MB). It parses back with
    /// [`WebhookEvent::parse`] into the same event.
    pub fn to_json(&self) -> String {
        let json = match self {
            WebhookEvent::PullRequest(e) => serde_json::to_string(e),
            WebhookEvent::Installation(e) => serde_json::to_string(e),
            WebhookEvent::InstallationRepositories(e) => serde_json::to_string(e),
            WebhookEvent::Push(e) => serde_json::to_string(e),
            WebhookEvent::Ping => Ok("{}".to_string()),
        };
        json.unwrap_or_else(|_| "{}".to_string())
    }

    /// The event's name, as in [`EVENT_HEADER`].
    pub fn name(&self) -> &'static str {
        match self {
            WebhookEvent::PullRequest(_) => "pull_request",
            WebhookEvent::Installation(_) => "installation",
            WebhookEvent::InstallationRepositories(_) => "installation_repositories",
            WebhookEvent::Push(_) => "push",
            WebhookEvent::Ping => "ping",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PR state with the out-of-order guard
// ---------------------------------------------------------------------------------------------

/// Where a pull request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrState {
    /// Open (draft or not).
    Open,
    /// Closed without merging.
    Closed,
    /// Merged (final: GitHub cannot reopen a merged PR).
    Merged,
}

/// What Nightshift remembers of a pull request it opened or follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Hash)]
pub struct PrLink {
    /// The base repository's `owner/name`.
    pub repository: String,
    /// The PR's number.
    pub number: u64,
    /// The PR's web page.
    pub url: String,
    /// The head branch.
    pub head: String,
    /// The base branch.
    pub base: String,
    /// Open, closed or merged.
    pub state: PrState,
    /// Whether it is a draft.
    pub draft: bool,
    /// The title.
    pub title: String,
    /// GitHub's `updated_at` of the version remembered.
    pub updated_at: String,
    /// The head commit (a push to the branch moves it: the PR was updated).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub head_sha: String,
}

/// What [`PrLink::apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Applied {
    /// The link took the newer version, which differed.
    Changed,
    /// The version was not older but nothing changed.
    Same,
    /// The version is older than the one remembered (or unreadable) and was ignored.
    Stale,
}

fn pr_state(pull: &Pull) -> PrState {
    if pull.merged {
        PrState::Merged
    } else if pull.state == "closed" {
        PrState::Closed
    } else {
        PrState::Open
    }
}

impl PrLink {
    /// The link for `pull` in the base repository `repository` (`owner/name`).
    pub fn from_pull(repository: &str, pull: &Pull) -> PrLink {
        PrLink {
            repository: repository.to_string(),
            number: pull.number,
            url: pull.html_url.clone(),
            head: pull.head.git_ref.clone(),
            base: pull.base.git_ref.clone(),
            state: pr_state(pull),
            draft: pull.draft,
            title: pull.title.clone(),
            updated_at: pull.updated_at.clone(),
            head_sha: pull.head.sha.clone(),
        }
    }

    /// Takes `pull` unless it is older than what is remembered (deliveries arrive out of
    /// order). Timestamps are compared in seconds; an equal `updated_at` applies (GitHub's
    /// granularity is one second), except that a merged link never goes back to open or closed
    /// (a merged PR is final at GitHub, so such a version is a late one). An unreadable incoming
    /// timestamp is refused as stale; an unreadable remembered one is taken as older.
    pub fn apply(&mut self, pull: &Pull) -> Applied {
        let Some(incoming) = parse_rfc3339_seconds(&pull.updated_at) else {
            return Applied::Stale;
        };
        if parse_rfc3339_seconds(&self.updated_at).is_some_and(|known| incoming < known) {
            return Applied::Stale;
        }
        let next = PrLink::from_pull(&self.repository, pull);
        if self.state == PrState::Merged && next.state != PrState::Merged {
            return Applied::Stale;
        }
        if next == *self {
            Applied::Same
        } else {
            *self = next;
            Applied::Changed
        }
    }
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = if year >= 0 { year } else { year - 399 } / 400;
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn digits(text: &str, from: usize, len: usize) -> Option<i64> {
    let part = text.get(from..from + len)?;
    if !part.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    part.parse().ok()
}

/// Seconds since the epoch of an RFC 3339 timestamp (`2026-12-01T10:00:00Z`, also with
/// fractional seconds, which are dropped, and with a `+HH:MM`/`-HH:MM` offset). `None` for
/// anything else or a time before 1970.
pub fn parse_rfc3339_seconds(s: &str) -> Option<u64> {
    let text = s.trim();
    let bytes = text.as_bytes();
    if bytes.len() < 20
        || bytes[4] != b'-'
        || bytes[7] != b'-'
        || !matches!(bytes[10], b'T' | b't')
        || bytes[13] != b':'
        || bytes[16] != b':'
    {
        return None;
    }
    let year = digits(text, 0, 4)?;
    let month = digits(text, 5, 2)?;
    let day = digits(text, 8, 2)?;
    let hour = digits(text, 11, 2)?;
    let minute = digits(text, 14, 2)?;
    let second = digits(text, 17, 2)?;
    if !(1..=12).contains(&month)
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let fraction_len = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if fraction_len == 0 {
            return None;
        }
        rest = &fraction[fraction_len..];
    }
    let offset_seconds = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first() {
                Some(b'+') => 1,
                Some(b'-') => -1,
                _ => return None,
            };
            if rest.len() != 6 || rest.as_bytes()[3] != b':' {
                return None;
            }
            let offset_hours = digits(rest, 1, 2)?;
            let offset_minutes = digits(rest, 4, 2)?;
            if offset_hours > 23 || offset_minutes > 59 {
                return None;
            }
            sign * (offset_hours * 3600 + offset_minutes * 60)
        }
    };
    let local = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    u64::try_from(local - offset_seconds).ok()
}

/// The page offering to open a PR from `head` into `base`:
/// `{web}/{full_name}/compare/{base}...{head}?expand=1`. Branch names are percent-encoded
/// except for `/` and unreserved characters, so a usual name appears as is.
pub fn compare_url(web_url: &str, full_name: &str, base: &str, head: &str) -> String {
    format!(
        "{}/{}/compare/{}...{}?expand=1",
        web_url.trim_end_matches('/'),
        full_name,
        encode_keeping(base, b"/"),
        encode_keeping(head, b"/"),
    )
}

// ---------------------------------------------------------------------------------------------
// REST types
// ---------------------------------------------------------------------------------------------

/// `GET /user`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// GitHub's numeric id.
    pub id: u64,
    /// The login.
    pub login: String,
    /// The display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The public email, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// `User`, `Organization` or `Bot`.
    #[serde(rename = "type", default)]
    pub kind: String,
}

/// One entry of `GET /user/emails`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Email {
    /// The address.
    pub email: String,
    /// Whether it is the primary address.
    pub primary: bool,
    /// Whether GitHub verified it.
    pub verified: bool,
}

/// The primary verified address, else the first verified one.
pub fn primary_email(emails: &[Email]) -> Option<&str> {
    emails
        .iter()
        .find(|email| email.primary && email.verified)
        .or_else(|| emails.iter().find(|email| email.verified))
        .map(|email| email.email.as_str())
}

/// The caller's permissions on a repository (`GET /repos/{o}/{r}` with a user token).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Permissions {
    /// Admin.
    #[serde(default)]
    pub admin: bool,
    /// Maintain.
    #[serde(default)]
    pub maintain: bool,
    /// Write.
    #[serde(default)]
    pub push: bool,
    /// Triage.
    #[serde(default)]
    pub triage: bool,
    /// Read.
    #[serde(default)]
    pub pull: bool,
}

/// `GET /repos/{owner}/{repo}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repository {
    /// GitHub's numeric id.
    pub id: u64,
    /// The name without the owner.
    pub name: String,
    /// `owner/name`.
    pub full_name: String,
    /// The owning account.
    pub owner: Account,
    /// The default branch.
    pub default_branch: String,
    /// Whether the repository is private.
    #[serde(default)]
    pub private: bool,
    /// The caller's permissions (present with a user token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Permissions>,
}

/// A user's role on a repository, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// No access.
    None,
    /// Read.
    Read,
    /// Triage.
    Triage,
    /// Write (push).
    Write,
    /// Maintain.
    Maintain,
    /// Admin.
    Admin,
}

impl Role {
    /// The highest role a repository's `permissions` grant; `None` when there are none.
    pub fn from_permissions(p: Option<&Permissions>) -> Role {
        match p {
            Some(permissions) if permissions.admin => Role::Admin,
            Some(permissions) if permissions.maintain => Role::Maintain,
            Some(permissions) if permissions.push => Role::Write,
            Some(permissions) if permissions.triage => Role::Triage,
            Some(permissions) if permissions.pull => Role::Read,
            _ => Role::None,
        }
    }

    /// The role a permission name stands for (`admin`, `maintain`, `write`, `triage`, `read`,
    /// also `push` and `pull`); anything else is `None`.
    pub fn from_permission_name(s: &str) -> Role {
        match s.trim().to_ascii_lowercase().as_str() {
            "admin" => Role::Admin,
            "maintain" => Role::Maintain,
            "write" | "push" => Role::Write,
            "triage" => Role::Triage,
            "read" | "pull" => Role::Read,
            _ => Role::None,
        }
    }
}

/// What a person does with a registered GitHub repository, and the permission on GitHub it
/// takes: reading its settings and build logs, and using it (sessions, joining them,
/// background agents, warm sandboxes) take read; changing it, building and rolling back,
/// and registering it take maintain (or admin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepositoryAction {
    Read,
    Use,
    /// Work that pushes to a branch that is not Nightshift's own (a pull request's).
    Push,
    Change,
    Register,
}

impl RepositoryAction {
    /// The least role the action takes.
    pub fn needs(self) -> Role {
        match self {
            RepositoryAction::Read | RepositoryAction::Use => Role::Read,
            RepositoryAction::Push => Role::Write,
            RepositoryAction::Change | RepositoryAction::Register => Role::Maintain,
        }
    }

    /// Whether `role` may do it; the refusal names the permission it takes.
    pub fn check(self, role: Role) -> Result<(), &'static str> {
        if role >= self.needs() {
            Ok(())
        } else if self.needs() == Role::Read {
            Err("read")
        } else if self.needs() == Role::Write {
            Err("write")
        } else {
            Err("admin or maintain")
        }
    }
}

/// `GET /repos/{o}/{r}/collaborators/{u}/permission`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollaboratorPermission {
    /// `admin`, `write`, `read` or `none` (maintain reads `write`, triage reads `read`).
    pub permission: String,
    /// The exact role (`maintain`, `triage`, or a custom role's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role_name: Option<String>,
}

/// An App installation (`GET /repos/{o}/{r}/installation`, `GET /app/installations`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installation {
    /// The installation id.
    pub id: u64,
    /// The account the App is installed on.
    pub account: Account,
    /// The App's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_id: Option<u64>,
}

/// The body of `POST /app/installations/{id}/access_tokens`: narrows the token.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AccessTokenRequest {
    /// Repository names without the owner; empty for all the installation's repositories.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repositories: Vec<String>,
    /// Permission -> level (`{"contents": "read"}`); empty for all the App has.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub permissions: BTreeMap<String, String>,
}

/// The answer of `POST /app/installations/{id}/access_tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessToken {
    /// The installation token (`ghs_…`).
    pub token: String,
    /// When it expires, ISO 8601.
    pub expires_at: String,
    /// Permission -> level granted.
    #[serde(default)]
    pub permissions: BTreeMap<String, String>,
    /// The repositories it is limited to (empty: all the installation's).
    #[serde(default)]
    pub repositories: Vec<RepoName>,
}

/// The contents access an installation token is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    /// `contents: read`.
    Read,
    /// `contents: write`.
    Write,
    /// `pull_requests: write` and `issues: write`, no contents: reading review comments,
    /// replying in their threads and reacting (the control plane's, never a sandbox's).
    Discussion,
}

impl Access {
    /// The level's name (its token cache key): `read`, `write` or `discussion`.
    pub fn level(self) -> &'static str {
        match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Discussion => "discussion",
        }
    }

    /// A token request for one repository (`repo_name` without the owner) with this access
    /// and `metadata: read`.
    pub fn request(self, repo_name: &str) -> AccessTokenRequest {
        let granted: &[(&str, &str)] = match self {
            Access::Read => &[("contents", "read")],
            Access::Write => &[("contents", "write")],
            Access::Discussion => &[("pull_requests", "write"), ("issues", "write")],
        };
        let permissions = granted
            .iter()
            .chain(&[("metadata", "read")])
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        AccessTokenRequest {
            repositories: vec![repo_name.to_string()],
            permissions,
        }
    }
}

/// The body of `POST /repos/{o}/{r}/pulls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatePull {
    /// The title.
    pub title: String,
    /// The head branch (`branch` or `owner:branch`).
    pub head: String,
    /// The base branch.
    pub base: String,
    /// The description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Open as a draft.
    #[serde(default)]
    pub draft: bool,
}

/// GitHub's error answer (`{"message": "Not Found", "documentation_url": "…"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// The message.
    pub message: String,
    /// Validation details (422 answers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<serde_json::Value>,
    /// A link to the documentation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub documentation_url: Option<String>,
}

/// One entry of `GET /app/hook/deliveries`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The delivery's numeric id (for redelivery).
    pub id: u64,
    /// The GUID sent in [`DELIVERY_HEADER`].
    pub guid: String,
    /// The HTTP status the receiver answered.
    pub status_code: u16,
    /// Whether this was a redelivery.
    #[serde(default)]
    pub redelivery: bool,
    /// The event name.
    pub event: String,
    /// The event's action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// When it was delivered, ISO 8601.
    pub delivered_at: String,
}

// ---------------------------------------------------------------------------------------------
// OAuth (user access tokens of a GitHub App) with PKCE
// ---------------------------------------------------------------------------------------------

/// The RFC 7636 `S256` code challenge of `verifier`: base64url without padding of its SHA-256.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// True for an RFC 7636 code verifier: 43 to 128 characters of `[A-Za-z0-9-._~]`.
pub fn valid_verifier(v: &str) -> bool {
    (43..=128).contains(&v.len()) && v.bytes().all(is_unreserved)
}

/// Percent-encodes every byte but the unreserved ones and those in `keep`.
fn encode_keeping(text: &str, keep: &[u8]) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if is_unreserved(byte) || keep.contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Percent-encodes every byte but the unreserved ones (`A-Z a-z 0-9 - . _ ~`).
pub fn percent_encode(text: &str) -> String {
    encode_keeping(text, b"")
}

fn hex_value(byte: u8) -> Option<u8> {
    char::from(byte)
        .to_digit(16)
        .and_then(|value| u8::try_from(value).ok())
}

/// Decodes `%XX` escapes (and `+` as a space when `plus_is_space`); a broken escape is kept
/// as it is; invalid UTF-8 is replaced.
fn percent_decode(text: &str, plus_is_space: bool) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'+' if plus_is_space => decoded.push(b' '),
            b'%' => {
                let high = bytes.get(at + 1).copied().and_then(hex_value);
                let low = bytes.get(at + 2).copied().and_then(hex_value);
                if let (Some(high), Some(low)) = (high, low) {
                    decoded.push(high * 16 + low);
                    at += 2;
                } else {
                    decoded.push(b'%');
                }
            }
            other => decoded.push(other),
        }
        at += 1;
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

/// The page where a user authorises the App:
/// `{web}/login/oauth/authorize?client_id=…&redirect_uri=…&state=…&code_challenge=…&code_challenge_method=S256&allow_signup=false`.
pub fn authorize_url(
    web_url: &str,
    client_id: &str,
    redirect_uri: &str,
    state: &str,
    challenge: &str,
) -> String {
    let query = form_encode(&[
        ("client_id", client_id),
        ("redirect_uri", redirect_uri),
        ("state", state),
        ("code_challenge", challenge),
        ("code_challenge_method", "S256"),
        ("allow_signup", "false"),
    ]);
    format!(
        "{}/login/oauth/authorize?{query}",
        web_url.trim_end_matches('/')
    )
}

/// `application/x-www-form-urlencoded` (also a URL query): `k=v&k2=v2`, with every byte but
/// the unreserved ones percent-encoded (a space is `%20`).
pub fn form_encode(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(key, value)| format!("{}={}", percent_encode(key), percent_encode(value)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Decodes a form body or URL query (`+` is a space, `%XX` decoded, invalid UTF-8 replaced);
/// empty pieces are skipped and a piece without `=` has an empty value.
pub fn form_decode(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (key, value) = piece.split_once('=').unwrap_or((piece, ""));
            (percent_decode(key, true), percent_decode(value, true))
        })
        .collect()
}

/// The body of `POST /login/oauth/access_token`: a code grant (with the PKCE verifier) or a
/// refresh (`grant_type: refresh_token`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenExchange {
    /// The App's client id.
    pub client_id: String,
    /// The App's client secret.
    pub client_secret: String,
    /// The code from the redirect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// The redirect URI used to get the code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_uri: Option<String>,
    /// The PKCE verifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_verifier: Option<String>,
    /// `refresh_token` for a refresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_type: Option<String>,
    /// The refresh token (`ghr_…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
}

impl TokenExchange {
    /// The exchange as `(name, value)` pairs, for a form body ([`form_encode`]).
    pub fn form_pairs(&self) -> Vec<(&str, &str)> {
        let mut pairs = vec![
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.as_str()),
        ];
        let optional = [
            ("code", &self.code),
            ("redirect_uri", &self.redirect_uri),
            ("code_verifier", &self.code_verifier),
            ("grant_type", &self.grant_type),
            ("refresh_token", &self.refresh_token),
        ];
        for (name, value) in optional {
            if let Some(value) = value {
                pairs.push((name, value.as_str()));
            }
        }
        pairs
    }
}

/// The answer of `POST /login/oauth/access_token`: GitHub answers errors with HTTP 200 too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenAnswer {
    /// Tokens were issued.
    Granted(UserTokens),
    /// The exchange was refused (`bad_verification_code`, `bad_refresh_token`, …).
    Refused {
        /// The error code.
        error: String,
        /// GitHub's explanation.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error_description: Option<String>,
    },
}

/// A user's tokens from a code grant or refresh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserTokens {
    /// The user access token (`ghu_…`).
    pub access_token: String,
    /// Seconds until the access token expires (absent when expiry is off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<u64>,
    /// The refresh token (`ghr_…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    /// Seconds until the refresh token expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token_expires_in: Option<u64>,
    /// Always empty for GitHub Apps.
    #[serde(default)]
    pub scope: String,
    /// `bearer`.
    #[serde(default)]
    pub token_type: String,
}

// ---------------------------------------------------------------------------------------------
// App JWT (RS256): the signing itself is WebCrypto's in the Worker and `rsa` in tests
// ---------------------------------------------------------------------------------------------

/// The claims of an App JWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtClaims {
    /// Issued at (seconds), backdated for clock drift.
    pub iat: u64,
    /// Expiry (seconds), at most 10 minutes after `iat`.
    pub exp: u64,
    /// The App's client id (or app id).
    pub iss: String,
}

/// The header every App JWT carries.
const JWT_HEADER: &str = r#"{"alg":"RS256","typ":"JWT"}"#;

/// Base64url that accepts input with or without padding.
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Claims valid from 60 s ago (clock drift) to 540 s from now: exactly GitHub's 10-minute limit.
pub fn jwt_claims(iss: &str, now_s: u64) -> JwtClaims {
    JwtClaims {
        iat: now_s.saturating_sub(60),
        exp: now_s.saturating_add(540),
        iss: iss.to_string(),
    }
}

/// The text an App JWT signs: `b64url(header) . b64url(claims)`.
pub fn jwt_signing_input(claims: &JwtClaims) -> String {
    let claims_json = serde_json::json!({
        "iat": claims.iat,
        "exp": claims.exp,
        "iss": claims.iss,
    })
    .to_string();
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(JWT_HEADER),
        URL_SAFE_NO_PAD.encode(claims_json)
    )
}

/// The finished JWT: the signing input, `.`, and the base64url signature.
pub fn jwt_finish(signing_input: &str, signature: &[u8]) -> String {
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// Why a JWT could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum JwtError {
    /// Not three base64url parts with a JSON header and the App claims.
    #[error("A JSON web token could not be decoded")]
    Malformed,
    /// The header's `alg` is not `RS256`.
    #[error("the JSON web token is not signed with RS256")]
    Algorithm,
}

impl JwtError {
    /// A stable machine-readable code for the error.
    pub fn code(&self) -> &'static str {
        match self {
            JwtError::Malformed => "jwt_malformed",
            JwtError::Algorithm => "jwt_algorithm",
        }
    }
}

/// Splits an App JWT into its signing input, claims and signature, checking that the header
/// names `RS256`. The signature itself is not checked here.
pub fn jwt_parse(token: &str) -> Result<(String, JwtClaims, Vec<u8>), JwtError> {
    let mut parts = token.trim().split('.');
    let (Some(header_part), Some(claims_part), Some(signature_part), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let decode = |part: &str| {
        URL_SAFE_LENIENT
            .decode(part)
            .map_err(|_| JwtError::Malformed)
    };
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&decode(header_part)?).map_err(|_| JwtError::Malformed)?;
    if header.get("alg").and_then(serde_json::Value::as_str) != Some("RS256") {
        return Err(JwtError::Algorithm);
    }
    let claims: JwtClaims =
        serde_json::from_slice(&decode(claims_part)?).map_err(|_| JwtError::Malformed)?;
    let signature = decode(signature_part)?;
    if signature.is_empty() {
        return Err(JwtError::Malformed);
    }
    Ok((format!("{header_part}.{claims_part}"), claims, signature))
}

// ---------------------------------------------------------------------------------------------
// Private keys (PEM): GitHub hands out PKCS#1; WebCrypto imports only PKCS#8
// ---------------------------------------------------------------------------------------------

/// Why a private key could not be turned into PKCS#8.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyError {
    /// No `-----BEGIN …-----` / `-----END …-----` block.
    #[error("the private key is not PEM: paste the whole .pem file GitHub downloaded, BEGIN and END lines included")]
    NotPem,
    /// A PEM block of a kind that cannot be used (encrypted, EC, …).
    #[error("this private key is not supported ({0}): use the unencrypted RSA key GitHub generated for the App")]
    Unsupported(String),
    /// The base64 body or the DER inside is broken.
    #[error("the private key's contents are damaged (bad base64 or DER)")]
    BadDer,
}

impl KeyError {
    /// A stable machine-readable code for the error.
    pub fn code(&self) -> &'static str {
        match self {
            KeyError::NotPem => "key_not_pem",
            KeyError::Unsupported(_) => "key_unsupported",
            KeyError::BadDer => "key_bad_der",
        }
    }
}

/// DER of OID 1.2.840.113549.1.1.1 (rsaEncryption), tag and length included.
const RSA_ENCRYPTION_OID: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];

/// A DER length: short form below 128, else long form with the fewest bytes.
fn der_length(len: usize) -> Vec<u8> {
    if len < 0x80 {
        // Fits in 7 bits, so the cast is exact.
        return vec![len as u8];
    }
    let be_bytes = len.to_be_bytes();
    let skip = be_bytes.iter().take_while(|&&b| b == 0).count();
    let significant = &be_bytes[skip..];
    let mut encoded = Vec::with_capacity(1 + significant.len());
    // At most size_of::<usize>() bytes, so the cast is exact.
    encoded.push(0x80 | significant.len() as u8);
    encoded.extend_from_slice(significant);
    encoded
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut encoded = vec![tag];
    encoded.extend(der_length(content.len()));
    encoded.extend_from_slice(content);
    encoded
}

/// Reads one DER element at the start of `input`: (tag, content, rest).
fn der_read(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, after_tag) = input.split_first()?;
    let (&first, after_first) = after_tag.split_first()?;
    let (len, after_len) = if first < 0x80 {
        (usize::from(first), after_first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > std::mem::size_of::<usize>() || after_first.len() < count {
            return None;
        }
        let (len_bytes, rest) = after_first.split_at(count);
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, rest)
    };
    if after_len.len() < len {
        return None;
    }
    let (content, rest) = after_len.split_at(len);
    Some((tag, content, rest))
}

/// Checks a PKCS#1 RSAPrivateKey's outer shape: one SEQUENCE filling the input, starting with
/// an INTEGER version.
fn check_pkcs1(input: &[u8]) -> Result<(), KeyError> {
    match der_read(input) {
        Some((0x30, content, [])) => match der_read(content) {
            Some((0x02, _, _)) => Ok(()),
            _ => Err(KeyError::BadDer),
        },
        _ => Err(KeyError::BadDer),
    }
}

/// Checks a PKCS#8 PrivateKeyInfo's shape and that it holds an RSA key.
fn check_pkcs8(input: &[u8]) -> Result<(), KeyError> {
    let Some((0x30, content, [])) = der_read(input) else {
        return Err(KeyError::BadDer);
    };
    let Some((0x02, _, after_version)) = der_read(content) else {
        return Err(KeyError::BadDer);
    };
    let Some((0x30, algorithm, _)) = der_read(after_version) else {
        return Err(KeyError::BadDer);
    };
    if algorithm.starts_with(RSA_ENCRYPTION_OID) {
        Ok(())
    } else {
        Err(KeyError::Unsupported("not an RSA key".to_string()))
    }
}

/// Wraps a PKCS#1 RSAPrivateKey (DER) into a PKCS#8 PrivateKeyInfo:
/// `SEQUENCE { INTEGER 0, SEQUENCE { OID rsaEncryption, NULL }, OCTET STRING <pkcs1> }`.
pub fn pkcs1_to_pkcs8(pkcs1_der: &[u8]) -> Vec<u8> {
    let version = der(0x02, &[0x00]);
    let mut algorithm_content = RSA_ENCRYPTION_OID.to_vec();
    algorithm_content.extend_from_slice(&[0x05, 0x00]);
    let algorithm = der(0x30, &algorithm_content);
    let private_key = der(0x04, pkcs1_der);
    let mut content = version;
    content.extend(algorithm);
    content.extend(private_key);
    der(0x30, &content)
}

/// The PKCS#8 DER of a PEM private key, as WebCrypto's `importKey("pkcs8", …)` wants it.
/// Accepts `RSA PRIVATE KEY` (PKCS#1, as GitHub downloads it: wrapped) and `PRIVATE KEY`
/// (PKCS#8: as is); tolerates `\r\n`, surrounding whitespace and literal `\n` sequences (a key
/// pasted into one line of a secret).
pub fn private_key_pkcs8(pem: &str) -> Result<Vec<u8>, KeyError> {
    let text = pem
        .replace("\\r\\n", "\n")
        .replace("\\n", "\n")
        .replace('\r', "");
    let begin_at = text.find("-----BEGIN ").ok_or(KeyError::NotPem)?;
    let after_begin = &text[begin_at + "-----BEGIN ".len()..];
    let label_end = after_begin.find("-----").ok_or(KeyError::NotPem)?;
    let label = after_begin[..label_end].trim();
    let body_and_end = &after_begin[label_end + "-----".len()..];
    let end_marker = format!("-----END {label}-----");
    let end_at = body_and_end.find(&end_marker).ok_or(KeyError::NotPem)?;
    let body = &body_and_end[..end_at];
    if body.contains("ENCRYPTED") || label.contains("ENCRYPTED") {
        return Err(KeyError::Unsupported("ENCRYPTED".to_string()));
    }
    let wrap = match label {
        "RSA PRIVATE KEY" => true,
        "PRIVATE KEY" => false,
        other => return Err(KeyError::Unsupported(other.to_string())),
    };
    let base64_text: String = body.chars().filter(|ch| !ch.is_whitespace()).collect();
    let key_der = STANDARD
        .decode(base64_text.as_bytes())
        .map_err(|_| KeyError::BadDer)?;
    if wrap {
        check_pkcs1(&key_der)?;
        Ok(pkcs1_to_pkcs8(&key_der))
    } else {
        check_pkcs8(&key_der)?;
        Ok(key_der)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"It's a Secret to Everybody";

    fn fixture(name: &str) -> &'static str {
        match name {
            "pull_request_opened" => {
                include_str!("../tests/fixtures/github/pull_request_opened.json")
            }
            "pull_request_closed_merged" => {
                include_str!("../tests/fixtures/github/pull_request_closed_merged.json")
            }
            "pull_request_synchronize" => {
                include_str!("../tests/fixtures/github/pull_request_synchronize.json")
            }
            "installation_created" => {
                include_str!("../tests/fixtures/github/installation_created.json")
            }
            "installation_repositories_added" => {
                include_str!("../tests/fixtures/github/installation_repositories_added.json")
            }
            "push" => include_str!("../tests/fixtures/github/push.json"),
            "ping" => include_str!("../tests/fixtures/github/ping.json"),
            other => panic!("no fixture {other}"),
        }
    }

    fn pull_event(name: &str) -> PullRequestEvent {
        match WebhookEvent::parse("pull_request", fixture(name).as_bytes()) {
            Ok(WebhookEvent::PullRequest(event)) => event,
            other => panic!("{name}: {other:?}"),
        }
    }

    #[test]
    fn github_documented_signature_example() {
        // The example of GitHub's "Validating webhook deliveries" page.
        let signature = sign_webhook(SECRET, b"Hello, World!");
        assert_eq!(
            signature,
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
        assert_eq!(
            verify_webhook(SECRET, b"Hello, World!", Some(&signature)),
            Ok(())
        );
    }

    #[test]
    fn sign_verify_round_trip_and_every_error() {
        let body = fixture("push").as_bytes();
        let signature = sign_webhook(SECRET, body);
        assert!(signature.starts_with("sha256="));
        assert_eq!(signature.len(), "sha256=".len() + 64);
        assert_eq!(verify_webhook(SECRET, body, Some(&signature)), Ok(()));
        assert_eq!(
            verify_webhook(SECRET, body, Some(&format!("  {signature} "))),
            Ok(())
        );

        let cases: Vec<(Result<(), WebhookError>, WebhookError, &str)> = vec![
            (
                verify_webhook(b"", body, Some(&signature)),
                WebhookError::NotConfigured,
                "webhook_not_configured",
            ),
            (
                verify_webhook(SECRET, body, None),
                WebhookError::Missing,
                "signature_missing",
            ),
            (
                verify_webhook(SECRET, body, Some("")),
                WebhookError::Missing,
                "signature_missing",
            ),
            (
                verify_webhook(SECRET, body, Some(&signature["sha256=".len()..])),
                WebhookError::Malformed,
                "signature_malformed",
            ),
            (
                verify_webhook(SECRET, body, Some(&signature.replace("sha256=", "sha1="))),
                WebhookError::Malformed,
                "signature_malformed",
            ),
            (
                verify_webhook(SECRET, body, Some(&format!("sha256={}", "zz".repeat(32)))),
                WebhookError::Malformed,
                "signature_malformed",
            ),
            (
                verify_webhook(SECRET, body, Some(&signature[..signature.len() - 2])),
                WebhookError::Malformed,
                "signature_malformed",
            ),
            (
                verify_webhook(b"another secret", body, Some(&signature)),
                WebhookError::BadSignature,
                "signature_invalid",
            ),
            (
                verify_webhook(SECRET, b"{}", Some(&signature)),
                WebhookError::BadSignature,
                "signature_invalid",
            ),
        ];
        for (got, want, code) in cases {
            assert_eq!(got, Err(want.clone()));
            assert_eq!(want.code(), code);
            assert!(!want.to_string().is_empty());
        }
        assert_eq!(
            WebhookError::BadPayload("x".into()).code(),
            "webhook_payload_invalid"
        );
        assert_eq!(WebhookError::UnknownEvent.code(), "webhook_event_ignored");
    }

    #[test]
    fn verification_compares_bytes_not_text() {
        // The digest is decoded and checked with verify_slice (constant time), so the case of
        // the hex digits does not matter while any flipped bit does.
        let body = b"payload";
        let signature = sign_webhook(SECRET, body);
        let upper = format!("sha256={}", signature["sha256=".len()..].to_uppercase());
        assert_eq!(verify_webhook(SECRET, body, Some(&upper)), Ok(()));
        let last = signature.chars().last().unwrap_or('0');
        let flipped = format!(
            "{}{}",
            &signature[..signature.len() - 1],
            if last == '0' { '1' } else { '0' }
        );
        assert_eq!(
            verify_webhook(SECRET, body, Some(&flipped)),
            Err(WebhookError::BadSignature)
        );
    }

    #[test]
    fn delivery_ids() {
        assert!(valid_delivery_id("72d3162e-cc78-11e3-81ab-4c9367dc0958"));
        assert!(valid_delivery_id("a"));
        assert!(!valid_delivery_id(""));
        assert!(!valid_delivery_id(&"a".repeat(65)));
        assert!(!valid_delivery_id("72d3162e cc78"));
        assert!(!valid_delivery_id("../etc"));
    }

    #[test]
    fn parses_pull_request_opened() {
        let event = pull_event("pull_request_opened");
        assert_eq!(event.action, "opened");
        assert_eq!(event.number, 7);
        assert_eq!(event.repository.full_name, "acme/web");
        assert_eq!(event.installation, Some(InstallationRef { id: 55_501 }));
        assert_eq!(event.sender.kind, "User");
        let pull = &event.pull_request;
        assert_eq!(pull.state, "open");
        assert!(pull.draft);
        assert!(!pull.merged);
        assert_eq!(pull.head.git_ref, "nightshift/fix-login");
        assert_eq!(pull.base.git_ref, "main");
        assert_eq!(pull.user.login, "ada");
        assert!(!pull.is_fork());
        let link = PrLink::from_pull(&event.repository.full_name, pull);
        assert_eq!(link.state, PrState::Open);
        assert_eq!(link.url, "https://github.com/acme/web/pull/7");
        assert_eq!(link.head, "nightshift/fix-login");
    }

    #[test]
    fn parses_pull_request_closed_merged() {
        let event = pull_event("pull_request_closed_merged");
        assert_eq!(event.action, "closed");
        let pull = &event.pull_request;
        assert_eq!(pull.state, "closed");
        assert!(pull.merged);
        assert_eq!(pull.merged_at.as_deref(), Some("2026-12-01T11:30:05Z"));
        assert_eq!(PrLink::from_pull("acme/web", pull).state, PrState::Merged);
    }

    #[test]
    fn parses_pull_request_synchronize_from_a_fork() {
        let event = pull_event("pull_request_synchronize");
        assert_eq!(event.action, "synchronize");
        let pull = &event.pull_request;
        assert!(pull.is_fork());
        assert_eq!(
            pull.head.repo.as_ref().map(|repo| repo.full_name.as_str()),
            Some("mallory/web")
        );
        assert_eq!(pull.body, None);
        let mut deleted_fork = pull.clone();
        deleted_fork.head.repo = None;
        assert!(deleted_fork.is_fork());
    }

    #[test]
    fn parses_installation_events() {
        let body = fixture("installation_created").as_bytes();
        let Ok(WebhookEvent::Installation(event)) = WebhookEvent::parse("installation", body)
        else {
            panic!("installation_created did not parse");
        };
        assert_eq!(event.action, "created");
        assert_eq!(event.installation.id, 55_501);
        assert_eq!(event.installation.account.login, "acme");
        assert_eq!(event.installation.account.kind, "Organization");
        assert_eq!(event.installation.repository_selection, "selected");
        assert_eq!(event.installation.app_id, Some(4242));
        assert_eq!(
            event.installation.app_slug.as_deref(),
            Some("nightshift-test")
        );
        let names: Vec<&str> = event
            .repositories
            .iter()
            .map(|repo| repo.full_name.as_str())
            .collect();
        assert_eq!(names, ["acme/web", "acme/api"]);

        let body = fixture("installation_repositories_added").as_bytes();
        let Ok(WebhookEvent::InstallationRepositories(event)) =
            WebhookEvent::parse("installation_repositories", body)
        else {
            panic!("installation_repositories_added did not parse");
        };
        assert_eq!(event.action, "added");
        assert_eq!(event.repositories_added.len(), 1);
        assert_eq!(event.repositories_added[0].full_name, "acme/docs");
        assert!(event.repositories_added[0].private);
        assert!(event.repositories_removed.is_empty());
    }

    #[test]
    fn parses_push_and_ping() {
        let Ok(WebhookEvent::Push(push)) = WebhookEvent::parse("push", fixture("push").as_bytes())
        else {
            panic!("push did not parse");
        };
        assert_eq!(push.branch(), Some("main"));
        assert_eq!(push.after, "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c");
        assert_eq!(push.repository.default_branch.as_deref(), Some("main"));
        assert_eq!(
            push.repository.owner.as_ref().map(|owner| owner.id),
            Some(9_100)
        );
        let mut tag = push.clone();
        tag.git_ref = "refs/tags/v1.0".into();
        assert_eq!(tag.branch(), None);

        let ping = WebhookEvent::parse("ping", fixture("ping").as_bytes());
        assert_eq!(ping, Ok(WebhookEvent::Ping));
        assert_eq!(WebhookEvent::Ping.name(), "ping");
        assert_eq!(WebhookEvent::Push(push).name(), "push");
    }

    #[test]
    fn unknown_events_and_bad_payloads() {
        assert_eq!(
            WebhookEvent::parse("issues", b"{}"),
            Err(WebhookError::UnknownEvent)
        );
        for event in [
            "pull_request",
            "installation",
            "installation_repositories",
            "push",
            "ping",
        ] {
            match WebhookEvent::parse(event, b"not json") {
                Err(WebhookError::BadPayload(message)) => assert!(!message.is_empty()),
                other => panic!("{event}: {other:?}"),
            }
        }
        // Valid JSON of the wrong shape.
        assert!(matches!(
            WebhookEvent::parse("push", fixture("ping").as_bytes()),
            Err(WebhookError::BadPayload(_))
        ));
    }

    #[test]
    fn payload_types_serialise_back_to_what_they_parse() {
        let event = pull_event("pull_request_opened");
        let json = serde_json::to_vec(&event).unwrap_or_default();
        assert_eq!(
            WebhookEvent::parse("pull_request", &json),
            Ok(WebhookEvent::PullRequest(event))
        );
    }

    #[test]
    fn the_stored_form_of_every_event_parses_back_to_it_and_is_smaller() {
        for (event, name) in [
            ("pull_request", "pull_request_opened"),
            ("pull_request", "pull_request_closed_merged"),
            ("installation", "installation_created"),
            (
                "installation_repositories",
                "installation_repositories_added",
            ),
            ("push", "push"),
            ("ping", "ping"),
        ] {
            let raw = fixture(name);
            let parsed = WebhookEvent::parse(event, raw.as_bytes()).expect(name);
            let stored = parsed.to_json();
            assert!(stored.len() <= raw.len(), "{name}: {stored}");
            assert_eq!(
                WebhookEvent::parse(event, stored.as_bytes()),
                Ok(parsed),
                "{name}"
            );
        }
    }

    fn pull_at(updated_at: &str, state: &str, merged: bool) -> Pull {
        let mut pull = pull_event("pull_request_opened").pull_request;
        pull.updated_at = updated_at.to_string();
        pull.state = state.to_string();
        pull.merged = merged;
        pull
    }

    #[test]
    fn pr_link_apply_guards_against_old_deliveries() {
        let mut link =
            PrLink::from_pull("acme/web", &pull_at("2026-12-01T10:00:00Z", "open", false));
        // The same version again.
        assert_eq!(
            link.apply(&pull_at("2026-12-01T10:00:00Z", "open", false)),
            Applied::Same
        );
        // A newer version with a new title.
        let mut retitled = pull_at("2026-12-01T10:05:00Z", "open", false);
        retitled.title = "Fix the login form".into();
        assert_eq!(link.apply(&retitled), Applied::Changed);
        assert_eq!(link.title, "Fix the login form");
        assert_eq!(link.updated_at, "2026-12-01T10:05:00Z");
        // An older one arriving late is ignored.
        let before = link.clone();
        assert_eq!(
            link.apply(&pull_at("2026-12-01T10:01:00Z", "closed", false)),
            Applied::Stale
        );
        assert_eq!(link, before);
        // Unreadable timestamps are refused.
        assert_eq!(
            link.apply(&pull_at("yesterday", "closed", false)),
            Applied::Stale
        );
        // Same second, different state: applies (GitHub's granularity is one second).
        let mut ready = retitled.clone();
        ready.draft = false;
        assert_eq!(link.apply(&ready), Applied::Changed);
        assert!(!link.draft);
        // Fractional seconds and offsets compare as the same instant.
        let mut same_instant = ready.clone();
        same_instant.updated_at = "2026-12-01T11:05:00.000+01:00".into();
        assert_eq!(link.apply(&same_instant), Applied::Changed);
        assert_eq!(link.state, PrState::Open);
    }

    #[test]
    fn pr_link_merged_is_final() {
        let mut link =
            PrLink::from_pull("acme/web", &pull_at("2026-12-01T10:00:00Z", "open", false));
        assert_eq!(
            link.apply(&pull_at("2026-12-01T11:00:00Z", "closed", true)),
            Applied::Changed
        );
        assert_eq!(link.state, PrState::Merged);
        // A late delivery from the same second, before the merge.
        assert_eq!(
            link.apply(&pull_at("2026-12-01T11:00:00Z", "open", false)),
            Applied::Stale
        );
        assert_eq!(link.state, PrState::Merged);
        // A later edit of the merged PR still applies.
        let mut edited = pull_at("2026-12-01T12:00:00Z", "closed", true);
        edited.title = "Renamed after merge".into();
        assert_eq!(link.apply(&edited), Applied::Changed);
        assert_eq!(link.state, PrState::Merged);
        // Closed without merging.
        let mut closed =
            PrLink::from_pull("acme/web", &pull_at("2026-12-01T10:00:00Z", "open", false));
        assert_eq!(
            closed.apply(&pull_at("2026-12-01T10:00:01Z", "closed", false)),
            Applied::Changed
        );
        assert_eq!(closed.state, PrState::Closed);
        assert_eq!(
            serde_json::to_value(PrState::Merged).unwrap_or_default(),
            serde_json::json!("merged")
        );
    }

    #[test]
    fn rfc3339_known_values() {
        // Checked with `date -u -d '<value>' +%s`.
        assert_eq!(parse_rfc3339_seconds("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_seconds("2000-03-01T00:00:00Z"),
            Some(951_868_800)
        );
        assert_eq!(
            parse_rfc3339_seconds("2026-12-01T10:00:00Z"),
            Some(1_796_119_200)
        );
        assert_eq!(
            parse_rfc3339_seconds("2026-12-01T10:00:00.123456Z"),
            Some(1_796_119_200)
        );
        assert_eq!(
            parse_rfc3339_seconds("2026-12-01T10:00:00+00:00"),
            Some(1_796_119_200)
        );
        assert_eq!(
            parse_rfc3339_seconds("2026-12-01T12:30:00+02:30"),
            Some(1_796_119_200)
        );
        assert_eq!(
            parse_rfc3339_seconds("2026-12-01T05:00:00-05:00"),
            Some(1_796_119_200)
        );
        assert_eq!(
            parse_rfc3339_seconds("2024-02-29T00:00:00Z"),
            Some(1_709_164_800)
        );
        for bad in [
            "",
            "2026-12-01",
            "2026-12-01 10:00:00Z",
            "2026-13-01T10:00:00Z",
            "2026-02-29T10:00:00Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T10:00:00",
            "2026-12-01T10:00:00.Z",
            "2026-12-01T10:00:00+0100",
            "1969-12-31T23:59:59Z",
            "+026-12-01T10:00:00Z",
        ] {
            assert_eq!(parse_rfc3339_seconds(bad), None, "{bad}");
        }
    }

    #[test]
    fn compare_urls() {
        assert_eq!(
            compare_url(
                "https://github.com/",
                "acme/web",
                "main",
                "nightshift/fix-login"
            ),
            "https://github.com/acme/web/compare/main...nightshift/fix-login?expand=1"
        );
        assert_eq!(
            compare_url("http://127.0.0.1:9000", "acme/web", "main", "fix#1"),
            "http://127.0.0.1:9000/acme/web/compare/main...fix%231?expand=1"
        );
    }

    #[test]
    fn emails_roles_and_token_requests() {
        let email = |address: &str, primary: bool, verified: bool| Email {
            email: address.to_string(),
            primary,
            verified,
        };
        let emails = [
            email("old@example.com", false, true),
            email("ada@example.com", true, true),
        ];
        assert_eq!(primary_email(&emails), Some("ada@example.com"));
        let unverified_primary = [
            email("ada@example.com", true, false),
            email("work@example.com", false, true),
        ];
        assert_eq!(primary_email(&unverified_primary), Some("work@example.com"));
        assert_eq!(primary_email(&[email("x@example.com", true, false)]), None);

        let permissions = |admin, maintain, push, triage, pull| Permissions {
            admin,
            maintain,
            push,
            triage,
            pull,
        };
        assert_eq!(Role::from_permissions(None), Role::None);
        assert_eq!(
            Role::from_permissions(Some(&permissions(true, true, true, true, true))),
            Role::Admin
        );
        assert_eq!(
            Role::from_permissions(Some(&permissions(false, true, true, true, true))),
            Role::Maintain
        );
        assert_eq!(
            Role::from_permissions(Some(&permissions(false, false, true, true, true))),
            Role::Write
        );
        assert_eq!(
            Role::from_permissions(Some(&permissions(false, false, false, true, true))),
            Role::Triage
        );
        assert_eq!(
            Role::from_permissions(Some(&permissions(false, false, false, false, true))),
            Role::Read
        );
        assert_eq!(
            Role::from_permissions(Some(&Permissions::default())),
            Role::None
        );
        for (name, role) in [
            ("admin", Role::Admin),
            ("maintain", Role::Maintain),
            ("write", Role::Write),
            ("triage", Role::Triage),
            ("read", Role::Read),
            ("none", Role::None),
            ("Write", Role::Write),
            ("owner", Role::None),
        ] {
            assert_eq!(Role::from_permission_name(name), role, "{name}");
        }
        assert!(Role::None < Role::Read && Role::Read < Role::Triage);
        assert!(Role::Triage < Role::Write && Role::Write < Role::Maintain);
        assert!(Role::Maintain < Role::Admin);
        assert_eq!(
            serde_json::to_value(Role::Maintain).unwrap_or_default(),
            serde_json::json!("maintain")
        );

        let request = Access::Write.request("web");
        assert_eq!(
            serde_json::to_value(&request).unwrap_or_default(),
            serde_json::json!({
                "repositories": ["web"],
                "permissions": {"contents": "write", "metadata": "read"}
            })
        );
        assert_eq!(
            Access::Read
                .request("web")
                .permissions
                .get("contents")
                .map(String::as_str),
            Some("read")
        );
        assert_eq!(
            serde_json::to_value(AccessTokenRequest::default()).unwrap_or_default(),
            serde_json::json!({})
        );
    }

    #[test]
    fn rest_answers_parse_with_unknown_fields() {
        let repository: Repository = serde_json::from_str(
            r#"{"id":1296269,"node_id":"MDEwOlJlcG9zaXRvcnkxMjk2MjY5","name":"web","full_name":"acme/web",
                "owner":{"login":"acme","id":9100,"type":"Organization","site_admin":false},
                "private":true,"default_branch":"main","visibility":"private",
                "permissions":{"admin":false,"maintain":false,"push":true,"triage":true,"pull":true}}"#,
        )
        .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(
            Role::from_permissions(repository.permissions.as_ref()),
            Role::Write
        );
        let answer: ApiErrorBody = serde_json::from_str(
            r#"{"message":"Validation Failed","errors":[{"resource":"PullRequest","code":"custom","message":"A pull request already exists for acme:fix."}],"documentation_url":"https://docs.github.com/rest/pulls/pulls#create-a-pull-request","status":"422"}"#,
        )
        .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(answer.errors.len(), 1);
        let deliveries: Vec<Delivery> = serde_json::from_str(
            r#"[{"id":12345678,"guid":"0b989ba4-242f-11e5-81e1-c7b6966d2516","delivered_at":"2026-12-01T10:00:00Z","redelivery":false,"duration":0.27,"status":"OK","status_code":200,"event":"push","action":null,"installation_id":123,"repository_id":456}]"#,
        )
        .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(deliveries[0].status_code, 200);
        assert_eq!(deliveries[0].action, None);
    }

    #[test]
    fn repository_actions_take_the_permission_they_name() {
        use RepositoryAction::*;
        for (action, least) in [
            (Read, Role::Read),
            (Use, Role::Read),
            (Change, Role::Maintain),
            (Register, Role::Maintain),
        ] {
            assert_eq!(action.needs(), least);
        }
        assert_eq!(Read.check(Role::None), Err("read"));
        assert_eq!(Use.check(Role::Read), Ok(()));
        assert_eq!(Use.check(Role::Triage), Ok(()));
        assert_eq!(Change.check(Role::Write), Err("admin or maintain"));
        assert_eq!(Register.check(Role::Maintain), Ok(()));
        assert_eq!(Register.check(Role::Admin), Ok(()));
        assert_eq!(Register.check(Role::None), Err("admin or maintain"));
    }

    #[test]
    fn pkce_rfc7636_vector() {
        let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
        assert!(valid_verifier(verifier));
        assert_eq!(
            pkce_challenge(verifier),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        assert!(!valid_verifier(&verifier[..42]));
        assert!(valid_verifier(&"a~._-".repeat(26)[..128]));
        assert!(!valid_verifier(&"a".repeat(129)));
        assert!(!valid_verifier(&format!("{}+", &verifier[..43])));
    }

    #[test]
    fn form_encode_decode_round_trip() {
        let pairs = [
            (
                "redirect_uri",
                "https://nightshift.example/auth/callback?next=/s/1",
            ),
            ("state", "a b+c&d=e%f"),
            ("name", "Zoë 🌙"),
            ("empty", ""),
        ];
        let encoded = form_encode(&pairs);
        assert_eq!(
            encoded.split('&').next(),
            Some(
                "redirect_uri=https%3A%2F%2Fnightshift.example%2Fauth%2Fcallback%3Fnext%3D%2Fs%2F1"
            )
        );
        assert!(encoded.contains("state=a%20b%2Bc%26d%3De%25f"));
        let decoded = form_decode(&encoded);
        let want: Vec<(String, String)> = pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect();
        assert_eq!(decoded, want);
        assert_eq!(
            form_decode("a=1+2&&flag&bad=%zz%4&x=%C3%A9"),
            vec![
                ("a".to_string(), "1 2".to_string()),
                ("flag".to_string(), String::new()),
                ("bad".to_string(), "%zz%4".to_string()),
                ("x".to_string(), "é".to_string()),
            ]
        );
        assert_eq!(
            form_decode("x=%FF").first().map(|pair| pair.1.as_str()),
            Some("\u{FFFD}")
        );
    }

    #[test]
    fn authorize_url_and_token_exchange() {
        let url = authorize_url(
            "http://127.0.0.1:9000/",
            "Iv23fake",
            "http://127.0.0.1:8787/auth/github/callback",
            "st4te",
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        );
        let (page, query) = url.split_once('?').unwrap_or_default();
        assert_eq!(page, "http://127.0.0.1:9000/login/oauth/authorize");
        let params = form_decode(query);
        let get = |name: &str| {
            params
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
        };
        assert_eq!(get("client_id"), Some("Iv23fake"));
        assert_eq!(
            get("redirect_uri"),
            Some("http://127.0.0.1:8787/auth/github/callback")
        );
        assert_eq!(get("state"), Some("st4te"));
        assert_eq!(
            get("code_challenge"),
            Some("E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM")
        );
        assert_eq!(get("code_challenge_method"), Some("S256"));
        assert_eq!(get("allow_signup"), Some("false"));

        let refresh = TokenExchange {
            client_id: "Iv23fake".into(),
            client_secret: "s3cret".into(),
            code: None,
            redirect_uri: None,
            code_verifier: None,
            grant_type: Some("refresh_token".into()),
            refresh_token: Some("ghr_abc".into()),
        };
        assert_eq!(
            serde_json::to_value(&refresh).unwrap_or_default(),
            serde_json::json!({"client_id":"Iv23fake","client_secret":"s3cret","grant_type":"refresh_token","refresh_token":"ghr_abc"})
        );
        assert_eq!(
            form_encode(&refresh.form_pairs()),
            "client_id=Iv23fake&client_secret=s3cret&grant_type=refresh_token&refresh_token=ghr_abc"
        );
    }

    #[test]
    fn token_answers_granted_and_refused() {
        let granted: TokenAnswer = serde_json::from_str(
            r#"{"access_token":"ghu_16C7e42F292c6912E7710c838347Ae178B4a","expires_in":28800,"refresh_token":"ghr_1B4a2e77838347a7E420ce178F2E7c6912E169246c34E1ccbF66C46812d16D5B1A9Dc86A1498","refresh_token_expires_in":15897600,"scope":"","token_type":"bearer"}"#,
        )
        .unwrap_or_else(|error| panic!("{error}"));
        let TokenAnswer::Granted(tokens) = granted else {
            panic!("not granted: {granted:?}");
        };
        assert_eq!(tokens.expires_in, Some(28_800));
        assert_eq!(tokens.token_type, "bearer");
        let refused: TokenAnswer = serde_json::from_str(
            r#"{"error":"bad_verification_code","error_description":"The code passed is incorrect or expired.","error_uri":"https://docs.github.com/apps/managing-oauth-apps/troubleshooting-oauth-app-access-token-request-errors/#bad-verification-code"}"#,
        )
        .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(
            refused,
            TokenAnswer::Refused {
                error: "bad_verification_code".into(),
                error_description: Some("The code passed is incorrect or expired.".into()),
            }
        );
        assert_eq!(
            serde_json::to_value(TokenAnswer::Refused {
                error: "bad_refresh_token".into(),
                error_description: None
            })
            .unwrap_or_default(),
            serde_json::json!({"error": "bad_refresh_token"})
        );
    }

    #[test]
    fn jwt_pieces() {
        let claims = jwt_claims("Iv23fake", 1_796_119_200);
        assert_eq!(claims.iat, 1_796_119_140);
        assert_eq!(claims.exp, 1_796_119_740);
        assert_eq!(claims.exp - claims.iat, 600);
        let input = jwt_signing_input(&claims);
        let (header_part, claims_part) = input.split_once('.').unwrap_or_default();
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header_part).unwrap_or_default())
                .unwrap_or_default();
        assert_eq!(header, serde_json::json!({"alg": "RS256", "typ": "JWT"}));
        let decoded: JwtClaims =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims_part).unwrap_or_default())
                .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(decoded, claims);

        let token = jwt_finish(&input, &[1, 2, 3, 250]);
        assert!(!token.contains('='));
        assert_eq!(
            jwt_parse(&token),
            Ok((input.clone(), claims.clone(), vec![1, 2, 3, 250]))
        );

        let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        let forged = format!("{none_header}.{claims_part}.AQID");
        assert_eq!(jwt_parse(&forged), Err(JwtError::Algorithm));
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            &format!("{input}."),
            &format!("{header_part}.e30.AQID"),
            &format!("!!.{claims_part}.AQID"),
        ] {
            assert_eq!(jwt_parse(bad), Err(JwtError::Malformed), "{bad}");
        }
        assert_eq!(JwtError::Malformed.code(), "jwt_malformed");
        assert_eq!(JwtError::Algorithm.code(), "jwt_algorithm");
    }

    #[test]
    fn der_lengths_and_wrapping() {
        assert_eq!(der_length(0), vec![0x00]);
        assert_eq!(der_length(127), vec![0x7f]);
        assert_eq!(der_length(128), vec![0x81, 0x80]);
        assert_eq!(der_length(255), vec![0x81, 0xff]);
        assert_eq!(der_length(256), vec![0x82, 0x01, 0x00]);
        assert_eq!(der_length(1190), vec![0x82, 0x04, 0xa6]);
        // A tiny stand-in RSAPrivateKey: SEQUENCE { INTEGER 0 }.
        let pkcs1 = [0x30, 0x03, 0x02, 0x01, 0x00];
        assert_eq!(
            pkcs1_to_pkcs8(&pkcs1),
            [
                &[0x30, 0x19, 0x02, 0x01, 0x00, 0x30, 0x0d][..],
                RSA_ENCRYPTION_OID,
                &[0x05, 0x00, 0x04, 0x05],
                &pkcs1,
            ]
            .concat()
        );
        assert_eq!(check_pkcs8(&pkcs1_to_pkcs8(&pkcs1)), Ok(()));
    }

    #[test]
    fn key_errors() {
        assert_eq!(private_key_pkcs8("ghp_not_a_key"), Err(KeyError::NotPem));
        assert_eq!(
            private_key_pkcs8("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n"),
            Err(KeyError::NotPem)
        );
        assert_eq!(
            private_key_pkcs8("-----BEGIN EC PRIVATE KEY-----\nMHcC\n-----END EC PRIVATE KEY-----"),
            Err(KeyError::Unsupported("EC PRIVATE KEY".into()))
        );
        assert_eq!(
            private_key_pkcs8(
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIE\n-----END ENCRYPTED PRIVATE KEY-----"
            ),
            Err(KeyError::Unsupported("ENCRYPTED".into()))
        );
        assert_eq!(
            private_key_pkcs8(
                "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nMIIE\n-----END RSA PRIVATE KEY-----"
            ),
            Err(KeyError::Unsupported("ENCRYPTED".into()))
        );
        assert_eq!(
            private_key_pkcs8(
                "-----BEGIN RSA PRIVATE KEY-----\n!!!!\n-----END RSA PRIVATE KEY-----"
            ),
            Err(KeyError::BadDer)
        );
        // Valid base64, but not a DER SEQUENCE.
        assert_eq!(
            private_key_pkcs8(
                "-----BEGIN RSA PRIVATE KEY-----\naGVsbG8=\n-----END RSA PRIVATE KEY-----"
            ),
            Err(KeyError::BadDer)
        );
        // A PKCS#8 key of another algorithm (the EC public key OID).
        let ec_pkcs8 = der(
            0x30,
            &[
                der(0x02, &[0]),
                der(
                    0x30,
                    &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01],
                ),
                der(0x04, &[0x30, 0x00]),
            ]
            .concat(),
        );
        let ec_pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            STANDARD.encode(&ec_pkcs8)
        );
        assert_eq!(
            private_key_pkcs8(&ec_pem),
            Err(KeyError::Unsupported("not an RSA key".into()))
        );
        assert_eq!(KeyError::NotPem.code(), "key_not_pem");
        assert_eq!(KeyError::Unsupported("x".into()).code(), "key_unsupported");
        assert_eq!(KeyError::BadDer.code(), "key_bad_der");
    }
}
