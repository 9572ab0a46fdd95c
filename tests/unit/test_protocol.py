from datetime import UTC, datetime, timedelta

import pytest

from edge_agent.contracts.errors import DesiredStateError
from edge_agent.protocol import (
    DesiredState,
    SignedDesiredState,
    SlotAssignment,
    Topics,
    parse_device_topic,
)

SHA = "a" * 64


def _doc(**kw: object) -> DesiredState:
    now = datetime.now(UTC)
    base = dict(
        device_id="cam-01",
        seq=3,
        issued_at=now,
        expires_at=now + timedelta(days=1),
        slots={
            "det": SlotAssignment(
                model="det",
                version="1.0.0",
                bundle_sha256=SHA,
                bundle_url="http://x/v1/bundles/" + SHA,
                size=10,
            )
        },
    )
    base.update(kw)
    return DesiredState.from_dict(base)


def test_topics_follow_the_design() -> None:
    t = Topics("cam-01")
    assert t.desired == "edgefleet/v1/devices/cam-01/desired"
    assert t.status.endswith("/cam-01/status") and t.online.endswith("/cam-01/online")
    assert Topics.all_devices("status") == "edgefleet/v1/devices/+/status"
    assert parse_device_topic(t.telemetry) == ("cam-01", "telemetry")
    assert parse_device_topic("edgefleet/v1/devices/cam-01/other") is None
    assert parse_device_topic("elsewhere/cam-01/status") is None


@pytest.mark.parametrize("bad", ["", "Cam", "a/b", "a+b", "a#", "x" * 64])
def test_device_ids_that_would_break_topics_or_acls_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        Topics(bad)


def test_envelope_roundtrip_and_expiry() -> None:
    env = SignedDesiredState(signed=_doc())
    again = SignedDesiredState.from_bytes(env.to_bytes())
    assert again == env
    past = _doc(expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert past.is_expired() and not env.signed.is_expired()


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"{}", b'{"signed": {"device_id": "x"}}', "é".encode("latin-1")],
)
def test_malformed_documents_raise_desired_state_error(payload: bytes) -> None:
    with pytest.raises(DesiredStateError) as e:
        SignedDesiredState.from_bytes(payload)
    assert e.value.reason == "desired_state_malformed"


def test_slot_names_are_checked() -> None:
    with pytest.raises(ValueError):
        _doc(slots={"Bad Slot": _doc().slots["det"]})
