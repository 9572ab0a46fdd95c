"""Rig files: a bench described once, in TOML.

A rig is a name and its devices. Each device has an ``id``, a device ``profile``, ``labels``, a
``kind`` with its ``reach`` (how the runner gets at it) and optional power hooks (shell commands,
e.g. a smart plug's CLI). The rig may name hooks of its own (``[hooks] broker_restart``)::

    name = "bench-a"

    [hooks]
    broker_restart = "systemctl restart mosquitto"

    [[devices]]
    id = "pi-01"
    profile = "raspberry-pi-4"
    kind = "ssh"
    labels = { site = "lab" }
    power_cycle = "tapo plug-3 cycle"
    reach = { host = "192.168.1.20", user = "pi", identity_file = "~/.ssh/hil_ed25519" }

Kinds: ``local`` (agent processes on this machine), ``netns`` (each agent in its own Linux
network namespace behind a veth pair), ``ssh`` (a real board over SSH) and ``qemu-aarch64`` (the
agent under qemu-user in an arm64 Debian root). A file is checked completely before anything
runs; every error names the rig, the device and the field (:class:`RigFileError`, a
``ConfigError``: the CLI exits 2).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.contracts.errors import ConfigError
from edge_agent.protocol.topics import DEVICE_ID_PATTERN
from firmware_profiles import ProfileError, default_catalog

__all__ = ["KINDS", "DeviceSpec", "PowerHooks", "RigFileError", "RigSpec", "load_rig"]

RIG_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
POWER_HOOKS = ("power_on", "power_off", "power_cycle")

#: Each kind's reach: field → (type, required, default).
KINDS: dict[str, dict[str, tuple[type, bool, Any]]] = {
    "local": {},
    "netns": {
        # Where the veth pair's /30 comes from: 10.213.<subnet>.0/30 (one per device).
        "subnet": (int, False, None),
    },
    "ssh": {
        "host": (str, True, None),
        "port": (int, False, 22),
        "user": (str, False, None),
        "identity_file": (str, False, None),
        "known_hosts": (str, False, None),
        # The board's Python (>= 3.11) that the agent's virtualenv is made from.
        "python": (str, False, "python3"),
        "dir": (str, False, "edgefleet-hil"),
        # Extra arguments for the board's `pip install` (e.g. an index of its own).
        "pip_args": (list, False, []),
    },
    "qemu-aarch64": {
        # The arm64 Debian root; default: .toolchains/arm64-root under the working directory.
        "root": (str, False, None),
        "cpu": (str, False, "cortex-a72"),
    },
}


class RigFileError(ConfigError):
    """A rig file (or a rig that cannot start) is wrong: fix the file or install what it says."""

    reason = "rig_invalid"

    def __init__(self, rig: str, message: str, *, device: str | None = None, **fields: Any) -> None:
        where = f"rig {rig!r}" + (f", device {device!r}" if device else "")
        super().__init__(f"{where}: {message}", rig=rig, device=device, **fields)
        self.rig = rig
        self.device = device


@dataclass(frozen=True)
class PowerHooks:
    power_on: str | None = None
    power_off: str | None = None
    power_cycle: str | None = None

    @property
    def any(self) -> bool:
        return any((self.power_on, self.power_off, self.power_cycle))


@dataclass(frozen=True)
class DeviceSpec:
    id: str
    profile: str
    kind: str
    labels: dict[str, str] = field(default_factory=dict)
    reach: dict[str, Any] = field(default_factory=dict)
    power: PowerHooks = PowerHooks()


@dataclass(frozen=True)
class RigSpec:
    name: str
    devices: tuple[DeviceSpec, ...]
    #: Rig-level hooks: ``broker_restart``.
    hooks: dict[str, str] = field(default_factory=dict)
    source: Path | None = None
    #: The file's text, kept so a rig can be registered with the server as it was written.
    text: str = ""

    @property
    def kinds(self) -> set[str]:
        return {d.kind for d in self.devices}


def load_rig(path: Path) -> RigSpec:
    try:
        text = path.read_text()
    except OSError as e:
        raise RigFileError(path.stem, f"cannot read {path}: {e.strerror}") from e
    return parse_rig(text, source=path)


def parse_rig(text: str, *, source: Path | None = None) -> RigSpec:
    label = source.stem if source else "<rig>"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RigFileError(label, f"{source or 'rig file'} is not valid TOML: {e}") from e
    name = data.get("name")
    if not isinstance(name, str) or not RIG_NAME.match(name):
        raise RigFileError(
            label, f"name: expected a rig name matching {RIG_NAME.pattern}, got {name!r}"
        )
    _no_unknown(name, None, data, {"name", "devices", "hooks", "description"}, "")
    hooks = data.get("hooks", {})
    if not isinstance(hooks, dict) or not all(
        isinstance(v, str) and v.strip() for v in hooks.values()
    ):
        raise RigFileError(name, "hooks: expected a table of non-empty command strings")
    _no_unknown(name, None, hooks, {"broker_restart"}, "hooks.")
    raw_devices = data.get("devices")
    if not isinstance(raw_devices, list) or not raw_devices:
        raise RigFileError(name, "devices: a rig needs at least one [[devices]] entry")
    devices: list[DeviceSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_devices):
        if not isinstance(raw, dict):
            raise RigFileError(name, f"devices[{i}]: expected a table")
        device = _device(name, i, raw)
        if device.id in seen:
            raise RigFileError(name, "duplicate device id", device=device.id, field="id")
        seen.add(device.id)
        devices.append(device)
    return RigSpec(name, tuple(devices), dict(hooks), source, text)


def _device(rig: str, index: int, raw: dict[str, Any]) -> DeviceSpec:
    device_id = raw.get("id")
    if not isinstance(device_id, str) or not re.match(DEVICE_ID_PATTERN, device_id):
        raise RigFileError(
            rig, f"devices[{index}].id: expected a device id matching {DEVICE_ID_PATTERN}, "
            f"got {device_id!r}", field="id",
        )  # fmt: skip
    _no_unknown(rig, device_id, raw, {"id", "profile", "kind", "labels", "reach", *POWER_HOOKS}, "")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise RigFileError(
            rig, f"kind: unknown kind {kind!r}; use one of {', '.join(sorted(KINDS))}",
            device=device_id, field="kind",
        )  # fmt: skip
    profile = raw.get("profile")
    if not isinstance(profile, str):
        raise RigFileError(rig, "profile: expected a device profile name", device=device_id)
    try:
        default_catalog().get(profile)
    except ProfileError as e:
        raise RigFileError(rig, f"profile: {e.message}", device=device_id, field="profile") from e
    labels = raw.get("labels", {})
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise RigFileError(rig, "labels: expected a table of strings", device=device_id)
    hooks: dict[str, str | None] = {}
    for hook in POWER_HOOKS:
        value = raw.get(hook)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise RigFileError(rig, f"{hook}: expected a command string", device=device_id)
        hooks[hook] = value
    reach_raw = raw.get("reach", {})
    if not isinstance(reach_raw, dict):
        raise RigFileError(rig, "reach: expected a table", device=device_id)
    fields = KINDS[kind]
    _no_unknown(rig, device_id, reach_raw, set(fields), "reach.")
    reach: dict[str, Any] = {}
    for key, (typ, required, default) in fields.items():
        if key not in reach_raw:
            if required:
                raise RigFileError(
                    rig, f"reach.{key}: a {kind} device needs it", device=device_id, field=key
                )
            reach[key] = default
            continue
        value = reach_raw[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise RigFileError(
                rig, f"reach.{key}: expected {typ.__name__}, got {value!r}",
                device=device_id, field=key,
            )  # fmt: skip
        reach[key] = value
    if kind == "netns" and reach["subnet"] is not None and not 0 <= reach["subnet"] <= 255:
        raise RigFileError(rig, "reach.subnet: expected 0..255", device=device_id)
    return DeviceSpec(
        id=device_id,
        profile=profile,
        kind=kind,
        labels=dict(labels),
        reach=reach,
        power=PowerHooks(**hooks),
    )


def _no_unknown(
    rig: str, device: str | None, table: dict[str, Any], known: set[str], prefix: str
) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise RigFileError(
            rig, f"{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(known))})",
            device=device, field=unknown[0],
        )  # fmt: skip
