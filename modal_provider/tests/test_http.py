"""The HTTP surface over real requests: signatures on every route, strict bodies, unknown ids, routing and error shapes."""

from __future__ import annotations

import json
from typing import Any

from nightshift_modal.http import MAX_BODY, ProviderApp
from nightshift_modal.signing import NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

from .harness import SECRET, ProviderTestCase

N = "nonce-0123456789abcdef"


class SignatureTest(ProviderTestCase):
    def test_health_answers_a_signed_request(self) -> None:
        r = self.c.get("/v1/health")
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json(), {"ok": True, "provider": "modal", "isolation": "gvisor"})

    def test_missing_stale_and_bad_signatures_are_refused_on_every_route(self) -> None:
        for method, path in [
            ("GET", "/v1/health"),
            ("POST", "/v1/sandboxes"),
            ("GET", "/v1/sandboxes/sbx_x"),
            ("DELETE", "/v1/images/img_x"),
            ("GET", "/v1/nowhere"),
        ]:
            with self.subTest(path=path):
                r = self.c.request(method, path, signed=False)
                self.assertEqual((r.status, r.code), (401, "unsigned"))
        ts = self.h.clock()
        only_ts = self.c.get("/v1/health", signed=False, headers={TIMESTAMP_HEADER: str(ts)})
        self.assertEqual((only_ts.status, only_ts.code), (401, "unsigned"))
        no_nonce = self.c.get(
            "/v1/health",
            signed=False,
            headers={TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: sign(SECRET, "GET", "/v1/health", ts, N, b"")},
        )
        self.assertEqual((no_nonce.status, no_nonce.code), (401, "unsigned"))
        for skew in (-310_000, 310_000):
            stale = ts + skew
            r = self.c.get(
                "/v1/health",
                signed=False,
                headers={TIMESTAMP_HEADER: str(stale), NONCE_HEADER: N, SIGNATURE_HEADER: sign(SECRET, "GET", "/v1/health", stale, N, b"")},
            )
            self.assertEqual((r.status, r.code), (401, "stale_signature"))
        wrong_key = sign(b"another-secret", "GET", "/v1/health", ts, N, b"")
        r = self.c.get("/v1/health", signed=False, headers={TIMESTAMP_HEADER: str(ts), NONCE_HEADER: N, SIGNATURE_HEADER: wrong_key})
        self.assertEqual((r.status, r.code), (401, "bad_signature"))
        self.assertIn("PROVIDER_SECRET", r.json()["error"]["message"])

    def test_the_path_query_and_body_are_all_signed(self) -> None:
        ts = self.h.clock()
        for signed_path, sent_path in [
            ("/v1/sandboxes", "/v1/sandboxes?session_id=ses_1"),
            ("/v1/sandboxes?session_id=ses_1", "/v1/sandboxes?session_id=ses_2"),
        ]:
            r = self.c.get(
                sent_path,
                signed=False,
                headers={TIMESTAMP_HEADER: str(ts), NONCE_HEADER: N, SIGNATURE_HEADER: sign(SECRET, "GET", signed_path, ts, N, b"")},
            )
            self.assertEqual((r.status, r.code), (401, "bad_signature"))
        body = json.dumps(self.h.create_body()).encode()
        r = self.c.post(
            "/v1/sandboxes",
            raw=body + b" ",
            signed=False,
            headers={TIMESTAMP_HEADER: str(ts), NONCE_HEADER: N, SIGNATURE_HEADER: sign(SECRET, "POST", "/v1/sandboxes", ts, N, body)},
        )
        self.assertEqual((r.status, r.code), (401, "bad_signature"))
        ok = self.c.get("/v1/sandboxes?session_id=nobody&label=a:b")
        self.assertEqual((ok.status, ok.json()), (200, {"sandboxes": []}))


    def _replay(self, nonce: str, another_container: bool) -> None:
        """Sends one signed create twice with the same nonce (the second time to a fresh web container when
        `another_container`): the replay is refused and created nothing."""
        ts = self.h.clock()
        body = json.dumps(self.h.create_body()).encode()
        headers = {
            TIMESTAMP_HEADER: str(ts),
            NONCE_HEADER: nonce,
            SIGNATURE_HEADER: sign(SECRET, "POST", "/v1/sandboxes", ts, nonce, body),
        }
        first = self.c.post("/v1/sandboxes", raw=body, signed=False, headers=headers)
        self.assertEqual(first.status, 201, first.json())
        if another_container:
            # A fresh app over the same store: another container with an empty memory of nonces.
            self.h.server.app = ProviderApp(self.h.backend, SECRET, clock=self.h.clock, poll_interval_s=0.05)
        again = self.c.post("/v1/sandboxes", raw=body, signed=False, headers=headers)
        self.assertEqual((again.status, again.code), (401, "replayed_request"))
        listed = self.c.get("/v1/sandboxes").json()["sandboxes"]
        self.assertEqual([x["id"] for x in listed], [first.json()["id"]])

    def test_a_replayed_request_is_refused_and_creates_nothing(self) -> None:
        self._replay("replay-0123456789abcdef", another_container=False)

    def test_a_replay_reaching_another_web_container_is_refused_too(self) -> None:
        self._replay("replay-other-container-0123", another_container=True)


