"""Test harness: the ASGI app behind a small asyncio HTTP/1.1 server, a signing HTTP client, a movable clock, a thread spawner and a git repository."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from nightshift_modal.backend import Config, ModalBackend
from nightshift_modal.http import ProviderApp
from nightshift_modal.seam import LocalStore
from nightshift_modal.signing import NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, new_nonce, sign

from .fake_modal import FakeModal

SECRET = b"test-provider-secret"
STATE_KEY = b"test-state-key-0123456789abcdef"
# The provider's model settings in the tests (keys that must never reach a sandbox, its files or the store).
MODEL_KEY = "sk-model-secret"
PROVIDER_KEY = "sk-provider"
# The provider logs failures it records; the tests check them on the objects instead.
logging.getLogger("nightshift").addHandler(logging.NullHandler())
FAKE_SUPERVISOR = str(Path(__file__).with_name("fake_supervisor.py"))


class Clock:
    """Wall-clock milliseconds plus an offset the tests move forward."""

    def __init__(self) -> None:
        self.offset_ms = 0

    def __call__(self) -> int:
        return int(time.time() * 1000) + self.offset_ms

    def advance(self, ms: int) -> None:
        self.offset_ms += ms


class ThreadSpawner:
    """Runs background jobs in threads; `join()` waits for all of them."""

    def __init__(self) -> None:
        self.backend: ModalBackend | None = None
        self.threads: list[threading.Thread] = []
        self.jobs: list[tuple[str, str, int]] = []

    def spawn(self, job: str, target: str, generation: int) -> None:
        assert self.backend is not None
        self.jobs.append((job, target, generation))
        t = threading.Thread(target=self.backend.run_job, args=(job, target, generation), daemon=True)
        self.threads.append(t)
        t.start()

    def join(self, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(deadline - time.monotonic(), 0))
            if t.is_alive():
                raise AssertionError("a background job did not finish")


class AsgiServer:
    """Serves an ASGI app on 127.0.0.1 with HTTP/1.1, one request per connection (closed after the answer)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    def start(self) -> None:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._connection, "127.0.0.1", 0), self._loop
        ).result()
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method, target, _ = (await reader.readline()).decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers: list[tuple[bytes, bytes]] = []
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip().lower().encode("latin-1"), value.strip().encode("latin-1")))
        length = int(dict(headers).get(b"content-length", b"0"))
        body = await reader.readexactly(length) if length else b""
        raw_path, _, query = target.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": unquote(raw_path),
            "raw_path": raw_path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "headers": headers,
        }
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await reader.read()  # returns once the client has closed the connection
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                lines = [f"HTTP/1.1 {status} {http.client.responses.get(status, '')}"]
                lines += [f"{k.decode()}: {v.decode()}" for k, v in message["headers"]]
                lines.append("connection: close")
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            else:
                writer.write(message.get("body", b""))
            await writer.drain()

        await self.app(scope, receive, send)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        """The contract's error code, for an error answer."""
        return self.json()["error"]["code"]


