"""Shared fixtures.

- ``broker``: a private Mosquitto on a free port for the whole session (installed with apt
  when missing and we are root); tests never touch a broker someone else started.
- ``db_url``: every database test runs on SQLite, and again on PostgreSQL when
  ``EDGEFLEET_TEST_POSTGRES_URL`` is set (``.ci/run`` sets it to a fresh database).
- ``stack``: the real API server (uvicorn in a thread) on that broker and database.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from converters.onnx.samples import mlp_classifier
from fleet_server.broker import EmbeddedBroker
from fleet_server.client import ApiClient
from fleet_server.database import make_engine
from fleet_server.schema import drop_everything
from fleet_server.server import EmbeddedStack
from fleet_server.settings import Settings

ADMIN_TOKEN = "efa_test-admin-token-0123456789abcdef0123456789"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first: with ``--dist load`` the workers start the long ones early, and the
    run ends on short tests instead of one long test running alone while the others idle."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_collection_finish(session: pytest.Session) -> None:
    """A test process runs servers, brokers' clients and agents' clients in threads: like a
    server process (``fleet_server.heap``), it settles the collector once start-up (imports,
    collection) is done, so collections stop walking the hundreds of thousands of objects
    that live as long as it does."""
    from fleet_server.heap import settle

    settle()


def _worker_database(url: str | None) -> str | None:
    """Under pytest-xdist each worker gets a database of its own (``<name>_gw0``, …): the
    database tests start from an empty schema, and two workers would empty each other's."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not url or not worker:
        return url
    import psycopg

    parts = urlsplit(url)
    name = f"{parts.path.lstrip('/')}_{worker}"
    with psycopg.connect(urlunsplit(parts._replace(path="/postgres")), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(parts._replace(path=f"/{name}"))


POSTGRES_URL = _worker_database(os.environ.get("EDGEFLEET_TEST_POSTGRES_URL"))
# Converter toolchains (onnx2tf for TFLite) live in the checkout; scripts/test.sh installs them.
os.environ.setdefault(
    "EDGEFLEET_TOOLCHAIN_DIR", str(Path(__file__).resolve().parent.parent / ".toolchains")
)


def _ensure_mosquitto() -> None:
    if shutil.which("mosquitto"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "mosquitto"], check=True, env=env)
    if not shutil.which("mosquitto"):
        pytest.fail("mosquitto is needed for the integration tests: apt-get install mosquitto")


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    _ensure_mosquitto()
    with EmbeddedBroker(tmp_path_factory.mktemp("mosquitto"), backend="mosquitto") as b:
        yield b


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'edgefleet.db'}"
    if not POSTGRES_URL:
        pytest.skip("EDGEFLEET_TEST_POSTGRES_URL is not set (CI sets it)")
    engine = make_engine(Settings(database_url=POSTGRES_URL).resolved_database_url)
    drop_everything(engine)  # each test starts from an empty database
    engine.dispose()
    return POSTGRES_URL


@pytest.fixture
def settings(tmp_path: Path, db_url: str, broker: EmbeddedBroker) -> Settings:
    return Settings(
        data_dir=tmp_path / "server",
        database_url=db_url,
        mqtt_url=broker.url,
        port=0,
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        desired_resend_interval_s=0.2,
    )


@pytest.fixture
def stack(settings: Settings) -> Iterator[EmbeddedStack]:
    with EmbeddedStack(settings) as s:
        yield s


@pytest.fixture
def private_stack(tmp_path: Path) -> Iterator[EmbeddedStack]:
    """A server (SQLite) with a broker of its own, for tests that restart the broker."""
    settings = Settings(
        data_dir=tmp_path / "server",
        port=0,
        broker_port=0,
        admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        desired_resend_interval_s=0.2,
    )
    with EmbeddedStack(settings) as stack:
        yield stack


@pytest.fixture
def api(stack: EmbeddedStack) -> Iterator[ApiClient]:
    client = ApiClient(stack.url, ADMIN_TOKEN)
    yield client
    client.close()


@pytest.fixture
def uid() -> str:
    """A short id unique to this test, for device ids and so for MQTT topics: tests share one
    broker, and retained messages outlive the test that published them."""
    import uuid

    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mlp_classifier(tmp_path_factory.mktemp("models") / "classifier.onnx", seed=3)


@pytest.fixture(scope="session")
def model_v2_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mlp_classifier(tmp_path_factory.mktemp("models") / "classifier-v2.onnx", seed=4)
