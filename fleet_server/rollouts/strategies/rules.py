"""What sets one strategy apart from another: four questions the engine asks, with the
staged rollout's answers (all at once, canary) as the defaults.

A strategy is a subclass in a module of its own, answering only where it differs:

- **placement**: the slot a notified device gets the version in, and what its assignment
  adds there (a shadow's sample rate, a staging slot);
- **observe**: every step, before deciding: what the strategy keeps of the devices' progress;
- **on_settled**: the stage's devices have all ended; None goes on to the bake and the gates
  (stage then activate switches the fleet here instead);
- **on_passed**: the stage passed its gates; None goes on to the next stage or the end (an
  A/B hold gives its verdict here instead).
"""

from __future__ import annotations

from typing import Any

from fleet_server.registry.tables import MLModel, ModelVersion
from fleet_server.rollouts.progress import TargetView
from fleet_server.rollouts.step import Documents, Step
from fleet_server.rollouts.tables import Rollout

__all__ = ["StrategyRules"]


class StrategyRules:
    def placement(self, rollout: Rollout) -> tuple[str, dict[str, Any]]:
        return rollout.slot, {}

    def observe(self, step: Step, views: list[TargetView]) -> None:
        return None

    def on_settled(
        self, step: Step, model: MLModel, version: ModelVersion, views: list[TargetView]
    ) -> Documents | None:
        return None

    def on_passed(
        self, step: Step, views: list[TargetView], shown: list[dict[str, Any]]
    ) -> Documents | None:
        return None
