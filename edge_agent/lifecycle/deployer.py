"""Runs a slot's deployment through the lifecycle table and keeps the journal.

Each handler does one step and returns an :class:`Event`; it never chooses the next state.
The journal is saved before each step, so after a crash the agent knows which deployment was
under way and that the committed version is still the one to serve.

Desired-state rules (checked in :meth:`Deployer.accept`, in this order): the keyring that
comes with it must be signed by the pinned root and not older than the one held; the
document must be signed by a valid key of that keyring; it must name this device, must not
have expired, and its ``seq`` must be greater than the last accepted one — or equal with
identical content, which resumes an interrupted deployment.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from edge_agent.bundle import VerifiedBundle
from edge_agent.bundle.selftest import unpack
from edge_agent.contracts import failpoints
from edge_agent.contracts.canonical import canonical_json
from edge_agent.contracts.errors import (
    DesiredStateError,
    EdgefleetError,
    RuntimeBackendError,
    TransportError,
)
from edge_agent.lifecycle.journal import Journal, SlotRecord
from edge_agent.lifecycle.probation import (
    Breach,
    ProbationPolicy,
    check_health,
    check_latency,
    live_comparable,
)
from edge_agent.lifecycle.staging import stage
from edge_agent.lifecycle.states import IN_FLIGHT, TERMINAL, Event, State, next_state
from edge_agent.protocol.desired import DesiredState, SignedDesiredState, SlotAssignment
from edge_agent.protocol.status import Transition, VersionRef
from edge_agent.runtimes import LoadOptions, Runtime, get_runtime
from edge_agent.serving import ModelStats, ServingModel, SlotTable, StatsSnapshot, run_counted
from edge_agent.store.download import check_free_space, download_bundle
from edge_agent.store.models import ModelStore
from edge_agent.trust import TrustStore

log = logging.getLogger(__name__)

#: A latency regression measured on probes must show this many times in a row.
LATENCY_CONFIRMATIONS = 3


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


class ProbationError(RuntimeBackendError):
    """The new version breached the probation policy; ``fields`` holds the figures."""


def desired_digest(doc: DesiredState) -> str:
    return hashlib.sha256(canonical_json(doc.model_dump(mode="json"))).hexdigest()


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
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        runtime_for: Callable[[str], Runtime] = get_runtime,
    ) -> None:
        self._runtime_for = runtime_for
        self.device = device
        self.trust = trust
        self.policy = policy or ProbationPolicy()
        self._clock = clock
        self.journal = journal
        self.store = store
        self.table = table
        self._on_transition = on_transition
        self._sleep = sleep
        self._handlers: dict[State, Callable[[Deployment], Event]] = {
            State.DOWNLOADING: self._download,
            State.VERIFYING: self._verify,
            State.STAGING: self._stage,
            State.SWITCHING: self._switch,
            State.PROBATION: self._probation,
            State.ROLLING_BACK: self._roll_back,
        }

    # --- start-up ----------------------------------------------------------------------------
    def restore(self) -> None:
        """Serve every slot's committed version from disk (no server needed)."""
        for slot, rec in self.journal.data.slots.items():
            self._settle_interrupted(slot, rec)
            if rec.committed is None:
                continue
            for candidate in (rec.committed, rec.previous):
                if candidate is None:
                    continue
                try:
                    serving = self._load(self.store.open_model(candidate.bundle_sha256), candidate)
                except (EdgefleetError, OSError, ValueError) as e:
                    log.error("slot %s: cannot restore %s: %s", slot, candidate.version, e)
                    continue
                if rec.shadow_of is not None:
                    self.table.attach_shadow(slot, rec.shadow_of, serving, rec.sample_rate or 0.0)
                else:
                    self.table.swap(slot, serving)
                if candidate is not rec.committed:
                    rec.previous, rec.committed = None, candidate
                    self.journal.save()
                log.info(
                    "slot %s: serving %s %s from disk", slot, candidate.model, candidate.version
                )
                break

    def _settle_interrupted(self, slot: str, rec: SlotRecord) -> None:
        """A deployment that stopped half-way (crash, power loss, an unexpected error) ends
        here: before the switch it failed and will be retried; on probation it is rolled back
        (the new version may be the cause) and not retried."""
        if rec.state in (State.PROBATION, State.ROLLING_BACK):
            log.warning("slot %s: stopped in %s; rolling back", slot, rec.state)
            if rec.state == State.PROBATION:
                rec.state = next_state(rec.state, Event.FAILURE)
            rec.state = next_state(rec.state, Event.SUCCESS)
            rec.error = {
                "reason": "interrupted_in_probation",
                "message": "the agent stopped while the new version was on probation",
                "retry": "no",
            }
        elif rec.state in IN_FLIGHT:
            log.warning("slot %s: deployment interrupted in %s", slot, rec.state)
            rec.state = next_state(rec.state, Event.FAILURE)
            rec.error = {
                "reason": "interrupted",
                "message": "the deployment stopped before it finished",
                "retry": "yes",
            }
        else:
            return
        self.journal.save()

    # --- desired state -----------------------------------------------------------------------
    def accept(self, envelope: SignedDesiredState, now: datetime | None = None) -> bool:
        """Check the document against the journal; return True if there is work to do.

        Raises :class:`DesiredStateError` for a document that must not be applied.
        """
        doc = envelope.signed
        data = self.journal.data
        if envelope.keyring is not None:
            self.trust.update(envelope.keyring, now)
        self.trust.check(envelope.signed_bytes(), envelope.signatures, "desired state", now)
        if doc.device_id != self.device.device_id:
            raise DesiredStateError(
                f"desired state is for device {doc.device_id!r}", reason="wrong_device"
            )
        if doc.is_expired(now):
            raise DesiredStateError(
                f"desired state seq {doc.seq} expired at {doc.expires_at.isoformat()}",
                reason="desired_state_expired",
            )
        digest = desired_digest(doc)
        if doc.seq < data.desired_seq:
            raise DesiredStateError(
                f"desired state seq {doc.seq} is older than the accepted seq {data.desired_seq}",
                reason="stale_seq",
            )
        if doc.seq == data.desired_seq and digest != data.desired_digest:
            raise DesiredStateError(
                f"desired state seq {doc.seq} was already accepted with different content",
                reason="replayed_seq",
            )
        if doc.seq > data.desired_seq:
            data.desired_seq, data.desired_digest = doc.seq, digest
            self.journal.save()
        return True

    def converge(self, doc: DesiredState) -> None:
        """Bring every slot to what ``doc`` asks for; a failed slot does not stop the others."""
        for slot, assignment in doc.slots.items():
            rec = self.journal.slot(slot)
            if (
                rec.committed is not None
                and rec.committed.bundle_sha256 == assignment.bundle_sha256
            ):
                continue
            if (
                rec.state in (State.FAILED, State.ROLLED_BACK)
                and rec.target is not None
                and rec.target.bundle_sha256 == assignment.bundle_sha256
                and rec.error is not None
                and rec.error.get("retry") != "yes"
            ):
                continue  # this exact bundle was refused; only a new document retries it
            self.deploy(slot, assignment)
        for slot in [s for s in self.journal.data.slots if s not in doc.slots]:
            self._remove_slot(slot)

    def _remove_slot(self, slot: str) -> None:
        self.table.remove(slot)
        self.table.detach_shadow(slot)
        rec = self.journal.data.slots.pop(slot)
        self.journal.save()
        self._emit(slot, rec.state, State.IDLE, Event.SUCCESS, None, "slot removed")
        self._collect_garbage()

    # --- the state machine -------------------------------------------------------------------
    def deploy(self, slot: str, target: SlotAssignment) -> State:
        rec = self.journal.slot(slot)
        ctx = Deployment(slot, target)
        rec.target, rec.error = target, None
        state, event = rec.state, Event.DEPLOY
        try:
            while True:
                new_state = next_state(state, event)
                self._enter(rec, slot, state, new_state, event, ctx)
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
        self._finish(rec, ctx, state)
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

    def _run(self, state: State, ctx: Deployment) -> Event:
        try:
            return self._handlers[state](ctx)
        except EdgefleetError as e:
            ctx.error = e
            return Event.FAILURE

    def _enter(
        self, rec: SlotRecord, slot: str, old: State, new: State, event: Event, ctx: Deployment
    ) -> None:
        rec.state = new
        if new == State.COMMITTED:
            assert ctx.staged is not None
            rec.previous, rec.committed = rec.committed, ctx.staged.ref
            rec.shadow_of, rec.sample_rate = ctx.target.shadow_of, ctx.target.sample_rate
            rec.target = None
        elif new in (State.FAILED, State.ROLLING_BACK, State.ROLLED_BACK) and ctx.error:
            rec.error = {
                "reason": ctx.error.reason,
                "message": ctx.error.message,
                "retry": "yes" if isinstance(ctx.error, TransportError) else "no",
                **{k: str(v) for k, v in ctx.error.fields.items()},
            }
        self.journal.save()
        failpoints.hit(f"lifecycle.{new}")
        err = ctx.error if new in (State.FAILED, State.ROLLING_BACK, State.ROLLED_BACK) else None
        self._emit(
            slot,
            old,
            new,
            event,
            ctx.target.bundle_sha256,
            err.message if err else None,
            err.reason if err else None,
        )

    def _emit(
        self,
        slot: str,
        old: State,
        new: State,
        event: Event,
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

    def _finish(self, rec: SlotRecord, ctx: Deployment, state: State) -> None:
        if state == State.COMMITTED and ctx.prior is not None:
            ctx.prior.retire()
        if state == State.FAILED and ctx.staged is not None:
            ctx.staged.retire()
        if (
            state == State.FAILED
            and ctx.error is not None
            and ctx.error.reason
            in (
                "digest_mismatch",
                "oversize",
            )
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
                rec.state in IN_FLIGHT or (rec.error or {}).get("retry") == "yes"
            ):
                keep.add(rec.target.bundle_sha256)  # an interrupted download resumes
        self.store.collect_garbage(keep)

    # --- handlers: one step each, returning an event -----------------------------------------
    def _download(self, ctx: Deployment) -> Event:
        sha = ctx.target.bundle_sha256
        if self.store.has_model(sha) or self.store.bundle_path(sha).is_file():
            return Event.SUCCESS
        check_free_space(self.store.downloads, ctx.target.size, self.device.download_reserve_bytes)
        attempts = self.device.download_attempts
        for attempt in range(1, attempts + 1):
            try:
                download_bundle(
                    ctx.target.bundle_url,
                    self.store.bundle_path(sha),
                    self.store.partial_path(sha),
                    size=ctx.target.size,
                    sha256=sha,
                    credential=self.device.credential,
                    timeout_s=self.device.download_timeout_s,
                    max_bytes_per_s=self.device.download_max_bytes_per_s,
                    sleep=self._sleep,
                )
                return Event.SUCCESS
            except TransportError as e:
                if attempt == attempts:
                    raise
                delay = random.uniform(0, 1.5 ** min(10, attempt))
                log.warning(
                    "download attempt %d/%d failed (%s); retrying in %.1fs",
                    attempt,
                    attempts,
                    e,
                    delay,
                )
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _verify(self, ctx: Deployment) -> Event:
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
                reason="bundle_mismatch",
            )
        return Event.SUCCESS

    def _stage(self, ctx: Deployment) -> Event:
        assert ctx.verified is not None
        m = ctx.verified.manifest
        ref = VersionRef(
            model=m.model.name,
            version=m.model.version,
            bundle_sha256=ctx.target.bundle_sha256,
            runtime=m.runtime.name,
            precision=m.precision,
        )
        ctx.staged = self._load(ctx.verified, ref)
        ctx.probe_inputs, _ = unpack(ctx.verified.directory / m.selftest.file)
        if ctx.target.mode == "active":
            self._measure_prior(ctx)
        return Event.SUCCESS

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
        """The new version's latency against the prior's, like with like: on live traffic when
        both have served ``min_latency_samples`` requests; else on the probes, both versions
        run now, alternately and back to back, so that both meet the same load (the spaced
        probes of the window each start cold and would make any version look slower). A
        latency breach must hold ``LATENCY_CONFIRMATIONS`` times in a row: one hiccup of a busy
        board is not a regression, while a slower model is slower every time."""
        staged, policy = ctx.staged, self.policy
        assert staged is not None and ctx.probe_inputs is not None
        live = staged.stats.snapshot()
        if live_comparable(live, ctx.prior_live, policy):
            return check_latency(live, ctx.prior_live, staged.probe_stats.snapshot(), None, policy)
        if ctx.prior is None or not ctx.prior_runs_probes:
            return None  # a first version, or a prior that cannot run these probes
        breach = None
        for _ in range(LATENCY_CONFIRMATIONS):
            new, prior = self._probe_pair(staged, ctx.prior, ctx.probe_inputs)
            breach = check_health(live, new, policy) or check_latency(
                live, None, new, prior.p95(), policy
            )
            if breach is None or breach.reason != "latency_regression":
                return breach
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

    def _switch(self, ctx: Deployment) -> Event:
        assert ctx.staged is not None
        if ctx.target.shadow_of is not None:
            # A shadow serves nobody: it goes beside the active slot, replacing any earlier one.
            self.table.attach_shadow(
                ctx.slot, ctx.target.shadow_of, ctx.staged, ctx.target.sample_rate
            )
            return Event.SUCCESS
        ctx.prior = self.table.swap(ctx.slot, ctx.staged, retire_old=False)
        return Event.SUCCESS

    def _probation(self, ctx: Deployment) -> Event:
        """Watch the new version for ``window_s``; the first breach ends it."""
        staged, policy = ctx.staged, self.policy
        assert staged is not None and ctx.probe_inputs is not None
        if ctx.target.shadow_of is not None:
            return Event.SUCCESS  # nothing depends on a shadow; its figures are the verdict
        deadline = self._clock() + policy.window_s
        while True:
            breach = check_health(staged.stats.snapshot(), staged.probe_stats.snapshot(), policy)
            if breach is None and self._clock() >= deadline:
                breach = self._latency_verdict(ctx)
                if breach is None:
                    return Event.SUCCESS
            if breach is not None:
                raise ProbationError(breach.message, reason=breach.reason, **breach.figures)
            self._sleep(min(policy.probe_interval_s, max(0.0, deadline - self._clock())))
            with contextlib.suppress(RuntimeBackendError):  # run_counted counted it
                run_counted(staged, ctx.probe_inputs, staged.probe_stats)

    def _roll_back(self, ctx: Deployment) -> Event:
        """Switch the prior version back in (or leave the slot empty if there was none: a
        version that failed its checks is never served)."""
        if ctx.target.shadow_of is not None:
            self.table.detach_shadow(ctx.slot)
        elif ctx.prior is not None:
            self.table.swap(ctx.slot, ctx.prior)
        else:
            self.table.remove(ctx.slot)
        return Event.SUCCESS

    def _load(self, verified: VerifiedBundle, ref: VersionRef) -> ServingModel:
        runtime = self._runtime_for(verified.manifest.runtime.name)
        return stage(verified, ref, runtime, self.device.load_options)
