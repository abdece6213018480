"""The Modal app against the provider contract's fixtures (`core/tests/fixtures/provider/*.json`, the same files the Rust types in `core/src/provider.rs` round-trip): it accepts every request the control plane sends, and every answer it gives has a fixture's shape (the keys every fixture of that message has, no key none has, each value of a JSON type some fixture gives it)."""

from __future__ import annotations

import json
import unittest
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightshift_modal import validate

from .harness import ProviderTestCase

FIXTURES = Path(__file__).resolve().parents[2] / "core" / "tests" / "fixtures" / "provider"

# Every message of the contract (as in core/tests/provider_contract.rs); a fixture is named
# `<message>[.<case>].json`.
MESSAGES = {
    "create_sandbox",
    "restore_snapshot",
    "assign",
    "set_egress",
    "exec",
    "take_snapshot",
    "build_image",
    "sandbox",
    "sandbox_list",
    "egress_answer",
    "exec_result",
    "git_status",
    "snapshot",
    "deleted",
    "image",
    "error",
    "health",
}

# Objects whose keys are the caller's (labels, environment): any keys, string values.
FREE_MAPS = {"labels", "env"}


def fixtures() -> dict[str, list[tuple[str, Any]]]:
    """Each message's fixtures, as (file name, value)."""
    out: dict[str, list[tuple[str, Any]]] = {}
    for path in sorted(FIXTURES.glob("*.json")):
        out.setdefault(path.name.split(".")[0], []).append((path.name, json.loads(path.read_text())))
    return out


def json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    if isinstance(v, list):
        return "list"
    return "object"


@dataclass
class Shape:
    """What the examples of one value have in common: JSON types, and for objects their keys."""

    types: set[str] = field(default_factory=set)
    required: set[str] | None = None
    fields: dict[str, Shape] = field(default_factory=dict)
    items: Shape | None = None
    free: bool = False

    @staticmethod
    def of(examples: list[Any], free: bool = False) -> Shape:
        shape = Shape(free=free)
        for v in examples:
            shape.types.add(json_type(v))
            if isinstance(v, dict) and not free:
                keys = set(v)
                shape.required = keys if shape.required is None else shape.required & keys
            if isinstance(v, list):
                shape.items = shape.items or Shape()
        objects = [v for v in examples if isinstance(v, dict)]
        if not free:
            for key in sorted({k for o in objects for k in o}):
                shape.fields[key] = Shape.of([o[key] for o in objects if key in o], free=key in FREE_MAPS)
        items = [x for v in examples if isinstance(v, list) for x in v]
        if items:
            shape.items = Shape.of(items)
        return shape

    def problems(self, v: Any, where: str) -> list[str]:
        t = json_type(v)
        if t not in self.types:
            return [f"{where}: a {t}, where the fixtures have {sorted(self.types)}"]
        if t == "object" and self.free:
            bad = [k for k, x in v.items() if not isinstance(x, str)]
            return [f"{where}.{k}: not a string" for k in bad]
        out: list[str] = []
        if t == "object":
            missing = sorted((self.required or set()) - set(v))
            unknown = sorted(set(v) - set(self.fields))
            out += [f"{where}: no `{k}`" for k in missing]
            out += [f"{where}: `{k}` is in no fixture" for k in unknown]
            for k in sorted(set(v) & set(self.fields)):
                out += self.fields[k].problems(v[k], f"{where}.{k}")
        if t == "list" and self.items is not None and self.items.types:
            for i, x in enumerate(v):
                out += self.items.problems(x, f"{where}[{i}]")
        return out


SHAPES = {message: Shape.of([v for _, v in found]) for message, found in fixtures().items()}


class FixturesTest(unittest.TestCase):
    def test_every_message_has_fixtures_and_every_fixture_a_message(self) -> None:
        found = fixtures()
        self.assertEqual(set(found), MESSAGES)
        for message, values in found.items():
            for name, value in values:
                self.assertIsInstance(value, dict, name)

    def test_the_shape_check_catches_a_changed_answer(self) -> None:
        sandbox = dict(fixtures()["sandbox"][0][1])
        self.assertEqual(SHAPES["sandbox"].problems(sandbox, "sandbox"), [])
        del sandbox["expires_at"]
        sandbox["colour"] = "red"
        sandbox["created_at"] = "yesterday"
        sandbox["labels"] = {"n": 1}
        self.assertEqual(
            SHAPES["sandbox"].problems(sandbox, "sandbox"),
            [
                "sandbox: no `expires_at`",
                "sandbox: `colour` is in no fixture",
                "sandbox.created_at: a str, where the fixtures have ['int']",
                "sandbox.labels.n: not a string",
            ],
        )


