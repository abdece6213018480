//! A local fake GitHub for end-to-end tests: OAuth with PKCE, the REST API of a GitHub App, App JWTs, installation tokens, pull requests, signed webhooks and git smart HTTP, all in GitHub's real wire formats.
//!
//! One axum server on 127.0.0.1 serves the web pages at `/`, the REST API under `/api` and git
//! under `/git`. Its state is readable by tests through the accessors of [`FakeGithub`].
//! Reviews, review comments (with their threads), PR conversation comments and reactions are
//! kept too: tests leave them with [`FakeGithub::submit_review`] and friends (delivering
//! `pull_request_review_comment`, `pull_request_review` and `issue_comment`), and the App
//! answers through the REST endpoints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hmac::{Hmac, Mac};
use nightshift_core::github::{
    self, AccessToken, AccessTokenRequest, Account, Branch, CollaboratorPermission, CreatePull,
    Delivery, Email, Installation, InstallationEvent, InstallationInfo, InstallationRef,
    InstallationRepositoriesEvent, JwtClaims, Permissions, Pull, PullRequestEvent, PushEvent,
    RepoName, RepoRef, Repository, Role, TokenExchange, User, UserTokens,
};
use nightshift_core::pr_review::{
    CreateComment, CreateReaction, Issue, IssueComment, IssueCommentEvent, IssuePullLink, Reaction,
    Review, ReviewComment, ReviewCommentEvent, ReviewEvent,
};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::{Pkcs1v15Sign, RsaPrivateKey, RsaPublicKey};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// The CGI program that speaks git's smart HTTP protocol.
const HTTP_BACKEND: &str = "/usr/lib/git-core/git-http-backend";
/// The all-zero object id GitHub sends as `before` of a created branch and `after` of a deleted one.
const ZERO_SHA: &str = "0000000000000000000000000000000000000000";
/// Lifetime of a user access token (`expires_in`), seconds.
const USER_TOKEN_SECONDS: u64 = 28_800;
/// Lifetime of a refresh token (`refresh_token_expires_in`), seconds.
const REFRESH_TOKEN_SECONDS: u64 = 15_897_600;
/// Lifetime of an installation token, seconds.
const INSTALLATION_TOKEN_SECONDS: u64 = 3_600;
/// Lifetime of an OAuth authorization code, seconds.
const CODE_SECONDS: u64 = 600;
/// The hook id GitHub names in `X-GitHub-Hook-ID` for the App's webhook.
const HOOK_ID: u64 = 512_640_001;
const DOCS_URL: &str = "https://docs.github.com/rest";
const NOT_ACCESSIBLE: &str = "Resource not accessible by integration";
const JWT_UNDECODABLE: &str = "A JSON web token could not be decoded";
const NO_USER_AGENT: &str = "Request forbidden by administrative rules. Please make sure your request has a User-Agent header (https://docs.github.com/en/rest/overview/resources-in-the-rest-api#user-agent-required). Check https://developer.github.com for other possible causes.";

/// The App's identity and webhook secret a [`FakeGithub`] starts with.
#[derive(Debug, Clone)]
pub struct FakeGithubConfig {
    /// The App's numeric id (`iss` of its JWTs may be this as a string).
    pub app_id: u64,
    /// The App's OAuth client id (`Iv23…`), also accepted as the JWT `iss`.
    pub client_id: String,
    /// The App's OAuth client secret.
    pub client_secret: String,
    /// The App's slug; its bot account is `{slug}[bot]`.
    pub slug: String,
    /// The secret webhooks are signed with.
    pub webhook_secret: String,
}

impl Default for FakeGithubConfig {
    fn default() -> FakeGithubConfig {
        FakeGithubConfig {
            app_id: 4242,
            client_id: "Iv23fakeclient4242ab".to_string(),
            client_secret: "fake-client-secret-0123456789abcdef01234567".to_string(),
            slug: "nightshift-test".to_string(),
            webhook_secret: "fake-webhook-secret".to_string(),
        }
    }
}

/// One webhook the fake sent (or tried to send), as `GET /app/hook/deliveries` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryRecord {
    /// The delivery's id in the deliveries API (a redelivery gets a new one).
    pub id: u64,
    /// `X-GitHub-Delivery`: the same for a delivery and its redeliveries.
    pub guid: String,
    /// `X-GitHub-Event`.
    pub event: String,
    /// The payload's `action`, if it has one.
    pub action: Option<String>,
    /// The exact bytes that were signed and sent.
    pub payload: Vec<u8>,
    /// The receiver's HTTP status; 0 when nothing answered, 502 when failing on purpose.
    pub status_code: u16,
    /// Whether this was a redelivery of an earlier guid.
    pub redelivery: bool,
    /// When it was sent, ISO 8601.
    pub delivered_at: String,
    /// The installation the payload names.
    pub installation_id: Option<u64>,
    /// The repository the payload names.
    pub repository_id: Option<u64>,
}

/// A handle on a running fake GitHub; dropping it stops the server and removes its repositories.
pub struct FakeGithub {
    ctx: Ctx,
    server: tokio::task::JoinHandle<()>,
    dir: TempDir,
}

impl Drop for FakeGithub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

struct App {
    id: u64,
    client_id: String,
    client_secret: String,
    slug: String,
    private_key_pem: String,
    public_key: RsaPublicKey,
}

struct UserRecord {
    id: u64,
    name: String,
    email: String,
    /// A bot account (`type: "Bot"`).
    bot: bool,
}

struct RepoRecord {
    id: u64,
    owner: String,
    name: String,
    default_branch: String,
    private: bool,
    collaborators: BTreeMap<String, Role>,
    dir: PathBuf,
    /// The repository this one is a fork of.
    fork_of: Option<String>,
}

struct InstallationRecord {
    account: String,
    repos: Vec<String>,
}

struct UserTokenRecord {
    login: String,
    expires_at: u64,
}

struct RefreshTokenRecord {
    login: String,
    access_token: String,
    expires_at: u64,
}

struct InstallationTokenRecord {
    token: String,
    installation: u64,
    repos: Vec<String>,
    permissions: BTreeMap<String, String>,
    expires_at: u64,
}

struct CodeRecord {
    login: String,
    client_id: String,
    redirect_uri: String,
    challenge: String,
    expires_at: u64,
}

struct PullRecord {
    pull: Pull,
    opened_with: String,
}

/// A review comment (top-level or a reply) on a pull request.
struct ReviewCommentRecord {
    repo: String,
    number: u64,
    comment: ReviewComment,
    /// The auth kind that made it: `user:<login>`, `installation:<id>`, or `test` (a test helper).
    made_with: String,
}

struct ReviewRecord {
    repo: String,
    number: u64,
    review: Review,
}

/// A comment on a pull request's conversation.
struct IssueCommentRecord {
    repo: String,
    number: u64,
    comment: IssueComment,
    made_with: String,
}

struct ReactionRecord {
    /// `pulls` (on a review comment) or `issues` (on a conversation comment).
    kind: &'static str,
    comment_id: u64,
    reaction: Reaction,
    made_with: String,
}

struct Inner {
    app: App,
    web_url: String,
    webhook_secret: String,
    webhook_target: Option<String>,
    fail_deliveries: bool,
    git_root: PathBuf,
    users: BTreeMap<String, UserRecord>,
    organizations: BTreeMap<String, u64>,
    next_account_id: u64,
    browser_user: Option<String>,
    repos: BTreeMap<String, RepoRecord>,
    installations: BTreeMap<u64, InstallationRecord>,
    user_tokens: BTreeMap<String, UserTokenRecord>,
    refresh_tokens: BTreeMap<String, RefreshTokenRecord>,
    installation_tokens: Vec<InstallationTokenRecord>,
    codes: BTreeMap<String, CodeRecord>,
    pulls: BTreeMap<String, Vec<PullRecord>>,
    next_pull_id: u64,
    review_comments: Vec<ReviewCommentRecord>,
    reviews: Vec<ReviewRecord>,
    issue_comments: Vec<IssueCommentRecord>,
    reactions: Vec<ReactionRecord>,
    next_comment_id: u64,
    requests: Vec<(String, String, String)>,
    deliveries: Vec<DeliveryRecord>,
    refreshes: BTreeMap<String, u32>,
}

#[derive(Clone)]
struct Ctx {
    inner: Arc<Mutex<Inner>>,
    client: reqwest::Client,
    web_url: String,
}

impl Ctx {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn log(&self, method: &Method, path: &str, auth_kind: &str) {
        self.lock()
            .requests
            .push((method.to_string(), path.to_string(), auth_kind.to_string()));
    }
}

/// Who a request authenticated as.
#[derive(Debug, Clone)]
enum Caller {
    Anonymous,
    User(String),
    Installation {
        id: u64,
        repos: Vec<String>,
        permissions: BTreeMap<String, String>,
    },
    App,
}

impl Caller {
    /// The request log's auth kind: `user:<login>`, `installation:<id>`, `jwt` or `none`.
    fn kind(&self) -> String {
        match self {
            Caller::Anonymous => "none".to_string(),
            Caller::User(login) => format!("user:{login}"),
            Caller::Installation { id, .. } => format!("installation:{id}"),
            Caller::App => "jwt".to_string(),
        }
    }
}

impl Inner {
    fn bot_account(&self) -> Account {
        Account {
            login: format!("{}[bot]", self.app.slug),
            id: 41_000_000 + self.app.id,
            kind: "Bot".to_string(),
        }
    }

    fn account(&self, login: &str) -> Account {
        if let Some(user) = self.users.get(login) {
            return Account {
                login: login.to_string(),
                id: user.id,
                kind: if user.bot { "Bot" } else { "User" }.to_string(),
            };
        }
        if let Some(id) = self.organizations.get(login) {
            return Account {
                login: login.to_string(),
                id: *id,
                kind: "Organization".to_string(),
            };
        }
        if login == format!("{}[bot]", self.app.slug) {
            return self.bot_account();
        }
        Account {
            login: login.to_string(),
            id: 0,
            kind: "User".to_string(),
        }
    }

    fn caller_account(&self, caller: &Caller) -> Account {
        match caller {
            Caller::User(login) => self.account(login),
            _ => self.bot_account(),
        }
    }

    fn repo_ref(&self, full_name: &str) -> Option<RepoRef> {
        let repo = self.repos.get(full_name)?;
        Some(RepoRef {
            id: repo.id,
            full_name: full_name.to_string(),
            name: repo.name.clone(),
            owner: Some(self.account(&repo.owner)),
            default_branch: Some(repo.default_branch.clone()),
            private: repo.private,
        })
    }

    fn repo_name(&self, full_name: &str) -> Option<RepoName> {
        let repo = self.repos.get(full_name)?;
        Some(RepoName {
            id: repo.id,
            name: repo.name.clone(),
            full_name: full_name.to_string(),
            private: repo.private,
        })
    }

    fn installation_for(&self, full_name: &str) -> Option<u64> {
        self.installations
            .iter()
            .find(|(_, installation)| installation.repos.iter().any(|r| r == full_name))
            .map(|(id, _)| *id)
    }

    fn installation(&self, id: u64) -> Option<Installation> {
        let record = self.installations.get(&id)?;
        Some(Installation {
            id,
            account: self.account(&record.account),
            app_id: Some(self.app.id),
        })
    }

    fn installation_info(&self, id: u64) -> Option<InstallationInfo> {
        let record = self.installations.get(&id)?;
        Some(InstallationInfo {
            id,
            account: self.account(&record.account),
            repository_selection: "selected".to_string(),
            app_id: Some(self.app.id),
            app_slug: Some(self.app.slug.clone()),
        })
    }

    /// The token holder for a `ghu_`/`ghs_` token that is known and unexpired.
    fn token_caller(&self, token: &str, now: u64) -> Option<Caller> {
        if let Some(record) = self.user_tokens.get(token) {
            return (record.expires_at > now).then(|| Caller::User(record.login.clone()));
        }
        self.installation_tokens
            .iter()
            .find(|record| record.token == token && record.expires_at > now)
            .map(|record| Caller::Installation {
                id: record.installation,
                repos: record.repos.clone(),
                permissions: record.permissions.clone(),
            })
    }

    fn issue_user_tokens(&mut self, login: &str) -> UserTokens {
        let now = now_seconds();
        let access_token = format!("ghu_{}", random_alphanumeric(36));
        let refresh_token = format!("ghr_{}", random_alphanumeric(76));
        self.user_tokens.insert(
            access_token.clone(),
            UserTokenRecord {
                login: login.to_string(),
                expires_at: now + USER_TOKEN_SECONDS,
            },
        );
        self.refresh_tokens.insert(
            refresh_token.clone(),
            RefreshTokenRecord {
                login: login.to_string(),
                access_token: access_token.clone(),
                expires_at: now + REFRESH_TOKEN_SECONDS,
            },
        );
        UserTokens {
            access_token,
            expires_in: Some(USER_TOKEN_SECONDS),
            refresh_token: Some(refresh_token),
            refresh_token_expires_in: Some(REFRESH_TOKEN_SECONDS),
            scope: String::new(),
            token_type: "bearer".to_string(),
        }
    }

    fn issue_installation_token(
        &mut self,
        installation: u64,
        repos: Vec<String>,
        permissions: BTreeMap<String, String>,
    ) -> (String, u64) {
        let token = format!("ghs_{}", random_alphanumeric(40));
        let expires_at = now_seconds() + INSTALLATION_TOKEN_SECONDS;
        self.installation_tokens.push(InstallationTokenRecord {
            token: token.clone(),
            installation,
            repos,
            permissions,
            expires_at,
        });
        (token, expires_at)
    }

    /// The `pull_request` webhook for `pull`, if the App is installed on the repository.
    fn pull_request_outgoing(
        &self,
        action: &str,
        full_name: &str,
        pull: &Pull,
        sender: &Account,
        extra: Value,
    ) -> Option<Outgoing> {
        let installation = self.installation_for(full_name)?;
        let repository = self.repo_ref(full_name)?;
        let repository_id = repository.id;
        let event = PullRequestEvent {
            action: action.to_string(),
            number: pull.number,
            pull_request: pull.clone(),
            repository,
            sender: sender.clone(),
            installation: Some(InstallationRef { id: installation }),
        };
        Some(Outgoing {
            event: "pull_request".to_string(),
            action: Some(action.to_string()),
            payload: with_extra(&event, extra),
            installation_id: Some(installation),
            repository_id: Some(repository_id),
        })
    }

    /// The `push` webhook for one branch update, if the App is installed on the repository.
    fn push_outgoing(
        &self,
        full_name: &str,
        branch: &str,
        before: &str,
        after: &str,
        sender: &Account,
    ) -> Option<Outgoing> {
        let installation = self.installation_for(full_name)?;
        let repository = self.repo_ref(full_name)?;
        let repository_id = repository.id;
        let event = PushEvent {
            git_ref: format!("refs/heads/{branch}"),
            before: before.to_string(),
            after: after.to_string(),
            repository,
            installation: Some(InstallationRef { id: installation }),
            sender: sender.clone(),
        };
        let email = self
            .users
            .get(&sender.login)
            .map(|user| user.email.clone())
            .unwrap_or_else(|| format!("{}@users.noreply.github.com", sender.login));
        let extra = json!({
            "created": before == ZERO_SHA,
            "deleted": after == ZERO_SHA,
            "forced": false,
            "base_ref": null,
            "compare": format!("{}/{full_name}/compare/{}...{}", self.web_url, short(before), short(after)),
            "commits": [],
            "head_commit": null,
            "pusher": {"name": sender.login, "email": email},
        });
        Some(Outgoing {
            event: "push".to_string(),
            action: None,
            payload: with_extra(&event, extra),
            installation_id: Some(installation),
            repository_id: Some(repository_id),
        })
    }

