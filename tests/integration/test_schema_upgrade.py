"""A database created by an older edgefleet gains the columns added since, at start-up, on
SQLite and PostgreSQL; its rows keep their data, and code that needs a new column's value
falls back to what the row already held."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from sqlalchemy import inspect, text
from sqlmodel import Session

from fleet_server.app import create_tables
from fleet_server.database import make_engine
from fleet_server.devices.service import desired_summaries
from fleet_server.devices.tables import DesiredStateRecord, Device
from fleet_server.registry.service import get_version_public
from fleet_server.registry.tables import MLModel, ModelVersion
from fleet_server.settings import Settings

DROPPED = {
    "rollout_targets": ["phase", "previous", "error"],
    "desired_states": ["expires_at", "keyring_version"],
    "model_versions": ["card", "meta", "parents"],
    "telemetry_rollups": ["labelled", "correct", "late"],
    "rollouts": ["plan", "state", "stage", "cohort", "awaiting", "evidence_waived_stage"],
}


def test_columns_added_since_a_database_was_created_are_added(db_url: str) -> None:
    engine = make_engine(Settings(database_url=db_url).resolved_database_url)
    try:
        assert create_tables(engine) == []  # a new database: nothing to add
        with Session(engine) as session:
            session.add(Device(id="old-1", profile="x86-64-avx2", labels={}, secret_hash="h",
                               enrolled_at=datetime.now(UTC)))  # fmt: skip
            session.add(MLModel(id=1, name="clf", created_at=datetime.now(UTC)))
            session.flush()
            session.add(ModelVersion(model_id=1, version="1.0.0", source_sha256="0" * 64, size=1,
                                     filename="m.onnx", opset=17, ir_version=8, inputs=[],
                                     outputs=[], created_at=datetime.now(UTC),
                                     created_by="admin"))  # fmt: skip
            session.commit()
        with engine.begin() as conn:
            conn.execute(text("DROP INDEX ix_rollouts_state"))
            for table, columns in DROPPED.items():
                for column in columns:
                    conn.execute(text(f'ALTER TABLE {table} DROP COLUMN "{column}"'))
            # A document stored by the older server: no expiry beside it.
            document = {"signed": {"expires_at": "2027-01-01T00:00:00Z", "slots": {}},
                        "keyring": {"signed": {"version": 3}}}  # fmt: skip
            conn.execute(
                text("INSERT INTO desired_states (device_id, seq, document, updated_at) "
                     "VALUES ('old-1', 7, :doc, :at)"),
                {"doc": json.dumps(document), "at": datetime.now(UTC)},
            )  # fmt: skip
        added = create_tables(engine)
        assert sorted(added) == sorted(f"{t}.{c}" for t, cs in DROPPED.items() for c in cs)
        inspector = inspect(engine)
        for table, columns in DROPPED.items():
            assert set(columns) <= {c["name"] for c in inspector.get_columns(table)}, table
        assert "ix_rollouts_state" in {i["name"] for i in inspector.get_indexes("rollouts")}
        assert create_tables(engine) == []  # idempotent
        with Session(engine) as session:
            record = session.get(DesiredStateRecord, "old-1")
            assert record is not None and record.seq == 7 and record.expires_at is None
            # A version pushed before cards and lineage reads as having none.
            old = get_version_public(session, "clf", "1.0.0")
            assert (old.card, old.meta, old.parents) == ("", {}, [])
            summary = desired_summaries(session, ["old-1"])["old-1"]
            assert summary.seq == 7 and summary.keyring_version == 3
            assert summary.expires_at == datetime(2027, 1, 1, tzinfo=UTC)
    finally:
        engine.dispose()
