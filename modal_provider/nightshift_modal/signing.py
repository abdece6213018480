"""Provider-contract request signing, exactly as core/src/signing.rs: HMAC-SHA256 over method, path, timestamp and body hash."""

from __future__ import annotations

import hashlib
import hmac
import re

TIMESTAMP_HEADER = "x-nightshift-timestamp"
SIGNATURE_HEADER = "x-nightshift-signature"
WINDOW_MS = 5 * 60 * 1000

_U64_MAX = (1 << 64) - 1
# Rust's `u64::from_str` after `trim()`: an optional `+`, then ASCII digits.
_TIMESTAMP = re.compile(r"\+?[0-9]+")
# Rust's `u8::from_str_radix(pair, 16)`: two hex digits, or `+` and one.
_HEX_PAIR = re.compile(r"\+?[0-9a-fA-F]+")


class SignError(Exception):
    """A refused signature; `code` is the contract's stable error code (HTTP 401)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _missing() -> SignError:
    return SignError(
        "unsigned",
        f"the request is not signed: send {TIMESTAMP_HEADER} and {SIGNATURE_HEADER}",
    )


def sha256_hex(data: bytes) -> str:
    """SHA-256 of `data` as lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def canonical(method: str, path: str, ts: int, body: bytes) -> str:
    """The signed string: version, method, path with query, timestamp and body hash, one per line."""
    return f"v1\n{method.upper()}\n{path}\n{ts}\n{sha256_hex(body)}"


def _mac(secret: bytes, method: str, path: str, ts: int, body: bytes) -> bytes:
    if not secret:
        raise SignError("provider_not_configured", "no provider secret is configured")
    return hmac.new(secret, canonical(method, path, ts, body).encode(), hashlib.sha256).digest()


def sign(secret: bytes, method: str, path: str, ts: int, body: bytes) -> str:
    """The value of the signature header for a request (`path` includes the query string)."""
    return "v1=" + _mac(secret, method, path, ts, body).hex()


def _unhex(s: str) -> bytes | None:
    if len(s) % 2 != 0 or not s.isascii():
        return None
    pairs = [s[i : i + 2] for i in range(0, len(s), 2)]
    if not all(_HEX_PAIR.fullmatch(p) for p in pairs):
        return None
    return bytes(int(p, 16) for p in pairs)


def verify(
    secret: bytes,
    method: str,
    path: str,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    now: int,
) -> None:
    """Checks a signed request in constant time; raises SignError when it is refused."""
    if timestamp is None or signature is None:
        raise _missing()
    ts_text = timestamp.strip()
    if not _TIMESTAMP.fullmatch(ts_text) or int(ts_text) > _U64_MAX:
        raise _missing()
    ts = int(ts_text)
    if abs(ts - now) > WINDOW_MS:
        raise SignError(
            "stale_signature",
            f"the request's timestamp is outside the {WINDOW_MS} ms window; check the clocks",
        )
    sig = signature.strip()
    raw = _unhex(sig[3:]) if sig.startswith("v1=") else None
    if raw is None or not hmac.compare_digest(raw, _mac(secret, method, path, ts, body)):
        raise SignError(
            "bad_signature",
            "the request's signature does not match; check PROVIDER_SECRET on both sides",
        )
