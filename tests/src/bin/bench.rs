//! Benchmarks against a local wrangler dev (release Wasm): prints p50/p99 figures for the control plane.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use nightshift_tests::{Api, Compute, Server, User, Ws};
use serde_json::json;

fn pct(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if samples.is_empty() {
        return f64::NAN;
    }
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx.min(samples.len() - 1)]
}

fn report(name: &str, samples: &mut [f64]) {
    let (p50, p99) = (pct(samples, 0.5), pct(samples, 0.99));
    println!(
        "{name:<60} p50 {p50:>8.2} ms   p99 {p99:>8.2} ms   (n={})",
        samples.len()
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Waits until a frame carries an event of `ty` whose `key` equals `marker`.
async fn wait_event(ws: &mut Ws, ty: &str, key: &[&str], marker: &str) -> Instant {
    loop {
        let Some(v) = ws.next(Duration::from_secs(30)).await else {
            panic!("socket closed while waiting for {ty} {marker}");
        };
        if v["type"] == "events" {
            let hit = v["events"].as_array().is_some_and(|evs| {
                evs.iter().any(|e| {
                    let mut f = e;
                    for k in key {
                        f = &f[*k];
                    }
                    e["type"] == ty && f == marker
                })
            });
            if hit {
                return Instant::now();
            }
        }
    }
}

async fn connect_many(api: &Api, who: &User, id: &str, n: usize, prefix: &str) -> Vec<Ws> {
    let mut out = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
        let conns = join_all(chunk.iter().map(|i| {
            let api = api.clone();
            let who = who.clone();
            let id = id.to_string();
            let client = format!("{prefix}{i}");
            async move {
                let mut ws = api.connect(&who, &id, &client, u64::MAX / 2).await;
                ws.until(Duration::from_secs(30), "hello", |v| v["type"] == "hello")
                    .await;
                ws
            }
        }))
        .await;
        out.extend(conns);
    }
    out
}

/// Drains frames until the socket has been quiet for `quiet`; returns how many and their bytes.
async fn drain_counting(ws: &mut Ws, quiet: Duration) -> (usize, usize) {
    let (mut frames, mut bytes) = (0, 0);
    while let Some(t) = ws.next_raw(quiet).await {
        frames += 1;
        bytes += t.len();
    }
    (frames, bytes)
}

/// Drains frames until the socket has been quiet for `quiet`.
async fn drain(ws: &mut Ws, quiet: Duration) {
    while ws.next(quiet).await.is_some() {}
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let only = std::env::args().nth(1);
    let run = |part: &str| only.as_deref().is_none_or(|o| o == part);
    if run("control") {
        control_plane().await;
    }
    if run("control") || only.as_deref() == Some("floor") {
        floor().await;
    }
    if run("control") {
        guard();
    }
    if run("agent") {
        agent_events().await;
        agent().await;
    }
    if run("pools") {
        pools().await;
    }
    // What a person waits for around the pools: a sandbox's death with default settings, and
    // cold starts while a drained pool refills (both also run under `pools`).
    if run("pools") || only.as_deref() == Some("restore") {
        restore_from_death().await;
    }
    if run("pools") || only.as_deref() == Some("refill") {
        cold_while_refilling().await;
    }
    if run("viewers") {
        viewers().await;
    }
    if run("reload") {
        reload().await;
    }
    if run("idle") {
        idle().await;
    }
    if run("presence") {
        presence().await;
    }
    if run("wake") {
        wake().await;
    }
    if run("background") {
        background().await;
    }
    if run("review") {
        review().await;
    }
    if run("slack") {
        slack().await;
    }
    if only.as_deref() == Some("single") {
        single().await;
        guard();
    }
}

/// `BENCH_N` (iterations of each measurement), or `default`.
fn bench_n(default: usize) -> usize {
    env_num("BENCH_N", default)
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Like `report`, and also prints the first sample on its own (nothing is dropped: the
/// first is in the percentiles too).
fn report_first(name: &str, samples: &mut [f64]) {
    let first = samples.first().copied().unwrap_or(f64::NAN);
    let (p50, p99) = (pct(samples, 0.5), pct(samples, 0.99));
    println!(
        "{name:<60} p50 {p50:>8.2} ms   p99 {p99:>8.2} ms   first {first:>8.2} ms   (n={})",
        samples.len()
    );
}

type Link =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Plays session `id`'s sandbox: waits for the (fake) provider's create for that session, dials
/// the sandbox link with its token and reads the welcome and the running prompt.
async fn dial_sandbox_link(
    fake: &nightshift_tests::fake_provider::Shared,
    server: &Server,
    id: &str,
) -> Link {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let token = loop {
        let t = fake.lock().ok().and_then(|f| {
            f.creates
                .iter()
                .find(|c| c["session_id"] == id)
                .and_then(|c| c["supervisor"]["sandbox_token"].as_str().map(String::from))
        });
        if let Some(t) = t {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let mut req = format!(
        "{}/sandbox-link/{id}",
        server.base.replacen("http", "ws", 1)
    )
    .into_client_request()
    .expect("request");
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    let (mut link, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("sandbox link");
    for _ in 0..2 {
        link.next().await; // welcome, prompt
    }
    link
}

/// Sustained agent events into one session with 10 clients, as a sandbox sends them (batched).
async fn agent_events() {
    use futures_util::{SinkExt, StreamExt};
    use nightshift_tests::fake_provider;
    use tokio_tungstenite::tungstenite::Message;

    let (fake, url) = fake_provider::start().await;
    let server = Server::start(&[
        ("PROMPT_RUNNER", "sandbox"),
        ("PROVIDER_URL", &url),
        ("PROVIDER_SECRET", fake_provider::SECRET),
        ("CONTROL_URL", "{self}"),
        ("MAX_CLIENTS_PER_USER", "100"),
    ])
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let (st, s) = api
        .call(
            "POST",
            "/sessions",
            &ada,
            Some(json!({"title": "events", "repository": "/srv/git/bench.git"})),
        )
        .await;
    assert_eq!(st, 201, "{s}");
    let id = s["id"].as_str().expect("id").to_string();
    let mut ten = connect_many(&api, &ada, &id, 10, "ev").await;
    for ws in ten.iter_mut() {
        drain(ws, Duration::from_millis(200)).await;
    }
    let (_, p) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/prompt"),
            &ada,
            Some(json!({"text": "go"})),
        )
        .await;
    let prompt = p["id"].as_str().expect("prompt").to_string();
    let mut link = dial_sandbox_link(&fake, &server, &id).await;
    for ws in ten.iter_mut() {
        drain(ws, Duration::from_millis(200)).await;
    }
    let total: usize = 20_000;
    let batch = 200;
    let t = Instant::now();
    let sender = async {
        let mut n = 0u64;
        for _ in 0..total / batch {
            let events: Vec<serde_json::Value> = (0..batch)
                .map(|_| {
                    n += 1;
                    json!({"n": n, "event": {"kind": "agent.text", "prompt": prompt, "text": format!("token {n} ")}})
                })
                .collect();
            link.send(Message::Text(
                json!({"type": "batch", "events": events})
                    .to_string()
                    .into(),
            ))
            .await
            .expect("send");
        }
        // Read acknowledgements until the last one.
        while let Some(Ok(m)) = link.next().await {
            if let Message::Text(t) = m {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
                if std::env::var("BENCH_DEBUG").is_ok() && v["type"] != "ack" {
                    eprintln!("link: {v}");
                }
                if v["type"] == "ack" && v["n"].as_u64() == Some(n) {
                    break;
                }
            }
        }
    };
    let receivers = join_all(ten.iter_mut().map(|ws| async move {
        let mut got = 0usize;
        while got < total {
            let Some(v) = ws.next(Duration::from_secs(60)).await else {
                if std::env::var("BENCH_DEBUG").is_ok() {
                    eprintln!("receiver stopped after {got}");
                }
                break;
            };
            if got == 0 && std::env::var("BENCH_DEBUG").is_ok() {
                eprintln!(
                    "first frame: {}",
                    v.to_string().chars().take(300).collect::<String>()
                );
            }
            if v["type"] == "events" {
                got += v["events"]
                    .as_array()
                    .map(|e| e.iter().filter(|e| e["type"] == "agent.text").count())
                    .unwrap_or(0);
            }
        }
        got
    }));
    let ((), counts) = tokio::join!(sender, receivers);
    let secs = t.elapsed().as_secs_f64();
    let min = counts.iter().copied().min().unwrap_or(0);
    println!(
        "{:<60} {:>8.0} events/s  ({} agent events in batches of {batch}, each stored then sent to 10 clients)",
        "sustained agent events into one session",
        min as f64 / secs,
        min
    );
}

/// The agent path: sandbox create -> ready (cold), and prompt -> first agent event with a ready sandbox.
async fn agent() {
    let turns: Vec<serde_json::Value> = (0..40)
        .map(|i| json!({"text": format!("ok {i}")}))
        .collect();
    let compute = Compute::start(&json!({ "turns": turns }), &[]).await;
    println!("Nightshift agent-path benchmark (local provider, bubblewrap when available, real OpenCode, scripted model with zero think time)");
    let remote = compute.remote_repo("bench");
    let mut cold = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        let (_, s) = compute.provider("POST", "/v1/sandboxes", Some(json!({"session_id": format!("ses_bench{i}"), "repository": {"clone_url": remote, "base_branch": "main"}}))).await;
        let id = s["id"].as_str().expect("sandbox id").to_string();
        loop {
            let (_, g) = compute
                .provider("GET", &format!("/v1/sandboxes/{id}"), None)
                .await;
            if g["status"] == "ready" {
                break;
            }
            assert_ne!(g["status"], "failed", "{g}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cold.push(ms(t.elapsed()));
        compute
            .provider("POST", &format!("/v1/sandboxes/{id}/terminate"), None)
            .await;
    }
    report(
        "sandbox create -> ready (cold: clone, sync, OpenCode up)",
        &mut cold,
    );

    let owned = compute.vars();
    let vars: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(&vars).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let (id, _) = api.create_session_on(&ada, "bench", &remote).await;
    let mut ws = api.connect(&ada, &id, "bench", 0).await;
    let mut first = Vec::new();
    let mut whole = Vec::new();
    for i in 0..12 {
        let t = Instant::now();
        let (st, p) = api
            .call(
                "POST",
                &format!("/multiplayer/{id}/prompt"),
                &ada,
                Some(json!({"text": format!("prompt {i}")})),
            )
            .await;
        assert_eq!(st, 202, "{p}");
        let pid = p["id"].as_str().expect("id").to_string();
        let e = ws
            .event_within(Duration::from_secs(120), "agent.text", |e| {
                e["prompt"] == pid.as_str()
            })
            .await;
        let t_first = t.elapsed();
        ws.event_within(Duration::from_secs(120), "prompt.finished", |e| {
            e["id"] == pid.as_str()
        })
        .await;
        let t_done = t.elapsed();
        drop(e);
        // The first prompt spawns the sandbox: a person waits for it too, so it is reported
        // on its own line, never dropped.
        if i == 0 {
            report(
                "first prompt of a new session -> first agent event (cold clone)",
                &mut [ms(t_first)],
            );
            report(
                "first prompt of a new session -> prompt.finished",
                &mut [ms(t_done)],
            );
        } else {
            first.push(ms(t_first));
            whole.push(ms(t_done));
        }
    }
    report("follow-up prompt -> first agent event", &mut first);
    report(
        "follow-up prompt -> prompt.finished (no changes)",
        &mut whole,
    );
}

/// Which control plane a figure was measured on: Nightshift, or the runtime floor
/// (`tests/floor/`) in the same run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Nightshift,
    Floor,
}

impl Side {
    fn prefix(self) -> &'static str {
        match self {
            Side::Nightshift => "",
            Side::Floor => "floor: ",
        }
    }
}

/// A time (lower is better) or a rate (higher is better).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Unit {
    Ms,
    PerSec,
}

/// One figure kept for the regression guard.
struct Figure {
    side: Side,
    name: String,
    value: f64,
    unit: Unit,
}

/// Every figure `control` (and `floor`) measured in this run, in order.
static FIGURES: std::sync::Mutex<Vec<Figure>> = std::sync::Mutex::new(Vec::new());

fn record(side: Side, name: &str, value: f64, unit: Unit) {
    if let Ok(mut figures) = FIGURES.lock() {
        figures.push(Figure {
            side,
            name: name.to_string(),
            value,
            unit,
        });
    }
}

/// `report`, labelled for `side`; its p50 is kept for the guard.
fn report_on(side: Side, name: &str, samples: &mut [f64]) {
    report(&format!("{}{name}", side.prefix()), samples);
    record(side, &format!("{name} p50"), pct(samples, 0.5), Unit::Ms);
}

/// The regression guard: each Nightshift figure that has a floor counterpart in this run, the
/// floor's value and the ratio Nightshift / floor.
fn guard() {
    let Ok(figures) = FIGURES.lock() else {
        return;
    };
    println!();
    println!("Regression guard: Nightshift / runtime floor, both from this run");
    println!(
        "  ms: ratio above 1 = slower than the floor; /s: ratio below 1 = fewer than the floor"
    );
    println!(
        "{:<60} {:>12} {:>12} {:>8}",
        "figure", "Nightshift", "floor", "ratio"
    );
    for ns in figures.iter().filter(|f| f.side == Side::Nightshift) {
        let floor = figures
            .iter()
            .find(|f| f.side == Side::Floor && f.name == ns.name);
        let Some(floor) = floor else {
            continue;
        };
        let unit = match ns.unit {
            Unit::Ms => "ms",
            Unit::PerSec => "/s",
        };
        println!(
            "{:<60} {:>9.1} {unit} {:>9.1} {unit} {:>7.2}x",
            ns.name,
            ns.value,
            floor.value,
            ns.value / floor.value
        );
    }
}

async fn control_plane() {
    let server = Server::start(&[
        ("PROMPT_RUNNER", "none"),
        ("MAX_QUEUED", "100000"),
        ("MAX_CLIENTS_PER_USER", "5000"),
        ("MAX_LOCK_TTL_MS", "600000"),
    ])
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    println!("Nightshift control-plane benchmark (wrangler dev, release Wasm, loopback)");

    // 1. Session create.
    bench_create(&api, &ada, Side::Nightshift).await;

    // 2. Prompt -> queued event at all of 10 clients (`BENCH_N` counted rounds, 20 warm-ups).
    let counted = env_num("BENCH_N", 100).max(1);
    let warm = 20.min(counted);
    let (id, _) = api.create_session(&ada, "prompt fan-out").await;
    let mut ten = connect_many(&api, &ada, &id, 10, "ten").await;
    for ws in ten.iter_mut() {
        drain(ws, Duration::from_millis(200)).await;
    }
    let mut queued = Vec::new();
    for i in 0..warm + counted {
        let text = format!("prompt {i}");
        let t = Instant::now();
        let waits = ten.iter_mut().map(|ws| {
            let text = text.clone();
            async move { wait_event(ws, "prompt.queued", &["prompt", "text"], &text).await }
        });
        let path = format!("/multiplayer/{id}/prompt");
        let send = api.call("POST", &path, &ada, Some(json!({"text": text})));
        let (arrivals, (st, _)) = tokio::join!(join_all(waits), send);
        assert_eq!(st, 202);
        let last = arrivals.into_iter().max().unwrap_or_else(Instant::now);
        if i >= warm {
            queued.push(ms(last - t));
        }
    }
    report("prompt -> prompt.queued at all 10 clients", &mut queued);
    // The same with the prompt sent over a person's socket (the `prompt` frame; no HTTP).
    let mut over_socket = Vec::new();
    for i in 0..warm + counted {
        let text = format!("socket prompt {i}");
        let t = Instant::now();
        ten[0].send(json!({"type": "prompt", "text": text})).await;
        let waits = ten.iter_mut().map(|ws| {
            let text = text.clone();
            async move { wait_event(ws, "prompt.queued", &["prompt", "text"], &text).await }
        });
        let arrivals = join_all(waits).await;
        let last = arrivals.into_iter().max().unwrap_or_else(Instant::now);
        if i >= warm {
            over_socket.push(ms(last - t));
        }
    }
    report(
        "prompt (over the socket) -> queued at all 10",
        &mut over_socket,
    );
    drop(ten);

    // 3. Sustained client commands into one session with 10 clients, pipelined.
    bench_pipelined(&api, &ada, Side::Nightshift).await;
    drop(server);

    // 4. The hot paths, like for like with the floor: a control plane whose compute is the fake
    // provider, so each session has a sandbox link the bench plays.
    let (fake, url) = nightshift_tests::fake_provider::start().await;
    let server = Server::start(&[
        ("PROMPT_RUNNER", "sandbox"),
        ("PROVIDER_URL", &url),
        ("PROVIDER_SECRET", nightshift_tests::fake_provider::SECRET),
        ("CONTROL_URL", "{self}"),
        ("MAX_CLIENTS_PER_USER", "5000"),
        ("MAX_LOCK_TTL_MS", "600000"),
    ])
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let bed = Bed {
        side: Side::Nightshift,
        server: &server,
        api,
        who: ada,
        fake: Some(fake),
    };
    hot_paths(&bed).await;
}

/// The same create, pipelined-command and hot-path figures against a minimal JavaScript Worker
/// and Durable Object (`tests/floor/`) that does the same storage writes and sends the same
/// frames with none of Nightshift's rules: what the runtime itself costs on this host under
/// `wrangler dev`.
async fn floor() {
    let dir = nightshift_tests::repo_root().join("tests/floor");
    let server = Server::start_in(&dir, &[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    println!("Runtime floor (minimal JavaScript Durable Object, same wrangler dev, same client)");
    bench_create(&api, &ada, Side::Floor).await;
    bench_pipelined(&api, &ada, Side::Floor).await;
    let bed = Bed {
        side: Side::Floor,
        server: &server,
        api,
        who: ada,
        fake: None,
    };
    hot_paths(&bed).await;
}

/// Session create, p50/p99 over `BENCH_N` (default 200) after 30 warm-ups.
async fn bench_create(api: &Api, who: &User, side: Side) {
    let samples = env_num("BENCH_N", 200).max(1);
    let mut create = Vec::new();
    for i in 0..30.min(samples) {
        api.create_session(who, &format!("warm {i}")).await;
    }
    for i in 0..samples {
        let t = Instant::now();
        api.create_session(who, &format!("bench {i}")).await;
        create.push(ms(t.elapsed()));
    }
    report_on(side, "session create (POST /sessions)", &mut create);
}

/// The old "sustained events into one session": `BENCH_PIPELINED` (default 3,000) `lock.acquire`
/// frames sent back to back by an 11th socket without waiting for acks; the clock runs until
/// the last event is at all 10 clients.
async fn bench_pipelined(api: &Api, who: &User, side: Side) {
    let total = env_num("BENCH_PIPELINED", 3000).max(1);
    let (id, _) = api.create_session(who, "throughput").await;
    let mut ten = connect_many(api, who, &id, 10, "t").await;
    for ws in ten.iter_mut() {
        drain(ws, Duration::from_millis(200)).await;
    }
    let mut writer = api.connect(who, &id, "writer", u64::MAX / 2).await;
    drain(&mut writer, Duration::from_millis(200)).await;
    let t = Instant::now();
    for i in 0..total {
        writer
            .send(
                json!({"type":"lock.acquire","resource": format!("r{}", i % 50), "ttl_ms": 600000}),
            )
            .await;
    }
    let waits = ten.iter_mut().map(|ws| async move {
        // Count events until the last one arrives.
        let mut n = 0usize;
        while n < total {
            let Some(v) = ws.next(Duration::from_secs(60)).await else {
                break;
            };
            if v["type"] == "events" {
                n += v["events"].as_array().map(Vec::len).unwrap_or(0);
            }
        }
        n
    });
    let counts: Vec<usize> = join_all(waits).await;
    let secs = t.elapsed().as_secs_f64();
    let min = counts.iter().copied().min().unwrap_or(0);
    let name = "client commands/s, pipelined, into a session of 10";
    println!(
        "{:<60} {:>8.0} events/s  ({} lock.acquire frames sent back to back by an 11th socket, each stored then sent to 10 clients)",
        format!("{}{name}", side.prefix()),
        min as f64 / secs,
        min
    );
    record(side, name, min as f64 / secs, Unit::PerSec);
}

/// Where the hot-path figures run: Nightshift with the fake provider as its compute (each
/// session gets a real sandbox link, dialled with its token), or the runtime floor.
struct Bed<'a> {
    side: Side,
    server: &'a Server,
    api: Api,
    who: User,
    fake: Option<nightshift_tests::fake_provider::Shared>,
}

/// A session holding exactly `clients.len()` people's sockets (all one person's) and a sandbox
/// link the bench plays.
struct Hot {
    id: String,
    clients: Vec<Ws>,
    link: Link,
    /// The running prompt that sandbox events belong to.
    prompt: String,
    /// The last event number sent on the link.
    n: u64,
}

/// What triggers one event in a fan-out round.
#[derive(Clone, Copy)]
enum Trigger {
    /// `POST /multiplayer/:id/lock` through the dev proxy and the Worker.
    Http,
    /// A `lock.acquire` frame on the session's first person's socket.
    Socket,
    /// One `event` frame (an `agent.text`) on the session's sandbox link.
    Sandbox,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Trigger::Http => "HTTP",
            Trigger::Socket => "person's socket",
            Trigger::Sandbox => "sandbox link",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Trigger::Http => "http",
            Trigger::Socket => "sock",
            Trigger::Sandbox => "sbx",
        }
    }
}

impl Bed<'_> {
    /// A new session with exactly `n` people's sockets, then its sandbox link. Returns it with
    /// the time the `n` connects took (50 at a time, each to its `hello`) and the frames (and
    /// bytes) the sockets got after their `hello` while the others connected.
    async fn session(&self, n: usize, prefix: &str) -> (Hot, Duration, usize, usize) {
        let id = if self.fake.is_some() {
            let body = json!({"title": "hot path", "repository": "/srv/git/bench.git"});
            let (st, s) = self
                .api
                .call("POST", "/sessions", &self.who, Some(body))
                .await;
            assert_eq!(st, 201, "{s}");
            s["id"].as_str().expect("session id").to_string()
        } else {
            self.api.create_session(&self.who, "hot path").await.0
        };
        let t = Instant::now();
        let mut clients = connect_many(&self.api, &self.who, &id, n, prefix).await;
        let connect = t.elapsed();
        // Let the coalesced presence deltas settle, then count them.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let drains = clients
            .iter_mut()
            .map(|ws| drain_counting(ws, Duration::from_millis(1200)));
        let counted = join_all(drains).await;
        let (link, prompt) = match &self.fake {
            Some(fake) => {
                let prompt = self.api.prompt(&self.who, &id, "go").await;
                (dial_sandbox_link(fake, self.server, &id).await, prompt)
            }
            None => (dial_floor_link(self.server, &id).await, "prm_floor".into()),
        };
        let drains = clients
            .iter_mut()
            .map(|ws| drain_counting(ws, Duration::from_millis(300)));
        join_all(drains).await;
        let hot = Hot {
            id,
            clients,
            link,
            prompt,
            n: 0,
        };
        let frames = counted.iter().map(|c| c.0).sum();
        let bytes = counted.iter().map(|c| c.1).sum();
        (hot, connect, frames, bytes)
    }
}

/// The floor's sandbox socket (no token: the floor has no rules).
async fn dial_floor_link(server: &Server, id: &str) -> Link {
    let url = format!(
        "{}/sandbox-link/{id}",
        server.base.replacen("http", "ws", 1)
    );
    tokio_tungstenite::connect_async(url)
        .await
        .expect("the floor's sandbox socket")
        .0
}

/// The like-for-like hot paths (issue 19): fan-out to sessions of exactly `BENCH_FANOUT`
/// (default 100 and 1,000) sockets from each trigger, then single-event throughput at 10 clients.
async fn hot_paths(bed: &Bed<'_>) {
    let sizes: Vec<usize> = std::env::var("BENCH_FANOUT")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 1000]);
    let rounds = env_num("BENCH_ROUNDS", 12).max(1);
    for n in sizes.into_iter().filter(|n| *n > 0) {
        hot_fanout(bed, n, rounds).await;
    }
    let total = env_num("BENCH_SINGLE", 1000).max(1);
    single_commands(bed, total).await;
    single_sandbox_events(bed, total).await;
}

