//! A session's snapshots at the provider: take one, delete some. What to take and when is the core's (`HostedSession`); the list is stored by the core's storage seam (`Kv::Snapshots`).

use nightshift_core::provider::TakeSnapshot;
use worker::Env;

use crate::config;
use crate::error::{ApiError, EdgeError};
use crate::provider;

/// Snapshots `sandbox` at the provider (with the session's `SNAPSHOT_TTL_MS`): its id and
/// expiry, or why not (the provider's refusal, its silence, or no live sandbox). (`_now` is
/// left from when an answer without `expires_at` counted as expiring now; the contract's
/// Snapshot always carries it.)
pub async fn take(env: &Env, sandbox: Option<&str>, _now: u64) -> Result<(String, u64), ApiError> {
    let Some(id) = sandbox else {
        return Err(EdgeError::NoLiveSandbox.into());
    };
    let take = TakeSnapshot {
        ttl_ms: Some(config::snapshot_ttl_ms(env)),
    };
    match provider::take_snapshot(env, id, &take).await? {
        Ok(snapshot) => Ok((snapshot.id, snapshot.expires_at)),
        Err(refused) => Err(EdgeError::SnapshotRefused {
            status: refused.status,
            code: refused.error.as_ref().map(|e| e.code.clone()),
            message: refused.error.map(|e| e.message),
        }
        .into()),
    }
}

/// Deletes snapshots at the provider; returns those that are gone (deleted, or already unknown).
pub async fn delete(env: &Env, ids: &[String]) -> Vec<String> {
    let mut gone = Vec::new();
    for id in ids {
        if let Ok(answer) = provider::delete_snapshot(env, id).await {
            if provider::done_or_gone(&answer) {
                gone.push(id.clone());
            }
        }
    }
    gone
}
