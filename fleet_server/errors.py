"""Domain errors of the server and the one place that maps errors to HTTP.

Services raise these (or any :class:`EdgefleetError`); routes never build HTTP errors for
business rules. Every error body is ``{"error": {"code", "message", "detail"}}``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_agent.contracts.errors import BundleError, ConfigError, ConversionError, EdgefleetError
from firmware_profiles import ProfileError

log = logging.getLogger(__name__)


class NotFoundError(EdgefleetError):
    reason = "not_found"


class ConflictError(EdgefleetError):
    reason = "conflict"


class InvalidInputError(EdgefleetError):
    reason = "invalid_input"


class AuthenticationError(EdgefleetError):
    reason = "unauthenticated"


class PermissionDeniedError(EdgefleetError):
    reason = "forbidden"


class UnavailableError(EdgefleetError):
    """The server cannot do this now through no fault of the request (a file it must write,
    a service it must reach); the message says what its operator should fix."""

    reason = "unavailable"


_STATUS: list[tuple[type[EdgefleetError], int]] = [
    (NotFoundError, 404),
    (ConflictError, 409),
    (InvalidInputError, 422),
    (ConversionError, 422),
    (ConfigError, 422),
    (BundleError, 422),
    (AuthenticationError, 401),
    (PermissionDeniedError, 403),
    (UnavailableError, 503),
]


class ErrorDetail(BaseModel):
    code: str
    message: str
    detail: Any = None


class ErrorBody(BaseModel):
    """Every error the API answers: ``{"error": {"code", "message", "detail"}}``."""

    error: ErrorDetail


#: What each error status means, for the OpenAPI document: every /v1 route may answer these.
ERROR_STATUSES: dict[int, str] = {
    400: "Malformed request (e.g. a Content-Length that is not a number)",
    401: "Missing, unknown or revoked credential",
    403: "The credential's role (or device) may not do this",
    404: "No such resource",
    408: "The request body arrived too slowly",
    409: "Conflicts with the current state (nothing was changed)",
    413: "Request body over the route's limit",
    422: "The request is well-formed but its content is invalid; the message names the field",
    503: "The server cannot do this now (a file it must write, a service it must reach); "
    "nothing was changed, and the message says what its operator should fix",
}


#: ``responses=`` for every /v1 router: each error status with the error body's schema, so
#: generated clients and fuzzers see the contract the handlers below keep.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in ERROR_STATUSES.items()
}


def http_status(exc: EdgefleetError) -> int:
    """The HTTP status an error answers with (500: not a domain error we map)."""
    return next((s for cls, s in _STATUS if isinstance(exc, cls)), 500)


def error_body(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "detail": detail}}


def error_response(request: Request, exc: EdgefleetError) -> JSONResponse:
    """The API's answer to a domain error: its status and the JSON error body."""
    status = http_status(exc)
    if status == 500:
        log.error("unhandled domain error on %s: %s", request.url.path, exc.message)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    detail = {k: v for k, v in exc.fields.items()} or None
    return JSONResponse(error_body(exc.reason, exc.message, detail), status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(EdgefleetError)
    async def _domain(request: Request, exc: EdgefleetError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(ProfileError)
    async def _profile(request: Request, exc: ProfileError) -> JSONResponse:
        return JSONResponse(error_body(exc.reason, exc.message, exc.fields or None), 422)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        detail = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in errors]
        return JSONResponse(error_body("invalid_request", f"{where}: {first['msg']}", detail), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 416: "range_not_satisfiable"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(
            error_body(code, str(exc.detail)),
            exc.status_code,
            headers=getattr(exc, "headers", None),
        )
