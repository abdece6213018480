//! HTTP API end to end against wrangler dev: sessions, membership, identity, and bad input that must change nothing.

use nightshift_core::token::{issue, Claims};
use nightshift_tests::{Server, User};
use serde_json::{json, Value};

/// (method, path, caller, body, expected status, expected code)
type Case<'a> = (
    &'a str,
    String,
    Option<&'a User>,
    Option<Vec<u8>>,
    u16,
    &'a str,
);

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no code>")
}

#[tokio::test]
async fn sessions_membership_and_listing() {
    let server = Server::start(&[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let bob = api.sign_in("bob").await;
    let (id, invite) = api.create_session(&ada, "Fix the login page").await;

    let (st, v) = api.call("GET", "/sessions", &ada, None).await;
    assert_eq!(st, 200);
    assert_eq!(v["sessions"][0]["id"], id.as_str());
    assert_eq!(v["sessions"][0]["role"], "owner");

    // Bob is not a member yet: every session route refuses him.
    let (st, v) = api
        .call("GET", &format!("/sessions/{id}"), &bob, None)
        .await;
    assert_eq!((st, code(&v)), (403, "not_member"));
    let (st, v) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/prompt"),
            &bob,
            Some(json!({"text":"hi"})),
        )
        .await;
    assert_eq!((st, code(&v)), (403, "not_member"));
    let (st, v) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/join"),
            &bob,
            Some(json!({"invite":"nope"})),
        )
        .await;
    assert_eq!((st, code(&v)), (403, "bad_invite"));

    api.join(&bob, &id, &invite).await;
    let (st, v) = api
        .call("GET", &format!("/sessions/{id}"), &bob, None)
        .await;
    assert_eq!(st, 200);
    assert_eq!(v["role"], "member");
    assert_eq!(v["members"].as_array().map(Vec::len), Some(2));
    let (_, v) = api.call("GET", "/sessions", &bob, None).await;
    assert_eq!(v["sessions"][0]["id"], id.as_str());

    let (st, v) = api
        .call("POST", &format!("/multiplayer/{id}/leave"), &ada, None)
        .await;
    assert_eq!((st, code(&v)), (409, "owner_cannot_leave"));
    let (st, _) = api
        .call("POST", &format!("/multiplayer/{id}/leave"), &bob, None)
        .await;
    assert_eq!(st, 200);
    let (st, _) = api
        .call("GET", &format!("/sessions/{id}"), &bob, None)
        .await;
    assert_eq!(st, 403);
    let (_, v) = api.call("GET", "/sessions", &bob, None).await;
    assert_eq!(v["sessions"].as_array().map(Vec::len), Some(0));

    // Every prompt and event carries its author.
    let (st, p) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/prompt"),
            &ada,
            Some(json!({"text":"add tests"})),
        )
        .await;
    assert_eq!(st, 202);
    assert_eq!(p["author"], "ada");
    let (_, ev) = api
        .call(
            "GET",
            &format!("/multiplayer/{id}/events?since=0"),
            &ada,
            None,
        )
        .await;
    let events = ev["events"].as_array().cloned().unwrap_or_default();
    let queued = events
        .iter()
        .find(|e| e["type"] == "prompt.queued")
        .expect("queued event");
    assert_eq!(queued["actor"]["user"], "ada");
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());

    // Lists show each session's status; ending it updates every member's list.
    let carol = api.sign_in("carol").await;
    api.join(&carol, &id, &invite).await;
    let (_, v) = api.call("GET", "/sessions", &carol, None).await;
    assert_eq!(v["sessions"][0]["status"], "active");
    let (st, _) = api
        .call("POST", &format!("/sessions/{id}/end"), &ada, None)
        .await;
    assert_eq!(st, 200);
    for who in [&ada, &carol] {
        let (_, v) = api.call("GET", "/sessions", who, None).await;
        assert_eq!(v["sessions"][0]["status"], "ended", "{v}");
    }
}

