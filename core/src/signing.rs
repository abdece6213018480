//! Provider-contract request signing: HMAC-SHA256 over method, path, timestamp, nonce and body hash, with a short validity window and a replay cache.

use std::collections::{HashMap, VecDeque};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

/// Header carrying the signing time (ms since the epoch).
pub const TIMESTAMP_HEADER: &str = "x-nightshift-timestamp";
/// Header carrying a random per-request nonce (16–64 characters of `[A-Za-z0-9_-]`).
pub const NONCE_HEADER: &str = "x-nightshift-nonce";
/// Header carrying `v1=<hex hmac>`.
pub const SIGNATURE_HEADER: &str = "x-nightshift-signature";
/// Requests older or newer than this are refused; a nonce is remembered this long past its timestamp.
pub const WINDOW_MS: u64 = 60 * 1000;
/// The replay cache holds at most this many nonces; beyond it requests are refused until the window moves on.
pub const MAX_NONCES: usize = 100_000;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignError {
    #[error("the request is not signed: send {TIMESTAMP_HEADER}, {NONCE_HEADER} (16-64 characters of A-Z a-z 0-9 _ -) and {SIGNATURE_HEADER}")]
    Missing,
    #[error("the request's timestamp is outside the {WINDOW_MS} ms window; check the clocks")]
    Stale,
    #[error("the request's signature does not match; check PROVIDER_SECRET on both sides")]
    Bad,
    #[error("this signed request was already received; sign every request with a new nonce")]
    Replayed,
    #[error("too many signed requests within the signing window; retry shortly")]
    Flooded,
    #[error("no provider secret is configured")]
    NoSecret,
}

impl SignError {
    pub fn code(&self) -> &'static str {
        match self {
            SignError::Missing => "unsigned",
            SignError::Stale => "stale_signature",
            SignError::Bad => "bad_signature",
            SignError::Replayed => "replayed_request",
            SignError::Flooded => "capacity",
            SignError::NoSecret => "provider_not_configured",
        }
    }

    /// The HTTP status a provider answers with.
    pub fn status(&self) -> u16 {
        match self {
            SignError::Flooded => 503,
            _ => 401,
        }
    }
}

/// True for a well-formed nonce: 16 to 64 characters of `[A-Za-z0-9_-]`.
pub fn valid_nonce(nonce: &str) -> bool {
    (16..=64).contains(&nonce.len())
        && nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Bytes as lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex (either case) as bytes; `None` for an odd length or a character that is not a hex digit
/// (`from_str_radix` alone would take a sign).
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| {
            text.get(at..at + 2)
                .filter(|pair| pair.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect()
}

/// SHA-256 of `data` as lowercase hex.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The signed string: `v1\nMETHOD\npath\nts\nnonce\nsha256(body)`.
pub fn canonical(method: &str, path: &str, ts: u64, nonce: &str, body: &[u8]) -> String {
    format!(
        "v1\n{}\n{}\n{}\n{}\n{}",
        method.to_ascii_uppercase(),
        path,
        ts,
        nonce,
        sha256_hex(body)
    )
}

fn mac(
    secret: &[u8],
    method: &str,
    path: &str,
    ts: u64,
    nonce: &str,
    body: &[u8],
) -> Result<HmacSha256, SignError> {
    if secret.is_empty() {
        return Err(SignError::NoSecret);
    }
    let mut m = HmacSha256::new_from_slice(secret).map_err(|_| SignError::NoSecret)?;
    m.update(canonical(method, path, ts, nonce, body).as_bytes());
    Ok(m)
}

/// The value of the signature header for a request; `nonce` must be new for every request.
pub fn sign(
    secret: &[u8],
    method: &str,
    path: &str,
    ts: u64,
    nonce: &str,
    body: &[u8],
) -> Result<String, SignError> {
    if !valid_nonce(nonce) {
        return Err(SignError::Missing);
    }
    let m = mac(secret, method, path, ts, nonce, body)?;
    Ok(format!("v1={}", hex(&m.finalize().into_bytes())))
}

/// The headers of one signed request, as they arrived.
#[derive(Debug, Clone, Copy, Default)]
pub struct Signed<'a> {
    pub timestamp: Option<&'a str>,
    pub nonce: Option<&'a str>,
    pub signature: Option<&'a str>,
}

/// Checks a signed request in constant time; `path` includes the query string. Returns the
/// request's timestamp (for the replay cache). This does not check for replays: see [`NonceCache`].
pub fn verify(
    secret: &[u8],
    method: &str,
    path: &str,
    headers: Signed<'_>,
    body: &[u8],
    now: u64,
) -> Result<u64, SignError> {
    let (Some(ts), Some(nonce), Some(sig)) = (headers.timestamp, headers.nonce, headers.signature)
    else {
        return Err(SignError::Missing);
    };
    let nonce = nonce.trim();
    if !valid_nonce(nonce) {
        return Err(SignError::Missing);
    }
    let ts: u64 = ts.trim().parse().map_err(|_| SignError::Missing)?;
    if ts.abs_diff(now) > WINDOW_MS {
        return Err(SignError::Stale);
    }
    let raw = sig
        .trim()
        .strip_prefix("v1=")
        .and_then(unhex)
        .ok_or(SignError::Bad)?;
    mac(secret, method, path, ts, nonce, body)?
        .verify_slice(&raw)
        .map_err(|_| SignError::Bad)?;
    Ok(ts)
}

/// The nonces of verified requests, each kept until its timestamp leaves the window; bounded
/// by [`MAX_NONCES`] and pruned on every insert.
#[derive(Debug, Default)]
pub struct NonceCache {
    seen: HashMap<String, u64>,
    /// (forget at, nonce), in insertion order; forget times are not sorted, so pruning scans the front while it can.
    order: VecDeque<(u64, String)>,
}

impl NonceCache {
    pub fn new() -> NonceCache {
        NonceCache::default()
    }

    /// Remembers `nonce` of a verified request signed at `ts`; refuses one seen before.
    pub fn remember(&mut self, nonce: &str, ts: u64, now: u64) -> Result<(), SignError> {
        self.prune(now);
        if self.seen.contains_key(nonce) {
            return Err(SignError::Replayed);
        }
        if self.seen.len() >= MAX_NONCES {
            return Err(SignError::Flooded);
        }
        let forget_at = ts.saturating_add(WINDOW_MS);
        self.seen.insert(nonce.to_string(), forget_at);
        self.order.push_back((forget_at, nonce.to_string()));
        Ok(())
    }

    /// How many nonces are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn prune(&mut self, now: u64) {
        // Forget times are ts + window with ts within the window of arrival, so they are
        // nearly ordered; a late one behind an early one goes in a later prune (and a request
        // carrying it is refused as stale anyway).
        while let Some((at, _)) = self.order.front() {
            if *at >= now {
                break;
            }
            if let Some((_, n)) = self.order.pop_front() {
                self.seen.remove(&n);
            }
        }
        if self.seen.len() >= MAX_NONCES {
            self.seen.retain(|_, at| *at >= now);
            self.order.retain(|(at, _)| *at >= now);
        }
    }
}

