"""Shadow: the candidate runs beside the active slot (``shadow_of``) on a sample of its
requests and answers none of them; its gates judge agreement with the active version."""

from __future__ import annotations

from typing import Any

from fleet_server.rollouts.strategies.rules import StrategyRules
from fleet_server.rollouts.tables import Rollout

__all__ = ["Shadow"]


class Shadow(StrategyRules):
    def placement(self, rollout: Rollout) -> tuple[str, dict[str, Any]]:
        plan = rollout.plan or {}
        return rollout.slot, {
            "shadow_of": plan.get("shadow_of"),
            "sample_rate": plan.get("sample_rate", 0.1),
        }
