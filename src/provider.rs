//! Client of the compute provider (docs/provider-contract.md): every request signed with PROVIDER_SECRET.

use nightshift_core::signing;
use serde_json::Value;
use worker::{Env, Fetch, Headers, Method, Request, RequestInit, Response};

use crate::config;
use crate::error::{ApiResult, EdgeError};
use crate::platform::{now_ms, random_hex};

/// Sends one signed request and returns the provider's response as it is (for streams).
pub async fn send(
    env: &Env,
    method: Method,
    path: &str,
    body: Option<&[u8]>,
) -> ApiResult<Response> {
    let base = config::provider_url(env).ok_or(EdgeError::ProviderNotConfigured)?;
    let bytes = body.unwrap_or_default();
    let ts = now_ms();
    // A new nonce for every request (crypto.getRandomValues): the provider refuses a replay.
    let nonce = random_hex(16);
    let sig = signing::sign(
        &config::provider_secret(env),
        method.as_ref(),
        path,
        ts,
        &nonce,
        bytes,
    )
    .map_err(EdgeError::Signing)?;
    let headers = Headers::new();
    headers.set(signing::TIMESTAMP_HEADER, &ts.to_string())?;
    headers.set(signing::NONCE_HEADER, &nonce)?;
    headers.set(signing::SIGNATURE_HEADER, &sig)?;
    headers.set("content-type", "application/json")?;
    let mut init = RequestInit::new();
    init.with_method(method).with_headers(headers);
    if body.is_some() {
        init.with_body(Some(js_sys::Uint8Array::from(bytes).into()));
    }
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let req = Request::new_with_init(&url, &init)?;
    Fetch::Request(req).send().await.map_err(|e| {
        EdgeError::ProviderSilent {
            base,
            error: e.to_string(),
        }
        .into()
    })
}

/// Sends one signed request; returns (status, JSON body).
pub async fn call(
    env: &Env,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> ApiResult<(u16, Value)> {
    let bytes = body.map(|b| b.to_string().into_bytes());
    let mut resp = send(env, method, path, bytes.as_deref()).await?;
    let status = resp.status_code();
    let text = resp.text().await.unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, v))
}

/// Terminates a sandbox (idempotent at the provider); returns the provider's answer.
pub async fn terminate(env: &Env, sandbox: &str) -> ApiResult<(u16, Value)> {
    let path = format!("/v1/sandboxes/{sandbox}/terminate");
    call(env, Method::Post, &path, None).await
}
