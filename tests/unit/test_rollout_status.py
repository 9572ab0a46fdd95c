"""How a device's report maps to a rollout target's state (pure function, no I/O)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleet_server.devices.tables import Device
from fleet_server.rollouts.progress import DeviceRow, rank, stage_quota, target_view
from fleet_server.rollouts.tables import RolloutTarget, TargetPhase

NEW, OLD = "a" * 64, "b" * 64


NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


def status(
    slot: dict[str, Any] | None,
    refusal: dict[str, str] | None = None,
    reported_seq: int = 2,
    *,
    phase: str = TargetPhase.NOTIFIED,
    notified_s_ago: float = 10,
    timeout_s: float = 60,
) -> str:
    device = Device(id="d", profile="x86-64-avx2", secret_hash="x", enrolled_at=datetime.now(UTC),
                    reported={"device_id": "d", "profile": "x86-64-avx2", "agent_version": "0",
                              "reported_at": "2026-11-30T00:00:00Z",
                              "slots": {"clf": slot} if slot else {}, "refusal": refusal},
                    reported_seq=reported_seq)  # fmt: skip
    target = RolloutTarget(rollout_id="r", device_id="d", bundle_sha256=NEW, desired_seq=2,
                           phase=phase, notified_at=NOW - timedelta(seconds=notified_s_ago))  # fmt: skip
    row = DeviceRow(device.id, device.profile, {}, None, True, device.reported,
                    device.reported_seq)  # fmt: skip
    return target_view(target, row, "clf", now=NOW, timeout_s=timeout_s).state


def active(sha: str) -> dict[str, str]:
    return {
        "model": "m",
        "version": "v",
        "bundle_sha256": sha,
        "runtime": "onnxruntime",
        "precision": "fp32",
    }


@pytest.mark.parametrize(
    ("slot", "expected"),
    [
        (None, "pending"),
        ({"state": "DOWNLOADING", "active": active(OLD), "target_sha256": NEW}, "downloading"),
        ({"state": "STAGING", "active": active(OLD), "target_sha256": NEW}, "downloading"),
        # Still installing something else: this version has not begun.
        ({"state": "DOWNLOADING", "active": active(OLD), "target_sha256": OLD}, "pending"),
        ({"state": "PROBATION", "active": active(NEW), "target_sha256": NEW}, "probation"),
        # Mid-rollback the bad version is still the active reference for a moment.
        ({"state": "ROLLING_BACK", "active": active(NEW), "target_sha256": NEW}, "probation"),
        ({"state": "ROLLED_BACK", "active": active(OLD), "target_sha256": NEW}, "rolled_back"),
        ({"state": "ROLLED_BACK", "active": active(NEW), "target_sha256": NEW}, "rolled_back"),
        ({"state": "FAILED", "active": active(OLD), "target_sha256": NEW}, "failed"),
        ({"state": "COMMITTED", "active": active(NEW)}, "serving"),
        # A fleet rollback to the committed version: the slot still names the one it left.
        ({"state": "ROLLED_BACK", "active": active(NEW), "target_sha256": OLD}, "serving"),
    ],
)
def test_only_a_committed_version_counts_as_serving(
    slot: dict[str, Any] | None, expected: str
) -> None:
    assert status(slot) == expected


def test_a_refused_document_is_reported_as_refused() -> None:
    assert (
        status(
            {"state": "COMMITTED", "active": active(OLD)},
            {"reason": "stale_seq", "message": "older", "seq": 2},
            reported_seq=1,
        )
        == "refused"
    )


def test_a_refusal_of_some_other_payload_does_not_count_against_this_rollout() -> None:
    garbage = {"reason": "desired_state_malformed", "message": "not JSON", "seq": None}
    assert (
        status({"state": "COMMITTED", "active": active(OLD)}, garbage, reported_seq=1) == "pending"
    )


@pytest.mark.parametrize(
    ("slot", "expected"),
    [
        (None, "timed_out"),
        ({"state": "DOWNLOADING", "active": active(OLD), "target_sha256": NEW}, "timed_out"),
        ({"state": "PROBATION", "active": active(NEW), "target_sha256": NEW}, "timed_out"),
        # A late device that catches up is serving, however late.
        ({"state": "COMMITTED", "active": active(NEW)}, "serving"),
        ({"state": "FAILED", "active": active(OLD), "target_sha256": NEW}, "failed"),
    ],
)
def test_a_device_silent_past_the_stage_timeout_is_timed_out(
    slot: dict[str, Any] | None, expected: str
) -> None:
    assert status(slot, notified_s_ago=61, timeout_s=60) == expected


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        (TargetPhase.SCHEDULED, "waiting"),
        (TargetPhase.RELEASED, "released"),
        (TargetPhase.EXCLUDED, "excluded"),
        (TargetPhase.REVERTED, "reverted"),
    ],
)
def test_the_servers_phase_comes_before_the_report(phase: str, expected: str) -> None:
    assert status({"state": "COMMITTED", "active": active(NEW)}, phase=phase) == expected


def test_stage_membership_is_stable_and_cumulative() -> None:
    ids = [f"dev-{i}" for i in range(200)]
    order = sorted(ids, key=lambda d: rank("r1", d))
    stages = [1, 10, 50, 100]
    members = [set(order[: stage_quota(p, len(ids))]) for p in stages]
    assert [len(m) for m in members] == [2, 20, 100, 200]
    for earlier, later in itertools.pairwise(members):
        assert earlier < later
    # The same rollout orders the same way every time; another rollout differently.
    assert order == sorted(ids, key=lambda d: rank("r1", d))
    assert order != sorted(ids, key=lambda d: rank("r2", d))


def test_a_stage_holds_at_least_one_device() -> None:
    assert stage_quota(1, 20) == 1
    assert stage_quota(25, 4) == 1
    assert stage_quota(50, 4) == 2
    assert stage_quota(100, 3) == 3
    assert stage_quota(10, 0) == 0
