//! `/background…`: people spawn, list, read, cancel and follow background agents; each request goes to the agent's scheduler shard.

use nightshift_core::quota::QuotaKind;
use serde::Deserialize;
use worker::{Env, Method, Request, Response};

use crate::auth;
use crate::error::{ApiResult, EdgeError};
use crate::http::{no_route, read_body};
use crate::objects::{encode, SchedulerRoute, SpawnBody, Viewer, LAST_EVENT_ID_HEADER};
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
    let who = auth::authenticate(req, env).await?;
    let viewer = Viewer::Person(who.user.clone());
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
            let mut tenant = b.tenant.clone().unwrap_or_else(|| "default".into());
            if !valid_tenant(&tenant) {
                return Err(EdgeError::InvalidInput(
                    "tenant: 1-40 lowercase letters, digits or '-'",
                )
                .into());
            }
            // With a GitHub App, an agent works on a repository the person may use, and its
            // tenant is the organisation the App is installed on (never a name they choose).
            if crate::config::github(env).is_some() {
                let repository = b
                    .repository
                    .as_deref()
                    .ok_or(EdgeError::GithubRepositoryRequired)?;
                crate::access::require_session_repository(env, &who, repository, false).await?;
                let owner = crate::access::settings(env, repository)
                    .await?
                    .and_then(|s| s.github)
                    .and_then(|full| full.split('/').next().map(str::to_ascii_lowercase))
                    .filter(|owner| valid_tenant(owner))
                    .ok_or(EdgeError::GithubRepositoryRequired)?;
                if b.tenant.as_ref().is_some_and(|t| *t != owner) {
                    return Err(EdgeError::InvalidInput(
                        "tenant: with GitHub, an agent's tenant is its repository's organisation; leave it out",
                    )
                    .into());
                }
                tenant = owner;
            }
            // (Without a GitHub App a spawn's repository may be a clone URL: no settings to read.)
            let github = match &b.repository {
                Some(name) if crate::config::github(env).is_some() => {
                    crate::access::settings(env, name)
                        .await?
                        .and_then(|s| s.github)
                }
                _ => None,
            };
            crate::access::take_quota(env, &who, QuotaKind::Spawns, github.as_deref()).await?;
            let body = SpawnBody {
                identity: who,
                model: b.model,
                parent: None,
                parent_depth: 0,
                prompt: b.prompt,
                repository: b.repository,
                title: b.title,
            };
            let route = SchedulerRoute::Spawn;
            on_shard(
                env,
                &tenant,
                &viewer,
                &route,
                "",
                Some(encode(&body)?),
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
            let route = SchedulerRoute::Agents;
            on_shard(env, &tenant, &viewer, &route, &query, None, None).await
        }
        (Method::Get, ["background", id]) => {
            let shard = shard_of(id)?;
            let route = SchedulerRoute::Agent(id.to_string());
            on_shard(env, &shard, &viewer, &route, "", None, None).await
        }
        (Method::Post, ["background", id, "cancel"]) => {
            let shard = shard_of(id)?;
            let route = SchedulerRoute::AgentCancel(id.to_string());
            on_shard(env, &shard, &viewer, &route, "", None, None).await
        }
        (Method::Get, ["background", id, "output"]) => {
            let shard = shard_of(id)?;
            let route = SchedulerRoute::AgentOutput(id.to_string());
            on_shard(env, &shard, &viewer, &route, "", None, None).await
        }
        (Method::Get, ["background", id, "events"]) => {
            let shard = shard_of(id)?;
            let last = req.headers().get(LAST_EVENT_ID_HEADER).ok().flatten();
            let route = SchedulerRoute::AgentEvents(id.to_string());
            on_shard(env, &shard, &viewer, &route, &query, None, last).await
        }
        _ => Err(no_route(req)),
    }
}
