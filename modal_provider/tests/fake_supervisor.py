"""A stand-in for `nightshift-supervisor` in the tests: reads the secrets line on stdin, publishes its loopback API (/git, /git/sync, /assign) and readiness as the real one does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DIR = os.environ["NIGHTSHIFT_SANDBOX_DIR"]
REPO = f"{DIR}/repo"


def git(*args: str) -> str:
    out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def git_status() -> dict[str, Any]:
    head = git("rev-parse", "HEAD")
    return {
        "sync": {"state": "synced", "commit": head},
        "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
        "head": head,
        "dirty": bool(git("status", "--porcelain")),
    }


class Api(BaseHTTPRequestHandler):
    assigned: str | None = None

    def log_message(self, format: str, *args: Any) -> None:
        print("supervisor: " + format % args, flush=True)

    def answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/git":
            self.answer(200, git_status())
        else:
            self.answer(404, {"error": {"code": "not_found", "message": self.path}})

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/git/sync":
            if git_status()["dirty"]:
                self.answer(409, {"error": {"code": "sync_refused", "message": "the agent has already changed files"}})
            else:
                self.answer(202, git_status())
        elif self.path == "/assign":
            a = json.loads(body)
            if Api.assigned is not None:
                self.answer(409, {"error": {"code": "sandbox_assigned", "message": Api.assigned}})
                return
            Api.assigned = a["session_id"]
            with open(f"{DIR}/state/assigned.json", "w") as f:
                json.dump(a, f)
            print(f"supervisor: assigned to session {a['session_id']}", flush=True)
            self.answer(200, {"assigned": True})
        else:
            self.answer(404, {"error": {"code": "not_found", "message": self.path}})


def main() -> None:
    secrets = json.loads(sys.stdin.readline())
    env = secrets["env"]
    session = os.environ["NIGHTSHIFT_SESSION_ID"]
    # What arrived, for the tests to check (the real supervisor keeps it in memory only).
    with open(f"{DIR}/state/received.json", "w") as f:
        json.dump({"secrets": secrets, "session_id": session, "base_branch": os.environ["NIGHTSHIFT_BASE_BRANCH"]}, f)
    print(f"supervisor: sandbox {os.environ['NIGHTSHIFT_SANDBOX_ID']} session {session or '(pooled)'}", flush=True)
    if env.get("FAKE_SUPERVISOR_EXIT"):
        sys.exit(3)
    Api.assigned = session or None
    server = ThreadingHTTPServer(("127.0.0.1", 0), Api)
    ready = not env.get("FAKE_SUPERVISOR_NEVER_READY")
    with open(f"{DIR}/state/supervisor.json", "w") as f:
        json.dump({"port": server.server_address[1], "ready": ready}, f)
    server.serve_forever()


if __name__ == "__main__":
    main()
