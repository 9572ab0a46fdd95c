"""A/B: a fixed split of the cohort holds for the bake time (arm A keeps the version it ran,
arm B gets the candidate); then a verdict compares the arms on error rate (two-proportion
z-test), mean latency (Welch) and, where labels came back, accuracy. B wins: the rollout goes
on to the whole cohort (after approval when the plan asks for it). Otherwise arm A is kept and
arm B's devices get their version back."""

from __future__ import annotations

from collections import Counter
from typing import Any

from fleet_server.audit.service import record
from fleet_server.database import aware
from fleet_server.registry.service import version_by_id
from fleet_server.rollouts import verdict as verdict_rules
from fleet_server.rollouts.progress import TargetView, bucket_start
from fleet_server.rollouts.rollback import roll_back
from fleet_server.rollouts.stages import promote
from fleet_server.rollouts.step import Documents, Step
from fleet_server.rollouts.strategies.rules import StrategyRules
from fleet_server.rollouts.tables import RolloutState, TargetPhase
from fleet_server.telemetry import query

__all__ = ["ABTest"]


class ABTest(StrategyRules):
    def on_passed(
        self, step: Step, views: list[TargetView], shown: list[dict[str, Any]]
    ) -> Documents | None:
        return _verdict(step, views, shown) if step.rollout.stage == 0 else None


def _verdict(step: Step, views: list[TargetView], shown: list[dict[str, Any]]) -> Documents:
    """The hold is over: compare the arms, then promote B or end keeping A."""
    session, rollout, plan = step.session, step.rollout, step.plan
    model, version = version_by_id(session, rollout.model_version_id)
    since = bucket_start(
        aware(rollout.stage_started_at or rollout.created_at), step.config.bucket_s
    )
    arm_a = [v for v in views if v.target.phase == TargetPhase.SCHEDULED]
    priors = Counter(
        (str(v.target.previous["version"]), v.target.previous.get("rollout_id"))
        for v in views
        if v.target.previous
    )
    if not priors:
        # Arm A runs what the notified devices ran before; without one there is nothing
        # to compare with.
        return _keep_a(step, None, "arm A has no version to compare")
    (a_version, a_rollout), _ = priors.most_common(1)[0]
    figures = verdict_rules.compare(
        verdict_rules.arm(
            a_version,
            query.totals(session, model.name, version=a_version, rollout_id=a_rollout,
                         since=since),
        ),
        verdict_rules.arm(
            version.version,
            query.totals(session, model.name, version=version.version,
                         rollout_id=rollout.id, since=since),
        ),
        float(plan.get("min_confidence") or 0.95),
    )  # fmt: skip
    figures["arm_a_devices"] = len(arm_a)
    figures["arm_b_devices"] = sum(1 for v in views if v.target.phase == TargetPhase.NOTIFIED)
    winner = figures["winner"]
    described = _describe(figures)
    step.event("ab_verdict", described, verdict=figures, gates=shown)
    rollout.figures = {**(rollout.figures or {}), "ab": figures}
    if winner != "b":
        return _keep_a(step, figures, described)
    if plan.get("manual_approval"):
        rollout.state, rollout.awaiting = RolloutState.AWAITING_APPROVAL, "stage"
        session.add(rollout)
        return {}
    return promote(step, step.actor, shown)


def _keep_a(step: Step, figures: dict[str, Any] | None, why: str) -> Documents:
    """A kept: arm B's devices get their previous version back; the experiment is over."""
    rollout = step.rollout
    documents = roll_back(step)
    rollout.state, rollout.ended_at = RolloutState.COMPLETED, step.now
    rollout.reason = f"A/B: arm A kept ({why})"[:500]
    step.event("completed",
               f"arm A kept; {len(documents)} arm B device(s) given their version back",
               verdict=figures, devices=len(documents))  # fmt: skip
    record(step.session, step.actor, "rollout.completed", rollout.id, verdict=figures)
    step.session.add(rollout)
    return documents


def _describe(figures: dict[str, Any]) -> str:
    a, b, cmp = figures["a"], figures["b"], figures["comparison"]
    parts = []
    for name, unit in (("error_rate", ""), ("latency", " ms"), ("accuracy", "")):
        better, confidence = cmp[name]["better"], cmp[name]["confidence"]
        if name == "accuracy" and confidence is None:
            continue  # no labels: not compared
        if name == "error_rate":
            values = f"{a['error_rate'] or 0:.2%} vs {b['error_rate'] or 0:.2%}"
        elif name == "accuracy":
            values = (f"{a['accuracy']:.2%} of {a['labelled']} vs "
                      f"{b['accuracy']:.2%} of {b['labelled']} labelled")  # fmt: skip
        else:
            values = f"mean {a['mean_ms']}{unit} vs {b['mean_ms']}{unit}"
        verdict = f"{better.upper()} better" if better else "no difference"
        conf = f", confidence {confidence:.3f}" if confidence is not None else ""
        parts.append(f"{name} {values} ({verdict}{conf})")
    winner = figures["winner"]
    head = f"winner {winner.upper()}" if winner else "no winner"
    return f"{head}: A {a['version']} vs B {b['version']}: " + "; ".join(parts)