/// One session of exactly `n` sockets; `rounds` events from each trigger in turn, each timed
/// from the sender's send to its `events` frame at each of the `n` clients (the sender's own
/// socket included for the socket trigger). The first 2 rounds warm up and are not counted
/// when there are 6 or more.
async fn hot_fanout(bed: &Bed<'_>, n: usize, rounds: usize) {
    let side = bed.side;
    let (mut hot, connect, frames, bytes) = bed.session(n, &format!("f{n}-")).await;
    let name = format!("connect {n} clients to one session");
    println!(
        "{:<60} {:>8.0} ms total",
        format!("{}{name}", side.prefix()),
        ms(connect)
    );
    record(side, &name, ms(connect), Unit::Ms);
    println!(
        "{:<60} {:>8} frames, {:.1} MB ({:.1} frames per client)",
        format!("{}frames after hello during those connects", side.prefix()),
        frames,
        bytes as f64 / 1e6,
        frames as f64 / n as f64
    );
    let warm = if rounds >= 6 { 2 } else { 0 };
    for trigger in [Trigger::Http, Trigger::Socket, Trigger::Sandbox] {
        let (mut each, mut all) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let marker = format!("{}-{n}-{}", trigger.tag(), round % 100);
            let (t, arrivals) = fire(bed, &mut hot, trigger, &marker).await;
            if round >= warm {
                each.extend(arrivals.iter().map(|a| ms(*a - t)));
                all.push(ms(arrivals.iter().copied().max().unwrap_or(t) - t));
            }
        }
        let what = trigger.name();
        report_on(
            side,
            &format!("one event -> all {n} clients, {what}"),
            &mut all,
        );
        report_on(
            side,
            &format!("one event -> each of {n} clients, {what}"),
            &mut each,
        );
    }
}

