//! Client of GitHub: the OAuth token exchange, the REST calls the control plane makes (as a person with their user token, or as the App with its JWT), speaking the protocol types of `nightshift_core::github`.

use nightshift_core::github::{
    self as gh, AccessToken, AccessTokenRequest, CreatePull, Delivery, Email, Installation, Pull,
    Repository, TokenAnswer, TokenExchange, User, UserTokens,
};
use nightshift_core::pr_review::{CreateComment, CreateReaction, ReactionContent, ReviewComment};
use serde::de::DeserializeOwned;
use worker::{Fetch, Headers, Method, Request, RequestInit};

use crate::config::Github;
use crate::error::EdgeError;
use crate::webcrypto;

/// How a GitHub call failed (mapped to the API's answers by [`GithubError::edge`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GithubError {
    /// GitHub did not answer.
    Unreachable(String),
    /// 401: the token is unknown, expired or revoked.
    Unauthorized,
    /// 403 or 404: the caller may not see or do this (GitHub hides private repositories as 404).
    NoAccess(u16),
    /// 422, with GitHub's message (`A pull request already exists…`).
    Unprocessable(String),
    /// Any other status, with GitHub's message.
    Status(u16, String),
    /// An answer that is not the documented shape.
    BadAnswer(String),
    /// The OAuth endpoint refused (it answers 200 with `error`).
    Refused(String),
    /// The App's private key could not be used.
    Key(String),
}

impl GithubError {
    /// The error people see.
    pub fn edge(&self) -> EdgeError {
        match self {
            GithubError::Unreachable(e) => EdgeError::GithubUnreachable(e.clone()),
            GithubError::Unauthorized => EdgeError::GithubTokenInvalid,
            GithubError::NoAccess(_) => EdgeError::GithubNoAccess,
            GithubError::Unprocessable(m) | GithubError::Status(_, m) => {
                EdgeError::GithubRefused(m.clone())
            }
            GithubError::BadAnswer(m) => EdgeError::GithubRefused(m.clone()),
            GithubError::Refused(e) => EdgeError::OAuthRefused(e.clone()),
            GithubError::Key(e) => EdgeError::GithubAppKey(e.clone()),
        }
    }
}

/// Who a REST call is made as.
pub enum As<'a> {
    /// A person's user token (`ghu_…`), or an installation token (`ghs_…`).
    Token(&'a str),
    /// The App itself (a JWT, for `/app/…` and installation lookups).
    App(&'a str),
}

async fn send(
    method: Method,
    url: &str,
    bearer: Option<&str>,
    accept: &str,
    body: Option<(Vec<u8>, &str)>,
) -> Result<(u16, Vec<u8>), GithubError> {
    let headers = Headers::new();
    let set = |k: &str, v: &str| {
        headers
            .set(k, v)
            .map_err(|e| GithubError::Unreachable(e.to_string()))
    };
    set("accept", accept)?;
    set("user-agent", gh::USER_AGENT)?;
    set("x-github-api-version", gh::API_VERSION)?;
    if let Some(token) = bearer {
        set("authorization", &format!("Bearer {token}"))?;
    }
    let mut init = RequestInit::new();
    init.with_method(method);
    if let Some((bytes, content_type)) = &body {
        set("content-type", content_type)?;
        init.with_body(Some(js_sys::Uint8Array::from(bytes.as_slice()).into()));
    }
    init.with_headers(headers);
    let req =
        Request::new_with_init(url, &init).map_err(|e| GithubError::Unreachable(e.to_string()))?;
    let mut resp = Fetch::Request(req)
        .send()
        .await
        .map_err(|e| GithubError::Unreachable(e.to_string()))?;
    let status = resp.status_code();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| GithubError::Unreachable(e.to_string()))?;
    Ok((status, bytes))
}

fn message_of(bytes: &[u8]) -> String {
    serde_json::from_slice::<gh::ApiErrorBody>(bytes)
        .map(|b| b.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into_owned())
}