    /// After branch updates in `full_name`: the `push` webhooks, and for open pull requests whose
    /// head moved, the new head plus `synchronize` (or `closed` when the head branch was deleted).
    fn branch_updates(
        &mut self,
        full_name: &str,
        changes: &[(String, String, String)],
        sender: &Account,
    ) -> Vec<Outgoing> {
        let mut outgoing = Vec::new();
        for (branch, before, after) in changes {
            outgoing.extend(self.push_outgoing(full_name, branch, before, after, sender));
            let now = iso8601(now_seconds());
            let mut moved = Vec::new();
            for record in self.pulls.get_mut(full_name).into_iter().flatten() {
                let pull = &mut record.pull;
                if pull.state != "open" || pull.head.git_ref != *branch || pull.head.sha == *after {
                    continue;
                }
                pull.updated_at = now.clone();
                if after == ZERO_SHA {
                    pull.state = "closed".to_string();
                    pull.closed_at = Some(now.clone());
                    moved.push(("closed", pull.clone(), Value::Null));
                } else {
                    pull.head.sha = after.clone();
                    let extra = json!({"before": before, "after": after});
                    moved.push(("synchronize", pull.clone(), extra));
                }
            }
            for (action, pull, extra) in moved {
                outgoing
                    .extend(self.pull_request_outgoing(action, full_name, &pull, sender, extra));
            }
        }
        outgoing
    }
}

/// A webhook waiting to be sent.
struct Outgoing {
    event: String,
    action: Option<String>,
    payload: Value,
    installation_id: Option<u64>,
    repository_id: Option<u64>,
}

impl Outgoing {
    fn from_payload(event: &str, payload: Value) -> Outgoing {
        Outgoing {
            event: event.to_string(),
            action: payload["action"].as_str().map(str::to_string),
            installation_id: payload["installation"]["id"].as_u64(),
            repository_id: payload["repository"]["id"].as_u64(),
            payload,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reviews, review comments, conversation comments and reactions
// ---------------------------------------------------------------------------------------------

/// What a new review comment is made of (the rest comes from the pull request).
struct NewReviewComment<'a> {
    review_id: u64,
    in_reply_to_id: Option<u64>,
    path: &'a str,
    line: Option<u64>,
    start_line: Option<u64>,
    side: Option<String>,
    diff_hunk: String,
    commit_id: String,
    body: &'a str,
    user: Account,
}

impl Inner {
    fn next_comment_id(&mut self) -> u64 {
        let id = self.next_comment_id;
        self.next_comment_id += 1;
        id
    }

    fn pull(&self, full_name: &str, number: u64) -> Option<&Pull> {
        self.pulls
            .get(full_name)?
            .iter()
            .find(|record| record.pull.number == number)
            .map(|record| &record.pull)
    }

    /// GitHub's `author_association` of `login` on `full_name`: the owner is `OWNER`; on an
    /// organization's repository admins and maintainers count as its members (`MEMBER`); other
    /// collaborators are `COLLABORATOR`; authors of merged PRs `CONTRIBUTOR`; others `NONE`.
    fn author_association(&self, full_name: &str, login: &str) -> &'static str {
        let Some(repo) = self.repos.get(full_name) else {
            return "NONE";
        };
        if repo.owner == login {
            return "OWNER";
        }
        let merged_before = self
            .pulls
            .get(full_name)
            .into_iter()
            .flatten()
            .any(|record| record.pull.merged && record.pull.user.login == login);
        match repo.collaborators.get(login) {
            Some(role)
                if *role >= Role::Maintain && self.organizations.contains_key(&repo.owner) =>
            {
                "MEMBER"
            }
            Some(_) => "COLLABORATOR",
            None if merged_before => "CONTRIBUTOR",
            None => "NONE",
        }
    }

    /// Stores a new review comment on pull `number` of `full_name` and returns it.
    fn add_review_comment(
        &mut self,
        full_name: &str,
        number: u64,
        new: NewReviewComment<'_>,
        made_with: &str,
    ) -> ReviewComment {
        let id = self.next_comment_id();
        let comment = ReviewComment {
            id,
            pull_request_review_id: Some(new.review_id),
            in_reply_to_id: new.in_reply_to_id,
            path: new.path.to_string(),
            diff_hunk: new.diff_hunk,
            line: new.line,
            original_line: new.line,
            start_line: new.start_line,
            original_start_line: new.start_line,
            side: new.side,
            start_side: None,
            commit_id: new.commit_id.clone(),
            original_commit_id: Some(new.commit_id),
            body: new.body.to_string(),
            author_association: self
                .author_association(full_name, &new.user.login)
                .to_string(),
            user: new.user,
            html_url: format!(
                "{}/{full_name}/pull/{number}#discussion_r{id}",
                self.web_url
            ),
            created_at: Some(iso8601(now_seconds())),
        };
        self.review_comments.push(ReviewCommentRecord {
            repo: full_name.to_string(),
            number,
            comment: comment.clone(),
            made_with: made_with.to_string(),
        });
        comment
    }

    /// Stores a submitted review by `user` on pull `number` of `full_name` and returns it.
    fn add_review(
        &mut self,
        full_name: &str,
        number: u64,
        user: Account,
        body: &str,
        commit_id: &str,
    ) -> Review {
        let id = self.next_comment_id();
        let review = Review {
            id,
            state: "commented".to_string(),
            body: (!body.is_empty()).then(|| body.to_string()),
            author_association: self.author_association(full_name, &user.login).to_string(),
            user,
            commit_id: commit_id.to_string(),
            html_url: Some(format!(
                "{}/{full_name}/pull/{number}#pullrequestreview-{id}",
                self.web_url
            )),
            submitted_at: Some(iso8601(now_seconds())),
        };
        self.reviews.push(ReviewRecord {
            repo: full_name.to_string(),
            number,
            review: review.clone(),
        });
        review
    }

    /// Stores a conversation comment by `user` on pull `number` of `full_name` and returns it.
    fn add_issue_comment(
        &mut self,
        full_name: &str,
        number: u64,
        user: Account,
        body: &str,
        made_with: &str,
    ) -> IssueComment {
        let id = self.next_comment_id();
        let comment = IssueComment {
            id,
            body: body.to_string(),
            author_association: self.author_association(full_name, &user.login).to_string(),
            user,
            html_url: format!(
                "{}/{full_name}/pull/{number}#issuecomment-{id}",
                self.web_url
            ),
            created_at: Some(iso8601(now_seconds())),
        };
        self.issue_comments.push(IssueCommentRecord {
            repo: full_name.to_string(),
            number,
            comment: comment.clone(),
            made_with: made_with.to_string(),
        });
        comment
    }

    /// `pull_request_review_comment` `created` for `comment`, if the App is installed.
    fn review_comment_outgoing(
        &self,
        full_name: &str,
        number: u64,
        comment: &ReviewComment,
    ) -> Option<Outgoing> {
        let installation = self.installation_for(full_name)?;
        let repository = self.repo_ref(full_name)?;
        let repository_id = repository.id;
        let event = ReviewCommentEvent {
            action: "created".to_string(),
            comment: comment.clone(),
            pull_request: self.pull(full_name, number)?.clone(),
            repository,
            sender: comment.user.clone(),
            installation: Some(InstallationRef { id: installation }),
        };
        Some(Outgoing {
            event: "pull_request_review_comment".to_string(),
            action: Some(event.action.clone()),
            payload: to_json(&event),
            installation_id: Some(installation),
            repository_id: Some(repository_id),
        })
    }

    /// `pull_request_review` `submitted` for `review`, if the App is installed.
    fn review_outgoing(&self, full_name: &str, number: u64, review: &Review) -> Option<Outgoing> {
        let installation = self.installation_for(full_name)?;
        let repository = self.repo_ref(full_name)?;
        let repository_id = repository.id;
        let event = ReviewEvent {
            action: "submitted".to_string(),
            review: review.clone(),
            pull_request: self.pull(full_name, number)?.clone(),
            repository,
            sender: review.user.clone(),
            installation: Some(InstallationRef { id: installation }),
        };
        Some(Outgoing {
            event: "pull_request_review".to_string(),
            action: Some(event.action.clone()),
            payload: to_json(&event),
            installation_id: Some(installation),
            repository_id: Some(repository_id),
        })
    }

    /// `issue_comment` `created` for `comment` on pull `number`, if the App is installed.
    fn issue_comment_outgoing(
        &self,
        full_name: &str,
        number: u64,
        comment: &IssueComment,
    ) -> Option<Outgoing> {
        let installation = self.installation_for(full_name)?;
        let repository = self.repo_ref(full_name)?;
        let repository_id = repository.id;
        let pull = self.pull(full_name, number)?;
        let event = IssueCommentEvent {
            action: "created".to_string(),
            issue: Issue {
                number,
                title: pull.title.clone(),
                pull_request: Some(IssuePullLink {
                    url: format!("{}/api/repos/{full_name}/pulls/{number}", self.web_url),
                    html_url: pull.html_url.clone(),
                }),
            },
            comment: comment.clone(),
            repository,
            sender: comment.user.clone(),
            installation: Some(InstallationRef { id: installation }),
        };
        Some(Outgoing {
            event: "issue_comment".to_string(),
            action: Some(event.action.clone()),
            payload: to_json(&event),
            installation_id: Some(installation),
            repository_id: Some(repository_id),
        })
    }

    /// A review comment as the REST API answers it.
    fn review_comment_json(&self, full_name: &str, number: u64, comment: &ReviewComment) -> Value {
        with_extra(
            comment,
            json!({
                "node_id": format!("PRRC_{}", comment.id),
                "pull_request_url": format!("{}/api/repos/{full_name}/pulls/{number}", self.web_url),
                "subject_type": if comment.line.is_some() { "line" } else { "file" },
                "updated_at": comment.created_at,
            }),
        )
    }
}

/// GitHub's `diff_hunk` for a comment on `line` (new side) of `path`: the hunk of the diff from
/// `base` to `head` that holds the line, cut after it; when the diff does not touch the line, a
/// few lines of context from the file at `head`.
fn diff_hunk(repo_dir: &Path, base: &str, head: &str, path: &str, line: u64) -> String {
    let diff = git(
        repo_dir,
        &["diff", "--no-color", "--unified=3", base, head, "--", path],
        None,
        &[],
    )
    .unwrap_or_default();
    if let Some(hunk) = hunk_at(&diff, line) {
        return hunk;
    }
    let file = git(repo_dir, &["show", &format!("{head}:{path}")], None, &[]).unwrap_or_default();
    let lines: Vec<&str> = file.lines().collect();
    if lines.is_empty() {
        return "@@ -0,0 +1,1 @@\n+".to_string();
    }
    let end = usize::try_from(line)
        .unwrap_or(usize::MAX)
        .clamp(1, lines.len());
    let start = end.saturating_sub(3).max(1);
    let count = end - start + 1;
    let mut hunk = format!("@@ -{start},{count} +{start},{count} @@");
    for text in &lines[start - 1..end] {
        hunk.push_str("\n ");
        hunk.push_str(text);
    }
    hunk
}

/// The hunk of unified `diff` holding new-side line `line`, up to and including it.
fn hunk_at(diff: &str, line: u64) -> Option<String> {
    let mut current: Option<(String, u64)> = None;
    for text in diff.lines() {
        if text.starts_with("@@") {
            let plus = text.split(' ').find(|part| part.starts_with('+'))?;
            let start = plus
                .trim_start_matches('+')
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()?;
            current = Some((text.to_string(), start));
            continue;
        }
        let Some((hunk, next)) = current.as_mut() else {
            continue;
        };
        hunk.push('\n');
        hunk.push_str(text);
        if text.starts_with('-') || text.starts_with('\\') {
            continue;
        }
        if *next == line {
            return Some(hunk.clone());
        }
        *next += 1;
    }
    None
}

/// [`diff_hunk`] off the async runtime's threads.
async fn diff_hunk_async(repo_dir: &Path, base: &str, head: &str, path: &str, line: u64) -> String {
    let (repo_dir, base, head, path) = (
        repo_dir.to_path_buf(),
        base.to_string(),
        head.to_string(),
        path.to_string(),
    );
    tokio::task::spawn_blocking(move || diff_hunk(&repo_dir, &base, &head, &path, line))
        .await
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// The public handle
// ---------------------------------------------------------------------------------------------

impl FakeGithub {
    /// Generates the App's key pair with openssl and starts serving on a free loopback port.
    ///
    /// Panics if openssl or the port are unavailable (test setup).
    pub async fn start(config: FakeGithubConfig) -> FakeGithub {
        let dir = TempDir::new();
        let key_path = dir.path().join("app.private-key.pem");
        let openssl = Command::new("openssl")
            .args(["genrsa", "-traditional", "-out"])
            .arg(&key_path)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .expect("run openssl genrsa");
        assert!(openssl.success(), "openssl genrsa failed");
        let private_key_pem = std::fs::read_to_string(&key_path).expect("read the App key");
        let public_key = RsaPrivateKey::from_pkcs1_pem(&private_key_pem)
            .expect("parse the App key")
            .to_public_key();
        let git_root = dir.path().join("git");
        std::fs::create_dir_all(&git_root).expect("create the git root");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake GitHub");
        let address = listener.local_addr().expect("fake GitHub address");
        let inner = Inner {
            app: App {
                id: config.app_id,
                client_id: config.client_id,
                client_secret: config.client_secret,
                slug: config.slug,
                private_key_pem,
                public_key,
            },
            web_url: format!("http://{address}"),
            webhook_secret: config.webhook_secret,
            webhook_target: None,
            fail_deliveries: false,
            git_root,
            users: BTreeMap::new(),
            organizations: BTreeMap::new(),
            next_account_id: 1001,
            browser_user: None,
            repos: BTreeMap::new(),
            installations: BTreeMap::new(),
            user_tokens: BTreeMap::new(),
            refresh_tokens: BTreeMap::new(),
            installation_tokens: Vec::new(),
            codes: BTreeMap::new(),
            pulls: BTreeMap::new(),
            next_pull_id: 2_000_000_001,
            review_comments: Vec::new(),
            reviews: Vec::new(),
            issue_comments: Vec::new(),
            reactions: Vec::new(),
            next_comment_id: 3_000_000_001,
            requests: Vec::new(),
            deliveries: Vec::new(),
            refreshes: BTreeMap::new(),
        };
        let ctx = Ctx {
            inner: Arc::new(Mutex::new(inner)),
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            web_url: format!("http://{address}"),
        };
        let router = axum::Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::disable())
            .with_state(ctx.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        FakeGithub { ctx, server, dir }
    }

    /// The Worker's vars that point a deployment at this fake (the PEM with literal `\n`, as a
    /// secret pasted into one line).
    pub fn worker_vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("GITHUB_APP_CLIENT_ID", self.client_id()),
            ("GITHUB_APP_CLIENT_SECRET", self.client_secret()),
            ("GITHUB_APP_ID", self.app_id().to_string()),
            (
                "GITHUB_APP_PRIVATE_KEY",
                self.private_key_pem().trim().replace('\n', "\\n"),
            ),
            ("GITHUB_APP_SLUG", self.slug()),
            ("GITHUB_WEBHOOK_SECRET", self.webhook_secret()),
            ("GITHUB_API_URL", self.api_url()),
            ("GITHUB_WEB_URL", self.web_url()),
            ("GITHUB_GIT_URL", self.git_url()),
            (
                "TOKEN_ENCRYPTION_KEY",
                "test-token-key-0123456789".to_string(),
            ),
        ]
    }

    /// Signs `login` in through the Worker at `base` the way a browser does (start → this
    /// fake's authorize page → callback with the flow cookie); their Nightshift token.
    pub async fn sign_in_through(&self, base: &str, login: &str) -> String {
        self.set_browser_user(login);
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client");
        let headers = |r: &reqwest::Response, name: &str| -> Vec<String> {
            r.headers()
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(String::from)
                .collect()
        };
        let start = http
            .get(format!("{base}/auth/github/start?return=/"))
            .send()
            .await
            .expect("start");
        let authorize = headers(&start, "location").concat();
        let cookie = headers(&start, "set-cookie")
            .into_iter()
            .find(|c| c.starts_with("ns_oauth="))
            .and_then(|c| c.split(';').next().map(String::from))
            .unwrap_or_default();
        let callback = self
            .authorize_redirect(&authorize)
            .await
            .expect("authorize page");
        let landed = http
            .get(callback)
            .header("cookie", cookie)
            .send()
            .await
            .expect("callback");
        let to = headers(&landed, "location").concat();
        let query = to
            .split_once("#/signed-in?")
            .map(|(_, q)| q)
            .unwrap_or_default();
        github::form_decode(query)
            .into_iter()
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no token in the sign-in's landing {to}"))
    }

    /// The web base URL (OAuth pages, pull request and compare pages): `http://127.0.0.1:P`.
    pub fn web_url(&self) -> String {
        self.ctx.web_url.clone()
    }

    /// The REST API base URL: `http://127.0.0.1:P/api`.
    pub fn api_url(&self) -> String {
        format!("{}/api", self.ctx.web_url)
    }

