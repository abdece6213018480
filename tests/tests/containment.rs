//! Containment seen from a session: the agent's own tools run in the sandbox's network, a host outside the allowlist is refused and shown as `egress.blocked`, and the model key never reaches the agent.

use nightshift_tests::{start_with_compute, RUN};
use serde_json::json;

#[tokio::test]
async fn the_agent_sees_no_key_and_a_blocked_host_is_shown_to_the_session() {
    let key = "sk-session-test-key-9876543210";
    let recording = json!({"turns": [
        {"text": "Checking the network and the environment.", "tool_calls": [{"name": "bash", "arguments": {
            "command": "curl -s -m 10 -o /dev/null -w 'status %{http_code}\\n' https://example.org/; env | grep -c 'sk-session-test-key' || true",
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
}
