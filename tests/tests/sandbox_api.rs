//! The sandbox API end to end (Worker, local provider, real OpenCode): membership, create/list/get, exec, git, logs, stop/start, terminate, bad input.

use std::time::Duration;

use nightshift_tests::{secs, Api, Compute, Server, User, Ws};
use serde_json::{json, Value};

async fn wait_status(api: &Api, who: &User, id: &str, want: &str) -> Value {
    for _ in 0..600 {
        let (st, v) = api.call("GET", &format!("/sandbox/{id}"), who, None).await;
        assert_eq!(st, 200, "{v}");
        if v["status"] == want {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("sandbox {id} never became {want}");
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
    let compute = Compute::start(&json!({ "turns": turns }), &[]).await;
    let owned = compute.vars();
    let vars: Vec<(&str, &str)> = owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(&vars).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let eve = api.sign_in("eve").await;
    let remote = compute.remote_repo("api");
    let (sid, _) = api.create_session_on(&ada, "API", &remote).await;
    let mut ws = api.connect(&ada, &sid, "web", 0).await;

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
}