    /// The git base URL: `http://127.0.0.1:P/git`.
    pub fn git_url(&self) -> String {
        format!("{}/git", self.ctx.web_url)
    }

    /// The clone URL of `full_name`: `{git}/{owner}/{repo}.git`.
    pub fn clone_url(&self, full_name: &str) -> String {
        format!("{}/{full_name}.git", self.git_url())
    }

    /// The App's numeric id.
    pub fn app_id(&self) -> u64 {
        self.ctx.lock().app.id
    }

    /// The App's OAuth client id.
    pub fn client_id(&self) -> String {
        self.ctx.lock().app.client_id.clone()
    }

    /// The App's OAuth client secret.
    pub fn client_secret(&self) -> String {
        self.ctx.lock().app.client_secret.clone()
    }

    /// The App's slug.
    pub fn slug(&self) -> String {
        self.ctx.lock().app.slug.clone()
    }

    /// The secret webhooks are signed with.
    pub fn webhook_secret(&self) -> String {
        self.ctx.lock().webhook_secret.clone()
    }

    /// The App's private key, PKCS#1 PEM exactly as GitHub's download.
    pub fn private_key_pem(&self) -> String {
        self.ctx.lock().app.private_key_pem.clone()
    }

    /// Where the App's private key PEM file lies.
    pub fn private_key_path(&self) -> PathBuf {
        self.dir.path().join("app.private-key.pem")
    }

    /// Sends every webhook to `url` from now on (the Worker's `/webhook/github`).
    pub fn deliver_to(&self, url: &str) {
        self.ctx.lock().webhook_target = Some(url.to_string());
    }

    /// While on, webhooks are recorded as failed (status 502) without being sent.
    pub fn fail_deliveries(&self, failing: bool) {
        self.ctx.lock().fail_deliveries = failing;
    }

    /// Adds a user (email `{login}@example.com`); the first one becomes the browser user. Returns its id.
    pub fn add_user(&self, login: &str, name: &str) -> u64 {
        let mut inner = self.ctx.lock();
        if let Some(user) = inner.users.get(login) {
            return user.id;
        }
        let id = inner.next_account_id;
        inner.next_account_id += 1;
        inner.users.insert(
            login.to_string(),
            UserRecord {
                id,
                name: name.to_string(),
                email: format!("{login}@example.com"),
                bot: false,
            },
        );
        if inner.browser_user.is_none() {
            inner.browser_user = Some(login.to_string());
        }
        id
    }

    /// Makes the authorize page sign in as `login`.
    pub fn set_browser_user(&self, login: &str) {
        self.ctx.lock().browser_user = Some(login.to_string());
    }

    /// The account GitHub would show for `login` (user, organization or the App's bot).
    pub fn account(&self, login: &str) -> Account {
        self.ctx.lock().account(login)
    }

    /// Creates the private repository `owner/name` with one commit on `main` (README.md and
    /// hello.txt) and the given collaborators; returns its bare repository's directory.
    ///
    /// Panics on a malformed name or if git fails (test setup).
    pub fn add_repo(&self, full_name: &str, collaborators: &[(&str, Role)]) -> PathBuf {
        let (owner, name) = full_name
            .split_once('/')
            .expect("a repository's full name is owner/name");
        let git_root = self.ctx.lock().git_root.clone();
        let owner_dir = git_root.join(owner);
        std::fs::create_dir_all(&owner_dir).expect("create the owner directory");
        let repo_dir = owner_dir.join(format!("{name}.git"));
        git(
            &owner_dir,
            &[
                "init",
                "--quiet",
                "--bare",
                "--initial-branch=main",
                &format!("{name}.git"),
            ],
            None,
            &[],
        )
        .expect("git init --bare");
        git(
            &repo_dir,
            &["config", "http.receivepack", "true"],
            None,
            &[],
        )
        .expect("enable receive-pack");
        let readme = format!("# {name}\n\nA repository of the fake GitHub.\n");
        let commit = write_commit(
            &repo_dir,
            None,
            &[
                ("README.md", readme.as_bytes()),
                ("hello.txt", b"hello from the fake GitHub\n"),
            ],
            "Initial commit",
        )
        .expect("initial commit");
        git(
            &repo_dir,
            &["update-ref", "refs/heads/main", &commit],
            None,
            &[],
        )
        .expect("set main");

        let mut inner = self.ctx.lock();
        if !inner.users.contains_key(owner) && !inner.organizations.contains_key(owner) {
            let id = inner.next_account_id;
            inner.next_account_id += 1;
            inner.organizations.insert(owner.to_string(), id);
        }
        let id = 70_001 + inner.repos.len() as u64;
        inner.repos.insert(
            full_name.to_string(),
            RepoRecord {
                id,
                owner: owner.to_string(),
                name: name.to_string(),
                default_branch: "main".to_string(),
                private: true,
                collaborators: collaborators
                    .iter()
                    .map(|(login, role)| (login.to_string(), *role))
                    .collect(),
                dir: repo_dir.clone(),
                fork_of: None,
            },
        );
        repo_dir
    }

    /// Gives `login` the role `role` on `full_name` (`Role::None` removes the collaborator).
    pub fn set_collaborator(&self, full_name: &str, login: &str, role: Role) {
        let mut inner = self.ctx.lock();
        if let Some(repo) = inner.repos.get_mut(full_name) {
            if role == Role::None {
                repo.collaborators.remove(login);
            } else {
                repo.collaborators.insert(login.to_string(), role);
            }
        }
    }

    /// Makes `full_name` public or private.
    pub fn set_private(&self, full_name: &str, private: bool) {
        if let Some(repo) = self.ctx.lock().repos.get_mut(full_name) {
            repo.private = private;
        }
    }

    /// The bare repository directory of `full_name`.
    pub fn repo_dir(&self, full_name: &str) -> Option<PathBuf> {
        self.ctx
            .lock()
            .repos
            .get(full_name)
            .map(|repo| repo.dir.clone())
    }

    /// The commit `branch` of `full_name` points at.
    pub fn branch_sha(&self, full_name: &str, branch: &str) -> Option<String> {
        branch_sha(&self.repo_dir(full_name)?, branch)
    }

    /// Commits `contents` as `path` on `branch` of `full_name` server-side (branching off the
    /// default branch if `branch` is new) and returns the commit; no webhook is sent.
    pub fn commit_file(
        &self,
        full_name: &str,
        branch: &str,
        path: &str,
        contents: &str,
    ) -> Result<String, String> {
        let (repo_dir, default_branch) = {
            let inner = self.ctx.lock();
            let repo = inner
                .repos
                .get(full_name)
                .ok_or_else(|| format!("no repository {full_name}"))?;
            (repo.dir.clone(), repo.default_branch.clone())
        };
        let parent = branch_sha(&repo_dir, branch)
            .or_else(|| branch_sha(&repo_dir, &default_branch))
            .ok_or("the repository has no commits")?;
        let commit = write_commit(
            &repo_dir,
            Some(&parent),
            &[(path, contents.as_bytes())],
            &format!("Update {path}"),
        )?;
        git(
            &repo_dir,
            &["update-ref", &format!("refs/heads/{branch}"), &commit],
            None,
            &[],
        )?;
        Ok(commit)
    }

    /// Installs the App on `account` for `repos` (full names); returns the installation id. No webhook.
    pub fn install(&self, account: &str, repos: &[&str]) -> u64 {
        let mut inner = self.ctx.lock();
        let id = 100_001 + inner.installations.len() as u64;
        inner.installations.insert(
            id,
            InstallationRecord {
                account: account.to_string(),
                repos: repos.iter().map(|r| r.to_string()).collect(),
            },
        );
        id
    }

    /// Delivers `installation` `created` for installation `id`, sent by the browser user.
    pub async fn deliver_installation_created(&self, id: u64) -> (u16, String) {
        let payload = self.installation_payload(id, "created");
        send(&self.ctx, Outgoing::from_payload("installation", payload)).await
    }

    /// Adds `repos` to installation `id` and delivers `installation_repositories` `added`.
    pub async fn add_installation_repos(&self, id: u64, repos: &[&str]) -> (u16, String) {
        let payload = {
            let mut inner = self.ctx.lock();
            if let Some(installation) = inner.installations.get_mut(&id) {
                for repo in repos {
                    if !installation.repos.iter().any(|r| r == repo) {
                        installation.repos.push(repo.to_string());
                    }
                }
            }
            let sender = browser_account(&inner);
            let added: Vec<RepoName> = repos.iter().filter_map(|r| inner.repo_name(r)).collect();
            inner.installation_info(id).map(|installation| {
                to_json(&InstallationRepositoriesEvent {
                    action: "added".to_string(),
                    installation,
                    repositories_added: added,
                    repositories_removed: Vec::new(),
                    sender,
                })
            })
        };
        let payload = payload.unwrap_or(Value::Null);
        send(
            &self.ctx,
            Outgoing::from_payload("installation_repositories", payload),
        )
        .await
    }

    /// The `installation` event payload for installation `id` (`action` e.g. "created").
    pub fn installation_payload(&self, id: u64, action: &str) -> Value {
        let inner = self.ctx.lock();
        let Some(installation) = inner.installation_info(id) else {
            return Value::Null;
        };
        let repositories = inner
            .installations
            .get(&id)
            .map(|record| {
                record
                    .repos
                    .iter()
                    .filter_map(|r| inner.repo_name(r))
                    .collect()
            })
            .unwrap_or_default();
        to_json(&InstallationEvent {
            action: action.to_string(),
            installation,
            repositories,
            sender: browser_account(&inner),
        })
    }

    /// The `pull_request` event payload for pull `number` of `full_name` as it is now.
    pub fn pull_request_payload(
        &self,
        action: &str,
        full_name: &str,
        number: u64,
    ) -> Option<Value> {
        let inner = self.ctx.lock();
        let pull = inner
            .pulls
            .get(full_name)?
            .iter()
            .find(|record| record.pull.number == number)?
            .pull
            .clone();
        let sender = pull.user.clone();
        inner
            .pull_request_outgoing(action, full_name, &pull, &sender, Value::Null)
            .map(|outgoing| outgoing.payload)
    }

    /// The `push` event payload for `branch` of `full_name` moving from `before` to `after`.
    pub fn push_payload(
        &self,
        full_name: &str,
        branch: &str,
        before: &str,
        after: &str,
        sender: &str,
    ) -> Option<Value> {
        let inner = self.ctx.lock();
        let sender = inner.account(sender);
        inner
            .push_outgoing(full_name, branch, before, after, &sender)
            .map(|outgoing| outgoing.payload)
    }

    /// Issues a user access token for `login` without the OAuth dance.
    pub fn mint_user_token(&self, login: &str) -> String {
        self.ctx.lock().issue_user_tokens(login).access_token
    }

    /// Issues an installation token without the JWT dance, e.g. `&[("contents", "read")]`.
    pub fn mint_installation_token(
        &self,
        installation: u64,
        repos: &[&str],
        permissions: &[(&str, &str)],
    ) -> String {
        let permissions = permissions
            .iter()
            .map(|(name, level)| (name.to_string(), level.to_string()))
            .collect();
        let repos = repos.iter().map(|r| r.to_string()).collect();
        self.ctx
            .lock()
            .issue_installation_token(installation, repos, permissions)
            .0
    }

    /// Makes every access token of `login` expired (its refresh tokens stay valid).
    pub fn expire_user_tokens(&self, login: &str) {
        let mut inner = self.ctx.lock();
        let expired = now_seconds().saturating_sub(1);
        for record in inner.user_tokens.values_mut() {
            if record.login == login {
                record.expires_at = expired;
            }
        }
    }

    /// Revokes every access and refresh token of `login`.
    pub fn revoke_user_tokens(&self, login: &str) {
        let mut inner = self.ctx.lock();
        inner.user_tokens.retain(|_, record| record.login != login);
        inner
            .refresh_tokens
            .retain(|_, record| record.login != login);
    }

    /// How many times `login`'s tokens were refreshed.
    pub fn refreshes(&self, login: &str) -> u32 {
        self.ctx.lock().refreshes.get(login).copied().unwrap_or(0)
    }

    /// Every installation token issued: (token, repository full names, permissions).
    pub fn installation_tokens(&self) -> Vec<(String, Vec<String>, BTreeMap<String, String>)> {
        self.ctx
            .lock()
            .installation_tokens
            .iter()
            .map(|record| {
                (
                    record.token.clone(),
                    record.repos.clone(),
                    record.permissions.clone(),
                )
            })
            .collect()
    }

    /// A valid App JWT (RS256, `iss` = client id, iat = now-60, exp = now+540).
    pub fn app_jwt(&self) -> String {
        let (pem, client_id) = {
            let inner = self.ctx.lock();
            (
                inner.app.private_key_pem.clone(),
                inner.app.client_id.clone(),
            )
        };
        sign_app_jwt(&pem, &github::jwt_claims(&client_id, now_seconds()))
    }

