"""The schema's migrations (fleet_server/schema), on SQLite and PostgreSQL: they make exactly
the tables the code declares; a database made before migrations (by ``create_all``, with the
old NOT NULL on a rollout target's bundle) is adopted and upgraded with its data intact; the
server refuses a database that is behind or ahead, naming what to run; nothing is changed by
a refused upgrade."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import MetaData, Table, inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from fleet_server import schema
from fleet_server.bundles.tables import Bundle
from fleet_server.database import make_engine
from fleet_server.devices.service import desired_summaries
from fleet_server.devices.tables import DesiredStateRecord, Device
from fleet_server.registry.service import get_version_public
from fleet_server.registry.tables import MLModel, ModelVersion
from fleet_server.rollouts.tables import Rollout, RolloutTarget
from fleet_server.settings import Settings

NOW = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(Settings(database_url=db_url).resolved_database_url)
    yield engine
    engine.dispose()


def _revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        if "alembic_version" not in inspect(conn).get_table_names():
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one_or_none()


def _made_before_migrations(engine: Engine) -> None:
    """What edgefleet made at start-up before migrations: the baseline's tables (``create_all``
    then), no revision, and on a database from before the rollout engine,
    ``rollout_targets.bundle_sha256`` NOT NULL."""
    with engine.connect() as conn, conn.begin():
        command.upgrade(schema._config(conn), schema.BASELINE)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
        if conn.dialect.name == "postgresql":
            conn.execute(
                text("ALTER TABLE rollout_targets ALTER COLUMN bundle_sha256 SET NOT NULL")
            )
            return
        # SQLite cannot alter a column: the (empty) table is made again as it was then.
        ddl = {name: sql for name, sql in conn.execute(text(
            "SELECT name, sql FROM sqlite_master WHERE tbl_name = 'rollout_targets'"))}  # fmt: skip
        conn.execute(text("DROP TABLE rollout_targets"))
        old = ddl.pop("rollout_targets").replace(
            "bundle_sha256 VARCHAR(64),", "bundle_sha256 VARCHAR(64) NOT NULL,"
        )
        assert "NOT NULL," in old
        conn.execute(text(old))
        for sql in ddl.values():
            if sql:  # an index (autoindexes have none)
                conn.execute(text(sql))


def _insert(conn: Any, *rows: Any) -> None:
    """Rows written as the older code wrote them: into the tables the database has (reflected),
    each column the table has from the model object's value."""
    metadata = MetaData()
    for row in rows:
        table = Table(row.__tablename__, metadata, autoload_with=conn)
        values = {c.name: getattr(row, c.name) for c in table.columns if hasattr(row, c.name)}
        conn.execute(table.insert().values({k: v for k, v in values.items()
                                            if not (k == "id" and v is None)}))  # fmt: skip


def _fill(engine: Engine) -> None:
    with engine.begin() as conn:
        _insert(
            conn,
            Device(id="old-1", profile="x86-64-avx2", labels={"site": "a"}, secret_hash="h",
                   enrolled_at=NOW),
            MLModel(id=1, name="clf", created_at=NOW),
            ModelVersion(id=1, model_id=1, version="1.0.0", source_sha256="0" * 64, size=1,
                         filename="m.onnx", opset=17, ir_version=8, inputs=[], outputs=[],
                         created_at=NOW, created_by="admin"),
            Rollout(id="r-old", model_version_id=1, slot="default", created_at=NOW,
                    created_by="admin"),
            Bundle(sha256="b" * 64, profile="x86-64-avx2", runtime="onnxruntime",
                   precision="fp32", signing_key_id="k1", size=10, created_at=NOW,
                   manifest={"files": []}, model_version_id=1, cache_key="c" * 64),
            RolloutTarget(rollout_id="r-old", device_id="old-1", bundle_sha256="b" * 64,
                          desired_seq=7, note="kept"),
        )  # fmt: skip
        # A document stored by an older server: no expiry beside it.
        document = {"signed": {"expires_at": "2027-01-01T00:00:00Z", "slots": {}},
                    "keyring": {"signed": {"version": 3}}}  # fmt: skip
        conn.execute(
            text("INSERT INTO desired_states (device_id, seq, document, updated_at) "
                 "VALUES ('old-1', 7, :doc, :at)"),
            {"doc": json.dumps(document), "at": NOW},
        )  # fmt: skip


def test_migrations_make_exactly_the_tables_the_code_declares(engine: Engine) -> None:
    before = schema.status(engine)
    assert before.state is schema.SchemaState.EMPTY
    done = schema.upgrade(engine)
    assert done.applied == before.pending  # every revision, oldest first
    assert done.applied[0] == schema.BASELINE and done.after == schema.head()
    assert _revision(engine) == schema.head()
    assert schema.differences(engine) == []
    assert schema.upgrade(engine).applied == []  # at head: nothing to do
    # The comparison can fail: a missing index is a difference.
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_rollouts_state"))
    assert any(d[0] == "add_index" for d in schema.differences(engine))


