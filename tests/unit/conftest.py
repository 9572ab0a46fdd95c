"""Fixtures the unit tests share: a test fleet's keys, a real signed bundle of the session's
sample model, a trust store holding the fleet's keyring, and the local API over real HTTP in
front of the module's ``table`` fixture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.serving import InferenceHTTPServer, SlotTable, start_http
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


@pytest.fixture
def server(table: SlotTable) -> Iterator[InferenceHTTPServer]:
    """The local API on a free port, serving the test module's ``table``."""
    srv, _ = start_http(table, "127.0.0.1", 0)
    yield srv
    srv.shutdown()
    srv.server_close()
