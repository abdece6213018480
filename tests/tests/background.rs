//! Background agents end to end: an agent spawns children with `spawn_session`, waits with `check_session` and reports their branches; limits; cancel cascades; the /background API and its event stream.

use std::time::{Duration, Instant};

use nightshift_tests::{git, start_with_compute, Api, Server, User, RUN};
use serde_json::{json, Value};

/// Polls one agent until `want` holds.
async fn agent_until(api: &Api, who: &User, id: &str, want: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let (st, v) = api
            .call("GET", &format!("/background/{id}"), who, None)
            .await;
        assert_eq!(st, 200, "{v}");
        if want(&v) {
            return v;
        }
        assert!(t.elapsed() < RUN * 2, "agent {id} never got there: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tool_events<'a>(seen: &'a [Value], tool: &str) -> Vec<&'a Value> {
    seen.iter()
        .filter(|e| e["type"] == "agent.tool" && e["tool"] == tool && e["status"] == "completed")
        .collect()
}

#[tokio::test]
async fn an_agent_spawns_two_children_waits_for_them_and_reports_their_branches() {
    let recording = json!({"turns": [
        {"when": "Fan out", "text": "Starting two helpers.", "tool_calls": [
            {"name": "spawn_session", "arguments": {"prompt": "Child A: write a.txt"}},
            {"name": "spawn_session", "arguments": {"prompt": "Child B: write b.txt"}}]},
        {"when": "Fan out", "text": "Waiting for them.", "tool_calls": [
            {"name": "check_session", "arguments": {"wait_seconds": 240}}]},
        {"when": "Fan out", "text": "Both helpers finished; their branches are above."},
        {"when": "Child A", "text": "Writing a.", "tool_calls": [{"name": "write", "arguments": {"filePath": "a.txt", "content": "from A\n"}}]},
        {"when": "Child A", "text": "A done."},
        {"when": "Child B", "text": "Writing b.", "tool_calls": [{"name": "write", "arguments": {"filePath": "b.txt", "content": "from B\n"}}]},
        {"when": "Child B", "text": "B done."}
    ]});
    let (compute, server) = start_with_compute(recording, &[], &[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let bob = api.sign_in("bob").await;
    let remote = compute.remote_repo("fan");
    let (parent, _) = api.create_session_on(&ada, "Fan out", &remote).await;
    let mut ws = api.connect(&ada, &parent, "ada", 0).await;
    let p = api.prompt(&ada, &parent, "Fan out into two helpers").await;
    let done = ws
        .event_within(RUN * 3, "prompt.finished", |e| e["id"] == p.as_str())
        .await;
    assert_eq!(done["ok"], true, "{done}");

    // The agent spawned two children and saw both finish, with their branches.
    let spawned = tool_events(&ws.seen, "spawn_session");
    assert_eq!(spawned.len(), 2, "{:?}", ws.seen);
    let ids: Vec<String> = spawned
        .iter()
        .map(|e| {
            let out: Value =
                serde_json::from_str(e["output"].as_str().unwrap_or("{}")).unwrap_or_default();
            out["id"].as_str().expect("child id").to_string()
        })
        .collect();
    let checked = tool_events(&ws.seen, "check_session");
    let tools: Vec<&Value> = ws
        .seen
        .iter()
        .filter(|e| e["type"] == "agent.tool")
        .collect();
    let first = checked
        .first()
        .unwrap_or_else(|| panic!("no completed check_session: {tools:?}"));
    let report: Value =
        serde_json::from_str(first["output"].as_str().unwrap_or("{}")).unwrap_or_default();
    let children = report["children"].as_array().cloned().unwrap_or_default();
    assert_eq!(children.len(), 2, "{report}");
    for c in &children {
        assert_eq!(c["status"], "completed", "{c}");
        assert!(
            c["branch"]
                .as_str()
                .is_some_and(|b| b.starts_with("nightshift/ses_")),
            "{c}"
        );
    }

    // The parent showed its children live.
    for id in &ids {
        let statuses: Vec<&str> = ws
            .seen
            .iter()
            .filter(|e| e["type"] == "background.child" && e["id"] == id.as_str())
            .filter_map(|e| e["status"].as_str())
            .collect();
        assert_eq!(
            statuses,
            ["queued", "starting", "running", "completed"],
            "{id}"
        );
    }

    // Each child ran in its own session and sandbox and pushed its own branch.
    let (_, list) = api
        .call("GET", &format!("/background?parent={parent}"), &ada, None)
        .await;
    let agents = list["agents"].as_array().cloned().unwrap_or_default();
    assert_eq!(agents.len(), 2, "{list}");
    let mut sandboxes = Vec::new();
    for id in &ids {
        // The children finish in either order: each one's file follows from its prompt.
        let (_, agent) = api
            .call("GET", &format!("/background/{id}"), &ada, None)
            .await;
        let file = if agent["prompt"]
            .as_str()
            .is_some_and(|p| p.contains("Child A"))
        {
            "a.txt"
        } else {
            "b.txt"
        };
        let (st, out) = api
            .call("GET", &format!("/background/{id}/output"), &ada, None)
            .await;
        assert_eq!(st, 200, "{out}");
        assert_eq!(out["files"], json!([file]), "{out}");
        let session = out["session"].as_str().expect("child session").to_string();
        assert_ne!(session, parent);
        assert_eq!(
            out["branch"],
            format!("nightshift/{session}").as_str(),
            "{out}"
        );
        let shown = git(
            &compute.dir,
            &[
                "--git-dir",
                &remote.to_string_lossy(),
                "show",
                &format!("nightshift/{session}:{file}"),
            ],
        );
        assert!(shown.starts_with("from "), "{shown}");
        let (_, sbx) = api
            .call("GET", &format!("/sandbox?session_id={session}"), &ada, None)
            .await;
        sandboxes.push(
            sbx["sandboxes"][0]["id"]
                .as_str()
                .expect("child sandbox")
                .to_string(),
        );
    }
    let (_, own) = api
        .call("GET", &format!("/sandbox?session_id={parent}"), &ada, None)
        .await;
    sandboxes.push(
        own["sandboxes"][0]["id"]
            .as_str()
            .expect("parent sandbox")
            .to_string(),
    );
    sandboxes.sort();
    sandboxes.dedup();
    assert_eq!(sandboxes.len(), 3, "three sandboxes: {sandboxes:?}");

    // Another person sees nothing of them.
    let (st, v) = api
        .call("GET", &format!("/background/{}", ids[0]), &bob, None)
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("agent_not_found"))
    );
    let (_, v) = api
        .call("GET", &format!("/background?parent={parent}"), &bob, None)
        .await;
    assert_eq!(v["agents"], json!([]));

    // The event stream, and resuming it.
    let (text, last) = sse(&server, &ada, &ids[0], None).await;
    let order: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| v["status"].as_str().map(String::from))
        .map(|s| match s.as_str() {
            "queued" => "queued",
            "starting" => "starting",
            "running" => "running",
            _ => "ended",
        })
        .collect();
    assert_eq!(order, ["queued", "starting", "running", "ended"], "{text}");
    let (again, _) = sse(&server, &ada, &ids[0], Some(&last)).await;
    assert!(
        !again.contains("data:"),
        "nothing after the last event: {again}"
    );
    let r = reqwest::Client::new()
        .get(format!("{}/background/{}/events", server.base, ids[0]))
        .bearer_auth(&ada.token)
        .header("last-event-id", "999999999")
        .send()
        .await
        .expect("sse");
    assert_eq!(r.status().as_u16(), 409);
}

