"""Provider-contract request signing, exactly as core/src/signing.rs: HMAC-SHA256 over method, path, timestamp, nonce and body hash, plus the replay cache."""

from __future__ import annotations

import collections
import hashlib
import hmac
import re
import secrets

TIMESTAMP_HEADER = "x-nightshift-timestamp"
NONCE_HEADER = "x-nightshift-nonce"
SIGNATURE_HEADER = "x-nightshift-signature"
WINDOW_MS = 60 * 1000
MAX_NONCES = 100_000

_U64_MAX = (1 << 64) - 1
# Rust's `u64::from_str` after `trim()`: an optional `+`, then ASCII digits.
_TIMESTAMP = re.compile(r"\+?[0-9]+")
# Rust's `u8::from_str_radix(pair, 16)`: two hex digits, or `+` and one.
_HEX_PAIR = re.compile(r"\+?[0-9a-fA-F]+")
_NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")


class SignError(Exception):
    """A refused signature; `code` is the contract's stable error code (HTTP 401)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _missing() -> SignError:
    return SignError(
        "unsigned",
        f"the request is not signed: send {TIMESTAMP_HEADER}, {NONCE_HEADER} (16-64 characters of A-Z a-z 0-9 _ -)"
        f" and {SIGNATURE_HEADER}",
    )


def valid_nonce(nonce: str) -> bool:
    """16 to 64 characters of `[A-Za-z0-9_-]`."""
    return _NONCE.fullmatch(nonce) is not None


def new_nonce() -> str:
    """A fresh random nonce for one request."""
    return secrets.token_hex(16)


def sha256_hex(data: bytes) -> str:
    """SHA-256 of `data` as lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def canonical(method: str, path: str, ts: int, nonce: str, body: bytes) -> str:
    """The signed string: version, method, path with query, timestamp, nonce and body hash, one per line."""
    return f"v1\n{method.upper()}\n{path}\n{ts}\n{nonce}\n{sha256_hex(body)}"


def _mac(secret: bytes, method: str, path: str, ts: int, nonce: str, body: bytes) -> bytes:
    if not secret:
        raise SignError("provider_not_configured", "no provider secret is configured")
    return hmac.new(secret, canonical(method, path, ts, nonce, body).encode(), hashlib.sha256).digest()


def sign(secret: bytes, method: str, path: str, ts: int, nonce: str, body: bytes) -> str:
    """The value of the signature header for a request (`path` includes the query string; a new `nonce` each time)."""
    if not valid_nonce(nonce):
        raise _missing()
    return "v1=" + _mac(secret, method, path, ts, nonce, body).hex()


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
    nonce: str | None,
    signature: str | None,
    body: bytes,
    now: int,
) -> int:
    """Checks a signed request in constant time and returns its timestamp; raises SignError when it is refused.

    Replays are not checked here: remember the nonce of a verified request in a NonceCache."""
    if timestamp is None or signature is None or nonce is None:
        raise _missing()
    nonce = nonce.strip()
    if not valid_nonce(nonce):
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
    if raw is None or not hmac.compare_digest(raw, _mac(secret, method, path, ts, nonce, body)):
        raise SignError(
            "bad_signature",
            "the request's signature does not match; check PROVIDER_SECRET on both sides",
        )
    return ts


class NonceCache:
    """Nonces of verified requests, each kept until its timestamp leaves the window; bounded by MAX_NONCES."""

    def __init__(self) -> None:
        self._seen: dict[str, int] = {}
        self._order: collections.deque[tuple[int, str]] = collections.deque()

    def __len__(self) -> int:
        return len(self._seen)

    def remember(self, nonce: str, ts: int, now: int) -> None:
        """Records `nonce` of a request signed at `ts`; raises SignError for one seen before."""
        self._prune(now)
        if nonce in self._seen:
            raise SignError(
                "replayed_request",
                "this signed request was already received; sign every request with a new nonce",
            )
        if len(self._seen) >= MAX_NONCES:
            raise SignError("capacity", "too many signed requests within the signing window; retry shortly")
        forget_at = ts + WINDOW_MS
        self._seen[nonce] = forget_at
        self._order.append((forget_at, nonce))

    def _prune(self, now: int) -> None:
        while self._order and self._order[0][0] < now:
            _, n = self._order.popleft()
            self._seen.pop(n, None)
        if len(self._seen) >= MAX_NONCES:
            self._seen = {n: at for n, at in self._seen.items() if at >= now}
            self._order = collections.deque(x for x in self._order if x[0] >= now)