fn decode<T: DeserializeOwned>(status: u16, bytes: &[u8]) -> Result<T, GithubError> {
    match status {
        200..=299 => serde_json::from_slice(bytes).map_err(|e| {
            GithubError::BadAnswer(format!("GitHub answered an unexpected body: {e}"))
        }),
        401 => Err(GithubError::Unauthorized),
        403 | 404 => Err(GithubError::NoAccess(status)),
        422 => Err(GithubError::Unprocessable(message_of(bytes))),
        _ => Err(GithubError::Status(status, message_of(bytes))),
    }
}

async fn rest<T: DeserializeOwned>(
    cfg: &Github,
    method: Method,
    path: &str,
    who: As<'_>,
    body: Option<Vec<u8>>,
) -> Result<T, GithubError> {
    let bearer = match who {
        As::Token(t) | As::App(t) => t,
    };
    let url = format!("{}{path}", cfg.api_url);
    let (status, bytes) = send(
        method,
        &url,
        Some(bearer),
        gh::ACCEPT,
        body.map(|b| (b, "application/json")),
    )
    .await?;
    decode(status, &bytes)
}

fn json_bytes<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, GithubError> {
    serde_json::to_vec(value).map_err(|e| GithubError::BadAnswer(e.to_string()))
}

/// The OAuth token endpoint: a code (with its PKCE verifier) or a refresh token for a pair.
async fn token_endpoint(cfg: &Github, exchange: &TokenExchange) -> Result<UserTokens, GithubError> {
    let url = format!("{}/login/oauth/access_token", cfg.web_url);
    let (status, bytes) = send(
        Method::Post,
        &url,
        None,
        "application/json",
        Some((json_bytes(exchange)?, "application/json")),
    )
    .await?;
    match decode::<TokenAnswer>(status, &bytes)? {
        TokenAnswer::Granted(tokens) => Ok(tokens),
        TokenAnswer::Refused { error, .. } => Err(GithubError::Refused(error)),
    }
}

/// Exchanges the callback's code (with the verifier only this browser's flow knows).
pub async fn exchange_code(
    cfg: &Github,
    code: &str,
    redirect_uri: &str,
    verifier: &str,
) -> Result<UserTokens, GithubError> {
    token_endpoint(
        cfg,
        &TokenExchange {
            client_id: cfg.client_id.clone(),
            client_secret: cfg.client_secret.clone(),
            code: Some(code.to_string()),
            redirect_uri: Some(redirect_uri.to_string()),
            code_verifier: Some(verifier.to_string()),
            grant_type: None,
            refresh_token: None,
        },
    )
    .await
}

/// Trades a refresh token for a new pair (the old refresh token dies at GitHub).
pub async fn refresh(cfg: &Github, refresh_token: &str) -> Result<UserTokens, GithubError> {
    token_endpoint(
        cfg,
        &TokenExchange {
            client_id: cfg.client_id.clone(),
            client_secret: cfg.client_secret.clone(),
            code: None,
            redirect_uri: None,
            code_verifier: None,
            grant_type: Some("refresh_token".into()),
            refresh_token: Some(refresh_token.to_string()),
        },
    )
    .await
}

/// `GET /user`.
pub async fn user(cfg: &Github, token: &str) -> Result<User, GithubError> {
    rest(cfg, Method::Get, "/user", As::Token(token), None).await
}

/// `GET /user/emails` (needs the App's email permission; none when it is not granted).
pub async fn emails(cfg: &Github, token: &str) -> Result<Vec<Email>, GithubError> {
    rest(cfg, Method::Get, "/user/emails", As::Token(token), None).await
}

/// `GET /repos/{owner}/{repo}`: with a person's token it carries their `permissions`.
pub async fn repository(
    cfg: &Github,
    token: &str,
    full_name: &str,
) -> Result<Repository, GithubError> {
    rest(
        cfg,
        Method::Get,
        &format!("/repos/{full_name}"),
        As::Token(token),
        None,
    )
    .await
}

