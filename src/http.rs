//! Shared HTTP pieces of the Worker: reading request bodies, the common refusals, and calling Durable Objects by name.

use nightshift_core::wire::{self, MAX_BODY_BYTES};
use worker::{Env, Headers, Method, Request, RequestInit, Response, Stub};

use crate::error::{ApiError, ApiResult, EdgeError};
use crate::platform::{now_ms, valid_id};
use crate::user_index::SessionEntry;

pub(crate) fn no_route(req: &Request) -> ApiError {
    EdgeError::NoRoute {
        method: req.method().to_string(),
        path: req.path(),
    }
    .into()
}

pub(crate) async fn read_body<T: serde::de::DeserializeOwned>(req: &mut Request) -> ApiResult<T> {
    let bytes = read_bytes(req).await?;
    Ok(wire::parse_body(&bytes)?)
}

pub(crate) async fn read_bytes(req: &mut Request) -> ApiResult<Vec<u8>> {
    read_bytes_within(req, MAX_BODY_BYTES).await
}

/// The body, refused (`413 body_too_large`) beyond `max` bytes, declared or read.
pub(crate) async fn read_bytes_within(req: &mut Request, max: usize) -> ApiResult<Vec<u8>> {
    let declared = req
        .headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(EdgeError::BodyTooLarge.into());
    }
    let bytes = req.bytes().await.map_err(|_| EdgeError::UnreadableBody)?;
    if bytes.len() > max {
        return Err(EdgeError::BodyTooLarge.into());
    }
    Ok(bytes)
}

pub(crate) fn session_stub(env: &Env, id: &str) -> ApiResult<Stub> {
    if !valid_id("ses", id) {
        return Err(EdgeError::SessionNotFound.into());
    }
    Ok(env.durable_object("SESSION")?.get_by_name(id)?)
}

/// The repository's object (one per name).
pub(crate) fn repository_stub(env: &Env, name: &str) -> ApiResult<Stub> {
    if name.is_empty() || name.len() > 100 {
        return Err(EdgeError::RepositoryNotFound.into());
    }
    Ok(env.durable_object("REPOSITORY")?.get_by_name(name)?)
}

pub(crate) fn user_index(env: &Env, user: &str) -> ApiResult<Stub> {
    Ok(env.durable_object("USER_INDEX")?.get_by_name(user)?)
}

/// Calls a Durable Object with an optional identity and body.
pub(crate) async fn call(
    stub: &Stub,
    method: Method,
    path_and_query: &str,
    headers: Option<Headers>,
    body: Option<Vec<u8>>,
) -> ApiResult<Response> {
    let mut init = RequestInit::new();
    init.with_method(method);
    init.with_headers(headers.unwrap_or_default());
    if let Some(b) = body {
        init.with_body(Some(js_sys::Uint8Array::from(b.as_slice()).into()));
    }
    let req = Request::new_with_init(&format!("https://do{path_and_query}"), &init)?;
    Ok(stub.fetch_with_request(req).await?)
}

pub(crate) async fn index_add(env: &Env, user: &str, snap: &serde_json::Value) -> ApiResult<()> {
    let s = |k: &str| snap.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let entry = SessionEntry {
        id: s("id").unwrap_or_default(),
        title: s("title").unwrap_or_default(),
        repository: s("repository"),
        role: s("role").unwrap_or_else(|| "member".into()),
        joined_at: now_ms(),
        status: s("status").unwrap_or_else(|| "active".into()),
    };
    let idx = user_index(env, user)?;
    let body = serde_json::to_vec(&entry).map_err(ApiError::internal)?;
    let route = crate::objects::UserIndexRoute::Add;
    call(&idx, route.method(), route.path(), None, Some(body)).await?;
    Ok(())
}

pub(crate) fn require_upgrade(req: &Request) -> ApiResult<()> {
    let upgrade = req.headers().get("upgrade").ok().flatten();
    if upgrade.is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
        Ok(())
    } else {
        Err(EdgeError::UpgradeRequired.into())
    }
}

/// Calls an object's fixed route and reads its answer as `T`; a refusal comes back as the
/// object's own error (status, code, message and `Retry-After` kept), so it reaches people
/// unchanged.
pub(crate) async fn ask<T: serde::de::DeserializeOwned>(
    stub: &Stub,
    route: impl crate::objects::FixedRoute,
    body: Option<Vec<u8>>,
) -> ApiResult<T> {
    let mut resp = call(stub, route.method(), route.path(), None, body).await?;
    answer_of(&mut resp, route.path()).await
}

/// The repository index's object (one per deployment): every registered name.
pub(crate) fn repository_index(env: &Env) -> ApiResult<Stub> {
    Ok(env.durable_object("REPOSITORY_INDEX")?.get_by_name("all")?)
}

/// The installation index's object (one per deployment).
pub(crate) fn installation_index(env: &Env) -> ApiResult<Stub> {
    Ok(env
        .durable_object("INSTALLATION_INDEX")?
        .get_by_name("github")?)
}

/// Reads an object's answer as `T`, or its refusal as the error it carries.
pub(crate) async fn answer_of<T: serde::de::DeserializeOwned>(
    resp: &mut Response,
    path: &str,
) -> ApiResult<T> {
    let status = resp.status_code();
    if (200..300).contains(&status) {
        return crate::objects::read_answer(resp, path).await;
    }
    let retry_after = resp
        .headers()
        .get("retry-after")
        .ok()
        .flatten()
        .and_then(|v| v.parse().ok());
    let bytes = resp.bytes().await.unwrap_or_default();
    Err(ApiError::refused(status, &bytes, retry_after))
}
