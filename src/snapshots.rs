//! A session's snapshot upkeep at the provider: take the snapshot a turn (or a nearing time limit) asked for, and delete expired ones.

use nightshift_core::sandbox::SandboxLink;
use nightshift_core::snapshot::{Snap, Snapshots};
use serde_json::json;
use worker::{console_error, Env, Method, SqlStorage};

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

/// A prompt finished: ask for a snapshot of this turn (taken by the next alarm).
pub fn turn_ended(sql: &SqlStorage) -> ApiResult<bool> {
    let mut s = load(sql)?;
    let want = s.turn_ended().is_some();
    save(sql, &s)?;
    Ok(want)
}

/// When the session's alarm must run for snapshots. `requested` is true while a snapshot asked
/// for through the API is being taken (its request finishes it, so the alarm need not).
pub fn deadline(
    env: &Env,
    sql: &SqlStorage,
    link: Option<&SandboxLink>,
    now: u64,
    requested: bool,
) -> ApiResult<Option<u64>> {
    let s = load(sql)?;
    let mut next = s.next_expiry();
    let mut at = |t: u64| next = Some(next.map_or(t, |n: u64| n.min(t)));
    if (s.taking.is_some() && !requested) || !s.to_delete.is_empty() {
        at(now);
    }
    if let Some(l) = link.filter(|l| l.stage.is_live()) {
        if let Some(exp) = l.expires_at {
            if !s.holds_current() {
                at(exp.saturating_sub(config::snapshot_margin_ms(env)));
            }
        }
    }
    Ok(next)
}

/// Asks for a snapshot now (`POST /sandbox/:id/snapshot`): the turn to take, or `None` while one is in flight.
pub fn request(sql: &SqlStorage) -> ApiResult<Option<u64>> {
    let mut s = load(sql)?;
    let turn = s.requested();
    if turn.is_some() {
        save(sql, &s)?;
    }
    Ok(turn)
}

/// Takes the snapshot of `turn` (owed by a turn, a nearing time limit or a request) of
/// `sandbox` at the provider and records it in the session's list, or records that it was not
/// taken. The inner error is the provider's refusal (or its silence); the outer one is storage.
pub async fn take(
    env: &Env,
    sql: &SqlStorage,
    sandbox: Option<&str>,
    turn: u64,
    now: u64,
) -> ApiResult<Result<Snap, ApiError>> {
    let taken = match sandbox {
        Some(id) => {
            let ttl = config::snapshot_ttl_ms(env);
            let path = format!("/v1/sandboxes/{id}/snapshot");
            provider::call(env, Method::Post, &path, Some(&json!({"ttl_ms": ttl}))).await
        }
        None => Ok(EdgeError::NoLiveSandbox.answer()),
    };
    // Re-read: the state may have moved while the provider worked.
    let mut s = load(sql)?;
    let answer = match taken {
        Ok((201, v)) => {
            let id = v["id"].as_str().unwrap_or_default();
            let exp = v["expires_at"].as_u64().unwrap_or(now);
            s.taken(turn, id, now, exp);
            // A turn that ended while this one was copied is snapshotted next.
            s.near_limit();
            let snap = s.snaps.iter().find(|x| x.id == id).cloned();
            snap.ok_or_else(|| ApiError::internal("the provider's snapshot has no id"))
        }
        Ok((status, v)) => {
            console_error!("snapshot of turn {turn} refused ({status}): {v}");
            s.not_taken(turn);
            let text = |k: &str| v["error"][k].as_str().map(String::from);
            Err(EdgeError::SnapshotRefused {
                status,
                code: text("code"),
                message: text("message"),
            }
            .into())
        }
        Err(e) => {
            console_error!("snapshot of turn {turn}: {}", e.message);
            s.not_taken(turn);
            Err(e)
        }
    };
    save(sql, &s)?;
    Ok(answer)
}

/// Takes owed snapshots, snapshots before the time limit, and deletes expired ones. While a
/// snapshot asked for through the API is being taken (`requested`), it takes none itself.
pub async fn upkeep(
    env: &Env,
    sql: &SqlStorage,
    link: Option<&SandboxLink>,
    now: u64,
    requested: bool,
) -> ApiResult<()> {
    let mut s = load(sql)?;
    s.expire(now);
    let live = link.filter(|l| l.stage.is_live());
    if let Some(l) = live {
        if l.expires_at
            .is_some_and(|e| e.saturating_sub(config::snapshot_margin_ms(env)) <= now)
        {
            s.near_limit();
        }
    }
    save(sql, &s)?;
    if let (Some(turn), false) = (s.taking, requested) {
        let sandbox = live.and_then(|l| l.sandbox.clone());
        // Refusals are logged and recorded by `take`; the next turn or limit asks again.
        let _ = take(env, sql, sandbox.as_deref(), turn, now).await?;
    }
    let doomed = load(sql)?.to_delete;
    let mut gone = Vec::new();
    for id in doomed {
        let path = format!("/v1/snapshots/{id}");
        if let Ok((200 | 404, _)) = provider::call(env, Method::Delete, &path, None).await {
            gone.push(id);
        }
    }
    if !gone.is_empty() {
        let mut s = load(sql)?;
        s.deleted(&gone);
        save(sql, &s)?;
    }
    Ok(())
}
