"""Where each device is in a rollout, and where each stage is: pure functions of the targets'
rows and the devices' last reports (no I/O), so the REST status, the CLI's live view and the
reconciler's decisions all read the same words.

A device's report is read as the JSON the control plane stored (``Device.reported``), not
re-validated: the reconciler reads every target of a 10,000-device rollout each tick.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select as sa_select
from sqlmodel import Session

from edge_agent.protocol.lifecycle import SlotState
from fleet_server.database import among, aware
from fleet_server.devices.tables import Device
from fleet_server.rollouts.tables import ENDED, Rollout, TargetPhase, TargetState
from fleet_server.rollouts.targets import TargetRow

__all__ = [
    "FAILURES",
    "DeviceRow",
    "DeviceRowCache",
    "TargetView",
    "device_rows",
    "rank",
    "stage_quota",
    "switch_spread",
    "target_view",
]

_INSTALLING = frozenset(
    {SlotState.DOWNLOADING, SlotState.VERIFYING, SlotState.STAGING, SlotState.SWITCHING}
)
_SETTLED = frozenset({SlotState.COMMITTED, SlotState.FAILED, SlotState.ROLLED_BACK})
#: A device's own verdicts against the version.
FAILURES = frozenset({TargetState.FAILED, TargetState.ROLLED_BACK, TargetState.REFUSED})


@dataclass(frozen=True, slots=True)
class DeviceRow:
    """What progress and gates read of a device: its row without the ORM (the reconciler
    reads thousands each step)."""

    id: str
    profile: str
    labels: dict[str, str]
    runtimes: dict[str, str] | None
    online: bool = False
    reported: dict[str, Any] | None = None
    reported_seq: int = 0


def device_rows(session: Session, device_ids: list[str]) -> dict[str, DeviceRow]:
    names = ("id", "profile", "labels", "runtimes", "online", "reported", "reported_seq")
    table = Device.__table__  # type: ignore[attr-defined]
    columns = [table.c[name] for name in names]
    out: dict[str, DeviceRow] = {}
    for clause in among(session, table.c.id, device_ids):
        for row in session.execute(sa_select(*columns).where(clause)).all():
            out[row[0]] = DeviceRow(
                row[0], row[1], row[2] or {}, row[3] or None, bool(row[4]), row[5] or None,
                row[6] or 0,
            )  # fmt: skip
    return out


class DeviceRowCache:
    """The reconciler's copy of its targets' device rows. A row is read again only when the
    device reported since (``last_seen_at``; presence too), or its profile changed: parsing
    every target's last report each step was most of a steady step's cost at 10,000
    devices, while most of them had not reported since the step before."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[tuple[Any, ...], DeviceRow]] = {}

    def rows(self, session: Session, device_ids: list[str]) -> dict[str, DeviceRow]:
        table = Device.__table__  # type: ignore[attr-defined]
        stamps: dict[str, tuple[Any, ...]] = {}
        for clause in among(session, table.c.id, device_ids):
            query = sa_select(table.c.id, table.c.last_seen_at, table.c.profile).where(clause)
            for device_id, seen, profile in session.execute(query).all():
                stamps[device_id] = (seen, profile)
        stale = [d for d, stamp in stamps.items() if self._rows.get(d, ((),))[0] != stamp]
        for device_id, row in device_rows(session, stale).items():
            self._rows[device_id] = (stamps[device_id], row)
        if len(self._rows) > 2 * len(stamps) + 10_000:  # rollouts ended: forget their devices
            self._rows = {d: self._rows[d] for d in stamps if d in self._rows}
        return {d: self._rows[d][1] for d in stamps if d in self._rows}


@dataclass(frozen=True)
class TargetView:
    target: TargetRow
    device: DeviceRow
    state: TargetState
    device_state: SlotState | None
    error: dict[str, Any] | None

    @property
    def ended(self) -> bool:
        return self.state in ENDED


def staging_slot(slot: str) -> str:
    """Where stage then activate stages a version beside ``slot``'s active one."""
    return f"{slot[:56]}-staged"


def view_slot(rollout: Rollout) -> tuple[str, bool]:
    """The slot a rollout's progress is read from, and whether it is the staging slot."""
    plan = rollout.plan or {}
    if plan.get("strategy") == "stage_then_activate" and rollout.activated_at is None:
        return staging_slot(rollout.slot), True
    return rollout.slot, False


