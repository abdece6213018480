//! Fast starts end to end on the local provider: registered repositories, image builds, warm pools (prompt and typing claims, drain on a new image) and restore from snapshots.

use std::time::{Duration, Instant};

use nightshift_tests::{git, pool_ready, Api, Compute, Server, User, Ws, RUN};
use serde_json::{json, Value};

async fn start(recording: Value, extra: &[(&str, &str)]) -> (Compute, Server) {
    nightshift_tests::start_with_compute(recording, &[], extra).await
}

/// Polls the repository until `want` holds (builds and pool refills run on the object's alarm).
async fn repo_until(
    api: &Api,
    who: &User,
    name: &str,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> Value {
    let t = Instant::now();
    loop {
        let (st, v) = api
            .call("GET", &format!("/repositories/{name}"), who, None)
            .await;
        assert_eq!(st, 200, "{v}");
        if want(&v) {
            return v;
        }
        assert!(t.elapsed() < RUN, "{what} never happened: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tool_output(ws: &Ws, prompt: &str, tool: &str) -> String {
    ws.seen
        .iter()
        .filter(|e| e["type"] == "agent.tool" && e["prompt"] == prompt && e["tool"] == tool)
        .filter(|e| e["status"] == "completed")
        .map(|e| e["output"].to_string())
        .collect()
}

fn spawn_details(ws: &Ws) -> Vec<String> {
    ws.seen
        .iter()
        .filter(|e| e["type"] == "sandbox.status" && e["stage"] == "spawning")
        .filter_map(|e| e["detail"].as_str().map(String::from))
        .collect()
}

#[tokio::test]
async fn warm_pools_serve_prompts_and_typing_and_a_new_image_drains_them() {
    let recording = json!({"turns": [
        {"text": "Checking the checkout.", "tool_calls": [{"name": "bash", "arguments": {"command": "cat .warm", "description": "Show the warm-up file"}}]},
        {"text": "The image was warmed."},
        {"text": "Typed and sent."}
    ]});
    let (compute, server) = start(recording, &[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let remote = compute.remote_repo("demo");

    // Bad settings change nothing; good ones register and start the first build.
    let (st, v) = api
        .call(
            "POST",
            "/repositories",
            &ada,
            Some(json!({"name": "demo", "clone_url": remote, "pool_size": 99})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid_repository")),
        "{v}"
    );
    let (st, v) = api.call("GET", "/repositories/demo", &ada, None).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("repository_not_found")),
        "{v}"
    );
    let settings = json!({"name": "demo", "clone_url": remote, "setup": ["echo warmed > .warm"],
        "test": "test -f .warm", "pool_size": 1});
    let (st, v) = api
        .call("POST", "/repositories", &ada, Some(settings.clone()))
        .await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["builds"][0]["reason"], "registered");
    let (st, v) = api
        .call("POST", "/repositories", &ada, Some(settings))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("repository_exists"))
    );
    let (_, list) = api.call("GET", "/repositories", &ada, None).await;
    assert_eq!(
        list["repositories"][0]["repository"]["name"], "demo",
        "{list}"
    );

    let v = repo_until(
        &api,
        &ada,
        "demo",
        "a full pool from the first image",
        pool_ready,
    )
    .await;
    let first_image = v["latest_image"].as_str().expect("image").to_string();
    let build = &v["builds"][0];
    assert_eq!(
        (build["status"].as_str(), build["test_exit_code"].as_i64()),
        (Some("ready"), Some(0)),
        "{v}"
    );
    assert!(
        build["tags"]
            .as_array()
            .is_some_and(|t| t.contains(&json!("latest"))),
        "{v}"
    );
    // The build's log is visible (server-sent events from the provider's build log).
    let log = reqwest::Client::new()
        .get(format!(
            "{}/repositories/demo/builds/{first_image}/logs",
            server.base
        ))
        .bearer_auth(&ada.token)
        .send()
        .await
        .expect("build log")
        .text()
        .await
        .unwrap_or_default();
    assert!(
        log.contains("data: $ echo warmed > .warm") && log.contains("data: image ready"),
        "{log}"
    );
    let (st, nope) = api
        .call("GET", "/repositories/demo/builds/img_nope/logs", &ada, None)
        .await;
    assert_eq!(
        (st, nope["error"]["code"].as_str()),
        (404, Some("image_not_found"))
    );
    let pooled = v["pool"]["sandboxes"][0]["sandbox"]
        .as_str()
        .expect("pooled")
        .to_string();

    // A prompt starts on the pooled sandbox, whose checkout has the image's setup work.
    let (s1, _) = api
        .create_session_on(&ada, "Warm", std::path::Path::new("demo"))
        .await;
    let mut w1 = api.connect(&ada, &s1, "ada-1", 0).await;
    let p1 = api.prompt(&ada, &s1, "Is the checkout warm?").await;
    let f1 = w1.finished(&p1).await;
    assert_eq!(f1["ok"], true, "{f1}");
    assert_eq!(spawn_details(&w1).len(), 2, "{:?}", spawn_details(&w1));
    assert!(
        spawn_details(&w1)
            .iter()
            .any(|d| d.contains("claimed a warm sandbox")),
        "{:?}",
        spawn_details(&w1)
    );
    assert!(
        tool_output(&w1, &p1, "bash").contains("warmed"),
        "{:?}",
        w1.seen
    );
    let (_, mine) = api
        .call("GET", &format!("/sandbox?session_id={s1}"), &ada, None)
        .await;
    assert_eq!(
        mine["sandboxes"][0]["id"],
        pooled.as_str(),
        "the pooled sandbox itself: {mine}"
    );

    // Typing claims the refilled pool's sandbox before any prompt is sent.
    let v = repo_until(&api, &ada, "demo", "the pool refilled", |v| {
        pool_ready(v) && v["pool"]["sandboxes"][0]["sandbox"] != pooled.as_str()
    })
    .await;
    let second = v["pool"]["sandboxes"][0]["sandbox"]
        .as_str()
        .expect("pooled")
        .to_string();
    let (s2, _) = api
        .create_session_on(&ada, "Typing", std::path::Path::new("demo"))
        .await;
    let mut w2 = api.connect(&ada, &s2, "ada-2", 0).await;
    w2.send(json!({"type": "typing", "typing": true})).await;
    let claimed = w2
        .event_within(RUN, "sandbox.status", |e| {
            e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("claimed a warm sandbox"))
        })
        .await;
    w2.event_within(RUN, "sandbox.status", |e| e["stage"] == "ready")
        .await;
    assert!(
        !w2.seen.iter().any(|e| e["type"] == "prompt.queued"),
        "no prompt was sent yet: {claimed}"
    );
    let p2 = api.prompt(&ada, &s2, "Now the prompt").await;
    assert_eq!(w2.finished(&p2).await["ok"], true);
    assert_eq!(
        spawn_details(&w2).len(),
        2,
        "one sandbox, got by typing: {:?}",
        spawn_details(&w2)
    );
    let (_, mine) = api
        .call("GET", &format!("/sandbox?session_id={s2}"), &ada, None)
        .await;
    assert_eq!(mine["sandboxes"][0]["id"], second.as_str());

    // A new image (the setup changed) drains the idle pool and refills it from the new image.
    let v = repo_until(&api, &ada, "demo", "the pool refilled again", |v| {
        pool_ready(v) && v["pool"]["sandboxes"][0]["sandbox"] != second.as_str()
    })
    .await;
    let old = v["pool"]["sandboxes"][0]["sandbox"]
        .as_str()
        .expect("pooled")
        .to_string();
    let (st, v) = api
        .call(
            "PATCH",
            "/repositories/demo",
            &ada,
            Some(json!({"setup": ["echo v2 > .warm"]})),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let v = repo_until(&api, &ada, "demo", "a new image and a pool from it", |v| {
        v["latest_image"] != first_image.as_str() && pool_ready(v)
    })
    .await;
    let new_image = v["latest_image"].as_str().expect("image");
    assert_eq!(v["pool"]["sandboxes"][0]["image"], new_image);
    let (_, gone) = compute
        .provider("GET", &format!("/v1/sandboxes/{old}"), None)
        .await;
    assert_eq!(
        gone["status"], "terminated",
        "the old image's idle sandbox was drained: {gone}"
    );

    // Rolling back is one call; a failed build never becomes latest.
    let (st, v) = api
        .call(
            "POST",
            "/repositories/demo/rollback",
            &ada,
            Some(json!({"image": first_image})),
        )
        .await;
    assert_eq!(
        (st, v["latest_image"].as_str()),
        (200, Some(first_image.as_str())),
        "{v}"
    );
    let (st, v) = api
        .call(
            "POST",
            "/repositories/demo/rollback",
            &ada,
            Some(json!({"image": "img_nope"})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("image_not_found"))
    );
    let (st, _) = api
        .call(
            "PATCH",
            "/repositories/demo",
            &ada,
            Some(json!({"setup": ["exit 9"]})),
        )
        .await;
    assert_eq!(st, 200);
    let v = repo_until(&api, &ada, "demo", "the failing build to finish", |v| {
        v["builds"][0]["status"] == "failed"
    })
    .await;
    assert_eq!(v["latest_image"], first_image.as_str(), "{v}");
    assert!(
        v["builds"][0]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("setup_failed")),
        "{v}"
    );
}

