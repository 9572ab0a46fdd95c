"""The msgspec base of the agent's messages (edge_agent/contracts/structs.py): patterns match
whole strings, errors name their field, copies are checked, and what comes from outside is
checked when it is decoded."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.bundle.manifest import FileEntry, ImagePreprocess
from edge_agent.contracts.structs import error_field
from edge_agent.lifecycle.journal import Journal
from edge_agent.protocol.desired import SlotAssignment
from edge_agent.protocol.enrollment import EnrollRequest, EnrollResponse
from edge_agent.protocol.lifecycle import SlotMode
from edge_agent.protocol.telemetry import TelemetryAck
from firmware_profiles import default_catalog

SLOT = {
    "model": "m",
    "version": "1",
    "bundle_sha256": "a" * 64,
    "bundle_url": "http://x",
    "size": 1,
}


@pytest.mark.parametrize(
    ("cls", "data"),
    [
        (SlotAssignment, {**SLOT, "bundle_sha256": "a" * 64 + "\n"}),
        (SlotAssignment, {**SLOT, "shadow_of": "clf\n"}),
        (EnrollRequest, {"token": "t", "device_id": "cam-1\n", "profile": "p"}),
        (TelemetryAck, {"stream": "0" * 16 + "\n", "acked_seq": 1}),
    ],
)
def test_a_pattern_matches_the_whole_string_not_up_to_a_final_newline(
    cls: type, data: dict[str, object]
) -> None:
    # Python's $ matches before a final newline; msgspec searches with Python's re.
    with pytest.raises(ValueError, match="matching regex"):
        cls.from_dict(data)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({**SLOT, "size": 0}, "size"),
        ({**SLOT, "size": "1"}, "size"),
        ({**SLOT, "colour": "red"}, "colour"),
        ({**SLOT, "mode": "shadow"}, ""),  # a rule of the whole struct
    ],
)
def test_errors_name_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError) as e:
        SlotAssignment.from_dict(data)
    assert error_field(e.value)[0] == field, str(e.value)


def test_nested_errors_name_the_path() -> None:
    x86 = default_catalog().get("x86-64-avx2").to_dict()
    x86["runtimes"][0]["precisions"] = ["int4"]
    with pytest.raises(ValueError) as e:
        type(default_catalog().get("x86-64-avx2")).from_dict(x86)
    assert error_field(e.value)[0] == "runtimes.0.precisions.0"


def test_a_copy_is_checked_like_a_new_struct_and_mode_follows_shadow_of() -> None:
    active = SlotAssignment.from_dict(SLOT)
    assert active.mode == SlotMode.ACTIVE
    shadow = active.replace(shadow_of="clf")
    assert shadow.mode == SlotMode.SHADOW and shadow.to_dict()["mode"] == "shadow"
    assert shadow.replace(shadow_of=None).mode == SlotMode.ACTIVE
    with pytest.raises(ValueError, match="shadow_of"):
        active.replace(mode=SlotMode.SHADOW)
    with pytest.raises(ValueError, match="unsafe path"):
        FileEntry(path="../etc/passwd", sha256="a" * 64, size=1)


def test_what_comes_from_outside_is_checked_when_decoded() -> None:
    given = {"input": "x", "size": [32, 32], "layout": "CHWN"}
    with pytest.raises(ValueError) as e:
        ImagePreprocess.from_dict(given)
    assert error_field(e.value)[0] == "layout"
    assert ImagePreprocess.from_dict({**given, "layout": "NHWC"}).size == (32, 32)


def test_replies_from_a_newer_server_keep_their_meaning() -> None:
    reply = {
        "device_id": "d", "profile": "p", "device_secret": "s", "server_url": "http://s",
        "mqtt_url": "mqtt://m", "root_public_key": "k", "mqtt_password": "pw",
        "added_in_a_later_version": 1,
    }  # fmt: skip
    assert EnrollResponse.from_dict(reply).device_secret == "s"


def test_a_journal_from_before_0_2_is_read(tmp_path: Path) -> None:
    path = tmp_path / "journal.json"
    path.write_text(
        '{"version": 1, "desired_seq": 3, "slots": {"clf": {"state": "FAILED", "error": '
        '{"reason": "download_failed", "message": "boom", "retry": "yes", "url": "http://x"}}}}'
    )
    record = Journal(path, owner=False).data.slots["clf"]
    assert record.error is not None and record.error.retryable
    assert record.error.reason == "download_failed" and record.error.detail == {"url": "http://x"}


def test_a_status_from_an_agent_before_0_2_is_read() -> None:
    from edge_agent.protocol.status import ReportedStatus

    old = (
        b'{"device_id": "cam-1", "profile": "x86-64-avx2", "agent_version": "0.1.0", '
        b'"reported_at": "2026-01-01T00:00:00Z", "slots": {"clf": {"state": "FAILED", '
        b'"error": {"reason": "bad_signature", "message": "no", "retry": "no"}}}}'
    )
    error = ReportedStatus.from_bytes(old).slots["clf"].error
    assert error is not None and error.reason == "bad_signature" and not error.retryable
    # Today's form is checked as before: an unknown field in it is refused.
    today = old.replace(b'"retry": "no"', b'"retryable": false, "oops": 1')
    with pytest.raises(ValueError, match="oops"):
        ReportedStatus.from_bytes(today)
