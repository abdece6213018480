//! The local provider: provider contract v1 (docs/provider-contract.md) on loopback, its router and handlers; each sandbox is an isolated process tree with its own checkout (the provider's state is in `state`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use nightshift_core::provider::{
    Assign, Deleted, EgressAnswer, Exec, ExecResult, GitStatus, Health, Limits, SandboxList,
    SetEgress, Snapshot, TakeSnapshot,
};

use crate::boot::{Assignment, BootSecrets, SupervisorState};
use crate::state::{
    check_env, err, kill_roots, local_remote, now_ms, parse, random_hex, redact_url, run_git,
    signed, sse_lines, valid_id, CreateSandbox, Entry, ErrorBody, LogFile, LogQuery, Provider,
    Refusal, Repository, Sandbox, SandboxStatus, Shared,
};
use crate::{images, procs};

impl Provider {
    /// What an earlier run of the provider acknowledged: images are usable again, and every
    /// sandbox that was not over is reported `failed` with `error.code = "lost"` (its
    /// processes ended with that run, and any straggler is killed now) — never forgotten.
    pub async fn recover(self: &Arc<Self>) -> (usize, usize) {
        let mut images = Vec::new();
        let mut sandboxes = Vec::new();
        for entry in std::fs::read_dir(self.cfg.root.join("host"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let id = entry.file_name().to_string_lossy().to_string();
            let bytes = |name: &str| std::fs::read(entry.path().join(name)).ok();
            if valid_id(&id, "img_") {
                if let Some(image) =
                    bytes("image.json").and_then(|b| serde_json::from_slice(&b).ok())
                {
                    images.push((id, image));
                }
            } else if valid_id(&id, "sbx_") {
                if let Some(sandbox) =
                    bytes("sandbox.json").and_then(|b| serde_json::from_slice::<Sandbox>(&b).ok())
                {
                    sandboxes.push((id, sandbox));
                }
            }
        }
        images::recover(self, &images);
        // Whatever an earlier run left in its control groups dies now.
        for group in self.cfg.groups.existing() {
            self.cfg.groups.kill_and_remove(&group).await;
        }
        for (id, record) in &sandboxes {
            procs::kill_marked(id).await;
            let create = CreateSandbox {
                session_id: record.session_id.clone(),
                repository: record.repository.clone(),
                image: record.image.clone(),
                snapshot: record.snapshot.clone(),
                env: BTreeMap::new(),
                supervisor: None,
                timeout_ms: None,
                lifetime_ms: None,
                labels: record.labels.clone(),
            };
            let error = if record.status.is_over() {
                record.error.clone()
            } else {
                Some(ErrorBody {
                    code: "lost".into(),
                    message: "the provider restarted and the sandbox's processes ended; start a new sandbox (its checkout and snapshots are kept)".into(),
                })
            };
            let status = match record.status {
                SandboxStatus::Terminated => SandboxStatus::Terminated,
                _ => SandboxStatus::Failed,
            };
            let sandbox = Sandbox {
                id: id.clone(),
                status,
                error,
                isolation: Some(self.cfg.isolation.into()),
                ..record.clone()
            };
            self.record(&sandbox);
            if let Ok(mut map) = self.sandboxes.lock() {
                map.insert(
                    id.clone(),
                    Entry {
                        sandbox,
                        dir: self.cfg.root.join("sandboxes").join(id),
                        pgid: None,
                        supervisor_port: None,
                        create,
                        api_secret: random_hex(16),
                        execs: Vec::new(),
                        egress: None,
                    },
                );
            }
        }
        (images.len(), sandboxes.len())
    }
}

pub fn router(p: Shared) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/sandboxes", post(create).get(list))
        .route("/v1/sandboxes/{id}", get(get_one))
        .route("/v1/sandboxes/{id}/exec", post(exec))
        .route("/v1/sandboxes/{id}/logs/{service}", get(logs))
        .route("/v1/sandboxes/{id}/terminate", post(terminate))
        .route("/v1/sandboxes/{id}/stop", post(stop))
        .route("/v1/sandboxes/{id}/start", post(start))
        .route("/v1/sandboxes/{id}/snapshot", post(snapshot))
        .route("/v1/snapshots/{id}/restore", post(restore))
        .route(
            "/v1/snapshots/{id}",
            get(snapshot_get).delete(snapshot_delete),
        )
        .route("/v1/sandboxes/{id}/assign", post(assign))
        .route("/v1/sandboxes/{id}/egress", post(set_egress))
        .route("/v1/images", post(images::build))
        .route(
            "/v1/images/{id}",
            get(images::get_one).delete(images::delete),
        )
        .route("/v1/images/{id}/logs", get(images::logs))
        .route("/v1/sandboxes/{id}/git", get(git_status))
        .route("/v1/sandboxes/{id}/git/sync", post(git_sync))
        .with_state(p)
}

async fn health(State(p): State<Shared>, m: Method, u: Uri, h: HeaderMap) -> Response {
    signed!(p, m, u, h, []);
    Json(Health {
        ok: true,
        provider: "local".into(),
        isolation: p.cfg.isolation.into(),
        limits: Some(Limits {
            processes: p.process_limit().into(),
            cgroups: p.cfg.groups.names().into_iter().map(String::from).collect(),
        }),
    })
    .into_response()
}

