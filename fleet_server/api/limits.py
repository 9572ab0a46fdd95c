"""Request bodies are bounded per route, and authenticated before a byte of them is read.

An ASGI middleware in front of every route, because an unauthenticated client must not be able
to make the server read, parse or spool a body at all:

1. a request with a body on a route that needs a caller (every one but enrollment, which
   carries its one-time token inside a small body) is answered 401 from its ``Authorization``
   header alone;
2. a declared ``Content-Length`` over the route's limit is answered 413 at once;
3. a body without a declared length (chunked) is counted as it arrives, and cut off with 413
   when it passes the limit; what the route was doing with it is discarded;
4. a body that trickles (a chunk less often than every ``body_chunk_timeout_s``) is cut off
   with 408.

Limits (bytes): the model upload ``max_upload_bytes`` (a setting), enrollment 64 KiB, every
other route 1 MiB — the largest JSON document the API takes (a keyring) is a few KiB.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import cookie_parser

from edge_agent.contracts.errors import EdgefleetError
from fleet_server.api.principal import Principal
from fleet_server.errors import error_body

__all__ = ["DEFAULT_BODY_BYTES", "ENROLL_BODY_BYTES", "BodyLimits"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_BODY_BYTES = 1 << 20
ENROLL_BODY_BYTES = 64 << 10
ENROLL_PATH = "/v1/devices/enroll"
UPLOAD_PATH = "/v1/models"
#: The dashboard: its actions authenticate by session cookie when they carry no bearer header;
#: its sign-in form is the one dashboard route that takes a body from anyone.
UI_PREFIX = "/ui/"
SIGNIN_PATH = "/ui/signin"
SIGNIN_BODY_BYTES = 4 << 10
SESSION_COOKIE = "edgefleet_session"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: Where the authenticated principal waits for the route (``request.state``).
PRINCIPAL_STATE = "edgefleet_principal"


class BodyLimits:
    def __init__(
        self, app: ASGIApp, *, upload_bytes: int, body_chunk_timeout_s: float = 30.0
    ) -> None:
        self.app = app
        self.upload_bytes = upload_bytes
        self.body_chunk_timeout_s = body_chunk_timeout_s

    def limit(self, method: str, path: str) -> int:
        if method == "POST" and path.rstrip("/") == UPLOAD_PATH:
            return self.upload_bytes
        if path == ENROLL_PATH:
            return ENROLL_BODY_BYTES
        if path == SIGNIN_PATH:
            return SIGNIN_BODY_BYTES
        return DEFAULT_BODY_BYTES

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = {k.lower(): v for k, v in scope["headers"]}
        if path not in (ENROLL_PATH, SIGNIN_PATH):
            header = headers.get(b"authorization")
            cookie = None
            if header is None and path.startswith(UI_PREFIX):
                cookie = session_cookie(headers.get(b"cookie"))
            refusal = await self._authenticate(scope, header, cookie)
            if refusal is not None:
                await _reply(send, 401, "unauthenticated", refusal, {"WWW-Authenticate": "Bearer"})
                return
        limit = self.limit(scope["method"], path)
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _reply(send, 400, "bad_request", "Content-Length is not a number")
                return
            if int(declared) > limit:
                await _reply(
                    send, 413, "too_large", f"request body over this route's {limit} bytes"
                )
                return
        await self._bounded(scope, receive, send, limit)

    async def _authenticate(
        self, scope: Scope, header: bytes | None, cookie: str | None
    ) -> str | None:
        """None when the header (or a dashboard session cookie) names a known, unrevoked
        caller (who is then handed to the route's dependency in the request state, so it is
        not looked up twice); else why not."""
        state = scope["app"].state.edgefleet
        authorization = header.decode("latin-1") if header is not None else None

        def check() -> Principal:
            with Session(state.engine) as session:
                principal: Principal
                if cookie is not None:
                    principal = state.authenticate_session(session, cookie)
                else:
                    principal = state.authenticate(session, authorization)
                return principal

        try:
            principal = await run_in_threadpool(check)
        except EdgefleetError as e:
            return e.message
        scope.setdefault("state", {})[PRINCIPAL_STATE] = principal
        return None

    async def _bounded(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        received = 0
        refused = False

        async def limited() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            try:
                with anyio.fail_after(self.body_chunk_timeout_s):
                    message = await receive()
            except TimeoutError:
                refused = True
                await _reply(send, 408, "timeout", "request body arrived too slowly")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    await _reply(
                        send, 413, "too_large", f"request body over this route's {limit} bytes"
                    )
                    return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            if not refused:  # after a refusal the route's own reply is dropped
                await send(message)

        await self.app(scope, limited, guarded)


def session_cookie(header: bytes | None) -> str | None:
    """The dashboard session cookie's value in a ``Cookie`` header, if there is one (read as
    Starlette reads ``request.cookies``)."""
    if header is None:
        return None
    return cookie_parser(header.decode("latin-1")).get(SESSION_COOKIE) or None


async def _reply(
    send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> None:
    body = json.dumps(error_body(code, message)).encode()
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
