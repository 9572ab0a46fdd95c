"""The notifier: which of a stage's devices get their new document now, and the documents.

Devices are notified in the rollout's order as far as the rate limit allows in any 60 s
(optionally ramping up as devices succeed). Each notified target remembers the assignment
its slot had before (what a rollback gives back) and the ``seq`` of the document that told
it. Documents are staged on the step's session and published after its commit.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlmodel import col, select

from edge_agent.protocol.desired import SlotAssignment
from fleet_server.bundles.tables import Bundle
from fleet_server.database import aware
from fleet_server.devices import desired
from fleet_server.registry.tables import MLModel, ModelVersion
from fleet_server.rollouts.progress import TargetView
from fleet_server.rollouts.spec import RateSpec
from fleet_server.rollouts.step import Documents, Step
from fleet_server.rollouts.tables import TargetPhase, TargetState

__all__ = ["bundles_of", "notify", "rate_allowance", "slot_assignment"]


def slot_assignment(
    public_url: str, model: MLModel, version: ModelVersion, bundle: Bundle, rollout_id: str | None
) -> SlotAssignment:
    return SlotAssignment(
        model=model.name,
        version=version.version,
        bundle_sha256=bundle.sha256,
        bundle_url=f"{public_url}/v1/bundles/{bundle.sha256}",
        size=bundle.size,
        rollout_id=rollout_id,
    )


def rate_allowance(rate: RateSpec, recent: int, succeeded: int) -> int | None:
    """How many more devices may be notified now, given ``recent`` notified in the last 60 s
    and ``succeeded`` serving; None: no limit."""
    limit: float | None = rate.max_per_minute
    if rate.ramp is not None:
        ramp = rate.ramp
        ramped = ramp.base_per_minute * ramp.increase_factor ** (succeeded // ramp.after_succeeded)
        limit = ramped if limit is None else min(limit, ramped)
    if limit is None:
        return None
    return max(0, int(limit) - recent)


def bundles_of(step: Step, views: list[TargetView]) -> dict[str, Bundle]:
    wanted = {v.target.bundle_sha256 for v in views}
    return {
        b.sha256: b
        for b in step.session.exec(select(Bundle).where(col(Bundle.sha256).in_(wanted))).all()
    }


def notify(
    step: Step,
    model: MLModel,
    version: ModelVersion,
    due: list[TargetView],
    views: list[TargetView],
    placement: tuple[str, dict[str, Any]],
) -> Documents:
    """``placement``: the slot the version goes to and what its assignment adds there (the
    strategy's)."""
    if not due:
        return {}
    rollout, now = step.rollout, step.now
    rate = RateSpec.model_validate(step.plan.get("rate") or {})
    minute_ago = now - timedelta(seconds=60)
    recent = sum(
        1 for v in views if v.target.notified_at and aware(v.target.notified_at) > minute_ago
    )
    succeeded = sum(1 for v in views if v.state == TargetState.SERVING)
    allowance = rate_allowance(rate, recent, succeeded)
    if allowance is not None:
        due = due[:allowance]
    if not due:
        return {}
    bundles = bundles_of(step, due)
    target_slot, overrides = placement
    ids = [v.device.id for v in due]
    stored = desired.stored_slots(step.session, ids)
    # One assignment per bundle, shared by its devices (and so dumped once).
    assignments: dict[str, SlotAssignment] = {}
    for sha256, bundle in bundles.items():
        assignment = slot_assignment(step.config.public_url, model, version, bundle, rollout.id)
        assignments[sha256] = assignment.replace(**overrides) if overrides else assignment
    changes: dict[str, dict[str, SlotAssignment | None]] = {
        v.device.id: {target_slot: assignments[v.target.bundle_sha256 or ""]} for v in due
    }
    documents = step.change_documents(changes)
    for v in due:
        t = v.target
        t.previous = stored.get(t.device_id, {}).get(rollout.slot)
        t.phase, t.notified_at = TargetPhase.NOTIFIED, now
        t.desired_seq, t.stage, t.note = documents[t.device_id].seq, rollout.stage, None
        step.targets.touch(t)
    if rollout.stage_started_at is None:
        rollout.stage_started_at = now
    return documents