class RoutingTest(ProviderTestCase):
    def test_unknown_routes_and_methods_answer_json_errors(self) -> None:
        r = self.c.get("/v1/nowhere")
        self.assertEqual((r.status, r.code), (404, "not_found"))
        r = self.c.delete("/v1/sandboxes/sbx_x")
        self.assertEqual((r.status, r.code), (405, "method_not_allowed"))
        self.assertEqual(r.headers["content-type"], "application/json")
        self.assertEqual(set(r.json()), {"error"})
        self.assertEqual(set(r.json()["error"]), {"code", "message"})

    def test_unknown_ids(self) -> None:
        body = self.h.create_body()
        cases = [
            ("GET", "/v1/sandboxes/sbx_none", None, 404, "sandbox_not_found"),
            ("POST", "/v1/sandboxes/sbx_none/exec", {"command": ["true"]}, 404, "sandbox_not_found"),
            ("GET", "/v1/sandboxes/sbx_none/logs/supervisor", None, 404, "sandbox_not_found"),
            ("POST", "/v1/sandboxes/sbx_none/snapshot", None, 404, "sandbox_not_found"),
            ("POST", "/v1/sandboxes/sbx_none/stop", None, 404, "sandbox_not_found"),
            ("POST", "/v1/sandboxes/sbx_none/start", None, 404, "sandbox_not_found"),
            ("POST", "/v1/sandboxes/sbx_none/terminate", None, 404, "sandbox_not_found"),
            ("GET", "/v1/sandboxes/sbx_none/git", None, 404, "sandbox_not_found"),
            ("POST", "/v1/sandboxes/sbx_none/git/sync", None, 404, "sandbox_not_found"),
            (
                "POST",
                "/v1/sandboxes/sbx_none/assign",
                {"session_id": "ses_2", "supervisor": body["supervisor"]},
                404,
                "sandbox_not_found",
            ),
            ("GET", "/v1/snapshots/snp_none", None, 404, "snapshot_not_found"),
            ("POST", "/v1/snapshots/snp_none/restore", body, 404, "snapshot_not_found"),
            ("POST", "/v1/sandboxes", {**body, "snapshot": "snp_none"}, 404, "snapshot_not_found"),
            ("POST", "/v1/sandboxes", {**body, "image": "img_none"}, 404, "image_not_found"),
            ("GET", "/v1/images/img_none", None, 404, "image_not_found"),
            ("GET", "/v1/images/img_none/logs", None, 404, "image_not_found"),
        ]
        for method, path, payload, status, code in cases:
            with self.subTest(method=method, path=path):
                r = self.c.request(method, path, payload)
                self.assertEqual((r.status, r.code), (status, code), r.body)
        for path in ("/v1/snapshots/snp_none", "/v1/images/img_none"):
            r = self.c.delete(path)
            self.assertEqual((r.status, r.json()), (200, {"id": path.rsplit("/", 1)[1], "deleted": True}))