    /// The pull requests of `full_name`, oldest first, each with the auth kind that opened it
    /// (`user:<login>` or `installation:<id>`).
    pub fn pulls(&self, full_name: &str) -> Vec<(Pull, String)> {
        self.ctx
            .lock()
            .pulls
            .get(full_name)
            .map(|records| {
                records
                    .iter()
                    .map(|record| (record.pull.clone(), record.opened_with.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Merges pull `number` of `full_name` as its author with a merge commit, and delivers the
    /// base branch's `push` and `pull_request` `closed` (waiting for both); returns the merge commit.
    pub async fn merge(&self, full_name: &str, number: u64) -> Result<String, String> {
        let sender = {
            let inner = self.ctx.lock();
            inner
                .pulls
                .get(full_name)
                .and_then(|records| records.iter().find(|r| r.pull.number == number))
                .map(|record| record.pull.user.clone())
                .ok_or_else(|| format!("no pull request {full_name}#{number}"))?
        };
        let merge = MergeRequest::default();
        let (sha, outgoing) = merge_pull(&self.ctx, full_name, number, &sender, &merge)
            .await
            .map_err(|refusal| format!("{}: {}", refusal.0, refusal.1))?;
        for item in outgoing {
            send(&self.ctx, item).await;
        }
        Ok(sha)
    }

    /// Every request so far: (method, path, auth kind `user:<login>` | `installation:<id>` | `jwt` | `none`).
    pub fn requests(&self) -> Vec<(String, String, String)> {
        self.ctx.lock().requests.clone()
    }

    /// Every webhook sent or attempted, oldest first.
    pub fn deliveries(&self) -> Vec<DeliveryRecord> {
        self.ctx.lock().deliveries.clone()
    }

    /// Waits until at least `count` deliveries are recorded (or `timeout` passes); returns them all.
    pub async fn wait_for_deliveries(
        &self,
        count: usize,
        timeout: Duration,
    ) -> Vec<DeliveryRecord> {
        let deadline = Instant::now() + timeout;
        loop {
            let deliveries = self.deliveries();
            if deliveries.len() >= count || Instant::now() >= deadline {
                return deliveries;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Signs and sends `payload` as event `event` to the target; returns (status, guid).
    pub async fn deliver(&self, event: &str, payload: Value) -> (u16, String) {
        send(&self.ctx, Outgoing::from_payload(event, payload)).await
    }

    /// Re-sends the delivery `guid` with the same bytes and guid; returns the status (0 if unknown).
    pub async fn redeliver(&self, guid: &str) -> u16 {
        let original = self
            .ctx
            .lock()
            .deliveries
            .iter()
            .rev()
            .find(|record| record.guid == guid)
            .cloned();
        match original {
            Some(record) => resend(&self.ctx, &record).await,
            None => 0,
        }
    }

    /// Sends `body` as-is with the given guid and signature header (omitted when `None`), unrecorded:
    /// for forged, stale or replayed deliveries. Returns the status (0 when nothing answered).
    pub async fn deliver_raw(
        &self,
        event: &str,
        guid: &str,
        body: &[u8],
        signature_header: Option<&str>,
    ) -> u16 {
        let (target, app_id) = {
            let inner = self.ctx.lock();
            (inner.webhook_target.clone(), inner.app.id)
        };
        let Some(target) = target else {
            return 0;
        };
        let mut request =
            webhook_request(&self.ctx.client, &target, event, guid, app_id).body(body.to_vec());
        if let Some(signature) = signature_header {
            request = request.header("X-Hub-Signature-256", signature);
        }
        match request.send().await {
            Ok(response) => response.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// Plays the browser on the authorize page: fetches `authorize_url` and returns where its
    /// Authorize button leads (`redirect_uri?code=…&state=…`), or the page's error text.
    pub async fn authorize_redirect(&self, authorize_url: &str) -> Result<String, String> {
        let response = self
            .ctx
            .client
            .get(authorize_url)
            .header(header::USER_AGENT, "nightshift-tests")
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let page = response.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{status}: {page}"));
        }
        let marker = "id=\"authorize\" href=\"";
        let start = page.find(marker).ok_or("no Authorize button")? + marker.len();
        let end = page[start..].find('"').ok_or("unterminated href")? + start;
        Ok(html_unescape(&page[start..end]))
    }

    /// Adds a bot account (`type: "Bot"`, e.g. `dependabot[bot]`); returns its id.
    pub fn add_bot(&self, login: &str) -> u64 {
        let id = self.add_user(login, login);
        if let Some(user) = self.ctx.lock().users.get_mut(login) {
            user.bot = true;
        }
        id
    }

    /// Submits a review by `reviewer` on pull `number` of `full_name` with `body` (may be empty)
    /// and one comment per `(path, line, body)` on the PR's head commit, each with a diff hunk
    /// from the PR's diff (or the file) ending at its line. Delivers, in order and waiting for
    /// each, one `pull_request_review_comment` `created` per comment, then `pull_request_review`
    /// `submitted`. Returns (review id, comment ids).
    ///
    /// Panics if there is no such pull request (test setup).
    pub async fn submit_review(
        &self,
        full_name: &str,
        number: u64,
        reviewer: &str,
        body: &str,
        comments: &[(&str, u64, &str)],
    ) -> (u64, Vec<u64>) {
        let (pull, repo_dir) = {
            let inner = self.ctx.lock();
            let pull = inner
                .pull(full_name, number)
                .cloned()
                .unwrap_or_else(|| panic!("no pull request {full_name}#{number}"));
            let repo_dir = inner.repos.get(full_name).map(|repo| repo.dir.clone());
            (pull, repo_dir.unwrap_or_default())
        };
        let mut hunks = Vec::new();
        for (path, line, _) in comments {
            let hunk =
                diff_hunk_async(&repo_dir, &pull.base.sha, &pull.head.sha, path, *line).await;
            hunks.push(hunk);
        }
        let (review, stored, outgoing) = {
            let mut inner = self.ctx.lock();
            let user = inner.account(reviewer);
            let review = inner.add_review(full_name, number, user.clone(), body, &pull.head.sha);
            let mut stored = Vec::new();
            let mut outgoing = Vec::new();
            for ((path, line, text), hunk) in comments.iter().zip(hunks) {
                let new = NewReviewComment {
                    review_id: review.id,
                    in_reply_to_id: None,
                    path,
                    line: Some(*line),
                    start_line: None,
                    side: Some("RIGHT".to_string()),
                    diff_hunk: hunk,
                    commit_id: pull.head.sha.clone(),
                    body: text,
                    user: user.clone(),
                };
                let comment = inner.add_review_comment(full_name, number, new, "test");
                outgoing.extend(inner.review_comment_outgoing(full_name, number, &comment));
                stored.push(comment.id);
            }
            outgoing.extend(inner.review_outgoing(full_name, number, &review));
            (review, stored, outgoing)
        };
        for item in outgoing {
            send(&self.ctx, item).await;
        }
        (review.id, stored)
    }

    /// `login` replies in the thread of `root_comment_id` on pull `number` of `full_name`: a
    /// review comment with `in_reply_to_id` and a review of its own. Delivers, as GitHub does,
    /// its `pull_request_review_comment` `created` and then its review's `pull_request_review`
    /// `submitted` (waiting for both), and returns the reply's id.
    ///
    /// Panics if there is no such root comment (test setup).
    pub async fn reply_in_thread(
        &self,
        full_name: &str,
        number: u64,
        login: &str,
        root_comment_id: u64,
        body: &str,
    ) -> u64 {
        let (comment, outgoing) = {
            let mut inner = self.ctx.lock();
            let user = inner.account(login);
            let (comment, outgoing) = add_reply(
                &mut inner,
                full_name,
                number,
                root_comment_id,
                &user,
                body,
                "test",
            )
            .unwrap_or_else(|refusal| panic!("reply: {} {}", refusal.0, refusal.1));
            (comment, outgoing)
        };
        for item in outgoing {
            send(&self.ctx, item).await;
        }
        comment.id
    }

    /// The author edits review comment `comment_id` of `full_name` to `body`, or deletes it
    /// (`None`): GitHub's `pull_request_review_comment` `edited` / `deleted` is delivered
    /// (waiting for it). A deleted comment leaves the list.
    ///
    /// Panics if there is no such comment (test setup).
    pub async fn change_review_comment(
        &self,
        full_name: &str,
        comment_id: u64,
        body: Option<&str>,
    ) {
        let outgoing = {
            let mut inner = self.ctx.lock();
            let at = inner
                .review_comments
                .iter()
                .position(|record| record.repo == full_name && record.comment.id == comment_id)
                .unwrap_or_else(|| panic!("no review comment {comment_id} on {full_name}"));
            let number = inner.review_comments[at].number;
            let comment = match body {
                Some(text) => {
                    inner.review_comments[at].comment.body = text.to_string();
                    inner.review_comments[at].comment.clone()
                }
                None => inner.review_comments.remove(at).comment,
            };
            let mut outgoing = inner.review_comment_outgoing(full_name, number, &comment);
            if let Some(item) = outgoing.as_mut() {
                let action = if body.is_some() { "edited" } else { "deleted" };
                item.action = Some(action.to_string());
                if let Some(fields) = item.payload.as_object_mut() {
                    fields.insert("action".to_string(), Value::from(action));
                }
            }
            outgoing
        };
        if let Some(item) = outgoing {
            send(&self.ctx, item).await;
        }
    }

    /// `login` comments `body` on the conversation of pull `number` of `full_name`; delivers
    /// `issue_comment` `created` (waiting for it) and returns the comment's id.
    ///
    /// Panics if there is no such pull request (test setup).
    pub async fn comment_on_pull(
        &self,
        full_name: &str,
        number: u64,
        login: &str,
        body: &str,
    ) -> u64 {
        let (comment, outgoing) = {
            let mut inner = self.ctx.lock();
            assert!(
                inner.pull(full_name, number).is_some(),
                "no pull request {full_name}#{number}"
            );
            let user = inner.account(login);
            let comment = inner.add_issue_comment(full_name, number, user, body, "test");
            let outgoing = inner.issue_comment_outgoing(full_name, number, &comment);
            (comment, outgoing)
        };
        if let Some(item) = outgoing {
            send(&self.ctx, item).await;
        }
        comment.id
    }

    /// Opens a pull request on `base_full_name` from `head_branch` of `fork_owner`'s fork (made
    /// on first use, `{fork_owner}/{name}`, owned by that user and without the App): the branch
    /// gets one commit changing hello.txt, GitHub's `refs/pull/{n}/head` is kept in the base
    /// repository, and `pull_request` `opened` is delivered (waiting for it). Installation tokens
    /// cannot push to the fork. Returns the PR's number.
    ///
    /// Panics if the base repository does not exist or git fails (test setup).
    pub async fn open_fork_pull(
        &self,
        base_full_name: &str,
        fork_owner: &str,
        head_branch: &str,
        title: &str,
    ) -> u64 {
        self.add_user(fork_owner, fork_owner);
        let (base_dir, name, private, git_root) = {
            let inner = self.ctx.lock();
            let base = inner
                .repos
                .get(base_full_name)
                .unwrap_or_else(|| panic!("no repository {base_full_name}"));
            (
                base.dir.clone(),
                base.name.clone(),
                base.private,
                inner.git_root.clone(),
            )
        };
        let fork_full_name = format!("{fork_owner}/{name}");
        let owner_dir = git_root.join(fork_owner);
        let fork_dir = owner_dir.join(format!("{name}.git"));
        if self.repo_dir(&fork_full_name).is_none() {
            std::fs::create_dir_all(&owner_dir).expect("create the fork owner's directory");
            let base_path = base_dir.to_string_lossy().into_owned();
            git(
                &owner_dir,
                &[
                    "clone",
                    "--quiet",
                    "--bare",
                    &base_path,
                    &format!("{name}.git"),
                ],
                None,
                &[],
            )
            .expect("git clone --bare (the fork)");
            git(
                &fork_dir,
                &["config", "http.receivepack", "true"],
                None,
                &[],
            )
            .expect("enable receive-pack");
            let mut inner = self.ctx.lock();
            let id = 70_001 + inner.repos.len() as u64;
            inner.repos.insert(
                fork_full_name.clone(),
                RepoRecord {
                    id,
                    owner: fork_owner.to_string(),
                    name: name.clone(),
                    default_branch: "main".to_string(),
                    private,
                    collaborators: BTreeMap::new(),
                    dir: fork_dir.clone(),
                    fork_of: Some(base_full_name.to_string()),
                },
            );
        }
        let head_sha = self
            .commit_file(
                &fork_full_name,
                head_branch,
                "hello.txt",
                &format!("hello from the fork of {fork_owner}\n"),
            )
            .expect("commit on the fork");
        let base_sha = branch_sha(&base_dir, "main").expect("the base branch");
        let (pull, outgoing) = {
            let mut inner = self.ctx.lock();
            let number = inner.pulls.get(base_full_name).map_or(0, Vec::len) as u64 + 1;
            let fork_path = fork_dir.to_string_lossy().into_owned();
            git(
                &base_dir,
                &[
                    "fetch",
                    "--quiet",
                    &fork_path,
                    &format!("refs/heads/{head_branch}:refs/pull/{number}/head"),
                ],
                None,
                &[],
            )
            .expect("keep refs/pull/N/head in the base repository");
            let id = inner.next_pull_id;
            inner.next_pull_id += 1;
            let user = inner.account(fork_owner);
            let pull = Pull {
                id,
                number,
                state: "open".to_string(),
                draft: false,
                merged: false,
                merged_at: None,
                title: title.to_string(),
                body: None,
                html_url: format!("{}/{base_full_name}/pull/{number}", self.ctx.web_url),
                updated_at: iso8601(now_seconds()),
                closed_at: None,
                user: user.clone(),
                head: Branch {
                    git_ref: head_branch.to_string(),
                    sha: head_sha,
                    repo: inner.repo_ref(&fork_full_name),
                },
                base: Branch {
                    git_ref: "main".to_string(),
                    sha: base_sha,
                    repo: inner.repo_ref(base_full_name),
                },
            };
            inner
                .pulls
                .entry(base_full_name.to_string())
                .or_default()
                .push(PullRecord {
                    pull: pull.clone(),
                    opened_with: format!("user:{fork_owner}"),
                });
            let outgoing =
                inner.pull_request_outgoing("opened", base_full_name, &pull, &user, Value::Null);
            (pull, outgoing)
        };
        if let Some(item) = outgoing {
            send(&self.ctx, item).await;
        }
        pull.number
    }

    /// Every review comment of `full_name` (top-level and replies), oldest first.
    pub fn review_comments(&self, full_name: &str) -> Vec<ReviewComment> {
        self.ctx
            .lock()
            .review_comments
            .iter()
            .filter(|record| record.repo == full_name)
            .map(|record| record.comment.clone())
            .collect()
    }

    /// Every thread reply of `full_name`, oldest first: (root comment id, body, author login).
    pub fn review_replies(&self, full_name: &str) -> Vec<(u64, String, String)> {
        self.ctx
            .lock()
            .review_comments
            .iter()
            .filter(|record| record.repo == full_name)
            .filter_map(|record| {
                let comment = &record.comment;
                comment
                    .in_reply_to_id
                    .map(|root| (root, comment.body.clone(), comment.user.login.clone()))
            })
            .collect()
    }

    /// Thread replies of `full_name` with the auth kind that posted each: (root comment id,
    /// body, `user:<login>` | `installation:<id>` | `test`).
    pub fn review_replies_made_with(&self, full_name: &str) -> Vec<(u64, String, String)> {
        self.ctx
            .lock()
            .review_comments
            .iter()
            .filter(|record| record.repo == full_name)
            .filter_map(|record| {
                let comment = &record.comment;
                comment
                    .in_reply_to_id
                    .map(|root| (root, comment.body.clone(), record.made_with.clone()))
            })
            .collect()
    }

    /// The conversation comments of pull `number` of `full_name`, oldest first:
    /// (comment id, body, author login, auth kind `user:<login>` | `installation:<id>` | `test`).
    pub fn issue_comments(
        &self,
        full_name: &str,
        number: u64,
    ) -> Vec<(u64, String, String, String)> {
        self.ctx
            .lock()
            .issue_comments
            .iter()
            .filter(|record| record.repo == full_name && record.number == number)
            .map(|record| {
                (
                    record.comment.id,
                    record.comment.body.clone(),
                    record.comment.user.login.clone(),
                    record.made_with.clone(),
                )
            })
            .collect()
    }

    /// Every reaction, oldest first: (`pulls` | `issues`, comment id, content, by login).
    pub fn reactions(&self) -> Vec<(String, u64, String, String)> {
        self.ctx
            .lock()
            .reactions
            .iter()
            .map(|record| {
                (
                    record.kind.to_string(),
                    record.comment_id,
                    record.reaction.content.name().to_string(),
                    record.reaction.user.login.clone(),
                )
            })
            .collect()
    }

    /// Every reaction with the auth kind that made it: (`pulls` | `issues`, comment id, content,
    /// `user:<login>` | `installation:<id>`).
    pub fn reactions_made_with(&self) -> Vec<(String, u64, String, String)> {
        self.ctx
            .lock()
            .reactions
            .iter()
            .map(|record| {
                (
                    record.kind.to_string(),
                    record.comment_id,
                    record.reaction.content.name().to_string(),
                    record.made_with.clone(),
                )
            })
            .collect()
    }

    /// Re-sends every delivery after the first `from` recorded ones (not redeliveries), in
    /// order, with their guids; returns their statuses.
    pub async fn redeliver_since(&self, from: usize) -> Vec<u16> {
        let originals: Vec<DeliveryRecord> = self
            .ctx
            .lock()
            .deliveries
            .iter()
            .skip(from)
            .filter(|record| !record.redelivery)
            .cloned()
            .collect();
        let mut statuses = Vec::new();
        for record in &originals {
            statuses.push(resend(&self.ctx, record).await);
        }
        statuses
    }
}

fn browser_account(inner: &Inner) -> Account {
    match &inner.browser_user {
        Some(login) => inner.account(login),
        None => inner.bot_account(),
    }
}

/// Signs `claims` as an App JWT (RS256) with the PKCS#1 PEM `private_key_pem`.
///
/// Panics on an unreadable key (test helper).
pub fn sign_app_jwt(private_key_pem: &str, claims: &JwtClaims) -> String {
    let private_key = RsaPrivateKey::from_pkcs1_pem(private_key_pem).expect("a PKCS#1 RSA key");
    let signing_input = github::jwt_signing_input(claims);
    let digest = Sha256::digest(signing_input.as_bytes());
    let signature = private_key
        .sign(Pkcs1v15Sign::new::<Sha256>(), &digest)
        .expect("RS256 signature");
    github::jwt_finish(&signing_input, &signature)
}

/// A fresh 2048-bit RSA key, PKCS#1 PEM, from `openssl genrsa -traditional` (e.g. a wrong key).
///
/// Panics if openssl fails (test helper).
pub fn generate_private_key_pem() -> String {
    let output = Command::new("openssl")
        .args(["genrsa", "-traditional", "2048"])
        .stderr(Stdio::null())
        .output()
        .expect("run openssl genrsa");
    assert!(output.status.success(), "openssl genrsa failed");
    String::from_utf8(output.stdout).expect("PEM is ASCII")
}

/// Seconds since the Unix epoch.
pub fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `secs` since the epoch as GitHub writes times: `YYYY-MM-DDTHH:MM:SSZ`.
pub fn iso8601(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let of_day = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

/// A refusal in GitHub's shape: status and JSON body.
struct Refusal(StatusCode, Value);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        json_response(self.0, &self.1)
    }
}

type Answer = Result<Response, Refusal>;

fn refusal(status: StatusCode, message: &str) -> Refusal {
    Refusal(
        status,
        json!({"message": message, "documentation_url": DOCS_URL, "status": status.as_u16().to_string()}),
    )
}

fn not_found() -> Refusal {
    refusal(StatusCode::NOT_FOUND, "Not Found")
}

fn bad_credentials() -> Refusal {
    refusal(StatusCode::UNAUTHORIZED, "Bad credentials")
}

fn not_accessible() -> Refusal {
    refusal(StatusCode::FORBIDDEN, NOT_ACCESSIBLE)
}

fn validation_failed(errors: Value) -> Refusal {
    Refusal(
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({"message": "Validation Failed", "errors": errors, "documentation_url": DOCS_URL, "status": "422"}),
    )
}

fn json_response(status: StatusCode, value: &impl Serialize) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    (
        status,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

fn html_response(status: StatusCode, html: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response()
}

async fn handle(
    State(ctx): State<Ctx>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Absolute-form URIs (from a proxy) carry the same path as origin-form ones.
    let path = uri.path().to_string();
    let query = uri.query().unwrap_or("").to_string();
    if let Some(rest) = path.strip_prefix("/git/") {
        return git_http(&ctx, &method, &path, rest, &query, &headers, body).await;
    }
    if let Some(rest) = path.strip_prefix("/api/") {
        return match api(&ctx, &method, &path, rest, &query, &headers, &body).await {
            Ok(response) => response,
            Err(refused) => refused.into_response(),
        };
    }
    ctx.log(&method, &path, "none");
    match (method.as_str(), path.as_str()) {
        ("GET", "/login/oauth/authorize") => authorize_page(&ctx, &query),
        ("POST", "/login/oauth/access_token") => access_token(&ctx, &query, &headers, &body),
        ("GET", _) => web_page(&ctx, &path),
        _ => html_response(StatusCode::NOT_FOUND, page("Not Found", "")),
    }
}

fn page(title: &str, content: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{}</title></head><body><h1>{}</h1>{content}</body></html>\n",
        html_escape(title),
        html_escape(title)
    )
}

/// The pull request and compare pages (what a user's browser opens from the links).
fn web_page(ctx: &Ctx, path: &str) -> Response {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let inner = ctx.lock();
    match segments.as_slice() {
        [owner, name, "pull", number] => {
            let full_name = format!("{owner}/{name}");
            let pull = number.parse::<u64>().ok().and_then(|number| {
                inner
                    .pulls
                    .get(&full_name)?
                    .iter()
                    .find(|record| record.pull.number == number)
            });
            match pull {
                Some(record) => html_response(
                    StatusCode::OK,
                    page(
                        &record.pull.title,
                        &format!("<p id=\"state\">{}</p>", html_escape(&record.pull.state)),
                    ),
                ),
                None => html_response(StatusCode::NOT_FOUND, page("Not Found", "")),
            }
        }
        [owner, name, "compare", range] if inner.repos.contains_key(&format!("{owner}/{name}")) => {
            html_response(
                StatusCode::OK,
                page(
                    "Open a pull request",
                    &format!("<p id=\"range\">{}</p>", html_escape(range)),
                ),
            )
        }
        [""] => html_response(StatusCode::OK, page("Fake GitHub", "")),
        _ => html_response(StatusCode::NOT_FOUND, page("Not Found", "")),
    }
}

// ---------------------------------------------------------------------------------------------
// OAuth
// ---------------------------------------------------------------------------------------------

fn query_map(query: &str) -> BTreeMap<String, String> {
    github::form_decode(query).into_iter().collect()
}

fn authorize_page(ctx: &Ctx, query: &str) -> Response {
    let params = query_map(query);
    let param = |name: &str| params.get(name).map(String::as_str).unwrap_or("");
    let mut inner = ctx.lock();
    if param("client_id") != inner.app.client_id {
        return html_response(
            StatusCode::BAD_REQUEST,
            page("Bad request", "<p>The client_id is not valid.</p>"),
        );
    }
    if param("redirect_uri").is_empty() {
        return html_response(
            StatusCode::BAD_REQUEST,
            page("Bad request", "<p>The redirect_uri is missing.</p>"),
        );
    }
    if param("code_challenge").is_empty() || param("code_challenge_method") != "S256" {
        return html_response(
            StatusCode::BAD_REQUEST,
            page(
                "Bad request",
                "<p>code_challenge with code_challenge_method=S256 is required.</p>",
            ),
        );
    }
    let Some(login) = inner.browser_user.clone() else {
        return html_response(
            StatusCode::BAD_REQUEST,
            page("Sign in to GitHub", "<p>Nobody is signed in.</p>"),
        );
    };
    let code = random_hex(20);
    inner.codes.insert(
        code.clone(),
        CodeRecord {
            login: login.clone(),
            client_id: param("client_id").to_string(),
            redirect_uri: param("redirect_uri").to_string(),
            challenge: param("code_challenge").to_string(),
            expires_at: now_seconds() + CODE_SECONDS,
        },
    );
    let mut answer = vec![("code", code.as_str())];
    if params.contains_key("state") {
        answer.push(("state", param("state")));
    }
    let redirect_uri = param("redirect_uri");
    let separator = if redirect_uri.contains('?') { '&' } else { '?' };
    let target = format!("{redirect_uri}{separator}{}", github::form_encode(&answer));
    let title = format!("Authorize {}", inner.app.slug);
    let content = format!(
        "<p>Signed in as <span id=\"login\">{}</span>.</p><a id=\"authorize\" href=\"{}\">Authorize</a>",
        html_escape(&login),
        html_escape(&target)
    );
    html_response(StatusCode::OK, page(&title, &content))
}

fn oauth_error(error: &str, description: &str) -> Value {
    json!({
        "error": error,
        "error_description": description,
        "error_uri": "https://docs.github.com/apps/managing-oauth-apps/troubleshooting-oauth-app-access-token-request-errors",
    })
}

fn access_token(ctx: &Ctx, query: &str, headers: &HeaderMap, body: &Bytes) -> Response {
    let header_text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase()
    };
    let mut fields = serde_json::Map::new();
    for (name, value) in github::form_decode(query) {
        fields.insert(name, Value::String(value));
    }
    if header_text(header::CONTENT_TYPE).starts_with("application/json") {
        if let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) {
            fields.extend(object);
        }
    } else {
        for (name, value) in github::form_decode(&String::from_utf8_lossy(body)) {
            fields.insert(name, Value::String(value));
        }
    }
    let exchange: Option<TokenExchange> = serde_json::from_value(Value::Object(fields)).ok();
    let answer = match exchange {
        Some(exchange) => exchange_tokens(&mut ctx.lock(), &exchange),
        None => oauth_error(
            "incorrect_client_credentials",
            "The client_id and/or client_secret passed are incorrect.",
        ),
    };
    if header_text(header::ACCEPT).contains("application/json") {
        return json_response(StatusCode::OK, &answer);
    }
    let pairs: Vec<(String, String)> = answer
        .as_object()
        .map(|object| {
            object
                .iter()
                .map(|(name, value)| {
                    let text = match value {
                        Value::String(text) => text.clone(),
                        other => other.to_string(),
                    };
                    (name.clone(), text)
                })
                .collect()
        })
        .unwrap_or_default();
    let borrowed: Vec<(&str, &str)> = pairs
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_str()))
        .collect();
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "application/x-www-form-urlencoded; charset=utf-8",
        )],
        github::form_encode(&borrowed),
    )
        .into_response()
}

/// The access-token endpoint's answer (GitHub answers refusals with HTTP 200 too).
fn exchange_tokens(inner: &mut Inner, exchange: &TokenExchange) -> Value {
    if exchange.client_id != inner.app.client_id
        || exchange.client_secret != inner.app.client_secret
    {
        return oauth_error(
            "incorrect_client_credentials",
            "The client_id and/or client_secret passed are incorrect.",
        );
    }
    let now = now_seconds();
    if exchange.grant_type.as_deref() == Some("refresh_token") {
        let refresh_token = exchange.refresh_token.as_deref().unwrap_or("");
        return match inner.refresh_tokens.remove(refresh_token) {
            Some(record) if record.expires_at > now => {
                inner.user_tokens.remove(&record.access_token);
                *inner.refreshes.entry(record.login.clone()).or_default() += 1;
                to_json(&inner.issue_user_tokens(&record.login))
            }
            _ => oauth_error(
                "bad_refresh_token",
                "The refresh token passed is incorrect or expired.",
            ),
        };
    }
    if let Some(grant_type) = exchange
        .grant_type
        .as_deref()
        .filter(|g| *g != "authorization_code")
    {
        return oauth_error(
            "unsupported_grant_type",
            &format!("The grant type {grant_type} is not supported."),
        );
    }
    let bad_code = || {
        oauth_error(
            "bad_verification_code",
            "The code passed is incorrect or expired.",
        )
    };
    // A code is spent by its first exchange, whether that exchange succeeds or not.
    let Some(code) = exchange
        .code
        .as_deref()
        .and_then(|code| inner.codes.remove(code))
    else {
        return bad_code();
    };
    let verifier_matches = exchange
        .code_verifier
        .as_deref()
        .is_some_and(|verifier| github::pkce_challenge(verifier) == code.challenge);
    let redirect_matches = exchange
        .redirect_uri
        .as_deref()
        .is_none_or(|uri| uri == code.redirect_uri);
    if code.expires_at <= now
        || code.client_id != exchange.client_id
        || !redirect_matches
        || !verifier_matches
    {
        return bad_code();
    }
    to_json(&inner.issue_user_tokens(&code.login))
}

// ---------------------------------------------------------------------------------------------
// REST API
// ---------------------------------------------------------------------------------------------

/// The token of `Authorization: Bearer <t>` or `Authorization: token <t>`.
fn bearer_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let scheme = scheme.to_ascii_lowercase();
    (scheme == "bearer" || scheme == "token").then(|| token.trim().to_string())
}