/// `POST /repos/{owner}/{repo}/pulls` as the person.
pub async fn create_pull(
    cfg: &Github,
    token: &str,
    full_name: &str,
    pull: &CreatePull,
) -> Result<Pull, GithubError> {
    rest(
        cfg,
        Method::Post,
        &format!("/repos/{full_name}/pulls"),
        As::Token(token),
        Some(json_bytes(pull)?),
    )
    .await
}

/// The open pull request whose head is `owner:branch`, if any.
pub async fn open_pull_for(
    cfg: &Github,
    token: &str,
    full_name: &str,
    branch: &str,
) -> Result<Option<Pull>, GithubError> {
    let owner = full_name.split('/').next().unwrap_or_default();
    let query = gh::form_encode(&[("head", &format!("{owner}:{branch}")), ("state", "open")]);
    let pulls: Vec<Pull> = rest(
        cfg,
        Method::Get,
        &format!("/repos/{full_name}/pulls?{query}"),
        As::Token(token),
        None,
    )
    .await?;
    Ok(pulls.into_iter().next())
}

/// The App's JWT (RS256, WebCrypto), good for about ten minutes.
pub async fn app_jwt(cfg: &Github, now_s: u64) -> Result<String, GithubError> {
    let (Some(app_id), Some(pem)) = (&cfg.app_id, &cfg.private_key) else {
        return Err(GithubError::Key(
            "set GITHUB_APP_ID and GITHUB_APP_PRIVATE_KEY".into(),
        ));
    };
    let der = gh::private_key_pkcs8(pem).map_err(|e| GithubError::Key(e.to_string()))?;
    let claims = gh::jwt_claims(app_id, now_s);
    let input = gh::jwt_signing_input(&claims);
    let signature = webcrypto::rs256_sign(&der, input.as_bytes())
        .await
        .map_err(|e| GithubError::Key(e.0))?;
    Ok(gh::jwt_finish(&input, &signature))
}

/// `GET /repos/{owner}/{repo}/installation` as the App: 404 when it is not installed there.
pub async fn repository_installation(
    cfg: &Github,
    jwt: &str,
    full_name: &str,
) -> Result<Installation, GithubError> {
    rest(
        cfg,
        Method::Get,
        &format!("/repos/{full_name}/installation"),
        As::App(jwt),
        None,
    )
    .await
}

/// `POST /app/installations/{id}/access_tokens`: a token scoped as asked.
pub async fn installation_token(
    cfg: &Github,
    jwt: &str,
    installation: u64,
    scope: &AccessTokenRequest,
) -> Result<AccessToken, GithubError> {
    rest(
        cfg,
        Method::Post,
        &format!("/app/installations/{installation}/access_tokens"),
        As::App(jwt),
        Some(json_bytes(scope)?),
    )
    .await
}

/// `GET /app/hook/deliveries`: the App's recent webhook deliveries, newest first.
pub async fn deliveries(cfg: &Github, jwt: &str) -> Result<Vec<Delivery>, GithubError> {
    rest(
        cfg,
        Method::Get,
        "/app/hook/deliveries?per_page=100",
        As::App(jwt),
        None,
    )
    .await
}

/// `POST /app/hook/deliveries/{id}/attempts`: asks GitHub to send a delivery again.
pub async fn redeliver(cfg: &Github, jwt: &str, id: u64) -> Result<(), GithubError> {
    let url = format!("{}/app/hook/deliveries/{id}/attempts", cfg.api_url);
    let (status, bytes) = send(Method::Post, &url, Some(jwt), gh::ACCEPT, None).await?;
    match status {
        200..=299 => Ok(()),
        _ => decode::<serde_json::Value>(status, &bytes).map(|_| ()),
    }
}

// ---- review comments (as the App, with a discussion token) --------------------------------

