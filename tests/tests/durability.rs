//! Restarting wrangler dev on the same state mid-session: members, locks, queue and the log survive; clients reconnect and resume.

use nightshift_tests::{secs, Server};
use serde_json::json;

#[tokio::test]
async fn session_survives_a_restart_mid_session() {
    let mut server = Server::start(&[("PROMPT_RUNNER", "none")]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let bob = api.sign_in("bob").await;
    let (id, invite) = api.create_session(&ada, "Durable").await;
    api.join(&bob, &id, &invite).await;
    let mut a = api.connect(&ada, &id, "ada-tab", 0).await;
    let mut b = api.connect(&bob, &id, "bob-tab", 0).await;
    a.send(json!({"type":"lock.acquire","resource":"src/lib.rs","ttl_ms":600000}))
        .await;
    a.event("lock.acquired", |_| true).await;
    b.send(json!({"type":"prompt","text":"running one"})).await;
    b.send(json!({"type":"prompt","text":"queued low","priority":1}))
        .await;
    a.send(json!({"type":"prompt","text":"queued high","priority":3}))
        .await;
    a.event("prompt.queued", |e| e["prompt"]["text"] == "queued high")
        .await;
    b.event("prompt.queued", |e| e["prompt"]["text"] == "queued high")
        .await;
    let (_, before) = api
        .call("GET", &format!("/sessions/{id}"), &ada, None)
        .await;
    assert_eq!(before["presence"]["total"], 2);
    let (a_seq, b_seq) = (a.last_seq, b.last_seq);

    server.restart().await;
    let api = server.client();

    // Sockets died with the process: presence is rebuilt from what is live (nothing yet).
    let (st, after) = api
        .call("GET", &format!("/sessions/{id}"), &ada, None)
        .await;
    assert_eq!(st, 200, "{after}");
    assert_eq!(after["presence"]["total"], 0);
    for k in ["members", "locks", "queue", "last_seq", "invite", "owner"] {
        assert_eq!(before[k], after[k], "{k} changed across the restart");
    }
    assert_eq!(after["queue"]["running"]["text"], "running one");
    let queued: Vec<&str> = after["queue"]["queued"]
        .as_array()
        .map(|q| q.iter().filter_map(|p| p["text"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(queued, vec!["queued high", "queued low"]);

    // Both reconnect with their client ids and last sequence numbers; a change made while
    // Bob is still away reaches him exactly once on resume.
    let mut a = api.connect(&ada, &id, "ada-tab", a_seq).await;
    a.until(secs(5), "hello", |v| v["type"] == "hello").await;
    a.send(json!({"type":"lock.release","resource":"src/lib.rs"}))
        .await;
    a.event("lock.released", |_| true).await;
    let mut b = api.connect(&bob, &id, "bob-tab", b_seq).await;
    b.event("lock.released", |_| true).await;
    let (_, pres) = api
        .call("GET", &format!("/multiplayer/{id}/presence"), &ada, None)
        .await;
    assert_eq!(pres["total"], 2);
    b.send(json!({"type":"prompt","text":"after restart"}))
        .await;
    a.event("prompt.queued", |e| e["prompt"]["text"] == "after restart")
        .await;
    b.event("prompt.queued", |e| e["prompt"]["text"] == "after restart")
        .await;
}
