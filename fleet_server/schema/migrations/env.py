"""Alembic's environment for edgefleet: run by :mod:`fleet_server.schema` on a connection it
passes in (``config.attributes["connection"]``); there is no ``alembic.ini`` and no offline
(SQL script) mode."""

from __future__ import annotations

from alembic import context

from fleet_server.schema import COMPARE_OPTIONS, target_metadata

if context.is_offline_mode():
    raise SystemExit("edgefleet runs its migrations online: edgefleet db upgrade")

context.configure(
    connection=context.config.attributes["connection"],
    target_metadata=target_metadata(),
    # SQLite alters a column by copying its table: Alembic's batch mode does that.
    render_as_batch=True,
    transaction_per_migration=False,
    **COMPARE_OPTIONS,
)
with context.begin_transaction():
    context.run_migrations()
