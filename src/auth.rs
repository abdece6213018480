//! Who is calling: bearer-token verification, the dev sign-in, and passing the identity to Durable Objects.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use nightshift_core::ids::Identity;
use nightshift_core::token::{self, Claims};
use nightshift_core::wire::DevSignIn;
use worker::{Env, Request};

use crate::config;
use crate::error::{ApiResult, EdgeError};
use crate::platform::now_ms;

/// Header carrying the verified identity from the Worker to a Durable Object (named with the
/// object protocol's other headers).
pub use crate::objects::IDENTITY_HEADER;

/// Verifies the caller's token from `Authorization: Bearer` (or `?token=` for WebSockets,
/// which browsers cannot give headers).
pub fn authenticate(req: &Request, env: &Env, allow_query: bool) -> ApiResult<Identity> {
    let header = req.headers().get("authorization").ok().flatten();
    let raw = match header {
        Some(h) => h
            .strip_prefix("Bearer ")
            .map(str::to_string)
            .ok_or(EdgeError::NotBearer)?,
        None if allow_query => req
            .url()
            .ok()
            .and_then(|u| {
                u.query_pairs()
                    .find(|(k, _)| k == "token")
                    .map(|(_, v)| v.into_owned())
            })
            .ok_or(EdgeError::Unauthenticated)?,
        None => return Err(EdgeError::Unauthenticated.into()),
    };
    Ok(token::verify(
        raw.trim(),
        &config::auth_secret(env),
        now_ms(),
    )?)
}

fn valid_user(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 64
        && user
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// `POST /auth/dev`: signs a person in by name. Only exists when DEV_AUTH=1.
pub fn dev_sign_in(body: DevSignIn, env: &Env) -> ApiResult<serde_json::Value> {
    if !valid_user(&body.user) {
        return Err(EdgeError::InvalidUser.into());
    }
    let name = body.name.unwrap_or_else(|| body.user.clone());
    if name.is_empty() || name.len() > 100 {
        return Err(EdgeError::InvalidInput("name must be 1-100 bytes").into());
    }
    let now = now_ms();
    let claims = Claims {
        sub: body.user.clone(),
        name: name.clone(),
        email: Some(
            body.email
                .unwrap_or_else(|| format!("{}@users.nightshift.dev", body.user)),
        ),
        iat: now,
        exp: now + config::token_ttl_ms(env),
    };
    let token = token::issue(&claims, &config::auth_secret(env))?;
    Ok(serde_json::json!({
        "token": token,
        "user": { "user": claims.sub, "name": claims.name, "email": claims.email },
        "expires_at": claims.exp,
        "dev_only": true
    }))
}

/// Encodes an identity for the header to a Durable Object.
pub fn encode_identity(id: &Identity) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(id).unwrap_or_default())
}

/// Decodes the identity the Worker attached (Durable Objects are reachable only through the Worker).
pub fn decode_identity(req: &Request) -> Option<Identity> {
    let raw = req.headers().get(IDENTITY_HEADER).ok().flatten()?;
    let bytes = URL_SAFE_NO_PAD.decode(raw).ok()?;
    serde_json::from_slice(&bytes).ok()
}
