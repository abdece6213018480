//! The local provider through its real HTTP contract: signing, create on a real git repository, exec, git status, logs, snapshots, terminate leaves no processes, and bad input.

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

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
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
    let root = scratch("provider");
    let port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nightshift-provider"));
    cmd.args(["--port", &port.to_string(), "--root"])
        .arg(root.join("state"))
        .env("PROVIDER_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
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
    p
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
        let sig = signing::sign(secret.as_bytes(), method, path, ts, &bytes).expect("sign");
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let r = self
            .http
            .request(m, format!("{}{path}", self.base))
            .header(signing::TIMESTAMP_HEADER, ts.to_string())
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
    let sig = signing::sign(SECRET.as_bytes(), "POST", "/v1/sandboxes", ts, b"{}").expect("sign");
    let r = p
        .http
        .post(format!("{}/v1/sandboxes", p.base))
        .header(signing::TIMESTAMP_HEADER, ts.to_string())
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
    let sig = signing::sign(SECRET.as_bytes(), "GET", &path, ts, b"").expect("sign");
    let r = p
        .http
        .get(format!("{}{path}", p.base))
        .header(signing::TIMESTAMP_HEADER, ts.to_string())
        .header(signing::SIGNATURE_HEADER, sig)
        .send()
        .await
        .expect("logs");
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.expect("text");
    assert!(text.contains("data: supervisor: local API"), "{text}");

    // Snapshot, change the sandbox, restore: the snapshot's checkout comes back.
    let (st, snap) = p
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/snapshot"),
            Some(json!({"ttl_ms": 60000})),
        )
        .await;
    assert_eq!(st, 201, "{snap}");
    let snap_id = snap["id"].as_str().expect("snap id");
    let (st, restored) = p.call("POST", &format!("/v1/snapshots/{snap_id}/restore"), Some(json!({"session_id": "ses_2", "repository": {"clone_url": remote, "base_branch": "main"}}))).await;
    assert_eq!(st, 201, "{restored}");
    let rid = restored["id"].as_str().expect("rid").to_string();
    p.wait_status(&rid, &["ready"]).await;
    let (_, out) = p
        .call(
            "POST",
            &format!("/v1/sandboxes/{rid}/exec"),
            Some(json!({"command": ["cat", "NEW.md"]})),
        )
        .await;
    assert_eq!(out["stdout"], "new\n");

    // List filters by session and label.
    let (_, l) = p.call("GET", "/v1/sandboxes?session_id=ses_1", None).await;
    assert_eq!(l["sandboxes"].as_array().map(Vec::len), Some(1));
    let (_, l) = p.call("GET", "/v1/sandboxes?label=pool:a", None).await;
    assert_eq!(l["sandboxes"][0]["id"], id.as_str());

    // A background process started by exec dies with the sandbox.
    let (st, _) = p
        .call(
            "POST",
            &format!("/v1/sandboxes/{id}/exec"),
            Some(
                json!({"command": ["sh", "-c", "setsid sleep 300 >/dev/null 2>&1 & echo started"]}),
            ),
        )
        .await;
    assert_eq!(st, 200);
    assert!(
        !nightshift_sandbox::procs::marked(&id).is_empty(),
        "the supervisor runs under the sandbox's mark"
    );
    for sid in [&id, &rid] {
        let (st, t) = p
            .call("POST", &format!("/v1/sandboxes/{sid}/terminate"), None)
            .await;
        assert_eq!((st, t["status"].as_str()), (200, Some("terminated")));
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
    let log = p
        .http
        .get(format!("{}/v1/images/{iid}/logs", p.base))
        .header(signing::TIMESTAMP_HEADER, now().to_string())
        .header(
            signing::SIGNATURE_HEADER,
            signing::sign(
                SECRET.as_bytes(),
                "GET",
                &format!("/v1/images/{iid}/logs"),
                now(),
                b"",
            )
            .expect("sign"),
        )
        .send()
        .await
        .expect("logs")
        .text()
        .await
        .unwrap_or_default();
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
        let log = std::fs::read_to_string(
            p.root
                .join("state/sandboxes")
                .join(&id)
                .join("logs/supervisor.log"),
        )
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
