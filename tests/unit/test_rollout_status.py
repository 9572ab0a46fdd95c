"""How a device's report maps to a rollout target's state (pure function, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from fleet_server.bundles.tables import Bundle
from fleet_server.devices.tables import Device
from fleet_server.rollouts.service import _target_status
from fleet_server.rollouts.tables import RolloutTarget

NEW, OLD = "a" * 64, "b" * 64


def status(
    slot: dict[str, Any] | None, refusal: dict[str, str] | None = None, reported_seq: int = 2
) -> str:
    device = Device(id="d", profile="x86-64-avx2", secret_hash="x", enrolled_at=datetime.now(UTC),
                    reported={"device_id": "d", "profile": "x86-64-avx2", "agent_version": "0",
                              "reported_at": "2026-11-30T00:00:00Z",
                              "slots": {"clf": slot} if slot else {}, "refusal": refusal},
                    reported_seq=reported_seq)  # fmt: skip
    bundle = Bundle(sha256=NEW, model_version_id=1, profile="x86-64-avx2", runtime="onnxruntime",
                    precision="fp32", signing_key_id="k", size=1, manifest={}, created_at=datetime.now(UTC))  # fmt: skip
    target = RolloutTarget(rollout_id="r", device_id="d", bundle_sha256=NEW, desired_seq=2)
    return _target_status(device, target, "clf", bundle).state


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
        ({"state": "DOWNLOADING", "active": active(OLD), "target_sha256": NEW}, "pending"),
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
