"""Strict parsing of the contract's request bodies into typed requests (unknown fields, duplicate keys and wrong
types are `invalid_body`), plus the checks on what a request may name: egress host patterns, clone URLs
(`invalid_repository`), model keys in `env` (`invalid_env`), and `redact_url`, which removes URL credentials from
anything shown to people."""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .errors import ProviderError, invalid_body

MAX_SETUP_COMMANDS = 50
MAX_COMMAND_BYTES = 4096
# The most host patterns a repository's `egress` may hold (as core/src/egress.rs).
MAX_EGRESS_PATTERNS = 100
_U64_MAX = (1 << 64) - 1
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# `example.com`, `*.example.com`, `host:port`: an optional `*.`, letters/digits/-/., an optional port.
_EGRESS_PATTERN = re.compile(r"(\*\.)?[A-Za-z0-9.-]+(:[0-9]{1,5})?")
# URL userinfo: what lies between `scheme://` and the last `@` of the authority.
_URL_AUTHORITY = re.compile(r"://([^/?#\s'\"`]*)")


def redact_url(text: str) -> str:
    """`text` with the credentials (userinfo) of every URL in it removed: `https://u:t@host/x` becomes `https://host/x`."""

    def strip(m: re.Match[str]) -> str:
        authority = m.group(1)
        return "://" + authority[authority.rfind("@") + 1 :]

    return _URL_AUTHORITY.sub(strip, text)


def is_model_key(name: str) -> bool:
    """Whether an environment variable holds a model key (`NIGHTSHIFT_MODEL_KEY`, `*_API_KEY`)."""
    return name == "NIGHTSHIFT_MODEL_KEY" or name.endswith("_API_KEY")


def valid_egress_pattern(p: str) -> bool:
    """A host pattern: optional `*.`, then letters, digits, `-` and `.`, then an optional `:port` (1-65535)."""
    m = _EGRESS_PATTERN.fullmatch(p)
    if m is None or len(p) > 255:
        return False
    name = p.removeprefix("*.").rsplit(":", 1)[0] if m.group(2) else p.removeprefix("*.")
    port_ok = m.group(2) is None or 1 <= int(m.group(2)[1:]) <= 65535
    return bool(name.strip(".")) and port_ok


def _internal_host(host: str) -> bool:
    """`localhost`, or an IP literal that is loopback, private, link-local, reserved or unspecified."""
    if host.lower().rstrip(".") == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_reserved or ip.is_unspecified


def check_clone_url(url: str, *, dev_mode: bool) -> None:
    """Refuses (`400 invalid_repository`) a clone URL that is not `https://` or `ssh://` to a public host.

    In dev mode (the tests, a single-user setup) any URL, local paths included, is accepted."""
    if dev_mode:
        return
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        host, parts = "", urlsplit("")
    if parts.scheme not in ("https", "ssh") or not host:
        raise ProviderError(
            400,
            "invalid_repository",
            f"the clone URL {shown!r} is not an https:// or ssh:// URL; local paths, file://, http:// and scp-style "
            "URLs are accepted only when the provider runs in dev mode (PROVIDER_DEV_MODE=1)",
        )
    if _internal_host(host):
        raise ProviderError(
            400,
            "invalid_repository",
            f"the clone URL {shown!r} names a loopback, private or link-local address; use the repository's public host",
        )


@dataclass(frozen=True)
class Repository:
    clone_url: str
    base_branch: str = "main"
    # Host patterns beyond the defaults that this repository's sandboxes (and builds) may reach.
    egress: tuple[str, ...] = ()
    # A short-lived token for this clone only (a GitHub installation token): handed to the clone's
    # git as environment, never stored, never shown, never in the checkout's config.
    access_token: str | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        """As stored (the clone URL as given; `egress` only when set, as the Rust side writes it)."""
        out: dict[str, Any] = {"clone_url": self.clone_url, "base_branch": self.base_branch}
        if self.egress:
            out["egress"] = list(self.egress)
        return out

    def public_json(self) -> dict[str, Any]:
        """As shown in answers: the clone URL without credentials."""
        return {**self.to_json(), "clone_url": redact_url(self.clone_url)}

    @staticmethod
    def from_json(v: dict[str, Any]) -> Repository:
        """Reads back what `to_json` stored (trusted: no validation)."""
        return Repository(v["clone_url"], v.get("base_branch", "main"), tuple(v.get("egress", ())))


@dataclass(frozen=True)
class SupervisorSpec:
    control_url: str
    sandbox_token: str

    def to_json(self) -> dict[str, str]:
        return {"control_url": self.control_url, "sandbox_token": self.sandbox_token}


