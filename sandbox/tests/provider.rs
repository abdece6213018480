//! The local provider through its real HTTP contract: signing and replays, create on a real git repository, exec, git status, logs, snapshots, terminate leaves no processes, containment (environment, fresh root, links, limits, redaction), and bad input.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nightshift_core::signing;
use serde_json::{json, Value};

const SECRET: &str = "test-provider-secret";

struct Provider {
    child: Child,
    base: String,
    http: reqwest::Client,
    root: PathBuf,
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch folder deep enough that a socket named by its full path inside a provider root
/// would pass `sun_path`'s 108 bytes wherever the checkout is (CI's is longer than ours).
fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("a-deep-folder-as-in-a-long-checkout-path")
        .join(format!(
            "{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn sh(dir: &Path, cmd: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .current_dir(dir)
        .output()
        .expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A bare "remote" with one commit on main.
fn remote_repo(root: &Path) -> PathBuf {
    let work = root.join("seed");
    std::fs::create_dir_all(&work).expect("seed");
    sh(&work, "git init -q -b main && echo '# demo' > README.md && git add . && git -c user.name=Seed -c user.email=seed@example.com commit -qm init");
    let bare = root.join("remote.git");
    sh(
        root,
        &format!("git clone -q --bare {} {}", work.display(), bare.display()),
    );
    bare
}

async fn start(extra_env: &[(&str, &str)]) -> Provider {
    start_at(scratch("provider"), extra_env).await
}

/// A provider on an existing root (a restart finds what the earlier one recorded there).
async fn start_at(root: PathBuf, extra_env: &[(&str, &str)]) -> Provider {
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nightshift-provider"));
    cmd.args(["--port", &port.to_string(), "--root"])
        .arg(root.join("state"))
        .env("PROVIDER_SECRET", SECRET)
        // The tests' repositories are local paths: single-user dev mode.
        .env("NIGHTSHIFT_DEV_MODE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let chosen = extra_env.iter().any(|(k, _)| *k == "NIGHTSHIFT_ISOLATION");
    if !chosen && no_bwrap_allowed() {
        cmd.env("NIGHTSHIFT_ISOLATION", "none");
    }
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("start provider");
    let p = Provider {
        child,
        base: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::new(),
        root,
    };
    let t = Instant::now();
    while p
        .http
        .get(format!("{}/v1/health", p.base))
        .send()
        .await
        .is_err()
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "provider did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !chosen && !no_bwrap_allowed() {
        // Tests that do not turn isolation off run under bubblewrap, never silently without.
        let (_, health) = p.call("GET", "/v1/health", None).await;
        assert_eq!(
            health["isolation"], "bubblewrap",
            "the provider tests need working bubblewrap (NIGHTSHIFT_TEST_ALLOW_NO_BWRAP=1 runs them without): {health}"
        );
    }
    p
}

/// `NIGHTSHIFT_TEST_ALLOW_NO_BWRAP=1`: run the provider tests on a host without working
/// bubblewrap (isolation `none`; the tests of bubblewrap's own properties are skipped).
fn no_bwrap_allowed() -> bool {
    std::env::var("NIGHTSHIFT_TEST_ALLOW_NO_BWRAP").as_deref() == Ok("1")
}

fn nonce() -> String {
    format!("n{:032x}", rand::random::<u128>())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

impl Provider {
    async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        ts: Option<u64>,
        secret: &str,
    ) -> (u16, Value) {
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let ts = ts.unwrap_or_else(now);
        let n = nonce();
        let sig = signing::sign(secret.as_bytes(), method, path, ts, &n, &bytes).expect("sign");
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let r = self
            .http
            .request(m, format!("{}{path}", self.base))
            .header(signing::TIMESTAMP_HEADER, ts.to_string())
            .header(signing::NONCE_HEADER, n)
            .header(signing::SIGNATURE_HEADER, sig)
            .header("content-type", "application/json")
            .body(bytes)
            .send()
            .await
            .expect("request");
        let st = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (
            st,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.raw(method, path, body, None, SECRET).await
    }

    /// A signed GET whose answer is text (the SSE log streams).
    async fn text(&self, path: &str) -> (u16, String) {
        let ts = now();
        let n = nonce();
        let sig = signing::sign(SECRET.as_bytes(), "GET", path, ts, &n, b"").expect("sign");
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .header(signing::TIMESTAMP_HEADER, ts.to_string())
            .header(signing::NONCE_HEADER, n)
            .header(signing::SIGNATURE_HEADER, sig)
            .send()
            .await
            .expect("request");
        let st = r.status().as_u16();
        (st, r.text().await.unwrap_or_default())
    }

    async fn wait_status(&self, id: &str, want: &[&str]) -> Value {
        let t = Instant::now();
        loop {
            let (st, v) = self.call("GET", &format!("/v1/sandboxes/{id}"), None).await;
            assert_eq!(st, 200, "{v}");
            if want.iter().any(|w| v["status"] == *w) {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "sandbox stuck at {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn unsigned_stale_and_forged_requests_are_refused() {
    let p = start(&[]).await;
    let r = p
        .http
        .get(format!("{}/v1/health", p.base))
        .send()
        .await
        .expect("req");
    assert_eq!(r.status().as_u16(), 401);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "unsigned");
    let (st, v) = p
        .raw(
            "GET",
            "/v1/health",
            None,
            Some(now() - 10 * 60 * 1000),
            SECRET,
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (401, Some("stale_signature"))
    );
    let (st, v) = p.raw("GET", "/v1/health", None, None, "wrong-secret").await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (401, Some("bad_signature"))
    );
    // A body changed after signing does not verify.
    let ts = now();
    let n = nonce();
    let sig =
        signing::sign(SECRET.as_bytes(), "POST", "/v1/sandboxes", ts, &n, b"{}").expect("sign");
    let r = p
        .http
        .post(format!("{}/v1/sandboxes", p.base))
        .header(signing::TIMESTAMP_HEADER, ts.to_string())
        .header(signing::NONCE_HEADER, n)
        .header(signing::SIGNATURE_HEADER, sig)
        .body("{\"session_id\":\"x\"}")
        .send()
        .await
        .expect("req");
    assert_eq!(r.status().as_u16(), 401);
    let (st, v) = p.call("GET", "/v1/health", None).await;
    assert_eq!(st, 200);
    assert_eq!(v["provider"], "local");
    assert!(v["isolation"] == "bubblewrap" || v["isolation"] == "none");
    let (_, list) = p.call("GET", "/v1/sandboxes", None).await;
    assert_eq!(
        list["sandboxes"],
        json!([]),
        "refused requests created nothing"
    );
}

#[tokio::test]
async fn a_sandbox_clones_syncs_execs_snapshots_and_terminates_without_leftovers() {
    lifecycle(&[]).await;
}

/// Without bubblewrap a sandbox is only a process group: stragglers are found by their mark.
#[tokio::test]
async fn without_isolation_terminate_still_leaves_no_processes() {
    lifecycle(&[("NIGHTSHIFT_ISOLATION", "none")]).await;
}

async fn lifecycle(env: &[(&str, &str)]) {
    let p = start(env).await;
    let remote = remote_repo(&p.root);
    let (st, sbx) = p
        .call("POST", "/v1/sandboxes", Some(json!({"session_id": "ses_1", "repository": {"clone_url": remote, "base_branch": "main"}, "labels": {"pool": "a"}})))
        .await;
    assert_eq!(st, 201, "{sbx}");
    let id = sbx["id"].as_str().expect("id").to_string();
    assert_eq!(sbx["status"], "creating");
    let ready = p.wait_status(&id, &["ready"]).await;
    assert!(ready["ready_at"].as_u64().is_some());

    // A commit pushed to the base branch after the clone is picked up by the sync.
    sh(&p.root, &format!("git clone -q {} late && cd late && echo new > NEW.md && git add . && git -c user.name=L -c user.email=l@e commit -qm late && git push -q origin main", remote.display()));
    let (st, _) = p
        .call("POST", &format!("/v1/sandboxes/{id}/git/sync"), None)
        .await;
    assert_eq!(st, 202);
    let want = sh(&p.root.join("late"), "git rev-parse HEAD");
    let t = Instant::now();
    loop {
        let (_, g) = p
            .call("GET", &format!("/v1/sandboxes/{id}/git"), None)
            .await;
        if g["sync"]["state"] == "synced" && g["head"] == want.as_str() {
            assert_eq!(g["sync"]["commit"], want.as_str());
            assert_eq!(g["dirty"], false);
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "never synced: {g}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (st, out) = p
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"command": ["sh", "-c", "cat NEW.md; echo oops >&2; exit 3"]})),
        )
        .await;
    assert_eq!(st, 200, "{out}");
    assert_eq!(out["exit_code"], 3);
    assert_eq!(out["stdout"], "new\n");
    assert_eq!(out["stderr"], "oops\n");
    assert_eq!(out["truncated"], false);
    let (st, out) = p
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"command": ["cat"], "stdin": "piped"})),
        )
        .await;
    assert_eq!((st, out["stdout"].as_str()), (200, Some("piped")));

    // Stop keeps the disk and kills the processes; start boots it again on the same checkout.
    let (_, _) = p
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"command": ["sh", "-c", "echo kept > KEPT.md"]})),
        )
        .await;
    let (st, stopped) = p
        .call("POST", &format!("/v1/sandboxes/{id}/stop"), None)
        .await;
    assert_eq!(
        (st, stopped["status"].as_str()),
        (200, Some("stopped")),
        "{stopped}"
    );
    assert!(
        nightshift_sandbox::procs::marked(&id).is_empty(),
        "a stopped sandbox runs nothing"
    );
    let (st, e) = p
        .call("POST", &format!("/v1/sandboxes/{id}/start"), None)
        .await;
    assert_eq!(st, 200, "{e}");
    p.wait_status(&id, &["ready"]).await;
    let (_, out) = p
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"command": ["cat", "KEPT.md"]})),
        )
        .await;
    assert_eq!(out["stdout"], "kept\n");
    let (st, e) = p
        .call("POST", &format!("/v1/sandboxes/{id}/start"), None)
        .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("sandbox_not_stopped"))
    );

    // Logs stream as SSE.
    let path = format!("/v1/sandboxes/{id}/logs/supervisor");
    let ts = now();
    let n = nonce();
    let sig = signing::sign(SECRET.as_bytes(), "GET", &path, ts, &n, b"").expect("sign");
    let r = p
        .http
        .get(format!("{}{path}", p.base))
        .header(signing::TIMESTAMP_HEADER, ts.to_string())
        .header(signing::NONCE_HEADER, n)
        .header(signing::SIGNATURE_HEADER, sig)
        .send()
        .await
        .expect("logs");
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.expect("text");
    assert!(text.contains("data: supervisor: local API"), "{text}");

    // Snapshot a checkout a fresh clone and sync cannot reproduce: an uncommitted file
    // (KEPT.md, above), an uncommitted edit of a pushed file and a deleted tracked file.
    p.exec_out(&id, "echo edited >> NEW.md && rm README.md")
        .await;
    let (st, snap) = p
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/snapshot"),
            Some(json!({"ttl_ms": 60000})),
        )
        .await;
    assert_eq!(st, 201, "{snap}");
    let snap_id = snap["id"].as_str().expect("snap id");
    // Changed after the snapshot: none of this may come back.
    p.exec_out(
        &id,
        "git checkout -q -- README.md && echo later > AFTER.md && rm KEPT.md",
    )
    .await;
    let (st, restored) = p.call("POST", &format!("/v1/snapshots/{snap_id}/restore"), Some(json!({"session_id": "ses_2", "repository": {"clone_url": remote, "base_branch": "main"}}))).await;
    assert_eq!(st, 201, "{restored}");
    let rid = restored["id"].as_str().expect("rid").to_string();
    p.wait_status(&rid, &["ready"]).await;
    let out = p
        .exec_out(
            &rid,
            "cat NEW.md KEPT.md; for f in README.md AFTER.md; do test -e $f && echo $f-present || echo $f-absent; done; git status --porcelain",
        )
        .await;
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "new",
            "edited",
            "kept",
            "README.md-absent",
            "AFTER.md-absent",
            " M NEW.md",
            " D README.md",
            "?? KEPT.md"
        ],
        "the restored checkout is not the snapshot's: {out}"
    );

    // List filters by session and label.
    let (_, l) = p.call("GET", "/v1/sandboxes?session_id=ses_1", None).await;
    assert_eq!(l["sandboxes"].as_array().map(Vec::len), Some(1));
    let (_, l) = p.call("GET", "/v1/sandboxes?label=pool:a", None).await;
    assert_eq!(l["sandboxes"][0]["id"], id.as_str());

    // Processes an exec started die with the sandbox, judged by their own pids in /proc (not by
    // the sandbox's mark, which is what terminate kills by): a background child, a setsid one,
    // and one that drops the mark and its session (`env -i setsid`). The exec prints their pids
    // to a file and stays running, so they are alive when the sandbox is terminated.
    let tag = 300_000 + rand::random::<u32>() % 100_000 * 10;
    let naps: Vec<String> = (0..3).map(|i| (tag + i).to_string()).collect();
    let quiet = "</dev/null >/dev/null 2>&1 &";
    let script = format!(
        "sleep {a} {quiet} echo $! >> .pids; setsid sleep {b} {quiet} echo $! >> .pids; env -i setsid sleep {c} {quiet} echo $! >> .pids; sleep 120",
        a = naps[0],
        b = naps[1],
        c = naps[2],
    );
    let pids_file = p.root.join("state/sandboxes").join(&id).join("repo/.pids");
    let exec = p.exec(
        &id,
        json!({"command": ["sh", "-c", script], "timeout_ms": 180000}),
    );
    let (_, health) = p.call("GET", "/v1/health", None).await;
    let isolated = health["isolation"] == "bubblewrap";
    let watch = async {
        let t = Instant::now();
        let printed: Vec<i32> = loop {
            let text = std::fs::read_to_string(&pids_file).unwrap_or_default();
            let pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
            if pids.len() == naps.len() {
                break pids;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "pids never printed: {text:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The host's pid of each (inside bubblewrap the printed pid is the sandbox's own pid
        // namespace's: the innermost `NSpid` entry).
        let mut host = Vec::new();
        for (nap, inner) in naps.iter().zip(&printed) {
            // `$!` is printed as soon as the shell forks, before the child has exec'd `setsid`
            // and `setsid` has exec'd `sleep`: wait until the command line is `sleep N`.
            let found = loop {
                let found = running(&["sleep", nap]);
                if !found.is_empty() || t.elapsed() > Duration::from_secs(20) {
                    break found;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            assert_eq!(found.len(), 1, "sleep {nap}: {found:?}");
            let nspid = ns_pids(found[0]);
            assert_eq!(
                nspid.last(),
                Some(inner),
                "sleep {nap} printed {inner}: {nspid:?}"
            );
            // Isolation: with bubblewrap the sandbox has its own pid namespace.
            assert_eq!(
                nspid.len() > 1,
                isolated,
                "pid namespaces of sleep {nap}: {nspid:?}"
            );
            host.push(found[0]);
        }
        for sid in [&id, &rid] {
            let (st, t) = p
                .call("POST", &format!("/v1/sandboxes/{sid}/terminate"), None)
                .await;
            assert_eq!((st, t["status"].as_str()), (200, Some("terminated")));
        }
        host
    };
    let (_, host) = tokio::join!(exec, watch);
    let t = Instant::now();
    while let Some(alive) = host
        .iter()
        .find(|pid| Path::new(&format!("/proc/{pid}")).exists())
    {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "process {alive} (an exec's child) survived terminate: {}",
            std::fs::read_to_string(format!("/proc/{alive}/status")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for sid in [&id, &rid] {
        assert!(
            nightshift_sandbox::procs::marked(sid).is_empty(),
            "processes of {sid} survived"
        );
    }
    let (st, again) = p
        .call("POST", &format!("/v1/sandboxes/{id}/terminate"), None)
        .await;
    assert_eq!(
        (st, again["status"].as_str()),
        (200, Some("terminated")),
        "terminate is idempotent"
    );
    let (st, e) = p
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"command": ["true"]})),
        )
        .await;
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (409, Some("sandbox_terminated"))
    );
}

