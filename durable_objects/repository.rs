//! The RepositoryObject Durable Object: one per registered repository — its settings, image builds and warm pool (rules in core `repository` and `pool`).

use nightshift_core::pool::{self, Pool, Slot, Work};
use nightshift_core::repository::{cron_slot, Change, Registry, Settings};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{json, Value};
use worker::*;

use crate::config;
use crate::error::{json_of, ApiError, ApiResult, EdgeError};
use crate::platform::now_ms;
use crate::provider;

#[derive(Deserialize)]
struct BodyRow {
    body: String,
}

/// A session asks for a sandbox: a warm one is assigned to it at once, or it is told how to start one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    pub session_id: String,
    pub control_url: String,
    pub sandbox_token: String,
    /// `false`: only say how to start one (the session continues pushed work, which a
    /// pooled sandbox synced to the base does not have).
    #[serde(default = "yes")]
    pub take: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ClaimAnswer {
    /// The pooled sandbox now working for the session; `None`: start one (from `image`).
    pub sandbox: Option<String>,
    pub expires_at: Option<u64>,
    pub image: Option<String>,
    pub clone_url: String,
    pub base_branch: String,
    /// The repository's egress allowlist (beyond the provider's defaults).
    #[serde(default)]
    pub egress: Vec<String>,
}

#[durable_object]
pub struct RepositoryObject {
    state: State,
    env: Env,
}

impl DurableObject for RepositoryObject {
    fn new(state: State, env: Env) -> Self {
        RepositoryObject { state, env }
    }

    async fn fetch(&self, req: Request) -> Result<Response> {
        match self.route(req).await {
            Ok(r) => Ok(r),
            Err(e) => e.into_response(),
        }
    }

    async fn alarm(&self) -> Result<Response> {
        if let Err(e) = self.tick().await {
            console_error!("repository alarm: {}", e.message);
            // Try again soon: a provider hiccup must not stop the pool.
            self.state.storage().set_alarm(5_000).await?;
        }
        Response::ok("ok")
    }
}

fn not_registered() -> ApiError {
    EdgeError::RepositoryNotRegistered.into()
}

impl RepositoryObject {
    fn sql(&self) -> ApiResult<SqlStorage> {
        let sql = self.state.storage().sql();
        sql.exec(
            "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, body TEXT NOT NULL)",
            None,
        )?;
        Ok(sql)
    }

    fn load<T: DeserializeOwned>(&self, k: &str) -> ApiResult<Option<T>> {
        let rows: Vec<BodyRow> = self
            .sql()?
            .exec("SELECT body FROM kv WHERE k = ?", vec![k.into()])?
            .to_array()?;
        match rows.first() {
            Some(r) => Ok(Some(
                serde_json::from_str(&r.body).map_err(ApiError::internal)?,
            )),
            None => Ok(None),
        }
    }

    fn save<T: Serialize>(&self, k: &str, v: &T) -> ApiResult<()> {
        let body = serde_json::to_string(v).map_err(ApiError::internal)?;
        self.sql()?.exec(
            "INSERT OR REPLACE INTO kv (k, body) VALUES (?, ?)",
            vec![k.into(), body.into()],
        )?;
        Ok(())
    }

    fn settings(&self) -> ApiResult<Settings> {
        self.load("settings")?.ok_or_else(not_registered)
    }

    fn registry(&self) -> ApiResult<Registry> {
        Ok(self.load("registry")?.unwrap_or_default())
    }

    fn pool(&self) -> ApiResult<Pool> {
        Ok(self.load("pool")?.unwrap_or_default())
    }

    /// Changes the pool in one synchronous step (no await between load and save).
    fn with_pool<T>(&self, f: impl FnOnce(&mut Pool) -> T) -> ApiResult<T> {
        let mut p = self.pool()?;
        let out = f(&mut p);
        self.save("pool", &p)?;
        Ok(out)
    }

