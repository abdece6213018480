//! The sandbox supervisor: syncs the checkout, gates writes, runs OpenCode, and links the sandbox to its session over an acknowledged WebSocket.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{SinkExt, StreamExt};
use nightshift_core::gating::{Decision, Gate, SyncState};
use nightshift_core::hosted::{CloseCode, DownFrame, PromptFrame};
use nightshift_core::provider::{ErrorAnswer, GitStatus};
use nightshift_core::sandbox::{AgentEvent, Numbered, UpFrame};
use nightshift_core::tools::{ChildrenAnswer, ToolCall};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::process::Command;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::boot::{AssignAnswer, BootSecrets, SupervisorState};

/// Everything the supervisor is told at start: environment plus the secrets line on stdin.
#[derive(Debug, Clone)]
pub struct Settings {
    pub sandbox_id: String,
    /// Empty for a pooled sandbox until it is assigned to a session.
    pub session_id: String,
    pub dir: PathBuf,
    pub base_branch: String,
    pub control_url: Option<String>,
    pub token: Option<String>,
    pub opencode_bin: Option<PathBuf>,
    /// A `node_modules` folder holding `@opencode-ai/plugin` (so OpenCode never installs it).
    pub plugin_modules: Option<PathBuf>,
    /// `provider/model` as OpenCode names it; `nightshift/scripted` is the scripted model.
    pub model: String,
    /// More models of the `nightshift` provider that sessions and prompts may choose (`NIGHTSHIFT_MODELS`, comma-separated).
    pub models: Vec<String>,
    /// OpenAI-compatible base URL for the `nightshift` provider (the scripted model, or any compatible API).
    pub model_url: Option<String>,
    pub model_key: Option<String>,
    /// Extra wait before syncing (a slow network, for demos and tests).
    pub sync_delay_ms: u64,
    /// The sync also waits until this file exists (a network exactly as slow as a test wants).
    pub sync_gate_file: Option<PathBuf>,
    /// Environment for OpenCode (model keys and the like).
    pub env: BTreeMap<String, String>,
    /// The session's pushed branch to continue on instead of the base (a cold start of a
    /// session that already has work, when no snapshot could be restored, or of a session
    /// started on a pull request's branch); its pushes go there.
    pub continue_branch: Option<String>,
    /// (A continued `pull/N/head` is a fork's pull request: read only, see
    /// [`Settings::read_only_branch`].)
    /// The repository is private: git credentials come from the session over the link
    /// (`NIGHTSHIFT_GIT_AUTH=link`), and the first sync waits for them (a pooled sandbox's, for
    /// the session that claims it).
    pub git_auth_from_link: bool,
    /// The bearer secret every caller of the supervisor's local API must present (the
    /// provider's `api_secret` from the secrets line, else a fresh one only this sandbox knows).
    pub api_secret: String,
    /// OpenCode's server password (`OPENCODE_SERVER_PASSWORD`), fresh for each start: no other
    /// process on the machine can drive this sandbox's agent.
    pub opencode_password: String,
    /// The provider's egress proxy (a unix socket bound into the sandbox): the sandbox's only
    /// way out when it has its own network namespace.
    pub egress_socket: Option<PathBuf>,
    /// The token this sandbox presents to the model proxy (in place of any model key).
    pub model_token: Option<String>,
    /// OpenCode providers reached through the model proxy (`/<id>/…` routes).
    pub model_vendors: Vec<String>,
}

/// The loopback URL of the forwarder to the egress proxy, once it listens.
static PROXY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets the proxy variables every kind of tool reads (git, curl, npm, pip, Bun); loopback
/// stays direct (the supervisor's API, OpenCode's own server).
fn with_proxy(cmd: &mut Command) {
    with_proxy_for(cmd, true)
}

fn with_proxy_for(cmd: &mut Command, loopback_direct: bool) {
    if let Some(proxy) = PROXY.get() {
        for k in [
            "http_proxy",
            "https_proxy",
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "npm_config_proxy",
            "npm_config_https_proxy",
        ] {
            cmd.env(k, proxy);
        }
        if loopback_direct {
            cmd.env("no_proxy", "127.0.0.1,localhost")
                .env("NO_PROXY", "127.0.0.1,localhost");
        }
    }
}

impl Settings {
    /// True when the continued branch is a fork's pull request (`pull/N/head`): its work is
    /// never pushed, only answered as a patch.
    pub fn read_only_branch(&self) -> bool {
        self.continue_branch.as_deref().is_some_and(|b| {
            b.strip_prefix("pull/")
                .and_then(|rest| rest.strip_suffix("/head"))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
        })
    }

