"""The on-disk outbox: telemetry batches wait here until the server has stored them.

Layout (one directory): ``state.json`` (the stream id, the next sequence, the count of dropped
batches), one file per closed batch ``{seq:012d}.batch``, and at most one draft
``{seq:012d}.open`` — the current interval's figures so far, rewritten every checkpoint.

Invariants:

- Every write is durable (temp file, fsync, rename): a power cut leaves the old file or the
  new one, never half of one.
- Sequences grow by one per batch, across restarts: the next one is above both the state's
  and every file's.
- A batch leaves only on the server's end-to-end acknowledgement (:meth:`ack`), never on the
  broker's PUBACK; or when the outbox is over its bounds (bytes, age), oldest first — each
  such drop is counted in ``dropped_batches_total``, which every later batch carries.
- The draft holds the sequence it will be sent under: closing it renames ``.open`` to
  ``.batch`` (atomic), and a draft found at start-up is closed as is — the interval it covers
  was cut short by the restart. So a figure in a draft is sent exactly once, and a ``kill -9``
  loses at most what was recorded since the last checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.contracts.durable import write_atomic

__all__ = ["Outbox", "OutboxLimits"]

log = logging.getLogger(__name__)

_BATCH = ".batch"
_OPEN = ".open"


@dataclass(frozen=True)
class OutboxLimits:
    max_bytes: int = 32 << 20
    max_age_s: float = 7 * 24 * 3600


#: Builds a batch's bytes from (seq, floor, dropped_batches_total).
MakeBatch = Callable[[int, int, int], bytes]


class Outbox:
    def __init__(
        self,
        directory: Path,
        limits: OutboxLimits = OutboxLimits(),
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.directory = directory
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)
        state = self._read_state()
        stream = state.get("stream")
        self.stream: str = stream if isinstance(stream, str) else secrets.token_hex(8)
        self.dropped_total: int = int(state.get("dropped_batches_total", 0))
        self._acked: int = int(state.get("acked_seq", 0))
        seqs = [self._seq_of(p) for p in self._files()]
        self._next = max([int(state.get("next_seq", 1)), *(s + 1 for s in seqs)])
        # Leftover temp files of an interrupted write.
        for tmp in directory.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        # A draft left by the last run covers an interval cut short: close it as is.
        for draft in sorted(directory.glob(f"*{_OPEN}")):
            closed = draft.with_suffix(_BATCH)
            if closed.exists():
                draft.unlink()
            else:
                os.replace(draft, closed)
                log.info("closed the telemetry draft %s left by the last run", closed.name)
        self._save_state()

    # --- writing ---------------------------------------------------------------------------------
    def write_draft(self, make: MakeBatch) -> int:
        """Write (or rewrite) the draft of the interval under way; returns its sequence."""
        with self._lock:
            seq = self._next
            data = make(seq, self._floor_locked(seq), self.dropped_total)
            write_atomic(self._path(seq, _OPEN), data)
            return seq

    def close(self, make: MakeBatch) -> int:
        """Close the interval: its batch replaces the draft, and the bounds are enforced
        (oldest batches dropped first, and counted). Returns the batch's sequence."""
        with self._lock:
            seq = self._next
            self._expire_locked()
            data = make(seq, self._floor_locked(seq), self.dropped_total)
            while (over := self._bytes_locked() + len(data) - self.limits.max_bytes) > 0:
                if not self._drop_oldest_locked(over):
                    break  # nothing left to drop: one batch larger than the bound is kept
                # Rebuilt so the batch carries the drops (and its floor steps over them).
                data = make(seq, self._floor_locked(seq), self.dropped_total)
            write_atomic(self._path(seq, _BATCH), data)
            self._next = seq + 1
            self._save_state()
            self._path(seq, _OPEN).unlink(missing_ok=True)
            return seq

    # --- reading ---------------------------------------------------------------------------------
    def pending(self) -> list[int]:
        """Closed batches not yet acknowledged, oldest first."""
        with self._lock:
            return [self._seq_of(p) for p in self._closed_locked()]

    def read(self, seq: int) -> bytes | None:
        try:
            return self._path(seq, _BATCH).read_bytes()
        except FileNotFoundError:  # acknowledged or dropped meanwhile
            return None

    def ack(self, stream: str, acked_seq: int) -> int:
        """The server stored every batch up to ``acked_seq``: delete them. Returns how many
        were deleted; an acknowledgement for another stream is ignored."""
        if stream != self.stream:
            return 0
        with self._lock:
            gone = 0
            for path in self._closed_locked():
                if self._seq_of(path) > acked_seq:
                    break
                path.unlink(missing_ok=True)
                gone += 1
            if acked_seq > self._acked:
                self._acked = acked_seq
                self._save_state()
            return gone

    @property
    def bytes_used(self) -> int:
        with self._lock:
            return self._bytes_locked()

    def expire(self) -> int:
        """Drop batches older than the age bound (counted); returns how many."""
        with self._lock:
            dropped = self._expire_locked()
            if dropped:
                self._save_state()
            return dropped

    # --- internals -------------------------------------------------------------------------------
    def _floor_locked(self, seq: int) -> int:
        """Every sequence at or below this will never be sent again: acknowledged, or
        dropped. Just below the oldest batch still held, or below ``seq`` if none is."""
        closed = self._closed_locked()
        return (self._seq_of(closed[0]) if closed else seq) - 1

    def _expire_locked(self) -> int:
        limit = self._clock() - self.limits.max_age_s
        dropped = 0
        for path in self._closed_locked():
            try:
                if path.stat().st_mtime >= limit:
                    break
            except FileNotFoundError:
                continue
            path.unlink(missing_ok=True)
            dropped += 1
        self.dropped_total += dropped
        if dropped:
            log.warning("telemetry outbox: dropped %d batch(es) older than the age bound", dropped)
        return dropped

    def _drop_oldest_locked(self, over: int) -> int:
        dropped = 0
        for path in self._closed_locked():
            if over <= 0:
                break
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            path.unlink(missing_ok=True)
            over -= size
            dropped += 1
        self.dropped_total += dropped
        if dropped:
            log.warning(
                "telemetry outbox full (%d bytes): dropped the %d oldest batch(es)",
                self.limits.max_bytes,
                dropped,
            )
        return dropped

    def _bytes_locked(self) -> int:
        total = 0
        for path in self._files():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def _files(self) -> list[Path]:
        return sorted(
            p for p in self.directory.iterdir() if p.suffix in (_BATCH, _OPEN) and p.stem.isdigit()
        )

    def _closed_locked(self) -> list[Path]:
        return [p for p in self._files() if p.suffix == _BATCH]

    def _path(self, seq: int, suffix: str) -> Path:
        return self.directory / f"{seq:012d}{suffix}"

    @staticmethod
    def _seq_of(path: Path) -> int:
        return int(path.stem)

    def _read_state(self) -> dict[str, Any]:
        try:
            data = json.loads((self.directory / "state.json").read_bytes())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("telemetry outbox state unreadable (%s); starting a new stream", e)
            return {}

    def _save_state(self) -> None:
        state = {
            "stream": self.stream,
            "next_seq": self._next,
            "acked_seq": self._acked,
            "dropped_batches_total": self.dropped_total,
        }
        write_atomic(self.directory / "state.json", json.dumps(state, sort_keys=True).encode())
