//! The local provider's state and what its handlers share: configuration and isolation, the sandboxes and images it holds (as the contract's objects, `nightshift_core::provider`), the request signature check, refusals, body parsing and log streaming.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use nightshift_core::signing;
use serde::Deserialize;
use tokio::process::Command;

use crate::procs;

/// How this provider isolates sandboxes from the machine and from each other (reported as
/// the contract's [`nightshift_core::provider::Isolation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    Bubblewrap,
    None,
}

impl From<Isolation> for nightshift_core::provider::Isolation {
    fn from(isolation: Isolation) -> Self {
        match isolation {
            Isolation::Bubblewrap => nightshift_core::provider::Isolation::Bubblewrap,
            Isolation::None => nightshift_core::provider::Isolation::None,
        }
    }
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

// The contract's objects and bodies are the core's (`nightshift_core::provider`), shared with
// the control plane's client and pinned by the contract's fixtures.
pub use nightshift_core::provider::{
    CreateSandbox, ErrorAnswer, ErrorBody, Image, ImageStatus, Repository, Sandbox, SandboxStatus,
    SupervisorSpec,
};

pub(crate) struct Entry {
    pub(crate) sandbox: Sandbox,
    pub(crate) dir: PathBuf,
    /// Process-group id of the supervisor's tree.
    pub(crate) pgid: Option<i32>,
    /// Loopback port of the supervisor's local API, once it has said it.
    pub(crate) supervisor_port: Option<u16>,
    /// What the sandbox was created with (to start it again after a stop).
    pub(crate) create: CreateSandbox,
    /// The bearer secret of the supervisor's local API (given to it on stdin; never in a file
    /// the provider reads back).
    pub(crate) api_secret: String,
    /// Launchers of execs still running (their trees die with the sandbox).
    pub(crate) execs: Vec<i32>,
    /// The sandbox's egress proxy (with bubblewrap: its own network, this is its only way out).
    pub(crate) egress: Option<crate::egress::Running>,
}

pub struct Provider {
    pub(crate) cfg: Config,
    pub(crate) sandboxes: Mutex<HashMap<String, Entry>>,
    pub(crate) images: Mutex<HashMap<String, Image>>,
    pub(crate) http: reqwest::Client,
    /// Nonces of the signed requests of the last signing window (replays are refused).
    pub(crate) nonces: Mutex<signing::NonceCache>,
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
    (status, Json(ErrorAnswer::new(code, message))).into_response()
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
                .filter(|(_, e)| e.sandbox.status != SandboxStatus::Terminated)
                .map(|(id, e)| {
                    e.sandbox.status = SandboxStatus::Terminated;
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

    pub(crate) fn get(&self, id: &str) -> Option<Sandbox> {
        let map = self.sandboxes.lock().ok()?;
        map.get(id).map(|e| e.sandbox.clone())
    }

    pub(crate) fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) {
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
    pub(crate) fn record(&self, sandbox: &Sandbox) {
        if let Ok(bytes) = serde_json::to_vec(sandbox) {
            write_record(&self.host_dir(&sandbox.id), "sandbox.json", &bytes);
        }
    }

    pub(crate) fn dir_of(&self, id: &str) -> Option<PathBuf> {
        let map = self.sandboxes.lock().ok()?;
        map.get(id).map(|e| e.dir.clone())
    }

    /// The supervisor's local API: its port and the secret it wants.
    pub(crate) fn supervisor_api(&self, id: &str) -> Option<(u16, String)> {
        let map = self.sandboxes.lock().ok()?;
        map.get(id)
            .and_then(|e| e.supervisor_port.map(|port| (port, e.api_secret.clone())))
    }

    pub(crate) fn api_secret(&self, id: &str) -> Option<String> {
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
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn clone_inside(
        &self,
        dir: &Path,
        extra: &[PathBuf],
        url: &str,
        branch: &str,
        dest: &Path,
        net: Option<&Path>,
        token: Option<&str>,
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
        let mut env: BTreeMap<String, String> = [
            ("HOME", dir.join("home").to_string_lossy().to_string()),
            ("GIT_TERMINAL_PROMPT", "0".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // The clone's token reaches this one `git` as environment: never the checkout's config.
        if let Some(token) = token {
            env.extend(nightshift_core::provider::git_auth_env(token));
        }
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

    pub(crate) fn clone_url(&self, id: &str) -> Option<String> {
        let map = self.sandboxes.lock().ok()?;
        map.get(id).map(|e| e.create.repository.clone_url.clone())
    }

    pub(crate) fn fail(&self, id: &str, code: &str, message: String) {
        let message = self.scrub(&message);
        eprintln!("provider: sandbox {id} failed: {code}: {message}");
        self.update(id, |e| {
            e.sandbox.status = SandboxStatus::Failed;
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
    pub(crate) fn track_exec(&self, id: &str, pid: Option<i32>, running: bool) {
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
pub(crate) fn kill_roots(roots: &[i32]) {
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
        if let Some(r) = $crate::state::check(&$p, &$m, &$u, &$h, &$b) {
            return r;
        }
    };
}

pub(crate) use signed;

pub(crate) fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = format!("the body does not match the contract: {e}");
        Refusal(StatusCode::BAD_REQUEST, "invalid_body", msg)
    })
}

pub(crate) fn valid_id(id: &str, prefix: &str) -> bool {
    id.starts_with(prefix)
        && id.len() < 64
        && id[prefix.len()..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric())
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

#[derive(Deserialize)]
pub(crate) struct LogQuery {
    pub(crate) follow: Option<String>,
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
    pub(crate) fn read(&self, offset: u64) -> std::io::Result<Vec<u8>> {
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
