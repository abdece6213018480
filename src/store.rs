//! Session persistence in Durable Object SQLite: the schema, loading a session, and writing exactly the rows a command touched.

use nightshift_core::events::{Event, EventKind};
use nightshift_core::ids::Actor;
use nightshift_core::queue::Prompt;
use nightshift_core::session::{Client, Dirty, Lock, Member, Meta, Session};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use worker::{SqlStorage, SqlStorageValue};

use crate::error::{ApiError, ApiResult};

/// The session's tables (also read by the bench's runtime floor, `tests/floor/`).
const SCHEMA: &str = include_str!("session_schema.sql");

#[derive(Deserialize)]
struct BodyRow {
    body: String,
}

#[derive(Deserialize)]
struct NumRow {
    n: f64,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("storage: {e}"))
}

/// Creates the tables of a new session.
pub fn create_schema(sql: &SqlStorage) -> ApiResult<()> {
    // One call for all statements: one crossing into the runtime instead of eight.
    sql.exec(SCHEMA, None).map_err(internal)?;
    Ok(())
}

/// True when this object holds a session (read-only check: an unknown id writes nothing).
pub fn exists(sql: &SqlStorage) -> ApiResult<bool> {
    let rows: Vec<NumRow> = sql
        .exec(
            "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
            None,
        )
        .and_then(|c| c.to_array())
        .map_err(internal)?;
    Ok(rows.first().is_some_and(|r| r.n > 0.0))
}

fn all<T: DeserializeOwned>(sql: &SqlStorage, table: &str) -> ApiResult<Vec<T>> {
    let rows: Vec<BodyRow> = sql
        .exec(&format!("SELECT body FROM {table}"), None)
        .and_then(|c| c.to_array())
        .map_err(internal)?;
    rows.into_iter()
        .map(|r| serde_json::from_str(&r.body).map_err(internal))
        .collect()
}

/// Loads the whole session and the last sequence number of its log.
pub fn load(sql: &SqlStorage) -> ApiResult<Option<(Session, u64)>> {
    if !exists(sql)? {
        return Ok(None);
    }
    let metas: Vec<Meta> = all(sql, "meta")?;
    let Some(meta) = metas.into_iter().next() else {
        return Ok(None);
    };
    let members: Vec<Member> = all(sql, "members")?;
    let clients: Vec<Client> = all(sql, "clients")?;
    let locks: Vec<Lock> = all(sql, "locks")?;
    let prompts: Vec<Prompt> = all(sql, "prompts")?;
    let last: Vec<NumRow> = sql
        .exec("SELECT COALESCE(MAX(seq), 0) AS n FROM events", None)
        .and_then(|c| c.to_array())
        .map_err(internal)?;
    let last_seq = last.first().map(|r| r.n as u64).unwrap_or(0);
    Ok(Some((
        Session::restore(meta, members, clients, locks, prompts),
        last_seq,
    )))
}

fn put<T: Serialize>(sql: &SqlStorage, table: &str, id: &str, value: Option<&T>) -> ApiResult<()> {
    match value {
        Some(v) => {
            let body = serde_json::to_string(v).map_err(internal)?;
            sql.exec(
                &format!("INSERT OR REPLACE INTO {table} (id, body) VALUES (?, ?)"),
                vec![id.into(), body.into()],
            )
            .map_err(internal)?;
        }
        None => {
            sql.exec(
                &format!("DELETE FROM {table} WHERE id = ?"),
                vec![id.into()],
            )
            .map_err(internal)?;
        }
    }
    Ok(())
}

/// Writes the rows named by `dirty` from the session's current state.
pub fn persist(sql: &SqlStorage, s: &Session, dirty: &[Dirty]) -> ApiResult<()> {
    for d in dirty {
        match d {
            Dirty::Meta => {
                let body = serde_json::to_string(&s.meta).map_err(internal)?;
                sql.exec(
                    "INSERT OR REPLACE INTO meta (k, body) VALUES ('session', ?)",
                    vec![body.into()],
                )
                .map_err(internal)?;
            }
            Dirty::Member(u) => put(sql, "members", u, s.members.get(u))?,
            Dirty::Client(c) => put(sql, "clients", c, s.clients.get(c))?,
            Dirty::Lock(r) => put(sql, "locks", r, s.locks.get(r))?,
            Dirty::Prompt(p) => put(sql, "prompts", p, s.queue.prompts.get(p))?,
        }
    }
    Ok(())
}

