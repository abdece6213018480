"""Secrets at rest in the provider's state (the modal.Dict): sealed with a key derived from PROVIDER_SECRET, so the
Dict alone reveals no sandbox token, and hashes for what only needs comparing (the per-sandbox model token).

The cipher is encrypt-then-MAC built from HMAC-SHA256 only (the standard library): a random 16-byte nonce, a
keystream of HMAC(enc_key, nonce || counter) blocks XORed with the plaintext, and a tag HMAC(mac_key, context ||
nonce || ciphertext) checked in constant time. `context` binds a sealed value to its record (a sealed token moved
to another sandbox's record does not open)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from typing import Any

_NONCE = 16
_TAG = 32
VERSION = "s1"


class SealError(Exception):
    """A sealed value that does not open (wrong key, wrong record, or altered)."""


def derive_key(provider_secret: bytes) -> bytes:
    """The state key for `provider_secret` (distinct from the request-signing use of the same secret)."""
    if not provider_secret:
        raise ValueError("PROVIDER_SECRET is empty")
    return hmac.new(provider_secret, b"nightshift modal provider state key v1", hashlib.sha256).digest()


def _subkeys(key: bytes) -> tuple[bytes, bytes]:
    if len(key) < 16:
        raise SealError("no state key is configured (Config.state_key); secrets cannot be kept")
    return (
        hmac.new(key, b"enc", hashlib.sha256).digest(),
        hmac.new(key, b"mac", hashlib.sha256).digest(),
    )


def _keystream(enc: bytes, nonce: bytes, n: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hmac.new(enc, nonce + counter.to_bytes(8, "big"), hashlib.sha256).digest()
        counter += 1
    return bytes(out[:n])


def seal(key: bytes, plaintext: bytes, context: str) -> str:
    """`plaintext` encrypted and authenticated for `context`, as text."""
    enc, mac = _subkeys(key)
    nonce = secrets.token_bytes(_NONCE)
    ct = bytes(a ^ b for a, b in zip(plaintext, _keystream(enc, nonce, len(plaintext)), strict=True))
    tag = hmac.new(mac, context.encode() + b"\0" + nonce + ct, hashlib.sha256).digest()
    return VERSION + ":" + base64.b64encode(nonce + ct + tag).decode()


def unseal(key: bytes, sealed: str, context: str) -> bytes:
    """The plaintext of `seal(key, plaintext, context)`; SealError otherwise."""
    enc, mac = _subkeys(key)
    version, _, data = sealed.partition(":")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise SealError("the sealed value is malformed") from None
    if version != VERSION or len(raw) < _NONCE + _TAG:
        raise SealError("the sealed value is malformed")
    nonce, ct, tag = raw[:_NONCE], raw[_NONCE:-_TAG], raw[-_TAG:]
    want = hmac.new(mac, context.encode() + b"\0" + nonce + ct, hashlib.sha256).digest()
    if not hmac.compare_digest(tag, want):
        raise SealError("the sealed value does not open with this key for this record")
    return bytes(a ^ b for a, b in zip(ct, _keystream(enc, nonce, len(ct)), strict=True))


def seal_json(key: bytes, value: Any, context: str) -> str:
    return seal(key, json.dumps(value, separators=(",", ":")).encode(), context)


def unseal_json(key: bytes, sealed: str, context: str) -> Any:
    return json.loads(unseal(key, sealed, context))


def token_hash(token: str) -> str:
    """SHA-256 of a random token, for comparing without keeping it."""
    return hashlib.sha256(token.encode()).hexdigest()


def same_token(token: str, stored_hash: str | None) -> bool:
    """Whether `token` hashes to `stored_hash` (constant-time)."""
    return stored_hash is not None and hmac.compare_digest(token_hash(token), stored_hash)
