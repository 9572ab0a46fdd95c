"""Ingest processes: status, presence and telemetry reports stored by processes of their own.

``edgefleet serve`` starts ``ingest_processes`` of them beside the API (``edgefleet ingest``
runs one more, on any host). Each is a member of the ``$share/`` groups with an MQTT
identity of its own, so the broker hands every report to one of them and the API process's
interpreter is left to the REST API and the rollout engine: at 10,000 devices the reports of
one rollout (~10 per device) and the engine's steps no longer take turns on one GIL.

An ingest process re-sends stored documents to devices that report an older ``seq`` (it holds
the server's keys for that, as the API process does) and tells the API process that reports
arrived by writing a byte to a pipe it inherited (``wake_fd``), so the engine steps at once.
It ends with its parent (``die_with_parent``); the parent starts a new one if it ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from edge_agent.contracts.errors import ConfigError
from edge_agent.contracts.lifetime import die_with_parent
from fleet_server.artifacts import open_store
from fleet_server.auth.broker_acl import INGEST_IDENTITIES, ingest_identity
from fleet_server.control.connection import TlsFiles
from fleet_server.control.plane import ControlPlane
from fleet_server.database import make_engine
from fleet_server.heap import settle
from fleet_server.keys.service import ServerKeys
from fleet_server.settings import Settings
from fleet_server.telemetry.service import TelemetryService

__all__ = ["IngestSupervisor", "identity", "run"]

log = logging.getLogger(__name__)


def identity(settings: Settings, index: int) -> tuple[TlsFiles, tuple[str, str] | None, str]:
    """Ingest process ``index``'s MQTT identity: (TLS files, credentials, client id name).
    From ``mqtt_ingest_dir`` when set; else the server's own (a broker that forces the client
    id to the identity's name allows one connection per identity: give them their own)."""
    tls: TlsFiles = (settings.mqtt_ca_file, settings.mqtt_cert_file, settings.mqtt_key_file)
    credentials = (
        (settings.mqtt_username, settings.mqtt_password.get_secret_value())
        if settings.mqtt_username and settings.mqtt_password
        else None
    )
    name = f"ingest-{index}"
    own = settings.mqtt_ingest_dir
    if own is None:
        return tls, credentials, name
    cert, key = own / f"{name}-client.crt", own / f"{name}-client.key"
    password = own / f"{name}.password"
    if cert.is_file() and key.is_file():
        return (settings.mqtt_ca_file, cert, key), None, name
    if password.is_file():
        credentials = (ingest_identity(index), password.read_text().strip())
        return (settings.mqtt_ca_file, None, None), credentials, name
    raise ConfigError(
        f"no MQTT identity for ingest process {index} in {own} (edgefleet broker-config "
        f"writes ingest-1 … ingest-{INGEST_IDENTITIES}); run fewer ingest processes"
    )


def run(
    settings: Settings,
    mqtt_url: str,
    index: int,
    *,
    wake_fd: int | None = None,
    status: bool = True,
) -> None:
    """Ingest until SIGTERM or SIGINT. ``status``: status and presence too (False: telemetry
    only, ``edgefleet telemetry ingest``)."""
    if wake_fd is not None:
        die_with_parent()
        os.set_blocking(wake_fd, False)
    tls, credentials, name = identity(settings, index)
    engine = make_engine(settings.resolved_database_url)
    telemetry = TelemetryService(
        engine,
        open_store(settings),
        bucket_s=settings.telemetry_bucket_s,
        window_s=settings.telemetry_window_s,
    )
    control = ControlPlane(
        engine,
        mqtt_url,
        keys=ServerKeys(settings.keys_dir),
        device_mqtt_url=settings.device_mqtt_url,
        desired_ttl_s=settings.desired_state_ttl_s,
        resend_interval_s=settings.desired_resend_interval_s,
        tls=tls,
        credentials=credentials,
        status_per_s=settings.status_rate_per_s,
        status_burst=settings.status_burst,
        registry=telemetry.registry,
        ingest=status,
        name=name,
    )
    if wake_fd is not None:
        control.on_report = _waker(wake_fd)
    telemetry.start_ingest(control=control)
    control.start()
    settle()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info("ingest process %d on %s (status: %s)", index, mqtt_url, status)
    stop.wait()
    control.stop()
    telemetry.stop()
    engine.dispose()


def _waker(fd: int) -> Callable[[], None]:
    def wake() -> None:
        # A full pipe means the API process has wake-ups enough to read; a closed one, that
        # it is gone (die_with_parent ends this process then): neither is worth more.
        with contextlib.suppress(OSError):
            os.write(fd, b"w")

    return wake


class IngestSupervisor:
    """Starts ``n`` ingest processes (``python -m fleet_server.ingest``) and starts again any
    that ends, until stopped; calls ``on_report`` when one of them stored reports."""

    def __init__(
        self, settings: Settings, mqtt_url: str, n: int, on_report: Callable[[], None]
    ) -> None:
        self._settings, self._mqtt_url, self._n = settings, mqtt_url, n
        self._on_report = on_report
        self._read, self._write = os.pipe()
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        for index in range(1, n + 1):
            identity(settings, index)  # a missing identity is refused before anything starts

    def start(self) -> IngestSupervisor:
        for index in range(1, self._n + 1):
            self._spawn(index)
        for target, name in ((self._watch, "supervise"), (self._relay, "wake")):
            thread = threading.Thread(target=target, name=f"edgefleet-ingest-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        for p in self._processes.values():
            p.send_signal(signal.SIGTERM)
        for p in self._processes.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        os.close(self._write)  # ends the relay
        for thread in self._threads:
            thread.join(timeout=5)
        os.close(self._read)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes.values()]

    def _spawn(self, index: int) -> None:
        cmd = [sys.executable, "-m", "fleet_server.ingest", str(index), self._mqtt_url,
               str(self._write)]  # fmt: skip
        self._processes[index] = subprocess.Popen(cmd, pass_fds=(self._write,))

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            for index, p in list(self._processes.items()):
                if p.poll() is not None and not self._stopping.is_set():
                    log.warning(
                        "ingest process %d ended (%s); starting it again", index, p.returncode
                    )
                    time.sleep(1.0)
                    self._spawn(index)

    def _relay(self) -> None:
        while True:
            try:
                data = os.read(self._read, 4096)
            except OSError:
                return
            if not data:
                return
            self._on_report()


def _main(argv: list[str]) -> None:
    index, mqtt_url, wake_fd = int(argv[0]), argv[1], int(argv[2])
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s %(levelname)s ingest-{index} %(name)s: %(message)s"
    )
    run(Settings(), mqtt_url, index, wake_fd=wake_fd)


if __name__ == "__main__":
    _main(sys.argv[1:])
