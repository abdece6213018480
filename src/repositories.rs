//! `/repositories…`: register, list and change repositories, build images, roll back; and the build schedule (cron).

use nightshift_core::github::RepositoryAction;
use nightshift_core::ids::Identity;
use nightshift_core::quota::QuotaKind;
use nightshift_core::repository::Settings;
use serde::Serialize;
use worker::{Env, Method, Request, Response};

use crate::error::{json_of, json_response, ApiError, ApiResult, EdgeError};
use crate::http::{
    ask, call, installation_index, no_route, read_body, read_bytes, repository_stub,
};
use crate::objects::{
    encode, read_answer, with_query, InstallationAnswer, InstallationAsk, InstallationRoute,
    RepositoryInfo, RepositoryLink, RepositoryRoute,
};
use crate::{access, auth, config};

/// `GET /repositories`: every registered repository, as its object shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepositoryList {
    pub repositories: Vec<RepositoryInfo>,
}

/// In a deployment with a GitHub App, a repository is GitHub's: the person must maintain it
/// there, the App must be installed on it, and it is cloned from GitHub (whose git host its
/// sandboxes may reach).
async fn github_registration(env: &Env, who: &Identity, s: &mut Settings) -> ApiResult<()> {
    let Some(cfg) = config::github(env) else {
        return Ok(());
    };
    let full_name = s
        .github
        .clone()
        .ok_or(EdgeError::GithubRepositoryRequired)?;
    access::require(env, who, &full_name, RepositoryAction::Register, true).await?;
    let body = encode(&InstallationAsk {
        repository: full_name.clone(),
    })?;
    let stub = installation_index(env)?;
    ask::<InstallationAnswer>(&stub, InstallationRoute::Installation, Some(body)).await?;
    s.clone_url = format!("{}/{full_name}.git", cfg.git_url);
    if let Some(host) = git_host(&cfg.git_url) {
        if !s.egress.contains(&host) {
            s.egress.push(host);
        }
    }
    Ok(())
}

/// `host` or `host:port` of a git base URL, as an egress pattern.
fn git_host(git_url: &str) -> Option<String> {
    let rest = git_url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    (!authority.is_empty()).then(|| authority.to_string())
}

