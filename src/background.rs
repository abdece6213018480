//! `/background…`: people spawn, list, read, cancel and follow background agents; each request goes to the agent's scheduler shard.

use serde::Deserialize;
use serde_json::json;
use worker::{Env, Method, Request, Response};

use crate::auth;
use crate::error::{ApiError, ApiResult, EdgeError};
use crate::http::{no_route, read_body};
use crate::scheduler::{on_shard, shard_of, valid_tenant};

/// `POST /background/spawn` as people send it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpawnRequest {
    prompt: String,
    #[serde(default)]
    repository: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    title: Option<String>,
    /// The scheduler shard (one per tenant); `default` when absent.
    #[serde(default)]
    tenant: Option<String>,
}

pub async fn handle(req: &mut Request, env: &Env, segs: &[&str]) -> ApiResult<Response> {
    let who = auth::authenticate(req, env, false)?;
    let viewer = format!("user:{}", who.user);
    let method = req.method();
    let query = req
        .url()
        .ok()
        .and_then(|u| u.query().map(|q| format!("?{q}")))
        .unwrap_or_default();
    match (method, segs) {
        (Method::Post, ["background", "spawn"]) => {
            let b: SpawnRequest = read_body(req).await?;
            let too_long = |v: &Option<String>, max: usize| {
                v.as_ref()
                    .is_some_and(|x| x.trim().is_empty() || x.len() > max)
            };
            if too_long(&b.title, 200) || too_long(&b.repository, 1000) || too_long(&b.model, 200) {
                return Err(EdgeError::InvalidInput(
                    "title: 1-200 bytes, repository: 1-1000, model: 1-200",
                )
                .into());
            }
            let tenant = b.tenant.clone().unwrap_or_else(|| "default".into());
            if !valid_tenant(&tenant) {
                return Err(EdgeError::InvalidInput(
                    "tenant: 1-40 lowercase letters, digits or '-'",
                )
                .into());
            }
            let body = json!({"identity": who, "prompt": b.prompt, "repository": b.repository,
                "model": b.model, "title": b.title});
            let bytes = serde_json::to_vec(&body).map_err(ApiError::internal)?;
            on_shard(
                env,
                &tenant,
                &viewer,
                Method::Post,
                "/spawn",
                Some(bytes),
                None,
            )
            .await
        }
        (Method::Get, ["background"]) => {
            let url = req.url()?;
            let tenant = url
                .query_pairs()
                .find(|(k, _)| k == "tenant")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_else(|| "default".into());
            if !valid_tenant(&tenant) {
                return Err(EdgeError::InvalidInput(
                    "tenant: 1-40 lowercase letters, digits or '-'",
                )
                .into());
            }
            let path = format!("/agents{query}");
            on_shard(env, &tenant, &viewer, Method::Get, &path, None, None).await
        }
        (Method::Get, ["background", id]) => {
            let shard = shard_of(id)?;
            on_shard(
                env,
                &shard,
                &viewer,
                Method::Get,
                &format!("/agents/{id}"),
                None,
                None,
            )
            .await
        }
        (Method::Post, ["background", id, "cancel"]) => {
            let shard = shard_of(id)?;
            let path = format!("/agents/{id}/cancel");
            on_shard(env, &shard, &viewer, Method::Post, &path, None, None).await
        }
        (Method::Get, ["background", id, "output"]) => {
            let shard = shard_of(id)?;
            let path = format!("/agents/{id}/output");
            on_shard(env, &shard, &viewer, Method::Get, &path, None, None).await
        }
        (Method::Get, ["background", id, "events"]) => {
            let shard = shard_of(id)?;
            let last = req.headers().get("last-event-id").ok().flatten();
            let path = format!("/agents/{id}/events{query}");
            let extra = last.map(|l| ("last-event-id", l));
            on_shard(env, &shard, &viewer, Method::Get, &path, None, extra).await
        }
        _ => Err(no_route(req)),
    }
}
