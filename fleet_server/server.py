"""Running the server: ``edgefleet serve`` in the foreground, or a whole embedded stack
(broker + API) in a background thread for the demo, tests and benchmarks."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from pathlib import Path

import uvicorn

from edge_agent.contracts.errors import ConfigError
from fleet_server.app import create_app
from fleet_server.artifacts import open_store
from fleet_server.broker import EmbeddedBroker, free_port
from fleet_server.database import make_engine
from fleet_server.heap import settle
from fleet_server.schema import SchemaState, check_for_start
from fleet_server.settings import Settings

log = logging.getLogger(__name__)


def prepare_database(settings: Settings) -> None:
    """Before anything starts: create the schema of a new database, or refuse one that is
    behind (or ahead of) this code's migrations with a :class:`~fleet_server.schema.SchemaError`
    that names the command to run; and refuse an artifact store that cannot be used."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)  # the SQLite file's directory
    # First, so that a refused start leaves a new database as it was: a bucket that is missing
    # or refuses these credentials stops the start here, in one line.
    open_store(settings).check()
    engine = make_engine(settings.resolved_database_url)
    try:
        found = check_for_start(engine)
    finally:
        engine.dispose()
    if found.state is SchemaState.EMPTY:
        log.info("created the database schema at revision %s", found.head)


def serve(settings: Settings) -> None:
    """Serve until interrupted; start and stop the embedded broker around it if needed."""
    # uvicorn shuts down gracefully on SIGTERM and then re-raises it; with the default handler
    # the process would die right there, before the broker below is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    prepare_database(settings)
    broker = None
    mqtt_url = settings.mqtt_url
    if mqtt_url is None:
        broker = EmbeddedBroker(settings.data_dir / "broker", port=settings.broker_port).start()
        mqtt_url = broker.url
        print(f"embedded {broker.backend} broker on {mqtt_url} (development only)")
    try:
        app = create_app(settings, mqtt_url)
        settle()
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level="info",
        )
    finally:
        if broker is not None:
            broker.stop()


class EmbeddedStack:
    """Broker (unless ``settings.mqtt_url`` is set) + API server in a thread, on free ports."""

    def __init__(self, settings: Settings) -> None:
        port = settings.port or free_port()
        # In one process unless asked otherwise: tests, the demo and benchmarks read its
        # counters and start and stop it many times.
        self.settings = settings.model_copy(
            update={"port": port, "ingest_processes": settings.ingest_processes or 0}
        )
        self.broker: EmbeddedBroker | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return self.settings.resolved_public_url

    @property
    def mqtt_url(self) -> str:
        if self.settings.mqtt_url:
            return self.settings.mqtt_url
        assert self.broker is not None
        return self.broker.url

    @property
    def admin_token(self) -> str:
        if self.settings.admin_token is not None:
            return self.settings.admin_token.get_secret_value()
        return Path(self.settings.admin_token_file).read_text().strip()

    def start(self, timeout_s: float = 30.0) -> EmbeddedStack:
        prepare_database(self.settings)
        if self.settings.mqtt_url is None:
            self.broker = EmbeddedBroker(
                self.settings.data_dir / "broker", port=self.settings.broker_port or free_port()
            ).start()
        config = uvicorn.Config(
            create_app(self.settings, self.mqtt_url),
            host=self.settings.host,
            port=self.settings.port,
            log_level="warning",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="edgefleet-api", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(f"the API server did not start on port {self.settings.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self.broker is not None:
            self.broker.stop()

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
