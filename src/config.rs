//! Deployment configuration read from the Worker environment (vars and secrets), with defaults.

use nightshift_core::session::Limits;
use worker::Env;

fn var(env: &Env, name: &str) -> Option<String> {
    env.secret(name)
        .map(|s| s.to_string())
        .or_else(|_| env.var(name).map(|v| v.to_string()))
        .ok()
        .filter(|s| !s.is_empty())
}

fn num<T: std::str::FromStr>(env: &Env, name: &str, default: T) -> T {
    var(env, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Whether a setting is given at all.
pub fn has(env: &Env, name: &str) -> bool {
    var(env, name).is_some()
}

/// A whole-number setting with its default.
pub fn number(env: &Env, name: &str, default: u32) -> u32 {
    num(env, name, default)
}

/// HMAC key for people's bearer tokens (`AUTH_SECRET`).
pub fn auth_secret(env: &Env) -> Vec<u8> {
    var(env, "AUTH_SECRET")
        .map(String::into_bytes)
        .unwrap_or_default()
}

/// The dev sign-in route exists only when `DEV_AUTH=1` (set by the local run, never in production).
pub fn dev_auth(env: &Env) -> bool {
    var(env, "DEV_AUTH").as_deref() == Some("1")
}

/// How long issued tokens live (`TOKEN_TTL_MS`, default one hour); the web app renews them
/// within their sign-in (`POST /auth/renew`), and sign-out ends them all at once.
pub fn token_ttl_ms(env: &Env) -> u64 {
    num(env, "TOKEN_TTL_MS", 60 * 60 * 1000)
}

/// Session limits for new sessions.
pub fn limits(env: &Env) -> Limits {
    let d = Limits::default();
    Limits {
        max_clients_per_user: num(env, "MAX_CLIENTS_PER_USER", d.max_clients_per_user),
        max_members: num(env, "MAX_MEMBERS", d.max_members),
        max_queued: num(env, "MAX_QUEUED", d.max_queued),
        max_lock_ttl_ms: num(env, "MAX_LOCK_TTL_MS", d.max_lock_ttl_ms),
        heartbeat_timeout_ms: num(env, "HEARTBEAT_TIMEOUT_MS", d.heartbeat_timeout_ms),
        max_prompt_bytes: num(env, "MAX_PROMPT_BYTES", d.max_prompt_bytes),
        max_locks: num(env, "MAX_LOCKS", d.max_locks),
    }
}

/// Which prompt runner sessions use: `sandbox` (a provider's sandbox running OpenCode),
/// `echo` (a local stand-in) or `none` (prompts wait for compute).
pub fn runner(env: &Env) -> String {
    var(env, "PROMPT_RUNNER").unwrap_or_else(|| "none".into())
}

/// How long the echo runner takes per prompt.
/// Events one connect replays at most (`REPLAY_MAX_EVENTS`, default 10,000); beyond them the
/// socket is closed with `4002` and the client reconnects from where the replay stopped.
pub fn replay_max_events(env: &Env) -> u64 {
    num(env, "REPLAY_MAX_EVENTS", 10_000).max(1)
}

/// A live sandbox with nothing to do for this long is snapshotted and stopped
/// (`SANDBOX_IDLE_MS`, default 15 minutes; 0: never). A running prompt is never idle.
/// How long a person's GitHub permission on a repository is believed (`ROLE_CACHE_MS`, a
/// minute); a join, a registration and a shell ask afresh.
pub fn role_cache_ms(env: &Env) -> u64 {
    num(env, "ROLE_CACHE_MS", 60 * 1000)
}

pub fn sandbox_idle_ms(env: &Env) -> u64 {
    num(env, "SANDBOX_IDLE_MS", 15 * 60 * 1000)
}

pub fn echo_run_ms(env: &Env) -> u64 {
    num(env, "ECHO_RUN_MS", 1500)
}

/// Base URL of the compute provider (provider contract v1), e.g. `http://127.0.0.1:8790`.
pub fn provider_url(env: &Env) -> Option<String> {
    var(env, "PROVIDER_URL")
}

/// HMAC key shared with the provider (`PROVIDER_SECRET`).
pub fn provider_secret(env: &Env) -> Vec<u8> {
    var(env, "PROVIDER_SECRET")
        .map(String::into_bytes)
        .unwrap_or_default()
}

/// The control plane's URL as sandboxes reach it (they dial `CONTROL_URL/sandbox-link/:session`).
pub fn control_url(env: &Env) -> Option<String> {
    var(env, "CONTROL_URL")
}

/// How long a sandbox's socket may stay closed before the sandbox counts as lost.
pub fn sandbox_grace_ms(env: &Env) -> u64 {
    num(env, "SANDBOX_GRACE_MS", 10_000)
}

/// A sandbox silent for this long (it heart-beats every 5 s) counts as lost.
pub fn sandbox_heartbeat_timeout_ms(env: &Env) -> u64 {
    num(env, "SANDBOX_HEARTBEAT_TIMEOUT_MS", 30_000)
}

/// An image build's time limit (`BUILD_TIMEOUT_MS`).
pub fn build_timeout_ms(env: &Env) -> u64 {
    num(env, "BUILD_TIMEOUT_MS", 20 * 60 * 1000)
}

/// How often a repository's pool and builds are checked while something is in flux.
pub fn pool_poll_ms(env: &Env) -> u64 {
    num(env, "POOL_POLL_MS", 500)
}

/// How long a session's snapshots live (`SNAPSHOT_TTL_MS`).
pub fn snapshot_ttl_ms(env: &Env) -> u64 {
    num(env, "SNAPSHOT_TTL_MS", 7 * 24 * 3600 * 1000)
}

/// How long before a sandbox's lifetime ends it is snapshotted (`SNAPSHOT_MARGIN_MS`).
pub fn snapshot_margin_ms(env: &Env) -> u64 {
    num(env, "SNAPSHOT_MARGIN_MS", 10 * 60 * 1000)
}

/// Background agents' limits per scheduler shard (`BG_*`).
pub fn background_limits(env: &Env) -> nightshift_core::background::Limits {
    let d = nightshift_core::background::Limits::default();
    nightshift_core::background::Limits {
        max_concurrent: num(env, "BG_MAX_CONCURRENT", d.max_concurrent),
        max_per_user: num(env, "BG_MAX_PER_USER", d.max_per_user),
        max_per_session: num(env, "BG_MAX_PER_SESSION", d.max_per_session),
        max_queued: num(env, "BG_MAX_QUEUED", d.max_queued),
        max_depth: num(env, "BG_MAX_DEPTH", d.max_depth),
        max_children: num(env, "BG_MAX_CHILDREN", d.max_children),
    }
}

/// Running background agents in the whole deployment (`BG_MAX_GLOBAL`), lent to shards.
pub fn background_global_max(env: &Env) -> u32 {
    num(env, "BG_MAX_GLOBAL", 32)
}

/// The GitHub integration's settings; `None` when the deployment has no GitHub App (a local
/// run: `DEV_AUTH` only).
#[derive(Debug, Clone)]
pub struct Github {
    /// REST base, `https://api.github.com` (`GITHUB_API_URL`).
    pub api_url: String,
    /// OAuth pages and compare links, `https://github.com` (`GITHUB_WEB_URL`).
    pub web_url: String,
    /// Clones and pushes, `https://github.com` (`GITHUB_GIT_URL`).
    pub git_url: String,
    pub client_id: String,
    pub client_secret: String,
    /// The App's numeric id and private key (PKCS#1 or PKCS#8 PEM), for installation tokens.
    pub app_id: Option<String>,
    pub private_key: Option<String>,
    /// The App's slug (its `@mention` and bot login `<slug>[bot]`).
    pub slug: String,
    pub webhook_secret: Option<String>,
}

/// Reads the GitHub settings: present when `GITHUB_APP_CLIENT_ID` and
/// `GITHUB_APP_CLIENT_SECRET` are.
pub fn github(env: &Env) -> Option<Github> {
    let trim = |s: String| s.trim_end_matches('/').to_string();
    Some(Github {
        client_id: var(env, "GITHUB_APP_CLIENT_ID")?,
        client_secret: var(env, "GITHUB_APP_CLIENT_SECRET")?,
        api_url: trim(
            var(env, "GITHUB_API_URL").unwrap_or_else(|| "https://api.github.com".into()),
        ),
        web_url: trim(var(env, "GITHUB_WEB_URL").unwrap_or_else(|| "https://github.com".into())),
        git_url: trim(var(env, "GITHUB_GIT_URL").unwrap_or_else(|| "https://github.com".into())),
        app_id: var(env, "GITHUB_APP_ID"),
        private_key: var(env, "GITHUB_APP_PRIVATE_KEY"),
        slug: var(env, "GITHUB_APP_SLUG").unwrap_or_else(|| "nightshift".into()),
        webhook_secret: var(env, "GITHUB_WEBHOOK_SECRET"),
    })
}

/// The 256-bit key that seals people's GitHub tokens at rest: SHA-256 of
/// `TOKEN_ENCRYPTION_KEY` (any length; 32 random bytes in base64 is the documented choice).
pub fn token_encryption_key(env: &Env) -> Option<Vec<u8>> {
    use sha2::Digest;
    var(env, "TOKEN_ENCRYPTION_KEY").map(|k| sha2::Sha256::digest(k.as_bytes()).to_vec())
}

/// Slack: present when `SLACK_SIGNING_SECRET` and `SLACK_BOT_TOKEN` are.
#[derive(Debug, Clone)]
pub struct Slack {
    pub signing_secret: String,
    pub bot_token: String,
    /// The Web API's base (`SLACK_API_URL`, default `https://slack.com/api`).
    pub api_url: String,
    /// The model asked which repository a request is for when the rules cannot tell.
    pub chooser: Option<Chooser>,
}

/// An OpenAI-compatible chat-completions endpoint (`CHOOSER_MODEL_URL`, `CHOOSER_MODEL`,
/// `CHOOSER_MODEL_KEY`), and the confidence below which the person is asked instead
/// (`CHOOSER_MIN_CONFIDENCE`, percent, default 70).
#[derive(Debug, Clone)]
pub struct Chooser {
    pub url: String,
    pub model: String,
    pub key: Option<String>,
    pub threshold: f32,
}

pub fn slack(env: &Env) -> Option<Slack> {
    let chooser = var(env, "CHOOSER_MODEL_URL").map(|url| Chooser {
        url: url.trim_end_matches('/').to_string(),
        model: var(env, "CHOOSER_MODEL").unwrap_or_else(|| "default".into()),
        key: var(env, "CHOOSER_MODEL_KEY"),
        threshold: num(env, "CHOOSER_MIN_CONFIDENCE", 70u32).min(100) as f32 / 100.0,
    });
    Some(Slack {
        signing_secret: var(env, "SLACK_SIGNING_SECRET")?,
        bot_token: var(env, "SLACK_BOT_TOKEN")?,
        api_url: var(env, "SLACK_API_URL")
            .unwrap_or_else(|| "https://slack.com/api".into())
            .trim_end_matches('/')
            .to_string(),
        chooser,
    })
}

/// Shifts the clock Slack's timestamps are checked against (`CLOCK_OFFSET_MS`, may be negative;
/// for tests that play days passing, never set in a deployment).
pub fn clock_offset_ms(env: &Env) -> i64 {
    var(env, "CLOCK_OFFSET_MS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
