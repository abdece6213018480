//! Client of the compute provider (docs/provider-contract.md): every request signed with PROVIDER_SECRET, and one typed call per endpoint, speaking the contract's types (`nightshift_core::provider`).

use nightshift_core::provider::{
    self as contract, Assign, BuildImage, CreateSandbox, Deleted, EgressAnswer, ErrorAnswer,
    ErrorBody, Image, Sandbox, SandboxList, SetEgress, Snapshot, TakeSnapshot,
};
use nightshift_core::signing;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use worker::{Env, Fetch, Headers, Method, Request, RequestInit, Response};

use crate::config;
use crate::error::{json_of, ApiError, ApiResult, EdgeError};
use crate::platform::{now_ms, random_hex};

/// Sends one signed request and returns the provider's response as it is (for streams).
pub async fn send(
    env: &Env,
    method: Method,
    path: &str,
    body: Option<&[u8]>,
) -> ApiResult<Response> {
    let base = config::provider_url(env).ok_or(EdgeError::ProviderNotConfigured)?;
    let bytes = body.unwrap_or_default();
    let ts = now_ms();
    // A new nonce for every request (crypto.getRandomValues): the provider refuses a replay.
    let nonce = random_hex(16);
    let sig = signing::sign(
        &config::provider_secret(env),
        method.as_ref(),
        path,
        ts,
        &nonce,
        bytes,
    )
    .map_err(EdgeError::Signing)?;
    let headers = Headers::new();
    headers.set(signing::TIMESTAMP_HEADER, &ts.to_string())?;
    headers.set(signing::NONCE_HEADER, &nonce)?;
    headers.set(signing::SIGNATURE_HEADER, &sig)?;
    headers.set("content-type", "application/json")?;
    let mut init = RequestInit::new();
    init.with_method(method).with_headers(headers);
    if body.is_some() {
        init.with_body(Some(js_sys::Uint8Array::from(bytes).into()));
    }
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let req = Request::new_with_init(&url, &init)?;
    Fetch::Request(req).send().await.map_err(|e| {
        EdgeError::ProviderSilent {
            base,
            error: e.to_string(),
        }
        .into()
    })
}

/// Sends one signed request; returns (status, JSON body) as they came, for answers the API
/// passes on unread. Everything the control plane reads goes through the typed calls below.
pub async fn call(
    env: &Env,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> ApiResult<(u16, Value)> {
    let bytes = body.map(|b| b.to_string().into_bytes());
    let mut resp = send(env, method, path, bytes.as_deref()).await?;
    let status = resp.status_code();
    let text = resp.text().await.unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, v))
}

/// A provider's answer that is not the object asked for: a refusal (with the contract's error
/// body, when it sent one), or a success whose body is not the contract's object.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    /// The provider's status; 502 for a success whose body is not the contract's.
    pub status: u16,
    pub error: Option<ErrorBody>,
    /// The body as it came (or, for a malformed success, the error above).
    pub body: Value,
}

impl Refused {
    /// The provider's stable code (`unknown` when it gave none).
    pub fn code(&self) -> &str {
        self.error.as_ref().map_or("unknown", |e| e.code.as_str())
    }

    pub fn message(&self) -> &str {
        self.error
            .as_ref()
            .map_or("no reason given", |e| e.message.as_str())
    }

    /// The provider does not know the object (any more).
    pub fn is_not_found(&self) -> bool {
        self.status == 404
    }

    /// The refusal as the API's answer, status and body as the provider sent them.
    pub fn relay(&self) -> ApiResult<Response> {
        json_of(self.status, &self.body)
    }
}

/// A contract object read as its type, and kept as the JSON it came as: what the API passes
/// on to people (a Sandbox, a list) goes out exactly as the provider sent it, fields the
/// control plane does not read included. Reads through to the object (`Deref`).
#[derive(Debug, Clone, PartialEq)]
pub struct AsSent<T> {
    pub value: T,
    pub json: Value,
}

impl<T> std::ops::Deref for AsSent<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<'de, T: DeserializeOwned> serde::Deserialize<'de> for AsSent<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let json = Value::deserialize(deserializer)?;
        let value = serde_json::from_value(json.clone()).map_err(serde::de::Error::custom)?;
        Ok(AsSent { value, json })
    }
}

/// Written as it came.
impl<T> Serialize for AsSent<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.json.serialize(serializer)
    }
}

/// What a typed call got: the contract's object, or the provider's refusal. (The outer
/// `ApiResult` of each call is for a provider that did not answer, or is not configured.)
pub type Answer<T> = Result<T, Refused>;