#[tokio::test]
async fn bad_input_gets_stable_codes() {
    let p = start(&[]).await;
    let remote = remote_repo(&p.root);
    let (st, v) = p
        .call(
            "POST",
            "/v1/sandboxes",
            Some(json!({"session_id": "s", "repository": {"clone_url": remote}, "surprise": 1})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    let (st, v) = p.call("GET", "/v1/sandboxes/sbx_nope", None).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("sandbox_not_found"))
    );
    let (st, v) = p
        .call(
            "POST",
            "/v1/snapshots/snp_nope/restore",
            Some(json!({"session_id": "s", "repository": {"clone_url": remote}})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("snapshot_not_found"))
    );

    // A repository that does not exist fails the sandbox with a clear code.
    let (st, v) = p
        .call(
            "POST",
            "/v1/sandboxes",
            Some(json!({"session_id": "s", "repository": {"clone_url": "/nonexistent/repo.git"}})),
        )
        .await;
    assert_eq!(st, 201);
    let failed = p
        .wait_status(v["id"].as_str().expect("id"), &["failed"])
        .await;
    assert_eq!(failed["error"]["code"], "repository_not_found");
    // A base branch that does not exist fails the clone.
    let (_, v) = p.call("POST", "/v1/sandboxes", Some(json!({"session_id": "s", "repository": {"clone_url": remote, "base_branch": "nope"}}))).await;
    let failed = p
        .wait_status(v["id"].as_str().expect("id"), &["failed"])
        .await;
    assert_eq!(failed["error"]["code"], "clone_failed");

    let (_, v) = p
        .call(
            "POST",
            "/v1/sandboxes",
            Some(json!({"session_id": "s", "repository": {"clone_url": remote}})),
        )
        .await;
    let id = v["id"].as_str().expect("id").to_string();
    p.wait_status(&id, &["ready"]).await;
    for bad in [json!({"command": []}), json!({"command": [""]})] {
        let (st, v) = p
            .call("POST", &format!("/v1/sandboxes/{id}/exec"), Some(bad))
            .await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (400, Some("invalid_command"))
        );
    }
    let (st, v) = p
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(json!({"command": ["ls"], "cwd": "../.."})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    let (st, v) = p
        .call("GET", &format!("/v1/sandboxes/{id}/logs/..%2Fx"), None)
        .await;
    assert!(st == 400 || st == 404, "{st} {v}");
    let (st, _) = p
        .call("POST", &format!("/v1/sandboxes/{id}/terminate"), None)
        .await;
    assert_eq!(st, 200);
}

