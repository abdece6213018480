"""The seam between the provider and Modal: the ModalApi, Store and Spawner protocols, their value types, and a Store in memory."""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .egress import Egress


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


class SandboxGone(Exception):
    """The Modal sandbox has ended or no longer exists."""


class ModalApi(Protocol):
    """Every call the provider makes into Modal; `sandbox` and `image` are Modal object ids."""

    def create_sandbox(self, image: str | None, timeout_s: int, egress: Egress) -> str:
        """Starts a sandbox (from `image`, or the provider's base image) that lives `timeout_s` at most and reaches
        only the hosts `egress` allows (Modal enforces it outside the container)."""

    def set_egress(self, sandbox: str, egress: Egress) -> None:
        """Replaces a running sandbox's outbound allowlist (a pooled sandbox learns its control plane at assign)."""

    def run(self, sandbox: str, argv: Sequence[str], stdin: bytes, timeout_s: int) -> ExecResult:
        """Runs a command to its end."""

    def launch(self, sandbox: str, argv: Sequence[str], stdin: bytes) -> None:
        """Starts a long-running command, writes `stdin` and closes it, and returns at once."""

    def snapshot_filesystem(self, sandbox: str, ttl_s: int | None) -> str:
        """Snapshots the sandbox's filesystem into an Image that Modal keeps `ttl_s` (None: until deleted)."""

    def terminate(self, sandbox: str) -> None:
        """Ends the sandbox; idempotent."""

    def poll(self, sandbox: str) -> int | None:
        """None while the sandbox runs, else its exit code."""

    def delete_image(self, image: str) -> None:
        """Frees an image the provider no longer needs."""


class Store(Protocol):
    """JSON-shaped records by key (a modal.Dict in production)."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, value: dict[str, Any]) -> None: ...

    def put_new(self, key: str, value: dict[str, Any]) -> bool:
        """Stores `value` only if `key` is absent (atomically); True when stored."""

    def delete(self, key: str) -> None: ...

    def scan(self, prefix: str) -> list[tuple[str, dict[str, Any]]]: ...


class Spawner(Protocol):
    """Runs `ModalBackend.run_job(job, target, generation)` in the background (a Modal Function in production)."""

    def spawn(self, job: str, target: str, generation: int) -> None: ...


class LocalStore:
    """A Store in this process's memory: values are copied in and out, as if serialised."""

    def __init__(self) -> None:
        self._data: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            v = self._data.get(key)
            return copy.deepcopy(v) if v is not None else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        json.dumps(value)
        with self._lock:
            self._data[key] = copy.deepcopy(value)

    def put_new(self, key: str, value: dict[str, Any]) -> bool:
        with self._lock:
            if key in self._data:
                return False
            self._data[key] = copy.deepcopy(value)
            return True

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)

    def scan(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return [(k, copy.deepcopy(v)) for k, v in self._data.items() if k.startswith(prefix)]
