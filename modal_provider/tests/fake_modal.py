"""An in-memory stand-in for Modal at the ModalApi seam: a sandbox is a temporary directory standing for its `/nightshift`, its commands are real local processes."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from nightshift_modal.backend import ROOT
from nightshift_modal.egress import Egress
from nightshift_modal.seam import ExecResult, SandboxGone

# `/nightshift` as a path of its own (not `/nightshift_modal`, say).
_ROOT_PATH = re.compile(re.escape(ROOT) + r"(?![\w.-])")
_MARK = "NS_FAKE_SANDBOX"


@dataclass
class FakeSandbox:
    id: str
    dir: Path
    image: str | None
    timeout_s: int
    # The outbound allowlist the sandbox was created with (and any later replacement).
    egress: Egress
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    running: bool = True
    # Every command run or launched in the sandbox through the seam, in order.
    commands: list[list[str]] = field(default_factory=list)


class FakeModal:
    """ModalApi for the tests; `close()` kills every process it started and removes every directory."""

    def __init__(self) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="ns-fake-modal-"))
        # Every process of a fake sandbox carries `NS_FAKE_SANDBOX=<tag>/<sandbox>` in its environment.
        self._tag = secrets.token_hex(6)
        self._lock = threading.Lock()
        self.sandboxes: dict[str, FakeSandbox] = {}
        self.images: dict[str, Path] = {}
        self.image_ttls: dict[str, int | None] = {}
        self.deleted_images: list[str] = []

    # ----- the seam -----

    def create_sandbox(self, image: str | None, timeout_s: int, egress: Egress) -> str:
        sid = "sb-" + secrets.token_hex(6)
        d = self._root / sid
        if image is None:
            d.mkdir()
        else:
            if image not in self.images:
                raise RuntimeError(f"Modal has no image {image}")
            shutil.copytree(self.images[image], d, symlinks=True)
        with self._lock:
            self.sandboxes[sid] = FakeSandbox(sid, d, image, timeout_s, egress)
        return sid

    def set_egress(self, sandbox: str, egress: Egress) -> None:
        self._live(sandbox).egress = egress

    def run(self, sandbox: str, argv: Sequence[str], stdin: bytes, timeout_s: int) -> ExecResult:
        sb = self._live(sandbox)
        p = self._spawn(sb, argv)
        try:
            out, err = p.communicate(stdin, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._kill(p)
            out, err = p.communicate()
            return ExecResult(124, out, err)
        return ExecResult(p.returncode, out, err)

    def launch(self, sandbox: str, argv: Sequence[str], stdin: bytes) -> None:
        p = self._spawn(self._live(sandbox), argv)
        assert p.stdin is not None
        p.stdin.write(stdin)
        p.stdin.close()
        threading.Thread(target=p.wait, daemon=True).start()

    def snapshot_filesystem(self, sandbox: str, ttl_s: int | None) -> str:
        sb = self._live(sandbox)
        image = "im-" + secrets.token_hex(6)
        dest = self._root / image
        shutil.copytree(sb.dir, dest, symlinks=True)
        with self._lock:
            self.images[image] = dest
            self.image_ttls[image] = ttl_s
        return image

    def terminate(self, sandbox: str) -> None:
        with self._lock:
            sb = self.sandboxes.get(sandbox)
            if sb is None or not sb.running:
                return
            sb.running = False
        for p in sb.procs:
            self._kill(p)
        for pid in self._marked(f"{self._tag}/{sandbox}"):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(sb.dir, ignore_errors=True)

    def poll(self, sandbox: str) -> int | None:
        sb = self.sandboxes.get(sandbox)
        if sb is None:
            raise SandboxGone(sandbox)
        return None if sb.running else 0

    def delete_image(self, image: str) -> None:
        with self._lock:
            path = self.images.pop(image, None)
            self.deleted_images.append(image)
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)

    # ----- for the tests -----

    def path(self, sandbox: str, inside: str) -> Path:
        """Where `inside` (a path under /nightshift) is on this machine."""
        return Path(_ROOT_PATH.sub(str(self.sandboxes[sandbox].dir), inside))

    def live_processes(self) -> list[int]:
        """Pids of every live process any fake sandbox started, its children included."""
        return self._marked(f"{self._tag}/")

    def close(self) -> None:
        for sid in list(self.sandboxes):
            self.terminate(sid)
        for sb in self.sandboxes.values():
            for p in sb.procs:
                p.wait()
                for stream in (p.stdin, p.stdout, p.stderr):
                    if stream is not None:
                        stream.close()
        shutil.rmtree(self._root, ignore_errors=True)

    # ----- processes -----

    def _live(self, sandbox: str) -> FakeSandbox:
        sb = self.sandboxes.get(sandbox)
        if sb is None or not sb.running:
            raise SandboxGone(f"sandbox {sandbox} has ended")
        return sb

    def _spawn(self, sb: FakeSandbox, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        sb.commands.append(list(argv))
        mapped = [_ROOT_PATH.sub(str(sb.dir), a) for a in argv]
        p = subprocess.Popen(
            mapped,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env={**os.environ, _MARK: f"{self._tag}/{sb.id}"},
        )
        with self._lock:
            sb.procs.append(p)
        return p

    @staticmethod
    def _marked(prefix: str) -> list[int]:
        needle = f"{_MARK}={prefix}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if any(var.startswith(needle) for var in environ.split(b"\0")):
                found.append(int(entry.name))
        return found

    @staticmethod
    def _kill(p: subprocess.Popen[bytes]) -> None:
        """Kills the process's whole group (it leads its own session), while it runs."""
        if p.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
