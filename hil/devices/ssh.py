"""``ssh`` rig devices: a real board reached over SSH (OpenSSH's client, key authentication).

The runner installs the agent from a wheel it builds here (``edgefleet[agent]`` into a
virtualenv under ``reach.dir`` on the board, made from ``reach.python``), enrolls it, starts and
stops it, cuts its power (the device's power hooks, else ``kill -9`` over SSH), and collects its
log. One SSH connection per device carries everything: remote forwards put the runner's relay
(HTTP and MQTT) on the board's own loopback, and a local forward brings the agent's local API
back, so the board needs no route to this machine, and the relay (cut, shape, tamper) stays in
its path.
"""

from __future__ import annotations

import hashlib
import random
import shlex
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge_agent.serving.client import AgentClient
from fleet_server.broker import free_port
from fleet_server.demo.agents import wait_until
from hil.devices.base import Capability, RigDevice, merge_config
from hil.devices.local import DOWNLOAD_TIMEOUT_S, LATENCY_SLACK_MS, PROBATION_WINDOW_S
from hil.rigfile import DeviceSpec, RigFileError

__all__ = ["SshDevice", "agent_wheel"]

_wheel_lock = threading.Lock()
_wheels: dict[Path, Path] = {}


def agent_wheel(out: Path) -> Path:
    """The edgefleet wheel built from this checkout (once per process)."""
    root = Path(__file__).resolve().parents[2]
    with _wheel_lock:
        if out in _wheels and _wheels[out].exists():
            return _wheels[out]
        if not (root / "pyproject.toml").is_file():
            raise RigFileError(
                "ssh", f"cannot build the agent wheel: {root} is not an edgefleet checkout"
            )
        out.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(root)],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        wheels = sorted(out.glob("edgefleet-*.whl"), key=lambda p: p.stat().st_mtime)
        if done.returncode != 0 or not wheels:
            raise RigFileError("ssh", f"building the agent wheel failed: {done.stderr[-500:]}")
        _wheels[out] = wheels[-1]
        return wheels[-1]


