"""Contract checks against a real deployment: run only when NIGHTSHIFT_MODAL_URL (and its secret) are set, skipped otherwise.

    NIGHTSHIFT_MODAL_URL=https://<workspace>--nightshift-provider-web.modal.run \\
    NIGHTSHIFT_MODAL_SECRET=<PROVIDER_SECRET> \\
    NIGHTSHIFT_MODAL_REPO=https://github.com/<owner>/<repo>.git   # optional: boots real sandboxes and builds an image
    python3 -m unittest discover -s modal_provider/tests -t modal_provider -p 'test_live_contract.py' -v
"""

from __future__ import annotations

import os
import time
import unittest
from typing import Any

from nightshift_modal.signing import NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, new_nonce, sign

from .harness import Client, sse_data

URL = os.environ.get("NIGHTSHIFT_MODAL_URL", "").rstrip("/")
SECRET = os.environ.get("NIGHTSHIFT_MODAL_SECRET") or os.environ.get("PROVIDER_SECRET", "")
REPO = os.environ.get("NIGHTSHIFT_MODAL_REPO", "")
BRANCH = os.environ.get("NIGHTSHIFT_MODAL_BRANCH", "main")


def now_ms() -> int:
    return int(time.time() * 1000)


@unittest.skipUnless(URL and SECRET, "set NIGHTSHIFT_MODAL_URL and NIGHTSHIFT_MODAL_SECRET to check a deployment")
class LiveContractTest(unittest.TestCase):
    def setUp(self) -> None:
        self.c = Client(URL, SECRET.encode(), now_ms)

    def wait(self, path: str, statuses: tuple[str, ...], timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            obj = self.c.get(path).json()
            if obj["status"] in statuses:
                return obj
            if time.monotonic() > deadline:
                self.fail(f"{path} is still {obj['status']}")
            time.sleep(3)

    def test_health_and_signatures(self) -> None:
        r = self.c.get("/v1/health")
        self.assertEqual((r.status, r.json()), (200, {"ok": True, "provider": "modal", "isolation": "gvisor"}))
        self.assertEqual(self.c.get("/v1/health", signed=False).code, "unsigned")
        ts = now_ms() - 400_000
        stale = self.c.get(
            "/v1/health",
            signed=False,
            headers={
                TIMESTAMP_HEADER: str(ts),
                NONCE_HEADER: (n := new_nonce()),
                SIGNATURE_HEADER: sign(SECRET.encode(), "GET", "/v1/health", ts, n, b""),
            },
        )
        self.assertEqual((stale.status, stale.code), (401, "stale_signature"))
        ts = now_ms()
        bad = self.c.get(
            "/v1/health",
            signed=False,
            headers={
                TIMESTAMP_HEADER: str(ts),
                NONCE_HEADER: (n := new_nonce()),
                SIGNATURE_HEADER: sign(b"not-the-secret", "GET", "/v1/health", ts, n, b""),
            },
        )
        self.assertEqual((bad.status, bad.code), (401, "bad_signature"))

    def test_unknown_ids_and_bad_bodies(self) -> None:
        for path, code in (
            ("/v1/sandboxes/sbx_none", "sandbox_not_found"),
            ("/v1/snapshots/snp_none", "snapshot_not_found"),
            ("/v1/images/img_none", "image_not_found"),
        ):
            r = self.c.get(path)
            self.assertEqual((r.status, r.code), (404, code))
        self.assertEqual(self.c.delete("/v1/images/img_none").json(), {"id": "img_none", "deleted": True})
        r = self.c.post("/v1/sandboxes", {"repository": {"clone_url": "x"}, "surprise": 1})
        self.assertEqual((r.status, r.code), (400, "invalid_body"))
        self.assertEqual(self.c.get("/v1/sandboxes?label=nightshift-live-check:none").json(), {"sandboxes": []})

    @unittest.skipUnless(REPO, "set NIGHTSHIFT_MODAL_REPO to boot real sandboxes")
    def test_a_sandbox_lifecycle(self) -> None:
        body = {
            "session_id": None,
            "repository": {"clone_url": REPO, "base_branch": BRANCH},
            "lifetime_ms": 30 * 60 * 1000,
            "labels": {"nightshift-live-check": "1"},
        }
        created = self.c.post("/v1/sandboxes", body)
        self.assertEqual(created.status, 201, created.body)
        sid = created.json()["id"]
        try:
            s = self.wait(f"/v1/sandboxes/{sid}", ("ready", "failed"), 900)
            self.assertEqual(s["status"], "ready", s)
            r = self.c.post(f"/v1/sandboxes/{sid}/exec", {"command": ["git", "rev-parse", "HEAD"]})
            self.assertEqual((r.status, r.json()["exit_code"]), (200, 0))
            self.assertEqual(self.c.get(f"/v1/sandboxes/{sid}/git").status, 200)
            self.assertTrue(sse_data(self.c.get(f"/v1/sandboxes/{sid}/logs/supervisor").body))
            snap = self.c.post(f"/v1/sandboxes/{sid}/snapshot", {"ttl_ms": 3_600_000})
            self.assertEqual(snap.status, 201, snap.body)
            self.assertEqual(self.c.get(f"/v1/snapshots/{snap.json()['id']}").json(), snap.json())
            stopped = self.c.post(f"/v1/sandboxes/{sid}/stop")
            self.assertEqual(stopped.json()["status"], "stopped")
            self.assertEqual(self.c.post(f"/v1/sandboxes/{sid}/start").json()["status"], "creating")
            self.assertEqual(self.wait(f"/v1/sandboxes/{sid}", ("ready", "failed"), 900)["status"], "ready")
            self.c.delete(f"/v1/snapshots/{snap.json()['id']}")
        finally:
            for _ in range(2):
                r = self.c.post(f"/v1/sandboxes/{sid}/terminate")
                self.assertEqual((r.status, r.json()["status"]), (200, "terminated"))

    @unittest.skipUnless(REPO, "set NIGHTSHIFT_MODAL_REPO to build a real image")
    def test_an_image_build(self) -> None:
        r = self.c.post(
            "/v1/images",
            {
                "repository": {"clone_url": REPO, "base_branch": BRANCH},
                "setup": ["echo setup > .nightshift-live-check"],
                "test": "exit 5",
            },
        )
        self.assertEqual(r.status, 201, r.body)
        image_id = r.json()["id"]
        try:
            image = self.wait(f"/v1/images/{image_id}", ("ready", "failed"), 1800)
            self.assertEqual((image["status"], image["test_exit_code"]), ("ready", 5), image)
            self.assertIn("image ready", sse_data(self.c.get(f"/v1/images/{image_id}/logs").body))
        finally:
            self.c.delete(f"/v1/images/{image_id}")