impl Provider {
    async fn wait_image(&self, id: &str) -> Value {
        let t = Instant::now();
        loop {
            let (st, v) = self.call("GET", &format!("/v1/images/{id}"), None).await;
            assert_eq!(st, 200, "{v}");
            if v["status"] != "building" {
                return v;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "build stuck: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn build(
        &self,
        remote: &Path,
        setup: &[&str],
        test: Option<&str>,
        extra: Value,
    ) -> Value {
        let mut body = json!({"repository": {"clone_url": remote, "base_branch": "main"}, "setup": setup, "test": test});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let (st, img) = self.call("POST", "/v1/images", Some(body)).await;
        assert_eq!(
            (st, img["status"].as_str()),
            (201, Some("building")),
            "{img}"
        );
        self.wait_image(img["id"].as_str().expect("image id")).await
    }

    async fn exec_out(&self, id: &str, cmd: &str) -> String {
        let (st, out) = self
            .call(
                "POST",
                &format!("/v1/sandboxes/{id}/exec"),
                Some(json!({"command": ["sh", "-c", cmd]})),
            )
            .await;
        assert_eq!(st, 200, "{out}");
        out["stdout"].as_str().unwrap_or_default().to_string()
    }
}

#[tokio::test]
async fn images_build_with_setup_and_tests_and_sandboxes_start_from_them() {
    let p = start(&[]).await;
    let remote = remote_repo(&p.root);
    let img = p
        .build(
            &remote,
            &[
                "echo warmed > WARM.txt",
                "mkdir -p $HOME/.cache && echo cached > $HOME/.cache/dep",
            ],
            Some("test -f WARM.txt && exit 7"),
            json!({"labels": {"tag": "t1"}}),
        )
        .await;
    assert_eq!(img["status"], "ready", "{img}");
    assert_eq!(
        img["test_exit_code"], 7,
        "a failing test is recorded, not fatal"
    );
    let head = sh(
        &p.root,
        &format!("git --git-dir={} rev-parse main", remote.display()),
    );
    assert_eq!(img["commit"], head.as_str());
    let iid = img["id"].as_str().expect("id").to_string();
    let (_, log) = p.text(&format!("/v1/images/{iid}/logs")).await;
    assert!(
        log.contains("data: $ echo warmed > WARM.txt") && log.contains("image ready"),
        "{log}"
    );

    // A sandbox from the image has the setup's work and the warmed caches.
    let (st, sbx) = p
        .call("POST", "/v1/sandboxes", Some(json!({"session_id": "ses_i", "image": iid, "repository": {"clone_url": remote, "base_branch": "main"}})))
        .await;
    assert_eq!(
        (st, sbx["image"].as_str()),
        (201, Some(iid.as_str())),
        "{sbx}"
    );
    let sid = sbx["id"].as_str().expect("id").to_string();
    p.wait_status(&sid, &["ready"]).await;
    assert_eq!(
        p.exec_out(&sid, "cat WARM.txt; cat $HOME/.cache/dep").await,
        "warmed\ncached\n"
    );
    p.call("POST", &format!("/v1/sandboxes/{sid}/terminate"), None)
        .await;

    // Failed builds, time limits and missing repositories say why; failed images are not usable.
    let bad = p
        .build(&remote, &["echo ok", "exit 3"], None, json!({}))
        .await;
    assert_eq!(
        (bad["status"].as_str(), bad["error"]["code"].as_str()),
        (Some("failed"), Some("setup_failed")),
        "{bad}"
    );
    let (st, v) = p
        .call("POST", "/v1/sandboxes", Some(json!({"session_id": "ses_i", "image": bad["id"], "repository": {"clone_url": remote}})))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("image_not_ready"))
    );
    let slow = p
        .build(&remote, &["sleep 30"], None, json!({"timeout_ms": 300}))
        .await;
    assert_eq!(slow["error"]["code"], "timeout", "{slow}");
    let gone = p
        .build(&p.root.join("nope.git"), &[], None, json!({}))
        .await;
    assert_eq!(gone["error"]["code"], "repository_not_found", "{gone}");

    // Bad input, unknown and deleted images.
    for body in [
        json!({"repository": {"clone_url": remote}, "setup": [""]}),
        json!({"repository": {"clone_url": remote}, "setup": "echo"}),
        json!({"repository": {"clone_url": remote}, "extra": 1}),
        json!({"setup": []}),
    ] {
        let (st, v) = p.call("POST", "/v1/images", Some(body)).await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (400, Some("invalid_body")),
            "{v}"
        );
    }
    let (st, v) = p
        .call("POST", "/v1/sandboxes", Some(json!({"session_id": "ses_i", "image": "img_unknown", "repository": {"clone_url": remote}})))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("image_not_found"))
    );
    for _ in 0..2 {
        let (st, v) = p.call("DELETE", &format!("/v1/images/{iid}"), None).await;
        assert_eq!((st, v["deleted"].as_bool()), (200, Some(true)));
    }
    let (st, v) = p.call("GET", &format!("/v1/images/{iid}"), None).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("image_not_found"))
    );
    assert!(
        !p.root.join("state/images").join(&iid).exists(),
        "deleting frees the disk"
    );
}

