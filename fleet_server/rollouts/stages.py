"""The stages: which devices the current stage holds, how it is judged, and how it ends.

Stage k holds the first ``stage_quota`` of the cohort in the rollout's order (a stable hash
of rollout and device), plus every device notified already. Once all of them have ended and
the bake time has passed, every gate is judged on the stage's telemetry: a breach aborts; a
gate that cannot be judged yet never passes the stage (it waits for its evidence up to
``max_bake_s``, then stops for approval, or aborts); a pass promotes to the next stage, waits
for the operator's approval, or ends the rollout.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from fleet_server.audit.service import record
from fleet_server.database import aware
from fleet_server.rollouts import gates as gate_rules
from fleet_server.rollouts.progress import TargetView, in_order, stage_quota, switch_spread
from fleet_server.rollouts.rollback import abort
from fleet_server.rollouts.spec import EVIDENCE_SETTINGS, GateSpec, Strategy
from fleet_server.rollouts.step import Documents, Step
from fleet_server.rollouts.tables import (
    GateFigure,
    RolloutState,
    TargetPhase,
    TargetState,
)

__all__ = ["count", "current", "judge", "lacking_evidence", "pass_stage", "promote"]

#: What a strategy does once a stage passed its gates (None: the usual next stage or end).
OnPassed = Callable[[Step, list[TargetView], list[dict[str, Any]]], Documents | None]


def current(step: Step, views: list[TargetView]) -> tuple[list[TargetView], list[TargetView]]:
    """The current stage's devices (notified, or due), and those of them to notify."""
    stages = list(step.plan.get("stages") or [100.0])
    eligible = in_order(step.rollout.id, views)
    quota = stage_quota(stages[min(step.rollout.stage, len(stages) - 1)], len(eligible))
    in_stage: list[TargetView] = []
    due: list[TargetView] = []
    for i, v in enumerate(eligible):
        if v.target.phase != TargetPhase.SCHEDULED:
            in_stage.append(v)  # once notified, in every later stage
        elif i < quota:
            in_stage.append(v)
            if v.target.bundle_sha256 is not None:
                due.append(v)
    return in_stage, due


def judge(
    step: Step,
    model: str,
    version: str,
    stage_views: list[TargetView],
    gates: GateSpec,
    *,
    telemetry: bool,
) -> list[GateFigure]:
    """Every gate's figure for the stage; ``telemetry``: the bake is over, so the gates read
    from telemetry are judged too (else only the devices' own verdicts)."""
    rollout, plan = step.rollout, step.plan
    shadow = plan.get("strategy") == Strategy.SHADOW
    return gate_rules.judge(
        step.session,
        step.config.bundles,
        rollout_id=rollout.id,
        model=model,
        version=version,
        created_at=aware(rollout.created_at),
        stage_started_at=aware(rollout.stage_started_at or rollout.created_at),
        views=stage_views,
        gates=gates,
        shadow=shadow,
        telemetry=telemetry,
        bucket_s=step.config.bucket_s,
        shadow_of=plan.get("shadow_of") if shadow else None,
    )


def lacking_evidence(step: Step, lacking: list[GateFigure], figures: list[GateFigure]) -> Documents:
    """Gates that cannot be judged yet never pass a stage: wait for their evidence up to
    ``max_bake_s`` after the bake, then stop for approval (or abort, as the plan says)."""
    rollout, plan, now = step.rollout, step.plan, step.now
    assert rollout.stage_settled_at is not None
    bake_s = float(plan.get("bake_s") or 0)
    max_bake_s = float(plan.get("max_bake_s") or 3600)
    deadline = aware(rollout.stage_settled_at) + timedelta(seconds=bake_s + max_bake_s)
    if now < deadline:
        step.session.add(rollout)
        return {}
    missing = "; ".join(f"{f.gate}: {f.detail}" for f in lacking)
    if plan.get("on_no_evidence") == "abort":
        why = f"no evidence within max_bake_s ({max_bake_s:g} s) for {missing}"
        return abort(step, why, [], figures)
    rollout.state, rollout.awaiting = RolloutState.AWAITING_APPROVAL, "evidence"
    message = (
        f"stage {rollout.stage + 1}: no evidence within max_bake_s ({max_bake_s:g} s) for "
        f"{missing}; promote to accept the stage without it, or abort"
    )
    step.event("no_evidence", message[:1000], lacking=[f.model_dump() for f in lacking])
    record(step.session, step.actor, "rollout.no_evidence", rollout.id,
           stage=rollout.stage + 1, lacking=[f.gate for f in lacking])  # fmt: skip
    step.session.add(rollout)
    return {}


