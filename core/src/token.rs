//! Signed bearer tokens (HMAC-SHA256) for people: issue and verify, constant-time.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use thiserror::Error;

use crate::ids::Identity;

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "ns1";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Issued at, ms since the epoch.
    pub iat: u64,
    /// Expires at, ms since the epoch.
    pub exp: u64,
    /// The sign-in this token belongs to (`signin::SignIn`): sign-out ends every token of it.
    /// Tokens issued before sign-ins existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
}

impl Claims {
    pub fn identity(&self) -> Identity {
        Identity {
            user: self.sub.clone(),
            name: self.name.clone(),
            email: self.email.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TokenError {
    #[error("the token is malformed; sign in again")]
    Malformed,
    #[error("the token's signature is invalid; sign in again")]
    BadSignature,
    #[error("the token expired; sign in again")]
    Expired,
    #[error("the server has no signing secret configured (set AUTH_SECRET)")]
    NoSecret,
}

impl TokenError {
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Malformed => "token_malformed",
            TokenError::BadSignature => "token_invalid",
            TokenError::Expired => "token_expired",
            TokenError::NoSecret => "auth_not_configured",
        }
    }
}

fn mac(secret: &[u8]) -> Result<HmacSha256, TokenError> {
    if secret.is_empty() {
        return Err(TokenError::NoSecret);
    }
    HmacSha256::new_from_slice(secret).map_err(|_| TokenError::NoSecret)
}

/// Signs claims into a token string.
pub fn issue(claims: &Claims, secret: &[u8]) -> Result<String, TokenError> {
    let body = serde_json::to_vec(claims).map_err(|_| TokenError::Malformed)?;
    let body = URL_SAFE_NO_PAD.encode(body);
    let mut m = mac(secret)?;
    m.update(PREFIX.as_bytes());
    m.update(b".");
    m.update(body.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
    Ok(format!("{PREFIX}.{body}.{sig}"))
}

/// Checks signature (constant time) and expiry; returns the identity.
pub fn verify(token: &str, secret: &[u8], now_ms: u64) -> Result<Identity, TokenError> {
    verify_claims(token, secret, now_ms).map(|claims| claims.identity())
}

/// Checks signature (constant time) and expiry; returns the claims (with the sign-in id).
pub fn verify_claims(token: &str, secret: &[u8], now_ms: u64) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(prefix), Some(body), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    if prefix != PREFIX {
        return Err(TokenError::Malformed);
    }
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| TokenError::Malformed)?;
    let mut m = mac(secret)?;
    m.update(PREFIX.as_bytes());
    m.update(b".");
    m.update(body.as_bytes());
    m.verify_slice(&sig).map_err(|_| TokenError::BadSignature)?;
    let raw = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| TokenError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&raw).map_err(|_| TokenError::Malformed)?;
    if claims.exp <= now_ms {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            sub: "ada".into(),
            name: "Ada".into(),
            email: Some("ada@example.com".into()),
            iat: 0,
            exp,
            sid: None,
        }
    }

    #[test]
    fn refusals_have_stable_codes() {
        for (error, code) in [
            (TokenError::Malformed, "token_malformed"),
            (TokenError::BadSignature, "token_invalid"),
            (TokenError::Expired, "token_expired"),
            (TokenError::NoSecret, "auth_not_configured"),
        ] {
            assert_eq!(error.code(), code);
        }
    }

    #[test]
    fn round_trip() {
        let t = issue(&claims(100), b"k").expect("issue");
        let id = verify(&t, b"k", 50).expect("verify");
        assert_eq!(id.user, "ada");
        assert_eq!(id.email.as_deref(), Some("ada@example.com"));
    }

    #[test]
    fn refuses_expired_forged_and_malformed() {
        let t = issue(&claims(100), b"k").expect("issue");
        assert_eq!(verify(&t, b"k", 100), Err(TokenError::Expired));
        assert_eq!(verify(&t, b"other", 50), Err(TokenError::BadSignature));
        // Swap in a different body under the old signature.
        let other = issue(
            &Claims {
                sub: "eve".into(),
                ..claims(100)
            },
            b"k",
        )
        .expect("issue");
        let forged = format!(
            "{}.{}.{}",
            PREFIX,
            other.split('.').nth(1).unwrap_or(""),
            t.split('.').nth(2).unwrap_or("")
        );
        assert_eq!(verify(&forged, b"k", 50), Err(TokenError::BadSignature));
        assert_eq!(verify("garbage", b"k", 50), Err(TokenError::Malformed));
        assert_eq!(verify("ns1.a.b.c", b"k", 50), Err(TokenError::Malformed));
        assert_eq!(verify(&t, b"", 50), Err(TokenError::NoSecret));
    }
}
