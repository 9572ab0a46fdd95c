"""Request and response bodies that are the agent's own msgspec structs (enrollment, certificate
renewal): the device and the server share one definition of the JSON, and the agent does not
carry pydantic for it (issue 24).

FastAPI builds its schemas and checks from pydantic models, so a route whose body is a struct
takes it through :func:`struct_body` (decoded by msgspec; an error is answered 422 like any
other invalid request) and names it in the OpenAPI document through :func:`struct_openapi`.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError

from edge_agent.contracts.structs import Strict, error_field

__all__ = ["struct_body", "struct_openapi"]


S = TypeVar("S", bound=Strict)


def struct_body(cls: type[S]) -> Any:
    """A dependency: the request's JSON body as ``cls``, or a 422 naming the field."""

    async def decode(request: Request) -> S:
        raw = await request.body()
        try:
            return cls.from_json(raw)
        except ValueError as e:
            field, message = error_field(e)
            loc = ("body", *field.split(".")) if field else ("body",)
            raise RequestValidationError(
                [{"type": "value_error", "loc": loc, "msg": message, "input": None}]
            ) from e

    return Depends(decode)


def _schema(cls: type) -> dict[str, Any]:
    found = msgspec.json.schema(cls)
    schema: dict[str, Any] = found["$defs"][cls.__name__]
    if "$defs" in str(schema) or "$ref" in str(schema):
        raise TypeError(f"{cls.__name__} nests structs: inline schemas only")
    inline: dict[str, Any] = _ecma_patterns(schema)
    return inline


def _ecma_patterns(node: Any) -> Any:
    """Patterns end in ``$`` as JSON Schema readers know it (``Matching`` wrote ``\\Z`` for
    Python's ``re``, where ``$`` also matches before a final newline)."""
    if isinstance(node, dict):
        return {
            k: re.sub(r"\\Z$", "$", v)
            if k == "pattern" and isinstance(v, str)
            else _ecma_patterns(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_ecma_patterns(v) for v in node]
    return node


def struct_openapi(
    request: type | None = None, response: type | None = None, status: int = 200
) -> dict[str, Any]:
    """``openapi_extra`` for a route: its request body and its reply, as JSON Schema."""
    extra: dict[str, Any] = {}
    if request is not None:
        extra["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _schema(request)}},
        }
    if response is not None:
        extra["responses"] = {
            str(status): {
                "description": "Successful Response",
                "content": {"application/json": {"schema": _schema(response)}},
            }
        }
    return extra
