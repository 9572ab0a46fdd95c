"""One run at a time on a rig: a lock file on the machine wired to the bench.

``RigLock(name)`` takes an exclusive ``flock`` on ``<lock dir>/<rig>.lock`` and writes who holds
it (process, host, what it runs, since when) beside it, in ``<rig>.holder``. A second run waits
for it, or with ``wait=False`` fails at once naming the holder (:class:`RigBusy`). The kernel
drops the lock when the holder dies, however it dies, so a crashed run never wedges the rig.
Runs that go through the server hold its job lease as well (:mod:`hil.service_runner`).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from edge_agent.contracts.errors import EdgefleetError

__all__ = ["RigBusy", "RigLock", "lock_dir"]


class RigBusy(EdgefleetError):
    reason = "rig_busy"


def lock_dir() -> Path:
    return Path(os.environ.get("EDGEFLEET_HIL_LOCK_DIR", "/tmp/edgefleet-hil"))


class RigLock:
    def __init__(self, rig: str, what: str, directory: Path | None = None) -> None:
        self.rig = rig
        self.what = what
        self.directory = directory or lock_dir()
        self._file: IO[str] | None = None

    @property
    def holder_path(self) -> Path:
        return self.directory / f"{self.rig}.holder"

    def holder(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.holder_path.read_text())
            return data
        except (OSError, ValueError):
            return {}

    def acquire(self, *, wait: bool = True, timeout_s: float | None = None) -> RigLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        f = (self.directory / f"{self.rig}.lock").open("a+")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait or (deadline is not None and time.monotonic() > deadline):
                    f.close()
                    h = self.holder()
                    who = (
                        f"{h.get('what', 'a run')} (pid {h.get('pid')} on {h.get('host')}, "
                        f"since {h.get('since')})"
                        if h
                        else "another run"
                    )
                    raise RigBusy(f"rig {self.rig!r} is held by {who}", rig=self.rig) from None
                time.sleep(0.5)
        self._file = f
        self.holder_path.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "what": self.what,
                    "since": datetime.now(UTC).isoformat(timespec="seconds"),
                }
            )
        )
        return self

    def release(self) -> None:
        if self._file is not None:
            self.holder_path.unlink(missing_ok=True)
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> RigLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
