//! The agent end to end: Worker under wrangler dev, local provider, real OpenCode, real git, scripted model — prompt in, commit out.

use nightshift_tests::{git, secs, Api, Compute, Server, User, Ws, RUN};
use serde_json::{json, Value};

async fn start(
    recording: Value,
    provider_env: &[(&str, &str)],
    extra: &[(&str, &str)],
) -> (Compute, Server) {
    nightshift_tests::start_with_compute(recording, provider_env, extra).await
}

fn of_prompt<'a>(seen: &'a [Value], ty: &str, prompt: &str) -> Vec<&'a Value> {
    seen.iter()
        .filter(|e| e["type"] == ty && (e["prompt"] == prompt || e["id"] == prompt))
        .collect()
}

fn seq_of(seen: &[Value], ty: &str, prompt: &str) -> u64 {
    of_prompt(seen, ty, prompt)
        .first()
        .and_then(|e| e["seq"].as_u64())
        .unwrap_or_else(|| panic!("no {ty} for {prompt} in {seen:?}"))
}

async fn prompt(api: &Api, who: &User, session: &str, text: &str) -> String {
    api.prompt(who, session, text).await
}

async fn finished(ws: &mut Ws, prompt: &str) -> Value {
    ws.finished(prompt).await
}

#[tokio::test]
async fn a_prompt_becomes_a_commit_on_a_pushed_branch_seen_live_by_everyone() {
    let recording = json!({"turns": [
        {"text": "I'll create the greeting file.", "tool_calls": [{"name": "write", "arguments": {"filePath": "hello.txt", "content": "hello from nightshift\n"}}]},
        {"text": "Created hello.txt."},
        {"text": "Adding the second file.", "tool_calls": [{"name": "write", "arguments": {"filePath": "second.txt", "content": "two\n"}}]},
        {"text": "Done with the follow-up."}
    ]});
    let (compute, server) = start(recording, &[], &[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let bob = api.sign_in("bob").await;
    let remote = compute.remote_repo("demo");
    let (id, invite) = api.create_session_on(&ada, "Greeting", &remote).await;
    api.join(&bob, &id, &invite).await;
    let mut a = api.connect(&ada, &id, "ada-web", 0).await;
    let mut b = api.connect(&bob, &id, "bob-web", 0).await;

    let p1 = prompt(&api, &ada, &id, "Create hello.txt").await;
    // Queued while the first runs (the sandbox is still spawning).
    let p2 = prompt(&api, &bob, &id, "Add second.txt").await;

    let f1 = finished(&mut a, &p1).await;
    assert_eq!(f1["ok"], true, "{f1}");
    let branch = format!("nightshift/{id}");
    assert_eq!(f1["branch"], branch.as_str());
    let f2 = finished(&mut a, &p2).await;
    assert_eq!(f2["ok"], true, "{f2}");
    finished(&mut b, &p2).await;

    // Both people saw exactly the same ordered log.
    let last = f2["seq"].as_u64().expect("seq");
    let upto = |seen: &[Value]| {
        seen.iter()
            .filter(|e| e["seq"].as_u64() <= Some(last))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(upto(&a.seen), upto(&b.seen));
    let seen = &a.seen;

    // Stages, then the agent's work, in order.
    let stage = |s: &str| {
        seen.iter()
            .find(|e| e["type"] == "sandbox.status" && e["stage"] == s)
            .and_then(|e| e["seq"].as_u64())
            .unwrap_or_else(|| panic!("no stage {s} in {seen:?}"))
    };
    assert!(stage("spawning") < stage("ready"));
    assert!(stage("ready") < seq_of(seen, "agent.text", &p1));
    let text: String = of_prompt(seen, "agent.text", &p1)
        .iter()
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert!(text.contains("I'll create the greeting file."), "{text}");
    assert!(text.contains("Created hello.txt."), "{text}");
    let tools = of_prompt(seen, "agent.tool", &p1);
    assert!(
        tools.iter().any(|t| t["tool"] == "write"
            && t["status"] == "running"
            && t["input"]["filePath"] == "hello.txt"),
        "{tools:?}"
    );
    assert!(
        tools
            .iter()
            .any(|t| t["tool"] == "write" && t["status"] == "completed"),
        "{tools:?}"
    );
    let steps = of_prompt(seen, "agent.step", &p1);
    assert!(
        !steps.is_empty()
            && steps
                .iter()
                .all(|s| s["tokens"]["output"].as_u64().is_some()),
        "{steps:?}"
    );
    // The follow-up started only after the first finished.
    assert!(seq_of(seen, "prompt.started", &p2) > f1["seq"].as_u64().expect("seq"));

    // The branch is on the remote with each person's commit.
    let log = git(&remote, &["log", "--format=%an <%ae>|%s", &branch]);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines[0], "BOB <bob@example.com>|Add second.txt", "{log}");
    assert_eq!(lines[1], "ADA <ada@example.com>|Create hello.txt", "{log}");
    assert_eq!(
        git(&remote, &["show", &format!("{branch}:hello.txt")]),
        "hello from nightshift"
    );
    assert_eq!(
        git(&remote, &["rev-parse", &branch]),
        f2["commit"].as_str().expect("commit")
    );
    // main is untouched.
    assert_eq!(git(&remote, &["log", "--format=%s", "main"]), "init");
}

#[tokio::test]
async fn stop_aborts_mid_run_and_the_next_prompt_still_runs() {
    let long: String = (0..120).map(|i| format!("word{i} ")).collect();
    let recording = json!({"turns": [
        {"text": long, "chunk_delay_ms": 150},
        {"text": "Second prompt answered."},
        {"text": "Second prompt answered."},
        {"text": "Second prompt answered."}
    ]});
    let (compute, server) = start(recording, &[], &[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let remote = compute.remote_repo("stop");
    let (id, _) = api.create_session_on(&ada, "Stop", &remote).await;
    let mut a = api.connect(&ada, &id, "ada-web", 0).await;
    let p1 = prompt(&api, &ada, &id, "Talk for a long time").await;
    a.event_within(RUN, "agent.text", |e| e["prompt"] == p1.as_str())
        .await;
    let (st, v) = api
        .call("POST", &format!("/multiplayer/{id}/stop"), &ada, None)
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["stopped"], p1.as_str());
    a.event("prompt.stopped", |e| e["id"] == p1.as_str()).await;
    // The agent really stopped: the long answer never completes.
    let p2 = prompt(&api, &ada, &id, "Say something short").await;
    let f2 = finished(&mut a, &p2).await;
    assert_eq!(f2["ok"], true, "{f2}");
    let text1: String = of_prompt(&a.seen, "agent.text", &p1)
        .iter()
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert!(
        !text1.contains("word119"),
        "the stopped run went on to the end: {text1}"
    );
    assert!(
        of_prompt(&a.seen, "prompt.finished", &p1).is_empty(),
        "a stopped prompt does not also finish"
    );
    // At the source: the model's stream of p1's long answer was cut off before its end (OpenCode
    // was aborted and dropped the request), not played out to the end and merely dropped by the
    // session. Every stream of that answer ended early, and none ran to completion.
    let long_stream = format!("(turn 0, \"{}", &long[..20]);
    let ends = model_stream_ends(&compute, &long_stream).await;
    assert!(
        ends.iter().all(|l| l.contains(": cut off after ")),
        "the stopped run's model stream was not cut off: {ends:#?}"
    );
}

/// The scripted model's log lines for the streams whose turn text starts as in `needle`,
/// once at least one of them has ended (waits up to 30 s).
async fn model_stream_ends(compute: &Compute, needle: &str) -> Vec<String> {
    let log = compute.dir.join("model.log");
    let t = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let ends: Vec<String> = text
            .lines()
            .filter(|l| l.contains(needle))
            .map(String::from)
            .collect();
        if !ends.is_empty() {
            return ends;
        }
        assert!(
            t.elapsed() < secs(30),
            "no stream of {needle} ended in the model log:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_killed_sandbox_is_detected_and_its_prompt_is_not_lost() {
    let recording = json!({"turns": [
        {"when": "Take your time", "text": "Thinking slowly.", "delay_ms": 60000},
        {"when": "Try again", "text": "Fresh sandbox, fresh answer."}
    ]});
    let (compute, server) = start(recording, &[], &[("SANDBOX_GRACE_MS", "1000")]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let remote = compute.remote_repo("kill");
    let (id, _) = api.create_session_on(&ada, "Kill", &remote).await;
    let mut a = api.connect(&ada, &id, "ada-web", 0).await;
    let p1 = prompt(&api, &ada, &id, "Take your time").await;
    a.event_within(RUN, "sandbox.status", |e| e["stage"] == "ready")
        .await;
    // Kill every process of the sandbox, as a crash would.
    let sandboxes = std::fs::read_dir(compute.dir.join("provider/sandboxes"))
        .expect("sandboxes")
        .flatten()
        .count();
    assert_eq!(sandboxes, 1);
    let killed = kill_sandboxes(&compute);
    assert!(killed > 0, "no sandbox process found");
    let lost = a
        .event_within(secs(30), "sandbox.status", |e| e["stage"] == "lost")
        .await;
    let f1 = a
        .event_within(secs(30), "prompt.finished", |e| e["id"] == p1.as_str())
        .await;
    assert_eq!(f1["ok"], false);
    assert!(
        f1["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("sandbox_lost")),
        "{f1}"
    );
    assert!(f1["seq"].as_u64() > lost["seq"].as_u64());
    // The session goes on: the next prompt gets a new sandbox and finishes.
    let p2 = prompt(&api, &ada, &id, "Try again").await;
    let f2 = finished(&mut a, &p2).await;
    assert_eq!(f2["ok"], true, "{f2}");
}

/// A follow-up sent just after the sandbox crashed, before the session declared it lost, was
/// never started by that sandbox: it runs in the next one (restored from the turn's snapshot)
/// instead of failing with "send it again".
#[tokio::test]
async fn a_follow_up_sent_just_after_a_crash_runs_in_the_next_sandbox() {
    let recording = json!({"turns": [
        {"when": "Write one", "text": "Writing one.", "tool_calls": [{"name": "write", "arguments": {"filePath": "one.txt", "content": "one\n"}}]},
        {"when": "Write one", "text": "Wrote one.txt."},
        {"when": "What now", "text": "Still here."}
    ]});
    let (compute, server) = start(recording, &[], &[("SANDBOX_GRACE_MS", "3000")]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let remote = compute.remote_repo("crash");
    let (id, _) = api.create_session_on(&ada, "Crash", &remote).await;
    let mut a = api.connect(&ada, &id, "ada-web", 0).await;
    let p1 = prompt(&api, &ada, &id, "Write one").await;
    let f1 = finished(&mut a, &p1).await;
    assert_eq!(f1["ok"], true, "{f1}");
    let killed = kill_sandboxes(&compute);
    assert!(killed > 0, "no sandbox process found");
    // Inside the grace period: the session still counts the dead sandbox as its own.
    let p2 = prompt(&api, &ada, &id, "What now").await;
    let lost = a
        .event_within(secs(30), "sandbox.status", |e| e["stage"] == "lost")
        .await;
    assert!(
        lost["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&format!("before it started prompt {p2}"))),
        "{lost}"
    );
    let f2 = finished(&mut a, &p2).await;
    assert_eq!(f2["ok"], true, "{f2}");
    let texts: Vec<Value> = a
        .seen
        .iter()
        .filter(|e| e["type"] == "agent.text" && e["prompt"] == p2.as_str())
        .cloned()
        .collect();
    assert!(
        texts.iter().any(|e| e["text"]
            .as_str()
            .is_some_and(|t| t.contains("Still here."))),
        "{texts:?}"
    );
}

/// Ending a session ends its sandbox with its work: the sandbox's last state (a draft that was
/// never committed included) is snapshotted, then the sandbox is terminated at the provider.
#[tokio::test]
async fn ending_a_session_snapshots_its_sandbox_and_terminates_it() {
    let recording = json!({"turns": [{"text": "Nothing to change."}]});
    let (compute, server) = start(recording, &[], &[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let remote = compute.remote_repo("end");
    let (id, _) = api.create_session_on(&ada, "End", &remote).await;
    let mut a = api.connect(&ada, &id, "ada-web", 0).await;
    let p1 = prompt(&api, &ada, &id, "Look around").await;
    assert_eq!(finished(&mut a, &p1).await["ok"], true);
    let snapshots = |v: &Value| v["snapshots"].as_array().map_or(0, Vec::len);
    // The turn's own snapshot first, so the final one is a second.
    let t = std::time::Instant::now();
    while snapshots(
        &api.call("GET", &format!("/sessions/{id}"), &ada, None)
            .await
            .1,
    ) < 1
    {
        assert!(t.elapsed() < RUN, "no snapshot after the turn");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let sbx = api.session_sandbox(&ada, &id).await;
    let draft = json!({"command": ["sh", "-c", "echo draft > draft.txt"]});
    let (st, out) = api
        .call("POST", &format!("/sandbox/{sbx}/exec"), &ada, Some(draft))
        .await;
    assert_eq!(st, 200, "{out}");
    let (st, ended) = api
        .call("POST", &format!("/sessions/{id}/end"), &ada, None)
        .await;
    assert_eq!(st, 200, "{ended}");
    let (_, after) = api
        .call("GET", &format!("/sessions/{id}"), &ada, None)
        .await;
    assert_eq!(snapshots(&after), 2, "the final snapshot: {after}");
    let (_, gone) = compute
        .provider("GET", &format!("/v1/sandboxes/{sbx}"), None)
        .await;
    assert_eq!(gone["status"], "terminated", "{gone}");
    let terminated = a
        .event_within(secs(10), "sandbox.status", |e| e["stage"] == "terminated")
        .await;
    assert!(
        terminated["detail"]
            .as_str()
            .is_some_and(|d| d.contains("snapshotted")),
        "{terminated}"
    );
    // The final snapshot holds the draft (the local provider keeps a snapshot's checkout on disk).
    let last = after["snapshots"][1]["id"]
        .as_str()
        .expect("snapshot")
        .to_string();
    let kept = compute
        .dir
        .join("provider/snapshots")
        .join(&last)
        .join("repo/draft.txt");
    assert_eq!(
        std::fs::read_to_string(&kept).ok().as_deref(),
        Some("draft\n"),
        "{}",
        kept.display()
    );
}

/// SIGKILLs every process carrying a sandbox mark of this compute; returns how many.
fn kill_sandboxes(compute: &Compute) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(compute.dir.join("provider/sandboxes"))
        .expect("dir")
        .flatten()
    {
        let id = entry.file_name().to_string_lossy().to_string();
        for pid in nightshift_sandbox::procs::marked(&id) {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            n += 1;
        }
    }
    n
}

#[tokio::test]
async fn reads_go_ahead_while_writes_wait_for_a_slow_sync() {
    let recording = json!({"turns": [
        {"text": "Reading first.", "tool_calls": [{"name": "read", "arguments": {"filePath": "README.md"}}]},
        {"text": "Now writing.", "tool_calls": [{"name": "write", "arguments": {"filePath": "early.txt", "content": "too early\n"}}]},
        {"text": "The write was blocked; I will wait."},
        {"text": "Writing after the sync.", "tool_calls": [{"name": "write", "arguments": {"filePath": "late.txt", "content": "after sync\n"}}]},
        {"text": "Written."}
    ]});
    // The network stays "slow" (the sync cannot finish) until the test opens the gate file.
    let gate_dir = nightshift_tests::repo_root()
        .join(".state/test")
        .join(format!("gate-{}", std::process::id()));
    std::fs::create_dir_all(&gate_dir).expect("gate dir");
    let gate = gate_dir.join("network-is-back");
    let _ = std::fs::remove_file(&gate);
    let gate_s = gate.to_string_lossy().to_string();
    let (compute, server) = start(
        recording,
        &[("NIGHTSHIFT_SYNC_GATE_FILE", gate_s.as_str())],
        &[],
    )
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let remote = compute.remote_repo("gate");
    let (id, _) = api.create_session_on(&ada, "Gate", &remote).await;
    let mut a = api.connect(&ada, &id, "ada-web", 0).await;
    let p1 = prompt(&api, &ada, &id, "Read, then write").await;
    let f1 = finished(&mut a, &p1).await;
    assert_eq!(f1["ok"], true, "{f1}");
    let seen = a.seen.clone();
    let tools = of_prompt(&seen, "agent.tool", &p1);
    let read_done = tools
        .iter()
        .find(|t| t["tool"] == "read" && t["status"] == "completed")
        .expect("read completed");
    let write_err = tools
        .iter()
        .find(|t| t["tool"] == "write" && t["status"] == "error")
        .expect("write blocked");
    assert!(
        write_err["error"]
            .as_str()
            .is_some_and(|e| e.contains("still syncing")),
        "{write_err}"
    );
    let blocked = seen
        .iter()
        .find(|e| e["type"] == "agent.blocked")
        .expect("agent.blocked event");
    assert_eq!(blocked["tool"], "write");
    assert!(
        !seen
            .iter()
            .any(|e| e["type"] == "sandbox.status" && e["stage"] == "synced"),
        "the sync cannot have finished yet"
    );
    std::fs::write(&gate, "open").expect("open the gate");
    // The read and the blocked write both happened before the sync finished.
    let synced = a
        .event_within(secs(30), "sandbox.status", |e| e["stage"] == "synced")
        .await;
    assert!(read_done["seq"].as_u64() < synced["seq"].as_u64());
    assert!(write_err["seq"].as_u64() < synced["seq"].as_u64());
    assert!(
        f1.get("branch").is_none(),
        "nothing was written, so nothing was pushed: {f1}"
    );
    // After the sync the same kind of write goes through.
    let p2 = prompt(&api, &ada, &id, "Write now").await;
    let f2 = finished(&mut a, &p2).await;
    assert_eq!(f2["ok"], true, "{f2}");
    let branch = f2["branch"].as_str().expect("branch");
    assert_eq!(
        git(&remote, &["show", &format!("{branch}:late.txt")]),
        "after sync"
    );
    assert!(std::process::Command::new("git")
        .args(["show", &format!("{branch}:early.txt")])
        .current_dir(&remote)
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(false));
}

#[tokio::test]
async fn a_repository_that_does_not_exist_fails_the_prompt_with_the_reason() {
    let (_compute, server) = start(json!({"turns": []}), &[], &[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let missing = std::path::Path::new("/nonexistent/nightshift/repo.git");
    let (id, _) = api.create_session_on(&ada, "Missing", missing).await;
    let mut a = api.connect(&ada, &id, "web", 0).await;
    let p1 = prompt(&api, &ada, &id, "Anything").await;
    let f = a
        .event_within(secs(30), "prompt.finished", |e| e["id"] == p1.as_str())
        .await;
    assert_eq!(f["ok"], false);
    let reason = f["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("sandbox_failed") && reason.contains("repository_not_found"),
        "{reason}"
    );
    a.event("sandbox.status", |e| e["stage"] == "failed").await;
    // The queue is not stuck: the next prompt is taken (and fails the same clear way).
    let p2 = prompt(&api, &ada, &id, "Again").await;
    let f2 = a
        .event_within(secs(30), "prompt.finished", |e| e["id"] == p2.as_str())
        .await;
    assert_eq!(f2["ok"], false);
}

#[tokio::test]
async fn the_session_model_and_a_prompt_model_reach_the_model_and_an_unknown_one_fails_clearly() {
    let recording = json!({"turns": [{"text": "Answering as {model}."}, {"text": "Answering as {model}."}, {"text": "Answering as {model}."}]});
    let (compute, server) = start(
        recording,
        &[(
            "NIGHTSHIFT_MODELS",
            "nightshift/session-model,nightshift/prompt-model",
        )],
        &[],
    )
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let remote = compute.remote_repo("models");
    let (st, v) = api
        .call(
            "POST",
            "/sessions",
            &ada,
            Some(json!({"title": "Models", "repository": remote, "model": "no-slash"})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid_model")),
        "{v}"
    );
    let (st, s) = api
        .call("POST", "/sessions", &ada, Some(json!({"title": "Models", "repository": remote, "model": "nightshift/session-model"})))
        .await;
    assert_eq!(st, 201, "{s}");
    assert_eq!(s["model"], "nightshift/session-model");
    let id = s["id"].as_str().expect("id").to_string();
    let mut a = api.connect(&ada, &id, "web", 0).await;
    let text_of = |seen: &[Value], p: &str| -> String {
        of_prompt(seen, "agent.text", p)
            .iter()
            .filter_map(|e| e["text"].as_str())
            .collect()
    };
    let p1 = prompt(&api, &ada, &id, "Which model?").await;
    assert_eq!(finished(&mut a, &p1).await["ok"], true);
    assert_eq!(text_of(&a.seen, &p1), "Answering as session-model.");
    let (st, p2) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/prompt"),
            &ada,
            Some(json!({"text": "And now?", "model": "nightshift/prompt-model"})),
        )
        .await;
    assert_eq!(st, 202, "{p2}");
    let p2 = p2["id"].as_str().expect("p2").to_string();
    assert_eq!(finished(&mut a, &p2).await["ok"], true);
    assert_eq!(text_of(&a.seen, &p2), "Answering as prompt-model.");
    let (st, v) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/prompt"),
            &ada,
            Some(json!({"text": "x", "model": "bad model"})),
        )
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid_model"))
    );
    let (_, p3) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/prompt"),
            &ada,
            Some(json!({"text": "Unknown", "model": "nightshift/not-configured"})),
        )
        .await;
    let p3 = p3["id"].as_str().expect("p3").to_string();
    let f3 = finished(&mut a, &p3).await;
    assert_eq!(f3["ok"], false);
    assert!(
        f3["reason"]
            .as_str()
            .is_some_and(|r| r.contains("Model not found")),
        "{f3}"
    );
}

#[tokio::test]
async fn a_control_plane_restart_mid_run_loses_and_duplicates_nothing() {
    let words: Vec<String> = (0..150).map(|i| format!("w{i}")).collect();
    let full = words.join(" ");
    let recording = json!({"turns": [{"text": full, "chunk_delay_ms": 60}]});
    let (compute, mut server) = start(recording, &[], &[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let remote = compute.remote_repo("restart");
    let (id, _) = api.create_session_on(&ada, "Restart", &remote).await;
    let mut a = api.connect(&ada, &id, "web", 0).await;
    let p1 = prompt(&api, &ada, &id, "Talk through a restart").await;
    a.event_within(RUN, "agent.text", |e| e["prompt"] == p1.as_str())
        .await;
    // The Worker and its objects go away mid-run and come back on the same state.
    assert!(
        of_prompt(&a.seen, "prompt.finished", &p1).is_empty(),
        "the run must still be going"
    );
    server.restart().await;
    let mut b = api.connect(&ada, &id, "web-2", 0).await;
    let f = b
        .event_within(RUN, "prompt.finished", |e| e["id"] == p1.as_str())
        .await;
    assert_eq!(f["ok"], true, "{f}");
    // `b` replayed the whole log from 1 with no gap or duplicate (checked as frames arrive);
    // the agent's text is all there, exactly once.
    let text: String = of_prompt(&b.seen, "agent.text", &p1)
        .iter()
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert_eq!(text, full);
}

#[tokio::test]
async fn an_idle_sandbox_is_snapshotted_and_stopped_and_a_follow_up_starts_it_again() {
    // X5 (the idle half): 3 s with nothing to do stops the sandbox after a snapshot; the
    // follow-up boots the same sandbox again, with the first turn's file still there.
    let recording = json!({"turns": [
        {"text": "Writing it.", "tool_calls": [{"name": "write", "arguments": {"filePath": "one.txt", "content": "one\n"}}]},
        {"text": "Wrote one.txt."},
        {"text": "Still here."}
    ]});
    let (compute, server) = start(recording, &[], &[("SANDBOX_IDLE_MS", "3000")]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let remote = compute.remote_repo("idle");
    let (id, _) = api.create_session_on(&ada, "Idle", &remote).await;
    let mut a = api.connect(&ada, &id, "ada-web", 0).await;
    let p1 = prompt(&api, &ada, &id, "Write one.txt").await;
    let f1 = finished(&mut a, &p1).await;
    assert_eq!(f1["ok"], true, "{f1}");
    let sbx = api.session_sandbox(&ada, &id).await;
    let stopped = a
        .event_within(secs(30), "sandbox.status", |e| e["stage"] == "stopped")
        .await;
    assert!(
        stopped["detail"]
            .as_str()
            .is_some_and(|d| d.contains("nothing to do") && d.contains("snapshotted")),
        "{stopped}"
    );
    let (_, at_provider) = compute
        .provider("GET", &format!("/v1/sandboxes/{sbx}"), None)
        .await;
    assert_eq!(at_provider["status"], "stopped", "{at_provider}");
    let (_, session) = api
        .call("GET", &format!("/sessions/{id}"), &ada, None)
        .await;
    assert!(
        session["snapshots"]
            .as_array()
            .is_some_and(|s| !s.is_empty()),
        "no snapshot before the stop: {session}"
    );
    // The follow-up starts the same sandbox again and runs there.
    let p2 = prompt(&api, &ada, &id, "Anything else?").await;
    let f2 = finished(&mut a, &p2).await;
    assert_eq!(f2["ok"], true, "{f2}");
    assert_eq!(api.session_sandbox(&ada, &id).await, sbx);
    let (_, again) = compute
        .provider("GET", &format!("/v1/sandboxes/{sbx}"), None)
        .await;
    assert_ne!(again["status"], "stopped", "{again}");
}
