"""The telemetry reporter: cuts intervals into batches, keeps them in the outbox, sends them.

One thread (``edge-agent-telemetry``):

- every ``checkpoint_s`` it writes the interval's figures so far as the outbox's draft (so a
  ``kill -9`` loses at most ``checkpoint_s`` of figures: the bound this agent promises);
- every ``interval_s`` it closes the interval into a batch (counts are differences of the
  serving path's own counters between two harvests, so nothing is counted twice or missed);
- it publishes the oldest unacknowledged batches (QoS 1, at most ``window`` in flight) and
  sends one again when no acknowledgement came within ``resend_after_s`` — or at once after a
  reconnect, since a broker may have lost what it had acknowledged.

The server's acknowledgement (``TelemetryAck``: the highest contiguous sequence it stored)
deletes batches from the outbox; the broker's PUBACK does not.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from edge_agent.protocol.status import VersionRef
from edge_agent.protocol.telemetry import (
    ProcessFigures,
    Role,
    SlotFigures,
    TelemetryAck,
    TelemetryBatch,
)
from edge_agent.telemetry.figures import ModelTelemetry
from edge_agent.telemetry.outbox import Outbox
from edge_agent.telemetry.process import ProcessSampler

__all__ = ["OutboxCollector", "Role", "Served", "TelemetryReporter", "TelemetrySettings"]

log = logging.getLogger(__name__)


class Counts(Protocol):
    @property
    def requests(self) -> int: ...
    @property
    def errors(self) -> int: ...
    @property
    def nonfinite(self) -> int: ...


class Counters(Protocol):
    def snapshot(self) -> Counts: ...


class Labels(Protocol):
    @property
    def labelled(self) -> int: ...
    @property
    def correct(self) -> int: ...
    @property
    def late(self) -> int: ...


class LabelSource(Protocol):
    """Labels joined to kept predictions (``edge_agent.serving.feedback.FeedbackStore``), per
    (slot, role, model, version, bundle_sha256)."""

    def counts(self, *, reset: bool) -> Mapping[tuple[str, Role, str, str, str], Labels]: ...


class Served(Protocol):
    """What the reporter reads of a serving model (``edge_agent.serving.ServingModel``, whose
    ``stats`` are the serving path's own counters)."""

    ref: VersionRef
    telemetry: ModelTelemetry

    @property
    def stats(self) -> Counters: ...

    @property
    def finished(self) -> bool: ...


@dataclass(frozen=True)
class TelemetrySettings:
    interval_s: float = 60.0
    checkpoint_s: float = 5.0
    resend_after_s: float = 30.0
    window: int = 64
    #: Share of inference time drift accounting may take (each model's sampling follows it),
    #: and the sampling rate it may never go below.
    budget: float = 0.02
    min_sample_rate: float = 0.0


@dataclass
class _Tracked:
    slot: str
    role: Role
    #: requests, errors, NaN/inf at the last harvest
    last: tuple[int, int, int] = (0, 0, 0)


class OutboxCollector:
    """The outbox on the agent's local ``/metrics``."""

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        pending = GaugeMetricFamily(
            "edgefleet_agent_telemetry_pending_batches",
            "Telemetry batches waiting for the server's acknowledgement",
        )
        pending.add_metric([], len(self._outbox.pending()))
        held = GaugeMetricFamily(
            "edgefleet_agent_telemetry_outbox_bytes", "Bytes the telemetry outbox holds"
        )
        held.add_metric([], self._outbox.bytes_used)
        dropped = CounterMetricFamily(
            "edgefleet_agent_telemetry_dropped_batches",
            "Telemetry batches the outbox dropped (full, or older than its age bound)",
        )
        dropped.add_metric([], self._outbox.dropped_total)
        yield from (pending, held, dropped)


class TelemetryReporter:
    def __init__(
        self,
        device_id: str,
        outbox: Outbox,
        settings: TelemetrySettings,
        *,
        publish: Callable[[bytes], bool],
        rollout_of: Callable[[str, str], str | None] = lambda slot, version: None,
        process: ProcessSampler | None = None,
        labels: LabelSource | None = None,
    ) -> None:
        self.device_id = device_id
        self.outbox = outbox
        self.settings = settings
        self._publish = publish
        self._rollout_of = rollout_of
        self._process = process or ProcessSampler()
        self._labels = labels
        self._lock = threading.Lock()
        #: One cut of the figures at a time (a checkpoint asked for by the feedback route
        #: must not interleave with the thread's close of the interval: a label would be in
        #: the closed batch and in the next draft).
        self._cut = threading.Lock()
        # Group commit of persist(): callers wait for one checkpoint that began after them.
        self._persist = threading.Condition()
        self._persist_asked = 0
        self._persist_done = 0
        self._persisting = False
        self._tracked: dict[Served, _Tracked] = {}
        self._sent: dict[int, float] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._interval_start = datetime.now(UTC)

    # --- what served ------------------------------------------------------------------------------
    def track(self, slot: str, role: Role, serving: Served) -> None:
        """``serving`` now answers requests in ``slot``: its figures are reported until it is
        retired and its last request has finished."""
        serving.telemetry.budget = self.settings.budget
        serving.telemetry.min_rate = self.settings.min_sample_rate
        serving.telemetry.sample_rate = max(
            serving.telemetry.sample_rate, serving.telemetry.min_rate
        )
        serving.telemetry.enabled = True
        with self._lock:
            if serving not in self._tracked:
                # From zero: requests it served before this call are its too.
                self._tracked[serving] = _Tracked(slot, role)
            else:
                self._tracked[serving].slot = slot
                self._tracked[serving].role = role

    # --- the thread -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edge-agent-telemetry", daemon=True)
        self._thread.start()

    def stop(self, *, flush: bool = True) -> None:
        """Stop; with ``flush`` the interval so far is closed into a batch (kept for the next
        run to send if it cannot be sent now)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if flush:
            self.close_interval()

    def connected(self) -> None:
        """The link (re)connected: send everything pending again, at once."""
        with self._lock:
            self._sent.clear()
        self._wake.set()

    def acknowledged(self, payload: bytes) -> None:
        """An acknowledgement arrived (MQTT thread)."""
        try:
            ack = TelemetryAck.from_bytes(payload)
        except ValueError as e:  # msgspec's errors are ValueErrors
            log.warning("ignoring a malformed telemetry acknowledgement: %s", e)
            return
        deleted = self.outbox.ack(ack.stream, ack.acked_seq)
        with self._lock:
            for seq in [s for s in self._sent if s <= ack.acked_seq]:
                del self._sent[seq]
        if deleted:
            self._wake.set()  # room in the window

    def _run(self) -> None:
        s = self.settings
        now = time.monotonic()
        next_close = now + s.interval_s
        next_checkpoint = now + s.checkpoint_s
        while not self._stopping.is_set():
            self._wake.wait(timeout=max(0.0, min(next_close, next_checkpoint) - time.monotonic()))
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                now = time.monotonic()
                if now >= next_close:
                    self.close_interval()
                    next_close = now + s.interval_s
                    next_checkpoint = now + s.checkpoint_s
                elif now >= next_checkpoint:
                    self.checkpoint()
                    next_checkpoint = now + s.checkpoint_s
                self.send_pending()
            except Exception:  # telemetry must never take the agent down
                log.exception("telemetry reporting failed; retrying")
                self._stopping.wait(1.0)

    # --- batches ----------------------------------------------------------------------------------
    def checkpoint(self) -> int:
        """Write the interval so far as the outbox's draft."""
        with self._cut:
            slots = self._figures(reset=False)
            process = self._process_figures_peek()
            end = datetime.now(UTC)
            return self.outbox.write_draft(
                lambda seq, floor, dropped: self._batch(seq, floor, dropped, slots, end, process)
            )

    def persist(self) -> None:
        """Return once everything counted before the call is in the outbox (a draft or a
        batch): labels are acknowledged to the application only then. Concurrent callers
        share one checkpoint (group commit); raises OSError when the disk refuses."""
        with self._persist:
            self._persist_asked += 1
            ticket = self._persist_asked
            while self._persist_done < ticket:
                if self._persisting:
                    self._persist.wait()
                    continue
                self._persisting = True
                covered = self._persist_asked
                self._persist.release()
                try:
                    self.checkpoint()
                finally:
                    self._persist.acquire()
                    self._persisting = False
                    self._persist.notify_all()
                self._persist_done = max(self._persist_done, covered)

    def close_interval(self) -> int:
        """Close the interval into a batch in the outbox; returns its sequence."""
        with self._cut:
            slots = self._figures(reset=True)
            process = self._process.sample()
            end = datetime.now(UTC)
            seq = self.outbox.close(
                lambda seq, floor, dropped: self._batch(seq, floor, dropped, slots, end, process)
            )
            self._interval_start = end
            return seq

    def _batch(
        self,
        seq: int,
        floor: int,
        dropped: int,
        slots: list[SlotFigures],
        end: datetime,
        process: ProcessFigures,
    ) -> bytes:
        return TelemetryBatch(
            device_id=self.device_id,
            stream=self.outbox.stream,
            seq=seq,
            floor=floor,
            interval_start=self._interval_start,
            interval_end=end,
            slots=slots,
            process=process,
            dropped_batches_total=dropped,
        ).to_bytes()

    def _process_figures_peek(self) -> ProcessFigures:
        return ProcessFigures(temperature_c=self._process.temperature_c())

    def _figures(self, *, reset: bool) -> list[SlotFigures]:
        out: list[SlotFigures] = []
        labels = dict(self._labels.counts(reset=reset)) if self._labels is not None else {}
        with self._lock:
            tracked = list(self._tracked.items())
        for serving, t in tracked:
            finished = serving.finished  # before reading: no request can still be counted
            # The sketch first: a request is in the counters before its latency is in the
            # sketch, so the sketch never holds a request these counts have not seen.
            figures = serving.telemetry.harvest() if reset else serving.telemetry.peek()
            snap = serving.stats.snapshot()
            counts = (snap.requests, snap.errors, snap.nonfinite)
            requests, errors, nonfinite = (c - p for c, p in zip(counts, t.last, strict=True))
            if reset:
                t.last = counts
                if finished:
                    with self._lock:
                        self._tracked.pop(serving, None)
            ref = serving.ref
            got = labels.pop((t.slot, t.role, ref.model, ref.version, ref.bundle_sha256), None)
            quiet = requests == 0 and not figures.sampled and got is None
            # An idle shadow, batch or stream lane says nothing; an idle active version says
            # it served no request.
            if quiet and (finished or t.role != "active"):
                continue
            out.append(
                SlotFigures(
                    slot=t.slot,
                    role=t.role,
                    model=ref.model,
                    version=ref.version,
                    bundle_sha256=ref.bundle_sha256,
                    rollout_id=self._rollout_of(t.slot, ref.version),
                    requests=requests,
                    errors=min(errors, requests),
                    nonfinite=min(nonfinite, requests),
                    latency_ms=figures.latency_ms
                    if figures.latency_ms is None or figures.latency_ms.count <= requests
                    else None,
                    sampled=figures.sampled,
                    sample_rate=figures.sample_rate,
                    inputs=figures.inputs,
                    outputs=figures.outputs,
                    labelled=got.labelled if got else 0,
                    correct=got.correct if got else 0,
                    late=got.late if got else 0,
                )
            )
        # Labels for versions that no longer serve here (they answered before a swap).
        for (slot, role, model, version, sha), got in labels.items():
            out.append(
                SlotFigures(
                    slot=slot,
                    role=role,
                    model=model,
                    version=version,
                    bundle_sha256=sha,
                    rollout_id=self._rollout_of(slot, version),
                    requests=0,
                    errors=0,
                    nonfinite=0,
                    labelled=got.labelled,
                    correct=got.correct,
                    late=got.late,
                )
            )
        return out

    def send_pending(self) -> int:
        """Publish what is due; returns how many were handed to the link."""
        now = time.monotonic()
        handed = 0
        for seq in self.outbox.pending()[: self.settings.window]:
            with self._lock:
                last = self._sent.get(seq)
            if last is not None and now - last < self.settings.resend_after_s:
                continue
            data = self.outbox.read(seq)
            if data is None:
                continue
            if not self._publish(data):
                break  # not connected: the reconnect sends everything again
            with self._lock:
                self._sent[seq] = now
            handed += 1
        return handed
