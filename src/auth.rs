//! Who is calling: bearer tokens of sign-ins that sign-out ends, one-time WebSocket tickets, the dev sign-in (local runs only), and passing the identity to Durable Objects.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use nightshift_core::ids::Identity;
use nightshift_core::signin::{self, SealError, SignIn, SignInError, Ticket};
use nightshift_core::token::{self, Claims, TokenError};
use nightshift_core::wire::DevSignIn;
use serde::Serialize;
use worker::{Env, Request};

use crate::config;
use crate::error::{ApiError, ApiResult, EdgeError};
use crate::http::{ask, read_body, user_index};
use crate::objects::{encode, BeginSignIn, OkAnswer, RedeemTicket, SignInRef, UserIndexRoute};
use crate::platform::{now_ms, random_token};

/// Header carrying the verified identity from the Worker to a Durable Object (named with the
/// object protocol's other headers).
pub use crate::objects::IDENTITY_HEADER;

/// A verified caller: who, and under which sign-in (always one: a token without is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub identity: Identity,
    pub sid: Option<String>,
}

fn bearer(req: &Request) -> ApiResult<String> {
    let header = req.headers().get("authorization").ok().flatten();
    match header {
        Some(h) => h
            .strip_prefix("Bearer ")
            .map(|t| t.trim().to_string())
            .ok_or(EdgeError::NotBearer.into()),
        None => Err(EdgeError::Unauthenticated.into()),
    }
}

/// Verifies the caller's `Authorization: Bearer` token: its signature and expiry, then that
/// its sign-in has not been ended (sign-out is server-side: the person's index says).
pub async fn authenticate(req: &Request, env: &Env) -> ApiResult<Identity> {
    Ok(caller(req, env).await?.identity)
}

/// [`authenticate`], keeping the sign-in id (sign-out, renewal and tickets need it).
pub async fn caller(req: &Request, env: &Env) -> ApiResult<Caller> {
    let raw = bearer(req)?;
    let claims = token::verify_claims(&raw, &config::auth_secret(env), now_ms())?;
    // Every token is of a sign-in that sign-out can end; one without is not accepted.
    let sid = claims
        .sid
        .as_ref()
        .ok_or(EdgeError::SignIn(SignInError::Unknown))?;
    let stub = user_index(env, &claims.sub)?;
    let body = encode(&SignInRef { sid: sid.clone() })?;
    ask::<SignIn>(&stub, UserIndexRoute::SignInCheck, Some(body)).await?;
    Ok(Caller {
        identity: claims.identity(),
        sid: claims.sid,
    })
}

/// A session's WebSocket: opened with a one-time `?ticket=` (POST /auth/ticket) for this
/// session, never a long-lived token in the URL.
pub async fn authenticate_socket(req: &Request, env: &Env, session: &str) -> ApiResult<Identity> {
    let url = req.url().map_err(|_| EdgeError::Unauthenticated)?;
    let raw = url
        .query_pairs()
        .find(|(k, _)| k == "ticket")
        .map(|(_, v)| v.into_owned())
        .ok_or(EdgeError::Unauthenticated)?;
    let ticket = Ticket::open(&raw, session, &config::auth_secret(env), now_ms())
        .map_err(EdgeError::Ticket)?;
    let stub = user_index(env, &ticket.sub)?;
    let body = encode(&RedeemTicket {
        sid: ticket.sid.clone(),
        nonce: ticket.nonce.clone(),
        exp: ticket.exp,
    })?;
    ask::<OkAnswer>(&stub, UserIndexRoute::TicketRedeem, Some(body)).await?;
    Ok(ticket.identity())
}

/// The answer of `POST /auth/ticket`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TicketAnswer {
    pub ticket: String,
    pub expires_at: u64,
}

/// `POST /auth/ticket`: a one-time ticket that opens `session`'s socket within a minute.
pub async fn ticket(req: &mut Request, env: &Env) -> ApiResult<TicketAnswer> {
    let caller = caller(req, env).await?;
    let ask: TicketAsk = read_body(req).await?;
    let ticket = Ticket::issue(
        &caller.identity,
        caller.sid,
        &ask.session,
        random_token(18),
        now_ms(),
    );
    Ok(TicketAnswer {
        ticket: ticket.seal(&config::auth_secret(env)).map_err(seal_error)?,
        expires_at: ticket.exp,
    })
}

/// The body of `POST /auth/ticket`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketAsk {
    pub session: String,
}

