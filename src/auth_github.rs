//! Sign in with GitHub: the OAuth web flow with `state` and PKCE (the state and verifier sealed in a short-lived cookie), linking the GitHub identity and its tokens in the person's index, and handing the web app its first token.

use nightshift_core::github as gh;
use nightshift_core::ids::Identity;
use nightshift_core::signin::{self, OAuthFlow};
use worker::{Env, Headers, Request, Response};

use crate::auth::{self, is_loopback};
use crate::config;
use crate::error::{ApiError, ApiResult, EdgeError};
use crate::github;
use crate::http::{ask, user_index};
use crate::objects::{encode, GithubAccount, LinkGithub, UserIndexRoute};
use crate::platform::{now_ms, random_token};

/// The cookie holding the sealed flow (path-scoped to the callback).
const FLOW_COOKIE: &str = "ns_oauth";

fn query(req: &Request, name: &str) -> Option<String> {
    req.url().ok().and_then(|u| {
        u.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    })
}

fn origin(req: &Request) -> ApiResult<String> {
    let url = req.url().map_err(ApiError::internal)?;
    Ok(url.origin().ascii_serialization())
}

fn redirect_uri(req: &Request) -> ApiResult<String> {
    Ok(format!("{}/auth/github/callback", origin(req)?))
}

