"""Canonical JSON: sorted keys, no whitespace, UTF-8, no NaN/Infinity. The bytes every
signature covers, so a document's signature does not depend on who serialised it.

:func:`parse_canonical` is the one way to read signed bytes: it refuses duplicate keys, NaN and
Infinity, nesting deeper than ``MAX_DEPTH``, and bytes that are not the canonical form of what
they hold — so the signature check and the parser cannot see two different documents.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["MAX_DEPTH", "NotCanonicalError", "canonical_json", "parse_canonical"]

#: Deeper than any document edgefleet writes (a manifest nests 5 levels); far below
#: Python's recursion limit, so a hostile document is refused by a check, not a crash.
MAX_DEPTH = 32


class NotCanonicalError(ValueError):
    """Bytes that are not one unambiguous canonical JSON document."""


def canonical_json(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise NotCanonicalError(f"duplicate key(s) {dup}")
    return dict(pairs)


def _no_constants(name: str) -> Any:
    raise NotCanonicalError(f"{name} is not JSON")


#: A JSON string, quotes and escapes included. An unterminated one matches nothing, so its
#: brackets count: an over-count only refuses input that is not JSON anyway.
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def nesting_depth(raw: bytes) -> int:
    """How deep ``raw``'s arrays and objects nest (brackets inside strings not counted).
    Strings and everything but brackets are dropped in C first: every status and telemetry
    message on the server passes here, and a byte-by-byte Python loop cost more than parsing
    the JSON."""
    depth = deepest = 0
    for byte in _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS):
        if byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_json(raw: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Strict JSON: no duplicate keys, no NaN/Infinity, bounded nesting. Raises ValueError
    (``NotCanonicalError`` or ``json.JSONDecodeError``) for anything else."""
    if nesting_depth(raw) > max_depth:
        raise NotCanonicalError(f"nested deeper than {max_depth} levels")
    return json.loads(raw, object_pairs_hook=_unique, parse_constant=_no_constants)


def parse_canonical(raw: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """The document ``raw`` holds, if ``raw`` is exactly its canonical form."""
    value = parse_json(raw, max_depth)
    if canonical_json(value) != raw:
        raise NotCanonicalError("not in canonical form (sorted keys, no whitespace, UTF-8)")
    return value
