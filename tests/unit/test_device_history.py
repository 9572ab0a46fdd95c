"""What the server keeps of a device's reports for the dashboard: one history row per
lifecycle transition (a report sent again adds none), and the device's health as the fleet
page counts it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from edge_agent.protocol.lifecycle import SlotEvent, SlotState
from edge_agent.protocol.status import ReportedStatus, Transition
from fleet_server.devices.reports import ReportRow, take_status
from fleet_server.devices.tables import Device
from fleet_server.ui.views import device_row

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _device(**fields: Any) -> Device:
    return Device(id="cam-01", profile="x86-64-avx2", enrolled_at=T0, secret_hash="0" * 64,
                  **fields)  # fmt: skip


def _status(
    moved: Transition | None, slots: dict[str, Any] | None = None, at: datetime = T0
) -> ReportedStatus:
    return ReportedStatus.from_dict(
        {"device_id": "cam-01", "profile": "x86-64-avx2", "agent_version": "0.1.0",
         "slots": slots or {}, "last_transition": moved, "reported_at": at}
    )  # fmt: skip


def _moved(to: SlotState, at: datetime, reason: str | None = None) -> Transition:
    return Transition(slot="clf", from_state=SlotState.PROBATION, to_state=to,
                      event=SlotEvent.FAILURE if reason else SlotEvent.SUCCESS, at=at,
                      reason=reason, message="p95 9 ms vs 1 ms" if reason else None)  # fmt: skip


def test_each_transition_is_kept_once() -> None:
    row = ReportRow("cam-01", None, None, 0, True)
    first = take_status(row, _status(_moved(SlotState.COMMITTED, T0)))
    assert first is not None
    assert (first["from_state"], first["to_state"]) == ("PROBATION", "COMMITTED")
    # The same report again (a reconnect, a resend): no second row.
    assert take_status(row, _status(_moved(SlotState.COMMITTED, T0))) is None
    later = take_status(
        row,
        _status(
            _moved(SlotState.ROLLING_BACK, T0 + timedelta(seconds=5), "latency"),
            at=T0 + timedelta(seconds=5),
        ),
    )
    assert later is not None and later.get("reason") == "latency" and later["message"]
    # A report older than the one taken (another server took the newer one first) changes
    # nothing, and a report with no transition adds no row.
    assert take_status(row, _status(_moved(SlotState.COMMITTED, T0))) is None
    assert row.last_transition is not None and row.last_transition["to_state"] == "ROLLING_BACK"
    assert take_status(row, _status(None, at=T0 + timedelta(seconds=6))) is None


@pytest.mark.parametrize(
    ("online", "states", "health"),
    [
        (True, [], "idle"),
        (True, ["COMMITTED"], "serving"),
        (True, ["PROBATION"], "updating"),
        (False, ["COMMITTED"], "offline"),
        (False, ["FAILED"], "failed"),  # the worst first: failed outranks offline
        (True, ["COMMITTED", "ROLLED_BACK"], "rolled back"),
        (True, ["ROLLED_BACK", "FAILED"], "failed"),
    ],
)
def test_health_is_the_worst_of_the_slots(online: bool, states: list[str], health: str) -> None:
    active = {"model": "clf", "version": "1.0.0", "bundle_sha256": "a" * 64,
              "runtime": "onnxruntime", "precision": "fp32"}  # fmt: skip
    slots = {f"s{i}": {"state": s, "active": active} for i, s in enumerate(states)}
    device = _device(online=online, last_seen_at=T0)
    device.reported = _status(None, slots).to_dict()
    device.online = online  # a status report does not say whether the device is online
    row = device_row(device)
    assert row.health == health
    assert row.versions == ["clf 1.0.0"] * len(states)
