//! Multiplayer over WebSockets against wrangler dev: ordered fan-out, presence, typing, queue order, locks, limits, resume, sweeps.

use std::time::{Duration, Instant};

use nightshift_tests::{secs, Server};
use serde_json::{json, Value};

fn types(events: &[Value]) -> Vec<(u64, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap_or(0),
                e["type"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn two_clients_see_the_same_ordered_events_and_presence() {
    let server = Server::start(&[("PROMPT_RUNNER", "echo"), ("ECHO_RUN_MS", "300")]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let bob = api.sign_in("bob").await;
    let (id, invite) = api.create_session(&ada, "Pairing").await;
    api.join(&bob, &id, &invite).await;

    let mut a = api.connect(&ada, &id, "ada-web", 0).await;
    let hello = a.until(secs(5), "hello", |v| v["type"] == "hello").await;
    assert_eq!(hello["client"], "ada-web");
    let mut b = api.connect(&bob, &id, "bob-web", 0).await;
    b.until(secs(5), "presence", |v| v["type"] == "presence")
        .await;

    // Ada sees Bob arrive and start typing.
    a.until(secs(5), "bob in presence", |v| {
        v["type"] == "presence.delta"
            && v["updated"]
                .as_array()
                .is_some_and(|u| u.iter().any(|c| c["user"] == "bob"))
    })
    .await;
    b.send(json!({"type":"typing","typing":true,"ref":"t1"}))
        .await;
    let ack = b.until(secs(5), "typing ack", |v| v["type"] == "ack").await;
    assert_eq!(ack["ref"], "t1");
    a.until(secs(5), "bob typing", |v| {
        v["type"] == "presence.delta"
            && v["updated"]
                .as_array()
                .is_some_and(|u| u.iter().any(|c| c["user"] == "bob" && c["typing"] == true))
    })
    .await;

    // A prompt from Bob reaches both, with its author, and runs to completion.
    b.send(json!({"type":"prompt","text":"rename the module","ref":"p1"}))
        .await;
    let ack = b
        .until(secs(5), "prompt ack", |v| {
            v["type"] == "ack" && v["ref"] == "p1"
        })
        .await;
    assert_eq!(ack["result"]["author"], "bob");
    let pid = ack["result"]["id"].as_str().expect("id").to_string();
    let q = a
        .event("prompt.queued", |e| e["prompt"]["id"] == pid.as_str())
        .await;
    assert_eq!(q["actor"]["user"], "bob");
    a.event("prompt.finished", |e| e["id"] == pid.as_str())
        .await;
    b.event("prompt.finished", |e| e["id"] == pid.as_str())
        .await;
    assert_eq!(types(&a.seen), types(&b.seen));

    // Bad frames get error frames and change nothing.
    let before = a.last_seq;
    b.send_text("{oops").await;
    let e = b.until(secs(5), "error", |v| v["type"] == "error").await;
    assert_eq!(e["error"]["code"], "malformed_json");
    b.send(json!({"type":"teleport","ref":"x"})).await;
    let e = b.until(secs(5), "error", |v| v["type"] == "error").await;
    assert_eq!(
        (e["error"]["code"].as_str(), e["ref"].as_str()),
        (Some("unknown_message_type"), Some("x"))
    );
    b.send(json!({"type":"prompt","text":7})).await;
    let e = b.until(secs(5), "error", |v| v["type"] == "error").await;
    assert_eq!(e["error"]["code"], "invalid_message");
    let (_, ev) = api
        .call(
            "GET",
            &format!("/multiplayer/{id}/events?since=0"),
            &ada,
            None,
        )
        .await;
    assert_eq!(ev["last_seq"].as_u64(), Some(before));
}

#[tokio::test]
async fn queue_runs_by_priority_then_arrival_with_cancel_reprioritise_and_stop() {
    // `none`: a running prompt runs until the test says so (stop), so every transition is
    // driven by the test and no timer can start the next prompt early.
    let server = Server::start(&[("PROMPT_RUNNER", "none"), ("MAX_QUEUED", "3")]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let bob = api.sign_in("bob").await;
    let (id, invite) = api.create_session(&ada, "Queue").await;
    api.join(&bob, &id, &invite).await;
    let mut watch = api.connect(&ada, &id, "watch", 0).await;
    let send = |who, text: &str, prio: i32| {
        let api = api.clone();
        let id = id.clone();
        let body = json!({"text": text, "priority": prio});
        async move {
            let (st, v) = api
                .call(
                    "POST",
                    &format!("/multiplayer/{id}/prompt"),
                    who,
                    Some(body),
                )
                .await;
            (st, v)
        }
    };
    let (_, p1) = send(&ada, "one", 0).await;
    assert_eq!(p1["status"], "running");
    let (_, p2) = send(&bob, "two", 0).await;
    let (_, p3) = send(&ada, "three", 5).await;
    let (_, p4) = send(&bob, "four", 0).await;
    let (st, v) = send(&ada, "five", 0).await;
    assert_eq!((st, v["error"]["code"].as_str()), (429, Some("queue_full")));
    let id_of = |p: &Value| p["id"].as_str().unwrap_or("").to_string();
    let queued = || {
        let api = api.clone();
        let (id, ada) = (id.clone(), ada.clone());
        async move {
            let (_, q) = api
                .call("GET", &format!("/multiplayer/{id}/prompts"), &ada, None)
                .await;
            let order: Vec<String> = q["queued"]
                .as_array()
                .unwrap_or(&vec![])
                .iter()
                .map(|p| p["id"].as_str().unwrap_or("").to_string())
                .collect();
            (order, q["running"]["id"].as_str().map(String::from))
        }
    };
    // Priority first, then arrival.
    assert_eq!(
        queued().await,
        (vec![id_of(&p3), id_of(&p2), id_of(&p4)], Some(id_of(&p1)))
    );

    // Bob may not touch Ada's prompt; he cancels his own and raises another.
    let (st, _) = api
        .call(
            "DELETE",
            &format!("/multiplayer/{id}/prompt/{}", id_of(&p3)),
            &bob,
            None,
        )
        .await;
    assert_eq!(st, 403);
    let (st, _) = api
        .call(
            "DELETE",
            &format!("/multiplayer/{id}/prompt/{}", id_of(&p4)),
            &bob,
            None,
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = api
        .call(
            "PATCH",
            &format!("/multiplayer/{id}/prompt/{}", id_of(&p2)),
            &bob,
            Some(json!({"priority": 9})),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(
        queued().await,
        (vec![id_of(&p2), id_of(&p3)], Some(id_of(&p1)))
    );

    // Stop the running one: the next by priority starts at once; then the last one.
    let stop = || {
        let api = api.clone();
        let (id, ada) = (id.clone(), ada.clone());
        async move {
            let (st, v) = api
                .call("POST", &format!("/multiplayer/{id}/stop"), &ada, None)
                .await;
            assert_eq!(st, 200, "{v}");
        }
    };
    stop().await;
    watch
        .event("prompt.started", |e| e["id"] == id_of(&p2).as_str())
        .await;
    assert_eq!(queued().await, (vec![id_of(&p3)], Some(id_of(&p2))));
    stop().await;
    watch
        .event("prompt.started", |e| e["id"] == id_of(&p3).as_str())
        .await;
    assert_eq!(queued().await, (vec![], Some(id_of(&p3))));
    stop().await;
    watch
        .event("prompt.stopped", |e| e["id"] == id_of(&p3).as_str())
        .await;
    assert_eq!(queued().await, (vec![], None));
    let of = |ty: &str| -> Vec<String> {
        watch
            .seen
            .iter()
            .filter(|e| e["type"] == ty)
            .map(|e| e["id"].as_str().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(
        of("prompt.started"),
        vec![id_of(&p1), id_of(&p2), id_of(&p3)]
    );
    assert_eq!(
        of("prompt.stopped"),
        vec![id_of(&p1), id_of(&p2), id_of(&p3)]
    );
    assert_eq!(of("prompt.cancelled"), vec![id_of(&p4)]);
}

#[tokio::test]
async fn reconnect_resumes_from_last_sequence_without_gaps_or_duplicates() {
    let server = Server::start(&[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let (id, _) = api.create_session(&ada, "Resume").await;
    let mut a = api.connect(&ada, &id, "tab", 0).await;
    a.event("member.joined", |_| true).await;
    let seen_before = a.last_seq;
    a.close().await;
    for i in 0..5 {
        api.call(
            "POST",
            &format!("/multiplayer/{id}/lock"),
            &ada,
            Some(json!({"resource": format!("f{i}")})),
        )
        .await;
    }
    let mut a = api.connect(&ada, &id, "tab", seen_before).await;
    // The harness asserts each event is exactly last_seq + 1.
    a.event("lock.acquired", |e| e["resource"] == "f4").await;
    let (_, ev) = api
        .call(
            "GET",
            &format!("/multiplayer/{id}/events?since={seen_before}"),
            &ada,
            None,
        )
        .await;
    assert_eq!(a.seen, ev["events"].as_array().cloned().unwrap_or_default());
    // Live events follow the replay.
    api.call(
        "POST",
        &format!("/multiplayer/{id}/unlock"),
        &ada,
        Some(json!({"resource":"f0"})),
    )
    .await;
    a.event("lock.released", |e| e["resource"] == "f0").await;
}

#[tokio::test]
async fn client_limit_locks_and_expiry() {
    let server = Server::start(&[
        ("MAX_CLIENTS_PER_USER", "2"),
        ("HEARTBEAT_TIMEOUT_MS", "1500"),
    ])
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let bob = api.sign_in("bob").await;
    let (id, invite) = api.create_session(&ada, "Limits").await;
    api.join(&bob, &id, &invite).await;
    // c1 pings (as the web app does) so the 1.5 s sweep keeps it while it waits for the lock.
    let mut c1 = api
        .connect(&ada, &id, "c1", 0)
        .await
        .pinging(Duration::from_millis(300));
    let mut c2 = api.connect(&ada, &id, "c2", 0).await;
    let url = format!(
        "{}/multiplayer/{id}/ws?ticket={}&client=c3",
        api.base.replacen("http", "ws", 1),
        api.ticket(&ada, &id).await
    );
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 429)
        }
        other => panic!("third client was not refused: {:?}", other.map(|_| ())),
    }
    // Reconnecting with an existing client id replaces it instead of counting twice: the old
    // socket is closed.
    let mut c2b = api.connect(&ada, &id, "c2", 0).await;
    assert_eq!(c2.close_frame(secs(10)).await, Some(4001));

    // Single writer: Bob is refused while Ada holds the lock; it expires and Bob gets it.
    let (st, _) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/lock"),
            &ada,
            Some(json!({"resource":"workspace","ttl_ms":700})),
        )
        .await;
    assert_eq!(st, 200);
    let (st, v) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/lock"),
            &bob,
            Some(json!({"resource":"workspace"})),
        )
        .await;
    assert_eq!((st, v["error"]["code"].as_str()), (409, Some("lock_held")));
    let rel = c1
        .event("lock.released", |e| e["resource"] == "workspace")
        .await;
    assert_eq!(rel["reason"], "expired");
    let (st, v) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/lock"),
            &bob,
            Some(json!({"resource":"workspace"})),
        )
        .await;
    assert_eq!((st, v["holder"].as_str()), (200, Some("bob")));

    // Clients that stop heart-beating are swept and their socket closed; a pinging one stays.
    let _alive = api
        .connect(&bob, &id, "bob-live", 0)
        .await
        .pinging(Duration::from_millis(300));
    c1.stop_pinging();
    let deadline = Instant::now() + secs(30);
    loop {
        let (_, pres) = api
            .call("GET", &format!("/multiplayer/{id}/presence"), &bob, None)
            .await;
        let clients: Vec<String> = pres["clients"]
            .as_array()
            .unwrap_or(&vec![])
            .iter()
            .map(|c| c["client"].as_str().unwrap_or("").to_string())
            .collect();
        if clients == vec!["bob-live".to_string()] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stale clients were not swept: {pres}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c1.close_frame(secs(10)).await, Some(4000), "c1 was swept");
    assert_eq!(c2b.close_frame(secs(10)).await, Some(4000), "c2 was swept");
}

#[tokio::test]
async fn a_prompt_retried_with_its_idempotency_key_is_stored_once() {
    // `none`: prompts stay where the queue puts them, so nothing races the checks.
    let server = Server::start(&[("PROMPT_RUNNER", "none")]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let bob = api.sign_in("bob").await;
    let (id, invite) = api.create_session(&ada, "Retry").await;
    api.join(&bob, &id, &invite).await;
    let url = format!("{}/multiplayer/{id}/prompt", api.base);
    let post = |who: &nightshift_tests::User, key: Option<String>, body: Value| {
        let mut rb = api.http.post(&url).bearer_auth(&who.token).json(&body);
        if let Some(k) = key {
            rb = rb.header("Idempotency-Key", k);
        }
        async move {
            let resp = rb.send().await.expect("request");
            let st = resp.status().as_u16();
            let v: Value = resp.json().await.unwrap_or(Value::Null);
            (st, v)
        }
    };
    let body = json!({"text": "fix the build"});
    let key = || Some("retry-1 ~!".to_string());

    let (st, first) = post(&ada, key(), body.clone()).await;
    assert_eq!(st, 202, "{first}");
    let pid = first["id"].as_str().expect("id").to_string();
    assert!(first.get("client_key").is_none(), "{first}");
    // The retry answers 200 with the stored prompt, as it is now.
    let (st, again) = post(&ada, key(), body.clone()).await;
    assert_eq!(
        (st, again["id"].as_str()),
        (200, Some(pid.as_str())),
        "{again}"
    );
    assert_eq!(again["status"], "running");
    // The body's `key` is the same key; the socket frame's too.
    let (st, in_body) = post(
        &ada,
        None,
        json!({"text": "fix the build", "key": "retry-1 ~!"}),
    )
    .await;
    assert_eq!(
        (st, in_body["id"].as_str()),
        (200, Some(pid.as_str())),
        "{in_body}"
    );
    let mut ws = api.connect(&ada, &id, "ada-tab", 0).await;
    ws.send(json!({"type":"prompt","text":"fix the build","key":"retry-1 ~!","ref":"r1"}))
        .await;
    let ack = ws
        .until(secs(5), "prompt ack", |v| {
            v["type"] == "ack" && v["ref"] == "r1"
        })
        .await;
    assert_eq!(ack["result"]["id"].as_str(), Some(pid.as_str()), "{ack}");
    // Bob's same key is his own prompt.
    let (st, bobs) = post(&bob, key(), body.clone()).await;
    assert_eq!(st, 202, "{bobs}");
    assert_ne!(bobs["id"].as_str(), Some(pid.as_str()));
    // Malformed or conflicting keys are refused.
    let (st, bad) = post(&ada, Some("k".repeat(129)), body.clone()).await;
    assert_eq!(
        (st, bad["error"]["code"].as_str()),
        (400, Some("invalid_input"))
    );
    let (st, bad) = post(&ada, Some("a".into()), json!({"text": "x", "key": "b"})).await;
    assert_eq!(
        (st, bad["error"]["code"].as_str()),
        (400, Some("invalid_input"))
    );

    // One prompt of Ada's, one prompt.queued for it, and the key shown nowhere.
    let (_, q) = api
        .call("GET", &format!("/multiplayer/{id}/prompts"), &bob, None)
        .await;
    assert_eq!(q["running"]["id"].as_str(), Some(pid.as_str()), "{q}");
    let queued = q["queued"].as_array().cloned().unwrap_or_default();
    assert_eq!(queued.len(), 1, "only Bob's waits: {q}");
    assert_eq!(queued[0]["id"], bobs["id"]);
    assert!(!q.to_string().contains("retry-1"), "{q}");
    let (_, ev) = api
        .call(
            "GET",
            &format!("/multiplayer/{id}/events?since=0"),
            &bob,
            None,
        )
        .await;
    let queued_ids: Vec<&str> = ev["events"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter(|e| e["type"] == "prompt.queued")
                .filter_map(|e| e["prompt"]["id"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        queued_ids,
        vec![pid.as_str(), bobs["id"].as_str().unwrap_or("")]
    );
    assert!(!ev.to_string().contains("retry-1"), "{ev}");
}

#[tokio::test]
async fn a_long_log_is_replayed_in_bounded_pages_across_reconnects() {
    // At most 25 events per connect: a client far behind catches up over several connects,
    // each ending with close code 4002, with no gap and no duplicate (the harness checks each
    // event is last_seq + 1), and only the last connect goes live.
    let server = Server::start(&[("REPLAY_MAX_EVENTS", "25")]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let (id, _) = api.create_session(&ada, "Long log").await;
    for i in 0..60 {
        let path = format!("/multiplayer/{id}/lock");
        let body = json!({"resource": format!("f{i}")});
        let (st, v) = api.call("POST", &path, &ada, Some(body)).await;
        assert_eq!(st, 200, "{v}");
    }
    let (_, log) = api
        .call(
            "GET",
            &format!("/multiplayer/{id}/events?since=0"),
            &ada,
            None,
        )
        .await;
    let head = log["last_seq"].as_u64().expect("last_seq");
    assert!(head > 60, "the log holds {head} events");
    let mut since = 0;
    let mut seen = Vec::new();
    let mut connects = 0;
    loop {
        connects += 1;
        assert!(connects <= 10, "the replay never finished");
        let mut ws = api.connect(&ada, &id, "tab", since).await;
        let hello = ws.next(secs(5)).await.expect("hello");
        assert_eq!(hello["type"], "hello");
        let mut presence = false;
        loop {
            match ws.next(secs(5)).await {
                Some(f) if f["type"] == "events" => {}
                Some(f) if f["type"] == "presence" => {
                    presence = true;
                    break;
                }
                Some(f) if f["type"] == "presence.delta" => {}
                Some(f) => panic!("unexpected frame {f}"),
                None => break,
            }
        }
        let got = ws.seen.len();
        assert!(got <= 25, "one connect replayed {got} events");
        since = ws.last_seq;
        seen.append(&mut ws.seen);
        if presence {
            break;
        }
        assert_eq!(
            ws.closed_with,
            Some(4002),
            "a connect that stops replaying says so"
        );
        assert_eq!(got, 25, "a page that ends a connect is a full page");
    }
    assert!(connects >= 3, "{connects} connects for {head} events");
    let numbers: Vec<u64> = seen.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(numbers, (1..=numbers.len() as u64).collect::<Vec<_>>());
    assert!(numbers.len() as u64 >= head);
    assert_eq!(
        serde_json::Value::Array(seen[..head as usize].to_vec()),
        log["events"]
    );
}
