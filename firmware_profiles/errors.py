"""The one error this package raises.

``firmware_profiles`` is the floor below the agent, so it cannot use the agent's exception
tree (:mod:`edge_agent.contracts.errors`). ``ProfileError`` carries the same structured
fields (``reason``, ``message``, ``fields``); the server answers it with 422 and both CLIs
exit 2 on it, as they do on ``ConfigError`` — it is a configuration error of the same kind.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ProfileError"]


class ProfileError(ValueError):
    """A profile file is invalid or a profile name is unknown; the message names the file and
    the field, or the known profiles."""

    def __init__(self, message: str, *, reason: str = "profile_invalid", **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.fields: dict[str, Any] = fields
