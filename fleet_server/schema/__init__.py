"""The database schema and its migrations (Alembic, in ``migrations/``).

A database is one of: empty (no edgefleet table), unversioned (made before edgefleet had
migrations: tables, no revision), behind (an older revision), current (this code's head) or
ahead (a revision this code does not know: a newer edgefleet upgraded it). The server starts
on an empty database, which it migrates to head, and on a current one; it refuses the others,
naming the command that fixes them (:func:`check_for_start`). ``edgefleet db upgrade`` runs
:func:`upgrade`: it adopts an unversioned database that has every table and column of the
baseline revision (stamps it there) and applies every revision after.

A schema change is a table change plus a revision in ``migrations/versions/`` (``NNNN_what.py``,
``down_revision`` the one before). Alembic drafts one from the difference between a database at
head and the tables::

    from alembic import command
    from fleet_server import schema
    with engine.connect() as conn:
        command.revision(schema._config(conn), message="what", autogenerate=True, rev_id="0003")

Review the draft (SQLModel's types are written as plain ``sa.String``/``sa.DateTime``); the
test that compares a migrated database with the tables fails until the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import SQLModel

from edge_agent.contracts.errors import EdgefleetError
from fleet_server.audit import tables as audit_tables
from fleet_server.auth import tables as auth_tables
from fleet_server.builds import tables as builds_tables
from fleet_server.bundles import tables as bundles_tables
from fleet_server.database import advisory_key
from fleet_server.devices import tables as devices_tables
from fleet_server.hil import tables as hil_tables
from fleet_server.keys import tables as keys_tables
from fleet_server.registry import tables as registry_tables
from fleet_server.rollouts import tables as rollouts_tables
from fleet_server.telemetry import tables as telemetry_tables

#: Every domain's tables, imported so that their metadata is registered.
TABLE_MODULES = (
    audit_tables,
    auth_tables,
    builds_tables,
    bundles_tables,
    devices_tables,
    hil_tables,
    keys_tables,
    registry_tables,
    rollouts_tables,
    telemetry_tables,
)

#: The first revision: the schema as ``create_all`` made it when migrations began.
BASELINE = "0001"

#: How a database is compared with the tables the code declares (migrations' tests and
#: autogenerate): column types too, not only names.
COMPARE_OPTIONS: dict[str, Any] = {"compare_type": True}

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

UPGRADE_COMMAND = "edgefleet db upgrade"


class SchemaError(EdgefleetError):
    """The database's schema is not the one this code runs on; the message says what to do."""

    reason = "schema"


class SchemaState(StrEnum):
    EMPTY = "empty"
    UNVERSIONED = "unversioned"
    BEHIND = "behind"
    CURRENT = "current"
    AHEAD = "ahead"


@dataclass(frozen=True)
class Status:
    state: SchemaState
    revision: str | None
    head: str
    #: Revisions an upgrade would apply, oldest first (all of them on an empty database).
    pending: list[str] = field(default_factory=list)


def target_metadata() -> MetaData:
    assert TABLE_MODULES  # imported for their side effect: the tables' metadata
    return SQLModel.metadata


def _config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head() -> str:
    found = _script().get_current_head()
    assert found is not None
    return found


def _status(conn: Connection) -> Status:
    script = _script()
    top = head()
    revision = MigrationContext.configure(conn).get_current_revision()
    chain = [s.revision for s in reversed(list(script.walk_revisions()))]  # oldest first
    if revision is None:
        ours = set(target_metadata().tables)
        present = set(inspect(conn).get_table_names())
        if ours & present:
            return Status(SchemaState.UNVERSIONED, None, top, chain[1:])
        return Status(SchemaState.EMPTY, None, top, chain)
    if revision not in chain:
        return Status(SchemaState.AHEAD, revision, top)
    if revision == top:
        return Status(SchemaState.CURRENT, revision, top)
    return Status(SchemaState.BEHIND, revision, top, chain[chain.index(revision) + 1 :])


def status(engine: Engine) -> Status:
    with engine.connect() as conn:
        return _status(conn)


def check_for_start(engine: Engine) -> Status:
    """What the server does at start-up: an empty database is migrated to head (a new
    installation); a current one is used as it is; any other raises :class:`SchemaError`
    naming what to run. Returns the status before (EMPTY when it created the schema)."""
    found = status(engine)
    if found.state is SchemaState.EMPTY:
        upgrade(engine)
        return found
    if found.state is SchemaState.CURRENT:
        return found
    raise SchemaError(explain(found, engine))