#[tokio::test]
async fn pooled_sandboxes_boot_without_a_session_and_are_assigned_once() {
    let p = start(&[]).await;
    let remote = remote_repo(&p.root);
    let (st, sbx) = p
        .call("POST", "/v1/sandboxes", Some(json!({"session_id": null, "repository": {"clone_url": remote}, "labels": {"pool": "r"}})))
        .await;
    assert_eq!((st, &sbx["session_id"]), (201, &Value::Null), "{sbx}");
    let id = sbx["id"].as_str().expect("id").to_string();
    p.wait_status(&id, &["ready"]).await;
    let spec = json!({"control_url": "http://127.0.0.1:9", "sandbox_token": "t"});
    let (st, v) = p
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/assign"),
            Some(json!({"session_id": "ses_a", "supervisor": spec})),
        )
        .await;
    assert_eq!((st, v["session_id"].as_str()), (200, Some("ses_a")), "{v}");
    let (st, v) = p
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/assign"),
            Some(json!({"session_id": "ses_b", "supervisor": spec})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("sandbox_assigned"))
    );
    let (_, listed) = p.call("GET", "/v1/sandboxes?session_id=ses_a", None).await;
    assert_eq!(listed["sandboxes"][0]["id"], id.as_str());
    let (st, v) = p
        .call(
            "POST",
            "/v1/sandboxes/sbx_none/assign",
            Some(json!({"session_id": "ses_a", "supervisor": spec})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("sandbox_not_found"))
    );
    let (st, v) = p
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/assign"),
            Some(json!({"session_id": "ses_c"})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    let t = Instant::now();
    loop {
        let log =
            std::fs::read_to_string(p.root.join("state/host").join(&id).join("supervisor.log"))
                .unwrap_or_default();
        if log.contains("assigned to session ses_a") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the supervisor never heard: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn snapshots_expire_and_are_deleted_and_sandboxes_end_at_their_lifetime() {
    let p = start(&[]).await;
    let remote = remote_repo(&p.root);
    let (_, sbx) = p
        .call("POST", "/v1/sandboxes", Some(json!({"session_id": "ses_l", "repository": {"clone_url": remote}, "lifetime_ms": 2500})))
        .await;
    let id = sbx["id"].as_str().expect("id").to_string();
    let created = sbx["created_at"].as_u64().expect("created");
    assert_eq!(sbx["expires_at"].as_u64(), Some(created + 2500));
    p.wait_status(&id, &["ready"]).await;
    let (st, short) = p
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/snapshot"),
            Some(json!({"ttl_ms": 300})),
        )
        .await;
    assert_eq!(st, 201, "{short}");
    let (_, kept) = p
        .call("POST", &format!("/v1/sandboxes/{id}/snapshot"), None)
        .await;
    let (short, kept) = (
        short["id"].as_str().expect("id"),
        kept["id"].as_str().expect("id"),
    );
    let (st, v) = p.call("GET", &format!("/v1/snapshots/{short}"), None).await;
    assert_eq!((st, v["sandbox_id"].as_str()), (200, Some(id.as_str())));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (st, v) = p.call("GET", &format!("/v1/snapshots/{short}"), None).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("snapshot_not_found"))
    );
    let body = json!({"session_id": "ses_l", "repository": {"clone_url": remote}});
    let (st, _) = p
        .call(
            "POST",
            &format!("/v1/snapshots/{short}/restore"),
            Some(body),
        )
        .await;
    assert_eq!(st, 404);
    let (st, _) = p
        .call("DELETE", &format!("/v1/snapshots/{kept}"), None)
        .await;
    assert_eq!(st, 200);
    let (st, _) = p.call("GET", &format!("/v1/snapshots/{kept}"), None).await;
    assert_eq!(st, 404);
    assert!(!p.root.join("state/snapshots").join(kept).exists());

    let ended = p.wait_status(&id, &["terminated"]).await;
    assert_eq!(ended["error"]["code"], "lifetime", "{ended}");
}

/// A host file that nothing in a sandbox may change.
fn marker(p: &Provider, name: &str) -> PathBuf {
    let m = p.root.join(name);
    std::fs::write(&m, "original\n").expect("marker");
    m
}

fn assert_marker(m: &Path) {
    assert_eq!(
        std::fs::read_to_string(m).expect("marker"),
        "original\n",
        "a host file changed: {}",
        m.display()
    );
}

impl Provider {
    async fn sandbox(&self, remote: &Path) -> String {
        let (st, v) = self
            .call(
                "POST",
                "/v1/sandboxes",
                Some(json!({"session_id": "ses_c", "repository": {"clone_url": remote}})),
            )
            .await;
        assert_eq!(st, 201, "{v}");
        let id = v["id"].as_str().expect("id").to_string();
        self.wait_status(&id, &["ready"]).await;
        id
    }

    async fn exec(&self, id: &str, body: Value) -> (u16, Value) {
        self.call("POST", &format!("/v1/sandboxes/{id}/exec"), Some(body))
            .await
    }
}

/// A fake `bwrap` first on the provider's PATH: it records that it ran, then runs the real one.
fn fake_bwrap(root: &Path) -> (String, PathBuf) {
    let bin = root.join("fakebin");
    std::fs::create_dir_all(&bin).expect("fakebin");
    let ran = root.join("fake-bwrap-ran");
    let script = bin.join("bwrap");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho ran >> {}\nexec /usr/bin/bwrap \"$@\"\n",
            ran.display()
        ),
    )
    .expect("script");
    sh(&bin, "chmod +x bwrap");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (path, ran)
}

const HOST_SECRETS: [(&str, &str); 3] = [
    ("NIGHTSHIFT_MODEL_KEY", "model-key-sekrit-1"),
    ("EXAMPLE_API_KEY", "api-key-sekrit-2"),
    ("HOST_ONLY_VARIABLE", "host-env-sekrit-3"),
];

/// C1/C2: the caller's env reaches only the sandboxed process, and only allowed names; no
/// provider secret or host variable is visible to exec or to build steps.
async fn environment_stays_outside(isolation: &[(&str, &str)]) {
    let root = scratch("provider-env");
    let mut env: Vec<(&str, &str)> = HOST_SECRETS.to_vec();
    env.extend_from_slice(isolation);
    let (path, fake_ran) = fake_bwrap(&root);
    env.push(("PATH", &path));
    let p = start(&env).await;
    let remote = remote_repo(&p.root);
    let id = p.sandbox(&remote).await;
    let (st, out) = p.exec(&id, json!({"command": ["env"]})).await;
    assert_eq!(st, 200, "{out}");
    let printed = out["stdout"].as_str().expect("stdout");
    for secret in [SECRET]
        .into_iter()
        .chain(HOST_SECRETS.iter().map(|(_, v)| *v))
    {
        assert!(!printed.contains(secret), "exec sees {secret}:\n{printed}");
    }
    assert!(!printed.contains("PROVIDER_SECRET"), "{printed}");
    // An allowed name reaches the process.
    let (_, out) = p
        .exec(
            &id,
            json!({"command": ["sh", "-c", "echo $GREETING"], "env": {"GREETING": "hello"}}),
        )
        .await;
    assert_eq!(out["stdout"], "hello\n");

    // The attack: a `bwrap` in the sandbox's own directory, then PATH (or LD_PRELOAD) pointing at it.
    let planted = p.root.join("planted-ran");
    let plant = format!(
        "mkdir -p $HOME/b && printf '#!/bin/sh\\necho pwned > {}\\n' > $HOME/b/bwrap && chmod +x $HOME/b/bwrap && cp $HOME/b/bwrap $HOME/b/true && echo $HOME",
        planted.display()
    );
    let (st, out) = p.exec(&id, json!({"command": ["sh", "-c", plant]})).await;
    assert_eq!(st, 200, "{out}");
    let home = out["stdout"].as_str().expect("home").trim().to_string();
    for (name, value) in [
        ("PATH", format!("{home}/b:/usr/bin:/bin")),
        ("LD_PRELOAD", format!("{home}/b/evil.so")),
        ("LD_LIBRARY_PATH", format!("{home}/b")),
        ("BASH_ENV", format!("{home}/b/bwrap")),
        ("ENV", format!("{home}/b/bwrap")),
        ("lower", "x".to_string()),
        ("1ABC", "x".to_string()),
        ("A-B", "x".to_string()),
    ] {
        let (st, v) = p
            .exec(&id, json!({"command": ["true"], "env": {name: value}}))
            .await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (400, Some("invalid_env")),
            "{name}: {v}"
        );
        assert!(
            v["error"]["message"].as_str().unwrap_or("").contains(name),
            "{v}"
        );
    }
    let (st, _) = p.exec(&id, json!({"command": ["true"]})).await;
    assert_eq!(st, 200);
    assert!(!planted.exists(), "the planted program ran on the host");

    // Build steps see no secrets either.
    let img = p.build(&remote, &["env"], None, json!({})).await;
    assert_eq!(img["status"], "ready", "{img}");
    let (_, log) = p
        .text(&format!(
            "/v1/images/{}/logs",
            img["id"].as_str().expect("id")
        ))
        .await;
    assert!(log.contains("HOME="), "{log}");
    for (_, secret) in HOST_SECRETS {
        assert!(!log.contains(secret), "a build step sees {secret}");
    }
    assert!(!log.contains(SECRET));
    assert!(
        !fake_ran.exists(),
        "bubblewrap was looked up through PATH: the fake one ran"
    );
    p.call("POST", &format!("/v1/sandboxes/{id}/terminate"), None)
        .await;
}

