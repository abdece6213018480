"""The Modal provider's behaviour (sandboxes, exec, logs, snapshots, images, git, the model proxy's checks), over a
small seam to the Modal SDK and a key-value store.

Containment on Modal: every Modal sandbox (boots and builds) is created with an egress allowlist; clones run inside
the sandbox; the store holds no model key and no sandbox token in plaintext (the token and any clone-URL credentials
are sealed with the state key, the per-boot model token only as a hash); with `model_proxy_url` set the supervisor
gets the proxy's URL and its model token instead of any key."""

from __future__ import annotations

import base64
import copy
import json
import logging
import math
import re
import hashlib
import hmac
import secrets
import shlex
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any

from . import model_proxy
from .egress import Egress, policy, url_host
from .errors import ProviderError, image_not_found, sandbox_not_found, snapshot_not_found
from .sealing import same_token, seal_json, token_hash, unseal_json
from .seam import ExecResult, ModalApi, SandboxGone, Spawner, Store
from .validate import (
    AssignRequest,
    BuildRequest,
    CreateRequest,
    ExecRequest,
    Repository,
    SupervisorSpec,
    check_clone_url,
    git_auth_env,
    redact_url,
)

log = logging.getLogger("nightshift.modal")

# Inside every Modal sandbox: the checkout, the home directory (caches), logs and supervisor state.
ROOT = "/nightshift"
REPO = f"{ROOT}/repo"
HOME = f"{ROOT}/home"
LOGS = f"{ROOT}/logs"
STATE = f"{ROOT}/state"

HOUR_MS = 3600 * 1000
MAX_LIFETIME_MS = 24 * HOUR_MS  # Modal's longest sandbox timeout
DEFAULT_BOOT_TIMEOUT_MS = 5 * 60 * 1000
MAX_BOOT_TIMEOUT_MS = 30 * 60 * 1000
DEFAULT_EXEC_TIMEOUT_MS = 60 * 1000
MAX_EXEC_TIMEOUT_MS = 10 * 60 * 1000
DEFAULT_SNAPSHOT_TTL_MS = 30 * 24 * HOUR_MS
DEFAULT_BUILD_TIMEOUT_MS = 20 * 60 * 1000
MAX_BUILD_TIMEOUT_MS = 3 * HOUR_MS
# A boot or build job that has not settled this long after its deadline has died with its worker.
JOB_GRACE_MS = 2 * 60 * 1000
# Ended sandboxes are forgotten this long after they end.
RETENTION_MS = 7 * 24 * HOUR_MS
LOCK_STALE_MS = 30 * 1000
MAX_OUTPUT = 1 << 20
LOG_TAIL_BYTES = 64 * 1024
BUILD_LOG_CHARS = 256 * 1024
INTERNAL_TIMEOUT_MS = 60 * 1000

_SERVICE = re.compile(r"[A-Za-z0-9_-]+")
_LIVE = ("creating", "syncing", "ready")
_ENDED = ("terminated", "failed")


def supervisor_env_from(environ: Mapping[str, str]) -> dict[str, str]:
    """Settings for every supervisor, picked as the local provider does: NIGHTSHIFT_*, *_API_KEY, *_BASE_URL."""
    return {
        k: v
        for k, v in environ.items()
        if k.startswith("NIGHTSHIFT_") or k.endswith("_API_KEY") or k.endswith("_BASE_URL")
    }


@dataclass(frozen=True)
class Config:
    # How the supervisor is started inside a sandbox (the image puts `nightshift-supervisor` on PATH).
    supervisor_command: tuple[str, ...] = ("nightshift-supervisor",)
    # Environment for every supervisor, sent on its stdin (model keys and settings).
    supervisor_env: Mapping[str, str] = field(default_factory=dict)
    # Between two readiness checks of a booting sandbox, and two reads of a followed log.
    poll_interval_s: float = 1.0
    # Seals secrets kept in the store (sandbox tokens, clone-URL credentials); app.py derives it from PROVIDER_SECRET.
    state_key: bytes = b""
    # The provider's public URL: when set, sandboxes reach their model through its `/v1/model/...` proxy and
    # hold no key. None: keys go to the supervisor's stdin (then a key can end up in the sandbox's files).
    model_proxy_url: str | None = None
    # Single-user dev mode (tests, local experiments): any clone URL, local paths included, is accepted.
    dev_mode: bool = False


@dataclass(frozen=True)
class LogChunk:
    text: str
    offset: int
    # More may come (the sandbox runs, the build goes on).
    alive: bool


@dataclass(frozen=True)
class _Ran:
    result: ExecResult
    timed_out: bool
    duration_ms: int


class _BuildFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _sbx(sid: str) -> str:
    return f"sbx:{sid}"


def _snp(snap_id: str) -> str:
    return f"snp:{snap_id}"


def _img(image_id: str) -> str:
    return f"img:{image_id}"


def _clone_error(stderr: str) -> str:
    s = stderr.lower()
    missing = ("repository not found", "does not exist", "does not appear to be a git repository")
    return "repository_not_found" if any(m in s for m in missing) else "clone_failed"


def _part(rec: dict[str, Any], name: str) -> dict[str, Any]:
    """The public object (`sandbox`, `snapshot`, `image`) inside a stored record."""
    obj: dict[str, Any] = rec[name]
    return obj


def _cut(data: bytes) -> str:
    return data[:MAX_OUTPUT].decode("utf-8", errors="replace")