fn authenticate(ctx: &Ctx, headers: &HeaderMap) -> Result<Caller, Refusal> {
    let Some(token) = bearer_token(headers) else {
        return Ok(Caller::Anonymous);
    };
    let now = now_seconds();
    let inner = ctx.lock();
    if token.starts_with("ghu_") || token.starts_with("ghs_") {
        return inner.token_caller(&token, now).ok_or_else(bad_credentials);
    }
    if token.split('.').count() == 3 {
        return verify_app_jwt(&inner.app, &token, now)
            .map(|()| Caller::App)
            .map_err(|message| refusal(StatusCode::UNAUTHORIZED, message));
    }
    Err(bad_credentials())
}

/// GitHub's checks of an App JWT: RS256 by the App's key, `iss`, and the time window.
fn verify_app_jwt(app: &App, token: &str, now: u64) -> Result<(), &'static str> {
    let (signing_input, claims, signature) =
        github::jwt_parse(token).map_err(|_| JWT_UNDECODABLE)?;
    let digest = Sha256::digest(signing_input.as_bytes());
    app.public_key
        .verify(Pkcs1v15Sign::new::<Sha256>(), &digest, &signature)
        .map_err(|_| JWT_UNDECODABLE)?;
    if claims.iss != app.client_id && claims.iss != app.id.to_string() {
        return Err(JWT_UNDECODABLE);
    }
    if claims.iat > now + 60 {
        return Err("'Issued at' claim ('iat') must be an Integer representing the time that the assertion was issued.");
    }
    if claims.exp <= now {
        return Err("'Expiration time' claim ('exp') must be a numeric value representing the future time at which the assertion expires.");
    }
    if claims.exp.saturating_sub(claims.iat) > 600 {
        return Err("'Expiration time' claim ('exp') is too far in the future.");
    }
    Ok(())
}

/// A collaborator's role; the owning user is an admin.
fn role_of(repo: &RepoRecord, login: &str) -> Role {
    if repo.owner == login {
        return Role::Admin;
    }
    repo.collaborators.get(login).copied().unwrap_or(Role::None)
}

/// The role a user effectively has: public repositories are readable by everyone.
fn effective_role(repo: &RepoRecord, login: &str) -> Role {
    let role = role_of(repo, login);
    if !repo.private && role < Role::Read {
        Role::Read
    } else {
        role
    }
}

fn permissions_of(role: Role) -> Permissions {
    Permissions {
        admin: role >= Role::Admin,
        maintain: role >= Role::Maintain,
        push: role >= Role::Write,
        triage: role >= Role::Triage,
        pull: role >= Role::Read,
    }
}

/// The `permission` field of the collaborator permission endpoint (the legacy four levels).
fn permission_name(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::Maintain | Role::Write => "write",
        Role::Triage | Role::Read => "read",
        Role::None => "none",
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::Maintain => "maintain",
        Role::Write => "write",
        Role::Triage => "triage",
        Role::Read => "read",
        Role::None => "none",
    }
}

fn level_rank(level: &str) -> u8 {
    match level {
        "read" => 1,
        "write" => 2,
        "admin" => 3,
        _ => 0,
    }
}

fn has_permission(permissions: &BTreeMap<String, String>, name: &str, level: &str) -> bool {
    permissions
        .get(name)
        .is_some_and(|granted| level_rank(granted) >= level_rank(level))
}

/// The repository `full_name` if `caller` may see it, else GitHub's 404.
fn visible_repo<'a>(
    inner: &'a Inner,
    caller: &Caller,
    full_name: &str,
) -> Result<&'a RepoRecord, Refusal> {
    let repo = inner.repos.get(full_name).ok_or_else(not_found)?;
    let visible = match caller {
        Caller::User(login) => effective_role(repo, login) >= Role::Read,
        Caller::Installation { repos, .. } => repos.iter().any(|r| r == full_name),
        Caller::App | Caller::Anonymous => !repo.private,
    };
    if visible {
        Ok(repo)
    } else {
        Err(not_found())
    }
}

fn require_app(caller: &Caller) -> Result<(), Refusal> {
    match caller {
        Caller::App => Ok(()),
        _ => Err(refusal(StatusCode::UNAUTHORIZED, JWT_UNDECODABLE)),
    }
}

fn require_user(caller: &Caller) -> Result<&str, Refusal> {
    match caller {
        Caller::User(login) => Ok(login),
        Caller::Anonymous => Err(refusal(StatusCode::UNAUTHORIZED, "Requires authentication")),
        _ => Err(not_accessible()),
    }
}

async fn api(
    ctx: &Ctx,
    method: &Method,
    path: &str,
    rest: &str,
    query: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Answer {
    if !headers.contains_key(header::USER_AGENT) {
        ctx.log(method, path, "none");
        return Err(refusal(StatusCode::FORBIDDEN, NO_USER_AGENT));
    }
    let caller = match authenticate(ctx, headers) {
        Ok(caller) => caller,
        Err(refused) => {
            ctx.log(method, path, "none");
            return Err(refused);
        }
    };
    ctx.log(method, path, &caller.kind());
    let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["user"]) => get_user(ctx, &caller),
        ("GET", ["user", "emails"]) => get_emails(ctx, &caller),
        ("GET", ["app"]) => get_app(ctx, &caller),
        ("GET", ["app", "installations"]) => list_installations(ctx, &caller),
        ("GET", ["app", "installations", id]) => get_installation(ctx, &caller, id),
        ("POST", ["app", "installations", id, "access_tokens"]) => {
            create_access_token(ctx, &caller, id, body)
        }
        ("GET", ["app", "hook", "deliveries"]) => list_deliveries(ctx, &caller, query),
        ("GET", ["app", "hook", "deliveries", id]) => get_delivery(ctx, &caller, id),
        ("POST", ["app", "hook", "deliveries", id, "attempts"]) => {
            redeliver_attempt(ctx, &caller, id)
        }
        ("GET", ["repos", owner, name]) => get_repo(ctx, &caller, &format!("{owner}/{name}")),
        ("GET", ["repos", owner, name, "installation"]) => {
            get_repo_installation(ctx, &caller, &format!("{owner}/{name}"))
        }
        ("GET", ["repos", owner, name, "collaborators", login, "permission"]) => {
            get_collaborator_permission(ctx, &caller, &format!("{owner}/{name}"), login)
        }
        ("GET", ["repos", owner, name, "pulls"]) => {
            list_pulls(ctx, &caller, &format!("{owner}/{name}"), query)
        }
        ("POST", ["repos", owner, name, "pulls"]) => {
            create_pull(ctx, &caller, &format!("{owner}/{name}"), body).await
        }
        ("GET", ["repos", owner, name, "pulls", number]) => {
            get_pull(ctx, &caller, &format!("{owner}/{name}"), number)
        }
        ("PUT", ["repos", owner, name, "pulls", number, "merge"]) => {
            merge_endpoint(ctx, &caller, &format!("{owner}/{name}"), number, body).await
        }
        ("GET", ["repos", owner, name, "pulls", number, "comments"]) => list_review_comments(
            ctx,
            &caller,
            &format!("{owner}/{name}"),
            number,
            path,
            query,
        ),
        ("GET", ["repos", owner, name, "pulls", number, "reviews", review_id, "comments"]) => {
            list_review_comments_of(
                ctx,
                &caller,
                &format!("{owner}/{name}"),
                number,
                review_id,
                (path, query),
            )
        }
        ("POST", ["repos", owner, name, "pulls", number, "comments", comment_id, "replies"]) => {
            create_reply(
                ctx,
                &caller,
                &format!("{owner}/{name}"),
                number,
                comment_id,
                body,
            )
        }
        ("POST", ["repos", owner, name, "pulls", "comments", comment_id, "reactions"]) => {
            create_reaction(
                ctx,
                &caller,
                &format!("{owner}/{name}"),
                "pulls",
                comment_id,
                body,
            )
        }
        ("GET", ["repos", owner, name, "issues", number, "comments"]) => list_issue_comments(
            ctx,
            &caller,
            &format!("{owner}/{name}"),
            number,
            path,
            query,
        ),
        ("POST", ["repos", owner, name, "issues", number, "comments"]) => {
            create_issue_comment(ctx, &caller, &format!("{owner}/{name}"), number, body)
        }
        ("POST", ["repos", owner, name, "issues", "comments", comment_id, "reactions"]) => {
            create_reaction(
                ctx,
                &caller,
                &format!("{owner}/{name}"),
                "issues",
                comment_id,
                body,
            )
        }
        _ => Err(not_found()),
    }
}

