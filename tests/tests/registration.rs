//! Registering a repository is all or nothing: while the provider is down (nothing listens, or it answers 503) nothing is stored, the refusal says so with a stable code, and registering again once it is up works.

use std::net::TcpListener as StdListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::http::{Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Json;
use nightshift_tests::{Api, Server, User};
use serde_json::{json, Value};

/// The contract's Image object of the one build, still building.
fn building() -> Value {
    json!({"id": "img_first", "status": "building",
        "repository": {"clone_url": "https://example.com/demo.git", "base_branch": "main"},
        "commit": null, "created_at": 1700000000000u64, "ready_at": null, "setup": [], "test": null,
        "test_exit_code": null, "labels": {"repository": "demo", "reason": "registered"},
        "error": null})
}

/// A provider that builds images (it never finishes one), or answers every request with 503
/// while `down`.
async fn provider(listener: tokio::net::TcpListener, down: Arc<AtomicBool>) {
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri| {
        let down = down.clone();
        async move {
            if down.load(Ordering::SeqCst) {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"error": {"code": "unavailable", "message": "the provider is down for maintenance"}})),
                )
                    .into_response();
            }
            match (method, uri.path()) {
                (Method::POST, "/v1/images") => {
                    (StatusCode::CREATED, Json(building())).into_response()
                }
                (Method::GET, "/v1/images/img_first") => Json(building()).into_response(),
                (_, path) => (
                    StatusCode::NOT_FOUND,
                    Json(json!({"error": {"code": "not_found", "message": path}})),
                )
                    .into_response(),
            }
        }
    });
    let _ = axum::serve(listener, app).await;
}

async fn listed(api: &Api, who: &User) -> Vec<String> {
    let (st, v) = api.call("GET", "/repositories", who, None).await;
    assert_eq!(st, 200, "{v}");
    v["repositories"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["repository"]["name"].as_str().map(String::from))
        .collect()
}

/// Nothing of `name` is stored: not listed, not found.
async fn nothing_stored(api: &Api, who: &User, name: &str, after: &str) {
    assert!(
        !listed(api, who).await.contains(&name.to_string()),
        "{after}: the repository is listed"
    );
    let (st, v) = api
        .call("GET", &format!("/repositories/{name}"), who, None)
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (404, Some("repository_not_found")),
        "{after}: {v}"
    );
}

#[tokio::test]
async fn registration_while_the_provider_is_down_stores_nothing_and_works_once_it_is_up() {
    // A port nothing listens on yet: the provider is down.
    let port = StdListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let server = Server::start(&[
        ("PROVIDER_URL", url.as_str()),
        ("PROVIDER_SECRET", "registration-test-secret"),
    ])
    .await;
    let api = server.client();
    let ada = api.sign_in("ada").await;
    let settings = json!({"name": "demo", "clone_url": "https://example.com/demo.git"});

    // Nothing listens.
    let (st, v) = api
        .call("POST", "/repositories", &ada, Some(settings.clone()))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (502, Some("provider_unavailable")),
        "{v}"
    );
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("nothing was registered") && message.contains("POST /repositories"),
        "the refusal says nothing was stored and what to do: {v}"
    );
    nothing_stored(&api, &ada, "demo", "a provider nothing listens on").await;

    // It answers 503.
    let down = Arc::new(AtomicBool::new(true));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the provider's port");
    tokio::spawn(provider(listener, down.clone()));
    let (st, v) = api
        .call("POST", "/repositories", &ada, Some(settings.clone()))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (502, Some("build_refused")),
        "{v}"
    );
    assert!(
        v["error"]["message"].as_str().is_some_and(
            |m| m.contains("down for maintenance") && m.contains("nothing was registered")
        ),
        "{v}"
    );
    nothing_stored(&api, &ada, "demo", "a provider answering 503").await;

    // Up again: the same registration works, once, with its first build recorded.
    down.store(false, Ordering::SeqCst);
    let (st, v) = api
        .call("POST", "/repositories", &ada, Some(settings.clone()))
        .await;
    assert_eq!(st, 201, "{v}");
    let builds: Vec<(&str, &str)> = v["builds"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b: &Value| {
            (
                b["image"].as_str().unwrap_or_default(),
                b["reason"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(builds, [("img_first", "registered")], "{v}");
    assert_eq!(listed(&api, &ada).await, ["demo"]);
    let (st, v) = api
        .call("POST", "/repositories", &ada, Some(settings))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("repository_exists")),
        "{v}"
    );
}
