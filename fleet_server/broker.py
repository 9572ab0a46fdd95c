"""The embedded MQTT 5 broker for development and demos.

``mosquitto`` as a child process when it is on PATH (with its own config and persistence
directory under the server's data dir), otherwise the pip package ``iotcore`` (rumqttd) with
an MQTT 5 listener. Both bind 127.0.0.1 only and accept anonymous clients, which is why
``EDGEFLEET_ENV=production`` refuses to run with it.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Literal

from edge_agent.contracts.errors import ConfigError

log = logging.getLogger(__name__)

Backend = Literal["auto", "mosquitto", "iotcore"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _accepting(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    def __init__(self, workdir: Path, port: int = 0, backend: Backend = "auto") -> None:
        self.workdir = workdir
        self.host = "127.0.0.1"
        self.port = port or free_port()
        if backend == "auto":
            backend = "mosquitto" if shutil.which("mosquitto") else "iotcore"
        self.backend: Backend = backend
        self._process: subprocess.Popen[bytes] | None = None
        self._iotcore: Any = None
        self._log_file: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> EmbeddedBroker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if _accepting(self.host, self.port):
            raise ConfigError(f"port {self.port} is already in use; choose another broker port")
        if self.backend == "mosquitto":
            self._start_mosquitto(timeout_s)
        else:
            self._start_iotcore(timeout_s)
        log.info("embedded %s broker on %s", self.backend, self.url)
        return self

    def _start_mosquitto(self, timeout_s: float) -> None:
        exe = shutil.which("mosquitto")
        if exe is None:
            raise ConfigError("mosquitto is not on PATH (apt-get install mosquitto)")
        persistence = self.workdir / "mosquitto-data"
        persistence.mkdir(exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            "# written by edgefleet: development broker, loopback only\n"
            "per_listener_settings false\n"
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {persistence}/\n"
            "autosave_interval 5\n"
            # The server's one connection receives every device's reports: a 10,000-device
            # fleet reporting at once must not overflow its queue (the default is 1,000).
            "max_queued_messages 200000\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
        )
        self._log_file = (self.workdir / "mosquitto.log").open("ab")
        self._process = subprocess.Popen(
            [exe, "-c", str(conf)], stdout=self._log_file, stderr=subprocess.STDOUT
        )
        self._wait_ready(timeout_s)

    def _start_iotcore(self, timeout_s: float) -> None:
        try:
            from iotcore import Broker
        except ImportError as e:
            raise ConfigError(
                "no broker available: install mosquitto (apt-get install mosquitto) "
                "or the iotcore package (pip install 'edgefleet[server]')"
            ) from e
        conf = self.workdir / "rumqttd.toml"
        conf.write_text(
            "# written by edgefleet: development broker, loopback only, MQTT 5\n"
            "id = 0\n\n[router]\nid = 0\nmax_connections = 10010\n"
            "max_outgoing_packet_count = 200\nmax_segment_size = 104857600\n"
            "max_segment_count = 10\n\n"
            f'[v5.1]\nname = "v5-1"\nlisten = "{self.host}:{self.port}"\n'
            "next_connection_delay_ms = 1\n"
            "    [v5.1.connections]\n    connection_timeout_ms = 60000\n"
            "    max_payload_size = 1048576\n    max_inflight_count = 100\n"
        )
        self._iotcore = Broker(config_path=str(conf))
        self._iotcore.start(timeout=timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        assert self._process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ConfigError(
                    f"mosquitto exited with code {self._process.returncode}; "
                    f"see {self.workdir / 'mosquitto.log'}"
                )
            if _accepting(self.host, self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise ConfigError(f"mosquitto did not listen on port {self.port} within {timeout_s}s")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._iotcore is not None:
            self._iotcore.stop()
            self._iotcore = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