pub async fn handle(req: &mut Request, env: &Env, segs: &[&str]) -> ApiResult<Response> {
    let who = auth::authenticate(req, env).await?;
    let method = req.method();
    match (method, segs) {
        (Method::Post, ["repositories"]) => {
            let mut s: Settings = read_body(req).await?;
            if config::github(env).is_some() && s.clone_url.is_empty() {
                s.clone_url = "https://github.invalid/".into();
            }
            s.validate()?;
            github_registration(env, &who, &mut s).await?;
            s.validate()?;
            access::take_quota(env, &who, QuotaKind::Builds, s.github.as_deref()).await?;
            // The object registers all or nothing (its index entry included): its answer is
            // the registration, or a refusal saying nothing was stored.
            let body = Some(encode(&s)?);
            let mut resp = on_repository(env, &s.name, RepositoryRoute::Register, "", body).await?;
            let status = resp.status_code();
            let text = resp.text().await?;
            if status == 201 {
                if let Some(full_name) = &s.github {
                    let stub = installation_index(env)?;
                    let route = InstallationRoute::LinkRepository;
                    let link = encode(&RepositoryLink {
                        full_name: full_name.clone(),
                        name: s.name.clone(),
                        base_branch: s.base_branch.clone(),
                    })?;
                    call(&stub, route.method(), route.path(), None, Some(link)).await?;
                }
            }
            json_response(status, text).map_err(ApiError::from)
        }
        (Method::Get, ["repositories"]) => {
            let names = access::registered(env).await?;
            let mut repositories = Vec::new();
            for n in names {
                let info = RepositoryRoute::Info;
                let stub = repository_stub(env, &n)?;
                let mut r = call(&stub, info.method(), &info.path(), None, None).await?;
                // A listed name that is not registered (a registration that did not complete)
                // is not shown; nor is one the person may not read on GitHub.
                if r.status_code() == 200 {
                    let found: RepositoryInfo = read_answer(&mut r, &info.path()).await?;
                    if may_read(env, &who, &found.repository).await? {
                        repositories.push(found);
                    }
                }
            }
            json_of(200, &RepositoryList { repositories })
        }
        (Method::Get, ["repositories", name]) => {
            access::require_registered(env, &who, name, RepositoryAction::Read, false).await?;
            on_repository(env, name, RepositoryRoute::Info, "", None).await
        }
        (Method::Patch, ["repositories", name]) => {
            let body = read_bytes(req).await?;
            access::require_registered(env, &who, name, RepositoryAction::Change, true).await?;
            on_repository(env, name, RepositoryRoute::Settings, "", Some(body)).await
        }
        (Method::Post, ["repositories", name, "builds"]) => {
            let settings =
                access::require_registered(env, &who, name, RepositoryAction::Change, false)
                    .await?;
            let github = settings.and_then(|s| s.github);
            access::take_quota(env, &who, QuotaKind::Builds, github.as_deref()).await?;
            on_repository(env, name, RepositoryRoute::Builds, "", None).await
        }
        (Method::Get, ["repositories", name, "builds", image, "logs"]) => {
            access::require_registered(env, &who, name, RepositoryAction::Read, false).await?;
            let q = req
                .url()?
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            let route = RepositoryRoute::BuildLogs((*image).to_string());
            on_repository(env, name, route, &q, None).await
        }
        (Method::Post, ["repositories", name, "rollback"]) => {
            let body = read_bytes(req).await?;
            access::require_registered(env, &who, name, RepositoryAction::Change, true).await?;
            on_repository(env, name, RepositoryRoute::Rollback, "", Some(body)).await
        }
        _ => Err(no_route(req)),
    }
}

/// Whether the person may see a listed repository (GitHub's say, in a deployment with an App).
async fn may_read(env: &Env, who: &Identity, s: &Settings) -> ApiResult<bool> {
    match (config::github(env), &s.github) {
        (Some(_), Some(full_name)) => {
            let role = access::role(env, who, full_name, false).await;
            Ok(role.is_ok_and(|r| RepositoryAction::Read.check(r).is_ok()))
        }
        _ => Ok(true),
    }
}

/// Calls the repository `name`'s object at `route` (with the people's `query`, `?…` or empty).
async fn on_repository(
    env: &Env,
    name: &str,
    route: RepositoryRoute,
    query: &str,
    body: Option<Vec<u8>>,
) -> ApiResult<Response> {
    let stub = repository_stub(env, name)?;
    let path = with_query(&route.path(), query);
    call(&stub, route.method(), &path, None, body).await
}

/// The cron trigger: every repository builds when its interval's slot has no build yet. The
/// slot is that of the event's scheduled time (`at_ms`), so a duplicated delivery, however
/// late, names the same slot.
pub async fn scheduled(env: &Env, at_ms: u64) -> ApiResult<()> {
    for n in access::registered(env).await? {
        let stub = repository_stub(env, &n)?;
        let path = RepositoryRoute::cron_at(at_ms);
        match call(&stub, RepositoryRoute::Cron.method(), &path, None, None).await {
            Ok(mut r) => {
                let text = r.text().await.unwrap_or_default();
                worker::console_log!("scheduled build of {n}: {text}");
            }
            Err(e) => worker::console_error!("scheduled build of {n}: {}", e.message),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::RepositoryList;
    use serde_json::json;

    /// The list has the one key of the `json!` it replaced (each repository is the object's
    /// `RepositoryInfo`, checked beside it in `src/objects.rs`).
    #[test]
    fn the_list_is_the_json_it_replaced() {
        let list = RepositoryList {
            repositories: Vec::new(),
        };
        let out: Vec<serde_json::Value> = Vec::new();
        let old = json!({"repositories": out});
        assert_eq!(
            serde_json::to_string(&list).unwrap_or_default(),
            old.to_string()
        );
    }
}
