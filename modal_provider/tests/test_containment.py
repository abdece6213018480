"""Containment on the fake Modal: egress allowlists on every sandbox and build, no model key or sandbox token in the
store or in any file of a sandbox, image or snapshot, the model proxy, clones inside the sandbox, clone-URL checks
and credential redaction."""

from __future__ import annotations

import base64
import json
import logging
import threading
import unittest
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from nightshift_modal.backend import STATE
from nightshift_modal.egress import DEFAULT_ALLOW, policy
from nightshift_modal.errors import ProviderError
from nightshift_modal.sealing import SealError, seal, unseal
from nightshift_modal.validate import check_clone_url, redact_url, valid_egress_pattern

from .harness import MODEL_KEY, PROVIDER_KEY, ProviderTestCase, sse_data


def received(test: ProviderTestCase, sid: str) -> dict[str, Any]:
    """What the sandbox's supervisor got on its stdin (the stand-in writes it down for the tests)."""
    path = test.h.fake.path(test.h.container(sid), f"{STATE}/received.json")
    value: dict[str, Any] = json.loads(path.read_text())
    return value


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


class EgressPatternTest(unittest.TestCase):
    def test_the_default_allowlist_is_the_local_providers(self) -> None:
        # The Rust core's list is the source; this copy must not drift from it.
        core = Path(__file__).resolve().parents[2] / "core" / "src" / "egress.rs"
        text = core.read_text()
        block = text[text.index("pub const DEFAULT_ALLOW") :]
        block = block[block.index("= &[") + 4 : block.index("];")]
        rust = tuple(part.strip().strip('"') for part in block.split(",") if part.strip())
        self.assertEqual(DEFAULT_ALLOW, rust)

    def test_patterns_are_checked(self) -> None:
        for good in ("example.com", "*.example.com", "host:8443", "10.0.0.1:22", "a-b.c"):
            self.assertTrue(valid_egress_pattern(good), good)
        for bad in ("http://x.com", "x.com:0", "x.com:99999", "exa mple.com", "", "*.", "x.com/path", "*x.com", "a:b"):
            self.assertFalse(valid_egress_pattern(bad), bad)

    def test_the_policy_maps_onto_modals_controls(self) -> None:
        e = policy(
            ["*.Example.com", "git.corp.example:8443", "203.0.113.7:22", "github.com"],
            clone_url="ssh://git@git.corp.example/x.git",
            control_url="https://control.example/",
            model_urls=["http://127.0.0.1:8790/v1"],
        )
        self.assertEqual(
            e.allow,
            (
                *DEFAULT_ALLOW,
                "*.example.com",
                "git.corp.example:8443",
                "203.0.113.7:22",
                "git.corp.example",
                "control.example",
                "127.0.0.1",
            ),
        )
        # Names without ports (Modal matches the TLS server name on 443); IP literals as single-address ranges.
        self.assertEqual(e.modal_domains(), [*DEFAULT_ALLOW, "*.example.com", "git.corp.example", "control.example"])
        self.assertEqual(e.modal_cidrs(), ["203.0.113.7/32", "127.0.0.1/32"])


