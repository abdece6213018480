//! Session persistence in Durable Object SQLite: the core's storage seam (`nightshift_core::store::Rows`) over the object's tables.
//!
//! Which rows a step writes, how events are numbered and how a session is read back are the
//! core's (`core/src/store.rs`); this file only maps a typed key to its table and row.

use nightshift_core::store::{self as core_store, Key, Kv, Rows, StoreError, StoreResult, Table};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use worker::{SqlStorage, SqlStorageValue};

use crate::error::{ApiError, ApiResult};

/// The session's tables (also read by the bench's runtime floor, `tests/floor/`).
const SCHEMA: &str = include_str!("session_schema.sql");

#[derive(Deserialize)]
struct BodyRow {
    body: String,
}

#[derive(Deserialize)]
struct IdRow {
    id: String,
    body: String,
}

#[derive(Deserialize)]
struct NumRow {
    n: f64,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::internal(e)
    }
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

fn int(n: u64) -> SqlStorageValue {
    SqlStorageValue::Integer(i64::try_from(n).unwrap_or(i64::MAX))
}

/// The id column of a table (and the value stored in it for `key`).
fn id_column(table: Table) -> &'static str {
    match table {
        Table::Meta | Table::Kv => "k",
        Table::Runner => "prompt",
        Table::Link => "k",
        _ => "id",
    }
}

fn id_value(key: &Key) -> SqlStorageValue {
    match key {
        Key::Link => SqlStorageValue::Integer(1),
        other => other.id().into(),
    }
}

/// A session object's tables, as the core's rows.
pub struct SqlRows(pub SqlStorage);

impl SqlRows {
    fn rows<T: DeserializeOwned>(
        &self,
        query: &str,
        args: Vec<SqlStorageValue>,
    ) -> StoreResult<Vec<T>> {
        self.0
            .exec(query, Some(args))
            .and_then(|c| c.to_array())
            .map_err(io)
    }
}

impl Rows for SqlRows {
    fn create(&mut self) -> StoreResult<()> {
        // One call for all statements: one crossing into the runtime instead of nine.
        self.0.exec(SCHEMA, None).map_err(io)?;
        Ok(())
    }

    fn exists(&self) -> StoreResult<bool> {
        let rows: Vec<NumRow> = self.rows(
            "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
            Vec::new(),
        )?;
        Ok(rows.first().is_some_and(|r| r.n > 0.0))
    }

    fn get(&self, key: &Key) -> StoreResult<Option<String>> {
        let table = key.table();
        if table == Table::Runner {
            let rows: Vec<NumRow> = self.rows(
                "SELECT due AS n FROM runner WHERE prompt = ?",
                vec![id_value(key)],
            )?;
            return Ok(rows.first().map(|r| (r.n as u64).to_string()));
        }
        let query = format!(
            "SELECT body FROM {} WHERE {} = ?",
            table.name(),
            id_column(table)
        );
        let rows: Vec<BodyRow> = self.rows(&query, vec![id_value(key)])?;
        Ok(rows.into_iter().next().map(|r| r.body))
    }

    fn put(&mut self, key: &Key, body: &str) -> StoreResult<()> {
        let table = key.table();
        if table == Table::Runner {
            let due: u64 = body.parse().map_err(io)?;
            self.0
                .exec(
                    "INSERT OR REPLACE INTO runner (prompt, due) VALUES (?, ?)",
                    Some(vec![id_value(key), int(due)]),
                )
                .map_err(io)?;
            return Ok(());
        }
        let query = format!(
            "INSERT OR REPLACE INTO {} ({}, body) VALUES (?, ?)",
            table.name(),
            id_column(table)
        );
        self.0
            .exec(&query, Some(vec![id_value(key), body.into()]))
            .map_err(io)?;
        Ok(())
    }

    fn delete(&mut self, key: &Key) -> StoreResult<()> {
        let table = key.table();
        let query = format!(
            "DELETE FROM {} WHERE {} = ?",
            table.name(),
            id_column(table)
        );
        self.0.exec(&query, Some(vec![id_value(key)])).map_err(io)?;
        Ok(())
    }

    fn scan(&self, table: Table) -> StoreResult<Vec<(String, String)>> {
        if table == Table::Runner {
            #[derive(Deserialize)]
            struct Job {
                prompt: String,
                due: f64,
            }
            let jobs: Vec<Job> = self.rows("SELECT prompt, due FROM runner", Vec::new())?;
            return Ok(jobs
                .into_iter()
                .map(|j| (j.prompt, (j.due as u64).to_string()))
                .collect());
        }
        let query = format!(
            "SELECT CAST({} AS TEXT) AS id, body FROM {}",
            id_column(table),
            table.name()
        );
        let rows: Vec<IdRow> = self.rows(&query, Vec::new())?;
        Ok(rows.into_iter().map(|r| (r.id, r.body)).collect())
    }

    fn append(&mut self, seq: u64, at: u64, body: &str) -> StoreResult<()> {
        self.0
            .exec(
                "INSERT INTO events (seq, at, body) VALUES (?, ?, ?)",
                Some(vec![int(seq), int(at), body.into()]),
            )
            .map_err(io)?;
        Ok(())
    }

    fn last_seq(&self) -> StoreResult<u64> {
        let rows: Vec<NumRow> =
            self.rows("SELECT COALESCE(MAX(seq), 0) AS n FROM events", Vec::new())?;
        Ok(rows.first().map(|r| r.n as u64).unwrap_or(0))
    }

    fn events_after(&self, since: u64, limit: u32) -> StoreResult<Vec<String>> {
        let rows: Vec<BodyRow> = self.rows(
            "SELECT body FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            vec![int(since), int(u64::from(limit))],
        )?;
        Ok(rows.into_iter().map(|r| r.body).collect())
    }
}

/// Raw JSON of the events after `since`, in order, at most `limit`.
pub fn events_after(sql: &SqlStorage, since: u64, limit: u32) -> ApiResult<Vec<String>> {
    Ok(SqlRows(sql.clone()).events_after(since, limit)?)
}

/// A small JSON value the session keeps beside its state (snapshots, where its repository lives).
pub fn kv_get<T: DeserializeOwned>(sql: &SqlStorage, k: Kv) -> ApiResult<Option<T>> {
    Ok(core_store::get(&SqlRows(sql.clone()), &Key::Kv(k))?)
}

pub fn kv_put<T: serde::Serialize>(sql: &SqlStorage, k: Kv, v: &T) -> ApiResult<()> {
    Ok(core_store::put(
        &mut SqlRows(sql.clone()),
        &Key::Kv(k),
        Some(v),
    )?)
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