/// Sends one event by `trigger` carrying `marker`; returns the send's instant and the instant
/// each client got it.
async fn fire(
    bed: &Bed<'_>,
    hot: &mut Hot,
    trigger: Trigger,
    marker: &str,
) -> (Instant, Vec<Instant>) {
    use futures_util::SinkExt;
    match trigger {
        Trigger::Http => {
            let path = format!("/multiplayer/{}/lock", hot.id);
            let body = json!({"resource": marker, "ttl_ms": 600000});
            let t = Instant::now();
            let waits = hot.clients.iter_mut().map(|ws| wait_broadcast(ws, marker));
            let send = bed.api.call("POST", &path, &bed.who, Some(body));
            let (arrivals, (st, v)) = tokio::join!(join_all(waits), send);
            assert_eq!(st, 200, "{v}");
            (t, arrivals)
        }
        Trigger::Socket => {
            let frame = json!({"type": "lock.acquire", "resource": marker, "ttl_ms": 600000});
            let frame = frame.to_string();
            let t = Instant::now();
            hot.clients[0].send_text(&frame).await;
            let waits = hot.clients.iter_mut().map(|ws| wait_broadcast(ws, marker));
            (t, join_all(waits).await)
        }
        Trigger::Sandbox => {
            hot.n += 1;
            let frame = event_frame(hot.n, &hot.prompt, marker);
            let t = Instant::now();
            hot.link
                .send(frame)
                .await
                .expect("send on the sandbox link");
            let waits = hot.clients.iter_mut().map(|ws| wait_broadcast(ws, marker));
            let arrivals = join_all(waits).await;
            link_ack(&mut hot.link, hot.n).await;
            (t, arrivals)
        }
    }
}

/// One unbatched sandbox event: `agent.text` number `n` of `prompt`, its text `text`.
fn event_frame(n: u64, prompt: &str, text: &str) -> tokio_tungstenite::tungstenite::Message {
    let v = json!({"type": "event", "n": n, "event": {"kind": "agent.text", "prompt": prompt, "text": text}});
    tokio_tungstenite::tungstenite::Message::Text(v.to_string().into())
}

const EVENTS_FRAME: &str = "\"type\":\"events\"";

/// Waits for an `events` frame whose text holds `"marker"` (unparsed: the client's cost stays
/// small); an `error` frame panics.
async fn wait_broadcast(ws: &mut Ws, marker: &str) -> Instant {
    let needle = format!("\"{marker}\"");
    loop {
        let Some(t) = ws.next_raw(Duration::from_secs(30)).await else {
            panic!("socket closed or quiet for 30 s while waiting for {marker}");
        };
        if t.contains(EVENTS_FRAME) && t.contains(&needle) {
            return Instant::now();
        }
        assert!(
            !t.contains("\"type\":\"error\""),
            "the server answered: {t}"
        );
    }
}

/// Reads the sandbox link until the `ack` of event `n`; an `error` frame panics.
async fn link_ack(link: &mut Link, n: u64) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), link.next()).await;
        let Ok(Some(Ok(msg))) = next else {
            panic!("the sandbox link closed or was quiet for 30 s before the ack of {n}");
        };
        if let Message::Text(t) = msg {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
            if v["type"] == "ack" && v["n"].as_u64() >= Some(n) {
                return;
            }
            assert_ne!(v["type"], "error", "the sandbox link answered: {t}");
        }
    }
}

/// Reads `ws` until `total` events whose text holds `needle` have arrived in `events` frames;
/// returns when the last did.
async fn count_events(ws: &mut Ws, needle: &str, total: usize) -> Instant {
    let mut got = 0;
    while got < total {
        let Some(t) = ws.next_raw(Duration::from_secs(60)).await else {
            panic!("socket closed or quiet for 60 s after {got} of {total} events");
        };
        if t.contains(EVENTS_FRAME) {
            got += t.matches(needle).count();
        }
    }
    Instant::now()
}

/// Sends `lock.acquire` number `i` (with a `ref`) on `ws` and reads until its `ack`; returns how
/// many `lock.acquired` events arrived on `ws` meanwhile. Any other answer panics.
async fn command_acked(ws: &mut Ws, i: usize) -> usize {
    let r = format!("cmd{i}");
    let frame = json!({"type": "lock.acquire", "ref": r, "resource": format!("r{}", i % 50), "ttl_ms": 600000});
    ws.send_text(&frame.to_string()).await;
    let needle = format!("\"ref\":\"{r}\"");
    let mut seen = 0;
    loop {
        let Some(t) = ws.next_raw(Duration::from_secs(30)).await else {
            panic!("socket closed or quiet for 30 s waiting for the ack of {r}");
        };
        if t.contains(EVENTS_FRAME) {
            seen += t.matches(LOCK_EVENT).count();
        } else if t.contains(&needle) {
            assert!(t.contains("\"type\":\"ack\""), "{r} was answered: {t}");
            return seen;
        }
    }
}

const LOCK_EVENT: &str = "\"lock.acquired\"";
const TEXT_EVENT: &str = "\"agent.text\"";

/// Warm-ups before each throughput figure (not counted).
const SINGLE_WARM: usize = 20;

/// Single-event throughput, client commands: in a session of exactly 10 sockets, the first sends
/// `total` `lock.acquire` frames one at a time, each on the previous one's `ack`. Rate: `total`
/// over the time from the first send to the last event at all 10 clients (the sender included);
/// beside it, each command's send -> ack.
async fn single_commands(bed: &Bed<'_>, total: usize) {
    let (mut hot, ..) = bed.session(10, "cmd").await;
    for i in 0..SINGLE_WARM {
        command_acked(&mut hot.clients[0], i).await;
    }
    let quiet = Duration::from_millis(200);
    join_all(hot.clients.iter_mut().map(|ws| drain_counting(ws, quiet))).await;
    let profile = Profiler::start(bed).await;
    let (first, rest) = hot.clients.split_at_mut(1);
    let sender = &mut first[0];
    let t0 = Instant::now();
    let send = async {
        let mut acks = Vec::with_capacity(total);
        let mut own = 0;
        for i in SINGLE_WARM..SINGLE_WARM + total {
            let t = Instant::now();
            own += command_acked(sender, i).await;
            acks.push(ms(t.elapsed()));
        }
        // The sender's own copies: normally all in by its last ack; if not, read on.
        let done = if own >= total {
            Instant::now()
        } else {
            count_events(sender, LOCK_EVENT, total - own).await
        };
        (acks, done)
    };
    let receive = join_all(
        rest.iter_mut()
            .map(|ws| count_events(ws, LOCK_EVENT, total)),
    );
    let ((mut acks, done), arrivals) = tokio::join!(send, receive);
    let last = arrivals.into_iter().fold(done, Instant::max);
    single_report(bed.side, "client commands", total, last - t0, &mut acks);
    if let Some(p) = profile {
        p.finish(bed.side, "client commands", total).await;
    }
}

/// Single-event throughput, sandbox events: in a session of exactly 10 sockets, the sandbox link
/// sends `total` single `event` frames (one `agent.text` each, unbatched), each on the previous
/// one's `ack`. Rate: `total` over the time from the first send to the last event at all 10
/// clients; beside it, each event's send -> ack.
async fn single_sandbox_events(bed: &Bed<'_>, total: usize) {
    use futures_util::SinkExt;
    let (mut hot, ..) = bed.session(10, "sbx").await;
    for _ in 0..SINGLE_WARM {
        hot.n += 1;
        let frame = event_frame(hot.n, &hot.prompt, "warm");
        hot.link
            .send(frame)
            .await
            .expect("send on the sandbox link");
        link_ack(&mut hot.link, hot.n).await;
    }
    let quiet = Duration::from_millis(200);
    join_all(hot.clients.iter_mut().map(|ws| drain_counting(ws, quiet))).await;
    let profile = Profiler::start(bed).await;
    let Hot {
        clients,
        link,
        prompt,
        n,
        ..
    } = &mut hot;
    let t0 = Instant::now();
    let send = async {
        let mut acks = Vec::with_capacity(total);
        for k in 0..total {
            *n += 1;
            let frame = event_frame(*n, prompt, &format!("single {k}"));
            let t = Instant::now();
            link.send(frame).await.expect("send on the sandbox link");
            link_ack(link, *n).await;
            acks.push(ms(t.elapsed()));
        }
        acks
    };
    let receive = join_all(
        clients
            .iter_mut()
            .map(|ws| count_events(ws, TEXT_EVENT, total)),
    );
    let (mut acks, arrivals) = tokio::join!(send, receive);
    let last = arrivals.into_iter().max().unwrap_or_else(Instant::now);
    single_report(bed.side, "sandbox events", total, last - t0, &mut acks);
    if let Some(p) = profile {
        p.finish(bed.side, "sandbox events", total).await;
    }
}

/// Prints (and keeps) a single-event throughput figure and its send -> ack percentiles.
fn single_report(side: Side, what: &str, total: usize, took: Duration, acks: &mut [f64]) {
    let rate = total as f64 / took.as_secs_f64();
    let name = format!("single {what}/s at 10 clients (next on ack)");
    println!(
        "{:<60} {:>8.0} events/s  ({total} events, each stored then sent to all 10)",
        format!("{}{name}", side.prefix()),
        rate
    );
    record(side, &name, rate, Unit::PerSec);
    report_on(side, &format!("single {what}: send -> ack"), acks);
}

