"""The production seam: ModalApi on the Modal SDK (Sandboxes, filesystem snapshots, Images), a Store on modal.Dict and a Spawner on a Modal Function."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

import modal
import modal.experimental

from .egress import Egress
from .seam import ExecResult, SandboxGone

# Bytes written to a process's stdin between two drains (Modal buffers at most 128 KiB).
_STDIN_CHUNK = 64 * 1024
_SNAPSHOT_TIMEOUT_S = 300
_GONE = (modal.exception.NotFoundError, modal.exception.SandboxTerminatedError)


class ModalSandboxes:
    """ModalApi on `modal.Sandbox`; sandboxes belong to `app` and start from the published base image."""

    def __init__(self, app: modal.App, base_image_id: Callable[[], str]) -> None:
        self._app = app
        self._base_image_id = base_image_id

    def _sandbox(self, sandbox_id: str) -> modal.Sandbox:
        try:
            return modal.Sandbox.from_id(sandbox_id)
        except _GONE as e:
            raise SandboxGone(str(e)) from e

    def create_sandbox(self, image: str | None, timeout_s: int, egress: Egress) -> str:
        img = modal.Image.from_id(image or self._base_image_id())
        # Both lists are always given: an empty CIDR list opens no IP range; names pass on TLS (port 443) only.
        return modal.Sandbox.create(
            app=self._app,
            image=img,
            timeout=timeout_s,
            outbound_domain_allowlist=egress.modal_domains(),
            outbound_cidr_allowlist=egress.modal_cidrs(),
        ).object_id

    def set_egress(self, sandbox: str, egress: Egress) -> None:
        sb = self._sandbox(sandbox)
        try:
            sb._experimental_set_outbound_network_policy(
                outbound_domain_allowlist=egress.modal_domains(),
                outbound_cidr_allowlist=egress.modal_cidrs(),
            )
        except _GONE as e:
            raise SandboxGone(str(e)) from e

    def run(self, sandbox: str, argv: Sequence[str], stdin: bytes, timeout_s: int) -> ExecResult:
        sb = self._sandbox(sandbox)
        try:
            p = sb.exec(*argv, timeout=timeout_s, text=False)
            for i in range(0, len(stdin), _STDIN_CHUNK):
                p.stdin.write(stdin[i : i + _STDIN_CHUNK])
                p.stdin.drain()
            p.stdin.write_eof()
            p.stdin.drain()
            out = p.stdout.read()
            err = p.stderr.read()
            code = p.wait()
        except modal.exception.ExecTimeoutError:
            # Only past the backstop; the provider's own `timeout` wrapper normally ends the command first.
            return ExecResult(124, b"", b"the command ran past its time limit")
        except _GONE as e:
            raise SandboxGone(str(e)) from e
        return ExecResult(code, out, err)

    def launch(self, sandbox: str, argv: Sequence[str], stdin: bytes) -> None:
        sb = self._sandbox(sandbox)
        try:
            p = sb.exec(*argv, text=False)
            p.stdin.write(stdin)
            p.stdin.write_eof()
            p.stdin.drain()
        except _GONE as e:
            raise SandboxGone(str(e)) from e

    def snapshot_filesystem(self, sandbox: str, ttl_s: int | None) -> str:
        try:
            return self._sandbox(sandbox).snapshot_filesystem(timeout=_SNAPSHOT_TIMEOUT_S, ttl=ttl_s).object_id
        except _GONE as e:
            raise SandboxGone(str(e)) from e

    def terminate(self, sandbox: str) -> None:
        try:
            self._sandbox(sandbox).terminate()
        except (SandboxGone, *_GONE):
            pass

    def poll(self, sandbox: str) -> int | None:
        try:
            return self._sandbox(sandbox).poll()
        except _GONE as e:
            raise SandboxGone(str(e)) from e

    def delete_image(self, image: str) -> None:
        with suppress(modal.exception.NotFoundError):
            modal.experimental.image_delete(image)


class ModalDictStore:
    """Store on a `modal.Dict` (string keys, JSON-shaped values)."""

    def __init__(self, d: modal.Dict) -> None:
        self._d = d

    def get(self, key: str) -> dict[str, Any] | None:
        return self._d.get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self._d.put(key, value)

    def put_new(self, key: str, value: dict[str, Any]) -> bool:
        return self._d.put(key, value, skip_if_exists=True)

    def delete(self, key: str) -> None:
        with suppress(KeyError):
            self._d.pop(key)

    def scan(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        return [(k, v) for k, v in self._d.items() if isinstance(k, str) and k.startswith(prefix)]


class FunctionSpawner:
    """Spawner on a Modal Function `run_job(job, target, generation)`."""

    def __init__(self, run_job: modal.Function) -> None:
        self._run_job = run_job

    def spawn(self, job: str, target: str, generation: int) -> None:
        self._run_job.spawn(job, target, generation)
