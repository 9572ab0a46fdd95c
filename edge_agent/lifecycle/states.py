"""The one transition table. No logic lives here: handlers report which event happened, the
table alone decides what state follows. States and events are the protocol's
(:mod:`edge_agent.protocol.lifecycle`), so the server reads the same words.

    IDLE/COMMITTED/FAILED/ROLLED_BACK ─deploy─▶ DOWNLOADING ─▶ VERIFYING ─▶ STAGING ─▶ SWITCHING
        ─▶ PROBATION ─success─▶ COMMITTED

    DOWNLOADING … SWITCHING ─failure / retryable_failure / superseded / interrupted─▶ FAILED
    PROBATION ─failure / superseded / interrupted─▶ ROLLING_BACK ─success─▶ ROLLED_BACK
    ROLLING_BACK ─failure─▶ FAILED;  ROLLING_BACK ─interrupted─▶ ROLLED_BACK
    COMMITTED/FAILED/ROLLED_BACK ─failure (the committed version cannot be loaded at start-up)─▶
        ROLLED_BACK (the previous version serves)

A failure before the swap leaves the active model untouched (it is only ever replaced by the
atomic reference swap in SWITCHING). A failure on probation, or a newer desired state that
supersedes the version on probation, swaps the prior version back. Whether a failed bundle is
tried again is the event's to say (``retryable_failure``, ``superseded``, ``interrupted``
before the switch), recorded as ``SlotError.retryable``.
"""

from __future__ import annotations

from edge_agent.protocol.lifecycle import SlotEvent, SlotState

__all__ = ["IN_FLIGHT", "RETRYABLE", "TERMINAL", "TRANSITIONS", "next_state"]

S, E = SlotState, SlotEvent

#: States in which a deployment is under way; after a crash each is settled by INTERRUPTED.
IN_FLIGHT = frozenset(
    {S.DOWNLOADING, S.VERIFYING, S.STAGING, S.SWITCHING, S.PROBATION, S.ROLLING_BACK}
)
#: States a deployment ends in.
TERMINAL = frozenset({S.COMMITTED, S.FAILED, S.ROLLED_BACK})
_STEPS = (S.DOWNLOADING, S.VERIFYING, S.STAGING, S.SWITCHING)

TRANSITIONS: dict[tuple[SlotState, SlotEvent], SlotState] = {
    **{(s, E.DEPLOY): S.DOWNLOADING for s in (S.IDLE, *TERMINAL)},
    (S.DOWNLOADING, E.SUCCESS): S.VERIFYING,
    (S.VERIFYING, E.SUCCESS): S.STAGING,
    (S.STAGING, E.SUCCESS): S.SWITCHING,
    (S.SWITCHING, E.SUCCESS): S.PROBATION,
    **{
        (s, e): S.FAILED
        for s in _STEPS
        for e in (E.FAILURE, E.RETRYABLE_FAILURE, E.SUPERSEDED, E.INTERRUPTED)
    },
    (S.PROBATION, E.SUCCESS): S.COMMITTED,
    (S.PROBATION, E.FAILURE): S.ROLLING_BACK,
    (S.PROBATION, E.SUPERSEDED): S.ROLLING_BACK,
    (S.PROBATION, E.INTERRUPTED): S.ROLLING_BACK,
    (S.ROLLING_BACK, E.SUCCESS): S.ROLLED_BACK,
    (S.ROLLING_BACK, E.FAILURE): S.FAILED,
    (S.ROLLING_BACK, E.INTERRUPTED): S.ROLLED_BACK,  # the prior is what start-up serves
    # At start-up: the committed version cannot be loaded, the previous one serves.
    **{(s, E.FAILURE): S.ROLLED_BACK for s in TERMINAL},
}

#: Events after which the same bundle is tried again by a later document.
RETRYABLE = frozenset({E.RETRYABLE_FAILURE, E.SUPERSEDED})


def next_state(state: SlotState, event: SlotEvent) -> SlotState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise ValueError(f"no transition from {state} on {event}") from None
