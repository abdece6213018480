//! The session's sandbox link against a fake provider that speaks the contract: signed creates, per-session tokens, and every kind of bad sandbox input.

use futures_util::{SinkExt, StreamExt};
use nightshift_tests::fake_provider::{self, Shared};
use nightshift_tests::{secs, Api, Server, User};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = fake_provider::SECRET;

type Link =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Dials a session's sandbox link; Err(status) when the upgrade is refused.
async fn dial(base: &str, session: &str, token: Option<&str>) -> Result<Link, u16> {
    let url = format!("{}/sandbox-link/{session}", base.replacen("http", "ws", 1));
    let mut req = url.into_client_request().expect("request");
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {t}").parse().expect("header"),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("dial: {e}"),
    }
}

async fn recv(ws: &mut Link) -> Option<Value> {
    loop {
        match tokio::time::timeout(secs(10), ws.next()).await.ok()?? {
            Ok(Message::Text(t)) => return serde_json::from_str(&t).ok(),
            Ok(Message::Close(c)) => return Some(json!({"closed": c.map(|c| u16::from(c.code))})),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

async fn send(ws: &mut Link, v: Value) {
    ws.send(Message::Text(v.to_string().into()))
        .await
        .expect("send");
}

async fn prompt(api: &Api, who: &User, id: &str, text: &str) -> (u16, Value) {
    api.call(
        "POST",
        &format!("/multiplayer/{id}/prompt"),
        who,
        Some(json!({"text": text})),
    )
    .await
}

async fn events(api: &Api, who: &User, id: &str) -> Vec<Value> {
    let (st, v) = api
        .call("GET", &format!("/multiplayer/{id}/events"), who, None)
        .await;
    assert_eq!(st, 200);
    v["events"].as_array().cloned().unwrap_or_default()
}

/// A Worker whose provider is the fake one; `extra` adds Worker vars.
async fn with_fake_provider(extra: &[(&str, &str)]) -> (Shared, Server) {
    let (fakep, url) = fake_provider::start().await;
    let mut vars = vec![
        ("PROMPT_RUNNER", "sandbox"),
        ("PROVIDER_URL", url.as_str()),
        ("PROVIDER_SECRET", SECRET),
        ("CONTROL_URL", "{self}"),
    ];
    vars.extend_from_slice(extra);
    let server = Server::start(&vars).await;
    (fakep, server)
}

/// Creates a session on `repository`; returns its id.
async fn session_on(api: &Api, who: &User, title: &str, repository: &str) -> String {
    let (st, s) = api
        .call(
            "POST",
            "/sessions",
            who,
            Some(json!({"title": title, "repository": repository})),
        )
        .await;
    assert_eq!(st, 201, "{s}");
    s["id"].as_str().expect("id").to_string()
}

async fn wait_creates(f: &Shared, n: usize) -> Vec<Value> {
    for _ in 0..200 {
        let c = f.lock().expect("lock").creates.clone();
        if c.len() >= n {
            return c;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the provider never got {n} signed creates");
}

/// The session's first sandbox dials in with its token and is welcomed and given the running prompt.
async fn first_sandbox_link(f: &Shared, base: &str, id: &str) -> Link {
    let creates = wait_creates(f, 1).await;
    let token = creates[0]["supervisor"]["sandbox_token"]
        .as_str()
        .expect("token")
        .to_string();
    let mut ws = dial(base, id, Some(&token)).await.expect("link");
    assert_eq!(recv(&mut ws).await.expect("welcome")["type"], "welcome");
    assert_eq!(recv(&mut ws).await.expect("prompt")["type"], "prompt");
    ws
}

#[tokio::test]
async fn tokens_are_per_session_and_bad_sandbox_frames_change_nothing() {
    let (fakep, server) = with_fake_provider(&[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let (st, a) = api
        .call(
            "POST",
            "/sessions",
            &ada,
            Some(json!({"title": "A", "repository": "/srv/git/a.git"})),
        )
        .await;
    assert_eq!(st, 201);
    let a = a["id"].as_str().expect("a").to_string();
    let (_, b) = api
        .call(
            "POST",
            "/sessions",
            &ada,
            Some(json!({"title": "B", "repository": "/srv/git/b.git"})),
        )
        .await;
    let b = b["id"].as_str().expect("b").to_string();
    let (_, c) = api
        .call("POST", "/sessions", &ada, Some(json!({"title": "No repo"})))
        .await;
    let c = c["id"].as_str().expect("c").to_string();

    // A session without a repository cannot take prompts, and its queue stays empty.
    let (st, v) = prompt(&api, &ada, &c, "do it").await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("no_repository")),
        "{v}"
    );
    let (_, q) = api
        .call("GET", &format!("/multiplayer/{c}/prompts"), &ada, None)
        .await;
    assert_eq!(
        (q["running"].clone(), q["queued"].clone()),
        (Value::Null, json!([]))
    );

    let (_, pa) = prompt(&api, &ada, &a, "work in A").await;
    let pa = pa["id"].as_str().expect("pa").to_string();
    prompt(&api, &ada, &b, "work in B").await;
    let creates = wait_creates(&fakep, 2).await;
    let token_of = |s: &str| -> String {
        creates
            .iter()
            .find(|c| c["session_id"] == s)
            .and_then(|c| c["supervisor"]["sandbox_token"].as_str())
            .expect("token")
            .to_string()
    };
    let (ta, tb) = (token_of(&a), token_of(&b));
    assert_ne!(ta, tb);
    let ca = creates
        .iter()
        .find(|c| c["session_id"] == a.as_str())
        .expect("create a");
    assert_eq!(ca["repository"]["clone_url"], "/srv/git/a.git");
    assert_eq!(ca["supervisor"]["control_url"], server.base.as_str());

    // Wrong session's token, no token, garbage token, no sandbox: refused before any socket exists.
    assert_eq!(dial(&server.base, &a, Some(&tb)).await.err(), Some(401));
    assert_eq!(dial(&server.base, &a, None).await.err(), Some(401));
    assert_eq!(dial(&server.base, &a, Some("x")).await.err(), Some(401));
    assert_eq!(dial(&server.base, &c, Some(&ta)).await.err(), Some(404));

    let before = events(&api, &ada, &a).await;
    let mut ws = dial(&server.base, &a, Some(&ta)).await.expect("link");
    let welcome = recv(&mut ws).await.expect("welcome");
    assert_eq!(welcome, json!({"type": "welcome", "last_n": 0}));
    let p = recv(&mut ws).await.expect("prompt frame");
    assert_eq!(p["type"], "prompt");
    assert_eq!(p["prompt"]["id"], pa.as_str());
    assert_eq!(p["prompt"]["author_email"], "ada@example.com");
    send(&mut ws, json!({"type": "hello", "sandbox": "sbx_fake1"})).await;

    // Malformed frames get codes and store nothing.
    ws.send(Message::Text("not json".into()))
        .await
        .expect("send");
    assert_eq!(
        recv(&mut ws).await.expect("err")["error"]["code"],
        "invalid_json"
    );
    send(
        &mut ws,
        json!({"type": "event", "n": 1, "event": {"kind": "agent.mystery"}}),
    )
    .await;
    assert_eq!(
        recv(&mut ws).await.expect("err")["error"]["code"],
        "invalid_event"
    );
    send(&mut ws, json!({"type": "dance"})).await;
    assert_eq!(
        recv(&mut ws).await.expect("err")["error"]["code"],
        "unknown_type"
    );

    // In order: stored and acknowledged; a resend is acknowledged again but stored once.
    let text = json!({"type": "event", "n": 1, "event": {"kind": "agent.text", "prompt": pa, "text": "hello"}});
    send(&mut ws, text.clone()).await;
    assert_eq!(recv(&mut ws).await, Some(json!({"type": "ack", "n": 1})));
    send(&mut ws, text).await;
    assert_eq!(recv(&mut ws).await, Some(json!({"type": "ack", "n": 1})));
    // Output for a prompt that is not running is acknowledged and dropped.
    send(&mut ws, json!({"type": "event", "n": 2, "event": {"kind": "agent.text", "prompt": "prm_other", "text": "stray"}})).await;
    assert_eq!(recv(&mut ws).await, Some(json!({"type": "ack", "n": 2})));
    // A gap closes the link so the sandbox reconnects and resends from what is stored.
    send(&mut ws, json!({"type": "event", "n": 5, "event": {"kind": "agent.text", "prompt": pa, "text": "skipped ahead"}})).await;
    let mut closed = None;
    while let Some(v) = recv(&mut ws).await {
        if v.get("closed").is_some() {
            closed = v["closed"].as_u64();
            break;
        }
    }
    assert_eq!(closed, Some(4002));
    let mut ws = dial(&server.base, &a, Some(&ta)).await.expect("relink");
    assert_eq!(
        recv(&mut ws).await,
        Some(json!({"type": "welcome", "last_n": 2}))
    );
    assert_eq!(
        recv(&mut ws).await.expect("prompt again")["prompt"]["id"],
        pa.as_str()
    );
    send(&mut ws, json!({"type": "event", "n": 3, "event": {"kind": "prompt.done", "prompt": pa, "ok": true, "branch": "nightshift/x", "commit": "abc"}})).await;
    assert_eq!(recv(&mut ws).await, Some(json!({"type": "ack", "n": 3})));

    // The log holds exactly: the agent's one text, then the finish; nothing from the bad frames.
    let after = events(&api, &ada, &a).await;
    let new: Vec<&Value> = after.iter().skip(before.len()).collect();
    let kinds: Vec<&str> = new.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(kinds, vec!["agent.text", "prompt.finished"], "{new:?}");
    assert_eq!(new[0]["text"], "hello");
    assert_eq!(new[1]["branch"], "nightshift/x");
    let seqs: Vec<u64> = after.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
}

#[tokio::test]
async fn a_refused_sandbox_fails_the_prompt_with_the_reason_and_the_next_prompt_retries() {
    let (fakep, server) = with_fake_provider(&[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let id = session_on(&api, &ada, "Busy", "/srv/git/busy.git").await;
    fakep.lock().expect("lock").refuse = Some(id.clone());
    let mut ws = api.connect(&ada, &id, "web", 0).await;
    let (_, p1) = prompt(&api, &ada, &id, "first").await;
    let p1 = p1["id"].as_str().expect("p1").to_string();
    let f = ws
        .event("prompt.finished", |e| e["id"] == p1.as_str())
        .await;
    assert_eq!(f["ok"], false);
    let reason = f["reason"].as_str().expect("reason");
    assert!(
        reason.starts_with("sandbox_failed") && reason.contains("no capacity left"),
        "{reason}"
    );
    ws.event("sandbox.status", |e| e["stage"] == "failed").await;
    // Capacity is back: the next prompt asks again and gets a sandbox.
    fakep.lock().expect("lock").refuse = None;
    prompt(&api, &ada, &id, "second").await;
    let creates = wait_creates(&fakep, 1).await;
    assert_eq!(creates[0]["session_id"], id.as_str());
}

#[tokio::test]
async fn a_silent_sandbox_is_declared_lost_and_terminated() {
    let (fakep, server) = with_fake_provider(&[("SANDBOX_HEARTBEAT_TIMEOUT_MS", "1500")]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let id = session_on(&api, &ada, "Quiet", "/srv/git/q.git").await;
    let mut web = api.connect(&ada, &id, "web", 0).await;
    let (_, p1) = prompt(&api, &ada, &id, "hang").await;
    let p1 = p1["id"].as_str().expect("p1").to_string();
    let mut ws = first_sandbox_link(&fakep, &server.base, &id).await;
    send(&mut ws, json!({"type": "event", "n": 1, "event": {"kind": "sandbox.status", "stage": "ready", "detail": "up"}})).await;
    assert_eq!(recv(&mut ws).await, Some(json!({"type": "ack", "n": 1})));
    // The sandbox took the prompt (a prompt it never took would move to a new sandbox instead).
    send(
        &mut ws,
        json!({"type": "event", "n": 2, "event": {"kind": "prompt.accepted", "prompt": p1}}),
    )
    .await;
    assert_eq!(recv(&mut ws).await, Some(json!({"type": "ack", "n": 2})));
    // Then silence, with the socket still open (a hung sandbox).
    web.event_within(secs(20), "sandbox.status", |e| e["stage"] == "lost")
        .await;
    let f = web
        .event("prompt.finished", |e| e["id"] == p1.as_str())
        .await;
    assert!(
        f["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("sandbox_lost")),
        "{f}"
    );
    for _ in 0..100 {
        if fakep.lock().expect("lock").terminated == vec!["sbx_fake1".to_string()] {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the lost sandbox was not terminated at the provider");
}

#[tokio::test]
async fn a_batch_is_stored_in_order_once_and_reaches_people_as_one_frame() {
    let (fakep, server) = with_fake_provider(&[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let id = session_on(&api, &ada, "Batch", "/srv/git/batch.git").await;
    let mut web = api.connect(&ada, &id, "web", 0).await;
    let (_, p) = prompt(&api, &ada, &id, "go").await;
    let pid = p["id"].as_str().expect("prompt").to_string();
    let mut ws = first_sandbox_link(&fakep, &server.base, &id).await;
    let text = |n: u64| json!({"n": n, "event": {"kind": "agent.text", "prompt": pid, "text": format!("t{n} ")}});
    send(
        &mut ws,
        json!({"type": "batch", "events": [text(1), text(2), text(3)]}),
    )
    .await;
    assert_eq!(recv(&mut ws).await, Some(json!({"type": "ack", "n": 3})));
    // Overlapping resend (2, 3 again) and new ones: only 4 and 5 are stored.
    send(
        &mut ws,
        json!({"type": "batch", "events": [text(2), text(3), text(4), text(5)]}),
    )
    .await;
    assert_eq!(recv(&mut ws).await, Some(json!({"type": "ack", "n": 5})));
    // One bad event refuses the whole batch.
    send(
        &mut ws,
        json!({"type": "batch", "events": [text(6), {"n": 7, "event": {"kind": "agent.text"}}]}),
    )
    .await;
    assert_eq!(
        recv(&mut ws).await.expect("error")["error"]["code"],
        "invalid_event"
    );
    // The refusal stored nothing: the log still ends at t5 (t6, valid on its own, is not in it).
    let (st, log) = api
        .call(
            "GET",
            &format!("/multiplayer/{id}/events?since=0"),
            &ada,
            None,
        )
        .await;
    assert_eq!(st, 200, "{log}");
    let events = log["events"].as_array().cloned().unwrap_or_default();
    let last = events.last().cloned().unwrap_or_default();
    assert_eq!(
        (last["type"].as_str(), last["text"].as_str()),
        (Some("agent.text"), Some("t5 ")),
        "{log}"
    );
    assert_eq!(log["last_seq"], last["seq"], "{log}");
    assert!(
        !events.iter().any(|e| e["text"] == "t6 "),
        "the refused batch's valid event was stored: {log}"
    );
    let frame = web
        .until(secs(10), "a frame of three agent texts", |v| {
            v["type"] == "events"
                && v["events"]
                    .as_array()
                    .is_some_and(|e| e.len() == 3 && e.iter().all(|e| e["type"] == "agent.text"))
        })
        .await;
    assert_eq!(frame["events"][0]["text"], "t1 ");
    let e = web.event("agent.text", |e| e["text"] == "t5 ").await;
    let texts: Vec<&str> = web
        .seen
        .iter()
        .filter(|e| e["type"] == "agent.text")
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert_eq!(texts, vec!["t1 ", "t2 ", "t3 ", "t4 ", "t5 "]);
    drop(e);
}

/// Client ids are never socket tags of their own: a person connected as clients `sandbox` and
/// `people` gets none of the sandbox's frames, and the sandbox dialling in (which replaces older
/// sandbox sockets) closes neither of theirs. (No person may be named `sandbox`, `people` or
/// `system` at all: tests/tests/github.rs.)
#[tokio::test]
async fn a_person_named_like_a_reserved_socket_tag_is_only_a_person() {
    let (fakep, server) = with_fake_provider(&[]).await;
    let api = server.client();
    let who = api.sign_in("sandboxer").await;
    let id = session_on(&api, &who, "Tags", "/srv/git/tags.git").await;
    let mut clients = vec![
        api.connect(&who, &id, "sandbox", 0).await,
        api.connect(&who, &id, "people", 0).await,
    ];
    let (_, p) = prompt(&api, &who, &id, "go").await;
    let pid = p["id"].as_str().expect("prompt").to_string();
    let mut link = first_sandbox_link(&fakep, &server.base, &id).await;
    send(&mut link, json!({"type": "event", "n": 1, "event": {"kind": "agent.text", "prompt": pid, "text": "hi"}})).await;
    assert_eq!(recv(&mut link).await, Some(json!({"type": "ack", "n": 1})));
    for ws in &mut clients {
        let mut kinds = Vec::new();
        loop {
            let frame = ws
                .next(secs(10))
                .await
                .expect("the person's socket stays open");
            kinds.push(frame["type"].as_str().unwrap_or_default().to_string());
            if ws.seen.iter().any(|e| e["type"] == "agent.text") {
                break;
            }
        }
        for sandbox_frame in ["welcome", "prompt", "ack", "stop"] {
            assert!(
                !kinds.iter().any(|k| k == sandbox_frame),
                "a person received the sandbox's {sandbox_frame}: {kinds:?}"
            );
        }
    }
}
