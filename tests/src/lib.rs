//! Test harness: starts the real Worker under `wrangler dev` on free ports with its own state, and talks to it over HTTP and WebSocket.

pub mod fake_github;
pub mod fake_provider;
pub mod fake_slack;

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

/// A loopback port below the kernel's ephemeral range (32768 and up) that was free a moment ago.
/// Another process may still take it before the server binds it: `Server::spawn` checks that
/// the listener it reaches is its own child's and retries on another port if not.
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

/// The socket inodes listening on 127.0.0.1:`port` (from `/proc/net/tcp`).
fn listener_inodes(port: u16) -> Vec<String> {
    let local = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| f[9].to_string())
        })
        .collect()
}

/// The pids of every process whose process group is `pgid`.
fn group_pids(pgid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the parenthesised command: state, ppid, pgrp, ...
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            rest.split_whitespace()
                .nth(2)
                .and_then(|g| g.parse::<i32>().ok())
                == Some(pgid)
        })
        .collect()
}

/// Whether the process group `pgid` holds the socket listening on 127.0.0.1:`port`
/// (and not some other server that took the port first).
fn port_held_by_group(port: u16, pgid: i32) -> bool {
    let inodes = listener_inodes(port);
    if inodes.is_empty() {
        return false;
    }
    group_pids(pgid).into_iter().any(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|l| {
                let l = l.to_string_lossy();
                inodes.iter().any(|i| l == format!("socket:[{i}]"))
            })
    })
}

/// A random lowercase hex string of `n` characters (fixed length: no name is a prefix of another).
fn random_suffix(n: usize) -> String {
    (0..n)
        .map(|_| char::from(b"0123456789abcdef"[usize::from(rand::random::<u8>() % 16)]))
        .collect()
}

