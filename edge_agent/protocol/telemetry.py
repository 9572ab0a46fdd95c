"""Telemetry batches (device → server) and their end-to-end acknowledgements (server → device).

A batch holds one interval's figures for every model version that served on the device:
request, error and NaN/inf counts, a mergeable latency sketch (DDSketch), and counts of the
sampled inputs and outputs in the bins of the bundle's drift baseline. Only aggregates — never
an input or an output value.

Delivery invariants (see :mod:`edge_agent.telemetry.outbox`): ``seq`` grows by one per batch
within a ``stream`` (one stream per outbox: a device whose state directory was wiped starts a
new one, so its new batches are not mistaken for duplicates); ``floor`` says that the device
will never send a batch with ``seq <= floor`` again (it was acknowledged, or dropped when the
outbox was full), so the server's contiguous watermark can step over dropped batches.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, field

from edge_agent.contracts.structs import Matching, Strict
from edge_agent.protocol.desired import SHA256_PATTERN, SLOT_PATTERN
from edge_agent.protocol.topics import DEVICE_ID_PATTERN

__all__ = [
    "ACK_QOS",
    "MAX_BINS",
    "MAX_CLASSES",
    "MAX_GROUPS",
    "MAX_SKETCH_BINS",
    "MAX_TELEMETRY_BYTES",
    "ROLES",
    "STREAM_PATTERN",
    "WORKLOADS",
    "LatencySketch",
    "ProcessFigures",
    "Role",
    "SlotFigures",
    "TelemetryAck",
    "TelemetryBatch",
    "TensorCounts",
    "Workload",
]

#: A batch for a device with a few slots is a few KiB; 256 features x 10 bins per input adds
#: ~10 KiB.
MAX_TELEMETRY_BYTES = 256 * 1024
#: At 1 % relative accuracy, 1 µs .. 1 hour spans ~1,100 bins.
MAX_SKETCH_BINS = 2048
MAX_GROUPS = 256
MAX_BINS = 64
MAX_CLASSES = 4096
MAX_SLOTS = 32
MAX_TENSORS = 32
STREAM_PATTERN = r"^[0-9a-f]{16,32}$"
#: Sequences stay exact in a double (JSON readers that use one).
MAX_SEQ = 2**53
#: The server publishes acknowledgements at QoS 0. They are end to end and idempotent: a
#: device resends what no acknowledgement covered (after its resend delay, or at once after a
#: reconnect) and the resend is acknowledged again, so a lost one costs a duplicate batch,
#: never a figure. QoS 1 would add the broker's PUBACK round trip to every acknowledgement
#: (about 30 µs of ingest CPU each, a fifth of a batch's cost on a 2-core server).
ACK_QOS = 0


#: How a version's figures were served: ``active`` answered the slot's online requests (HTTP,
#: Unix socket), ``shadow`` ran beside it on a sample of them, ``batch`` scored files
#: (``edge-agent score``), ``stream`` scored a local stream's messages. Each role's figures
#: are kept apart: a batch of 64 rows is not a request's latency.
Role = Literal["active", "shadow", "batch", "stream"]
Workload = Literal["batch", "stream"]
ROLES: tuple[Role, ...] = ("active", "shadow", "batch", "stream")
WORKLOADS: tuple[Workload, ...] = ("batch", "stream")

#: Counts are checked by msgspec while it decodes, not in Python loops (ingest parses
#: thousands a second).
Count = Annotated[int, Meta(ge=0, le=MAX_SEQ)]
#: A finite figure that is not negative (JSON has no NaN or infinity; a number too large for
#: a double is refused as out of range).
Positive = Annotated[float, Meta(ge=0)]
AwareDatetime = Annotated[datetime, Meta(tz=True)]


class _Message(Strict, frozen=True, kw_only=True):
    """A telemetry message: its fields are checked when it is decoded (``from_bytes``,
    ``from_dict``) and its cross-field rules (``__post_init__``) whenever one is made. A
    message the agent builds is checked again by the server."""


class LatencySketch(_Message, frozen=True, kw_only=True):
    """A DDSketch of latencies in ms (logarithmic mapping, one dense positive store):
    ``counts[i]`` values fell in bin ``key_offset + i``; values under the mapping's smallest
    positive value are in ``zero_count``."""

    relative_accuracy: Annotated[float, Meta(gt=0, lt=1)]
    zero_count: Annotated[int, Meta(ge=0)]
    key_offset: Annotated[int, Meta(ge=-(2**20), le=2**20)]
    counts: Annotated[list[Count], Meta(max_length=MAX_SKETCH_BINS)]
    sum_ms: Positive
    min_ms: Positive | None = None
    max_ms: Positive | None = None

    @property
    def count(self) -> int:
        return self.zero_count + sum(self.counts)


class TensorCounts(_Message, frozen=True, kw_only=True):
    """Counts of one tensor's sampled values in its baseline bins: one row per group (a
    feature, a channel, a group of features, or the whole tensor), one column per bin; for a
    classifier-like output, one row of top-1 class counts."""

    kind: Literal["bins", "top1"]
    counts: Annotated[list[list[Count]], Meta(min_length=1, max_length=MAX_GROUPS)]

    def __post_init__(self) -> None:
        counts = self.counts
        if not counts:
            raise ValueError("a tensor's counts have at least one row")
        width = len(counts[0])
        if self.kind == "top1":
            if len(counts) != 1:
                raise ValueError("top-1 counts have exactly one row")
            if not 1 <= width <= MAX_CLASSES:
                raise ValueError(f"top1 rows must have 1..{MAX_CLASSES} columns, not {width}")
        elif not 1 <= width <= MAX_BINS:
            raise ValueError(f"bins rows must have 1..{MAX_BINS} columns, not {width}")
        if len(counts) > 1 and len(set(map(len, counts))) != 1:
            raise ValueError("every row of a tensor's counts has the same number of bins")

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.counts), len(self.counts[0])


class SlotFigures(_Message, frozen=True, kw_only=True):
    """One model version's figures for the interval, as served in one slot."""

    slot: Annotated[str, Matching(SLOT_PATTERN)]
    role: Role
    model: Annotated[str, Meta(min_length=1, max_length=128)]
    version: Annotated[str, Meta(min_length=1, max_length=64)]
    bundle_sha256: Annotated[str, Matching(SHA256_PATTERN)]
    rollout_id: Annotated[str, Meta(max_length=64)] | None = None
    requests: Count
    errors: Count
    nonfinite: Count
    latency_ms: LatencySketch | None = None
    #: Requests whose inputs and outputs were counted, and the sampling rate in force at the
    #: end of the interval (chosen so drift accounting stays within its time budget). A
    #: request is counted in ``requests`` just before it is sampled, so an interval cut
    #: between the two carries it in one batch's ``requests`` and the next one's ``sampled``:
    #: totals agree, a single batch may not.
    sampled: Count = 0
    sample_rate: Annotated[float, Meta(ge=0, le=1)] = 0.0
    inputs: Annotated[dict[str, TensorCounts], Meta(max_length=MAX_TENSORS)] = field(
        default_factory=dict
    )
    outputs: Annotated[dict[str, TensorCounts], Meta(max_length=MAX_TENSORS)] = field(
        default_factory=dict
    )
    #: Ground truth from the field, in the interval the labels arrived (they often come long
    #: after the prediction): predictions (rows) of this version that got a label, how many
    #: of them were right, and labels for this slot that found no kept prediction (unknown
    #: or expired request ids).
    labelled: Count = 0
    correct: Count = 0
    late: Count = 0

    def __post_init__(self) -> None:
        if self.correct > self.labelled:
            raise ValueError("correct predictions cannot exceed labelled ones")
        if self.errors > self.requests or self.nonfinite > self.requests:
            raise ValueError("errors and NaN/inf responses cannot exceed requests")
        if self.latency_ms is not None and self.latency_ms.count > self.requests:
            raise ValueError("the latency sketch holds more values than there were requests")