#[tokio::test]
async fn exec_env_never_reaches_the_launcher_and_no_secret_reaches_a_sandbox() {
    environment_stays_outside(&[]).await;
}

#[tokio::test]
async fn without_isolation_exec_env_and_secrets_are_contained_too() {
    environment_stays_outside(&[("NIGHTSHIFT_ISOLATION", "none")]).await;
}

/// H1: a fresh root per sandbox; other sandboxes, the provider's root, /root and this
/// checkout are not there; namespaces, session and limits are the sandbox's own.
#[tokio::test]
async fn a_sandbox_sees_a_fresh_root_and_nothing_of_the_host() {
    if no_bwrap_allowed() {
        eprintln!("skipped: NIGHTSHIFT_TEST_ALLOW_NO_BWRAP=1 (this tests bubblewrap itself)");
        return;
    }
    let p = start(&[("PROVIDER_LIMIT_OPEN_FILES", "1000")]).await;
    let (_, health) = p.call("GET", "/v1/health", None).await;
    assert_eq!(health["isolation"], "bubblewrap", "{health}");
    let remote = remote_repo(&p.root);
    let a = p.sandbox(&remote).await;
    let b = p.sandbox(&remote).await;
    let (_, sa) = p.call("GET", &format!("/v1/sandboxes/{a}"), None).await;
    assert_eq!(sa["isolation"], "bubblewrap", "{sa}");
    let sandboxes = p.root.join("state/sandboxes");
    let b_readme = sandboxes.join(&b).join("repo/README.md");
    let before = std::fs::read_to_string(&b_readme).expect("b's checkout");
    let checkout = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("Cargo.toml");
    let host_marker = marker(&p, "host-marker.txt");
    for cmd in [
        format!("cat {}", b_readme.display()),
        format!("echo pwned > {}", b_readme.display()),
        format!("ls {}", sandboxes.join(&b).display()),
        format!("cat {}", checkout.display()),
        format!("cat {}", host_marker.display()),
        "ls /root".to_string(),
        "touch /usr/pwned".to_string(),
        format!("ls {}", p.root.join("state/host").display()),
    ] {
        let (st, out) = p.exec(&a, json!({"command": ["sh", "-c", cmd]})).await;
        assert_eq!(st, 200, "{out}");
        assert_ne!(out["exit_code"], 0, "`{cmd}` worked inside: {out}");
    }
    // A write to a host path lands in the sandbox's own scratch root, if anywhere.
    p.exec_out(
        &a,
        &format!("echo pwned > {} 2>/dev/null; true", host_marker.display()),
    )
    .await;
    // Only its own directory is under the sandboxes folder.
    let own = p.exec_out(&a, &format!("ls {}", sandboxes.display())).await;
    assert_eq!(own.trim(), a, "another sandbox is visible");
    let inside = p
        .exec_out(
            &a,
            "hostname; ulimit -n; ps -e -o pid= 2>/dev/null | wc -l; test -x /usr/bin/git && echo git; cat /etc/hostname >/dev/null 2>&1; echo done",
        )
        .await;
    let lines: Vec<&str> = inside.lines().collect();
    assert_eq!(lines.first().copied(), Some("nightshift"), "{inside}");
    assert_eq!(
        lines.get(1).copied(),
        Some("1000"),
        "the limit applies: {inside}"
    );
    assert!(inside.contains("git\n"), "the tools are there: {inside}");
    assert_eq!(std::fs::read_to_string(&b_readme).expect("b"), before);
    assert_marker(&host_marker);
    assert!(!Path::new("/usr/pwned").exists());
    for id in [a, b] {
        p.call("POST", &format!("/v1/sandboxes/{id}/terminate"), None)
            .await;
    }
}

/// The provider refuses to start when bubblewrap does not work, unless isolation is turned off
/// explicitly; then every sandbox and the health answer say so.
#[tokio::test]
async fn without_working_bubblewrap_the_provider_refuses_unless_isolation_is_none() {
    let root = scratch("provider-nobwrap");
    let out = Command::new(env!("CARGO_BIN_EXE_nightshift-provider"))
        .args(["--port", &free_port().to_string(), "--root"])
        .arg(root.join("state"))
        .env("PROVIDER_SECRET", SECRET)
        .env("PROVIDER_BWRAP", "/bin/false")
        .output()
        .expect("run");
    assert!(!out.status.success(), "it started without isolation");
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("NIGHTSHIFT_ISOLATION=none"), "{why}");

    let p = start(&[
        ("PROVIDER_BWRAP", "/bin/false"),
        ("NIGHTSHIFT_ISOLATION", "none"),
    ])
    .await;
    let (_, health) = p.call("GET", "/v1/health", None).await;
    assert_eq!(health["isolation"], "none");
    let remote = remote_repo(&p.root);
    let id = p.sandbox(&remote).await;
    let (_, s) = p.call("GET", &format!("/v1/sandboxes/{id}"), None).await;
    assert_eq!(s["isolation"], "none", "{s}");
    let (_, l) = p.call("GET", "/v1/sandboxes", None).await;
    assert_eq!(l["sandboxes"][0]["isolation"], "none");
    p.call("POST", &format!("/v1/sandboxes/{id}/terminate"), None)
        .await;
}

/// C4: links a sandbox plants where the provider writes (its logs, its state) never make the
/// provider write, truncate or read a host file; build steps cannot redirect the build log.
#[tokio::test]
async fn symlinked_logs_and_state_never_touch_host_files() {
    let p = start(&[]).await;
    let remote = remote_repo(&p.root);
    let m = marker(&p, "victim.txt");
    let id = p.sandbox(&remote).await;
    let plant = format!(
        "cd $HOME/.. && ln -sf {m} logs/supervisor.log && ln -sf {m} logs/opencode.log && ln -sf {m} logs/evil.log && mkfifo logs/fifo.log && ln -sf {m} state/supervisor.json && ln -sfn / logs2 && echo planted",
        m = m.display()
    );
    assert_eq!(p.exec_out(&id, &plant).await, "planted\n");
    for service in ["opencode", "evil", "fifo"] {
        let (st, text) = p.text(&format!("/v1/sandboxes/{id}/logs/{service}")).await;
        assert!(!text.contains("original"), "the log read the host file");
        assert_eq!(st, 404, "{service}: {text}");
    }
    let (st, _) = p
        .call("POST", &format!("/v1/sandboxes/{id}/stop"), None)
        .await;
    assert_eq!(st, 200);
    let (st, _) = p
        .call("POST", &format!("/v1/sandboxes/{id}/start"), None)
        .await;
    assert_eq!(st, 200);
    p.wait_status(&id, &["ready"]).await;
    assert_marker(&m);
    let (st, text) = p.text(&format!("/v1/sandboxes/{id}/logs/supervisor")).await;
    assert_eq!(st, 200);
    assert!(text.contains("data: supervisor: local API"), "{text}");
    p.call("POST", &format!("/v1/sandboxes/{id}/terminate"), None)
        .await;
    assert_marker(&m);

    // A setup step links the (old) build log to the host file; the next step's output goes to the real log.
    let img = p
        .build(
            &remote,
            &[
                &format!("ln -sf {} ../build.log", m.display()),
                &format!("ln -sf {} $HOME/../../build.log || true", m.display()),
                "echo second-step-output",
            ],
            None,
            json!({}),
        )
        .await;
    assert_eq!(img["status"], "ready", "{img}");
    assert_marker(&m);
    let (_, log) = p
        .text(&format!(
            "/v1/images/{}/logs",
            img["id"].as_str().expect("id")
        ))
        .await;
    assert!(log.contains("data: second-step-output"), "{log}");
}