async fn create(State(p): State<Shared>, m: Method, u: Uri, h: HeaderMap, body: Bytes) -> Response {
    signed!(p, m, u, h, body);
    let c: CreateSandbox = match parse(&body) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    let snapshot_dir = match &c.snapshot {
        Some(s) => {
            let d = p.cfg.root.join("snapshots").join(s);
            if !valid_id(s, "snp_") || !d.join("meta.json").exists() {
                return err(
                    StatusCode::NOT_FOUND,
                    "snapshot_not_found",
                    format!("no snapshot {s}"),
                );
            }
            if snapshot_expired(&d) {
                return err(
                    StatusCode::NOT_FOUND,
                    "snapshot_not_found",
                    format!("snapshot {s} has expired"),
                );
            }
            Some(d)
        }
        None => None,
    };
    let source = match (&c.image, snapshot_dir) {
        (_, Some(d)) => Some(d),
        (Some(img), None) => match images::ready_dir(&p, img) {
            Ok(d) => Some(d),
            Err(r) => return r.into_response(),
        },
        (None, None) => None,
    };
    start_sandbox(&p, c, source).await
}

/// A snapshot's record (`meta.json`, the contract's Snapshot as it was answered).
fn snapshot_meta(dir: &Path) -> Option<Snapshot> {
    let text = std::fs::read_to_string(dir.join("meta.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn snapshot_expired(dir: &Path) -> bool {
    snapshot_meta(dir).is_some_and(|meta| meta.expires_at <= now_ms())
}

/// Copies a directory, copy-on-write where the filesystem supports it (`cp --reflink=auto`).
pub(crate) async fn copy_tree(from: &Path, to: &Path) -> bool {
    Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Starts a sandbox; `from` is a snapshot's or an image's directory whose `repo` becomes the checkout.
async fn start_sandbox(p: &Shared, c: CreateSandbox, from: Option<PathBuf>) -> Response {
    if c.session_id.as_deref() == Some("") || c.repository.clone_url.is_empty() {
        return err(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "session_id (or null for a pooled sandbox) and repository.clone_url are required",
        );
    }
    if let Err(r) = p.check_clone(&c.repository).await {
        return r.into_response();
    }
    let created_at = now_ms();
    let id = format!("sbx_{}", random_hex(12));
    let dir = p.cfg.root.join("sandboxes").join(&id);
    let sandbox = Sandbox {
        id: id.clone(),
        session_id: c.session_id.clone(),
        status: SandboxStatus::Creating,
        repository: Repository {
            clone_url: redact_url(&c.repository.clone_url),
            ..c.repository.without_token()
        },
        image: c.image.clone(),
        snapshot: c.snapshot.clone(),
        created_at,
        ready_at: None,
        terminated_at: None,
        expires_at: Some(created_at + c.lifetime_ms.unwrap_or(p.cfg.lifetime_ms)),
        labels: c.labels.clone(),
        error: None,
        isolation: Some(p.cfg.isolation.into()),
    };
    if let Ok(mut map) = p.sandboxes.lock() {
        map.insert(
            id.clone(),
            Entry {
                sandbox: sandbox.clone(),
                dir: dir.clone(),
                pgid: None,
                supervisor_port: None,
                create: c.clone(),
                api_secret: random_hex(16),
                execs: Vec::new(),
                egress: None,
            },
        );
    }
    p.record(&sandbox);
    let p2 = p.clone();
    let id2 = id.clone();
    tokio::spawn(async move { boot(p2, id2, dir, c, from).await });
    tokio::spawn(expire(p.clone(), id));
    (StatusCode::CREATED, Json(sandbox)).into_response()
}

/// Terminates the sandbox at its `expires_at` (a start after a stop moves that time on).
async fn expire(p: Shared, id: String) {
    loop {
        let Some(s) = p.get(&id) else { return };
        if s.status.is_over() {
            return;
        }
        // Always set here: this provider gives every sandbox a lifetime.
        let Some(expires_at) = s.expires_at else {
            return;
        };
        let now = now_ms();
        if now >= expires_at {
            eprintln!("provider: sandbox {id} reached its lifetime; terminating");
            // The reason first, so the sandbox is never seen terminated without it.
            p.update(&id, |e| {
                e.sandbox.error = Some(ErrorBody {
                    code: "lifetime".into(),
                    message: "the sandbox reached the end of its lifetime".into(),
                })
            });
            halt(&p, &id, SandboxStatus::Terminated).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis((expires_at - now).min(60_000))).await;
    }
}

/// Prepares the checkout, starts the supervisor and waits for it to report its port.
async fn boot(p: Shared, id: String, dir: PathBuf, c: CreateSandbox, from: Option<PathBuf>) {
    let repo = dir.join("repo");
    let host = p.host_dir(&id);
    for d in [
        dir.join("home"),
        dir.join("logs"),
        dir.join("state"),
        host.clone(),
    ] {
        if let Err(e) = tokio::fs::create_dir_all(&d).await {
            return p.fail(
                &id,
                "internal",
                format!("cannot create the sandbox's directories: {e}"),
            );
        }
    }
    // Its own network: the egress proxy (allowlist, model proxy) is its only way out, and the
    // provider calls its supervisor on a unix socket in the same provider-owned folder.
    let run = host.join("run");
    let mut model_token = None;
    let mut model_vendors: Vec<String> = Vec::new();
    if p.own_network() {
        let control: Vec<String> = c
            .supervisor
            .as_ref()
            .and_then(|s| crate::egress::authority_of_url(&s.control_url))
            .into_iter()
            .collect();
        let route = crate::egress::ModelRoute {
            upstream: p.cfg.supervisor_env.get("NIGHTSHIFT_MODEL_URL").cloned(),
            key: p.cfg.supervisor_env.get("NIGHTSHIFT_MODEL_KEY").cloned(),
            token: random_hex(16),
            vendors: crate::egress::vendor_routes(&p.cfg.supervisor_env),
        };
        let model = (route.upstream.is_some() || !route.vendors.is_empty()).then_some(route);
        model_token = model.as_ref().map(|m| m.token.clone());
        model_vendors = model
            .as_ref()
            .map(|m| m.vendors.keys().cloned().collect())
            .unwrap_or_default();
        // A dev-mode local remote: the sandbox pushes to an outbox the provider owns, and the
        // provider brings the session's branch over (the remote is never writable inside).
        let relay = local_remote(&c.repository.clone_url).map(|remote| crate::egress::Relay {
            outbox: run.join("outbox.git"),
            remote,
        });
        let policy = p.policy_for(&c.repository, &[]);
        let egress = crate::egress::Egress::new(&id, policy, model, relay, p.cfg.dev_mode);
        for authority in &control {
            egress.trust(authority);
        }
        p.update(&id, |e| e.egress = None);
        let _ = std::fs::remove_dir_all(&run);
        match crate::egress::start(run.clone(), egress) {
            Ok(running) => p.update(&id, |e| e.egress = Some(running)),
            Err(e) => {
                return p.fail(
                    &id,
                    "internal",
                    format!("cannot start the egress proxy: {e}"),
                )
            }
        }
    }
    let net = p.own_network().then_some(run.as_path());
    let mut extra = Vec::new();
    if let Some(remote) = local_remote(&c.repository.clone_url) {
        extra.push(remote);
    }
    if repo.join(".git").exists() {
        // Started again after a stop: the checkout is kept as it was.
    } else if let Some(src) = from {
        if !copy_tree(&src.join("repo"), &repo).await {
            return p.fail(
                &id,
                "internal",
                "could not copy the checkout of the image or snapshot".into(),
            );
        }
        // An image also carries the warmed caches of its build's home directory.
        let home = src.join("home");
        if home.exists() {
            let _ = tokio::fs::remove_dir_all(dir.join("home")).await;
            if !copy_tree(&home, &dir.join("home")).await {
                return p.fail(&id, "internal", "could not copy the image's caches".into());
            }
        }
    } else {
        let url = &c.repository.clone_url;
        let is_path = url.starts_with('/') || url.starts_with("file://");
        if is_path && local_remote(url).is_none() {
            return p.fail(
                &id,
                "repository_not_found",
                format!("the repository {} does not exist", redact_url(url)),
            );
        }
        // The clone runs inside the sandbox, through its egress proxy.
        if let Err(e) = p
            .clone_inside(
                &dir,
                &extra,
                url,
                &c.repository.base_branch,
                &repo,
                net,
                c.repository.access_token.as_deref(),
            )
            .await
        {
            return p.fail(
                &id,
                "clone_failed",
                format!("git clone of {} failed: {}", redact_url(url), p.scrub(&e)),
            );
        }
    }
    let argv = vec![p.cfg.supervisor.to_string_lossy().to_string()];
    let path_of = |x: &Path| x.to_string_lossy().to_string();
    let env: BTreeMap<String, String> = [
        ("HOME", path_of(&dir.join("home"))),
        ("NIGHTSHIFT_SANDBOX_ID", id.clone()),
        (
            "NIGHTSHIFT_SESSION_ID",
            c.session_id.clone().unwrap_or_default(),
        ),
        ("NIGHTSHIFT_SANDBOX_DIR", path_of(&dir)),
        ("NIGHTSHIFT_BASE_BRANCH", c.repository.base_branch.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let mut env = env;
    if p.own_network() {
        env.insert(
            "NIGHTSHIFT_API_SOCKET".into(),
            format!("{}/api.sock", crate::egress::SOCKET_DIR_INSIDE),
        );
        if local_remote(&c.repository.clone_url).is_some() {
            let outbox = run.join("outbox.git");
            if !outbox.exists() {
                if let Err(e) = run_git(
                    &["init", "--quiet", "--bare", &outbox.to_string_lossy()],
                    None,
                )
                .await
                {
                    return p.fail(
                        &id,
                        "internal",
                        format!("cannot create the push outbox: {e}"),
                    );
                }
            }
            env.insert(
                "NIGHTSHIFT_PUSH_OUTBOX".into(),
                format!("{}/outbox.git", crate::egress::SOCKET_DIR_INSIDE),
            );
        }
    }
    let mut cmd = p.isolate(&dir, &extra, &argv, &env, &dir, net);
    // The log lives in the provider's own directory, never bound into the sandbox.
    let log = match procs::open_log(&host.join("supervisor.log")) {
        Ok(f) => f,
        Err(e) => return p.fail(&id, "internal", format!("cannot open the log: {e}")),
    };
    let log2 = log.try_clone().ok();
    cmd.stdin(Stdio::piped()).stdout(log);
    if let Some(l) = log2 {
        cmd.stderr(l);
    }
    let mut child = match cmd.spawn() {
        Ok(ch) => ch,
        Err(e) => return p.fail(&id, "internal", format!("cannot start the supervisor: {e}")),
    };
    let pgid = child.id().map(|x| x as i32);
    p.update(&id, |e| {
        e.pgid = pgid;
        e.sandbox.status = SandboxStatus::Syncing;
    });
    // Secrets go on standard input after start, never into an image or a snapshot.
    if let Some(mut stdin) = child.stdin.take() {
        // Behind the model proxy the sandbox gets a token of its own, never the model key.
        let env: BTreeMap<String, String> = p
            .cfg
            .supervisor_env
            .iter()
            .chain(c.env.iter())
            .filter(|(k, _)| {
                // Behind the model proxy no key enters the sandbox, of any vendor.
                model_token.is_none()
                    || !(k.ends_with("_API_KEY")
                        || k.ends_with("_BASE_URL")
                        || k.as_str() == "NIGHTSHIFT_MODEL_KEY")
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let api_secret = p.api_secret(&id).unwrap_or_default();
        let secrets = BootSecrets {
            supervisor: c.supervisor.clone(),
            env,
            api_secret,
            model_token,
            model_vendors,
        };
        let _ = stdin.write_all(secrets.line().as_bytes()).await;
        drop(stdin);
    }
    let p2 = p.clone();
    let id2 = id.clone();
    tokio::spawn(async move {
        let status = child.wait().await;
        // Expected when stopped or terminated, or when a newer boot has replaced this one.
        let expected = {
            let map = p2.sandboxes.lock().ok();
            map.and_then(|m| {
                m.get(&id2).map(|e| {
                    matches!(
                        e.sandbox.status,
                        SandboxStatus::Terminated | SandboxStatus::Stopped
                    ) || e.pgid != pgid
                })
            })
            .unwrap_or(true)
        };
        if !expected {
            p2.fail(
                &id2,
                "sandbox_exited",
                format!("the supervisor exited ({status:?}); see logs/supervisor"),
            );
        }
    });
    // Wait for the supervisor to publish its API port, then for readiness. The file is the
    // sandbox's: it is read without following links, and the port is only ever called with
    // this sandbox's api_secret (a port of someone else's supervisor refuses it).
    let deadline = now_ms() + c.timeout_ms.unwrap_or(120_000).min(600_000);
    loop {
        let Some(s) = p.get(&id) else { return };
        if s.status.is_over() {
            return;
        }
        let read = procs::read_beneath(&dir, &["state", "supervisor.json"], 0, 64 * 1024);
        if let Ok(bytes) = read {
            if let Some(st) = SupervisorState::decode(&bytes) {
                p.update(&id, |e| e.supervisor_port = Some(st.port));
                if st.ready {
                    p.update(&id, |e| {
                        if e.sandbox.status == SandboxStatus::Syncing {
                            e.sandbox.status = SandboxStatus::Ready;
                            e.sandbox.ready_at = Some(now_ms());
                        }
                    });
                    return;
                }
            }
        }
        if now_ms() > deadline {
            return p.fail(
                &id,
                "timeout",
                "the sandbox did not become ready in time".into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Deserialize)]
struct ListQuery {
    session_id: Option<String>,
    label: Option<String>,
}

async fn list(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    q: Query<ListQuery>,
) -> Response {
    signed!(p, m, u, h, []);
    let map = match p.sandboxes.lock() {
        Ok(m) => m,
        Err(_) => return err(StatusCode::INTERNAL_SERVER_ERROR, "internal", "state lock"),
    };
    let label = q.label.as_deref().and_then(|l| l.split_once(':'));
    let mut out: Vec<Sandbox> = map
        .values()
        .map(|e| e.sandbox.clone())
        .filter(|s| {
            q.session_id
                .as_ref()
                .is_none_or(|sid| s.session_id.as_ref() == Some(sid))
        })
        .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k).is_some_and(|x| x == v)))
        .collect();
    out.sort_by_key(|s| s.created_at);
    Json(SandboxList { sandboxes: out }).into_response()
}

/// The sandbox as it is now.
fn current(p: &Shared, id: &str) -> Response {
    match p.get(id) {
        Some(s) => Json(s).into_response(),
        None => not_found(id),
    }
}

/// A sandbox that exists and has not ended, with its directory.
fn live(p: &Shared, id: &str) -> Result<(Sandbox, PathBuf), Refusal> {
    let found = p.get(id).zip(p.dir_of(id));
    let Some((s, dir)) = found else {
        return Err(Refusal(
            StatusCode::NOT_FOUND,
            "sandbox_not_found",
            format!("no sandbox {id}"),
        ));
    };
    if s.status.is_over() {
        let msg = format!("sandbox {id} is {}", s.status);
        return Err(Refusal(StatusCode::CONFLICT, "sandbox_terminated", msg));
    }
    Ok((s, dir))
}

fn not_found(id: &str) -> Response {
    err(
        StatusCode::NOT_FOUND,
        "sandbox_not_found",
        format!("no sandbox {id}"),
    )
}

async fn get_one(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    signed!(p, m, u, h, []);
    current(&p, &id)
}

/// Output kept per stream; the rest is cut and `truncated` is set.
const MAX_OUTPUT: usize = 1 << 20;

async fn exec(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Response {
    signed!(p, m, u, h, body);
    let b: Exec = match parse(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    if b.command.is_empty() || b.command[0].is_empty() {
        return err(
            StatusCode::BAD_REQUEST,
            "invalid_command",
            "`command` must name a program: [\"git\", \"status\"]",
        );
    }
    if let Err(r) = check_env(&b.env) {
        return r.into_response();
    }
    let (_, dir) = match live(&p, &id) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let repo = dir.join("repo");
    let cwd = match &b.cwd {
        Some(c) if c.split('/').any(|part| part == "..") => {
            return err(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "`cwd` may not leave the checkout",
            )
        }
        Some(c) => repo.join(c.trim_start_matches('/')),
        None => repo.clone(),
    };
    let mut extra = Vec::new();
    if let Some(remote) = p.clone_url(&id).as_deref().and_then(local_remote) {
        extra.push(remote);
    }
    // The caller's environment reaches only the sandboxed process; the provider's own
    // variables win over it.
    let mut env = b.env.clone();
    env.insert(
        "HOME".into(),
        dir.join("home").to_string_lossy().to_string(),
    );
    env.insert("NIGHTSHIFT_SANDBOX_ID".into(), id.clone());
    let run = p.host_dir(&id).join("run");
    let (argv, net) = if p.own_network() {
        (p.through_egress(&b.command), Some(run.as_path()))
    } else {
        (b.command.clone(), None)
    };
    let mut cmd = p.isolate(&dir, &extra, &argv, &env, &cwd, net);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = now_ms();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return err(
                StatusCode::BAD_REQUEST,
                "invalid_command",
                format!("cannot run {}: {e}", b.command[0]),
            )
        }
    };
    let pid = child.id().map(|x| x as i32);
    // Whatever it started dies with the request (as in a pid namespace), even when the
    // caller goes away; disarmed once the launcher is reaped (its pid may then be reused).
    let mut guard = procs::TreeGuard(pid);
    p.track_exec(&id, pid, true);
    if let Some(mut stdin) = child.stdin.take() {
        let input = b.stdin.unwrap_or_default();
        tokio::spawn(async move {
            let _ = stdin.write_all(input.as_bytes()).await;
        });
    }
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let timeout = Duration::from_millis(b.timeout_ms.unwrap_or(60_000).min(600_000));
    let run = async { tokio::join!(capped(stdout), capped(stderr), child.wait()) };
    let waited = tokio::time::timeout(timeout, run).await;
    p.track_exec(&id, pid, false);
    let (out, errs, status) = match waited {
        Ok((out, errs, Ok(status))) => {
            guard.0 = None;
            (out, errs, status)
        }
        Ok((_, _, Err(e))) => {
            return err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        }
        Err(_) => {
            // Not reaped yet, so the pid is still this launcher's.
            if let Some(pid) = guard.0.take() {
                procs::kill_tree(pid);
                procs::kill_group(pid);
            }
            let _ = child.wait().await;
            return err(
                StatusCode::GATEWAY_TIMEOUT,
                "exec_timeout",
                format!(
                    "the command ran longer than {} ms and was killed",
                    timeout.as_millis()
                ),
            );
        }
    };
    let text = |v: &[u8]| String::from_utf8_lossy(&v[..v.len().min(MAX_OUTPUT)]).to_string();
    Json(ExecResult {
        exit_code: status.code().unwrap_or(-1),
        stdout: text(&out),
        stderr: text(&errs),
        duration_ms: now_ms() - started,
        truncated: out.len() > MAX_OUTPUT || errs.len() > MAX_OUTPUT,
    })
    .into_response()
}

/// Reads a stream keeping at most `MAX_OUTPUT + 1` bytes (the rest is drained and dropped).
async fn capped(stream: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    if let Some(mut s) = stream {
        let _ = (&mut s)
            .take(MAX_OUTPUT as u64 + 1)
            .read_to_end(&mut out)
            .await;
        let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
    }
    out
}

async fn logs(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath((id, service)): UrlPath<(String, String)>,
    q: Query<LogQuery>,
) -> Response {
    signed!(p, m, u, h, []);
    if !service
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        || service.is_empty()
    {
        return err(
            StatusCode::BAD_REQUEST,
            "invalid_service",
            "a service is a name such as `supervisor` or `opencode`",
        );
    }
    let Some(dir) = p.dir_of(&id) else {
        return not_found(&id);
    };
    // The supervisor's log is the provider's own; the others are written inside the sandbox
    // and read without following links.
    let file = if service == "supervisor" {
        LogFile::Owned(p.host_dir(&id).join("supervisor.log"))
    } else {
        LogFile::Sandbox {
            dir,
            name: format!("{service}.log"),
        }
    };
    if file.read(0).is_err() {
        return err(
            StatusCode::NOT_FOUND,
            "log_not_found",
            format!("sandbox {id} has no log `{service}`; try `supervisor` or `opencode`"),
        );
    }
    let follow = q.follow.as_deref().is_some_and(|f| f == "1" || f == "true");
    let p2 = p.clone();
    sse_lines(file, follow, move || {
        p2.get(&id).is_some_and(|s| !s.status.is_over())
    })
}

async fn terminate(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    signed!(p, m, u, h, []);
    let Some(s) = p.get(&id) else {
        return not_found(&id);
    };
    if s.status != SandboxStatus::Terminated {
        // Anything that left the group (setsid, double fork) is found by its sandbox mark.
        halt(&p, &id, SandboxStatus::Terminated).await;
    }
    current(&p, &id)
}

/// Kills the sandbox's processes and sets its status (`stopped` keeps its directory for a later start).
async fn halt(p: &Shared, id: &str, status: SandboxStatus) {
    let mut roots = Vec::new();
    p.update(id, |e| {
        e.sandbox.status = status;
        roots.extend(e.pgid.take());
        roots.append(&mut e.execs);
        e.supervisor_port = None;
        if status == SandboxStatus::Terminated {
            e.sandbox.terminated_at = Some(now_ms());
            // Its socket closes and its folder goes with it.
            e.egress = None;
        }
    });
    // Its control group first (exact, whatever the processes did), then trees (stopped, then
    // killed, so nothing forks away), then process groups, then marks.
    p.cfg.groups.kill_and_remove(id).await;
    let _ = tokio::task::spawn_blocking(move || kill_roots(&roots)).await;
    procs::kill_marked(id).await;
}

async fn stop(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    signed!(p, m, u, h, []);
    let Some(s) = p.get(&id) else {
        return not_found(&id);
    };
    match s.status {
        SandboxStatus::Terminated => {
            return err(
                StatusCode::CONFLICT,
                "sandbox_terminated",
                format!("sandbox {id} is terminated"),
            )
        }
        SandboxStatus::Stopped => {}
        _ => halt(&p, &id, SandboxStatus::Stopped).await,
    }
    current(&p, &id)
}

async fn start(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    signed!(p, m, u, h, []);
    let Some(s) = p.get(&id) else {
        return not_found(&id);
    };
    if s.status != SandboxStatus::Stopped {
        return err(
            StatusCode::CONFLICT,
            "sandbox_not_stopped",
            format!(
                "sandbox {id} is {}; only a stopped sandbox can be started",
                s.status
            ),
        );
    }
    let found = {
        let map = p.sandboxes.lock().ok();
        map.and_then(|m| m.get(&id).map(|e| (e.dir.clone(), e.create.clone())))
    };
    let Some((dir, create)) = found else {
        return not_found(&id);
    };
    p.update(&id, |e| {
        e.sandbox.status = SandboxStatus::Creating;
        e.sandbox.ready_at = None;
        e.sandbox.error = None;
        e.sandbox.expires_at = Some(now_ms() + e.create.lifetime_ms.unwrap_or(p.cfg.lifetime_ms));
    });
    // The sandbox's own file: removed without following a link it may have planted.
    let _ = procs::remove_beneath(&dir, &["state", "supervisor.json"]);
    let p2 = p.clone();
    let id2 = id.clone();
    tokio::spawn(async move { boot(p2, id2, dir, create, None).await });
    current(&p, &id)
}

async fn snapshot(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Response {
    signed!(p, m, u, h, body);
    let b: TakeSnapshot = if body.is_empty() {
        TakeSnapshot::default()
    } else {
        match parse(&body) {
            Ok(b) => b,
            Err(r) => return r.into_response(),
        }
    };
    let (_, dir) = match live(&p, &id) {
        Ok(x) => x,
        Err(r) => return r.into_response(),
    };
    let snap_id = format!("snp_{}", random_hex(12));
    let sdir = p.cfg.root.join("snapshots").join(&snap_id);
    if let Err(e) = tokio::fs::create_dir_all(&sdir).await {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string());
    }
    if !copy_tree(&dir.join("repo"), &sdir.join("repo")).await {
        return err(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "could not copy the checkout",
        );
    }
    let created = now_ms();
    let expires = created + b.ttl_ms.unwrap_or(30 * 24 * 3600 * 1000);
    let meta = Snapshot {
        id: snap_id,
        sandbox_id: id,
        created_at: created,
        expires_at: expires,
    };
    let bytes = serde_json::to_vec(&meta).unwrap_or_default();
    if let Err(e) = tokio::fs::write(sdir.join("meta.json"), bytes).await {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string());
    }
    (StatusCode::CREATED, Json(meta)).into_response()
}

async fn restore(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath(snap): UrlPath<String>,
    body: Bytes,
) -> Response {
    signed!(p, m, u, h, body);
    let mut c: CreateSandbox = match parse(&body) {
        Ok(c) => c,
        Err(r) => return r.into_response(),
    };
    let sdir = p.cfg.root.join("snapshots").join(&snap);
    if !valid_id(&snap, "snp_") || !sdir.join("meta.json").exists() || snapshot_expired(&sdir) {
        return err(
            StatusCode::NOT_FOUND,
            "snapshot_not_found",
            format!("no live snapshot {snap}"),
        );
    }
    c.snapshot = Some(snap);
    start_sandbox(&p, c, Some(sdir)).await
}

/// `POST /v1/sandboxes/{id}/egress`: the session owner's extra hosts, in force at once.
async fn set_egress(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Response {
    signed!(p, m, u, h, body);
    let b: SetEgress = match parse(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    if !nightshift_core::egress::valid_list(&b.allow) {
        return err(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "allow: host patterns like `example.com`, `*.example.com` or `host:port`",
        );
    }
    if let Err(r) = live(&p, &id) {
        return r.into_response();
    }
    let enforced = p
        .sandboxes
        .lock()
        .ok()
        .and_then(|map| {
            map.get(&id).and_then(|e| e.egress.as_ref()).map(|running| {
                running.egress.set_session(&b.allow);
                true
            })
        })
        .unwrap_or(false);
    Json(EgressAnswer {
        id,
        allow: b.allow,
        enforced,
    })
    .into_response()
}

/// Forwards to the supervisor's loopback API.
async fn to_supervisor(p: &Shared, id: &str, method: Method, path: &str) -> Response {
    if let Err(r) = live(p, id) {
        return r.into_response();
    }
    let Some((port, secret)) = p.supervisor_api(id) else {
        return Json(GitStatus::not_started()).into_response();
    };
    match supervisor_call(p, id, port, &secret, method, path, None).await {
        Ok((status, v)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, Json(v)).into_response()
        }
        Err(e) => err(
            StatusCode::BAD_GATEWAY,
            "supervisor_unreachable",
            format!("the sandbox's supervisor did not answer: {e}"),
        ),
    }
}

/// One call of a supervisor's local API: on its unix socket in the provider-owned folder when
/// the sandbox has its own network, else on its loopback port.
async fn supervisor_call(
    p: &Shared,
    id: &str,
    port: u16,
    secret: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    if p.own_network() {
        let sock = p.host_dir(id).join("run").join("api.sock");
        return unix_call(&sock, method.as_str(), path, secret, body).await;
    }
    let url = format!("http://127.0.0.1:{port}{path}");
    let mut req = p.http.request(method, &url).bearer_auth(secret);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.map_err(|e| e.without_url().to_string())?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

/// A minimal HTTP/1.1 exchange over a unix socket (one request, `connection: close`). The
/// socket must be a socket, not a link the sandbox planted.
async fn unix_call(
    sock: &Path,
    method: &str,
    path: &str,
    secret: &str,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    use tokio::io::AsyncReadExt;
    let (dir, name) = match (sock.parent(), sock.file_name()) {
        (Some(dir), Some(name)) => (dir, name.to_string_lossy()),
        _ => return Err("no API socket".into()),
    };
    // Pinned: checked to be a socket (not a link the sandbox planted) and connected as opened.
    let named = crate::socket_path::SocketPath::existing(dir, &name)
        .map_err(|e| format!("no API socket yet ({e})"))?;
    let mut conn = tokio::net::UnixStream::connect(named.path())
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: supervisor\r\nauthorization: Bearer {secret}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        conn.take(1 << 20).read_to_end(&mut answer),
    )
    .await
    .map_err(|_| "timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&answer);
    let (head, rest) = text.split_once("\r\n\r\n").ok_or("a malformed answer")?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("a malformed answer")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let payload = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok((
        status,
        serde_json::from_str(&payload).unwrap_or(Value::Null),
    ))
}

/// The body of a chunked HTTP answer.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

async fn git_status(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    signed!(p, m, u, h, []);
    to_supervisor(&p, &id, Method::GET, "/git").await
}

async fn git_sync(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    signed!(p, m, u, h, []);
    to_supervisor(&p, &id, Method::POST, "/git/sync").await
}

fn snapshot_dir(p: &Shared, id: &str) -> Result<PathBuf, Refusal> {
    let d = p.cfg.root.join("snapshots").join(id);
    if !valid_id(id, "snp_") || !d.join("meta.json").exists() || snapshot_expired(&d) {
        return Err(Refusal(
            StatusCode::NOT_FOUND,
            "snapshot_not_found",
            format!("no live snapshot {id}; it may have expired"),
        ));
    }
    Ok(d)
}

async fn snapshot_get(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    signed!(p, m, u, h, []);
    let d = match snapshot_dir(&p, &id) {
        Ok(d) => d,
        Err(r) => return r.into_response(),
    };
    match tokio::fs::read_to_string(d.join("meta.json")).await {
        Ok(t) => match serde_json::from_str::<Snapshot>(&t) {
            Ok(meta) => Json(meta).into_response(),
            Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        },
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

async fn snapshot_delete(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Response {
    signed!(p, m, u, h, []);
    if valid_id(&id, "snp_") {
        let _ = tokio::fs::remove_dir_all(p.cfg.root.join("snapshots").join(&id)).await;
    }
    Json(Deleted::new(&id)).into_response()
}

/// Frees the storage of expired snapshots, every `every`.
pub async fn sweep_snapshots(p: Shared, every: Duration) {
    loop {
        let dir = p.cfg.root.join("snapshots");
        if let Ok(mut rd) = tokio::fs::read_dir(&dir).await {
            while let Ok(Some(e)) = rd.next_entry().await {
                if snapshot_expired(&e.path()) {
                    let _ = tokio::fs::remove_dir_all(e.path()).await;
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Every `every`, ends a sandbox whose folder uses more disk than `PROVIDER_LIMIT_DISK_MB`:
/// its processes are killed, its files removed, and its status says `failed` with
/// `disk_limit`, so one sandbox cannot fill the host's disk.
pub async fn watch_disk(p: Shared, every: Duration) {
    let limit = p.cfg.limits.disk_mb.saturating_mul(1 << 20);
    if limit == 0 {
        return;
    }
    loop {
        tokio::time::sleep(every).await;
        let live: Vec<String> = match p.sandboxes.lock() {
            Ok(map) => map
                .iter()
                .filter(|(_, e)| {
                    !matches!(
                        e.sandbox.status,
                        SandboxStatus::Terminated | SandboxStatus::Failed | SandboxStatus::Stopped
                    )
                })
                .map(|(id, _)| id.clone())
                .collect(),
            Err(_) => Vec::new(),
        };
        for id in live {
            let dir = p.cfg.root.join("sandboxes").join(&id);
            let used = tokio::task::spawn_blocking(move || procs::disk_usage(&dir))
                .await
                .unwrap_or(0);
            if used <= limit {
                continue;
            }
            halt(&p, &id, SandboxStatus::Terminated).await;
            let dir = p.cfg.root.join("sandboxes").join(&id);
            let _ = tokio::fs::remove_dir_all(&dir).await;
            p.fail(
                &id,
                "disk_limit",
                format!(
                    "the sandbox used {} MiB of disk, over its limit of {} MiB: it was ended and its files removed; start a new sandbox (a snapshot taken before still restores)",
                    used >> 20,
                    limit >> 20
                ),
            );
        }
    }
}

/// Gives a pooled (ready, unassigned) sandbox to a session; its supervisor dials it at once.
async fn assign(
    State(p): State<Shared>,
    m: Method,
    u: Uri,
    h: HeaderMap,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Response {
    signed!(p, m, u, h, body);
    let b: Assign = match parse(&body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    if b.session_id.is_empty() {
        return err(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "session_id is empty",
        );
    }
    // Claim under the lock so two assigns cannot both win.
    let claimed: Result<Option<(u16, String)>, Refusal> = match p.sandboxes.lock() {
        Ok(mut map) => match map.get_mut(&id) {
            None => Err(Refusal(
                StatusCode::NOT_FOUND,
                "sandbox_not_found",
                format!("no sandbox {id}"),
            )),
            Some(e) if e.sandbox.session_id.is_some() => Err(Refusal(
                StatusCode::CONFLICT,
                "sandbox_assigned",
                format!("sandbox {id} already works for another session"),
            )),
            Some(e) if e.sandbox.status != SandboxStatus::Ready => Err(Refusal(
                StatusCode::CONFLICT,
                "sandbox_not_ready",
                format!(
                    "sandbox {id} is {}; only a ready sandbox can be assigned",
                    e.sandbox.status
                ),
            )),
            Some(e) => {
                e.sandbox.session_id = Some(b.session_id.clone());
                e.create.session_id = Some(b.session_id.clone());
                e.sandbox.labels.extend(b.labels.clone());
                e.create.labels.extend(b.labels.clone());
                e.create.supervisor = Some(b.supervisor.clone());
                Ok(e.supervisor_port.map(|port| (port, e.api_secret.clone())))
            }
        },
        Err(_) => Err(Refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "state lock".into(),
        )),
    };
    let (port, secret) = match claimed {
        Ok(Some(api)) => api,
        Ok(None) => {
            return err(
                StatusCode::INTERNAL_SERVER_ERROR,
                "supervisor_unreachable",
                "no supervisor port",
            )
        }
        Err(r) => return r.into_response(),
    };
    // The session's control plane joins the sandbox's egress allowlist.
    if let Some(control) = crate::egress::authority_of_url(&b.supervisor.control_url) {
        if let Ok(map) = p.sandboxes.lock() {
            if let Some(running) = map.get(&id).and_then(|e| e.egress.as_ref()) {
                running.egress.trust(&control);
            }
        }
    }
    let assignment = Assignment {
        session_id: b.session_id,
        control_url: b.supervisor.control_url,
        sandbox_token: b.supervisor.sandbox_token,
    };
    let sent = supervisor_call(
        &p,
        &id,
        port,
        &secret,
        Method::POST,
        "/assign",
        serde_json::to_value(&assignment).ok(),
    )
    .await;
    match sent {
        Ok((status, _)) if (200..300).contains(&status) => current(&p, &id),
        other => {
            let why = match other {
                Ok((status, _)) => format!("the supervisor answered {status}"),
                Err(e) => format!("the supervisor did not answer: {e}"),
            };
            p.update(&id, |e| {
                e.sandbox.session_id = None;
                e.create.session_id = None;
                e.create.supervisor = None;
            });
            err(StatusCode::BAD_GATEWAY, "supervisor_unreachable", why)
        }
    }
}