fn ok_json(value: &impl Serialize) -> Answer {
    Ok(json_response(StatusCode::OK, value))
}

fn get_user(ctx: &Ctx, caller: &Caller) -> Answer {
    let login = require_user(caller)?;
    let inner = ctx.lock();
    let record = inner.users.get(login).ok_or_else(bad_credentials)?;
    let user = User {
        id: record.id,
        login: login.to_string(),
        name: Some(record.name.clone()),
        email: Some(record.email.clone()),
        kind: "User".to_string(),
    };
    let extra = json!({"html_url": format!("{}/{login}", ctx.web_url), "site_admin": false});
    ok_json(&with_extra(&user, extra))
}

fn get_emails(ctx: &Ctx, caller: &Caller) -> Answer {
    let login = require_user(caller)?;
    let inner = ctx.lock();
    let record = inner.users.get(login).ok_or_else(bad_credentials)?;
    let emails = vec![
        Email {
            email: format!("{}+{login}@users.noreply.github.com", record.id),
            primary: false,
            verified: true,
        },
        Email {
            email: record.email.clone(),
            primary: true,
            verified: true,
        },
        Email {
            email: format!("{login}@old.example.com"),
            primary: false,
            verified: false,
        },
    ];
    ok_json(&emails)
}

fn app_permissions() -> BTreeMap<String, String> {
    [
        ("contents", "write"),
        ("issues", "write"),
        ("metadata", "read"),
        ("pull_requests", "write"),
    ]
    .into_iter()
    .map(|(name, level)| (name.to_string(), level.to_string()))
    .collect()
}

fn get_app(ctx: &Ctx, caller: &Caller) -> Answer {
    require_app(caller)?;
    let inner = ctx.lock();
    ok_json(&json!({
        "id": inner.app.id,
        "slug": inner.app.slug,
        "client_id": inner.app.client_id,
        "name": inner.app.slug,
        "html_url": format!("{}/apps/{}", ctx.web_url, inner.app.slug),
        "permissions": app_permissions(),
        "events": ["installation", "installation_repositories", "pull_request", "push"],
    }))
}

fn installation_json(inner: &Inner, id: u64) -> Option<Value> {
    let installation = inner.installation(id)?;
    Some(with_extra(
        &installation,
        json!({
            "app_slug": inner.app.slug,
            "target_type": installation.account.kind,
            "repository_selection": "selected",
            "permissions": app_permissions(),
            "access_tokens_url": format!("/app/installations/{id}/access_tokens"),
        }),
    ))
}

fn list_installations(ctx: &Ctx, caller: &Caller) -> Answer {
    require_app(caller)?;
    let inner = ctx.lock();
    let installations: Vec<Value> = inner
        .installations
        .keys()
        .filter_map(|id| installation_json(&inner, *id))
        .collect();
    ok_json(&installations)
}

fn get_installation(ctx: &Ctx, caller: &Caller, id: &str) -> Answer {
    require_app(caller)?;
    let inner = ctx.lock();
    let id = id.parse::<u64>().map_err(|_| not_found())?;
    ok_json(&installation_json(&inner, id).ok_or_else(not_found)?)
}

fn create_access_token(ctx: &Ctx, caller: &Caller, id: &str, body: &Bytes) -> Answer {
    require_app(caller)?;
    let id = id.parse::<u64>().map_err(|_| not_found())?;
    let request: AccessTokenRequest = if body.iter().all(u8::is_ascii_whitespace) {
        AccessTokenRequest::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|_| refusal(StatusCode::BAD_REQUEST, "Problems parsing JSON"))?
    };
    let mut inner = ctx.lock();
    let installation = inner.installations.get(&id).ok_or_else(not_found)?;
    let repos: Vec<String> = if request.repositories.is_empty() {
        installation.repos.clone()
    } else {
        let mut named = Vec::new();
        for name in &request.repositories {
            let full_name = installation
                .repos
                .iter()
                .find(|full| full.rsplit('/').next() == Some(name.as_str()) || *full == name)
                .ok_or_else(|| {
                    refusal(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "There is at least one repository that does not exist or is not accessible to the parent installation.",
                    )
                })?;
            named.push(full_name.clone());
        }
        named
    };
    let granted = app_permissions();
    let permissions = if request.permissions.is_empty() {
        granted
    } else {
        for (name, level) in &request.permissions {
            if !has_permission(&granted, name, level) {
                return Err(refusal(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "The permissions requested are not granted to this installation.",
                ));
            }
        }
        let mut permissions = request.permissions.clone();
        permissions
            .entry("metadata".to_string())
            .or_insert_with(|| "read".to_string());
        permissions
    };
    let (token, expires_at) =
        inner.issue_installation_token(id, repos.clone(), permissions.clone());
    let answer = AccessToken {
        token,
        expires_at: iso8601(expires_at),
        permissions,
        repositories: repos.iter().filter_map(|r| inner.repo_name(r)).collect(),
    };
    Ok(json_response(
        StatusCode::CREATED,
        &with_extra(&answer, json!({"repository_selection": "selected"})),
    ))
}

fn delivery_json(record: &DeliveryRecord) -> Value {
    let delivery = Delivery {
        id: record.id,
        guid: record.guid.clone(),
        status_code: record.status_code,
        redelivery: record.redelivery,
        event: record.event.clone(),
        action: record.action.clone(),
        delivered_at: record.delivered_at.clone(),
    };
    let status = match record.status_code {
        200..=299 => "OK".to_string(),
        0 => "Invalid HTTP Response: 0".to_string(),
        code => format!("Invalid HTTP Response: {code}"),
    };
    with_extra(
        &delivery,
        json!({
            "status": status,
            "duration": 0.01,
            "installation_id": record.installation_id,
            "repository_id": record.repository_id,
            "throttled_at": null,
        }),
    )
}

fn list_deliveries(ctx: &Ctx, caller: &Caller, query: &str) -> Answer {
    require_app(caller)?;
    let per_page = query_map(query)
        .get("per_page")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(30)
        .clamp(1, 100);
    let inner = ctx.lock();
    let deliveries: Vec<Value> = inner
        .deliveries
        .iter()
        .rev()
        .take(per_page)
        .map(delivery_json)
        .collect();
    ok_json(&deliveries)
}

fn get_delivery(ctx: &Ctx, caller: &Caller, id: &str) -> Answer {
    require_app(caller)?;
    let id = id.parse::<u64>().map_err(|_| not_found())?;
    let inner = ctx.lock();
    let record = inner
        .deliveries
        .iter()
        .find(|record| record.id == id)
        .ok_or_else(not_found)?;
    let mut answer = delivery_json(record);
    answer["request"] = json!({
        "payload": serde_json::from_slice::<Value>(&record.payload).unwrap_or(Value::Null),
    });
    ok_json(&answer)
}

fn redeliver_attempt(ctx: &Ctx, caller: &Caller, id: &str) -> Answer {
    require_app(caller)?;
    let id = id.parse::<u64>().map_err(|_| not_found())?;
    let record = ctx
        .lock()
        .deliveries
        .iter()
        .find(|record| record.id == id)
        .cloned()
        .ok_or_else(not_found)?;
    let background = ctx.clone();
    tokio::spawn(async move {
        resend(&background, &record).await;
    });
    Ok(json_response(StatusCode::ACCEPTED, &json!({})))
}

fn get_repo(ctx: &Ctx, caller: &Caller, full_name: &str) -> Answer {
    let inner = ctx.lock();
    let repo = visible_repo(&inner, caller, full_name)?;
    let permissions = match caller {
        Caller::User(login) => Some(permissions_of(effective_role(repo, login))),
        _ => None,
    };
    let repository = Repository {
        id: repo.id,
        name: repo.name.clone(),
        full_name: full_name.to_string(),
        owner: inner.account(&repo.owner),
        default_branch: repo.default_branch.clone(),
        private: repo.private,
        permissions,
    };
    let extra = json!({
        "html_url": format!("{}/{full_name}", ctx.web_url),
        "clone_url": format!("{}/git/{full_name}.git", ctx.web_url),
        "visibility": if repo.private { "private" } else { "public" },
        "fork": repo.fork_of.is_some(),
        "parent": repo.fork_of.as_ref().and_then(|parent| inner.repo_ref(parent)),
        "archived": false,
    });
    ok_json(&with_extra(&repository, extra))
}

fn get_repo_installation(ctx: &Ctx, caller: &Caller, full_name: &str) -> Answer {
    require_app(caller)?;
    let inner = ctx.lock();
    let id = inner.installation_for(full_name).ok_or_else(not_found)?;
    ok_json(&installation_json(&inner, id).ok_or_else(not_found)?)
}

fn get_collaborator_permission(ctx: &Ctx, caller: &Caller, full_name: &str, login: &str) -> Answer {
    let inner = ctx.lock();
    let repo = visible_repo(&inner, caller, full_name)?;
    if !inner.users.contains_key(login) {
        return Err(not_found());
    }
    let role = role_of(repo, login);
    let answer = CollaboratorPermission {
        permission: permission_name(role).to_string(),
        role_name: Some(role_name(role).to_string()),
    };
    let user = inner.account(login);
    ok_json(&with_extra(&answer, json!({"user": user})))
}

fn list_pulls(ctx: &Ctx, caller: &Caller, full_name: &str, query: &str) -> Answer {
    let inner = ctx.lock();
    let repo = visible_repo(&inner, caller, full_name)?;
    let params = query_map(query);
    let state = params.get("state").map(String::as_str).unwrap_or("open");
    let head = params.get("head").map(|head| match head.split_once(':') {
        Some((owner, branch)) => (owner.to_string(), branch.to_string()),
        None => (repo.owner.clone(), head.clone()),
    });
    let base = params.get("base");
    let pulls: Vec<&Pull> = inner
        .pulls
        .get(full_name)
        .into_iter()
        .flatten()
        .rev()
        .map(|record| &record.pull)
        .filter(|pull| state == "all" || pull.state == state)
        .filter(|pull| {
            head.as_ref()
                .is_none_or(|(owner, branch)| *owner == repo.owner && pull.head.git_ref == *branch)
        })
        .filter(|pull| base.is_none_or(|base| pull.base.git_ref == *base))
        .collect();
    ok_json(&pulls)
}

fn get_pull(ctx: &Ctx, caller: &Caller, full_name: &str, number: &str) -> Answer {
    let inner = ctx.lock();
    visible_repo(&inner, caller, full_name)?;
    let number = number.parse::<u64>().map_err(|_| not_found())?;
    let record = inner
        .pulls
        .get(full_name)
        .and_then(|records| records.iter().find(|r| r.pull.number == number))
        .ok_or_else(not_found)?;
    ok_json(&record.pull)
}

async fn create_pull(ctx: &Ctx, caller: &Caller, full_name: &str, body: &Bytes) -> Answer {
    let request: CreatePull = serde_json::from_slice(body).map_err(|e| {
        validation_failed(
            json!([{"resource": "PullRequest", "code": "invalid", "message": e.to_string()}]),
        )
    })?;
    let (repo_dir, owner, sender) = {
        let inner = ctx.lock();
        let repo = visible_repo(&inner, caller, full_name)?;
        match caller {
            Caller::User(_) => {}
            Caller::Installation { permissions, .. } => {
                if !has_permission(permissions, "pull_requests", "write") {
                    return Err(not_accessible());
                }
            }
            Caller::App | Caller::Anonymous => return Err(not_found()),
        }
        (
            repo.dir.clone(),
            repo.owner.clone(),
            inner.caller_account(caller),
        )
    };
    let head_branch = match request.head.split_once(':') {
        Some((head_owner, branch)) if head_owner == owner => branch.to_string(),
        Some(_) => {
            return Err(validation_failed(
                json!([{"resource": "PullRequest", "field": "head", "code": "invalid"}]),
            ))
        }
        None => request.head.clone(),
    };
    let head_sha = branch_sha_async(&repo_dir, &head_branch)
        .await
        .ok_or_else(|| {
            validation_failed(
                json!([{"resource": "PullRequest", "field": "head", "code": "invalid"}]),
            )
        })?;
    let base_sha = branch_sha_async(&repo_dir, &request.base)
        .await
        .ok_or_else(|| {
            validation_failed(
                json!([{"resource": "PullRequest", "field": "base", "code": "invalid"}]),
            )
        })?;
    if head_branch == request.base || head_sha == base_sha {
        return Err(validation_failed(json!([{
            "resource": "PullRequest",
            "code": "custom",
            "message": format!("No commits between {} and {head_branch}", request.base),
        }])));
    }
    let (pull, outgoing) = {
        let mut inner = ctx.lock();
        let existing = inner
            .pulls
            .get(full_name)
            .into_iter()
            .flatten()
            .any(|record| {
                record.pull.state == "open"
                    && record.pull.head.git_ref == head_branch
                    && record.pull.base.git_ref == request.base
            });
        if existing {
            return Err(validation_failed(json!([{
                "resource": "PullRequest",
                "code": "custom",
                "message": format!("A pull request already exists for {owner}:{head_branch}."),
            }])));
        }
        let number = inner.pulls.get(full_name).map_or(0, Vec::len) as u64 + 1;
        let id = inner.next_pull_id;
        inner.next_pull_id += 1;
        let repo_ref = inner.repo_ref(full_name);
        let pull = Pull {
            id,
            number,
            state: "open".to_string(),
            draft: request.draft,
            merged: false,
            merged_at: None,
            title: request.title.clone(),
            body: request.body.clone(),
            html_url: format!("{}/{full_name}/pull/{number}", ctx.web_url),
            updated_at: iso8601(now_seconds()),
            closed_at: None,
            user: sender.clone(),
            head: Branch {
                git_ref: head_branch,
                sha: head_sha,
                repo: repo_ref.clone(),
            },
            base: Branch {
                git_ref: request.base.clone(),
                sha: base_sha,
                repo: repo_ref,
            },
        };
        inner
            .pulls
            .entry(full_name.to_string())
            .or_default()
            .push(PullRecord {
                pull: pull.clone(),
                opened_with: caller.kind(),
            });
        let outgoing =
            inner.pull_request_outgoing("opened", full_name, &pull, &sender, Value::Null);
        (pull, outgoing)
    };
    deliver_later(ctx, outgoing.into_iter().collect());
    Ok(json_response(StatusCode::CREATED, &pull))
}

/// The optional body of `PUT /repos/{o}/{r}/pulls/{n}/merge`.
#[derive(Debug, Default, serde::Deserialize)]
struct MergeRequest {
    #[serde(default)]
    commit_title: Option<String>,
    #[serde(default)]
    commit_message: Option<String>,
    #[serde(default)]
    sha: Option<String>,
    #[serde(default)]
    merge_method: Option<String>,
}

