"""Simulated devices on this host: each is a real ``edge-agent`` OS process with its own state
directory, enrolled through the real CLI, talking to the real server and broker. The demo runs
its devices this way; ``hil.rig`` builds its rigs on it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from edge_agent.serving.client import AgentClient
from fleet_server.broker import free_port
from fleet_server.client import ApiClient

T = TypeVar("T")


def wait_until(
    probe: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.05
) -> T:
    """Poll ``probe`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


class LocalAgent:
    def __init__(
        self,
        root: Path,
        device_id: str,
        profile: str,
        serving_port: int = 0,
        probation_window_s: float = 0.5,
        probation: str = "",
        command_prefix: tuple[str, ...] = (),
        python: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        #: Runs the agent inside something (``ip netns exec NAME``, an emulator), with another
        #: interpreter (an emulated board's) and environment if given.
        self.command_prefix = command_prefix
        self.python = python or sys.executable
        self.env = env or {}
        self.probation_window_s = probation_window_s
        #: Extra lines for the agent's [probation] section.
        self.probation = probation
        self.device_id = device_id
        self.profile = profile
        self.dir = root / device_id
        self.serving_port = serving_port or free_port()
        self.config = self.dir / "agent.toml"
        self.log_path = self.dir / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.client = AgentClient(f"http://127.0.0.1:{self.serving_port}", timeout_s=10)

    def _cli(self, *args: str) -> list[str]:
        return [*self.command_prefix, self.python, "-m", "edge_agent.cli", *args]

    def enroll(self, server_url: str, token: str, labels: dict[str, str] | None = None) -> None:
        cmd = self._cli(
            "enroll",
            "--server",
            server_url,
            "--token",
            token,
            "--device-id",
            self.device_id,
            "--profile",
            self.profile,
            "--dir",
            str(self.dir),
            "--serving-port",
            str(self.serving_port),
        )
        for k, v in (labels or {}).items():
            cmd += ["--label", f"{k}={v}"]
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=180, env={**os.environ, **self.env}
        )
        if done.returncode != 0:
            raise RuntimeError(f"enroll {self.device_id} failed: {done.stderr.strip()}")
        # AF_UNIX paths are limited to ~108 bytes; test directories can be deeper than that.
        self.socket_path = Path(tempfile.mkdtemp(prefix="efa-")) / "serving.sock"
        text = self.config.read_text()
        port_line = f"port = {self.serving_port}\n"
        self.config.write_text(
            text.replace(port_line, port_line + f'unix_socket = "{self.socket_path}"\n', 1)
        )
        self.configure(
            f"[probation]\nwindow_s = {self.probation_window_s}\n"
            f"probe_interval_s = {max(0.01, self.probation_window_s / 25)}\n" + self.probation
        )

    def configure(self, toml: str) -> None:
        """Append sections to the agent's config (before it starts)."""
        with self.config.open("a") as f:
            f.write("\n" + toml)

    def start(self, env: dict[str, str] | None = None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self._cli("run", "--config", str(self.config)),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env, **(env or {})},
        )
        log.close()

    def wait_ready(self, timeout_s: float = 30) -> None:
        wait_until(self._http_up, timeout_s, f"{self.device_id}'s local API")

    def _http_up(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"agent {self.device_id} exited:\n{self.log_tail()}")
        try:
            self.client.models()
            return True
        except Exception:
            return False

    def serving(self, slot: str) -> dict[str, Any] | None:
        try:
            return next((m for m in self.client.models() if m["slot"] == slot), None)
        except Exception:
            return None

    def wait_serving(self, slot: str, version: str, timeout_s: float = 60) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"agent {self.device_id} exited:\n{self.log_tail()}")
            m = self.serving(slot)
            return m if m and m["version"] == version else None

        return wait_until(probe, timeout_s, f"{self.device_id} to serve {slot} {version}")

    def stop(self, timeout_s: float = 15) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        self.client.close()
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None
        self.client.close()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


#: Telemetry every second with every request sampled for drift: the fleet's figures (and the
#: gates' evidence) arrive at once. A real model's sampling budget: bench/telemetry_cost.py.
FAST_TELEMETRY = "[telemetry]\ninterval_s = 1\ncheckpoint_s = 0.5\nmin_sample_rate = 1.0\n"


def start_agents(
    api: ApiClient,
    root: Path,
    devices: list[tuple[str, str]],
    labels: dict[str, str],
    into: list[LocalAgent],
    *,
    config: str = FAST_TELEMETRY,
    **options: Any,
) -> None:
    """Enroll (a one-time token each) and start an agent per (device id, profile), with
    ``config`` appended to its agent.toml and ``options`` for :class:`LocalAgent`; each is
    appended to ``into`` as it starts, so that the caller stops every one that did. Returns
    when all serve their local API."""
    for device_id, profile in devices:
        token = api.post("/v1/enrollment-tokens", json={"profile": profile})["token"]
        agent = LocalAgent(root / "devices", device_id, profile, **options)
        agent.enroll(api.base_url, token, labels)
        agent.configure(config)
        agent.start()
        into.append(agent)
    for agent in into:
        agent.wait_ready()
