"""Fixtures the unit tests of bundles share: a test fleet's keys, a real signed bundle of the
session's sample model, and a trust store holding the fleet's keyring."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.trust import TrustStore
from tests.factories import TestFleet, make_bundle


@pytest.fixture(scope="module")
def fleet() -> TestFleet:
    return TestFleet()


@pytest.fixture(scope="module")
def bundle(model_path: Path, tmp_path_factory: pytest.TempPathFactory, fleet: TestFleet) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "b.efb"
    make_bundle(model_path, out, fleet=fleet)
    return out


@pytest.fixture
def trust(tmp_path: Path, fleet: TestFleet) -> TrustStore:
    return fleet.trust_store(tmp_path / "keys" / "keyring.json")
