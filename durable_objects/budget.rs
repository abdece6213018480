//! The GlobalBudget Durable Object: the deployment-wide cap on running background agents, lent to scheduler shards in slots (the rules — lending, the waiting list, the reconcile of lost slots — are core `budget`'s; this object stores them and carries out what they return).

use nightshift_core::budget::{Budget, Report, Request as SlotRequest, Wake};
use serde::Deserialize;
use serde_json::json;
use worker::*;

use crate::config;
use crate::error::{json_of, ApiError, ApiResult, EdgeError};
use crate::scheduler::on_shard;

/// How long after a shard starts waiting the alarm asks every holder to report (and every
/// waiter to ask again), repeated while any shard waits.
const RECONCILE_MS: i64 = 30_000;

#[derive(Deserialize)]
struct Hold {
    shard: String,
    n: i64,
}

#[derive(Deserialize)]
struct Shard {
    shard: String,
}

#[derive(Deserialize)]
struct Seen {
    shard: String,
    seq: i64,
}

/// An exchange from a shard: `n` slots, with its report (`seq`, `held`; absent from shards
/// that predate reconciling).
#[derive(Deserialize)]
struct Ask {
    shard: String,
    n: u32,
    #[serde(default)]
    held: Option<u32>,
    #[serde(default)]
    seq: Option<u64>,
}

impl Ask {
    fn report(&self) -> Option<Report> {
        Some(Report {
            seq: self.seq?,
            held: self.held?,
        })
    }
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

    /// While a shard waits: wakes every holder (it reports, and what leaked to it comes back)
    /// and every waiter (it asks again), then comes back if one still waits.
    async fn alarm(&self) -> Result<Response> {
        match self.load() {
            Ok(b) => {
                for Wake(shard) in b.alarm() {
                    let woke = on_shard(
                        &self.env,
                        &shard,
                        "budget:",
                        Method::Post,
                        "/wake",
                        None,
                        None,
                    )
                    .await;
                    if let Err(e) = woke {
                        console_error!("budget alarm, waking shard {shard}: {}", e.message);
                    }
                }
            }
            Err(e) => console_error!("budget alarm: {}", e.message),
        }
        let again = self.load().map_or(true, |b| b.needs_alarm());
        if again {
            self.state.storage().set_alarm(RECONCILE_MS).await?;
        }
        Response::ok("ok")
    }
}

impl GlobalBudget {
    fn sql(&self) -> ApiResult<SqlStorage> {
        let sql = self.state.storage().sql();
        sql.exec(
            "CREATE TABLE IF NOT EXISTS holds (shard TEXT PRIMARY KEY, n INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS waiting (shard TEXT PRIMARY KEY);
             CREATE TABLE IF NOT EXISTS seen (shard TEXT PRIMARY KEY, seq INTEGER NOT NULL);",
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

    fn load(&self) -> ApiResult<Budget> {
        let sql = self.sql()?;
        let waiting: Vec<Shard> = sql.exec("SELECT shard FROM waiting", None)?.to_array()?;
        let seen: Vec<Seen> = sql.exec("SELECT shard, seq FROM seen", None)?.to_array()?;
        Ok(Budget::restore(
            config::background_global_max(&self.env),
            self.holds()?
                .into_iter()
                .map(|h| (h.shard, u32::try_from(h.n).unwrap_or(0))),
            waiting.into_iter().map(|w| w.shard),
            seen.into_iter()
                .map(|s| (s.shard, u64::try_from(s.seq).unwrap_or(0))),
        ))
    }

    /// Stores what an exchange of `shard` may have changed: its row of slots, its place on the
    /// waiting list, the newest exchange seen from it.
    fn save(&self, b: &Budget, shard: &str) -> ApiResult<()> {
        let sql = self.sql()?;
        sql.exec(
            "INSERT OR REPLACE INTO holds (shard, n) VALUES (?, ?)",
            vec![
                shard.into(),
                SqlStorageValue::Integer(i64::from(b.held_by(shard))),
            ],
        )?;
        if b.waiting.contains(shard) {
            sql.exec(
                "INSERT OR IGNORE INTO waiting (shard) VALUES (?)",
                vec![shard.into()],
            )?;
        } else {
            sql.exec("DELETE FROM waiting WHERE shard = ?", vec![shard.into()])?;
        }
        if let Some(seq) = b.seen.get(shard) {
            sql.exec(
                "INSERT OR REPLACE INTO seen (shard, seq) VALUES (?, ?)",
                vec![
                    shard.into(),
                    SqlStorageValue::Integer(i64::try_from(*seq).unwrap_or(i64::MAX)),
                ],
            )?;
        }
        Ok(())
    }

    /// Sets the alarm when a shard waits and none is set.
    async fn arm(&self, b: &Budget) -> ApiResult<()> {
        let storage = self.state.storage();
        if b.needs_alarm() && storage.get_alarm().await?.is_none() {
            storage.set_alarm(RECONCILE_MS).await?;
        }
        Ok(())
    }

    async fn route(&self, mut req: Request) -> ApiResult<Response> {
        let path = req.path();
        match (req.method(), path.as_str()) {
            // Lends up to `n` slots (`granted`), or takes `n` back; `wake`: the shards to wake
            // because slots came back.
            (Method::Post, "/acquire" | "/release") => {
                let a: Ask = req.json().await.map_err(ApiError::internal)?;
                let request = if path == "/acquire" {
                    SlotRequest::Acquire(a.n)
                } else {
                    SlotRequest::Release(a.n)
                };
                let mut b = self.load()?;
                let answer = b.exchange(&a.shard, a.report(), request);
                self.save(&b, &a.shard)?;
                // The answer stands even if the alarm cannot be set (the next exchange tries).
                if let Err(e) = self.arm(&b).await {
                    console_error!("budget: setting the alarm: {}", e.message);
                }
                let wake: Vec<String> = answer.wake.into_iter().map(|Wake(s)| s).collect();
                match request {
                    SlotRequest::Acquire(_) => {
                        json_of(200, &json!({"granted": answer.granted, "wake": wake}))
                    }
                    SlotRequest::Release(_) => json_of(200, &json!({"wake": wake})),
                }
            }
            (Method::Get, "/status") => {
                let holds: Vec<_> = self
                    .holds()?
                    .into_iter()
                    .map(|h| json!({"shard": h.shard, "held": h.n}))
                    .collect();
                let cap = config::background_global_max(&self.env);
                json_of(200, &json!({"cap": cap, "holds": holds}))
            }
            _ => Err(EdgeError::NotFound("route").into()),
        }
    }
}
