"""One step on one rollout: the context each of the engine's concepts decides in.

A :class:`Step` is made while this process holds the rollout's row lock. What the concepts
stage on its session (targets, events, audit entries, desired-state documents) is committed
at once by the reconciler, or by the operator's command, and the documents it returns are
published only after that commit: a decision is recorded exactly once, or not at all. The
rollout's targets are plain rows (:mod:`~fleet_server.rollouts.targets`): a concept that
changes one says so (``step.targets.touch``), and :meth:`Step.finish` writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlmodel import Session

from edge_agent.protocol.desired import SlotAssignment
from fleet_server.builds.runner import BuildRunner
from fleet_server.devices import desired
from fleet_server.devices.desired import DesiredDocument
from fleet_server.keys.service import FleetSigner, ServerKeys
from fleet_server.rollouts.tables import Rollout, RolloutEvent
from fleet_server.rollouts.targets import Targets

__all__ = ["Documents", "EngineConfig", "Step"]

#: Each device's new signed document, to publish after the commit.
Documents = dict[str, DesiredDocument]


@dataclass(frozen=True)
class EngineConfig:
    """What every step reads and never changes."""

    keys: ServerKeys
    runner: BuildRunner
    #: The telemetry bundle catalog (drift baselines) the gates read with.
    bundles: Any
    public_url: str
    desired_ttl_s: int
    bucket_s: int


@dataclass
class Step:
    session: Session
    rollout: Rollout
    now: datetime
    #: Who decides when nobody else is named: this process's reconciler.
    actor: str
    config: EngineConfig
    targets: Targets = field(init=False)

    def __post_init__(self) -> None:
        self.targets = Targets(self.rollout.id)

    def finish(self) -> None:
        """Write the targets the step changed (before the caller commits)."""
        self.targets.write(self.session)

    @property
    def plan(self) -> dict[str, Any]:
        return self.rollout.plan or {}

    def signer(self) -> FleetSigner:
        return self.config.keys.signer(self.session)

    def change_documents(self, changes: dict[str, dict[str, SlotAssignment | None]]) -> Documents:
        """Stage one new signed document per device with its slots changed as given."""
        if not changes:
            return {}
        return desired.change_many(
            self.session, changes, ttl_s=self.config.desired_ttl_s, signer=self.signer()
        )

    def event(
        self,
        kind: str,
        message: str,
        *,
        actor: str | None = None,
        stage: int | None = None,
        **figures: Any,
    ) -> None:
        self.session.add(
            RolloutEvent(
                rollout_id=self.rollout.id,
                at=self.now,
                kind=kind,
                stage=self.rollout.stage if stage is None else stage,
                actor=actor or self.actor,
                message=message[:1000],
                figures=figures,
            )
        )
