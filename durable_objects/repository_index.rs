//! The RepositoryIndex Durable Object: the one list of registered repository names (for listing and the build schedule).

use worker::*;

use crate::error::{json_of, ApiError, ApiResult, EdgeError};

#[derive(serde::Deserialize)]
struct NameRow {
    name: String,
}

#[durable_object]
pub struct RepositoryIndex {
    state: State,
}

impl DurableObject for RepositoryIndex {
    fn new(state: State, _env: Env) -> Self {
        RepositoryIndex { state }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        match self.route(req).await {
            Ok(r) => Ok(r),
            Err(e) => e.into_response(),
        }
    }
}

impl RepositoryIndex {
    async fn route(&self, mut req: Request) -> ApiResult<Response> {
        let sql = self.state.storage().sql();
        sql.exec(
            "CREATE TABLE IF NOT EXISTS names (name TEXT PRIMARY KEY)",
            None,
        )?;
        match (req.method(), req.path().as_str()) {
            (Method::Post, "/add") => {
                let v: serde_json::Value = req.json().await.map_err(ApiError::internal)?;
                let name = v["name"].as_str().unwrap_or_default().to_string();
                sql.exec(
                    "INSERT OR IGNORE INTO names (name) VALUES (?)",
                    vec![name.into()],
                )?;
                json_of(200, &serde_json::json!({"added": true}))
            }
            (Method::Get, "/list") => {
                let rows: Vec<NameRow> = sql
                    .exec("SELECT name FROM names ORDER BY name LIMIT 1000", None)?
                    .to_array()?;
                let names: Vec<String> = rows.into_iter().map(|r| r.name).collect();
                json_of(200, &serde_json::json!({"names": names}))
            }
            _ => Err(EdgeError::NotFound("route").into()),
        }
    }
}
