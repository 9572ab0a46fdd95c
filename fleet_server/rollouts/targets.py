"""A rollout's targets as plain rows, for the reconciler and the rollout's description.

A step reads every target of its rollout (10,000 at fleet scale) and changes a few of them,
or all of them once (notify, roll back). Loading each as an ORM object cost 10 to 40 µs apiece
(instance state, attribute instrumentation), a third of a steady step; a :class:`TargetRow`
is one tuple unpacked. Changes are explicit: :meth:`Targets.touch` marks a row, and
:meth:`Targets.write` writes the marked rows with one INSERT (newcomers) and one
executemany UPDATE (the rest) in the step's transaction, before its commit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, update
from sqlalchemy import select as sa_select
from sqlmodel import Session

from fleet_server.rollouts.tables import RolloutTarget, TargetPhase

__all__ = ["TargetRow", "Targets", "load_targets"]

_TABLE = RolloutTarget.__table__  # type: ignore[attr-defined]


@dataclass(slots=True, eq=False)
class TargetRow:
    """One ``rollout_targets`` row (the columns of :class:`RolloutTarget`, same names)."""

    id: int | None
    rollout_id: str
    device_id: str
    bundle_sha256: str | None = None
    desired_seq: int = 0
    phase: str = TargetPhase.SCHEDULED
    stage: int = 0
    added_at: datetime | None = None
    notified_at: datetime | None = None
    previous: dict[str, Any] | None = None
    note: str | None = None
    error: dict[str, Any] | None = None
    switched_at: datetime | None = None


_NAMES: tuple[str, ...] = tuple(TargetRow.__slots__)
_VALUES = _NAMES[1:]
_UPDATE = (
    update(_TABLE)
    .where(_TABLE.c.id == bindparam("b_id"))
    .values({name: bindparam(name) for name in _VALUES})
)


def load_targets(session: Session, rollout_id: str) -> list[TargetRow]:
    """The rollout's targets, ordered by device."""
    query = (
        sa_select(*(_TABLE.c[name] for name in _NAMES))
        .where(_TABLE.c.rollout_id == rollout_id)
        .order_by(_TABLE.c.device_id)
    )
    return [TargetRow(*row) for row in session.execute(query).all()]


@dataclass
class Targets:
    """The targets one step reads (once) and the ones it changed."""

    rollout_id: str
    _rows: dict[str, TargetRow] | None = None
    _touched: dict[int, TargetRow] = field(default_factory=dict)

    def by_device(self, session: Session) -> dict[str, TargetRow]:
        """Every target of the rollout by device id (read on first use; newcomers added)."""
        if self._rows is None:
            self._rows = {t.device_id: t for t in load_targets(session, self.rollout_id)}
        return self._rows

    def touch(self, row: TargetRow) -> None:
        """``row`` changed: write it with the step."""
        self._touched[id(row)] = row

    def write(self, session: Session) -> int:
        """Write what was touched (in the caller's transaction), once, at the end of the
        step; returns how many rows."""
        rows = list(self._touched.values())
        self._touched.clear()
        new = [r for r in rows if r.id is None]
        old = [r for r in rows if r.id is not None]
        if new:
            session.execute(
                insert(_TABLE), [{name: getattr(r, name) for name in _VALUES} for r in new]
            )
        if old:
            session.execute(
                _UPDATE,
                [{"b_id": r.id, **{name: getattr(r, name) for name in _VALUES}} for r in old],
            )
        return len(rows)
