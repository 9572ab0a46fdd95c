"""Canonical JSON: sorted keys, no whitespace, UTF-8. The bytes every signature covers, so a
document's signature does not depend on who serialised it."""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
