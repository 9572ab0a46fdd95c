"""The local rig: real agent processes on this host (:class:`LocalAgent`, shared with
``edgefleet demo``), and the steps scenarios, end-to-end tests and benchmarks take with them."""

from __future__ import annotations

from typing import Any

from fleet_server.demo.agents import LocalAgent, wait_until

__all__ = ["LocalAgent", "roll_out", "wait_until"]


def roll_out(
    api: Any, model: str, version: str, devices: list[str], timeout_s: float = 60, **extra: Any
) -> dict[str, Any]:
    """Create a rollout and wait until no target is pending or on probation; return it."""
    rollout: dict[str, Any] = api.post(
        "/v1/rollouts", json={"model": model, "version": version, "devices": devices, **extra}
    )

    def settled() -> dict[str, Any] | None:
        current: dict[str, Any] = api.get(f"/v1/rollouts/{rollout['id']}")
        return current if current["state"] != "in_progress" else None

    return wait_until(settled, timeout_s, f"the rollout of {model} {version} to settle")