class Client:
    """An HTTP client that signs every request the way the control plane does (core/src/signing.rs)."""

    def __init__(self, base_url: str, secret: bytes, clock: Any) -> None:
        u = urlsplit(base_url)
        self._https = u.scheme == "https"
        self._host = u.hostname or "127.0.0.1"
        self._port = u.port
        self._secret = secret
        self._clock = clock

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        signed: bool = True,
        timeout_s: float = 30,
    ) -> Response:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        h = {"content-type": "application/json"} if data else {}
        if signed:
            ts = self._clock()
            nonce = new_nonce()
            h[TIMESTAMP_HEADER] = str(ts)
            h[NONCE_HEADER] = nonce
            h[SIGNATURE_HEADER] = sign(self._secret, method, path, ts, nonce, data)
        h.update(headers or {})
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=timeout_s)
        try:
            conn.request(method, path, body=data, headers=h)
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        return self.request("POST", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> Response:
        return self.request("DELETE", path, **kw)


def sse_data(body: bytes) -> list[str]:
    """The `data:` lines of an event stream, without the final `end` event's."""
    events = body.decode().split("\n\n")
    assert events[-2:] == ["event: end\ndata: {}", ""], events[-3:]
    return [e.removeprefix("data: ") for e in events[:-2]]


def make_repo(parent: Path) -> Path:
    """A git repository with one commit on `main` (its path is a clone URL)."""
    repo = parent / "origin"
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    for args in (
        ["init", "--quiet", "-b", "main", str(repo)],
        ["-C", str(repo), "commit", "--quiet", "--allow-empty", "-m", "init"],
    ):
        subprocess.run(["git", *args], check=True, env=env)
    (repo / "README.md").write_text("hello\n")
    subprocess.run(["git", "-C", str(repo), "add", "README.md"], check=True, env=env)
    subprocess.run(["git", "-C", str(repo), "commit", "--quiet", "-m", "readme"], check=True, env=env)
    return repo


class Harness:
    """The provider wired to the fake Modal, served over HTTP; `close()` leaves no process or file behind.

    By default it runs in dev mode (clone URLs are local paths) with the model proxy on at its own URL;
    `config` fields override that (`model_proxy_url=None` turns the proxy off)."""

    def __init__(self, **config: Any) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="ns-modal-test-"))
        self.repo = make_repo(self.tmp)
        self.clock = Clock()
        self.fake = FakeModal()
        self.store = LocalStore()
        self.spawner = ThreadSpawner()
        self.server = AsgiServer(None)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.config = replace(
            Config(
                supervisor_command=(sys.executable, "-I", "-S", FAKE_SUPERVISOR),
                supervisor_env={
                    "NIGHTSHIFT_MODEL": "test/model",
                    "NIGHTSHIFT_MODEL_URL": "https://model.example/v1",
                    "NIGHTSHIFT_MODEL_KEY": MODEL_KEY,
                    "ANTHROPIC_API_KEY": PROVIDER_KEY,
                },
                poll_interval_s=0.02,
                state_key=STATE_KEY,
                model_proxy_url=self.url,
                dev_mode=True,
            ),
            **config,
        )
        self.backend = ModalBackend(self.fake, self.store, self.spawner, self.config, clock=self.clock)
        self.spawner.backend = self.backend
        self.server.app = ProviderApp(self.backend, SECRET, clock=self.clock, poll_interval_s=0.05)
        self.client = Client(self.url, SECRET, self.clock)

    def close(self) -> None:
        for key, rec in self.store.scan("sbx:"):
            if rec["sandbox"]["status"] != "terminated":
                self.backend.terminate(key.removeprefix("sbx:"))
        self.spawner.join()
        self.server.stop()
        self.fake.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def create_body(self, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "session_id": "ses_1",
            "repository": {"clone_url": str(self.repo), "base_branch": "main"},
            "supervisor": {"control_url": "https://control.example", "sandbox_token": "tok_1"},
        }
        body.update(fields)
        return body

    def wait(self, path: str, statuses: tuple[str, ...], timeout_s: float = 15) -> dict[str, Any]:
        """Polls `GET path` until the object's status is one of `statuses`."""
        deadline = time.monotonic() + timeout_s
        while True:
            r = self.client.get(path)
            assert r.status == 200, (r.status, r.body)
            obj = r.json()
            if obj["status"] in statuses:
                return obj
            if time.monotonic() > deadline:
                raise AssertionError(f"{path} is still {obj['status']}: {obj}")
            time.sleep(0.02)

    def ready_sandbox(self, **fields: Any) -> dict[str, Any]:
        return self.ready_sandboxes(fields)[0]

    def ready_sandboxes(self, *fields: dict[str, Any]) -> list[dict[str, Any]]:
        """Creates a sandbox for each set of fields, all at once, and waits until they are ready."""
        ids = []
        for f in fields:
            r = self.client.post("/v1/sandboxes", self.create_body(**f))
            assert r.status == 201, (r.status, r.body)
            ids.append(r.json()["id"])
        ready = [self.wait(f"/v1/sandboxes/{sid}", ("ready", "failed")) for sid in ids]
        assert all(s["status"] == "ready" for s in ready), ready
        return ready

    @staticmethod
    def wait_dead(pid: int, timeout_s: float = 5) -> None:
        deadline = time.monotonic() + timeout_s
        while Path(f"/proc/{pid}").exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"process {pid} still runs")
            time.sleep(0.01)

    def record(self, key: str) -> dict[str, Any]:
        """A stored record (`sbx:…`, `snp:…`, `img:…`), which must exist."""
        rec = self.store.get(key)
        assert rec is not None, key
        return rec

    def container(self, sid: str) -> str:
        """The Modal sandbox a running sandbox is on."""
        container: str | None = self.record(f"sbx:{sid}")["container"]
        assert container, sid
        return container

    def exec(self, sid: str, *command: str, **fields: Any) -> dict[str, Any]:
        r = self.client.post(f"/v1/sandboxes/{sid}/exec", {"command": list(command), **fields})
        assert r.status == 200, (r.status, r.body)
        return r.json()


class ProviderTestCase(unittest.TestCase):
    """A test with its own provider, fake Modal and repository (`harness_config` overrides its Config)."""

    harness_config: dict[str, Any] = {}

    def setUp(self) -> None:
        self.h = Harness(**self.harness_config)
        self.addCleanup(self.h.close)
        self.c = self.h.client