fn seal_error(e: SealError) -> ApiError {
    match e {
        SealError::NoSecret => TokenError::NoSecret.into(),
        other => ApiError::internal(other),
    }
}

/// A signed-in answer: the token, who it is for, and when it must be renewed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignedIn {
    pub expires_at: u64,
    pub token: String,
    pub user: Identity,
}

/// Issues a token of `sign_in` for `who`.
fn issue(env: &Env, who: &Identity, sign_in: &SignIn) -> ApiResult<SignedIn> {
    let now = now_ms();
    let claims = Claims {
        sub: who.user.clone(),
        name: who.name.clone(),
        email: who.email.clone(),
        iat: now,
        exp: sign_in.token_expiry(now, config::token_ttl_ms(env)),
        sid: Some(sign_in.sid.clone()),
    };
    Ok(SignedIn {
        expires_at: claims.exp,
        token: token::issue(&claims, &config::auth_secret(env))?,
        user: who.clone(),
    })
}

/// Starts a sign-in for `who` at their index and issues its first token.
pub async fn sign_in(env: &Env, who: &Identity, via: &str) -> ApiResult<SignedIn> {
    if config::auth_secret(env).is_empty() {
        return Err(TokenError::NoSecret.into());
    }
    let stub = user_index(env, &who.user)?;
    let body = encode(&BeginSignIn { via: via.into() })?;
    let sign_in: SignIn = ask(&stub, UserIndexRoute::SignInBegin, Some(body)).await?;
    issue(env, who, &sign_in)
}

/// `POST /auth/renew`: a fresh token of the caller's sign-in. The token may have expired
/// (a laptop that slept): its signature must hold and its sign-in must still be good, which
/// the person's index decides (sign-out and the sign-in's 30 days end renewal too).
pub async fn renew(req: &Request, env: &Env) -> ApiResult<SignedIn> {
    let raw = bearer(req)?;
    // Any age: the sign-in, not the token's expiry, bounds renewal.
    let claims = token::verify_claims(&raw, &config::auth_secret(env), 0)?;
    let sid = claims
        .sid
        .clone()
        .ok_or(EdgeError::SignIn(SignInError::Unknown))?;
    let stub = user_index(env, &claims.sub)?;
    let body = encode(&SignInRef { sid })?;
    let sign_in: SignIn = ask(&stub, UserIndexRoute::SignInCheck, Some(body)).await?;
    issue(env, &claims.identity(), &sign_in)
}

/// `POST /auth/logout`: ends the caller's sign-in, so every token and ticket of it is refused.
pub async fn logout(req: &Request, env: &Env) -> ApiResult<OkAnswer> {
    let caller = caller(req, env).await?;
    if let Some(sid) = caller.sid {
        let stub = user_index(env, &caller.identity.user)?;
        let body = encode(&SignInRef { sid })?;
        ask::<OkAnswer>(&stub, UserIndexRoute::SignInEnd, Some(body)).await?;
    }
    Ok(OkAnswer::yes())
}

/// Whether the request came to a loopback address (a local run).
pub fn is_loopback(req: &Request) -> bool {
    req.url()
        .ok()
        .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
        .is_some_and(|h| h == "127.0.0.1" || h == "localhost" || h == "[::1]" || h == "::1")
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

/// `POST /auth/dev`: signs a person in by name. Only when DEV_AUTH=1, and only on a loopback
/// address (a deployment that sets DEV_AUTH by mistake still refuses it).
pub async fn dev_sign_in(req: &Request, body: DevSignIn, env: &Env) -> ApiResult<DevSignedIn> {
    if !is_loopback(req) {
        return Err(EdgeError::DevSignInLocalOnly.into());
    }
    if !signin::valid_user(&body.user) {
        return Err(EdgeError::InvalidUser.into());
    }
    let name = body.name.unwrap_or_else(|| body.user.clone());
    if name.is_empty() || name.len() > 100 {
        return Err(EdgeError::InvalidInput("name must be 1-100 bytes").into());
    }
    let email = body
        .email
        .unwrap_or_else(|| format!("{}@users.nightshift.dev", body.user));
    if email.len() > 254 || !email.contains('@') || email.chars().any(char::is_control) {
        return Err(
            EdgeError::InvalidInput("email must be an address of at most 254 bytes").into(),
        );
    }
    let who = Identity {
        user: body.user,
        name,
        email: Some(email),
    };
    let signed = sign_in(env, &who, "dev").await?;
    Ok(DevSignedIn {
        dev_only: true,
        expires_at: signed.expires_at,
        token: signed.token,
        user: signed.user,
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
