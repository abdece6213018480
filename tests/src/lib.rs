//! Test harness: starts the real Worker under `wrangler dev` on free ports with its own state, and talks to it over HTTP and WebSocket.

pub mod fake_provider;

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// A free loopback port below the kernel's ephemeral range (32768 and up), so the source
/// port of some outgoing connection cannot take it between this check and the server's bind.
fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = 20_000 + (rand::random::<u16>() % 12_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on loopback")
}

/// One `wrangler dev` process with its own persisted Durable Object state.
pub struct Server {
    pub port: u16,
    pub base: String,
    state_dir: PathBuf,
    vars: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
    /// The directory holding the `wrangler.toml` this server runs.
    dir: PathBuf,
}

impl Server {
    /// Starts a server with the dev sign-in on and extra `--var`s.
    pub async fn start(vars: &[(&str, &str)]) -> Server {
        let root = repo_root();
        assert!(
            root.join("build/index_bg.wasm").exists(),
            "the Worker is not built: run scripts/build.sh (scripts/test.sh does it)"
        );
        Server::start_in(&root, vars).await
    }

    /// Starts `wrangler dev` on the `wrangler.toml` in `dir` (the bench's runtime floor uses this).
    pub async fn start_in(dir: &Path, vars: &[(&str, &str)]) -> Server {
        let root = repo_root();
        let port = free_port();
        let unique = format!(
            "{}-{}-{}",
            std::process::id(),
            port,
            Instant::now().elapsed().as_nanos()
        );
        let state_dir = root.join(".state/test").join(&unique);
        std::fs::create_dir_all(&state_dir).expect("create state dir");
        let mut all = vec![
            ("DEV_AUTH".to_string(), "1".to_string()),
            ("AUTH_SECRET".to_string(), "test-secret".to_string()),
        ];
        // `{self}` in a value stands for this server's own URL (e.g. CONTROL_URL).
        let base = format!("http://127.0.0.1:{port}");
        for (k, v) in vars {
            all.retain(|(name, _)| name != k);
            all.push((k.to_string(), v.replace("{self}", &base)));
        }
        let mut s = Server {
            port,
            base: format!("http://127.0.0.1:{port}"),
            log: state_dir.join("wrangler.log"),
            state_dir,
            vars: all,
            child: None,
            dir: dir.to_path_buf(),
        };
        s.spawn().await;
        s
    }

