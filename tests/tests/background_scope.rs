//! A sandbox's agent tools (`/sandbox-link/:id/background`) reach only its own session's children: another session's token, another session's route and an agent that is not its child are all refused.

use nightshift_tests::fake_provider::{self, Shared};
use nightshift_tests::{Api, Server, User};
use serde_json::{json, Value};

/// The sandbox token the session's (fake) sandbox was created with.
async fn token_of(fake: &Shared, session: &str) -> String {
    for _ in 0..400 {
        let creates = fake.lock().map(|f| f.creates.clone()).unwrap_or_default();
        let found = creates.iter().find_map(|c| {
            (c["session_id"] == session)
                .then(|| c["supervisor"]["sandbox_token"].as_str().map(String::from))
                .flatten()
        });
        if let Some(token) = found {
            return token;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("no sandbox was created for {session}");
}

/// One agent-tool call as a sandbox makes it.
async fn tool(api: &Api, session: &str, token: &str, body: Value) -> (u16, Value) {
    let r = api
        .http
        .post(format!("{}/sandbox-link/{session}/background", api.base))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("tool call");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn running_session(api: &Api, who: &User, title: &str) -> String {
    let (st, s) = api
        .call(
            "POST",
            "/sessions",
            who,
            Some(json!({"title": title, "repository": "/srv/git/scope.git"})),
        )
        .await;
    assert_eq!(st, 201, "{s}");
    let id = s["id"].as_str().expect("id").to_string();
    let (st, p) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/prompt"),
            who,
            Some(json!({"text": "work"})),
        )
        .await;
    assert_eq!(st, 202, "{p}");
    id
}

#[tokio::test]
async fn a_sandbox_reaches_only_its_own_sessions_children() {
    let (fake, url) = fake_provider::start().await;
    let server = Server::start(&[
        ("PROMPT_RUNNER", "sandbox"),
        ("PROVIDER_URL", url.as_str()),
        ("PROVIDER_SECRET", fake_provider::SECRET),
        ("CONTROL_URL", "{self}"),
    ])
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let bob = api.sign_in("bob").await;
    let a = running_session(&api, &ada, "a").await;
    let b = running_session(&api, &bob, "b").await;
    let (token_a, token_b) = (token_of(&fake, &a).await, token_of(&fake, &b).await);

    // A's sandbox spawns a child: it sees it.
    let (st, child) = tool(
        &api,
        &a,
        &token_a,
        json!({"op": "spawn", "prompt": "child of a"}),
    )
    .await;
    assert_eq!(st, 201, "{child}");
    let child = child["id"].as_str().expect("child id").to_string();
    let (st, seen) = tool(&api, &a, &token_a, json!({"op": "check", "id": child})).await;
    assert_eq!(st, 200, "{seen}");

    // B's sandbox: not with A's token on B's route, not with its own token for A's child,
    // and not on A's route with its own token.
    let (st, v) = tool(&api, &b, &token_a, json!({"op": "check"})).await;
    assert_eq!(st, 401, "A's token on B's route: {v}");
    let (st, v) = tool(&api, &b, &token_b, json!({"op": "check", "id": child})).await;
    assert_eq!(st, 404, "B's sandbox read A's child: {v}");
    let (st, v) = tool(&api, &a, &token_b, json!({"op": "check", "id": child})).await;
    assert_eq!(st, 401, "B's token on A's route: {v}");
    // Nor a person's own agent that is not this session's child (ada spawned it herself).
    let (st, own) = api
        .call(
            "POST",
            "/background/spawn",
            &ada,
            Some(json!({"prompt": "ada's own", "repository": "/srv/git/scope.git"})),
        )
        .await;
    assert_eq!(st, 201, "{own}");
    let own = own["id"].as_str().expect("agent id").to_string();
    let (st, v) = tool(&api, &a, &token_a, json!({"op": "check", "id": own})).await;
    assert_eq!(
        st, 404,
        "A's sandbox read an agent that is not its child: {v}"
    );
    // And B's sandbox's list of children is empty.
    let (st, v) = tool(&api, &b, &token_b, json!({"op": "check"})).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["children"].as_array().map(Vec::len), Some(0), "{v}");
}

/// Audit #10: an agent cancelled around its start (queued, starting, or just running) never
/// runs its prompt to the end: its session, if it got one, shows the prompt stopped, never
/// finished. Cancels land at staggered moments after each spawn, so some fall inside the
/// start (the session created, its prompt not yet queued).
#[tokio::test]
async fn an_agent_cancelled_around_its_start_never_runs_its_prompt() {
    let server = Server::start(&[
        ("PROMPT_RUNNER", "echo"),
        ("ECHO_RUN_MS", "1500"),
        ("BG_MAX_CONCURRENT", "20"),
    ])
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let mut spawns = Vec::new();
    for i in 0..12u64 {
        let (api, ada) = (&api, &ada);
        spawns.push(async move {
            let (st, v) = api
                .call(
                    "POST",
                    "/background/spawn",
                    ada,
                    Some(json!({"prompt": format!("agent {i}")})),
                )
                .await;
            assert_eq!(st, 201, "{v}");
            let id = v["id"].as_str().expect("id").to_string();
            tokio::time::sleep(std::time::Duration::from_millis(i * 7)).await;
            let (st, c) = api
                .call("POST", &format!("/background/{id}/cancel"), ada, None)
                .await;
            assert_eq!(st, 200, "cancel {id}: {c}");
            id
        });
    }
    let ids = futures_util::future::join_all(spawns).await;
    // Longer than a run that had not been stopped would take.
    tokio::time::sleep(std::time::Duration::from_millis(3000)).await;
    for id in ids {
        let (_, agent) = api
            .call("GET", &format!("/background/{id}"), &ada, None)
            .await;
        let status = agent["status"].as_str().unwrap_or_default();
        assert_eq!(status, "cancelled", "{id}: {agent}");
        let Some(session) = agent["session"].as_str() else {
            continue;
        };
        let (st, log) = api
            .call(
                "GET",
                &format!("/multiplayer/{session}/events?since=0"),
                &ada,
                None,
            )
            .await;
        assert_eq!(st, 200, "{log}");
        let events = log["events"].as_array().cloned().unwrap_or_default();
        let finished = events.iter().any(|e| e["type"] == "prompt.finished");
        assert!(
            !finished,
            "cancelled agent {id}'s prompt finished: {events:?}"
        );
    }
}