class EgressTest(ProviderTestCase):
    EXTRA = ["*.example.com", "git.internal.example:8443"]

    def repo(self, **fields: Any) -> dict[str, Any]:
        return {"clone_url": str(self.h.repo), "base_branch": "main", **fields}

    def test_a_sandbox_is_created_with_its_allowlist(self) -> None:
        s = self.h.ready_sandbox(repository=self.repo(egress=self.EXTRA))
        self.assertEqual(s["repository"]["egress"], self.EXTRA)
        egress = self.h.fake.sandboxes[self.h.container(s["id"])].egress
        # The model is reached through the provider's proxy, so the proxy's host is the model host.
        self.assertEqual(egress.allow, (*DEFAULT_ALLOW, *self.EXTRA, "control.example", "127.0.0.1"))

    def test_without_the_proxy_the_model_hosts_are_allowed_instead(self) -> None:
        self.h = type(self.h)(model_proxy_url=None)
        self.addCleanup(self.h.close)
        s = self.h.ready_sandbox(repository=self.repo(egress=self.EXTRA))
        egress = self.h.fake.sandboxes[self.h.container(s["id"])].egress
        self.assertEqual(
            egress.allow, (*DEFAULT_ALLOW, *self.EXTRA, "control.example", "model.example", "api.anthropic.com")
        )

    def test_a_build_is_restricted_too(self) -> None:
        r = self.c.post("/v1/images", {"repository": self.repo(egress=self.EXTRA), "setup": ["true"]})
        self.assertEqual(r.status, 201, r.body)
        image = self.h.wait(f"/v1/images/{r.json()['id']}", ("ready", "failed"))
        self.assertEqual(image["status"], "ready", image)
        (build,) = self.h.fake.sandboxes.values()
        # A build gets no control plane and no model: the defaults and the repository's own patterns.
        self.assertEqual(build.egress.allow, (*DEFAULT_ALLOW, *self.EXTRA))

    def test_invalid_egress_is_refused_and_creates_nothing(self) -> None:
        for bad in (["http://x.com"], ["x.com:0"], ["x.com:99999"], ["exa mple.com"], [""], "x.com", [1]):
            for path, body in (
                ("/v1/sandboxes", self.h.create_body(repository=self.repo(egress=bad))),
                ("/v1/snapshots/snp_x/restore", self.h.create_body(repository=self.repo(egress=bad))),
                ("/v1/images", {"repository": self.repo(egress=bad)}),
            ):
                with self.subTest(path=path, egress=bad):
                    r = self.c.post(path, body)
                    self.assertEqual((r.status, r.code), (400, "invalid_body"))
        too_many = [f"h{i}.example.com" for i in range(101)]
        r = self.c.post("/v1/sandboxes", self.h.create_body(repository=self.repo(egress=too_many)))
        self.assertEqual((r.status, r.code), (400, "invalid_body"))
        r = self.c.post("/v1/sandboxes", self.h.create_body(repository=self.repo(egress=too_many[:100])))
        self.assertEqual(r.status, 201)
        self.h.spawner.join()
        self.assertEqual(len(self.h.fake.sandboxes), 1)

    def test_assign_lets_a_pooled_sandbox_reach_its_control_plane(self) -> None:
        s = self.h.ready_sandbox(session_id=None, supervisor=None)
        container = self.h.container(s["id"])
        self.assertNotIn("ctl.example", self.h.fake.sandboxes[container].egress.allow)
        spec = {"control_url": "https://ctl.example", "sandbox_token": "tok_pool"}
        r = self.c.post(f"/v1/sandboxes/{s['id']}/assign", {"session_id": "ses_9", "supervisor": spec})
        self.assertEqual(r.status, 200, r.body)
        self.assertEqual(self.h.fake.sandboxes[container].egress.allow[-1], "ctl.example")
        self.c.post(f"/v1/sandboxes/{s['id']}/stop")
        self.c.post(f"/v1/sandboxes/{s['id']}/start")
        self.h.wait(f"/v1/sandboxes/{s['id']}", ("ready",))
        self.assertIn("ctl.example", self.h.fake.sandboxes[self.h.container(s["id"])].egress.allow)


