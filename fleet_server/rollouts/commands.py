"""The operator's commands on a rollout: pause, resume, abort, promote. Each runs on the
locked rollout as one transaction (:meth:`RolloutEngine.act`); a command the rollout's state
does not allow is refused (409, naming the state) before anything is written."""

from __future__ import annotations

from collections.abc import Iterable

from fleet_server.audit.service import record
from fleet_server.errors import ConflictError
from fleet_server.rollouts.rollback import abort as abort_rollout
from fleet_server.rollouts.stages import promote as promote_stage
from fleet_server.rollouts.step import Documents, Step
from fleet_server.rollouts.tables import ACTIVE_STATES, Rollout, RolloutState

__all__ = ["abort", "pause", "promote", "resume"]


def pause(step: Step, actor: str) -> Documents:
    rollout = step.rollout
    _require(rollout, {RolloutState.IN_PROGRESS, RolloutState.AWAITING_APPROVAL}, "pause")
    rollout.state = RolloutState.PAUSED
    step.event("paused", "no more devices are notified", actor=actor)
    record(step.session, actor, "rollout.pause", rollout.id)
    step.session.add(rollout)
    return {}


def resume(step: Step, actor: str) -> Documents:
    rollout = step.rollout
    _require(rollout, {RolloutState.PAUSED}, "resume")
    rollout.state = RolloutState.IN_PROGRESS
    rollout.stage_settled_at = None  # the bake time runs again from now
    step.event("resumed", "notifying again", actor=actor)
    record(step.session, actor, "rollout.resume", rollout.id)
    step.session.add(rollout)
    return {}


def abort(step: Step, actor: str, reason: str | None = None) -> Documents:
    _require(step.rollout, set(ACTIVE_STATES), "abort")
    why = f"aborted by {actor}" + (f": {reason}" if reason else "")
    return abort_rollout(step, why, [], [], actor=actor)


def promote(step: Step, actor: str) -> Documents:
    """Approve the stage that waits for it, or skip the rest of the current stage's bake."""
    rollout = step.rollout
    _require(rollout, {RolloutState.AWAITING_APPROVAL, RolloutState.IN_PROGRESS}, "promote")
    if rollout.state == RolloutState.AWAITING_APPROVAL and rollout.awaiting == "evidence":
        # The operator accepts the stage without the evidence its gates lacked: the stage
        # goes on as if they had passed (an A/B verdict, the next stage, the end).
        rollout.state, rollout.awaiting = RolloutState.IN_PROGRESS, None
        rollout.evidence_waived_stage = rollout.stage
        step.event("approved",
                   f"stage {rollout.stage + 1} accepted without the missing evidence",
                   actor=actor)  # fmt: skip
        record(step.session, actor, "rollout.accept_without_evidence", rollout.id,
               stage=rollout.stage + 1)  # fmt: skip
        step.session.add(rollout)
        return {}
    stages = list(step.plan.get("stages") or [100.0])
    if rollout.stage >= len(stages) - 1:
        raise ConflictError(
            f"rollout {rollout.id} is in its last stage; there is nothing to promote to",
            reason="last_stage",
            rollout_id=rollout.id,
        )
    if rollout.state == RolloutState.IN_PROGRESS and rollout.stage_settled_at is None:
        raise ConflictError(
            f"rollout {rollout.id}'s stage {rollout.stage + 1} is still running; promote "
            "approves a stage once its devices have all ended",
            reason="stage_running",
            rollout_id=rollout.id,
        )
    return promote_stage(step, actor, [])


def _require(rollout: Rollout, allowed: Iterable[RolloutState], verb: str) -> None:
    if rollout.state not in {str(s) for s in allowed}:
        raise ConflictError(
            f"rollout {rollout.id} is {rollout.state}: it cannot {verb}",
            reason="rollout_state",
            rollout_id=rollout.id,
            state=rollout.state,
        )
