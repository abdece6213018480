//! Provider-contract request signing: HMAC-SHA256 over method, path, timestamp and body hash, with a short validity window.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

/// Header carrying the signing time (ms since the epoch).
pub const TIMESTAMP_HEADER: &str = "x-nightshift-timestamp";
/// Header carrying `v1=<hex hmac>`.
pub const SIGNATURE_HEADER: &str = "x-nightshift-signature";
/// Requests older or newer than this are refused.
pub const WINDOW_MS: u64 = 5 * 60 * 1000;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignError {
    #[error("the request is not signed: send {TIMESTAMP_HEADER} and {SIGNATURE_HEADER}")]
    Missing,
    #[error("the request's timestamp is outside the {WINDOW_MS} ms window; check the clocks")]
    Stale,
    #[error("the request's signature does not match; check PROVIDER_SECRET on both sides")]
    Bad,
    #[error("no provider secret is configured")]
    NoSecret,
}

impl SignError {
    pub fn code(&self) -> &'static str {
        match self {
            SignError::Missing => "unsigned",
            SignError::Stale => "stale_signature",
            SignError::Bad => "bad_signature",
            SignError::NoSecret => "provider_not_configured",
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// SHA-256 of `data` as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn mac(
    secret: &[u8],
    method: &str,
    path: &str,
    ts: u64,
    body: &[u8],
) -> Result<HmacSha256, SignError> {
    if secret.is_empty() {
        return Err(SignError::NoSecret);
    }
    let mut m = HmacSha256::new_from_slice(secret).map_err(|_| SignError::NoSecret)?;
    let canonical = format!(
        "v1\n{}\n{}\n{}\n{}",
        method.to_ascii_uppercase(),
        path,
        ts,
        sha256_hex(body)
    );
    m.update(canonical.as_bytes());
    Ok(m)
}

/// The value of the signature header for a request.
pub fn sign(
    secret: &[u8],
    method: &str,
    path: &str,
    ts: u64,
    body: &[u8],
) -> Result<String, SignError> {
    let m = mac(secret, method, path, ts, body)?;
    Ok(format!("v1={}", hex(&m.finalize().into_bytes())))
}

/// Checks a signed request in constant time; `path` includes the query string.
pub fn verify(
    secret: &[u8],
    method: &str,
    path: &str,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: u64,
) -> Result<(), SignError> {
    let (Some(ts), Some(sig)) = (timestamp, signature) else {
        return Err(SignError::Missing);
    };
    let ts: u64 = ts.trim().parse().map_err(|_| SignError::Missing)?;
    if ts.abs_diff(now) > WINDOW_MS {
        return Err(SignError::Stale);
    }
    let raw = sig
        .trim()
        .strip_prefix("v1=")
        .and_then(unhex)
        .ok_or(SignError::Bad)?;
    mac(secret, method, path, ts, body)?
        .verify_slice(&raw)
        .map_err(|_| SignError::Bad)
}

/// A per-sandbox token is random; only its hash is stored. True when `token` hashes to `hash`.
pub fn token_matches(token: &str, hash: &str) -> bool {
    use subtle::ConstantTimeEq;
    sha256_hex(token.as_bytes())
        .as_bytes()
        .ct_eq(hash.as_bytes())
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_requests_verify_and_tampering_fails() {
        let s = sign(b"k", "post", "/v1/sandboxes?x=1", 1000, b"{}").expect("sign");
        let ok = verify(
            b"k",
            "POST",
            "/v1/sandboxes?x=1",
            Some("1000"),
            Some(&s),
            b"{}",
            1500,
        );
        assert_eq!(ok, Ok(()));
        let v = |m: &str, p: &str, ts: &str, body: &[u8], now: u64, key: &[u8]| {
            verify(key, m, p, Some(ts), Some(&s), body, now)
        };
        assert_eq!(
            v("GET", "/v1/sandboxes?x=1", "1000", b"{}", 1000, b"k"),
            Err(SignError::Bad)
        );
        assert_eq!(
            v("POST", "/v1/sandboxes?x=2", "1000", b"{}", 1000, b"k"),
            Err(SignError::Bad)
        );
        assert_eq!(
            v("POST", "/v1/sandboxes?x=1", "1001", b"{}", 1000, b"k"),
            Err(SignError::Bad)
        );
        assert_eq!(
            v("POST", "/v1/sandboxes?x=1", "1000", b"{ }", 1000, b"k"),
            Err(SignError::Bad)
        );
        assert_eq!(
            v("POST", "/v1/sandboxes?x=1", "1000", b"{}", 1000, b"j"),
            Err(SignError::Bad)
        );
        assert_eq!(
            v(
                "POST",
                "/v1/sandboxes?x=1",
                "1000",
                b"{}",
                1000 + WINDOW_MS + 1,
                b"k"
            ),
            Err(SignError::Stale)
        );
        assert_eq!(
            verify(b"k", "POST", "/", None, Some(&s), b"", 0),
            Err(SignError::Missing)
        );
        assert_eq!(
            verify(b"k", "POST", "/", Some("0"), Some("v1=zz"), b"", 0),
            Err(SignError::Bad)
        );
    }

    #[test]
    fn sandbox_tokens_match_only_their_hash() {
        let h = sha256_hex(b"sbx_abc");
        assert!(token_matches("sbx_abc", &h));
        assert!(!token_matches("sbx_abd", &h));
    }
}