class SecretsTest(ProviderTestCase):
    def test_seals_open_only_with_their_key_and_record(self) -> None:
        key = b"k" * 32
        sealed = seal(key, b"tok_1", "sbx:a")
        self.assertNotIn("tok_1", sealed)
        self.assertEqual(unseal(key, sealed, "sbx:a"), b"tok_1")
        self.assertNotEqual(seal(key, b"tok_1", "sbx:a"), sealed)
        for k, s, ctx in (
            (b"j" * 32, sealed, "sbx:a"),
            (key, sealed, "sbx:b"),
            (key, sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB"), "sbx:a"),
            (key, "s1:!!", "sbx:a"),
        ):
            with self.assertRaises(SealError):
                unseal(k, s, ctx)

    def test_no_key_or_token_is_kept_in_the_store_or_any_sandbox_image_or_snapshot(self) -> None:
        s = self.h.ready_sandbox(session_id=None, supervisor=None)
        spec = {"control_url": "https://control.example", "sandbox_token": "tok_assigned"}
        self.assertEqual(
            self.c.post(f"/v1/sandboxes/{s['id']}/assign", {"session_id": "ses_1", "supervisor": spec}).status, 200
        )
        other = self.h.ready_sandbox()
        tokens = [received(self, x["id"])["secrets"]["env"]["NIGHTSHIFT_MODEL_KEY"] for x in (s, other)]
        self.assertEqual(self.c.post(f"/v1/sandboxes/{other['id']}/snapshot").status, 201)
        self.c.post(f"/v1/sandboxes/{other['id']}/stop")
        self.c.post(f"/v1/sandboxes/{other['id']}/start")
        self.h.wait(f"/v1/sandboxes/{other['id']}", ("ready",))
        tokens.append(received(self, other["id"])["secrets"]["env"]["NIGHTSHIFT_MODEL_KEY"])
        # The restarted sandbox still dials with its token (kept sealed), and got a new model token.
        self.assertEqual(received(self, other["id"])["secrets"]["supervisor"]["sandbox_token"], "tok_1")
        self.assertNotEqual(tokens[1], tokens[2])
        image = self.c.post("/v1/images", {"repository": {"clone_url": str(self.h.repo)}, "setup": ["env > env.txt"]})
        self.h.wait(f"/v1/images/{image.json()['id']}", ("ready",))
        self.h.spawner.join()  # the build's sandbox is gone; only what is kept remains

        stored = json.dumps(self.h.store.scan(""))
        for secret in (MODEL_KEY, PROVIDER_KEY, "tok_1", "tok_assigned", *tokens):
            self.assertNotIn(secret, stored)
        # Every file of every sandbox, stop image, snapshot and build image: no key (the tokens are in the
        # stand-in's record of its stdin only, and they end with their boot).
        files = files_under(self.h.fake._root)
        self.assertGreater(len(files), 10)
        for f in files:
            data = f.read_bytes()
            for key in (MODEL_KEY, PROVIDER_KEY):
                self.assertNotIn(key.encode(), data, f)

    def test_model_keys_in_a_create_env_are_refused(self) -> None:
        for name in ("OPENAI_API_KEY", "NIGHTSHIFT_MODEL_KEY"):
            with self.subTest(name=name):
                r = self.c.post("/v1/sandboxes", self.h.create_body(env={name: "sk-x"}))
                self.assertEqual((r.status, r.code), (400, "invalid_env"))
                self.assertNotIn("sk-x", r.json()["error"]["message"])
        self.assertEqual(self.h.fake.sandboxes, {})


class _Upstream(BaseHTTPRequestHandler):
    """A model API stand-in: records each request; `/v1/stream` answers in chunks, `/v1/busy` with 429."""

    seen: list[dict[str, Any]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _record(self) -> bytes:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        _Upstream.seen.append({"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
        return body

    def do_GET(self) -> None:
        self._record()
        self._answer(200, b'{"data": []}')

    def do_POST(self) -> None:
        body = self._record()
        if self.path.endswith("/busy"):
            self._answer(429, b'{"error": "slow down"}')
        elif self.path.endswith("/stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(3):
                part = f"data: {i}\n\n".encode()
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._answer(200, b'{"echo": ' + body + b"}")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class ModelProxyTest(ProviderTestCase):
    def setUp(self) -> None:
        self.upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
        threading.Thread(target=self.upstream.serve_forever, daemon=True).start()
        self.addCleanup(self.upstream.server_close)
        self.addCleanup(self.upstream.shutdown)
        _Upstream.seen = []
        base = f"http://127.0.0.1:{self.upstream.server_address[1]}"
        self.harness_config = {
            "supervisor_env": {
                "NIGHTSHIFT_MODEL": "nightshift/m",
                "NIGHTSHIFT_MODEL_URL": f"{base}/v1",
                "NIGHTSHIFT_MODEL_KEY": MODEL_KEY,
                "OPENAI_API_KEY": "sk-openai",
                "OPENAI_BASE_URL": f"{base}/openai",
            }
        }
        super().setUp()

    def call(
        self, url: str, token: str | None, body: bytes | None = b"{}", header: str = "authorization"
    ) -> tuple[int, bytes]:
        req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
        req.add_header("content-type", "application/json")
        if token is not None:
            req.add_header(header, f"Bearer {token}" if header == "authorization" else token)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def model_env(self, sid: str) -> dict[str, str]:
        env: dict[str, str] = received(self, sid)["secrets"]["env"]
        return env

    def test_the_proxy_adds_the_key_and_streams_the_answer(self) -> None:
        sid = self.h.ready_sandbox()["id"]
        env = self.model_env(sid)
        self.assertNotIn(MODEL_KEY, json.dumps(env))
        self.assertNotIn("sk-openai", json.dumps(env))
        url, token = env["NIGHTSHIFT_MODEL_URL"], env["NIGHTSHIFT_MODEL_KEY"]
        status, body = self.call(f"{url}/chat/completions?x=1", token, b'{"model": "m"}')
        self.assertEqual((status, json.loads(body)), (200, {"echo": {"model": "m"}}))
        (seen,) = _Upstream.seen
        self.assertEqual((seen["path"], seen["body"]), ("/v1/chat/completions?x=1", b'{"model": "m"}'))
        self.assertEqual(seen["headers"]["authorization"], f"Bearer {MODEL_KEY}")
        self.assertNotIn(token, json.dumps(seen["headers"]))

        status, body = self.call(f"{url}/stream", token)
        self.assertEqual((status, body), (200, b"data: 0\n\ndata: 1\n\ndata: 2\n\n"))
        status, body = self.call(f"{url}/busy", token)
        self.assertEqual((status, json.loads(body)), (429, {"error": "slow down"}))
        status, _ = self.call(f"{url}/models", token, body=None)
        self.assertEqual((status, _Upstream.seen[-1]["method"]), (200, "GET"))

        # Another provider's key, presented as x-api-key, goes upstream in the same header.
        self.assertEqual(env["OPENAI_API_KEY"], token)
        status, _ = self.call(f"{env['OPENAI_BASE_URL']}/responses", token, header="x-api-key")
        self.assertEqual(status, 200)
        self.assertEqual(_Upstream.seen[-1]["path"], "/openai/responses")
        self.assertEqual(_Upstream.seen[-1]["headers"]["x-api-key"], "sk-openai")

    def test_only_the_sandboxs_current_token_is_accepted(self) -> None:
        a, b = self.h.ready_sandboxes({}, {"session_id": "ses_2"})
        ta, tb = (self.model_env(x["id"])["NIGHTSHIFT_MODEL_KEY"] for x in (a, b))
        url_a = self.model_env(a["id"])["NIGHTSHIFT_MODEL_URL"]
        for token in (None, "", "wrong", tb):
            with self.subTest(token=token):
                status, body = self.call(f"{url_a}/chat/completions", token)
                self.assertEqual((status, json.loads(body)["error"]["code"]), (401, "model_token_refused"))
        status, body = self.call(f"{self.h.url}/v1/model/{a['id']}/nosuch/x", ta)
        self.assertEqual((status, json.loads(body)["error"]["code"]), (404, "model_not_found"))
        self.assertEqual(_Upstream.seen, [])
        # A stop ends the token; the next boot has a new one.
        self.c.post(f"/v1/sandboxes/{a['id']}/stop")
        self.assertEqual(self.call(f"{url_a}/chat/completions", ta)[0], 401)
        self.c.post(f"/v1/sandboxes/{a['id']}/start")
        self.h.wait(f"/v1/sandboxes/{a['id']}", ("ready",))
        fresh = self.model_env(a["id"])["NIGHTSHIFT_MODEL_KEY"]
        self.assertEqual(self.call(f"{url_a}/chat/completions", ta)[0], 401)
        self.assertEqual(self.call(f"{url_a}/chat/completions", fresh)[0], 200)
        self.c.post(f"/v1/sandboxes/{a['id']}/terminate")
        self.assertEqual(self.call(f"{url_a}/chat/completions", fresh)[0], 401)

    def test_an_unreachable_model_is_a_502(self) -> None:
        sid = self.h.ready_sandbox()["id"]
        env = self.model_env(sid)
        self.upstream.shutdown()
        self.upstream.server_close()
        status, body = self.call(f"{env['NIGHTSHIFT_MODEL_URL']}/chat/completions", env["NIGHTSHIFT_MODEL_KEY"])
        self.assertEqual((status, json.loads(body)["error"]["code"]), (502, "model_unreachable"))


class CloneTest(ProviderTestCase):
    def test_the_clone_runs_inside_the_sandbox(self) -> None:
        s = self.h.ready_sandbox()
        sb = self.h.fake.sandboxes[self.h.container(s["id"])]
        clones = [c for c in sb.commands if "clone" in c and "git" in c]
        self.assertEqual(len(clones), 1, sb.commands)
        self.assertIn(str(self.h.repo), clones[0])
        self.assertTrue((sb.dir / "repo" / ".git").is_dir())
        r = self.c.post("/v1/images", {"repository": {"clone_url": str(self.h.repo)}})
        self.h.wait(f"/v1/images/{r.json()['id']}", ("ready",))
        (build,) = [x for x in self.h.fake.sandboxes.values() if x is not sb]
        self.assertTrue(any("clone" in c and str(self.h.repo) in c for c in build.commands), build.commands)

    def test_a_clone_token_reaches_only_the_clones_git(self) -> None:
        token = "ghs_" + "t" * 40
        body = self.h.create_body(repository={"clone_url": str(self.h.repo), "access_token": token})
        r = self.c.post("/v1/sandboxes", body)
        self.assertEqual(r.status, 201, r.json())
        s = self.h.wait(f"/v1/sandboxes/{r.json()['id']}", ("ready",))
        sb = self.h.fake.sandboxes[self.h.container(s["id"])]
        (clone,) = [c for c in sb.commands if "clone" in c and "git" in c]
        basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
        self.assertIn(f"GIT_CONFIG_VALUE_0=Authorization: Basic {basic}", clone)
        # Never in an answer, the store, or the checkout's config.
        self.assertNotIn(token, json.dumps(s))
        self.assertNotIn(token, json.dumps(self.c.get(f"/v1/sandboxes/{s['id']}").json()))
        self.assertNotIn(token, json.dumps(self.h.fake.store_dump()) if hasattr(self.h.fake, "store_dump") else "")
        self.assertNotIn(token, (sb.dir / "repo" / ".git" / "config").read_text())
        others = [c for c in sb.commands if c is not clone]
        self.assertFalse(any(basic in " ".join(c) for c in others), others)

    def test_credentials_in_clone_urls_are_redacted_everywhere(self) -> None:
        url = "https://ada:s3cret@127.0.0.1:9/repo.git"
        with self.assertLogs("nightshift", level="DEBUG") as logs:
            logging.getLogger("nightshift.modal").debug("capturing")
            r = self.c.post("/v1/sandboxes", self.h.create_body(repository={"clone_url": url}))
            self.assertEqual(r.json()["repository"]["clone_url"], "https://127.0.0.1:9/repo.git")
            s = self.h.wait(f"/v1/sandboxes/{r.json()['id']}", ("failed",))
            image = self.c.post("/v1/images", {"repository": {"clone_url": url}}).json()
            image = self.h.wait(f"/v1/images/{image['id']}", ("failed",))
        answers = [
            r.body,
            json.dumps(s).encode(),
            self.c.get("/v1/sandboxes").body,
            json.dumps(image).encode(),
            self.c.get(f"/v1/images/{image['id']}/logs").body,
        ]
        self.assertIn("https://127.0.0.1:9/repo.git", s["error"]["message"])
        self.assertIn("$ git clone --branch main https://127.0.0.1:9/repo.git", sse_data(answers[-1]))
        for text in (*answers, "\n".join(logs.output).encode(), json.dumps(self.h.store.scan("")).encode()):
            self.assertNotIn(b"s3cret", text)

    def test_redact_url(self) -> None:
        self.assertEqual(
            redact_url("clone 'https://u:p@ss@host:1/x?y' and ssh://git@h/r.git, not git@h:r or https://h/x"),
            "clone 'https://host:1/x?y' and ssh://h/r.git, not git@h:r or https://h/x",
        )


class CloneUrlCheckTest(ProviderTestCase):
    harness_config = {"dev_mode": False}

    def test_only_https_and_ssh_urls_to_public_hosts_are_accepted(self) -> None:
        for ok in ("https://github.com/o/r.git", "ssh://git@github.com/o/r.git", "https://git.example.com:8443/r"):
            check_clone_url(ok, dev_mode=False)
        for bad in (
            str(self.h.repo),
            f"file://{self.h.repo}",
            "http://github.com/o/r.git",
            "git@github.com:o/r.git",
            "https://127.0.0.1/r.git",
            "https://localhost/r.git",
            "https://10.1.2.3/r.git",
            "https://[::1]/r.git",
            "https://169.254.169.254/r.git",
            "https:///r.git",
            "https://tok@",
        ):
            with self.assertRaises(ProviderError) as e:
                check_clone_url(bad, dev_mode=False)
            self.assertEqual((e.exception.status, e.exception.code), (400, "invalid_repository"))
        check_clone_url(str(self.h.repo), dev_mode=True)

    def test_the_api_refuses_them_with_a_clear_error_and_creates_nothing(self) -> None:
        self.h.spawner.spawn = lambda job, target, generation: None  # type: ignore[method-assign]
        bad = {"clone_url": "http://ada:s3cret@github.com/o/r.git"}
        for path, body in (
            ("/v1/sandboxes", self.h.create_body(repository=bad)),
            ("/v1/snapshots/snp_x/restore", self.h.create_body(repository=bad)),
            ("/v1/images", {"repository": bad}),
        ):
            with self.subTest(path=path):
                r = self.c.post(path, body)
                self.assertEqual((r.status, r.code), (400, "invalid_repository"))
                message = r.json()["error"]["message"]
                self.assertIn("https://", message)
                self.assertIn("http://github.com/o/r.git", message)
                self.assertNotIn("s3cret", message)
        self.assertEqual(self.h.store.scan("sbx:") + self.h.store.scan("img:"), [])
        r = self.c.post("/v1/sandboxes", self.h.create_body(repository={"clone_url": "https://github.com/o/r.git"}))
        self.assertEqual(r.status, 201, r.body)

