//! The RepositoryIndex Durable Object: the one list of registered repository names (for listing and the build schedule).

use worker::*;

use crate::error::{json_of, ApiResult, EdgeError};
use crate::objects::{read_body, Added, Names, Removed, RepositoryIndexRoute, RepositoryName};

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
        let Some(route) = RepositoryIndexRoute::parse(&req.method(), &req.path()) else {
            return Err(EdgeError::NotFound("route").into());
        };
        match route {
            RepositoryIndexRoute::Add => {
                let entry: RepositoryName = read_body(&mut req).await?;
                sql.exec(
                    "INSERT OR IGNORE INTO names (name) VALUES (?)",
                    vec![entry.name.into()],
                )?;
                json_of(200, &Added { added: true })
            }
            RepositoryIndexRoute::Remove => {
                let entry: RepositoryName = read_body(&mut req).await?;
                sql.exec("DELETE FROM names WHERE name = ?", vec![entry.name.into()])?;
                json_of(200, &Removed { removed: true })
            }
            RepositoryIndexRoute::List => {
                let rows: Vec<NameRow> = sql
                    .exec("SELECT name FROM names ORDER BY name LIMIT 1000", None)?
                    .to_array()?;
                let names: Vec<String> = rows.into_iter().map(|r| r.name).collect();
                json_of(200, &Names { names })
            }
        }
    }
}
