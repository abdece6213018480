//! The fake GitHub itself, fast and without wrangler: real git over smart HTTP with scoped installation tokens, OAuth with PKCE, App JWT checks, pull requests and signed webhooks.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use nightshift_core::github::{
    self, Access, AccessToken, AccessTokenRequest, JwtClaims, Pull, Repository, Role, TokenAnswer,
    TokenExchange,
};
use nightshift_core::pr_review::{self, ReviewComment, ReviewWebhook};
use nightshift_tests::fake_github::{
    generate_private_key_pem, now_seconds, sign_app_jwt, FakeGithub, FakeGithubConfig,
};
use serde_json::{json, Value};

/// One webhook the test receiver got.
#[derive(Debug, Clone)]
struct Received {
    event: String,
    guid: String,
    signed: bool,
    payload: Value,
}

type Inbox = Arc<Mutex<Vec<Received>>>;

async fn receive(
    State((secret, inbox)): State<(String, Inbox)>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let signed =
        github::verify_webhook(secret.as_bytes(), &body, header(github::SIGNATURE_HEADER)).is_ok();
    let received = Received {
        event: header(github::EVENT_HEADER).unwrap_or("").to_string(),
        guid: header(github::DELIVERY_HEADER).unwrap_or("").to_string(),
        signed,
        payload: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    assert!(
        header("user-agent").is_some_and(|ua| ua.starts_with("GitHub-Hookshot/")),
        "hookshot user agent"
    );
    inbox.lock().expect("inbox").push(received);
    if signed {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    }
}

/// A tiny webhook receiver that checks signatures; returns its URL and what it received.
async fn start_receiver(secret: String) -> (String, Inbox) {
    let inbox: Inbox = Arc::default();
    let router = axum::Router::new()
        .route("/webhook/github", axum::routing::post(receive))
        .with_state((secret, inbox.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let url = format!(
        "http://{}/webhook/github",
        listener.local_addr().expect("addr")
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (url, inbox)
}

/// Waits for the first received webhook matching `wanted`.
async fn wait_for(inbox: &Inbox, wanted: impl Fn(&Received) -> bool) -> Received {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = inbox
            .lock()
            .expect("inbox")
            .iter()
            .find(|r| wanted(r))
            .cloned();
        if let Some(received) = found {
            return received;
        }
        assert!(Instant::now() < deadline, "no such webhook arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .user_agent("nightshift-tests")
        .build()
        .expect("client")
}

async fn fake_with_acme() -> FakeGithub {
    let fake = FakeGithub::start(FakeGithubConfig::default()).await;
    fake.add_user("ada", "Ada Lovelace");
    fake.add_user("bob", "Bob Read");
    fake.add_user("carol", "Carol Outsider");
    fake.add_repo("acme/web", &[("ada", Role::Admin), ("bob", Role::Read)]);
    fake.add_repo("acme/api", &[("ada", Role::Admin)]);
    fake
}

/// Runs git (no user config, no prompts, no proxy) in `dir`; returns (success, stderr).
async fn run_git(dir: &Path, args: &[&str]) -> (bool, String) {
    let output = tokio::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "Ada")
        .env("GIT_AUTHOR_EMAIL", "ada@example.com")
        .env("GIT_COMMITTER_NAME", "Ada")
        .env("GIT_COMMITTER_EMAIL", "ada@example.com")
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("all_proxy")
        .env_remove("ALL_PROXY")
        .output()
        .await
        .expect("run git");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn git_stdout(dir: &Path, args: &[&str]) -> String {
    let output = tokio::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .await
        .expect("run git");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// The clone URL of `full_name` with `token` as the Basic password.
fn authed_url(fake: &FakeGithub, full_name: &str, token: &str) -> String {
    fake.clone_url(full_name)
        .replacen("http://", &format!("http://x-access-token:{token}@"), 1)
}

async fn installation_token(
    fake: &FakeGithub,
    installation: u64,
    request: &AccessTokenRequest,
) -> AccessToken {
    let response = http()
        .post(format!(
            "{}/app/installations/{installation}/access_tokens",
            fake.api_url()
        ))
        .bearer_auth(fake.app_jwt())
        .header("Accept", github::ACCEPT)
        .json(request)
        .send()
        .await
        .expect("access token request");
    assert_eq!(response.status(), 201);
    response.json().await.expect("AccessToken")
}

/// Sends `GET http://127.0.0.1:P{path}` (absolute-form, as from a proxy) with Basic auth; returns the raw answer.
async fn absolute_form_get(fake: &FakeGithub, path: &str, token: &str) -> String {
    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = fake.web_url().trim_start_matches("http://").to_string();
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
    let mut stream = tokio::net::TcpStream::connect(&authority)
        .await
        .expect("connect");
    let request = format!(
        "GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Basic {credentials}\r\nUser-Agent: git/2.47\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.expect("read");
    String::from_utf8_lossy(&answer).into_owned()
}

struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(label: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!(
            "nightshift-fake-github-test-{label}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&path).expect("scratch dir");
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_over_http_follows_installation_token_scope_and_sends_push_webhooks() {
    let fake = fake_with_acme().await;
    let installation = fake.install("acme", &["acme/web", "acme/api"]);
    let (receiver_url, inbox) = start_receiver(fake.webhook_secret()).await;
    fake.deliver_to(&receiver_url);

    let read_web = installation_token(&fake, installation, &Access::Read.request("web")).await;
    let write_api = installation_token(&fake, installation, &Access::Write.request("api")).await;
    let write_web = installation_token(&fake, installation, &Access::Write.request("web")).await;
    assert!(read_web.token.starts_with("ghs_") && read_web.token.len() > 40);
    assert_eq!(read_web.repositories[0].full_name, "acme/web");
    assert_eq!(read_web.permissions["contents"], "read");
    assert_eq!(fake.installation_tokens().len(), 3);

    let scratch = Scratch::new("git");
    let (cloned, stderr) =
        run_git(&scratch.0, &["clone", &fake.clone_url("acme/web"), "anon"]).await;
    assert!(!cloned, "an anonymous clone of a private repository fails");
    assert!(
        stderr.contains("could not read Username") || stderr.contains("401"),
        "{stderr}"
    );

    let (cloned, stderr) = run_git(
        &scratch.0,
        &[
            "clone",
            &authed_url(&fake, "acme/api", &read_web.token),
            "api",
        ],
    )
    .await;
    assert!(!cloned, "a token scoped to acme/web cannot clone acme/api");
    assert!(stderr.contains("403"), "{stderr}");

    let (cloned, stderr) = run_git(
        &scratch.0,
        &[
            "clone",
            &authed_url(&fake, "acme/web", &read_web.token),
            "web",
        ],
    )
    .await;
    assert!(cloned, "{stderr}");
    let work = scratch.0.join("web");
    assert!(work.join("README.md").exists());

    std::fs::write(work.join("feature.txt"), "a feature\n").expect("write");
    assert!(run_git(&work, &["add", "feature.txt"]).await.0);
    assert!(
        run_git(&work, &["commit", "-q", "-m", "Add a feature"])
            .await
            .0
    );
    let (pushed, stderr) = run_git(&work, &["push", "origin", "HEAD:refs/heads/feature"]).await;
    assert!(!pushed, "a contents:read token cannot push");
    assert!(stderr.contains("403"), "{stderr}");

    let web_with_api_token = authed_url(&fake, "acme/web", &write_api.token);
    let (pushed, stderr) = run_git(
        &work,
        &["push", &web_with_api_token, "HEAD:refs/heads/feature"],
    )
    .await;
    assert!(
        !pushed,
        "a write token for acme/api cannot push to acme/web"
    );
    assert!(stderr.contains("403"), "{stderr}");

    let web_with_write_token = authed_url(&fake, "acme/web", &write_web.token);
    let (pushed, stderr) = run_git(
        &work,
        &["push", &web_with_write_token, "HEAD:refs/heads/feature"],
    )
    .await;
    assert!(pushed, "{stderr}");
    let head = git_stdout(&work, &["rev-parse", "HEAD"]).await;
    assert_eq!(
        fake.branch_sha("acme/web", "feature").as_deref(),
        Some(head.as_str())
    );

    let push = wait_for(&inbox, |r| r.event == "push").await;
    assert!(push.signed);
    assert_eq!(push.payload["ref"], "refs/heads/feature");
    assert_eq!(
        push.payload["before"],
        "0000000000000000000000000000000000000000"
    );
    assert_eq!(push.payload["after"], head.as_str());
    assert_eq!(push.payload["installation"]["id"], installation);
    assert_eq!(push.payload["sender"]["login"], "nightshift-test[bot]");
    let parsed =
        github::WebhookEvent::parse("push", &serde_json::to_vec(&push.payload).expect("json"));
    assert!(matches!(parsed, Ok(github::WebhookEvent::Push(_))));
    let receive_pack = (
        "POST".to_string(),
        "/git/acme/web.git/git-receive-pack".to_string(),
        format!("installation:{installation}"),
    );
    assert!(fake.requests().contains(&receive_pack));

    // A proxy may forward the absolute-form request line as it is.
    let advertisement = absolute_form_get(
        &fake,
        "/git/acme/web.git/info/refs?service=git-upload-pack",
        &read_web.token,
    )
    .await;
    assert!(advertisement.starts_with("HTTP/1.1 200"), "{advertisement}");
    assert!(advertisement.contains("application/x-git-upload-pack-advertisement"));

    // An open pull request on the pushed branch follows further pushes with `synchronize`.
    let ada = fake.mint_user_token("ada");
    let created = http()
        .post(format!("{}/repos/acme/web/pulls", fake.api_url()))
        .bearer_auth(&ada)
        .json(&json!({"title": "Feature", "head": "feature", "base": "main"}))
        .send()
        .await
        .expect("create pull");
    assert_eq!(created.status(), 201);
    std::fs::write(work.join("feature.txt"), "a better feature\n").expect("write");
    assert!(
        run_git(&work, &["commit", "-q", "-am", "Improve the feature"])
            .await
            .0
    );
    let (pushed, stderr) = run_git(
        &work,
        &[
            "push",
            &authed_url(&fake, "acme/web", &ada),
            "HEAD:refs/heads/feature",
        ],
    )
    .await;
    assert!(pushed, "a collaborator's user token can push: {stderr}");
    let head = git_stdout(&work, &["rev-parse", "HEAD"]).await;
    let synchronize = wait_for(&inbox, |r| r.payload["action"] == "synchronize").await;
    assert_eq!(
        synchronize.payload["pull_request"]["head"]["sha"],
        head.as_str()
    );
    assert_eq!(synchronize.payload["after"], head.as_str());
    assert_eq!(fake.pulls("acme/web")[0].0.head.sha, head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oauth_code_flow_checks_pkce_and_refresh_rotates() {
    let fake = fake_with_acme().await;
    let client = http();
    let redirect_uri = "http://127.0.0.1:9/auth/github/callback";
    let verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk-and-some-more";
    let challenge = github::pkce_challenge(verifier);
    let authorize = |state: &str| {
        github::authorize_url(
            &fake.web_url(),
            &fake.client_id(),
            redirect_uri,
            state,
            &challenge,
        )
    };
    let code_of = |redirect: &str| -> (String, String) {
        let query = redirect.split_once('?').map(|(_, q)| q).unwrap_or("");
        let pairs: std::collections::BTreeMap<String, String> =
            github::form_decode(query).into_iter().collect();
        (pairs["code"].clone(), pairs["state"].clone())
    };
    let exchange = |code: &str, verifier: &str| TokenExchange {
        client_id: fake.client_id(),
        client_secret: fake.client_secret(),
        code: Some(code.to_string()),
        redirect_uri: Some(redirect_uri.to_string()),
        code_verifier: Some(verifier.to_string()),
        grant_type: None,
        refresh_token: None,
    };
    let token_url = format!("{}/login/oauth/access_token", fake.web_url());
    let post = |body: &TokenExchange| {
        client
            .post(&token_url)
            .header("Accept", "application/json")
            .json(body)
            .send()
    };

    let bad_client =
        github::authorize_url(&fake.web_url(), "Iv23nobody", redirect_uri, "s", &challenge);
    assert!(fake.authorize_redirect(&bad_client).await.is_err());

    let redirect = fake
        .authorize_redirect(&authorize("state one"))
        .await
        .expect("authorize");
    assert!(redirect.starts_with(redirect_uri));
    let (wrong_code, state) = code_of(&redirect);
    assert_eq!(state, "state one");
    let refused = post(&exchange(
        &wrong_code,
        "the-wrong-verifier-0123456789abcdefghijklmnop",
    ))
    .await
    .expect("exchange");
    assert_eq!(refused.status(), 200);
    let answer: TokenAnswer = refused.json().await.expect("answer");
    assert!(
        matches!(answer, TokenAnswer::Refused { ref error, .. } if error == "bad_verification_code")
    );

    let (code, _) = code_of(
        &fake
            .authorize_redirect(&authorize("two"))
            .await
            .expect("authorize"),
    );
    let mut wrong_secret = exchange(&code, verifier);
    wrong_secret.client_secret = "not-the-secret".to_string();
    let answer: TokenAnswer = post(&wrong_secret)
        .await
        .expect("exchange")
        .json()
        .await
        .expect("answer");
    assert!(
        matches!(answer, TokenAnswer::Refused { ref error, .. } if error == "incorrect_client_credentials")
    );
    let answer: TokenAnswer = post(&exchange(&code, verifier))
        .await
        .expect("exchange")
        .json()
        .await
        .expect("answer");
    let TokenAnswer::Granted(tokens) = answer else {
        panic!("the right verifier gets tokens: {answer:?}");
    };
    assert!(tokens.access_token.starts_with("ghu_"));
    assert_eq!(tokens.expires_in, Some(28_800));
    assert_eq!(tokens.token_type, "bearer");
    let replayed: TokenAnswer = post(&exchange(&code, verifier))
        .await
        .expect("exchange")
        .json()
        .await
        .expect("answer");
    assert!(
        matches!(replayed, TokenAnswer::Refused { .. }),
        "a code is single-use"
    );

    let user: github::User = client
        .get(format!("{}/user", fake.api_url()))
        .bearer_auth(&tokens.access_token)
        .send()
        .await
        .expect("user")
        .json()
        .await
        .expect("User");
    assert_eq!(user.login, "ada");
    let emails: Vec<github::Email> = client
        .get(format!("{}/user/emails", fake.api_url()))
        .header("Authorization", format!("token {}", tokens.access_token))
        .send()
        .await
        .expect("emails")
        .json()
        .await
        .expect("emails");
    assert_eq!(github::primary_email(&emails), Some("ada@example.com"));
    let no_agent = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
        .get(format!("{}/user", fake.api_url()))
        .bearer_auth(&tokens.access_token)
        .send()
        .await
        .expect("user");
    assert_eq!(no_agent.status(), 403, "GitHub requires a User-Agent");

    // Refresh, form-encoded like the Worker sends it: the old pair dies.
    let refresh_token = tokens.refresh_token.clone().expect("refresh token");
    let refresh_form = github::form_encode(&[
        ("client_id", &fake.client_id()),
        ("client_secret", &fake.client_secret()),
        ("grant_type", "refresh_token"),
        ("refresh_token", &refresh_token),
    ]);
    let refresh = || {
        client
            .post(&token_url)
            .header("Accept", "application/json")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(refresh_form.clone())
            .send()
    };
    let answer: TokenAnswer = refresh()
        .await
        .expect("refresh")
        .json()
        .await
        .expect("answer");
    let TokenAnswer::Granted(renewed) = answer else {
        panic!("refresh works: {answer:?}");
    };
    assert_ne!(renewed.access_token, tokens.access_token);
    assert_eq!(fake.refreshes("ada"), 1);
    let old = client
        .get(format!("{}/user", fake.api_url()))
        .bearer_auth(&tokens.access_token)
        .send()
        .await
        .expect("user");
    assert_eq!(old.status(), 401);
    let body: Value = old.json().await.expect("json");
    assert_eq!(body["message"], "Bad credentials");
    let again: TokenAnswer = refresh()
        .await
        .expect("refresh")
        .json()
        .await
        .expect("answer");
    assert!(
        matches!(again, TokenAnswer::Refused { ref error, .. } if error == "bad_refresh_token")
    );

    fake.expire_user_tokens("ada");
    let expired = client
        .get(format!("{}/user", fake.api_url()))
        .bearer_auth(&renewed.access_token)
        .send()
        .await
        .expect("user");
    assert_eq!(expired.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_jwts_are_verified() {
    let fake = fake_with_acme().await;
    let installation = fake.install("acme", &["acme/web"]);
    let client = http();
    let installations = |jwt: String| {
        client
            .get(format!("{}/app/installations", fake.api_url()))
            .bearer_auth(jwt)
            .send()
    };
    let ok = installations(fake.app_jwt()).await.expect("installations");
    assert_eq!(ok.status(), 200);
    let listed: Vec<github::Installation> = ok.json().await.expect("installations");
    assert_eq!(listed[0].id, installation);
    assert_eq!(listed[0].account.login, "acme");

    let now = now_seconds();
    let by_app_id = JwtClaims {
        iat: now - 60,
        exp: now + 540,
        iss: fake.app_id().to_string(),
    };
    let answer = installations(sign_app_jwt(&fake.private_key_pem(), &by_app_id))
        .await
        .expect("call");
    assert_eq!(answer.status(), 200, "iss may be the App id");

    let claims = github::jwt_claims(&fake.client_id(), now);
    let wrong_key = sign_app_jwt(&generate_private_key_pem(), &claims);
    let expired = JwtClaims {
        iat: now - 700,
        exp: now - 100,
        iss: fake.client_id(),
    };
    let too_long = JwtClaims {
        iat: now - 60,
        exp: now + 900,
        iss: fake.client_id(),
    };
    let wrong_issuer = JwtClaims {
        iat: now - 60,
        exp: now + 540,
        iss: "someone-else".to_string(),
    };
    for jwt in [
        wrong_key,
        sign_app_jwt(&fake.private_key_pem(), &expired),
        sign_app_jwt(&fake.private_key_pem(), &too_long),
        sign_app_jwt(&fake.private_key_pem(), &wrong_issuer),
        "not.a.jwt".to_string(),
    ] {
        let refused = installations(jwt).await.expect("call");
        assert_eq!(refused.status(), 401);
    }

    let repo_installation = client
        .get(format!("{}/repos/acme/web/installation", fake.api_url()))
        .bearer_auth(fake.app_jwt())
        .send()
        .await
        .expect("installation");
    assert_eq!(repo_installation.status(), 200);
    let not_installed = client
        .get(format!("{}/repos/acme/api/installation", fake.api_url()))
        .bearer_auth(fake.app_jwt())
        .send()
        .await
        .expect("installation");
    assert_eq!(not_installed.status(), 404);
    let outside = client
        .post(format!(
            "{}/app/installations/{installation}/access_tokens",
            fake.api_url()
        ))
        .bearer_auth(fake.app_jwt())
        .json(&Access::Write.request("api"))
        .send()
        .await
        .expect("token");
    assert_eq!(outside.status(), 422, "acme/api is not in the installation");
    assert!(fake
        .requests()
        .iter()
        .any(|(_, path, kind)| path == "/api/app/installations" && kind == "jwt"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_requests_record_their_opener_and_merging_delivers_closed() {
    let fake = fake_with_acme().await;
    let installation = fake.install("acme", &["acme/web"]);
    let (receiver_url, inbox) = start_receiver(fake.webhook_secret()).await;
    fake.deliver_to(&receiver_url);
    let client = http();
    let ada = fake.mint_user_token("ada");
    let bob = fake.mint_user_token("bob");
    let carol = fake.mint_user_token("carol");
    let branch_head = fake
        .commit_file("acme/web", "nightshift/ses_1", "notes.md", "# notes\n")
        .expect("commit");

    let repo = |token: &str| {
        client
            .get(format!("{}/repos/acme/web", fake.api_url()))
            .bearer_auth(token.to_string())
            .send()
    };
    let as_ada: Repository = repo(&ada)
        .await
        .expect("repo")
        .json()
        .await
        .expect("Repository");
    assert_eq!(
        Role::from_permissions(as_ada.permissions.as_ref()),
        Role::Admin
    );
    let as_bob: Repository = repo(&bob)
        .await
        .expect("repo")
        .json()
        .await
        .expect("Repository");
    assert_eq!(
        Role::from_permissions(as_bob.permissions.as_ref()),
        Role::Read
    );
    assert_eq!(
        repo(&carol).await.expect("repo").status(),
        404,
        "private repositories hide"
    );
    let permission: github::CollaboratorPermission = client
        .get(format!(
            "{}/repos/acme/web/collaborators/bob/permission",
            fake.api_url()
        ))
        .bearer_auth(&ada)
        .send()
        .await
        .expect("permission")
        .json()
        .await
        .expect("CollaboratorPermission");
    assert_eq!(permission.permission, "read");

    let create = || {
        client
            .post(format!("{}/repos/acme/web/pulls", fake.api_url()))
            .bearer_auth(&ada)
            .json(&github::CreatePull {
                title: "Session one".to_string(),
                head: "acme:nightshift/ses_1".to_string(),
                base: "main".to_string(),
                body: Some("Made by Nightshift".to_string()),
                draft: false,
            })
            .send()
    };
    let created = create().await.expect("create");
    assert_eq!(created.status(), 201);
    let pull: Pull = created.json().await.expect("Pull");
    assert_eq!(pull.number, 1);
    assert_eq!(pull.user.login, "ada");
    assert_eq!(pull.head.sha, branch_head);
    assert_eq!(pull.html_url, format!("{}/acme/web/pull/1", fake.web_url()));
    assert_eq!(fake.pulls("acme/web")[0].1, "user:ada");
    let duplicate = create().await.expect("create");
    assert_eq!(duplicate.status(), 422);
    let body: Value = duplicate.json().await.expect("json");
    assert_eq!(body["message"], "Validation Failed");
    assert_eq!(
        body["errors"][0]["message"],
        "A pull request already exists for acme:nightshift/ses_1."
    );
    let listed: Vec<Pull> = client
        .get(format!(
            "{}/repos/acme/web/pulls?head=acme:nightshift/ses_1&state=open",
            fake.api_url()
        ))
        .bearer_auth(&ada)
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("pulls");
    assert_eq!(listed.len(), 1);
    let opened = wait_for(&inbox, |r| r.payload["action"] == "opened").await;
    assert!(opened.signed);
    assert_eq!(opened.event, "pull_request");
    assert_eq!(opened.payload["installation"]["id"], installation);

    let merge = |token: &str| {
        client
            .put(format!("{}/repos/acme/web/pulls/1/merge", fake.api_url()))
            .bearer_auth(token.to_string())
            .send()
    };
    assert_eq!(
        merge(&bob).await.expect("merge").status(),
        403,
        "bob can only read"
    );
    let merged = merge(&ada).await.expect("merge");
    assert_eq!(merged.status(), 200);
    let merged: Value = merged.json().await.expect("json");
    assert_eq!(merged["merged"], true);
    assert_eq!(
        fake.branch_sha("acme/web", "main").as_deref(),
        merged["sha"].as_str()
    );
    let closed = wait_for(&inbox, |r| r.payload["action"] == "closed").await;
    assert_eq!(closed.payload["pull_request"]["merged"], true);
    assert_eq!(closed.payload["pull_request"]["state"], "closed");
    let event = github::WebhookEvent::parse(
        "pull_request",
        &serde_json::to_vec(&closed.payload).expect("json"),
    );
    let Ok(github::WebhookEvent::PullRequest(event)) = event else {
        panic!("a pull_request event parses: {event:?}");
    };
    assert_eq!(
        github::PrLink::from_pull("acme/web", &event.pull_request).state,
        github::PrState::Merged
    );
    assert_eq!(
        merge(&ada).await.expect("merge").status(),
        405,
        "merged already"
    );

    // Redelivery through the API keeps the guid.
    let deliveries: Vec<github::Delivery> = client
        .get(format!("{}/app/hook/deliveries", fake.api_url()))
        .bearer_auth(fake.app_jwt())
        .send()
        .await
        .expect("deliveries")
        .json()
        .await
        .expect("Delivery list");
    let closed_delivery = deliveries
        .iter()
        .find(|d| d.guid == closed.guid)
        .expect("the closed delivery is listed");
    assert_eq!(closed_delivery.status_code, 200);
    let attempt = client
        .post(format!(
            "{}/app/hook/deliveries/{}/attempts",
            fake.api_url(),
            closed_delivery.id
        ))
        .bearer_auth(fake.app_jwt())
        .send()
        .await
        .expect("attempt");
    assert_eq!(attempt.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    while inbox
        .lock()
        .expect("inbox")
        .iter()
        .filter(|r| r.guid == closed.guid)
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "the redelivery arrives");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Failing deliveries are recorded but not sent; forged ones are refused by the receiver.
    fake.fail_deliveries(true);
    let (status, guid) = fake
        .deliver("ping", json!({"zen": "Keep it logically awesome."}))
        .await;
    assert_eq!(status, 502);
    assert!(fake
        .deliveries()
        .iter()
        .any(|d| d.guid == guid && d.status_code == 502));
    fake.fail_deliveries(false);
    assert_eq!(fake.redeliver(&guid).await, 200);
    let forged = fake
        .deliver_raw(
            "ping",
            "forged-1",
            b"{}",
            Some("sha256=0000000000000000000000000000000000000000000000000000000000000000"),
        )
        .await;
    assert_eq!(forged, 401);
}

/// `acme/web` with the App installed, a PR Nightshift opened from `nightshift/ses_1` (with a
/// changed hello.txt), and a receiver; returns (fake, inbox, installation, PR number).
async fn fake_with_pull() -> (FakeGithub, Inbox, u64, u64) {
    let fake = fake_with_acme().await;
    let installation = fake.install("acme", &["acme/web"]);
    let (receiver_url, inbox) = start_receiver(fake.webhook_secret()).await;
    fake.deliver_to(&receiver_url);
    fake.commit_file(
        "acme/web",
        "nightshift/ses_1",
        "hello.txt",
        "hello from the fake GitHub\nsecond line\nthird line\n",
    )
    .expect("commit");
    let token = fake.mint_installation_token(
        installation,
        &["acme/web"],
        &[("pull_requests", "write"), ("contents", "write")],
    );
    let created = http()
        .post(format!("{}/repos/acme/web/pulls", fake.api_url()))
        .bearer_auth(&token)
        .json(&github::CreatePull {
            title: "Session one".to_string(),
            head: "nightshift/ses_1".to_string(),
            base: "main".to_string(),
            body: None,
            draft: false,
        })
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201);
    let pull: Pull = created.json().await.expect("Pull");
    wait_for(&inbox, |r| r.payload["action"] == "opened").await;
    (fake, inbox, installation, pull.number)
}

fn parse_review_webhook(received: &Received) -> ReviewWebhook {
    ReviewWebhook::parse(
        &received.event,
        &serde_json::to_vec(&received.payload).expect("json"),
    )
    .expect("a review webhook parses with the core's types")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reviews_deliver_signed_comment_and_review_events() {
    let (fake, inbox, installation, number) = fake_with_pull().await;
    let before = fake.deliveries().len();
    let (review_id, comment_ids) = fake
        .submit_review(
            "acme/web",
            number,
            "ada",
            "A few things",
            &[
                ("hello.txt", 2, "Say more here"),
                ("hello.txt", 3, "And here"),
                ("README.md", 1, "Title?"),
            ],
        )
        .await;
    assert_eq!(comment_ids.len(), 3);
    let sent = fake.deliveries()[before..].to_vec();
    let events: Vec<&str> = sent.iter().map(|d| d.event.as_str()).collect();
    assert_eq!(
        events,
        [
            "pull_request_review_comment",
            "pull_request_review_comment",
            "pull_request_review_comment",
            "pull_request_review"
        ]
    );
    assert!(sent.iter().all(|d| d.status_code == 200), "all signed");
    let received = wait_for(&inbox, |r| r.payload["comment"]["id"] == comment_ids[0]).await;
    assert!(received.signed);
    let ReviewWebhook::Comment(event) = parse_review_webhook(&received) else {
        panic!("a review comment event");
    };
    assert_eq!(event.action, "created");
    assert_eq!(event.comment.pull_request_review_id, Some(review_id));
    assert_eq!(event.comment.in_reply_to_id, None);
    assert_eq!(event.comment.user.login, "ada");
    assert_eq!(event.comment.user.kind, "User");
    assert_eq!(event.comment.author_association, "MEMBER");
    assert_eq!(event.comment.commit_id, event.pull_request.head.sha);
    assert_eq!(event.comment.line, Some(2));
    assert_eq!(event.comment.side.as_deref(), Some("RIGHT"));
    assert!(
        event.comment.diff_hunk.starts_with("@@ -1"),
        "{}",
        event.comment.diff_hunk
    );
    assert!(
        event.comment.diff_hunk.ends_with("+second line"),
        "the hunk ends at the commented line: {}",
        event.comment.diff_hunk
    );
    assert_eq!(event.installation.map(|i| i.id), Some(installation));
    assert_eq!(event.pull_request.head.git_ref, "nightshift/ses_1");
    let readme = wait_for(&inbox, |r| r.payload["comment"]["id"] == comment_ids[2]).await;
    let ReviewWebhook::Comment(readme) = parse_review_webhook(&readme) else {
        panic!("a review comment event");
    };
    assert!(
        readme.comment.diff_hunk.contains("# web"),
        "context from an unchanged file: {}",
        readme.comment.diff_hunk
    );
    let submitted = wait_for(&inbox, |r| r.event == "pull_request_review").await;
    let ReviewWebhook::Review(review) = parse_review_webhook(&submitted) else {
        panic!("a review event");
    };
    assert_eq!(review.action, "submitted");
    assert_eq!(review.review.id, review_id);
    assert_eq!(review.review.body.as_deref(), Some("A few things"));
    assert_eq!(review.review.state, "commented");

    // A thread reply has its own review and names the root.
    let reply = fake
        .reply_in_thread("acme/web", number, "ada", comment_ids[0], "one more thing")
        .await;
    let received = wait_for(&inbox, |r| r.payload["comment"]["id"] == reply).await;
    let ReviewWebhook::Comment(reply_event) = parse_review_webhook(&received) else {
        panic!("a review comment event");
    };
    assert_eq!(reply_event.comment.in_reply_to_id, Some(comment_ids[0]));
    assert_ne!(reply_event.comment.pull_request_review_id, Some(review_id));
    assert_eq!(pr_review::thread_root(&reply_event.comment), comment_ids[0]);

    // A conversation comment names the PR; a bot's comment is typed Bot.
    fake.add_bot("dependabot[bot]");
    let conversation = fake
        .comment_on_pull("acme/web", number, "dependabot[bot]", "Bump")
        .await;
    let received = wait_for(&inbox, |r| r.payload["comment"]["id"] == conversation).await;
    assert_eq!(received.event, "issue_comment");
    let ReviewWebhook::Conversation(event) = parse_review_webhook(&received) else {
        panic!("an issue comment event");
    };
    assert!(event.issue.pull_request.is_some());
    assert_eq!(event.issue.number, number);
    assert_eq!(event.comment.user.kind, "Bot");
    assert_eq!(event.comment.author_association, "NONE");

    // Re-sending the same deliveries keeps their guids.
    let count = inbox.lock().expect("inbox").len();
    let statuses = fake.redeliver_since(before).await;
    assert_eq!(statuses.len(), fake.deliveries()[before..].len() / 2);
    assert!(statuses.iter().all(|status| *status == 200));
    let inbox_now = inbox.lock().expect("inbox").clone();
    assert_eq!(inbox_now.len(), count + statuses.len());
    assert!(inbox_now[count..].iter().all(|r| inbox_now[..count]
        .iter()
        .any(|earlier| earlier.guid == r.guid)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_lists_replies_comments_and_reacts_with_the_right_permissions() {
    let (fake, inbox, installation, number) = fake_with_pull().await;
    let (review_id, comment_ids) = fake
        .submit_review(
            "acme/web",
            number,
            "ada",
            "",
            &(1..=3)
                .map(|line| ("hello.txt", line, "fix"))
                .collect::<Vec<_>>(),
        )
        .await;
    let writer = fake.mint_installation_token(
        installation,
        &["acme/web"],
        &[("pull_requests", "write"), ("issues", "write")],
    );
    let reader = fake.mint_installation_token(installation, &["acme/web"], &[("contents", "read")]);
    let client = http();
    let api = fake.api_url();

    // Paged listing with GitHub's Link header; the review's own comments.
    let first = client
        .get(format!(
            "{api}/repos/acme/web/pulls/{number}/comments?per_page=2"
        ))
        .bearer_auth(&writer)
        .send()
        .await
        .expect("list");
    assert_eq!(first.status(), 200);
    let link = first
        .headers()
        .get("link")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let page: Vec<ReviewComment> = first.json().await.expect("comments");
    assert_eq!(page.len(), 2);
    let next = pr_review::next_page(&link).expect("a next page");
    assert!(next.ends_with("per_page=2&page=2"), "{link}");
    let rest: Vec<ReviewComment> = client
        .get(next)
        .bearer_auth(&writer)
        .send()
        .await
        .expect("page 2")
        .json()
        .await
        .expect("comments");
    assert_eq!(rest.len(), 1);
    let of_review: Vec<ReviewComment> = client
        .get(format!(
            "{api}/repos/acme/web/pulls/{number}/reviews/{review_id}/comments"
        ))
        .bearer_auth(&writer)
        .send()
        .await
        .expect("review comments")
        .json()
        .await
        .expect("comments");
    let ids: Vec<u64> = of_review.iter().map(|c| c.id).collect();
    assert_eq!(ids, comment_ids);
    let refused = client
        .get(format!("{api}/repos/acme/web/pulls/{number}/comments"))
        .bearer_auth(&reader)
        .send()
        .await
        .expect("list");
    assert_eq!(refused.status(), 403, "needs pull_requests");

    // Replies: to the root only, by the App's bot, delivered as review comments.
    let reply = |root: u64, token: &str| {
        client
            .post(format!(
                "{api}/repos/acme/web/pulls/{number}/comments/{root}/replies"
            ))
            .bearer_auth(token.to_string())
            .json(&pr_review::CreateComment {
                body: "Addressed in `abc1234`: done".to_string(),
            })
            .send()
    };
    assert_eq!(
        reply(comment_ids[0], &reader)
            .await
            .expect("reply")
            .status(),
        403
    );
    let posted = reply(comment_ids[0], &writer).await.expect("reply");
    assert_eq!(posted.status(), 201);
    let posted: ReviewComment = posted.json().await.expect("the reply");
    assert_eq!(posted.in_reply_to_id, Some(comment_ids[0]));
    assert_eq!(posted.user.login, format!("{}[bot]", fake.slug()));
    assert_eq!(posted.user.kind, "Bot");
    let nested = reply(posted.id, &writer).await.expect("reply");
    assert_eq!(nested.status(), 422, "no replies to replies");
    let nested: Value = nested.json().await.expect("json");
    assert_eq!(nested["message"], "Validation Failed");
    assert_eq!(reply(999, &writer).await.expect("reply").status(), 404);
    assert_eq!(
        fake.review_replies("acme/web"),
        vec![(
            comment_ids[0],
            "Addressed in `abc1234`: done".to_string(),
            format!("{}[bot]", fake.slug())
        )]
    );
    assert_eq!(
        fake.review_replies_made_with("acme/web")[0].2,
        format!("installation:{installation}")
    );
    let echoed = wait_for(&inbox, |r| r.payload["comment"]["id"] == posted.id).await;
    assert_eq!(echoed.payload["sender"]["type"], "Bot");

    // Conversation comments, by the App and by a person.
    let comment = |token: &str| {
        client
            .post(format!("{api}/repos/acme/web/issues/{number}/comments"))
            .bearer_auth(token.to_string())
            .json(&pr_review::CreateComment {
                body: "Not changed: on a fork".to_string(),
            })
            .send()
    };
    assert_eq!(comment(&reader).await.expect("comment").status(), 403);
    let created = comment(&writer).await.expect("comment");
    assert_eq!(created.status(), 201);
    let created: pr_review::IssueComment = created.json().await.expect("IssueComment");
    let bob = fake.mint_user_token("bob");
    assert_eq!(
        comment(&bob).await.expect("comment").status(),
        201,
        "read is enough"
    );
    let carol = fake.mint_user_token("carol");
    assert_eq!(comment(&carol).await.expect("comment").status(), 404);
    let listed = fake.issue_comments("acme/web", number);
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].0, created.id);
    assert_eq!(listed[1].2, "bob");
    assert_eq!(listed[1].3, "user:bob");
    assert_eq!(
        client
            .post(format!("{api}/repos/acme/web/issues/99/comments"))
            .bearer_auth(&writer)
            .json(&json!({"body": "x"}))
            .send()
            .await
            .expect("comment")
            .status(),
        404
    );

    // Reactions: 201, then 200 for the same one, 422 for an unknown content.
    let react = |kind: &str, id: u64, content: &str| {
        client
            .post(format!(
                "{api}/repos/acme/web/{kind}/comments/{id}/reactions"
            ))
            .bearer_auth(&writer)
            .json(&json!({"content": content}))
            .send()
    };
    assert_eq!(
        react("pulls", comment_ids[1], "eyes")
            .await
            .expect("react")
            .status(),
        201
    );
    let again = react("pulls", comment_ids[1], "eyes").await.expect("react");
    assert_eq!(again.status(), 200);
    let again: pr_review::Reaction = again.json().await.expect("Reaction");
    assert_eq!(again.content, pr_review::ReactionContent::Eyes);
    assert_eq!(
        react("pulls", comment_ids[1], "thumbs")
            .await
            .expect("react")
            .status(),
        422
    );
    assert_eq!(
        react("issues", created.id, "+1")
            .await
            .expect("react")
            .status(),
        201
    );
    assert_eq!(
        react("pulls", 12345, "eyes").await.expect("react").status(),
        404
    );
    let bot = format!("{}[bot]", fake.slug());
    assert_eq!(
        fake.reactions(),
        vec![
            (
                "pulls".to_string(),
                comment_ids[1],
                "eyes".to_string(),
                bot.clone()
            ),
            ("issues".to_string(), created.id, "+1".to_string(), bot)
        ]
    );
    let kinds: Vec<String> = fake
        .requests()
        .iter()
        .filter(|(_, path, _)| path.ends_with("/reactions"))
        .map(|(_, _, kind)| kind.clone())
        .collect();
    assert!(kinds
        .iter()
        .all(|kind| *kind == format!("installation:{installation}")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_pull_request_cannot_be_pushed_to_by_the_app() {
    let (fake, inbox, installation, _) = fake_with_pull().await;
    fake.add_user("dave", "Dave Fork");
    fake.set_collaborator("acme/web", "dave", Role::Read);
    let number = fake
        .open_fork_pull("acme/web", "dave", "patch-1", "Fix the greeting")
        .await;
    let (pull, opened_with) = fake
        .pulls("acme/web")
        .into_iter()
        .find(|(pull, _)| pull.number == number)
        .expect("the fork PR");
    assert!(pull.is_fork());
    assert_eq!(opened_with, "user:dave");
    assert_eq!(
        pull.head.repo.as_ref().map(|r| r.full_name.as_str()),
        Some("dave/web")
    );
    assert_eq!(
        pull.base.repo.as_ref().map(|r| r.full_name.as_str()),
        Some("acme/web")
    );
    let opened = wait_for(&inbox, |r| {
        r.payload["action"] == "opened" && r.payload["number"] == number
    })
    .await;
    assert_eq!(
        opened.payload["pull_request"]["head"]["repo"]["full_name"],
        "dave/web"
    );

    // The App's token reads the PR's head through the base repository, but cannot push to the fork.
    let token = installation_token(
        &fake,
        installation,
        &AccessTokenRequest {
            repositories: vec!["web".to_string()],
            permissions: Access::Write.request("web").permissions,
        },
    )
    .await
    .token;
    let scratch = Scratch::new("fork");
    let work = scratch.0.join("work");
    let (cloned, stderr) = run_git(
        &scratch.0,
        &[
            "clone",
            "--quiet",
            &authed_url(&fake, "acme/web", &token),
            "work",
        ],
    )
    .await;
    assert!(cloned, "{stderr}");
    let (fetched, stderr) = run_git(
        &work,
        &[
            "fetch",
            "--quiet",
            "origin",
            &format!("refs/pull/{number}/head:fork-head"),
        ],
    )
    .await;
    assert!(fetched, "{stderr}");
    assert_eq!(
        git_stdout(&work, &["rev-parse", "fork-head"]).await,
        pull.head.sha
    );
    let (pushed, stderr) = run_git(
        &work,
        &[
            "push",
            "--quiet",
            &authed_url(&fake, "dave/web", &token),
            "fork-head:refs/heads/patch-1",
        ],
    )
    .await;
    assert!(!pushed, "the installation token cannot push to the fork");
    assert!(
        stderr.contains("denied") || stderr.contains("403") || stderr.contains("not found"),
        "{stderr}"
    );

    // A review on the fork PR works like any other.
    let (_, comment_ids) = fake
        .submit_review("acme/web", number, "ada", "", &[("hello.txt", 1, "Typo")])
        .await;
    let received = wait_for(&inbox, |r| r.payload["comment"]["id"] == comment_ids[0]).await;
    let ReviewWebhook::Comment(event) = parse_review_webhook(&received) else {
        panic!("a review comment event");
    };
    assert!(event.pull_request.is_fork());
    assert!(event
        .comment
        .diff_hunk
        .contains("+hello from the fork of dave"));
}
