//! The scripted model over HTTP: streamed replay with tool calls, `when` selection, bad input, and record-then-replay through an upstream.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

async fn serve(args: &[&str]) -> (Proc, String) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_nightshift-scripted-model"))
        .args(["--port", &port.to_string()])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start");
    let base = format!("http://127.0.0.1:{port}");
    let t = Instant::now();
    while reqwest::get(format!("{base}/health")).await.is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "did not start");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    (Proc(child), base)
}

/// Streams one completion; returns (text, tool calls as (name, arguments), finish reason).
async fn complete(base: &str, messages: Value) -> (String, Vec<(String, Value)>, String) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": "scripted", "stream": true, "messages": messages}))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status().as_u16(), 200);
    let body = r.text().await.expect("body");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    let mut text = String::new();
    let mut calls: Vec<(String, String)> = Vec::new();
    let mut finish = String::new();
    for line in body.lines() {
        let Some(d) = line.strip_prefix("data: ") else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(d) else {
            continue;
        };
        let c = &v["choices"][0];
        text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
        for tc in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
            calls.push((
                tc["function"]["name"].as_str().unwrap_or("").into(),
                tc["function"]["arguments"].as_str().unwrap_or("").into(),
            ));
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.into();
        }
    }
    let calls = calls
        .into_iter()
        .map(|(n, a)| (n, serde_json::from_str(&a).unwrap_or(Value::Null)))
        .collect();
    (text, calls, finish)
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{name}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&d).expect("dir");
    d
}

#[tokio::test]
async fn replays_turns_in_order_with_tool_calls_and_when() {
    let dir = scratch("replay");
    let rec = dir.join("rec.json");
    std::fs::write(&rec, json!({"turns": [
        {"text": "Reading the file now.", "tool_calls": [{"name": "read", "arguments": {"filePath": "a.txt"}}]},
        {"text": "All done."},
        {"when": "special", "text": "Special conversation."}
    ]}).to_string()).expect("write");
    let (_p, base) = serve(&["--recording", rec.to_str().expect("path")]).await;
    let user = json!({"role": "user", "content": "hello"});
    let (t, calls, f) = complete(&base, json!([user])).await;
    assert_eq!(t, "Reading the file now.");
    assert_eq!(
        calls,
        vec![("read".to_string(), json!({"filePath": "a.txt"}))]
    );
    assert_eq!(f, "tool_calls");
    let (t, calls, f) = complete(
        &base,
        json!([user, {"role": "assistant", "content": "x"}, {"role": "tool", "content": "y"}]),
    )
    .await;
    assert_eq!(
        (t.as_str(), calls.len(), f.as_str()),
        ("All done.", 0, "stop")
    );
    let (t, _, _) = complete(
        &base,
        json!([{"role": "user", "content": [{"type": "text", "text": "a special one"}]}]),
    )
    .await;
    assert_eq!(
        t, "Reading the file now.",
        "turns without `when` apply to every conversation"
    );
    let (t, _, _) = complete(&base, json!([{"role": "user", "content": "a special one"}, {"role": "assistant", "content": "x"}, {"role": "assistant", "content": "y"}])).await;
    assert_eq!(t, "Special conversation.");
    let (t, _, f) = complete(
        &base,
        json!([user, {"role": "assistant"}, {"role": "assistant"}, {"role": "assistant"}]),
    )
    .await;
    assert!(t.contains("nothing more to say"), "{t}");
    assert_eq!(f, "stop");
    // Bad input gets OpenAI-style errors.
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .body("{")
        .send()
        .await
        .expect("req");
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"]["code"], "invalid_json");
}

#[tokio::test]
async fn a_bad_recording_is_refused_at_start() {
    let dir = scratch("bad");
    let rec = dir.join("rec.json");
    std::fs::write(&rec, r#"{"turns":[{"txt":"typo"}]}"#).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_nightshift-scripted-model"))
        .args(["--recording", rec.to_str().expect("path")])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `txt`"));
}

#[tokio::test]
async fn records_through_an_upstream_and_replays_the_same() {
    let dir = scratch("record");
    let upstream_rec = dir.join("upstream.json");
    std::fs::write(&upstream_rec, json!({"turns": [
        {"text": "Writing it.", "tool_calls": [{"name": "write", "arguments": {"filePath": "x.md", "content": "hi\n"}}]},
        {"text": "Finished."}
    ]}).to_string()).expect("write");
    let (_up, up) = serve(&["--recording", upstream_rec.to_str().expect("path")]).await;
    let recorded = dir.join("recorded.json");
    let (_rec, rec_base) = serve(&[
        "--upstream",
        &format!("{up}/v1"),
        "--record",
        recorded.to_str().expect("path"),
    ])
    .await;
    let user = json!({"role": "user", "content": "go"});
    let first = complete(&rec_base, json!([user])).await;
    let second = complete(
        &rec_base,
        json!([user, {"role": "assistant", "content": "x"}]),
    )
    .await;
    assert_eq!(first.0, "Writing it.");
    assert_eq!(second.0, "Finished.");
    // The file is written after each stream ends.
    let t = Instant::now();
    let saved = loop {
        let v: Value = std::fs::read_to_string(&recorded)
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Value::Null);
        if v["turns"].as_array().map(Vec::len) == Some(2) {
            break v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "recording not written: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        saved["turns"][0]["tool_calls"][0],
        json!({"name": "write", "arguments": {"filePath": "x.md", "content": "hi\n"}})
    );
    let (_replay, replay) = serve(&["--recording", recorded.to_str().expect("path")]).await;
    assert_eq!(complete(&replay, json!([user])).await, first);
    assert_eq!(
        complete(
            &replay,
            json!([user, {"role": "assistant", "content": "x"}])
        )
        .await,
        second
    );
}
