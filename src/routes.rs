//! HTTP routing of the Worker: authenticate, check the shape of the request, forward to the right Durable Object.

use nightshift_core::quota::QuotaKind;
use nightshift_core::wire::{self, DevSignIn};
use worker::{Env, Headers, Method, Request, Response};

use crate::auth::{self, encode_identity, IDENTITY_HEADER};
use crate::error::{json_of, json_response, ApiError, ApiResult, EdgeError};
use crate::http::{
    ask, call, index_add, no_route, read_body, read_bytes, require_upgrade, session_stub,
    user_index,
};
use crate::objects::{OkAnswer, SessionRepository, SessionRoute, UserIndexRoute};
use crate::platform::new_id;
use crate::{access, config};

/// The answer of `GET /auth/config`: which sign-ins this deployment offers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SignInOptions {
    pub github: bool,
    pub dev: bool,
    /// Where to install the GitHub App on an organisation's repositories.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub install_url: Option<String>,
}

/// The OpenAPI document, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

pub async fn handle(req: Request, env: Env) -> worker::Result<Response> {
    match route(req, &env).await {
        Ok(r) => Ok(r),
        Err(e) => e.into_response(),
    }
}

async fn route(mut req: Request, env: &Env) -> ApiResult<Response> {
    let path = req.path();
    let method = req.method();
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    match (method.clone(), segs.as_slice()) {
        (Method::Get, ["health"]) => json_of(200, &OkAnswer::yes()),
        (Method::Get, ["openapi.json"]) => {
            json_response(200, OPENAPI.to_string()).map_err(ApiError::from)
        }
        (Method::Post, ["auth", "dev"]) => {
            if !config::dev_auth(env) {
                return Err(EdgeError::DevSignInDisabled.into());
            }
            let body: DevSignIn = read_body(&mut req).await?;
            json_of(200, &auth::dev_sign_in(&req, body, env).await?)
        }
        (Method::Get, ["auth", "me"]) => {
            let who = auth::authenticate(&req, env).await?;
            json_of(200, &who)
        }
        (Method::Get, ["auth", "config"]) => json_of(
            200,
            &SignInOptions {
                github: config::github(env).is_some(),
                dev: config::dev_auth(env) && auth::is_loopback(&req),
                install_url: config::github(env)
                    .map(|cfg| format!("{}/apps/{}/installations/new", cfg.web_url, cfg.slug)),
            },
        ),
        (Method::Get, ["auth", "github", "start"]) => crate::auth_github::start(&req, env),
        (Method::Get, ["auth", "github", "callback"]) => {
            crate::auth_github::callback(&req, env).await
        }
        (Method::Post, ["auth", "logout"]) => json_of(200, &auth::logout(&req, env).await?),
        (Method::Post, ["auth", "renew"]) => json_of(200, &auth::renew(&req, env).await?),
        (Method::Post, ["auth", "ticket"]) => json_of(200, &auth::ticket(&mut req, env).await?),
        (Method::Post, ["webhook", "github"]) => crate::webhooks::github(&mut req, env).await,
        (Method::Post, ["webhook", "slack", "events"]) => crate::slack::events(&mut req, env).await,
        (Method::Post, ["webhook", "slack", "interactions"]) => {
            crate::slack::interactions(&mut req, env).await
        }
        (Method::Get, ["slack", "settings"]) => crate::slack::settings_get(&req, env).await,
        (Method::Put, ["slack", "settings"]) => crate::slack::settings_put(&mut req, env).await,
        (Method::Post, ["slack", "link"]) => crate::slack::link(&mut req, env).await,
        (Method::Get, ["github", "setup"]) => crate::auth_github::setup(&req),
        (Method::Get, ["pr-session"]) => crate::pr_reviews::get(&req, env).await,
        (Method::Post, ["pr-session"]) => crate::pr_reviews::post(&mut req, env).await,
        (Method::Post, ["sessions"]) => create_session(&mut req, env).await,
        (Method::Get, ["sessions"]) => {
            let who = auth::authenticate(&req, env).await?;
            let stub = user_index(env, &who.user)?;
            let list = UserIndexRoute::List;
            call(&stub, list.method(), list.path(), None, None).await
        }
        (Method::Get, ["sessions", id]) => forward(&mut req, env, id, "snapshot").await,
        (Method::Post, ["sessions", id, "end"]) => forward(&mut req, env, id, "end").await,
        (Method::Put, ["sessions", id, "egress"]) => forward(&mut req, env, id, "egress").await,
        (Method::Get, ["sandbox-link", id]) => sandbox_link(&mut req, env, id).await,
        (_, ["sandbox", ..]) => crate::sandbox_api::handle(&mut req, env, &segs).await,
        (_, ["repositories", ..]) => crate::repositories::handle(&mut req, env, &segs).await,
        (_, ["background", ..]) => crate::background::handle(&mut req, env, &segs).await,
        (Method::Post, ["sandbox-link", id, "background"]) => {
            sandbox_background(&mut req, env, id).await
        }
        (_, ["multiplayer", id, rest @ ..]) => {
            let target = match (method, rest) {
                (Method::Post, ["join"]) => "join".to_string(),
                (Method::Post, ["leave"]) => "leave".to_string(),
                (Method::Delete, ["members", user]) => format!("members/{user}"),
                (Method::Post, ["invite"]) => "invite".to_string(),
                (Method::Put, ["cursor"]) => "cursor".to_string(),
                (Method::Post, ["prompt"]) => "prompt".to_string(),
                (Method::Delete | Method::Patch, ["prompt", pid]) => format!("prompt/{pid}"),
                (Method::Get, ["prompts"]) => "prompts".to_string(),
                (Method::Post, ["stop"]) => "stop".to_string(),
                (Method::Post, ["lock"]) => "lock".to_string(),
                (Method::Post, ["unlock"]) => "unlock".to_string(),
                (Method::Get, ["locks"]) => "locks".to_string(),
                (Method::Get, ["presence"]) => "presence".to_string(),
                (Method::Get, ["events"]) => "events".to_string(),
                (Method::Get, ["ws"]) => "ws".to_string(),
                _ => return Err(no_route(&req)),
            };
            forward(&mut req, env, id, &target).await
        }
        _ => Err(no_route(&req)),
    }
}

