//! The local provider: provider contract v1 (docs/provider-contract.md) on loopback; each sandbox is an isolated process tree with its own checkout.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nightshift_core::signing;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::{images, procs};

/// How sandboxes are isolated from the machine and from each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    Bubblewrap,
    None,
}

impl Isolation {
    /// Bubblewrap when it is installed and works here; otherwise none (and the log says so).
    pub fn detect() -> Isolation {
        let ok = std::process::Command::new("bwrap")
            .args(["--ro-bind", "/", "/", "--unshare-pid", "--", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            Isolation::Bubblewrap
        } else {
            Isolation::None
        }
    }
}

/// Provider settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub root: PathBuf,
    pub secret: Vec<u8>,
    pub isolation: Isolation,
    /// The supervisor executable started in every sandbox.
    pub supervisor: PathBuf,
    /// Environment given to every supervisor (OpenCode location, model settings, …).
    pub supervisor_env: BTreeMap<String, String>,
    /// Host paths a sandbox must see read-only even where its own mounts would hide them
    /// (the supervisor, OpenCode and paths named in the settings, e.g. under /tmp).
    pub ro_paths: Vec<PathBuf>,
    /// A sandbox's life when its create names none (`lifetime_ms`); it is terminated at `expires_at`.
    pub lifetime_ms: u64,
}

/// The local provider's default sandbox lifetime (Modal's maximum is the same).
pub const DEFAULT_LIFETIME_MS: u64 = 24 * 3600 * 1000;

