"""Ending a rollout badly: the abort, and the fleet rollback it brings.

Every device the rollout notified gets the assignment its slot had before (or loses the
slot, when it had none); a version staged beside the active one is taken away. A slot that
something newer owns by now is left alone. Devices not notified yet are released. Rolling
back across an input/output change is said in the event, with the differences.
"""

from __future__ import annotations

import json

from edge_agent.protocol.desired import SlotAssignment
from fleet_server.audit.service import record
from fleet_server.devices import desired
from fleet_server.hil import service as hil_service
from fleet_server.rollouts.progress import staging_slot
from fleet_server.rollouts.step import Documents, Step
from fleet_server.rollouts.tables import (
    GateFigure,
    RolloutState,
    TargetPhase,
)

__all__ = ["abort", "roll_back"]


def abort(
    step: Step,
    why: str,
    breached: list[GateFigure],
    figures: list[GateFigure],
    actor: str | None = None,
) -> Documents:
    rollout, now = step.rollout, step.now
    actor = actor or step.actor
    if breached:
        reason = "; ".join(
            f"gate {f.gate}: {f.value} against {f.threshold} ({f.detail})" for f in breached
        )
    else:
        reason = why
    rollout.state, rollout.ended_at, rollout.reason = RolloutState.ABORTED, now, reason[:500]
    hil_service.cancel(step.session, rollout.id, f"the rollout was aborted: {reason}", now)
    rollout.figures = {"gates": [f.model_dump() for f in figures], "at": now.isoformat()}
    shown = [f.model_dump() for f in breached]
    step.event("gate_breach" if breached else "aborted", reason, actor=actor,
               stage=rollout.stage, breached=shown)  # fmt: skip
    documents = roll_back(step)
    message = f"{len(documents)} device(s) given their previous version back"
    breaking = step.plan.get("breaking")
    if breaking and documents:
        # Back across an input/output change: callers updated for the candidate break.
        changes = "; ".join(f"{v}: " + ", ".join(c) for v, c in breaking["differences"].items())
        message += f", across an input/output change ({changes})"
    step.event("rollback", message[:1000], actor=actor, devices=len(documents), breaking=breaking)
    record(step.session, actor, "rollout.abort", rollout.id, reason=reason, breached=shown,
           rolled_back=len(documents))  # fmt: skip
    step.session.add(rollout)
    return documents


def roll_back(step: Step) -> Documents:
    session, rollout = step.session, step.rollout
    targets = list(step.targets.by_device(session).values())
    notified = [t for t in targets if t.phase == TargetPhase.NOTIFIED]
    ids = [t.device_id for t in notified]
    parking = staging_slot(rollout.slot)
    current = desired.stored_slots(session, ids)
    # Most devices go back to one of a few previous versions: each validated once (and so
    # dumped once when the documents are written).
    previous: dict[str, SlotAssignment] = {}
    changes: dict[str, dict[str, SlotAssignment | None]] = {}
    for t in notified:
        change: dict[str, SlotAssignment | None] = {}
        slots = current.get(t.device_id, {})
        mine = slots.get(rollout.slot)
        if mine is not None and mine.get("rollout_id") == rollout.id:
            back = None
            if t.previous is not None:
                key = json.dumps(t.previous, sort_keys=True)
                back = previous.get(key) or previous.setdefault(
                    key, SlotAssignment.from_dict(t.previous)
                )
            change[rollout.slot] = back
        staged = slots.get(parking)
        if staged is not None and staged.get("rollout_id") == rollout.id:
            change[parking] = None  # staged beside the active version: taken away
        if change:  # else something newer owns the slot now: leave it
            changes[t.device_id] = change
    documents = step.change_documents(changes)
    for t in targets:
        if t.phase == TargetPhase.NOTIFIED and t.device_id in changes:
            t.phase = TargetPhase.REVERTED
        elif t.phase == TargetPhase.SCHEDULED:
            t.phase, t.note = TargetPhase.RELEASED, "the rollout ended before its stage"
        else:
            continue
        step.targets.touch(t)
    return documents
