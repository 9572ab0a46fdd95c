"""Stage then activate (blue-green on the device): every device stages the version beside its
active one (a shadow that sees no request) and reports it staged; once the whole cohort has
staged, failed or timed out (within the gates), one step tells every staged device to switch,
and the staging slot goes away everywhere. When each device switched is kept, from its own
report, so the completion can say how close together the fleet switched."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from edge_agent.protocol.desired import SlotAssignment
from fleet_server.audit.service import record
from fleet_server.registry.tables import MLModel, ModelVersion
from fleet_server.rollouts.notifier import bundles_of, slot_assignment
from fleet_server.rollouts.progress import TargetView, staging_slot, view_slot
from fleet_server.rollouts.step import Documents, Step
from fleet_server.rollouts.strategies.rules import StrategyRules
from fleet_server.rollouts.tables import Rollout, TargetPhase, TargetState

__all__ = ["StageThenActivate"]


class StageThenActivate(StrategyRules):
    def placement(self, rollout: Rollout) -> tuple[str, dict[str, Any]]:
        if rollout.activated_at is not None:
            return rollout.slot, {}
        # Staged beside the active version: a shadow of it that sees no request.
        return staging_slot(rollout.slot), {"shadow_of": rollout.slot, "sample_rate": 0.0}

    def observe(self, step: Step, views: list[TargetView]) -> None:
        if step.rollout.activated_at is not None:
            _record_switches(step, views)

    def on_settled(
        self, step: Step, model: MLModel, version: ModelVersion, views: list[TargetView]
    ) -> Documents | None:
        _, staging = view_slot(step.rollout)
        return _activate(step, model, version, views) if staging else None


def _activate(
    step: Step, model: MLModel, version: ModelVersion, views: list[TargetView]
) -> Documents:
    """One step tells every staged device to switch; the staging slot goes away everywhere
    (a device that did not stage is released)."""
    rollout = step.rollout
    staged = [v for v in views if v.state == TargetState.STAGED]
    others = [v for v in views if v.target.phase == TargetPhase.NOTIFIED and v not in staged]
    bundles = bundles_of(step, staged)
    parking = staging_slot(rollout.slot)
    changes: dict[str, dict[str, SlotAssignment | None]] = {}
    active = {
        sha256: slot_assignment(step.config.public_url, model, version, bundle, rollout.id)
        for sha256, bundle in bundles.items()
    }
    for v in staged:
        changes[v.device.id] = {rollout.slot: active[v.target.bundle_sha256 or ""], parking: None}
    for v in others:
        changes[v.device.id] = {parking: None}
        v.target.phase = TargetPhase.RELEASED
        v.target.note = f"not staged when the fleet switched ({v.state})"
        step.targets.touch(v.target)
    documents = step.change_documents(changes)
    for v in staged:
        v.target.desired_seq = documents[v.device.id].seq
        step.targets.touch(v.target)
    rollout.activated_at, rollout.stage_settled_at = step.now, None
    step.event("activated",
               f"{len(staged)} staged device(s) told to switch at once"
               + (f"; {len(others)} that did not stage released" if others else ""),
               staged=len(staged), released=len(others))  # fmt: skip
    record(step.session, step.actor, "rollout.activate", rollout.id, staged=len(staged))
    step.session.add(rollout)
    return documents


def _record_switches(step: Step, views: list[TargetView]) -> None:
    """When each device switched, from its own report of the switch (the PROBATION
    transition, or COMMITTED when that is the first report seen)."""
    for v in views:
        t = v.target
        if t.switched_at is not None or v.state not in (
            TargetState.PROBATION,
            TargetState.SERVING,
        ):
            continue
        moved = (v.device.reported or {}).get("last_transition") or {}
        switched = step.now
        if (
            moved.get("slot") == step.rollout.slot
            and moved.get("bundle_sha256") == t.bundle_sha256
            and moved.get("to_state") in ("PROBATION", "COMMITTED")
        ):
            switched = datetime.fromisoformat(moved["at"])
        t.switched_at = switched
        step.targets.touch(t)
