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

/// Where bubblewrap is looked for (never through `PATH`, which a caller could influence).
pub const BWRAP_PATHS: [&str; 3] = ["/usr/bin/bwrap", "/usr/local/bin/bwrap", "/bin/bwrap"];

/// The `PATH` of every process in a sandbox.
pub const SANDBOX_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The entries of the host's `/etc` a sandbox sees (read-only): what git, sh, TLS, name
/// resolution and OpenCode need. Missing ones are skipped.
pub const ETC_ENTRIES: [&str; 22] = [
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "passwd",
    "group",
    "hosts",
    "hostname",
    "resolv.conf",
    "nsswitch.conf",
    "host.conf",
    "gai.conf",
    "gitconfig",
    "alternatives",
    "localtime",
    "timezone",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "mime.types",
    "protocols",
    "services",
    "os-release",
];

/// Bubblewrap's absolute path: `PROVIDER_BWRAP` when set (it must be absolute), else the first of [`BWRAP_PATHS`] that exists.
pub fn find_bwrap(configured: Option<&str>) -> Result<PathBuf, String> {
    if let Some(c) = configured {
        let p = PathBuf::from(c);
        if !p.is_absolute() {
            return Err("PROVIDER_BWRAP must be an absolute path".into());
        }
        return Ok(p);
    }
    BWRAP_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            format!(
                "bubblewrap is not installed (looked for {})",
                BWRAP_PATHS.join(", ")
            )
        })
}

/// Provider settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub root: PathBuf,
    pub secret: Vec<u8>,
    pub isolation: Isolation,
    /// Bubblewrap, by absolute path (resolved once at start).
    pub bwrap: PathBuf,
    /// The provider's own executable: without isolation it launches sandbox processes
    /// (`__reap`, see `procs::reap_main`).
    pub launcher: PathBuf,
    /// Resource limits of every sandbox process.
    pub limits: procs::Limits,
    /// The cgroup controllers the provider may use (a whole sandbox's processes, memory, CPU).
    pub groups: crate::cgroup::Groups,
    /// The supervisor executable started in every sandbox.
    pub supervisor: PathBuf,
    /// Environment given to every supervisor (OpenCode location, model settings, …).
    pub supervisor_env: BTreeMap<String, String>,
    /// Host paths a sandbox must see read-only even where its own mounts would hide them
    /// (the supervisor, OpenCode and paths named in the settings, e.g. under /tmp).
    pub ro_paths: Vec<PathBuf>,
    /// A sandbox's life when its create names none (`lifetime_ms`); it is terminated at `expires_at`.
    pub lifetime_ms: u64,
    /// Single-user dev mode (`NIGHTSHIFT_DEV_MODE=1`: `scripts/dev.sh` and the tests): local
    /// paths and `file://` clone URLs are accepted, and loopback git hosts.
    pub dev_mode: bool,
    /// `ssh://` clone URLs are accepted (`PROVIDER_ALLOW_SSH=1`).
    pub allow_ssh: bool,
}

/// The local provider's default sandbox lifetime (Modal's maximum is the same).
pub const DEFAULT_LIFETIME_MS: u64 = 24 * 3600 * 1000;

impl Config {
    /// The read-only paths a sandbox needs: the supervisor itself and every absolute path
    /// named in the supervisor's settings (its folder, when it names a file).
    pub fn derive_ro_paths(supervisor: &Path, env: &BTreeMap<String, String>) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = vec![supervisor.to_path_buf()];
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

/// True for an environment name a caller may set in a sandbox: `[A-Z_][A-Z0-9_]*`, except
/// `PATH`, `LD_*`, `BASH_ENV` and `ENV` (they choose what runs).
pub fn allowed_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_uppercase() || b == b'_');
    first_ok
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && !matches!(name, "PATH" | "BASH_ENV" | "ENV")
        && !name.starts_with("LD_")
}

/// Checks a caller's environment for a sandbox process (`400 invalid_env`).
pub(crate) fn check_env(env: &BTreeMap<String, String>) -> Result<(), Refusal> {
    for (k, v) in env {
        if !allowed_env_name(k) {
            let shown: String = k.chars().take(64).collect();
            return Err(Refusal(
                StatusCode::BAD_REQUEST,
                "invalid_env",
                format!("the environment name `{shown}` is not allowed: names match [A-Z_][A-Z0-9_]* and may not be PATH, LD_*, BASH_ENV or ENV"),
            ));
        }
        if v.contains('\0') {
            return Err(Refusal(
                StatusCode::BAD_REQUEST,
                "invalid_env",
                format!("the value of `{k}` holds a NUL byte"),
            ));
        }
    }
    Ok(())
}

