//! The GlobalBudget Durable Object: the deployment-wide cap on running background agents, lent to scheduler shards in slots (the rules — lending, the waiting list, the reconcile of lost slots — are core `budget`'s; this object stores them and carries out what they return).

use nightshift_core::budget::{Budget, Report, Request as SlotRequest, Wake};
use serde::Deserialize;
use worker::*;

use crate::config;
use crate::error::{json_of, ApiResult, EdgeError};
use crate::objects::{read_body, BudgetRoute, BudgetStatus, ShardHold, SlotAnswer, SlotAsk};
use crate::scheduler::wake_shards;

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

/// The report an exchange carries (absent from shards that predate reconciling).
fn report_of(ask: &SlotAsk) -> Option<Report> {
    Some(Report {
        seq: ask.seq?,
        held: ask.held?,
    })
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
                let shards = b.alarm().into_iter().map(|Wake(shard)| shard);
                wake_shards(&self.env, shards, "budget alarm").await;
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
        let Some(route) = BudgetRoute::parse(&req.method(), &req.path()) else {
            return Err(EdgeError::NotFound("route").into());
        };
        match route {
            // Lends up to `n` slots (`granted`), or takes `n` back; `wake`: the shards to wake
            // because slots came back.
            BudgetRoute::Acquire | BudgetRoute::Release => {
                let ask: SlotAsk = read_body(&mut req).await?;
                let request = if route == BudgetRoute::Acquire {
                    SlotRequest::Acquire(ask.n)
                } else {
                    SlotRequest::Release(ask.n)
                };
                let mut budget = self.load()?;
                let answer = budget.exchange(&ask.shard, report_of(&ask), request);
                self.save(&budget, &ask.shard)?;
                // The answer stands even if the alarm cannot be set (the next exchange tries).
                if let Err(e) = self.arm(&budget).await {
                    console_error!("budget: setting the alarm: {}", e.message);
                }
                let wake: Vec<String> = answer.wake.into_iter().map(|Wake(s)| s).collect();
                let granted = match request {
                    SlotRequest::Acquire(_) => Some(answer.granted),
                    SlotRequest::Release(_) => None,
                };
                json_of(200, &SlotAnswer { granted, wake })
            }
            BudgetRoute::Status => {
                let holds: Vec<ShardHold> = self
                    .holds()?
                    .into_iter()
                    .map(|h| ShardHold {
                        held: h.n,
                        shard: h.shard,
                    })
                    .collect();
                let cap = config::background_global_max(&self.env);
                json_of(200, &BudgetStatus { cap, holds })
            }
        }
    }
}