@dataclass(frozen=True)
class CreateRequest:
    session_id: str | None
    repository: Repository
    image: str | None = None
    snapshot: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    supervisor: SupervisorSpec | None = None
    timeout_ms: int | None = None
    lifetime_ms: int | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "repository": self.repository.to_json(),
            "image": self.image,
            "snapshot": self.snapshot,
            "env": dict(self.env),
            "supervisor": self.supervisor.to_json() if self.supervisor else None,
            "timeout_ms": self.timeout_ms,
            "lifetime_ms": self.lifetime_ms,
            "labels": dict(self.labels),
        }

    @staticmethod
    def from_json(v: dict[str, Any]) -> CreateRequest:
        """Reads back what `to_json` stored (trusted: no validation)."""
        sup = v["supervisor"]
        return CreateRequest(
            session_id=v["session_id"],
            repository=Repository.from_json(v["repository"]),
            image=v["image"],
            snapshot=v["snapshot"],
            env=dict(v["env"]),
            supervisor=SupervisorSpec(**sup) if sup else None,
            timeout_ms=v["timeout_ms"],
            lifetime_ms=v["lifetime_ms"],
            labels=dict(v["labels"]),
        )


@dataclass(frozen=True)
class ExecRequest:
    command: list[str]
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    timeout_ms: int | None = None
    stdin: str | None = None


@dataclass(frozen=True)
class AssignRequest:
    session_id: str
    supervisor: SupervisorSpec
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildRequest:
    repository: Repository
    setup: list[str] = field(default_factory=list)
    test: str | None = None
    timeout_ms: int | None = None
    labels: dict[str, str] = field(default_factory=dict)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise invalid_body(f"the body does not match the contract: duplicate field `{k}`")
        out[k] = v
    return out


