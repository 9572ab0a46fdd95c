"""Runs a slot's deployment through the lifecycle table and keeps the journal.

Each handler does one step and returns a :class:`SlotEvent` — ``SUCCESS``, or a failure event
with ``ctx.error`` set (a handler may also raise the project's error; :meth:`Deployer._run`
turns it into the failure event its kind calls for). Handlers never choose the next state. The
journal is saved before each step, so after a crash the agent knows which deployment was under
way and that the committed version is still the one to serve; start-up settles it through the
same table (``INTERRUPTED``).

A newer desired state ends the deployment under way (:meth:`Deployer.supersede`, called from
the MQTT thread): a download stops between chunks, probation ends within one wait (the wait is
on the deployment's ``superseded`` event), and a version on probation is swapped back for the
prior one — then the newer document is applied. Desired-state acceptance itself is
:class:`~edge_agent.lifecycle.acceptance.DesiredStateGate`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from edge_agent.bundle import VerifiedBundle
from edge_agent.bundle.selftest import unpack
from edge_agent.contracts import failpoints
from edge_agent.contracts.errors import (
    DesiredStateError,
    EdgefleetError,
    RuntimeBackendError,
    Superseded,
    TransportError,
)
from edge_agent.lifecycle.acceptance import DesiredStateGate
from edge_agent.lifecycle.journal import Journal, SlotRecord
from edge_agent.lifecycle.probation import (
    Breach,
    ProbationPolicy,
    check_health,
    check_latency,
    live_comparable,
)
from edge_agent.lifecycle.staging import stage
from edge_agent.lifecycle.states import IN_FLIGHT, RETRYABLE, TERMINAL, next_state
from edge_agent.protocol.desired import DesiredState, SignedDesiredState, SlotAssignment
from edge_agent.protocol.lifecycle import Reason, SlotEvent, SlotMode, SlotState
from edge_agent.protocol.status import SlotError, Transition, VersionRef
from edge_agent.runtimes import LoadOptions, Runtime, get_runtime
from edge_agent.serving import ModelStats, ServingModel, SlotTable, StatsSnapshot, run_counted
from edge_agent.store.download import check_free_space, fetch_bundle
from edge_agent.store.models import ModelStore
from edge_agent.trust import TrustStore

log = logging.getLogger(__name__)

#: A latency regression measured on probes must show this many times in a row.
LATENCY_CONFIRMATIONS = 3
#: Events that record why a deployment ended (a rollback's own SUCCESS reports the same error
#: and keeps the record).
_FAILURES = frozenset(
    {SlotEvent.FAILURE, SlotEvent.RETRYABLE_FAILURE, SlotEvent.SUPERSEDED, SlotEvent.INTERRUPTED}
)


@dataclass(frozen=True)
class DeviceContext:
    device_id: str
    profile: str
    runtimes: dict[str, str]
    load_options: LoadOptions
    credential: str
    download_attempts: int
    download_timeout_s: float
    download_max_bytes_per_s: int | None = None
    #: An origin that replaces the bundle URL's (``DownloadConfig.mirror_url``).
    download_mirror_url: str | None = None
    download_reserve_bytes: int = 0


@dataclass
class Deployment:
    slot: str
    target: SlotAssignment
    verified: VerifiedBundle | None = None
    staged: ServingModel | None = None
    #: The model the switch replaced, kept loaded through probation to switch back to.
    prior: ServingModel | None = None
    prior_live: StatsSnapshot | None = None
    #: The prior version runs the new bundle's probe inputs, so the two can be compared.
    prior_runs_probes: bool = False
    probe_inputs: dict[str, np.ndarray] | None = None
    error: EdgefleetError | None = None
    #: Set (from another thread) when a newer desired state takes this slot elsewhere.
    superseded: threading.Event = field(default_factory=threading.Event)


class ProbationError(RuntimeBackendError):
    """The new version breached the probation policy; ``fields`` holds the figures."""


class Deployer:
    def __init__(
        self,
        device: DeviceContext,
        journal: Journal,
        store: ModelStore,
        table: SlotTable,
        trust: TrustStore,
        on_transition: Callable[[Transition], None],
        policy: ProbationPolicy | None = None,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        runtime_for: Callable[[str], Runtime] = get_runtime,
    ) -> None:
        """``sleep``: a test's clock; by default waits end early when a newer desired state
        supersedes the deployment."""
        self.device = device
        self.trust = trust
        self.gate = DesiredStateGate(device.device_id, journal, trust)
        self.policy = policy or ProbationPolicy()
        self._clock = clock
        self._sleep = sleep
        self._runtime_for = runtime_for
        self.journal = journal
        self.store = store
        self.table = table
        self._on_transition = on_transition
        self._under_way: Deployment | None = None
        #: A newer document arrived: converging the current one stops after this slot.
        self._newer = threading.Event()
        self._handlers: dict[SlotState, Callable[[Deployment], SlotEvent]] = {
            SlotState.DOWNLOADING: self._download,
            SlotState.VERIFYING: self._verify,
            SlotState.STAGING: self._stage,
            SlotState.SWITCHING: self._switch,
            SlotState.PROBATION: self._probation,
            SlotState.ROLLING_BACK: self._roll_back,
        }

    # --- start-up ----------------------------------------------------------------------------
    def restore(self) -> None:
        """Serve every slot's committed version from disk (no server needed). A deployment the
        agent stopped in is settled first; a committed version that no longer loads gives way
        to the previous one. Both through the transition table."""
        for slot, rec in list(self.journal.data.slots.items()):
            self._settle_interrupted(slot, rec)
            if rec.committed is None:
                continue
            failure: EdgefleetError | None = None
            for candidate in (rec.committed, rec.previous):
                if candidate is None:
                    continue
                try:
                    serving = self._load(self.store.open_model(candidate.bundle_sha256), candidate)
                except (EdgefleetError, OSError, ValueError) as e:
                    log.error("slot %s: cannot restore %s: %s", slot, candidate.version, e)
                    failure = failure or RuntimeBackendError(
                        f"{candidate.model} {candidate.version} could not be loaded at "
                        f"start-up: {e}",
                        reason=Reason.RESTORE_FAILED,
                    )
                    continue
                if rec.shadow_of is not None:
                    self.table.attach_shadow(slot, rec.shadow_of, serving, rec.sample_rate or 0.0)
                else:
                    self.table.swap(slot, serving)
                if candidate is not rec.committed:
                    broken, rec.previous, rec.committed = rec.committed, None, candidate
                    rec.committed_rollout_id = rec.previous_rollout_id
                    assert failure is not None
                    self._record(slot, rec, SlotEvent.FAILURE, broken.bundle_sha256, failure)
                log.info(
                    "slot %s: serving %s %s from disk", slot, candidate.model, candidate.version
                )
                break

    def _settle_interrupted(self, slot: str, rec: SlotRecord) -> None:
        """A deployment that stopped half-way (crash, power loss, an unexpected error) ends
        here: before the switch it failed and will be retried; on probation it is rolled back
        (the new version may be the cause) and not retried."""
        if rec.state not in IN_FLIGHT:
            return
        sha = rec.target.bundle_sha256 if rec.target else None
        log.warning("slot %s: stopped in %s; settling it", slot, rec.state)
        if rec.state in (SlotState.PROBATION, SlotState.ROLLING_BACK):
            error = EdgefleetError(
                "the agent stopped while the new version was on probation",
                reason=Reason.INTERRUPTED_IN_PROBATION,
            )
            self._record(slot, rec, SlotEvent.INTERRUPTED, sha, error, retryable=False)
            if rec.state == SlotState.ROLLING_BACK:  # start-up serves the prior: done
                self._record(slot, rec, SlotEvent.SUCCESS, sha)
        else:
            error = EdgefleetError(
                "the deployment stopped before it finished", reason=Reason.INTERRUPTED
            )
            self._record(slot, rec, SlotEvent.INTERRUPTED, sha, error, retryable=True)

    # --- desired state -----------------------------------------------------------------------
    def accept(self, envelope: SignedDesiredState, now: datetime | None = None) -> None:
        """Raises :class:`DesiredStateError` (or another ``BundleError``) for a document that
        must not be applied; a refusal changes nothing."""
        self.gate.accept(envelope, now)

    def supersede(self, envelope: SignedDesiredState) -> bool:
        """Called when a document arrives while the worker may be busy: if it would be
        accepted and takes the slot under deployment elsewhere, end that deployment. A
        document that names the same target for that slot (a refresh, a new keyring) does
        not interrupt it."""
        ctx = self._under_way
        if ctx is None:
            return False
        if ctx.superseded.is_set():
            return True  # already ending (the server may re-send the newer document meanwhile)
        wanted = envelope.signed.slots.get(ctx.slot)
        if wanted is not None and wanted == ctx.target:
            return False
        if not self.gate.supersedes(envelope):
            return False
        log.info("slot %s: a newer desired state supersedes the deployment under way", ctx.slot)
        self._newer.set()
        ctx.superseded.set()
        return True

    def converge(self, doc: DesiredState) -> None:
        """Bring every slot to what ``doc`` asks for; a failed slot does not stop the others,
        a newer document does."""
        self._newer.clear()
        for slot, assignment in doc.slots.items():
            if self._newer.is_set():
                return
            rec = self.journal.slot(slot)
            if (
                rec.committed is not None
                and rec.committed.bundle_sha256 == assignment.bundle_sha256
            ):
                continue
            if (
                rec.state in (SlotState.FAILED, SlotState.ROLLED_BACK)
                and rec.target is not None
                and rec.target.bundle_sha256 == assignment.bundle_sha256
                and rec.target.rollout_id == assignment.rollout_id
                and rec.error is not None
                and not rec.error.retryable
            ):
                # This exact bundle failed under this rollout: the same rollout's documents
                # (re-sent, re-signed) never retry it; a new rollout of it (the operator's
                # decision, e.g. after a power cut rolled it back on probation) does.
                continue
            self.deploy(slot, assignment)
        for slot in [s for s in self.journal.data.slots if s not in doc.slots]:
            self._remove_slot(slot)

    def _remove_slot(self, slot: str) -> None:
        self.table.remove(slot)
        self.table.detach_shadow(slot)
        rec = self.journal.data.slots.pop(slot)
        self.journal.save()
        self._emit(slot, rec.state, SlotState.IDLE, SlotEvent.SUCCESS, None, "slot removed")
        self._collect_garbage()

    # --- the state machine -------------------------------------------------------------------
    def deploy(self, slot: str, target: SlotAssignment) -> SlotState:
        rec = self.journal.slot(slot)
        ctx = Deployment(slot, target)
        rec.target, rec.error = target, None
        state, event = rec.state, SlotEvent.DEPLOY
        self._under_way = ctx
        try:
            while True:
                new_state = next_state(state, event)
                self._enter(rec, slot, new_state, event, ctx)
                state = new_state
                if state in TERMINAL:
                    break
                event = self._run(state, ctx)
        except Exception:
            # Not a failure the table knows (a bug, a disk that filled up under the journal):
            # settle like a crash, so the slot can be deployed again.
            log.exception("slot %s: deployment broke in %s", slot, state)
            self._abandon(slot, ctx)
            raise
        finally:
            self._under_way = None
        self._finish(ctx, state)
        return state

    def _abandon(self, slot: str, ctx: Deployment) -> None:
        current = self.table.snapshot().get(slot)
        if ctx.staged is not None and current is ctx.staged:
            if ctx.prior is not None:
                self.table.swap(slot, ctx.prior)
            else:
                self.table.remove(slot)
        elif ctx.staged is not None:
            ctx.staged.retire()
        self.journal.reload()
        rec = self.journal.data.slots.get(slot)
        if rec is not None:
            with contextlib.suppress(OSError):
                self._settle_interrupted(slot, rec)

    def _run(self, state: SlotState, ctx: Deployment) -> SlotEvent:
        try:
            return self._handlers[state](ctx)
        except EdgefleetError as e:
            return self._fail(ctx, e)

    @staticmethod
    def _fail(ctx: Deployment, error: EdgefleetError) -> SlotEvent:
        """The failure event ``error`` calls for: a newer document took over, a failure that
        may pass (network, disk space), or one the same bundle will meet again."""
        ctx.error = error
        if isinstance(error, Superseded):
            return SlotEvent.SUPERSEDED
        if isinstance(error, TransportError):
            return SlotEvent.RETRYABLE_FAILURE
        return SlotEvent.FAILURE

    def _enter(
        self, rec: SlotRecord, slot: str, new: SlotState, event: SlotEvent, ctx: Deployment
    ) -> None:
        if new == SlotState.COMMITTED:
            assert ctx.staged is not None
            rec.previous, rec.committed = rec.committed, ctx.staged.ref
            rec.previous_rollout_id = rec.committed_rollout_id
            rec.committed_rollout_id = ctx.target.rollout_id
            rec.shadow_of, rec.sample_rate = ctx.target.shadow_of, ctx.target.sample_rate
            rec.target = None
        ended = new in (SlotState.FAILED, SlotState.ROLLING_BACK, SlotState.ROLLED_BACK)
        error = ctx.error if ended else None
        self._record(slot, rec, event, ctx.target.bundle_sha256, error, expected=new)

    def _record(
        self,
        slot: str,
        rec: SlotRecord,
        event: SlotEvent,
        sha: str | None,
        error: EdgefleetError | None = None,
        *,
        retryable: bool | None = None,
        expected: SlotState | None = None,
    ) -> None:
        """One transition: the table's next state, the error it records, the journal written
        before anything else happens, then the report."""
        old = rec.state
        rec.state = next_state(old, event)
        assert expected is None or rec.state == expected
        if error is not None and event in _FAILURES:  # a rollback's SUCCESS keeps the record
            rec.error = SlotError(
                reason=error.reason,
                message=error.message,
                retryable=event in RETRYABLE if retryable is None else retryable,
                detail={k: str(v) for k, v in error.fields.items()},
            )
        self.journal.save()
        failpoints.hit(f"lifecycle.{rec.state}")
        self._emit(
            slot,
            old,
            rec.state,
            event,
            sha,
            error.message if error else None,
            error.reason if error else None,
        )

    def _emit(
        self,
        slot: str,
        old: SlotState,
        new: SlotState,
        event: SlotEvent,
        sha: str | None,
        message: str | None,
        reason: str | None = None,
    ) -> None:
        log.info(
            "slot %s: %s -> %s (%s)%s", slot, old, new, event, f": {message}" if message else ""
        )
        self._on_transition(
            Transition(
                slot=slot,
                from_state=old,
                to_state=new,
                event=event,
                at=datetime.now(UTC),
                bundle_sha256=sha,
                reason=reason,
                message=message,
            )
        )

    def _finish(self, ctx: Deployment, state: SlotState) -> None:
        if state == SlotState.COMMITTED and ctx.prior is not None:
            ctx.prior.retire()
        if state == SlotState.FAILED and ctx.staged is not None:
            ctx.staged.retire()
        if (
            state == SlotState.FAILED
            and ctx.error is not None
            and ctx.error.reason in (Reason.DIGEST_MISMATCH, Reason.OVERSIZE)
        ):
            self.store.discard_bundle(ctx.target.bundle_sha256)
        self._collect_garbage()

    def _collect_garbage(self) -> None:
        keep: set[str] = set()
        for rec in self.journal.data.slots.values():
            for ref in (rec.committed, rec.previous):
                if ref is not None:
                    keep.add(ref.bundle_sha256)
            if rec.target is not None and (
                rec.state in IN_FLIGHT or (rec.error is not None and rec.error.retryable)
            ):
                keep.add(rec.target.bundle_sha256)  # an interrupted download resumes
        self.store.collect_garbage(keep)

    def _pause(self, ctx: Deployment, seconds: float) -> None:
        """Wait, unless a newer desired state supersedes the deployment first."""
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            ctx.superseded.wait(seconds)

    # --- handlers: one step each, returning an event -----------------------------------------
    def _download(self, ctx: Deployment) -> SlotEvent:
        sha = ctx.target.bundle_sha256
        if self.store.has_model(sha) or self.store.bundle_path(sha).is_file():
            return SlotEvent.SUCCESS
        check_free_space(self.store.downloads, ctx.target.size, self.device.download_reserve_bytes)
        url = ctx.target.bundle_url
        if self.device.download_mirror_url:
            parts = urlsplit(url)
            url = self.device.download_mirror_url + urlunsplit(("", "", *parts[2:]))
        fetch_bundle(
            url,
            self.store.bundle_path(sha),
            self.store.partial_path(sha),
            size=ctx.target.size,
            sha256=sha,
            credential=self.device.credential,
            timeout_s=self.device.download_timeout_s,
            attempts=self.device.download_attempts,
            max_bytes_per_s=self.device.download_max_bytes_per_s,
            sleep=self._sleep or (lambda s: self._pause(ctx, s)),
            cancelled=ctx.superseded.is_set,
        )
        return SlotEvent.SUCCESS

    def _verify(self, ctx: Deployment) -> SlotEvent:
        ctx.verified = self.store.install(
            ctx.target.bundle_sha256,
            profile=self.device.profile,
            runtimes=self.device.runtimes,
            trust=self.trust,
        )
        m = ctx.verified.manifest
        if (m.model.name, m.model.version) != (ctx.target.model, ctx.target.version):
            raise DesiredStateError(
                f"bundle holds {m.model.name} {m.model.version}, the desired state names "
                f"{ctx.target.model} {ctx.target.version}",
                reason=Reason.BUNDLE_MISMATCH,
            )
        return SlotEvent.SUCCESS

    def _stage(self, ctx: Deployment) -> SlotEvent:
        assert ctx.verified is not None
        m = ctx.verified.manifest
        ref = VersionRef(
            model=m.model.name,
            version=m.model.version,
            bundle_sha256=ctx.target.bundle_sha256,
            runtime=m.runtime.name,
            precision=m.precision,
        )
        # Staged beside the active version already (as a shadow that answers nobody, self-tested
        # and warmed when it was staged): it switches in without loading again.
        adopted = None
        if ctx.target.mode == SlotMode.ACTIVE:
            adopted = self.table.take_shadow(ctx.target.bundle_sha256)
        if adopted is not None:
            log.info("slot %s: switching to the staged %s %s", ctx.slot, ref.model, ref.version)
        ctx.staged = adopted or self._load(ctx.verified, ref)
        ctx.probe_inputs, _ = unpack(ctx.verified.directory / m.selftest.file)
        if ctx.target.mode == SlotMode.ACTIVE:
            self._measure_prior(ctx)
        return SlotEvent.SUCCESS

    def _measure_prior(self, ctx: Deployment) -> None:
        """Before the switch: the prior version's live figures, and whether it can run the new
        bundle's probe inputs (then probation compares the two on them)."""
        prior = self.table.snapshot().get(ctx.slot)
        if prior is None or ctx.probe_inputs is None:
            return
        ctx.prior_live = prior.stats.snapshot()
        specs = {(s.name, s.dtype) for s in prior.manifest.inputs}
        if specs != {(k, v.dtype.name) for k, v in ctx.probe_inputs.items()}:
            return  # another interface: only live traffic can compare them
        try:
            prior.model.run(ctx.probe_inputs)
        except EdgefleetError as e:  # e.g. the new probe inputs' shapes do not fit the prior
            log.warning("slot %s: the prior version cannot run the probes: %s", ctx.slot, e.message)
            return
        ctx.prior_runs_probes = True

    def _latency_verdict(self, ctx: Deployment) -> Breach | None:
        """The new version's latency against the prior's, like with like: the p95 on live
        traffic when both have served ``min_latency_samples`` requests; else the median on the
        probes, both versions run now, alternately and back to back, so that both meet the same
        load (the spaced probes of the window each start cold and would make any version look
        slower). A median, because one preemption of the prior must not hide a slower
        candidate; a latency breach must hold ``LATENCY_CONFIRMATIONS`` times in a row, because
        one hiccup of a busy board during the candidate's runs is not a regression either,
        while a slower model is slower every time."""
        staged, policy = ctx.staged, self.policy
        assert staged is not None and ctx.probe_inputs is not None
        live = staged.health()
        if live_comparable(live, ctx.prior_live, policy):
            return check_latency(live, ctx.prior_live, staged.probe_stats.snapshot(), None, policy)
        if ctx.prior is None or not ctx.prior_runs_probes:
            return None  # a first version, or a prior that cannot run these probes
        breach = None
        for _ in range(LATENCY_CONFIRMATIONS):
            new, prior = self._probe_pair(staged, ctx.prior, ctx.probe_inputs)
            breach = check_health(live, new, policy) or check_latency(
                live, None, new, prior.p50(), policy
            )
            if breach is None or breach.reason != Reason.LATENCY_REGRESSION:
                return breach
            if ctx.superseded.is_set():
                return None  # the probation loop ends it as superseded
        return breach

    def _probe_pair(
        self, new: ServingModel, prior: ServingModel, inputs: dict[str, np.ndarray]
    ) -> tuple[StatsSnapshot, StatsSnapshot]:
        """Both versions on the probes, alternating run by run, after one uncounted run each."""
        pair = (ModelStats(), ModelStats())
        for serving in (new, prior):
            with contextlib.suppress(RuntimeBackendError):
                run_counted(serving, inputs, ModelStats())
        for _ in range(self.policy.min_latency_samples):
            for serving, stats in zip((new, prior), pair, strict=True):
                with contextlib.suppress(RuntimeBackendError):  # run_counted counted it
                    run_counted(serving, inputs, stats)
        return pair[0].snapshot(), pair[1].snapshot()

    def _switch(self, ctx: Deployment) -> SlotEvent:
        assert ctx.staged is not None
        if ctx.target.shadow_of is not None:
            # A shadow serves nobody: it goes beside the active slot, replacing any earlier one.
            self.table.attach_shadow(
                ctx.slot, ctx.target.shadow_of, ctx.staged, ctx.target.sample_rate
            )
            return SlotEvent.SUCCESS
        ctx.prior = self.table.swap(ctx.slot, ctx.staged, retire_old=False)
        return SlotEvent.SUCCESS

    def _probation(self, ctx: Deployment) -> SlotEvent:
        """Watch the new version for ``window_s``; the first breach, or a newer desired state,
        ends it."""
        staged, policy = ctx.staged, self.policy
        assert staged is not None and ctx.probe_inputs is not None
        if ctx.target.shadow_of is not None:
            return SlotEvent.SUCCESS  # nothing depends on a shadow; its figures are the verdict
        deadline = self._clock() + policy.window_s
        while True:
            if ctx.superseded.is_set():
                return self._fail(ctx, Superseded("a newer desired state ended the probation"))
            breach = check_health(staged.health(), staged.probe_stats.snapshot(), policy)
            if breach is None and self._clock() >= deadline:
                breach = self._latency_verdict(ctx)
                if ctx.superseded.is_set():
                    continue
                if breach is None:
                    return SlotEvent.SUCCESS
            if breach is not None:
                return self._fail(
                    ctx, ProbationError(breach.message, reason=breach.reason, **breach.figures)
                )
            self._pause(ctx, min(policy.probe_interval_s, max(0.0, deadline - self._clock())))
            with contextlib.suppress(RuntimeBackendError):  # run_counted counted it
                run_counted(staged, ctx.probe_inputs, staged.probe_stats)

    def _roll_back(self, ctx: Deployment) -> SlotEvent:
        """Switch the prior version back in (or leave the slot empty if there was none: a
        version that failed its checks is never served)."""
        if ctx.target.shadow_of is not None:
            self.table.detach_shadow(ctx.slot)
        elif ctx.prior is not None:
            self.table.swap(ctx.slot, ctx.prior)
        else:
            self.table.remove(ctx.slot)
        return SlotEvent.SUCCESS

    def _load(self, verified: VerifiedBundle, ref: VersionRef) -> ServingModel:
        runtime = self._runtime_for(verified.manifest.runtime.name)
        return stage(verified, ref, runtime, self.device.load_options)
