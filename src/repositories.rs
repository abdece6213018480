//! `/repositories…`: register, list and change repositories, build images, roll back; and the build schedule (cron).

use nightshift_core::repository::Settings;
use serde::Serialize;
use worker::{Env, Method, Request, Response, Stub};

use crate::auth;
use crate::error::{json_of, json_response, ApiError, ApiResult};
use crate::http::{call, no_route, read_body, read_bytes, repository_stub};
use crate::objects::{
    encode, read_answer, with_query, Names, RepositoryIndexRoute, RepositoryInfo, RepositoryRoute,
};

/// `GET /repositories`: every registered repository, as its object shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RepositoryList {
    pub repositories: Vec<RepositoryInfo>,
}

fn index(env: &Env) -> ApiResult<Stub> {
    Ok(env.durable_object("REPOSITORY_INDEX")?.get_by_name("all")?)
}

pub async fn handle(req: &mut Request, env: &Env, segs: &[&str]) -> ApiResult<Response> {
    auth::authenticate(req, env, false)?;
    let method = req.method();
    match (method, segs) {
        (Method::Post, ["repositories"]) => {
            let s: Settings = read_body(req).await?;
            s.validate()?;
            // The object registers all or nothing (its index entry included): its answer is
            // the registration, or a refusal saying nothing was stored.
            let body = Some(encode(&s)?);
            let mut resp = on_repository(env, &s.name, RepositoryRoute::Register, "", body).await?;
            let status = resp.status_code();
            let text = resp.text().await?;
            json_response(status, text).map_err(ApiError::from)
        }
        (Method::Get, ["repositories"]) => {
            let names = list(env).await?;
            let mut repositories = Vec::new();
            for n in names {
                let info = RepositoryRoute::Info;
                let stub = repository_stub(env, &n)?;
                let mut r = call(&stub, info.method(), &info.path(), None, None).await?;
                // A listed name that is not registered (a registration that did not complete)
                // is not shown.
                if r.status_code() == 200 {
                    repositories.push(read_answer(&mut r, &info.path()).await?);
                }
            }
            json_of(200, &RepositoryList { repositories })
        }
        (Method::Get, ["repositories", name]) => {
            on_repository(env, name, RepositoryRoute::Info, "", None).await
        }
        (Method::Patch, ["repositories", name]) => {
            let body = read_bytes(req).await?;
            on_repository(env, name, RepositoryRoute::Settings, "", Some(body)).await
        }
        (Method::Post, ["repositories", name, "builds"]) => {
            on_repository(env, name, RepositoryRoute::Builds, "", None).await
        }
        (Method::Get, ["repositories", name, "builds", image, "logs"]) => {
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
            on_repository(env, name, RepositoryRoute::Rollback, "", Some(body)).await
        }
        _ => Err(no_route(req)),
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

async fn list(env: &Env) -> ApiResult<Vec<String>> {
    let route = RepositoryIndexRoute::List;
    let mut r = call(&index(env)?, route.method(), route.path(), None, None).await?;
    let names: Names = read_answer(&mut r, route.path()).await?;
    Ok(names.names)
}

/// The cron trigger: every repository builds when its interval's slot has no build yet. The
/// slot is that of the event's scheduled time (`at_ms`), so a duplicated delivery, however
/// late, names the same slot.
pub async fn scheduled(env: &Env, at_ms: u64) -> ApiResult<()> {
    for n in list(env).await? {
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