impl Config {
    /// The read-only paths a sandbox needs: the supervisor's folder and every absolute path
    /// named in the supervisor's settings (its folder, when it names a file).
    pub fn derive_ro_paths(supervisor: &Path, env: &BTreeMap<String, String>) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = supervisor
            .parent()
            .map(Path::to_path_buf)
            .into_iter()
            .collect();
        for v in env.values() {
            let p = Path::new(v);
            if !p.is_absolute() {
                continue;
            }
            let dir = if p.is_dir() { Some(p) } else { p.parent() };
            if let Some(d) = dir.filter(|d| d.exists() && *d != Path::new("/")) {
                out.push(d.to_path_buf());
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Repository {
    pub clone_url: String,
    #[serde(default = "main_branch")]
    pub base_branch: String,
}

fn main_branch() -> String {
    "main".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisorSpec {
    pub control_url: String,
    pub sandbox_token: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// `None` for a pooled sandbox: it boots fully and waits for `assign`.
    pub session_id: Option<String>,
    pub repository: Repository,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub supervisor: Option<SupervisorSpec>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub lifetime_ms: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// The contract's Sandbox object.
#[derive(Debug, Clone, Serialize)]
pub struct Sandbox {
    pub id: String,
    pub session_id: Option<String>,
    pub status: &'static str,
    pub repository: Repository,
    pub image: Option<String>,
    pub snapshot: Option<String>,
    pub created_at: u64,
    pub ready_at: Option<u64>,
    pub terminated_at: Option<u64>,
    /// The provider terminates the sandbox at this time (its lifetime).
    pub expires_at: u64,
    pub labels: BTreeMap<String, String>,
    pub error: Option<ErrorBody>,
}

struct Entry {
    sandbox: Sandbox,
    dir: PathBuf,
    /// Process-group id of the supervisor's tree.
    pgid: Option<i32>,
    /// Loopback port of the supervisor's local API, once it has said it.
    supervisor_port: Option<u16>,
    /// What the sandbox was created with (to start it again after a stop).
    create: CreateBody,
}

pub struct Provider {
    pub(crate) cfg: Config,
    sandboxes: Mutex<HashMap<String, Entry>>,
    pub(crate) images: Mutex<HashMap<String, images::Image>>,
    http: reqwest::Client,
}

pub type Shared = Arc<Provider>;

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

pub(crate) fn err(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

impl Provider {
    pub fn new(cfg: Config) -> Shared {
        Arc::new(Provider {
            cfg,
            sandboxes: Mutex::new(HashMap::new()),
            images: Mutex::new(HashMap::new()),
            http: reqwest::Client::new(),
        })
    }

    /// Terminates every sandbox (the provider is shutting down).
    pub async fn shutdown(&self) {
        let live: Vec<(String, Option<i32>)> = match self.sandboxes.lock() {
            Ok(mut map) => map
                .iter_mut()
                .filter(|(_, e)| e.sandbox.status != "terminated")
                .map(|(id, e)| {
                    e.sandbox.status = "terminated";
                    (id.clone(), e.pgid)
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        for (id, pgid) in live {
            if let Some(g) = pgid {
                procs::kill_group(g);
            }
            procs::kill_marked(&id).await;
        }
    }

    fn get(&self, id: &str) -> Option<Sandbox> {
        let map = self.sandboxes.lock().ok()?;
        map.get(id).map(|e| e.sandbox.clone())
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) {
        if let Ok(mut map) = self.sandboxes.lock() {
            if let Some(e) = map.get_mut(id) {
                f(e);
            }
        }
    }

    fn dir_of(&self, id: &str) -> Option<PathBuf> {
        let map = self.sandboxes.lock().ok()?;
        map.get(id).map(|e| e.dir.clone())
    }

    fn supervisor_port(&self, id: &str) -> Option<u16> {
        let map = self.sandboxes.lock().ok()?;
        map.get(id).and_then(|e| e.supervisor_port)
    }

    fn fail(&self, id: &str, code: &str, message: String) {
        eprintln!("provider: sandbox {id} failed: {code}: {message}");
        self.update(id, |e| {
            e.sandbox.status = "failed";
            e.sandbox.error = Some(ErrorBody {
                code: code.into(),
                message,
            });
        });
    }

    /// Wraps a command in the sandbox's isolation.
    pub(crate) fn isolate(&self, dir: &Path, extra_rw: &[PathBuf], argv: &[String]) -> Command {
        let mut cmd = match self.cfg.isolation {
            Isolation::Bubblewrap => {
                let mut c = Command::new("bwrap");
                c.args(["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]);
                c.args(["--tmpfs", "/tmp"]);
                for p in &self.cfg.ro_paths {
                    let p = p.to_string_lossy().to_string();
                    c.args(["--ro-bind", &p, &p]);
                }
                let d = dir.to_string_lossy().to_string();
                c.args(["--bind", &d, &d]);
                for p in extra_rw {
                    let p = p.to_string_lossy().to_string();
                    c.args(["--bind", &p, &p]);
                }
                c.args(["--unshare-pid", "--unshare-ipc", "--die-with-parent", "--"]);
                c.args(argv);
                c
            }
            Isolation::None => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        cmd.process_group(0);
        cmd
    }
}

/// A clone URL that names a directory on this machine (so the sandbox may push to it).
pub(crate) fn local_remote(url: &str) -> Option<PathBuf> {
    let p = url.strip_prefix("file://").unwrap_or(url);
    let path = Path::new(p);
    (path.is_absolute() && path.exists()).then(|| path.to_path_buf())
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

/// Verifies the request signature; the body is read by the caller and passed in.
pub(crate) fn check(
    p: &Provider,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<Response> {
    let path = uri.path_and_query().map(|x| x.as_str()).unwrap_or("/");
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    match signing::verify(
        &p.cfg.secret,
        method.as_str(),
        path,
        h(signing::TIMESTAMP_HEADER),
        h(signing::SIGNATURE_HEADER),
        body,
        now_ms(),
    ) {
        Ok(()) => None,
        Err(e) => Some(err(StatusCode::UNAUTHORIZED, e.code(), e.to_string())),
    }
}

macro_rules! signed {
    ($p:expr, $m:expr, $u:expr, $h:expr, $b:expr) => {
        if let Some(r) = $crate::provider::check(&$p, &$m, &$u, &$h, &$b) {
            return r;
        }
    };
}
pub(crate) use signed;

async fn health(State(p): State<Shared>, m: Method, u: Uri, h: HeaderMap) -> Response {
    signed!(p, m, u, h, []);
    Json(json!({"ok": true, "provider": "local", "isolation": p.cfg.isolation})).into_response()
}

pub(crate) fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = format!("the body does not match the contract: {e}");
        Refusal(StatusCode::BAD_REQUEST, "invalid_body", msg)
    })
}

async fn create(State(p): State<Shared>, m: Method, u: Uri, h: HeaderMap, body: Bytes) -> Response {
    signed!(p, m, u, h, body);
    let c: CreateBody = match parse(&body) {
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

pub(crate) fn valid_id(id: &str, prefix: &str) -> bool {
    id.starts_with(prefix)
        && id.len() < 64
        && id[prefix.len()..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric())
}

fn snapshot_expired(dir: &Path) -> bool {
    let meta: Value = std::fs::read_to_string(dir.join("meta.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    meta["expires_at"].as_u64().is_some_and(|e| e <= now_ms())
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
async fn start_sandbox(p: &Shared, c: CreateBody, from: Option<PathBuf>) -> Response {
    if c.session_id.as_deref() == Some("") || c.repository.clone_url.is_empty() {
        return err(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "session_id (or null for a pooled sandbox) and repository.clone_url are required",
        );
    }
    let created_at = now_ms();
    let id = format!("sbx_{}", random_hex(12));
    let dir = p.cfg.root.join("sandboxes").join(&id);
    let sandbox = Sandbox {
        id: id.clone(),
        session_id: c.session_id.clone(),
        status: "creating",
        repository: c.repository.clone(),
        image: c.image.clone(),
        snapshot: c.snapshot.clone(),
        created_at,
        ready_at: None,
        terminated_at: None,
        expires_at: created_at + c.lifetime_ms.unwrap_or(p.cfg.lifetime_ms),
        labels: c.labels.clone(),
        error: None,
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
            },
        );
    }
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
        if s.status == "terminated" || s.status == "failed" {
            return;
        }
        let now = now_ms();
        if now >= s.expires_at {
            eprintln!("provider: sandbox {id} reached its lifetime; terminating");
            // The reason first, so the sandbox is never seen terminated without it.
            p.update(&id, |e| {
                e.sandbox.error = Some(ErrorBody {
                    code: "lifetime".into(),
                    message: "the sandbox reached the end of its lifetime".into(),
                })
            });
            halt(&p, &id, "terminated").await;
            return;
        }
        tokio::time::sleep(Duration::from_millis((s.expires_at - now).min(60_000))).await;
    }
}

pub(crate) async fn run_git(args: &[&str], cwd: Option<&Path>) -> Result<String, String> {
    let mut cmd = Command::new("git");
    cmd.args(args).env("GIT_TERMINAL_PROMPT", "0");
    if let Some(d) = cwd {
        cmd.current_dir(d);
    }
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("git could not run: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Prepares the checkout, starts the supervisor and waits for it to report its port.
async fn boot(p: Shared, id: String, dir: PathBuf, c: CreateBody, from: Option<PathBuf>) {
    let repo = dir.join("repo");
    for sub in ["home", "logs", "state"] {
        if let Err(e) = tokio::fs::create_dir_all(dir.join(sub)).await {
            return p.fail(
                &id,
                "internal",
                format!("cannot create {}: {e}", dir.display()),
            );
        }
    }
    if repo.join(".git").exists() {
        // Started again after a stop: the checkout is kept as it was.
    } else if let Some(src) = from {
        if !copy_tree(&src.join("repo"), &repo).await {
            return p.fail(
                &id,
                "internal",
                format!("could not copy the checkout from {}", src.display()),
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
                format!("the repository {url} does not exist"),
            );
        }
        let repo_s = repo.to_string_lossy().to_string();
        if let Err(e) = run_git(
            &[
                "clone",
                "--quiet",
                "--branch",
                &c.repository.base_branch,
                url,
                &repo_s,
            ],
            None,
        )
        .await
        {
            return p.fail(
                &id,
                "clone_failed",
                format!("git clone of {url} failed: {e}"),
            );
        }
    }
    let mut extra = Vec::new();
    if let Some(remote) = local_remote(&c.repository.clone_url) {
        extra.push(remote);
    }
    let argv = vec![p.cfg.supervisor.to_string_lossy().to_string()];
    let mut cmd = p.isolate(&dir, &extra, &argv);
    let home = dir.join("home");
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("NIGHTSHIFT_SANDBOX_ID", &id)
        .env(
            "NIGHTSHIFT_SESSION_ID",
            c.session_id.as_deref().unwrap_or(""),
        )
        .env("NIGHTSHIFT_SANDBOX_DIR", &dir)
        .env("NIGHTSHIFT_BASE_BRANCH", &c.repository.base_branch);
    let log = match std::fs::File::create(dir.join("logs").join("supervisor.log")) {
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
        e.sandbox.status = "syncing";
    });
    // Secrets go on standard input after start, never into an image or a snapshot.
    if let Some(mut stdin) = child.stdin.take() {
        let env: BTreeMap<&String, &String> =
            p.cfg.supervisor_env.iter().chain(c.env.iter()).collect();
        let secrets = json!({"supervisor": c.supervisor, "env": env});
        let _ = stdin.write_all(format!("{secrets}\n").as_bytes()).await;
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
                m.get(&id2)
                    .map(|e| matches!(e.sandbox.status, "terminated" | "stopped") || e.pgid != pgid)
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
    // Wait for the supervisor to publish its API port, then for readiness.
    let port_file = dir.join("state").join("supervisor.json");
    let deadline = now_ms() + c.timeout_ms.unwrap_or(120_000).min(600_000);
    loop {
        let Some(s) = p.get(&id) else { return };
        if s.status == "terminated" || s.status == "failed" {
            return;
        }
        if let Ok(text) = tokio::fs::read_to_string(&port_file).await {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                let port = v["port"].as_u64().map(|x| x as u16);
                p.update(&id, |e| e.supervisor_port = port);
                if v["ready"] == true {
                    p.update(&id, |e| {
                        if e.sandbox.status == "syncing" {
                            e.sandbox.status = "ready";
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
    Json(json!({"sandboxes": out})).into_response()
}

/// The sandbox as it is now.
fn current(p: &Shared, id: &str) -> Response {
    match p.get(id) {
        Some(s) => Json(s).into_response(),
        None => not_found(id),
    }
}

/// A request the provider refuses, with its status and stable code.
pub(crate) struct Refusal(
    pub(crate) StatusCode,
    pub(crate) &'static str,
    pub(crate) String,
);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        err(self.0, self.1, self.2)
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
    if s.status == "terminated" || s.status == "failed" {
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    command: Vec<String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    stdin: Option<String>,
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
    let b: ExecBody = match parse(&body) {
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
    let (s, dir) = match live(&p, &id) {
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
    if let Some(remote) = local_remote(&s.repository.clone_url) {
        extra.push(remote);
    }
    let mut cmd = p.isolate(&dir, &extra, &b.command);
    cmd.current_dir(&cwd)
        .env("HOME", dir.join("home"))
        .env("NIGHTSHIFT_SANDBOX_ID", &id)
        .envs(&b.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
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
    if let Some(mut stdin) = child.stdin.take() {
        let input = b.stdin.unwrap_or_default();
        tokio::spawn(async move {
            let _ = stdin.write_all(input.as_bytes()).await;
        });
    }
    let pid = child.id().map(|x| x as i32);
    let timeout = Duration::from_millis(b.timeout_ms.unwrap_or(60_000).min(600_000));
    let out = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return err(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        Err(_) => {
            if let Some(pid) = pid {
                procs::kill_group(pid);
            }
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
    let cut = |v: &[u8]| String::from_utf8_lossy(&v[..v.len().min(MAX_OUTPUT)]).to_string();
    Json(json!({
        "exit_code": out.status.code().unwrap_or(-1),
        "stdout": cut(&out.stdout),
        "stderr": cut(&out.stderr),
        "duration_ms": now_ms() - started,
        "truncated": out.stdout.len() > MAX_OUTPUT || out.stderr.len() > MAX_OUTPUT,
    }))
    .into_response()
}

#[derive(Deserialize)]
pub(crate) struct LogQuery {
    pub(crate) follow: Option<String>,
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
    let path = dir.join("logs").join(format!("{service}.log"));
    if !path.exists() {
        return err(
            StatusCode::NOT_FOUND,
            "log_not_found",
            format!("sandbox {id} has no log `{service}`; try `supervisor` or `opencode`"),
        );
    }
    let follow = q.follow.as_deref().is_some_and(|f| f == "1" || f == "true");
    let p2 = p.clone();
    sse_lines(path, follow, move || {
        p2.get(&id)
            .is_some_and(|s| s.status != "terminated" && s.status != "failed")
    })
}

/// Streams a log file as server-sent events, one `data:` line per line; with `follow`, keeps
/// streaming while `alive()` holds; ends with `event: end`.
pub(crate) fn sse_lines(
    path: PathBuf,
    follow: bool,
    alive: impl Fn() -> bool + Clone + Send + Sync + 'static,
) -> Response {
    let stream = futures_util::stream::unfold(
        (0usize, String::new(), false),
        move |(mut offset, mut carry, done)| {
            let path = path.clone();
            let alive = alive.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    let data = tokio::fs::read(&path).await.unwrap_or_default();
                    if data.len() > offset {
                        carry.push_str(&String::from_utf8_lossy(&data[offset..]));
                        offset = data.len();
                        let mut out = String::new();
                        while let Some(i) = carry.find('\n') {
                            let line: String = carry.drain(..=i).collect();
                            out.push_str(&format!("data: {}\n\n", line.trim_end()));
                        }
                        if !out.is_empty() {
                            return Some((
                                Ok::<Bytes, std::convert::Infallible>(Bytes::from(out)),
                                (offset, carry, false),
                            ));
                        }
                    }
                    if !follow || !alive() {
                        let rest = if carry.is_empty() {
                            String::new()
                        } else {
                            format!("data: {carry}\n\n")
                        };
                        return Some((
                            Ok(Bytes::from(rest + "event: end\ndata: {}\n\n")),
                            (offset, String::new(), true),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        },
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| err(StatusCode::INTERNAL_SERVER_ERROR, "internal", "stream"))
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
    if s.status != "terminated" {
        // Anything that left the group (setsid, double fork) is found by its sandbox mark.
        halt(&p, &id, "terminated").await;
    }
    current(&p, &id)
}

/// Kills the sandbox's processes and sets its status (`stopped` keeps its directory for a later start).
async fn halt(p: &Shared, id: &str, status: &'static str) {
    let pgid = {
        let map = p.sandboxes.lock().ok();
        map.and_then(|m| m.get(id).and_then(|e| e.pgid))
    };
    p.update(id, |e| {
        e.sandbox.status = status;
        e.pgid = None;
        e.supervisor_port = None;
        if status == "terminated" {
            e.sandbox.terminated_at = Some(now_ms());
        }
    });
    if let Some(g) = pgid {
        procs::kill_group(g);
    }
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
        "terminated" => {
            return err(
                StatusCode::CONFLICT,
                "sandbox_terminated",
                format!("sandbox {id} is terminated"),
            )
        }
        "stopped" => {}
        _ => halt(&p, &id, "stopped").await,
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
    if s.status != "stopped" {
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
        e.sandbox.status = "creating";
        e.sandbox.ready_at = None;
        e.sandbox.error = None;
        e.sandbox.expires_at = now_ms() + e.create.lifetime_ms.unwrap_or(p.cfg.lifetime_ms);
    });
    let _ = tokio::fs::remove_file(dir.join("state").join("supervisor.json")).await;
    let p2 = p.clone();
    let id2 = id.clone();
    tokio::spawn(async move { boot(p2, id2, dir, create, None).await });
    current(&p, &id)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    #[serde(default)]
    ttl_ms: Option<u64>,
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
    let b: SnapshotBody = if body.is_empty() {
        SnapshotBody::default()
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
    let meta =
        json!({"id": snap_id, "sandbox_id": id, "created_at": created, "expires_at": expires});
    if let Err(e) = tokio::fs::write(sdir.join("meta.json"), meta.to_string()).await {
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
    let mut c: CreateBody = match parse(&body) {
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

/// Forwards to the supervisor's loopback API.
async fn to_supervisor(p: &Shared, id: &str, method: Method, path: &str) -> Response {
    if let Err(r) = live(p, id) {
        return r.into_response();
    }
    let Some(port) = p.supervisor_port(id) else {
        return Json(
            json!({"sync": {"state": "not_started"}, "branch": null, "head": null, "dirty": false}),
        )
        .into_response();
    };
    let url = format!("http://127.0.0.1:{port}{path}");
    let res = p.http.request(method, &url).send().await;
    match res {
        Ok(r) => {
            let status =
                StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (status, Json(v)).into_response()
        }
        Err(e) => err(
            StatusCode::BAD_GATEWAY,
            "supervisor_unreachable",
            format!("the sandbox's supervisor did not answer: {e}"),
        ),
    }
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
        Ok(t) => match serde_json::from_str::<Value>(&t) {
            Ok(v) => Json(v).into_response(),
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
    Json(json!({"id": id, "deleted": true})).into_response()
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignBody {
    session_id: String,
    supervisor: SupervisorSpec,
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
    let b: AssignBody = match parse(&body) {
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
    let claimed: Result<Option<u16>, Refusal> = match p.sandboxes.lock() {
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
            Some(e) if e.sandbox.status != "ready" => Err(Refusal(
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
                e.create.supervisor = Some(b.supervisor.clone());
                Ok(e.supervisor_port)
            }
        },
        Err(_) => Err(Refusal(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "state lock".into(),
        )),
    };
    let port = match claimed {
        Ok(Some(port)) => port,
        Ok(None) => {
            return err(
                StatusCode::INTERNAL_SERVER_ERROR,
                "supervisor_unreachable",
                "no supervisor port",
            )
        }
        Err(r) => return r.into_response(),
    };
    let sent = p
        .http
        .post(format!("http://127.0.0.1:{port}/assign"))
        .json(
            &json!({"session_id": b.session_id, "control_url": b.supervisor.control_url,
            "sandbox_token": b.supervisor.sandbox_token}),
        )
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => current(&p, &id),
        other => {
            let why = match other {
                Ok(r) => format!("the supervisor answered {}", r.status()),
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
