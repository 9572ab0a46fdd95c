"""Desired-state acceptance: a refused document changes nothing — not the journal, not the
keyring it carries — and ``supersedes`` asks the same questions without changing anything."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.contracts.errors import BundleError
from edge_agent.lifecycle.acceptance import DesiredStateGate
from edge_agent.lifecycle.journal import Journal
from tests.factories import TestFleet


@pytest.fixture
def fleet() -> TestFleet:
    return TestFleet()


def _gate(tmp_path: Path, fleet: TestFleet) -> DesiredStateGate:
    return DesiredStateGate(
        "cam-1", Journal(tmp_path / "journal.json"), fleet.trust_store(tmp_path / "keyring.json")
    )


@pytest.mark.parametrize(
    ("case", "device", "expires_in", "reason"),
    [
        ("another device", "cam-2", timedelta(hours=1), "wrong_device"),
        ("expired", "cam-1", timedelta(seconds=-1), "desired_state_expired"),
    ],
)
def test_a_refused_document_does_not_install_its_keyring(
    tmp_path: Path,
    fleet: TestFleet,
    case: str,
    device: str,
    expires_in: timedelta,
    reason: str,
) -> None:
    gate = _gate(tmp_path, fleet)
    before = (tmp_path / "keyring.json").read_bytes()
    rotated = Ed25519PrivateKey.generate()
    newer = fleet.make_keyring({fleet.online: {}, rotated: {}}, version=2)
    doc = fleet.desired(device, 5, {}, keyring=newer, expires_in=expires_in)
    assert not gate.supersedes(doc)
    with pytest.raises(BundleError) as e:
        gate.accept(doc)
    assert e.value.reason == reason
    assert gate.trust.keyring.version == 1
    assert (tmp_path / "keyring.json").read_bytes() == before
    assert gate.journal.data.desired_seq == 0


def test_an_accepted_document_installs_its_keyring_and_seq(
    tmp_path: Path, fleet: TestFleet
) -> None:
    gate = _gate(tmp_path, fleet)
    newer = fleet.make_keyring({fleet.online: {}}, version=2)
    doc = fleet.desired("cam-1", 5, {}, keyring=newer)
    assert gate.supersedes(doc)
    assert gate.trust.keyring.version == 1  # asking changed nothing
    gate.accept(doc)
    assert gate.trust.keyring.version == 2 and gate.journal.data.desired_seq == 5
    assert not gate.supersedes(doc)  # the same document again is not newer
