"""Who is calling: an API token holder with a role, or an enrolled device.

The HTTP seam's one piece of identity. ``fleet_server.auth`` finds the principal behind a
bearer token; routes receive it through the role guards in :mod:`fleet_server.api.deps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fleet_server.errors import PermissionDeniedError

__all__ = ["ROLE_RANK", "Principal", "Role"]

Role = Literal["viewer", "operator", "admin"]
ROLE_RANK: dict[str, int] = {"viewer": 1, "operator": 2, "admin": 3}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: an API token holder (with a role) or a device."""

    name: str
    role: str  # viewer / operator / admin / device
    device_id: str | None = None
    #: A dashboard session's CSRF token (every action must send it back); None for callers
    #: with a bearer header, which a browser never adds by itself.
    csrf: str | None = None

    def require(self, role: Role) -> None:
        if ROLE_RANK.get(self.role, 0) < ROLE_RANK[role]:
            raise PermissionDeniedError(
                f"{self.name} ({self.role}) may not do this; it needs the {role} role",
                required_role=role,
            )