class BodyTest(ProviderTestCase):
    def assertRefused(
        self, path: str, payload: object, code: str = "invalid_body", *, raw: bytes | None = None
    ) -> None:
        r = self.c.post(path, payload, raw=raw)
        self.assertEqual((r.status, r.code), (400, code), r.body)

    def test_create_bodies_are_strict(self) -> None:
        good = self.h.create_body()
        for raw in (b"not json", b"[1]", b"", b'{"a":1,"a":2}', b"\xff"):
            self.assertRefused("/v1/sandboxes", None, raw=raw)
        changes: list[dict[str, Any]] = [
            {"surprise": 1},
            {"session_id": ""},
            {"session_id": 5},
            {"repository": {"clone_url": ""}},
            {"repository": {"clone_url": "x", "depth": 1}},
            {"repository": {"clone_url": "x", "base_branch": None}},
            {"timeout_ms": "5"},
            {"timeout_ms": -1},
            {"timeout_ms": 1.5},
            {"timeout_ms": True},
            {"lifetime_ms": 0},
            {"env": {"A": 1}},
            {"env": None},
            {"labels": []},
            {"supervisor": {"control_url": "x"}},
            {"supervisor": {"control_url": "x", "sandbox_token": "t", "extra": 1}},
        ]
        for change in changes:
            with self.subTest(change=change):
                self.assertRefused("/v1/sandboxes", {**good, **change})
        missing = dict(good)
        del missing["repository"]
        self.assertRefused("/v1/sandboxes", missing)
        self.assertRefused("/v1/snapshots/snp_x/restore", {**good, "snapshot": "snp_x"})

    def test_oversized_bodies_are_refused(self) -> None:
        r = self.c.post("/v1/sandboxes", raw=b" " * (MAX_BODY + 1))
        self.assertEqual((r.status, r.code), (413, "invalid_body"))

    def test_other_bodies_are_strict(self) -> None:
        s = self.h.ready_sandbox()
        exec_path = f"/v1/sandboxes/{s['id']}/exec"
        self.assertRefused(exec_path, {"command": []}, "invalid_command")
        self.assertRefused(exec_path, {"command": [""]}, "invalid_command")
        for bad in (
            {"command": "ls"},
            {"command": ["ls", 1]},
            {},
            {"command": ["ls"], "shell": True},
            {"command": ["ls"], "env": {"BAD-NAME": "x"}},
            {"command": ["ls"], "cwd": "../.."},
            {"command": ["ls"], "stdin": 5},
        ):
            with self.subTest(body=bad):
                self.assertRefused(exec_path, bad)
        self.assertRefused(f"/v1/sandboxes/{s['id']}/snapshot", {"ttl": 5})
        self.assertRefused(f"/v1/sandboxes/{s['id']}/snapshot", {"ttl_ms": "5"})
        assign = f"/v1/sandboxes/{s['id']}/assign"
        self.assertRefused(assign, {"session_id": "ses_2"})
        self.assertRefused(assign, {"session_id": "", "supervisor": {"control_url": "x", "sandbox_token": "t"}})
        repo = {"clone_url": str(self.h.repo)}
        builds: list[dict[str, Any]] = [
            {"repository": repo, "setup": ["  "]},
            {"repository": repo, "setup": "make"},
            {"repository": repo, "setup": ["true"] * 51},
            {"repository": repo, "test": "x" * 4097},
            {"repository": {"clone_url": "x", "base_branch": ""}},
            {"repository": repo, "cache": True},
        ]
        for bad in builds:
            with self.subTest(build=bad):
                self.assertRefused("/v1/images", bad)
