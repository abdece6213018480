//! `/repositories…`: register, list and change repositories, build images, roll back; and the build schedule (cron).

use nightshift_core::repository::Settings;
use worker::{Env, Method, Request, Response, Stub};

use crate::auth;
use crate::error::{json_of, json_response, ApiError, ApiResult};
use crate::http::{call, no_route, read_body, read_bytes, repository_stub};

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
            let stub = repository_stub(env, &s.name)?;
            let body = serde_json::to_vec(&s).map_err(ApiError::internal)?;
            let mut resp = call(&stub, Method::Post, "/register", None, Some(body)).await?;
            if resp.status_code() == 201 {
                let entry = serde_json::json!({"name": s.name}).to_string().into_bytes();
                call(&index(env)?, Method::Post, "/add", None, Some(entry)).await?;
            }
            let status = resp.status_code();
            let text = resp.text().await?;
            json_response(status, text).map_err(ApiError::from)
        }
        (Method::Get, ["repositories"]) => {
            let names = list(env).await?;
            let mut out = Vec::new();
            for n in names {
                let mut r =
                    call(&repository_stub(env, &n)?, Method::Get, "/info", None, None).await?;
                if r.status_code() == 200 {
                    out.push(r.json::<serde_json::Value>().await?);
                }
            }
            json_of(200, &serde_json::json!({"repositories": out}))
        }
        (Method::Get, ["repositories", name]) => {
            call(
                &repository_stub(env, name)?,
                Method::Get,
                "/info",
                None,
                None,
            )
            .await
        }
        (Method::Patch, ["repositories", name]) => {
            let body = read_bytes(req).await?;
            call(
                &repository_stub(env, name)?,
                Method::Patch,
                "/settings",
                None,
                Some(body),
            )
            .await
        }
        (Method::Post, ["repositories", name, "builds"]) => {
            call(
                &repository_stub(env, name)?,
                Method::Post,
                "/builds",
                None,
                None,
            )
            .await
        }
        (Method::Get, ["repositories", name, "builds", image, "logs"]) => {
            let q = req
                .url()?
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            let path = format!("/builds/{image}/logs{q}");
            call(&repository_stub(env, name)?, Method::Get, &path, None, None).await
        }
        (Method::Post, ["repositories", name, "rollback"]) => {
            let body = read_bytes(req).await?;
            call(
                &repository_stub(env, name)?,
                Method::Post,
                "/rollback",
                None,
                Some(body),
            )
            .await
        }
        _ => Err(no_route(req)),
    }
}

async fn list(env: &Env) -> ApiResult<Vec<String>> {
    let mut r = call(&index(env)?, Method::Get, "/list", None, None).await?;
    let v: serde_json::Value = r.json().await?;
    Ok(v["names"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default())
}

/// The cron trigger: every repository builds when its interval's slot has no build yet. The
/// slot is that of the event's scheduled time (`at_ms`), so a duplicated delivery, however
/// late, names the same slot.
pub async fn scheduled(env: &Env, at_ms: u64) -> ApiResult<()> {
    for n in list(env).await? {
        let stub = repository_stub(env, &n)?;
        let path = format!("/cron?at={at_ms}");
        match call(&stub, Method::Post, &path, None, None).await {
            Ok(mut r) => {
                let text = r.text().await.unwrap_or_default();
                worker::console_log!("scheduled build of {n}: {text}");
            }
            Err(e) => worker::console_error!("scheduled build of {n}: {}", e.message),
        }
    }
    Ok(())
}
