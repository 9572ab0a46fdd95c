"""The rollout engine: a reconciler that moves every active rollout one step towards its plan.

One step of one rollout, under that rollout's row lock (``SELECT … FOR UPDATE SKIP LOCKED`` on
PostgreSQL: with several server processes on one database, one acts on a rollout at a time
and the others skip it; SQLite has one writer, and one process lock covers its threads):

1. **Cohort.** Devices that now match the selector join as ``scheduled`` targets (with the
   bundle for their profile — built when missing, ``excluded`` with the reason when the build
   fails); targets that no longer match are ``released``.
2. **Gates, cheap ones.** Install failures, agent rollbacks and time-outs of the current
   stage's devices: a breach aborts now, before the stage has run its course.
3. **Notify.** The stage holds the first ``quota`` devices of the cohort by a stable hash of
   (rollout, device); those not yet notified get a new desired-state document, as many as the
   rate limit allows in any 60 s (optionally ramping up as devices succeed).
4. **Judge.** When every device of the stage has ended (serving, failed, rolled back, refused or
   timed out) and the bake time has passed, every gate is judged on telemetry from the stage's
   devices. Pass: the next stage (or ``awaiting_approval``), or ``completed``. Breach: the
   rollout is aborted and every touched device gets its previous assignment back.

Every decision is a ``rollout_events`` row and an audit entry, written in the transaction that
makes it, so it is recorded exactly once however many processes run the engine. Documents are
published after the commit; a publish lost with the broker is re-sent by the control plane
from the database when the device reports a stale ``seq``. The step is idempotent: rerunning
it after a crash or a restart does what is still to do and nothing twice.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from edge_agent.contracts.errors import ConversionError
from edge_agent.protocol.desired import SignedDesiredState, SlotAssignment
from firmware_profiles import ProfileError
from fleet_server.audit.service import record
from fleet_server.builds.runner import BuildRunner
from fleet_server.builds.service import ensure_bundle
from fleet_server.bundles.tables import Bundle
from fleet_server.database import aware
from fleet_server.devices import desired
from fleet_server.devices.selectors import Selector
from fleet_server.devices.tables import Device
from fleet_server.errors import ConflictError, NotFoundError
from fleet_server.hil import service as hil_service
from fleet_server.hil.tables import OPEN_STATES, RIG_LABEL, HilJobState
from fleet_server.keys.service import FleetSigner, ServerKeys
from fleet_server.registry.service import version_by_id
from fleet_server.registry.tables import MLModel, ModelVersion
from fleet_server.rollouts import gates as gate_rules
from fleet_server.rollouts import verdict as verdict_rules
from fleet_server.rollouts.progress import (
    FAILURES,
    DeviceRow,
    TargetView,
    bucket_start,
    device_rows,
    in_order,
    stage_quota,
    staging_slot,
    target_view,
    view_slot,
)
from fleet_server.rollouts.spec import EVIDENCE_SETTINGS, GateSpec, RateSpec, Strategy
from fleet_server.rollouts.tables import (
    ACTIVE_STATES,
    GateFigure,
    Rollout,
    RolloutEvent,
    RolloutState,
    RolloutTarget,
    TargetPhase,
    TargetState,
)
from fleet_server.telemetry import query

__all__ = ["BundleChoice", "RolloutEngine", "cohort_of", "rate_allowance", "slot_assignment"]

log = logging.getLogger(__name__)

#: Publishes documents; waits up to the given seconds for the broker to acknowledge them.
Publish = Callable[[dict[str, SignedDesiredState], float], None]
Cohort = tuple[str, tuple[str, ...] | None]


def cohort_of(device: Device | DeviceRow) -> Cohort:
    """(profile, runtimes the device has) — None when it has not said. One bundle each."""
    return device.profile, tuple(sorted(device.runtimes)) if device.runtimes else None


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


@dataclass(frozen=True)
class BundleChoice:
    """For one cohort: its bundle, or that its build is still running, or why it has none."""

    sha256: str | None = None
    pending_build: str | None = None
    excluded: str | None = None


def choose_bundle(
    session: Session,
    runner: BuildRunner,
    model: MLModel,
    version: ModelVersion,
    cohort: Cohort,
    signer: FleetSigner,
    actor: str,
    *,
    wait_s: float,
) -> BundleChoice:
    """Commits (a build request is its own transaction): call outside the rollout's lock."""
    profile_name, runtimes = cohort
    try:
        profile = runner.catalog.get(profile_name)
    except ProfileError:
        return BundleChoice(excluded=f"device profile {profile_name!r} is no longer known")
    try:
        bundle = ensure_bundle(
            session, runner, model, version, profile, signer,
            runtimes=list(runtimes) if runtimes is not None else None,
            actor=actor, wait_s=wait_s,
        )  # fmt: skip
    except ConflictError as e:
        if e.reason == "build_pending":
            return BundleChoice(pending_build=str(e.fields.get("build_id") or ""))
        raise
    except ConversionError as e:
        return BundleChoice(excluded=f"no bundle for {profile_name}: {e.message}")
    return BundleChoice(sha256=bundle.sha256)


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