fn cookie(req: &Request, name: &str) -> Option<String> {
    let header = req.headers().get("cookie").ok().flatten()?;
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

fn flow_cookie(req: &Request, value: &str, max_age_s: u64) -> String {
    // Plain http only on a local run; everywhere else the cookie is Secure.
    let secure = if is_loopback(req) { "" } else { "; Secure" };
    format!(
        "{FLOW_COOKIE}={value}; Path=/auth/github; Max-Age={max_age_s}; HttpOnly; SameSite=Lax{secure}"
    )
}

fn redirect(location: &str, set_cookie: Option<&str>) -> ApiResult<Response> {
    let headers = Headers::new();
    headers.set("location", location)?;
    headers.set("cache-control", "no-store")?;
    headers.set("referrer-policy", "no-referrer")?;
    if let Some(c) = set_cookie {
        headers.set("set-cookie", c)?;
    }
    Ok(Response::empty()?.with_status(302).with_headers(headers))
}

/// `GET /auth/github/start?return=/…`: seals a fresh `state` and PKCE verifier into a
/// ten-minute cookie and sends the browser to GitHub's authorize page.
pub fn start(req: &Request, env: &Env) -> ApiResult<Response> {
    let cfg = config::github(env).ok_or(EdgeError::GithubNotConfigured)?;
    let flow = OAuthFlow::begin(
        random_token(24),
        random_token(32),
        query(req, "return").as_deref(),
        now_ms(),
    );
    let sealed = flow
        .seal(&config::auth_secret(env))
        .map_err(|_| nightshift_core::token::TokenError::NoSecret)?;
    let location = gh::authorize_url(
        &cfg.web_url,
        &cfg.client_id,
        &redirect_uri(req)?,
        &flow.state,
        &gh::pkce_challenge(&flow.verifier),
    );
    redirect(
        &location,
        Some(&flow_cookie(req, &sealed, signin::OAUTH_FLOW_MS / 1000)),
    )
}

/// `GET /auth/github/callback?code&state`: checks the state against this browser's cookie,
/// exchanges the code with the verifier, links the GitHub identity, signs the person in and
/// hands the web app its token in the URL fragment (never sent to a server).
pub async fn callback(req: &Request, env: &Env) -> ApiResult<Response> {
    let cfg = config::github(env).ok_or(EdgeError::GithubNotConfigured)?;
    if let Some(error) = query(req, "error") {
        return Err(EdgeError::OAuthRefused(error.chars().take(100).collect()).into());
    }
    let state = query(req, "state").unwrap_or_default();
    let flow = OAuthFlow::finish(
        cookie(req, FLOW_COOKIE).as_deref(),
        &state,
        &config::auth_secret(env),
        now_ms(),
    )
    .map_err(EdgeError::OAuthFlow)?;
    let code = query(req, "code")
        .filter(|c| !c.is_empty() && c.len() <= 256)
        .ok_or(EdgeError::InvalidQuery("code: the code GitHub sent back"))?;
    if config::token_encryption_key(env).is_none() {
        return Err(EdgeError::TokenKeyNotConfigured.into());
    }
    let tokens = github::exchange_code(&cfg, &code, &redirect_uri(req)?, &flow.verifier)
        .await
        .map_err(|e| e.edge())?;
    let user = github::user(&cfg, &tokens.access_token)
        .await
        .map_err(|e| e.edge())?;
    // Without the App's email permission the list is refused: the profile's email, or
    // GitHub's noreply address, serves commits instead.
    let emails = github::emails(&cfg, &tokens.access_token)
        .await
        .unwrap_or_default();
    let name = signin::user_for_github_login(&user.login).ok_or(EdgeError::OAuthRefused(
        "GitHub sent an unusable login".into(),
    ))?;
    let email = email_of(&user, &emails)
        .unwrap_or_else(|| format!("{}+{}@users.noreply.github.com", user.id, user.login));
    let account = GithubAccount {
        id: user.id,
        login: user.login.clone(),
        name: user.name.clone(),
        email: Some(email.clone()),
        linked_at: now_ms(),
    };
    let stub = user_index(env, &name)?;
    let body = encode(&LinkGithub { account, tokens })?;
    ask::<GithubAccount>(&stub, UserIndexRoute::GithubLink, Some(body)).await?;
    let who = Identity {
        user: name,
        name: user
            .name
            .filter(|n| !n.trim().is_empty())
            .unwrap_or(user.login)
            .chars()
            .take(100)
            .collect(),
        email: Some(email),
    };
    // Each verified address GitHub gave names this person (a Slack account with the same
    // verified address is linked to them).
    let record = crate::objects::PersonRecord {
        emails: emails
            .iter()
            .filter(|e| e.verified)
            .map(|e| e.email.clone())
            .collect(),
        person: who.clone(),
    };
    if !record.emails.is_empty() {
        ask::<crate::objects::OkAnswer>(
            &crate::http::installation_index(env)?,
            crate::objects::InstallationRoute::PersonRecord,
            Some(encode(&record)?),
        )
        .await?;
    }
    let signed = auth::sign_in(env, &who, "github").await?;
    let location = format!(
        "/#/signed-in?{}",
        gh::form_encode(&[
            ("token", signed.token.as_str()),
            ("expires_at", &signed.expires_at.to_string()),
            ("return", &flow.return_to),
        ])
    );
    redirect(&location, Some(&flow_cookie(req, "", 0)))
}

/// The person's email for commits: the primary verified one GitHub lists, else the profile's.
fn email_of(user: &gh::User, emails: &[gh::Email]) -> Option<String> {
    gh::primary_email(emails)
        .map(str::to_string)
        .or_else(|| user.email.clone())
}

/// `GET /github/setup`: where GitHub sends the browser after the App is installed or its
/// repositories changed (the App's Setup URL, with `installation_id` and `setup_action`). It
/// lands on the web app, which says what to do next; nothing is stored (the `installation`
/// webhook keeps the index, and a query string anyone can type is not trusted).
pub fn setup(req: &Request) -> ApiResult<Response> {
    let installation = query(req, "installation_id")
        .filter(|id| !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit()));
    let action = query(req, "setup_action")
        .filter(|a| matches!(a.as_str(), "install" | "update" | "request"))
        .unwrap_or_else(|| "install".to_string());
    let location = match installation {
        Some(id) => format!("/#/installed?installation={id}&action={action}"),
        None => format!("/#/installed?action={action}"),
    };
    redirect(&location, None)
}