class SshDevice(RigDevice):
    capabilities = frozenset({Capability.POWER, Capability.LINK, Capability.SHAPE})

    def __init__(self, rig: str, spec: DeviceSpec, state_dir: Path) -> None:
        super().__init__(rig, spec, state_dir)
        reach = spec.reach
        self.host: str = reach["host"]
        self.port: int = reach["port"]
        self.remote_dir: str = reach["dir"]
        self.python: str = reach["python"]
        self.pip_args: list[str] = [str(a) for a in reach["pip_args"]]
        self.serving_port = 0  # on the board
        self.local_port = free_port()  # here, forwarded to the board's serving port
        self._tunnel: subprocess.Popen[bytes] | None = None
        self._remote_ports: dict[int, int] = {}  # relay port here → port on the board
        self._client = AgentClient(f"http://127.0.0.1:{self.local_port}", timeout_s=10)

    # --- ssh -----------------------------------------------------------------------------------
    def _ssh_base(self) -> list[str]:
        reach = self.spec.reach
        cmd = ["ssh", "-p", str(self.port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
               "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3"]  # fmt: skip
        if reach.get("identity_file"):
            cmd += [
                "-i",
                str(Path(reach["identity_file"]).expanduser()),
                "-o",
                "IdentitiesOnly=yes",
            ]
        if reach.get("known_hosts"):
            cmd += ["-o", f"UserKnownHostsFile={Path(reach['known_hosts']).expanduser()}",
                    "-o", "StrictHostKeyChecking=yes"]  # fmt: skip
        else:
            cmd += ["-o", "StrictHostKeyChecking=accept-new"]
        return cmd

    @property
    def _target(self) -> str:
        user = self.spec.reach.get("user")
        return f"{user}@{self.host}" if user else self.host

    def sh(self, command: str, *, stdin: bytes | None = None, timeout_s: float = 120) -> str:
        """Run a shell command on the board; RigFileError naming the device if it fails."""
        try:
            done = subprocess.run(
                [*self._ssh_base(), self._target, command],
                input=stdin, capture_output=True, timeout=timeout_s, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as e:
            raise RigFileError(self.rig, f"ssh {self._target}: {command!r} timed out",
                               device=self.id) from e  # fmt: skip
        if done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            raise RigFileError(
                self.rig,
                f"ssh {self._target}:{self.port}: {command.split()[0]!r} failed "
                f"(exit {done.returncode}): {err[-1] if err else ''}",
                device=self.id,
            )
        return done.stdout.decode(errors="replace")

    def _path(self, *parts: str) -> str:
        return "/".join([self.remote_dir.rstrip("/"), *parts])

    # --- the interface -------------------------------------------------------------------------
    def prepare(self) -> None:
        for tool in ("ssh",):
            if shutil.which(tool) is None:
                raise RigFileError(self.rig, f"{tool} is not installed (apt-get install "
                                   "openssh-client)", device=self.id)  # fmt: skip
        try:
            self.sh("true", timeout_s=30)
        except RigFileError as e:
            raise RigFileError(
                self.rig, f"host {self.host}:{self.port} is unreachable over SSH "
                f"({e.message.split(': ', 2)[-1]}); check reach.host, reach.port, reach.user "
                "and reach.identity_file", device=self.id,
            ) from e  # fmt: skip
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._install()

    def _install(self) -> None:
        wheel = agent_wheel(self.state_dir.parent / "wheel")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        venv = self._path("venv")
        have = self.sh(f"cat {shlex.quote(self._path('wheel.sha256'))} 2>/dev/null || true")
        if have.strip() == digest:
            return
        self.sh(f"mkdir -p {shlex.quote(self._path('state'))} && "
                f"{shlex.quote(self.python)} -m venv {shlex.quote(venv)}")  # fmt: skip
        remote_wheel = self._path(wheel.name)
        self.sh(f"cat > {shlex.quote(remote_wheel)}", stdin=wheel.read_bytes())
        args = " ".join(shlex.quote(a) for a in self.pip_args)
        self.sh(f"{shlex.quote(venv)}/bin/pip install -q {args} "
                f"{shlex.quote(remote_wheel + '[agent]')}", timeout_s=900)  # fmt: skip
        self.sh(f"echo {digest} > {shlex.quote(self._path('wheel.sha256'))}")

    def enrolled(self) -> bool:
        return bool(self.sh(f"test -f {shlex.quote(self._config)} && echo yes || true").strip())

    @property
    def _config(self) -> str:
        return self._path("state", "agent.toml")

    def _open_tunnel(self, relay_ports: list[int] | None = None) -> None:
        """One connection: the relay's ports on the board's loopback, the agent's API here.
        With ``relay_ports`` the ports on the board are chosen anew; without, the same ones
        (the agent's config names them) are forwarded again."""
        self._close_tunnel()
        for attempt in range(5):
            if relay_ports is not None:
                self._remote_ports = {p: random.randint(20000, 60000) for p in relay_ports}
            forwards = []
            for here, there in self._remote_ports.items():
                forwards += ["-R", f"127.0.0.1:{there}:127.0.0.1:{here}"]
            if self.serving_port:
                forwards += ["-L", f"127.0.0.1:{self.local_port}:127.0.0.1:{self.serving_port}"]
            self._tunnel = subprocess.Popen(
                [*self._ssh_base(), "-N", "-o", "ExitOnForwardFailure=yes", *forwards,
                 self._target],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            time.sleep(1.0 + attempt)
            if self._tunnel.poll() is None:
                return
        err = self._tunnel.stderr.read().decode() if self._tunnel and self._tunnel.stderr else ""
        raise RigFileError(self.rig, f"the SSH forwards to {self.host} failed: {err.strip()}",
                           device=self.id)  # fmt: skip

    def _close_tunnel(self) -> None:
        if self._tunnel is not None:
            self._tunnel.terminate()
            try:
                self._tunnel.wait(5)
            except subprocess.TimeoutExpired:
                self._tunnel.kill()
            self._tunnel = None

    def _on_board(self, url: str) -> str:
        parts = urlsplit(url)
        assert parts.port is not None
        return f"{parts.scheme}://127.0.0.1:{self._remote_ports[parts.port]}"

    def enroll(self, server_url: str, token: str) -> str:
        self._open_tunnel([urlsplit(server_url).port or 80])
        self.serving_port = random.randint(20000, 60000)
        labels = " ".join(f"--label {shlex.quote(f'{k}={v}')}" for k, v in self.spec.labels.items())
        self.sh(
            f"{shlex.quote(self._path('venv', 'bin', 'edge-agent'))} enroll "
            f"--server {shlex.quote(self._on_board(server_url))} --token {shlex.quote(token)} "
            f"--device-id {shlex.quote(self.id)} --profile {shlex.quote(self.spec.profile)} "
            f"--dir {shlex.quote(self._path('state'))} --serving-port {self.serving_port} {labels}"
        )
        config = tomllib.loads(self.sh(f"cat {shlex.quote(self._config)}"))
        self._edit({
            "probation": {"window_s": PROBATION_WINDOW_S, "probe_interval_s": 0.1,
                          "latency_slack_ms": LATENCY_SLACK_MS},
            "reporting": {"status_interval_s": 5.0},
            "telemetry": {"interval_s": 5.0, "resend_after_s": 5.0},
            "download": {"timeout_s": DOWNLOAD_TIMEOUT_S, "attempts": 10},
            "serving": {"unix_socket": ""},
        })  # fmt: skip
        return str(config["mqtt"]["url"])

    def _edit(self, changes: dict[str, dict[str, Any]]) -> None:
        text = self.sh(f"cat {shlex.quote(self._config)}")
        self.sh(f"cat > {shlex.quote(self._config)}", stdin=merge_config(text, changes).encode())

    def reuse(self) -> None:
        config = tomllib.loads(self.sh(f"cat {shlex.quote(self._config)}"))
        self.serving_port = int(config["serving"]["port"])

    def point_at(self, server_url: str, mqtt_host: str, mqtt_port: int) -> None:
        http = urlsplit(server_url).port or 80
        self._open_tunnel([http, mqtt_port])
        board = self._on_board(server_url)
        self._edit({
            "server": {"url": board},
            "mqtt": {"url": f"mqtt://127.0.0.1:{self._remote_ports[mqtt_port]}"},
            "download": {"mirror_url": board},
        })  # fmt: skip

    def start(self) -> None:
        if self._tunnel is None or self._tunnel.poll() is not None:
            self._open_tunnel()
        self.sh(
            f"cd {shlex.quote(self.remote_dir)} && (nohup venv/bin/edge-agent run --config "
            f"state/agent.toml >> agent.log 2>&1 < /dev/null & echo $! > agent.pid)"
        )

    def _pid(self) -> str:
        return self.sh(f"cat {shlex.quote(self._path('agent.pid'))} 2>/dev/null || true").strip()

    def stop(self) -> None:
        pid = self._pid()
        if pid:
            self.sh(f"kill -TERM {pid} 2>/dev/null; for i in $(seq 150); do kill -0 {pid} "
                    f"2>/dev/null || break; sleep 0.1; done; kill -9 {pid} 2>/dev/null; "
                    f"rm -f {shlex.quote(self._path('agent.pid'))}")  # fmt: skip

    def hard_stop(self) -> None:
        pid = self._pid()
        if pid:
            self.sh(f"kill -9 {pid} 2>/dev/null; rm -f {shlex.quote(self._path('agent.pid'))}")

    def running(self) -> bool:
        pid = self._pid()
        return (
            bool(pid) and self.sh(f"kill -0 {pid} 2>/dev/null && echo up || true").strip() == "up"
        )

    def logs(self) -> str:
        return self.sh(f"cat {shlex.quote(self._path('agent.log'))} 2>/dev/null || true")

    def wait_ready(self, timeout_s: float = 60) -> None:
        def up() -> bool:
            try:
                self._client.models()
                return True
            except Exception:
                if not self.running():
                    raise RuntimeError(f"agent {self.id} exited:\n{self.logs()[-2000:]}") from None
                return False

        wait_until(up, timeout_s, f"{self.id}'s local API over SSH", interval_s=0.3)

    def set_bandwidth_cap(self, bytes_per_s: int | None) -> None:
        self.stop()
        self._edit({"download": {"max_bytes_per_s": bytes_per_s}})
        self.start()
        self.wait_ready(120)

    @property
    def client(self) -> AgentClient:
        return self._client

    def teardown(self) -> None:
        self._close_tunnel()
