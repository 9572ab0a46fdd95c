"""Rollout strategies, one module each, behind :class:`StrategyRules`."""

from __future__ import annotations

from typing import Any

from fleet_server.rollouts.spec import Strategy
from fleet_server.rollouts.strategies.ab import ABTest
from fleet_server.rollouts.strategies.rules import StrategyRules
from fleet_server.rollouts.strategies.shadow import Shadow
from fleet_server.rollouts.strategies.stage_then_activate import StageThenActivate

__all__ = ["StrategyRules", "rules_for"]


def rules_for(plan: dict[str, Any]) -> StrategyRules:
    strategy = plan.get("strategy")
    if strategy == Strategy.AB:
        return ABTest()
    if strategy == Strategy.STAGE_THEN_ACTIVATE:
        return StageThenActivate()
    if strategy == Strategy.SHADOW or plan.get("shadow_of"):
        return Shadow()
    return StrategyRules()  # all at once, canary