/// Done, or unknown at the provider: all an idempotent terminate or delete needs to know.
pub fn done_or_gone<T>(answer: &Answer<T>) -> bool {
    match answer {
        Ok(_) => true,
        Err(refused) => refused.is_not_found(),
    }
}

/// Reads a provider's answer: a 2xx carries the object, anything else a refusal.
pub fn read_answer<T: DeserializeOwned>(status: u16, text: &str) -> Answer<T> {
    if (200..300).contains(&status) {
        return serde_json::from_str(text).map_err(|e| {
            let answer = ErrorAnswer::new(
                "invalid_answer",
                format!("the provider's answer ({status}) does not match the contract: {e}"),
            );
            Refused {
                status: 502,
                body: serde_json::to_value(&answer).unwrap_or_default(),
                error: Some(answer.error),
            }
        });
    }
    let body: Value = serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.into()));
    let error = serde_json::from_value::<ErrorAnswer>(body.clone())
        .ok()
        .map(|answer| answer.error);
    Err(Refused {
        status,
        error,
        body,
    })
}

/// One signed request with a typed body and a typed answer.
async fn exchange<T: DeserializeOwned>(
    env: &Env,
    method: Method,
    path: &str,
    body: Option<&impl Serialize>,
) -> ApiResult<Answer<T>> {
    let bytes = body
        .map(serde_json::to_vec)
        .transpose()
        .map_err(ApiError::internal)?;
    let mut resp = send(env, method, path, bytes.as_deref()).await?;
    let status = resp.status_code();
    let text = resp.text().await.unwrap_or_default();
    Ok(read_answer(status, &text))
}

/// No body.
const NONE: Option<&()> = None;

/// `POST /v1/sandboxes`.
pub async fn create_sandbox(
    env: &Env,
    create: &CreateSandbox,
) -> ApiResult<Answer<AsSent<Sandbox>>> {
    exchange(env, Method::Post, contract::SANDBOXES, Some(create)).await
}

/// `POST /v1/snapshots/{id}/restore`: a new sandbox from a snapshot.
pub async fn restore_snapshot(
    env: &Env,
    snapshot: &str,
    create: &CreateSandbox,
) -> ApiResult<Answer<AsSent<Sandbox>>> {
    let path = contract::restore_path(snapshot);
    exchange(env, Method::Post, &path, Some(create)).await
}

/// `GET /v1/sandboxes/{id}`.
pub async fn get_sandbox(env: &Env, sandbox: &str) -> ApiResult<Answer<AsSent<Sandbox>>> {
    let path = contract::sandbox_path(sandbox);
    exchange(env, Method::Get, &path, NONE).await
}

/// `GET /v1/sandboxes?session_id=`: the session's sandboxes, oldest first.
pub async fn list_sandboxes(env: &Env, session: &str) -> ApiResult<Answer<AsSent<SandboxList>>> {
    let path = contract::sandboxes_of_session(session);
    exchange(env, Method::Get, &path, NONE).await
}

/// `GET /v1/sandboxes?label=key:value`.
pub async fn list_labelled(env: &Env, key: &str, value: &str) -> ApiResult<Answer<SandboxList>> {
    let path = contract::sandboxes_labelled(key, value);
    exchange(env, Method::Get, &path, NONE).await
}

/// `POST /v1/sandboxes/{id}/start`: boots a stopped sandbox again.
pub async fn start_sandbox(env: &Env, sandbox: &str) -> ApiResult<Answer<Sandbox>> {
    let path = contract::sandbox_op_path(sandbox, "start");
    exchange(env, Method::Post, &path, NONE).await
}

/// `POST /v1/sandboxes/{id}/terminate` (idempotent at the provider).
pub async fn terminate(env: &Env, sandbox: &str) -> ApiResult<Answer<Sandbox>> {
    let path = contract::sandbox_op_path(sandbox, "terminate");
    exchange(env, Method::Post, &path, NONE).await
}

/// `POST /v1/sandboxes/{id}/assign`: a pooled sandbox goes to a session.
pub async fn assign(env: &Env, sandbox: &str, assign: &Assign) -> ApiResult<Answer<Sandbox>> {
    let path = contract::sandbox_op_path(sandbox, "assign");
    exchange(env, Method::Post, &path, Some(assign)).await
}

