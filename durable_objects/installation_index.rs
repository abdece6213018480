//! The InstallationIndex Durable Object (one per deployment, `github`): the GitHub App's installations and their repositories, every webhook delivery seen (each `X-GitHub-Delivery` processed once), which session opened which pull request, installations' quotas, and installation tokens minted with the App's JWT and cached until shortly before they expire.

use nightshift_core::github::{
    Access, InstallationEvent, InstallationRepositoriesEvent, PullRequestEvent, PushEvent,
    WebhookEvent,
};
use nightshift_core::pr_review::{BatchKey, Review, ReviewBatches, ReviewWebhook};
use nightshift_core::quota::{retry_after_s, QuotaScope, Window};
use serde::Deserialize;
use worker::*;

use crate::config;
use crate::error::{json_of, ApiError, ApiResult, EdgeError};
use crate::github::{self, GithubError};
use crate::http::{call, repository_stub, session_stub};
use crate::objects::{
    encode, read_body, DeliveryAnswer, InstallationAnswer, InstallationAsk, InstallationQuotaAsk,
    InstallationRoute, InstallationTokenAnswer, InstallationTokenAsk, OkAnswer, PersonFind,
    PersonFound, PersonRecord, PrSessionAnswer, PrSessionAsk, PullLink, PullUpdate, Redelivered,
    RepositoryLink, RepositoryRoute, SessionRoute, WebhookDelivery,
};
use crate::platform::now_ms;
use crate::pr_reviews::{Handled, PullContext};

/// A cached installation token is handed out until this long before it expires.
const TOKEN_MARGIN_MS: u64 = 5 * 60 * 1000;

/// Deliveries kept for de-duplication (GitHub redelivers within days).
const DELIVERIES_KEPT_MS: u64 = 14 * 24 * 3600 * 1000;

/// A pending delivery is retried after this long.
const RETRY_MS: u64 = 30_000;

#[durable_object]
pub struct InstallationIndex {
    state: State,
    env: Env,
}

impl DurableObject for InstallationIndex {
    fn new(state: State, env: Env) -> Self {
        InstallationIndex { state, env }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        match self.route(req).await {
            Ok(r) => Ok(r),
            Err(e) => e.into_response(),
        }
    }

    async fn alarm(&self) -> Result<Response> {
        if let Err(e) = self.retry_pending().await {
            console_error!("installation index: retrying deliveries: {}", e.message);
            self.state
                .storage()
                .set_alarm(std::time::Duration::from_millis(RETRY_MS))
                .await?;
        }
        if let Err(e) = self.fire_due_reviews().await {
            console_error!("installation index: review batches: {}", e.message);
            self.state
                .storage()
                .set_alarm(std::time::Duration::from_millis(RETRY_MS))
                .await?;
        }
        Response::empty()
    }
}

#[derive(Deserialize)]
struct CountRow {
    n: i64,
}

#[derive(Deserialize)]
struct WindowRow {
    start: i64,
    used: i64,
}

#[derive(Deserialize)]
struct AccountRow {
    id: i64,
    account: String,
}

#[derive(Deserialize)]
struct TextRow {
    value: String,
}

#[derive(Deserialize)]
struct TokenRow {
    token: String,
    expires_at: i64,
}

#[derive(Deserialize)]
struct PendingRow {
    guid: String,
    event: String,
    body: String,
}

