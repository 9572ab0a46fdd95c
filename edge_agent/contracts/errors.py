"""The edgefleet exception tree, shared by the agent, the server and the converters.

Branches are named for what the caller should do::

    EdgefleetError
    ├── BundleError          untrusted or malformed input: refuse, report, never retry
    │   └── DesiredStateError  a desired-state document that must not be applied
    ├── TransportError       network or broker trouble: retry with backoff
    ├── RuntimeBackendError  a model failed to load or run: fall back to the prior version
    ├── ConversionError      a model could not be compiled for a profile
    ├── ConfigError          a configuration or profile file is wrong: fix the file
    ├── RequestError         a caller sent a bad request (wrong input name, shape, dtype)
    └── Superseded           a newer desired state took over the step under way: stop it

Errors carry structured fields (``device_id``, ``bundle_sha256``, ``reason``) so that a
refusal can be reported over MQTT or REST without parsing the message.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BundleError",
    "ConfigError",
    "ConversionError",
    "DesiredStateError",
    "EdgefleetError",
    "RequestError",
    "RuntimeBackendError",
    "Superseded",
    "TransportError",
]


class EdgefleetError(Exception):
    """Root of every error edgefleet raises on purpose."""

    #: A short machine-readable reason, stable across releases (e.g. ``digest_mismatch``).
    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.fields: dict[str, Any] = fields


class BundleError(EdgefleetError):
    """A bundle (or its download) is not what it claims to be. Never retry the same bytes."""

    reason = "bundle_invalid"


class DesiredStateError(BundleError):
    """A desired-state document is stale, expired or malformed."""

    reason = "desired_state_invalid"


class TransportError(EdgefleetError):
    """I/O with the server or broker failed; retrying later may succeed."""

    reason = "transport"


class RuntimeBackendError(EdgefleetError):
    """A runtime could not load or run a model."""

    reason = "runtime"


class ConversionError(EdgefleetError):
    """A model could not be turned into an artifact for a device profile."""

    reason = "conversion"


class ConfigError(EdgefleetError):
    """A configuration or profile file is invalid; the message names the file and field."""

    reason = "config"


class RequestError(EdgefleetError):
    """A caller's request cannot be served as sent; the message says what to change."""

    reason = "bad_request"


class Superseded(EdgefleetError):
    """A newer desired state took over: the step under way stops (not a failure of the
    step; the newer document decides what the slot runs)."""

    reason = "superseded"
