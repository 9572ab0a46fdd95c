"""``local`` rig devices: ``edge-agent`` processes on this machine (the demo's
:class:`~fleet_server.demo.agents.LocalAgent`), each with its own state directory. The power
cut is ``kill -9``; the link is the runner's relay (cut, or shaped in rate and delay)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from edge_agent.serving.client import AgentClient
from fleet_server.demo.agents import LocalAgent
from hil.devices.base import Capability, RigDevice, rewrite_config
from hil.rigfile import DeviceSpec

__all__ = ["LocalDevice"]

#: Long enough that a scenario can catch the agent on probation, short enough for a test.
PROBATION_WINDOW_S = 2.0
#: A bench machine running several agents (and a CI machine running several rigs) is noisy:
#: a sub-millisecond model's p95 can double for no reason of its own. The built-in scenarios
#: are not about that gate; a real latency regression still trips it above this slack.
LATENCY_SLACK_MS = 5.0
DOWNLOAD_TIMEOUT_S = 5.0


class LocalDevice(RigDevice):
    capabilities = frozenset({Capability.POWER, Capability.LINK, Capability.SHAPE})

    def __init__(
        self,
        rig: str,
        spec: DeviceSpec,
        state_dir: Path,
        command_prefix: tuple[str, ...] = (),
        python: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(rig, spec, state_dir)
        self.agent = LocalAgent(
            state_dir.parent,
            spec.id,
            spec.profile,
            probation_window_s=PROBATION_WINDOW_S,
            probation=f"latency_slack_ms = {LATENCY_SLACK_MS}\n",
            command_prefix=command_prefix,
            python=python,
            env=env,
        )
        self.agent.dir = state_dir
        self.agent.config = state_dir / "agent.toml"
        self.agent.log_path = state_dir / "agent.log"

    def prepare(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def enrolled(self) -> bool:
        return self.agent.config.exists()

    def serving_host(self) -> str:
        """Where the agent's local API listens (and the runner reaches it)."""
        return "127.0.0.1"

    def enroll(self, server_url: str, token: str) -> str:
        self.agent.enroll(server_url, token, self.spec.labels)
        broker = str(tomllib.loads(self.agent.config.read_text())["mqtt"]["url"])
        rewrite_config(
            self.agent.config,
            {
                "serving": {"host": self.serving_host(), "port": self.agent.serving_port},
                # The HIL scenarios watch telemetry and status: report often.
                "reporting": {"status_interval_s": 5.0},
                "telemetry": {"interval_s": 5.0, "resend_after_s": 5.0},
                # A stalled download is given up after 5 s and resumed with Range (a link
                # cut longer than that is the link-cut scenario's).
                "download": {"timeout_s": DOWNLOAD_TIMEOUT_S, "attempts": 10},
            },
        )
        return broker

    def reuse(self) -> None:
        """An earlier run enrolled it: serve on the port its config names."""
        config = tomllib.loads(self.agent.config.read_text())
        self.agent.serving_port = int(config["serving"]["port"])
        self.agent.client = AgentClient(
            f"http://{self.serving_host()}:{self.agent.serving_port}", timeout_s=10
        )

    def point_at(self, server_url: str, mqtt_host: str, mqtt_port: int) -> None:
        """This run's relay ports (they change from run to run)."""
        rewrite_config(
            self.agent.config,
            {
                "server": {"url": server_url},
                "mqtt": {"url": f"mqtt://{mqtt_host}:{mqtt_port}"},
                # Bundles too come through the relay, whatever origin the documents name.
                "download": {"mirror_url": server_url},
            },
        )

    def start(self) -> None:
        self.agent.client = AgentClient(
            f"http://{self.serving_host()}:{self.agent.serving_port}", timeout_s=10
        )
        self.agent.start()

    def stop(self) -> None:
        self.agent.stop()

    def hard_stop(self) -> None:
        self.agent.kill()

    def running(self) -> bool:
        return self.agent.process is not None and self.agent.process.poll() is None

    def logs(self) -> str:
        try:
            return self.agent.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def set_bandwidth_cap(self, bytes_per_s: int | None) -> None:
        self.stop()
        rewrite_config(self.agent.config, {"download": {"max_bytes_per_s": bytes_per_s}})
        self.start()
        self.wait_ready(120)

    @property
    def client(self) -> AgentClient:
        return self.agent.client

    def wait_ready(self, timeout_s: float = 60) -> None:
        self.agent.wait_ready(timeout_s)