class ModalBackend:
    """The provider contract on Modal Sandboxes; every Modal call goes through `api`, all state through `store`."""

    def __init__(
        self,
        api: ModalApi,
        store: Store,
        spawner: Spawner,
        config: Config | None = None,
        clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self._api = api
        self._store = store
        self._spawner = spawner
        self._cfg = config or Config()
        self._now = clock

    # ----- health -----

    def health(self) -> dict[str, Any]:
        return {"ok": True, "provider": "modal", "isolation": "gvisor"}

    # ----- sandboxes -----

    def create_sandbox(self, req: CreateRequest) -> dict[str, Any]:
        """`POST /v1/sandboxes`: records the sandbox and boots it in the background."""
        check_clone_url(req.repository.clone_url, dev_mode=self._cfg.dev_mode)
        if req.snapshot is not None:
            source = self._live_snapshot(req.snapshot)["image_ref"]
        elif req.image is not None:
            source = self._ready_image_ref(req.image)
        else:
            source = None
        return self._start_new(req, source)

    def restore(self, snapshot_id: str, req: CreateRequest) -> dict[str, Any]:
        """`POST /v1/snapshots/{id}/restore`: a new sandbox whose checkout is the snapshot's."""
        check_clone_url(req.repository.clone_url, dev_mode=self._cfg.dev_mode)
        source = self._live_snapshot(snapshot_id)["image_ref"]
        return self._start_new(replace(req, snapshot=snapshot_id), source)

    def _start_new(self, req: CreateRequest, source: str | None) -> dict[str, Any]:
        now = self._now()
        sid = _new_id("sbx_")
        lifetime = min(req.lifetime_ms or MAX_LIFETIME_MS, MAX_LIFETIME_MS)
        sandbox = {
            "id": sid,
            "session_id": req.session_id,
            "status": "creating",
            "repository": req.repository.public_json(),
            "image": req.image,
            "snapshot": req.snapshot,
            "created_at": now,
            "ready_at": None,
            "terminated_at": None,
            "expires_at": now + lifetime,
            "labels": dict(req.labels),
            "error": None,
        }
        self._store.put(
            _sbx(sid),
            {
                "sandbox": sandbox,
                **self._stored_create(sid, req),
                "source": source,
                "egress": None,
                "model_token_hash": None,
                "container": None,
                "port": None,
                "generation": 0,
                "boot_deadline": now + self._boot_timeout(req),
                "ended_at": None,
            },
        )
        self._spawner.spawn("boot", sid, 0)
        return copy.deepcopy(sandbox)

    # ----- secrets at rest -----

    def _stored_create(self, sid: str, req: CreateRequest) -> dict[str, Any]:
        """The create request as kept: `create` without the supervisor spec or URL credentials, `sealed` with them."""
        public = req.to_json()
        public["supervisor"] = None
        public["repository"]["clone_url"] = redact_url(req.repository.clone_url)
        secret = {
            "supervisor": req.supervisor.to_json() if req.supervisor else None,
            "clone_url": req.repository.clone_url,
            # The clone's token (short-lived) is kept sealed only until the clone runs.
            "access_token": req.repository.access_token,
        }
        return {"create": public, "sealed": seal_json(self._cfg.state_key, secret, _sbx(sid))}

    def _create_of(self, sid: str, rec: dict[str, Any]) -> CreateRequest:
        """The full create request of a record (its sealed part opened)."""
        c = CreateRequest.from_json(rec["create"])
        if "sealed" not in rec:  # a record written before secrets were sealed: its `create` is complete
            return c
        secret = unseal_json(self._cfg.state_key, rec["sealed"], _sbx(sid))
        sup = secret["supervisor"]
        return replace(
            c,
            supervisor=SupervisorSpec(**sup) if sup else None,
            repository=replace(c.repository, clone_url=secret["clone_url"], access_token=secret.get("access_token")),
        )

    def _model_urls(self) -> list[str]:
        """The model endpoints a sandbox talks to: the proxy, or (without one) the upstreams themselves."""
        if self._cfg.model_proxy_url:
            return [self._cfg.model_proxy_url]
        return [u.base_url for u in model_proxy.upstreams(self._cfg.supervisor_env).values()]

    def _egress(self, c: CreateRequest) -> Egress:
        return policy(
            c.repository.egress,
            clone_url=c.repository.clone_url,
            control_url=c.supervisor.control_url if c.supervisor else None,
            model_urls=self._model_urls(),
        )

    @staticmethod
    def _boot_timeout(req: CreateRequest) -> int:
        return min(req.timeout_ms or DEFAULT_BOOT_TIMEOUT_MS, MAX_BOOT_TIMEOUT_MS)

    def get_sandbox(self, sid: str) -> dict[str, Any]:
        return _part(self._load(sid), "sandbox")

    def list_sandboxes(self, session_id: str | None, label: str | None) -> list[dict[str, Any]]:
        want = label.split(":", 1) if label is not None and ":" in label else None
        out = []
        for key, _ in self._store.scan("sbx:"):
            rec = self._settle(key.removeprefix("sbx:"))
            if rec is None:
                continue
            s = rec["sandbox"]
            if session_id is not None and s["session_id"] != session_id:
                continue
            if want is not None and s["labels"].get(want[0]) != want[1]:
                continue
            out.append(s)
        return sorted(out, key=lambda s: s["created_at"])

    def stop(self, sid: str) -> dict[str, Any]:
        """Snapshots the filesystem (the kept disk) and ends the container; `start` boots from that snapshot."""
        self._keep_tails(self._load(sid))
        taken: dict[str, Any] = {}

        def begin(rec: dict[str, Any]) -> None:
            status = rec["sandbox"]["status"]
            if status == "terminated":
                raise ProviderError(409, "sandbox_terminated", f"sandbox {sid} is terminated")
            if status == "stopped":
                return
            taken.update(container=rec["container"], generation=rec["generation"] + 1)
            rec["generation"] += 1
            rec["container"] = None
            rec["port"] = None
            rec["model_token_hash"] = None

        self._mutate(sid, begin)
        if not taken:
            return self.get_sandbox(sid)
        image = self._freeze(taken["container"]) if taken["container"] else None
        unneeded: list[str | None] = [image]

        def finish(rec: dict[str, Any]) -> None:
            if rec["generation"] != taken["generation"]:
                return  # terminated meanwhile: the new snapshot is nobody's
            if image is not None:
                unneeded[0], rec["source"] = rec["source"], image
            rec["sandbox"]["status"] = "stopped"

        rec = self._mutate(sid, finish)
        if unneeded[0] is not None:
            self._release_image(unneeded[0])
        return _part(rec, "sandbox")

    def _freeze(self, container: str) -> str | None:
        """The container's filesystem as an image (None if it is already gone); ends the container."""
        try:
            return self._api.snapshot_filesystem(container, None)
        except SandboxGone:
            return None
        finally:
            self._api.terminate(container)

    def start(self, sid: str) -> dict[str, Any]:
        """Boots a stopped sandbox again on its kept disk, with the same settings and token."""
        gen: list[int] = []

        def change(rec: dict[str, Any]) -> None:
            s = rec["sandbox"]
            if s["status"] != "stopped":
                raise ProviderError(
                    409,
                    "sandbox_not_stopped",
                    f"sandbox {sid} is {s['status']}; only a stopped sandbox can be started",
                )
            create = CreateRequest.from_json(rec["create"])
            now = self._now()
            lifetime = min(create.lifetime_ms or MAX_LIFETIME_MS, MAX_LIFETIME_MS)
            s.update(status="creating", ready_at=None, error=None, expires_at=now + lifetime)
            rec["generation"] += 1
            rec["boot_deadline"] = now + self._boot_timeout(create)
            gen.append(rec["generation"])

        rec = self._mutate(sid, change)
        self._spawner.spawn("boot", sid, gen[0])
        return _part(rec, "sandbox")

    def terminate(self, sid: str) -> dict[str, Any]:
        """Ends the sandbox and every process in it; idempotent."""
        self._load(sid)
        self._end(sid, None)
        return self.get_sandbox(sid)

    def _end(self, sid: str, error: dict[str, str] | None) -> None:
        """Terminates (with `error`, e.g. the lifetime), unless already terminated."""
        rec = self._store.get(_sbx(sid))
        if rec is not None and rec["sandbox"]["status"] != "terminated":
            self._keep_tails(rec)
        ended: dict[str, Any] = {}

        def change(r: dict[str, Any]) -> None:
            s = r["sandbox"]
            if s["status"] == "terminated":
                return
            now = self._now()
            ended.update(container=r["container"], source=r["source"])
            s.update(status="terminated", terminated_at=now)
            if error is not None:
                s["error"] = error
            r.update(container=None, port=None, ended_at=now, generation=r["generation"] + 1, model_token_hash=None)

        self._mutate(sid, change)
        if not ended:
            return
        if ended["container"]:
            self._api.terminate(ended["container"])
        if ended["source"]:
            self._release_image(ended["source"])
        self._store.delete(f"claim:{sid}")

    def _fail(self, sid: str, generation: int, code: str, message: str) -> None:
        """Fails the sandbox, if this boot's generation is still the live one, and ends its container."""
        rec = self._store.get(_sbx(sid))
        if rec is None or rec["generation"] != generation or rec["sandbox"]["status"] not in _LIVE:
            return
        self._keep_tails(rec)
        taken: list[str] = []

        def change(r: dict[str, Any]) -> None:
            if r["generation"] != generation or r["sandbox"]["status"] not in _LIVE:
                return
            if r["container"]:
                taken.append(r["container"])
            r["sandbox"].update(status="failed", error={"code": code, "message": message})
            r.update(
                container=None, port=None, ended_at=self._now(), generation=generation + 1, model_token_hash=None
            )

        self._mutate(sid, change)
        if taken:
            log.warning("sandbox %s failed: %s: %s", sid, code, message)
            self._api.terminate(taken[0])

    # ----- the record, its lock and its lazy rules -----

    @contextmanager
    def _locked(self, key: str) -> Iterator[None]:
        lock = f"lock:{key}"
        while not self._store.put_new(lock, {"at": self._now()}):
            held = self._store.get(lock)
            if held is not None and self._now() - held["at"] > LOCK_STALE_MS:
                self._store.delete(lock)
            else:
                time.sleep(0.005)
        try:
            yield
        finally:
            self._store.delete(lock)

    def _mutate(self, sid: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Applies `change` to the sandbox's record under its lock; `change` may refuse with ProviderError."""
        with self._locked(_sbx(sid)):
            rec = self._store.get(_sbx(sid))
            if rec is None:
                raise sandbox_not_found(sid)
            change(rec)
            self._store.put(_sbx(sid), rec)
            return rec

    def _commit(self, sid: str, generation: int, change: Callable[[dict[str, Any]], None]) -> bool:
        """Applies `change` if the record is still the live one of this boot; False when it was superseded."""
        applied: list[bool] = []

        def guarded(rec: dict[str, Any]) -> None:
            if rec["generation"] == generation and rec["sandbox"]["status"] in _LIVE:
                change(rec)
                applied.append(True)

        try:
            self._mutate(sid, guarded)
        except ProviderError:
            return False
        return bool(applied)

    def _load(self, sid: str) -> dict[str, Any]:
        rec = self._settle(sid)
        if rec is None:
            raise sandbox_not_found(sid)
        return rec

    def _settle(self, sid: str) -> dict[str, Any] | None:
        """The record after its time-based rules: the lifetime ends it; a boot past its deadline fails."""
        rec = self._store.get(_sbx(sid))
        if rec is None:
            return None
        s = rec["sandbox"]
        now = self._now()
        if s["status"] not in _ENDED and now >= s["expires_at"]:
            self._end(
                sid,
                {"code": "lifetime", "message": "the sandbox reached the end of its lifetime"},
            )
        elif s["status"] in ("creating", "syncing") and now > rec["boot_deadline"] + JOB_GRACE_MS:
            self._fail(sid, rec["generation"], "timeout", "the sandbox did not become ready in time")
        else:
            return rec
        return self._store.get(_sbx(sid))

    def _running(self, sid: str) -> tuple[dict[str, Any], str]:
        """A sandbox whose container runs, with that container."""
        rec = self._load(sid)
        s = rec["sandbox"]
        if s["status"] in _ENDED:
            raise ProviderError(409, "sandbox_terminated", f"sandbox {sid} is {s['status']}")
        if not rec["container"]:
            raise ProviderError(
                409,
                "sandbox_not_ready",
                f"sandbox {sid} is {s['status']} and has no running container; start it first",
            )
        return rec, rec["container"]

    # ----- commands in a sandbox -----

    def _run(
        self,
        container: str,
        argv: Sequence[str],
        timeout_ms: int,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: bytes = b"",
    ) -> _Ran:
        """Runs `argv` in `cwd` with `env`; coreutils `timeout` kills its process group after `timeout_ms`."""
        seconds = max(timeout_ms, 1) / 1000
        wrapped = ["env"]
        if cwd is not None:
            wrapped += ["-C", cwd]
        wrapped += [f"{k}={v}" for k, v in (env or {}).items()]
        wrapped += ["timeout", "-k", "2", f"{seconds:.3f}", *argv]
        started = time.monotonic()
        result = self._api.run(container, wrapped, stdin, math.ceil(seconds) + 10)
        duration_ms = int((time.monotonic() - started) * 1000)
        timed_out = result.exit_code in (124, 137) and duration_ms >= timeout_ms
        return _Ran(result, timed_out, duration_ms)

    def exec(self, sid: str, req: ExecRequest) -> dict[str, Any]:
        """`POST /v1/sandboxes/{id}/exec` in the checkout (or `cwd` inside it)."""
        _, container = self._running(sid)
        timeout_ms = min(req.timeout_ms if req.timeout_ms is not None else DEFAULT_EXEC_TIMEOUT_MS, MAX_EXEC_TIMEOUT_MS)
        cwd = REPO if req.cwd is None else f"{REPO}/{req.cwd.lstrip('/')}"
        env = {"HOME": HOME, "NIGHTSHIFT_SANDBOX_ID": sid, **req.env}
        try:
            ran = self._run(container, req.command, timeout_ms, cwd=cwd, env=env, stdin=(req.stdin or "").encode())
        except SandboxGone:
            raise ProviderError(409, "sandbox_terminated", f"sandbox {sid} has ended") from None
        r = ran.result
        if ran.timed_out:
            raise ProviderError(504, "exec_timeout", f"the command ran longer than {timeout_ms} ms and was killed")
        err = r.stderr.decode("utf-8", errors="replace")
        if (r.exit_code == 125 and err.startswith("env: cannot change directory")) or (
            r.exit_code in (126, 127) and err.startswith("timeout: failed to run command")
        ):
            raise ProviderError(400, "invalid_command", f"cannot run {req.command[0]}: {err.strip()}")
        return {
            "exit_code": r.exit_code,
            "stdout": _cut(r.stdout),
            "stderr": _cut(r.stderr),
            "duration_ms": ran.duration_ms,
            "truncated": len(r.stdout) > MAX_OUTPUT or len(r.stderr) > MAX_OUTPUT,
        }

    def _sh(self, container: str, script: str, *args: str, timeout_ms: int = INTERNAL_TIMEOUT_MS) -> ExecResult:
        return self._run(container, ["sh", "-c", script, "sh", *args], timeout_ms).result

    # ----- logs -----

    def read_log(self, sid: str, service: str, offset: int) -> LogChunk:
        """A service's log (`supervisor`, `opencode`, …) from byte `offset`; an ended container's from its kept tail."""
        if not _SERVICE.fullmatch(service):
            raise ProviderError(400, "invalid_service", "a service is a name such as `supervisor` or `opencode`")
        rec = self._load(sid)
        if rec["container"] and rec["sandbox"]["status"] in _LIVE:
            try:
                r = self._sh(
                    rec["container"],
                    'test -f "$1" || exit 3; tail -c +"$2" "$1"',
                    f"{LOGS}/{service}.log",
                    str(offset + 1),
                )
                if r.exit_code == 0:
                    return LogChunk(r.stdout.decode("utf-8", errors="replace"), offset + len(r.stdout), True)
            except SandboxGone:
                pass
        tail = (self._store.get(f"tail:{sid}") or {}).get(service)
        if tail is None:
            if offset == 0:
                raise ProviderError(
                    404,
                    "log_not_found",
                    f"sandbox {sid} has no log `{service}`; try `supervisor` or `opencode`",
                )
            return LogChunk("", offset, False)
        data = base64.b64decode(tail["data"])
        start = tail["end"] - len(data)
        rest = data[max(offset - start, 0) :]
        return LogChunk(rest.decode("utf-8", errors="replace"), max(offset, tail["end"]), False)

    def _keep_tails(self, rec: dict[str, Any]) -> None:
        """Keeps the last bytes of every log of a container that is about to end (for `logs` afterwards)."""
        if not rec["container"]:
            return
        try:
            r = self._sh(
                rec["container"],
                'cd "$1" 2>/dev/null || exit 0; for f in *.log; do [ -f "$f" ] || continue; '
                'echo "${f%.log}"; wc -c < "$f"; tail -c "$2" "$f" | base64 | tr -d "\\n"; echo; done',
                LOGS,
                str(LOG_TAIL_BYTES),
            )
        except SandboxGone:
            return
        lines = r.stdout.decode().splitlines()
        tails = {
            name: {"end": int(size), "data": data}
            for name, size, data in zip(lines[0::3], lines[1::3], lines[2::3], strict=False)
        }
        if tails:
            self._store.put(f"tail:{rec['sandbox']['id']}", tails)

    # ----- snapshots -----

    def snapshot(self, sid: str, ttl_ms: int | None) -> dict[str, Any]:
        """`POST /v1/sandboxes/{id}/snapshot`: the filesystem (checkout included) as a Modal image."""
        rec = self._load(sid)
        status = rec["sandbox"]["status"]
        if status in _ENDED:
            raise ProviderError(409, "sandbox_terminated", f"sandbox {sid} is {status}")
        ttl = ttl_ms if ttl_ms is not None else DEFAULT_SNAPSHOT_TTL_MS
        if status == "stopped" and rec["source"]:
            image = rec["source"]
        else:
            _, container = self._running(sid)
            try:
                image = self._api.snapshot_filesystem(container, max(1, math.ceil(ttl / 1000)))
            except SandboxGone:
                raise ProviderError(409, "sandbox_terminated", f"sandbox {sid} has ended") from None
        now = self._now()
        snap: dict[str, Any] = {
            "id": _new_id("snp_"),
            "sandbox_id": sid,
            "created_at": now,
            "expires_at": now + ttl,
        }
        self._store.put(_snp(snap["id"]), {"snapshot": snap, "image_ref": image})
        return snap

    def _live_snapshot(self, snap_id: str) -> dict[str, Any]:
        rec = self._store.get(_snp(snap_id))
        if rec is None:
            raise snapshot_not_found(snap_id)
        if self._now() >= rec["snapshot"]["expires_at"]:
            self.delete_snapshot(snap_id)
            raise snapshot_not_found(snap_id)
        return rec

    def get_snapshot(self, snap_id: str) -> dict[str, Any]:
        return _part(self._live_snapshot(snap_id), "snapshot")

    def delete_snapshot(self, snap_id: str) -> dict[str, Any]:
        """Idempotent; frees the snapshot's image unless a sandbox still needs it."""
        rec = self._store.get(_snp(snap_id))
        self._store.delete(_snp(snap_id))
        if rec is not None:
            self._release_image(rec["image_ref"])
        return {"id": snap_id, "deleted": True}

    def _release_image(self, ref: str) -> None:
        """Deletes a Modal image that no record needs any more; one still needed is retried by the sweep."""
        needed = (
            any(r["image_ref"] == ref for _, r in self._store.scan("snp:"))
            or any(r["image_ref"] == ref for _, r in self._store.scan("img:"))
            or any(r["source"] == ref and r["sandbox"]["status"] != "terminated" for _, r in self._store.scan("sbx:"))
        )
        if needed:
            self._store.put(f"gc:{ref}", {"ref": ref})
            return
        self._api.delete_image(ref)
        self._store.delete(f"gc:{ref}")

    # ----- pools -----

    def assign(self, sid: str, req: AssignRequest) -> dict[str, Any]:
        """Gives a pooled, ready sandbox to a session; its supervisor dials the session at once."""
        rec = self._load(sid)
        s = rec["sandbox"]
        if s["session_id"] is not None:
            raise ProviderError(409, "sandbox_assigned", f"sandbox {sid} already works for another session")
        if s["status"] != "ready" or not rec["port"]:
            raise ProviderError(
                409, "sandbox_not_ready", f"sandbox {sid} is {s['status']}; only a ready sandbox can be assigned"
            )
        if not self._store.put_new(f"claim:{sid}", {"session_id": req.session_id}):
            raise ProviderError(409, "sandbox_assigned", f"sandbox {sid} already works for another session")
        body = {"session_id": req.session_id, **req.supervisor.to_json()}
        current = Egress(tuple(rec.get("egress") or ()))
        egress = current.with_host(url_host(req.supervisor.control_url))
        try:
            if egress != current:
                # The control plane's host joins the allowlist before the supervisor dials it.
                try:
                    self._api.set_egress(rec["container"], egress)
                except SandboxGone:
                    raise ProviderError(502, "supervisor_unreachable", "the sandbox has ended") from None
            status, _ = self._to_supervisor(rec, "POST", "/assign", json.dumps(body).encode())
            if not 200 <= status < 300:
                raise ProviderError(502, "supervisor_unreachable", f"the supervisor answered {status}")
        except BaseException:
            self._store.delete(f"claim:{sid}")
            raise

        def change(r: dict[str, Any]) -> None:
            create = self._create_of(sid, r)
            labels = {**create.labels, **req.labels}
            c = replace(create, session_id=req.session_id, supervisor=req.supervisor, labels=labels)
            r["sandbox"]["session_id"] = req.session_id
            r["sandbox"]["labels"] = dict(labels)
            r.update(self._stored_create(sid, c), egress=list(egress.allow))

        return _part(self._mutate(sid, change), "sandbox")

    # ----- git, through the supervisor's loopback API -----

    def git(self, sid: str, method: str, path: str) -> tuple[int, Any]:
        """`GET …/git` and `POST …/git/sync`: the supervisor's answer, status and body."""
        rec = self._load(sid)
        status = rec["sandbox"]["status"]
        if status in _ENDED:
            raise ProviderError(409, "sandbox_terminated", f"sandbox {sid} is {status}")
        if not rec["port"] or not rec["container"]:
            return 200, {"sync": {"state": "not_started"}, "branch": None, "head": None, "dirty": False}
        return self._to_supervisor(rec, method, path, b"")

    def _api_secret(self, sid: str) -> str:
        """The bearer secret of a sandbox's supervisor API: derived from the state key, never stored."""
        return hmac.new(self._cfg.state_key, b"supervisor-api:" + sid.encode(), hashlib.sha256).hexdigest()[:32]

    def _to_supervisor(self, rec: dict[str, Any], method: str, path: str, body: bytes) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{rec['port']}{path}"
        sid = rec["sandbox"]["id"]
        # The secret goes in a header read from curl's stdin config, so it is never on a command line.
        argv = ["curl", "-sS", "--max-time", "20", "-X", method, "-w", "\n%{http_code}"]
        argv += ["-H", f"authorization: Bearer {self._api_secret(sid)}"]
        if body:
            argv += ["-H", "content-type: application/json", "--data-binary", "@-"]
        try:
            ran = self._run(rec["container"], [*argv, url], 30_000, stdin=body)
        except SandboxGone:
            raise ProviderError(502, "supervisor_unreachable", "the sandbox has ended") from None
        r = ran.result
        if r.exit_code != 0:
            why = r.stderr.decode("utf-8", errors="replace").strip()
            raise ProviderError(502, "supervisor_unreachable", f"the sandbox's supervisor did not answer: {why}")
        text, _, code = r.stdout.decode("utf-8", errors="replace").rpartition("\n")
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        return int(code), answer

    # ----- the model proxy -----

    def model_route(self, sid: str, name: str, token: str) -> model_proxy.Upstream:
        """The upstream a sandbox's model request goes to, if `token` is the current model token of a live sandbox."""
        rec = self._store.get(_sbx(sid))
        if rec is None or rec["sandbox"]["status"] not in _LIVE or not same_token(token, rec.get("model_token_hash")):
            raise ProviderError(
                401, "model_token_refused", "the model token is not that of a running sandbox; it ends with its boot"
            )
        upstream = model_proxy.upstreams(self._cfg.supervisor_env).get(name)
        if upstream is None or not self._cfg.model_proxy_url:
            raise ProviderError(404, "model_not_found", f"the provider has no model `{name}`")
        return upstream

    # ----- background jobs -----

    def run_job(self, job: str, target: str, generation: int) -> None:
        """Entry point of the background worker."""
        if job == "boot":
            self._boot(target, generation)
        elif job == "build":
            self._build(target)
        else:
            raise ValueError(f"unknown job {job}")

    def _boot(self, sid: str, generation: int) -> None:
        rec = self._store.get(_sbx(sid))
        if rec is None or rec["generation"] != generation or rec["sandbox"]["status"] != "creating":
            return
        timeout_s = max(1, min(MAX_LIFETIME_MS // 1000, math.ceil((rec["sandbox"]["expires_at"] - self._now()) / 1000)))
        create = self._create_of(sid, rec)
        egress = self._egress(create)
        # A new model token for every boot: one kept in an image or snapshot of an earlier boot is dead.
        model_token = secrets.token_urlsafe(32)
        try:
            container = self._api.create_sandbox(rec["source"], timeout_s, egress)
        except Exception as e:  # any Modal failure fails the boot
            self._fail(sid, generation, "internal", f"Modal could not start the sandbox: {e}")
            return
        started = {"container": container, "egress": list(egress.allow), "model_token_hash": token_hash(model_token)}
        if not self._commit(sid, generation, lambda r: r.update(started)):
            self._api.terminate(container)
            return
        try:
            failure = self._bring_up(sid, generation, container, create, rec["boot_deadline"], model_token)
        except SandboxGone:
            failure = ("sandbox_exited", "the sandbox's container ended while it booted")
        except Exception as e:  # reported on the sandbox
            log.exception("boot of %s", sid)
            failure = ("internal", f"the boot failed: {e}")
        if failure is not None:
            self._fail(sid, generation, *failure)

    def _bring_up(
        self, sid: str, generation: int, container: str, c: CreateRequest, deadline: int, model_token: str
    ) -> tuple[str, str] | None:
        """Checkout, supervisor, readiness; the failure's code and message, or None."""
        prepared = self._sh(
            container,
            'mkdir -p "$1/home" "$1/logs" "$1/state" && rm -rf "$1/state"/* && : > "$1/logs/supervisor.log" '
            '&& if [ -d "$1/repo/.git" ]; then echo checkout; fi',
            ROOT,
        )
        if prepared.exit_code != 0:
            return "internal", f"could not prepare the sandbox: {prepared.stderr.decode(errors='replace').strip()}"
        if prepared.stdout.strip() != b"checkout":
            failure = self._clone(container, c.repository, deadline)
            if failure is not None:
                return failure
        self._launch_supervisor(sid, container, c, model_token)
        if not self._commit(sid, generation, lambda r: r["sandbox"].update(status="syncing")):
            return None
        while True:
            port, ready, alive = self._supervisor_state(container)
            if ready:
                self._commit(sid, generation, self._mark_ready(port))
                return None
            # Past the deadline the reason is the deadline, even if the supervisor has just been
            # ended for it (checking liveness first raced with that and said `sandbox_exited`).
            if self._now() > deadline:
                return "timeout", "the sandbox did not become ready in time"
            if not alive:
                return "sandbox_exited", "the supervisor exited; see logs/supervisor"
            if not self._commit(sid, generation, self._set_port(port)):
                return None
            time.sleep(self._cfg.poll_interval_s)

    @staticmethod
    def _set_port(port: int | None) -> Callable[[dict[str, Any]], None]:
        def change(rec: dict[str, Any]) -> None:
            rec["port"] = port

        return change

    def _mark_ready(self, port: int | None) -> Callable[[dict[str, Any]], None]:
        now = self._now()

        def change(rec: dict[str, Any]) -> None:
            rec["port"] = port
            rec["sandbox"].update(status="ready", ready_at=now)

        return change

    def _clone(self, container: str, repo: Repository, deadline: int) -> tuple[str, str] | None:
        ran = self._run(
            container,
            ["git", "clone", "--quiet", "--branch", repo.base_branch, repo.clone_url, REPO],
            max(deadline - self._now(), 1),
            env={"GIT_TERMINAL_PROMPT": "0", "HOME": HOME, **(git_auth_env(repo.access_token) if repo.access_token else {})},
        )
        shown = redact_url(repo.clone_url)
        if ran.timed_out:
            return "timeout", f"git clone of {shown} ran past the time limit"
        if ran.result.exit_code != 0:
            err = redact_url(ran.result.stderr.decode("utf-8", errors="replace").strip())
            return _clone_error(err), f"git clone of {shown} failed: {err}"
        return None

    def _launch_supervisor(self, sid: str, container: str, c: CreateRequest, model_token: str) -> None:
        """Starts `nightshift-supervisor` and writes its one secrets line on stdin (never to disk or an image).

        With the model proxy the line holds no key: each model's URL and key variables name the proxy's route for
        this sandbox and its model token."""
        env = {
            "HOME": HOME,
            "NIGHTSHIFT_SANDBOX_ID": sid,
            "NIGHTSHIFT_SESSION_ID": c.session_id or "",
            "NIGHTSHIFT_SANDBOX_DIR": ROOT,
            "NIGHTSHIFT_BASE_BRANCH": c.repository.base_branch,
        }
        script = (
            f"echo $$ > {STATE}/supervisor.pid; "
            f"exec {shlex.join(self._cfg.supervisor_command)} >> {LOGS}/supervisor.log 2>&1"
        )
        merged = {**self._cfg.supervisor_env, **c.env}
        if self._cfg.model_proxy_url:
            routes = model_proxy.upstreams(self._cfg.supervisor_env)
            merged = model_proxy.sandbox_env(merged, self._cfg.model_proxy_url, sid, model_token, routes)
        secrets_line = {
            "supervisor": c.supervisor.to_json() if c.supervisor else None,
            "env": merged,
            "api_secret": self._api_secret(sid),
        }
        argv = ["env", *[f"{k}={v}" for k, v in env.items()], "sh", "-c", script]
        self._api.launch(container, argv, (json.dumps(secrets_line) + "\n").encode())

    def _supervisor_state(self, container: str) -> tuple[int | None, bool, bool]:
        """The supervisor's published port, whether it is ready, and whether its process lives."""
        r = self._sh(
            container,
            'cat "$1/supervisor.json" 2>/dev/null; echo; '
            'if [ ! -f "$1/supervisor.pid" ]; then echo starting; '
            'elif kill -0 "$(cat "$1/supervisor.pid")" 2>/dev/null; then echo alive; else echo dead; fi',
            STATE,
        )
        published, _, liveness = r.stdout.decode("utf-8", errors="replace").strip().rpartition("\n")
        try:
            state = json.loads(published)
        except ValueError:
            state = {}
        port = state.get("port") if isinstance(state, dict) else None
        ready = isinstance(state, dict) and state.get("ready") is True
        return (port if isinstance(port, int) else None), ready, liveness.strip() != "dead"

    # ----- images -----

    def build_image(self, req: BuildRequest) -> dict[str, Any]:
        """`POST /v1/images`: records the image and builds it in the background."""
        check_clone_url(req.repository.clone_url, dev_mode=self._cfg.dev_mode)
        now = self._now()
        image: dict[str, Any] = {
            "id": _new_id("img_"),
            "status": "building",
            "repository": req.repository.public_json(),
            "commit": None,
            "created_at": now,
            "ready_at": None,
            "setup": list(req.setup),
            "test": req.test,
            "test_exit_code": None,
            "labels": dict(req.labels),
            "error": None,
        }
        timeout = min(req.timeout_ms or DEFAULT_BUILD_TIMEOUT_MS, MAX_BUILD_TIMEOUT_MS)
        self._store.put(f"blog:{image['id']}", {"dropped": 0, "text": ""})
        sealed = seal_json(
            self._cfg.state_key,
            {"clone_url": req.repository.clone_url, "access_token": req.repository.access_token},
            _img(image["id"]),
        )
        self._store.put(
            _img(image["id"]), {"image": image, "image_ref": None, "deadline": now + timeout, "sealed": sealed}
        )
        self._spawner.spawn("build", image["id"], 0)
        return image

    def _load_image(self, image_id: str) -> dict[str, Any]:
        rec = self._store.get(_img(image_id))
        if rec is None:
            raise image_not_found(image_id)
        if rec["image"]["status"] == "building" and self._now() > rec["deadline"] + JOB_GRACE_MS:
            self._settle_build(image_id, "timeout", "the build did not finish in time")
            rec = self._store.get(_img(image_id))
            if rec is None:
                raise image_not_found(image_id)
        return rec

    def get_image(self, image_id: str) -> dict[str, Any]:
        return _part(self._load_image(image_id), "image")

    def _ready_image_ref(self, image_id: str) -> str:
        rec = self._load_image(image_id)
        status = rec["image"]["status"]
        if status != "ready":
            raise ProviderError(409, "image_not_ready", f"image {image_id} is {status}; start from a ready image")
        ref: str = rec["image_ref"]
        return ref

    def delete_image(self, image_id: str) -> dict[str, Any]:
        """Idempotent; a build still running notices and stops."""
        rec = self._store.get(_img(image_id))
        self._store.delete(_img(image_id))
        self._store.delete(f"blog:{image_id}")
        if rec is not None and rec["image_ref"]:
            self._release_image(rec["image_ref"])
        return {"id": image_id, "deleted": True}

    def read_build_log(self, image_id: str, offset: int) -> LogChunk:
        rec = self._load_image(image_id)
        blog = self._store.get(f"blog:{image_id}") or {"dropped": 0, "text": ""}
        start = max(offset - blog["dropped"], 0)
        text = blog["text"][start:]
        return LogChunk(text, blog["dropped"] + start + len(text), rec["image"]["status"] == "building")

    def _note(self, image_id: str, text: str) -> None:
        """Appends to the build log (the build job is its only writer), keeping its newest part."""
        blog = self._store.get(f"blog:{image_id}")
        if blog is None:
            return
        if text and not text.endswith("\n"):
            text += "\n"
        full = blog["text"] + text
        cut = max(len(full) - BUILD_LOG_CHARS, 0)
        self._store.put(f"blog:{image_id}", {"dropped": blog["dropped"] + cut, "text": full[cut:]})

    def _update_image(self, image_id: str, image_ref: str | None = None, **fields: Any) -> bool:
        """Updates a building image (and sets its Modal image); False once it is deleted or settled."""
        with self._locked(_img(image_id)):
            rec = self._store.get(_img(image_id))
            if rec is None or rec["image"]["status"] != "building":
                return False
            rec["image"].update(fields)
            if image_ref is not None:
                rec["image_ref"] = image_ref
            self._store.put(_img(image_id), rec)
            return True

    def _settle_build(self, image_id: str, code: str, message: str) -> None:
        if self._update_image(image_id, status="failed", error={"code": code, "message": message}):
            log.warning("image %s failed: %s: %s", image_id, code, message)
            self._note(image_id, f"build failed: {message}")

    def _build(self, image_id: str) -> None:
        rec = self._store.get(_img(image_id))
        if rec is None or rec["image"]["status"] != "building":
            return
        img = rec["image"]
        deadline = rec["deadline"]
        repo = Repository.from_json(img["repository"])
        if "sealed" in rec:  # (a record from before sealing holds the URL as given)
            opened = unseal_json(self._cfg.state_key, rec["sealed"], _img(image_id))
            repo = replace(repo, clone_url=opened["clone_url"], access_token=opened.get("access_token"))
        container = None
        try:
            self._note(image_id, f"$ git clone --branch {repo.base_branch} {redact_url(repo.clone_url)}")
            timeout_s = max(1, math.ceil((deadline - self._now()) / 1000) + 60)
            # A build reaches the defaults, the repository's patterns and its clone host: no control plane, no model.
            egress = policy(repo.egress, clone_url=repo.clone_url, control_url=None)
            container = self._api.create_sandbox(None, timeout_s, egress)
            self._sh(container, 'mkdir -p "$1/home" "$1/logs" "$1/state"', ROOT)
            failure = self._clone(container, repo, deadline)
            if failure is not None:
                raise _BuildFailed(*failure)
            commit = self._sh(container, 'git -C "$1" rev-parse HEAD', REPO).stdout.decode().strip() or None
            self._note(image_id, f"at {commit or '?'}")
            if not self._update_image(image_id, commit=commit):
                return
            for cmd in img["setup"]:
                code = self._step(image_id, container, cmd, deadline)
                if code != 0:
                    raise _BuildFailed(
                        "setup_failed", f"the setup command `{cmd}` exited with {code}; see the build log"
                    )
            if img["test"] is not None:
                code = self._step(image_id, container, img["test"], deadline)
                self._note(image_id, f"tests exited with {code} (recorded; the image is kept)")
                if not self._update_image(image_id, test_exit_code=code):
                    return
            ref = self._api.snapshot_filesystem(container, None)
            if self._update_image(image_id, image_ref=ref, status="ready", ready_at=self._now()):
                self._note(image_id, "image ready")
            else:
                self._release_image(ref)
        except _BuildFailed as f:
            self._settle_build(image_id, f.code, f.message)
        except SandboxGone:
            self._settle_build(image_id, "internal", "the build's sandbox ended unexpectedly")
        except Exception as e:  # reported on the image
            log.exception("build of %s", image_id)
            self._settle_build(image_id, "internal", f"the build failed: {e}")
        finally:
            if container is not None:
                self._api.terminate(container)

    def _step(self, image_id: str, container: str, cmd: str, deadline: int) -> int:
        """One build command with `sh -c` in the checkout (no secrets), its output into the build log."""
        if self._store.get(_img(image_id)) is None:
            raise _BuildFailed("internal", "the image was deleted during its build")
        left = deadline - self._now()
        if left <= 0:
            raise _BuildFailed("timeout", f"the build ran past its time limit before `{cmd}`")
        self._note(image_id, f"$ {cmd}")
        ran = self._run(container, ["sh", "-c", 'sh -c "$1" 2>&1', "sh", cmd], left, cwd=REPO, env={"HOME": HOME})
        self._note(image_id, ran.result.stdout.decode("utf-8", errors="replace"))
        if ran.timed_out:
            raise _BuildFailed("timeout", f"the build ran past its time limit during `{cmd}`")
        return ran.result.exit_code

    # ----- the periodic sweep -----

    def claim_nonce(self, nonce: str, forget_at: int) -> bool:
        """Records a verified request's nonce in the shared store; False when another web container already
        took it (a replay across containers, which a per-container cache cannot see)."""
        return self._store.put_new(f"nonce:{nonce}", {"until": forget_at})

    def sweep(self) -> None:
        """Applies the time-based rules everywhere, fails dead sandboxes, frees expired snapshots, unneeded images.

        It also reads every record, which keeps a modal.Dict from expiring entries that nobody asked for in a week.
        """
        now = self._now()
        for key, _ in self._store.scan("sbx:"):
            sid = key.removeprefix("sbx:")
            rec = self._settle(sid)
            if rec is None:
                continue
            status = rec["sandbox"]["status"]
            if status in ("syncing", "ready") and rec["container"]:
                self._check_alive(sid, rec)
            elif status in _ENDED and rec["ended_at"] is not None and now - rec["ended_at"] > RETENTION_MS:
                self._forget(sid, rec)
        for prefix, load in (("snp:", self._live_snapshot), ("img:", self._load_image)):
            for key, _ in self._store.scan(prefix):
                with suppress(ProviderError):
                    load(key.removeprefix(prefix))
        for _, rec in self._store.scan("gc:"):
            self._release_image(rec["ref"])
        # Nonces only matter inside the signing window.
        for key, rec in self._store.scan("nonce:"):
            if rec.get("until", 0) < now:
                self._store.delete(key)

    def _check_alive(self, sid: str, rec: dict[str, Any]) -> None:
        try:
            ended = self._api.poll(rec["container"]) is not None
            alive = not ended and self._supervisor_state(rec["container"])[2]
        except SandboxGone:
            alive = False
        if not alive:
            self._fail(
                sid, rec["generation"], "sandbox_exited", "the sandbox or its supervisor exited; see logs/supervisor"
            )

    def _forget(self, sid: str, rec: dict[str, Any]) -> None:
        for key in (_sbx(sid), f"tail:{sid}", f"claim:{sid}"):
            self._store.delete(key)
        if rec["source"]:
            self._release_image(rec["source"])
