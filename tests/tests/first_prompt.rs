//! A new session's first prompt: once a sandbox says `ready`, OpenCode has nothing left to initialise (no dependency install, no config written), and the warm-up never reaches the session's model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nightshift_tests::{pool_ready, start_with_compute, RUN};
use serde_json::json;

/// Every entry under `dir` (symlinks not followed) with its size and modification time.
fn fingerprint(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            let rel = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .display()
                .to_string();
            let mtime = meta
                .modified()
                .ok()
                .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            out.push(format!("{rel} {} {mtime}", meta.len()));
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

/// OpenCode's config and cache folders of every sandbox the provider has, by sandbox id.
fn opencode_state(provider_root: &Path) -> BTreeMap<String, (Vec<String>, Vec<String>)> {
    let dirs: Vec<PathBuf> = std::fs::read_dir(provider_root.join("sandboxes"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.iter()
        .map(|d| {
            let home = d.join("home");
            let id = d
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            let config = fingerprint(&home.join(".config").join("opencode"));
            (id, (config, fingerprint(&home.join(".cache"))))
        })
        .collect()
}

#[tokio::test]
async fn a_pooled_sandbox_has_nothing_left_to_initialise_when_its_first_prompt_arrives() {
    let recording =
        json!({"turns": [{"text": "First answer from the model."}, {"text": "Second."}]});
    let (compute, server) = start_with_compute(recording, &[], &[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let remote = compute.remote_repo("first");
    let body = json!({"name": "first", "clone_url": remote, "pool_size": 1});
    let (st, v) = api.call("POST", "/repositories", &ada, Some(body)).await;
    assert_eq!(st, 201, "{v}");
    let t = Instant::now();
    loop {
        let (_, v) = api.call("GET", "/repositories/first", &ada, None).await;
        if pool_ready(&v) {
            break;
        }
        assert!(t.elapsed() < RUN, "the pool never filled: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let root = compute.dir.join("provider");
    let before = opencode_state(&root);

    let (id, _) = api
        .create_session_on(&ada, "first", Path::new("first"))
        .await;
    let mut ws = api.connect(&ada, &id, "t", 0).await;
    let prompt = api.prompt(&ada, &id, "What is here?").await;
    let done = ws.finished(&prompt).await;
    assert_eq!(done["ok"], true, "{done}");
    // The first answer is the recording's first turn: the warm-up never reached the model.
    let text: String = ws
        .seen
        .iter()
        .filter(|e| e["type"] == "agent.text" && e["prompt"] == prompt.as_str())
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert!(text.contains("First answer from the model."), "{text}");
    // The sandbox the prompt ran in was the pooled one, booted before the prompt...
    let (_, list) = compute
        .provider("GET", &format!("/v1/sandboxes?session_id={id}"), None)
        .await;
    let used = list["sandboxes"][0]["id"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let Some(was) = before.get(&used) else {
        panic!("the session's sandbox {used} was not booted before the prompt: {list}");
    };
    assert!(
        !was.0.is_empty(),
        "the sandbox has an OpenCode config folder"
    );
    // ...and nothing was installed, written or cached for OpenCode on the person's time.
    let after = opencode_state(&root);
    assert_eq!(
        Some(was),
        after.get(&used),
        "OpenCode initialised something during the first prompt"
    );
}