/// `POST /v1/sandboxes/{id}/egress`: the session owner's extra hosts, at once.
pub async fn set_egress(
    env: &Env,
    sandbox: &str,
    egress: &SetEgress,
) -> ApiResult<Answer<EgressAnswer>> {
    let path = contract::sandbox_op_path(sandbox, "egress");
    exchange(env, Method::Post, &path, Some(egress)).await
}

/// `POST /v1/sandboxes/{id}/snapshot`.
pub async fn take_snapshot(
    env: &Env,
    sandbox: &str,
    take: &TakeSnapshot,
) -> ApiResult<Answer<Snapshot>> {
    let path = contract::sandbox_op_path(sandbox, "snapshot");
    exchange(env, Method::Post, &path, Some(take)).await
}

/// `GET /v1/snapshots/{id}`.
pub async fn get_snapshot(env: &Env, snapshot: &str) -> ApiResult<Answer<Snapshot>> {
    let path = contract::snapshot_path(snapshot);
    exchange(env, Method::Get, &path, NONE).await
}

/// `DELETE /v1/snapshots/{id}` (idempotent).
pub async fn delete_snapshot(env: &Env, snapshot: &str) -> ApiResult<Answer<Deleted>> {
    let path = contract::snapshot_path(snapshot);
    exchange(env, Method::Delete, &path, NONE).await
}

/// `POST /v1/images`.
pub async fn build_image(env: &Env, build: &BuildImage) -> ApiResult<Answer<Image>> {
    exchange(env, Method::Post, contract::IMAGES, Some(build)).await
}

/// `GET /v1/images/{id}`.
pub async fn get_image(env: &Env, image: &str) -> ApiResult<Answer<Image>> {
    let path = contract::image_path(image);
    exchange(env, Method::Get, &path, NONE).await
}

/// `DELETE /v1/images/{id}` (idempotent).
pub async fn delete_image(env: &Env, image: &str) -> ApiResult<Answer<Deleted>> {
    let path = contract::image_path(image);
    exchange(env, Method::Delete, &path, NONE).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_success_carries_the_object_and_anything_else_is_a_refusal() {
        let snapshot = r#"{"id":"snp_1","sandbox_id":"sbx_1","created_at":1,"expires_at":2}"#;
        assert_eq!(
            read_answer::<Snapshot>(201, snapshot).map(|s| s.expires_at),
            Ok(2)
        );
        let refused = read_answer::<Snapshot>(
            404,
            r#"{"error":{"code":"snapshot_not_found","message":"no live snapshot snp_1"}}"#,
        )
        .err();
        assert_eq!(
            refused.as_ref().map(Refused::code),
            Some("snapshot_not_found")
        );
        assert!(refused.as_ref().is_some_and(Refused::is_not_found));
        assert!(done_or_gone(&read_answer::<Snapshot>(404, "{}")));
        // A body that is not the contract's: relayed as it came, with no code.
        let proxy = read_answer::<Snapshot>(503, "upstream down").err();
        assert_eq!(
            proxy
                .as_ref()
                .map(|r| (r.code(), r.message(), r.body.clone())),
            Some((
                "unknown",
                "no reason given",
                Value::String("upstream down".into())
            ))
        );
        // A success that is not the object asked for is a bad gateway, not a success.
        let odd = read_answer::<Snapshot>(201, r#"{"id":"snp_1"}"#).err();
        assert_eq!(
            odd.as_ref().map(|r| (r.status, r.code())),
            Some((502, "invalid_answer"))
        );
        assert!(!done_or_gone(&read_answer::<Snapshot>(201, "[]")));
    }

    #[test]
    fn a_sandbox_passed_on_is_the_providers_json() {
        // A sparse answer (a fake's) and one with a field the contract does not name yet.
        for text in [
            r#"{"id":"sbx_1","session_id":"ses_1","status":"creating"}"#,
            r#"{"id":"sbx_1","status":"ready","expires_at":9,"region":"eu"}"#,
        ] {
            let sent = read_answer::<AsSent<Sandbox>>(201, text);
            let json: Value = serde_json::from_str(text).unwrap_or_default();
            assert_eq!(
                sent.as_ref().ok().map(|s| serde_json::to_value(s).ok()),
                Some(Some(json)),
                "{text}"
            );
            assert_eq!(sent.ok().map(|s| s.id.clone()), Some("sbx_1".to_string()));
        }
        assert_eq!(
            read_answer::<AsSent<Sandbox>>(200, r#"{"id":"sbx_1","status":"sleeping"}"#)
                .err()
                .map(|r| r.status),
            Some(502)
        );
    }
}
