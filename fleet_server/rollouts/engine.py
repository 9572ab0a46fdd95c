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

Each concept has its module: :mod:`~fleet_server.rollouts.cohort`,
:mod:`~fleet_server.rollouts.notifier`, :mod:`~fleet_server.rollouts.stages` (and the gates in
:mod:`~fleet_server.rollouts.gates`), one module per strategy in
:mod:`~fleet_server.rollouts.strategies`, :mod:`~fleet_server.rollouts.rollback`,
:mod:`~fleet_server.rollouts.hil_stage` and the operator's
:mod:`~fleet_server.rollouts.commands`. This module is the loop, the locking, and the order
in which they decide.

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
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from fleet_server.builds.runner import BuildRunner
from fleet_server.database import aware
from fleet_server.errors import NotFoundError
from fleet_server.keys.service import FleetSigner, ServerKeys
from fleet_server.registry.service import version_by_id
from fleet_server.rollouts import cohort as cohorts
from fleet_server.rollouts import commands, notifier, stages
from fleet_server.rollouts import gates as gate_rules
from fleet_server.rollouts.cohort import Prepared
from fleet_server.rollouts.hil_stage import hil_stage
from fleet_server.rollouts.progress import FAILURES, DeviceRowCache, target_view, view_slot
from fleet_server.rollouts.rollback import abort
from fleet_server.rollouts.spec import GateSpec
from fleet_server.rollouts.step import Documents, EngineConfig, Step
from fleet_server.rollouts.strategies import rules_for
from fleet_server.rollouts.tables import (
    ACTIVE_STATES,
    Rollout,
    RolloutState,
    TargetState,
)

__all__ = ["Publish", "RolloutEngine"]

log = logging.getLogger(__name__)

