//! The sandbox API end to end (Worker, local provider, real OpenCode): membership, create/list/get, exec, git, logs, stop/start, terminate, snapshot and restore, bad input.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nightshift_tests::{secs, start_with_compute, Api, Compute, Server, User, Ws, RUN};
use serde_json::{json, Value};

async fn wait_status(api: &Api, who: &User, id: &str, want: &str) -> Value {
    let t = Instant::now();
    loop {
        let (st, v) = api.call("GET", &format!("/sandbox/{id}"), who, None).await;
        assert_eq!(st, 200, "{v}");
        if v["status"] == want {
            return v;
        }
        assert!(t.elapsed() < RUN, "sandbox {id} never became {want}: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a shell script in the sandbox's checkout through the API; returns its stdout.
async fn sh(api: &Api, who: &User, id: &str, script: &str) -> String {
    let (st, out) = api
        .call(
            "POST",
            &format!("/sandbox/{id}/exec"),
            who,
            Some(json!({"command": ["sh", "-c", script]})),
        )
        .await;
    assert_eq!((st, out["exit_code"].as_i64()), (200, Some(0)), "{out}");
    out["stdout"].as_str().unwrap_or_default().to_string()
}

/// The ids of the session's snapshots, as `GET /sessions/:id` lists them.
async fn snapshot_ids(api: &Api, who: &User, sid: &str) -> Vec<String> {
    let (st, v) = api
        .call("GET", &format!("/sessions/{sid}"), who, None)
        .await;
    assert_eq!(st, 200, "{v}");
    v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["id"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// `POST /sandbox/:id/snapshot`; returns (status, body).
async fn take_snapshot(api: &Api, who: &User, id: &str) -> (u16, Value) {
    api.call("POST", &format!("/sandbox/{id}/snapshot"), who, None)
        .await
}

/// `POST /sandbox/restore`; returns (status, body).
async fn restore(api: &Api, who: &User, body: Value) -> (u16, Value) {
    api.call("POST", "/sandbox/restore", who, Some(body)).await
}

fn code(v: &Value) -> Option<&str> {
    v["error"]["code"].as_str()
}

/// How many sandboxes the session has had (live or not), as the API lists them.
async fn sandbox_count(api: &Api, who: &User, sid: &str) -> usize {
    let (st, list) = api
        .call("GET", &format!("/sandbox?session_id={sid}"), who, None)
        .await;
    assert_eq!(st, 200, "{list}");
    list["sandboxes"].as_array().map(Vec::len).unwrap_or(0)
}

/// Sends a prompt and waits until it finished successfully.
async fn run_prompt(api: &Api, who: &User, sid: &str, ws: &mut Ws, text: &str) {
    let (st, p) = api
        .call(
            "POST",
            &format!("/multiplayer/{sid}/prompt"),
            who,
            Some(json!({ "text": text })),
        )
        .await;
    assert_eq!(st, 202, "{p}");
    let id = p["id"].as_str().expect("prompt id").to_string();
    let f = ws
        .event_within(secs(120), "prompt.finished", |e| e["id"] == id.as_str())
        .await;
    assert_eq!(f["ok"], true, "{f}");
}

#[tokio::test]
async fn members_drive_their_sessions_sandbox_and_others_cannot() {
    let turns: Vec<Value> = (0..20)
        .map(|i| json!({"text": format!("answer {i}")}))
        .collect();
    // The one agent-path test with the default presence sweep (60 s; `start_with_compute`
    // turns it off): its client pings as the web app does, so however long the three
    // OpenCode boots take on a loaded machine the sweep keeps it, and the end checks that.
    let compute = Compute::start(&json!({ "turns": turns }), &[]).await;
    let owned = compute.vars();
    let vars: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(&vars).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let eve = api.sign_in("eve").await;
    let remote = compute.remote_repo("api");
    let (sid, _) = api.create_session_on(&ada, "API", &remote).await;
    let mut ws = api
        .connect(&ada, &sid, "web", 0)
        .await
        .pinging(Duration::from_secs(5));

    // Bad input first: nothing is created.
    let (st, v) = api
        .call("POST", "/sandbox", &ada, Some(json!({"session": sid})))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid_body")),
        "{v}"
    );
    let (st, v) = api
        .call("POST", "/sandbox", &eve, Some(json!({"session_id": sid})))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (403, Some("not_member")),
        "{v}"
    );
    let (st, v) = api.call("GET", "/sandbox", &ada, None).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid_query"))
    );
    assert_eq!(sandbox_count(&api, &ada, &sid).await, 0);

    let (st, s) = api
        .call("POST", "/sandbox", &ada, Some(json!({"session_id": sid})))
        .await;
    assert_eq!(st, 201, "{s}");
    let id = s["id"].as_str().expect("id").to_string();
    wait_status(&api, &ada, &id, "ready").await;
    // Asking again returns the same sandbox.
    let (st, again) = api
        .call("POST", "/sandbox", &ada, Some(json!({"session_id": sid})))
        .await;
    assert_eq!(
        (st, again["id"].as_str()),
        (200, Some(id.as_str())),
        "{again}"
    );
    let (st, v) = api
        .call("GET", &format!("/sandbox?session_id={sid}"), &eve, None)
        .await;
    assert_eq!((st, v["error"]["code"].as_str()), (403, Some("not_member")));
    let (st, v) = api.call("GET", &format!("/sandbox/{id}"), &eve, None).await;
    assert_eq!((st, v["error"]["code"].as_str()), (403, Some("not_member")));
    let (st, v) = api
        .call(
            "POST",
            &format!("/sandbox/{id}/exec"),
            &eve,
            Some(json!({"command": ["id"]})),
        )
        .await;
    assert_eq!((st, v["error"]["code"].as_str()), (403, Some("not_member")));

    // Exec, git, logs.
    let (st, out) = api
        .call(
            "POST",
            &format!("/sandbox/{id}/exec"),
            &ada,
            Some(json!({"command": ["cat", "README.md"]})),
        )
        .await;
    assert_eq!(
        (st, out["exit_code"].as_i64(), out["stdout"].as_str()),
        (200, Some(0), Some("# demo\n")),
        "{out}"
    );
    for bad in [json!({"command": []}), json!({"command": [""]})] {
        let (st, v) = api
            .call("POST", &format!("/sandbox/{id}/exec"), &ada, Some(bad))
            .await;
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (400, Some("invalid_command"))
        );
    }
    let (st, v) = api
        .call(
            "POST",
            &format!("/sandbox/{id}/exec"),
            &ada,
            Some(json!({"command": ["ls"], "sudo": true})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid_body"))
    );
    let (st, g) = api
        .call("GET", &format!("/sandbox/{id}/git"), &ada, None)
        .await;
    assert_eq!(
        (st, g["sync"]["state"].as_str(), g["dirty"].as_bool()),
        (200, Some("synced"), Some(false)),
        "{g}"
    );
    let (st, g) = api
        .call("POST", &format!("/sandbox/{id}/git/sync"), &ada, None)
        .await;
    assert_eq!(st, 202, "{g}");
    let r = api
        .http
        .get(format!("{}/sandbox/{id}/logs/supervisor", api.base))
        .bearer_auth(&ada.token)
        .send()
        .await
        .expect("logs");
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap_or("")
        .starts_with("text/event-stream"));
    let text = r.text().await.expect("text");
    assert!(text.contains("data: supervisor:"), "{text}");
    let (st, v) = api
        .call(
            "GET",
            &format!("/sandbox/{id}/logs/..%2F..%2Fetc"),
            &ada,
            None,
        )
        .await;
    assert!(st == 400 || st == 404, "{st} {v}");

    // A prompt runs in this very sandbox.
    run_prompt(&api, &ada, &sid, &mut ws, "first").await;
    assert_eq!(sandbox_count(&api, &ada, &sid).await, 1);

    // Stop keeps it; the next prompt starts it again.
    let (st, v) = api
        .call("POST", &format!("/sandbox/{id}/stop"), &ada, None)
        .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("stopped")), "{v}");
    ws.event("sandbox.status", |e| e["stage"] == "stopped")
        .await;
    run_prompt(&api, &ada, &sid, &mut ws, "second").await;
    assert_eq!(
        sandbox_count(&api, &ada, &sid).await,
        1,
        "started again, not replaced"
    );

    // Terminate retires it; the next prompt gets a new one.
    let (st, v) = api
        .call("POST", &format!("/sandbox/{id}/terminate"), &ada, None)
        .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("terminated")), "{v}");
    ws.event("sandbox.status", |e| e["stage"] == "terminated")
        .await;
    let (st, v) = api
        .call(
            "POST",
            &format!("/sandbox/{id}/exec"),
            &ada,
            Some(json!({"command": ["true"]})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("sandbox_terminated"))
    );
    run_prompt(&api, &ada, &sid, &mut ws, "third").await;
    assert_eq!(sandbox_count(&api, &ada, &sid).await, 2);

    let (st, v) = api.call("GET", "/sandbox/sbx_nope", &ada, None).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("sandbox_not_found"))
    );
    let (st, v) = api.call("GET", "/sandbox/not-an-id", &ada, None).await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("sandbox_not_found"))
    );
    // The pinging client outlived every sweep of the run.
    let (_, pres) = api
        .call("GET", &format!("/multiplayer/{sid}/presence"), &ada, None)
        .await;
    assert!(
        pres["clients"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["client"] == "web")),
        "the pinging client was swept: {pres}"
    );
    ws.send(json!({"type": "ping", "ref": "still-here"})).await;
    ws.until(secs(10), "an answer on the same socket", |v| {
        v["ref"] == "still-here"
    })
    .await;
}