#[tokio::test]
async fn bad_input_gets_json_errors_and_changes_nothing() {
    let server = Server::start(&[("MAX_QUEUED", "5")]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let bob = api.sign_in("bob").await;
    let (id, invite) = api.create_session(&ada, "Bad input").await;
    api.join(&bob, &id, &invite).await;
    let (_, p) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/prompt"),
            &ada,
            Some(json!({"text":"first"})),
        )
        .await;
    let (_, queued) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/prompt"),
            &ada,
            Some(json!({"text":"second"})),
        )
        .await;
    let (st, _) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/lock"),
            &ada,
            Some(json!({"resource":"src/app.rs"})),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(p["status"], "running");
    let (_, before) = api
        .call("GET", &format!("/sessions/{id}"), &ada, None)
        .await;

    let pre = format!("/multiplayer/{id}");
    let raw = |s: &str| Some(s.as_bytes().to_vec());
    let cases: Vec<Case> = vec![
        (
            "POST",
            format!("{pre}/prompt"),
            Some(&ada),
            raw("{not json"),
            400,
            "malformed_json",
        ),
        (
            "POST",
            format!("{pre}/prompt"),
            Some(&ada),
            raw(r#"{"text":5}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            format!("{pre}/prompt"),
            Some(&ada),
            raw(r#"{}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            format!("{pre}/prompt"),
            Some(&ada),
            raw(r#"{"text":"x","extra":1}"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            format!("{pre}/prompt"),
            Some(&ada),
            raw(r#"["text"]"#),
            400,
            "invalid_body",
        ),
        (
            "POST",
            format!("{pre}/prompt"),
            Some(&ada),
            raw(r#"{"text":"   "}"#),
            400,
            "invalid_input",
        ),
        (
            "POST",
            format!("{pre}/prompt"),
            Some(&ada),
            raw(r#"{"text":"x","priority":99}"#),
            400,
            "invalid_input",
        ),
        (
            "POST",
            format!("{pre}/prompt"),
            Some(&ada),
            Some(vec![b' '; 70 * 1024]),
            413,
            "body_too_large",
        ),
        (
            "POST",
            "/sessions".to_string(),
            Some(&ada),
            raw(r#"{"title":""}"#),
            400,
            "invalid_input",
        ),
        (
            "POST",
            "/multiplayer/ses_0123456789abcdef0123456789abcdef/prompt".to_string(),
            Some(&ada),
            raw(r#"{"text":"x"}"#),
            404,
            "session_not_found",
        ),
        (
            "GET",
            "/sessions/not-an-id".to_string(),
            Some(&ada),
            None,
            404,
            "session_not_found",
        ),
        (
            "DELETE",
            format!("{pre}/prompt/{}", queued["id"].as_str().unwrap_or("")),
            Some(&bob),
            None,
            403,
            "not_your_prompt",
        ),
        (
            "DELETE",
            format!("{pre}/prompt/prm_missing"),
            Some(&ada),
            None,
            404,
            "prompt_not_found",
        ),
        (
            "PATCH",
            format!("{pre}/prompt/{}", p["id"].as_str().unwrap_or("")),
            Some(&ada),
            raw(r#"{"priority":1}"#),
            409,
            "prompt_not_queued",
        ),
        (
            "POST",
            format!("{pre}/lock"),
            Some(&bob),
            raw(r#"{"resource":"src/app.rs"}"#),
            409,
            "lock_held",
        ),
        (
            "POST",
            format!("{pre}/lock"),
            Some(&bob),
            raw(r#"{"resource":"x","ttl_ms":0}"#),
            400,
            "invalid_input",
        ),
        (
            "POST",
            format!("{pre}/unlock"),
            Some(&bob),
            raw(r#"{"resource":"src/app.rs"}"#),
            409,
            "lock_not_held",
        ),
        (
            "POST",
            format!("{pre}/stop"),
            Some(&bob),
            None,
            403,
            "not_your_prompt",
        ),
        (
            "PUT",
            format!("{pre}/cursor"),
            Some(&bob),
            raw(r#"{"client":"nope","line":1,"column":2}"#),
            404,
            "unknown_client",
        ),
        (
            "GET",
            format!("{pre}/events?since=-1"),
            Some(&ada),
            None,
            400,
            "invalid_query",
        ),
        (
            "GET",
            format!("{pre}/ws"),
            Some(&ada),
            None,
            426,
            "upgrade_required",
        ),
        (
            "POST",
            format!("{pre}/teleport"),
            Some(&ada),
            None,
            404,
            "not_found",
        ),
        (
            "POST",
            format!("{pre}/prompt"),
            None,
            raw(r#"{"text":"x"}"#),
            401,
            "unauthenticated",
        ),
    ];
    for (method, path, who, body, status, want) in cases {
        let (st, v) = api
            .raw(method, &path, who.map(|u| u.token.as_str()), body)
            .await;
        assert_eq!((st, code(&v)), (status, want), "{method} {path}: {v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }

    // Forged, expired and malformed tokens.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let claims = |exp| Claims {
        sub: "ada".into(),
        name: "Ada".into(),
        email: None,
        iat: 0,
        exp,
        sid: None,
    };
    let expired = issue(&claims(now - 1000), b"test-secret").expect("issue");
    let forged = issue(&claims(now + 100_000), b"wrong-secret").expect("issue");
    // Signed with the deployment's secret and unexpired, but of no sign-in sign-out could end.
    let without_sign_in = issue(&claims(now + 100_000), b"test-secret").expect("issue");
    for (tok, want) in [
        (without_sign_in.as_str(), "sign_in_unknown"),
        (expired.as_str(), "token_expired"),
        (forged.as_str(), "token_invalid"),
        ("junk", "token_malformed"),
    ] {
        let (st, v) = api
            .raw("GET", &format!("/sessions/{id}"), Some(tok), None)
            .await;
        assert_eq!((st, code(&v)), (401, want));
    }

    let (_, after) = api
        .call("GET", &format!("/sessions/{id}"), &ada, None)
        .await;
    assert_eq!(before, after, "bad input changed stored state");
}

#[tokio::test]
async fn dev_sign_in_is_off_unless_configured() {
    let server = Server::start(&[("DEV_AUTH", "0")]).await;
    let (st, v) = server
        .client()
        .raw(
            "POST",
            "/auth/dev",
            None,
            Some(br#"{"user":"ada"}"#.to_vec()),
        )
        .await;
    assert_eq!((st, code(&v)), (404, "not_found"));
}

#[tokio::test]
async fn every_openapi_route_answers() {
    let server = Server::start(&[]).await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let (id, _) = api.create_session(&ada, "OpenAPI").await;
    let (_, p) = api
        .call(
            "POST",
            &format!("/multiplayer/{id}/prompt"),
            &ada,
            Some(json!({"text":"x"})),
        )
        .await;
    let pid = p["id"].as_str().expect("prompt id").to_string();
    let (st, doc) = api.raw("GET", "/openapi.json", None, None).await;
    assert_eq!(st, 200);
    let paths = doc["paths"].as_object().expect("paths");
    assert!(paths.len() >= 20);
    for (path, ops) in paths {
        for method in ops.as_object().expect("ops").keys() {
            let concrete = path
                .replace("{sessionID}", &id)
                .replace("{id}", &id)
                .replace("{promptID}", &pid);
            // Signing out ends the sign-in it is called with: it gets a sign-in of its own, so
            // every other route is still called signed in.
            let token = if path == "/auth/logout" {
                api.sign_in("ada").await.token
            } else {
                ada.token.clone()
            };
            let (st, v) = api
                .raw(
                    &method.to_uppercase(),
                    &concrete,
                    Some(&token),
                    Some(b"{}".to_vec()),
                )
                .await;
            let route_missing = st == 404 && code(&v) == "not_found";
            assert!(
                !route_missing,
                "{method} {path} is documented but does not answer: {v}"
            );
            assert!(st < 500, "{method} {path} failed: {st} {v}");
        }
    }
}
