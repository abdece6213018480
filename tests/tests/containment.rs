//! Containment seen from a session: the agent's own tools run in the sandbox's network, a host outside the allowlist is refused and shown as `egress.blocked`, and the model key never reaches the agent.

use nightshift_tests::{start_with_compute, RUN};
use serde_json::json;

#[tokio::test]
async fn the_agent_sees_no_key_and_a_blocked_host_is_shown_to_the_session() {
    let key = "sk-session-test-key-9876543210";
    let recording = json!({"turns": [
        {"text": "Checking the network and the environment.", "tool_calls": [{"name": "bash", "arguments": {
            "command": "curl -s -m 10 -o /dev/null -w 'status %{http_code}\\n' https://example.org/; env | grep -c 'sk-session-test-key' || true; s=super; s=${s}visor; for p in /proc/[0-9]*; do c=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null); case \"$c\" in *\"$s\"*) if cat $p/environ >/dev/null 2>&1; then echo 'environ readable'; else echo 'environ refused'; fi;; esac; done",
            "description": "Try the network"}}]},
        {"text": "Done."}
    ]});
    let (compute, server) =
        start_with_compute(recording, &[("NIGHTSHIFT_MODEL_KEY", key)], &[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let remote = compute.remote_repo("contained");
    let (id, _) = api.create_session_on(&ada, "Contained", &remote).await;
    let mut ws = api.connect(&ada, &id, "web", 0).await;
    let prompt = api.prompt(&ada, &id, "Is the network open?").await;
    let done = ws.finished(&prompt).await;
    assert_eq!(done["ok"], true, "{done}");
    // The refused host is an event of the session, naming the tool that tried.
    let blocked = ws
        .event_within(RUN, "egress.blocked", |e| e["host"] == "example.org:443")
        .await;
    assert_eq!(blocked["tool"], "bash", "{blocked}");
    // The tool saw a refusal (403 from the proxy, or no tunnel), and no key in its environment.
    let output: String = ws
        .seen
        .iter()
        .filter(|e| e["type"] == "agent.tool" && e["status"] == "completed")
        .map(|e| e["output"].to_string())
        .collect();
    assert!(
        output.contains("status 403") || output.contains("status 000"),
        "{output}"
    );
    assert!(
        output.contains("\\n0"),
        "the key is in the agent's environment: {output}"
    );
    assert!(!output.contains(key), "{output}");
    // The supervisor's environment (and its git children's, which hold the push token during
    // a push) is out of the agent's reach: the agent runs in a user namespace of its own.
    assert!(output.contains("environ refused"), "{output}");
    assert!(!output.contains("environ readable"), "{output}");
}

/// A loopback HTTP server answering `{"ok":true}`; counts the requests that reached it.
async fn counting_server() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let body = r#"{"ok":true}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    (port, hits)
}

/// The session's owner opens a host for the session's sandboxes, in force at once for the live
/// one; members and bad patterns change nothing.
#[tokio::test]
async fn the_owner_opens_a_host_for_the_session_and_others_cannot() {
    let (port, hits) = counting_server().await;
    let recording = json!({"turns": [{"text": "Ready."}]});
    let (compute, server) = start_with_compute(recording, &[], &[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let bob = api.sign_in("bob").await;
    let remote = compute.remote_repo("open");
    let (sid, invite) = api.create_session_on(&ada, "Open", &remote).await;
    api.join(&bob, &sid, &invite).await;
    let mut ws = api.connect(&ada, &sid, "web", 0).await;
    let prompt = api.prompt(&ada, &sid, "hello").await;
    ws.finished(&prompt).await;
    let (st, s) = api
        .call("POST", "/sandbox", &ada, Some(json!({"session_id": sid})))
        .await;
    assert_eq!(st, 200, "{s}");
    let sandbox = s["id"].as_str().expect("sandbox").to_string();
    let curl =
        json!({"command": ["sh", "-c", format!("curl -s --max-time 10 http://127.0.0.1:{port}/")]});
    let exec = |body: serde_json::Value| {
        let api = api.clone();
        let ada = ada.clone();
        let path = format!("/sandbox/{sandbox}/exec");
        async move { api.call("POST", &path, &ada, Some(body)).await }
    };
    let (st, out) = exec(curl.clone()).await;
    assert_eq!(st, 200, "{out}");
    assert!(
        out["stdout"]
            .as_str()
            .unwrap_or("")
            .contains("egress_blocked"),
        "{out}"
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    let target = format!("127.0.0.1:{port}");
    // A member is not the owner; a bad pattern is refused; neither changes anything.
    let path = format!("/sessions/{sid}/egress");
    let (st, v) = api
        .call("PUT", &path, &bob, Some(json!({"allow": [target]})))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (403, Some("owner_only")),
        "{v}"
    );
    let (st, v) = api
        .call("PUT", &path, &ada, Some(json!({"allow": ["http://x"]})))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid_input")),
        "{v}"
    );
    let (st, v) = api
        .call("PUT", &path, &ada, Some(json!({"allow": [target], "x": 1})))
        .await;
    assert_eq!(st, 400, "{v}");
    let (st, out) = exec(curl.clone()).await;
    assert!(
        st == 200
            && out["stdout"]
                .as_str()
                .unwrap_or("")
                .contains("egress_blocked"),
        "{out}"
    );
    // The owner opens it: an event for everyone, and the live sandbox reaches it now.
    let (st, v) = api
        .call("PUT", &path, &ada, Some(json!({"allow": [target]})))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["applied_to_live_sandbox"], true, "{v}");
    let changed = ws
        .event_within(RUN, "egress.changed", |e| e["allow"][0] == target.as_str())
        .await;
    assert_eq!(changed["actor"]["user"], "ada", "{changed}");
    let (st, out) = exec(curl).await;
    assert_eq!(st, 200, "{out}");
    assert!(
        out["stdout"].as_str().unwrap_or("").contains("\"ok\":true"),
        "{out}"
    );
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
}
