//! A session's snapshots at the provider: take one, delete some. What to take and when is the core's (`HostedSession`); the list is stored under `SNAPSHOTS`.

use nightshift_core::snapshot::Snapshots;
use serde_json::json;
use worker::{Env, Method, SqlStorage};

use crate::config;
use crate::error::{ApiError, ApiResult, EdgeError};
use crate::provider;
use crate::sandbox_start::SNAPSHOTS;
use crate::store;

pub fn load(sql: &SqlStorage) -> ApiResult<Snapshots> {
    Ok(store::kv_get(sql, SNAPSHOTS)?.unwrap_or_default())
}

pub fn save(sql: &SqlStorage, s: &Snapshots) -> ApiResult<()> {
    store::kv_put(sql, SNAPSHOTS, s)
}

/// Snapshots `sandbox` at the provider (with the session's `SNAPSHOT_TTL_MS`): its id and
/// expiry, or why not (the provider's refusal, its silence, or no live sandbox).
pub async fn take(env: &Env, sandbox: Option<&str>, now: u64) -> Result<(String, u64), ApiError> {
    let Some(id) = sandbox else {
        return Err(EdgeError::NoLiveSandbox.into());
    };
    let ttl = config::snapshot_ttl_ms(env);
    let path = format!("/v1/sandboxes/{id}/snapshot");
    match provider::call(env, Method::Post, &path, Some(&json!({"ttl_ms": ttl}))).await? {
        (201, v) => match v["id"].as_str() {
            Some(snap) => Ok((snap.to_string(), v["expires_at"].as_u64().unwrap_or(now))),
            None => Err(ApiError::internal("the provider's snapshot has no id")),
        },
        (status, v) => {
            let text = |k: &str| v["error"][k].as_str().map(String::from);
            Err(EdgeError::SnapshotRefused {
                status,
                code: text("code"),
                message: text("message"),
            }
            .into())
        }
    }
}

/// Deletes snapshots at the provider; returns those that are gone (deleted, or already unknown).
pub async fn delete(env: &Env, ids: &[String]) -> Vec<String> {
    let mut gone = Vec::new();
    for id in ids {
        let path = format!("/v1/snapshots/{id}");
        if let Ok((200 | 404, _)) = provider::call(env, Method::Delete, &path, None).await {
            gone.push(id.clone());
        }
    }
    gone
}