/// Authenticates, then forwards the request to the session's object at `/target`.
async fn forward(req: &mut Request, env: &Env, id: &str, target: &str) -> ApiResult<Response> {
    let is_ws = target == "ws";
    let who = if is_ws {
        require_upgrade(req)?;
        auth::authenticate_socket(req, env, id).await?
    } else {
        auth::authenticate(req, env).await?
    };
    let stub = session_stub(env, id)?;
    // With a GitHub App, working in a session takes read access to its repository on GitHub:
    // asked afresh on a join, from the minute's cache on a connect or a prompt (a person who
    // lost access is refused within a minute).
    if config::github(env).is_some() && matches!(target, "join" | "ws" | "prompt") {
        let found: SessionRepository = ask(&stub, SessionRoute::Repository, None).await?;
        if let Some(repository) = found.repository {
            access::require_session_repository(env, &who, &repository, target == "join").await?;
        }
    }
    let headers = Headers::new();
    headers.set(IDENTITY_HEADER, &encode_identity(&who))?;
    if is_ws {
        require_upgrade(req)?;
        headers.set("upgrade", "websocket")?;
    }
    // A prompt's idempotency key travels to the object, which hands it to the core.
    if let Some(key) = req
        .headers()
        .get(wire::IDEMPOTENCY_KEY_HEADER)
        .ok()
        .flatten()
    {
        headers.set(wire::IDEMPOTENCY_KEY_HEADER, &key)?;
    }
    let method = req.method();
    let body = match method {
        Method::Post | Method::Put | Method::Patch => Some(read_bytes(req).await?),
        _ => None,
    };
    let query = req
        .url()
        .ok()
        .and_then(|u| u.query().map(|q| format!("?{q}")))
        .unwrap_or_default();
    let mut resp = call(
        &stub,
        method,
        &format!("/{target}{query}"),
        Some(headers),
        body,
    )
    .await?;
    let status = resp.status_code();
    if (200..300).contains(&status) && (target == "join" || target == "leave") {
        let text = resp.text().await?;
        if target == "join" {
            if let Ok(snap) = serde_json::from_str::<serde_json::Value>(&text) {
                index_add(env, &who.user, &snap).await?;
            }
        } else {
            crate::sessions::remove_from_index(env, &who.user, id).await?;
        }
        return json_response(status, text).map_err(ApiError::from);
    }
    // A removed member's list no longer shows the session.
    if let Some(user) = target.strip_prefix("members/") {
        if (200..300).contains(&status) {
            crate::sessions::remove_from_index(env, user, id).await?;
        }
    }
    Ok(resp)
}

async fn create_session(req: &mut Request, env: &Env) -> ApiResult<Response> {
    let who = auth::authenticate(req, env).await?;
    let bytes = read_bytes(req).await?;
    // Validate here so a bad body never creates an object (the object checks again).
    let body: wire::CreateSession = wire::parse_body(&bytes)?;
    let title = body.check()?;
    let github = match &body.repository {
        Some(repository) => {
            access::require_session_repository(env, &who, repository, false).await?
        }
        None => None,
    };
    access::take_quota(env, &who, QuotaKind::Sessions, github.as_deref()).await?;
    let id = new_id("ses");
    let (status, text) =
        crate::sessions::open(env, &who, &id, bytes, title, body.repository).await?;
    json_response(status, text).map_err(ApiError::from)
}

/// A sandbox dials its session; the session object checks the per-sandbox token.
async fn sandbox_link(req: &mut Request, env: &Env, id: &str) -> ApiResult<Response> {
    require_upgrade(req)?;
    let stub = session_stub(env, id)?;
    let headers = Headers::new();
    headers.set("upgrade", "websocket")?;
    if let Some(auth) = req.headers().get("authorization").ok().flatten() {
        headers.set("authorization", &auth)?;
    }
    let link = SessionRoute::SandboxLink;
    call(&stub, link.method(), link.path(), Some(headers), None).await
}

/// A sandbox's agent tools (`spawn_session`, `check_session`): the session checks the sandbox token.
async fn sandbox_background(req: &mut Request, env: &Env, id: &str) -> ApiResult<Response> {
    let stub = session_stub(env, id)?;
    let headers = Headers::new();
    if let Some(auth) = req.headers().get("authorization").ok().flatten() {
        headers.set("authorization", &auth)?;
    }
    let body = read_bytes(req).await?;
    let tools = SessionRoute::SandboxTools;
    call(
        &stub,
        tools.method(),
        tools.path(),
        Some(headers),
        Some(body),
    )
    .await
}
