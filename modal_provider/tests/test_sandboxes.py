"""Sandboxes end to end over HTTP on the fake Modal: boot, the secrets line, exec, logs, git, stop/start, terminate, lifetime, pools and failures."""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

from nightshift_modal.backend import JOB_GRACE_MS, MAX_LIFETIME_MS, STATE

from .harness import ProviderTestCase, sse_data


class BootTest(ProviderTestCase):
    def test_a_sandbox_boots_with_its_secrets_on_the_supervisors_stdin(self) -> None:
        body = self.h.create_body(
            env={"NIGHTSHIFT_MODEL": "request/model", "NIGHTSHIFT_CONTINUE_BRANCH": "nightshift/x"},
            labels={"repo": "demo"},
        )
        r = self.c.post("/v1/sandboxes", body)
        self.assertEqual(r.status, 201)
        created = r.json()
        self.assertTrue(created["id"].startswith("sbx_"))
        self.assertEqual(created["status"], "creating")
        self.assertEqual(created["expires_at"], created["created_at"] + MAX_LIFETIME_MS)
        self.assertEqual(
            {k: created[k] for k in ("session_id", "image", "snapshot", "ready_at", "terminated_at", "error")},
            {
                "session_id": "ses_1",
                "image": None,
                "snapshot": None,
                "ready_at": None,
                "terminated_at": None,
                "error": None,
            },
        )
        s = self.h.wait(f"/v1/sandboxes/{created['id']}", ("ready",))
        self.assertGreaterEqual(s["ready_at"], s["created_at"])
        self.assertEqual(s["labels"], {"repo": "demo"})
        container = self.h.container(s["id"])
        self.assertLessEqual(self.h.fake.sandboxes[container].timeout_s, MAX_LIFETIME_MS // 1000)
        received = json.loads(self.h.fake.path(container, f"{STATE}/received.json").read_text())
        # No key on the line: each model's URL names the provider's proxy, and its key is this boot's model token.
        token = received["secrets"]["env"]["NIGHTSHIFT_MODEL_KEY"]
        self.assertGreaterEqual(len(token), 32)
        # The supervisor's API secret is on the line too (derived, never stored in the Dict).
        api_secret = received["secrets"].pop("api_secret")
        self.assertRegex(api_secret, r"^[0-9a-f]{32}$")
        self.assertEqual(
            received["secrets"],
            {
                "supervisor": {"control_url": "https://control.example", "sandbox_token": "tok_1"},
                "env": {
                    "NIGHTSHIFT_MODEL": "request/model",
                    "NIGHTSHIFT_CONTINUE_BRANCH": "nightshift/x",
                    "NIGHTSHIFT_MODEL_URL": f"{self.h.url}/v1/model/{s['id']}/nightshift",
                    "NIGHTSHIFT_MODEL_KEY": token,
                    "ANTHROPIC_BASE_URL": f"{self.h.url}/v1/model/{s['id']}/anthropic",
                    "ANTHROPIC_API_KEY": token,
                },
            },
        )
        self.assertEqual((received["session_id"], received["base_branch"]), ("ses_1", "main"))
        readme = self.h.exec(s["id"], "cat", "README.md")
        self.assertEqual(readme["stdout"], "hello\n")

    def test_get_and_list(self) -> None:
        a, b = self.h.ready_sandboxes({"labels": {"team": "a"}}, {"session_id": "ses_2", "labels": {"team": "b"}})
        self.assertEqual(self.c.get(f"/v1/sandboxes/{a['id']}").json()["id"], a["id"])
        ids = lambda path: [s["id"] for s in self.c.get(path).json()["sandboxes"]]  # noqa: E731
        self.assertEqual(ids("/v1/sandboxes"), [a["id"], b["id"]])
        self.assertEqual(ids("/v1/sandboxes?session_id=ses_2"), [b["id"]])
        self.assertEqual(ids("/v1/sandboxes?label=team:a"), [a["id"]])
        self.assertEqual(ids("/v1/sandboxes?label=team:c"), [])
        self.assertEqual(ids("/v1/sandboxes?label=team"), [a["id"], b["id"]])
        self.assertEqual(ids("/v1/sandboxes?session_id=ses_2&label=team:a"), [])

    def test_boot_failures_are_recorded_and_end_the_container(self) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"repository": {"clone_url": str(self.h.tmp / "missing")}}, "repository_not_found"),
            ({"repository": {"clone_url": str(self.h.repo), "base_branch": "nope"}}, "clone_failed"),
            ({"env": {"FAKE_SUPERVISOR_EXIT": "1"}}, "sandbox_exited"),
            ({"env": {"FAKE_SUPERVISOR_NEVER_READY": "1"}, "timeout_ms": 300}, "timeout"),
        ]
        ids = [self.c.post("/v1/sandboxes", self.h.create_body(**fields)).json()["id"] for fields, _ in cases]
        for sid, (_, code) in zip(ids, cases, strict=True):
            with self.subTest(code=code):
                s = self.h.wait(f"/v1/sandboxes/{sid}", ("failed",))
                self.assertEqual(s["error"]["code"], code, s["error"])
                rec = self.h.record(f"sbx:{s['id']}")
                self.assertIsNone(rec["container"])
        self.assertEqual([sb for sb in self.h.fake.sandboxes.values() if sb.running], [])