/// `GET /repos/{o}/{r}/collaborators/{login}/permission`: the person's role there.
pub async fn collaborator_role(
    cfg: &Github,
    token: &str,
    full_name: &str,
    login: &str,
) -> Result<gh::Role, GithubError> {
    let answer: gh::CollaboratorPermission = rest(
        cfg,
        Method::Get,
        &format!(
            "/repos/{full_name}/collaborators/{}/permission",
            gh::percent_encode(login)
        ),
        As::Token(token),
        None,
    )
    .await?;
    let role = answer
        .role_name
        .as_deref()
        .map(gh::Role::from_permission_name)
        .filter(|role| *role != gh::Role::None)
        .unwrap_or_else(|| gh::Role::from_permission_name(&answer.permission));
    Ok(role)
}

/// `GET /repos/{o}/{r}/pulls/{n}`.
pub async fn pull(
    cfg: &Github,
    token: &str,
    full_name: &str,
    number: u64,
) -> Result<Pull, GithubError> {
    rest(
        cfg,
        Method::Get,
        &format!("/repos/{full_name}/pulls/{number}"),
        As::Token(token),
        None,
    )
    .await
}

/// The most pages of a list read (100 each).
const MAX_PAGES: u32 = 10;

/// `GET /repos/{o}/{r}/pulls/{n}/reviews/{review}/comments`, every page (at most ten).
pub async fn review_comments(
    cfg: &Github,
    token: &str,
    full_name: &str,
    number: u64,
    review: u64,
) -> Result<Vec<ReviewComment>, GithubError> {
    let mut all = Vec::new();
    for page in 1..=MAX_PAGES {
        let batch: Vec<ReviewComment> = rest(
            cfg,
            Method::Get,
            &format!(
                "/repos/{full_name}/pulls/{number}/reviews/{review}/comments?per_page=100&page={page}"
            ),
            As::Token(token),
            None,
        )
        .await?;
        let last = batch.len() < 100;
        all.extend(batch);
        if last {
            break;
        }
    }
    Ok(all)
}

/// `POST /repos/{o}/{r}/pulls/{n}/comments/{root}/replies`: an answer in a review thread.
pub async fn reply_in_thread(
    cfg: &Github,
    token: &str,
    full_name: &str,
    number: u64,
    root: u64,
    body: &str,
) -> Result<(), GithubError> {
    let _: serde::de::IgnoredAny = rest(
        cfg,
        Method::Post,
        &format!("/repos/{full_name}/pulls/{number}/comments/{root}/replies"),
        As::Token(token),
        Some(json_bytes(&CreateComment {
            body: body.to_string(),
        })?),
    )
    .await?;
    Ok(())
}

/// `POST /repos/{o}/{r}/issues/{n}/comments`: an answer in the pull request's conversation.
pub async fn comment_on_pull(
    cfg: &Github,
    token: &str,
    full_name: &str,
    number: u64,
    body: &str,
) -> Result<(), GithubError> {
    let _: serde::de::IgnoredAny = rest(
        cfg,
        Method::Post,
        &format!("/repos/{full_name}/issues/{number}/comments"),
        As::Token(token),
        Some(json_bytes(&CreateComment {
            body: body.to_string(),
        })?),
    )
    .await?;
    Ok(())
}

/// Reacts to a comment: a review comment (`pulls`) or a conversation comment (`issues`).
pub async fn react(
    cfg: &Github,
    token: &str,
    full_name: &str,
    on_review_comment: bool,
    comment: u64,
    content: ReactionContent,
) -> Result<(), GithubError> {
    let kind = if on_review_comment { "pulls" } else { "issues" };
    let _: serde::de::IgnoredAny = rest(
        cfg,
        Method::Post,
        &format!("/repos/{full_name}/{kind}/comments/{comment}/reactions"),
        As::Token(token),
        Some(json_bytes(&CreateReaction { content })?),
    )
    .await?;
    Ok(())
}