async fn merge_endpoint(
    ctx: &Ctx,
    caller: &Caller,
    full_name: &str,
    number: &str,
    body: &Bytes,
) -> Answer {
    let number = number.parse::<u64>().map_err(|_| not_found())?;
    let merge: MergeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        MergeRequest::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|_| refusal(StatusCode::BAD_REQUEST, "Problems parsing JSON"))?
    };
    let sender = {
        let inner = ctx.lock();
        let repo = visible_repo(&inner, caller, full_name)?;
        match caller {
            Caller::User(login) => {
                if effective_role(repo, login) < Role::Write {
                    return Err(refusal(
                        StatusCode::FORBIDDEN,
                        "Must have push access to repository",
                    ));
                }
            }
            Caller::Installation { permissions, .. } => {
                if !has_permission(permissions, "contents", "write") {
                    return Err(not_accessible());
                }
            }
            Caller::App | Caller::Anonymous => return Err(not_found()),
        }
        inner.caller_account(caller)
    };
    let (sha, outgoing) = merge_pull(ctx, full_name, number, &sender, &merge).await?;
    deliver_later(ctx, outgoing);
    ok_json(&json!({"sha": sha, "merged": true, "message": "Pull Request successfully merged"}))
}

/// Merges pull `number` into its base branch in the bare repository and marks it merged;
/// returns the new base commit and the webhooks to send (the base's `push`, then `closed`).
async fn merge_pull(
    ctx: &Ctx,
    full_name: &str,
    number: u64,
    sender: &Account,
    merge: &MergeRequest,
) -> Result<(String, Vec<Outgoing>), Refusal> {
    let (repo_dir, pull) = {
        let inner = ctx.lock();
        let repo = inner.repos.get(full_name).ok_or_else(not_found)?;
        let pull = inner
            .pulls
            .get(full_name)
            .and_then(|records| records.iter().find(|r| r.pull.number == number))
            .map(|record| record.pull.clone())
            .ok_or_else(not_found)?;
        (repo.dir.clone(), pull)
    };
    let not_mergeable = || {
        refusal(
            StatusCode::METHOD_NOT_ALLOWED,
            "Pull Request is not mergeable",
        )
    };
    if pull.state != "open" {
        return Err(not_mergeable());
    }
    let head_sha = branch_sha_async(&repo_dir, &pull.head.git_ref)
        .await
        .unwrap_or_else(|| pull.head.sha.clone());
    if merge.sha.as_ref().is_some_and(|sha| *sha != head_sha) {
        return Err(refusal(
            StatusCode::CONFLICT,
            "Head branch was modified. Review and try the merge again.",
        ));
    }
    let base_before = branch_sha_async(&repo_dir, &pull.base.git_ref)
        .await
        .ok_or_else(not_mergeable)?;
    let tree = git_async(
        &repo_dir,
        &["merge-tree", "--write-tree", &base_before, &head_sha],
    )
    .await
    .map_err(|_| not_mergeable())?;
    let tree = tree.lines().next().unwrap_or("").trim().to_string();
    let owner = full_name.split('/').next().unwrap_or("");
    let title = merge.commit_title.clone().unwrap_or_else(|| {
        format!(
            "Merge pull request #{number} from {owner}/{}",
            pull.head.git_ref
        )
    });
    let message = format!(
        "{title}\n\n{}",
        merge
            .commit_message
            .clone()
            .unwrap_or_else(|| pull.title.clone())
    );
    let squash = matches!(
        merge.merge_method.as_deref(),
        Some("squash") | Some("rebase")
    );
    let mut commit_args = vec!["commit-tree", tree.as_str(), "-p", base_before.as_str()];
    if !squash {
        commit_args.extend(["-p", head_sha.as_str()]);
    }
    commit_args.extend(["-m", message.as_str()]);
    let commit = git_async(&repo_dir, &commit_args)
        .await
        .map_err(|_| not_mergeable())?
        .trim()
        .to_string();
    git_async(
        &repo_dir,
        &[
            "update-ref",
            &format!("refs/heads/{}", pull.base.git_ref),
            &commit,
            &base_before,
        ],
    )
    .await
    .map_err(|_| {
        refusal(
            StatusCode::CONFLICT,
            "Base branch was modified. Review and try the merge again.",
        )
    })?;

    let mut inner = ctx.lock();
    let now = iso8601(now_seconds());
    let mut merged = None;
    if let Some(record) = inner
        .pulls
        .get_mut(full_name)
        .and_then(|records| records.iter_mut().find(|r| r.pull.number == number))
    {
        record.pull.state = "closed".to_string();
        record.pull.merged = true;
        record.pull.merged_at = Some(now.clone());
        record.pull.closed_at = Some(now.clone());
        record.pull.updated_at = now;
        record.pull.head.sha = head_sha;
        merged = Some(record.pull.clone());
    }
    let mut outgoing: Vec<Outgoing> = inner
        .push_outgoing(full_name, &pull.base.git_ref, &base_before, &commit, sender)
        .into_iter()
        .collect();
    if let Some(pull) = merged {
        outgoing.extend(inner.pull_request_outgoing(
            "closed",
            full_name,
            &pull,
            sender,
            json!({"merge_commit_sha": commit}),
        ));
    }
    Ok((commit, outgoing))
}

// ---------------------------------------------------------------------------------------------
// REST: review comments, replies, conversation comments, reactions
// ---------------------------------------------------------------------------------------------

/// What `caller` may do on `full_name`'s pull requests: users need to see the repository (read
/// is enough to comment), installation tokens one of `permissions` at `level`, anonymous
/// callers may only read public repositories, and App JWTs nothing.
fn pull_access(
    inner: &Inner,
    caller: &Caller,
    full_name: &str,
    permissions: &[&str],
    level: &str,
) -> Result<(), Refusal> {
    visible_repo(inner, caller, full_name)?;
    match caller {
        Caller::User(_) => Ok(()),
        Caller::Installation {
            permissions: granted,
            ..
        } => {
            if permissions
                .iter()
                .any(|name| has_permission(granted, name, level))
            {
                Ok(())
            } else {
                Err(not_accessible())
            }
        }
        Caller::Anonymous if level == "read" => Ok(()),
        Caller::Anonymous => Err(refusal(StatusCode::UNAUTHORIZED, "Requires authentication")),
        Caller::App => Err(not_accessible()),
    }
}

fn parse_number(number: &str) -> Result<u64, Refusal> {
    number.parse::<u64>().map_err(|_| not_found())
}

/// One page of `items` by `per_page` (≤ 100, default 30) and `page` (from 1), with GitHub's
/// `Link` header (`next`, `last`, `first`, `prev`) pointing at `{web}{path}`.
fn paged(ctx: &Ctx, path: &str, query: &str, items: Vec<Value>) -> Answer {
    let params = query_map(query);
    let per_page = params
        .get("per_page")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(30)
        .clamp(1, 100);
    let page = params
        .get("page")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let last = items.len().div_ceil(per_page).max(1);
    let slice: Vec<Value> = items
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    let link = |n: usize, rel: &str| {
        format!(
            "<{}{path}?per_page={per_page}&page={n}>; rel=\"{rel}\"",
            ctx.web_url
        )
    };
    let mut links = Vec::new();
    if page > 1 {
        links.push(link(page - 1, "prev"));
    }
    if page < last {
        links.push(link(page + 1, "next"));
        links.push(link(last, "last"));
    }
    if page > 1 {
        links.push(link(1, "first"));
    }
    let mut response = json_response(StatusCode::OK, &slice);
    if !links.is_empty() {
        if let Ok(value) = header::HeaderValue::from_str(&links.join(", ")) {
            response.headers_mut().insert(header::LINK, value);
        }
    }
    Ok(response)
}

/// `GET /repos/{o}/{r}/pulls/{n}/comments`: every review comment of the PR, oldest first.
fn list_review_comments(
    ctx: &Ctx,
    caller: &Caller,
    full_name: &str,
    number: &str,
    path: &str,
    query: &str,
) -> Answer {
    let number = parse_number(number)?;
    let items = {
        let inner = ctx.lock();
        pull_access(&inner, caller, full_name, &["pull_requests"], "read")?;
        inner.pull(full_name, number).ok_or_else(not_found)?;
        inner
            .review_comments
            .iter()
            .filter(|record| record.repo == full_name && record.number == number)
            .map(|record| inner.review_comment_json(full_name, number, &record.comment))
            .collect()
    };
    paged(ctx, path, query, items)
}

/// `GET /repos/{o}/{r}/pulls/{n}/reviews/{review_id}/comments`: the comments of one review.
fn list_review_comments_of(
    ctx: &Ctx,
    caller: &Caller,
    full_name: &str,
    number: &str,
    review_id: &str,
    (path, query): (&str, &str),
) -> Answer {
    let number = parse_number(number)?;
    let review_id = parse_number(review_id)?;
    let items = {
        let inner = ctx.lock();
        pull_access(&inner, caller, full_name, &["pull_requests"], "read")?;
        inner
            .reviews
            .iter()
            .find(|record| {
                record.repo == full_name && record.number == number && record.review.id == review_id
            })
            .ok_or_else(not_found)?;
        inner
            .review_comments
            .iter()
            .filter(|record| {
                record.repo == full_name
                    && record.number == number
                    && record.comment.pull_request_review_id == Some(review_id)
            })
            .map(|record| inner.review_comment_json(full_name, number, &record.comment))
            .collect()
    };
    paged(ctx, path, query, items)
}

/// A reply by `user` to top-level comment `root_id` of pull `number`, stored with its own review,
/// and its deliveries (`pull_request_review_comment` `created`, then `pull_request_review`
/// `submitted`). 404 for an unknown comment, 422 when `root_id` is itself a reply.
fn add_reply(
    inner: &mut Inner,
    full_name: &str,
    number: u64,
    root_id: u64,
    user: &Account,
    body: &str,
    made_with: &str,
) -> Result<(ReviewComment, Vec<Outgoing>), Refusal> {
    let root = inner
        .review_comments
        .iter()
        .find(|record| {
            record.repo == full_name && record.number == number && record.comment.id == root_id
        })
        .map(|record| record.comment.clone())
        .ok_or_else(not_found)?;
    if root.in_reply_to_id.is_some() {
        return Err(validation_failed(json!([{
            "resource": "PullRequestReviewComment",
            "code": "invalid",
            "field": "in_reply_to",
            "message": "in_reply_to must be a top-level review comment: replies to replies are not supported",
        }])));
    }
    if body.trim().is_empty() {
        return Err(validation_failed(
            json!([{"resource": "PullRequestReviewComment", "code": "missing_field", "field": "body"}]),
        ));
    }
    let review = inner.add_review(full_name, number, user.clone(), "", &root.commit_id);
    let new = NewReviewComment {
        review_id: review.id,
        in_reply_to_id: Some(root.id),
        path: &root.path,
        line: root.line,
        start_line: root.start_line,
        side: root.side.clone(),
        diff_hunk: root.diff_hunk.clone(),
        commit_id: root.commit_id.clone(),
        body,
        user: user.clone(),
    };
    let comment = inner.add_review_comment(full_name, number, new, made_with);
    let mut outgoing: Vec<Outgoing> = inner
        .review_comment_outgoing(full_name, number, &comment)
        .into_iter()
        .collect();
    outgoing.extend(inner.review_outgoing(full_name, number, &review));
    Ok((comment, outgoing))
}

fn comment_body(body: &Bytes, resource: &str) -> Result<String, Refusal> {
    let request: CreateComment = serde_json::from_slice(body).map_err(|_| {
        validation_failed(json!([{"resource": resource, "code": "missing_field", "field": "body"}]))
    })?;
    if request.body.trim().is_empty() {
        return Err(validation_failed(
            json!([{"resource": resource, "code": "missing_field", "field": "body"}]),
        ));
    }
    Ok(request.body)
}

/// `POST /repos/{o}/{r}/pulls/{n}/comments/{comment_id}/replies {body}` → 201.
fn create_reply(
    ctx: &Ctx,
    caller: &Caller,
    full_name: &str,
    number: &str,
    comment_id: &str,
    body: &Bytes,
) -> Answer {
    let number = parse_number(number)?;
    let root_id = parse_number(comment_id)?;
    let (json, outgoing) = {
        let mut inner = ctx.lock();
        pull_access(&inner, caller, full_name, &["pull_requests"], "write")?;
        inner.pull(full_name, number).ok_or_else(not_found)?;
        let text = comment_body(body, "PullRequestReviewComment")?;
        let user = inner.caller_account(caller);
        let (comment, outgoing) = add_reply(
            &mut inner,
            full_name,
            number,
            root_id,
            &user,
            &text,
            &caller.kind(),
        )?;
        (
            inner.review_comment_json(full_name, number, &comment),
            outgoing,
        )
    };
    deliver_later(ctx, outgoing);
    Ok(json_response(StatusCode::CREATED, &json))
}

/// `GET /repos/{o}/{r}/issues/{n}/comments`: a PR's conversation comments, oldest first.
fn list_issue_comments(
    ctx: &Ctx,
    caller: &Caller,
    full_name: &str,
    number: &str,
    path: &str,
    query: &str,
) -> Answer {
    let number = parse_number(number)?;
    let items = {
        let inner = ctx.lock();
        pull_access(
            &inner,
            caller,
            full_name,
            &["issues", "pull_requests"],
            "read",
        )?;
        inner.pull(full_name, number).ok_or_else(not_found)?;
        inner
            .issue_comments
            .iter()
            .filter(|record| record.repo == full_name && record.number == number)
            .map(|record| to_json(&record.comment))
            .collect()
    };
    paged(ctx, path, query, items)
}

/// `POST /repos/{o}/{r}/issues/{n}/comments {body}` → 201 (the fake's issues are its PRs).
fn create_issue_comment(
    ctx: &Ctx,
    caller: &Caller,
    full_name: &str,
    number: &str,
    body: &Bytes,
) -> Answer {
    let number = parse_number(number)?;
    let (comment, outgoing) = {
        let mut inner = ctx.lock();
        pull_access(
            &inner,
            caller,
            full_name,
            &["issues", "pull_requests"],
            "write",
        )?;
        inner.pull(full_name, number).ok_or_else(not_found)?;
        let text = comment_body(body, "IssueComment")?;
        let user = inner.caller_account(caller);
        let comment = inner.add_issue_comment(full_name, number, user, &text, &caller.kind());
        let outgoing = inner.issue_comment_outgoing(full_name, number, &comment);
        (comment, outgoing)
    };
    deliver_later(ctx, outgoing.into_iter().collect());
    Ok(json_response(StatusCode::CREATED, &comment))
}

/// `POST /repos/{o}/{r}/pulls/comments/{id}/reactions` (`kind` `pulls`) and
/// `…/issues/comments/{id}/reactions` (`issues`) `{content}`: 201 when new, 200 when the same
/// user already reacted so, 422 for an unknown content.
fn create_reaction(
    ctx: &Ctx,
    caller: &Caller,
    full_name: &str,
    kind: &'static str,
    comment_id: &str,
    body: &Bytes,
) -> Answer {
    let comment_id = parse_number(comment_id)?;
    let mut inner = ctx.lock();
    let permissions: &[&str] = if kind == "pulls" {
        &["pull_requests"]
    } else {
        &["issues", "pull_requests"]
    };
    pull_access(&inner, caller, full_name, permissions, "write")?;
    let exists = if kind == "pulls" {
        inner
            .review_comments
            .iter()
            .any(|record| record.repo == full_name && record.comment.id == comment_id)
    } else {
        inner
            .issue_comments
            .iter()
            .any(|record| record.repo == full_name && record.comment.id == comment_id)
    };
    if !exists {
        return Err(not_found());
    }
    let request: CreateReaction = serde_json::from_slice(body).map_err(|_| {
        validation_failed(json!([{
            "resource": "Reaction",
            "code": "custom",
            "field": "content",
            "message": "content is not included in the list",
        }]))
    })?;
    let user = inner.caller_account(caller);
    let existing = inner.reactions.iter().find(|record| {
        record.kind == kind
            && record.comment_id == comment_id
            && record.reaction.content == request.content
            && record.reaction.user.login == user.login
    });
    if let Some(record) = existing {
        return Ok(json_response(StatusCode::OK, &record.reaction));
    }
    let id = inner.next_comment_id();
    let reaction = Reaction {
        id,
        user,
        content: request.content,
        created_at: Some(iso8601(now_seconds())),
    };
    inner.reactions.push(ReactionRecord {
        kind,
        comment_id,
        reaction: reaction.clone(),
        made_with: caller.kind(),
    });
    Ok(json_response(StatusCode::CREATED, &reaction))
}

