"""The base of every document edgefleet's agent reads or writes: msgspec structs.

A device process pays for what it imports: with these messages as pydantic models the agent sat
~14 MiB above the same messages as msgspec structs (issue 24), and a Raspberry Pi Zero 2 has
512 MiB in all. msgspec checks types and ``Meta`` constraints while it decodes, in C, and each
struct's ``__post_init__`` holds its cross-field rules, run whenever one is made (decoded,
built, or copied with :meth:`Strict.replace`).

    Strict   frozen, unknown fields refused: every message, manifest and keyring
    Record   mutable, unknown fields ignored: the agent's own journal

A constructor (``TensorSpec(name=…)``) checks only ``__post_init__``'s rules, not the fields'
types and ``Meta`` constraints: whatever comes from outside (a file, a request, a command
line) is decoded with ``from_dict`` / ``from_json``, which check everything.

Errors are ``ValueError`` (msgspec's ``ValidationError`` is one) naming the field:
``resources.threads: Expected `int` >= 1, got `0```; :func:`error_field` splits the two.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath
from typing import Any, Self

import msgspec

__all__ = ["FieldError", "Matching", "Record", "Strict", "error_field"]


def Matching(pattern: str) -> msgspec.Meta:
    """A ``Meta`` for strings that match ``pattern`` whole. msgspec searches with Python's
    ``re``, where ``$`` also matches before a final newline: ``"cam-1\\n"`` would pass
    ``^[a-z0-9-]+$``. The pattern's final ``$`` becomes ``\\Z`` (the very end)."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return msgspec.Meta(pattern=pattern)


def _decode_hook(kind: type, value: Any) -> Any:
    if kind is Path and isinstance(value, str):
        return Path(value)
    raise TypeError(f"Expected `{kind.__name__.lower()}`, got `{type(value).__name__}`")


def _encode_hook(value: Any) -> Any:
    """Paths as strings; anything else msgspec does not know is an error, as without a hook."""
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"{type(value).__name__} has no JSON form")


_ENCODER = msgspec.json.Encoder(enc_hook=_encode_hook)


class _Codec:
    """What both kinds of struct share (a mixin: a plain class with no slots of its own)."""

    __slots__ = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready builtins (datetimes as RFC 3339 strings, enums as their values)."""
        out: dict[str, Any] = msgspec.to_builtins(self, enc_hook=_encode_hook)
        return out

    def to_json(self) -> bytes:
        return _ENCODER.encode(self)

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        """Raises ValueError naming the field that is wrong."""
        return msgspec.convert(data, cls, dec_hook=_decode_hook)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Self:
        """Raises ValueError naming the field (or the position) that is wrong."""
        return msgspec.json.decode(raw, type=cls, dec_hook=_decode_hook)


class Strict(_Codec, msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A message: read-only once made, and an unknown field is an error."""

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes``; its rules (``__post_init__``) are checked again."""
        return msgspec.structs.replace(self, **changes)


class Record(_Codec, msgspec.Struct, kw_only=True):
    """A record the agent keeps and updates in place (fields it does not know are dropped:
    a newer agent's journal stays readable by an older one after a downgrade)."""


class FieldError(ValueError):
    """A struct's own rule (``__post_init__``) broken by one of its fields: decoding errors
    then name ``<the struct's path>.<field>`` (:func:`error_field`), not the struct."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


#: "<message> - at `$.a[0]`", or "- at `key` in `$.slots`" for a mapping's key.
_AT = re.compile(r"^(?P<message>.*) - at (?:`key` in )?`\$(?P<path>[^`]*)`$", re.DOTALL)
_UNKNOWN = re.compile(r"^Object contains unknown field `(?P<name>[^`]*)`$")


def error_field(error: ValueError) -> tuple[str, str]:
    """``(field, message)`` of a decoding error: ``("runtimes.0.precisions", "Expected …")``
    (a mapping's value is named by the mapping: ``labels``; a :class:`FieldError` by its
    field); the field is "" when the error is about the whole document."""
    text = str(error)
    match = _AT.match(text)
    path, message = (match["path"], match["message"]) if match else ("", text)
    # A list's index is a part of the path; a mapping's value has no key in msgspec's path.
    path = re.sub(r"\[(\d+)\]", r".\1", path.replace("[...]", "")).lstrip(".")
    unknown = _UNKNOWN.match(message)
    if unknown is not None:  # the field is the one that should not be there
        path = f"{path}.{unknown['name']}" if path else unknown["name"]
    rule = error.__cause__
    if isinstance(rule, FieldError):
        path, message = f"{path}.{rule.field}" if path else rule.field, rule.message
    return path, message
