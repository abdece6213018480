//! The sandbox API (`/sandbox…`): people reach their session's sandboxes, authorised by session membership, through the provider; snapshots and restores go through the session, which records them.

use nightshift_core::quota::QuotaKind;
use nightshift_core::wire::{
    self, ExecRequest, SandboxAuthorize, SandboxCreate, SandboxRestore, SnapshotNow,
    SnapshotRequest,
};
use serde_json::Value;
use worker::{Env, Headers, Method, Request, Response};

use crate::auth::{self, encode_identity, IDENTITY_HEADER};
use crate::error::{json_of, ApiError, ApiResult, EdgeError};
use crate::http::{call, read_body, read_bytes, session_stub};
use crate::provider;

/// The provider's answer as the API's answer (JSON status and body as they are), for the
/// answers passed on unread (git status, exec, stop, start, terminate).
fn relay(status: u16, v: &Value) -> ApiResult<Response> {
    json_of(status, v)
}

pub async fn handle(req: &mut Request, env: &Env, segs: &[&str]) -> ApiResult<Response> {
    let who = auth::authenticate(req, env).await?;
    let who_header = encode_identity(&who);
    let method = req.method();
    match (method, segs) {
        (Method::Post, ["sandbox"]) => {
            let b: SandboxCreate = read_body(req).await?;
            crate::access::take_quota(env, &who, QuotaKind::Sandboxes, None).await?;
            let stub = session_stub(env, &b.session_id)?;
            let headers = Headers::new();
            headers.set(IDENTITY_HEADER, &who_header)?;
            call(
                &stub,
                Method::Post,
                "/sandbox/ensure",
                Some(headers),
                Some(Vec::new()),
            )
            .await
        }
        (Method::Post, ["sandbox", "restore"]) => {
            let b: SandboxRestore = read_body(req).await?;
            if let Some(id) = &b.snapshot {
                if !valid_id("snp_", id) {
                    return Err(EdgeError::NoSnapshot(id.to_string()).into());
                }
            }
            let stub = session_stub(env, &b.session_id)?;
            let headers = Headers::new();
            headers.set(IDENTITY_HEADER, &who_header)?;
            let body = serde_json::to_vec(&b).map_err(ApiError::internal)?;
            call(
                &stub,
                Method::Post,
                "/sandbox/restore",
                Some(headers),
                Some(body),
            )
            .await
        }
        (Method::Get, ["sandbox"]) => {
            let url = req.url().map_err(ApiError::from)?;
            let session = url
                .query_pairs()
                .find(|(k, _)| k == "session_id")
                .map(|(_, v)| v.into_owned())
                .ok_or(EdgeError::InvalidQuery("pass ?session_id=ses_…"))?;
            let auth = SandboxAuthorize {
                sandbox: None,
                op: "list".into(),
            };
            if let Err(r) = authorize(env, &who_header, &session, &auth).await? {
                return Ok(r);
            }
            match provider::list_sandboxes(env, &session).await? {
                Ok(listed) => json_of(200, &listed),
                Err(refused) => refused.relay(),
            }
        }
        (m, ["sandbox", id, rest @ ..]) => {
            let id = id.to_string();
            if !valid_id("sbx_", &id) {
                return Err(EdgeError::SandboxNotFound(id.to_string()).into());
            }
            let op = match (&m, rest) {
                (Method::Get, []) => "get",
                (Method::Post, ["start"]) => "start",
                (Method::Post, ["stop"]) => "stop",
                (Method::Post, ["terminate"]) => "terminate",
                (Method::Post, ["exec"]) => "exec",
                (Method::Get, ["logs", _]) => "logs",
                (Method::Get, ["git"]) => "git",
                (Method::Post, ["git", "sync"]) => "git.sync",
                (Method::Post, ["snapshot"]) => "snapshot",
                _ => return Err(EdgeError::NotFound("route").into()),
            };
            // Bad input is refused before anything is asked of anyone.
            let body = if op == "exec" {
                let bytes = read_bytes(req).await?;
                let e: ExecRequest = wire::parse_body(&bytes)?;
                e.check()?;
                Some(serde_json::to_vec(&e).map_err(ApiError::internal)?)
            } else {
                None
            };
            if op == "snapshot" {
                let bytes = read_bytes(req).await?;
                if !bytes.is_empty() {
                    wire::parse_body::<SnapshotRequest>(&bytes)?;
                }
            }
            if let ["logs", service] = rest {
                if service.is_empty()
                    || !service
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                {
                    return Err(EdgeError::InvalidService.into());
                }
            }
            let sandbox = match provider::get_sandbox(env, &id).await? {
                Ok(sandbox) => sandbox,
                Err(refused) if refused.is_not_found() => {
                    return Err(EdgeError::SandboxNotFound(id.to_string()).into())
                }
                // The provider could not say whose sandbox it is: its answer, as it is.
                Err(refused) => return refused.relay(),
            };
            let session = sandbox.session_id.clone().unwrap_or_default();
            let auth = SandboxAuthorize {
                sandbox: Some(id.clone()),
                op: op.into(),
            };
            if let Err(r) = authorize(env, &who_header, &session, &auth).await? {
                return Ok(r);
            }
            let tail = rest.join("/");
            let path = if tail.is_empty() {
                format!("/v1/sandboxes/{id}")
            } else {
                format!("/v1/sandboxes/{id}/{tail}")
            };
            match op {
                "get" => json_of(200, &sandbox),
                "snapshot" => {
                    if sandbox.status.is_over() {
                        return Err(EdgeError::SandboxTerminated {
                            id: id.to_string(),
                            status: sandbox.status.to_string(),
                        }
                        .into());
                    }
                    // The session takes it, so it is listed, restored, expired and deleted like a turn's.
                    let stub = session_stub(env, &session)?;
                    let headers = Headers::new();
                    headers.set(IDENTITY_HEADER, &who_header)?;
                    let body = serde_json::to_vec(&SnapshotNow {
                        sandbox: id.clone(),
                    })
                    .map_err(ApiError::internal)?;
                    call(
                        &stub,
                        Method::Post,
                        "/sandbox/snapshot",
                        Some(headers),
                        Some(body),
                    )
                    .await
                }
                "logs" => {
                    let url = req.url().map_err(ApiError::from)?;
                    let follow = url
                        .query_pairs()
                        .any(|(k, v)| k == "follow" && (v == "1" || v == "true"));
                    let path = if follow {
                        format!("{path}?follow=1")
                    } else {
                        path
                    };
                    provider::send(env, Method::Get, &path, None).await
                }
                "git" => {
                    let (st, v) = provider::call(env, Method::Get, &path, None).await?;
                    relay(st, &v)
                }
                _ => {
                    let bytes = body.unwrap_or_default();
                    let resp = provider::send(env, Method::Post, &path, Some(&bytes)).await?;
                    relay_response(resp).await
                }
            }
        }
        _ => Err(EdgeError::NotFound("route").into()),
    }
}

/// A provider id: `prefix` then 1-60 ASCII letters and digits.
fn valid_id(prefix: &str, id: &str) -> bool {
    id.len() <= 64
        && id.len() > prefix.len()
        && id.starts_with(prefix)
        && id[prefix.len()..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric())
}

async fn relay_response(mut resp: Response) -> ApiResult<Response> {
    let st = resp.status_code();
    let text = resp.text().await.unwrap_or_default();
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    relay(st, &v)
}

/// Ok(Ok(())) when `who` may do `op`; Ok(Err(answer)) carries the session's refusal as it is.
async fn authorize(
    env: &Env,
    who_header: &str,
    session: &str,
    auth: &SandboxAuthorize,
) -> ApiResult<Result<(), Response>> {
    let stub = session_stub(env, session)?;
    let headers = Headers::new();
    headers.set(IDENTITY_HEADER, who_header)?;
    let body = serde_json::to_vec(auth).map_err(ApiError::internal)?;
    let resp = call(
        &stub,
        Method::Post,
        "/sandbox/authorize",
        Some(headers),
        Some(body),
    )
    .await?;
    if resp.status_code() >= 400 {
        return Ok(Err(resp));
    }
    Ok(Ok(()))
}