/// M4: a signed request is good once; a replay is refused and changes nothing.
#[tokio::test]
async fn a_replayed_signed_request_is_refused_and_creates_nothing() {
    let p = start(&[]).await;
    let remote = remote_repo(&p.root);
    let body = json!({"session_id": "ses_r", "repository": {"clone_url": remote}}).to_string();
    let ts = now();
    let n = nonce();
    let sig = signing::sign(
        SECRET.as_bytes(),
        "POST",
        "/v1/sandboxes",
        ts,
        &n,
        body.as_bytes(),
    )
    .expect("sign");
    let send = |with_nonce: bool| {
        let mut r = p
            .http
            .post(format!("{}/v1/sandboxes", p.base))
            .header(signing::TIMESTAMP_HEADER, ts.to_string())
            .header(signing::SIGNATURE_HEADER, sig.clone())
            .header("content-type", "application/json")
            .body(body.clone());
        if with_nonce {
            r = r.header(signing::NONCE_HEADER, n.clone());
        }
        r.send()
    };
    let no_nonce = send(false).await.expect("send");
    assert_eq!(no_nonce.status().as_u16(), 401);
    let v: Value = no_nonce.json().await.expect("json");
    assert_eq!(v["error"]["code"], "unsigned");
    let first = send(true).await.expect("send");
    assert_eq!(first.status().as_u16(), 201);
    let created: Value = first.json().await.expect("json");
    for _ in 0..2 {
        let again = send(true).await.expect("send");
        assert_eq!(again.status().as_u16(), 401);
        let v: Value = again.json().await.expect("json");
        assert_eq!(v["error"]["code"], "replayed_request", "{v}");
    }
    let (_, list) = p.call("GET", "/v1/sandboxes?session_id=ses_r", None).await;
    let ids: Vec<&Value> = list["sandboxes"]
        .as_array()
        .expect("list")
        .iter()
        .map(|s| &s["id"])
        .collect();
    assert_eq!(ids, vec![&created["id"]], "the replay created nothing");
    // A minute-old signature is stale now (the window is 60 s).
    let (st, v) = p
        .raw("GET", "/v1/health", None, Some(now() - 90_000), SECRET)
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (401, Some("stale_signature"))
    );
    let id = created["id"].as_str().expect("id");
    p.wait_status(id, &["ready"]).await;
    p.call("POST", &format!("/v1/sandboxes/{id}/terminate"), None)
        .await;
}

/// M8: people see no host paths and no URL credentials.
#[tokio::test]
async fn errors_and_answers_carry_no_host_paths_or_credentials() {
    let p = start(&[]).await;
    let url = "https://user:tok3n-sekrit@127.0.0.1:9/team/repo.git";
    let (st, v) = p
        .call(
            "POST",
            "/v1/sandboxes",
            Some(json!({"session_id": "ses_m", "repository": {"clone_url": url}})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        v["repository"]["clone_url"],
        "https://127.0.0.1:9/team/repo.git"
    );
    let failed = p
        .wait_status(v["id"].as_str().expect("id"), &["failed"])
        .await;
    let shown = failed.to_string();
    assert_eq!(failed["error"]["code"], "clone_failed", "{failed}");
    assert!(!shown.contains("tok3n-sekrit"), "{shown}");
    let root = p.root.to_string_lossy().to_string();
    assert!(!shown.contains(&root), "a host path: {shown}");
    // A failing clone of a real repository: git names the destination, which is cut out.
    let remote = remote_repo(&p.root);
    let (_, v) = p
        .call("POST", "/v1/sandboxes", Some(json!({"session_id": "ses_m", "repository": {"clone_url": remote, "base_branch": "nope"}})))
        .await;
    let failed = p
        .wait_status(v["id"].as_str().expect("id"), &["failed"])
        .await;
    assert!(
        !failed["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("{root}/state")),
        "{failed}"
    );
    let (st, img) = p
        .call(
            "POST",
            "/v1/images",
            Some(json!({"repository": {"clone_url": url, "base_branch": "main"}})),
        )
        .await;
    assert_eq!(st, 201);
    assert!(!img.to_string().contains("tok3n-sekrit"), "{img}");
    let iid = img["id"].as_str().expect("id").to_string();
    let done = p.wait_image(&iid).await;
    assert!(!done.to_string().contains("tok3n-sekrit"), "{done}");
    let (_, log) = p.text(&format!("/v1/images/{iid}/logs")).await;
    assert!(log.contains("https://127.0.0.1:9/team/repo.git"), "{log}");
    assert!(!log.contains("tok3n-sekrit"), "{log}");
}

/// A process's pid in each pid namespace it is in, the host's first (`NSpid` in its status).
fn ns_pids(pid: i32) -> Vec<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Live processes whose command line is exactly `argv`.
fn running(argv: &[&str]) -> Vec<i32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == want) {
            out.push(pid);
        }
    }
    out
}

/// L5: without isolation, a process that drops its sandbox mark and calls setsid still dies,
/// when its exec ends and at terminate.
#[tokio::test]
async fn without_isolation_an_unmarked_setsid_process_still_dies() {
    let p = start(&[("NIGHTSHIFT_ISOLATION", "none")]).await;
    let remote = remote_repo(&p.root);
    let id = p.sandbox(&remote).await;
    let secs = (100_000 + rand::random::<u32>() % 100_000).to_string();
    let escape = |s: &str| {
        format!("setsid env -u NIGHTSHIFT_SANDBOX_ID sleep {s} </dev/null >/dev/null 2>&1 &")
    };
    let (st, out) = p
        .exec(
            &id,
            json!({"command": ["sh", "-c", format!("{} echo started", escape(&secs))]}),
        )
        .await;
    assert_eq!(
        (st, out["stdout"].as_str()),
        (200, Some("started\n")),
        "{out}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        running(&["sleep", &secs]).is_empty(),
        "an exec's escaped process outlived it"
    );

    // One still running when the sandbox is terminated.
    let secs2 = (200_000 + rand::random::<u32>() % 100_000).to_string();
    let cmd = format!("{} sleep 30", escape(&secs2));
    let path = format!("/v1/sandboxes/{id}/exec");
    let body = json!({"command": ["sh", "-c", cmd], "timeout_ms": 60000});
    let ts = now();
    let n = nonce();
    let bytes = body.to_string();
    let sig =
        signing::sign(SECRET.as_bytes(), "POST", &path, ts, &n, bytes.as_bytes()).expect("sign");
    let req = p
        .http
        .post(format!("{}{path}", p.base))
        .header(signing::TIMESTAMP_HEADER, ts.to_string())
        .header(signing::NONCE_HEADER, n)
        .header(signing::SIGNATURE_HEADER, sig)
        .body(bytes)
        .send();
    let pending = tokio::spawn(req);
    let t = Instant::now();
    while running(&["sleep", &secs2]).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (st, _) = p
        .call("POST", &format!("/v1/sandboxes/{id}/terminate"), None)
        .await;
    assert_eq!(st, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        running(&["sleep", &secs2]).is_empty(),
        "an unmarked setsid process survived terminate"
    );
    let _ = pending.await;
}

#[test]
fn redact_url_removes_credentials_only() {
    use nightshift_sandbox::state::redact_url;
    assert_eq!(
        redact_url("https://u:p@github.com/o/r.git"),
        "https://github.com/o/r.git"
    );
    assert_eq!(
        redact_url("fatal: unable to access 'https://tok@h.example:8443/x/': refused"),
        "fatal: unable to access 'https://h.example:8443/x/': refused"
    );
    assert_eq!(redact_url("ssh://git@h/x y"), "ssh://h/x y");
    assert_eq!(redact_url("/srv/git/repo.git"), "/srv/git/repo.git");
    assert_eq!(
        redact_url("https://h/a@b and http://u@x"),
        "https://h/a@b and http://x"
    );
}

#[test]
fn env_names_are_checked() {
    use nightshift_sandbox::state::allowed_env_name;
    for ok in ["FOO", "_X", "A1_B", "NIGHTSHIFT_X", "ENVIRONMENT", "LD"] {
        assert!(allowed_env_name(ok), "{ok}");
    }
    for bad in [
        "",
        "PATH",
        "LD_PRELOAD",
        "LD_",
        "BASH_ENV",
        "ENV",
        "a",
        "1A",
        "A-B",
        "A B",
        "Ä",
    ] {
        assert!(!allowed_env_name(bad), "{bad}");
    }
}

/// A loopback HTTP server that answers `{"ok":true}` and records each request's head.
struct Upstream {
    port: u16,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

async fn upstream() -> Upstream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                seen.lock()
                    .expect("heads")
                    .push(String::from_utf8_lossy(&buf).to_string());
                let body = r#"{"ok":true}"#;
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    Upstream { port, heads }
}

impl Upstream {
    fn hits(&self) -> Vec<String> {
        self.heads.lock().expect("heads").clone()
    }
}

