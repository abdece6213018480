"""The model proxy: sandboxes reach their model through the provider's web endpoint (`/v1/model/{sandbox}/{name}/…`),
which checks the sandbox's own model token and forwards the request with the real key added. Keys never enter a
sandbox; the supervisor's secrets line carries the proxy's URL and the token in their place.

Upstreams come from the provider's secret: `name = nightshift` is NIGHTSHIFT_MODEL_URL with NIGHTSHIFT_MODEL_KEY,
and every `X_API_KEY` is `name = x` at `X_BASE_URL` (or the provider's public API for ANTHROPIC and OPENAI)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

from .validate import is_model_key

PREFIX = "/v1/model/"
# Where the well-known providers' SDKs go when no X_BASE_URL is set.
KNOWN_BASES = {"ANTHROPIC": "https://api.anthropic.com/v1", "OPENAI": "https://api.openai.com/v1"}
# Headers a client may present its key in; the key goes upstream in the same one.
AUTH_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "accept-encoding",
}
MAX_REQUEST_BYTES = 32 << 20
UPSTREAM_TIMEOUT_S = 600
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Upstream:
    """A model API: where requests go and the key that is added to them."""

    base_url: str
    key: str


def upstreams(env: Mapping[str, str]) -> dict[str, Upstream]:
    """The model APIs the provider's settings name, by route name (`nightshift`, `anthropic`, …)."""
    out: dict[str, Upstream] = {}
    if env.get("NIGHTSHIFT_MODEL_URL"):
        out["nightshift"] = Upstream(env["NIGHTSHIFT_MODEL_URL"], env.get("NIGHTSHIFT_MODEL_KEY", ""))
    for k, v in env.items():
        if k.endswith("_API_KEY") and k != "NIGHTSHIFT_MODEL_KEY":
            prefix = k.removesuffix("_API_KEY")
            base = env.get(f"{prefix}_BASE_URL") or KNOWN_BASES.get(prefix)
            if base and prefix:
                out[prefix.lower()] = Upstream(base, v)
    return out


def route_url(proxy_url: str, sandbox_id: str, name: str) -> str:
    return f"{proxy_url.rstrip('/')}{PREFIX}{sandbox_id}/{name}"


def sandbox_env(
    env: Mapping[str, str], proxy_url: str, sandbox_id: str, token: str, routes: Mapping[str, Upstream]
) -> dict[str, str]:
    """The supervisor's environment: no key at all; each upstream's URL and key variables name the proxy and token."""
    out = {k: v for k, v in env.items() if not is_model_key(k)}
    for name in routes:
        url = route_url(proxy_url, sandbox_id, name)
        if name == "nightshift":
            out.update(NIGHTSHIFT_MODEL_URL=url, NIGHTSHIFT_MODEL_KEY=token)
        else:
            out.update({f"{name.upper()}_BASE_URL": url, f"{name.upper()}_API_KEY": token})
    return out


def presented_token(headers: list[tuple[bytes, bytes]]) -> tuple[str, str] | None:
    """The token a request presents, and the header it came in."""
    for k, v in headers:
        name = k.decode("latin-1").lower()
        if name not in AUTH_HEADERS:
            continue
        value = v.decode("latin-1").strip()
        if name == "authorization":
            scheme, _, value = value.partition(" ")
            if scheme.lower() != "bearer":
                continue
            value = value.strip()
        if value:
            return value, name
    return None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is answered as it is: the key never follows it to another host."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    chunks: Generator[bytes, None, None]


def forward(
    upstream: Upstream,
    method: str,
    path: str,
    query: str,
    headers: list[tuple[bytes, bytes]],
    auth_header: str,
    body: bytes,
) -> Answer:
    """Sends the request to the upstream with its key in `auth_header`; the answer streams back as it comes."""
    url = f"{upstream.base_url.rstrip('/')}/{path.lstrip('/')}" + (f"?{query}" if query else "")
    out: dict[str, str] = {}
    for k, v in headers:
        name = k.decode("latin-1").lower()
        if name not in _HOP_BY_HOP and name not in AUTH_HEADERS:
            out[name] = v.decode("latin-1")
    if upstream.key:
        out[auth_header] = f"Bearer {upstream.key}" if auth_header == "authorization" else upstream.key
    req = urllib.request.Request(url, data=body if body or method in ("POST", "PUT", "PATCH") else None, method=method)
    for k, v in out.items():
        req.add_header(k, v)
    try:
        resp: Any = _OPENER.open(req, timeout=UPSTREAM_TIMEOUT_S)
    except urllib.error.HTTPError as e:  # an answer all the same: forwarded as it is
        resp = e
    status = int(resp.status if getattr(resp, "status", None) else resp.code)
    kept = [(k, v) for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP]

    def chunks() -> Generator[bytes, None, None]:
        read = getattr(resp, "read1", None) or resp.read
        try:
            while data := read(_CHUNK):
                yield data
        finally:
            resp.close()

    return Answer(status, kept, chunks())