class ExecTest(ProviderTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.sid = self.h.ready_sandbox()["id"]

    def test_exec_runs_in_the_checkout(self) -> None:
        r = self.h.exec(
            self.sid,
            "sh",
            "-c",
            'echo "$PWD|$GREETING|$NIGHTSHIFT_SANDBOX_ID"; cat; echo err >&2; exit 7',
            env={"GREETING": "hi"},
            stdin="from stdin\n",
        )
        self.assertEqual(r["exit_code"], 7)
        cwd, greeting, sid = r["stdout"].splitlines()[0].split("|")
        self.assertTrue(cwd.endswith("/repo"), cwd)
        self.assertEqual((greeting, sid), ("hi", self.sid))
        self.assertEqual(r["stdout"].splitlines()[1], "from stdin")
        self.assertEqual((r["stderr"], r["truncated"]), ("err\n", False))
        self.assertGreaterEqual(r["duration_ms"], 0)
        self.h.exec(self.sid, "mkdir", "sub")
        self.assertTrue(self.h.exec(self.sid, "pwd", cwd="sub")["stdout"].strip().endswith("/repo/sub"))
        home = self.h.exec(self.sid, "sh", "-c", "echo $HOME")["stdout"].strip()
        self.assertTrue(home.endswith("/home"), home)

    def test_exec_refusals_and_limits(self) -> None:
        path = f"/v1/sandboxes/{self.sid}/exec"
        r = self.c.post(path, {"command": ["no-such-program-here"]})
        self.assertEqual((r.status, r.code), (400, "invalid_command"))
        r = self.c.post(path, {"command": ["pwd"], "cwd": "missing/dir"})
        self.assertEqual((r.status, r.code), (400, "invalid_command"))
        r = self.c.post(path, {"command": ["sleep", "5"], "timeout_ms": 200})
        self.assertEqual((r.status, r.code), (504, "exec_timeout"))
        big = self.h.exec(self.sid, "head", "-c", str((1 << 20) + 10), "/dev/zero")
        self.assertTrue(big["truncated"])
        self.assertEqual(len(big["stdout"]), 1 << 20)


class LogsAndGitTest(ProviderTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.sid = self.h.ready_sandbox()["id"]

    def test_logs_stream_as_server_sent_events(self) -> None:
        r = self.c.get(f"/v1/sandboxes/{self.sid}/logs/supervisor")
        self.assertEqual(r.status, 200)
        self.assertEqual((r.headers["content-type"], r.headers["cache-control"]), ("text/event-stream", "no-cache"))
        self.assertIn(f"supervisor: sandbox {self.sid} session ses_1", sse_data(r.body))
        r = self.c.get(f"/v1/sandboxes/{self.sid}/logs/bad.name")
        self.assertEqual((r.status, r.code), (400, "invalid_service"))
        r = self.c.get(f"/v1/sandboxes/{self.sid}/logs/opencode")
        self.assertEqual((r.status, r.code), (404, "log_not_found"))

    def test_a_followed_log_streams_until_the_sandbox_ends_and_stays_readable(self) -> None:
        got: list[bytes] = []
        reader = threading.Thread(
            target=lambda: got.append(self.c.get(f"/v1/sandboxes/{self.sid}/logs/supervisor?follow=1").body)
        )
        reader.start()
        self.h.exec(self.sid, "sh", "-c", "echo 'a new line' >> ../logs/supervisor.log")
        self.assertTrue(reader.is_alive())
        self.c.post(f"/v1/sandboxes/{self.sid}/terminate")
        reader.join(10)
        self.assertFalse(reader.is_alive())
        self.assertIn("a new line", sse_data(got[0]))
        after = self.c.get(f"/v1/sandboxes/{self.sid}/logs/supervisor")
        self.assertIn("a new line", sse_data(after.body))

    def test_git_status_and_sync_go_through_the_supervisor(self) -> None:
        head = self.h.exec(self.sid, "git", "rev-parse", "HEAD")["stdout"].strip()
        r = self.c.get(f"/v1/sandboxes/{self.sid}/git")
        self.assertEqual(r.status, 200)
        self.assertEqual(
            r.json(), {"sync": {"state": "synced", "commit": head}, "branch": "main", "head": head, "dirty": False}
        )
        r = self.c.post(f"/v1/sandboxes/{self.sid}/git/sync")
        self.assertEqual(r.status, 202)
        self.h.exec(self.sid, "sh", "-c", "echo change >> README.md")
        r = self.c.post(f"/v1/sandboxes/{self.sid}/git/sync")
        self.assertEqual((r.status, r.code), (409, "sync_refused"))
        self.assertTrue(self.c.get(f"/v1/sandboxes/{self.sid}/git").json()["dirty"])


class LifecycleTest(ProviderTestCase):
    def test_stop_keeps_the_disk_and_start_boots_on_it_with_the_same_settings(self) -> None:
        s = self.h.ready_sandbox()
        sid = s["id"]
        self.h.exec(sid, "sh", "-c", "echo draft > notes.txt")
        first = self.h.container(sid)
        r = self.c.post(f"/v1/sandboxes/{sid}/stop")
        self.assertEqual((r.status, r.json()["status"]), (200, "stopped"))
        self.assertFalse(self.h.fake.sandboxes[first].running)
        self.assertEqual(self.h.fake.live_processes(), [])
        self.assertEqual(self.c.post(f"/v1/sandboxes/{sid}/stop").json()["status"], "stopped")
        r = self.c.post(f"/v1/sandboxes/{sid}/exec", {"command": ["true"]})
        self.assertEqual((r.status, r.code), (409, "sandbox_not_ready"))
        self.assertEqual(self.c.get(f"/v1/sandboxes/{sid}/git").json()["sync"], {"state": "not_started"})
        self.h.clock.advance(60_000)
        r = self.c.post(f"/v1/sandboxes/{sid}/start")
        self.assertEqual((r.status, r.json()["status"]), (200, "creating"))
        self.assertGreater(r.json()["expires_at"], s["expires_at"])
        again = self.h.wait(f"/v1/sandboxes/{sid}", ("ready",))
        self.assertIsNotNone(again["ready_at"])
        self.assertEqual(self.h.exec(sid, "cat", "notes.txt")["stdout"], "draft\n")
        second = self.h.container(sid)
        self.assertNotEqual(first, second)
        received = json.loads(self.h.fake.path(second, f"{STATE}/received.json").read_text())
        self.assertEqual(received["secrets"]["supervisor"]["sandbox_token"], "tok_1")
        r = self.c.post(f"/v1/sandboxes/{sid}/start")
        self.assertEqual((r.status, r.code), (409, "sandbox_not_stopped"))

    def test_terminate_is_idempotent_and_leaves_nothing_running(self) -> None:
        sid = self.h.ready_sandbox()["id"]
        self.h.exec(sid, "sh", "-c", "sleep 30 > /dev/null 2>&1 &")
        r = self.c.post(f"/v1/sandboxes/{sid}/terminate")
        self.assertEqual((r.status, r.json()["status"]), (200, "terminated"))
        ended = r.json()["terminated_at"]
        self.assertIsNotNone(ended)
        self.assertEqual(self.h.fake.live_processes(), [])
        r = self.c.post(f"/v1/sandboxes/{sid}/terminate")
        self.assertEqual((r.status, r.json()["terminated_at"]), (200, ended))
        for path, code in (
            ("stop", "sandbox_terminated"),
            ("start", "sandbox_not_stopped"),
            ("snapshot", "sandbox_terminated"),
            ("git", "sandbox_terminated"),
        ):
            method = "GET" if path == "git" else "POST"
            r = self.c.request(method, f"/v1/sandboxes/{sid}/{path}")
            self.assertEqual((r.status, r.code), (409, code))
        r = self.c.post(f"/v1/sandboxes/{sid}/exec", {"command": ["true"]})
        self.assertEqual((r.status, r.code), (409, "sandbox_terminated"))

    def test_the_lifetime_ends_a_sandbox(self) -> None:
        s = self.h.ready_sandbox(lifetime_ms=60_000)
        self.assertEqual(s["expires_at"], s["created_at"] + 60_000)
        self.assertEqual(self.h.fake.sandboxes[self.h.container(s["id"])].timeout_s, 60)
        self.h.clock.advance(61_000)
        s = self.c.get(f"/v1/sandboxes/{s['id']}").json()
        self.assertEqual((s["status"], s["error"]["code"]), ("terminated", "lifetime"))
        self.assertEqual(self.h.fake.live_processes(), [])
        long = self.c.post("/v1/sandboxes", self.h.create_body(lifetime_ms=48 * 3600 * 1000)).json()
        self.assertEqual(long["expires_at"], long["created_at"] + MAX_LIFETIME_MS)

    def test_a_boot_whose_worker_died_fails_after_its_deadline(self) -> None:
        self.h.spawner.spawn = lambda job, target, generation: None  # type: ignore[method-assign]
        s = self.c.post("/v1/sandboxes", self.h.create_body(timeout_ms=1000)).json()
        self.assertEqual(self.c.get(f"/v1/sandboxes/{s['id']}").json()["status"], "creating")
        self.h.clock.advance(1000 + JOB_GRACE_MS + 1)
        s = self.c.get(f"/v1/sandboxes/{s['id']}").json()
        self.assertEqual((s["status"], s["error"]["code"]), ("failed", "timeout"))

    def test_the_sweep_notices_a_dead_supervisor(self) -> None:
        sid = self.h.ready_sandbox()["id"]
        pid = int(self.h.fake.path(self.h.container(sid), f"{STATE}/supervisor.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        self.h.wait_dead(pid)
        self.h.backend.sweep()
        s = self.c.get(f"/v1/sandboxes/{sid}").json()
        self.assertEqual((s["status"], s["error"]["code"]), ("failed", "sandbox_exited"))


class PoolTest(ProviderTestCase):
    def test_a_pooled_sandbox_boots_without_a_session_and_is_assigned_once(self) -> None:
        s = self.h.ready_sandbox(session_id=None, supervisor=None)
        self.assertIsNone(s["session_id"])
        container = self.h.container(s["id"])
        received = json.loads(self.h.fake.path(container, f"{STATE}/received.json").read_text())
        self.assertEqual((received["session_id"], received["secrets"]["supervisor"]), ("", None))
        spec = {"control_url": "https://control.example", "sandbox_token": "tok_pool"}
        r = self.c.post(f"/v1/sandboxes/{s['id']}/assign", {"session_id": "ses_9", "supervisor": spec})
        self.assertEqual((r.status, r.json()["session_id"]), (200, "ses_9"))
        assigned = json.loads(self.h.fake.path(container, f"{STATE}/assigned.json").read_text())
        self.assertEqual(assigned, {"session_id": "ses_9", **spec})
        r = self.c.post(f"/v1/sandboxes/{s['id']}/assign", {"session_id": "ses_10", "supervisor": spec})
        self.assertEqual((r.status, r.code), (409, "sandbox_assigned"))
        self.assertEqual([x["id"] for x in self.c.get("/v1/sandboxes?session_id=ses_9").json()["sandboxes"]], [s["id"]])
        # After a stop, the sandbox boots again for its session, with the session's token.
        self.c.post(f"/v1/sandboxes/{s['id']}/stop")
        self.c.post(f"/v1/sandboxes/{s['id']}/start")
        self.h.wait(f"/v1/sandboxes/{s['id']}", ("ready",))
        again = json.loads(self.h.fake.path(self.h.container(s["id"]), f"{STATE}/received.json").read_text())
        self.assertEqual((again["session_id"], again["secrets"]["supervisor"]), ("ses_9", spec))

    def test_an_unreachable_supervisor_is_a_502_and_the_sandbox_stays_unassigned(self) -> None:
        s = self.h.ready_sandbox(session_id=None, supervisor=None)
        pid = int(self.h.fake.path(self.h.container(s["id"]), f"{STATE}/supervisor.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        self.h.wait_dead(pid)
        spec = {"control_url": "https://control.example", "sandbox_token": "t"}
        for _ in range(2):
            r = self.c.post(f"/v1/sandboxes/{s['id']}/assign", {"session_id": "ses_9", "supervisor": spec})
            self.assertEqual((r.status, r.code), (502, "supervisor_unreachable"))
        self.assertIsNone(self.c.get(f"/v1/sandboxes/{s['id']}").json()["session_id"])
        r = self.c.get(f"/v1/sandboxes/{s['id']}/git")
        self.assertEqual((r.status, r.code), (502, "supervisor_unreachable"))

    def test_only_ready_pooled_sandboxes_are_assigned(self) -> None:
        spec = {"control_url": "https://control.example", "sandbox_token": "t"}
        owned = self.h.ready_sandbox()
        r = self.c.post(f"/v1/sandboxes/{owned['id']}/assign", {"session_id": "ses_9", "supervisor": spec})
        self.assertEqual((r.status, r.code), (409, "sandbox_assigned"))
        slow = self.c.post(
            "/v1/sandboxes",
            self.h.create_body(session_id=None, supervisor=None, env={"FAKE_SUPERVISOR_NEVER_READY": "1"}),
        ).json()
        self.h.wait(f"/v1/sandboxes/{slow['id']}", ("syncing",))
        r = self.c.post(f"/v1/sandboxes/{slow['id']}/assign", {"session_id": "ses_9", "supervisor": spec})
        self.assertEqual((r.status, r.code), (409, "sandbox_not_ready"))