/// A sandbox's only way out is its egress proxy: allowlisted hosts answer, others are refused
/// with `egress_blocked` and never reached, and nothing connects around the proxy.
#[tokio::test]
async fn egress_goes_only_through_the_allowlist_proxy() {
    let allowed = upstream().await;
    let other = upstream().await;
    let p = start(&[]).await;
    let remote = remote_repo(&p.root);
    let body = json!({"session_id": "ses_egress", "repository": {"clone_url": remote,
        "base_branch": "main", "egress": [format!("127.0.0.1:{}", allowed.port)]}});
    let (st, s) = p.call("POST", "/v1/sandboxes", Some(body)).await;
    assert_eq!(st, 201, "{s}");
    let id = s["id"].as_str().expect("id").to_string();
    p.wait_status(&id, &["ready"]).await;
    // An allowlisted host answers through the proxy (exec has the proxy variables set).
    let out = p
        .exec_out(
            &id,
            &format!(
                "curl -s --max-time 10 http://127.0.0.1:{}/hello",
                allowed.port
            ),
        )
        .await;
    assert!(out.contains("\"ok\":true"), "{out}");
    assert_eq!(allowed.hits().len(), 1, "{:?}", allowed.hits());
    // Another host is refused by the proxy, over plain HTTP and CONNECT alike.
    let refused = p
        .exec_out(
            &id,
            &format!("curl -s --max-time 10 http://127.0.0.1:{}/x", other.port),
        )
        .await;
    assert!(refused.contains("egress_blocked"), "{refused}");
    let tunnel = p
        .exec_out(
            &id,
            &format!(
                "curl -s -o /dev/null -w '%{{http_code}}' --max-time 10 -p http://127.0.0.1:{}/x",
                other.port
            ),
        )
        .await;
    assert!(tunnel.starts_with("403") || tunnel == "000", "{tunnel}");
    // Around the proxy there is no network at all: no route to the host's loopback services.
    let direct = p
        .exec_out(
            &id,
            &format!(
                "curl -s --noproxy '*' --max-time 5 http://127.0.0.1:{}/x || echo unreachable",
                other.port
            ),
        )
        .await;
    assert!(direct.contains("unreachable"), "{direct}");
    assert!(
        other.hits().is_empty(),
        "a refused host was reached: {:?}",
        other.hits()
    );
    // Neither can a sandbox reach the provider itself.
    let port = p.base.rsplit(':').next().unwrap_or("0").to_string();
    let provider = p
        .exec_out(
            &id,
            &format!("curl -s --max-time 5 http://127.0.0.1:{port}/v1/health || echo unreachable"),
        )
        .await;
    assert!(provider.contains("egress_blocked"), "{provider}");
}

/// Clone URLs outside dev mode: https to allowlisted public hosts only; private addresses,
/// local paths and other schemes are refused with a clear code, and nothing is created.
#[tokio::test]
async fn clone_urls_pointing_inside_or_at_local_paths_are_refused_outside_dev_mode() {
    let p = start(&[("NIGHTSHIFT_DEV_MODE", "0")]).await;
    let remote = remote_repo(&p.root);
    for url in [
        remote.to_string_lossy().to_string(),
        format!("file://{}", remote.display()),
        "https://10.1.2.3/team/repo.git".to_string(),
        "https://169.254.169.254/latest/meta-data".to_string(),
        "https://localhost/repo.git".to_string(),
        "http://github.com/a/b.git".to_string(),
        "https://git.internal.example/repo.git".to_string(),
        "ssh://git@github.com/a/b.git".to_string(),
    ] {
        let body = json!({"session_id": "ses_clone", "repository": {"clone_url": url, "base_branch": "main"}});
        let (st, v) = p.call("POST", "/v1/sandboxes", Some(body)).await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (400, Some("invalid_repository")),
            "{url}: {v}"
        );
        let build = json!({"repository": {"clone_url": url, "base_branch": "main"}});
        let (st, v) = p.call("POST", "/v1/images", Some(build)).await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (400, Some("invalid_repository")),
            "{url}: {v}"
        );
    }
    let (_, list) = p.call("GET", "/v1/sandboxes", None).await;
    assert_eq!(list["sandboxes"], json!([]), "{list}");
    let made = std::fs::read_dir(p.root.join("state").join("sandboxes"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(made, 0, "a sandbox directory was created");
}

/// The model key stays with the provider: the sandbox's OpenCode holds only a token of its
/// own, the model proxy swaps it for the key, and a wrong token never reaches the model.
#[tokio::test]
async fn the_model_key_never_enters_the_sandbox_and_the_proxy_adds_it() {
    let model = upstream().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let opencode = root.join("node_modules/opencode-linux-x64/bin/opencode");
    let plugins = root.join("node_modules");
    let model_url = format!("http://127.0.0.1:{}/v1", model.port);
    let key = "sk-very-secret-model-key-0123456789";
    // Another vendor's key (one of OpenCode's own providers), its endpoint the same fake.
    let vendor_key = "sk-ant-vendor-secret-key-9876543210";
    let vendor_url = format!("http://127.0.0.1:{}/anthropic-v1", model.port);
    let p = start(&[
        ("NIGHTSHIFT_OPENCODE_BIN", &opencode.to_string_lossy()),
        ("NIGHTSHIFT_PLUGIN_MODULES", &plugins.to_string_lossy()),
        ("NIGHTSHIFT_MODEL_URL", &model_url),
        ("NIGHTSHIFT_MODEL_KEY", key),
        ("ANTHROPIC_API_KEY", vendor_key),
        ("ANTHROPIC_BASE_URL", &vendor_url),
    ])
    .await;
    let remote = remote_repo(&p.root);
    let body = json!({"session_id": "ses_key", "repository": {"clone_url": remote, "base_branch": "main"}});
    let (st, s) = p.call("POST", "/v1/sandboxes", Some(body)).await;
    assert_eq!(st, 201, "{s}");
    let id = s["id"].as_str().expect("id").to_string();
    p.wait_status(&id, &["ready"]).await;
    // Nowhere in the sandbox: not in any process's environment, not in any file it can read.
    let found = p
        .exec_out(
            &id,
            &format!("grep -rlE '{key}|{vendor_key}' \"$HOME\" /proc/[0-9]*/environ 2>/dev/null; echo done"),
        )
        .await;
    assert_eq!(found.trim(), "done", "the key is inside: {found}");
    // OpenCode's model endpoint is the proxy, with the sandbox's own token.
    let config = p
        .exec_out(&id, "cat \"$HOME/.config/opencode/opencode.json\"")
        .await;
    let config: Value = serde_json::from_str(&config).expect("config json");
    let options = &config["provider"]["nightshift"]["options"];
    assert_eq!(options["baseURL"], "http://model.nightshift.internal/v1");
    let token = options["apiKey"].as_str().expect("token").to_string();
    assert_ne!(token, key);
    let wrong = p
        .exec_out(
            &id,
            "curl -s --max-time 10 http://model.nightshift.internal/v1/models -H 'authorization: Bearer not-mine'",
        )
        .await;
    assert!(wrong.contains("bad_model_token"), "{wrong}");
    assert!(model.hits().is_empty(), "{:?}", model.hits());
    let right = p
        .exec_out(
            &id,
            &format!("curl -s --max-time 10 http://model.nightshift.internal/v1/models -H 'authorization: Bearer {token}'"),
        )
        .await;
    assert!(right.contains("\"ok\":true"), "{right}");
    let hits = model.hits();
    assert_eq!(hits.len(), 1, "{hits:?}");
    assert!(
        hits[0]
            .to_ascii_lowercase()
            .contains(&format!("authorization: bearer {key}")),
        "{}",
        hits[0]
    );
    // OpenCode's Anthropic provider points at the proxy with the same token; the proxy puts
    // the vendor's key in the header the SDK used (`x-api-key`) and keeps the rest.
    let vendor = &config["provider"]["anthropic"]["options"];
    assert_eq!(
        vendor["baseURL"],
        "http://model.nightshift.internal/anthropic"
    );
    assert_eq!(vendor["apiKey"], token.as_str());
    let right = p
        .exec_out(
            &id,
            &format!("curl -s --max-time 10 -X POST http://model.nightshift.internal/anthropic/messages -H 'x-api-key: {token}' -H 'anthropic-version: 2023-06-01' -d '{{}}'"),
        )
        .await;
    assert!(right.contains("\"ok\":true"), "{right}");
    let hits = model.hits();
    assert_eq!(hits.len(), 2, "{hits:?}");
    let head = hits[1].to_ascii_lowercase();
    assert!(head.starts_with("post /anthropic-v1/messages"), "{head}");
    assert!(head.contains(&format!("x-api-key: {vendor_key}")), "{head}");
    assert!(head.contains("anthropic-version: 2023-06-01"), "{head}");
    assert!(!head.contains(&token), "{head}");
}

/// A restart loses nothing the provider acknowledged: a ready image is usable again (a cold
/// start from it works), and a sandbox whose processes ended with the old run is `lost`.
#[tokio::test]
async fn a_restarted_provider_finds_its_images_and_reports_its_sandboxes_lost() {
    let first = start(&[]).await;
    let root = first.root.clone();
    let remote = remote_repo(&root);
    let img = first
        .build(&remote, &["echo built > .built"], None, json!({}))
        .await;
    assert_eq!(img["status"], "ready", "{img}");
    let image = img["id"].as_str().expect("image").to_string();
    let body = json!({"session_id": "ses_restart", "repository": {"clone_url": remote, "base_branch": "main"}, "image": image});
    let (st, s) = first
        .call("POST", "/v1/sandboxes", Some(body.clone()))
        .await;
    assert_eq!(st, 201, "{s}");
    let id = s["id"].as_str().expect("id").to_string();
    first.wait_status(&id, &["ready"]).await;
    drop(first);

    let again = start_at(root, &[]).await;
    let (st, v) = again
        .call("GET", &format!("/v1/images/{image}"), None)
        .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("ready")), "{v}");
    let (st, v) = again
        .call("GET", &format!("/v1/sandboxes/{id}"), None)
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (v["status"].as_str(), v["error"]["code"].as_str()),
        (Some("failed"), Some("lost")),
        "{v}"
    );
    let (_, list) = again
        .call("GET", "/v1/sandboxes?session_id=ses_restart", None)
        .await;
    assert_eq!(
        list["sandboxes"].as_array().map(Vec::len),
        Some(1),
        "{list}"
    );
    // A cold start from the latest image still works after the restart.
    let (st, s) = again.call("POST", "/v1/sandboxes", Some(body)).await;
    assert_eq!(st, 201, "{s}");
    let fresh = s["id"].as_str().expect("id").to_string();
    again.wait_status(&fresh, &["ready"]).await;
    let built = again.exec_out(&fresh, "cat .built").await;
    assert_eq!(built.trim(), "built");
}