def parse_json(body: bytes) -> dict[str, Any]:
    """The body as a JSON object."""
    try:
        value = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except ProviderError:
        raise
    except (UnicodeDecodeError, ValueError) as e:
        raise invalid_body(f"the body is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise invalid_body("the body must be a JSON object")
    return value


def _fields(v: Any, where: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise invalid_body(f"`{where}` must be an object")
    unknown = sorted(set(v) - allowed)
    if unknown:
        raise invalid_body(f"unknown field `{unknown[0]}` in `{where}`; expected one of {sorted(allowed)}")
    missing = sorted(required - set(v))
    if missing:
        raise invalid_body(f"missing field `{missing[0]}` in `{where}`")
    return v


def _string(v: Any, name: str) -> str:
    if not isinstance(v, str):
        raise invalid_body(f"`{name}` must be a string")
    return v


def _opt_string(v: Any, name: str) -> str | None:
    return None if v is None else _string(v, name)


def _opt_u64(v: Any, name: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _U64_MAX:
        raise invalid_body(f"`{name}` must be a non-negative integer (milliseconds)")
    return v


def _string_map(v: Any, name: str) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
        raise invalid_body(f"`{name}` must be an object of strings")
    return dict(v)


def _egress(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(p, str) for p in v):
        raise invalid_body("`repository.egress` must be an array of host patterns")
    bad = [p for p in v if not valid_egress_pattern(p)]
    if len(v) > MAX_EGRESS_PATTERNS or bad:
        why = f"`{bad[0]}` is not a host pattern" if bad else f"{len(v)} patterns are too many"
        raise invalid_body(
            f"`repository.egress`: {why}; give at most {MAX_EGRESS_PATTERNS} patterns such as `example.com`, "
            "`*.example.com` or `host:port`"
        )
    return tuple(v)


def _repository(v: Any) -> Repository:
    r = _fields(v, "repository", {"clone_url", "base_branch", "egress", "access_token"}, {"clone_url"})
    token = r.get("access_token")
    return Repository(
        clone_url=_string(r["clone_url"], "repository.clone_url"),
        base_branch=_string(r.get("base_branch", "main"), "repository.base_branch"),
        egress=_egress(r.get("egress", [])),
        access_token=None if token is None else _string(token, "repository.access_token"),
    )


def git_auth_env(token: str) -> dict[str, str]:
    """The git settings that authenticate one clone with `token` (x-access-token basic auth, as GitHub
    takes installation tokens), as GIT_CONFIG_* environment: never written to any git config."""
    import base64

    basic = base64.b64encode(f"x-access-token:{token}".encode()).decode()
    return {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "http.extraHeader",
        "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
    }


def _supervisor(v: Any, name: str) -> SupervisorSpec:
    s = _fields(v, name, {"control_url", "sandbox_token"}, {"control_url", "sandbox_token"})
    return SupervisorSpec(
        control_url=_string(s["control_url"], f"{name}.control_url"),
        sandbox_token=_string(s["sandbox_token"], f"{name}.sandbox_token"),
    )


_CREATE_FIELDS = {
    "session_id",
    "repository",
    "image",
    "snapshot",
    "env",
    "supervisor",
    "timeout_ms",
    "lifetime_ms",
    "labels",
}


def create_request(body: bytes, *, allow_snapshot: bool = True) -> CreateRequest:
    """`POST /v1/sandboxes` (and, without `snapshot`, `POST /v1/snapshots/{id}/restore`)."""
    allowed = _CREATE_FIELDS if allow_snapshot else _CREATE_FIELDS - {"snapshot"}
    b = _fields(parse_json(body), "body", allowed, {"repository"})
    sup = b.get("supervisor")
    c = CreateRequest(
        session_id=_opt_string(b.get("session_id"), "session_id"),
        repository=_repository(b["repository"]),
        image=_opt_string(b.get("image"), "image"),
        snapshot=_opt_string(b.get("snapshot"), "snapshot"),
        env=_string_map(b.get("env", {}), "env"),
        supervisor=None if sup is None else _supervisor(sup, "supervisor"),
        timeout_ms=_opt_u64(b.get("timeout_ms"), "timeout_ms"),
        lifetime_ms=_opt_u64(b.get("lifetime_ms"), "lifetime_ms"),
        labels=_string_map(b.get("labels", {}), "labels"),
    )
    if c.session_id == "" or not c.repository.clone_url:
        raise invalid_body("session_id (or null for a pooled sandbox) and repository.clone_url are required")
    if c.lifetime_ms == 0:
        raise invalid_body("`lifetime_ms` must be positive")
    keys = sorted(k for k in c.env if is_model_key(k))
    if keys:
        raise ProviderError(
            400,
            "invalid_env",
            f"`env` may not carry model keys (`{keys[0]}`): they belong in the provider's secret, and sandboxes reach "
            "the model through the provider's model proxy",
        )
    return c


def exec_request(body: bytes) -> ExecRequest:
    """`POST /v1/sandboxes/{id}/exec`."""
    b = _fields(parse_json(body), "body", {"command", "cwd", "env", "timeout_ms", "stdin"}, {"command"})
    command = b["command"]
    if not isinstance(command, list) or not all(isinstance(a, str) for a in command):
        raise invalid_body("`command` must be an array of strings")
    env = _string_map(b.get("env", {}), "env")
    bad = [k for k in env if not _ENV_NAME.fullmatch(k) or "\0" in env[k]]
    if bad:
        raise invalid_body(f"`env` names must be shell variable names without NUL values: `{bad[0]}`")
    cwd = _opt_string(b.get("cwd"), "cwd")
    if cwd is not None and (".." in cwd.split("/") or "\0" in cwd):
        raise invalid_body("`cwd` may not leave the checkout")
    if not command or not command[0] or any("\0" in a for a in command):
        raise ProviderError(400, "invalid_command", '`command` must name a program: ["git", "status"]')
    return ExecRequest(
        command=list(command),
        cwd=cwd,
        env=env,
        timeout_ms=_opt_u64(b.get("timeout_ms"), "timeout_ms"),
        stdin=_opt_string(b.get("stdin"), "stdin"),
    )


def snapshot_ttl(body: bytes) -> int | None:
    """`POST /v1/sandboxes/{id}/snapshot`: the optional `ttl_ms` (an empty body is allowed)."""
    if not body:
        return None
    b = _fields(parse_json(body), "body", {"ttl_ms"}, set())
    return _opt_u64(b.get("ttl_ms"), "ttl_ms")


def assign_request(body: bytes) -> AssignRequest:
    """`POST /v1/sandboxes/{id}/assign`."""
    b = _fields(parse_json(body), "body", {"session_id", "supervisor", "labels"}, {"session_id", "supervisor"})
    a = AssignRequest(
        session_id=_string(b["session_id"], "session_id"),
        supervisor=_supervisor(b["supervisor"], "supervisor"),
        labels=_string_map(b.get("labels", {}), "labels"),
    )
    if not a.session_id:
        raise invalid_body("session_id is empty")
    return a


def build_request(body: bytes) -> BuildRequest:
    """`POST /v1/images`."""
    b = _fields(parse_json(body), "body", {"repository", "setup", "test", "timeout_ms", "labels"}, {"repository"})
    setup = b.get("setup", [])
    if not isinstance(setup, list) or not all(isinstance(c, str) for c in setup):
        raise invalid_body("`setup` must be an array of strings")
    r = BuildRequest(
        repository=_repository(b["repository"]),
        setup=list(setup),
        test=_opt_string(b.get("test"), "test"),
        timeout_ms=_opt_u64(b.get("timeout_ms"), "timeout_ms"),
        labels=_string_map(b.get("labels", {}), "labels"),
    )
    commands = r.setup + ([r.test] if r.test is not None else [])
    if (
        not r.repository.clone_url
        or not r.repository.base_branch
        or len(r.setup) > MAX_SETUP_COMMANDS
        or any(not c.strip() or len(c.encode()) > MAX_COMMAND_BYTES for c in commands)
    ):
        raise invalid_body(
            "a build needs repository.clone_url and base_branch, and at most "
            f"{MAX_SETUP_COMMANDS} non-empty commands of at most {MAX_COMMAND_BYTES} bytes"
        )
    return r