class RequestsTest(unittest.TestCase):
    """Every request fixture is one the Modal app takes, read as it was meant."""

    def requests(self, message: str) -> list[tuple[str, Any]]:
        return fixtures()[message]

    def test_creates_and_restores(self) -> None:
        for message, allow_snapshot in (("create_sandbox", True), ("restore_snapshot", False)):
            for name, body in self.requests(message):
                with self.subTest(name):
                    c = validate.create_request(json.dumps(body).encode(), allow_snapshot=allow_snapshot)
                    stored = c.to_json()
                    for key, value in body.items():
                        self.assertEqual(stored[key], value, key)

    def test_assign(self) -> None:
        for name, body in self.requests("assign"):
            a = validate.assign_request(json.dumps(body).encode())
            self.assertEqual({"session_id": a.session_id, "supervisor": a.supervisor.to_json()}, body, name)

    def test_builds(self) -> None:
        for name, body in self.requests("build_image"):
            with self.subTest(name):
                b = validate.build_request(json.dumps(body).encode())
                self.assertEqual(b.repository.to_json(), body["repository"])
                self.assertEqual(
                    (b.setup, b.test, b.timeout_ms, b.labels),
                    (body["setup"], body.get("test"), body.get("timeout_ms"), body.get("labels", {})),
                )

    def test_execs_and_snapshots(self) -> None:
        for name, body in self.requests("exec"):
            with self.subTest(name):
                e = validate.exec_request(json.dumps(body).encode())
                self.assertEqual(
                    (e.command, e.cwd, e.env, e.timeout_ms, e.stdin),
                    (body["command"], body.get("cwd"), body.get("env", {}), body.get("timeout_ms"), body.get("stdin")),
                )
        for name, body in self.requests("take_snapshot"):
            self.assertEqual(validate.snapshot_ttl(json.dumps(body).encode()), body.get("ttl_ms"), name)


class AnswersTest(ProviderTestCase):
    """Every answer the Modal app gives in a sandbox's and an image's life has a fixture's shape."""

    def check(self, message: str, answer: Any) -> Any:
        self.assertEqual(SHAPES[message].problems(answer, message), [], answer)
        return answer

    def ok(self, message: str, status: int, r: Any) -> Any:
        self.assertEqual(r.status, status, r.body)
        return self.check(message, r.json())

    def test_a_sandboxs_life(self) -> None:
        self.check("health", self.c.get("/v1/health").json())
        created = self.ok("sandbox", 201, self.c.post("/v1/sandboxes", self.h.create_body(labels={"session": "ses_1"})))
        sid = created["id"]
        self.check("sandbox", self.h.wait(f"/v1/sandboxes/{sid}", ("ready",)))
        self.ok("sandbox_list", 200, self.c.get("/v1/sandboxes?session_id=ses_1"))
        self.ok("sandbox_list", 200, self.c.get("/v1/sandboxes?label=session:none"))
        self.check("exec_result", self.h.exec(sid, "git", "status", "--short"))
        self.ok("git_status", 200, self.c.get(f"/v1/sandboxes/{sid}/git"))
        snap = self.ok("snapshot", 201, self.c.post(f"/v1/sandboxes/{sid}/snapshot", {"ttl_ms": 600_000}))
        self.ok("snapshot", 200, self.c.get(f"/v1/snapshots/{snap['id']}"))
        body = self.h.create_body()
        restored = self.ok("sandbox", 201, self.c.post(f"/v1/snapshots/{snap['id']}/restore", body))
        self.check("sandbox", self.h.wait(f"/v1/sandboxes/{restored['id']}", ("ready",)))
        self.ok("sandbox", 200, self.c.post(f"/v1/sandboxes/{sid}/stop"))
        self.ok("sandbox", 200, self.c.post(f"/v1/sandboxes/{sid}/start"))
        self.ok("sandbox", 200, self.c.post(f"/v1/sandboxes/{sid}/terminate"))
        self.ok("deleted", 200, self.c.delete(f"/v1/snapshots/{snap['id']}"))
        self.ok("error", 404, self.c.get(f"/v1/snapshots/{snap['id']}"))
        self.ok("error", 404, self.c.get("/v1/sandboxes/sbx_000000000000"))

    def test_a_failed_and_a_pooled_sandbox(self) -> None:
        missing = {"repository": {"clone_url": str(self.h.tmp / "missing")}}
        failed = self.c.post("/v1/sandboxes", self.h.create_body(**missing)).json()
        self.check("sandbox", self.h.wait(f"/v1/sandboxes/{failed['id']}", ("failed",)))
        pooled = self.h.ready_sandbox(session_id=None, supervisor=None, labels={"pool": "web", "pool_key": "pk_1"})
        self.check("sandbox", pooled)
        assign = dict(fixtures()["assign"][0][1])
        assign["labels"] = {"person": "ada", "github_account": "acme"}
        given = self.ok("sandbox", 200, self.c.post(f"/v1/sandboxes/{pooled['id']}/assign", assign))
        # The session's labels join the pool's, so its running sandboxes are counted by them.
        self.assertEqual(given["labels"], {"pool": "web", "pool_key": "pk_1", "person": "ada", "github_account": "acme"})
        listed = self.c.get("/v1/sandboxes?label=person:ada").json()["sandboxes"]
        self.assertEqual([s["id"] for s in listed], [pooled["id"]])

    def test_an_images_life(self) -> None:
        repository = {"clone_url": str(self.h.repo), "base_branch": "main"}
        built = self.ok("image", 201, self.c.post("/v1/images", {"repository": repository, "setup": ["true"]}))
        self.check("image", self.h.wait(f"/v1/images/{built['id']}", ("ready",)))
        broken = self.c.post("/v1/images", {"repository": repository, "setup": ["exit 4"]}).json()
        self.check("image", self.h.wait(f"/v1/images/{broken['id']}", ("failed",)))
        self.ok("deleted", 200, self.c.delete(f"/v1/images/{built['id']}"))
        self.ok("error", 404, self.c.get(f"/v1/images/{built['id']}"))


if __name__ == "__main__":
    unittest.main()