class ProcessFigures(_Message, frozen=True, kw_only=True):
    cpu_percent: Annotated[float, Meta(ge=0, le=100_000)] | None = None
    rss_bytes: Annotated[int, Meta(ge=0)] | None = None
    #: The hottest thermal zone the OS exposes (``/sys/class/thermal``); absent elsewhere.
    temperature_c: Annotated[float, Meta(ge=-100, le=300)] | None = None


class TelemetryBatch(_Message, frozen=True, kw_only=True):
    device_id: Annotated[str, Matching(DEVICE_ID_PATTERN)]
    stream: Annotated[str, Matching(STREAM_PATTERN)]
    seq: Annotated[int, Meta(ge=1, le=MAX_SEQ)]
    floor: Count
    interval_start: AwareDatetime
    interval_end: AwareDatetime
    slots: Annotated[list[SlotFigures], Meta(max_length=MAX_SLOTS)] = field(default_factory=list)
    process: ProcessFigures = field(default_factory=ProcessFigures)
    #: Batches this device's outbox has dropped so far (it was full, or they were too old).
    dropped_batches_total: Count = 0

    def __post_init__(self) -> None:
        if self.floor >= self.seq:
            raise ValueError("floor must be below seq")
        if self.interval_end < self.interval_start:
            raise ValueError("interval_end is before interval_start")

    def to_bytes(self) -> bytes:
        return self.to_json()

    @classmethod
    def from_bytes(cls, payload: bytes) -> TelemetryBatch:
        """Raises ValueError (msgspec's errors are ValueErrors) for anything but a batch."""
        if len(payload) > MAX_TELEMETRY_BYTES:
            raise ValueError(f"batch of {len(payload)} bytes (limit {MAX_TELEMETRY_BYTES})")
        return _BATCH.decode(payload)


class TelemetryAck(_Message, frozen=True, kw_only=True):
    """The server stored every batch of ``stream`` up to ``acked_seq`` (or knows it was
    dropped): the device may delete them from its outbox."""

    stream: Annotated[str, Matching(STREAM_PATTERN)]
    acked_seq: Count
    acked_at: datetime | None = None

    def to_bytes(self) -> bytes:
        return self.to_json()

    @classmethod
    def from_bytes(cls, payload: bytes) -> TelemetryAck:
        if len(payload) > 1024:
            raise ValueError(f"ack of {len(payload)} bytes")
        return _ACK.decode(payload)


_BATCH = msgspec.json.Decoder(TelemetryBatch)
_ACK = msgspec.json.Decoder(TelemetryAck)
