"""The checks a telemetry batch passes before anything of it is stored: its topic names the
device the batch names, it parses within its size bound, its sequence and interval are not
from the future, the device is enrolled, and each slot's figures fit the bundle they name
(model, version, sketch accuracy, and the drift baseline's tensor kinds and shapes). A batch
whose figures do not fit is still acknowledged (its key is kept, refused), never folded in."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from edge_agent.protocol.telemetry import MAX_TELEMETRY_BYTES, SlotFigures, TelemetryBatch
from edge_agent.protocol.topics import parse_device_topic
from edge_agent.telemetry.sketch import RELATIVE_ACCURACY
from fleet_server.devices.tables import Device
from fleet_server.telemetry.catalog import BundleCatalog, BundleInfo
from fleet_server.telemetry.upserts import PG_ENROLLED, is_postgres

__all__ = ["MAX_FUTURE", "MAX_SEQ_AHEAD", "Rejection", "check_slot", "validate"]

#: A batch more than this many sequences past what the device says it still holds is refused:
#: an agent sends at most a window of 64 past its oldest unacknowledged batch.
MAX_SEQ_AHEAD = 4096
#: Clock skew tolerated on interval_end.
MAX_FUTURE = timedelta(minutes=10)


@dataclass(frozen=True)
class Rejection:
    device_id: str | None
    reason: str
    message: str


def check_slot(slot: SlotFigures, info: BundleInfo | None) -> str | None:
    """Why a slot's figures cannot be stored against its bundle, or None."""
    if info is None:
        return "unknown_bundle"
    if (slot.model, slot.version) != (info.model, info.version):
        return "bundle_mismatch"
    if slot.latency_ms is not None and slot.latency_ms.relative_accuracy != RELATIVE_ACCURACY:
        return "bad_shape"
    shapes = info.shapes
    for side, counts in (("inputs", slot.inputs), ("outputs", slot.outputs)):
        for name, tensor in counts.items():
            if shapes.get((side, name)) != (tensor.kind, tensor.shape):
                return "bad_shape"
    return None


def validate(
    session: Session,
    messages: Iterable[tuple[str, bytes]],
    bundles: BundleCatalog,
    now: datetime,
) -> tuple[list[TelemetryBatch], dict[int, str], list[Rejection]]:
    """The batches to store, (by ``id``) those of them whose figures are refused, and the
    batches refused outright."""
    rejected: list[Rejection] = []
    parsed: list[TelemetryBatch] = []
    for topic, payload in messages:
        where = parse_device_topic(topic)
        device_id = where[0] if where else None
        if where is None or where[1] != "telemetry":
            rejected.append(Rejection(None, "bad_topic", f"not a telemetry topic: {topic}"))
            continue
        if len(payload) > MAX_TELEMETRY_BYTES:
            rejected.append(
                Rejection(
                    device_id, "too_large", f"{len(payload)} bytes (limit {MAX_TELEMETRY_BYTES})"
                )
            )
            continue
        try:
            batch = TelemetryBatch.from_bytes(payload)
        except ValueError as e:  # msgspec's errors are ValueErrors
            rejected.append(Rejection(device_id, "malformed", str(e)[:300]))
            continue
        if batch.device_id != device_id:
            rejected.append(
                Rejection(device_id, "device_mismatch", f"batch names device {batch.device_id!r}")
            )
            continue
        if batch.seq > batch.floor + MAX_SEQ_AHEAD or batch.interval_end > now + MAX_FUTURE:
            rejected.append(
                Rejection(
                    device_id, "future_seq", f"seq {batch.seq} / interval_end from the future"
                )
            )
            continue
        parsed.append(batch)
    if not parsed:
        return [], {}, rejected
    named = sorted({b.device_id for b in parsed})
    if is_postgres(session):
        enrolled = set(session.execute(PG_ENROLLED, {"ids": named}).scalars())
    else:
        enrolled = set(
            session.exec(
                select(Device.id).where(
                    col(Device.id).in_(named), col(Device.decommissioned_at).is_(None)
                )
            ).all()
        )
    good = []
    refused: dict[int, str] = {}
    for batch in parsed:
        if batch.device_id not in enrolled:
            rejected.append(
                Rejection(batch.device_id, "unknown_device", "not enrolled (or decommissioned)")
            )
            continue
        problem = next(
            (p for s in batch.slots if (p := check_slot(s, bundles.get(session, s.bundle_sha256)))),
            None,
        )
        if problem is not None:
            rejected.append(
                Rejection(
                    batch.device_id,
                    problem,
                    f"batch {batch.seq}: a slot's figures do not fit its bundle",
                )
            )
            refused[id(batch)] = problem
        good.append(batch)
    return good, refused, rejected