/// One `wrangler dev` process with its own persisted Durable Object state.
pub struct Server {
    pub port: u16,
    pub base: String,
    state_dir: PathBuf,
    /// Worker vars; `{self}` in a value stands for this server's own URL.
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
        let unique = format!("{}-{}", std::process::id(), random_suffix(16));
        let state_dir = root.join(".state/test").join(&unique);
        std::fs::create_dir_all(&state_dir).expect("create state dir");
        let mut all = vec![
            ("DEV_AUTH".to_string(), "1".to_string()),
            ("AUTH_SECRET".to_string(), "test-secret".to_string()),
        ];
        for (k, v) in vars {
            all.retain(|(name, _)| name != k);
            all.push((k.to_string(), v.to_string()));
        }
        let mut s = Server {
            port: 0,
            base: String::new(),
            log: state_dir.join("wrangler.log"),
            state_dir,
            vars: all,
            child: None,
            dir: dir.to_path_buf(),
        };
        // A port can be taken between `free_port` and wrangler's bind (by anything, or by a
        // parallel test's server): then this server is retried on another port.
        for _ in 0..5 {
            s.port = free_port();
            s.base = format!("http://127.0.0.1:{}", s.port);
            if s.spawn().await {
                return s;
            }
        }
        let log = std::fs::read_to_string(&s.log).unwrap_or_default();
        panic!("wrangler dev did not start on any of 5 ports:\n{log}");
    }

    /// Starts wrangler on `self.port`; true once `/health` answers from this child's own
    /// listener, false (child killed) if the port turned out to be someone else's.
    async fn spawn(&mut self) -> bool {
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
            let v = v.replace("{self}", &self.base);
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
        let pgid = child.id() as i32;
        self.child = Some(child);
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut foreign_since: Option<Instant> = None;
        loop {
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited {
                // It could not bind (or crashed): the caller may try another port.
                self.kill();
                return false;
            }
            if let Ok(r) = http.get(format!("{}/health", self.base)).send().await {
                if r.status().is_success() {
                    if port_held_by_group(self.port, pgid) {
                        return true;
                    }
                    // Someone else's server answers on this port: this child cannot bind it.
                    let since = *foreign_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(10) {
                        self.kill();
                        return false;
                    }
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
    /// Sets `--var name=value` for the next `restart` (a var given before is replaced).
    pub fn set_var(&mut self, name: &str, value: &str) {
        self.vars.retain(|(k, _)| k != name);
        self.vars.push((name.to_string(), value.to_string()));
    }

    pub async fn restart(&mut self) {
        self.kill();
        // The same port (clients hold its URL): wait until it is free again, and retry if
        // something takes it meanwhile.
        for _ in 0..5 {
            for _ in 0..100 {
                if TcpListener::bind(("127.0.0.1", self.port)).is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if self.spawn().await {
                return;
            }
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        panic!("wrangler dev did not restart on port {}:\n{log}", self.port);
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
        // State and the wrangler log stay for a post-mortem when asked.
        if std::env::var_os("NIGHTSHIFT_KEEP_TEST_STATE").is_some() {
            eprintln!(
                "kept the server's state and log in {}",
                self.state_dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.state_dir);
        }
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

    /// Creates a session on a repository (a local path); returns (id, invite).
    pub async fn create_session_on(
        &self,
        who: &User,
        title: &str,
        repository: &Path,
    ) -> (String, String) {
        self.create_session_on_name(who, title, &repository.to_string_lossy())
            .await
    }

    /// Creates a session on a registered repository (by name); returns (id, invite).
    pub async fn create_session_on_name(
        &self,
        who: &User,
        title: &str,
        repository: &str,
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

    /// A one-time ticket that opens session `id`'s socket (`POST /auth/ticket`).
    pub async fn ticket(&self, who: &User, id: &str) -> String {
        let (st, v) = self
            .call("POST", "/auth/ticket", who, Some(json!({ "session": id })))
            .await;
        assert_eq!(st, 200, "ticket: {v}");
        v["ticket"].as_str().expect("ticket").to_string()
    }

    pub async fn connect(&self, who: &User, id: &str, client: &str, since: u64) -> Ws {
        let ticket = self.ticket(who, id).await;
        let url = format!(
            "{}/multiplayer/{id}/ws?ticket={ticket}&client={client}&since={since}",
            self.base.replacen("http", "ws", 1),
        );
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connect");
        let (sink, stream) = stream.split();
        Ws {
            sink: std::sync::Arc::new(tokio::sync::Mutex::new(sink)),
            stream,
            pinger: None,
            last_seq: since,
            seen: Vec::new(),
            closed_with: None,
        }
    }
}

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client that tracks the events it has seen.
pub struct Ws {
    sink: std::sync::Arc<tokio::sync::Mutex<futures_util::stream::SplitSink<WsStream, Message>>>,
    stream: futures_util::stream::SplitStream<WsStream>,
    /// Sends `ping` frames in the background (see `pinging`).
    pinger: Option<tokio::task::JoinHandle<()>>,
    pub last_seq: u64,
    /// Every durable event received, in arrival order.
    pub seen: Vec<Value>,
    /// The close code the server ended the socket with, once `next` has read it.
    pub closed_with: Option<u16>,
}

impl Drop for Ws {
    fn drop(&mut self) {
        if let Some(p) = self.pinger.take() {
            p.abort();
        }
    }
}

impl Ws {
    /// Sends a `ping` frame every `every` from a background task, as the web app does, so
    /// the presence sweep keeps this client however long the test spends elsewhere (HTTP
    /// calls, waits on other sockets). Without it a client is swept after
    /// `HEARTBEAT_TIMEOUT_MS`.
    pub fn pinging(mut self, every: Duration) -> Ws {
        let sink = self.sink.clone();
        self.pinger = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let frame = Message::Text(json!({"type": "ping"}).to_string().into());
                if sink.lock().await.send(frame).await.is_err() {
                    return;
                }
            }
        }));
        self
    }

    /// Stops the background pings: the presence sweep may now remove this client.
    pub fn stop_pinging(&mut self) {
        if let Some(p) = self.pinger.take() {
            p.abort();
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.sink
            .lock()
            .await
            .send(Message::Text(v.to_string().into()))
            .await
            .expect("ws send");
    }

    pub async fn send_text(&mut self, s: &str) {
        self.sink
            .lock()
            .await
            .send(Message::Text(s.to_string().into()))
            .await
            .expect("ws send");
    }

    /// Reads until the server closes the socket with a close frame; returns its code, or
    /// None if `timeout` passed or the connection ended without one.
    pub async fn close_frame(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let msg = tokio::time::timeout(left, self.stream.next())
                .await
                .ok()??;
            if let Message::Close(frame) = msg.ok()? {
                return Some(frame.map(|f| u16::from(f.code)).unwrap_or(1005));
            }
        }
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
                Message::Close(frame) => {
                    self.closed_with = Some(frame.map(|f| u16::from(f.code)).unwrap_or(1005));
                    return None;
                }
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
        if let Some(p) = self.pinger.take() {
            p.abort();
        }
        let _ = self.sink.lock().await.close().await;
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

/// Waits until `child` (started with `--port 0`) writes `<marker>http://127.0.0.1:PORT` to
/// `log`; returns the port. The child binds the port itself, so no other process can take it
/// between a check and the bind.
async fn listening_port(child: &mut Child, log: &Path, marker: &str, what: &str) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let port = text.lines().find_map(|l| {
            let rest = &l[l.find(marker)? + marker.len()..];
            let rest = rest.strip_prefix("http://127.0.0.1:")?;
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u16>().ok()
        });
        if let Some(port) = port {
            return port;
        }
        if matches!(child.try_wait(), Ok(Some(_))) || Instant::now() > deadline {
            panic!("{what} did not start:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
        // A random suffix of fixed length: two Computes never share (or prefix) a directory.
        let dir = root.join(".state/test").join(format!(
            "compute-{}-{}",
            std::process::id(),
            random_suffix(16)
        ));
        std::fs::create_dir_all(&dir).expect("compute dir");
        let rec = dir.join("recording.json");
        std::fs::write(&rec, recording.to_string()).expect("write recording");
        let model_log = dir.join("model.log");
        let mut model = Command::new(bin("nightshift-scripted-model"))
            .args(["--port", "0", "--recording"])
            .arg(&rec)
            .stdout(std::fs::File::create(&model_log).expect("log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("start scripted model");
        let model_port = listening_port(
            &mut model,
            &model_log,
            "scripted model listening on ",
            "scripted model",
        )
        .await;
        let model_url = format!("http://127.0.0.1:{model_port}/v1");
        wait_http(
            &format!("http://127.0.0.1:{model_port}/health"),
            "scripted model",
            &model_log,
        )
        .await;
        let secret = format!("provider-secret-{}", random_suffix(16));
        let plog = dir.join("provider.log");
        let mut cmd = Command::new(bin("nightshift-provider"));
        cmd.args(["--port", "0", "--root"])
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
        let mut provider = cmd.spawn().expect("start provider");
        let port = listening_port(&mut provider, &plog, "provider listening on ", "provider").await;
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

    /// Processes still running that belong to this compute, found without the provider's
    /// help (not by its `NIGHTSHIFT_SANDBOX_ID` mark): any process whose working directory
    /// is under `dir`, or whose command line or environment names `dir`. Returns (pid, command).
    pub fn processes_left(&self) -> Vec<(i32, String)> {
        processes_naming(&self.dir)
    }
}

/// Every process (but this one) whose cwd is under `dir` or whose cmdline or environ contains `dir`.
pub fn processes_naming(dir: &Path) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let needle = dir.as_os_str().as_encoded_bytes().to_vec();
    let contains = |hay: &[u8]| hay.windows(needle.len()).any(|w| w == needle.as_slice());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let proc_dir = e.path();
        let cmdline = std::fs::read(proc_dir.join("cmdline")).unwrap_or_default();
        let cwd_under = std::fs::read_link(proc_dir.join("cwd"))
            .map(|c| c.starts_with(dir))
            .unwrap_or(false);
        let environ = std::fs::read(proc_dir.join("environ")).unwrap_or_default();
        if cwd_under || contains(&cmdline) || contains(&environ) {
            let cmd = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            out.push((pid, cmd.trim().to_string()));
        }
    }
    out
}

impl Compute {
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
        let nonce = nightshift_sandbox::state::random_hex(16);
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
        // Nothing of this compute may outlive it: no supervisor, OpenCode, exec'd command or
        // build step, judged from /proc alone (not by the provider's own marks).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut left = self.processes_left();
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            left = self.processes_left();
        }
        for (pid, _) in &left {
            // Do not leak them into the next test.
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
            }
        }
        let keep = std::env::var_os("NIGHTSHIFT_KEEP_TEST_STATE").is_some();
        // Sandboxes, logs and repositories go too, unless kept for a post-mortem.
        if !keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        if !left.is_empty() {
            let msg = format!(
                "processes of {} were still running 10 s after its compute stopped: {left:?}",
                self.dir.display()
            );
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
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
    /// The id of the first sandbox `GET /sandbox?session_id=` lists for a session.
    pub async fn session_sandbox(&self, who: &User, session: &str) -> String {
        let (st, mine) = self
            .call("GET", &format!("/sandbox?session_id={session}"), who, None)
            .await;
        assert_eq!(st, 200, "{mine}");
        mine["sandboxes"][0]["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no sandbox listed for {session}: {mine}"))
            .to_string()
    }

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

/// A team's deployment with the (fake) GitHub App on `acme/web`: what [`github_team`] starts.
pub struct GithubTeam {
    pub github: fake_github::FakeGithub,
    pub compute: Compute,
    pub server: Server,
    /// Ada, signed in through GitHub's OAuth pages (the fake's); she administers `acme/web`.
    pub ada: User,
    pub installation: u64,
}

/// The fake GitHub with `people` (login, name, role on `acme/web`) and `bots` (write access),
/// the App installed on `acme/web`, the compute side replaying `recording`, the Worker wired to
/// both (with `extra` vars), Ada signed in through GitHub and `acme/web` registered as `web`.
pub async fn github_team(
    recording: Value,
    people: &[(&str, &str, nightshift_core::github::Role)],
    bots: &[&str],
    extra: &[(&str, &str)],
) -> GithubTeam {
    use fake_github::{FakeGithub, FakeGithubConfig};
    let github = FakeGithub::start(FakeGithubConfig::default()).await;
    let mut collaborators = Vec::new();
    for (login, name, role) in people {
        github.add_user(login, name);
        collaborators.push((*login, *role));
    }
    for bot in bots {
        github.add_bot(bot);
        collaborators.push((*bot, nightshift_core::github::Role::Write));
    }
    github.add_repo("acme/web", &collaborators);
    let installation = github.install("acme", &["acme/web"]);
    let owned = github.worker_vars();
    let mut vars: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    vars.extend_from_slice(extra);
    let (compute, server) = start_with_compute(recording, &[], &vars).await;
    github.deliver_to(&format!("{}/webhook/github", server.base));
    let (st, _) = github.deliver_installation_created(installation).await;
    assert_eq!(st, 202);
    let ada = User {
        user: "ada".into(),
        token: github.sign_in_through(&server.base, "ada").await,
    };
    let (st, v) = server
        .client()
        .call(
            "POST",
            "/repositories",
            &ada,
            Some(json!({"name": "web", "github": "acme/web"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    GithubTeam {
        github,
        compute,
        server,
        ada,
        installation,
    }
}