fn int(n: u64) -> SqlStorageValue {
    SqlStorageValue::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

/// Appends events to the log, numbering them after `last_seq`; returns them as stored.
pub fn append(
    sql: &SqlStorage,
    last_seq: &mut u64,
    at: u64,
    events: Vec<(Actor, EventKind)>,
) -> ApiResult<Vec<Event>> {
    let mut out = Vec::with_capacity(events.len());
    for (actor, kind) in events {
        let ev = Event {
            seq: *last_seq + 1,
            at,
            actor,
            kind,
        };
        let body = serde_json::to_string(&ev).map_err(internal)?;
        sql.exec(
            "INSERT INTO events (seq, at, body) VALUES (?, ?, ?)",
            vec![int(ev.seq), int(at), body.into()],
        )
        .map_err(internal)?;
        *last_seq = ev.seq;
        out.push(ev);
    }
    Ok(out)
}

/// Raw JSON of the events after `since`, in order, at most `limit`.
pub fn events_after(sql: &SqlStorage, since: u64, limit: u32) -> ApiResult<Vec<String>> {
    let rows: Vec<BodyRow> = sql
        .exec(
            "SELECT body FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            vec![int(since), int(u64::from(limit))],
        )
        .and_then(|c| c.to_array())
        .map_err(internal)?;
    Ok(rows.into_iter().map(|r| r.body).collect())
}

#[derive(Deserialize)]
struct RunnerRow {
    prompt: String,
    due: f64,
}

/// Records that the runner should finish `prompt` at `due`.
pub fn runner_schedule(sql: &SqlStorage, prompt: &str, due: u64) -> ApiResult<()> {
    sql.exec(
        "INSERT OR REPLACE INTO runner (prompt, due) VALUES (?, ?)",
        vec![prompt.into(), int(due)],
    )
    .map_err(internal)?;
    Ok(())
}

pub fn runner_cancel(sql: &SqlStorage, prompt: &str) -> ApiResult<()> {
    sql.exec("DELETE FROM runner WHERE prompt = ?", vec![prompt.into()])
        .map_err(internal)?;
    Ok(())
}

/// All scheduled runner completions.
pub fn runner_jobs(sql: &SqlStorage) -> ApiResult<Vec<(String, u64)>> {
    let rows: Vec<RunnerRow> = sql
        .exec("SELECT prompt, due FROM runner ORDER BY due", None)
        .and_then(|c| c.to_array())
        .map_err(internal)?;
    Ok(rows.into_iter().map(|r| (r.prompt, r.due as u64)).collect())
}

/// The session's sandbox link, if it ever had a sandbox.
pub fn load_link(sql: &SqlStorage) -> ApiResult<Option<nightshift_core::sandbox::SandboxLink>> {
    sql.exec(
        "CREATE TABLE IF NOT EXISTS sandbox_link (k INTEGER PRIMARY KEY CHECK (k = 1), body TEXT NOT NULL)",
        None,
    )
    .map_err(internal)?;
    let rows: Vec<BodyRow> = sql
        .exec("SELECT body FROM sandbox_link WHERE k = 1", None)
        .and_then(|c| c.to_array())
        .map_err(internal)?;
    match rows.first() {
        None => Ok(None),
        Some(r) => serde_json::from_str(&r.body).map(Some).map_err(internal),
    }
}

pub fn save_link(sql: &SqlStorage, link: &nightshift_core::sandbox::SandboxLink) -> ApiResult<()> {
    let body = serde_json::to_string(link).map_err(internal)?;
    sql.exec(
        "INSERT OR REPLACE INTO sandbox_link (k, body) VALUES (1, ?)",
        vec![body.into()],
    )
    .map_err(internal)?;
    Ok(())
}

fn kv_table(sql: &SqlStorage) -> ApiResult<()> {
    sql.exec(
        "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, body TEXT NOT NULL)",
        None,
    )
    .map_err(internal)?;
    Ok(())
}

/// A small JSON value the session keeps beside its state (snapshots, where its repository lives).
pub fn kv_get<T: serde::de::DeserializeOwned>(sql: &SqlStorage, k: &str) -> ApiResult<Option<T>> {
    kv_table(sql)?;
    let rows: Vec<BodyRow> = sql
        .exec("SELECT body FROM kv WHERE k = ?", vec![k.into()])
        .and_then(|c| c.to_array())
        .map_err(internal)?;
    match rows.first() {
        None => Ok(None),
        Some(r) => serde_json::from_str(&r.body).map(Some).map_err(internal),
    }
}

pub fn kv_put<T: serde::Serialize>(sql: &SqlStorage, k: &str, v: &T) -> ApiResult<()> {
    kv_table(sql)?;
    let body = serde_json::to_string(v).map_err(internal)?;
    sql.exec(
        "INSERT OR REPLACE INTO kv (k, body) VALUES (?, ?)",
        vec![k.into(), body.into()],
    )
    .map_err(internal)?;
    Ok(())
}

/// Pins of the stored bodies whose types live in the Worker crate (the core's are pinned in
/// `core/tests/stored_formats.rs`): each file holding such a type has its own
/// `mod stored_formats` using `pinned`.
#[cfg(test)]
pub mod stored_formats {
    use serde::de::DeserializeOwned;
    use serde::Serialize;

    /// Reads `literal` as a `T` and checks that writing it again gives `literal` byte for byte.
    pub fn pinned<T: Serialize + DeserializeOwned>(literal: &str) -> T {
        let value: T = serde_json::from_str(literal)
            .unwrap_or_else(|e| panic!("the stored form no longer reads: {e}\n{literal}"));
        let again = serde_json::to_string(&value)
            .unwrap_or_else(|e| panic!("the stored form no longer writes: {e}\n{literal}"));
        assert_eq!(again, literal, "the stored form changed");
        value
    }

    /// Reads an older stored form (fields added since are absent) as a `T`.
    pub fn older<T: DeserializeOwned>(literal: &str) -> T {
        serde_json::from_str(literal)
            .unwrap_or_else(|e| panic!("an older stored form no longer reads: {e}\n{literal}"))
    }
}