/// Waits until a repository's pool holds `n` ready sandboxes of its latest image.
async fn pool_full(api: &Api, who: &User, name: &str) {
    let t = Instant::now();
    loop {
        let (_, v) = api
            .call("GET", &format!("/repositories/{name}"), who, None)
            .await;
        if nightshift_tests::pool_ready(&v) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "pool never filled: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a person waits for in one prompt of a new session: to the sandbox's `ready`, to the
/// first agent event on their screen, and to `prompt.finished`.
#[derive(Default)]
struct Waits {
    ready: Vec<f64>,
    first: Vec<f64>,
    done: Vec<f64>,
}

impl Waits {
    fn report(&mut self, label: &str) {
        report(&format!("{label}: -> ready"), &mut self.ready);
        report(&format!("{label}: -> first agent event"), &mut self.first);
        report(&format!("{label}: -> prompt.finished"), &mut self.done);
    }
}

/// Sends a prompt and records the waits after it. A sandbox already ready when the prompt
/// is sent (a follow-up, or typing that claimed one) counts 0 ms to `ready`.
async fn measure_prompt(api: &Api, who: &User, ws: &mut Ws, id: &str, text: &str, w: &mut Waits) {
    // Everything already sent belongs to the time before the prompt.
    drain(ws, Duration::from_millis(30)).await;
    let mark = ws.last_seq;
    let t = Instant::now();
    let prompt = api.prompt(who, id, text).await;
    wait_prompt(ws, t, mark, &prompt, w).await;
}

/// Waits for `prompt` (sent at `t`, after the event `mark`) to finish; records its waits.
async fn wait_prompt(ws: &mut Ws, t: Instant, mark: u64, prompt: &str, w: &mut Waits) {
    let ours = |e: &serde_json::Value| e["prompt"] == prompt || e["id"] == prompt;
    let (mut t_ready, mut t_first) = (None, None);
    loop {
        let Some(v) = ws.next(Duration::from_secs(180)).await else {
            panic!("the socket closed or went quiet before {prompt} finished");
        };
        let now = Instant::now();
        let events = v["events"].as_array().cloned().unwrap_or_default();
        for e in &events {
            let kind = e["type"].as_str().unwrap_or("");
            if kind == "sandbox.status" && e["stage"] == "ready" && e["seq"].as_u64() > Some(mark) {
                t_ready.get_or_insert(now);
            }
            if kind.starts_with("agent.") && ours(e) {
                t_first.get_or_insert(now);
            }
            if kind == "prompt.finished" && ours(e) {
                let first = t_first.unwrap_or(now);
                w.ready.push(t_ready.map(|r| ms(r - t)).unwrap_or(0.0));
                w.first.push(ms(first - t));
                w.done.push(ms(now - t));
                return;
            }
        }
    }
}

/// Fast starts, as a person feels them: for new sessions only (no prompt is ever discarded),
/// from the prompt to the sandbox's `ready`, to the first agent event and to `prompt.finished`,
/// on a one-file repository and on one with a few hundred files of real content.
async fn pools() {
    let turns: Vec<serde_json::Value> = (0..400)
        .map(|i| json!({"text": format!("ok {i}")}))
        .collect();
    // `BENCH_ISOLATION=none` measures the same paths without containment (what it costs).
    let isolation = std::env::var("BENCH_ISOLATION").unwrap_or_default();
    let provider_env: Vec<(&str, &str)> = match isolation.as_str() {
        "none" => vec![("NIGHTSHIFT_ISOLATION", "none")],
        _ => Vec::new(),
    };
    let compute = Compute::start(&json!({ "turns": turns }), &provider_env).await;
    let owned = compute.vars();
    let mut vars: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    vars.push(("SANDBOX_GRACE_MS", "300"));
    vars.push(("HEARTBEAT_TIMEOUT_MS", "900000"));
    let server = Server::start(&vars).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    println!("Nightshift fast-start benchmark (local provider, real OpenCode, scripted model with zero think time): new sessions only, prompt -> ready / first agent event / prompt.finished");
    let n = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5usize);
    println!(
        "isolation: {}",
        if isolation == "none" {
            "none (NIGHTSHIFT_ISOLATION=none)"
        } else {
            "bubblewrap, own network, egress and model proxy"
        }
    );
    // `BENCH_REPOS=small` runs the one-file repository only.
    let only_small = std::env::var("BENCH_REPOS").as_deref() == Ok("small");
    let mut repos = vec![("1 file", compute.remote_repo("small"))];
    if !only_small {
        repos.push(("real content", compute.remote_repo_with_content("large")));
    }
    for (kind, remote) in repos {
        let files = nightshift_tests::git(&remote, &["ls-tree", "-r", "--name-only", "main"])
            .lines()
            .count();
        println!("-- repository: {kind} ({files} files)");
        let (warm, cold) = (format!("warm{}", files), format!("cold{}", files));
        for (name, size) in [(&warm, 1), (&cold, 0)] {
            let body = json!({"name": name, "clone_url": remote, "setup": ["echo warmed > .warm"], "pool_size": size});
            let (st, v) = api.call("POST", "/repositories", &ada, Some(body)).await;
            assert_eq!(st, 201, "{v}");
        }
        let (mut claim, mut typing, mut image, mut clone, mut restore, mut follow) = (
            Waits::default(),
            Waits::default(),
            Waits::default(),
            Waits::default(),
            Waits::default(),
            Waits::default(),
        );
        for i in 0..n {
            // (a) A prompt in a new session of a repository with a warm pool.
            pool_full(&api, &ada, &warm).await;
            let (id, _) = api
                .create_session_on(&ada, "claim", std::path::Path::new(&warm))
                .await;
            let mut ws = api.connect(&ada, &id, "bench", 0).await;
            measure_prompt(&api, &ada, &mut ws, &id, &format!("claim {i}"), &mut claim).await;
            // The same sandbox's follow-up, for comparison.
            measure_prompt(
                &api,
                &ada,
                &mut ws,
                &id,
                &format!("follow-up {i}"),
                &mut follow,
            )
            .await;
            end_sandboxes(&compute, &id).await;

            // (b) Typing claims a sandbox; the prompt is sent after a second of typing.
            pool_full(&api, &ada, &warm).await;
            let (id, _) = api
                .create_session_on(&ada, "typing", std::path::Path::new(&warm))
                .await;
            let mut ws = api.connect(&ada, &id, "bench", 0).await;
            ws.send(json!({"type": "typing", "typing": true})).await;
            tokio::time::sleep(Duration::from_millis(1000)).await;
            measure_prompt(&api, &ada, &mut ws, &id, &format!("typed {i}"), &mut typing).await;
            end_sandboxes(&compute, &id).await;

            // (c) cold from the latest image, (d) cold from a fresh clone.
            for (repo, out) in [
                (std::path::PathBuf::from(&cold), &mut image),
                (remote.clone(), &mut clone),
            ] {
                // The warm pool's refill boots a sandbox too: measure on a quiet machine.
                pool_full(&api, &ada, &warm).await;
                let (id, _) = api.create_session_on(&ada, "cold", &repo).await;
                let mut ws = api.connect(&ada, &id, "bench", 0).await;
                measure_prompt(&api, &ada, &mut ws, &id, &format!("cold {i}"), out).await;
                end_sandboxes(&compute, &id).await;
            }

            // (e) Restore: a new sandbox from the session's snapshot after the first one exited.
            pool_full(&api, &ada, &warm).await;
            let (id, _) = api.create_session_on(&ada, "restore", &remote).await;
            let mut ws = api.connect(&ada, &id, "bench", 0).await;
            let p = api.prompt(&ada, &id, &format!("turn {i}")).await;
            ws.finished(&p).await;
            let t = Instant::now();
            loop {
                let (_, v) = api
                    .call("GET", &format!("/sessions/{id}"), &ada, None)
                    .await;
                if v["snapshots"].as_array().is_some_and(|s| !s.is_empty()) {
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(60), "no snapshot: {v}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            end_sandboxes(&compute, &id).await;
            ws.event_within(Duration::from_secs(60), "sandbox.status", |e| {
                e["stage"] == "lost"
            })
            .await;
            measure_prompt(
                &api,
                &ada,
                &mut ws,
                &id,
                &format!("restored {i}"),
                &mut restore,
            )
            .await;
            end_sandboxes(&compute, &id).await;
        }
        claim.report("(a) claim from a warm pool");
        typing.report("(b) typing, then prompt (after 1 s)");
        image.report("(c) cold from the latest image");
        clone.report("(d) cold from a fresh clone");
        restore.report("(e) restore from a snapshot");
        follow.report("follow-up in the same sandbox");
        // Keep the next repository's figures free of this one's pool.
        for name in [&warm, &cold] {
            let body = json!({"pool_size": 0});
            api.call("PATCH", &format!("/repositories/{name}"), &ada, Some(body))
                .await;
        }
    }
}

/// Terminates every sandbox of a session at the provider (the bench keeps the machine quiet).
async fn end_sandboxes(compute: &Compute, session: &str) {
    let (_, v) = compute
        .provider("GET", &format!("/v1/sandboxes?session_id={session}"), None)
        .await;
    for s in v["sandboxes"].as_array().cloned().unwrap_or_default() {
        if let Some(id) = s["id"].as_str() {
            compute
                .provider("POST", &format!("/v1/sandboxes/{id}/terminate"), None)
                .await;
        }
    }
}

/// Background agents: the scheduler's decisions per second (the core, in process), and
/// spawn -> child running through the API (echo runner: no compute, the control plane only).
async fn background() {
    use nightshift_core::background::{Limits, Scheduler, Spawn, Status};
    println!("Nightshift background-agent benchmark");
    let limits = Limits {
        max_concurrent: 64,
        max_per_user: 16,
        max_per_session: 8,
        max_queued: 1000,
        max_depth: 3,
        max_children: 1000,
    };
    // The shard keeps every agent it ever ran, as production does (the model's `AgentsKept`):
    // nothing is pruned. Decisions/s are reported per window of shard sizes, since `fits`,
    // `queued` and `schedule` scan every agent. `BENCH_AGENTS` (default 20,000) spawns.
    let total = env_num("BENCH_AGENTS", 20_000) as u64;
    let mut sizes: Vec<u64> = [1_000u64, 2_000, 5_000, 10_000, 20_000, 50_000]
        .into_iter()
        .filter(|&x| x < total)
        .collect();
    sizes.push(total);
    let mut s = Scheduler::new(limits);
    let t = Instant::now();
    let mut decisions = 0u64;
    let (mut window_start, mut window_decisions, mut from) = (Instant::now(), 0u64, 0u64);
    let mut next_size = sizes.iter().copied().peekable();
    for i in 0..total {
        let id = format!("a{i}");
        let ts = s
            .spawn(Spawn {
                id: id.clone(),
                user: format!("u{}", i % 50),
                parent: Some(format!("ses_{}", i % 200)),
                parent_depth: 1,
            })
            .unwrap_or_default();
        let mut count = ts.len() as u64;
        // Keep the shard busy: whatever starts runs and finishes, which starts the next.
        // (The started ones come from the transitions: the bench itself scans nothing.)
        let mut started: Vec<String> = ts
            .into_iter()
            .filter(|x| x.to == Status::Starting)
            .map(|x| x.id)
            .collect();
        while let Some(r) = started.pop() {
            for to in [Status::Running, Status::Completed] {
                if let Ok(more) = s.transition(&r, to) {
                    count += more.len() as u64;
                    started.extend(
                        more.into_iter()
                            .filter(|x| x.to == Status::Starting)
                            .map(|x| x.id),
                    );
                }
            }
        }
        decisions += count;
        window_decisions += count;
        if Some(&(i + 1)) == next_size.peek() {
            let secs = window_start.elapsed().as_secs_f64();
            println!(
                "{:<60} {:>8.0} decisions/s",
                format!(
                    "scheduler decisions, shard of {from}..{} agents kept",
                    i + 1
                ),
                window_decisions as f64 / secs
            );
            from = i + 1;
            window_start = Instant::now();
            window_decisions = 0;
            next_size.next();
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{:<60} {:>8.0} decisions/s  ({decisions} transitions over {total} spawns by 50 users, 64 running at most, nothing pruned, in memory: no storage)",
        "scheduler decisions (core, one shard, overall)",
        decisions as f64 / secs
    );
    let kept = s.agents.len();
    assert_eq!(kept as u64, total, "every agent is kept");

    let server = Server::start(&[
        ("PROMPT_RUNNER", "echo"),
        ("ECHO_RUN_MS", "600000"),
        ("BG_MAX_CONCURRENT", "1000"),
        ("BG_MAX_PER_USER", "1000"),
        // The deployment-wide budget (32 by default) would queue the 33rd spawn.
        ("BG_MAX_GLOBAL", "1000"),
    ])
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let mut spawn = Vec::new();
    for i in 0..40 {
        let t = Instant::now();
        let (st, v) = api
            .call(
                "POST",
                "/background/spawn",
                &ada,
                Some(json!({"prompt": format!("agent {i}")})),
            )
            .await;
        assert_eq!((st, v["status"].as_str()), (201, Some("running")), "{v}");
        spawn.push(ms(t.elapsed()));
    }
    report(
        "spawn -> child running (session created, prompt queued)",
        &mut spawn,
    );
}

/// Waits until the session lists a snapshot (taken after its prompt finished).
async fn wait_snapshot(api: &Api, who: &User, id: &str) {
    let t = Instant::now();
    loop {
        let (_, v) = api.call("GET", &format!("/sessions/{id}"), who, None).await;
        if v["snapshots"].as_array().is_some_and(|s| !s.is_empty()) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no snapshot: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Restore as a person feels it, with the default settings (no `SANDBOX_GRACE_MS`,
/// `SANDBOX_HEARTBEAT_TIMEOUT_MS` or `HEARTBEAT_TIMEOUT_MS` override; the person's socket
/// pings as the app's would): after a first prompt and its snapshot, the sandbox dies
/// (terminated at the provider), and the person sends a follow-up at once. A follow-up the
/// session fails with `sandbox_lost … send it again` is sent again at once, and that resend is
/// part of the wait. Clock: from the provider's answer to the terminate (the sandbox is gone)
/// to the follow-up's first agent event on the person's socket.
async fn restore_from_death() {
    let turns: Vec<serde_json::Value> = (0..100)
        .map(|i| json!({"text": format!("ok {i}")}))
        .collect();
    let compute = Compute::start(&json!({ "turns": turns }), &[]).await;
    let owned = compute.vars();
    let vars: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(&vars).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let remote = compute.remote_repo("death");
    let n = bench_n(3);
    println!("Restore after the sandbox dies (default settings: 10 s grace), follow-up sent at once, new sessions on a one-file repository");
    let (mut noticed, mut ready, mut first, mut done) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut resent, mut restored) = (0usize, 0usize);
    for i in 0..n {
        let (id, _) = api.create_session_on(&ada, "death", &remote).await;
        let mut ws = api
            .connect(&ada, &id, "bench", 0)
            .await
            .pinging(Duration::from_secs(10));
        let p = api.prompt(&ada, &id, &format!("turn {i}")).await;
        ws.finished(&p).await;
        wait_snapshot(&api, &ada, &id).await;
        drain(&mut ws, Duration::from_millis(30)).await;
        let mark = ws.last_seq;
        end_sandboxes(&compute, &id).await;
        let t = Instant::now();
        let text = format!("after death {i}");
        let mut prompt = api.prompt(&ada, &id, &text).await;
        let (mut t_lost, mut t_ready, mut t_first) = (None, None, None);
        let mut was_restored = false;
        'wait: loop {
            let Some(v) = ws.next(Duration::from_secs(180)).await else {
                panic!("the socket closed or went quiet before the follow-up finished");
            };
            let now = Instant::now();
            for e in v["events"].as_array().cloned().unwrap_or_default() {
                let kind = e["type"].as_str().unwrap_or("");
                let after = e["seq"].as_u64() > Some(mark);
                if kind == "sandbox.status" && after && e["stage"] == "lost" {
                    t_lost.get_or_insert(now);
                }
                if kind == "sandbox.status" && after && e["stage"] == "ready" {
                    t_ready.get_or_insert(now);
                }
                if kind == "sandbox.status"
                    && after
                    && e["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("restored snapshot"))
                {
                    was_restored = true;
                }
                if kind.starts_with("agent.") && e["prompt"] == prompt.as_str() {
                    t_first.get_or_insert(now);
                }
                if kind == "prompt.finished" && e["id"] == prompt.as_str() {
                    let reason = e["reason"].as_str().unwrap_or("");
                    if e["ok"] == false && reason.contains("send it again") {
                        // What the person is told to do: send it again, at once.
                        resent += 1;
                        prompt = api.prompt(&ada, &id, &text).await;
                        continue;
                    }
                    assert_eq!(e["ok"], true, "the follow-up failed: {e}");
                    noticed.push(t_lost.map(|l| ms(l - t)).unwrap_or(f64::NAN));
                    ready.push(t_ready.map(|r| ms(r - t)).unwrap_or(f64::NAN));
                    first.push(ms(t_first.unwrap_or(now) - t));
                    done.push(ms(now - t));
                    break 'wait;
                }
            }
        }
        restored += usize::from(was_restored);
        end_sandboxes(&compute, &id).await;
    }
    report("death -> session shows `lost`", &mut noticed);
    report("death -> new sandbox ready", &mut ready);
    report("death -> follow-up's first agent event", &mut first);
    report("death -> follow-up's prompt.finished", &mut done);
    println!("  follow-ups failed with `send it again` and resent: {resent} of {n}; new sandbox restored from the snapshot: {restored} of {n}");
}

/// Cold starts after a burst drained the pool, while it refills beside them: `BENCH_POOL`
/// (default 2) sessions of a registered repository with a full pool each send their first
/// prompt at once (each claims a pooled sandbox), then a new session of the same repository
/// sends its first prompt: it starts cold from the latest image while the pool's refill boots
/// `BENCH_POOL` sandboxes on the same machine. Clocks from each prompt's send.
async fn cold_while_refilling() {
    let turns: Vec<serde_json::Value> = (0..400)
        .map(|i| json!({"text": format!("ok {i}")}))
        .collect();
    let compute = Compute::start(&json!({ "turns": turns }), &[]).await;
    let owned = compute.vars();
    let vars: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(&vars).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let remote = compute.remote_repo("refill");
    let pool = env_num("BENCH_POOL", 2);
    let n = bench_n(3);
    let name = "refill";
    let body = json!({"name": name, "clone_url": remote, "setup": ["echo warmed > .warm"], "pool_size": pool});
    let (st, v) = api.call("POST", "/repositories", &ada, Some(body)).await;
    assert_eq!(st, 201, "{v}");
    println!("Cold start while the pool refills: a burst of {pool} first prompts drains a pool of {pool}, then one more new session's first prompt");
    let (mut burst, mut cold) = (Waits::default(), Waits::default());
    let (mut went_cold, mut booting_seen) = (0usize, 0usize);
    for i in 0..n {
        pool_full(&api, &ada, name).await;
        let mut ids = Vec::new();
        let mut socks = Vec::new();
        for _ in 0..=pool {
            let (id, _) = api
                .create_session_on(&ada, "refill", std::path::Path::new(name))
                .await;
            let mut ws = api.connect(&ada, &id, "bench", 0).await;
            drain(&mut ws, Duration::from_millis(30)).await;
            ids.push(id);
            socks.push(ws);
        }
        let (mut extra_ws, mut burst_ws) = {
            let last = socks.pop().expect("extra socket");
            (last, socks)
        };
        let extra_id = ids[pool].clone();
        let marks: Vec<u64> = burst_ws.iter().map(|w| w.last_seq).collect();
        // The burst: every pooled sandbox claimed at once.
        let t_burst = Instant::now();
        let text = format!("burst {i}");
        let prompts = join_all(ids[..pool].iter().map(|id| api.prompt(&ada, id, &text))).await;
        // Then a new session's first prompt, while the refill runs.
        let mark = extra_ws.last_seq;
        let t = Instant::now();
        let p = api
            .prompt(&ada, &extra_id, &format!("after the burst {i}"))
            .await;
        let (_, r) = api
            .call("GET", &format!("/repositories/{name}"), &ada, None)
            .await;
        if r["pool"]["booting"].as_u64().unwrap_or(0) > 0 {
            booting_seen += 1;
        }
        let mut per = (0..pool).map(|_| Waits::default()).collect::<Vec<_>>();
        let bursts = burst_ws
            .iter_mut()
            .zip(per.iter_mut())
            .zip(prompts.iter().zip(marks.iter()))
            .map(|((ws, w), (p, m))| wait_prompt(ws, t_burst, *m, p, w));
        tokio::join!(
            join_all(bursts),
            wait_prompt(&mut extra_ws, t, mark, &p, &mut cold)
        );
        for w in per {
            burst.ready.extend(w.ready);
            burst.first.extend(w.first);
            burst.done.extend(w.done);
        }
        let claimed = extra_ws.seen.iter().any(|e| {
            e["type"] == "sandbox.status"
                && e["seq"].as_u64() > Some(mark)
                && e["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("claimed a warm sandbox"))
        });
        if !claimed {
            went_cold += 1;
        }
        for id in &ids {
            end_sandboxes(&compute, id).await;
        }
    }
    burst.report(&format!("burst of {pool} claims (pool of {pool})"));
    cold.report("next new session, cold while the pool refills");
    println!(
        "  the next session started cold in {went_cold} of {n} runs; the pool was refilling (booting > 0) right after its prompt in {booting_seen} of {n}"
    );
}

/// A session played by the bench as its sandbox (the fake provider checks signatures), with
/// `viewers` people's sockets connected at the head of the log.
struct Played {
    id: String,
    prompt: String,
    link: Link,
    viewers: Vec<Ws>,
    /// The last event number sent on the link.
    n: u64,
}

async fn played_session(
    server: &Server,
    fake: &nightshift_tests::fake_provider::Shared,
    who: &User,
    viewers: usize,
) -> Played {
    let api = server.client();
    let (st, s) = api
        .call(
            "POST",
            "/sessions",
            who,
            Some(json!({"title": "played", "repository": "/srv/git/bench.git"})),
        )
        .await;
    assert_eq!(st, 201, "{s}");
    let id = s["id"].as_str().expect("id").to_string();
    let mut socks = connect_many(&api, who, &id, viewers, "v").await;
    let prompt = api.prompt(who, &id, "go").await;
    let link = dial_sandbox_link(fake, server, &id).await;
    let drains = socks
        .iter_mut()
        .map(|ws| drain(ws, Duration::from_millis(300)));
    join_all(drains).await;
    Played {
        id,
        prompt,
        link,
        viewers: socks,
        n: 0,
    }
}

/// Numbers `texts` as the next agent.text events and sends them as one `batch` frame.
fn batch_frame(p: &mut Played, texts: &[String]) -> tokio_tungstenite::tungstenite::Message {
    let events: Vec<serde_json::Value> = texts
        .iter()
        .map(|t| {
            p.n += 1;
            json!({"n": p.n, "event": {"kind": "agent.text", "prompt": p.prompt, "text": t}})
        })
        .collect();
    tokio_tungstenite::tungstenite::Message::Text(
        json!({"type": "batch", "events": events})
            .to_string()
            .into(),
    )
}

/// The markers `@@k@@` a frame carries.
fn markers(t: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = t;
    while let Some(i) = rest.find("@@") {
        rest = &rest[i + 2..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if !digits.is_empty() && rest[digits.len()..].starts_with("@@") {
            if let Ok(k) = digits.parse() {
                out.push(k);
            }
            rest = &rest[digits.len() + 2..];
        }
    }
    out
}

/// Agent output to 10, 100 and 1,000 viewers as the real supervisor sends it: one `batch`
/// frame every 50 ms holding `BENCH_BATCH` (default 1) `agent.text` events of ~50 ms of tokens.
/// Clock: from the bench (as the sandbox) sending a frame on its link to that frame's text
/// arriving at the last of the session's viewers (and, separately, at each viewer).
async fn viewers() {
    use futures_util::{SinkExt, StreamExt};
    use nightshift_tests::fake_provider;
    let (fake, url) = fake_provider::start().await;
    let server = Server::start(&[
        ("PROMPT_RUNNER", "sandbox"),
        ("PROVIDER_URL", &url),
        ("PROVIDER_SECRET", fake_provider::SECRET),
        ("CONTROL_URL", "{self}"),
        ("MAX_CLIENTS_PER_USER", "5000"),
        ("HEARTBEAT_TIMEOUT_MS", "900000"),
    ])
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let rounds = bench_n(100);
    let per_batch = env_num("BENCH_BATCH", 1).max(1);
    println!("Agent output fan-out: one batch of {per_batch} agent.text every 50 ms, {rounds} batches, each session with only its viewers connected");
    for n in [10usize, 100, 1000] {
        let mut p = played_session(&server, &fake, &ada, n).await;
        let frames: Vec<_> = (0..rounds)
            .map(|k| {
                let texts: Vec<String> = (0..per_batch)
                    .map(|j| {
                        if j == 0 {
                            format!("@@{k}@@ the agent writes a few tokens ")
                        } else {
                            format!("and a few more tokens {j} ")
                        }
                    })
                    .collect();
                batch_frame(&mut p, &texts)
            })
            .collect();
        let (mut sink, mut acks) = p.link.split();
        // Acknowledgements are read (and dropped) while the batches go out.
        let acker = tokio::spawn(async move { while let Some(Ok(_)) = acks.next().await {} });
        let start = Instant::now();
        let sender = async {
            let mut sent = Vec::with_capacity(rounds);
            for (k, f) in frames.into_iter().enumerate() {
                tokio::time::sleep_until((start + Duration::from_millis(50 * k as u64)).into())
                    .await;
                sent.push(Instant::now());
                sink.send(f).await.expect("send");
            }
            sent
        };
        let receivers = join_all(p.viewers.iter_mut().map(|ws| async move {
            let mut at: Vec<Option<Instant>> = vec![None; rounds];
            let mut got = 0;
            while got < rounds {
                let Some(t) = ws.next_raw(Duration::from_secs(30)).await else {
                    break;
                };
                let now = Instant::now();
                for k in markers(&t) {
                    if k < rounds && at[k].is_none() {
                        at[k] = Some(now);
                        got += 1;
                    }
                }
            }
            at
        }));
        let (sent, arrivals) = tokio::join!(sender, receivers);
        acker.abort();
        let (mut last, mut each) = (Vec::new(), Vec::new());
        let mut missing = 0usize;
        for (k, s) in sent.iter().enumerate() {
            let mut worst: Option<Instant> = None;
            for a in &arrivals {
                match a[k] {
                    Some(t) => {
                        each.push(ms(t - *s));
                        worst = Some(worst.map_or(t, |w| w.max(t)));
                    }
                    None => missing += 1,
                }
            }
            if let Some(w) = worst {
                last.push(ms(w - *s));
            }
        }
        report_first(
            &format!("agent output -> all {n} viewers (last)"),
            &mut last,
        );
        report(&format!("agent output -> each of {n} viewers"), &mut each);
        if missing > 0 {
            println!("  {missing} (viewer, batch) receipts missing");
        }
        drop(p.viewers);
    }
}

/// Sends `total` agent.text events of `len`-character texts in batches of 200 (as fast as the
/// session takes them) and waits for the last acknowledgement.
async fn fill_log(p: &mut Played, total: usize, len: usize) {
    use futures_util::{SinkExt, StreamExt};
    let pad = "x".repeat(len.saturating_sub(12));
    let mut left = total;
    while left > 0 {
        let k = left.min(200);
        let texts: Vec<String> = (0..k).map(|j| format!("tok {j:>5} {pad} ")).collect();
        let f = batch_frame(p, &texts);
        p.link.send(f).await.expect("send");
        left -= k;
    }
    while let Some(Ok(m)) = p.link.next().await {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            let v: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
            if v["type"] == "ack" && v["n"].as_u64() == Some(p.n) {
                break;
            }
        }
    }
}

/// Connects with `since` and reads until the socket holds every event up to the head the
/// hello names; returns (connect -> hello, connect -> caught up, bytes of events).
async fn catch_up(api: &Api, who: &User, id: &str, client: &str, since: u64) -> (f64, f64, usize) {
    let t = Instant::now();
    let mut ws = api.connect(who, id, client, since).await;
    let mut head = None;
    let mut t_hello = 0.0;
    let mut bytes = 0usize;
    loop {
        let Some(raw) = ws.next_raw(Duration::from_secs(60)).await else {
            panic!("the socket closed while catching up");
        };
        bytes += raw.len();
        let v: serde_json::Value = serde_json::from_str(&raw).unwrap_or_default();
        if v["type"] == "hello" {
            t_hello = ms(t.elapsed());
            head = v["seq"].as_u64();
            if head <= Some(since) {
                break;
            }
        }
        if v["type"] == "events" {
            let last = v["events"]
                .as_array()
                .and_then(|e| e.last())
                .and_then(|e| e["seq"].as_u64());
            if head.is_some() && last >= head {
                break;
            }
        }
    }
    let done = ms(t.elapsed());
    ws.close().await;
    (t_hello, done, bytes)
}

/// A reload of a busy session: a session with `BENCH_EVENTS` (default 20,000) agent events; a
/// client connecting with since=0 until it holds the whole history (what opening or reloading
/// the page costs), and one resuming with since=head-100 (a dropped connection). Clock: from
/// the socket connect to the frame holding the head event. Then the same after the control
/// plane restarts (the session's object is cold and reloads from SQLite).
async fn reload() {
    use nightshift_tests::fake_provider;
    let (fake, url) = fake_provider::start().await;
    let mut server = Server::start(&[
        ("PROMPT_RUNNER", "sandbox"),
        ("PROVIDER_URL", &url),
        ("PROVIDER_SECRET", fake_provider::SECRET),
        ("CONTROL_URL", "{self}"),
        ("MAX_CLIENTS_PER_USER", "5000"),
    ])
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let total = env_num("BENCH_EVENTS", 20_000);
    let n = bench_n(5);
    let mut p = played_session(&server, &fake, &ada, 0).await;
    let t = Instant::now();
    fill_log(&mut p, total, 40).await;
    println!(
        "Reload of a busy session: {total} agent.text events of ~40 characters (stored in {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    let id = p.id.clone();
    let (mut hello, mut full, mut resume) = (Vec::new(), Vec::new(), Vec::new());
    let mut size = 0;
    let head = {
        let mut ws = api.connect(&ada, &id, "probe", u64::MAX / 2).await;
        let h = ws
            .until(Duration::from_secs(30), "hello", |v| v["type"] == "hello")
            .await;
        ws.close().await;
        h["seq"].as_u64().expect("head")
    };
    for i in 0..n {
        let (h, d, b) = catch_up(&api, &ada, &id, &format!("full{i}"), 0).await;
        hello.push(h);
        full.push(d);
        size = b;
    }
    for i in 0..n {
        let (_, d, _) = catch_up(
            &api,
            &ada,
            &id,
            &format!("resume{i}"),
            head.saturating_sub(100),
        )
        .await;
        resume.push(d);
    }
    report_first("connect since=0 -> hello", &mut hello);
    report_first(
        &format!("connect since=0 -> whole history ({head} events)"),
        &mut full,
    );
    println!("  {:.1} MB of frames per full reload", size as f64 / 1e6);
    report_first("connect since=head-100 -> caught up", &mut resume);
    // After a restart: each object is cold (the first request reloads it from SQLite).
    let restarts = env_num("BENCH_RESTARTS", 2);
    let (mut cold_full, mut cold_resume) = (Vec::new(), Vec::new());
    for i in 0..restarts {
        // Alternate which reload comes first after the restart (that one finds the object cold).
        server.restart().await;
        if i % 2 == 0 {
            cold_full.push(catch_up(&api, &ada, &id, &format!("cf{i}"), 0).await.1);
        } else {
            let since = head.saturating_sub(100);
            cold_resume.push(catch_up(&api, &ada, &id, &format!("cr{i}"), since).await.1);
        }
    }
    report(
        "after restart: since=0 -> whole history (cold)",
        &mut cold_full,
    );
    report(
        "after restart: since=head-100 -> caught up (cold)",
        &mut cold_resume,
    );
    drop(p.link);
}

/// The first request to an idle session: `BENCH_N` (default 5) sessions with a little history
/// (100 lock events each); the control plane restarts (every object is cold and reloads from
/// SQLite), then each session's first `GET /sessions/:id` against its second, and each other
/// session's first socket connect -> `hello` against its second. The very first request after
/// each restart (the Worker itself starting) is reported on its own. Repeated `BENCH_RESTARTS`
/// (default 2) times.
async fn idle() {
    let mut server = Server::start(&[
        ("PROMPT_RUNNER", "none"),
        ("MAX_CLIENTS_PER_USER", "5000"),
        ("MAX_LOCK_TTL_MS", "86400000"),
    ])
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let n = bench_n(5);
    let mut get_ids = Vec::new();
    let mut ws_ids = Vec::new();
    for i in 0..2 * n {
        let (id, _) = api.create_session(&ada, &format!("idle {i}")).await;
        let mut w = api.connect(&ada, &id, "writer", u64::MAX / 2).await;
        w.until(Duration::from_secs(30), "hello", |v| v["type"] == "hello")
            .await;
        for r in 0..100 {
            w.send(
                json!({"type": "lock.acquire", "resource": format!("r{r}"), "ttl_ms": 86_400_000}),
            )
            .await;
        }
        let mut got = 0;
        while got < 100 {
            let Some(v) = w.next(Duration::from_secs(30)).await else {
                panic!("writer closed");
            };
            got += v["events"]
                .as_array()
                .map(|e| e.iter().filter(|e| e["type"] == "lock.acquired").count())
                .unwrap_or(0);
        }
        w.close().await;
        if i % 2 == 0 {
            get_ids.push(id);
        } else {
            ws_ids.push(id);
        }
    }
    println!("First request to an idle session ({n} sessions of each kind, 100 lock events each), after the control plane restarts");
    let restarts = env_num("BENCH_RESTARTS", 2);
    let (mut very_first, mut get1, mut get2, mut hello1, mut hello2) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let get = |id: String| {
        let api = api.clone();
        let ada = ada.clone();
        async move {
            let t = Instant::now();
            let (st, v) = api
                .call("GET", &format!("/sessions/{id}"), &ada, None)
                .await;
            assert_eq!(st, 200, "{v}");
            ms(t.elapsed())
        }
    };
    let hello = |id: String, client: String| {
        let api = api.clone();
        let ada = ada.clone();
        async move {
            let t = Instant::now();
            let mut ws = api.connect(&ada, &id, &client, u64::MAX / 2).await;
            ws.until(Duration::from_secs(30), "hello", |v| v["type"] == "hello")
                .await;
            let d = ms(t.elapsed());
            ws.close().await;
            d
        }
    };
    for r in 0..restarts {
        server.restart().await;
        for (k, id) in get_ids.iter().enumerate() {
            let first = get(id.clone()).await;
            if k == 0 {
                very_first.push(first);
            } else {
                get1.push(first);
            }
            get2.push(get(id.clone()).await);
        }
        for id in &ws_ids {
            hello1.push(hello(id.clone(), format!("a{r}")).await);
            hello2.push(hello(id.clone(), format!("b{r}")).await);
        }
    }
    report(
        "very first request after restart (GET, Worker cold)",
        &mut very_first,
    );
    report("first GET /sessions/:id of an idle session", &mut get1);
    report("second GET /sessions/:id", &mut get2);
    report("first connect -> hello of an idle session", &mut hello1);
    report("second connect -> hello", &mut hello2);
}

/// Presence latency: one client sends `typing` (true, then false, alternately) and the clock
/// runs until the `presence.delta` showing it has arrived at every other client of the
/// session. Sessions of 1 + 10 and 1 + 100 clients; the coalescing window is
/// `presence_batch_ms(clients)` (40 ms and 101 ms).
async fn presence() {
    let server = Server::start(&[
        ("PROMPT_RUNNER", "none"),
        ("MAX_CLIENTS_PER_USER", "5000"),
        ("HEARTBEAT_TIMEOUT_MS", "900000"),
    ])
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let rounds = bench_n(30);
    println!("Presence: typing -> presence.delta at every other client ({rounds} rounds)");
    for others in [10usize, 100] {
        let (id, _) = api.create_session(&ada, "presence").await;
        let mut typer = api.connect(&ada, &id, "typer", u64::MAX / 2).await;
        typer
            .until(Duration::from_secs(30), "hello", |v| v["type"] == "hello")
            .await;
        let mut rest = connect_many(&api, &ada, &id, others, "o").await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        join_all(
            rest.iter_mut()
                .map(|ws| drain(ws, Duration::from_millis(300))),
        )
        .await;
        drain(&mut typer, Duration::from_millis(50)).await;
        let window = nightshift_core::session::presence_batch_ms(others + 1);
        let (mut last, mut each) = (Vec::new(), Vec::new());
        for k in 0..rounds {
            let typing = k % 2 == 0;
            let t = Instant::now();
            typer
                .send(json!({"type": "typing", "typing": typing}))
                .await;
            let waits = rest.iter_mut().map(|ws| async move {
                loop {
                    let Some(raw) = ws.next_raw(Duration::from_secs(30)).await else {
                        panic!("socket closed waiting for presence");
                    };
                    if !raw.contains("presence.delta") || !raw.contains("\"typer\"") {
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_str(&raw).unwrap_or_default();
                    let shown = v["updated"].as_array().is_some_and(|u| {
                        u.iter()
                            .any(|e| e["client"] == "typer" && e["typing"] == typing)
                    });
                    if shown {
                        return Instant::now();
                    }
                }
            });
            let arrivals = join_all(waits).await;
            each.extend(arrivals.iter().map(|a| ms(*a - t)));
            last.push(ms(
                arrivals.into_iter().max().unwrap_or_else(Instant::now) - t
            ));
            drain(&mut typer, Duration::from_millis(1)).await;
            // A pause between rounds, as between a person's keystroke bursts.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        report_first(
            &format!("typing -> shown at all {others} others (window {window} ms)"),
            &mut last,
        );
        report(
            &format!("typing -> shown at each of {others} others"),
            &mut each,
        );
    }
}

/// Sends `frames` over `ws` and reads until each one's `ack` (matched by `ref`) has arrived;
/// returns the acks' `result`s in the order of `frames`. An `error` answer panics.
async fn acked(ws: &mut Ws, frames: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    let refs: Vec<String> = frames
        .iter()
        .map(|f| f["ref"].as_str().expect("frame ref").to_string())
        .collect();
    for frame in frames {
        ws.send(frame).await;
    }
    let mut results = vec![serde_json::Value::Null; refs.len()];
    let mut left = refs.len();
    while left > 0 {
        let Some(v) = ws.next(Duration::from_secs(60)).await else {
            panic!("socket closed with {left} acks missing");
        };
        let Some(k) = refs.iter().position(|r| v["ref"] == r.as_str()) else {
            continue;
        };
        assert_eq!(v["type"], "ack", "{v}");
        results[k] = v["result"].clone();
        left -= 1;
    }
    results
}

/// Wake after an enqueue/cancel loop: one member (Bob) queues and cancels `BENCH_CYCLES`
/// (default 10,000) prompts over his socket, in batches of 25 (25 `prompt` frames, their acks,
/// then 25 `prompt.cancel` frames, their acks), behind Ada's prompt that keeps running (no
/// runner). Then the control plane restarts `BENCH_RESTARTS` (default 3) times (every object
/// cold) and the clock runs for the first `GET /sessions/:id` of that session, which loads it
/// from SQLite; beside it, the first GET of a session that never had a prompt, after the same
/// restart, and a second GET of the looped one (warm). The Worker's own cold start is taken by
/// a request to a third session first.
async fn wake() {
    const BATCH: usize = 25;
    let mut server = Server::start(&[("PROMPT_RUNNER", "none")]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let bob = api.sign_in("bob").await;
    let cycles = env_num("BENCH_CYCLES", 10_000);
    let (looped, invite) = api.create_session(&ada, "wake: looped").await;
    api.join(&bob, &looped, &invite).await;
    let (quiet, _) = api.create_session(&ada, "wake: quiet").await;
    let (worker, _) = api.create_session(&ada, "wake: worker").await;
    // Ada's prompt runs for ever (no runner), so Bob's wait in the queue until cancelled.
    api.prompt(&ada, &looped, "holds the runner").await;
    let mut ws = api
        .connect(&bob, &looped, "looper", u64::MAX / 2)
        .await
        .pinging(Duration::from_secs(10));
    ws.until(Duration::from_secs(30), "hello", |v| v["type"] == "hello")
        .await;
    println!(
        "Wake after an enqueue/cancel loop: {cycles} prompts queued and cancelled by one member (socket, batches of {BATCH})"
    );
    let started = Instant::now();
    let mut per_batch: Vec<f64> = Vec::new();
    let mut done = 0;
    while done < cycles {
        let n = BATCH.min(cycles - done);
        let t = Instant::now();
        let prompts: Vec<serde_json::Value> = (done..done + n)
            .map(|i| json!({"type": "prompt", "text": format!("loop {i}"), "ref": format!("p{i}")}))
            .collect();
        let ids: Vec<String> = acked(&mut ws, prompts)
            .await
            .iter()
            .map(|r| r["id"].as_str().expect("acked prompt id").to_string())
            .collect();
        let cancels: Vec<serde_json::Value> = ids
            .iter()
            .zip(done..)
            .map(|(id, i)| json!({"type": "prompt.cancel", "id": id, "ref": format!("c{i}")}))
            .collect();
        acked(&mut ws, cancels).await;
        per_batch.push(ms(t.elapsed()) / n as f64);
        done += n;
    }
    ws.close().await;
    let total = started.elapsed();
    println!(
        "loop: {cycles} cycles in {:.1} s ({:.0} cycles/s)",
        total.as_secs_f64(),
        cycles as f64 / total.as_secs_f64()
    );
    let tenth = (per_batch.len() / 10).max(1);
    let mut first: Vec<f64> = per_batch.iter().take(tenth).copied().collect();
    let mut last: Vec<f64> = per_batch.iter().rev().take(tenth).copied().collect();
    report("one cycle, first tenth of the loop (per batch)", &mut first);
    report("one cycle, last tenth of the loop (per batch)", &mut last);
    let get = |id: String| {
        let api = api.clone();
        let ada = ada.clone();
        async move {
            let t = Instant::now();
            let (st, v) = api
                .call("GET", &format!("/sessions/{id}"), &ada, None)
                .await;
            assert_eq!(st, 200, "{v}");
            (ms(t.elapsed()), v)
        }
    };
    let (_, view) = get(looped.clone()).await;
    println!(
        "the looped session's view lists {} recent, {} queued, running {}",
        view["queue"]["recent"].as_array().map_or(0, Vec::len),
        view["queue"]["queued"].as_array().map_or(0, Vec::len),
        !view["queue"]["running"].is_null()
    );
    let restarts = env_num("BENCH_RESTARTS", 3);
    let (mut cold_worker, mut woke, mut woke_quiet, mut warm) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..restarts {
        server.restart().await;
        cold_worker.push(get(worker.clone()).await.0);
        woke.push(get(looped.clone()).await.0);
        woke_quiet.push(get(quiet.clone()).await.0);
        warm.push(get(looped.clone()).await.0);
    }
    report(
        "very first request after restart (Worker cold)",
        &mut cold_worker,
    );
    report(
        &format!("first GET after restart, {cycles} cancelled"),
        &mut woke,
    );
    report("first GET after restart, no prompt ever", &mut woke_quiet);
    report("second GET of the looped session", &mut warm);
}

/// `bench.sh single`: only the single-event throughput phases (client commands, then sandbox
/// events, at 10 clients, next on ack), on Nightshift (the fake provider as its compute, as in
/// `control`'s hot paths) and then on the runtime floor, then the guard. With `BENCH_PROFILE=dir`
/// each phase's counted part runs under a V8 CPU profile of the user runtime (see `Profiler`).
async fn single() {
    let (fake, url) = nightshift_tests::fake_provider::start().await;
    let server = Server::start(&[
        ("PROMPT_RUNNER", "sandbox"),
        ("PROVIDER_URL", &url),
        ("PROVIDER_SECRET", nightshift_tests::fake_provider::SECRET),
        ("CONTROL_URL", "{self}"),
        ("MAX_CLIENTS_PER_USER", "5000"),
        ("MAX_LOCK_TTL_MS", "600000"),
    ])
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    println!("Single-event throughput: Nightshift (release Wasm), then the runtime floor");
    let bed = Bed {
        side: Side::Nightshift,
        server: &server,
        api,
        who: ada,
        fake: Some(fake),
    };
    let total = env_num("BENCH_SINGLE", 1000).max(1);
    single_commands(&bed, total).await;
    single_sandbox_events(&bed, total).await;
    drop(bed);
    drop(server);
    let dir = nightshift_tests::repo_root().join("tests/floor");
    let server = Server::start_in(&dir, &[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let bed = Bed {
        side: Side::Floor,
        server: &server,
        api,
        who: ada,
        fake: None,
    };
    single_commands(&bed, total).await;
    single_sandbox_events(&bed, total).await;
}

/// A V8 CPU profile of the user runtime (the workerd isolate running the Worker and its Durable
/// Objects), taken over `wrangler dev`'s inspector proxy (`--inspector-port`, found in the
/// server's command line) with the DevTools protocol's `Profiler` domain, sampling every 100 µs.
struct Profiler {
    /// None: `BENCH_CPU` only (threads' CPU, no profile).
    ws: Option<Link>,
    id: u64,
    /// The server's process group and its threads' CPU ticks when the profile started.
    pgid: Option<i64>,
    cpu: Vec<(String, u64)>,
}

/// (process comm, thread comm, state after the comm) of one `/proc/<pid>/task/<tid>/stat`.
fn proc_stat(path: &std::path::Path) -> Option<(String, Vec<String>)> {
    let text = std::fs::read_to_string(path).ok()?;
    let (head, rest) = text.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_string();
    Some((comm, rest.split_whitespace().map(String::from).collect()))
}

/// CPU ticks (user + system) of every thread of the processes in group `pgid`, and of this
/// bench's own threads, keyed "process/thread".
fn group_cpu(pgid: i64) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    let me = std::process::id().to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Some((pcomm, fields)) = proc_stat(&entry.path().join("stat")) else {
            continue;
        };
        let group = fields.get(2).and_then(|g| g.parse::<i64>().ok());
        if group != Some(pgid) && pid != me {
            continue;
        }
        let pcomm = if pid == me {
            "bench client".to_string()
        } else {
            pcomm
        };
        for task in std::fs::read_dir(entry.path().join("task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let Some((tcomm, f)) = proc_stat(&task.path().join("stat")) else {
                continue;
            };
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            let key = format!("{pcomm}/{tcomm}");
            match out.iter_mut().find(|(k, _)| *k == key) {
                Some((_, t)) => *t += ticks(11) + ticks(12),
                None => out.push((key, ticks(11) + ticks(12))),
            }
        }
    }
    out
}

/// The process group of the `wrangler dev` serving `port`.
fn server_pgid(port: u16) -> Option<i64> {
    let needle = format!("--port {port} --inspector-port ");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&raw)
            .replace('\0', " ")
            .contains(&needle)
        {
            let (_, fields) = proc_stat(&entry.path().join("stat"))?;
            return fields.get(2)?.parse().ok();
        }
    }
    None
}

/// The inspector port of the `wrangler dev` serving `port` (from its command line).
fn inspector_port(port: u16) -> Option<u16> {
    let needle = format!("--port {port} --inspector-port ");
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let line = String::from_utf8_lossy(&raw).replace('\0', " ");
        if let Some(at) = line.find(&needle) {
            let rest = &line[at + needle.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if let Ok(p) = digits.parse() {
                return Some(p);
            }
        }
    }
    None
}

impl Profiler {
    /// Starts profiling `bed`'s server when `BENCH_PROFILE` names a directory; with `BENCH_CPU`
    /// set instead, only counts the server's threads' CPU.
    async fn start(bed: &Bed<'_>) -> Option<Profiler> {
        let ws = if std::env::var("BENCH_PROFILE").is_ok() {
            let port = inspector_port(bed.server.port)?;
            let url = format!("ws://127.0.0.1:{port}/ws");
            Some(tokio_tungstenite::connect_async(url).await.ok()?.0)
        } else if std::env::var("BENCH_CPU").is_ok() {
            None
        } else {
            return None;
        };
        let pgid = server_pgid(bed.server.port);
        let cpu = pgid.map(group_cpu).unwrap_or_default();
        let mut p = Profiler {
            ws,
            id: 0,
            pgid,
            cpu,
        };
        if p.ws.is_some() {
            p.call("Profiler.enable", json!({})).await?;
            p.call("Profiler.setSamplingInterval", json!({"interval": 100}))
                .await?;
            p.call("Profiler.start", json!({})).await?;
        }
        Some(p)
    }

    async fn call(&mut self, method: &str, params: serde_json::Value) -> Option<serde_json::Value> {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        self.id += 1;
        let msg = json!({"id": self.id, "method": method, "params": params}).to_string();
        let ws = self.ws.as_mut()?;
        ws.send(Message::Text(msg.into())).await.ok()?;
        loop {
            let next = tokio::time::timeout(Duration::from_secs(60), ws.next()).await;
            let Ok(Some(Ok(Message::Text(t)))) = next else {
                if matches!(next, Ok(Some(Ok(_)))) {
                    continue;
                }
                return None;
            };
            let v: serde_json::Value = serde_json::from_str(&t).ok()?;
            if v["id"].as_u64() == Some(self.id) {
                return Some(v["result"].clone());
            }
        }
    }

    /// Stops, writes `BENCH_PROFILE/<side>-<what>.cpuprofile` (loadable in DevTools) and prints
    /// where the busy samples went; `units` commands or events ran under the profile.
    async fn finish(mut self, side: Side, what: &str, units: usize) {
        let cpu = self.pgid.map(group_cpu).unwrap_or_default();
        if self.ws.is_none() {
            println!("  {}{what}:", side.prefix());
            print_cpu(&self.cpu, cpu, units);
            return;
        }
        let Some(result) = self.call("Profiler.stop", json!({})).await else {
            println!("  (profile: no answer from the inspector)");
            return;
        };
        let profile = &result["profile"];
        let dir = std::env::var("BENCH_PROFILE").unwrap_or_default();
        let side_name = match side {
            Side::Nightshift => "nightshift",
            Side::Floor => "floor",
        };
        let file = format!("{dir}/{side_name}-{}.cpuprofile", what.replace(' ', "-"));
        if std::fs::create_dir_all(&dir).is_ok() {
            let _ = std::fs::write(&file, profile.to_string());
        }
        // The JS sources the samples point into (the bundled Worker), for reading line numbers.
        let mut scripts: Vec<(String, String)> = Vec::new();
        for n in profile["nodes"].as_array().into_iter().flatten() {
            let (id, url) = (&n["callFrame"]["scriptId"], &n["callFrame"]["url"]);
            let (Some(id), Some(url)) = (id.as_str(), url.as_str()) else {
                continue;
            };
            if url.ends_with(".js") && !scripts.iter().any(|(i, _)| i == id) {
                scripts.push((id.to_string(), url.to_string()));
            }
        }
        if !scripts.is_empty() && self.call("Debugger.enable", json!({})).await.is_some() {
            for (id, url) in scripts {
                let source = self
                    .call("Debugger.getScriptSource", json!({"scriptId": id}))
                    .await;
                let name = url.rsplit('/').next().unwrap_or("script.js");
                if let Some(text) = source.as_ref().and_then(|s| s["scriptSource"].as_str()) {
                    let _ = std::fs::write(format!("{dir}/{side_name}-{name}"), text);
                }
            }
            let _ = self.call("Debugger.disable", json!({})).await;
        }
        summarise(profile, &format!("{}{what}", side.prefix()), units, &file);
        print_cpu(&self.cpu, cpu, units);
    }
}

/// CPU per command or event of each thread of the server and of the bench (10 ms ticks),
/// busiest first, between two `group_cpu` readings.
fn print_cpu(before: &[(String, u64)], after: Vec<(String, u64)>, units: usize) {
    let mut used: Vec<(String, u64)> = after
        .into_iter()
        .map(|(k, t)| {
            let before = before.iter().find(|(b, _)| *b == k).map_or(0, |b| b.1);
            (k, t.saturating_sub(before))
        })
        .filter(|(_, t)| *t > 0)
        .collect();
    used.sort_by_key(|u| std::cmp::Reverse(u.1));
    let tick_us = 1e6 / 100.0;
    let all: u64 = used.iter().map(|u| u.1).sum();
    println!(
        "    CPU per command or event, by process/thread (all: {:.0} µs):",
        all as f64 * tick_us / units.max(1) as f64
    );
    for (k, t) in used.iter().take(12) {
        println!(
            "    {:>7.0} µs  {k}",
            *t as f64 * tick_us / units.max(1) as f64
        );
    }
}

/// One profile node: its function, where it is from, its parent.
struct Frame {
    name: String,
    url: String,
    parent: Option<usize>,
}

fn is_wasm(f: &Frame) -> bool {
    f.url.starts_with("wasm")
}

/// The bucket a busy sample counts in, from its stack (leaf first).
fn bucket(stack: &[&Frame]) -> String {
    let leaf = stack[0];
    match leaf.name.as_str() {
        "(program)" => return "runtime: (program) — workerd and V8 outside JS and Wasm".into(),
        "(garbage collector)" => return "runtime: garbage collector".into(),
        "(root)" => return "runtime: (root)".into(),
        _ => {}
    }
    if leaf.url.is_empty() {
        // A runtime API called from JS (or a builtin V8 shows).
        let what = match leaf.name.as_str() {
            "exec" | "next" | "toArray" | "one" | "raw" => "SQLite exec (sql.exec and its cursor)",
            "send" => "WebSocket send",
            "setAlarm" | "getAlarm" => "alarm (storage.setAlarm/getAlarm)",
            "getWebSockets" => "getWebSockets",
            "deserializeAttachment" | "serializeAttachment" => {
                "socket attachment (structured clone)"
            }
            "parse" | "stringify" => "JSON (JS builtin)",
            other => return format!("runtime API: {other}"),
        };
        return what.into();
    }
    if is_wasm(leaf) {
        let wasm = stack.iter().take_while(|f| is_wasm(f));
        if wasm.clone().any(|f| f.name.contains("serde_json")) {
            return "Wasm: JSON encode/decode (serde_json)".into();
        }
        if wasm.clone().any(|f| f.name.contains("serde_wasm_bindgen")) {
            return "Wasm: JS value <-> Rust (serde_wasm_bindgen)".into();
        }
        let krate = leaf
            .name
            .trim_start_matches('<')
            .split("::")
            .next()
            .unwrap_or("")
            .to_string();
        return format!("Wasm: {krate}");
    }
    // JS: the floor's own functions, or the Worker's glue (wasm-bindgen, workers-rs shim).
    let file = leaf.url.rsplit('/').next().unwrap_or("");
    if file == "worker.js" {
        let name = if leaf.name.is_empty() {
            "(anonymous)"
        } else {
            &leaf.name
        };
        return format!("JS (floor): {name}");
    }
    format!("JS glue: {file}")
}

/// Prints the busy samples of `profile` by bucket and its top self-time functions.
fn summarise(profile: &serde_json::Value, label: &str, units: usize, file: &str) {
    use std::collections::HashMap;
    let empty = Vec::new();
    let nodes = profile["nodes"].as_array().unwrap_or(&empty);
    let mut index = HashMap::new();
    let mut frames: Vec<Frame> = Vec::new();
    for n in nodes {
        let id = n["id"].as_u64().unwrap_or(0);
        index.insert(id, frames.len());
        frames.push(Frame {
            name: n["callFrame"]["functionName"].as_str().unwrap_or("").into(),
            url: n["callFrame"]["url"].as_str().unwrap_or("").into(),
            parent: None,
        });
    }
    for n in nodes {
        let Some(&me) = index.get(&n["id"].as_u64().unwrap_or(0)) else {
            continue;
        };
        for c in n["children"].as_array().unwrap_or(&empty) {
            if let Some(&child) = c.as_u64().and_then(|c| index.get(&c)) {
                frames[child].parent = Some(me);
            }
        }
    }
    let samples = profile["samples"].as_array().unwrap_or(&empty);
    let span_us =
        profile["endTime"].as_f64().unwrap_or(0.0) - profile["startTime"].as_f64().unwrap_or(0.0);
    let per_sample_us = span_us / samples.len().max(1) as f64;
    let (mut buckets, mut leaves) = (
        HashMap::<String, usize>::new(),
        HashMap::<String, usize>::new(),
    );
    let (mut busy, mut idle) = (0usize, 0usize);
    for s in samples {
        let Some(&leaf) = s.as_u64().and_then(|s| index.get(&s)) else {
            continue;
        };
        if frames[leaf].name == "(idle)" {
            idle += 1;
            continue;
        }
        busy += 1;
        let mut stack = Vec::new();
        let mut at = Some(leaf);
        while let Some(i) = at {
            stack.push(&frames[i]);
            at = frames[i].parent;
        }
        *buckets.entry(bucket(&stack)).or_default() += 1;
        let f = &frames[leaf];
        let name = f.name.rsplit_once("::h").map(|(n, _)| n).unwrap_or(&f.name);
        let kind = if is_wasm(f) {
            "wasm"
        } else if f.url.is_empty() {
            "api"
        } else {
            "js"
        };
        *leaves.entry(format!("[{kind}] {name}")).or_default() += 1;
    }
    let share = |n: usize| 100.0 * n as f64 / busy.max(1) as f64;
    println!(
        "  profile of {label}: {} samples ({per_sample_us:.0} µs each), {:.0} % idle; busy {:.0} µs per command or event ({units}); {file}",
        busy + idle,
        100.0 * idle as f64 / (busy + idle).max(1) as f64,
        busy as f64 * per_sample_us / units.max(1) as f64
    );
    let mut sorted: Vec<_> = buckets.into_iter().collect();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.1));
    for (name, n) in &sorted {
        println!("    {:>5.1} %  {name}", share(*n));
    }
    let mut top: Vec<_> = leaves.into_iter().collect();
    top.sort_by_key(|t| std::cmp::Reverse(t.1));
    println!("    top self time:");
    for (name, n) in top.iter().take(25) {
        let short: String = name.chars().take(130).collect();
        println!("    {:>5.1} %  {short}", share(*n));
    }
}

/// Review submitted → the answering prompt's first agent event, against the fake GitHub: each
/// round opens a pull request from a new session (a prompt that writes a file), then a reviewer
/// submits one review of three comments: once with the session's sandbox live (warm), once after
/// it was terminated (the prompt restores the session's snapshot). The clock starts before the
/// first comment's delivery and stops at the first `agent.*` event of the review's prompt on the
/// session's socket, as a person watching the session sees it.
async fn review() {
    use nightshift_core::github::Role;
    let recording = json!({"turns": [
        {"text": "Writing.", "tool_calls": [{"name": "write", "arguments": {"filePath": "hello.txt", "content": "hello\n"}}]},
        {"text": "Created hello.txt."},
        {"text": "Looked at the review."}
    ]});
    let team = nightshift_tests::github_team(
        recording,
        &[
            ("ada", "Ada Lovelace", Role::Admin),
            ("carol", "Carol Reviewer", Role::Write),
        ],
        &[],
        &[],
    )
    .await;
    let nightshift_tests::GithubTeam {
        github: fake,
        compute,
        server,
        ada,
        ..
    } = team;
    let api = server.client();
    let n = bench_n(3);
    println!("Review comments on the pull request a session opened (fake GitHub, scripted model, local provider): review submitted -> the answering prompt's first agent event on the session's socket");
    let (mut warm, mut restored) = (Vec::new(), Vec::new());
    for round in 0..n {
        for live in [true, false] {
            let (id, _) = api.create_session_on_name(&ada, "review", "web").await;
            let mut ws = api
                .connect(&ada, &id, "bench", 0)
                .await
                .pinging(Duration::from_secs(10));
            let p = api.prompt(&ada, &id, "Write a greeting").await;
            ws.finished(&p).await;
            let opened = ws.event("pr.opened", |_| true).await;
            let number = opened["pull_request"]["number"].as_u64().unwrap_or(0);
            if !live {
                wait_snapshot(&api, &ada, &id).await;
                let sandbox = api.session_sandbox(&ada, &id).await;
                let (st, v) = api
                    .call("POST", &format!("/sandbox/{sandbox}/terminate"), &ada, None)
                    .await;
                assert!(st < 300, "terminate: {v}");
            }
            drain(&mut ws, Duration::from_millis(30)).await;
            let t = Instant::now();
            fake.submit_review(
                "acme/web",
                number,
                "carol",
                "",
                &[
                    ("hello.txt", 1, &format!("Round {round}: capitalise it.")),
                    ("hello.txt", 1, "Greet the world."),
                    ("hello.txt", 1, "End with a full stop."),
                ],
            )
            .await;
            let mut prompt: Option<String> = None;
            let first = 'wait: loop {
                let Some(v) = ws.next(Duration::from_secs(180)).await else {
                    panic!("the socket closed or went quiet before the review's prompt answered");
                };
                let now = Instant::now();
                for e in v["events"].as_array().cloned().unwrap_or_default() {
                    let kind = e["type"].as_str().unwrap_or("");
                    if kind == "pr.comment.received" {
                        prompt = e["prompt"].as_str().map(String::from);
                    }
                    if kind.starts_with("agent.")
                        && prompt.as_deref().is_some_and(|p| e["prompt"] == p)
                    {
                        break 'wait now;
                    }
                }
            };
            if live { &mut warm } else { &mut restored }.push(ms(first - t));
            if let Some(p) = prompt {
                ws.finished(&p).await;
            }
            end_sandboxes(&compute, &id).await;
        }
    }
    report_first(
        "review submitted -> first agent event (warm session)",
        &mut warm,
    );
    report_first(
        "review submitted -> first agent event (restored from its snapshot)",
        &mut restored,
    );
}

/// Slack, against the fake Slack and the fake GitHub: how long Slack waits for its answer to a
/// signed event (what decides whether it retries: 3 s), over channel chatter and mentions alike,
/// and, for a mention, the person's wait from sending it to the session's status message in the
/// thread, then to the message saying working (the agent's first output) and done.
async fn slack() {
    use nightshift_core::slack::Block;
    use nightshift_tests::fake_slack::{FakeSlack, FakeSlackConfig};
    let slack = FakeSlack::start(FakeSlackConfig::default()).await;
    slack.add_user("U0ADA", "Ada Lovelace", "ada@example.com");
    let recording = json!({"turns": [{"text": "Looked around; nothing to change."}]});
    let (secret, token, api_url) = (slack.signing_secret(), slack.bot_token(), slack.api_url());
    let team = nightshift_tests::github_team(
        recording,
        &[("ada", "Ada Lovelace", nightshift_core::github::Role::Admin)],
        &[],
        &[
            ("SLACK_SIGNING_SECRET", &secret),
            ("SLACK_BOT_TOKEN", &token),
            ("SLACK_API_URL", &api_url),
        ],
    )
    .await;
    slack.deliver_to(&format!("{}/webhook/slack/events", team.server.base));
    println!("Slack (fake Slack and GitHub, scripted model, local provider): event -> acknowledged as Slack times it; mention -> the thread's status message");
    let chatter = env_num("BENCH_SLACK_EVENTS", 100);
    for i in 0..chatter {
        slack
            .bot_message("C0BENCH", "B0OTHERBOT", None, &format!("chatter {i}"))
            .await;
    }
    let n = bench_n(5);
    let (mut posted, mut working, mut done) = (Vec::new(), Vec::new(), Vec::new());
    let stage_of = |ts: &str| -> Option<String> {
        slack
            .messages("C0BENCH")
            .into_iter()
            .filter(|m| m.thread_ts.as_deref() == Some(ts))
            .find(|m| {
                m.blocks.iter().any(
                    |b| matches!(b, Block::Section { block_id: Some(id), .. } if id == "stage"),
                )
            })
            .map(|m| m.text)
    };
    for round in 0..n {
        let t = Instant::now();
        let (_, ts) = slack
            .mention(
                "C0BENCH",
                "U0ADA",
                &format!("Round {round}: look around the site"),
            )
            .await;
        let mut seen_posted = false;
        let mut seen_working = false;
        let deadline = t + Duration::from_secs(180);
        loop {
            let now = Instant::now();
            assert!(now < deadline, "no done status for round {round}");
            if let Some(text) = stage_of(&ts) {
                if !seen_posted {
                    seen_posted = true;
                    posted.push(ms(now - t));
                }
                if !seen_working && (text.starts_with("Working") || text.starts_with("Done")) {
                    seen_working = true;
                    working.push(ms(now - t));
                }
                if text.starts_with("Done") {
                    done.push(ms(now - t));
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let mut acks: Vec<f64> = slack
        .deliveries()
        .iter()
        .filter(|d| d.retry_num == 0)
        .map(|d| ms(d.elapsed))
        .collect();
    let retried = slack
        .deliveries()
        .iter()
        .filter(|d| d.retry_num > 0)
        .count();
    report("Slack event -> acknowledged (200)", &mut acks);
    println!("  retries Slack had to send: {retried}");
    report_first(
        "mention -> status message posted in the thread",
        &mut posted,
    );
    report_first(
        "mention -> status says working (agent output)",
        &mut working,
    );
    report_first("mention -> status says done", &mut done);
}