// ---------------------------------------------------------------------------------------------
// Webhooks
// ---------------------------------------------------------------------------------------------

fn webhook_request(
    client: &reqwest::Client,
    target: &str,
    event: &str,
    guid: &str,
    app_id: u64,
) -> reqwest::RequestBuilder {
    client
        .post(target)
        .header("X-GitHub-Event", event)
        .header("X-GitHub-Delivery", guid)
        .header("X-GitHub-Hook-ID", HOOK_ID.to_string())
        .header("X-GitHub-Hook-Installation-Target-Type", "integration")
        .header("X-GitHub-Hook-Installation-Target-ID", app_id.to_string())
        .header(header::USER_AGENT, "GitHub-Hookshot/abc123")
        .header(header::CONTENT_TYPE, "application/json")
}

/// `sha1=<hex HMAC-SHA1>`, the legacy `X-Hub-Signature`.
fn sign_sha1(secret: &[u8], body: &[u8]) -> String {
    match Hmac::<sha1::Sha1>::new_from_slice(secret) {
        Ok(mut mac) => {
            mac.update(body);
            let digest = mac.finalize().into_bytes();
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            format!("sha1={hex}")
        }
        Err(_) => String::new(),
    }
}

/// Sends `outgoing` under a fresh guid and records it; returns (status, guid).
async fn send(ctx: &Ctx, outgoing: Outgoing) -> (u16, String) {
    let guid = new_guid();
    let record = DeliveryRecord {
        id: 0,
        guid: guid.clone(),
        event: outgoing.event,
        action: outgoing.action,
        payload: serde_json::to_vec(&outgoing.payload).unwrap_or_default(),
        status_code: 0,
        redelivery: false,
        delivered_at: String::new(),
        installation_id: outgoing.installation_id,
        repository_id: outgoing.repository_id,
    };
    (attempt(ctx, record).await, guid)
}

/// Sends an earlier delivery again with the same bytes and guid, recorded as a redelivery.
async fn resend(ctx: &Ctx, original: &DeliveryRecord) -> u16 {
    let record = DeliveryRecord {
        redelivery: true,
        ..original.clone()
    };
    attempt(ctx, record).await
}

/// Sends `record`'s payload (unless deliveries fail on purpose) and records the outcome.
async fn attempt(ctx: &Ctx, mut record: DeliveryRecord) -> u16 {
    let (target, secret, failing, app_id) = {
        let inner = ctx.lock();
        (
            inner.webhook_target.clone(),
            inner.webhook_secret.clone(),
            inner.fail_deliveries,
            inner.app.id,
        )
    };
    let status_code = match target {
        _ if failing => 502,
        None => 0,
        Some(target) => {
            let sent = webhook_request(&ctx.client, &target, &record.event, &record.guid, app_id)
                .header(
                    "X-Hub-Signature-256",
                    github::sign_webhook(secret.as_bytes(), &record.payload),
                )
                .header(
                    "X-Hub-Signature",
                    sign_sha1(secret.as_bytes(), &record.payload),
                )
                .body(record.payload.clone())
                .send()
                .await;
            match sent {
                Ok(response) => response.status().as_u16(),
                Err(_) => 0,
            }
        }
    };
    let mut inner = ctx.lock();
    record.id = 90_000_000_001 + inner.deliveries.len() as u64;
    record.status_code = status_code;
    record.delivered_at = iso8601(now_seconds());
    inner.deliveries.push(record);
    status_code
}

/// Sends `outgoing` in order in the background, as GitHub delivers after answering.
fn deliver_later(ctx: &Ctx, outgoing: Vec<Outgoing>) {
    if outgoing.is_empty() {
        return;
    }
    let background = ctx.clone();
    tokio::spawn(async move {
        for item in outgoing {
            send(&background, item).await;
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Git smart HTTP
// ---------------------------------------------------------------------------------------------

fn git_refusal(status: StatusCode, message: &str) -> Response {
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{message}\n"),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Basic realm=\"GitHub\""),
        );
    }
    response
}

/// The token of HTTP Basic auth: the password, or the username when the password is empty.
fn basic_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (username, password) = decoded.split_once(':').unwrap_or((&decoded, ""));
    let token = if password.is_empty() {
        username
    } else {
        password
    };
    (!token.is_empty()).then(|| token.to_string())
}

/// What a git request may do: its CGI user, the repository root and the pusher.
struct GitGrant {
    remote_user: String,
    git_root: PathBuf,
    repo_dir: PathBuf,
    pusher: Account,
}

fn git_access(
    inner: &Inner,
    full_name: &str,
    caller: &Caller,
    pushing: bool,
) -> Result<GitGrant, (StatusCode, String)> {
    let Some(repo) = inner.repos.get(full_name) else {
        return Err(match caller {
            Caller::Anonymous => (
                StatusCode::UNAUTHORIZED,
                "Authentication required.".to_string(),
            ),
            _ => (StatusCode::NOT_FOUND, "Repository not found.".to_string()),
        });
    };
    let denied = || {
        (
            StatusCode::FORBIDDEN,
            format!("Permission to {full_name}.git denied."),
        )
    };
    let remote_user = match caller {
        Caller::Anonymous => {
            if pushing || repo.private {
                return Err((
                    StatusCode::UNAUTHORIZED,
                    "Authentication required.".to_string(),
                ));
            }
            "anonymous".to_string()
        }
        Caller::User(login) => {
            let needed = if pushing { Role::Write } else { Role::Read };
            if effective_role(repo, login) < needed {
                return Err(denied());
            }
            login.clone()
        }
        Caller::Installation {
            repos, permissions, ..
        } => {
            let level = if pushing { "write" } else { "read" };
            if !repos.iter().any(|r| r == full_name)
                || !has_permission(permissions, "contents", level)
            {
                return Err(denied());
            }
            "x-access-token".to_string()
        }
        Caller::App => return Err(denied()),
    };
    Ok(GitGrant {
        remote_user,
        git_root: inner.git_root.clone(),
        repo_dir: repo.dir.clone(),
        pusher: inner.caller_account(caller),
    })
}

async fn git_http(
    ctx: &Ctx,
    method: &Method,
    path: &str,
    rest: &str,
    query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let now = now_seconds();
    let token = basic_token(headers);
    let caller = match &token {
        None => Some(Caller::Anonymous),
        Some(token) => ctx.lock().token_caller(token, now),
    };
    ctx.log(
        method,
        path,
        &caller.as_ref().map_or("none".to_string(), Caller::kind),
    );
    let Some(caller) = caller else {
        return git_refusal(
            StatusCode::UNAUTHORIZED,
            "Invalid username or token. Password authentication is not supported for Git operations.",
        );
    };
    let mut parts = rest.splitn(3, '/');
    let (Some(owner), Some(repo_part), Some(tail)) = (parts.next(), parts.next(), parts.next())
    else {
        return git_refusal(StatusCode::NOT_FOUND, "Not Found");
    };
    let name = repo_part.strip_suffix(".git").unwrap_or(repo_part);
    let full_name = format!("{owner}/{name}");
    let service = match (method.as_str(), tail) {
        ("GET", "info/refs") => query_map(query).remove("service").unwrap_or_default(),
        ("POST", "git-upload-pack") => "git-upload-pack".to_string(),
        ("POST", "git-receive-pack") => "git-receive-pack".to_string(),
        _ => String::new(),
    };
    if service != "git-upload-pack" && service != "git-receive-pack" {
        return git_refusal(StatusCode::NOT_FOUND, "Not Found");
    }
    let pushing = service == "git-receive-pack";
    let grant = match git_access(&ctx.lock(), &full_name, &caller, pushing) {
        Ok(grant) => grant,
        Err((status, message)) => return git_refusal(status, &message),
    };
    let receiving = pushing && *method == Method::POST;
    let before = if receiving {
        heads_async(&grant.repo_dir).await
    } else {
        BTreeMap::new()
    };
    let path_info = format!("/{owner}/{name}.git/{tail}");
    let response = run_http_backend(&grant, &path_info, query, method, headers, body).await;
    if receiving && response.status() == StatusCode::OK {
        let after = heads_async(&grant.repo_dir).await;
        let mut changes = Vec::new();
        for (branch, sha) in &after {
            if before.get(branch) != Some(sha) {
                let old = before.get(branch).map_or(ZERO_SHA, String::as_str);
                changes.push((branch.clone(), old.to_string(), sha.clone()));
            }
        }
        for (branch, sha) in &before {
            if !after.contains_key(branch) {
                changes.push((branch.clone(), sha.clone(), ZERO_SHA.to_string()));
            }
        }
        if !changes.is_empty() {
            let outgoing = ctx
                .lock()
                .branch_updates(&full_name, &changes, &grant.pusher);
            deliver_later(ctx, outgoing);
        }
    }
    response
}

/// Runs git-http-backend as a CGI program for one request and turns its output into a response.
async fn run_http_backend(
    grant: &GitGrant,
    path_info: &str,
    query: &str,
    method: &Method,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let header_text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let mut command = tokio::process::Command::new(HTTP_BACKEND);
    command
        .env("GIT_PROJECT_ROOT", &grant.git_root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("PATH_INFO", path_info)
        .env("QUERY_STRING", query)
        .env("REQUEST_METHOD", method.as_str())
        .env("REMOTE_USER", &grant.remote_user)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("CONTENT_TYPE", header_text("content-type").unwrap_or(""))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if *method == Method::POST {
        command.env("CONTENT_LENGTH", body.len().to_string());
    }
    if let Some(encoding) = header_text("content-encoding") {
        command.env("HTTP_CONTENT_ENCODING", encoding);
    }
    if let Some(protocol) = header_text("git-protocol") {
        command.env("GIT_PROTOCOL", protocol);
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return git_refusal(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    if let Some(mut stdin) = child.stdin.take() {
        tokio::spawn(async move {
            let _ = stdin.write_all(&body).await;
            let _ = stdin.shutdown().await;
        });
    }
    let output = match child.wait_with_output().await {
        Ok(output) => output,
        Err(e) => return git_refusal(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    cgi_response(&output.stdout)
}

/// Parses a CGI program's output (headers, a blank line, the body) into a response.
fn cgi_response(output: &[u8]) -> Response {
    let crlf = output
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| (at, 4));
    let lf = output
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|at| (at, 2));
    let split = match (crlf, lf) {
        (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
        (a, b) => a.or(b),
    };
    let Some((at, separator)) = split else {
        return git_refusal(StatusCode::BAD_GATEWAY, "git-http-backend gave no headers");
    };
    let head = String::from_utf8_lossy(&output[..at]);
    let body = output[at + separator..].to_vec();
    let mut builder = Response::builder();
    let mut status = StatusCode::OK;
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            status = value
                .split_whitespace()
                .next()
                .and_then(|code| code.parse::<u16>().ok())
                .and_then(|code| StatusCode::from_u16(code).ok())
                .unwrap_or(StatusCode::BAD_GATEWAY);
        } else {
            builder = builder.header(name.trim(), value);
        }
    }
    builder
        .status(status)
        .body(Body::from(body))
        .unwrap_or_else(|_| git_refusal(StatusCode::BAD_GATEWAY, "bad CGI headers"))
}

// ---------------------------------------------------------------------------------------------
// git helpers (bare repositories)
// ---------------------------------------------------------------------------------------------

/// Runs `git -C dir args…` with a fixed identity and no user config; stdout on success.
fn git(
    dir: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    envs: &[(&str, &str)],
) -> Result<String, String> {
    let mut command = Command::new("git");
    command
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "Fake GitHub")
        .env("GIT_AUTHOR_EMAIL", "noreply@github.invalid")
        .env("GIT_COMMITTER_NAME", "Fake GitHub")
        .env("GIT_COMMITTER_EMAIL", "noreply@github.invalid")
        .envs(envs.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|e| format!("git: {e}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        pipe.write_all(input)
            .map_err(|e| format!("git stdin: {e}"))?;
    }
    let output = child.wait_with_output().map_err(|e| format!("git: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "git {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// [`git`] off the async runtime's threads.
async fn git_async(dir: &Path, args: &[&str]) -> Result<String, String> {
    let dir = dir.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        git(&dir, &args, None, &[])
    })
    .await
    .map_err(|e| e.to_string())?
}

fn branch_sha(repo_dir: &Path, branch: &str) -> Option<String> {
    git(
        repo_dir,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("refs/heads/{branch}^{{commit}}"),
        ],
        None,
        &[],
    )
    .ok()
    .map(|sha| sha.trim().to_string())
    .filter(|sha| !sha.is_empty())
}

async fn branch_sha_async(repo_dir: &Path, branch: &str) -> Option<String> {
    let repo_dir = repo_dir.to_path_buf();
    let branch = branch.to_string();
    tokio::task::spawn_blocking(move || branch_sha(&repo_dir, &branch))
        .await
        .ok()
        .flatten()
}

/// Branch name -> commit for every branch of a bare repository.
async fn heads_async(repo_dir: &Path) -> BTreeMap<String, String> {
    let listing = git_async(
        repo_dir,
        &[
            "for-each-ref",
            "--format=%(refname:strip=2) %(objectname)",
            "refs/heads",
        ],
    )
    .await
    .unwrap_or_default();
    listing
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(branch, sha)| (branch.to_string(), sha.to_string()))
        .collect()
}

/// Writes a commit of `files` on top of `parent`'s tree (or an empty one) without a work tree.
fn write_commit(
    repo_dir: &Path,
    parent: Option<&str>,
    files: &[(&str, &[u8])],
    message: &str,
) -> Result<String, String> {
    let index_path = repo_dir.join(format!("fake-index-{}", random_hex(8)));
    let index = index_path.to_string_lossy().into_owned();
    let index_env = [("GIT_INDEX_FILE", index.as_str())];
    let result = (|| {
        match parent {
            Some(parent) => git(repo_dir, &["read-tree", parent], None, &index_env)?,
            None => git(repo_dir, &["read-tree", "--empty"], None, &index_env)?,
        };
        for (path, contents) in files {
            let blob = git(
                repo_dir,
                &["hash-object", "-w", "--stdin"],
                Some(contents),
                &[],
            )?;
            let cacheinfo = format!("100644,{},{path}", blob.trim());
            git(
                repo_dir,
                &["update-index", "--add", "--cacheinfo", &cacheinfo],
                None,
                &index_env,
            )?;
        }
        let tree = git(repo_dir, &["write-tree"], None, &index_env)?;
        let tree = tree.trim();
        let mut args = vec!["commit-tree", tree, "-m", message];
        if let Some(parent) = parent {
            args.extend(["-p", parent]);
        }
        git(repo_dir, &args, None, &[]).map(|commit| commit.trim().to_string())
    })();
    let _ = std::fs::remove_file(&index_path);
    result
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let path = std::env::temp_dir().join(format!(
            "nightshift-fake-github-{}-{}",
            std::process::id(),
            random_hex(8)
        ));
        std::fs::create_dir_all(&path).expect("create a temp dir");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn to_json(value: &impl Serialize) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

/// `value` as JSON with the fields of `extra` (an object) added: GitHub sends more than the core types read.
fn with_extra(value: &impl Serialize, extra: Value) -> Value {
    let mut json = to_json(value);
    if let (Value::Object(target), Value::Object(fields)) = (&mut json, extra) {
        for (name, field) in fields {
            target.entry(name).or_insert(field);
        }
    }
    json
}

fn random_alphanumeric(len: usize) -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

fn random_hex(len: usize) -> String {
    (0..len)
        .map(|_| char::from_digit(u32::from(rand::random::<u8>() % 16), 16).unwrap_or('0'))
        .collect()
}

/// A GUID shaped like a UUID v4, as GitHub's `X-GitHub-Delivery`.
fn new_guid() -> String {
    let bits = rand::random::<u128>();
    let bits = (bits & !(0xf_u128 << 76)) | (0x4_u128 << 76);
    let bits = (bits & !(0x3_u128 << 62)) | (0x2_u128 << 62);
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn html_unescape(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&gt;", ">")
        .replace("&lt;", "<")
        .replace("&amp;", "&")
}
