"""``netns`` rig devices: each agent in a Linux network namespace of its own, joined to the host
by a veth pair (host end ``10.213.S.1/30``, device end ``10.213.S.2/30``). The agent reaches the
server only through that link (the runner's relay listens on the host end), so a scenario can
cut it (``ip link set … down``) or shape it: ``tbf`` for the rate on both ends, ``nft`` for random
loss, ``netem`` for the delay where the kernel has it (else the relay adds it, and the report
says so). Needs root and iproute2 (``ip``, ``tc``) and nftables (``nft``) for loss."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from hil.devices.base import Capability
from hil.devices.local import LocalDevice
from hil.rigfile import DeviceSpec, RigFileError

__all__ = ["NetnsDevice"]


class NetnsDevice(LocalDevice):
    capabilities = frozenset({Capability.POWER, Capability.LINK, Capability.SHAPE})

    def __init__(self, rig: str, spec: DeviceSpec, state_dir: Path, index: int) -> None:
        tag = hashlib.sha256(f"{rig}/{spec.id}".encode()).hexdigest()[:8]
        self.namespace = f"efh-{tag}"
        self.host_if, self.ns_if = f"efh{tag}", f"efn{tag}"
        subnet = spec.reach.get("subnet")
        self.subnet = int(subnet) if subnet is not None else 10 + index
        self.host_ip = f"10.213.{self.subnet}.1"
        self.device_ip = f"10.213.{self.subnet}.2"
        super().__init__(rig, spec, state_dir, ("ip", "netns", "exec", self.namespace))

    def prepare(self) -> None:
        if os.geteuid() != 0:
            raise RigFileError(
                self.rig, "a netns device needs root (network namespaces and veth pairs): "
                "run the HIL runner as root", device=self.id,
            )  # fmt: skip
        for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nft", "nftables")):
            if shutil.which(tool) is None:
                raise RigFileError(
                    self.rig, f"{tool} is not installed (apt-get install {package})", device=self.id
                )
        super().prepare()
        self.teardown()  # a namespace left by a run that died
        ns = ("ip", "netns", "exec", self.namespace)
        for cmd in (
            ("ip", "netns", "add", self.namespace),
            ("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if),
            ("ip", "link", "set", self.ns_if, "netns", self.namespace),
            ("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if),
            ("ip", "link", "set", self.host_if, "up"),
            (*ns, "ip", "addr", "add", f"{self.device_ip}/30", "dev", self.ns_if),
            (*ns, "ip", "link", "set", self.ns_if, "up"),
            (*ns, "ip", "link", "set", "lo", "up"),
        ):
            self._run(*cmd)

    def teardown(self) -> None:
        for cmd in (
            ("ip", "netns", "del", self.namespace),
            ("ip", "link", "del", self.host_if),
        ):
            subprocess.run(cmd, capture_output=True, check=False)

    def relay_host(self) -> str:
        return self.host_ip

    def serving_host(self) -> str:
        return self.device_ip

    # --- the link ------------------------------------------------------------------------------
    def cut_link(self) -> None:
        self._run("ip", "link", "set", self.host_if, "down")

    def restore_link(self) -> None:
        self._run("ip", "link", "set", self.host_if, "up")

    def shape_link(self, rate_kbit: int, delay_ms: int, loss_pct: float) -> None:
        self.shaping = []
        ns = ("ip", "netns", "exec", self.namespace)
        delay_in_kernel = False
        for prefix, dev in (((), self.host_if), (ns, self.ns_if)):
            netem = subprocess.run(
                [*prefix, "tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:",
                 "netem", "delay", f"{delay_ms // 2}ms"],
                capture_output=True, check=False,
            )  # fmt: skip
            parent = ("parent", "1:", "handle", "2:") if netem.returncode == 0 else ("root",)
            delay_in_kernel = netem.returncode == 0
            tbf = ("tbf", "rate", f"{rate_kbit}kbit", "burst", "16kb", "latency", "400ms")
            self._run(*prefix, "tc", "qdisc", "replace", "dev", dev, *parent, *tbf)
        self.shaping.append(f"tc tbf: {rate_kbit} kbit/s each way on the veth pair")
        if delay_in_kernel:
            self.shaping.append(f"tc netem: {delay_ms} ms round trip")
        else:
            assert self.relay is not None
            self.relay.shape(None, delay_ms / 1000)
            self.shaping.append(
                f"relay: {delay_ms} ms a chunk (this kernel has no sch_netem for the delay)"
            )
        if loss_pct > 0:
            permille = max(1, round(loss_pct * 10))
            self._run(*ns, "nft", "add", "table", "inet", "edgefleet_hil")
            for chain, hook in (("in", "input"), ("out", "output")):
                self._run(*ns, "nft", "add", "chain", "inet", "edgefleet_hil", chain,
                          f"{{ type filter hook {hook} priority 0; }}")  # fmt: skip
                drop = ("numgen", "random", "mod", "1000", "<", str(permille), "drop")
                self._run(*ns, "nft", "add", "rule", "inet", "edgefleet_hil", chain, *drop)
            self.shaping.append(f"nft: {loss_pct} % of packets dropped each way")

    def unshape_link(self) -> None:
        ns = ("ip", "netns", "exec", self.namespace)
        for cmd in (
            ("tc", "qdisc", "del", "dev", self.host_if, "root"),
            (*ns, "tc", "qdisc", "del", "dev", self.ns_if, "root"),
            (*ns, "nft", "delete", "table", "inet", "edgefleet_hil"),
        ):
            subprocess.run(cmd, capture_output=True, check=False)
        if self.relay is not None:
            self.relay.unshape()

    def _run(self, *cmd: str) -> None:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RigFileError(
                self.rig, f"{' '.join(cmd)} failed: {done.stderr.strip()}", device=self.id
            )