    async fn spawn(&mut self) {
        let root = repo_root();
        let inspector = free_port();
        let mut args = format!(
            "source '{}/scripts/env.sh' && exec wrangler dev --ip 127.0.0.1 --port {} --inspector-port {} --persist-to '{}' --show-interactive-dev-session=false --test-scheduled --log-level warn",
            root.display(),
            self.port,
            inspector,
            self.state_dir.join("do").display()
        );
        for (k, v) in &self.vars {
            args.push_str(&format!(" --var '{k}:{v}'"));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open log");
        let child = Command::new("bash")
            .arg("-c")
            .arg(&args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start wrangler dev");
        self.child = Some(child);
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{}/health", self.base)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("wrangler dev did not become ready:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pgid = child.id() as i32;
            unsafe {
                libc::kill(-pgid, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }

    /// Stops the process and starts it again on the same state and port.
    pub async fn restart(&mut self) {
        self.kill();
        // Wait until the port is free again.
        for _ in 0..100 {
            if TcpListener::bind(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.spawn().await;
    }

    pub fn client(&self) -> Api {
        Api {
            base: self.base.clone(),
            http: reqwest::Client::new(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// HTTP access to the API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

/// A signed-in person.
#[derive(Clone, Debug)]
pub struct User {
    pub user: String,
    pub token: String,
}

impl Api {
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut rb = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.header("content-type", "application/json").body(b);
        }
        let resp = rb.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, v)
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        who: &User,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.raw(
            method,
            path,
            Some(&who.token),
            body.map(|b| b.to_string().into_bytes()),
        )
        .await
    }

    pub async fn sign_in(&self, user: &str) -> User {
        let (st, v) = self
            .raw(
                "POST",
                "/auth/dev",
                None,
                Some(
                    json!({ "user": user, "name": user.to_uppercase(), "email": format!("{user}@example.com") })
                        .to_string()
                        .into_bytes(),
                ),
            )
            .await;
        assert_eq!(st, 200, "sign in: {v}");
        User {
            user: user.to_string(),
            token: v["token"].as_str().expect("token").to_string(),
        }
    }

    /// Creates a session on a repository; returns its id.
    pub async fn create_session_on(
        &self,
        who: &User,
        title: &str,
        repository: &Path,
    ) -> (String, String) {
        let (st, v) = self
            .call(
                "POST",
                "/sessions",
                who,
                Some(json!({ "title": title, "repository": repository })),
            )
            .await;
        assert_eq!(st, 201, "create: {v}");
        (
            v["id"].as_str().expect("id").to_string(),
            v["invite"].as_str().expect("invite").to_string(),
        )
    }

    /// Creates a session owned by `who`; returns (id, invite).
    pub async fn create_session(&self, who: &User, title: &str) -> (String, String) {
        let (st, v) = self
            .call("POST", "/sessions", who, Some(json!({ "title": title })))
            .await;
        assert_eq!(st, 201, "create: {v}");
        (
            v["id"].as_str().expect("id").to_string(),
            v["invite"].as_str().expect("invite").to_string(),
        )
    }

    pub async fn join(&self, who: &User, id: &str, invite: &str) {
        let (st, v) = self
            .call(
                "POST",
                &format!("/multiplayer/{id}/join"),
                who,
                Some(json!({ "invite": invite })),
            )
            .await;
        assert!(st == 200 || st == 201, "join: {st} {v}");
    }

    pub async fn connect(&self, who: &User, id: &str, client: &str, since: u64) -> Ws {
        let url = format!(
            "{}/multiplayer/{id}/ws?token={}&client={client}&since={since}",
            self.base.replacen("http", "ws", 1),
            who.token
        );
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connect");
        Ws {
            stream,
            last_seq: since,
            seen: Vec::new(),
        }
    }
}

/// A WebSocket client that tracks the events it has seen.
pub struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub last_seq: u64,
    /// Every durable event received, in arrival order.
    pub seen: Vec<Value>,
}

impl Ws {
    pub async fn send(&mut self, v: Value) {
        self.stream
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("ws send");
    }

    pub async fn send_text(&mut self, s: &str) {
        self.stream
            .send(Message::Text(s.to_string().into()))
            .await
            .expect("ws send");
    }

    /// Next text frame as it is, unparsed (for benchmarks: no ordering checks), or None.
    pub async fn next_raw(&mut self, timeout: Duration) -> Option<String> {
        loop {
            let msg = tokio::time::timeout(timeout, self.stream.next())
                .await
                .ok()??;
            match msg.ok()? {
                Message::Text(t) => return Some(t.to_string()),
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Next frame, or None on close/timeout.
    pub async fn next(&mut self, timeout: Duration) -> Option<Value> {
        loop {
            let msg = tokio::time::timeout(timeout, self.stream.next())
                .await
                .ok()??;
            match msg.ok()? {
                Message::Text(t) => {
                    let v: Value = serde_json::from_str(&t).ok()?;
                    if v["type"] == "hello" {
                        // Asked to resume beyond the head: live events continue from the head.
                        let head = v["seq"].as_u64().unwrap_or(0);
                        self.last_seq = self.last_seq.min(head);
                    }
                    if v["type"] == "events" {
                        for e in v["events"].as_array().cloned().unwrap_or_default() {
                            let seq = e["seq"].as_u64().unwrap_or(0);
                            assert!(
                                seq == self.last_seq + 1,
                                "gap or duplicate: got seq {seq} after {}",
                                self.last_seq
                            );
                            self.last_seq = seq;
                            self.seen.push(e);
                        }
                    }
                    return Some(v);
                }
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Reads frames until one satisfies `pred`; panics after `timeout`.
    pub async fn until(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(v) if pred(&v) => return v,
                Some(_) => continue,
                None => panic!(
                    "timed out or closed waiting for {what}; seen {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Waits for a durable event of type `ty` (matching `pred`) to have arrived.
    pub async fn event(&mut self, ty: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.event_within(Duration::from_secs(15), ty, pred).await
    }

    /// Like `event`, with a longer wait (agent runs).
    pub async fn event_within(
        &mut self,
        wait: Duration,
        ty: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        if let Some(e) = self.seen.iter().find(|e| e["type"] == ty && pred(e)) {
            return e.clone();
        }
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let before = self.seen.len();
            if self.next(left).await.is_none() {
                panic!("no {ty} event arrived; seen {:?}", self.seen);
            }
            if let Some(e) = self.seen[before..]
                .iter()
                .find(|e| e["type"] == ty && pred(e))
            {
                return e.clone();
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The compute side for end-to-end runs: the scripted model and the local provider, as real processes.
pub struct Compute {
    pub provider_url: String,
    pub model_url: String,
    pub secret: String,
    pub dir: PathBuf,
    children: Vec<Child>,
}

fn bin(name: &str) -> PathBuf {
    let p = repo_root().join("target/debug").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build -p nightshift-sandbox --bins` (scripts/test.sh does it)",
        p.display()
    );
    p
}

async fn wait_http(url: &str, what: &str, log: &Path) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get(url).send().await.is_err() {
        if Instant::now() > deadline {
            panic!(
                "{what} did not start:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Compute {
    /// Starts the scripted model replaying `recording` and a provider whose sandboxes use it.
    pub async fn start(recording: &Value, provider_env: &[(&str, &str)]) -> Compute {
        let root = repo_root();
        let dir = root.join(".state/test").join(format!(
            "compute-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("compute dir");
        let rec = dir.join("recording.json");
        std::fs::write(&rec, recording.to_string()).expect("write recording");
        let model_port = free_port();
        let model_log = dir.join("model.log");
        let model = Command::new(bin("nightshift-scripted-model"))
            .args(["--port", &model_port.to_string(), "--recording"])
            .arg(&rec)
            .stdout(std::fs::File::create(&model_log).expect("log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start scripted model");
        let model_url = format!("http://127.0.0.1:{model_port}/v1");
        wait_http(
            &format!("http://127.0.0.1:{model_port}/health"),
            "scripted model",
            &model_log,
        )
        .await;
        let port = free_port();
        let secret = format!("provider-secret-{port}");
        let plog = dir.join("provider.log");
        let mut cmd = Command::new(bin("nightshift-provider"));
        cmd.args(["--port", &port.to_string(), "--root"])
            .arg(dir.join("provider"))
            .env("PROVIDER_SECRET", &secret)
            // The tests' repositories are local paths: single-user dev mode.
            .env("NIGHTSHIFT_DEV_MODE", "1")
            .env(
                "NIGHTSHIFT_OPENCODE_BIN",
                root.join("node_modules/opencode-linux-x64/bin/opencode"),
            )
            .env("NIGHTSHIFT_PLUGIN_MODULES", root.join("node_modules"))
            .env("NIGHTSHIFT_MODEL", "nightshift/scripted")
            .env("NIGHTSHIFT_MODEL_URL", &model_url)
            .stdout(std::fs::File::create(&plog).expect("log"))
            .stderr(std::fs::File::create(dir.join("provider.err")).expect("log"));
        for (k, v) in provider_env {
            cmd.env(k, v);
        }
        let provider = cmd.spawn().expect("start provider");
        let provider_url = format!("http://127.0.0.1:{port}");
        wait_http(&format!("{provider_url}/v1/health"), "provider", &plog).await;
        Compute {
            provider_url,
            model_url,
            secret,
            dir,
            children: vec![model, provider],
        }
    }

    /// The Worker vars that point sessions at this compute.
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        vec![
            ("PROMPT_RUNNER", "sandbox".to_string()),
            ("PROVIDER_URL", self.provider_url.clone()),
            ("PROVIDER_SECRET", self.secret.clone()),
            ("CONTROL_URL", "{self}".to_string()),
        ]
    }

    /// One signed request to the provider, as the control plane sends it.
    pub async fn provider(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let nonce = nightshift_sandbox::provider::random_hex(16);
        let sig = nightshift_core::signing::sign(
            self.secret.as_bytes(),
            method,
            path,
            ts,
            &nonce,
            &bytes,
        )
        .expect("sign");
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let r = reqwest::Client::new()
            .request(m, format!("{}{path}", self.provider_url))
            .header(nightshift_core::signing::TIMESTAMP_HEADER, ts.to_string())
            .header(nightshift_core::signing::NONCE_HEADER, nonce)
            .header(nightshift_core::signing::SIGNATURE_HEADER, sig)
            .header("content-type", "application/json")
            .body(bytes)
            .send()
            .await
            .expect("provider request");
        let st = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (
            st,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// A bare repository with a few hundred files of real content on `main`: Nightshift's own
    /// tracked files plus OpenCode's SDK and plugin packages (JavaScript and type definitions).
    pub fn remote_repo_with_content(&self, name: &str) -> PathBuf {
        let root = repo_root();
        let seed = self.dir.join(format!("{name}-seed"));
        std::fs::create_dir_all(&seed).expect("seed dir");
        git(&seed, &["init", "-q", "-b", "main"]);
        let tracked = git(&root, &["ls-files"]);
        let vendored = [
            "node_modules/@opencode-ai/sdk",
            "node_modules/@opencode-ai/plugin",
        ];
        let mut files: Vec<PathBuf> = tracked.lines().map(PathBuf::from).collect();
        for dir in vendored {
            let mut stack = vec![root.join(dir)];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if let Ok(rel) = p.strip_prefix(&root) {
                        files.push(rel.to_path_buf());
                    }
                }
            }
        }
        for rel in files {
            let to = seed.join(rel.to_string_lossy().replace("node_modules/", "vendor/"));
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).expect("seed dir");
            }
            // Tracked files deleted in the work tree are skipped.
            let _ = std::fs::copy(root.join(&rel), &to);
        }
        self.publish(name, &seed)
    }

    /// Commits everything in `seed` and clones it bare as `<name>.git`.
    fn publish(&self, name: &str, seed: &Path) -> PathBuf {
        git(seed, &["add", "."]);
        git(
            seed,
            &[
                "-c",
                "user.name=Seed",
                "-c",
                "user.email=seed@example.com",
                "commit",
                "-qm",
                "init",
            ],
        );
        let bare = self.dir.join(format!("{name}.git"));
        git(
            &self.dir,
            &[
                "clone",
                "-q",
                "--bare",
                &seed.to_string_lossy(),
                &bare.to_string_lossy(),
            ],
        );
        bare
    }

    /// A bare repository with one commit on `main`, usable as a session's repository.
    pub fn remote_repo(&self, name: &str) -> PathBuf {
        let seed = self.dir.join(format!("{name}-seed"));
        std::fs::create_dir_all(&seed).expect("seed dir");
        git(&seed, &["init", "-q", "-b", "main"]);
        std::fs::write(seed.join("README.md"), "# demo\n").expect("readme");
        self.publish(name, &seed)
    }
}

/// Runs git in `dir`; panics with its stderr on failure; returns stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Drop for Compute {
    fn drop(&mut self) {
        // The provider's sandboxes die with it (bubblewrap --die-with-parent); kill it last.
        for c in self.children.iter_mut().rev() {
            // SIGTERM lets the provider terminate its sandboxes first.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // Sandboxes, logs and repositories go too, unless kept for a post-mortem.
        if std::env::var_os("NIGHTSHIFT_KEEP_TEST_STATE").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// How long an agent run may take in end-to-end tests.
pub const RUN: Duration = Duration::from_secs(120);

/// Starts the compute side and a Worker pointed at it (`extra` adds Worker vars).
pub async fn start_with_compute(
    recording: Value,
    provider_env: &[(&str, &str)],
    extra: &[(&str, &str)],
) -> (Compute, Server) {
    let compute = Compute::start(&recording, provider_env).await;
    let owned = compute.vars();
    let mut vars: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Test clients do not ping; agent runs on a loaded machine can outlast the default
    // 60 s presence sweep, which would close their sockets mid-test.
    vars.push(("HEARTBEAT_TIMEOUT_MS", "900000"));
    vars.extend_from_slice(extra);
    let server = Server::start(&vars).await;
    (compute, server)
}

impl Api {
    /// Sends a prompt over HTTP; returns its id.
    pub async fn prompt(&self, who: &User, session: &str, text: &str) -> String {
        let (st, v) = self
            .call(
                "POST",
                &format!("/multiplayer/{session}/prompt"),
                who,
                Some(json!({ "text": text })),
            )
            .await;
        assert_eq!(st, 202, "{v}");
        v["id"].as_str().expect("prompt id").to_string()
    }
}

impl Ws {
    /// Waits for the prompt's `prompt.finished` event.
    pub async fn finished(&mut self, prompt: &str) -> Value {
        self.event_within(RUN, "prompt.finished", |e| e["id"] == prompt)
            .await
    }
}

/// A repository (`GET /repositories/:name`) whose pool is full with ready sandboxes of its latest image.
pub fn pool_ready(v: &Value) -> bool {
    let p = &v["pool"];
    !v["latest_image"].is_null()
        && p["image"] == v["latest_image"]
        && p["ready"] == p["target"]
        && p["draining"] == 0
        && p["booting"] == 0
}
