//! The UserIndex Durable Object: one per person, listing the sessions they own or joined.

use serde::{Deserialize, Serialize};
use worker::*;

use crate::error::{json_of, json_response, ApiError, ApiResult, EdgeError};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionEntry {
    pub id: String,
    pub title: String,
    #[serde(default)]
    pub repository: Option<String>,
    pub role: String,
    pub joined_at: u64,
    /// `active` or `ended`, kept up to date by the session when it ends.
    #[serde(default = "active")]
    pub status: String,
}

fn active() -> String {
    "active".into()
}

#[derive(Deserialize)]
struct BodyRow {
    body: String,
}

#[durable_object]
pub struct UserIndex {
    state: State,
}

impl DurableObject for UserIndex {
    fn new(state: State, _env: Env) -> Self {
        UserIndex { state }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        match self.route(req).await {
            Ok(r) => Ok(r),
            Err(e) => e.into_response(),
        }
    }
}

impl UserIndex {
    fn sql(&self) -> Result<SqlStorage> {
        let sql = self.state.storage().sql();
        sql.exec(
            "CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, joined_at INTEGER NOT NULL, body TEXT NOT NULL)",
            None,
        )?;
        Ok(sql)
    }

    async fn route(&self, mut req: Request) -> ApiResult<Response> {
        match (req.method(), req.path().as_str()) {
            (Method::Post, "/add") => {
                let e: SessionEntry = req.json().await.map_err(ApiError::internal)?;
                let body = serde_json::to_string(&e).map_err(ApiError::internal)?;
                self.sql()?.exec(
                    "INSERT OR REPLACE INTO sessions (id, joined_at, body) VALUES (?, ?, ?)",
                    vec![
                        e.id.as_str().into(),
                        SqlStorageValue::Integer(i64::try_from(e.joined_at).unwrap_or(0)),
                        body.into(),
                    ],
                )?;
                json_of(200, &e)
            }
            (Method::Post, "/remove") => {
                let e: serde_json::Value = req.json().await.map_err(ApiError::internal)?;
                let id = e
                    .get("id")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string();
                self.sql()?
                    .exec("DELETE FROM sessions WHERE id = ?", vec![id.into()])?;
                json_of(200, &serde_json::json!({ "removed": true }))
            }
            (Method::Post, "/status") => {
                let v: serde_json::Value = req.json().await.map_err(ApiError::internal)?;
                let id = v["id"].as_str().unwrap_or_default().to_string();
                let status = v["status"].as_str().unwrap_or("active").to_string();
                let sql = self.sql()?;
                let rows: Vec<BodyRow> = sql
                    .exec(
                        "SELECT body FROM sessions WHERE id = ?",
                        vec![id.as_str().into()],
                    )?
                    .to_array()?;
                if let Some(row) = rows.first() {
                    let mut e: SessionEntry =
                        serde_json::from_str(&row.body).map_err(ApiError::internal)?;
                    e.status = status;
                    let body = serde_json::to_string(&e).map_err(ApiError::internal)?;
                    sql.exec(
                        "UPDATE sessions SET body = ? WHERE id = ?",
                        vec![body.into(), id.into()],
                    )?;
                }
                json_of(200, &serde_json::json!({ "updated": !rows.is_empty() }))
            }
            (Method::Get, "/list") => {
                let rows: Vec<BodyRow> = self
                    .sql()?
                    .exec(
                        "SELECT body FROM sessions ORDER BY joined_at DESC LIMIT 500",
                        None,
                    )?
                    .to_array()?;
                let bodies: Vec<String> = rows.into_iter().map(|r| r.body).collect();
                json_response(200, format!("{{\"sessions\":[{}]}}", bodies.join(",")))
                    .map_err(ApiError::from)
            }
            _ => Err(EdgeError::NotFound("route").into()),
        }
    }
}

/// The rows of the `sessions` table.
#[cfg(test)]
mod stored_formats {
    use super::SessionEntry;
    use crate::store::stored_formats::{older, pinned};

    #[test]
    fn session_entry_format_unchanged() {
        pinned::<SessionEntry>(
            r#"{"id":"ses_1","title":"Fix the login","repository":"acme/web","role":"owner","joined_at":1700000000000,"status":"ended"}"#,
        );
        // Before entries recorded a repository and the session's status.
        let e = older::<SessionEntry>(
            r#"{"id":"ses_1","title":"Fix the login","role":"member","joined_at":1700000000000}"#,
        );
        assert_eq!((e.repository, e.status.as_str()), (None, "active"));
    }
}
