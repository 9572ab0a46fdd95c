"""Telemetry retention on SQLite and PostgreSQL, with time moved forward: aged minute rows
merged into hourly ones and those into daily ones, the figures every query reads unchanged
(counts summed, sketches merged exactly, drift histograms summed, devices counted once), the
last tier pruned, late rows merged at the next run, and the policy refused when it cannot
hold. The command line applies it as of a given time."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from edge_agent.contracts.errors import ConfigError
from edge_agent.telemetry.sketch import from_wire, new_sketch, quantile, to_wire
from fleet_server.database import make_engine
from fleet_server.schema import upgrade
from fleet_server.settings import Settings
from fleet_server.telemetry.query import totals
from fleet_server.telemetry.retention import RetentionPolicy, Tier, apply, row_count
from fleet_server.telemetry.tables import TelemetryDeviceBucket, TelemetryRollup

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
ROLLUPS = TelemetryRollup.__table__  # type: ignore[attr-defined]
DEVICES = TelemetryDeviceBucket.__table__  # type: ignore[attr-defined]
POLICY = RetentionPolicy.parse("7d,1h:90d,1d", 60)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(Settings(database_url=db_url).resolved_database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def _row(engine: Engine, at: datetime, device: str, latencies: list[float], *,
         errors: int = 0, drift: list[int] | None = None) -> None:  # fmt: skip
    sketch = new_sketch()
    for value in latencies:
        sketch.add(value)
    wire = to_wire(sketch)
    with engine.begin() as conn:
        conn.execute(insert(ROLLUPS).values(
            bucket_start=at, bundle_sha256="ab" * 32, model="clf", version="1.0.0",
            profile="x86-64-avx2", rollout_id="", role="active", requests=len(latencies),
            errors=errors, nonfinite=0, sampled=len(latencies), labelled=1, correct=1, late=0,
            latency_sketch=wire.to_dict() if wire else None,
            inputs={"x": {"kind": "float", "counts": [drift or [1, 2, 3]]}}, outputs={},
        ))  # fmt: skip
        conn.execute(insert(DEVICES).values(bucket_start=at, bundle_sha256="ab" * 32,
                                            device_id=device))  # fmt: skip


def _figures(engine: Engine) -> tuple[int, int, int, float | None, float | None, int, list[int]]:
    with Session(engine) as session:
        t = totals(session, "clf", version="1.0.0", rollout_id=None, since=None)
        devices = session.execute(
            select(func.count(func.distinct(DEVICES.c.device_id)))
        ).scalar_one()
        drift = np.zeros(3, np.int64)
        for (inputs,) in session.execute(select(ROLLUPS.c.inputs)):
            drift += np.asarray(inputs["x"]["counts"][0], np.int64)
    sketch = from_wire(t.latency) if t.latency else None
    p50 = quantile(sketch, 0.5) if sketch else None
    p95 = quantile(sketch, 0.95) if sketch else None
    return t.requests, t.errors, t.labelled, p50, p95, int(devices), drift.tolist()


def _starts(engine: Engine) -> list[tuple[datetime, int | None]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(ROLLUPS.c.bucket_start, ROLLUPS.c.resolution_s).order_by(ROLLUPS.c.bucket_start)
        ).all()
    return [(r[0].astimezone(UTC) if r[0].tzinfo else r[0].replace(tzinfo=UTC), r[1]) for r in rows]


def test_aged_rows_become_coarser_and_every_figure_stays(engine: Engine) -> None:
    old = (NOW - 10 * DAY).replace(hour=10, minute=0)
    _row(engine, old + timedelta(minutes=1), "cam-1", [1.0, 2.0, 3.0], errors=1)
    _row(engine, old + timedelta(minutes=2), "cam-2", [4.0, 5.0], drift=[0, 5, 0])
    _row(engine, old + timedelta(minutes=30), "cam-1", [6.0])
    _row(engine, old + timedelta(hours=1, minutes=5), "cam-1", [7.0, 8.0])
    _row(engine, NOW - DAY, "cam-3", [9.0])  # within 7 days: stays a minute row
    before = _figures(engine)
    assert before[:3] == (9, 1, 5) and before[5] == 3

    done = apply(engine, POLICY, NOW)
    assert (done.merged, done.written, done.spans) == (4, 2, 2)
    assert _figures(engine) == before  # counts, exact quantiles, devices, drift
    assert _starts(engine) == [
        (old, 3600), (old + timedelta(hours=1), 3600), (NOW - DAY, None),
    ]  # fmt: skip
    with engine.connect() as conn:
        devices = conn.execute(select(DEVICES.c.bucket_start, DEVICES.c.device_id)).all()
    assert len(devices) == 4  # cam-1 and cam-2 in the first hour, cam-1 in the next, cam-3
    assert apply(engine, POLICY, NOW).merged == 0  # again: nothing left to merge

    # A late batch for a merged hour: its own minute row, merged at the next run.
    _row(engine, old + timedelta(minutes=45), "cam-4", [10.0])
    late = _figures(engine)
    assert late[0] == 10 and late[5] == 4
    assert apply(engine, POLICY, NOW).merged == 1
    assert _figures(engine) == late
    assert [s for s, _ in _starts(engine)].count(old) == 1

    # 100 days on: every row is older than 90 days; all become daily rows (the last minute
    # row by way of an hourly one).
    later = NOW + 100 * DAY
    apply(engine, POLICY, later)
    assert _figures(engine) == late
    day = old.replace(hour=0, minute=0)
    assert _starts(engine) == [(day, 86400), ((NOW - DAY).replace(hour=0), 86400)]
    with engine.connect() as conn:
        first_day = conn.execute(
            select(func.count()).select_from(DEVICES).where(DEVICES.c.bucket_start < day + DAY)
        ).scalar_one()
    assert first_day == 3  # cam-1, cam-2 and cam-4 once each


def test_the_last_tier_is_pruned_past_its_keep(engine: Engine) -> None:
    policy = RetentionPolicy.parse("7d,1h:30d", 60)
    _row(engine, NOW - 40 * DAY, "cam-1", [1.0])
    _row(engine, NOW - 10 * DAY, "cam-1", [2.0])
    _row(engine, NOW - DAY, "cam-1", [3.0])
    done = apply(engine, policy, NOW)
    assert done.pruned == 1 and done.merged == 2  # 40 days: merged, then pruned past 30
    assert _figures(engine)[0] == 2
    assert row_count(engine) == {"rollups": 2, "device_buckets": 2}


def test_a_policy_that_cannot_hold_is_refused_naming_the_setting() -> None:
    assert RetentionPolicy.parse("7d,1h:90d,1d", 60).tiers == (
        Tier(60, 7 * 86400), Tier(3600, 90 * 86400), Tier(86400, None),
    )  # fmt: skip
    assert RetentionPolicy.parse("forever", 60).tiers == (Tier(60, None),)
    for text, needle in (
        ("", "is empty"),
        ("7 days", "not a duration"),
        ("7d,90s:1d", "multiple of the one before"),
        ("7d,1h,1d:5y", "only the last tier"),
        ("30m,1h", "kept at least as long"),
        ("7d,0h:1d", "not a duration"),
    ):
        with pytest.raises(ConfigError, match=needle) as e:
            RetentionPolicy.parse(text, 60)
        assert "EDGEFLEET_TELEMETRY_RETENTION" in e.value.message


def test_the_command_applies_the_policy_as_of_a_later_time(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'edgefleet.db'}"
    engine = make_engine(url)
    try:
        upgrade(engine)
        _row(engine, NOW - DAY, "cam-1", [1.0])
    finally:
        engine.dispose()
    env = {**os.environ, "EDGEFLEET_DATABASE_URL": url, "EDGEFLEET_DATA_DIR": str(tmp_path)}

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "from fleet_server.cli import main; main()", "telemetry",
             "retention", *args], capture_output=True, text=True, timeout=120,
            env={**env, **extra}, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    shown = run()
    assert shown.returncode == 0 and "rollup rows 1 → 1" in shown.stdout, shown.stderr
    done = run("--apply", "--now", (NOW + 10 * DAY).isoformat())
    assert done.returncode == 0, done.stderr
    assert "merged 1 rollup rows into 1 over 1 coarse buckets" in done.stdout
    bad = run(EDGEFLEET_TELEMETRY_RETENTION="1h,90s")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "error: EDGEFLEET_TELEMETRY_RETENTION: each resolution must be a multiple of the one "
        "before (90 s after 60 s)"
    ]
