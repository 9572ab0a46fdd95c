"""The journal: the agent's crash-safe record of what each slot runs and what it is doing.

Written atomically (temp file, fsync, rename, fsync of the directory) before each lifecycle
step, so after a crash or power loss the file holds either the old or the new record, never a
torn one. ``committed`` always names a version whose files are complete on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from msgspec import field

from edge_agent.contracts.durable import write_atomic
from edge_agent.contracts.errors import ConfigError
from edge_agent.contracts.structs import Record
from edge_agent.protocol.desired import SlotAssignment
from edge_agent.protocol.lifecycle import SlotState
from edge_agent.protocol.status import SlotError, VersionRef, with_todays_slot_errors


class SlotRecord(Record, kw_only=True):
    state: SlotState = SlotState.IDLE
    committed: VersionRef | None = None
    previous: VersionRef | None = None
    target: SlotAssignment | None = None
    error: SlotError | None = None
    #: A shadow slot: the active slot it runs beside, and the share of requests it sees.
    shadow_of: str | None = None
    sample_rate: float | None = None
    #: The rollouts that brought the committed and previous versions (their telemetry is
    #: tagged with it, so the server's gates judge a rollout's devices after the commit too).
    committed_rollout_id: str | None = None
    previous_rollout_id: str | None = None


class JournalData(Record, kw_only=True):
    version: int = 1
    #: ``seq`` and content digest of the last accepted desired-state document.
    desired_seq: int = 0
    desired_digest: str | None = None
    slots: dict[str, SlotRecord] = field(default_factory=dict)


class Journal:
    def __init__(self, path: Path, *, owner: bool = True) -> None:
        """``owner``: this process is the agent that writes the journal. Readers (``edge-agent
        status``, tests) pass False and never touch the directory."""
        self.path = path
        if owner:
            # A crash inside an atomic write leaves its temp file; the journal is intact.
            for leftover in path.parent.glob(f".{path.name}.*.tmp"):
                leftover.unlink(missing_ok=True)
        self.data = self._read()

    def reload(self) -> None:
        """Back to what is on disk (after a step failed half-way in memory)."""
        self.data = self._read()

    def _read(self) -> JournalData:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return JournalData()
        try:
            return JournalData.from_dict(with_todays_slot_errors(json.loads(raw)))
        except ValueError as e:
            # Atomic writes make a torn file impossible; this is outside damage.
            raise ConfigError(f"{self.path}: journal is unreadable: {e}") from e

    def slot(self, name: str) -> SlotRecord:
        return self.data.slots.setdefault(name, SlotRecord())

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data.to_dict(), indent=1).encode())
