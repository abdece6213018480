"""A framework-free ASGI 3 app for provider contract v1: a signature check on every request, routing, strict bodies,
JSON errors and SSE logs; and the model proxy (`/v1/model/{sandbox}/{name}/…`), which is not signed by the control
plane but authorised by the calling sandbox's model token, and streams the upstream's answer back."""

from __future__ import annotations

import asyncio
import functools
import http.client
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote

from . import model_proxy, validate
from .backend import LogChunk, ModalBackend, wall_clock_ms
from .errors import ProviderError
from .signing import NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, WINDOW_MS, NonceCache, SignError, verify

log = logging.getLogger("nightshift.modal.http")

MAX_BODY = 1 << 20

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class _Request:
    params: dict[str, str]
    query: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class _Json:
    status: int
    payload: Any


@dataclass(frozen=True)
class _Stream:
    """A log as server-sent events: `first` is already read (so a missing log is still a JSON 404)."""

    first: LogChunk
    read: Callable[[int], LogChunk]
    follow: bool


_Handler = Callable[["ProviderApp", _Request], Awaitable["_Json | _Stream"]]
_ROUTES: list[tuple[str, re.Pattern[str], _Handler]] = []


def _route(method: str, pattern: str) -> Callable[[_Handler], _Handler]:
    regex = re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern) + "$")

    def register(fn: _Handler) -> _Handler:
        _ROUTES.append((method, regex, fn))
        return fn

    return register


def _header(scope: Scope, name: str) -> str | None:
    """The first value of a header, as the Rust side reads it: None unless it is visible ASCII."""
    wanted = name.encode()
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for k, v in headers:
        if k.lower() == wanted:
            if all(32 <= b < 127 or b == 9 for b in v):
                return v.decode("ascii")
            return None
    return None


