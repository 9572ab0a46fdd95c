"""Named crash points, for fault-injection tests against real agent processes.

``EDGE_AGENT_FAILPOINTS="lifecycle.STAGING=1,write.journal.json=3"`` makes the agent kill
itself with SIGKILL (no clean-up, as a power cut) the Nth time it reaches the named point.
Without the variable this is a lookup in an empty dict. Points:

- ``lifecycle.<STATE>``: just after the journal records that the slot entered STATE
- ``write.<file name>``: inside an atomic write, after the temp file, before the rename
- ``download.chunk``: after a chunk of a bundle download reached the disk
"""

from __future__ import annotations

import os
import signal

ENV = "EDGE_AGENT_FAILPOINTS"


def _parse(spec: str) -> dict[str, int]:
    points = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        name, _, nth = item.partition("=")
        points[name] = int(nth or 1)
    return points


_armed = _parse(os.environ.get(ENV, ""))
_hits: dict[str, int] = {}


def hit(name: str) -> None:
    if not _armed or name not in _armed:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= _armed[name]:
        os.kill(os.getpid(), signal.SIGKILL)
