//! The RepositoryObject Durable Object: one per registered repository — its settings, image builds and warm pool (rules in core `repository` and `pool`).

use nightshift_core::pool::{self, Pool, Slot, Work};
use nightshift_core::repository::{cron_slot, Change, Registry, Settings};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;
use worker::*;

use crate::config;
use crate::error::{json_of, ApiError, ApiResult, EdgeError};
use crate::http::{call, repository_index};
use crate::objects::{
    encode, CronAnswer, PoolView, RepositoryIndexRoute, RepositoryInfo, RepositoryName,
    RepositoryRoute, TaggedBuild,
};
pub use crate::objects::{ClaimAnswer, ClaimRequest};
use crate::platform::now_ms;
use crate::provider::{self, done_or_gone};
use nightshift_core::provider::{
    Assign, BuildImage, CreateSandbox, ErrorBody, ImageStatus, Repository, SandboxStatus,
    SupervisorSpec,
};

#[derive(Deserialize)]
struct BodyRow {
    body: String,
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

/// A registration that did not complete: its refusal (code and status unchanged) says that
/// nothing was stored and what to do.
fn nothing_registered(e: ApiError) -> ApiError {
    ApiError {
        message: format!(
            "{}; nothing was registered: register the repository again (POST /repositories) once this is fixed",
            e.message
        ),
        ..e
    }
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
        let Some(route) = RepositoryRoute::parse(&req.method(), &req.path()) else {
            return Err(EdgeError::NotFound("route").into());
        };
        match route {
            RepositoryRoute::Register => {
                let s: Settings = Self::body(&mut req).await?;
                self.register(s).await
            }
            RepositoryRoute::Info => json_of(200, &self.info()?),
            RepositoryRoute::Settings => {
                let c: Change = Self::body(&mut req).await?;
                self.change(c).await
            }
            RepositoryRoute::Builds => {
                self.settings()?;
                // A push to the base branch (the installation index says so) or a person.
                let pushed = req.url()?.query().unwrap_or_default() == "reason=push";
                let reason = if pushed { "push" } else { "manual" };
                let (st, v) = self.start_build(reason).await?;
                json_of(st, &v)
            }
            RepositoryRoute::BuildLogs(image) => {
                self.settings()?;
                if !self.registry()?.builds.iter().any(|b| b.image == image) {
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
            RepositoryRoute::Rollback => {
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
            RepositoryRoute::Cron => {
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
                    return json_of(200, &CronAnswer::not_built("scheduled builds are off"));
                };
                let reason = format!("cron:{slot}");
                let r = self.registry()?;
                // The slot is recorded as taken before any I/O, as the pool records a refill
                // before asking: from this check to the save below nothing awaits, so of two
                // overlapping deliveries exactly one goes on to build.
                let taken: Option<u64> = self.load::<Option<u64>>("cron_slot")?.flatten();
                if r.has_reason(&reason) || taken == Some(slot) {
                    return json_of(200, &CronAnswer::not_built("already built in this slot"));
                }
                if r.building().is_some() {
                    return json_of(200, &CronAnswer::not_built("a build is running"));
                }
                self.save("cron_slot", &Some(slot))?;
                match self.start_build(&reason).await {
                    Ok((_, v)) => json_of(
                        200,
                        &CronAnswer {
                            build: Some(v),
                            built: true,
                            why: None,
                        },
                    ),
                    Err(e) => {
                        // Nothing was built: a later delivery in this slot may try again.
                        self.save("cron_slot", &taken)?;
                        Err(e)
                    }
                }
            }
            RepositoryRoute::Claim => {
                let c: ClaimRequest = crate::objects::read_body(&mut req).await?;
                json_of(200, &self.claim(c).await?)
            }
        }
    }

    /// Registers the repository, all or nothing: its first build is asked of the provider and
    /// its name listed in the index before anything is stored here, then its rows are stored in
    /// one synchronous block (settings last: a repository is registered once they are stored).
    /// When a step fails nothing stays (the build asked for is deleted at the provider, the name
    /// taken off the index) and the refusal says so; registering again later works.
    async fn register(&self, s: Settings) -> ApiResult<Response> {
        s.validate()?;
        if self.load::<Settings>("settings")?.is_some() {
            return Err(EdgeError::RepositoryExists(s.name).into());
        }
        // The first image is built at once; the pool fills from a plain clone meanwhile.
        let image = self
            .ask_build(&s, "registered")
            .await
            .map_err(nothing_registered)?;
        if let Err(e) = self.list_in_index(&s.name).await {
            self.forget_image(&image).await;
            return Err(nothing_registered(e));
        }
        // A registration of the same name that finished while this one waited wins.
        if self.load::<Settings>("settings")?.is_some() {
            self.forget_image(&image).await;
            return Err(EdgeError::RepositoryExists(s.name).into());
        }
        let mut registry = Registry::default();
        registry.started(&image, "registered", now_ms());
        let stored = self
            .save("registry", &registry)
            .and_then(|()| self.save("pool", &Pool::new(s.pool_size, None)))
            .and_then(|()| self.save("settings", &s));
        if let Err(e) = stored {
            self.forget_rows();
            self.unlist_in_index(&s.name).await;
            self.forget_image(&image).await;
            return Err(nothing_registered(e));
        }
        // Registered: the build is followed from the alarm (any later call sets it too).
        if let Err(e) = self.wake(0).await {
            console_error!("repository {}: setting the alarm: {}", s.name, e.message);
        }
        json_of(201, &self.info()?)
    }

    /// Lists the name in the repository index (for listing and the cron).
    async fn list_in_index(&self, name: &str) -> ApiResult<()> {
        let index = repository_index(&self.env)?;
        let add = RepositoryIndexRoute::Add;
        let body = encode(&RepositoryName {
            name: name.to_string(),
        })?;
        let resp = call(&index, add.method(), add.path(), None, Some(body)).await?;
        match resp.status_code() {
            200 => Ok(()),
            status => Err(ApiError::internal(format!(
                "the repository index answered {status}"
            ))),
        }
    }

    /// Takes the name off the index again (best effort: a listed name whose repository is not
    /// registered is not shown, and registering it again lists it once).
    async fn unlist_in_index(&self, name: &str) {
        let result = async {
            let index = repository_index(&self.env)?;
            let remove = RepositoryIndexRoute::Remove;
            let body = encode(&RepositoryName {
                name: name.to_string(),
            })?;
            call(&index, remove.method(), remove.path(), None, Some(body)).await
        }
        .await;
        if let Err(e) = result {
            console_error!("repository {name}: taking it off the index: {}", e.message);
        }
    }

    /// Deletes the rows a registration that did not complete may have stored.
    fn forget_rows(&self) {
        let forgot = self.sql().and_then(|sql| {
            sql.exec(
                "DELETE FROM kv WHERE k IN ('settings', 'registry', 'pool')",
                None,
            )?;
            Ok(())
        });
        if let Err(e) = forgot {
            console_error!("repository: forgetting a registration: {}", e.message);
        }
    }

    /// Deletes an image nothing records (best effort).
    async fn forget_image(&self, image: &str) {
        if let Err(e) = provider::delete_image(&self.env, image).await {
            console_error!("deleting unrecorded image {image}: {}", e.message);
        }
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

    fn info(&self) -> ApiResult<RepositoryInfo> {
        Ok(info_of(self.settings()?, self.registry()?, self.pool()?))
    }

    /// Asks the provider for an image build and records it; one build at a time.
    async fn start_build(&self, reason: &str) -> ApiResult<(u16, Value)> {
        let s = self.settings()?;
        if let Some(b) = self.registry()?.building().cloned() {
            // A push or new settings owe a build after this one (recorded before any I/O).
            self.with_registry(|r| r.owe(reason))?;
            return Ok((202, serde_json::to_value(b).map_err(ApiError::internal)?));
        }
        let image = self.ask_build(&s, reason).await?;
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

    /// Asks the provider for an image build of `s`; returns the image's id (nothing recorded).
    async fn ask_build(&self, s: &Settings, reason: &str) -> ApiResult<String> {
        let mut repository = repository_of(s);
        // A GitHub repository's build clones with a read token of its own.
        if let Some(full_name) = &s.github {
            let read = nightshift_core::github::Access::Read;
            let token = crate::repository_tokens::for_github(&self.env, full_name, read).await?;
            repository.access_token = Some(token.token);
        }
        let build = BuildImage {
            repository,
            setup: s.setup.clone(),
            test: s.test.clone(),
            timeout_ms: Some(config::build_timeout_ms(&self.env)),
            labels: [("repository", s.name.as_str()), ("reason", reason)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        match provider::build_image(&self.env, &build).await? {
            Ok(image) => Ok(image.id),
            Err(refused) => Err(EdgeError::BuildRefused {
                status: refused.status,
                reason: refused.message().to_string(),
            }
            .into()),
        }
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
        let assign = Assign {
            session_id: c.session_id.clone(),
            supervisor: SupervisorSpec {
                control_url: c.control_url.clone(),
                sandbox_token: c.sandbox_token.clone(),
            },
            labels: c.labels.clone(),
        };
        match provider::assign(&self.env, &sbx, &assign).await {
            Ok(Ok(assigned)) => {
                // Handed over: the claim is done (a later claim of this session, after its
                // sandbox is gone, gets a new one; this one is never handed out again).
                self.with_pool(|p| p.unclaim(&c.session_id))?;
                answer.sandbox = Some(sbx);
                answer.expires_at = assigned.expires_at;
                answer.image = assigned.image;
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
            let found = provider::get_image(&self.env, &image).await?;
            let why = |error: Option<ErrorBody>| {
                let (code, message) = error.map_or(("image_not_found".into(), None), |e| {
                    (e.code, Some(e.message))
                });
                let message = message.unwrap_or_else(|| "the provider lost the build".into());
                format!("{code}: {message}")
            };
            let (ok, commit, test_exit_code, error) = match found {
                Ok(i) if i.status == ImageStatus::Building => continue,
                Ok(i) if i.status == ImageStatus::Ready => (true, i.commit, i.test_exit_code, None),
                Ok(i) => (false, i.commit, i.test_exit_code, Some(why(i.error))),
                Err(refused) => (false, None, None, Some(why(refused.error))),
            };
            let now = now_ms();
            let done =
                self.with_registry(|r| r.finished(&image, ok, commit, test_exit_code, error, now))?;
            if let Some(img) = &done.new_latest {
                self.with_pool(|p| p.new_image(img))?;
            }
            for old in done.dropped {
                let _ = provider::delete_image(&self.env, &old).await;
            }
        }
        // A build owed to a push or a settings change that came during the last one starts now.
        if let Some(reason) = self.with_registry(|r| r.take_owed())? {
            if let Err(e) = self.start_build(&reason).await {
                console_error!("owed build ({reason}): {}", e.message);
                // Still owed: the next pass asks again.
                self.with_registry(|r| r.owed = Some(reason.clone()))?;
            }
        }
        // Requested or booting too long (a lost create answer, a sandbox that never boots): given
        // up; booting ones drain below, unrecorded creates are swept by their key label.
        let now = now_ms();
        self.with_pool(|p| p.expire(now, pool::PENDING_TIMEOUT_MS))?;
        for key in self.pool()?.pending_sweeps() {
            let Ok(listed) = provider::list_labelled(&self.env, "pool_key", &key).await? else {
                continue;
            };
            let mut all_gone = true;
            for sbx in listed.sandboxes {
                if sbx.labels.get("pool") != Some(&settings.name) {
                    continue;
                }
                all_gone &= done_or_gone(&provider::terminate(&self.env, &sbx.id).await?);
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
            let found = provider::get_sandbox(&self.env, &sbx).await?;
            let gone = matches!(&found, Err(refused) if refused.is_not_found());
            let status = found.ok().map(|s| s.status);
            let ended = status.is_some_and(|s| s.is_over() || s == SandboxStatus::Stopped);
            if gone || ended {
                self.with_pool(|p| p.lost(&key))?;
                if status == Some(SandboxStatus::Stopped) {
                    let _ = provider::terminate(&self.env, &sbx).await;
                }
            } else if slot == Slot::Booting && status == Some(SandboxStatus::Ready) {
                self.with_pool(|p| p.booted(&key))?;
            }
        }
        // Drains owed.
        for (key, sbx) in self.pool()?.pending_drains() {
            if done_or_gone(&provider::terminate(&self.env, &sbx).await?) {
                self.with_pool(|p| p.drained(&key))?;
            }
        }
        // Refill (recorded before the provider is asked). A GitHub repository is private: its
        // warm sandboxes clone with a read token of their own, and their supervisor's git waits
        // for the claiming session's credentials over the link before it syncs.
        let now = now_ms();
        let mut work = self.with_pool(|p| p.refill(now))?;
        let mut clone_token = None;
        let mut pool_env = std::collections::BTreeMap::new();
        if let (false, Some(full_name)) = (work.is_empty(), &settings.github) {
            let read = nightshift_core::github::Access::Read;
            match crate::repository_tokens::for_github(&self.env, full_name, read).await {
                Ok(token) => clone_token = Some(token.token),
                Err(e) => {
                    // Nothing can be cloned: give the slots back; the next pass asks again.
                    console_error!("pool {}: no clone token: {}", settings.name, e.message);
                    for w in std::mem::take(&mut work) {
                        if let Work::Create { key, .. } = w {
                            self.with_pool(|p| p.lost(&key))?;
                        }
                    }
                }
            }
            pool_env.insert("NIGHTSHIFT_GIT_AUTH".to_string(), "link".to_string());
        }
        for w in work {
            let Work::Create { key, image } = w else {
                continue;
            };
            let mut repository = repository_of(&settings);
            repository.access_token = clone_token.clone();
            let create = CreateSandbox {
                session_id: None,
                repository,
                image,
                snapshot: None,
                env: pool_env.clone(),
                supervisor: None,
                timeout_ms: None,
                lifetime_ms: None,
                labels: [("pool", settings.name.as_str()), ("pool_key", key.as_str())]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            };
            match provider::create_sandbox(&self.env, &create).await {
                Ok(Ok(created)) => {
                    let id = created.value.id;
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

/// Where the repository's images and sandboxes are cloned from (the provider contract's form).
fn repository_of(s: &Settings) -> Repository {
    Repository {
        clone_url: s.clone_url.clone(),
        base_branch: s.base_branch.clone(),
        egress: s.egress.clone(),
        access_token: None,
    }
}

/// The repository as people see it: its settings, its builds newest first with their tags, and
/// its pool counted by slot.
fn info_of(repository: Settings, registry: Registry, pool: Pool) -> RepositoryInfo {
    let count = |slot: Slot| pool.entries.values().filter(|e| e.slot == slot).count();
    let builds = registry
        .builds
        .iter()
        .rev()
        .map(|b| TaggedBuild {
            build: b.clone(),
            tags: registry.tags(b),
        })
        .collect();
    let pool_view = PoolView {
        booting: count(Slot::Booting) + count(Slot::Requested),
        claimed: pool.claims.len(),
        draining: count(Slot::Draining),
        image: pool.image.clone(),
        ready: count(Slot::Ready),
        sandboxes: pool.entries.values().cloned().collect(),
        target: pool.target,
    };
    RepositoryInfo {
        builds,
        latest_image: registry.latest,
        pool: pool_view,
        repository,
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