class RolloutEngine:
    def __init__(
        self,
        engine: Engine,
        *,
        keys: ServerKeys,
        runner: BuildRunner,
        bundles: Any,
        publish: Publish,
        public_url: str,
        desired_ttl_s: int,
        tick_s: float = 1.0,
        bucket_s: int = 60,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """``bundles``: the telemetry bundle catalog (drift baselines) the gates read with."""
        self._engine = engine
        self._keys = keys
        self._runner = runner
        self._bundles = bundles
        self._publish = publish
        self.public_url = public_url
        self._ttl_s = desired_ttl_s
        self._tick_s = tick_s
        self._bucket_s = bucket_s
        self._clock = clock
        #: One step at a time in this process (SQLite has no row locks; threads share it).
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._postgres = engine.dialect.name == "postgresql"
        #: Who the history says decided: this process, so replicas can be told apart.
        self.actor = f"reconciler@{socket.gethostname()}:{os.getpid()}"

    @property
    def lock(self) -> threading.RLock:
        """Held while this process changes a rollout (its steps and the operator's commands)."""
        return self._lock

    # --- the loop --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="edgefleet-rollouts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def wake(self) -> None:
        """Something changed (a status arrived, a device enrolled): step soon."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._tick_s)
            self._wake.clear()
            if self._stopping.is_set():
                return
            started = time.monotonic()
            try:
                self.tick()
            except Exception:  # the loop outlives any one failure; the next tick retries
                log.exception("rollout reconciler tick failed")
            # Status reports arrive in bursts; coalesce them rather than step per message,
            # and spend at most about half the time stepping (a 10,000-device rollout takes
            # a while to read).
            spent = time.monotonic() - started
            self._stopping.wait(max(min(0.25, self._tick_s), spent))

    def tick(self) -> int:
        """Step every active rollout once; returns how many were stepped."""
        with Session(self._engine) as session:
            ids = list(
                session.exec(
                    select(Rollout.id)
                    .where(col(Rollout.state).in_([str(s) for s in ACTIVE_STATES]))
                    .order_by(col(Rollout.created_at))
                ).all()
            )
        for rollout_id in ids:
            try:
                self.step(rollout_id)
            except Exception:
                log.exception("rollout %s: step failed", rollout_id)
        return len(ids)

    # --- one step --------------------------------------------------------------------------------
    def step(self, rollout_id: str, *, wait_published_s: float = 0.0) -> None:
        """``wait_published_s``: wait (up to that) for the broker to hold what was published
        (a REST call that answers after it); the reconciler does not wait: a device that
        missed a document is sent it again when it reports an older ``seq``."""
        with self._lock:
            started = time.perf_counter()
            choices = self._prepare_bundles(rollout_id)
            with Session(self._engine) as session:
                rollout = self._locked(session, rollout_id, wait=False)
                if rollout is None or rollout.state not in ACTIVE_STATES:
                    session.rollback()
                    return
                decided = time.perf_counter()
                documents = self._advance(session, rollout, choices)
                written = time.perf_counter()
                session.commit()
            committed = time.perf_counter()
            if documents:
                self._publish(documents, wait_published_s)
            if len(documents) >= 100:
                log.info(
                    "rollout %s: %d documents in %.2f s (read + bundles %.2f s, decide + sign + "
                    "stage %.2f s, commit %.2f s, publish %.2f s)",
                    rollout_id, len(documents), time.perf_counter() - started,
                    decided - started, written - decided, committed - written,
                    time.perf_counter() - committed,
                )  # fmt: skip

    def act(
        self, rollout_id: str, action: Callable[[Session, Rollout], dict[str, SignedDesiredState]]
    ) -> None:
        """Run an operator's command on the locked rollout (waiting for the lock), commit,
        publish what it wrote. A refusal raises before anything is written."""
        with self._lock:
            with Session(self._engine) as session:
                rollout = self._locked(session, rollout_id, wait=True)
                if rollout is None:
                    raise NotFoundError(f"no rollout {rollout_id!r}", rollout_id=rollout_id)
                documents = action(session, rollout)
                session.commit()
            if documents:
                self._publish(documents, 5.0)

    def _locked(self, session: Session, rollout_id: str, *, wait: bool) -> Rollout | None:
        query = select(Rollout).where(Rollout.id == rollout_id)
        if self._postgres:
            query = query.with_for_update(skip_locked=not wait)
        return session.exec(query).first()

    def signer(self, session: Session) -> FleetSigner:
        return self._keys.signer(session)

    def _prepare_bundles(self, rollout_id: str) -> dict[Cohort, BundleChoice]:
        """Bundles for the cohorts of devices the rollout has no bundle for yet (newcomers,
        builds that were pending). Outside the lock: a build request commits."""
        with Session(self._engine) as session:
            rollout = session.get(Rollout, rollout_id)
            if rollout is None or rollout.state not in ACTIVE_STATES:
                return {}
            targets = {
                t.device_id: t
                for t in session.exec(
                    select(RolloutTarget).where(RolloutTarget.rollout_id == rollout_id)
                ).all()
            }
            known: dict[Cohort, BundleChoice] = {}
            wanted: set[Cohort] = set()
            for device in self._cohort(session, rollout).values():
                cohort = cohort_of(device)
                target = targets.get(device.id)
                if target is not None and target.bundle_sha256:
                    known[cohort] = BundleChoice(sha256=target.bundle_sha256)
                elif target is None or target.phase == TargetPhase.SCHEDULED:
                    wanted.add(cohort)
            missing = wanted - set(known)
            if not missing:
                return known
            model, version = version_by_id(session, rollout.model_version_id)
            try:
                signer = self.signer(session)
            except ConflictError:
                return known
            for cohort in sorted(missing, key=str):
                known[cohort] = choose_bundle(
                    session, self._runner, model, version, cohort, signer, self.actor,
                    wait_s=0,
                )  # fmt: skip
            return known

    def _cohort(self, session: Session, rollout: Rollout) -> dict[str, DeviceRow]:
        """The devices the cohort holds now, without their reports (labels and profile
        decide; reading 10,000 reports to choose would cost more than the step)."""
        query = select(Device.id, Device.profile, Device.labels, Device.runtimes)
        if rollout.devices is not None:
            rows = session.exec(query.where(col(Device.id).in_(rollout.devices))).all()
            return {r[0]: _light(r) for r in rows}
        selector = (
            Selector.parse(rollout.cohort)
            if rollout.cohort is not None
            else Selector.from_labels(rollout.selector or {})
        )
        return {
            r[0]: _light(r)
            for r in session.exec(query).all()
            # A HIL rig's devices are reached by id only, never by a selector.
            if RIG_LABEL not in (r[2] or {}) and selector.matches(dict(r[2] or {}), r[1])
        }

    def _advance(
        self, session: Session, rollout: Rollout, choices: dict[Cohort, BundleChoice]
    ) -> dict[str, SignedDesiredState]:
        with session.no_autoflush:  # the rows it adds are flushed once, at the commit
            return self._advance_unflushed(session, rollout, choices)

    def _advance_unflushed(
        self, session: Session, rollout: Rollout, choices: dict[Cohort, BundleChoice]
    ) -> dict[str, SignedDesiredState]:
        now = self._clock()
        plan = rollout.plan or {}
        if plan.get("hil"):
            held = self._hil_stage(session, rollout, now)
            if held is not None:
                return held
        gates = GateSpec.model_validate(plan.get("gates") or {})
        model, version = version_by_id(session, rollout.model_version_id)
        targets = {
            t.device_id: t
            for t in session.exec(
                select(RolloutTarget).where(RolloutTarget.rollout_id == rollout.id)
            ).all()
        }
        cohort = self._cohort(session, rollout)
        self._sync_cohort(session, rollout, targets, cohort, choices, now)
        devices = device_rows(session, list(targets))
        timeout_s = float(plan.get("stage_timeout_s") or 1800)
        slot, staging = view_slot(rollout)
        since = aware(rollout.activated_at) if rollout.activated_at else None
        views = [
            target_view(
                t,
                devices[t.device_id],
                slot,
                now=now,
                timeout_s=timeout_s,
                staging=staging,
                since=since,
            )
            for t in targets.values()
            if t.device_id in devices
        ]
        if since is not None:
            self._record_switches(session, rollout, views, now)
        for v in views:
            if v.state in FAILURES and v.error is not None and v.target.error != v.error:
                v.target.error = v.error  # kept: a rollback clears the device's own record
                session.add(v.target)
        stage_views, to_notify = self._stage(rollout, plan, views)
        figures = self._judge(session, rollout, model.name, version.version, stage_views, gates,
                              telemetry=False)  # fmt: skip
        broken = gate_rules.breaches(figures)
        if broken:
            return self._abort(session, rollout, now, "gate_breach", broken, figures)
        documents: dict[str, SignedDesiredState] = {}
        if rollout.state != RolloutState.PAUSED:
            documents = self._notify(session, rollout, model, version, to_notify, views, now)
        rollout.figures = {"gates": [f.model_dump() for f in figures], "at": now.isoformat()}
        if rollout.state != RolloutState.IN_PROGRESS or documents:
            session.add(rollout)
            return documents
        settled = bool(stage_views) and all(v.ended for v in stage_views)
        if not stage_views and not [v for v in views if v.state == TargetState.WAITING]:
            settled = True  # nothing left to do in this stage (every device left or excluded)
        if not settled:
            rollout.stage_settled_at = None
            session.add(rollout)
            return documents
        if staging:
            return self._activate(session, rollout, model, version, views, now)
        if rollout.stage_settled_at is None:
            rollout.stage_settled_at = now
        bake_s = float(plan.get("bake_s") or 0)
        if now < aware(rollout.stage_settled_at) + timedelta(seconds=bake_s):
            session.add(rollout)
            return documents
        figures = self._judge(session, rollout, model.name, version.version, stage_views, gates,
                              telemetry=True)  # fmt: skip
        rollout.figures = {"gates": [f.model_dump() for f in figures], "at": now.isoformat()}
        waiting = [f for f in figures if f.gate == "min_devices_reporting" and f.ok is False]
        broken = [f for f in gate_rules.breaches(figures) if f not in waiting]
        started = aware(rollout.stage_started_at or rollout.created_at)
        if broken:
            return self._abort(session, rollout, now, "gate_breach", broken, figures)
        if waiting and now < started + timedelta(seconds=timeout_s):
            session.add(rollout)
            return documents  # not enough devices have reported yet: wait for them
        if waiting:
            return self._abort(session, rollout, now, "gate_breach", waiting, figures)
        lacking = gate_rules.lacking(figures)
        if lacking and rollout.evidence_waived_stage != rollout.stage:
            return self._lacking_evidence(session, rollout, plan, lacking, figures, now)
        return self._pass_stage(session, rollout, plan, views, figures, now)

    def _lacking_evidence(
        self,
        session: Session,
        rollout: Rollout,
        plan: dict[str, Any],
        lacking: list[GateFigure],
        figures: list[GateFigure],
        now: datetime,
    ) -> dict[str, SignedDesiredState]:
        """Gates that cannot be judged yet never pass a stage: wait for their evidence up to
        ``max_bake_s`` after the bake, then stop for approval (or abort, as the plan says)."""
        assert rollout.stage_settled_at is not None
        bake_s = float(plan.get("bake_s") or 0)
        max_bake_s = float(plan.get("max_bake_s") or 3600)
        deadline = aware(rollout.stage_settled_at) + timedelta(seconds=bake_s + max_bake_s)
        if now < deadline:
            session.add(rollout)
            return {}
        missing = "; ".join(f"{f.gate}: {f.detail}" for f in lacking)
        if plan.get("on_no_evidence") == "abort":
            why = f"no evidence within max_bake_s ({max_bake_s:g} s) for {missing}"
            return self._abort(session, rollout, now, why, [], figures)
        rollout.state, rollout.awaiting = RolloutState.AWAITING_APPROVAL, "evidence"
        message = (
            f"stage {rollout.stage + 1}: no evidence within max_bake_s ({max_bake_s:g} s) for "
            f"{missing}; promote to accept the stage without it, or abort"
        )
        self._event(session, rollout, now, "no_evidence", message[:1000],
                    lacking=[f.model_dump() for f in lacking])  # fmt: skip
        record(session, self.actor, "rollout.no_evidence", rollout.id, stage=rollout.stage + 1,
               lacking=[f.gate for f in lacking])  # fmt: skip
        session.add(rollout)
        return {}

    # --- the HIL stage ---------------------------------------------------------------------------
    def _hil_stage(
        self, session: Session, rollout: Rollout, now: datetime
    ) -> dict[str, SignedDesiredState] | None:
        """None once the rig has passed the version (the fleet's stages go on); otherwise what
        this step publishes: nothing while the rig runs, the abort when it failed or gave no
        verdict by its deadline. No fleet device has been notified before it passes."""
        job = hil_service.job_for_rollout(session, rollout.id)
        if job is None:
            return self._abort(session, rollout, now, "the rollout's HIL job is missing", [], [])
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
                self._event(session, rollout, now, "hil_passed",
                            f"rig {job.rig} passed {job.model} {job.version} "
                            f"(runner {job.claimed_by}); the fleet's first stage begins",
                            stage=0, **links)  # fmt: skip
                rollout.stage_started_at = now  # the fleet's stage timeout starts now
                session.add(rollout)
            return None
        why = f"HIL stage on rig {job.rig} {job.state}: {job.reason or 'no reason given'}"
        if links["report_url"]:
            why += f" (report: {links['report_url']})"
        self._event(session, rollout, now, "hil_failed", why, stage=0, **links)
        return self._abort(session, rollout, now, why, [], [])

    # --- cohort ----------------------------------------------------------------------------------
    def _sync_cohort(
        self,
        session: Session,
        rollout: Rollout,
        targets: dict[str, RolloutTarget],
        cohort: dict[str, DeviceRow],
        choices: dict[Cohort, BundleChoice],
        now: datetime,
    ) -> None:
        taken = self._taken_elsewhere(session, rollout)
        joined = 0
        for device_id, device in cohort.items():
            target = targets.get(device_id)
            choice = choices.get(cohort_of(device))
            if target is None:
                if device_id in taken:
                    continue  # another active rollout on this slot has it
                target = RolloutTarget(
                    rollout_id=rollout.id,
                    device_id=device_id,
                    phase=TargetPhase.SCHEDULED,
                    added_at=now,
                    stage=rollout.stage,
                )
                targets[device_id] = target
                joined += 1
                if rollout.stage > 0 or rollout.stage_started_at is not None:
                    self._event(session, rollout, now, "device_joined",
                                f"{device_id} joined the cohort", device_id=device_id)  # fmt: skip
            if target.phase in (TargetPhase.SCHEDULED, TargetPhase.EXCLUDED) and choice:
                if choice.sha256 is not None:
                    target.bundle_sha256, target.phase, target.note = (
                        choice.sha256,
                        TargetPhase.SCHEDULED,
                        None,
                    )
                elif choice.excluded is not None and target.phase != TargetPhase.EXCLUDED:
                    target.phase, target.note = TargetPhase.EXCLUDED, choice.excluded
                    self._event(session, rollout, now, "device_excluded", choice.excluded,
                                device_id=device_id)  # fmt: skip
                elif choice.pending_build:
                    target.note = f"waiting for build {choice.pending_build}"
            session.add(target)
        for device_id, target in targets.items():
            if device_id in cohort or target.phase in (TargetPhase.RELEASED, TargetPhase.EXCLUDED):
                continue
            if target.phase in (TargetPhase.SCHEDULED, TargetPhase.NOTIFIED):
                target.phase = TargetPhase.RELEASED
                target.note = "left the cohort (labels or profile changed, or it was removed)"
                session.add(target)
                self._event(session, rollout, now, "device_released", target.note,
                            device_id=device_id)  # fmt: skip

    def _taken_elsewhere(self, session: Session, rollout: Rollout) -> set[str]:
        rows = session.exec(
            select(RolloutTarget.device_id)
            .join(Rollout, col(Rollout.id) == col(RolloutTarget.rollout_id))
            .where(
                Rollout.slot == rollout.slot,
                Rollout.id != rollout.id,
                col(Rollout.state).in_([str(s) for s in ACTIVE_STATES]),
                col(RolloutTarget.phase).in_([TargetPhase.SCHEDULED, TargetPhase.NOTIFIED]),
            )
        ).all()
        return set(rows)

    # --- stages ----------------------------------------------------------------------------------
    def _stage(
        self, rollout: Rollout, plan: dict[str, Any], views: list[TargetView]
    ) -> tuple[list[TargetView], list[TargetView]]:
        """The current stage's devices (notified, or due), and those of them to notify."""
        stages = list(plan.get("stages") or [100.0])
        eligible = in_order(rollout.id, views)
        quota = stage_quota(stages[min(rollout.stage, len(stages) - 1)], len(eligible))
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

    def _notify(
        self,
        session: Session,
        rollout: Rollout,
        model: MLModel,
        version: ModelVersion,
        due: list[TargetView],
        views: list[TargetView],
        now: datetime,
    ) -> dict[str, SignedDesiredState]:
        if not due:
            return {}
        plan = rollout.plan or {}
        rate = RateSpec.model_validate(plan.get("rate") or {})
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
        bundles = {
            b.sha256: b
            for b in session.exec(
                select(Bundle).where(col(Bundle.sha256).in_({v.target.bundle_sha256 for v in due}))
            ).all()
        }
        strategy = plan.get("strategy")
        base: dict[str, Any] = {}
        target_slot = rollout.slot
        if strategy == Strategy.SHADOW or plan.get("shadow_of"):
            base = {"shadow_of": plan.get("shadow_of"), "sample_rate": plan.get("sample_rate", 0.1)}
        elif strategy == Strategy.STAGE_THEN_ACTIVATE and rollout.activated_at is None:
            # Staged beside the active version: a shadow of it that sees no request.
            base = {"shadow_of": rollout.slot, "sample_rate": 0.0}
            target_slot = staging_slot(rollout.slot)
        ids = [v.device.id for v in due]
        previous = desired.current_slot(session, ids, rollout.slot)
        assignments: dict[str, SlotAssignment | None] = {}
        for v in due:
            bundle = bundles[v.target.bundle_sha256 or ""]
            assignment = slot_assignment(self.public_url, model, version, bundle, rollout.id)
            assignments[v.device.id] = assignment.model_copy(update=base) if base else assignment
        documents = desired.assign_many(
            session, target_slot, assignments, ttl_s=self._ttl_s, signer=self.signer(session)
        )
        for v in due:
            t = v.target
            prior = previous.get(t.device_id)
            t.previous = prior.model_dump(mode="json") if prior is not None else None
            t.phase, t.notified_at = TargetPhase.NOTIFIED, now
            t.desired_seq, t.stage, t.note = documents[t.device_id].signed.seq, rollout.stage, None
            session.add(t)
        if rollout.stage_started_at is None:
            rollout.stage_started_at = now
        return documents

    def _activate(
        self,
        session: Session,
        rollout: Rollout,
        model: MLModel,
        version: ModelVersion,
        views: list[TargetView],
        now: datetime,
    ) -> dict[str, SignedDesiredState]:
        """Stage then activate: every device of the cohort has staged the version, failed, or
        timed out (within the gates). One step tells every staged device to switch; the
        staging slot goes away everywhere (a device that did not stage is released)."""
        staged = [v for v in views if v.state == TargetState.STAGED]
        others = [v for v in views if v.target.phase == TargetPhase.NOTIFIED and v not in staged]
        bundles = {
            b.sha256: b
            for b in session.exec(
                select(Bundle).where(
                    col(Bundle.sha256).in_({v.target.bundle_sha256 for v in staged})
                )
            ).all()
        }
        parking = staging_slot(rollout.slot)
        changes: dict[str, dict[str, SlotAssignment | None]] = {}
        for v in staged:
            bundle = bundles[v.target.bundle_sha256 or ""]
            active = slot_assignment(self.public_url, model, version, bundle, rollout.id)
            changes[v.device.id] = {rollout.slot: active, parking: None}
        for v in others:
            changes[v.device.id] = {parking: None}
            v.target.phase = TargetPhase.RELEASED
            v.target.note = f"not staged when the fleet switched ({v.state})"
            session.add(v.target)
        documents = (
            desired.change_many(session, changes, ttl_s=self._ttl_s, signer=self.signer(session))
            if changes
            else {}
        )
        for v in staged:
            v.target.desired_seq = documents[v.device.id].signed.seq
            session.add(v.target)
        rollout.activated_at, rollout.stage_settled_at = now, None
        self._event(session, rollout, now, "activated",
                    f"{len(staged)} staged device(s) told to switch at once"
                    + (f"; {len(others)} that did not stage released" if others else ""),
                    staged=len(staged), released=len(others))  # fmt: skip
        record(session, self.actor, "rollout.activate", rollout.id, staged=len(staged))
        session.add(rollout)
        return documents

    def _record_switches(
        self, session: Session, rollout: Rollout, views: list[TargetView], now: datetime
    ) -> None:
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
            switched = now
            if (
                moved.get("slot") == rollout.slot
                and moved.get("bundle_sha256") == t.bundle_sha256
                and moved.get("to_state") in ("PROBATION", "COMMITTED")
            ):
                switched = datetime.fromisoformat(moved["at"])
            t.switched_at = switched
            session.add(t)

    def _judge(
        self,
        session: Session,
        rollout: Rollout,
        model: str,
        version: str,
        stage_views: list[TargetView],
        gates: GateSpec,
        *,
        telemetry: bool,
    ) -> list[GateFigure]:
        plan = rollout.plan or {}
        return gate_rules.judge(
            session,
            self._bundles,
            rollout_id=rollout.id,
            model=model,
            version=version,
            created_at=aware(rollout.created_at),
            stage_started_at=aware(rollout.stage_started_at or rollout.created_at),
            views=stage_views,
            gates=gates,
            shadow=plan.get("strategy") == Strategy.SHADOW,
            telemetry=telemetry,
            bucket_s=self._bucket_s,
            shadow_of=plan.get("shadow_of") if plan.get("strategy") == Strategy.SHADOW else None,
        )

    def _pass_stage(
        self,
        session: Session,
        rollout: Rollout,
        plan: dict[str, Any],
        views: list[TargetView],
        figures: list[GateFigure],
        now: datetime,
    ) -> dict[str, SignedDesiredState]:
        stages = list(plan.get("stages") or [100.0])
        shown = [f.model_dump() for f in figures]
        if plan.get("strategy") == Strategy.AB and rollout.stage == 0:
            return self._ab_verdict(session, rollout, plan, views, shown, now)
        if rollout.stage >= len(stages) - 1:
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
            # Failures within a gate's threshold are what the operator allowed; with no gate
            # at all (all at once, as before gates), any failure fails the rollout. Devices
            # that timed out catch up when they reconnect.
            rollout.state = RolloutState.FAILED if failed and not gated else RolloutState.COMPLETED
            rollout.ended_at = now
            counts = _count(views)
            message = (
                f"{counts.get('serving', 0)} of {len(notified)} devices serve "
                f"{rollout.id}'s version"
            )
            spread = _switch_spread(rollout, views)
            if spread:
                message += (
                    f"; they switched within {spread['spread_s']:.3f} s of each other "
                    f"(p95 {spread['p95_after_command_s']:.3f} s after the command)"
                )
            if rollout.state == RolloutState.FAILED:
                rollout.reason = "some devices did not install the version (no gate configured)"
            self._event(session, rollout, now, str(rollout.state), message, gates=shown,
                        counts=counts, switch=spread)  # fmt: skip
            record(session, self.actor, f"rollout.{rollout.state}", rollout.id, counts=counts)
            session.add(rollout)
            return {}
        if plan.get("manual_approval") and rollout.state != RolloutState.AWAITING_APPROVAL:
            rollout.state, rollout.awaiting = RolloutState.AWAITING_APPROVAL, "stage"
            self._event(session, rollout, now, "awaiting_approval",
                        f"stage {rollout.stage + 1} passed its gates; waiting for promote",
                        gates=shown)  # fmt: skip
            session.add(rollout)
            return {}
        return self._promote(session, rollout, now, self.actor, shown)

    def _ab_verdict(
        self,
        session: Session,
        rollout: Rollout,
        plan: dict[str, Any],
        views: list[TargetView],
        shown: list[dict[str, Any]],
        now: datetime,
    ) -> dict[str, SignedDesiredState]:
        """The hold is over: compare the arms, then promote B or end keeping A."""
        model, version = version_by_id(session, rollout.model_version_id)
        since = bucket_start(aware(rollout.stage_started_at or rollout.created_at), self._bucket_s)
        arm_a = [v for v in views if v.target.phase == TargetPhase.SCHEDULED]
        priors = Counter(
            (str(v.target.previous["version"]), v.target.previous.get("rollout_id"))
            for v in views
            if v.target.previous
        )
        if not priors:
            # Arm A runs what the notified devices ran before; without one there is nothing
            # to compare with.
            return self._end_ab(session, rollout, now, None, "arm A has no version to compare")
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
        described = _describe_verdict(figures)
        self._event(session, rollout, now, "ab_verdict", described, verdict=figures,
                    gates=shown)  # fmt: skip
        rollout.figures = {**(rollout.figures or {}), "ab": figures}
        if winner != "b":
            return self._end_ab(session, rollout, now, figures, described)
        if plan.get("manual_approval"):
            rollout.state, rollout.awaiting = RolloutState.AWAITING_APPROVAL, "stage"
            session.add(rollout)
            return {}
        return self._promote(session, rollout, now, self.actor, shown)

    def _end_ab(
        self,
        session: Session,
        rollout: Rollout,
        now: datetime,
        figures: dict[str, Any] | None,
        why: str,
    ) -> dict[str, SignedDesiredState]:
        """A kept: arm B's devices get their previous version back; the experiment is over."""
        documents = self._roll_back(session, rollout, now)
        rollout.state, rollout.ended_at = RolloutState.COMPLETED, now
        rollout.reason = f"A/B: arm A kept ({why})"[:500]
        self._event(session, rollout, now, "completed",
                    f"arm A kept; {len(documents)} arm B device(s) given their version back",
                    verdict=figures, devices=len(documents))  # fmt: skip
        record(session, self.actor, "rollout.completed", rollout.id, verdict=figures)
        session.add(rollout)
        return documents

    def _promote(
        self,
        session: Session,
        rollout: Rollout,
        now: datetime,
        actor: str,
        shown: list[dict[str, Any]],
    ) -> dict[str, SignedDesiredState]:
        stages = list((rollout.plan or {}).get("stages") or [100.0])
        rollout.stage += 1
        rollout.state, rollout.awaiting = RolloutState.IN_PROGRESS, None
        rollout.stage_started_at, rollout.stage_settled_at = now, None
        self._event(session, rollout, now, "promoted",
                    f"stage {rollout.stage} passed; stage {rollout.stage + 1} "
                    f"({stages[rollout.stage]:g} %) begins", actor=actor, gates=shown)  # fmt: skip
        record(session, actor, "rollout.promote", rollout.id, stage=rollout.stage + 1, gates=shown)
        session.add(rollout)
        return {}

    # --- ending ----------------------------------------------------------------------------------
    def _abort(
        self,
        session: Session,
        rollout: Rollout,
        now: datetime,
        why: str,
        breached: list[GateFigure],
        figures: list[GateFigure],
        actor: str | None = None,
    ) -> dict[str, SignedDesiredState]:
        actor = actor or self.actor
        if breached:
            reason = "; ".join(
                f"gate {f.gate}: {f.value} against {f.threshold} ({f.detail})" for f in breached
            )
        else:
            reason = why
        rollout.state, rollout.ended_at, rollout.reason = RolloutState.ABORTED, now, reason[:500]
        hil_service.cancel(session, rollout.id, f"the rollout was aborted: {reason}", now)
        rollout.figures = {"gates": [f.model_dump() for f in figures], "at": now.isoformat()}
        shown = [f.model_dump() for f in breached]
        self._event(session, rollout, now, "gate_breach" if breached else "aborted", reason,
                    actor=actor, stage=rollout.stage, breached=shown)  # fmt: skip
        documents = self._roll_back(session, rollout, now)
        message = f"{len(documents)} device(s) given their previous version back"
        breaking = (rollout.plan or {}).get("breaking")
        if breaking and documents:
            # Back across an input/output change: callers updated for the candidate break.
            changes = "; ".join(f"{v}: " + ", ".join(c) for v, c in breaking["differences"].items())
            message += f", across an input/output change ({changes})"
        self._event(session, rollout, now, "rollback", message[:1000], actor=actor,
                    devices=len(documents), breaking=breaking)  # fmt: skip
        record(session, actor, "rollout.abort", rollout.id, reason=reason, breached=shown,
               rolled_back=len(documents))  # fmt: skip
        session.add(rollout)
        return documents

    def _roll_back(
        self, session: Session, rollout: Rollout, now: datetime
    ) -> dict[str, SignedDesiredState]:
        targets = list(
            session.exec(select(RolloutTarget).where(RolloutTarget.rollout_id == rollout.id)).all()
        )
        notified = [t for t in targets if t.phase == TargetPhase.NOTIFIED]
        ids = [t.device_id for t in notified]
        current = desired.current_slot(session, ids, rollout.slot)
        parking = staging_slot(rollout.slot)
        parked = desired.current_slot(session, ids, parking)
        changes: dict[str, dict[str, SlotAssignment | None]] = {}
        for t in notified:
            change: dict[str, SlotAssignment | None] = {}
            mine = current.get(t.device_id)
            if mine is not None and mine.rollout_id == rollout.id:
                change[rollout.slot] = (
                    SlotAssignment.model_validate(t.previous) if t.previous is not None else None
                )
            staged = parked.get(t.device_id)
            if staged is not None and staged.rollout_id == rollout.id:
                change[parking] = None  # staged beside the active version: taken away
            if change:  # else something newer owns the slot now: leave it
                changes[t.device_id] = change
        documents = (
            desired.change_many(session, changes, ttl_s=self._ttl_s, signer=self.signer(session))
            if changes
            else {}
        )
        for t in targets:
            if t.phase == TargetPhase.NOTIFIED and t.device_id in changes:
                t.phase = TargetPhase.REVERTED
            elif t.phase == TargetPhase.SCHEDULED:
                t.phase, t.note = TargetPhase.RELEASED, "the rollout ended before its stage"
            else:
                continue
            session.add(t)
        return documents

    def _event(
        self,
        session: Session,
        rollout: Rollout,
        now: datetime,
        kind: str,
        message: str,
        *,
        actor: str | None = None,
        stage: int | None = None,
        **figures: Any,
    ) -> None:
        session.add(
            RolloutEvent(
                rollout_id=rollout.id,
                at=now,
                kind=kind,
                stage=rollout.stage if stage is None else stage,
                actor=actor or self.actor,
                message=message[:1000],
                figures=figures,
            )
        )

    # --- operator commands -----------------------------------------------------------------------
    def pause(self, rollout_id: str, actor: str) -> None:
        def action(session: Session, rollout: Rollout) -> dict[str, SignedDesiredState]:
            _require(rollout, {RolloutState.IN_PROGRESS, RolloutState.AWAITING_APPROVAL}, "pause")
            rollout.state = RolloutState.PAUSED
            now = self._clock()
            self._event(session, rollout, now, "paused", "no more devices are notified",
                        actor=actor)  # fmt: skip
            record(session, actor, "rollout.pause", rollout.id)
            session.add(rollout)
            return {}

        self.act(rollout_id, action)

    def resume(self, rollout_id: str, actor: str) -> None:
        def action(session: Session, rollout: Rollout) -> dict[str, SignedDesiredState]:
            _require(rollout, {RolloutState.PAUSED}, "resume")
            rollout.state = RolloutState.IN_PROGRESS
            rollout.stage_settled_at = None  # the bake time runs again from now
            now = self._clock()
            self._event(session, rollout, now, "resumed", "notifying again", actor=actor)
            record(session, actor, "rollout.resume", rollout.id)
            session.add(rollout)
            return {}

        self.act(rollout_id, action)
        self.wake()

    def abort(self, rollout_id: str, actor: str, reason: str | None = None) -> None:
        def action(session: Session, rollout: Rollout) -> dict[str, SignedDesiredState]:
            _require(rollout, set(ACTIVE_STATES), "abort")
            why = f"aborted by {actor}" + (f": {reason}" if reason else "")
            return self._abort(session, rollout, self._clock(), why, [], [], actor=actor)

        self.act(rollout_id, action)

    def promote(self, rollout_id: str, actor: str) -> None:
        """Approve the stage that waits for it, or skip the rest of the current stage's bake."""

        def action(session: Session, rollout: Rollout) -> dict[str, SignedDesiredState]:
            _require(rollout, {RolloutState.AWAITING_APPROVAL, RolloutState.IN_PROGRESS}, "promote")
            now = self._clock()
            if rollout.state == RolloutState.AWAITING_APPROVAL and rollout.awaiting == "evidence":
                # The operator accepts the stage without the evidence its gates lacked: the
                # stage goes on as if they had passed (an A/B verdict, the next stage, the end).
                rollout.state, rollout.awaiting = RolloutState.IN_PROGRESS, None
                rollout.evidence_waived_stage = rollout.stage
                self._event(session, rollout, now, "approved",
                            f"stage {rollout.stage + 1} accepted without the missing evidence",
                            actor=actor)  # fmt: skip
                record(session, actor, "rollout.accept_without_evidence", rollout.id,
                       stage=rollout.stage + 1)  # fmt: skip
                session.add(rollout)
                return {}
            stages = list((rollout.plan or {}).get("stages") or [100.0])
            if rollout.stage >= len(stages) - 1:
                raise ConflictError(
                    f"rollout {rollout.id} is in its last stage; there is nothing to promote to",
                    reason="last_stage",
                    rollout_id=rollout.id,
                )
            if rollout.state == RolloutState.IN_PROGRESS:
                _require_settled(rollout)
            return self._promote(session, rollout, now, actor, [])

        self.act(rollout_id, action)
        self.wake()


def _light(row: Any) -> DeviceRow:
    return DeviceRow(row[0], row[1], dict(row[2] or {}), dict(row[3]) if row[3] else None)


def _require(rollout: Rollout, allowed: Iterable[RolloutState], verb: str) -> None:
    if rollout.state not in {str(s) for s in allowed}:
        raise ConflictError(
            f"rollout {rollout.id} is {rollout.state}: it cannot {verb}",
            reason="rollout_state",
            rollout_id=rollout.id,
            state=rollout.state,
        )


def _require_settled(rollout: Rollout) -> None:
    if rollout.stage_settled_at is None:
        raise ConflictError(
            f"rollout {rollout.id}'s stage {rollout.stage + 1} is still running; promote "
            "approves a stage once its devices have all ended",
            reason="stage_running",
            rollout_id=rollout.id,
        )


def _switch_spread(rollout: Rollout, views: list[TargetView]) -> dict[str, float] | None:
    """Stage then activate: how close together the devices switched, and how long after the
    command (seconds)."""
    if rollout.activated_at is None:
        return None
    command = aware(rollout.activated_at).timestamp()
    times = sorted(aware(v.target.switched_at).timestamp() for v in views if v.target.switched_at)
    if not times:
        return None
    after = [t - command for t in times]
    return {
        "devices": len(times),
        "spread_s": round(times[-1] - times[0], 4),
        "p50_after_command_s": round(after[len(after) // 2], 4),
        "p95_after_command_s": round(after[min(len(after) - 1, int(len(after) * 0.95))], 4),
        "max_after_command_s": round(after[-1], 4),
    }


def _describe_verdict(figures: dict[str, Any]) -> str:
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


def _count(views: list[TargetView]) -> dict[str, int]:
    counts = {str(s): 0 for s in TargetState}
    for v in views:
        counts[v.state] += 1
    return counts