def rank(rollout_id: str, device_id: str) -> int:
    """A device's place in the rollout's order: a stable hash of (rollout, device), so a
    device admitted to stage k is in every later stage, and reruns agree."""
    digest = hashlib.sha256(f"{rollout_id}/{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def in_order(rollout_id: str, views: list[TargetView]) -> list[TargetView]:
    """The cohort's devices the stages count (not released, not excluded), in the rollout's
    order: stage k holds the first ``stage_quota`` of them, plus any notified already."""
    eligible = [
        v for v in views if v.target.phase not in (TargetPhase.RELEASED, TargetPhase.EXCLUDED)
    ]
    eligible.sort(key=lambda v: rank(rollout_id, v.device.id))
    return eligible


def bucket_start(when: datetime, bucket_s: int) -> datetime:
    """The start of the telemetry rollup bucket ``when`` falls in."""
    epoch = when.timestamp()
    return datetime.fromtimestamp(epoch - epoch % bucket_s, tz=when.tzinfo)


def stage_quota(percent: float, cohort_size: int) -> int:
    """How many of ``cohort_size`` devices a stage of ``percent`` holds: at least one (a 1 %
    canary on a 20-device cohort is one device, not none)."""
    if cohort_size <= 0:
        return 0
    return min(cohort_size, max(1, math.ceil(percent * cohort_size / 100 - 1e-9)))


def _shadow_sha(shadow: dict[str, Any] | None) -> str | None:
    return str(shadow["bundle_sha256"]) if shadow and "bundle_sha256" in shadow else None


def target_view(
    target: TargetRow,
    device: DeviceRow,
    slot: str,
    *,
    now: datetime,
    timeout_s: float,
    staging: bool = False,
    since: datetime | None = None,
) -> TargetView:
    """``staging``: ``slot`` is where the version is staged (stage then activate, before the
    switch): serving there means staged. ``since``: the time-out runs from then if later than
    the notification (the switch command, for staged devices)."""
    phase = target.phase
    if phase == TargetPhase.EXCLUDED:
        return TargetView(target, device, TargetState.EXCLUDED, None, None)
    if phase == TargetPhase.SCHEDULED:
        return TargetView(target, device, TargetState.WAITING, None, None)
    reported = device.reported or {}
    report = (reported.get("slots") or {}).get(slot)
    device_state = SlotState(report["state"]) if report else None
    if phase == TargetPhase.RELEASED:
        return TargetView(target, device, TargetState.RELEASED, device_state, None)
    state, error = _reported_state(target, device, report, reported)
    if staging and state == TargetState.SERVING:
        state = TargetState.STAGED
    if phase == TargetPhase.REVERTED:
        # Given its previous version back; why it failed (if it did) is still worth showing.
        failed = state in FAILURES
        return TargetView(
            target, device, TargetState.REVERTED, device_state, error if failed else target.error
        )
    if state in (TargetState.PENDING, TargetState.DOWNLOADING, TargetState.PROBATION):
        notified = aware(target.notified_at) if target.notified_at else None
        if notified is not None and since is not None:
            notified = max(notified, since)
        if notified is not None and now - notified > timedelta(seconds=timeout_s):
            state = TargetState.TIMED_OUT
    return TargetView(
        target, device, state, device_state, error if state != TargetState.SERVING else None
    )


def _reported_state(
    target: TargetRow,
    device: DeviceRow,
    report: dict[str, Any] | None,
    reported: dict[str, Any],
) -> tuple[TargetState, dict[str, Any] | None]:
    sha = target.bundle_sha256
    error = report.get("error") if report else None
    if report is None:
        running = None
    else:
        active = report.get("active")
        running = active["bundle_sha256"] if active else _shadow_sha(report.get("shadow"))
    slot_state = SlotState(report["state"]) if report else None
    if report is not None and report.get("target_sha256") == sha:
        if slot_state == SlotState.FAILED:
            return TargetState.FAILED, error
        if slot_state == SlotState.ROLLED_BACK:
            return TargetState.ROLLED_BACK, error
    if report is not None and running == sha:
        # Only a committed version is serving; between the switch and the commit (probation,
        # or a rollback under way) the device may still turn it down. In a state a
        # deployment ends in, what a slot runs is its committed version (after a fleet
        # rollback to it, the slot still names the version it left, and why).
        return (TargetState.SERVING if slot_state in _SETTLED else TargetState.PROBATION), error
    refusal = reported.get("refusal")
    if (
        refusal
        and refusal.get("seq") == target.desired_seq  # this document, not some other payload
        and device.reported_seq < target.desired_seq
    ):
        return TargetState.REFUSED, refusal
    if report is not None and report.get("target_sha256") == sha and slot_state in _INSTALLING:
        return TargetState.DOWNLOADING, None
    return TargetState.PENDING, None


def switch_spread(rollout: Rollout, views: list[TargetView]) -> dict[str, float] | None:
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
