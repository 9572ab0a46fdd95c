"""A build's states, apart from its tables so that the CLI can name them without loading the
database layer."""

from __future__ import annotations

from enum import StrEnum


class BuildState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


#: A build in one of these states will not change any more.
FINISHED = frozenset({BuildState.SUCCEEDED, BuildState.FAILED})