#[tokio::test]
async fn a_follow_up_after_the_sandbox_exited_restores_the_newest_snapshot() {
    let recording = json!({"turns": [
        {"when": "Write notes", "text": "Writing notes.", "tool_calls": [{"name": "write", "arguments": {"filePath": "notes.txt", "content": "turn one\n"}}]},
        // Work that is never committed (an ignored draft) and a tracked file deleted.
        {"when": "Write notes", "text": "A draft, and README goes.", "tool_calls": [{"name": "bash", "arguments": {"command": "printf 'draft.txt\\n' > .gitignore && echo uncommitted draft > draft.txt && rm README.md && echo done", "description": "Draft and delete"}}]},
        {"when": "Write notes", "text": "Written."},
        // The restored sandbox's agent starts a new conversation (the files are what carries over).
        {"when": "Read the notes", "text": "Reading them back.", "tool_calls": [{"name": "bash", "arguments": {"command": "cat notes.txt draft.txt; test -e README.md && echo README-present || echo README-absent", "description": "Read the notes"}}]},
        {"when": "Read the notes", "text": "They survived."},
        {"when": "Start over", "text": "Looking again.", "tool_calls": [{"name": "bash", "arguments": {"command": "cat notes.txt", "description": "Read the notes"}}]},
        {"when": "Start over", "text": "Still here."}
    ]});
    let (compute, server) = start(recording, &[("SANDBOX_GRACE_MS", "1000")]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let remote = compute.remote_repo("snap");
    let (id, _) = api.create_session_on(&ada, "Snapshots", &remote).await;
    let mut ws = api.connect(&ada, &id, "ada", 0).await;
    let p1 = api.prompt(&ada, &id, "Write notes").await;
    assert_eq!(ws.finished(&p1).await["ok"], true);
    assert!(
        tool_output(&ws, &p1, "bash").contains("done"),
        "{:?}",
        ws.seen
    );

    // The turn's snapshot lands shortly after it ends.
    let t = Instant::now();
    let snap = loop {
        let (_, v) = api
            .call("GET", &format!("/sessions/{id}"), &ada, None)
            .await;
        if let Some(s) = v["snapshots"].as_array().and_then(|s| s.last()).cloned() {
            break s;
        }
        assert!(t.elapsed() < RUN, "no snapshot after the turn: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(snap["turn"], 1, "{snap}");

    // The sandbox dies; the session notices.
    let sbx = api.session_sandbox(&ada, &id).await;
    let (st, _) = compute
        .provider("POST", &format!("/v1/sandboxes/{sbx}/terminate"), None)
        .await;
    assert_eq!(st, 200);
    ws.event_within(RUN, "sandbox.status", |e| e["stage"] == "lost")
        .await;
    // Only the snapshot holds turn one's work now: its pushed branch is taken off the remote
    // (a fresh clone would get main: no notes, README there), and its draft was never committed.
    let branch = format!("refs/heads/nightshift/{id}");
    let pushed = git(&remote, &["rev-parse", &branch]);
    git(&remote, &["update-ref", "-d", &branch]);

    // The follow-up runs on a sandbox restored from the snapshot: turn one's files are there,
    // committed or not, and the file it deleted is still gone.
    let p2 = api.prompt(&ada, &id, "Read the notes").await;
    assert_eq!(ws.finished(&p2).await["ok"], true);
    let restored = spawn_details(&ws);
    assert!(
        restored.iter().any(|d| d.contains(&format!(
            "restored snapshot {}",
            snap["id"].as_str().unwrap_or("?")
        ))),
        "{restored:?}"
    );
    let read = tool_output(&ws, &p2, "bash");
    for want in ["turn one", "uncommitted draft", "README-absent"] {
        assert!(read.contains(want), "{want} missing after restore: {read}");
    }
    assert!(!read.contains("README-present"), "{read}");
    // The branch comes back for the fresh start below.
    git(&remote, &["update-ref", &branch, &pushed]);

    // The provider loses every snapshot and the sandbox dies again: the session says so and
    // starts fresh, continuing its pushed branch (turn one's commit is there).
    let snaps = session_snapshot(&api, &ada, &id, |s| {
        s.last().is_some_and(|x| x["turn"] == 2)
    })
    .await;
    for s in &snaps {
        let (st, _) = compute
            .provider(
                "DELETE",
                &format!("/v1/snapshots/{}", s["id"].as_str().unwrap_or("?")),
                None,
            )
            .await;
        assert_eq!(st, 200);
    }
    let (_, mine) = api
        .call("GET", &format!("/sandbox?session_id={id}"), &ada, None)
        .await;
    let live = mine["sandboxes"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["status"] == "ready"))
        .cloned();
    let sbx = live
        .and_then(|s| s["id"].as_str().map(String::from))
        .expect("the restored sandbox");
    let mark = ws.last_seq;
    compute
        .provider("POST", &format!("/v1/sandboxes/{sbx}/terminate"), None)
        .await;
    ws.event_within(RUN, "sandbox.status", |e| {
        e["stage"] == "lost" && e["seq"].as_u64() > Some(mark)
    })
    .await;
    let p3 = api.prompt(&ada, &id, "Start over").await;
    assert_eq!(ws.finished(&p3).await["ok"], true);
    let details: Vec<String> = spawn_details(&ws)
        .into_iter()
        .skip(restored.len())
        .collect();
    assert!(
        details
            .iter()
            .any(|d| d.contains("is gone (snapshot_not_found); starting fresh")),
        "{details:?}"
    );
    assert!(
        details
            .iter()
            .any(|d| d.contains(&format!("continuing nightshift/{id}"))),
        "{details:?}"
    );
    assert!(
        tool_output(&ws, &p3, "bash").contains("turn one"),
        "{:?}",
        ws.seen
    );
}

#[tokio::test]
async fn cold_starts_use_the_latest_image_cron_builds_once_per_slot_and_snapshots_are_kept_up() {
    let recording = json!({"turns": [
        {"text": "Checking.", "tool_calls": [{"name": "bash", "arguments": {"command": "cat .warm", "description": "Show the warm-up file"}}]},
        {"text": "Checked."}
    ]});
    // Sandboxes live 24 h; this margin asks for their snapshot 3 s after they start, and
    // snapshots live 4 s, so the upkeep is seen within the test.
    let (compute, server) = start(
        recording,
        &[
            ("SNAPSHOT_MARGIN_MS", "86397000"),
            ("SNAPSHOT_TTL_MS", "4000"),
        ],
    )
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let remote = compute.remote_repo("cold");
    let settings = json!({"name": "cold", "clone_url": remote, "setup": ["echo warmed > .warm"]});
    let (st, v) = api
        .call("POST", "/repositories", &ada, Some(settings))
        .await;
    assert_eq!(st, 201, "{v}");
    let v = repo_until(&api, &ada, "cold", "the first image", |v| {
        !v["latest_image"].is_null()
    })
    .await;
    let image = v["latest_image"].as_str().expect("image").to_string();

    // A repository that cannot be cloned: its build fails visibly; nothing becomes latest.
    let missing = compute.dir.join("missing.git");
    let (st, v) = api
        .call(
            "POST",
            "/repositories",
            &ada,
            Some(json!({"name": "gone", "clone_url": missing})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let v = repo_until(&api, &ada, "gone", "the failed build", |v| {
        v["builds"][0]["status"] == "failed"
    })
    .await;
    assert!(
        v["builds"][0]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("repository_not_found")),
        "{v}"
    );
    assert!(v["latest_image"].is_null(), "{v}");

    // The cron is delivered four times at once for one scheduled time (duplicated, overlapping
    // deliveries), then once more after that build is done: one build. The scheduled time is
    // fixed (the middle of the current 30-minute slot), so the deliveries cannot straddle a slot.
    let every_ms: u64 = 30 * 60_000;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let at = now_ms / every_ms * every_ms + every_ms / 2;
    let http = reqwest::Client::new();
    let cron = || {
        let url = format!(
            "{}/cdn-cgi/handler/scheduled?cron=*/30+*+*+*+*&time={at}",
            server.base
        );
        let http = http.clone();
        async move {
            let r = http.get(url).send().await.expect("scheduled");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    };
    let fired = tokio::join!(cron(), cron(), cron(), cron());
    let ok = (200, "ok".to_string());
    assert_eq!(
        fired,
        (ok.clone(), ok.clone(), ok.clone(), ok.clone()),
        "{fired:?}"
    );
    let crons = |v: &Value| {
        v["builds"].as_array().map_or(0, |b| {
            b.iter()
                .filter(|b| b["reason"].as_str().is_some_and(|r| r.starts_with("cron:")))
                .count()
        })
    };
    let v = repo_until(&api, &ada, "cold", "the cron build", |v| {
        v["builds"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("cron:"))
            && v["builds"]
                .as_array()
                .is_some_and(|b| b.iter().all(|b| b["status"] != "building"))
    })
    .await;
    assert_eq!(
        v["builds"][0]["reason"],
        format!("cron:{}", at / every_ms),
        "{v:#}"
    );
    assert_eq!(v["builds"][0]["status"], "ready", "{v:#}");
    assert_eq!(cron().await, ok);
    let (_, after) = api.call("GET", "/repositories/cold", &ada, None).await;
    assert_eq!((crons(&v), crons(&after)), (1, 1), "{after:#}");

    // No pool: the prompt starts cold, from the latest image (its setup's file is there).
    let latest = after["latest_image"].as_str().expect("latest").to_string();
    assert_ne!(latest, image);
    let (s1, _) = api
        .create_session_on(&ada, "Cold", std::path::Path::new("cold"))
        .await;
    let mut ws = api.connect(&ada, &s1, "ada", 0).await;
    let p1 = api.prompt(&ada, &s1, "Cold start").await;
    assert_eq!(ws.finished(&p1).await["ok"], true);
    let details = spawn_details(&ws);
    assert!(
        details
            .iter()
            .any(|d| d == &format!("starting a sandbox from image {latest}")),
        "{details:?}"
    );
    assert!(
        tool_output(&ws, &p1, "bash").contains("warmed"),
        "{:?}",
        ws.seen
    );

    // A sandbox nearing its time limit is snapshotted with no prompt run; expired snapshots are deleted.
    let (s2, _) = api
        .create_session_on(&ada, "Idle", std::path::Path::new("cold"))
        .await;
    let (st, v) = api
        .call("POST", "/sandbox", &ada, Some(json!({"session_id": s2})))
        .await;
    assert!(st == 200 || st == 201, "{st} {v}");
    let first = session_snapshot(&api, &ada, &s2, |s| !s.is_empty()).await[0].clone();
    assert_eq!(first["turn"], 0, "{first}");
    let id = first["id"].as_str().expect("snapshot id").to_string();
    session_snapshot(&api, &ada, &s2, |s| {
        !s.iter().any(|x| x["id"] == id.as_str())
    })
    .await;
    let t = Instant::now();
    loop {
        let (st, _) = compute
            .provider("GET", &format!("/v1/snapshots/{id}"), None)
            .await;
        if st == 404 && !compute.dir.join("provider/snapshots").join(&id).exists() {
            break;
        }
        assert!(t.elapsed() < RUN, "expired snapshot {id} was never deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls the session's snapshots until `want` holds.
async fn session_snapshot(
    api: &Api,
    who: &User,
    session: &str,
    want: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let t = Instant::now();
    loop {
        let (_, v) = api
            .call("GET", &format!("/sessions/{session}"), who, None)
            .await;
        let snaps = v["snapshots"].as_array().cloned().unwrap_or_default();
        if want(&snaps) {
            return snaps;
        }
        assert!(t.elapsed() < RUN, "snapshots never as wanted: {v:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
