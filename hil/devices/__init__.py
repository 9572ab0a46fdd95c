"""Rig devices by kind, behind one interface (:class:`~hil.devices.base.RigDevice`)."""

from __future__ import annotations

from pathlib import Path

from hil.devices.base import Capability, RigDevice
from hil.rigfile import DeviceSpec, RigFileError

__all__ = ["Capability", "RigDevice", "make_device"]


def make_device(rig: str, spec: DeviceSpec, state_dir: Path, index: int) -> RigDevice:
    """The device object for ``spec.kind`` (kinds import what they need only when used)."""
    if spec.kind == "local":
        from hil.devices.local import LocalDevice

        return LocalDevice(rig, spec, state_dir)
    if spec.kind == "netns":
        from hil.devices.netns import NetnsDevice

        return NetnsDevice(rig, spec, state_dir, index)
    if spec.kind == "ssh":
        from hil.devices.ssh import SshDevice

        return SshDevice(rig, spec, state_dir)
    if spec.kind == "qemu-aarch64":
        from hil.devices.qemu import QemuDevice

        return QemuDevice(rig, spec, state_dir)
    raise RigFileError(rig, f"kind {spec.kind!r} has no implementation", device=spec.id)
