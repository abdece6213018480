//! Opening a session: the object and its creator's index entry written together, the entry taken back if the session is not created (for `POST /sessions` and for the sessions review comments start).

use nightshift_core::ids::Identity;
use worker::{Env, Headers};

use crate::auth::{encode_identity, IDENTITY_HEADER};
use crate::error::ApiResult;
use crate::http::{call, session_stub, user_index};
use crate::objects::{
    encode, RemoveSession, SessionEntry, SessionRoute, UserIndexRoute, SESSION_HEADER,
};
use crate::platform::now_ms;

/// Creates session `id` owned by `who` (checked and counted already) with its creator's index
/// entry; the object's answer.
pub(crate) async fn open(
    env: &Env,
    who: &Identity,
    id: &str,
    bytes: Vec<u8>,
    title: String,
    repository: Option<String>,
) -> ApiResult<(u16, String)> {
    let id = id.to_string();
    let stub = session_stub(env, &id)?;
    let headers = Headers::new();
    headers.set(IDENTITY_HEADER, &encode_identity(who))?;
    headers.set(SESSION_HEADER, &id)?;
    // The session and the creator's index entry are written at the same time (one round
    // trip instead of two); the entry is taken back if the session is not created.
    let entry = SessionEntry {
        id: id.clone(),
        title,
        repository,
        role: "owner".into(),
        joined_at: now_ms(),
        status: "active".into(),
    };
    let idx = user_index(env, &who.user)?;
    let entry_bytes = encode(&entry)?;
    let (create, add) = (SessionRoute::Create, UserIndexRoute::Add);
    let (created, indexed) = futures_util::future::join(
        call(
            &stub,
            create.method(),
            create.path(),
            Some(headers),
            Some(bytes),
        ),
        call(&idx, add.method(), add.path(), None, Some(entry_bytes)),
    )
    .await;
    let mut resp = created?;
    let status = resp.status_code();
    let text = resp.text().await?;
    // A session that exists already (a retried start) keeps its creator's entry.
    if status != 201 && !text.contains("session_exists") {
        if indexed.is_ok() {
            remove_from_index(env, &who.user, &id).await?;
        }
    } else {
        indexed?;
    }
    Ok((status, text))
}

/// Takes a session off a person's index (they left, or it was not created).
pub(crate) async fn remove_from_index(env: &Env, user: &str, id: &str) -> ApiResult<()> {
    let idx = user_index(env, user)?;
    let remove = UserIndexRoute::Remove;
    let body = encode(&RemoveSession { id: id.to_string() })?;
    call(&idx, remove.method(), remove.path(), None, Some(body)).await?;
    Ok(())
}
