//! The GlobalBudget Durable Object: the deployment-wide cap on running background agents, lent to scheduler shards in slots (a shard asks only when its need changes, so shards never wait on each other's work).

use serde::Deserialize;
use serde_json::json;
use worker::*;

use crate::config;
use crate::error::{json_of, ApiError, ApiResult, EdgeError};

#[derive(Deserialize)]
struct Hold {
    shard: String,
    n: i64,
}

#[derive(Deserialize)]
struct Ask {
    shard: String,
    n: u32,
}

#[durable_object]
pub struct GlobalBudget {
    state: State,
    env: Env,
}

impl DurableObject for GlobalBudget {
    fn new(state: State, env: Env) -> Self {
        GlobalBudget { state, env }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        match self.route(req).await {
            Ok(r) => Ok(r),
            Err(e) => e.into_response(),
        }
    }
}

impl GlobalBudget {
    fn sql(&self) -> ApiResult<SqlStorage> {
        let sql = self.state.storage().sql();
        sql.exec(
            "CREATE TABLE IF NOT EXISTS holds (shard TEXT PRIMARY KEY, n INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS waiting (shard TEXT PRIMARY KEY);",
            None,
        )?;
        Ok(sql)
    }

    fn holds(&self) -> ApiResult<Vec<Hold>> {
        Ok(self
            .sql()?
            .exec("SELECT shard, n FROM holds", None)?
            .to_array()?)
    }

    fn held_by(&self, shard: &str) -> ApiResult<i64> {
        Ok(self
            .holds()?
            .into_iter()
            .find(|h| h.shard == shard)
            .map_or(0, |h| h.n))
    }

    fn set(&self, shard: &str, n: i64) -> ApiResult<()> {
        self.sql()?.exec(
            "INSERT OR REPLACE INTO holds (shard, n) VALUES (?, ?)",
            vec![shard.into(), SqlStorageValue::Integer(n.max(0))],
        )?;
        Ok(())
    }

    async fn route(&self, mut req: Request) -> ApiResult<Response> {
        let cap = i64::from(config::background_global_max(&self.env));
        match (req.method(), req.path().as_str()) {
            // Lends up to `n` slots; a shard that got fewer than it asked for is woken when
            // slots come back.
            (Method::Post, "/acquire") => {
                let a: Ask = req.json().await.map_err(ApiError::internal)?;
                let used: i64 = self.holds()?.iter().map(|h| h.n).sum();
                let granted = i64::from(a.n).min((cap - used).max(0));
                self.set(&a.shard, self.held_by(&a.shard)? + granted)?;
                let sql = self.sql()?;
                if granted < i64::from(a.n) {
                    sql.exec(
                        "INSERT OR IGNORE INTO waiting (shard) VALUES (?)",
                        vec![a.shard.as_str().into()],
                    )?;
                } else {
                    sql.exec(
                        "DELETE FROM waiting WHERE shard = ?",
                        vec![a.shard.as_str().into()],
                    )?;
                }
                json_of(200, &json!({"granted": granted}))
            }
            (Method::Post, "/release") => {
                let a: Ask = req.json().await.map_err(ApiError::internal)?;
                self.set(&a.shard, self.held_by(&a.shard)? - i64::from(a.n))?;
                #[derive(Deserialize)]
                struct Waiting {
                    shard: String,
                }
                let waiting: Vec<Waiting> = self
                    .sql()?
                    .exec("SELECT shard FROM waiting", None)?
                    .to_array()?;
                self.sql()?.exec("DELETE FROM waiting", None)?;
                let shards: Vec<String> = waiting
                    .into_iter()
                    .map(|w| w.shard)
                    .filter(|s| s != &a.shard)
                    .collect();
                json_of(200, &json!({"wake": shards}))
            }
            (Method::Get, "/status") => {
                let holds: Vec<_> = self
                    .holds()?
                    .into_iter()
                    .map(|h| json!({"shard": h.shard, "held": h.n}))
                    .collect();
                json_of(200, &json!({"cap": cap, "holds": holds}))
            }
            _ => Err(EdgeError::NotFound("route").into()),
        }
    }
}
