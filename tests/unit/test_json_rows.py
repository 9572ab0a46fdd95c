"""The JSON text PostgreSQL's ``json_to_recordset`` statements read (status reports, telemetry
upserts): what a device may put in a row must not fail the statement or change a figure."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

from fleet_server.database import json_rows


def test_rows_keep_their_values_and_datetimes_read_back_as_the_same_instant() -> None:
    at = datetime(2026, 12, 7, 15, 0, 0, 123, tzinfo=UTC)
    paris = datetime(2026, 1, 1, tzinfo=timezone(timedelta(hours=1)))
    rows = [{"at": at, "other": paris, "n": 3, "x": 1e-7, "s": "é ✓", "j": {"k": [1, None]}}]
    [back] = json.loads(json_rows(rows))
    assert datetime.fromisoformat(back["at"]) == at
    assert datetime.fromisoformat(back["other"]) == paris
    assert back["n"] == 3 and back["x"] == 1e-7 and back["s"] == "é ✓"
    assert back["j"] == {"k": [1, None]}


def test_nul_is_dropped_and_nan_becomes_null_rather_than_failing_the_statement() -> None:
    text = json_rows([{"s": "nul \x00 inside", "k": {"a\x00b": ["x\x00"]}, "v": float("nan")}])
    assert "\\u0000" not in text
    assert json.loads(text) == [{"s": "nul  inside", "k": {"ab": ["x"]}, "v": None}]
