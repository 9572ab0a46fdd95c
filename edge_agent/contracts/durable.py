"""Durable file writes: a file is replaced whole or not at all, even across power loss.

temp file in the same directory → write → fsync → rename over the target → fsync the
directory (so the rename itself is on disk).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from edge_agent.contracts import failpoints


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``. Writers of one file in other threads or processes
    each use a temp file of their own (named by process and thread): the last rename wins,
    and no writer renames another's half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    failpoints.hit(f"write.{path.name}")
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
