//! A fake compute provider for tests and benchmarks: checks every request's signature like the real one, records creates (with their sandbox tokens) and answers in the contract's wire format.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Json;
use nightshift_core::signing;
use serde_json::{json, Value};

pub const SECRET: &str = "fake-provider-secret";

#[derive(Default)]
pub struct Fake {
    /// Verified create bodies, in arrival order.
    pub creates: Vec<Value>,
    pub terminated: Vec<String>,
    /// Answer creates for this session with 503.
    pub refuse: Option<String>,
}

pub type Shared = Arc<Mutex<Fake>>;

async fn fake(
    State(f): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    if let Err(e) = signing::verify(
        SECRET.as_bytes(),
        method.as_str(),
        path,
        signing::Signed {
            timestamp: h(signing::TIMESTAMP_HEADER),
            nonce: h(signing::NONCE_HEADER),
            signature: h(signing::SIGNATURE_HEADER),
        },
        &body,
        now,
    ) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": {"code": e.code(), "message": e.to_string()}})),
        )
            .into_response();
    }
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut g = f.lock().expect("lock");
    if uri.path() == "/v1/sandboxes" && method == Method::POST {
        if g.refuse.as_deref() == v["session_id"].as_str() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": {"code": "capacity", "message": "no capacity left"}})),
            )
                .into_response();
        }
        g.creates.push(v.clone());
        let id = format!("sbx_fake{}", g.creates.len());
        return (
            StatusCode::CREATED,
            Json(json!({"id": id, "session_id": v["session_id"], "status": "creating"})),
        )
            .into_response();
    }
    // Image builds are taken and never finish (a registration completes; no pool fills).
    if uri.path() == "/v1/images" && method == Method::POST {
        let n = g.creates.len() + g.terminated.len() + 1;
        return (
            StatusCode::CREATED,
            Json(json!({"id": format!("img_fake{n}"), "status": "building",
                "repository": v["repository"], "commit": null, "created_at": now, "ready_at": null,
                "setup": [], "test": null, "test_exit_code": null, "labels": v["labels"], "error": null})),
        )
            .into_response();
    }
    if let Some(id) = uri
        .path()
        .strip_prefix("/v1/sandboxes/")
        .and_then(|r| r.strip_suffix("/terminate"))
    {
        g.terminated.push(id.to_string());
        return Json(json!({"id": id, "status": "terminated"})).into_response();
    }
    // GET of a created sandbox: it stays `creating` until the test dials in as its supervisor.
    if method == Method::GET {
        if let Some(n) = uri
            .path()
            .strip_prefix("/v1/sandboxes/sbx_fake")
            .and_then(|n| n.parse::<usize>().ok())
        {
            if let Some(c) = n.checked_sub(1).and_then(|i| g.creates.get(i)) {
                let terminated = g.terminated.iter().any(|t| *t == format!("sbx_fake{n}"));
                let status = if terminated { "terminated" } else { "creating" };
                return Json(json!({"id": format!("sbx_fake{n}"), "session_id": c["session_id"], "status": status}))
                    .into_response();
            }
        }
    }
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {"code": "not_found", "message": path}})),
    )
        .into_response()
}

pub async fn start() -> (Shared, String) {
    let shared: Shared = Arc::default();
    let app = axum::Router::new()
        .fallback(fake)
        .with_state(shared.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (shared, url)
}