/// Removes credentials (userinfo) from every URL in `text`: `https://user:token@host/x` becomes `https://host/x`.
pub fn redact_url(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#' | '\'' | '"' | '`') || c.is_whitespace())
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => out.push_str(&authority[at + 1..]),
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Repository {
    pub clone_url: String,
    #[serde(default = "main_branch")]
    pub base_branch: String,
    /// Hosts beyond the defaults this repository's sandboxes may reach (egress allowlist).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<String>,
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

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// The contract's Sandbox object.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    /// How this sandbox is isolated (`none` says plainly that it is not).
    pub isolation: Isolation,
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
    /// The bearer secret of the supervisor's local API (given to it on stdin; never in a file
    /// the provider reads back).
    api_secret: String,
    /// Launchers of execs still running (their trees die with the sandbox).
    execs: Vec<i32>,
    /// The sandbox's egress proxy (with bubblewrap: its own network, this is its only way out).
    egress: Option<crate::egress::Running>,
}

pub struct Provider {
    pub(crate) cfg: Config,
    sandboxes: Mutex<HashMap<String, Entry>>,
    pub(crate) images: Mutex<HashMap<String, images::Image>>,
    http: reqwest::Client,
    /// Nonces of the signed requests of the last signing window (replays are refused).
    nonces: Mutex<signing::NonceCache>,
}

pub type Shared = Arc<Provider>;

/// Writes `name` in a provider-owned folder atomically (a temporary file, then a rename).
pub(crate) fn write_record(dir: &Path, name: &str, bytes: &[u8]) {
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = dir.join(format!(".{name}.tmp"));
    if std::fs::write(&tmp, bytes).is_ok() {
        let _ = std::fs::rename(&tmp, dir.join(name));
    }
}

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
            nonces: Mutex::new(signing::NonceCache::new()),
        })
    }

    /// Terminates every sandbox (the provider is shutting down).
    pub async fn shutdown(&self) {
        let live: Vec<(String, Vec<i32>)> = match self.sandboxes.lock() {
            Ok(mut map) => map
                .iter_mut()
                .filter(|(_, e)| e.sandbox.status != "terminated")
                .map(|(id, e)| {
                    e.sandbox.status = "terminated";
                    let roots = e.pgid.into_iter().chain(e.execs.drain(..)).collect();
                    (id.clone(), roots)
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        for (id, roots) in live {
            self.cfg.groups.kill_and_remove(&id).await;
            kill_roots(&roots);
            procs::kill_marked(&id).await;
        }
    }

    fn get(&self, id: &str) -> Option<Sandbox> {
        let map = self.sandboxes.lock().ok()?;
        map.get(id).map(|e| e.sandbox.clone())
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) {
        // Only a change of the public record is written (the boot loop updates every 20 ms).
        let changed = self.sandboxes.lock().ok().and_then(|mut map| {
            map.get_mut(id).and_then(|e| {
                let before = e.sandbox.clone();
                f(e);
                (e.sandbox != before).then(|| e.sandbox.clone())
            })
        });
        if let Some(sandbox) = changed {
            self.record(&sandbox);
        }
    }

    /// Writes the sandbox's public record (no secrets) in its provider-owned folder.
    fn record(&self, sandbox: &Sandbox) {
        if let Ok(bytes) = serde_json::to_vec(sandbox) {
            write_record(&self.host_dir(&sandbox.id), "sandbox.json", &bytes);
        }
    }

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
            let read = |name: &str| {
                std::fs::read(entry.path().join(name))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            };
            if valid_id(&id, "img_") {
                if let Some(v) = read("image.json") {
                    images.push((id, v));
                }
            } else if valid_id(&id, "sbx_") {
                if let Some(v) = read("sandbox.json") {
                    sandboxes.push((id, v));
                }
            }
        }
        images::recover(self, &images);
        // Whatever an earlier run left in its control groups dies now.
        for group in self.cfg.groups.existing() {
            self.cfg.groups.kill_and_remove(&group).await;
        }
        for (id, v) in &sandboxes {
            procs::kill_marked(id).await;
            let over = matches!(v["status"].as_str(), Some("terminated" | "failed"));
            let Ok(repository) = serde_json::from_value::<Repository>(v["repository"].clone())
            else {
                continue;
            };
            let create: CreateBody = match serde_json::from_value(json!({
                "session_id": v["session_id"], "repository": repository,
                "image": v["image"], "snapshot": v["snapshot"], "labels": v["labels"],
            })) {
                Ok(c) => c,
                Err(_) => continue,
            };
            let error = if over {
                v["error"]["code"].as_str().map(|code| ErrorBody {
                    code: code.into(),
                    message: v["error"]["message"].as_str().unwrap_or("").into(),
                })
            } else {
                Some(ErrorBody {
                    code: "lost".into(),
                    message: "the provider restarted and the sandbox's processes ended; start a new sandbox (its checkout and snapshots are kept)".into(),
                })
            };
            let status = match v["status"].as_str() {
                Some("terminated") => "terminated",
                _ => "failed",
            };
            let sandbox = Sandbox {
                id: id.clone(),
                session_id: create.session_id.clone(),
                status,
                repository: create.repository.clone(),
                image: create.image.clone(),
                snapshot: create.snapshot.clone(),
                created_at: v["created_at"].as_u64().unwrap_or(0),
                ready_at: v["ready_at"].as_u64(),
                terminated_at: v["terminated_at"].as_u64(),
                expires_at: v["expires_at"].as_u64().unwrap_or(0),
                labels: create.labels.clone(),
                error,
                isolation: self.cfg.isolation,
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

    fn dir_of(&self, id: &str) -> Option<PathBuf> {
        let map = self.sandboxes.lock().ok()?;
        map.get(id).map(|e| e.dir.clone())
    }

    /// The supervisor's local API: its port and the secret it wants.
    fn supervisor_api(&self, id: &str) -> Option<(u16, String)> {
        let map = self.sandboxes.lock().ok()?;
        map.get(id)
            .and_then(|e| e.supervisor_port.map(|port| (port, e.api_secret.clone())))
    }

    fn api_secret(&self, id: &str) -> Option<String> {
        let map = self.sandboxes.lock().ok()?;
        map.get(id).map(|e| e.api_secret.clone())
    }

    /// The provider's own directory for sandbox or image `id` (logs): never bound into a sandbox.
    pub(crate) fn host_dir(&self, id: &str) -> PathBuf {
        self.cfg.root.join("host").join(id)
    }

    /// Whether sandboxes get their own network namespace (and the egress proxy).
    pub(crate) fn own_network(&self) -> bool {
        self.cfg.isolation == Isolation::Bubblewrap
    }

    /// `argv` run under the supervisor's `--egress-run` (a loopback forwarder to the egress
    /// proxy and the proxy variables), for execs and build steps in their own network.
    pub(crate) fn through_egress(&self, argv: &[String]) -> Vec<String> {
        let mut out = vec![
            self.cfg.supervisor.to_string_lossy().to_string(),
            "--egress-run".to_string(),
            "--".to_string(),
        ];
        out.extend(argv.iter().cloned());
        out
    }

    /// Clones `url` into `dest` inside the sandbox rooted at `dir` (its own network and egress
    /// proxy when `net` is given), never on the host; answers git's error text.
    pub(crate) async fn clone_inside(
        &self,
        dir: &Path,
        extra: &[PathBuf],
        url: &str,
        branch: &str,
        dest: &Path,
        net: Option<&Path>,
    ) -> Result<(), String> {
        let argv: Vec<String> = [
            "git",
            "clone",
            "--quiet",
            "--branch",
            branch,
            "--",
            url,
            &dest.to_string_lossy(),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        let argv = if net.is_some() {
            self.through_egress(&argv)
        } else {
            argv
        };
        let env: BTreeMap<String, String> = [
            ("HOME", dir.join("home").to_string_lossy().to_string()),
            ("GIT_TERMINAL_PROMPT", "0".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let out = self
            .isolate(dir, extra, &argv, &env, dir, net)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("git could not run: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// The egress policy of a repository: the defaults, its own hosts, and `extra`.
    pub(crate) fn policy_for(&self, repo: &Repository, extra: &[String]) -> crate::egress::Policy {
        let mut more = repo.egress.clone();
        more.extend(extra.iter().cloned());
        crate::egress::Policy::with_defaults(&more)
    }

    /// Checks a clone URL (scheme, mode, allowlist, and where its host resolves).
    pub(crate) async fn check_clone(&self, repo: &Repository) -> Result<(), Refusal> {
        use nightshift_core::egress::{check_clone_url, is_internal, CloneSource};
        let refuse = |m: String| Refusal(StatusCode::BAD_REQUEST, "invalid_repository", m);
        let policy = self.policy_for(repo, &[]);
        let source = check_clone_url(
            &repo.clone_url,
            self.cfg.dev_mode,
            self.cfg.allow_ssh,
            &policy,
        )
        .map_err(|e| refuse(e.to_string()))?;
        if let CloneSource::Remote { host, port } = source {
            if !self.cfg.dev_mode && host.parse::<std::net::IpAddr>().is_err() {
                let addrs = tokio::net::lookup_host((host.as_str(), port)).await;
                let internal = addrs.map(|mut a| a.any(|a| is_internal(a.ip())));
                if internal.unwrap_or(false) {
                    return Err(refuse(format!(
                        "{host} resolves to an internal address; clone from a public git host"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Text for people: URL credentials removed and the provider's paths cut out.
    pub(crate) fn scrub(&self, text: &str) -> String {
        let root = self.cfg.root.to_string_lossy();
        redact_url(text).replace(root.as_ref(), "…")
    }

    fn clone_url(&self, id: &str) -> Option<String> {
        let map = self.sandboxes.lock().ok()?;
        map.get(id).map(|e| e.create.repository.clone_url.clone())
    }

    fn fail(&self, id: &str, code: &str, message: String) {
        let message = self.scrub(&message);
        eprintln!("provider: sandbox {id} failed: {code}: {message}");
        self.update(id, |e| {
            e.sandbox.status = "failed";
            e.sandbox.error = Some(ErrorBody {
                code: code.into(),
                message,
            });
        });
    }

    /// Wraps `argv` in the sandbox's isolation. The launcher runs by absolute path with a
    /// cleared environment; `env` (plus `PATH`) reaches only the sandboxed process. With
    /// bubblewrap the process sees a fresh root: read-only `/usr` (and the `/bin`, `/lib`…
    /// links), selected `/etc` entries, the configured read-only paths, its own directory
    /// read-write, and nothing else of the host; its own user, pid, ipc, uts and cgroup
    /// namespaces (the network is still shared), a new session and no capabilities.
    /// Resource limits apply in every case.
    pub(crate) fn isolate(
        &self,
        dir: &Path,
        extra_rw: &[PathBuf],
        argv: &[String],
        env: &BTreeMap<String, String>,
        cwd: &Path,
        net: Option<&Path>,
    ) -> Command {
        let mut env = env.clone();
        env.insert("PATH".into(), SANDBOX_PATH.into());
        let mut cmd = match self.cfg.isolation {
            Isolation::Bubblewrap => {
                let mut c = Command::new(&self.cfg.bwrap);
                c.args(bwrap_profile(&self.cfg.ro_paths, dir, extra_rw));
                // Its own network (loopback only): the egress proxy's folder is its way out.
                if let Some(run) = net {
                    c.arg("--unshare-net")
                        .arg("--bind")
                        .arg(run)
                        .arg(crate::egress::SOCKET_DIR_INSIDE);
                    env.insert(
                        "NIGHTSHIFT_EGRESS_SOCKET".into(),
                        crate::egress::SOCKET_INSIDE.into(),
                    );
                }
                for (k, v) in &env {
                    c.arg("--setenv").arg(k).arg(v);
                }
                c.arg("--chdir").arg(cwd).arg("--");
                c.args(argv);
                c.current_dir("/");
                c.env_clear();
                c
            }
            Isolation::None => {
                // The provider itself, as a reaper: the tree dies with it (procs::reap_main).
                let mut c = Command::new(&self.cfg.launcher);
                c.arg("__reap").arg("--").args(argv);
                c.current_dir(cwd);
                c.env_clear().envs(&env);
                c
            }
        };
        let limits = self.cfg.limits;
        // The whole sandbox (boot, execs, builds in its folder) shares one group, named after
        // its folder. Fail closed: a group that cannot be made fails the spawn.
        let group = dir
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let join = self
            .cfg
            .groups
            .prepare(&group, self.group_limits())
            .map_err(|e| {
                eprintln!("provider: cannot prepare the control group of {group}: {e}");
                e.kind()
            });
        // SAFETY: the closure runs between fork and exec and only calls open/write/close and
        // getrlimit/setrlimit, which are async-signal-safe; it touches no shared state.
        unsafe {
            cmd.pre_exec(move || {
                match &join {
                    Ok(join) => join.enter()?,
                    Err(kind) => return Err(std::io::Error::from(*kind)),
                }
                limits.apply()
            });
        }
        cmd.process_group(0);
        cmd
    }

    fn group_limits(&self) -> crate::cgroup::GroupLimits {
        crate::cgroup::GroupLimits {
            procs: self.cfg.limits.procs,
            memory_mb: self.cfg.limits.memory_mb,
            cpus: self.cfg.limits.cpus,
        }
    }

    /// The cgroup controllers sandboxes are grouped in (empty: none usable here).
    pub fn cgroups(&self) -> Vec<&'static str> {
        self.cfg.groups.names()
    }

    /// How a sandbox's process count is limited here: a `pids` cgroup, the per-user rlimit
    /// (only when the provider is not root), or not at all.
    pub fn process_limit(&self) -> &'static str {
        if self.cfg.limits.procs == 0 {
            "none"
        } else if self.cfg.groups.has("pids") {
            "cgroup"
        // SAFETY: geteuid(2) has no arguments and cannot fail.
        } else if unsafe { libc::geteuid() } != 0 {
            "rlimit"
        } else {
            "none"
        }
    }

    /// Remembers a running exec's launcher (it is killed with the sandbox), or forgets it.
    fn track_exec(&self, id: &str, pid: Option<i32>, running: bool) {
        let Some(pid) = pid else { return };
        self.update(id, |e| {
            e.execs.retain(|p| *p != pid);
            if running {
                e.execs.push(pid);
            }
        });
    }
}

/// Bubblewrap's arguments for a sandbox rooted at `dir` (everything before `--setenv`/`--chdir`).
pub fn bwrap_profile(
    ro_paths: &[PathBuf],
    dir: &Path,
    extra_rw: &[PathBuf],
) -> Vec<std::ffi::OsString> {
    use std::ffi::{OsStr, OsString};
    let mut a: Vec<OsString> = [
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--hostname",
        "nightshift",
        "--new-session",
        "--die-with-parent",
        "--cap-drop",
        "ALL",
        "--clearenv",
        "--tmpfs",
        "/",
        "--ro-bind",
        "/usr",
        "/usr",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let mut push = |items: &[&OsStr]| a.extend(items.iter().map(|x| x.to_os_string()));
    let os = OsStr::new;
    for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        let Ok(meta) = std::fs::symlink_metadata(top) else {
            continue;
        };
        if meta.file_type().is_symlink() {
            if let Ok(target) = std::fs::read_link(top) {
                push(&[os("--symlink"), target.as_os_str(), os(top)]);
            }
        } else if meta.is_dir() {
            push(&[os("--ro-bind"), os(top), os(top)]);
        }
    }
    push(&[
        os("--dev"),
        os("/dev"),
        os("--proc"),
        os("/proc"),
        os("--tmpfs"),
        os("/tmp"),
        os("--dir"),
        os("/etc"),
    ]);
    for e in ETC_ENTRIES {
        let p = Path::new("/etc").join(e);
        push(&[os("--ro-bind-try"), p.as_os_str(), p.as_os_str()]);
    }
    for p in ro_paths {
        push(&[os("--ro-bind-try"), p.as_os_str(), p.as_os_str()]);
    }
    push(&[os("--bind"), dir.as_os_str(), dir.as_os_str()]);
    // A dev-mode local remote is readable (clone, fetch), never writable: pushes go through
    // the provider's relay (`egress::RELAY_HOST`).
    for p in extra_rw {
        push(&[os("--ro-bind"), p.as_os_str(), p.as_os_str()]);
    }
    a
}

/// Kills the process trees of a sandbox's launchers (then their groups, for what left the tree).
fn kill_roots(roots: &[i32]) {
    for r in roots {
        procs::kill_tree(*r);
        procs::kill_group(*r);
    }
}

/// Checks that bubblewrap works here with the sandbox profile (a fresh root at `probe_dir`):
/// the tools are there and the host's `/root` and the provider's root are not.
pub async fn probe_bubblewrap(p: &Provider, probe_dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(probe_dir)
        .map_err(|e| format!("cannot create the probe directory: {e}"))?;
    let root = p.cfg.root.join("sandboxes");
    let script = format!(
        "test -x /usr/bin/env && test -x /bin/sh && test ! -e '{}'",
        root.display()
    );
    let argv: Vec<String> = vec!["/bin/sh".into(), "-c".into(), script];
    let out = p
        .isolate(
            probe_dir,
            &[],
            &argv,
            &BTreeMap::new(),
            probe_dir,
            Some(probe_dir),
        )
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", p.cfg.bwrap.display()))?;
    let _ = std::fs::remove_dir_all(probe_dir);
    if let Some(name) = probe_dir.file_name() {
        p.cfg.groups.kill_and_remove(&name.to_string_lossy()).await;
    }
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} does not work here ({}): {}",
            p.cfg.bwrap.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
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
    let now = now_ms();
    let nonce = h(signing::NONCE_HEADER).map(str::trim);
    let signed = signing::Signed {
        timestamp: h(signing::TIMESTAMP_HEADER),
        nonce,
        signature: h(signing::SIGNATURE_HEADER),
    };
    // The signature first: only a verified request's nonce is remembered.
    let checked = signing::verify(&p.cfg.secret, method.as_str(), path, signed, body, now)
        .and_then(|ts| match p.nonces.lock() {
            Ok(mut cache) => cache.remember(nonce.unwrap_or_default(), ts, now),
            Err(_) => Err(signing::SignError::Flooded),
        });
    match checked {
        Ok(()) => None,
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
            Some(err(status, e.code(), e.to_string()))
        }
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
    Json(json!({
        "ok": true,
        "provider": "local",
        "isolation": p.cfg.isolation,
        "limits": {"processes": p.process_limit(), "cgroups": p.cfg.groups.names()},
    }))
    .into_response()
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
    if let Err(r) = p.check_clone(&c.repository).await {
        return r.into_response();
    }
    let created_at = now_ms();
    let id = format!("sbx_{}", random_hex(12));
    let dir = p.cfg.root.join("sandboxes").join(&id);
    let sandbox = Sandbox {
        id: id.clone(),
        session_id: c.session_id.clone(),
        status: "creating",
        repository: Repository {
            clone_url: redact_url(&c.repository.clone_url),
            ..c.repository.clone()
        },
        image: c.image.clone(),
        snapshot: c.snapshot.clone(),
        created_at,
        ready_at: None,
        terminated_at: None,
        expires_at: created_at + c.lifetime_ms.unwrap_or(p.cfg.lifetime_ms),
        labels: c.labels.clone(),
        error: None,
        isolation: p.cfg.isolation,
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

/// Runs git on the host (clones only, before anything of the sandbox runs) with a minimal
/// environment: never the provider's secrets.
pub(crate) async fn run_git(args: &[&str], cwd: Option<&Path>) -> Result<String, String> {
    let mut cmd = Command::new("git");
    cmd.args(args).env_clear().env("GIT_TERMINAL_PROMPT", "0");
    for keep in ["PATH", "HOME", "LANG", "SSH_AUTH_SOCK"] {
        if let Some(v) = std::env::var_os(keep) {
            cmd.env(keep, v);
        }
    }
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
            .clone_inside(&dir, &extra, url, &c.repository.base_branch, &repo, net)
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
        e.sandbox.status = "syncing";
    });
    // Secrets go on standard input after start, never into an image or a snapshot.
    if let Some(mut stdin) = child.stdin.take() {
        // Behind the model proxy the sandbox gets a token of its own, never the model key.
        let env: BTreeMap<&String, &String> = p
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
            .collect();
        let api_secret = p.api_secret(&id).unwrap_or_default();
        let secrets = json!({"supervisor": c.supervisor, "env": env, "api_secret": api_secret,
            "model_token": model_token, "model_vendors": model_vendors});
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
    // Wait for the supervisor to publish its API port, then for readiness. The file is the
    // sandbox's: it is read without following links, and the port is only ever called with
    // this sandbox's api_secret (a port of someone else's supervisor refuses it).
    let deadline = now_ms() + c.timeout_ms.unwrap_or(120_000).min(600_000);
    loop {
        let Some(s) = p.get(&id) else { return };
        if s.status == "terminated" || s.status == "failed" {
            return;
        }
        let read = procs::read_beneath(&dir, &["state", "supervisor.json"], 0, 64 * 1024);
        if let Ok(bytes) = read {
            if let Ok(v) = serde_json::from_slice::<Value>(&bytes) {
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
    Json(json!({
        "exit_code": status.code().unwrap_or(-1),
        "stdout": text(&out),
        "stderr": text(&errs),
        "duration_ms": now_ms() - started,
        "truncated": out.len() > MAX_OUTPUT || errs.len() > MAX_OUTPUT,
    }))
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
        p2.get(&id)
            .is_some_and(|s| s.status != "terminated" && s.status != "failed")
    })
}

/// A log to stream: one in a provider-owned directory, or one a sandbox writes in its `logs/`.
#[derive(Debug, Clone)]
pub(crate) enum LogFile {
    Owned(PathBuf),
    Sandbox { dir: PathBuf, name: String },
}

/// Bytes read from a log per poll, at most.
const LOG_CHUNK: usize = 256 * 1024;

impl LogFile {
    /// The bytes from `offset` on (at most [`LOG_CHUNK`]).
    fn read(&self, offset: u64) -> std::io::Result<Vec<u8>> {
        match self {
            LogFile::Owned(path) => {
                let mut f = std::fs::File::open(path)?;
                procs::read_from(&mut f, offset, LOG_CHUNK)
            }
            LogFile::Sandbox { dir, name } => {
                procs::read_beneath(dir, &["logs", name], offset, LOG_CHUNK)
            }
        }
    }
}

/// Streams a log file as server-sent events, one `data:` line per line; with `follow`, keeps
/// streaming while `alive()` holds; ends with `event: end`.
pub(crate) fn sse_lines(
    file: LogFile,
    follow: bool,
    alive: impl Fn() -> bool + Clone + Send + Sync + 'static,
) -> Response {
    let stream = futures_util::stream::unfold(
        (0usize, String::new(), false),
        move |(mut offset, mut carry, done)| {
            let file = file.clone();
            let alive = alive.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    let f = file.clone();
                    let at = offset as u64;
                    let data = tokio::task::spawn_blocking(move || f.read(at))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_default();
                    if !data.is_empty() {
                        carry.push_str(&String::from_utf8_lossy(&data));
                        offset += data.len();
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
    let mut roots = Vec::new();
    p.update(id, |e| {
        e.sandbox.status = status;
        roots.extend(e.pgid.take());
        roots.append(&mut e.execs);
        e.supervisor_port = None;
        if status == "terminated" {
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
    // The sandbox's own file: removed without following a link it may have planted.
    let _ = procs::remove_beneath(&dir, &["state", "supervisor.json"]);
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressBody {
    allow: Vec<String>,
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
    let b: EgressBody = match parse(&body) {
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
    Json(json!({"id": id, "allow": b.allow, "enforced": enforced})).into_response()
}

/// Forwards to the supervisor's loopback API.
async fn to_supervisor(p: &Shared, id: &str, method: Method, path: &str) -> Response {
    if let Err(r) = live(p, id) {
        return r.into_response();
    }
    let Some((port, secret)) = p.supervisor_api(id) else {
        return Json(
            json!({"sync": {"state": "not_started"}, "branch": null, "head": null, "dirty": false}),
        )
        .into_response();
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
                .filter(|(_, e)| !matches!(e.sandbox.status, "terminated" | "failed" | "stopped"))
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
            halt(&p, &id, "terminated").await;
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
    let assignment = json!({"session_id": b.session_id, "control_url": b.supervisor.control_url,
        "sandbox_token": b.supervisor.sandbox_token});
    let sent = supervisor_call(
        &p,
        &id,
        port,
        &secret,
        Method::POST,
        "/assign",
        Some(assignment),
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
