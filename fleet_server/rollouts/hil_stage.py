"""The HIL stage: a rollout that names a rig waits, before its first fleet stage, until the
rig's job has passed the version. A failed job, or none by its deadline, aborts the rollout
with the report linked; no fleet device has been notified before the rig passes."""

from __future__ import annotations

from sqlmodel import select

from fleet_server.hil import service as hil_service
from fleet_server.hil.tables import OPEN_STATES, HilJobState
from fleet_server.rollouts.rollback import abort
from fleet_server.rollouts.step import Documents, Step
from fleet_server.rollouts.tables import RolloutEvent

__all__ = ["hil_stage"]


def hil_stage(step: Step) -> Documents | None:
    """None once the rig has passed the version (the fleet's stages go on); otherwise what
    this step publishes: nothing while the rig runs, the abort when it failed or gave no
    verdict by its deadline."""
    session, rollout, now = step.session, step.rollout, step.now
    job = hil_service.job_for_rollout(session, rollout.id)
    if job is None:
        return abort(step, "the rollout's HIL job is missing", [], [])
    if job.state in OPEN_STATES:
        hil_service.expire(session, now, rig=job.rig)
    if job.state in OPEN_STATES:
        session.add(rollout)
        return {}  # no document to publish: the rig is at work (or waits for its runner)
    public = hil_service.public(job)
    links = {"job_id": job.id, "rig": job.rig, "state": job.state,
             "report_url": public.report_url, "junit_url": public.junit_url}  # fmt: skip
    if job.state == HilJobState.PASSED:
        seen = session.exec(
            select(RolloutEvent.id).where(
                RolloutEvent.rollout_id == rollout.id, RolloutEvent.kind == "hil_passed"
            )
        ).first()
        if seen is None:
            step.event("hil_passed",
                       f"rig {job.rig} passed {job.model} {job.version} "
                       f"(runner {job.claimed_by}); the fleet's first stage begins",
                       stage=0, **links)  # fmt: skip
            rollout.stage_started_at = now  # the fleet's stage timeout starts now
            session.add(rollout)
        return None
    why = f"HIL stage on rig {job.rig} {job.state}: {job.reason or 'no reason given'}"
    if links["report_url"]:
        why += f" (report: {links['report_url']})"
    step.event("hil_failed", why, stage=0, **links)
    return abort(step, why, [], [])
