"""What every request body schema shares: a field the schema does not name is refused (422),
not ignored, and a number is a number (``true`` is not ``1``). The OpenAPI document then says
exactly what the server accepts."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["RequestBody"]


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