def explain(found: Status, engine: Engine) -> str:
    where = engine.url.render_as_string(hide_password=True)
    if found.state is SchemaState.UNVERSIONED:
        return (
            f"the database {where} was made by an edgefleet from before migrations: back it "
            f"up, then run `{UPGRADE_COMMAND}` (it adopts the database and applies "
            f"{len(found.pending)} revision(s))"
        )
    if found.state is SchemaState.BEHIND:
        return (
            f"the database {where} is at revision {found.revision}, behind this edgefleet's "
            f"{found.head}: back it up, then run `{UPGRADE_COMMAND}`"
        )
    if found.state is SchemaState.AHEAD:
        return (
            f"the database {where} is at revision {found.revision}, which this edgefleet "
            f"(head {found.head}) does not know: a newer edgefleet upgraded it; run that "
            f"version (edgefleet never downgrades a database)"
        )
    return f"the database {where} is {found.state} at revision {found.revision}"


@dataclass(frozen=True)
class Upgraded:
    before: Status
    after: str
    applied: list[str]


def upgrade(engine: Engine) -> Upgraded:
    """Migrate the database to head: an empty one from the first revision; an unversioned
    one adopted at :data:`BASELINE` (refused, naming what is missing, unless it holds every
    table and column the baseline makes); a behind one from its revision. Each revision runs
    in the one transaction (PostgreSQL rolls a failed upgrade back whole). Serialised across
    processes on PostgreSQL (several servers starting on one new database)."""
    with engine.connect() as conn:
        _lock(conn)
        try:
            before = _status(conn)
            conn.rollback()  # the reads' transaction; the upgrade runs in its own
            if before.state is SchemaState.AHEAD:
                raise SchemaError(explain(before, engine))
            if before.state is SchemaState.CURRENT:
                return Upgraded(before, before.head, [])
            config = _config(conn)
            with conn.begin():
                if before.state is SchemaState.UNVERSIONED:
                    missing = missing_from_baseline(conn)
                    if missing:
                        raise SchemaError(
                            "this database predates the baseline schema and cannot be adopted: "
                            f"it lacks {', '.join(missing[:10])}"
                            + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
                            + "; start the edgefleet release that made it once more, or restore "
                            "a newer backup; nothing was changed"
                        )
                    command.stamp(config, BASELINE)
                command.upgrade(config, "head")
            return Upgraded(before, head(), before.pending)
        finally:
            _unlock(conn)


def missing_from_baseline(conn: Connection) -> list[str]:
    """``table`` or ``table.column`` for each table and column the baseline revision makes
    that the database lacks (the baseline is built in a scratch SQLite database to know)."""
    scratch = create_engine("sqlite://")
    try:
        with scratch.connect() as sconn, sconn.begin():
            command.upgrade(_config(sconn), BASELINE)
        want = inspect(scratch)
        have = inspect(conn)
        present = set(have.get_table_names())
        missing: list[str] = []
        for table in sorted(set(want.get_table_names()) - {"alembic_version"}):
            if table not in present:
                missing.append(table)
                continue
            columns = {c["name"] for c in have.get_columns(table)}
            missing += [
                f"{table}.{c['name']}" for c in want.get_columns(table) if c["name"] not in columns
            ]
        return missing
    finally:
        scratch.dispose()


def differences(engine: Engine) -> list[Any]:
    """What Alembic's autogenerate finds between the database and the declared tables
    (empty when they agree): the check that migrations make what the code declares."""
    from alembic.autogenerate import compare_metadata

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts=dict(COMPARE_OPTIONS))
        found: list[Any] = compare_metadata(context, target_metadata())
        return found


# Session-level (held from the status read through the upgrade's transaction), under the
# key advisory_lock would use.
_LOCK_KEY = advisory_key("schema")


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _LOCK_KEY})
        conn.commit()


def _unlock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        if conn.in_transaction():
            conn.rollback()
        conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _LOCK_KEY})
        conn.commit()


def drop_everything(engine: Engine) -> None:
    """Drop every edgefleet table and the revision record: for tests and benchmarks, each on
    a database of its own. Never called by the server or the command line."""
    target_metadata().drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