/// Reads an agent's whole event stream (it ends when the agent has ended); returns it and the last id.
async fn sse(server: &Server, who: &User, id: &str, last: Option<&str>) -> (String, String) {
    let mut req = reqwest::Client::new()
        .get(format!("{}/background/{id}/events", server.base))
        .bearer_auth(&who.token);
    if let Some(l) = last {
        req = req.header("last-event-id", l);
    }
    let r = req.send().await.expect("sse");
    assert_eq!(r.status().as_u16(), 200);
    let text = tokio::time::timeout(Duration::from_secs(30), r.text())
        .await
        .expect("the stream of an ended agent ends")
        .unwrap_or_default();
    let last = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("id: "))
        .unwrap_or(last.unwrap_or("0"))
        .to_string();
    (text, last)
}

#[tokio::test]
async fn limits_queue_refuse_and_cancelling_a_parent_cancels_its_children() {
    let recording = json!({"turns": [
        {"when": "Parent", "text": "Spawning.", "tool_calls": [{"name": "spawn_session", "arguments": {"prompt": "Slow child"}}]},
        {"when": "Parent", "text": "Waiting.", "tool_calls": [{"name": "check_session", "arguments": {"wait_seconds": 600}}]},
        {"when": "Parent", "text": "Never reached."},
        {"when": "Slow child", "text": "Thinking for a long time.", "delay_ms": 600000},
        {"when": "Quick", "text": "Quick done."}
    ]});
    let (compute, server) = start_with_compute(
        recording,
        &[],
        &[("BG_MAX_CONCURRENT", "2"), ("BG_MAX_QUEUED", "1")],
    )
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let remote = compute.remote_repo("limits");
    let spawn = |prompt: &str| json!({"prompt": prompt, "repository": remote});

    // The parent runs and spawns a child that keeps running.
    let (st, parent) = api
        .call(
            "POST",
            "/background/spawn",
            &ada,
            Some(spawn("Parent: spawn one slow child")),
        )
        .await;
    assert_eq!(st, 201, "{parent}");
    let pid = parent["id"].as_str().expect("id").to_string();
    let parent = agent_until(&api, &ada, &pid, |v| v["status"] == "running").await;
    let psession = parent["session"].as_str().expect("session").to_string();
    let t = Instant::now();
    let child = loop {
        let (_, v) = api
            .call("GET", &format!("/background?parent={psession}"), &ada, None)
            .await;
        if let Some(c) = v["agents"]
            .as_array()
            .and_then(|a| a.first())
            .filter(|c| c["status"] == "running")
        {
            break c.clone();
        }
        assert!(t.elapsed() < RUN * 2, "the child never ran: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let cid = child["id"].as_str().expect("child id").to_string();

    // Two run (the limit); the next waits; one more overflows the queue and is refused.
    let (st, queued) = api
        .call("POST", "/background/spawn", &ada, Some(spawn("Quick one")))
        .await;
    assert_eq!(
        (st, queued["status"].as_str()),
        (201, Some("queued")),
        "{queued}"
    );
    let (st, v) = api
        .call("POST", "/background/spawn", &ada, Some(spawn("Quick two")))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (429, Some("queue_full")),
        "{v}"
    );
    let (st, v) = api
        .call(
            "POST",
            "/background/spawn",
            &ada,
            Some(json!({"prompt": " "})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid_input")),
        "{v}"
    );

    // Cancelling the parent cancels its child; the queued one starts in the freed slots.
    let (st, v) = api
        .call("POST", &format!("/background/{pid}/cancel"), &ada, None)
        .await;
    assert_eq!((st, v["status"].as_str()), (200, Some("cancelled")), "{v}");
    agent_until(&api, &ada, &cid, |v| v["status"] == "cancelled").await;
    let qid = queued["id"].as_str().expect("id");
    agent_until(&api, &ada, qid, |v| v["status"] == "completed").await;
    let (st, v) = api
        .call("POST", &format!("/background/{pid}/cancel"), &ada, None)
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("invalid_transition")),
        "{v}"
    );
    let (st, v) = api
        .call("POST", "/background/bg_default_00/cancel", &ada, None)
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("agent_not_found")),
        "{v}"
    );

    // The child's session stopped its prompt.
    let csession = child["session"].as_str().expect("child session");
    let t = Instant::now();
    loop {
        let (_, ev) = api
            .call(
                "GET",
                &format!("/multiplayer/{csession}/events?since=0"),
                &ada,
                None,
            )
            .await;
        if ev["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["type"] == "prompt.stopped"))
        {
            break;
        }
        assert!(
            t.elapsed() < RUN,
            "the child's prompt was never stopped: {ev}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_global_limit_is_lent_to_tenant_shards_and_freed_slots_wake_waiting_tenants() {
    // No compute: the echo runner keeps each agent's prompt running for ten minutes.
    let server = Server::start(&[
        ("PROMPT_RUNNER", "echo"),
        ("ECHO_RUN_MS", "600000"),
        ("BG_MAX_GLOBAL", "3"),
        ("BG_MAX_CONCURRENT", "2"),
    ])
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let spawn = |tenant: &str, n: u32| json!({"prompt": format!("{tenant} {n}"), "tenant": tenant});
    let mut ids = Vec::new();
    for (tenant, n, want) in [
        ("a", 1, "running"),
        ("a", 2, "running"),
        ("a", 3, "queued"),  // tenant a's own limit
        ("b", 1, "running"), // the third global slot
        ("b", 2, "queued"),  // b has room, the deployment has not
    ] {
        let (st, v) = api
            .call("POST", "/background/spawn", &ada, Some(spawn(tenant, n)))
            .await;
        assert_eq!(
            (st, v["status"].as_str()),
            (201, Some(want)),
            "{tenant} {n}: {v}"
        );
        assert!(v["id"]
            .as_str()
            .is_some_and(|i| i.starts_with(&format!("bg_{tenant}_"))));
        ids.push(v["id"].as_str().unwrap_or_default().to_string());
    }
    // Refused spawns store nothing: not in the shard they name (the `default` one when they
    // name none, as most of these do) nor in any other shard this test uses.
    let shards = ["default", "a", "b"];
    let before = shard_listing(&api, &ada, &shards).await;
    let counts: Vec<(&str, usize)> = before.iter().map(|(s, i)| (s.as_str(), i.len())).collect();
    assert_eq!(counts, [("default", 0), ("a", 3), ("b", 2)], "{before:?}");
    for bad in [
        json!({"prompt": "x", "tenant": "Bad!"}),
        json!({"prompt": "x", "title": ""}),
        json!({"prompt": "x", "model": "m".repeat(300)}),
        json!({"prompt": "x", "extra": true}),
        json!({"prompt": "x", "tenant": "a", "title": ""}),
        json!({"prompt": "x", "tenant": "b", "extra": true}),
        json!({"prompt": 7}),
        json!({}),
    ] {
        let (st, v) = api
            .call("POST", "/background/spawn", &ada, Some(bad.clone()))
            .await;
        assert_eq!(st, 400, "{bad}: {v}");
    }
    assert_eq!(
        shard_listing(&api, &ada, &shards).await,
        before,
        "bad spawns stored nothing"
    );
    let (_, listed) = api
        .call("GET", "/background?tenant=b&status=queued", &ada, None)
        .await;
    assert_eq!(listed["agents"][0]["id"], ids[4].as_str(), "{listed}");

    // A slot freed in tenant a goes to a's own waiting agent first.
    api.call(
        "POST",
        &format!("/background/{}/cancel", ids[0]),
        &ada,
        None,
    )
    .await;
    agent_until(&api, &ada, &ids[2], |v| v["status"] == "running").await;
    let (_, b2) = api
        .call("GET", &format!("/background/{}", ids[4]), &ada, None)
        .await;
    assert_eq!(b2["status"], "queued", "{b2}");
    // When tenant a needs fewer, its slots go back and wake tenant b.
    for id in [&ids[1], &ids[2]] {
        let (st, _) = api
            .call("POST", &format!("/background/{id}/cancel"), &ada, None)
            .await;
        assert_eq!(st, 200);
    }
    agent_until(&api, &ada, &ids[4], |v| v["status"] == "running").await;
}

/// Every agent id `who` sees in each shard (`GET /background?tenant=…`), sorted.
async fn shard_listing(api: &Api, who: &User, shards: &[&str]) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for shard in shards {
        let (st, v) = api
            .call("GET", &format!("/background?tenant={shard}"), who, None)
            .await;
        assert_eq!(st, 200, "{shard}: {v}");
        let mut ids: Vec<String> = v["agents"]
            .as_array()
            .unwrap_or_else(|| panic!("{shard}: {v}"))
            .iter()
            .map(|a| a["id"].to_string())
            .collect();
        ids.sort();
        out.push((shard.to_string(), ids));
    }
    out
}
