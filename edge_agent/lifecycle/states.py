"""States, events and the one transition table. No logic lives here: handlers decide which
event happened, the table alone decides what state follows.

    IDLE ─deploy─▶ DOWNLOADING ─▶ VERIFYING ─▶ STAGING ─▶ SWITCHING ─▶ PROBATION ─▶ COMMITTED
                        │            │            │           │            │
                        └────────────┴────────────┴───────────┴─failure─▶ FAILED
                                                                           │ failure
                                                          ROLLED_BACK ◀─ ROLLING_BACK

A failure before the swap leaves the active model untouched (it is only ever replaced by the
atomic reference swap in SWITCHING). A failure in PROBATION swaps the prior version back.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    STAGING = "STAGING"
    SWITCHING = "SWITCHING"
    PROBATION = "PROBATION"
    ROLLING_BACK = "ROLLING_BACK"
    COMMITTED = "COMMITTED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"


class Event(StrEnum):
    DEPLOY = "deploy"
    SUCCESS = "success"
    FAILURE = "failure"


#: States in which a deployment is under way; after a crash each counts as failed.
IN_FLIGHT = frozenset(
    {
        State.DOWNLOADING,
        State.VERIFYING,
        State.STAGING,
        State.SWITCHING,
        State.PROBATION,
        State.ROLLING_BACK,
    }
)
#: States a deployment ends in.
TERMINAL = frozenset({State.COMMITTED, State.FAILED, State.ROLLED_BACK})

TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.IDLE, Event.DEPLOY): State.DOWNLOADING,
    (State.COMMITTED, Event.DEPLOY): State.DOWNLOADING,
    (State.FAILED, Event.DEPLOY): State.DOWNLOADING,
    (State.ROLLED_BACK, Event.DEPLOY): State.DOWNLOADING,
    (State.DOWNLOADING, Event.SUCCESS): State.VERIFYING,
    (State.DOWNLOADING, Event.FAILURE): State.FAILED,
    (State.VERIFYING, Event.SUCCESS): State.STAGING,
    (State.VERIFYING, Event.FAILURE): State.FAILED,
    (State.STAGING, Event.SUCCESS): State.SWITCHING,
    (State.STAGING, Event.FAILURE): State.FAILED,
    (State.SWITCHING, Event.SUCCESS): State.PROBATION,
    (State.SWITCHING, Event.FAILURE): State.FAILED,
    (State.PROBATION, Event.SUCCESS): State.COMMITTED,
    (State.PROBATION, Event.FAILURE): State.ROLLING_BACK,
    (State.ROLLING_BACK, Event.SUCCESS): State.ROLLED_BACK,
    (State.ROLLING_BACK, Event.FAILURE): State.FAILED,
}


def next_state(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise ValueError(f"no transition from {state} on {event}") from None