fn int(n: u64) -> SqlStorageValue {
    SqlStorageValue::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

impl InstallationIndex {
    fn sql(&self) -> ApiResult<SqlStorage> {
        let sql = self.state.storage().sql();
        for ddl in [
            "CREATE TABLE IF NOT EXISTS installations (id INTEGER PRIMARY KEY, account TEXT NOT NULL, suspended INTEGER NOT NULL DEFAULT 0)",
            "CREATE TABLE IF NOT EXISTS installation_repositories (full_name TEXT PRIMARY KEY, installation INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS deliveries (guid TEXT PRIMARY KEY, event TEXT NOT NULL, body TEXT NOT NULL, received_at INTEGER NOT NULL, state TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS pulls (repository TEXT NOT NULL, number INTEGER NOT NULL, session TEXT NOT NULL, PRIMARY KEY (repository, number))",
            "CREATE TABLE IF NOT EXISTS registered (full_name TEXT PRIMARY KEY, name TEXT NOT NULL, base_branch TEXT NOT NULL DEFAULT 'main')",
            "CREATE TABLE IF NOT EXISTS tokens (scope TEXT PRIMARY KEY, token TEXT NOT NULL, expires_at INTEGER NOT NULL)",
            "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, body TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS quotas (installation INTEGER NOT NULL, what TEXT NOT NULL, start INTEGER NOT NULL, used INTEGER NOT NULL, PRIMARY KEY (installation, what))",
            "CREATE TABLE IF NOT EXISTS people (email TEXT PRIMARY KEY, person TEXT NOT NULL)",
        ] {
            sql.exec(ddl, None)?;
        }
        Ok(sql)
    }

    async fn route(&self, mut req: Request) -> ApiResult<Response> {
        let Some(route) = InstallationRoute::parse(&req.method(), &req.path()) else {
            return Err(EdgeError::NotFound("route").into());
        };
        match route {
            InstallationRoute::Delivery => {
                let delivery: WebhookDelivery = read_body(&mut req).await?;
                json_of(202, &self.deliver(delivery).await?)
            }
            InstallationRoute::LinkPull => {
                let link: PullLink = read_body(&mut req).await?;
                self.sql()?.exec(
                    "INSERT OR REPLACE INTO pulls (repository, number, session) VALUES (?, ?, ?)",
                    vec![
                        link.repository.to_ascii_lowercase().into(),
                        int(link.number),
                        link.session.into(),
                    ],
                )?;
                json_of(200, &OkAnswer::yes())
            }
            InstallationRoute::LinkRepository => {
                let link: RepositoryLink = read_body(&mut req).await?;
                self.sql()?.exec(
                    "INSERT OR REPLACE INTO registered (full_name, name, base_branch) VALUES (?, ?, ?)",
                    vec![
                        link.full_name.to_ascii_lowercase().into(),
                        link.name.into(),
                        link.base_branch.into(),
                    ],
                )?;
                json_of(200, &OkAnswer::yes())
            }
            InstallationRoute::Installation => {
                let ask: InstallationAsk = read_body(&mut req).await?;
                json_of(200, &self.installation(&ask.repository).await?)
            }
            InstallationRoute::Token => {
                let ask: InstallationTokenAsk = read_body(&mut req).await?;
                json_of(200, &self.token(&ask.repository, ask.access).await?)
            }
            InstallationRoute::Redeliver => json_of(200, &self.redeliver().await?),
            InstallationRoute::PersonRecord => {
                let record: PersonRecord = read_body(&mut req).await?;
                let person = serde_json::to_string(&record.person).map_err(ApiError::internal)?;
                let sql = self.sql()?;
                for email in &record.emails {
                    sql.exec(
                        "INSERT OR REPLACE INTO people (email, person) VALUES (?, ?)",
                        vec![
                            SqlStorageValue::String(email.to_ascii_lowercase()),
                            SqlStorageValue::String(person.clone()),
                        ],
                    )?;
                }
                json_of(200, &OkAnswer::yes())
            }
            InstallationRoute::PersonFind => {
                let find: PersonFind = read_body(&mut req).await?;
                let rows: Vec<TextRow> = self
                    .sql()?
                    .exec(
                        "SELECT person AS value FROM people WHERE email = ?",
                        vec![SqlStorageValue::String(find.email.to_ascii_lowercase())],
                    )?
                    .to_array()?;
                let person = match rows.into_iter().next() {
                    Some(row) => {
                        Some(serde_json::from_str(&row.value).map_err(ApiError::internal)?)
                    }
                    None => None,
                };
                json_of(200, &PersonFound { person })
            }
            InstallationRoute::PrSession => {
                let ask: PrSessionAsk = read_body(&mut req).await?;
                json_of(200, &self.pr_session(&ask).await?)
            }
            InstallationRoute::Quota => {
                let ask: InstallationQuotaAsk = read_body(&mut req).await?;
                self.take_quota(&ask).await?;
                json_of(200, &OkAnswer::yes())
            }
        }
    }

    /// Takes one of an installation's quota (every person of the organisation together), or
    /// refuses with when to retry. A repository the App is not on has no installation quota.
    async fn take_quota(&self, ask: &InstallationQuotaAsk) -> ApiResult<()> {
        let installation = match self.installation(&ask.repository).await {
            Ok(found) => found.id,
            Err(e) if e.code == "app_not_installed" => return Ok(()),
            Err(e) => return Err(e),
        };
        let sql = self.sql()?;
        let rows: Vec<WindowRow> = sql
            .exec(
                "SELECT start, used FROM quotas WHERE installation = ? AND what = ?",
                vec![int(installation), ask.what.key().into()],
            )?
            .to_array()?;
        let window = rows.first().map_or_else(Window::default, |row| Window {
            start: u64::try_from(row.start).unwrap_or_default(),
            used: u32::try_from(row.used).unwrap_or(u32::MAX),
        });
        match window.take(now_ms(), ask.limit) {
            Ok(next) => {
                sql.exec(
                    "INSERT OR REPLACE INTO quotas (installation, what, start, used) VALUES (?, ?, ?, ?)",
                    vec![
                        int(installation),
                        ask.what.key().into(),
                        int(next.start),
                        int(u64::from(next.used)),
                    ],
                )?;
                Ok(())
            }
            Err(wait_ms) => Err(EdgeError::QuotaExceeded {
                what: ask.what.describe(QuotaScope::Installation),
                retry_after_s: retry_after_s(wait_ms),
            }
            .into()),
        }
    }

    /// Stores a new delivery (a duplicate changes nothing), then processes it; a failure leaves
    /// it pending for the alarm to retry. Nothing acknowledged is lost.
    async fn deliver(&self, delivery: WebhookDelivery) -> ApiResult<DeliveryAnswer> {
        let sql = self.sql()?;
        let now = now_ms();
        let seen: Vec<TextRow> = sql
            .exec(
                "SELECT state AS value FROM deliveries WHERE guid = ?",
                vec![delivery.guid.as_str().into()],
            )?
            .to_array()?;
        if let Some(row) = seen.first() {
            return Ok(DeliveryAnswer {
                guid: delivery.guid,
                duplicate: true,
                outcome: row.value.clone(),
            });
        }
        sql.exec(
            "DELETE FROM deliveries WHERE received_at < ?",
            vec![int(now.saturating_sub(DELIVERIES_KEPT_MS))],
        )?;
        sql.exec(
            "INSERT INTO deliveries (guid, event, body, received_at, state) VALUES (?, ?, ?, ?, 'pending')",
            vec![
                delivery.guid.as_str().into(),
                delivery.event.as_str().into(),
                delivery.body.as_str().into(),
                int(now),
            ],
        )?;
        let outcome = match self.process(&delivery.event, &delivery.body).await {
            Ok(outcome) => {
                self.mark(&delivery.guid, outcome)?;
                outcome.to_string()
            }
            Err(e) => {
                console_error!("delivery {}: {}", delivery.guid, e.message);
                self.state
                    .storage()
                    .set_alarm(std::time::Duration::from_millis(RETRY_MS))
                    .await?;
                "pending".to_string()
            }
        };
        Ok(DeliveryAnswer {
            guid: delivery.guid,
            duplicate: false,
            outcome,
        })
    }

    fn mark(&self, guid: &str, outcome: &str) -> ApiResult<()> {
        self.sql()?.exec(
            "UPDATE deliveries SET state = ? WHERE guid = ?",
            vec![outcome.into(), guid.into()],
        )?;
        Ok(())
    }

    async fn retry_pending(&self) -> ApiResult<()> {
        let pending: Vec<PendingRow> = self
            .sql()?
            .exec(
                "SELECT guid, event, body FROM deliveries WHERE state = 'pending' ORDER BY received_at LIMIT 50",
                None,
            )?
            .to_array()?;
        let mut failed = None;
        for row in pending {
            match self.process(&row.event, &row.body).await {
                Ok(outcome) => self.mark(&row.guid, outcome)?,
                Err(e) => failed = Some(e),
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Carries out one delivery. Handlers are idempotent: a retried one does the same again.
    async fn process(&self, event: &str, body: &str) -> ApiResult<&'static str> {
        if crate::pr_reviews::EVENTS.contains(&event) {
            return match ReviewWebhook::parse(event, body.as_bytes()) {
                Ok(webhook) => self.review(&webhook).await,
                Err(_) => Ok("ignored"),
            };
        }
        let parsed = match WebhookEvent::parse(event, body.as_bytes()) {
            Ok(parsed) => parsed,
            // Stored, verified, and of no interest (or unreadable): nothing to do, ever.
            Err(_) => return Ok("ignored"),
        };
        match parsed {
            WebhookEvent::Installation(e) => self.installation_event(&e).map(|_| "installation"),
            WebhookEvent::InstallationRepositories(e) => {
                self.installation_repositories(&e).map(|_| "installation")
            }
            WebhookEvent::PullRequest(e) => self.pull_request(&e).await,
            WebhookEvent::Push(e) => self.push(&e).await,
            WebhookEvent::Ping => Ok("ignored"),
        }
    }

    fn add_repositories(&self, installation: u64, names: &[String]) -> ApiResult<()> {
        let sql = self.sql()?;
        for name in names {
            sql.exec(
                "INSERT OR REPLACE INTO installation_repositories (full_name, installation) VALUES (?, ?)",
                vec![name.to_ascii_lowercase().into(), int(installation)],
            )?;
        }
        Ok(())
    }

    fn remove_repositories(&self, names: &[String]) -> ApiResult<()> {
        let sql = self.sql()?;
        for name in names {
            sql.exec(
                "DELETE FROM installation_repositories WHERE full_name = ?",
                vec![name.to_ascii_lowercase().into()],
            )?;
            sql.exec(
                "DELETE FROM tokens WHERE scope LIKE ?",
                vec![format!("%:{}:%", name.to_ascii_lowercase()).into()],
            )?;
        }
        Ok(())
    }

    fn installation_event(&self, e: &InstallationEvent) -> ApiResult<()> {
        let sql = self.sql()?;
        let id = e.installation.id;
        match e.action.as_str() {
            "deleted" => {
                sql.exec("DELETE FROM installations WHERE id = ?", vec![int(id)])?;
                sql.exec(
                    "DELETE FROM installation_repositories WHERE installation = ?",
                    vec![int(id)],
                )?;
                sql.exec(
                    "DELETE FROM tokens WHERE scope LIKE ?",
                    vec![format!("{id}:%").into()],
                )?;
            }
            "suspend" => {
                sql.exec(
                    "UPDATE installations SET suspended = 1 WHERE id = ?",
                    vec![int(id)],
                )?;
                sql.exec(
                    "DELETE FROM tokens WHERE scope LIKE ?",
                    vec![format!("{id}:%").into()],
                )?;
            }
            _ => {
                sql.exec(
                    "INSERT OR REPLACE INTO installations (id, account, suspended) VALUES (?, ?, 0)",
                    vec![int(id), e.installation.account.login.as_str().into()],
                )?;
                let names: Vec<String> =
                    e.repositories.iter().map(|r| r.full_name.clone()).collect();
                self.add_repositories(id, &names)?;
            }
        }
        Ok(())
    }

    fn installation_repositories(&self, e: &InstallationRepositoriesEvent) -> ApiResult<()> {
        let id = e.installation.id;
        self.sql()?.exec(
            "INSERT OR IGNORE INTO installations (id, account, suspended) VALUES (?, ?, 0)",
            vec![int(id), e.installation.account.login.as_str().into()],
        )?;
        let added: Vec<String> = e
            .repositories_added
            .iter()
            .map(|r| r.full_name.clone())
            .collect();
        let removed: Vec<String> = e
            .repositories_removed
            .iter()
            .map(|r| r.full_name.clone())
            .collect();
        self.add_repositories(id, &added)?;
        self.remove_repositories(&removed)
    }

    /// The session a pull request belongs to: the one that opened it (repository + number);
    /// failing that, a same-repository head branch `nightshift/<session>`.
    fn session_of(&self, e: &PullRequestEvent) -> ApiResult<Option<String>> {
        let rows: Vec<TextRow> = self
            .sql()?
            .exec(
                "SELECT session AS value FROM pulls WHERE repository = ? AND number = ?",
                vec![
                    e.repository.full_name.to_ascii_lowercase().into(),
                    int(e.number),
                ],
            )?
            .to_array()?;
        if let Some(row) = rows.first() {
            return Ok(Some(row.value.clone()));
        }
        if e.pull_request.is_fork() {
            return Ok(None);
        }
        Ok(e.pull_request
            .head
            .git_ref
            .strip_prefix("nightshift/")
            .filter(|id| crate::platform::valid_id("ses", id))
            .map(str::to_string))
    }

    async fn pull_request(&self, e: &PullRequestEvent) -> ApiResult<&'static str> {
        let Some(session) = self.session_of(e)? else {
            return Ok("ignored");
        };
        let stub = session_stub(&self.env, &session)?;
        let route = SessionRoute::PullRequest;
        let body = encode(&PullUpdate {
            repository: e.repository.full_name.clone(),
            pull: e.pull_request.clone(),
        })?;
        let resp = call(&stub, route.method(), route.path(), None, Some(body)).await?;
        match resp.status_code() {
            200..=299 => Ok("pull_request"),
            // A session that does not exist (any more): nothing to update.
            404 => Ok("ignored"),
            status => Err(ApiError::internal(format!(
                "the session answered {status} to a pull request update"
            ))),
        }
    }

    /// A push to a registered repository's base branch builds a new image (images are never
    /// older than the last push).
    async fn push(&self, e: &PushEvent) -> ApiResult<&'static str> {
        #[derive(Deserialize)]
        struct Registered {
            name: String,
            base_branch: String,
        }
        let rows: Vec<Registered> = self
            .sql()?
            .exec(
                "SELECT name, base_branch FROM registered WHERE full_name = ?",
                vec![e.repository.full_name.to_ascii_lowercase().into()],
            )?
            .to_array()?;
        let Some(Registered { name, base_branch }) = rows.into_iter().next() else {
            return Ok("ignored");
        };
        if e.branch() != Some(base_branch.as_str()) {
            return Ok("ignored");
        }
        let stub = repository_stub(&self.env, &name)?;
        let route = RepositoryRoute::Builds;
        let path = crate::objects::with_query(&route.path(), "?reason=push");
        let resp = call(&stub, route.method(), &path, None, None).await?;
        match resp.status_code() {
            200..=299 | 409 => Ok("build"),
            404 => Ok("ignored"),
            status => Err(ApiError::internal(format!(
                "the repository answered {status} to a build after a push"
            ))),
        }
    }

    /// The installation serving `repository`: from the index the webhooks keep, else asked of
    /// GitHub with the App's JWT (and remembered).
    async fn installation(&self, repository: &str) -> ApiResult<InstallationAnswer> {
        let key = repository.to_ascii_lowercase();
        let rows: Vec<AccountRow> = self
            .sql()?
            .exec(
                "SELECT i.id AS id, i.account AS account FROM installation_repositories r JOIN installations i ON i.id = r.installation WHERE r.full_name = ? AND i.suspended = 0",
                vec![key.as_str().into()],
            )?
            .to_array()?;
        if let Some(row) = rows.first() {
            return Ok(InstallationAnswer {
                id: u64::try_from(row.id).unwrap_or_default(),
                account: row.account.clone(),
            });
        }
        let cfg = config::github(&self.env).ok_or(EdgeError::GithubNotConfigured)?;
        let jwt = github::app_jwt(&cfg, now_ms() / 1000)
            .await
            .map_err(|e| e.edge())?;
        match github::repository_installation(&cfg, &jwt, repository).await {
            Ok(found) => {
                let suspended: Vec<CountRow> = self
                    .sql()?
                    .exec(
                        "SELECT COUNT(*) AS n FROM installations WHERE id = ? AND suspended = 1",
                        vec![int(found.id)],
                    )?
                    .to_array()?;
                if suspended.first().is_some_and(|row| row.n > 0) {
                    return Err(EdgeError::AppNotInstalled(repository.to_string()).into());
                }
                self.sql()?.exec(
                    "INSERT OR REPLACE INTO installations (id, account, suspended) VALUES (?, ?, 0)",
                    vec![int(found.id), found.account.login.as_str().into()],
                )?;
                self.add_repositories(found.id, &[repository.to_string()])?;
                Ok(InstallationAnswer {
                    id: found.id,
                    account: found.account.login,
                })
            }
            Err(GithubError::NoAccess(_)) => {
                Err(EdgeError::AppNotInstalled(repository.to_string()).into())
            }
            Err(e) => Err(e.edge().into()),
        }
    }

    /// An installation token for one repository with one permission, minted with the App's
    /// JWT and reused until five minutes before it expires.
    async fn token(&self, repository: &str, access: Access) -> ApiResult<InstallationTokenAnswer> {
        let installation = self.installation(repository).await?;
        let scope = format!(
            "{}:{}:{}",
            installation.id,
            repository.to_ascii_lowercase(),
            access.level()
        );
        let now = now_ms();
        let cached: Vec<TokenRow> = self
            .sql()?
            .exec(
                "SELECT token, expires_at FROM tokens WHERE scope = ?",
                vec![scope.as_str().into()],
            )?
            .to_array()?;
        if let Some(row) = cached.first() {
            let expires_at = u64::try_from(row.expires_at).unwrap_or_default();
            if expires_at > now + TOKEN_MARGIN_MS {
                return Ok(InstallationTokenAnswer {
                    token: row.token.clone(),
                    expires_at,
                });
            }
        }
        let cfg = config::github(&self.env).ok_or(EdgeError::GithubNotConfigured)?;
        let jwt = github::app_jwt(&cfg, now / 1000)
            .await
            .map_err(|e| e.edge())?;
        let name = repository.split('/').nth(1).unwrap_or(repository);
        let minted = github::installation_token(&cfg, &jwt, installation.id, &access.request(name))
            .await
            .map_err(|e| e.edge())?;
        let expires_at = nightshift_core::github::parse_rfc3339_seconds(&minted.expires_at)
            .map_or(now + 55 * 60 * 1000, |s| s * 1000);
        self.sql()?.exec(
            "INSERT OR REPLACE INTO tokens (scope, token, expires_at) VALUES (?, ?, ?)",
            vec![scope.into(), minted.token.as_str().into(), int(expires_at)],
        )?;
        Ok(InstallationTokenAnswer {
            token: minted.token,
            expires_at,
        })
    }

    fn batches(&self) -> ApiResult<ReviewBatches> {
        let rows: Vec<TextRow> = self
            .sql()?
            .exec(
                "SELECT body AS value FROM kv WHERE k = 'review_batches'",
                None,
            )?
            .to_array()?;
        Ok(rows
            .first()
            .and_then(|row| serde_json::from_str(&row.value).ok())
            .unwrap_or_default())
    }

    fn save_batches(&self, batches: &ReviewBatches) -> ApiResult<()> {
        let body = serde_json::to_string(batches).map_err(ApiError::internal)?;
        self.sql()?.exec(
            "INSERT OR REPLACE INTO kv (k, body) VALUES ('review_batches', ?)",
            vec![body.into()],
        )?;
        Ok(())
    }

    /// Sets the alarm no later than `at` (ms since the epoch).
    async fn wake_by(&self, at: u64) -> ApiResult<()> {
        let storage = self.state.storage();
        let now = now_ms();
        let current = storage.get_alarm().await?;
        let wanted = i64::try_from(at.max(now + 1)).unwrap_or(i64::MAX);
        if current.is_none_or(|c| c > wanted) {
            let after = at.saturating_sub(now).max(1);
            storage
                .set_alarm(std::time::Duration::from_millis(after))
                .await?;
        }
        Ok(())
    }

    /// The pull request's session, if Nightshift has one (it opened the pull request, or it
    /// is on a session's branch).
    fn pull_context(
        &self,
        full_name: &str,
        number: u64,
        head: Option<&str>,
    ) -> ApiResult<PullContext> {
        let rows: Vec<TextRow> = self
            .sql()?
            .exec(
                "SELECT session AS value FROM pulls WHERE repository = ? AND number = ?",
                vec![full_name.into(), int(number)],
            )?
            .to_array()?;
        let session = rows.first().map(|row| row.value.clone()).or_else(|| {
            head.and_then(|h| h.strip_prefix("nightshift/"))
                .filter(|id| crate::platform::valid_id("ses", id))
                .map(str::to_string)
        });
        Ok(PullContext {
            full_name: full_name.to_string(),
            session,
            mentions_only: false,
        })
    }

    /// A review comment, a review or a conversation comment on a pull request of a registered
    /// repository: batched, fired, or skipped with its reason.
    async fn review(&self, webhook: &ReviewWebhook) -> ApiResult<&'static str> {
        let full_name = webhook.repository().full_name.to_ascii_lowercase();
        let registered: Vec<TextRow> = self
            .sql()?
            .exec(
                "SELECT name AS value FROM registered WHERE full_name = ?",
                vec![full_name.as_str().into()],
            )?
            .to_array()?;
        if registered.is_empty() {
            return Ok("ignored");
        }
        let head = match webhook {
            ReviewWebhook::Comment(e) => Some(e.pull_request.head.git_ref.clone()),
            ReviewWebhook::Review(e) => Some(e.pull_request.head.git_ref.clone()),
            ReviewWebhook::Conversation(e) if e.issue.pull_request.is_none() => {
                return Ok("not_a_pull_request")
            }
            ReviewWebhook::Conversation(_) => None,
        };
        let mut pull = self.pull_context(&full_name, webhook.number(), head.as_deref())?;
        if let Some(row) = registered.first() {
            pull.mentions_only = crate::access::settings(&self.env, &row.value)
                .await?
                .is_some_and(|s| s.review_mentions_only);
        }
        let token = self
            .token(&full_name, crate::pr_reviews::ACCESS)
            .await?
            .token;
        let mut batches = self.batches()?;
        let handled =
            crate::pr_reviews::handle(&self.env, &pull, webhook, &mut batches, &token, now_ms())
                .await?;
        self.save_batches(&batches)?;
        match handled {
            Handled::Skipped(code) => Ok(code),
            Handled::Batched => {
                if let Some(at) = batches.next_deadline() {
                    self.wake_by(at).await?;
                }
                Ok("review_comment")
            }
            Handled::Fire(key, review) => self.fire(&pull, &key, review.as_deref(), &token).await,
            Handled::Conversation(comment) => {
                let prepared = crate::pr_reviews::fire_conversation(
                    &self.env,
                    &pull,
                    webhook.number(),
                    &comment,
                    &token,
                )
                .await?;
                match prepared {
                    Some(prepared) => self.deliver_review(&pull, prepared).await,
                    None => Ok("ignored"),
                }
            }
        }
    }

    /// Fires one batch (taken from the batches first: a batch fires once; the prompt's key
    /// makes a repeated fire one prompt anyway).
    async fn fire(
        &self,
        pull: &PullContext,
        key: &BatchKey,
        review: Option<&Review>,
        token: &str,
    ) -> ApiResult<&'static str> {
        let mut batches = self.batches()?;
        let Some(batch) = batches.take(key) else {
            return Ok("already_fired");
        };
        let fired = crate::pr_reviews::fire_review(
            &self.env,
            key,
            &batch.comment_ids,
            &batch.author,
            review,
            token,
        )
        .await;
        // Not fired: the batch stays, and the delivery (or the alarm) tries again.
        let outcome = match fired? {
            Some(prepared) => self.deliver_review(pull, prepared).await?,
            None => "empty",
        };
        self.save_batches(&batches)?;
        Ok(outcome)
    }

    /// Hands a prepared prompt to the pull request's session, starting one on its branch when
    /// Nightshift has none (recorded before it is made, so a retry finds the same one).
    async fn deliver_review(
        &self,
        pull: &PullContext,
        prepared: crate::pr_reviews::Prepared,
    ) -> ApiResult<&'static str> {
        let session = match &pull.session {
            Some(session) => session.clone(),
            None => match self
                .start_pr_session(pull, &prepared.ask.author, &prepared.pr)
                .await?
            {
                Some(id) => id,
                None => return Ok("ignored"),
            },
        };
        crate::pr_reviews::deliver(&self.env, &session, &prepared.ask).await
    }

    /// Starts the session of a pull request Nightshift has none for, owned by `author`, on its
    /// branch; recorded before it is made, so a retry finds the same one. `None` when the
    /// repository is not registered.
    async fn start_pr_session(
        &self,
        pull: &PullContext,
        author: &nightshift_core::ids::Identity,
        pr: &nightshift_core::github::Pull,
    ) -> ApiResult<Option<String>> {
        let number = pr.number;
        let session =
            {
                {
                    let name: Vec<TextRow> = self
                        .sql()?
                        .exec(
                            "SELECT name AS value FROM registered WHERE full_name = ?",
                            vec![pull.full_name.as_str().into()],
                        )?
                        .to_array()?;
                    let Some(name) = name.first().map(|row| row.value.clone()) else {
                        return Ok(None);
                    };
                    let pending = format!("pr_session:{}#{number}", pull.full_name);
                    let id = match self.kv_text(&pending)? {
                        Some(id) => id,
                        None => {
                            let id = crate::platform::new_id("ses");
                            self.put_kv_text(&pending, &id)?;
                            id
                        }
                    };
                    crate::pr_reviews::start_session(
                        &self.env,
                        &id,
                        &name,
                        &pull.full_name,
                        author,
                        pr,
                    )
                    .await?;
                    self.sql()?.exec(
                    "INSERT OR REPLACE INTO pulls (repository, number, session) VALUES (?, ?, ?)",
                    vec![pull.full_name.as_str().into(), int(number), id.as_str().into()],
                )?;
                    self.sql()?
                        .exec("DELETE FROM kv WHERE k = ?", vec![pending.into()])?;
                    id
                }
            };
        Ok(Some(session))
    }

    /// `/pr-session`: the pull request's session, started (by `start`'s person, on its branch)
    /// when asked and there is none.
    async fn pr_session(&self, ask: &PrSessionAsk) -> ApiResult<PrSessionAnswer> {
        let full_name = ask.repository.to_ascii_lowercase();
        let pull = self.pull_context(&full_name, ask.number, None)?;
        if let Some(session) = pull.session {
            return Ok(PrSessionAnswer {
                session: Some(session),
                started: false,
            });
        }
        let Some(author) = &ask.start else {
            return Ok(PrSessionAnswer {
                session: None,
                started: false,
            });
        };
        let cfg = config::github(&self.env).ok_or(EdgeError::GithubNotConfigured)?;
        let token = self
            .token(&full_name, crate::pr_reviews::ACCESS)
            .await?
            .token;
        let pr = match github::pull(&cfg, &token, &full_name, ask.number).await {
            Ok(pr) => pr,
            Err(GithubError::NoAccess(_)) => {
                return Err(EdgeError::NotFound("pull request").into());
            }
            Err(e) => return Err(e.edge().into()),
        };
        let session = self.start_pr_session(&pull, author, &pr).await?;
        Ok(PrSessionAnswer {
            started: session.is_some(),
            session,
        })
    }

    fn kv_text(&self, key: &str) -> ApiResult<Option<String>> {
        let rows: Vec<TextRow> = self
            .sql()?
            .exec("SELECT body AS value FROM kv WHERE k = ?", vec![key.into()])?
            .to_array()?;
        Ok(rows.first().map(|row| row.value.clone()))
    }

    fn put_kv_text(&self, key: &str, value: &str) -> ApiResult<()> {
        self.sql()?.exec(
            "INSERT OR REPLACE INTO kv (k, body) VALUES (?, ?)",
            vec![key.into(), value.into()],
        )?;
        Ok(())
    }

    /// Batches whose debounce ran out fire now.
    async fn fire_due_reviews(&self) -> ApiResult<()> {
        let now = now_ms();
        let batches = self.batches()?;
        for key in batches.due(now) {
            let pull = self.pull_context(&key.repository, key.number, None)?;
            let token = self
                .token(&key.repository, crate::pr_reviews::ACCESS)
                .await?
                .token;
            self.fire(&pull, &key, None, &token).await?;
        }
        if let Some(at) = self.batches()?.next_deadline() {
            self.wake_by(at).await?;
        }
        Ok(())
    }

    /// The cron's pass: deliveries GitHub could not make (no 2xx from us) and that we never
    /// stored are asked for again.
    async fn redeliver(&self) -> ApiResult<Redelivered> {
        let Some(cfg) = config::github(&self.env) else {
            return Ok(Redelivered { requested: 0 });
        };
        if cfg.app_id.is_none() {
            return Ok(Redelivered { requested: 0 });
        }
        let jwt = github::app_jwt(&cfg, now_ms() / 1000)
            .await
            .map_err(|e| e.edge())?;
        let deliveries = github::deliveries(&cfg, &jwt).await.map_err(|e| e.edge())?;
        let sql = self.sql()?;
        let mut requested = 0;
        let mut asked = std::collections::BTreeSet::new();
        for delivery in deliveries {
            if (200..300).contains(&delivery.status_code) || !asked.insert(delivery.guid.clone()) {
                continue;
            }
            let seen: Vec<TextRow> = sql
                .exec(
                    "SELECT state AS value FROM deliveries WHERE guid = ?",
                    vec![delivery.guid.as_str().into()],
                )?
                .to_array()?;
            if !seen.is_empty() {
                continue;
            }
            github::redeliver(&cfg, &jwt, delivery.id)
                .await
                .map_err(|e| e.edge())?;
            requested += 1;
        }
        Ok(Redelivered { requested })
    }
}
