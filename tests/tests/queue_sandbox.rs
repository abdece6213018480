//! The prompt queue on the sandbox path: order, cancel, re-prioritise, stop and finish run through a real sandbox (local provider, supervisor, OpenCode, scripted model), not the echo runner.

use nightshift_tests::{start_with_compute, RUN};
use serde_json::{json, Value};

#[tokio::test]
async fn the_queue_orders_cancels_reprioritises_and_stops_prompts_running_in_a_sandbox() {
    // The first prompt's answer streams for about two minutes (400 chunks, 300 ms apart), so
    // the queue can be worked on while it runs however slow the machine is; it is stopped,
    // never waited out. The prompts after it answer at once (several identical turns: the
    // stopped reply may or may not count as one of the conversation's turns).
    let long: String = (0..1200).map(|i| format!("word{i} ")).collect();
    let mut turns = vec![json!({"text": long, "chunk_delay_ms": 300})];
    turns.extend((0..6).map(|_| json!({"text": "Queued prompt answered."})));
    let (compute, server) =
        start_with_compute(json!({ "turns": turns }), &[], &[("MAX_QUEUED", "3")]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let bob = api.sign_in("bob").await;
    let remote = compute.remote_repo("queue");
    let (id, invite) = api.create_session_on(&ada, "Queue", &remote).await;
    api.join(&bob, &id, &invite).await;
    let mut watch = api.connect(&ada, &id, "watch", 0).await;
    let send = |who, text: &str, prio: i32| {
        let api = api.clone();
        let id = id.clone();
        let body = json!({"text": text, "priority": prio});
        async move {
            api.call(
                "POST",
                &format!("/multiplayer/{id}/prompt"),
                who,
                Some(body),
            )
            .await
        }
    };
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

    let (st, p1) = send(&ada, "one", 0).await;
    assert_eq!((st, p1["status"].as_str()), (202, Some("running")), "{p1}");
    let p1 = id_of(&p1);
    // The agent is at work in the sandbox: its first words have arrived.
    watch
        .event_within(RUN, "agent.text", |e| e["prompt"] == p1.as_str())
        .await;

    let (_, p2) = send(&bob, "two", 0).await;
    let (_, p3) = send(&ada, "three", 5).await;
    let (_, p4) = send(&bob, "four", 0).await;
    let (p2, p3, p4) = (id_of(&p2), id_of(&p3), id_of(&p4));
    let (st, v) = send(&ada, "five", 0).await;
    assert_eq!((st, v["error"]["code"].as_str()), (429, Some("queue_full")));
    assert_eq!(
        queued().await,
        (vec![p3.clone(), p2.clone(), p4.clone()], Some(p1.clone()))
    );
    // Bob may not touch Ada's prompt; he cancels his own and raises another above hers.
    let (st, _) = api
        .call(
            "DELETE",
            &format!("/multiplayer/{id}/prompt/{p3}"),
            &bob,
            None,
        )
        .await;
    assert_eq!(st, 403);
    let (st, _) = api
        .call(
            "DELETE",
            &format!("/multiplayer/{id}/prompt/{p4}"),
            &bob,
            None,
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = api
        .call(
            "PATCH",
            &format!("/multiplayer/{id}/prompt/{p2}"),
            &bob,
            Some(json!({"priority": 9})),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(
        queued().await,
        (vec![p2.clone(), p3.clone()], Some(p1.clone()))
    );
    // The first prompt was still running through all of this (`running` above).

    // Stop goes to the sandbox; the raised prompt runs next there and finishes, then the last.
    let (st, v) = api
        .call("POST", &format!("/multiplayer/{id}/stop"), &ada, None)
        .await;
    assert_eq!(st, 200, "{v}");
    watch
        .event("prompt.stopped", |e| e["id"] == p1.as_str())
        .await;
    let f2 = watch.finished(&p2).await;
    assert_eq!(f2["ok"], true, "{f2}");
    let f3 = watch.finished(&p3).await;
    assert_eq!(f3["ok"], true, "{f3}");
    assert_eq!(queued().await, (vec![], None));

    let seen = &watch.seen;
    let ids = |ty: &str| -> Vec<String> {
        seen.iter()
            .filter(|e| e["type"] == ty)
            .map(|e| e["id"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let seq = |ty: &str, id: &str| -> u64 {
        seen.iter()
            .find(|e| e["type"] == ty && e["id"] == id)
            .and_then(|e| e["seq"].as_u64())
            .unwrap_or_else(|| panic!("no {ty} for {id} in {seen:?}"))
    };
    assert_eq!(
        ids("prompt.started"),
        vec![p1.clone(), p2.clone(), p3.clone()]
    );
    assert_eq!(ids("prompt.stopped"), vec![p1.clone()]);
    assert_eq!(ids("prompt.cancelled"), vec![p4.clone()]);
    assert_eq!(ids("prompt.finished"), vec![p2.clone(), p3.clone()]);
    // One at a time: each starts only after the one before it ended.
    assert!(seq("prompt.started", &p2) > seq("prompt.stopped", &p1));
    assert!(seq("prompt.started", &p3) > seq("prompt.finished", &p2));
    // Each prompt's answer came from the sandbox, inside its own run.
    for p in [&p2, &p3] {
        let text: String = seen
            .iter()
            .filter(|e| e["type"] == "agent.text" && e["prompt"] == p.as_str())
            .filter_map(|e| e["text"].as_str())
            .collect();
        assert!(text.contains("Queued prompt answered."), "{p}: {text}");
        let texts: Vec<u64> = seen
            .iter()
            .filter(|e| e["type"] == "agent.text" && e["prompt"] == p.as_str())
            .filter_map(|e| e["seq"].as_u64())
            .collect();
        assert!(
            texts
                .iter()
                .all(|s| *s > seq("prompt.started", p) && *s < seq("prompt.finished", p)),
            "{p}'s output outside its run: {texts:?}"
        );
    }
    // The cancelled prompt never reached the sandbox.
    assert!(
        !seen.iter().any(|e| e["prompt"] == p4.as_str()),
        "the cancelled prompt ran"
    );
    // The leak check at the end is not vacuous: it sees this compute's processes while the
    // sandbox lives (bubblewrap, supervisor, OpenCode).
    let live = compute.processes_left();
    assert!(
        !live.is_empty(),
        "no process of the running compute was found"
    );
    drop(watch);
    drop(server);
    // Dropping the compute checks that no process of it is left (see `Compute::drop`).
    drop(compute);
}
