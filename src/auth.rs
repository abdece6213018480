//! Who is calling: bearer-token verification, the dev sign-in, and passing the identity to Durable Objects.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use nightshift_core::ids::Identity;
use nightshift_core::token::{self, Claims};
use nightshift_core::wire::DevSignIn;
use serde::Serialize;
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

/// The answer of `POST /auth/dev`: a token for the person it signed in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DevSignedIn {
    /// Always `true`: a dev token, not a real sign-in.
    pub dev_only: bool,
    pub expires_at: u64,
    pub token: String,
    pub user: Identity,
}

/// `POST /auth/dev`: signs a person in by name. Only exists when DEV_AUTH=1.
pub fn dev_sign_in(body: DevSignIn, env: &Env) -> ApiResult<DevSignedIn> {
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
    Ok(DevSignedIn {
        dev_only: true,
        expires_at: claims.exp,
        token,
        user: Identity {
            user: claims.sub,
            name: claims.name,
            email: claims.email,
        },
    })
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

#[cfg(test)]
mod tests {
    use super::DevSignedIn;
    use nightshift_core::ids::Identity;
    use serde_json::json;

    /// The dev sign-in answer has the keys and values of the `json!` it replaced (the `user`
    /// object's keys now come in `Identity`'s order).
    #[test]
    fn the_dev_sign_in_answer_is_the_json_it_replaced() {
        let (token, sub, name, email, exp) = ("t.k", "ada", "Ada", Some("ada@x.dev"), 9u64);
        let answer = DevSignedIn {
            dev_only: true,
            expires_at: exp,
            token: token.into(),
            user: Identity {
                user: sub.into(),
                name: name.into(),
                email: email.map(String::from),
            },
        };
        let old = json!({
            "token": token,
            "user": { "user": sub, "name": name, "email": email },
            "expires_at": exp,
            "dev_only": true
        });
        assert_eq!(serde_json::to_value(&answer).ok(), Some(old));
    }
}
