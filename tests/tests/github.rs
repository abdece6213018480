//! GitHub end to end against the fake GitHub (its real wire formats): signing in with the OAuth web flow and PKCE, tokens that sign-out ends, one-time WebSocket tickets, and webhooks verified, de-duplicated and applied to a session's pull request in order.

use nightshift_core::github::Role;
use nightshift_tests::fake_github::{FakeGithub, FakeGithubConfig};
use nightshift_tests::{secs, Server, User};
use serde_json::{json, Value};

async fn start(fake: &FakeGithub) -> Server {
    let vars = fake.worker_vars();
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(&vars).await;
    fake.deliver_to(&format!("{}/webhook/github", server.base));
    server
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

fn location(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// The `ns_oauth=…` pair of a `Set-Cookie`.
fn flow_cookie(resp: &reqwest::Response) -> String {
    resp.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("ns_oauth="))
        .and_then(|c| c.split(';').next())
        .unwrap_or_default()
        .to_string()
}

fn fragment_params(location: &str) -> Vec<(String, String)> {
    let query = location
        .split_once("#/signed-in?")
        .map(|(_, q)| q)
        .unwrap_or_default();
    nightshift_core::github::form_decode(query)
}

/// One browser's sign-in: start → GitHub's authorize page → callback. Returns the callback's
/// URL and the flow cookie, before the callback is visited.
async fn begin(server: &Server, fake: &FakeGithub, ret: &str) -> (String, String) {
    let http = no_redirects();
    let start = http
        .get(format!(
            "{}/auth/github/start?return={}",
            server.base,
            nightshift_core::github::percent_encode(ret)
        ))
        .send()
        .await
        .expect("start");
    assert_eq!(start.status().as_u16(), 302);
    let authorize = location(&start);
    assert!(
        authorize.starts_with(&format!("{}/login/oauth/authorize?", fake.web_url())),
        "{authorize}"
    );
    assert!(
        authorize.contains("code_challenge_method=S256"),
        "{authorize}"
    );
    let cookie = flow_cookie(&start);
    assert!(!cookie.is_empty(), "no flow cookie");
    let callback = fake
        .authorize_redirect(&authorize)
        .await
        .expect("authorize page");
    assert!(
        callback.starts_with(&format!("{}/auth/github/callback?", server.base)),
        "{callback}"
    );
    (callback, cookie)
}

async fn visit(url: &str, cookie: Option<&str>) -> (u16, String, Value) {
    let mut req = no_redirects().get(url);
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let resp = req.send().await.expect("callback");
    let status = resp.status().as_u16();
    let to = location(&resp);
    let body = resp.text().await.unwrap_or_default();
    (
        status,
        to,
        serde_json::from_str(&body).unwrap_or(Value::Null),
    )
}

/// Signs `login` in through GitHub; returns their Nightshift token.
async fn sign_in_with_github(server: &Server, fake: &FakeGithub, login: &str) -> String {
    fake.sign_in_through(&server.base, login).await
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn a_person_signs_in_with_github_and_sign_out_ends_every_token() {
    let fake = FakeGithub::start(FakeGithubConfig::default()).await;
    fake.add_user("Ada-L", "Ada Lovelace");
    let server = start(&fake).await;
    let api = server.client();

    let (st, options) = api.raw("GET", "/auth/config", None, None).await;
    assert_eq!(
        (st, options["github"].as_bool()),
        (200, Some(true)),
        "{options}"
    );

    // The flow: the return path survives, the token arrives in the fragment.
    fake.set_browser_user("Ada-L");
    let (callback, cookie) = begin(&server, &fake, "/#/s/ses_x").await;
    let (status, to, body) = visit(&callback, Some(&cookie)).await;
    assert_eq!(status, 302, "{body}");
    let params = fragment_params(&to);
    let get = |k: &str| {
        params
            .iter()
            .find(|(name, _)| name == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(get("return"), "/#/s/ses_x");
    let token = get("token");
    let (st, me) = api.raw("GET", "/auth/me", Some(&token), None).await;
    assert_eq!(st, 200, "{me}");
    assert_eq!(me["user"], "ada-l");
    assert_eq!(me["name"], "Ada Lovelace");
    assert!(
        me["email"].as_str().is_some_and(|e| e.contains('@')),
        "{me}"
    );

    // The same code again (a replayed callback): GitHub refuses it; nothing signed in.
    let (st, _, replay) = visit(&callback, Some(&cookie)).await;
    assert_eq!((st, code(&replay)), (400, "oauth_refused"), "{replay}");
    // A callback without this browser's cookie, or with another state: refused before GitHub.
    let (callback2, cookie2) = begin(&server, &fake, "/").await;
    let (st, _, v) = visit(&callback2, None).await;
    assert_eq!((st, code(&v)), (400, "oauth_flow_missing"), "{v}");
    let forged_state = callback2.replace("state=", "state=x");
    let (st, _, v) = visit(&forged_state, Some(&cookie2)).await;
    assert_eq!((st, code(&v)), (400, "oauth_state_mismatch"), "{v}");
    let (st, _, v) = visit(&callback2, Some(&cookie)).await;
    assert_eq!((st, code(&v)), (400, "oauth_state_mismatch"), "{v}");
    // The untouched second flow still works once.
    let (st, _, v) = visit(&callback2, Some(&cookie2)).await;
    assert_eq!(st, 302, "{v}");

    // A one-time ticket opens a session's socket once.
    let ada = User {
        user: "ada-l".into(),
        token: token.clone(),
    };
    let (id, _) = api.create_session(&ada, "Signed in").await;
    let ticket = api.ticket(&ada, &id).await;
    let url = format!(
        "{}/multiplayer/{id}/ws?ticket={ticket}&client=c1",
        server.base.replacen("http", "ws", 1)
    );
    let (socket, _) = tokio_tungstenite::connect_async(url.clone())
        .await
        .expect("ticket opens the socket");
    drop(socket);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401)
        }
        other => panic!("a used ticket opened a socket: {:?}", other.map(|_| ())),
    }
    // No token in a socket's URL any more.
    let with_token = format!(
        "{}/multiplayer/{id}/ws?token={token}&client=c2",
        server.base.replacen("http", "ws", 1)
    );
    assert!(tokio_tungstenite::connect_async(with_token).await.is_err());

    // Renewal gives a new token of the same sign-in; sign-out ends both.
    let (st, renewed) = api.raw("POST", "/auth/renew", Some(&token), None).await;
    assert_eq!(st, 200, "{renewed}");
    let renewed = renewed["token"].as_str().expect("token").to_string();
    assert_ne!(renewed, token);
    let (st, _) = api.raw("POST", "/auth/logout", Some(&renewed), None).await;
    assert_eq!(st, 200);
    for old in [&token, &renewed] {
        let (st, v) = api.raw("GET", "/auth/me", Some(old), None).await;
        assert_eq!((st, code(&v)), (401, "signed_out"), "{v}");
        let (st, v) = api.raw("GET", "/sessions", Some(old), None).await;
        assert_eq!((st, code(&v)), (401, "signed_out"), "{v}");
        let (st, v) = api
            .raw(
                "POST",
                "/auth/ticket",
                Some(old),
                Some(json!({ "session": id }).to_string().into_bytes()),
            )
            .await;
        assert_eq!((st, code(&v)), (401, "signed_out"), "{v}");
    }
    // A fresh sign-in of the same person works again.
    let again = sign_in_with_github(&server, &fake, "Ada-L").await;
    let (st, _) = api.raw("GET", "/auth/me", Some(&again), None).await;
    assert_eq!(st, 200);
}

#[tokio::test]
async fn dev_sign_in_refuses_reserved_names_and_remote_hosts() {
    let fake = FakeGithub::start(FakeGithubConfig::default()).await;
    let server = start(&fake).await;
    let api = server.client();
    for reserved in ["system", "sandbox", "people"] {
        let (st, v) = api
            .raw(
                "POST",
                "/auth/dev",
                None,
                Some(json!({ "user": reserved }).to_string().into_bytes()),
            )
            .await;
        assert_eq!((st, code(&v)), (400, "invalid_user"), "{reserved}: {v}");
    }
    // Reached under another host name (a deployment with DEV_AUTH set by mistake): refused.
    let resp = reqwest::Client::new()
        .post(format!("{}/auth/dev", server.base))
        .header("host", "nightshift.example.com")
        .header("content-type", "application/json")
        .body(json!({ "user": "mallory" }).to_string())
        .send()
        .await
        .expect("request");
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!((status, code(&v)), (403, "dev_sign_in_local_only"), "{v}");
}

#[tokio::test]
async fn webhooks_are_verified_processed_once_and_applied_in_order() {
    let fake = FakeGithub::start(FakeGithubConfig::default()).await;
    fake.add_user("ada", "Ada Lovelace");
    fake.add_repo("acme/web", &[("ada", Role::Admin)]);
    fake.install("acme", &["acme/web"]);
    let server = start(&fake).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let (id, _) = api.create_session(&ada, "PR state").await;
    let mut ws = api.connect(&ada, &id, "watch", 0).await;

    // The session's branch and a pull request on it, opened at GitHub: its `opened` delivery
    // finds the session by the branch.
    let branch = format!("nightshift/{id}");
    fake.commit_file("acme/web", &branch, "NOTES.md", "work\n")
        .expect("commit");
    let user_token = fake.mint_user_token("ada");
    let created = reqwest::Client::new()
        .post(format!("{}/repos/acme/web/pulls", fake.api_url()))
        .bearer_auth(&user_token)
        .header("user-agent", "nightshift-tests")
        .header("accept", "application/vnd.github+json")
        .json(&json!({ "title": "Notes", "head": branch, "base": "main" }))
        .send()
        .await
        .expect("create pull");
    assert_eq!(created.status().as_u16(), 201);
    let opened = fake.wait_for_deliveries(1, secs(10)).await;
    let opened = opened
        .iter()
        .find(|d| d.event == "pull_request")
        .expect("opened delivery")
        .clone();
    assert_eq!(opened.status_code, 202);
    let event = ws.event("pr.opened", |_| true).await;
    assert_eq!(event["pull_request"]["number"], 1);
    assert_eq!(event["pull_request"]["state"], "open");
    let (_, view) = api
        .call("GET", &format!("/sessions/{id}"), &ada, None)
        .await;
    assert_eq!(view["pull_request"]["state"], "open", "{view}");
    let before_merge = fake
        .pull_request_payload("opened", "acme/web", 1)
        .expect("payload");

    // Merged: the session shows it.
    fake.merge("acme/web", 1).await.expect("merge");
    let merged = ws.event("pr.merged", |_| true).await;
    assert_eq!(merged["pull_request"]["state"], "merged");
    let last_seq = ws.last_seq;

    // The same delivery again, an older state delivered late, a forged signature, an unknown
    // repository's event: nothing changes.
    let closed = fake
        .deliveries()
        .into_iter()
        .find(|d| d.action.as_deref() == Some("closed"))
        .expect("closed delivery");
    assert_eq!(fake.redeliver(&closed.guid).await, 202);
    let (st, guid) = fake.deliver("pull_request", before_merge.clone()).await;
    assert_eq!(st, 202, "{guid}");
    let body = serde_json::to_vec(&before_merge).expect("json");
    let forged = fake
        .deliver_raw("pull_request", "forged-1", &body, Some("sha256=00"))
        .await;
    assert_eq!(forged, 401);
    let unsigned = fake
        .deliver_raw("pull_request", "forged-2", &body, None)
        .await;
    assert_eq!(unsigned, 401);
    let mut elsewhere = before_merge.clone();
    elsewhere["repository"]["full_name"] = json!("other/repo");
    elsewhere["pull_request"]["head"]["ref"] = json!("feature");
    let (st, _) = fake.deliver("pull_request", elsewhere).await;
    assert_eq!(st, 202);
    let (_, view) = api
        .call("GET", &format!("/sessions/{id}"), &ada, None)
        .await;
    assert_eq!(view["pull_request"]["state"], "merged", "{view}");
    assert_eq!(view["last_seq"].as_u64(), Some(last_seq), "{view}");

    // GitHub sends up to 25 MB: a 3 MB delivery is taken (only what Nightshift reads is stored;
    // this one is the stale `opened` again, so nothing changes).
    let mut large = before_merge.clone();
    large["pull_request"]["body"] = json!("x".repeat(3 * 1024 * 1024));
    let (st, said) = fake.deliver("pull_request", large).await;
    assert_eq!(st, 202, "{said}");
    let (_, view) = api
        .call("GET", &format!("/sessions/{id}"), &ada, None)
        .await;
    assert_eq!(view["last_seq"].as_u64(), Some(last_seq), "{view}");

    // GitHub could not deliver (the Worker was unreachable): the cron asks for it again, once.
    let (second, _) = api.create_session(&ada, "Later").await;
    let mut ws2 = api.connect(&ada, &second, "watch-2", 0).await;
    let later = format!("nightshift/{second}");
    fake.commit_file("acme/web", &later, "LATER.md", "later\n")
        .expect("commit");
    fake.fail_deliveries(true);
    let created = reqwest::Client::new()
        .post(format!("{}/repos/acme/web/pulls", fake.api_url()))
        .bearer_auth(&user_token)
        .header("user-agent", "nightshift-tests")
        .header("accept", "application/vnd.github+json")
        .json(&json!({ "title": "Later", "head": later, "base": "main" }))
        .send()
        .await
        .expect("create pull");
    assert_eq!(created.status().as_u16(), 201);
    let failed = fake
        .deliveries()
        .into_iter()
        .rev()
        .find(|d| d.event == "pull_request" && d.action.as_deref() == Some("opened"))
        .expect("the failed delivery");
    assert_eq!(failed.status_code, 502);
    fake.fail_deliveries(false);
    let cron = |at: u64| {
        let url = format!(
            "{}/cdn-cgi/handler/scheduled?cron=*/30+*+*+*+*&time={at}",
            server.base
        );
        async move {
            reqwest::get(url)
                .await
                .expect("scheduled")
                .status()
                .as_u16()
        }
    };
    assert_eq!(cron(1_800_000).await, 200);
    let event = ws2.event("pr.opened", |_| true).await;
    assert_eq!(event["pull_request"]["head"], later.as_str(), "{event}");
    assert_eq!(cron(3_600_000).await, 200);
    let attempts: Vec<_> = fake
        .deliveries()
        .into_iter()
        .filter(|d| d.guid == failed.guid)
        .map(|d| (d.redelivery, d.status_code))
        .collect();
    assert_eq!(attempts, vec![(false, 502), (true, 202)], "{attempts:?}");
}

/// Runs `git` with an installation token as GitHub takes it (`x-access-token` basic auth);
/// whether it worked, and what it said.
/// (Async: the fake GitHub serves on this test's runtime.)
async fn git_with_token(dir: &std::path::Path, token: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new("git")
        .envs(nightshift_core::provider::git_auth_env(token))
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .await
        .expect("git");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test]
async fn a_private_repository_is_cloned_and_pushed_with_scoped_tokens_and_the_pull_request_is_the_persons(
) {
    let fake = FakeGithub::start(FakeGithubConfig::default()).await;
    fake.add_user("ada", "Ada Lovelace");
    fake.add_user("bob", "Bob Reader");
    fake.add_repo("acme/web", &[("ada", Role::Admin), ("bob", Role::Read)]);
    fake.add_repo("acme/other", &[("ada", Role::Admin)]);
    fake.add_repo("acme/no-app", &[("ada", Role::Admin)]);
    let installation = fake.install("acme", &["acme/web", "acme/other"]);
    let vars = fake.worker_vars();
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let recording = json!({"turns": [
        {"text": "Writing the greeting.", "tool_calls": [{"name": "write", "arguments": {"filePath": "hello.txt", "content": "hello from nightshift\n"}}]},
        {"text": "Created hello.txt."},
        {"text": "Adding notes.", "tool_calls": [{"name": "write", "arguments": {"filePath": "notes.txt", "content": "more notes\n"}}]},
        {"text": "Added notes.txt."}
    ]});
    let (_compute, server) = nightshift_tests::start_with_compute(recording, &[], &vars).await;
    fake.deliver_to(&format!("{}/webhook/github", server.base));
    let api = server.client();
    // The installation index learns the installation from its webhook.
    let (st, _) = fake.deliver_installation_created(installation).await;
    assert_eq!(st, 202);

    let ada = User {
        user: "ada".into(),
        token: sign_in_with_github(&server, &fake, "ada").await,
    };
    let bob = User {
        user: "bob".into(),
        token: sign_in_with_github(&server, &fake, "bob").await,
    };
    let register = |who: &User, name: &str, github: &str| {
        let body = json!({ "name": name, "github": github });
        let api = &api;
        let who = who.clone();
        async move { api.call("POST", "/repositories", &who, Some(body)).await }
    };
    // Registering takes admin or maintain on GitHub, and the App installed on the repository.
    let (st, v) = register(&bob, "web", "acme/web").await;
    assert_eq!((st, code(&v)), (403, "repository_role_required"), "{v}");
    let (st, v) = register(&ada, "no-app", "acme/no-app").await;
    assert_eq!((st, code(&v)), (403, "app_not_installed"), "{v}");
    let dev = api.sign_in("dev-person").await;
    let (st, v) = register(&dev, "web", "acme/web").await;
    assert_eq!((st, code(&v)), (403, "github_not_linked"), "{v}");
    let (st, v) = api
        .call(
            "POST",
            "/repositories",
            &ada,
            Some(json!({ "name": "plain", "clone_url": "https://example.com/x.git" })),
        )
        .await;
    assert_eq!((st, code(&v)), (400, "github_repository_required"), "{v}");
    let (st, v) = register(&ada, "web", "acme/web").await;
    assert_eq!(st, 201, "{v}");
    assert_eq!(
        v["repository"]["clone_url"],
        format!("{}/acme/web.git", fake.git_url()),
        "{v}"
    );
    // Bob reads it (read access); a person GitHub does not know there does not.
    let (st, _) = api.call("GET", "/repositories/web", &bob, None).await;
    assert_eq!(st, 200);
    let (st, v) = api
        .call(
            "PATCH",
            "/repositories/web",
            &bob,
            Some(json!({ "setup": ["true"] })),
        )
        .await;
    assert_eq!((st, code(&v)), (403, "repository_role_required"), "{v}");

    // A prompt's work: cloned with a read token, pushed with a write token, both scoped to
    // acme/web alone.
    let (id, _) = api.create_session_on_name(&ada, "Greeting", "web").await;
    let mut ws = api.connect(&ada, &id, "ada-web", 0).await;
    let p1 = api
        .prompt(&ada, &id, "Create hello.txt with a greeting")
        .await;
    let finished = ws.finished(&p1).await;
    assert_eq!(finished["ok"], true, "{finished}");
    let branch = format!("nightshift/{id}");
    assert_eq!(
        finished["branch"],
        branch.as_str(),
        "{finished} after {:?}",
        ws.seen
    );
    assert!(
        fake.branch_sha("acme/web", &branch).is_some(),
        "not pushed: {finished} after {:?}",
        ws.seen
    );
    let tokens = fake.installation_tokens();
    assert!(!tokens.is_empty());
    for (_, repos, permissions) in &tokens {
        assert_eq!(repos, &vec!["acme/web".to_string()], "{permissions:?}");
        assert!(
            ["read", "write"].contains(
                &permissions
                    .get("contents")
                    .map(String::as_str)
                    .unwrap_or("")
            ),
            "{permissions:?}"
        );
        assert!(
            !permissions.contains_key("pull_requests"),
            "{permissions:?}"
        );
    }
    let (write, _, _) = tokens
        .iter()
        .find(|(_, _, p)| p.get("contents").map(String::as_str) == Some("write"))
        .expect("a write token")
        .clone();
    // The same token cannot push anywhere else.
    let scratch = tempdir_for("scope");
    let (cloned, said) = git_with_token(
        &scratch,
        &write,
        &[
            "clone",
            "--quiet",
            &format!("{}/acme/web.git", fake.git_url()),
            "web",
        ],
    )
    .await;
    assert!(cloned, "{said}");
    let checkout = scratch.join("web");
    let (pushed, said) = git_with_token(
        &checkout,
        &write,
        &[
            "push",
            "--quiet",
            &format!("{}/acme/other.git", fake.git_url()),
            "HEAD:refs/heads/stolen",
        ],
    )
    .await;
    assert!(!pushed, "a push outside the token's scope worked");
    assert!(said.contains("403"), "{said}");

    // The pull request, opened with Ada's own user token.
    let opened = ws.event("pr.opened", |_| true).await;
    assert_eq!(opened["pull_request"]["head"], branch.as_str(), "{opened}");
    let pulls = fake.pulls("acme/web");
    assert_eq!(pulls.len(), 1);
    assert_eq!(pulls[0].1, "user:ada", "opened as {}", pulls[0].1);
    assert_eq!(pulls[0].0.title, "Create hello.txt with a greeting");
    let (_, view) = api
        .call("GET", &format!("/sessions/{id}"), &ada, None)
        .await;
    assert_eq!(view["pull_request"]["number"], pulls[0].0.number, "{view}");

    // Merged on GitHub: the webhook marks it merged; the same delivery again changes nothing.
    fake.merge("acme/web", pulls[0].0.number)
        .await
        .expect("merge");
    ws.event("pr.merged", |_| true).await;
    let (_, before) = api
        .call("GET", &format!("/sessions/{id}"), &ada, None)
        .await;
    let closed = fake
        .deliveries()
        .into_iter()
        .find(|d| d.action.as_deref() == Some("closed"))
        .expect("closed delivery");
    assert_eq!(fake.redeliver(&closed.guid).await, 202);
    let (_, after) = api
        .call("GET", &format!("/sessions/{id}"), &ada, None)
        .await;
    assert_eq!(after["last_seq"], before["last_seq"]);
    assert_eq!(after["pull_request"]["state"], "merged");
    // The merge pushed the base branch: the repository builds a new image from it.
    let deadline = std::time::Instant::now() + secs(60);
    loop {
        let (_, info) = api.call("GET", "/repositories/web", &ada, None).await;
        let reasons: Vec<String> = info["builds"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b["reason"].as_str().map(String::from))
            .collect();
        if reasons.iter().any(|r| r == "push") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no build after the push: {reasons:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // Ada withdraws the App's authorization at GitHub: the next session's work is still pushed
    // (the App's installation token), but the pull request cannot be opened in her name, so
    // the session offers the compare link instead — never a pull request opened as the App.
    // (Someone changes the greeting on main, so the scripted agent's write is a change again.)
    fake.commit_file("acme/web", "main", "hello.txt", "hello from someone else\n")
        .expect("commit on main");
    let (second, _) = api.create_session_on_name(&ada, "Notes", "web").await;
    let mut ws2 = api.connect(&ada, &second, "ada-web-2", 0).await;
    let p2 = api.prompt(&ada, &second, "Put the greeting back").await;
    // (Withdrawn once the prompt is in: the sandbox is still starting.)
    fake.revoke_user_tokens("ada");
    let done = ws2.finished(&p2).await;
    assert_eq!(done["ok"], true, "{done}");
    let second_branch = format!("nightshift/{second}");
    assert!(
        fake.branch_sha("acme/web", &second_branch).is_some(),
        "not pushed: {done} after {:?}",
        ws2.seen
    );
    let action = ws2.event("pr.action", |_| true).await;
    assert_eq!(action["kind"], "create_pull_request", "{action}");
    assert_eq!(
        action["url"],
        format!(
            "{}/acme/web/compare/main...{second_branch}?expand=1",
            fake.web_url()
        ),
        "{action}"
    );
    assert_eq!(
        fake.pulls("acme/web").len(),
        1,
        "a pull request was opened anyway"
    );
    let (_, view) = api
        .call("GET", &format!("/sessions/{second}"), &ada, None)
        .await;
    assert_eq!(
        view["pull_request_action"]["kind"], "create_pull_request",
        "{view}"
    );
    assert!(view["pull_request"].is_null(), "{view}");

    // Ada follows the link and opens the pull request herself, then signs in with GitHub again.
    // The session's next push asks GitHub to open one, which answers 422 (one is open on the
    // branch): the session follows hers and opens no other.
    let own = reqwest::Client::new()
        .post(format!("{}/repos/acme/web/pulls", fake.api_url()))
        .bearer_auth(fake.mint_user_token("ada"))
        .header("user-agent", "ada's browser")
        .header("accept", "application/vnd.github+json")
        .json(&json!({"title": "Put the greeting back", "head": second_branch, "base": "main"}))
        .send()
        .await
        .expect("open by hand");
    assert_eq!(own.status().as_u16(), 201);
    let own: Value = own.json().await.expect("pull");
    let ada = User {
        user: "ada".into(),
        token: sign_in_with_github(&server, &fake, "ada").await,
    };
    let p3 = api.prompt(&ada, &second, "Add some notes").await;
    let done = ws2.finished(&p3).await;
    assert_eq!(done["ok"], true, "{done}");
    let followed = ws2.event("pr.opened", |_| true).await;
    assert_eq!(
        followed["pull_request"]["number"], own["number"],
        "{followed}"
    );
    let pulls = fake.pulls("acme/web");
    assert_eq!(pulls.len(), 2, "{pulls:?}");
    let (_, view) = api
        .call("GET", &format!("/sessions/{second}"), &ada, None)
        .await;
    assert_eq!(view["pull_request"]["number"], own["number"], "{view}");
    assert!(view["pull_request_action"].is_null(), "{view}");
}

fn tempdir_for(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "nightshift-github-{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// What a role may get from a route.
#[derive(Clone, Copy, Debug)]
enum May {
    /// Served (any answer that is not an access refusal, and no fault).
    Yes,
    /// Refused with this status and code.
    No(u16, &'static str),
}

const REFUSALS: [&str; 8] = [
    "not_member",
    "owner_only",
    "repository_role_required",
    "signed_out",
    "unauthenticated",
    "github_not_linked",
    "bad_invite",
    "ticket_invalid",
];

#[tokio::test]
async fn every_route_refuses_a_stranger_a_removed_member_and_a_signed_out_token() {
    let fake = FakeGithub::start(FakeGithubConfig::default()).await;
    for (login, name) in [
        ("ada", "Ada"),
        ("bob", "Bob"),
        ("carol", "Carol"),
        ("eve", "Eve"),
        ("sam", "Sam"),
    ] {
        fake.add_user(login, name);
    }
    fake.add_repo(
        "acme/web",
        &[
            ("ada", Role::Admin),
            ("bob", Role::Read),
            ("carol", Role::Write),
            ("sam", Role::Read),
        ],
    );
    fake.install("acme", &["acme/web"]);
    let (_provider, provider_url) = nightshift_tests::fake_provider::start().await;
    let mut vars = fake.worker_vars();
    vars.push(("PROVIDER_URL", provider_url));
    vars.push((
        "PROVIDER_SECRET",
        nightshift_tests::fake_provider::SECRET.to_string(),
    ));
    vars.push(("PROMPT_RUNNER", "sandbox".to_string()));
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(&vars).await;
    let api = server.client();
    let mut people = std::collections::BTreeMap::new();
    for login in ["ada", "bob", "carol", "eve", "sam"] {
        let token = sign_in_with_github(&server, &fake, login).await;
        people.insert(
            login,
            User {
                user: login.into(),
                token,
            },
        );
    }
    let (ada, bob, carol, eve, sam) = (
        people["ada"].clone(),
        people["bob"].clone(),
        people["carol"].clone(),
        people["eve"].clone(),
        people["sam"].clone(),
    );
    let (st, v) = api
        .call(
            "POST",
            "/repositories",
            &ada,
            Some(json!({"name": "web", "github": "acme/web"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (id, invite) = api.create_session_on_name(&ada, "Roles", "web").await;
    api.join(&bob, &id, &invite).await;
    api.join(&carol, &id, &invite).await;
    // The owner removes Carol and rotates the invite; Sam signs out.
    let (st, v) = api
        .call(
            "DELETE",
            &format!("/multiplayer/{id}/members/carol"),
            &ada,
            None,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let (st, rotated) = api
        .call("POST", &format!("/multiplayer/{id}/invite"), &ada, None)
        .await;
    assert_eq!(st, 200, "{rotated}");
    let new_invite = rotated["invite"].as_str().expect("invite").to_string();
    assert_ne!(new_invite, invite);
    let (st, _) = api
        .raw("POST", "/auth/logout", Some(&sam.token), None)
        .await;
    assert_eq!(st, 200);
    // Eve has the old link and even the new one, but no access on GitHub.
    let (st, v) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/join"),
            &eve,
            Some(json!({"invite": new_invite})),
        )
        .await;
    assert_eq!((st, code(&v)), (403, "repository_role_required"), "{v}");
    let (st, v) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/join"),
            &carol,
            Some(json!({"invite": invite})),
        )
        .await;
    assert_eq!((st, code(&v)), (403, "bad_invite"), "{v}");
    let (_, list) = api.call("GET", "/sessions", &carol, None).await;
    assert!(
        !list.to_string().contains(&id),
        "the removed member still lists it: {list}"
    );

    use May::{No, Yes};
    let member = No(403, "not_member");
    let role = No(403, "repository_role_required");
    let owner = No(403, "owner_only");
    let out = No(401, "signed_out");
    let s = |p: &str| format!("/multiplayer/{id}/{p}");
    // (method, path, body, [ada (owner, admin), bob (member, read), carol (removed), eve (stranger), sam (signed out)])
    let routes: Vec<(&str, String, Value, [May; 5])> = vec![
        (
            "GET",
            format!("/sessions/{id}"),
            Value::Null,
            [Yes, Yes, member, member, out],
        ),
        (
            "GET",
            s("events"),
            Value::Null,
            [Yes, Yes, member, member, out],
        ),
        (
            "GET",
            s("prompts"),
            Value::Null,
            [Yes, Yes, member, member, out],
        ),
        (
            "GET",
            s("locks"),
            Value::Null,
            [Yes, Yes, member, member, out],
        ),
        (
            "GET",
            s("presence"),
            Value::Null,
            [Yes, Yes, member, member, out],
        ),
        (
            "POST",
            s("prompt"),
            json!({"text": "hi"}),
            [Yes, Yes, member, role, out],
        ),
        (
            "POST",
            s("lock"),
            json!({"resource": "README.md", "ttl_ms": 1000}),
            [Yes, Yes, member, member, out],
        ),
        (
            "PUT",
            format!("/sessions/{id}/egress"),
            json!({"allow": []}),
            [Yes, owner, owner, owner, out],
        ),
        (
            "POST",
            s("invite"),
            Value::Null,
            [Yes, owner, owner, owner, out],
        ),
        (
            "DELETE",
            s("members/ada"),
            Value::Null,
            [No(409, "owner_cannot_leave"), owner, member, member, out],
        ),
        (
            "GET",
            format!("/sandbox?session_id={id}"),
            Value::Null,
            [Yes, Yes, member, member, out],
        ),
        (
            "POST",
            "/sandbox".into(),
            json!({"session_id": id}),
            [Yes, Yes, member, member, out],
        ),
        (
            "GET",
            "/repositories/web".into(),
            Value::Null,
            [Yes, Yes, Yes, role, out],
        ),
        (
            "PATCH",
            "/repositories/web".into(),
            json!({"build_every_min": 60}),
            [Yes, role, role, role, out],
        ),
        (
            "POST",
            "/repositories/web/builds".into(),
            Value::Null,
            [Yes, role, role, role, out],
        ),
        (
            "GET",
            "/repositories/web/builds/img_none/logs".into(),
            Value::Null,
            [Yes, Yes, Yes, role, out],
        ),
        (
            "POST",
            "/repositories/web/rollback".into(),
            json!({"image": "img_none"}),
            [Yes, role, role, role, out],
        ),
        (
            "POST",
            "/repositories".into(),
            json!({"name": "web2", "github": "acme/web"}),
            [Yes, role, role, role, out],
        ),
        (
            "POST",
            "/sessions".into(),
            json!({"title": "t", "repository": "web"}),
            [Yes, Yes, Yes, role, out],
        ),
        (
            "POST",
            "/background/spawn".into(),
            json!({"prompt": "p", "repository": "web"}),
            [Yes, Yes, Yes, role, out],
        ),
        (
            "POST",
            "/auth/ticket".into(),
            json!({"session": id}),
            [Yes, Yes, Yes, Yes, out],
        ),
        (
            "GET",
            "/auth/me".into(),
            Value::Null,
            [Yes, Yes, Yes, Yes, out],
        ),
    ];
    let who = [&ada, &bob, &carol, &eve, &sam];
    for (method, path, body, mays) in &routes {
        for (person, may) in who.iter().zip(mays) {
            let body = (!body.is_null()).then(|| body.to_string().into_bytes());
            let (st, v) = api.raw(method, path, Some(&person.token), body).await;
            match may {
                Yes => assert!(
                    st < 500 && !REFUSALS.contains(&code(&v)) && st != 401,
                    "{method} {path} as {}: refused {st} {v}",
                    person.user
                ),
                No(status, want) => assert_eq!(
                    (st, code(&v)),
                    (*status, *want),
                    "{method} {path} as {}: {v}",
                    person.user
                ),
            }
        }
    }
    // Owner-only sandbox operations: a member gets no shell (the fake provider's sandbox).
    let (st, v) = api
        .call(
            "POST",
            "/sandbox/sbx_fake1/exec",
            &bob,
            Some(json!({"command": ["id"]})),
        )
        .await;
    assert!(st == 403 || st == 404, "{st} {v}");
    // The socket: a stranger's ticket opens nothing; the removed member's neither.
    for person in [&eve, &carol] {
        let ticket = api.ticket(person, &id).await;
        let url = format!(
            "{}/multiplayer/{id}/ws?ticket={ticket}&client=x",
            server.base.replacen("http", "ws", 1)
        );
        assert!(
            tokio_tungstenite::connect_async(url).await.is_err(),
            "{} opened the session's socket",
            person.user
        );
    }
}

#[tokio::test]
async fn an_expired_user_token_is_refreshed_once_for_concurrent_callers_and_a_revoked_one_signs_github_out(
) {
    let fake = FakeGithub::start(FakeGithubConfig::default()).await;
    fake.add_user("ada", "Ada");
    fake.add_repo("acme/web", &[("ada", Role::Admin)]);
    fake.install("acme", &["acme/web"]);
    let (_provider, provider_url) = nightshift_tests::fake_provider::start().await;
    let mut vars = fake.worker_vars();
    vars.push(("PROVIDER_URL", provider_url));
    vars.push((
        "PROVIDER_SECRET",
        nightshift_tests::fake_provider::SECRET.to_string(),
    ));
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let server = Server::start(&vars).await;
    let api = server.client();
    let ada = User {
        user: "ada".into(),
        token: sign_in_with_github(&server, &fake, "ada").await,
    };
    let (st, v) = api
        .call(
            "POST",
            "/repositories",
            &ada,
            Some(json!({"name": "web", "github": "acme/web"})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let (one, invite_one) = api.create_session_on_name(&ada, "One", "web").await;
    let (two, invite_two) = api.create_session_on_name(&ada, "Two", "web").await;
    assert_eq!(fake.refreshes("ada"), 0);

    // GitHub ends the access token early: the next checks get 401 and refresh, once, though
    // two of them ask at the same moment (a join asks GitHub afresh).
    fake.expire_user_tokens("ada");
    let join = |id: String, invite: String| {
        let api = &api;
        let ada = ada.clone();
        async move {
            api.call(
                "POST",
                &format!("/multiplayer/{id}/join"),
                &ada,
                Some(json!({ "invite": invite })),
            )
            .await
        }
    };
    let (a, b) = futures_util::future::join(join(one, invite_one), join(two, invite_two)).await;
    assert!(a.0 < 300 && b.0 < 300, "{a:?} {b:?}");
    assert_eq!(fake.refreshes("ada"), 1, "refreshed more than once");

    // Revoked at GitHub (the person removed the App's authorization): GitHub work is refused
    // with a clear code until they sign in with GitHub again; their Nightshift sign-in stays.
    fake.revoke_user_tokens("ada");
    let (three, invite_three) = api.create_session_on_name(&ada, "Three", "web").await;
    let (st, v) = join(three.clone(), invite_three.clone()).await;
    assert_eq!((st, code(&v)), (401, "github_token_invalid"), "{v}");
    let (st, _) = api.raw("GET", "/auth/me", Some(&ada.token), None).await;
    assert_eq!(st, 200);
    let again = User {
        user: "ada".into(),
        token: sign_in_with_github(&server, &fake, "ada").await,
    };
    let (st, v) = api
        .call(
            "POST",
            &format!("/multiplayer/{three}/join"),
            &again,
            Some(json!({ "invite": invite_three })),
        )
        .await;
    assert!(st < 300, "{st} {v}");
}

/// The builds of a repository, oldest first: (reason, status).
async fn builds_of(api: &nightshift_tests::Api, who: &User, name: &str) -> Vec<(String, String)> {
    let (_, info) = api
        .call("GET", &format!("/repositories/{name}"), who, None)
        .await;
    let mut builds: Vec<(String, String)> = info["builds"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let text = |k: &str| b[k].as_str().unwrap_or_default().to_string();
            (text("reason"), text("status"))
        })
        .collect();
    // Listed newest first.
    builds.reverse();
    builds
}

#[tokio::test]
async fn a_team_deployment_warms_private_pools_queues_push_builds_and_keeps_its_quotas() {
    let fake = FakeGithub::start(FakeGithubConfig::default()).await;
    fake.add_user("ada", "Ada Lovelace");
    fake.add_user("bob", "Bob Reader");
    fake.add_user("carol", "Carol Admin");
    fake.add_user("dan", "Dan Writer");
    fake.add_repo(
        "acme/web",
        &[
            ("ada", Role::Admin),
            ("bob", Role::Read),
            ("carol", Role::Admin),
            ("dan", Role::Write),
        ],
    );
    let installation = fake.install("acme", &["acme/web"]);
    let mut vars = fake.worker_vars();
    vars.push(("QUOTA_INSTALLATION_SESSIONS_PER_HOUR", "3".into()));
    vars.push(("QUOTA_RUNNING_SANDBOXES", "1".into()));
    // Permissions are asked of GitHub every time here (a deployment believes them a minute).
    vars.push(("ROLE_CACHE_MS", "0".into()));
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let recording = json!({"turns": [
        {"when": "Write the notes", "delay_ms": 500, "text": "Writing notes.", "tool_calls": [{"name": "write", "arguments": {"filePath": "notes.txt", "content": "notes from a warm sandbox\n"}}]},
        {"when": "Write the notes", "text": "Wrote notes.txt."},
        {"text": "Nothing to do."}
    ]});
    // (A model's think time before its first call: a claimed sandbox of a private repository
    // syncs once the session's credentials arrive, and writes wait for the sync.)
    let (_compute, server) = nightshift_tests::start_with_compute(recording, &[], &vars).await;
    fake.deliver_to(&format!("{}/webhook/github", server.base));
    let api = server.client();

    // GitHub's Setup URL lands on the web app's "installed" page; nothing in its query is
    // trusted beyond a number.
    let (st, to, _) = visit(
        &format!(
            "{}/github/setup?installation_id={installation}&setup_action=install",
            server.base
        ),
        None,
    )
    .await;
    assert_eq!(
        (st, to.as_str()),
        (
            302,
            format!("/#/installed?installation={installation}&action=install").as_str()
        )
    );
    let (st, to, _) = visit(
        &format!(
            "{}/github/setup?installation_id=1%3Cscript%3E&setup_action=evil",
            server.base
        ),
        None,
    )
    .await;
    assert_eq!((st, to.as_str()), (302, "/#/installed?action=install"));

    let (st, _) = fake.deliver_installation_created(installation).await;
    assert_eq!(st, 202);
    let mut people = Vec::new();
    for login in ["ada", "bob", "carol", "dan"] {
        people.push(User {
            user: login.into(),
            token: sign_in_with_github(&server, &fake, login).await,
        });
    }
    let [ada, bob, carol, dan] = [0, 1, 2, 3].map(|i| people[i].clone());

    // Registered with a slow setup and a warm pool of one: the registration's build runs
    // while main moves, and the push that says so is owed a build of its own.
    let (st, v) = api
        .call(
            "POST",
            "/repositories",
            &ada,
            Some(
                json!({"name": "web", "github": "acme/web", "setup": ["sleep 3"], "pool_size": 1}),
            ),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let before = fake.branch_sha("acme/web", "main").expect("main");
    let after = fake
        .commit_file(
            "acme/web",
            "main",
            "CHANGELOG.md",
            "pushed during the build\n",
        )
        .expect("commit on main");
    let building = builds_of(&api, &ada, "web").await;
    assert_eq!(building.len(), 1, "{building:?}");
    assert_eq!(building[0].1, "building", "{building:?}");
    let push = fake
        .push_payload("acme/web", "main", &before, &after, "ada")
        .expect("push payload");
    let (st, body) = fake.deliver("push", push).await;
    assert_eq!(st, 202, "{body}");
    let deadline = std::time::Instant::now() + secs(120);
    loop {
        let builds = builds_of(&api, &ada, "web").await;
        let reasons: Vec<&str> = builds.iter().map(|(r, _)| r.as_str()).collect();
        let push_ready = builds.iter().any(|(r, s)| r == "push" && s == "ready");
        if push_ready {
            assert_eq!(
                reasons.iter().filter(|r| **r == "push").count(),
                1,
                "{builds:?}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the push during the build was never built: {builds:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }

    // The private repository's pool fills (its sandboxes clone with a read token of their own).
    let deadline = std::time::Instant::now() + secs(120);
    loop {
        let (_, info) = api.call("GET", "/repositories/web", &ada, None).await;
        if nightshift_tests::pool_ready(&info) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never filled: {info}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }

    // A prompt claims the warm sandbox, which syncs and pushes with the session's credentials.
    let (s1, invite) = api.create_session_on_name(&ada, "Notes", "web").await;
    let mut ws = api.connect(&ada, &s1, "ada-notes", 0).await;
    let p1 = api.prompt(&ada, &s1, "Write the notes").await;
    let finished = ws.finished(&p1).await;
    assert_eq!(finished["ok"], true, "{finished} after {:?}", ws.seen);
    let claimed = ws.seen.iter().any(|e| {
        e["type"] == "sandbox.status"
            && e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("claimed a warm sandbox"))
    });
    assert!(claimed, "not from the pool: {:?}", ws.seen);
    let branch = format!("nightshift/{s1}");
    let pushed = fake
        .branch_sha("acme/web", &branch)
        .unwrap_or_else(|| panic!("not pushed: {finished} after {:?}", ws.seen));
    assert!(pushed != after, "the branch has no new commit");
    ws.event("pr.opened", |_| true).await;

    // One running sandbox each: Ada's second session's prompt fails, saying why; nothing runs.
    let (s2, _) = api.create_session_on_name(&ada, "More", "web").await;
    let mut ws2 = api.connect(&ada, &s2, "ada-more", 0).await;
    let p2 = api.prompt(&ada, &s2, "Anything else?").await;
    let refused = ws2.finished(&p2).await;
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        refused.to_string().contains("running at once"),
        "{refused} after {:?}",
        ws2.seen
    );
    let (st, listed) = api
        .call("GET", &format!("/sandbox?session_id={s2}"), &ada, None)
        .await;
    assert_eq!(st, 200);
    assert!(
        listed["sandboxes"]
            .as_array()
            .is_none_or(|all| all.iter().all(|s| s["status"] == "terminated")),
        "{listed}"
    );

    // Three sessions per hour for the whole organisation: Bob's is the third; Carol's, a fourth,
    // is refused with when to ask again, and nothing is created.
    let (_s3, _) = api.create_session_on_name(&bob, "Read", "web").await;
    let resp = reqwest::Client::new()
        .post(format!("{}/sessions", server.base))
        .bearer_auth(&carol.token)
        .json(&json!({"title": "Fourth", "repository": "web"}))
        .send()
        .await
        .expect("create");
    assert_eq!(resp.status().as_u16(), 429);
    let retry_after: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=3600).contains(&retry_after), "{retry_after}");
    let v: Value = resp.json().await.expect("json");
    assert_eq!(code(&v), "quota_exceeded", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("organisation")),
        "{v}"
    );
    let (_, carols) = api.call("GET", "/sessions", &carol, None).await;
    assert_eq!(
        carols["sessions"].as_array().map(Vec::len),
        Some(0),
        "{carols}"
    );

    // The sandbox's shell is the owner's and the repository admins': Carol (admin) runs a
    // command in Ada's session; Dan (write) and Bob (read) are members but get no shell.
    for who in [&carol, &dan, &bob] {
        api.join(who, &s1, &invite).await;
    }
    let sandbox = api.session_sandbox(&ada, &s1).await;
    let exec = json!({"command": ["git", "rev-parse", "HEAD"]});
    let (st, v) = api
        .call(
            "POST",
            &format!("/sandbox/{sandbox}/exec"),
            &carol,
            Some(exec.clone()),
        )
        .await;
    assert_eq!(st, 200, "{v}");
    assert!(v.to_string().contains(&pushed), "{v}");
    for who in [&dan, &bob] {
        let (st, v) = api
            .call(
                "POST",
                &format!("/sandbox/{sandbox}/exec"),
                who,
                Some(exec.clone()),
            )
            .await;
        assert_eq!((st, code(&v)), (403, "owner_only"), "{}: {v}", who.user);
    }

    // Dan loses his access at GitHub mid-session: his prompts and his new sockets are refused,
    // nothing is stored, and the socket he had open is closed when the next prompt starts.
    let mut dans = api.connect(&dan, &s1, "dan-open", 0).await;
    fake.set_collaborator("acme/web", "dan", Role::None);
    let (_, before) = api
        .call("GET", &format!("/sessions/{s1}"), &ada, None)
        .await;
    let (st, v) = api
        .call(
            "POST",
            &format!("/multiplayer/{s1}/prompt"),
            &dan,
            Some(json!({"text": "One more thing"})),
        )
        .await;
    assert_eq!((st, code(&v)), (403, "repository_role_required"), "{v}");
    let ticket = api.ticket(&dan, &s1).await;
    let url = format!(
        "{}/multiplayer/{s1}/ws?ticket={ticket}&client=dan",
        server.base.replacen("http", "ws", 1)
    );
    assert!(tokio_tungstenite::connect_async(url).await.is_err());
    let (_, after) = api
        .call("GET", &format!("/sessions/{s1}"), &ada, None)
        .await;
    assert_eq!(before["last_seq"], after["last_seq"], "{after}");
    assert_eq!(before["queue"], after["queue"], "{after}");
    let p3 = api.prompt(&ada, &s1, "Anything left?").await;
    assert_eq!(
        dans.close_frame(secs(30)).await,
        Some(4003),
        "Dan still watches"
    );
    let done = ws.finished(&p3).await;
    assert_eq!(done["ok"], true, "{done}");
}