#[tokio::test]
async fn a_snapshot_taken_through_the_api_is_restored_as_the_sessions_sandbox() {
    let recording = json!({"turns": [
        {"when": "Read the notes", "text": "Reading them.", "tool_calls": [{"name": "bash", "arguments": {"command": "cat notes.txt", "description": "Read the notes"}}]},
        {"when": "Read the notes", "text": "They are back."}
    ]});
    let (compute, server) = start_with_compute(recording, &[], &[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let eve = api.sign_in("eve").await;
    let remote = compute.remote_repo("snap");
    let (sid, _) = api.create_session_on(&ada, "Snapshots", &remote).await;
    let mut ws = api.connect(&ada, &sid, "web", 0).await;
    let (st, s) = api
        .call("POST", "/sandbox", &ada, Some(json!({"session_id": sid})))
        .await;
    assert_eq!(st, 201, "{s}");
    let first = s["id"].as_str().expect("id").to_string();
    wait_status(&api, &ada, &first, "ready").await;

    // An uncommitted file, then a snapshot of the checkout as it is now.
    let status = sh(
        &api,
        &ada,
        &first,
        "printf 'uncommitted\\n' > notes.txt && git status --porcelain",
    )
    .await;
    assert!(status.contains("?? notes.txt"), "{status}");
    let (st, v) = take_snapshot(&api, &eve, &first).await;
    assert_eq!((st, code(&v)), (403, Some("not_member")), "{v}");
    let (st, v) = api
        .call(
            "POST",
            &format!("/sandbox/{first}/snapshot"),
            &ada,
            Some(json!({"ttl_ms": 5})),
        )
        .await;
    assert_eq!((st, code(&v)), (400, Some("invalid_body")), "{v}");
    assert!(snapshot_ids(&api, &ada, &sid).await.is_empty());
    let (st, snap) = take_snapshot(&api, &ada, &first).await;
    assert_eq!((st, snap["turn"].as_u64()), (201, Some(0)), "{snap}");
    let snap_id = snap["id"].as_str().expect("snapshot id").to_string();
    assert!(snap_id.starts_with("snp_"), "{snap}");
    // Recorded like a turn's snapshot: the session lists it.
    assert_eq!(
        snapshot_ids(&api, &ada, &sid).await,
        std::slice::from_ref(&snap_id)
    );

    // The checkout moves on: a committed file is deleted, the uncommitted one changes, one is added.
    sh(
        &api,
        &ada,
        &first,
        "rm README.md && printf 'changed\\n' > notes.txt && printf 'later\\n' > later.txt",
    )
    .await;
    let (st, v) = restore(&api, &eve, json!({"session_id": sid, "snapshot": snap_id})).await;
    assert_eq!((st, code(&v)), (403, Some("not_member")), "{v}");

    // Restore: a new sandbox from the snapshot becomes the session's sandbox; the old one is retired.
    let (st, restored) = restore(&api, &ada, json!({"session_id": sid, "snapshot": snap_id})).await;
    assert_eq!(st, 201, "{restored}");
    let second = restored["id"].as_str().expect("id").to_string();
    assert_ne!(second, first);
    wait_status(&api, &ada, &second, "ready").await;
    ws.event("sandbox.status", |e| {
        e["stage"] == "spawning"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.contains(&format!("restored snapshot {snap_id}")))
    })
    .await;
    ws.event("sandbox.status", |e| e["stage"] == "terminated")
        .await;
    let (st, old) = api
        .call("GET", &format!("/sandbox/{first}"), &ada, None)
        .await;
    assert_eq!(
        (st, old["status"].as_str()),
        (200, Some("terminated")),
        "{old}"
    );
    let files = sh(
        &api,
        &ada,
        &second,
        "cat README.md notes.txt; test -e later.txt || echo no-later; git status --porcelain",
    )
    .await;
    // The deleted file is back, the uncommitted one has its snapshot content (still
    // uncommitted), and the file added after the snapshot is not there.
    assert!(
        files.starts_with("# demo\nuncommitted\nno-later\n") && files.contains("?? notes.txt\n"),
        "{files}"
    );

    // It is the session's sandbox: the API hands it out and the next prompt runs in it.
    let (st, again) = api
        .call("POST", "/sandbox", &ada, Some(json!({"session_id": sid})))
        .await;
    assert_eq!(
        (st, again["id"].as_str()),
        (200, Some(second.as_str())),
        "{again}"
    );
    run_prompt(&api, &ada, &sid, &mut ws, "Read the notes").await;
    let read: String = ws
        .seen
        .iter()
        .filter(|e| e["type"] == "agent.tool" && e["tool"] == "bash" && e["status"] == "completed")
        .map(|e| e["output"].to_string())
        .collect();
    assert!(read.contains("uncommitted"), "{:?}", ws.seen);
    assert_eq!(sandbox_count(&api, &ada, &sid).await, 2);

    // Without a name, the newest live snapshot is restored (here the prompt's own).
    let t = Instant::now();
    let newest = loop {
        let ids = snapshot_ids(&api, &ada, &sid).await;
        if ids.len() == 2 {
            break ids[1].clone();
        }
        assert!(
            t.elapsed() < RUN,
            "the prompt's snapshot never landed: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (st, third) = restore(&api, &ada, json!({"session_id": sid})).await;
    assert_eq!(st, 201, "{third}");
    ws.event("sandbox.status", |e| {
        e["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("restored snapshot {newest}")))
    })
    .await;
    let third = third["id"].as_str().expect("id").to_string();
    wait_status(&api, &ada, &third, "ready").await;
    assert_eq!(sandbox_count(&api, &ada, &sid).await, 3);
}

#[tokio::test]
async fn snapshot_and_restore_refuse_bad_input_and_change_nothing() {
    let (compute, server) =
        start_with_compute(json!({"turns": []}), &[], &[("SNAPSHOT_TTL_MS", "8000")]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let eve = api.sign_in("eve").await;
    let remote = compute.remote_repo("bad");
    let (a, _) = api.create_session_on(&ada, "A", &remote).await;
    let (b, _) = api.create_session_on(&ada, "B", &remote).await;

    // Nothing to restore yet, and malformed asks.
    for body in [
        json!({"session_id": a}),
        json!({"session_id": a, "snapshot": "snp_nope"}),
        json!({"session_id": a, "snapshot": "../../etc"}),
    ] {
        let (st, v) = restore(&api, &ada, body).await;
        assert_eq!((st, code(&v)), (404, Some("snapshot_not_found")), "{v}");
    }
    let (st, v) = restore(&api, &ada, json!({"session_id": a, "from": "snp_x"})).await;
    assert_eq!((st, code(&v)), (400, Some("invalid_body")), "{v}");
    let (st, v) = restore(&api, &eve, json!({"session_id": a})).await;
    assert_eq!((st, code(&v)), (403, Some("not_member")), "{v}");
    let (st, v) = take_snapshot(&api, &ada, "sbx_nope").await;
    assert_eq!((st, code(&v)), (404, Some("sandbox_not_found")), "{v}");
    assert_eq!(sandbox_count(&api, &ada, &a).await, 0);

    let (st, s) = api
        .call("POST", "/sandbox", &ada, Some(json!({"session_id": a})))
        .await;
    assert_eq!(st, 201, "{s}");
    let sbx = s["id"].as_str().expect("id").to_string();
    wait_status(&api, &ada, &sbx, "ready").await;
    let (st, v) = take_snapshot(&api, &eve, &sbx).await;
    assert_eq!((st, code(&v)), (403, Some("not_member")), "{v}");
    let (st, s1) = take_snapshot(&api, &ada, &sbx).await;
    assert_eq!(st, 201, "{s1}");
    let s1 = s1["id"].as_str().expect("id").to_string();

    // Another session's snapshot: unknown to this one.
    let (st, v) = restore(&api, &ada, json!({"session_id": b, "snapshot": s1})).await;
    assert_eq!((st, code(&v)), (404, Some("snapshot_not_found")), "{v}");
    assert!(snapshot_ids(&api, &ada, &b).await.is_empty());
    assert_eq!(sandbox_count(&api, &ada, &b).await, 0);

    // Deleted at the provider: refused, and the session keeps its sandbox.
    let (st, _) = compute
        .provider("DELETE", &format!("/v1/snapshots/{s1}"), None)
        .await;
    assert_eq!(st, 200);
    let listed = snapshot_ids(&api, &ada, &a).await;
    let (st, v) = restore(&api, &ada, json!({"session_id": a, "snapshot": s1})).await;
    assert_eq!((st, code(&v)), (404, Some("snapshot_not_found")), "{v}");
    assert_eq!(snapshot_ids(&api, &ada, &a).await, listed);
    assert_eq!(sandbox_count(&api, &ada, &a).await, 1);
    wait_status(&api, &ada, &sbx, "ready").await;

    // Expired: refused by name, and there is no newest live one either.
    let (st, s2) = take_snapshot(&api, &ada, &sbx).await;
    assert_eq!(st, 201, "{s2}");
    let expires = s2["expires_at"].as_u64().expect("expires_at");
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    };
    while now() <= expires + 200 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s2 = s2["id"].as_str().expect("id").to_string();
    for body in [
        json!({"session_id": a, "snapshot": s2}),
        json!({"session_id": a}),
    ] {
        let (st, v) = restore(&api, &ada, body).await;
        assert_eq!((st, code(&v)), (404, Some("snapshot_not_found")), "{v}");
    }
    assert_eq!(sandbox_count(&api, &ada, &a).await, 1);
    wait_status(&api, &ada, &sbx, "ready").await;

    // A terminated sandbox has no checkout to snapshot.
    let (st, v) = api
        .call("POST", &format!("/sandbox/{sbx}/terminate"), &ada, None)
        .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("terminated")), "{v}");
    let listed = snapshot_ids(&api, &ada, &a).await;
    let (st, v) = take_snapshot(&api, &ada, &sbx).await;
    assert_eq!((st, code(&v)), (409, Some("sandbox_terminated")), "{v}");
    assert_eq!(snapshot_ids(&api, &ada, &a).await, listed);
}
