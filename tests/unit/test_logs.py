import json
import logging

import pytest

from edge_agent.logs import JsonFormatter


def test_json_lines_carry_the_message_fields_and_exceptions() -> None:
    record = logging.LogRecord(
        "edge_agent.x", logging.WARNING, "f.py", 1, "slot %s: %s", ("clf", "FAILED"), None
    )
    record.slot = "clf"
    doc = json.loads(JsonFormatter().format(record))
    assert doc["level"] == "warning" and doc["logger"] == "edge_agent.x"
    assert (
        doc["msg"] == "slot clf: FAILED" and doc["slot"] == "clf" and doc["ts"].endswith("+00:00")
    )
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, "f.py", 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record))["exc"]


def test_configure_json_writes_one_object_per_line(capfd: pytest.CaptureFixture[str]) -> None:
    from edge_agent.logs import configure

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure("INFO", "json")
        logging.getLogger("edge_agent.test").info("serving on %s", "unix:///x")
        logging.getLogger("edge_agent.test").debug("not shown at INFO")
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    lines = [
        json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")
    ]
    assert [d["msg"] for d in lines] == ["serving on unix:///x"]
