"""One rig device, whatever its kind: the interface scenarios act through.

A :class:`RigDevice` owns one real ``edge-agent``: it prepares the place the agent runs
(``prepare``), enrolls it with the fleet server through the runner's relay (``enroll``), starts
and stops it, cuts its power (``power_off`` / ``power_on`` / ``power_cycle``: the device's power
hooks when the rig file names them, else the kind's own hard stop, ``kill -9`` on this host),
cuts or shapes its link, and collects its log. What a kind cannot do is absent from its
``capabilities``, and scenarios that need it are not run on it.

Invariants: ``prepare`` raises :class:`~hil.rigfile.RigFileError` naming the rig, the device and
what to install or fix, before anything is started; power hooks that fail raise the same.
"""

from __future__ import annotations

import shlex
import subprocess
import tomllib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import tomli_w

from edge_agent.serving.client import AgentClient
from hil.relay import Relay
from hil.rigfile import DeviceSpec, RigFileError

__all__ = ["Capability", "RigDevice", "rewrite_config"]


class Capability:
    POWER = "power"  # a hard power cut the agent cannot see coming
    LINK = "link"  # the link can be cut and restored
    SHAPE = "shape"  # the link can be made slow and lossy


class RigDevice(ABC):
    """A device of a rig. ``relay`` carries its traffic to the server (see :mod:`hil.relay`)."""

    capabilities: frozenset[str] = frozenset()

    def __init__(self, rig: str, spec: DeviceSpec, state_dir: Path) -> None:
        self.rig = rig
        self.spec = spec
        self.id = spec.id
        self.state_dir = state_dir
        self.relay: Relay | None = None
        #: What the link shaping did, in words (evidence for the report).
        self.shaping: list[str] = []
        #: What the device says of itself once prepared (platform, runtimes), for the report.
        self.facts: list[str] = []

    # --- what every kind provides -------------------------------------------------------------
    @abstractmethod
    def prepare(self) -> None:
        """Check what the kind needs and set the place up; raise RigFileError if it cannot."""

    @abstractmethod
    def enrolled(self) -> bool:
        """The agent has an identity (its config) from an earlier run."""

    @abstractmethod
    def enroll(self, server_url: str, token: str) -> str:
        """Enroll the agent through ``server_url`` (the relay) and write its config; return
        the broker URL the server gave it."""

    @abstractmethod
    def reuse(self) -> None:
        """An earlier run enrolled it: pick up its config."""

    @abstractmethod
    def point_at(self, server_url: str, mqtt_host: str, mqtt_port: int) -> None:
        """Point the agent's config at this run's relay (its ports change from run to run)."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def hard_stop(self) -> None:
        """The kind's own power cut: the agent dies without a chance to clean up."""

    @abstractmethod
    def running(self) -> bool: ...

    @abstractmethod
    def logs(self) -> str:
        """The agent's log so far."""

    @abstractmethod
    def wait_ready(self, timeout_s: float = 60) -> None:
        """Until the agent's local API answers."""

    @abstractmethod
    def set_bandwidth_cap(self, bytes_per_s: int | None) -> None:
        """Restart the agent with this download cap (None: none)."""

    @property
    @abstractmethod
    def client(self) -> AgentClient:
        """The agent's local inference API, from the runner."""

    def teardown(self) -> None:  # noqa: B027 (most kinds have nothing to undo)
        """Undo ``prepare`` (network namespaces, forwards). Must not raise."""

    def relay_host(self) -> str:
        """Where the agent reaches the relay."""
        return "127.0.0.1"

    # --- the link: the relay by default; kinds with a real link override -------------------------
    def cut_link(self) -> None:
        assert self.relay is not None
        self.relay.cut()

    def restore_link(self) -> None:
        assert self.relay is not None
        self.relay.restore()

    def shape_link(self, rate_kbit: int, delay_ms: int, loss_pct: float) -> None:
        assert self.relay is not None
        self.relay.shape(rate_kbit * 1000 / 8, delay_ms / 1000)
        self.shaping = [
            f"relay: {rate_kbit} kbit/s each way, {delay_ms} ms a chunk "
            f"(loss {loss_pct} % is not emulated on a relay: TCP hides it)"
        ]

    def unshape_link(self) -> None:
        assert self.relay is not None
        self.relay.unshape()

    # --- power ---------------------------------------------------------------------------------
    def power_off(self) -> None:
        if self.spec.power.power_off:
            self._hook("power_off", self.spec.power.power_off)
        self.hard_stop()

    def power_on(self) -> None:
        if self.spec.power.power_on:
            self._hook("power_on", self.spec.power.power_on)
        self.start()

    def power_cycle(self) -> None:
        if self.spec.power.power_cycle:
            self._hook("power_cycle", self.spec.power.power_cycle)
            self.hard_stop()
            self.start()
        else:
            self.power_off()
            self.power_on()

    def _hook(self, name: str, command: str) -> None:
        try:
            done = subprocess.run(
                shlex.split(command), capture_output=True, text=True, timeout=120, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RigFileError(
                self.rig, f"{name} hook {command!r} could not run: {e}", device=self.id
            ) from e
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            raise RigFileError(
                self.rig,
                f"{name} hook {command!r} failed with exit status {done.returncode}: {tail[0]}",
                device=self.id,
            )


def rewrite_config(path: Path, changes: dict[str, dict[str, Any]]) -> None:
    """Merge ``{section: {key: value}}`` into an agent config written by ``edge-agent enroll``
    (a value of None removes the key)."""
    path.write_text(merge_config(path.read_text(), changes))


def merge_config(text: str, changes: dict[str, dict[str, Any]]) -> str:
    config = tomllib.loads(text)
    for section, values in changes.items():
        table = config.setdefault(section, {})
        for key, value in values.items():
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
    return tomli_w.dumps(config)