def pass_stage(
    step: Step, views: list[TargetView], figures: list[GateFigure], on_passed: OnPassed
) -> Documents:
    rollout, plan = step.rollout, step.plan
    stages = list(plan.get("stages") or [100.0])
    shown = [f.model_dump() for f in figures]
    decided = on_passed(step, views, shown)
    if decided is not None:
        return decided
    if rollout.stage >= len(stages) - 1:
        return _complete(step, views, shown)
    if plan.get("manual_approval") and rollout.state != RolloutState.AWAITING_APPROVAL:
        rollout.state, rollout.awaiting = RolloutState.AWAITING_APPROVAL, "stage"
        step.event("awaiting_approval",
                   f"stage {rollout.stage + 1} passed its gates; waiting for promote",
                   gates=shown)  # fmt: skip
        step.session.add(rollout)
        return {}
    return promote(step, step.actor, shown)


def promote(step: Step, actor: str, shown: list[dict[str, Any]]) -> Documents:
    rollout = step.rollout
    stages = list(step.plan.get("stages") or [100.0])
    rollout.stage += 1
    rollout.state, rollout.awaiting = RolloutState.IN_PROGRESS, None
    rollout.stage_started_at, rollout.stage_settled_at = step.now, None
    step.event("promoted",
               f"stage {rollout.stage} passed; stage {rollout.stage + 1} "
               f"({stages[rollout.stage]:g} %) begins", actor=actor, gates=shown)  # fmt: skip
    record(step.session, actor, "rollout.promote", rollout.id, stage=rollout.stage + 1,
           gates=shown)  # fmt: skip
    step.session.add(rollout)
    return {}


def _complete(step: Step, views: list[TargetView], shown: list[dict[str, Any]]) -> Documents:
    """The last stage passed: completed, or failed when devices failed and no gate allowed it."""
    rollout, plan = step.rollout, step.plan
    notified = [v for v in views if v.target.phase == TargetPhase.NOTIFIED]
    failed = [
        v
        for v in notified
        if v.state in (TargetState.FAILED, TargetState.ROLLED_BACK, TargetState.REFUSED)
    ]
    gated = any(
        value is not None
        for name, value in (plan.get("gates") or {}).items()
        if name not in EVIDENCE_SETTINGS
    )
    # Failures within a gate's threshold are what the operator allowed; with no gate at all
    # (all at once, as before gates), any failure fails the rollout. Devices that timed out
    # catch up when they reconnect.
    rollout.state = RolloutState.FAILED if failed and not gated else RolloutState.COMPLETED
    rollout.ended_at = step.now
    counts = count(views)
    message = f"{counts.get('serving', 0)} of {len(notified)} devices serve {rollout.id}'s version"
    spread = switch_spread(rollout, views)
    if spread:
        message += (
            f"; they switched within {spread['spread_s']:.3f} s of each other "
            f"(p95 {spread['p95_after_command_s']:.3f} s after the command)"
        )
    if rollout.state == RolloutState.FAILED:
        rollout.reason = "some devices did not install the version (no gate configured)"
    step.event(str(rollout.state), message, gates=shown, counts=counts, switch=spread)
    record(step.session, step.actor, f"rollout.{rollout.state}", rollout.id, counts=counts)
    step.session.add(rollout)
    return {}


def count(views: list[TargetView]) -> dict[str, int]:
    counts = {str(s): 0 for s in TargetState}
    for v in views:
        counts[v.state] += 1
    return counts