    fn with_registry<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> ApiResult<T> {
        let mut r = self.registry()?;
        let out = f(&mut r);
        self.save("registry", &r)?;
        Ok(out)
    }

    async fn body<T: DeserializeOwned>(req: &mut Request) -> ApiResult<T> {
        let bytes = req.bytes().await.map_err(ApiError::internal)?;
        Ok(nightshift_core::wire::parse_body(&bytes)?)
    }

    async fn route(&self, mut req: Request) -> ApiResult<Response> {
        let path = req.path();
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match (req.method(), segs.as_slice()) {
            (Method::Post, ["register"]) => {
                let s: Settings = Self::body(&mut req).await?;
                self.register(s).await
            }
            (Method::Get, ["info"]) => json_of(200, &self.info()?),
            (Method::Patch, ["settings"]) => {
                let c: Change = Self::body(&mut req).await?;
                self.change(c).await
            }
            (Method::Post, ["builds"]) => {
                self.settings()?;
                let (st, v) = self.start_build("manual").await?;
                json_of(st, &v)
            }
            (Method::Get, ["builds", image, "logs"]) => {
                self.settings()?;
                if !self.registry()?.builds.iter().any(|b| b.image == *image) {
                    return Err(EdgeError::BuildNotFound.into());
                }
                let follow = req.url()?.query().unwrap_or_default().contains("follow=1");
                let q = if follow { "?follow=1" } else { "" };
                Ok(provider::send(
                    &self.env,
                    Method::Get,
                    &format!("/v1/images/{image}/logs{q}"),
                    None,
                )
                .await?)
            }
            (Method::Post, ["rollback"]) => {
                #[derive(Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Rollback {
                    image: String,
                }
                let b: Rollback = Self::body(&mut req).await?;
                self.settings()?;
                self.with_registry(|r| r.rollback(&b.image))??;
                self.with_pool(|p| p.new_image(&b.image))?;
                self.wake(0).await?;
                json_of(200, &self.info()?)
            }
            (Method::Post, ["cron"]) => {
                // The slot of the delivery's scheduled time (`at`; a duplicated delivery carries
                // the same one), else of now.
                let at = req
                    .url()?
                    .query_pairs()
                    .find(|(k, _)| k == "at")
                    .and_then(|(_, v)| v.parse::<u64>().ok())
                    .unwrap_or_else(now_ms);
                let s = self.settings()?;
                let Some(slot) = cron_slot(at, s.build_every_min) else {
                    return json_of(
                        200,
                        &json!({"built": false, "why": "scheduled builds are off"}),
                    );
                };
                let reason = format!("cron:{slot}");
                let r = self.registry()?;
                // The slot is recorded as taken before any I/O, as the pool records a refill
                // before asking: from this check to the save below nothing awaits, so of two
                // overlapping deliveries exactly one goes on to build.
                let taken: Option<u64> = self.load::<Option<u64>>("cron_slot")?.flatten();
                if r.has_reason(&reason) || taken == Some(slot) {
                    return json_of(
                        200,
                        &json!({"built": false, "why": "already built in this slot"}),
                    );
                }
                if r.building().is_some() {
                    return json_of(200, &json!({"built": false, "why": "a build is running"}));
                }
                self.save("cron_slot", &Some(slot))?;
                match self.start_build(&reason).await {
                    Ok((_, v)) => json_of(200, &json!({"built": true, "build": v})),
                    Err(e) => {
                        // Nothing was built: a later delivery in this slot may try again.
                        self.save("cron_slot", &taken)?;
                        Err(e)
                    }
                }
            }
            (Method::Post, ["claim"]) => {
                let c: ClaimRequest = Self::body(&mut req).await?;
                json_of(200, &self.claim(c).await?)
            }
            _ => Err(EdgeError::NotFound("route").into()),
        }
    }

    async fn register(&self, s: Settings) -> ApiResult<Response> {
        s.validate()?;
        if self.load::<Settings>("settings")?.is_some() {
            return Err(EdgeError::RepositoryExists(s.name).into());
        }
        self.save("settings", &s)?;
        self.save("registry", &Registry::default())?;
        self.save("pool", &Pool::new(s.pool_size, None))?;
        // The first image is built at once; the pool fills from a plain clone meanwhile.
        self.start_build("registered").await?;
        self.wake(0).await?;
        json_of(201, &self.info()?)
    }

    async fn change(&self, c: Change) -> ApiResult<Response> {
        let old = self.settings()?;
        let new = old.apply(c)?;
        self.save("settings", &new)?;
        if new.pool_size != old.pool_size {
            self.with_pool(|p| p.resize(new.pool_size))?;
        }
        let image_inputs = (&new.clone_url, &new.base_branch, &new.setup, &new.test);
        if image_inputs != (&old.clone_url, &old.base_branch, &old.setup, &old.test) {
            self.start_build("settings").await?;
        }
        self.wake(0).await?;
        json_of(200, &self.info()?)
    }

    fn info(&self) -> ApiResult<Value> {
        let s = self.settings()?;
        let r = self.registry()?;
        let p = self.pool()?;
        let count = |slot: Slot| p.entries.values().filter(|e| e.slot == slot).count();
        let builds: Vec<Value> = r
            .builds
            .iter()
            .rev()
            .map(|b| {
                let mut v = serde_json::to_value(b).unwrap_or(Value::Null);
                v["tags"] = json!(r.tags(b));
                v
            })
            .collect();
        Ok(json!({
            "repository": s,
            "latest_image": r.latest,
            "builds": builds,
            "pool": {
                "target": p.target,
                "image": p.image,
                "ready": count(Slot::Ready),
                "booting": count(Slot::Booting) + count(Slot::Requested),
                "draining": count(Slot::Draining),
                "claimed": p.claims.len(),
                "sandboxes": p.entries.values().collect::<Vec<_>>(),
            },
        }))
    }

    /// Asks the provider for an image build and records it; one build at a time.
    async fn start_build(&self, reason: &str) -> ApiResult<(u16, Value)> {
        let s = self.settings()?;
        if let Some(b) = self.registry()?.building() {
            return Ok((202, serde_json::to_value(b).map_err(ApiError::internal)?));
        }
        let body = json!({
            "repository": {"clone_url": s.clone_url, "base_branch": s.base_branch, "egress": s.egress},
            "setup": s.setup, "test": s.test,
            "timeout_ms": config::build_timeout_ms(&self.env),
            "labels": {"repository": s.name, "reason": reason},
        });
        let (st, v) = provider::call(&self.env, Method::Post, "/v1/images", Some(&body)).await?;
        if st != 201 {
            return Err(EdgeError::BuildRefused {
                status: st,
                reason: v["error"]["message"]
                    .as_str()
                    .unwrap_or("no reason given")
                    .to_string(),
            }
            .into());
        }
        let image = v["id"].as_str().unwrap_or_default().to_string();
        let now = now_ms();
        let reason = reason.to_string();
        let b = self.with_registry(|r| {
            // A second build started meanwhile (a manual one beside a cron): keep both, record this one.
            r.started(&image, &reason, now);
            r.builds.last().cloned()
        })?;
        self.wake(0).await?;
        Ok((201, serde_json::to_value(b).map_err(ApiError::internal)?))
    }

    async fn claim(&self, c: ClaimRequest) -> ApiResult<ClaimAnswer> {
        let s = self.settings()?;
        let image = self.registry()?.latest;
        let mut answer = ClaimAnswer {
            sandbox: None,
            expires_at: None,
            image: image.clone(),
            clone_url: s.clone_url,
            base_branch: s.base_branch,
            egress: s.egress,
        };
        if !c.take {
            return Ok(answer);
        }
        let Some(sbx) = self.with_pool(|p| p.claim(&c.session_id))? else {
            return Ok(answer);
        };
        let body = json!({"session_id": c.session_id,
            "supervisor": {"control_url": c.control_url, "sandbox_token": c.sandbox_token}});
        let path = format!("/v1/sandboxes/{sbx}/assign");
        let assigned = provider::call(&self.env, Method::Post, &path, Some(&body)).await;
        match assigned {
            Ok((200, v)) => {
                // Handed over: the claim is done (a later claim of this session, after its
                // sandbox is gone, gets a new one; this one is never handed out again).
                self.with_pool(|p| p.unclaim(&c.session_id))?;
                answer.sandbox = Some(sbx);
                answer.expires_at = v["expires_at"].as_u64();
                answer.image = v["image"].as_str().map(String::from);
            }
            other => {
                // Not usable after all: the session starts one itself; this one is retired.
                console_error!("assigning pooled sandbox {sbx} failed: {other:?}");
                self.with_pool(|p| p.unclaim(&c.session_id))?;
                let _ = provider::terminate(&self.env, &sbx).await;
            }
        }
        self.wake(0).await?;
        Ok(answer)
    }

    async fn wake(&self, after_ms: i64) -> ApiResult<()> {
        let storage = self.state.storage();
        let current = storage.get_alarm().await?;
        let at = i64::try_from(now_ms())
            .unwrap_or(i64::MAX)
            .saturating_add(after_ms);
        if current.is_none_or(|c| c > at) {
            storage.set_alarm(after_ms).await?;
        }
        Ok(())
    }

    /// One round of upkeep: follow builds, boot and refill the pool, drain old sandboxes.
    /// Safe to run twice at once (duplicated alarms): every step re-reads the state.
    async fn tick(&self) -> ApiResult<()> {
        let Ok(settings) = self.settings() else {
            return Ok(());
        };
        // Builds in progress.
        let building: Vec<String> = self
            .registry()?
            .builds
            .iter()
            .filter(|b| b.status == "building")
            .map(|b| b.image.clone())
            .collect();
        for image in building {
            let (st, v) =
                provider::call(&self.env, Method::Get, &format!("/v1/images/{image}"), None)
                    .await?;
            let status = v["status"].as_str().unwrap_or_default();
            if st == 200 && status == "building" {
                continue;
            }
            let ok = st == 200 && status == "ready";
            let error = (!ok).then(|| {
                format!(
                    "{}: {}",
                    v["error"]["code"].as_str().unwrap_or("image_not_found"),
                    v["error"]["message"]
                        .as_str()
                        .unwrap_or("the provider lost the build")
                )
            });
            let now = now_ms();
            let done = self.with_registry(|r| {
                r.finished(
                    &image,
                    ok,
                    v["commit"].as_str().map(String::from),
                    v["test_exit_code"].as_i64().map(|c| c as i32),
                    error,
                    now,
                )
            })?;
            if let Some(img) = &done.new_latest {
                self.with_pool(|p| p.new_image(img))?;
            }
            for old in done.dropped {
                let _ = provider::call(
                    &self.env,
                    Method::Delete,
                    &format!("/v1/images/{old}"),
                    None,
                )
                .await;
            }
        }
        // Requested or booting too long (a lost create answer, a sandbox that never boots): given
        // up; booting ones drain below, unrecorded creates are swept by their key label.
        let now = now_ms();
        self.with_pool(|p| p.expire(now, pool::PENDING_TIMEOUT_MS))?;
        for key in self.pool()?.pending_sweeps() {
            let (st, v) = provider::call(
                &self.env,
                Method::Get,
                &format!("/v1/sandboxes?label=pool_key:{key}"),
                None,
            )
            .await?;
            if st != 200 {
                continue;
            }
            let mut all_gone = true;
            for sbx in v["sandboxes"].as_array().into_iter().flatten() {
                if sbx["labels"]["pool"].as_str() != Some(settings.name.as_str()) {
                    continue;
                }
                let Some(id) = sbx["id"].as_str() else {
                    continue;
                };
                let (st, _) = provider::terminate(&self.env, id).await?;
                all_gone &= st == 200 || st == 404;
            }
            if all_gone {
                self.with_pool(|p| p.swept(&key))?;
            }
        }
        // Booting and ready sandboxes: ready, or gone.
        let watched: Vec<(String, String, Slot)> = self
            .pool()?
            .entries
            .iter()
            .filter(|(_, e)| matches!(e.slot, Slot::Booting | Slot::Ready))
            .filter_map(|(k, e)| e.sandbox.clone().map(|s| (k.clone(), s, e.slot)))
            .collect();
        for (key, sbx, slot) in watched {
            let (st, v) = provider::call(
                &self.env,
                Method::Get,
                &format!("/v1/sandboxes/{sbx}"),
                None,
            )
            .await?;
            let status = v["status"].as_str().unwrap_or_default();
            if st == 404 || matches!(status, "failed" | "terminated" | "stopped") {
                self.with_pool(|p| p.lost(&key))?;
                if status == "stopped" {
                    let _ = provider::terminate(&self.env, &sbx).await;
                }
            } else if slot == Slot::Booting && status == "ready" {
                self.with_pool(|p| p.booted(&key))?;
            }
        }
        // Drains owed.
        for (key, sbx) in self.pool()?.pending_drains() {
            let (st, _) = provider::terminate(&self.env, &sbx).await?;
            if st == 200 || st == 404 {
                self.with_pool(|p| p.drained(&key))?;
            }
        }
        // Refill (recorded before the provider is asked).
        let now = now_ms();
        let work = self.with_pool(|p| p.refill(now))?;
        for w in work {
            let Work::Create { key, image } = w else {
                continue;
            };
            let body = json!({
                "session_id": null,
                "repository": {"clone_url": settings.clone_url, "base_branch": settings.base_branch, "egress": settings.egress},
                "image": image,
                "labels": {"pool": settings.name, "pool_key": key},
            });
            match provider::call(&self.env, Method::Post, "/v1/sandboxes", Some(&body)).await {
                Ok((201, v)) => {
                    let id = v["id"].as_str().unwrap_or_default().to_string();
                    // Not known any more (given up, or drained while it was asked for): not wanted.
                    if let Some(Work::Terminate { sandbox }) =
                        self.with_pool(|p| p.created(&key, &id))?
                    {
                        let _ = provider::terminate(&self.env, &sandbox).await;
                        self.with_pool(|p| p.drained(&key))?;
                    }
                }
                other => {
                    console_error!("pool {}: create refused: {other:?}", settings.name);
                    self.with_pool(|p| p.lost(&key))?;
                }
            }
        }
        // Poll quickly while anything is in flux; otherwise check the idle pool now and then.
        let p = self.pool()?;
        let busy = self.registry()?.building().is_some()
            || p.entries
                .values()
                .any(|e| matches!(e.slot, Slot::Requested | Slot::Booting | Slot::Draining));
        let busy = busy || !p.sweeps.is_empty();
        let next = if busy {
            config::pool_poll_ms(&self.env)
        } else if !p.entries.is_empty() {
            60_000
        } else {
            return Ok(());
        };
        // Never later than the oldest pending entry's timeout.
        let next = match p.next_deadline(pool::PENDING_TIMEOUT_MS) {
            Some(d) => next.min(d.saturating_sub(now_ms()).max(1)),
            None => next,
        };
        self.state
            .storage()
            .set_alarm(i64::try_from(next).unwrap_or(1000))
            .await?;
        Ok(())
    }
}

/// The `kv` value `cron_slot` (`settings`, `registry` and `pool` are core types, pinned in
/// `core/tests/stored_formats.rs`).
#[cfg(test)]
mod stored_formats {
    use crate::store::stored_formats::pinned;

    #[test]
    fn cron_slot_format_unchanged() {
        pinned::<Option<u64>>("28333333");
        pinned::<Option<u64>>("null");
    }
}