    /// Reads settings from the process environment and the JSON secrets line.
    pub fn from(env: BTreeMap<String, String>, secrets: &BootSecrets) -> Result<Settings, String> {
        let mut all = env;
        for (k, v) in &secrets.env {
            all.insert(k.clone(), v.clone());
        }
        let need = |k: &str| all.get(k).cloned().ok_or(format!("{k} is not set"));
        let dir = PathBuf::from(need("NIGHTSHIFT_SANDBOX_DIR")?);
        Ok(Settings {
            sandbox_id: need("NIGHTSHIFT_SANDBOX_ID")?,
            session_id: need("NIGHTSHIFT_SESSION_ID")?,
            base_branch: all
                .get("NIGHTSHIFT_BASE_BRANCH")
                .cloned()
                .unwrap_or("main".into()),
            control_url: secrets.supervisor.as_ref().map(|s| s.control_url.clone()),
            token: secrets.supervisor.as_ref().map(|s| s.sandbox_token.clone()),
            opencode_bin: all.get("NIGHTSHIFT_OPENCODE_BIN").map(PathBuf::from),
            plugin_modules: all.get("NIGHTSHIFT_PLUGIN_MODULES").map(PathBuf::from),
            model: all
                .get("NIGHTSHIFT_MODEL")
                .cloned()
                .unwrap_or("nightshift/scripted".into()),
            models: all
                .get("NIGHTSHIFT_MODELS")
                .map(|m| {
                    m.split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
            model_url: all.get("NIGHTSHIFT_MODEL_URL").cloned(),
            model_key: all.get("NIGHTSHIFT_MODEL_KEY").cloned(),
            sync_delay_ms: all
                .get("NIGHTSHIFT_SYNC_DELAY_MS")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            sync_gate_file: all.get("NIGHTSHIFT_SYNC_GATE_FILE").map(PathBuf::from),
            continue_branch: all
                .get("NIGHTSHIFT_CONTINUE_BRANCH")
                .filter(|b| nightshift_core::repository::valid_branch_name(b))
                .cloned(),
            git_auth_from_link: all.get("NIGHTSHIFT_GIT_AUTH").map(String::as_str) == Some("link"),
            api_secret: Some(secrets.api_secret.clone())
                .filter(|t| t.len() >= 16)
                .unwrap_or_else(|| crate::state::random_hex(16)),
            opencode_password: crate::state::random_hex(16),
            egress_socket: all.get("NIGHTSHIFT_EGRESS_SOCKET").map(PathBuf::from),
            model_token: secrets.model_token.clone(),
            model_vendors: secrets.model_vendors.clone(),
            env: all
                .into_iter()
                .filter(|(k, _)| k.ends_with("_API_KEY") || k.ends_with("_BASE_URL"))
                .collect(),
            dir,
        })
    }

    fn repo(&self) -> PathBuf {
        self.dir.join("repo")
    }
}

/// A prompt handed to the sandbox by its session.
#[derive(Debug, Clone, Deserialize)]
pub struct PromptJob {
    pub id: String,
    pub text: String,
    pub author_name: String,
    pub author_email: String,
    #[serde(default)]
    pub model: Option<String>,
}

impl From<PromptFrame> for PromptJob {
    fn from(p: PromptFrame) -> PromptJob {
        PromptJob {
            id: p.id,
            text: p.text,
            author_name: p.author_name,
            author_email: p.author_email,
            model: p.model,
        }
    }
}

pub struct Supervisor {
    pub cfg: Settings,
    gate: Mutex<Gate>,
    /// Unacknowledged events, numbered.
    outbox: Mutex<VecDeque<Numbered>>,
    next_n: Mutex<u64>,
    wake: Notify,
    /// The OpenCode server's base URL once it is up.
    opencode: Mutex<Option<String>>,
    http: reqwest::Client,
    branch: Mutex<Option<String>>,
    /// The session this sandbox works for, once known (at start, or by `POST /assign` for a pooled one).
    assignment: Mutex<Option<Assignment>>,
    assigned: Notify,
    /// The tool the agent is running now (named in `egress.blocked` events).
    running_tool: Mutex<Option<String>>,
}

/// Where the session link goes: set at start, or later for a pooled sandbox (`POST /assign`
/// from the provider).
pub use crate::boot::Assignment;

pub type Shared = Arc<Supervisor>;

fn log(msg: &str) {
    println!("supervisor: {msg}");
}

impl Supervisor {
    pub fn new(cfg: Settings) -> Shared {
        let assignment = match (&cfg.control_url, &cfg.token) {
            (Some(c), Some(t)) if !cfg.session_id.is_empty() => Some(Assignment {
                session_id: cfg.session_id.clone(),
                control_url: c.clone(),
                sandbox_token: t.clone(),
            }),
            _ => None,
        };
        Arc::new(Supervisor {
            cfg,
            gate: Mutex::new(Gate::default()),
            outbox: Mutex::new(VecDeque::new()),
            next_n: Mutex::new(0),
            wake: Notify::new(),
            opencode: Mutex::new(None),
            http: reqwest::Client::new(),
            branch: Mutex::new(None),
            assignment: Mutex::new(assignment),
            assigned: Notify::new(),
            running_tool: Mutex::new(None),
        })
    }

    /// The session this sandbox works for (empty while pooled).
    pub fn session_id(&self) -> String {
        self.assignment
            .lock()
            .ok()
            .and_then(|a| a.as_ref().map(|a| a.session_id.clone()))
            .unwrap_or_else(|| self.cfg.session_id.clone())
    }

    /// Gives a pooled sandbox its session; refused when it already has one.
    pub fn assign(&self, a: Assignment) -> Result<(), String> {
        let Ok(mut cur) = self.assignment.lock() else {
            return Err("the supervisor is unavailable".into());
        };
        if let Some(c) = cur.as_ref() {
            return Err(format!("already working for session {}", c.session_id));
        }
        log(&format!("assigned to session {}", a.session_id));
        *cur = Some(a);
        drop(cur);
        // Every waiter (the link and a sync waiting for credentials) goes on.
        self.assigned.notify_waiters();
        Ok(())
    }

    async fn wait_assignment(&self) -> Assignment {
        loop {
            let notified = self.assigned.notified();
            if let Some(a) = self.assignment.lock().ok().and_then(|a| a.clone()) {
                return a;
            }
            notified.await;
        }
    }

    /// Queues an event for the session; it is resent until acknowledged.
    pub fn emit(&self, event: AgentEvent) {
        {
            // Numbering and queueing happen under one lock so renumbering cannot interleave.
            let Ok(mut next) = self.next_n.lock() else {
                return;
            };
            *next += 1;
            if let Ok(mut o) = self.outbox.lock() {
                o.push_back(Numbered { n: *next, event });
            }
        }
        self.wake.notify_one();
    }

    /// The session has stored events up to `last_n`. A supervisor that started again (after a
    /// stop) numbers from 1; it continues after the session's number instead.
    pub fn welcome(&self, last_n: u64) {
        if let Ok(mut next) = self.next_n.lock() {
            if let Ok(mut o) = self.outbox.lock() {
                if last_n > *next {
                    let mut n = last_n;
                    for numbered in o.iter_mut() {
                        n += 1;
                        numbered.n = n;
                    }
                    *next = n;
                }
                while o.front().is_some_and(|e| e.n <= last_n) {
                    o.pop_front();
                }
            }
        }
    }

    /// A request to this sandbox's OpenCode server (with its password).
    fn to_opencode(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, url)
            .basic_auth("opencode", Some(&self.cfg.opencode_password))
    }

    fn status(&self, stage: &str, detail: &str) {
        log(&format!("stage {stage} {detail}"));
        self.emit(AgentEvent::Status {
            stage: stage.into(),
            detail: detail.into(),
        });
    }

    fn sync_state(&self) -> SyncState {
        self.gate
            .lock()
            .map(|g| g.sync.clone())
            .unwrap_or(SyncState::NotStarted)
    }
}

/// The session's git credentials (an installation token), in this process's memory only: given
/// to the supervisor's own `git` commands as environment, never written anywhere.
static GIT_TOKEN: Mutex<Option<String>> = Mutex::new(None);

fn git_token() -> Option<String> {
    GIT_TOKEN.lock().ok().and_then(|t| t.clone())
}

async fn git(repo: &Path, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("git");
    // Every remote, a loopback one included (a developer's own git server), is reached through
    // the egress proxy: the sandbox's own loopback has no git server.
    with_proxy_for(&mut cmd, false);
    if let Some(token) = git_token() {
        cmd.envs(nightshift_core::provider::git_auth_env(&token));
    }
    let out = cmd
        .args(args)
        .current_dir(repo)
        .env("GIT_TERMINAL_PROMPT", "0")
        // Read-only commands (the `git` status route's `status --porcelain`) must not take the
        // index lock to refresh it: a sync's checkout or a commit running at the same moment
        // would fail with "index.lock: File exists".
        .env("GIT_OPTIONAL_LOCKS", "0")
        .output()
        .await
        .map_err(|e| format!("git could not run: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Works on the session's branch as the checkout has it: the sync is done.
async fn continue_on(s: &Shared, branch: &str, why: &str) {
    let commit = git(&s.cfg.repo(), &["rev-parse", "HEAD"])
        .await
        .unwrap_or_default();
    if let Ok(mut b) = s.branch.lock() {
        *b = Some(branch.to_string());
    }
    if let Ok(mut g) = s.gate.lock() {
        g.synced(&commit);
    }
    s.status("synced", &format!("continuing {branch} at {commit} {why}"));
}

/// Brings the checkout to the latest base branch, unless the agent has already written.
pub async fn sync(s: Shared) {
    let started = s.gate.lock().map(|mut g| g.start_sync()).unwrap_or(false);
    if !started {
        return;
    }
    s.status("syncing", &format!("fetching origin/{}", s.cfg.base_branch));
    if s.cfg.sync_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(s.cfg.sync_delay_ms)).await;
    }
    if let Some(gate) = &s.cfg.sync_gate_file {
        log(&format!("sync waits for {}", gate.display()));
        while !gate.exists() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let repo = s.cfg.repo();
    // A private repository's fetch needs the credentials the session sends once linked.
    if s.cfg.git_auth_from_link {
        // A pooled sandbox has no session yet: its credentials come once one claims it.
        s.wait_assignment().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while git_token().is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // A checkout restored from a snapshot is on the session's branch: keep its work as it is.
    let head_branch = git(&repo, &["symbolic-ref", "--quiet", "--short", "HEAD"])
        .await
        .unwrap_or_default();
    if head_branch.starts_with("nightshift/") {
        return continue_on(&s, &head_branch, "from the snapshot").await;
    }
    // A cold start of a session with pushed work continues its branch.
    if let Some(b) = &s.cfg.continue_branch {
        let fetched = git(&repo, &["fetch", "--quiet", "origin", b]).await;
        let checked = match fetched {
            Ok(_) => git(&repo, &["checkout", "--quiet", "-B", b, "FETCH_HEAD"]).await,
            Err(e) => Err(e),
        };
        match checked {
            Ok(_) => return continue_on(&s, b, "(the session's pushed work)").await,
            Err(e) => log(&format!("cannot continue {b}: {e}; syncing the base")),
        }
    }
    let result = async {
        git(&repo, &["fetch", "--quiet", "origin", &s.cfg.base_branch]).await?;
        git(
            &repo,
            &[
                "checkout",
                "--quiet",
                "-B",
                &s.cfg.base_branch,
                "FETCH_HEAD",
            ],
        )
        .await?;
        git(&repo, &["rev-parse", "HEAD"]).await
    }
    .await;
    match result {
        Ok(commit) => {
            if let Ok(mut g) = s.gate.lock() {
                g.synced(&commit);
            }
            s.status("synced", &commit);
        }
        Err(e) => {
            if let Ok(mut g) = s.gate.lock() {
                g.failed(&e);
            }
            s.status("sync_failed", &e);
        }
    }
}

#[derive(Deserialize)]
struct GateQuery {
    tool: String,
}

/// The supervisor's loopback API: gate decisions for the OpenCode plugin, git status for the provider.
/// Every route needs the sandbox's API secret as a bearer token (the provider and this
/// sandbox's OpenCode plugin have it; other sandboxes do not).
pub fn local_api(s: Shared) -> Router {
    Router::new()
        .route("/gate", get(gate))
        .route("/git", get(git_status))
        .route("/git/sync", post(git_sync))
        .route("/assign", post(assign))
        .route("/background", post(background))
        .route("/warmup/v1/chat/completions", post(warmup_model))
        .layer(axum::middleware::from_fn_with_state(
            s.clone(),
            require_secret,
        ))
        .with_state(s)
}

async fn require_secret(
    State(s): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if nightshift_core::signing::secrets_match(t, &s.cfg.api_secret) => {
            next.run(req).await
        }
        _ => (
            StatusCode::UNAUTHORIZED,
            Json(ErrorAnswer::new(
                "unauthorized",
                "the sandbox's local API needs its secret",
            )),
        )
            .into_response(),
    }
}

/// The warm-up model: answers one short streamed completion, so OpenCode's whole prompt path
/// (instance, config, plugins, tools, provider SDK) is initialised before the sandbox says `ready`.
async fn warmup_model() -> Response {
    let chunk = |delta: Value, finish: Value| {
        json!({"id": "chatcmpl-warmup", "object": "chat.completion.chunk", "created": 0, "model": WARMUP_MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let usage = json!({"id": "chatcmpl-warmup", "object": "chat.completion.chunk", "created": 0, "model": WARMUP_MODEL,
        "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
    let body = [
        chunk(
            json!({"role": "assistant", "content": "ready"}),
            Value::Null,
        ),
        chunk(json!({}), json!("stop")),
        usage,
    ]
    .iter()
    .map(|c| format!("data: {c}\n\n"))
    .collect::<String>()
        + "data: [DONE]\n\n";
    ([("content-type", "text/event-stream")], body).into_response()
}

/// The OpenCode provider and model of the warm-up turn (served by the supervisor itself).
const WARMUP_PROVIDER: &str = "nightshift-warmup";
const WARMUP_MODEL: &str = "warmup";

async fn assign(State(s): State<Shared>, body: axum::body::Bytes) -> Response {
    let a: Assignment = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return (
                axum::http::StatusCode::BAD_REQUEST,
                Json(ErrorAnswer::new("invalid_body", e.to_string())),
            )
                .into_response()
        }
    };
    match s.assign(a) {
        Ok(()) => Json(AssignAnswer { assigned: true }).into_response(),
        Err(m) => (
            axum::http::StatusCode::CONFLICT,
            Json(ErrorAnswer::new("sandbox_assigned", m)),
        )
            .into_response(),
    }
}

/// The agent tools (`spawn_session`, `check_session`) reach the control plane through here,
/// with this sandbox's token; `check` with `wait_seconds` polls until every child has ended.
async fn background(State(s): State<Shared>, body: axum::body::Bytes) -> Response {
    let fail = |code: axum::http::StatusCode, c: &str, m: String| {
        (code, Json(ErrorAnswer::new(c, m))).into_response()
    };
    let Some(a) = s.assignment.lock().ok().and_then(|a| a.clone()) else {
        return fail(
            axum::http::StatusCode::CONFLICT,
            "no_session",
            "this sandbox works for no session yet".into(),
        );
    };
    let call = match serde_json::from_slice::<ToolCall>(&body) {
        Ok(call) => call,
        Err(e) => {
            return fail(
                axum::http::StatusCode::BAD_REQUEST,
                "invalid_tool_request",
                e.to_string(),
            )
        }
    };
    let wait = call.wait(1800);
    let req = call.request;
    let url = format!(
        "{}/sandbox-link/{}/background",
        a.control_url.trim_end_matches('/'),
        a.session_id
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(wait);
    let client = control_client();
    loop {
        let sent = client
            .post(&url)
            .bearer_auth(&a.sandbox_token)
            .json(&req)
            .send()
            .await;
        let (status, v) = match sent {
            Ok(r) => {
                let st = r.status().as_u16();
                (st, r.json::<Value>().await.unwrap_or(Value::Null))
            }
            Err(e) => {
                return fail(
                    axum::http::StatusCode::BAD_GATEWAY,
                    "control_unreachable",
                    format!("the control plane did not answer: {e}"),
                )
            }
        };
        // A refusal or a spawn's answer is no list of children: it goes back as it is.
        let all_ended =
            serde_json::from_value::<ChildrenAnswer>(v.clone()).is_ok_and(|c| c.all_ended());
        if status != 200 || wait == 0 || all_ended || std::time::Instant::now() >= deadline {
            let code = axum::http::StatusCode::from_u16(status)
                .unwrap_or(axum::http::StatusCode::BAD_GATEWAY);
            return (code, Json(v)).into_response();
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
}

async fn gate(State(s): State<Shared>, Query(q): Query<GateQuery>) -> Response {
    let decision = match s.gate.lock() {
        Ok(mut g) => g.check(&q.tool),
        Err(_) => Decision::Block {
            message: "Blocked: the supervisor is unavailable".into(),
        },
    };
    match decision {
        Decision::Allow => Json(json!({"allow": true})).into_response(),
        Decision::Block { message } => {
            s.emit(AgentEvent::Blocked {
                tool: q.tool.clone(),
                message: message.clone(),
            });
            Json(json!({"allow": false, "message": message})).into_response()
        }
    }
}

/// The checkout as the provider's `GET /v1/sandboxes/{id}/git` answers it.
async fn git_status_value(s: &Shared) -> GitStatus {
    let repo = s.cfg.repo();
    let head = git(&repo, &["rev-parse", "HEAD"]).await.ok();
    let branch = git(&repo, &["rev-parse", "--abbrev-ref", "HEAD"])
        .await
        .ok();
    let dirty = git(&repo, &["status", "--porcelain"])
        .await
        .map(|o| !o.is_empty())
        .unwrap_or(false);
    GitStatus {
        sync: s.sync_state(),
        branch,
        head,
        dirty,
    }
}

async fn git_status(State(s): State<Shared>) -> Response {
    Json(git_status_value(&s).await).into_response()
}

async fn git_sync(State(s): State<Shared>) -> Response {
    let wrote = s.gate.lock().map(|g| g.wrote).unwrap_or(false);
    if wrote {
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": {"code": "sync_refused", "message": "the agent has already changed files; the checkout is not re-synced"}})),
        )
            .into_response();
    }
    tokio::spawn(sync(s.clone()));
    tokio::time::sleep(Duration::from_millis(5)).await;
    (StatusCode::ACCEPTED, Json(git_status_value(&s).await)).into_response()
}

/// The version of `@opencode-ai/plugin` that goes with the pinned OpenCode.
const PLUGIN_VERSION: &str = "1.18.33";

/// Writes OpenCode's private config: the model provider, permissions and the gating plugin.
pub fn write_opencode_config(s: &Settings, gate_port: u16) -> std::io::Result<PathBuf> {
    let home = s.dir.join("home");
    let cfg_dir = home.join(".config").join("opencode");
    std::fs::create_dir_all(cfg_dir.join("plugin"))?;
    // Behind the egress proxy the model is reached through the provider's model proxy, which
    // adds the key: the sandbox holds only its own token.
    let (base_url, key) = match (&s.egress_socket, &s.model_token) {
        (Some(_), Some(token)) => (
            format!("http://{}/v1", crate::egress::MODEL_HOST),
            token.clone(),
        ),
        _ => (
            s.model_url
                .clone()
                .unwrap_or("http://127.0.0.1:8790/v1".into()),
            s.model_key.clone().unwrap_or("none".into()),
        ),
    };
    // Models of the OpenAI-compatible `nightshift` provider: the scripted one and the configured one.
    let mut models = serde_json::Map::new();
    models.insert("scripted".into(), json!({"name": "Scripted"}));
    for m in std::iter::once(&s.model).chain(s.models.iter()) {
        if let Some(id) = m.strip_prefix("nightshift/") {
            models.insert(id.to_string(), json!({"name": id}));
        }
    }
    let warmup_url = format!("http://127.0.0.1:{gate_port}/warmup/v1");
    let mut config = json!({
        "$schema": "https://opencode.ai/config.json",
        "model": s.model,
        "provider": {"nightshift": {"npm": "@ai-sdk/openai-compatible", "name": "Nightshift",
            "options": {"baseURL": base_url, "apiKey": key},
            "models": models},
            WARMUP_PROVIDER: {"npm": "@ai-sdk/openai-compatible", "name": "Nightshift warm-up",
            "options": {"baseURL": warmup_url, "apiKey": s.api_secret},
            "models": {WARMUP_MODEL: {"name": "warm-up"}}}},
        "permission": {"edit": "allow", "bash": "allow", "webfetch": "allow", "question": "deny",
            "doom_loop": "allow", "external_directory": "deny"},
        "snapshot": false,
        "autoupdate": false,
        "share": "disabled"
    });
    // OpenCode's own providers (Anthropic, OpenAI, …) through the model proxy too: their base
    // URL is the proxy's route and their key this sandbox's token.
    if let (Some(_), Some(token)) = (&s.egress_socket, &s.model_token) {
        for vendor in &s.model_vendors {
            config["provider"][vendor] = json!({"options": {
                "baseURL": format!("http://{}/{vendor}", crate::egress::MODEL_HOST),
                "apiKey": token,
            }});
        }
    }
    std::fs::write(cfg_dir.join("opencode.json"), config.to_string())?;
    let plugin = format!(
        r#"// Nightshift: write gating (asks the sandbox supervisor before any tool runs) and the
// background-agent tools (through the supervisor, with this sandbox's token).
import {{ tool }} from "@opencode-ai/plugin";

const api = "http://127.0.0.1:{gate_port}";
const auth = {{ authorization: "Bearer {secret}" }};
const background = async (body) => {{
  const r = await fetch(api + "/background", {{
    method: "POST", headers: {{ "content-type": "application/json", ...auth }}, body: JSON.stringify(body),
  }});
  return await r.text();
}};

export const NightshiftGate = async () => ({{
  "tool.execute.before": async (input) => {{
    const r = await fetch(api + "/gate?tool=" + encodeURIComponent(input.tool), {{ headers: auth }});
    const v = await r.json();
    if (!v.allow) throw new Error(v.message);
  }},
  tool: {{
    spawn_session: tool({{
      description: "Start a background agent: a new session with its own sandbox that works on `prompt` in `repository` (this session's repository when omitted; any registered one by name) and pushes its own branch. Answers the agent's id and status. Limits on depth, fan-out and concurrency are reported as errors.",
      args: {{
        prompt: tool.schema.string().describe("What the background agent should do"),
        repository: tool.schema.string().optional().describe("A registered repository's name or a clone URL"),
        model: tool.schema.string().optional().describe("provider/model for the agent"),
      }},
      async execute(args) {{ return background({{ op: "spawn", ...args }}); }},
    }}),
    check_session: tool({{
      description: "Status and latest output (final message, branch, changed files) of one background agent this session spawned (`id`), or of all of them. With `wait_seconds`, waits until they have all ended or the time is up.",
      args: {{
        id: tool.schema.string().optional().describe("An agent id from spawn_session; all when omitted"),
        wait_seconds: tool.schema.number().optional().describe("Wait up to this long for them to end"),
      }},
      async execute(args) {{ return background({{ op: "check", ...args }}); }},
    }}),
  }},
}});
"#,
        secret = s.api_secret
    );
    std::fs::write(cfg_dir.join("plugin").join("nightshift-gate.js"), plugin)?;
    // OpenCode installs a config folder's dependencies (`@opencode-ai/plugin`, from the npm
    // registry: ~62 MB, seconds to minutes) unless `node_modules` exists and `package-lock.json`
    // names every dependency; a `.gitignore` it would otherwise write. With all four in place
    // it has nothing to install, on the person's time or ever.
    std::fs::write(
        cfg_dir.join("package.json"),
        format!(r#"{{"dependencies":{{"@opencode-ai/plugin":"{PLUGIN_VERSION}"}}}}"#),
    )?;
    std::fs::write(
        cfg_dir.join("package-lock.json"),
        json!({"name": "opencode", "lockfileVersion": 3, "requires": true, "packages": {
            "": {"dependencies": {"@opencode-ai/plugin": PLUGIN_VERSION}},
            "node_modules/@opencode-ai/plugin": {"version": PLUGIN_VERSION},
        }})
        .to_string(),
    )?;
    std::fs::write(
        cfg_dir.join(".gitignore"),
        "node_modules\npackage.json\npackage-lock.json\nbun.lock\n.gitignore\n",
    )?;
    std::fs::create_dir_all(cfg_dir.join("node_modules"))?;
    if let Some(src) = &s.plugin_modules {
        let dst = cfg_dir.join("node_modules").join("@opencode-ai");
        std::fs::create_dir_all(&dst)?;
        for pkg in ["plugin", "sdk"] {
            let from = src.join("@opencode-ai").join(pkg);
            let to = dst.join(pkg);
            if from.exists() && !to.exists() {
                std::os::unix::fs::symlink(&from, &to)?;
            }
        }
    }
    Ok(home)
}

fn free_port() -> Option<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()
        .map(|a| a.port())
}

/// Starts `opencode serve` and waits for its "listening" line.
pub async fn start_opencode(s: &Shared, gate_port: u16) -> Result<String, String> {
    let bin = s
        .cfg
        .opencode_bin
        .clone()
        .ok_or("NIGHTSHIFT_OPENCODE_BIN is not set")?;
    let home = write_opencode_config(&s.cfg, gate_port)
        .map_err(|e| format!("cannot write the OpenCode config: {e}"))?;
    let port = free_port().ok_or("no free port")?;
    let log_path = s.cfg.dir.join("logs").join("opencode.log");
    let logf = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let logf2 = logf.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.args([
        "serve",
        "--hostname",
        "127.0.0.1",
        "--port",
        &port.to_string(),
    ])
    .current_dir(s.cfg.repo())
    .env("HOME", &home)
    .env("XDG_CONFIG_HOME", home.join(".config"))
    .env("XDG_DATA_HOME", home.join(".local/share"))
    .env("XDG_CACHE_HOME", home.join(".cache"))
    .env("XDG_STATE_HOME", home.join(".local/state"))
    .env("OPENCODE_DISABLE_MODELS_FETCH", "1")
    .env("OPENCODE_DISABLE_AUTOUPDATE", "1")
    .env("OPENCODE_DISABLE_LSP_DOWNLOAD", "1")
    .env("OPENCODE_DISABLE_SHARE", "1")
    .env("OPENCODE_DISABLE_DEFAULT_PLUGINS", "1")
    .env("OPENCODE_SERVER_PASSWORD", &s.cfg.opencode_password)
    .envs(&s.cfg.env);
    with_proxy(&mut cmd);
    cmd.stdin(Stdio::null())
        .stdout(logf)
        .stderr(logf2)
        .kill_on_drop(true);
    let own_namespace = OwnNamespace::prepare();
    // SAFETY: the closure runs in the forked child before exec and makes only raw syscalls on
    // buffers prepared before the fork (no allocation, no lock).
    unsafe {
        cmd.pre_exec(move || {
            own_namespace.enter();
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start OpenCode: {e}"))?;
    if let Some(pid) = child.id() {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/user")).ok();
        let ours = std::fs::read_link("/proc/self/ns/user").ok();
        if theirs.is_some() && theirs != ours {
            log("the agent runs in a user namespace of its own: the supervisor's processes (and the git credentials in their environment) are out of its reach");
        } else {
            log("the agent shares the supervisor's user namespace (this kernel refused a nested one)");
        }
    }
    for _ in 0..600 {
        let text = tokio::fs::read_to_string(&log_path)
            .await
            .unwrap_or_default();
        if text.contains("listening on") {
            let url = format!("http://127.0.0.1:{port}");
            // The child lives as long as the supervisor.
            tokio::spawn(async move {
                let status = child.wait().await;
                log(&format!("OpenCode exited: {status:?}"));
                std::process::exit(3);
            });
            return Ok(url);
        }
        if let Ok(Some(st)) = child.try_wait() {
            return Err(format!(
                "OpenCode exited during start ({st}); see logs/opencode"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("OpenCode did not start within 30 s; see logs/opencode".into())
}

/// What the agent's process does before it becomes OpenCode: enter a user namespace of its own
/// mapping its own uid and gid, so nothing it runs can read the supervisor's or its `git`
/// children's memory or `/proc/<pid>/environ` (the repository's write token is there during a
/// push): ptrace access across user namespaces needs `CAP_SYS_PTRACE` in the supervisor's,
/// which the agent has not. Where the kernel refuses (no nested user namespaces), the agent
/// runs as before; the supervisor logs which.
struct OwnNamespace {
    setgroups: [u8; 24],
    uid_map_path: [u8; 24],
    gid_map_path: [u8; 24],
    uid_map: [u8; 32],
    uid_map_len: usize,
    gid_map: [u8; 32],
    gid_map_len: usize,
}

impl OwnNamespace {
    /// Everything the child writes, made before the fork.
    fn prepare() -> OwnNamespace {
        fn path(p: &str) -> [u8; 24] {
            let mut out = [0u8; 24];
            out[..p.len()].copy_from_slice(p.as_bytes());
            out
        }
        fn map(id: u32) -> ([u8; 32], usize) {
            let text = format!("{id} {id} 1\n");
            let mut out = [0u8; 32];
            out[..text.len()].copy_from_slice(text.as_bytes());
            (out, text.len())
        }
        // SAFETY: getuid(2) and getgid(2) take no arguments and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let (uid_map, uid_map_len) = map(uid);
        let (gid_map, gid_map_len) = map(gid);
        OwnNamespace {
            setgroups: path("/proc/self/setgroups"),
            uid_map_path: path("/proc/self/uid_map"),
            gid_map_path: path("/proc/self/gid_map"),
            uid_map,
            uid_map_len,
            gid_map,
            gid_map_len,
        }
    }

    /// In the child, before exec: raw syscalls only.
    fn enter(&self) {
        fn write_to(path: &[u8; 24], bytes: &[u8]) {
            // SAFETY: `path` is NUL-terminated (the arrays are longer than the paths) and
            // `bytes` is a valid buffer; open/write/close are async-signal-safe.
            unsafe {
                let fd = libc::open(path.as_ptr().cast(), libc::O_WRONLY);
                if fd >= 0 {
                    libc::write(fd, bytes.as_ptr().cast(), bytes.len());
                    libc::close(fd);
                }
            }
        }
        // SAFETY: unshare(2) with CLONE_NEWUSER affects only this (single-threaded) child.
        if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
            return;
        }
        write_to(&self.setgroups, b"deny");
        write_to(&self.uid_map_path, &self.uid_map[..self.uid_map_len]);
        write_to(&self.gid_map_path, &self.gid_map[..self.gid_map_len]);
    }
}

/// Creates an OpenCode session (always with a title, or OpenCode asks the model for one).
async fn new_opencode_session(s: &Shared, base: &str, title: &str) -> Result<String, String> {
    let created: Value = s
        .to_opencode(reqwest::Method::POST, &format!("{base}/session"))
        .json(&json!({ "title": title }))
        .send()
        .await
        .map_err(|e| format!("OpenCode did not answer: {e}"))?
        .json()
        .await
        .map_err(|e| format!("OpenCode answered oddly: {e}"))?;
    created["id"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| "OpenCode gave no session id".to_string())
}

/// Runs one turn against the warm-up model in a throwaway OpenCode session, so everything
/// OpenCode does on a fresh server's first prompt (the directory's instance, config and plugin
/// loading, the tool registry, the provider SDK, the system prompt) is done before `ready`.
pub async fn warm_up(s: &Shared, base: &str) -> Result<u128, String> {
    let t0 = std::time::Instant::now();
    let sid = new_opencode_session(s, base, "Nightshift warm-up").await?;
    let answer = s
        .to_opencode(
            reqwest::Method::POST,
            &format!("{base}/session/{sid}/message"),
        )
        .json(
            &json!({"model": {"providerID": WARMUP_PROVIDER, "modelID": WARMUP_MODEL},
            "parts": [{"type": "text", "text": "warm-up"}]}),
        )
        .send()
        .await
        .map_err(|e| format!("the warm-up turn failed: {e}"))?;
    if !answer.status().is_success() {
        return Err(format!("the warm-up turn failed: {}", answer.status()));
    }
    let _ = answer.bytes().await;
    let _ = s
        .to_opencode(reqwest::Method::DELETE, &format!("{base}/session/{sid}"))
        .send()
        .await;
    Ok(t0.elapsed().as_millis())
}

/// Runs prompts one at a time in one OpenCode session, bridging its events.
pub async fn run_prompts(
    s: Shared,
    mut jobs: mpsc::UnboundedReceiver<PromptJob>,
    mut stops: mpsc::UnboundedReceiver<String>,
) {
    let Some(base) = s.opencode.lock().ok().and_then(|o| o.clone()) else {
        return;
    };
    let mut oc_session: Option<String> = None;
    while let Some(job) = jobs.recv().await {
        // The session learns the prompt is in the agent's hands: if this sandbox dies from now
        // on, the prompt fails with the reason instead of moving to a new sandbox.
        s.emit(AgentEvent::Accepted {
            prompt: job.id.clone(),
        });
        let result = run_one(&s, &base, &mut oc_session, &job, &mut stops).await;
        let (mut ok, mut reason) = match result {
            Ok(()) => (true, None),
            Err(e) => (false, Some(e)),
        };
        let (mut branch, mut commit, mut patch) = (None, None, None);
        if ok && s.cfg.read_only_branch() {
            // A fork's pull request: its branch cannot be pushed to; the work goes back as a patch.
            match commit_as_patch(&s, &job).await {
                Ok(found) => patch = found,
                Err(e) => {
                    ok = false;
                    reason = Some(format!("the work could not be committed: {e}"));
                }
            }
        } else if ok {
            match commit_and_push(&s, &job).await {
                Ok(Some((pushed, head))) => (branch, commit) = (Some(pushed), Some(head)),
                Ok(None) => {}
                Err(e) => {
                    ok = false;
                    reason = Some(format!("the work could not be pushed: {e}"));
                }
            }
        }
        s.emit(AgentEvent::Done {
            prompt: job.id.clone(),
            ok,
            reason,
            branch,
            commit,
            patch,
        });
    }
}

async fn run_one(
    s: &Shared,
    base: &str,
    oc_session: &mut Option<String>,
    job: &PromptJob,
    stops: &mut mpsc::UnboundedReceiver<String>,
) -> Result<(), String> {
    let sid = match oc_session.clone() {
        Some(sid) => sid,
        None => {
            let title = format!("Nightshift {}", s.session_id());
            let sid = new_opencode_session(s, base, &title).await?;
            *oc_session = Some(sid.clone());
            sid
        }
    };
    let t0 = std::time::Instant::now();
    let mut first_token_logged = false;
    // Subscribe before prompting so no event is missed.
    let events = s
        .to_opencode(reqwest::Method::GET, &format!("{base}/event"))
        .send()
        .await
        .map_err(|e| format!("OpenCode event stream: {e}"))?;
    let mut body = json!({"parts": [{"type": "text", "text": job.text}]});
    if let Some((p, m)) = job.model.as_deref().and_then(|m| m.split_once('/')) {
        body["model"] = json!({"providerID": p, "modelID": m});
    }
    let r = s
        .to_opencode(
            reqwest::Method::POST,
            &format!("{base}/session/{sid}/prompt_async"),
        )
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("OpenCode refused the prompt: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("OpenCode refused the prompt: {}", r.status()));
    }
    log(&format!(
        "prompt {}: accepted by OpenCode after {} ms",
        job.id,
        t0.elapsed().as_millis()
    ));
    let mut stream = events.bytes_stream();
    let mut buf = String::new();
    let mut text = String::new();
    let mut error: Option<String> = None;
    let mut stopped = false;
    // Tool states already reported (OpenCode repeats `running` as metadata arrives).
    let mut reported: std::collections::HashSet<(String, String)> = Default::default();
    let flush_every = Duration::from_millis(50);
    let mut last_flush = tokio::time::Instant::now();
    loop {
        let next = tokio::select! {
            chunk = stream.next() => chunk,
            stop = stops.recv() => {
                if stop.as_deref() == Some(job.id.as_str()) {
                    stopped = true;
                    let _ = s.to_opencode(reqwest::Method::POST, &format!("{base}/session/{sid}/abort")).send().await;
                }
                continue;
            }
            _ = tokio::time::sleep(flush_every), if !text.is_empty() => {
                s.emit(text_event(job, &mut text));
                last_flush = tokio::time::Instant::now();
                continue;
            }
        };
        let Some(Ok(chunk)) = next else {
            return Err("the OpenCode event stream ended".into());
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(pos) = buf.find('\n') {
            let line: String = buf.drain(..=pos).collect();
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue;
            };
            let Ok(ev) = serde_json::from_str::<Value>(data.trim()) else {
                continue;
            };
            let p = &ev["properties"];
            if p["sessionID"].as_str() != Some(sid.as_str()) {
                continue;
            }
            match ev["type"].as_str().unwrap_or("") {
                "message.part.delta" if p["field"] == "text" => {
                    if !first_token_logged {
                        first_token_logged = true;
                        log(&format!(
                            "prompt {}: first token after {} ms",
                            job.id,
                            t0.elapsed().as_millis()
                        ));
                    }
                    text.push_str(p["delta"].as_str().unwrap_or(""));
                    if last_flush.elapsed() >= flush_every {
                        s.emit(text_event(job, &mut text));
                        last_flush = tokio::time::Instant::now();
                    }
                }
                "message.part.updated" => {
                    let part = &p["part"];
                    if !text.is_empty() && part["type"] != "text" {
                        s.emit(text_event(job, &mut text));
                    }
                    if let Some(event) = translate_part(&job.id, part) {
                        let fresh = match &event {
                            AgentEvent::Tool {
                                call, tool, status, ..
                            } => {
                                if let Ok(mut t) = s.running_tool.lock() {
                                    *t = (status == "running").then(|| tool.clone());
                                }
                                reported.insert((call.clone(), status.clone()))
                            }
                            _ => true,
                        };
                        if fresh {
                            s.emit(event);
                        }
                    }
                }
                "session.error" => {
                    let msg = p["error"]["data"]["message"]
                        .as_str()
                        .or(p["error"]["name"].as_str())
                        .unwrap_or("the agent failed")
                        .to_string();
                    if !stopped {
                        s.emit(AgentEvent::Error {
                            prompt: job.id.clone(),
                            message: msg.clone(),
                        });
                    }
                    error = Some(msg);
                }
                "session.idle" => {
                    if !text.is_empty() {
                        s.emit(text_event(job, &mut text));
                    }
                    if stopped {
                        return Err("stopped".into());
                    }
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                }
                _ => {}
            }
        }
    }
}

/// The text gathered so far as one `agent.text` event (the buffer is emptied).
fn text_event(job: &PromptJob, text: &mut String) -> AgentEvent {
    AgentEvent::Text {
        prompt: job.id.clone(),
        text: std::mem::take(text),
    }
}

/// Turns an OpenCode part into a session event, if it is one people should see.
pub fn translate_part(prompt: &str, part: &Value) -> Option<AgentEvent> {
    // A field OpenCode left out (or null) is left out of the event too.
    let present = |v: &Value| Some(v.clone()).filter(|v| !v.is_null());
    let cut = |v: &Value, n: usize| -> Option<Value> {
        match v.as_str() {
            Some(t) if t.len() > n => {
                let mut end = n;
                while !t.is_char_boundary(end) {
                    end -= 1;
                }
                Some(Value::String(format!("{}… ({} bytes)", &t[..end], t.len())))
            }
            _ => present(v),
        }
    };
    match part["type"].as_str()? {
        "tool" => {
            let st = &part["state"];
            let status = st["status"].as_str()?;
            if status == "pending" {
                return None;
            }
            Some(AgentEvent::Tool {
                prompt: prompt.into(),
                call: part["callID"].as_str()?.into(),
                tool: part["tool"].as_str()?.into(),
                status: status.into(),
                input: (status == "running")
                    .then(|| present(&st["input"]))
                    .flatten(),
                output: (status == "completed")
                    .then(|| cut(&st["output"], 4096))
                    .flatten(),
                error: (status == "error")
                    .then(|| cut(&st["error"], 4096))
                    .flatten(),
            })
        }
        "step-finish" => Some(AgentEvent::Step {
            prompt: prompt.into(),
            reason: part["reason"].as_str().map(String::from),
            tokens: part["tokens"].clone(),
            cost: part["cost"].clone(),
        }),
        _ => None,
    }
}

/// Commits the prompt's work locally (a read-only branch: a fork's pull request) and answers it
/// as a patch (this prompt's commit); `None` when nothing changed.
async fn commit_as_patch(s: &Shared, job: &PromptJob) -> Result<Option<String>, String> {
    let repo = s.cfg.repo();
    let porcelain = git(&repo, &["status", "--porcelain"]).await?;
    if porcelain.is_empty() {
        return Ok(None);
    }
    git(&repo, &["add", "-A"]).await?;
    let name = format!("user.name={}", job.author_name);
    let email = format!("user.email={}", job.author_email);
    git(
        &repo,
        &[
            "-c", &name, "-c", &email, "commit", "--quiet", "-m", &job.id,
        ],
    )
    .await?;
    let patch = git(&repo, &["diff", "--no-color", "HEAD~1", "HEAD"]).await?;
    Ok(Some(nightshift_core::sandbox::cut_patch(&patch)))
}

/// Commits the prompt's work in the prompting person's name and pushes the session's branch.
async fn commit_and_push(s: &Shared, job: &PromptJob) -> Result<Option<(String, String)>, String> {
    let repo = s.cfg.repo();
    let session_id = s.session_id();
    let already = s.branch.lock().ok().and_then(|b| b.clone());
    // The branch the session continues (its own, or the pull request's it was started on),
    // else its own.
    let branch = already
        .clone()
        .unwrap_or_else(|| format!("nightshift/{session_id}"));
    let porcelain = git(&repo, &["status", "--porcelain"]).await?;
    if porcelain.is_empty() {
        return Ok(None);
    }
    if already.is_none() {
        git(&repo, &["checkout", "--quiet", "-B", &branch]).await?;
    }
    git(&repo, &["add", "-A"]).await?;
    let first_line = job.text.lines().next().unwrap_or("Nightshift change");
    let subject: String = first_line.chars().take(72).collect();
    let message = format!(
        "{subject}\n\nNightshift session {session_id}, prompt {}.",
        job.id
    );
    let name = format!("user.name={}", job.author_name);
    let email = format!("user.email={}", job.author_email);
    git(
        &repo,
        &[
            "-c", &name, "-c", &email, "commit", "--quiet", "-m", &message,
        ],
    )
    .await?;
    let commit = git(&repo, &["rev-parse", "HEAD"]).await?;
    let refspec = format!("HEAD:refs/heads/{branch}");
    match std::env::var("NIGHTSHIFT_PUSH_OUTBOX") {
        // A dev-mode local remote is read-only here: push to the provider's outbox, then ask
        // the provider to bring the branch over.
        Ok(outbox) => {
            git(&repo, &["push", "--quiet", "--force", &outbox, &refspec]).await?;
            relay_branch(&branch).await?;
        }
        Err(_) => {
            git(&repo, &["push", "--quiet", "origin", &refspec]).await?;
        }
    }
    if let Ok(mut b) = s.branch.lock() {
        *b = Some(branch.clone());
    }
    Ok(Some((branch, commit)))
}

/// Asks the provider's push relay (through the egress proxy) to bring `branch` from the outbox
/// to the repository's remote.
async fn relay_branch(branch: &str) -> Result<(), String> {
    let url = format!("http://{}/relay?branch={branch}", crate::egress::RELAY_HOST);
    let answer = control_client()
        .post(&url)
        .send()
        .await
        .map_err(|e| format!("the push relay did not answer: {e}"))?;
    if answer.status().is_success() {
        Ok(())
    } else {
        let body = answer.text().await.unwrap_or_default();
        Err(format!("the push relay refused the branch: {body}"))
    }
}

/// Keeps the WebSocket link to the session: hello, resend unacknowledged, heartbeats, reconnects.
pub async fn link(
    s: Shared,
    jobs: mpsc::UnboundedSender<PromptJob>,
    stops: mpsc::UnboundedSender<String>,
) {
    if s.cfg.control_url.is_none() && !s.cfg.session_id.is_empty() {
        log("no control URL: running without a session link");
        return;
    }
    if s.session_id().is_empty() {
        log("pooled: waiting to be assigned to a session");
    }
    let Assignment {
        session_id,
        control_url: control,
        sandbox_token: token,
    } = s.wait_assignment().await;
    let url = format!(
        "{}/sandbox-link/{session_id}",
        control.trim_end_matches('/').replacen("http", "ws", 1),
    );
    let mut backoff = 100u64;
    let mut seen_prompts: std::collections::HashSet<String> = Default::default();
    loop {
        match link_once(&s, &url, &token, &jobs, &stops, &mut seen_prompts).await {
            Ok(()) => backoff = 100,
            Err(LinkEnd::Refused(why)) => {
                log(&format!("the session refused this sandbox: {why}; exiting"));
                std::process::exit(4);
            }
            Err(LinkEnd::Lost(why)) => {
                log(&format!("link lost: {why}; reconnecting in {backoff} ms"))
            }
        }
        tokio::time::sleep(Duration::from_millis(backoff)).await;
        backoff = (backoff * 2).min(5_000);
    }
}

/// Events per `batch` frame (the session accepts up to `wire::MAX_BATCH`).
const BATCH: usize = 200;
const _: () = assert!(BATCH <= nightshift_core::wire::MAX_BATCH);

/// One frame up the link, as the session parses it (`core::wire::parse_up_frame`).
fn up(frame: &UpFrame) -> Message {
    Message::Text(serde_json::to_string(frame).unwrap_or_default().into())
}

/// Pending events as `batch` frames of at most [`BATCH`] events each, in order.
fn batches(pending: Vec<Numbered>) -> Vec<UpFrame> {
    let mut frames = Vec::new();
    let mut events = pending.into_iter().peekable();
    while events.peek().is_some() {
        frames.push(UpFrame::Batch {
            events: events.by_ref().take(BATCH).collect(),
        });
    }
    frames
}

enum LinkEnd {
    Refused(String),
    Lost(String),
}

async fn link_once(
    s: &Shared,
    url: &str,
    token: &str,
    jobs: &mpsc::UnboundedSender<PromptJob>,
    stops: &mpsc::UnboundedSender<String>,
    seen: &mut std::collections::HashSet<String>,
) -> Result<(), LinkEnd> {
    let mut req = url
        .into_client_request()
        .map_err(|e| LinkEnd::Refused(format!("bad control URL: {e}")))?;
    let auth = format!("Bearer {token}")
        .parse()
        .map_err(|_| LinkEnd::Refused("bad token".into()))?;
    req.headers_mut().insert("authorization", auth);
    let authority = crate::egress::authority_of_url(url)
        .ok_or_else(|| LinkEnd::Refused("bad control URL".into()))?;
    // Through the egress proxy when the sandbox has its own network, else directly.
    let stream: Box<dyn Io> = match &s.cfg.egress_socket {
        Some(sock) => Box::new(
            connect_through(sock, &authority)
                .await
                .map_err(LinkEnd::Lost)?,
        ),
        None => Box::new(
            tokio::net::TcpStream::connect(&authority)
                .await
                .map_err(|e| LinkEnd::Lost(e.to_string()))?,
        ),
    };
    let (ws, _) = match tokio_tungstenite::client_async(req, stream).await {
        Ok(x) => x,
        Err(tokio_tungstenite::tungstenite::Error::Http(r))
            if r.status() == 401 || r.status() == 403 || r.status() == 404 =>
        {
            return Err(LinkEnd::Refused(format!("HTTP {}", r.status())))
        }
        Err(e) => return Err(LinkEnd::Lost(e.to_string())),
    };
    let (mut tx, mut rx) = ws.split();
    let hello = UpFrame::Hello {
        sandbox: s.cfg.sandbox_id.clone(),
    };
    tx.send(up(&hello))
        .await
        .map_err(|e| LinkEnd::Lost(e.to_string()))?;
    // Messages with n <= sent have been written to this connection.
    let mut sent: Option<u64> = None;
    let mut beat = tokio::time::interval(Duration::from_secs(5));
    loop {
        // Send everything not yet sent on this connection.
        if let Some(from) = sent {
            let pending: Vec<Numbered> = s
                .outbox
                .lock()
                .map(|o| o.iter().filter(|e| e.n > from).cloned().collect())
                .unwrap_or_default();
            // Everything pending goes in as few frames as possible (one store, one broadcast each).
            for frame in batches(pending) {
                let last = match &frame {
                    UpFrame::Batch { events } => events.last().map(|e| e.n),
                    _ => None,
                };
                tx.send(up(&frame))
                    .await
                    .map_err(|e| LinkEnd::Lost(e.to_string()))?;
                sent = last.or(sent);
            }
        }
        tokio::select! {
            _ = s.wake.notified() => {}
            _ = beat.tick() => {
                tx.send(up(&UpFrame::Heartbeat))
                    .await
                    .map_err(|e| LinkEnd::Lost(e.to_string()))?;
            }
            msg = rx.next() => {
                let Some(Ok(msg)) = msg else { return Err(LinkEnd::Lost("closed".into())) };
                let text = match msg {
                    Message::Text(t) => t.to_string(),
                    Message::Close(c) => {
                        let code = c.as_ref().map(|c| u16::from(c.code));
                        let reason = c.map(|c| c.reason.to_string()).unwrap_or_default();
                        // The session's close codes say whether to come back (core::hosted).
                        let refused = code
                            .and_then(CloseCode::from_code)
                            .is_some_and(CloseCode::is_refusal);
                        if refused || reason.starts_with("refused") {
                            return Err(LinkEnd::Refused(reason));
                        }
                        return Err(LinkEnd::Lost(format!("closed: {reason}")));
                    }
                    _ => continue,
                };
                // The session's frames, typed by the core (the same type the session sends).
                let Ok(frame) = serde_json::from_str::<DownFrame>(&text) else {
                    log(&format!("ignoring an unknown frame from the session: {text}"));
                    continue;
                };
                match frame {
                    DownFrame::Welcome { last_n } => {
                        s.welcome(last_n);
                        sent = Some(last_n);
                    }
                    DownFrame::Ack { n } => drop_acked(s, n),
                    DownFrame::Prompt { prompt } => {
                        let job = PromptJob::from(prompt);
                        // A prompt resent after a reconnect is run once.
                        if seen.insert(job.id.clone()) {
                            log(&format!("prompt {} received", job.id));
                            let _ = jobs.send(job);
                        }
                    }
                    DownFrame::Stop { prompt } => {
                        let _ = stops.send(prompt);
                    }
                    DownFrame::Error { error } => {
                        log(&format!("session says: {}: {}", error.code, error.message))
                    }
                    DownFrame::GitCredentials { token, .. } => {
                        if let Ok(mut held) = GIT_TOKEN.lock() {
                            *held = Some(token);
                        }
                    }
                }
            }
        }
    }
}

/// A byte stream the session link runs over (loopback TCP, or a tunnel through the egress proxy).
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// Opens a tunnel to `authority` through the egress proxy (HTTP `CONNECT`).
async fn connect_through(sock: &Path, authority: &str) -> Result<tokio::net::UnixStream, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::UnixStream::connect(sock)
        .await
        .map_err(|e| format!("the egress proxy is unreachable: {e}"))?;
    let hello = format!("CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n\r\n");
    conn.write_all(hello.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    // Read the answer's head byte by byte so nothing of the tunnel is consumed.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 || conn.read(&mut byte).await.map_err(|e| e.to_string())? == 0 {
            return Err("the egress proxy closed the tunnel".into());
        }
        head.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&head);
    if line.starts_with("HTTP/1.1 200") || line.starts_with("HTTP/1.0 200") {
        Ok(conn)
    } else {
        Err(format!(
            "the egress proxy refused {authority}: {}",
            line.lines().next().unwrap_or("")
        ))
    }
}

/// An HTTP client for the control plane (through the egress forwarder when there is one).
fn control_client() -> reqwest::Client {
    let builder = reqwest::Client::builder();
    let builder = match PROXY.get().and_then(|p| reqwest::Proxy::all(p).ok()) {
        Some(proxy) => builder.proxy(proxy),
        None => builder.no_proxy(),
    };
    builder.build().unwrap_or_default()
}

/// Forwards the sandbox's loopback proxy port to the egress proxy's socket; a refusal the
/// proxy answers becomes an `egress.blocked` event naming the host and the running tool.
async fn forward_egress(s: Option<Shared>, listener: tokio::net::TcpListener, sock: PathBuf) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        let s = s.clone();
        let sock = sock.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let Ok(outbound) = tokio::net::UnixStream::connect(&sock).await else {
                return;
            };
            let (mut in_r, mut in_w) = inbound.split();
            let (mut out_r, mut out_w) = outbound.into_split();
            // Each direction ends on its own (a client that half-closes after its request
            // still gets the whole answer), passing the end of stream on.
            let up = async {
                let _ = tokio::io::copy(&mut in_r, &mut out_w).await;
                let _ = out_w.shutdown().await;
            };
            let down = async {
                let mut first = vec![0u8; 8192];
                let n = out_r.read(&mut first).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                let head = String::from_utf8_lossy(&first[..n]).to_string();
                if head.starts_with("HTTP/1.1 403") {
                    let blocked = head.lines().find_map(|l| {
                        l.strip_prefix(&format!("{}: ", crate::egress::BLOCKED_HEADER))
                    });
                    if let (Some(host), Some(s)) = (blocked, &s) {
                        let tool = s.running_tool.lock().ok().and_then(|t| t.clone());
                        s.emit(AgentEvent::EgressBlocked {
                            host: host.trim().into(),
                            tool,
                        });
                    }
                }
                if in_w.write_all(&first[..n]).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy(&mut out_r, &mut in_w).await;
                let _ = in_w.shutdown().await;
            };
            tokio::join!(up, down);
        });
    }
}

fn drop_acked(s: &Shared, upto: u64) {
    if let Ok(mut o) = s.outbox.lock() {
        while o.front().is_some_and(|e| e.n <= upto) {
            o.pop_front();
        }
    }
}

/// Runs one command (an `exec`, a build step) in a sandbox of its own network namespace with
/// the egress proxy as its only way out: a loopback forwarder, the proxy variables, the
/// command's exit status.
pub async fn egress_run(argv: &[String]) -> i32 {
    let Some((program, args)) = argv.split_first() else {
        return 2;
    };
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(sock) = std::env::var_os("NIGHTSHIFT_EGRESS_SOCKET").map(PathBuf::from) {
        if let Ok(forwarder) = tokio::net::TcpListener::bind("127.0.0.1:0").await {
            if let Ok(addr) = forwarder.local_addr() {
                let _ = PROXY.set(format!("http://127.0.0.1:{}", addr.port()));
                tokio::spawn(forward_egress(None, forwarder, sock));
            }
        }
        cmd.env_remove("NIGHTSHIFT_EGRESS_SOCKET");
    }
    // An exec's own network holds nothing but the forwarder: everything goes to the proxy.
    with_proxy_for(&mut cmd, false);
    match cmd.status().await {
        Ok(st) => st.code().unwrap_or(128 + 9),
        Err(e) => {
            eprintln!("cannot run {program}: {e}");
            127
        }
    }
}

/// Runs the supervisor to the end of the sandbox's life.
pub async fn run(cfg: Settings) -> Result<(), String> {
    let s = Supervisor::new(cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| format!("cannot listen: {e}"))?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let api = local_api(s.clone());
    // With its own network namespace the sandbox's loopback is out of the provider's reach:
    // the provider calls the same API on a unix socket in the folder it binds in.
    if let Some(sock) = std::env::var_os("NIGHTSHIFT_API_SOCKET").map(PathBuf::from) {
        let _ = std::fs::remove_file(&sock);
        let unix = tokio::net::UnixListener::bind(&sock)
            .map_err(|e| format!("cannot listen on the API socket: {e}"))?;
        let api = api.clone();
        tokio::spawn(async move {
            let _ = axum::serve(unix, api).await;
        });
    }
    tokio::spawn(async move {
        let _ = axum::serve(listener, api).await;
    });
    let state_file = s.cfg.dir.join("state").join("supervisor.json");
    let publish = |ready: bool| {
        let _ = std::fs::write(&state_file, SupervisorState { port, ready }.encode());
    };
    publish(false);
    log(&format!(
        "local API on 127.0.0.1:{port}; sandbox {}",
        s.cfg.sandbox_id
    ));
    // With its own network namespace the sandbox's only way out is the egress proxy: a
    // loopback port forwarded to the provider's socket, which every tool is pointed at.
    if let Some(sock) = s.cfg.egress_socket.clone() {
        let forwarder = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("cannot listen: {e}"))?;
        let fport = forwarder.local_addr().map_err(|e| e.to_string())?.port();
        let _ = PROXY.set(format!("http://127.0.0.1:{fport}"));
        tokio::spawn(forward_egress(Some(s.clone()), forwarder, sock));
        log(&format!(
            "egress through the provider's proxy (127.0.0.1:{fport})"
        ));
    }
    let (job_tx, job_rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = mpsc::unbounded_channel();
    tokio::spawn(link(s.clone(), job_tx, stop_tx));
    // Reads may start at once; the sync runs beside OpenCode's start.
    tokio::spawn(sync(s.clone()));
    if s.cfg.opencode_bin.is_some() {
        s.status("starting", "starting OpenCode");
        match start_opencode(&s, port).await {
            Ok(url) => {
                log(&format!("OpenCode on {url}"));
                // `ready` means a prompt sent now reaches the model at once.
                match warm_up(&s, &url).await {
                    Ok(ms) => log(&format!("OpenCode warmed up in {ms} ms")),
                    Err(e) => log(&format!("warm-up: {e}; the first prompt will be slower")),
                }
                if let Ok(mut o) = s.opencode.lock() {
                    *o = Some(url);
                }
            }
            Err(e) => {
                s.status("failed", &e);
                tokio::time::sleep(Duration::from_millis(500)).await;
                return Err(e);
            }
        }
    }
    publish(true);
    s.status("ready", "the agent is ready");
    run_prompts(s, job_rx, stop_rx).await;
    // Without OpenCode there is nothing to run; stay up for exec and git.
    std::future::pending::<()>().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        let env: BTreeMap<String, String> = [
            ("NIGHTSHIFT_SANDBOX_DIR", "/tmp/x"),
            ("NIGHTSHIFT_SANDBOX_ID", "sbx_1"),
            ("NIGHTSHIFT_SESSION_ID", "ses_1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        Settings::from(
            env,
            &BootSecrets::parse(r#"{"env": {"ANTHROPIC_API_KEY": "k", "OTHER": "no"}}"#),
        )
        .expect("settings")
    }

    fn numbers(s: &Supervisor) -> Vec<u64> {
        s.outbox
            .lock()
            .map(|o| o.iter().map(|e| e.n).collect())
            .unwrap_or_default()
    }

    #[test]
    fn secrets_line_keys_reach_opencode_only_when_they_are_keys() {
        let s = settings();
        assert_eq!(
            s.env.get("ANTHROPIC_API_KEY").map(String::as_str),
            Some("k")
        );
        assert!(!s.env.contains_key("OTHER"));
        assert_eq!(s.model, "nightshift/scripted");
    }

    #[test]
    fn welcome_drops_what_is_stored_and_a_restarted_supervisor_continues_the_numbers() {
        let s = Supervisor::new(settings());
        let accepted = |p: &str| AgentEvent::Accepted { prompt: p.into() };
        s.emit(accepted("a"));
        s.emit(accepted("b"));
        s.emit(accepted("c"));
        s.welcome(1);
        assert_eq!(numbers(&s), vec![2, 3]);
        // A fresh supervisor (numbers from 1) meets a session that has stored 40 events.
        let fresh = Supervisor::new(settings());
        fresh.emit(accepted("x"));
        fresh.welcome(40);
        assert_eq!(numbers(&fresh), vec![41]);
        fresh.emit(accepted("y"));
        assert_eq!(numbers(&fresh), vec![41, 42]);
    }

    #[tokio::test]
    async fn the_local_api_refuses_callers_without_the_sandbox_secret() {
        let s = Supervisor::new(settings());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            let _ = axum::serve(listener, local_api(s)).await;
        });
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/assign");
        let body = r#"{"session_id":"ses_x","control_url":"http://evil","sandbox_token":"t"}"#;
        for auth in [
            None,
            Some("Bearer wrong-secret-0123456789"),
            Some("Basic eA=="),
        ] {
            let mut req = http.post(&url).body(body);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let r = req.send().await.expect("answer");
            assert_eq!(r.status().as_u16(), 401, "{auth:?}");
        }
        let warm = format!("http://127.0.0.1:{port}/warmup/v1/chat/completions");
        let r = http.post(&warm).send().await.expect("answer");
        assert_eq!(r.status().as_u16(), 401);
    }

    #[test]
    fn tool_parts_become_events_and_long_output_is_cut() {
        let part = json!({"type": "tool", "callID": "c1", "tool": "bash",
            "state": {"status": "completed", "output": "x".repeat(5000)}});
        let Some(AgentEvent::Tool {
            status,
            output: Some(output),
            input: None,
            error: None,
            ..
        }) = translate_part("p", &part)
        else {
            panic!("not a completed tool: {:?}", translate_part("p", &part));
        };
        assert_eq!(status, "completed");
        assert!(output
            .as_str()
            .is_some_and(|o| o.len() < 4200 && o.ends_with("(5000 bytes)")));
        let pending =
            json!({"type": "tool", "callID": "c1", "tool": "bash", "state": {"status": "pending"}});
        assert!(translate_part("p", &pending).is_none());
        let step =
            json!({"type": "step-finish", "reason": "stop", "tokens": {"output": 3}, "cost": 0});
        assert_eq!(
            translate_part("p", &step),
            Some(AgentEvent::Step {
                prompt: "p".into(),
                reason: Some("stop".into()),
                tokens: json!({"output": 3}),
                cost: json!(0),
            })
        );
        // A tool part without its call id is no event (the session would refuse the batch).
        let nameless = json!({"type": "tool", "tool": "bash", "state": {"status": "running"}});
        assert_eq!(translate_part("p", &nameless), None);
    }

    /// The text of a frame as the supervisor puts it on the socket.
    fn on_the_wire(frame: &UpFrame) -> String {
        match up(frame) {
            Message::Text(text) => text.to_string(),
            other => panic!("not a text frame: {other:?}"),
        }
    }

    #[test]
    fn the_session_parses_every_frame_the_supervisor_sends() {
        use nightshift_core::sandbox::SandboxMessage;
        use nightshift_core::wire::{parse_sandbox_message, parse_up_frame};
        let s = Supervisor::new(settings());
        // Every kind of event the supervisor emits, built the way it builds them.
        s.status("ready", "the agent is ready");
        s.emit(AgentEvent::Blocked {
            tool: "bash".into(),
            message: "Blocked: the checkout is syncing".into(),
        });
        s.emit(AgentEvent::Accepted {
            prompt: "pr_1".into(),
        });
        let job = PromptJob {
            id: "pr_1".into(),
            text: "t".into(),
            author_name: "a".into(),
            author_email: "a@example.com".into(),
            model: None,
        };
        s.emit(text_event(&job, &mut "hello".to_string()));
        let running = json!({"type": "tool", "callID": "c1", "tool": "bash",
            "state": {"status": "running", "input": {"command": "ls"}}});
        let failed = json!({"type": "tool", "callID": "c1", "tool": "bash",
            "state": {"status": "error", "error": "exit 1"}});
        let step =
            json!({"type": "step-finish", "reason": "stop", "tokens": {"output": 3}, "cost": 0.5});
        for part in [running, failed, step] {
            s.emit(translate_part("pr_1", &part).expect("an event"));
        }
        s.emit(AgentEvent::Error {
            prompt: "pr_1".into(),
            message: "the model refused".into(),
        });
        s.emit(AgentEvent::EgressBlocked {
            host: "evil.example:443".into(),
            tool: Some("bash".into()),
        });
        s.emit(AgentEvent::Done {
            prompt: "pr_1".into(),
            ok: true,
            reason: None,
            branch: Some("nightshift/ses_1".into()),
            commit: Some("abc".into()),
            patch: None,
        });
        let pending: Vec<Numbered> = s
            .outbox
            .lock()
            .map(|o| o.iter().cloned().collect())
            .unwrap_or_default();
        assert_eq!(pending.len(), 10);
        let hello = UpFrame::Hello {
            sandbox: s.cfg.sandbox_id.clone(),
        };
        assert_eq!(
            parse_sandbox_message(&on_the_wire(&hello)),
            Ok(SandboxMessage::Hello {
                sandbox: "sbx_1".into()
            })
        );
        assert_eq!(
            parse_sandbox_message(&on_the_wire(&UpFrame::Heartbeat)),
            Ok(SandboxMessage::Heartbeat)
        );
        let frames = batches(pending.clone());
        assert_eq!(frames.len(), 1);
        let parsed = parse_up_frame(&on_the_wire(&frames[0]));
        assert_eq!(
            parsed,
            Ok(UpFrame::Batch {
                events: pending.clone()
            })
        );
        let expected: Vec<(u64, AgentEvent)> =
            pending.into_iter().map(|e| (e.n, e.event)).collect();
        assert_eq!(
            parse_sandbox_message(&on_the_wire(&frames[0])),
            Ok(SandboxMessage::Events(expected))
        );
    }

    #[test]
    fn pending_events_go_up_in_batches_the_session_accepts() {
        use nightshift_core::wire::{parse_up_frame, MAX_SANDBOX_FRAME};
        let pending: Vec<Numbered> = (1..=450)
            .map(|n| Numbered {
                n,
                event: AgentEvent::Text {
                    prompt: "pr_1".into(),
                    text: "x".repeat(100),
                },
            })
            .collect();
        let frames = batches(pending);
        let sizes: Vec<usize> = frames
            .iter()
            .map(|f| match f {
                UpFrame::Batch { events } => events.len(),
                _ => 0,
            })
            .collect();
        assert_eq!(sizes, [BATCH, BATCH, 50]);
        let mut next = 1;
        for frame in &frames {
            let text = on_the_wire(frame);
            assert!(text.len() <= MAX_SANDBOX_FRAME);
            let Ok(UpFrame::Batch { events }) = parse_up_frame(&text) else {
                panic!("refused: {text}");
            };
            for e in events {
                assert_eq!(e.n, next);
                next += 1;
            }
        }
        assert!(batches(Vec::new()).is_empty());
    }
}