/// Whether two secrets are equal, compared in constant time (the supervisor's API secret, a
/// sandbox's model token).
pub fn secrets_match(presented: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    presented.as_bytes().ct_eq(expected.as_bytes()).into()
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

    const N: &str = "nonce-0123456789abcdef";

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(secrets_match("s3cret-value", "s3cret-value"));
        assert!(!secrets_match("s3cret-value", "s3cret-valuf"));
        assert!(!secrets_match("s3cret", "s3cret-value"));
        assert!(!secrets_match("", "s3cret"));
    }

    #[test]
    fn refusals_have_stable_codes_and_statuses() {
        assert_eq!(WINDOW_MS, 60_000);
        for (error, code, status) in [
            (SignError::Missing, "unsigned", 401),
            (SignError::Stale, "stale_signature", 401),
            (SignError::Bad, "bad_signature", 401),
            (SignError::Replayed, "replayed_request", 401),
            (SignError::Flooded, "capacity", 503),
            (SignError::NoSecret, "provider_not_configured", 401),
        ] {
            assert_eq!((error.code(), error.status()), (code, status), "{error}");
        }
    }

    #[test]
    fn the_window_is_inclusive_at_its_edge() {
        let s = sign(b"k", "GET", "/v1/health", 1000, N, b"").expect("sign");
        let at = |now: u64| verify(b"k", "GET", "/v1/health", hdr("1000", N, &s), b"", now);
        assert_eq!(at(1000 + WINDOW_MS), Ok(1000));
        assert_eq!(at(1000 + WINDOW_MS + 1), Err(SignError::Stale));
    }

    #[test]
    fn a_nonce_is_kept_through_its_window_and_a_full_cache_refuses() {
        let mut cache = NonceCache::new();
        assert!(cache.is_empty());
        assert_eq!(cache.remember(N, 0, 0), Ok(()));
        assert!(!cache.is_empty());
        // Still remembered at the window's last millisecond, forgotten after it.
        assert_eq!(cache.remember(N, 0, WINDOW_MS), Err(SignError::Replayed));
        assert_eq!(cache.remember(N, WINDOW_MS + 1, WINDOW_MS + 1), Ok(()));
        // Full: refused while every remembered nonce is inside its window (its last
        // millisecond included), accepted once they have all left it.
        let mut full = NonceCache::new();
        for i in 0..MAX_NONCES {
            assert_eq!(full.remember(&format!("n{i}"), 0, 0), Ok(()));
        }
        assert_eq!(full.remember("one-more", 0, 0), Err(SignError::Flooded));
        assert_eq!(
            full.remember("one-more", 0, WINDOW_MS),
            Err(SignError::Flooded)
        );
        assert_eq!(full.remember("one-more", 0, WINDOW_MS + 1), Ok(()));
        assert_eq!(full.len(), 1);
    }

    fn hdr<'a>(ts: &'a str, nonce: &'a str, sig: &'a str) -> Signed<'a> {
        Signed {
            timestamp: Some(ts),
            nonce: Some(nonce),
            signature: Some(sig),
        }
    }

    #[test]
    fn signed_requests_verify_and_tampering_fails() {
        let s = sign(b"k", "post", "/v1/sandboxes?x=1", 1000, N, b"{}").expect("sign");
        let ok = verify(
            b"k",
            "POST",
            "/v1/sandboxes?x=1",
            hdr("1000", N, &s),
            b"{}",
            1500,
        );
        assert_eq!(ok, Ok(1000));
        let v = |m: &str, p: &str, ts: &str, nonce: &str, body: &[u8], now: u64, key: &[u8]| {
            verify(key, m, p, hdr(ts, nonce, &s), body, now)
        };
        let path = "/v1/sandboxes?x=1";
        assert_eq!(
            v("GET", path, "1000", N, b"{}", 1000, b"k"),
            Err(SignError::Bad)
        );
        assert_eq!(
            v("POST", "/v1/sandboxes?x=2", "1000", N, b"{}", 1000, b"k"),
            Err(SignError::Bad)
        );
        assert_eq!(
            v("POST", path, "1001", N, b"{}", 1000, b"k"),
            Err(SignError::Bad)
        );
        assert_eq!(
            v(
                "POST",
                path,
                "1000",
                "nonce-0123456789abcdeX",
                b"{}",
                1000,
                b"k"
            ),
            Err(SignError::Bad),
            "the nonce is signed"
        );
        assert_eq!(
            v("POST", path, "1000", N, b"{ }", 1000, b"k"),
            Err(SignError::Bad)
        );
        assert_eq!(
            v("POST", path, "1000", N, b"{}", 1000, b"j"),
            Err(SignError::Bad)
        );
        assert_eq!(
            v("POST", path, "1000", N, b"{}", 1000 + WINDOW_MS + 1, b"k"),
            Err(SignError::Stale)
        );
        for bad in ["short", "has space 0123456789", &"x".repeat(65)] {
            assert_eq!(
                v("POST", path, "1000", bad, b"{}", 1000, b"k"),
                Err(SignError::Missing)
            );
        }
        let no_nonce = Signed {
            timestamp: Some("1000"),
            nonce: None,
            signature: Some(&s),
        };
        assert_eq!(
            verify(b"k", "POST", path, no_nonce, b"{}", 1000),
            Err(SignError::Missing)
        );
        assert_eq!(
            verify(b"k", "POST", "/", Signed::default(), b"", 0),
            Err(SignError::Missing)
        );
        assert_eq!(
            verify(b"k", "POST", "/", hdr("0", N, "v1=zz"), b"", 0),
            Err(SignError::Bad)
        );
        assert_eq!(
            sign(b"k", "GET", "/", 0, "bad", b""),
            Err(SignError::Missing)
        );
        assert_eq!(SignError::Replayed.code(), "replayed_request");
    }

    #[test]
    fn canonical_string_is_pinned() {
        assert_eq!(
            canonical("get", "/v1/health", 7, N, b""),
            format!("v1\nGET\n/v1/health\n7\n{N}\n{}", sha256_hex(b""))
        );
    }

    #[test]
    fn nonces_are_refused_twice_within_the_window_and_forgotten_after_it() {
        let mut c = NonceCache::new();
        assert_eq!(c.remember(N, 1000, 1000), Ok(()));
        assert_eq!(c.remember(N, 1000, 1500), Err(SignError::Replayed));
        assert_eq!(c.remember("another-nonce-000001", 1000, 1500), Ok(()));
        assert_eq!(c.len(), 2);
        // Past the window the request itself is stale; the cache forgets the nonce.
        assert_eq!(
            c.remember(
                "third-nonce-00000001",
                1000 + WINDOW_MS + 1,
                1000 + WINDOW_MS + 1
            ),
            Ok(())
        );
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut c = NonceCache::new();
        for i in 0..MAX_NONCES {
            assert_eq!(c.remember(&format!("n{i:020}"), 0, 0), Ok(()));
        }
        assert_eq!(
            c.remember("one-too-many-0000000", 0, 0),
            Err(SignError::Flooded)
        );
        assert_eq!(
            c.remember("one-too-many-0000000", WINDOW_MS + 1, WINDOW_MS + 1),
            Ok(())
        );
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn sandbox_tokens_match_only_their_hash() {
        let h = sha256_hex(b"sbx_abc");
        assert!(token_matches("sbx_abc", &h));
        assert!(!token_matches("sbx_abd", &h));
    }
}