def _path_with_query(scope: Scope) -> str:
    """Exactly what was on the request line: the raw path plus `?query` when there is one."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else quote(scope["path"])
    query = scope.get("query_string", b"").decode("latin-1")
    return f"{path}?{query}" if query else path


async def _read_body(receive: Receive, limit: int = MAX_BODY) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ProviderError(413, "invalid_body", f"the body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _sse_lines(carry: str, text: str) -> tuple[str, str]:
    """Complete lines of `carry + text` as `data:` events, and the unfinished rest."""
    carry += text
    *lines, rest = carry.split("\n")
    return "".join(f"data: {line.rstrip()}\n\n" for line in lines), rest


class ProviderApp:
    """The ASGI callable; every route calls the backend in a worker thread."""

    def __init__(
        self,
        backend: ModalBackend,
        secret: bytes,
        clock: Callable[[], int] = wall_clock_ms,
        poll_interval_s: float = 1.0,
    ) -> None:
        self._backend = backend
        self._secret = secret
        self._now = clock
        self._nonces = NonceCache()
        self._poll = poll_interval_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["path"].startswith(model_proxy.PREFIX):
            await self._model(scope, receive, send)
            return
        try:
            body = await _read_body(receive)
            nonce, ts = self._verify(scope, body)
            # Any other web container may have seen it: the shared store has the last word.
            if not await asyncio.to_thread(self._backend.claim_nonce, nonce, ts + WINDOW_MS):
                raise ProviderError(
                    401,
                    "replayed_request",
                    "this signed request was already received; sign every request with a new nonce",
                )
            answer = await self._dispatch(scope, body)
        except ProviderError as e:
            answer = _Json(e.status, e.body())
        except Exception:  # any other failure is `internal`; the details go to the log
            log.exception("%s %s", scope.get("method"), scope.get("path"))
            answer = _Json(500, {"error": {"code": "internal", "message": "the provider failed; see its log"}})
        if isinstance(answer, _Json):
            await _send_json(send, answer)
        else:
            await self._send_stream(send, receive, answer)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _model(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The model proxy: checks the sandbox's model token, forwards with the key added, streams the answer."""
        try:
            sid, name, rest = _model_target(scope)
            found = model_proxy.presented_token(scope.get("headers", []))
            if found is None:
                raise ProviderError(
                    401, "model_token_refused", "send the sandbox's model token as a bearer token or in x-api-key"
                )
            token, header = found
            upstream = await self._call(self._backend.model_route, sid, name, token)
            body = await _read_body(receive, model_proxy.MAX_REQUEST_BYTES)
            query = scope.get("query_string", b"").decode("latin-1")
            answer = await self._call(
                model_proxy.forward, upstream, scope["method"], rest, query, scope.get("headers", []), header, body
            )
        except ProviderError as e:
            await _send_json(send, _Json(e.status, e.body()))
            return
        except (OSError, http.client.HTTPException) as e:  # URLError included: the upstream did not answer
            log.warning("model proxy for %s: %s", scope.get("path"), e)
            await _send_json(
                send, _Json(502, {"error": {"code": "model_unreachable", "message": "the model endpoint did not answer"}})
            )
            return
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers]
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        step = functools.partial(next, answer.chunks, b"")
        try:
            while chunk := await self._call(step):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except (OSError, http.client.HTTPException) as e:
            log.warning("model proxy for %s: the upstream broke off: %s", scope.get("path"), e)
        finally:
            answer.chunks.close()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _verify(self, scope: Scope, body: bytes) -> tuple[str, int]:
        """Checks the signature and this container's memory of nonces; answers the nonce and timestamp."""
        now = self._now()
        try:
            ts = verify(
                self._secret,
                scope["method"],
                _path_with_query(scope),
                _header(scope, TIMESTAMP_HEADER),
                _header(scope, NONCE_HEADER),
                _header(scope, SIGNATURE_HEADER),
                body,
                now,
            )
            # Only a verified request's nonce is remembered; a second use is a replay — in this
            # container (memory) or in any other (the shared store, checked by the caller).
            nonce = (_header(scope, NONCE_HEADER) or "").strip()
            self._nonces.remember(nonce, ts, now)
            return nonce, ts
        except SignError as e:
            status = 503 if e.code == "capacity" else 401
            raise ProviderError(status, e.code, e.message) from None

    async def _dispatch(self, scope: Scope, body: bytes) -> _Json | _Stream:
        path = scope["path"]
        allowed = False
        for method, regex, handler in _ROUTES:
            m = regex.match(path)
            if m is None:
                continue
            allowed = True
            if method == scope["method"]:
                qs = scope.get("query_string", b"").decode("latin-1")
                query = {k: v[0] for k, v in parse_qs(qs, keep_blank_values=True).items()}
                return await handler(self, _Request(m.groupdict(), query, body))
        if allowed:
            raise ProviderError(405, "method_not_allowed", f"{scope['method']} is not allowed on {path}")
        raise ProviderError(404, "not_found", f"no route {path}; see docs/provider-contract.md")

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    # ----- routes -----

    @_route("GET", "/v1/health")
    async def health(self, r: _Request) -> _Json:
        return _Json(200, self._backend.health())

    @_route("POST", "/v1/sandboxes")
    async def create(self, r: _Request) -> _Json:
        req = validate.create_request(r.body)
        return _Json(201, await self._call(self._backend.create_sandbox, req))

    @_route("GET", "/v1/sandboxes")
    async def list_sandboxes(self, r: _Request) -> _Json:
        found = await self._call(self._backend.list_sandboxes, r.query.get("session_id"), r.query.get("label"))
        return _Json(200, {"sandboxes": found})

    @_route("GET", "/v1/sandboxes/{id}")
    async def get_sandbox(self, r: _Request) -> _Json:
        return _Json(200, await self._call(self._backend.get_sandbox, r.params["id"]))

    @_route("POST", "/v1/sandboxes/{id}/exec")
    async def exec_command(self, r: _Request) -> _Json:
        req = validate.exec_request(r.body)
        return _Json(200, await self._call(self._backend.exec, r.params["id"], req))

    @_route("GET", "/v1/sandboxes/{id}/logs/{service}")
    async def sandbox_logs(self, r: _Request) -> _Stream:
        sid, service = r.params["id"], r.params["service"]

        def read(offset: int) -> LogChunk:
            return self._backend.read_log(sid, service, offset)

        return _Stream(await self._call(read, 0), read, _follow(r))

    @_route("POST", "/v1/sandboxes/{id}/snapshot")
    async def snapshot(self, r: _Request) -> _Json:
        ttl = validate.snapshot_ttl(r.body)
        return _Json(201, await self._call(self._backend.snapshot, r.params["id"], ttl))

    @_route("POST", "/v1/sandboxes/{id}/stop")
    async def stop(self, r: _Request) -> _Json:
        return _Json(200, await self._call(self._backend.stop, r.params["id"]))

    @_route("POST", "/v1/sandboxes/{id}/start")
    async def start(self, r: _Request) -> _Json:
        return _Json(200, await self._call(self._backend.start, r.params["id"]))

    @_route("POST", "/v1/sandboxes/{id}/terminate")
    async def terminate(self, r: _Request) -> _Json:
        return _Json(200, await self._call(self._backend.terminate, r.params["id"]))

    @_route("POST", "/v1/sandboxes/{id}/assign")
    async def assign(self, r: _Request) -> _Json:
        req = validate.assign_request(r.body)
        return _Json(200, await self._call(self._backend.assign, r.params["id"], req))

    @_route("GET", "/v1/sandboxes/{id}/git")
    async def git_status(self, r: _Request) -> _Json:
        return _Json(*await self._call(self._backend.git, r.params["id"], "GET", "/git"))

    @_route("POST", "/v1/sandboxes/{id}/git/sync")
    async def git_sync(self, r: _Request) -> _Json:
        return _Json(*await self._call(self._backend.git, r.params["id"], "POST", "/git/sync"))

    @_route("POST", "/v1/snapshots/{id}/restore")
    async def restore(self, r: _Request) -> _Json:
        req = validate.create_request(r.body, allow_snapshot=False)
        return _Json(201, await self._call(self._backend.restore, r.params["id"], req))

    @_route("GET", "/v1/snapshots/{id}")
    async def get_snapshot(self, r: _Request) -> _Json:
        return _Json(200, await self._call(self._backend.get_snapshot, r.params["id"]))

    @_route("DELETE", "/v1/snapshots/{id}")
    async def delete_snapshot(self, r: _Request) -> _Json:
        return _Json(200, await self._call(self._backend.delete_snapshot, r.params["id"]))

    @_route("POST", "/v1/images")
    async def build_image(self, r: _Request) -> _Json:
        req = validate.build_request(r.body)
        return _Json(201, await self._call(self._backend.build_image, req))

    @_route("GET", "/v1/images/{id}")
    async def get_image(self, r: _Request) -> _Json:
        return _Json(200, await self._call(self._backend.get_image, r.params["id"]))

    @_route("DELETE", "/v1/images/{id}")
    async def delete_image(self, r: _Request) -> _Json:
        return _Json(200, await self._call(self._backend.delete_image, r.params["id"]))

    @_route("GET", "/v1/images/{id}/logs")
    async def image_logs(self, r: _Request) -> _Stream:
        image_id = r.params["id"]

        def read(offset: int) -> LogChunk:
            return self._backend.read_build_log(image_id, offset)

        return _Stream(await self._call(read, 0), read, _follow(r))

    # ----- server-sent events -----

    async def _send_stream(self, send: Send, receive: Receive, stream: _Stream) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )
        async for chunk in self._events(receive, stream):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _events(self, receive: Receive, stream: _Stream) -> AsyncIterator[bytes]:
        """One `data:` event per log line; with `follow`, more as they come; always an `end` event last."""
        chunk, carry = stream.first, ""
        while True:
            out, carry = _sse_lines(carry, chunk.text)
            if out:
                yield out.encode()
            if not stream.follow or not chunk.alive or await _disconnected(receive, self._poll):
                break
            try:
                chunk = await self._call(stream.read, chunk.offset)
            except ProviderError:
                break
        rest = f"data: {carry}\n\n" if carry else ""
        yield (rest + "event: end\ndata: {}\n\n").encode()


_MODEL_TARGET = re.compile(r"([A-Za-z0-9_-]+)/([a-z0-9_]+)(/.*)?")


def _model_target(scope: Scope) -> tuple[str, str, str]:
    """The sandbox id, upstream name and upstream path of a model-proxy request (the path as sent, still encoded)."""
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if raw else quote(scope["path"])
    m = _MODEL_TARGET.fullmatch(path.removeprefix(model_proxy.PREFIX))
    if m is None:
        raise ProviderError(404, "not_found", "model proxy paths are /v1/model/{sandbox_id}/{model}/…")
    return m.group(1), m.group(2), m.group(3) or "/"


def _follow(r: _Request) -> bool:
    return r.query.get("follow") in ("1", "true")


async def _disconnected(receive: Receive, wait_s: float) -> bool:
    """Waits `wait_s`; True if the client went away meanwhile."""
    try:
        message = await asyncio.wait_for(receive(), timeout=wait_s)
    except TimeoutError:
        return False
    return bool(message["type"] == "http.disconnect")


async def _send_json(send: Send, answer: _Json) -> None:
    data = json.dumps(answer.payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": answer.status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})