/// A dev-mode local remote is readable inside the sandbox but never writable: a write or a
/// push to it fails, and the relay brings over only the session's `nightshift/…` branch.
#[tokio::test]
async fn a_local_remote_is_read_only_inside_and_only_the_session_branch_is_relayed() {
    let p = start(&[]).await;
    let remote = remote_repo(&p.root);
    let body = json!({"session_id": "ses_relay", "repository": {"clone_url": remote, "base_branch": "main"}});
    let (st, s) = p.call("POST", "/v1/sandboxes", Some(body)).await;
    assert_eq!(st, 201, "{s}");
    let id = s["id"].as_str().expect("id").to_string();
    p.wait_status(&id, &["ready"]).await;
    let before = sh(
        &remote,
        "git for-each-ref --format='%(refname) %(objectname)'",
    );
    let out = p
        .exec_out(
            &id,
            &format!(
                "touch {}/planted 2>&1 || echo refused; git -c user.name=x -c user.email=x@y commit -q --allow-empty -m x && git push -q origin HEAD:refs/heads/main 2>&1 || echo push-refused",
                remote.display()
            ),
        )
        .await;
    assert!(
        out.contains("refused") && out.contains("push-refused"),
        "{out}"
    );
    assert!(!remote.join("planted").exists());
    // The relay takes only the session's branch, from the provider's outbox.
    let out = p
        .exec_out(
            &id,
            "git push -q --force /run/nightshift/outbox.git HEAD:refs/heads/main HEAD:refs/heads/nightshift/ses_relay && \
             curl -s -X POST 'http://git.nightshift.internal/relay?branch=main'; echo; \
             curl -s -X POST 'http://git.nightshift.internal/relay?branch=nightshift/ses_relay'",
        )
        .await;
    assert!(out.contains("branch_refused"), "{out}");
    assert!(out.contains("\"relayed\""), "{out}");
    let after = sh(
        &remote,
        "git for-each-ref --format='%(refname) %(objectname)'",
    );
    let main_before = before.lines().find(|l| l.starts_with("refs/heads/main "));
    let main_after = after.lines().find(|l| l.starts_with("refs/heads/main "));
    assert_eq!(main_before, main_after, "main moved");
    assert!(
        after.contains("refs/heads/nightshift/ses_relay "),
        "{after}"
    );
}

/// A whole sandbox's process count is limited (its own `pids` cgroup: rlimits count per user and
/// do not hold for a provider running as root), and everything in its group dies at terminate.
#[tokio::test]
async fn a_sandbox_cannot_start_more_processes_than_its_limit() {
    let p = start(&[("PROVIDER_LIMIT_PROCS", "200")]).await;
    let (_, health) = p.call("GET", "/v1/health", None).await;
    if std::env::var("NIGHTSHIFT_TEST_ALLOW_NO_CGROUP").as_deref() != Ok("1") {
        assert_eq!(
            health["limits"]["processes"], "cgroup",
            "no pids cgroup here (set NIGHTSHIFT_TEST_ALLOW_NO_CGROUP=1 to run without): {health}"
        );
    }
    let remote = remote_repo(&p.root);
    let id = p.sandbox(&remote).await;
    let secs = (300_000 + rand::random::<u32>() % 100_000).to_string();
    // Up to 400 children (a fork that fails ends the loop), then a wait that needs no fork.
    // perl-base is part of every Debian system; a shell would exit at its first failed fork.
    let script = format!(
        "my $n = 0; for (1..400) {{ my $pid = fork(); last unless defined $pid; if ($pid == 0) {{ exec('sleep', '{secs}'); exit 1 }} $n++ }} print \"$n\\n\"; sleep 600"
    );
    let exec = p.exec(
        &id,
        json!({"command": ["perl", "-e", script], "timeout_ms": 60000}),
    );
    let watch = async {
        // Counted from the host, until the number stops growing.
        let t = Instant::now();
        let (mut last, mut steady) = (0, Instant::now());
        let started = loop {
            let n = running(&["sleep", &secs]).len();
            if n != last {
                (last, steady) = (n, Instant::now());
            } else if n > 0 && steady.elapsed() > Duration::from_secs(1) {
                break n;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "only {n} started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // The host can still start processes meanwhile.
        assert_eq!(sh(&p.root, "echo ok"), "ok");
        let (st, _) = p
            .call("POST", &format!("/v1/sandboxes/{id}/terminate"), None)
            .await;
        assert_eq!(st, 200);
        started
    };
    let (_, started) = tokio::join!(exec, watch);
    assert!(
        started < 200,
        "{started} processes started past a limit of 200"
    );
    assert!(
        running(&["sleep", &secs]).is_empty(),
        "a sandbox process survived terminate"
    );
}

/// A sandbox that fills its disk past `PROVIDER_LIMIT_DISK_MB` is ended with `disk_limit` and its
/// files removed; another sandbox on the same provider goes on.
#[tokio::test]
async fn a_sandbox_over_its_disk_limit_is_ended_with_a_clear_error() {
    let p = start(&[
        ("PROVIDER_LIMIT_DISK_MB", "40"),
        ("PROVIDER_DISK_CHECK_MS", "100"),
    ])
    .await;
    let remote = remote_repo(&p.root);
    let other = p.sandbox(&remote).await;
    let id = p.sandbox(&remote).await;
    let (st, out) = p
        .exec(
            &id,
            json!({"command": ["sh", "-c", "dd if=/dev/zero of=big bs=1M count=64 2>&1; sleep 30"], "timeout_ms": 60000}),
        )
        .await;
    assert!(st >= 200, "{out}");
    let t = Instant::now();
    let ended = loop {
        let (_, s) = p.call("GET", &format!("/v1/sandboxes/{id}"), None).await;
        if s["status"] == "failed" {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "never ended: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ended["error"]["code"], "disk_limit", "{ended}");
    assert!(
        !p.root
            .join("state/sandboxes")
            .join(&id)
            .join("repo/big")
            .exists(),
        "the sandbox's files are still there"
    );
    let (_, s) = p.call("GET", &format!("/v1/sandboxes/{other}"), None).await;
    assert_eq!(s["status"], "ready", "{s}");
    assert_eq!(p.exec_out(&other, "echo alive").await.trim(), "alive");
}