def test_a_database_made_before_migrations_upgrades_with_its_data(engine: Engine) -> None:
    _made_before_migrations(engine)
    _fill(engine)
    nullable = {c["name"]: c["nullable"] for c in inspect(engine).get_columns("rollout_targets")}
    assert nullable["bundle_sha256"] is False  # the old NOT NULL is there

    found = schema.status(engine)
    assert found.state is schema.SchemaState.UNVERSIONED
    with pytest.raises(schema.SchemaError, match="edgefleet db upgrade"):
        schema.check_for_start(engine)  # the server refuses it, and changes nothing
    assert _revision(engine) is None

    done = schema.upgrade(engine)
    assert done.before.state is schema.SchemaState.UNVERSIONED
    assert done.applied == found.pending and schema.BASELINE not in done.applied
    assert _revision(engine) == schema.head()
    assert schema.differences(engine) == []
    with Session(engine) as session:
        device = session.get(Device, "old-1")
        assert device is not None and device.labels == {"site": "a"}
        record = session.get(DesiredStateRecord, "old-1")
        assert record is not None and record.seq == 7 and record.expires_at is None
        old = get_version_public(session, "clf", "1.0.0")
        assert (old.card, old.meta, old.parents) == ("", {}, [])
        summary = desired_summaries(session, ["old-1"])["old-1"]
        assert summary.seq == 7 and summary.keyring_version == 3
        assert summary.expires_at == datetime(2027, 1, 1, tzinfo=UTC)
        # The targets' table was copied on SQLite: its row is intact.
        kept = session.exec(select(RolloutTarget)).one()
        assert (kept.bundle_sha256, kept.desired_seq, kept.note) == ("b" * 64, 7, "kept")
        # What the NOT NULL refused: a target with no bundle (rolled back to nothing).
        kept.bundle_sha256 = None
        session.add(kept)
        session.commit()
        session.refresh(kept)
        assert kept.bundle_sha256 is None
    assert schema.check_for_start(engine).state is schema.SchemaState.CURRENT


def test_a_database_missing_baseline_columns_is_refused_and_left_as_it_was(
    engine: Engine,
) -> None:
    _made_before_migrations(engine)
    with engine.begin() as conn:
        conn.execute(text('ALTER TABLE rollouts DROP COLUMN "plan"'))
    with pytest.raises(schema.SchemaError, match=r"lacks rollouts\.plan.*nothing was changed"):
        schema.upgrade(engine)
    assert _revision(engine) is None
    assert "plan" not in {c["name"] for c in inspect(engine).get_columns("rollouts")}


def test_the_server_refuses_a_database_behind_or_ahead(engine: Engine) -> None:
    with engine.connect() as conn, conn.begin():
        command.upgrade(schema._config(conn), schema.BASELINE)
    behind = schema.status(engine)
    assert behind.state is schema.SchemaState.BEHIND and behind.revision == schema.BASELINE
    with pytest.raises(schema.SchemaError, match=r"behind .*edgefleet db upgrade"):
        schema.check_for_start(engine)
    assert _revision(engine) == schema.BASELINE  # refused: not upgraded behind one's back
    assert schema.upgrade(engine).applied == behind.pending

    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    assert schema.status(engine).state is schema.SchemaState.AHEAD
    for refused in (schema.check_for_start, schema.upgrade):
        with pytest.raises(schema.SchemaError, match="newer edgefleet"):
            refused(engine)
    assert _revision(engine) == "9999"


@pytest.mark.postgres
def test_servers_starting_together_on_a_new_database_migrate_it_once(
    engine: Engine, db_url: str
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("one server process serves a SQLite database")
    errors: list[BaseException] = []

    def start() -> None:
        own = make_engine(Settings(database_url=db_url).resolved_database_url)
        try:
            schema.check_for_start(own)
        except BaseException as e:
            errors.append(e)
        finally:
            own.dispose()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert _revision(engine) == schema.head() and schema.differences(engine) == []


def _edgefleet(*args: str, db: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EDGEFLEET_DATABASE_URL": db, "EDGEFLEET_DATA_DIR": str(data_dir),
           "EDGEFLEET_ADMIN_TOKEN": "efa_" + "x" * 40, "COLUMNS": "200"}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-c", "from fleet_server.cli import main; main()", *args],
        capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_the_cli_upgrades_and_serve_refuses_a_database_before_it(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(db)
    try:
        _made_before_migrations(engine)
        _fill(engine)
    finally:
        engine.dispose()

    refused = _edgefleet("serve", "--port", "0", db=db, data_dir=tmp_path / "data")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "edgefleet db upgrade" in last, refused.stderr

    status = _edgefleet("db", "status", db=db, data_dir=tmp_path / "data")
    assert status.returncode == 1 and "unversioned" in status.stdout, status.stdout

    done = _edgefleet("db", "upgrade", db=db, data_dir=tmp_path / "data")
    assert done.returncode == 0, done.stderr
    assert f"to {schema.head()} (adopted a database made before migrations)" in done.stdout

    again = _edgefleet("db", "status", "--json", db=db, data_dir=tmp_path / "data")
    assert again.returncode == 0 and json.loads(again.stdout)["state"] == "current"