#: A step that takes this long is logged with where its time went (as is one that publishes
#: 100 documents or more).
SLOW_STEP_S = 0.5
#: Publishes documents; waits up to the given seconds for the broker to acknowledge them.
Publish = Callable[[Documents, float], None]


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
        self.config = EngineConfig(
            keys=keys,
            runner=runner,
            bundles=bundles,
            public_url=public_url,
            desired_ttl_s=desired_ttl_s,
            bucket_s=bucket_s,
        )
        self._publish = publish
        self._tick_s = tick_s
        self._clock = clock
        #: One step at a time in this process (SQLite has no row locks; threads share it).
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._postgres = engine.dialect.name == "postgresql"
        self._device_rows = DeviceRowCache()
        #: Who the history says decided: this process, so replicas can be told apart.
        self.actor = f"reconciler@{socket.gethostname()}:{os.getpid()}"

    @property
    def lock(self) -> threading.RLock:
        """Held while this process changes a rollout (its steps and the operator's commands)."""
        return self._lock

    def signer(self, session: Session) -> FleetSigner:
        return self.config.keys.signer(session)

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
            # and spend at most about two thirds of the time stepping (a 10,000-device
            # rollout takes a while to read; reports are stored by other processes).
            spent = time.monotonic() - started
            self._stopping.wait(max(min(0.25, self._tick_s), spent / 2))

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
            prepared = cohorts.prepare_bundles(self._engine, self.config, rollout_id, self.actor)
            with Session(self._engine) as session:
                rollout = self._locked(session, rollout_id, wait=False)
                if rollout is None or rollout.state not in ACTIVE_STATES:
                    session.rollback()
                    return
                decided = time.perf_counter()
                step = self._step_on(session, rollout)
                with session.no_autoflush:  # the rows it adds are flushed once, at the commit
                    documents = self._advance(step, prepared)
                    step.finish()
                written = time.perf_counter()
                session.commit()
            committed = time.perf_counter()
            if documents:
                self._publish(documents, wait_published_s)
            took = time.perf_counter() - started
            if len(documents) >= 100 or took >= SLOW_STEP_S:
                log.info(
                    "rollout %s: %d documents in %.2f s (read + bundles %.2f s, decide + sign + "
                    "stage %.2f s, commit %.2f s, publish %.2f s)",
                    rollout_id, len(documents), took,
                    decided - started, written - decided, committed - written,
                    time.perf_counter() - committed,
                )  # fmt: skip

    def act(self, rollout_id: str, action: Callable[[Step], Documents]) -> None:
        """Run an operator's command on the locked rollout (waiting for the lock), commit,
        publish what it wrote. A refusal raises before anything is written."""
        with self._lock:
            with Session(self._engine) as session:
                rollout = self._locked(session, rollout_id, wait=True)
                if rollout is None:
                    raise NotFoundError(f"no rollout {rollout_id!r}", rollout_id=rollout_id)
                step = self._step_on(session, rollout)
                documents = action(step)
                step.finish()
                session.commit()
            if documents:
                self._publish(documents, 5.0)

    def _step_on(self, session: Session, rollout: Rollout) -> Step:
        return Step(session, rollout, self._clock(), self.actor, self.config)

    def _locked(self, session: Session, rollout_id: str, *, wait: bool) -> Rollout | None:
        query = select(Rollout).where(Rollout.id == rollout_id)
        if self._postgres:
            query = query.with_for_update(skip_locked=not wait)
        return session.exec(query).first()

    def _advance(self, step: Step, prepared: Prepared) -> Documents:
        """The order of decisions: the HIL stage, the cohort, the devices' own verdicts (a
        breach aborts at once), notifying, then, once the stage has settled and baked, the
        gates on telemetry."""
        session, rollout, plan, now = step.session, step.rollout, step.plan, step.now
        if prepared.members is None:  # it was not active a moment ago: decide next time
            return {}
        if plan.get("hil"):
            held = hil_stage(step)
            if held is not None:
                return held
        rules = rules_for(plan)
        gates = GateSpec.model_validate(plan.get("gates") or {})
        model, version = version_by_id(session, rollout.model_version_id)
        targets = step.targets.by_device(session)
        cohorts.sync(step, targets, prepared.members, prepared.choices)
        devices = self._device_rows.rows(session, list(targets))
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
        rules.observe(step, views)
        for v in views:
            if v.state in FAILURES and v.error is not None and v.target.error != v.error:
                v.target.error = v.error  # kept: a rollback clears the device's own record
                step.targets.touch(v.target)
        stage_views, to_notify = stages.current(step, views)
        figures = stages.judge(step, model.name, version.version, stage_views, gates,
                               telemetry=False)  # fmt: skip
        broken = gate_rules.breaches(figures)
        if broken:
            return abort(step, "gate_breach", broken, figures)
        documents: Documents = {}
        if rollout.state != RolloutState.PAUSED:
            placement = rules.placement(rollout)
            documents = notifier.notify(step, model, version, to_notify, views, placement)
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
        switched = rules.on_settled(step, model, version, views)
        if switched is not None:
            return switched
        if rollout.stage_settled_at is None:
            rollout.stage_settled_at = now
        bake_s = float(plan.get("bake_s") or 0)
        if now < aware(rollout.stage_settled_at) + timedelta(seconds=bake_s):
            session.add(rollout)
            return documents
        figures = stages.judge(step, model.name, version.version, stage_views, gates,
                               telemetry=True)  # fmt: skip
        rollout.figures = {"gates": [f.model_dump() for f in figures], "at": now.isoformat()}
        waiting = [f for f in figures if f.gate == "min_devices_reporting" and f.ok is False]
        broken = [f for f in gate_rules.breaches(figures) if f not in waiting]
        started = aware(rollout.stage_started_at or rollout.created_at)
        if broken:
            return abort(step, "gate_breach", broken, figures)
        if waiting and now < started + timedelta(seconds=timeout_s):
            session.add(rollout)
            return documents  # not enough devices have reported yet: wait for them
        if waiting:
            return abort(step, "gate_breach", waiting, figures)
        lacking = gate_rules.lacking(figures)
        if lacking and rollout.evidence_waived_stage != rollout.stage:
            return stages.lacking_evidence(step, lacking, figures)
        return stages.pass_stage(step, views, figures, rules.on_passed)

    # --- the operator's commands -----------------------------------------------------------------
    def pause(self, rollout_id: str, actor: str) -> None:
        self.act(rollout_id, lambda step: commands.pause(step, actor))

    def resume(self, rollout_id: str, actor: str) -> None:
        self.act(rollout_id, lambda step: commands.resume(step, actor))
        self.wake()

    def abort(self, rollout_id: str, actor: str, reason: str | None = None) -> None:
        self.act(rollout_id, lambda step: commands.abort(step, actor, reason))

    def promote(self, rollout_id: str, actor: str) -> None:
        self.act(rollout_id, lambda step: commands.promote(step, actor))
        self.wake()
