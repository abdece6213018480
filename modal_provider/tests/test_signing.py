"""The Python verifier and signer against core/src/signing.rs: its unit test's cases, a fixed vector, the replay cache, and (when built) the Rust provider itself."""

from __future__ import annotations

import hashlib
import hmac
import http.client
import os
import shutil
import socket
import subprocess
import tempfile
import time
import unittest
from pathlib import Path

from nightshift_modal.signing import MAX_NONCES, WINDOW_MS, NonceCache, SignError, canonical, new_nonce, sign, verify

# sign(b"k", "post", "/v1/sandboxes?x=1", 1000, N, b"{}"), the inputs of the Rust unit test. The value was
# computed with hmac/hashlib alone and is pinned in core/src/signing.rs too (`the_fixed_vector`).
N = "nonce-0123456789abcdef"
VECTOR = "v1=d535fe4cc8d0d073610768bae32423ca9a8c5d810d8644b3d9f757ccb81a7ab0"
RUST_PROVIDER = Path(__file__).resolve().parents[2] / "target" / "debug" / "nightshift-provider"


def code(**kw: object) -> str:
    args = {
        "secret": b"k",
        "method": "POST",
        "path": "/v1/sandboxes?x=1",
        "timestamp": "1000",
        "nonce": N,
        "signature": VECTOR,
        "body": b"{}",
        "now": 1000,
    }
    args.update(kw)
    try:
        verify(**args)  # type: ignore[arg-type]
    except SignError as e:
        return e.code
    return "ok"


class SigningTest(unittest.TestCase):
    def test_the_fixed_vector(self) -> None:
        by_hand = hmac.new(
            b"k",
            b"v1\nPOST\n/v1/sandboxes?x=1\n1000\n" + N.encode() + b"\n" + hashlib.sha256(b"{}").hexdigest().encode(),
            hashlib.sha256,
        ).hexdigest()
        self.assertEqual(VECTOR, "v1=" + by_hand)
        self.assertEqual(sign(b"k", "post", "/v1/sandboxes?x=1", 1000, N, b"{}"), VECTOR)
        self.assertEqual(
            canonical("get", "/v1/health", 7, N, b""),
            f"v1\nGET\n/v1/health\n7\n{N}\n" + hashlib.sha256(b"").hexdigest(),
        )

    def test_the_rust_unit_test_cases(self) -> None:
        self.assertEqual(code(now=1500), "ok")
        self.assertEqual(code(method="GET"), "bad_signature")
        self.assertEqual(code(path="/v1/sandboxes?x=2"), "bad_signature")
        self.assertEqual(code(timestamp="1001"), "bad_signature")
        self.assertEqual(code(body=b"{ }"), "bad_signature")
        self.assertEqual(code(nonce="nonce-0123456789abcdeX"), "bad_signature")
        self.assertEqual(code(nonce=None), "unsigned")
        for bad in ("short", "has space 0123456789", "x" * 65):
            self.assertEqual(code(nonce=bad), "unsigned")
        self.assertEqual(code(secret=b"j"), "bad_signature")
        self.assertEqual(code(now=1000 + WINDOW_MS + 1), "stale_signature")
        self.assertEqual(code(path="/", timestamp=None, body=b"", now=0), "unsigned")
        self.assertEqual(code(path="/", timestamp="0", signature="v1=zz", body=b"", now=0), "bad_signature")

    def test_the_edges_parse_as_rust_does(self) -> None:
        self.assertEqual(code(signature=None), "unsigned")
        self.assertEqual(code(timestamp="abc"), "unsigned")
        self.assertEqual(code(timestamp="1_000"), "unsigned")
        self.assertEqual(code(timestamp="-1000"), "unsigned")
        self.assertEqual(code(timestamp=str(1 << 64)), "unsigned")
        self.assertEqual(code(timestamp=" +1000 "), "ok")
        self.assertEqual(code(now=1000 + WINDOW_MS), "ok")
        self.assertEqual(code(timestamp=str(2 * WINDOW_MS + 1), now=WINDOW_MS), "stale_signature")
        self.assertEqual(code(signature=" " + VECTOR.upper().replace("V1=", "v1=") + " "), "ok")
        self.assertEqual(code(signature=VECTOR[3:]), "bad_signature")
        self.assertEqual(code(signature=VECTOR[:-1]), "bad_signature")
        self.assertEqual(code(signature="v1="), "bad_signature")
        self.assertEqual(code(secret=b""), "provider_not_configured")

    def test_nonces_are_refused_twice_within_the_window_and_forgotten_after_it(self) -> None:
        c = NonceCache()
        c.remember(N, 1000, 1000)
        with self.assertRaises(SignError) as e:
            c.remember(N, 1000, 1500)
        self.assertEqual(e.exception.code, "replayed_request")
        c.remember("another-nonce-000001", 1000, 1500)
        self.assertEqual(len(c), 2)
        c.remember("third-nonce-00000001", 1000 + WINDOW_MS + 1, 1000 + WINDOW_MS + 1)
        self.assertEqual(len(c), 1)
        self.assertEqual(len(new_nonce()), 32)

    def test_the_cache_is_bounded(self) -> None:
        c = NonceCache()
        for i in range(MAX_NONCES):
            c.remember(f"n{i:020}", 0, 0)
        with self.assertRaises(SignError) as e:
            c.remember("one-too-many-0000000", 0, 0)
        self.assertEqual(e.exception.code, "capacity")
        c.remember("one-too-many-0000000", WINDOW_MS + 1, WINDOW_MS + 1)
        self.assertEqual(len(c), 1)

    @unittest.skipUnless(RUST_PROVIDER.exists(), "the Rust provider is not built (cargo build -p nightshift-sandbox)")
    def test_the_rust_provider_accepts_python_signatures(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        root = tempfile.mkdtemp(prefix="ns-rust-provider-")
        proc = subprocess.Popen(
            [str(RUST_PROVIDER), "--port", str(port), "--root", root],
            env={**os.environ, "PROVIDER_SECRET": "k", "NIGHTSHIFT_ISOLATION": "none"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:

            def status(method: str, path: str, body: bytes, secret: bytes = b"k", nonce: str | None = None) -> int:
                ts = int(time.time() * 1000)
                nonce = nonce or new_nonce()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                try:
                    conn.request(
                        method,
                        path,
                        body,
                        {
                            "x-nightshift-timestamp": str(ts),
                            "x-nightshift-nonce": nonce,
                            "x-nightshift-signature": sign(secret, method, path, ts, nonce, body),
                        },
                    )
                    return conn.getresponse().status
                finally:
                    conn.close()

            deadline = time.monotonic() + 10
            while True:
                try:
                    first = status("GET", "/v1/health", b"")
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self.assertEqual(first, 200)
            self.assertEqual(status("GET", "/v1/sandboxes?session_id=ses_1&label=a:b", b""), 200)
            # Accepted signature, refused body: 400, not 401.
            self.assertEqual(status("POST", "/v1/images", b'{"nope":1}'), 400)
            self.assertEqual(status("GET", "/v1/health", b"", secret=b"j"), 401)
            # The same nonce twice is a replay.
            self.assertEqual(status("GET", "/v1/health", b"", nonce="python-replay-000001"), 200)
            self.assertEqual(status("GET", "/v1/health", b"", nonce="python-replay-000001"), 401)
        finally:
            proc.kill()
            proc.wait()
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    unittest.main()
