"""MQTT topic names. Every topic is ``edgefleet/v1/devices/{device_id}/{kind}``.

Device ids are restricted to characters that are safe in a topic level and in an ACL
pattern (no ``/``, ``+``, ``#``), so ``%u`` substitution in broker ACLs cannot be abused.
"""

from __future__ import annotations

import re
from typing import Literal

PREFIX = "edgefleet/v1"
DEVICE_ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)

Kind = Literal["desired", "cmd", "status", "telemetry", "ack", "online"]
KINDS: tuple[Kind, ...] = ("desired", "cmd", "status", "telemetry", "ack", "online")


def is_valid_device_id(device_id: str) -> bool:
    return bool(_DEVICE_ID.match(device_id))


class Topics:
    """Topic names for one device."""

    def __init__(self, device_id: str) -> None:
        if not is_valid_device_id(device_id):
            raise ValueError(f"invalid device id {device_id!r}: must match {DEVICE_ID_PATTERN}")
        self.device_id = device_id
        base = f"{PREFIX}/devices/{device_id}"
        self.desired = f"{base}/desired"
        self.cmd = f"{base}/cmd"
        self.status = f"{base}/status"
        self.telemetry = f"{base}/telemetry"
        #: server → device: the end-to-end acknowledgement of telemetry batches
        self.ack = f"{base}/ack"
        self.online = f"{base}/online"

    @staticmethod
    def all_devices(kind: Kind) -> str:
        """Subscription filter matching ``kind`` for every device."""
        return f"{PREFIX}/devices/+/{kind}"

    @staticmethod
    def shared(group: str, kind: Kind) -> str:
        """A ``$share/`` subscription: the broker hands each message to one member of
        ``group``, so several server processes split the load."""
        return f"$share/{group}/{PREFIX}/devices/+/{kind}"


def parse_device_topic(topic: str) -> tuple[str, Kind] | None:
    """``edgefleet/v1/devices/cam-1/status`` → ``("cam-1", "status")``; None if not ours."""
    parts = topic.split("/")
    if len(parts) != 5 or "/".join(parts[:3]) != f"{PREFIX}/devices":
        return None
    device_id, kind = parts[3], parts[4]
    if not is_valid_device_id(device_id):
        return None
    for known in KINDS:
        if kind == known:
            return device_id, known
    return None
