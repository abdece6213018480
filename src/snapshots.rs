//! A session's snapshot upkeep at the provider: take the snapshot a turn (or a nearing time limit) asked for, and delete expired ones.

use nightshift_core::sandbox::SandboxLink;
use nightshift_core::snapshot::Snapshots;
use serde_json::json;
use worker::{console_error, Env, Method, SqlStorage};

use crate::config;
use crate::error::ApiResult;
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

/// When the session's alarm must run for snapshots.
pub fn deadline(
    env: &Env,
    sql: &SqlStorage,
    link: Option<&SandboxLink>,
    now: u64,
) -> ApiResult<Option<u64>> {
    let s = load(sql)?;
    let mut next = s.next_expiry();
    let mut at = |t: u64| next = Some(next.map_or(t, |n: u64| n.min(t)));
    if s.taking.is_some() || !s.to_delete.is_empty() {
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

/// Takes owed snapshots, snapshots before the time limit, and deletes expired ones.
pub async fn upkeep(
    env: &Env,
    sql: &SqlStorage,
    link: Option<&SandboxLink>,
    now: u64,
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
    if let Some(turn) = s.taking {
        let sandbox = live.and_then(|l| l.sandbox.clone());
        let taken = match sandbox {
            Some(id) => {
                let ttl = config::snapshot_ttl_ms(env);
                let path = format!("/v1/sandboxes/{id}/snapshot");
                provider::call(env, Method::Post, &path, Some(&json!({"ttl_ms": ttl}))).await
            }
            None => Ok((409, json!({}))),
        };
        // Re-read: the state may have moved while the provider worked.
        let mut s = load(sql)?;
        match taken {
            Ok((201, v)) => {
                let id = v["id"].as_str().unwrap_or_default();
                let exp = v["expires_at"].as_u64().unwrap_or(now);
                s.taken(turn, id, now, exp);
                // A turn that ended while this one was copied is snapshotted next.
                s.near_limit();
            }
            Ok((status, v)) => {
                console_error!("snapshot of turn {turn} refused ({status}): {v}");
                s.not_taken(turn);
            }
            Err(e) => {
                console_error!("snapshot of turn {turn}: {}", e.message);
                s.not_taken(turn);
            }
        }
        save(sql, &s)?;
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
