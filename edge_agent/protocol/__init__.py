"""The contract between the fleet server and edge agents: MQTT topics and message schemas,
the lifecycle's vocabulary, and the enrollment exchange.

    topics.py      topic names, device-id rules
    desired.py     the signed desired-state document (server → device)
    status.py      the reported status and its records (device → server)
    lifecycle.py   slot states, events, modes, and the failure reasons code branches on
    enrollment.py  the enrollment request and response (HTTP)
    presence.py    the online/offline payloads

Both sides import these modules, so a message that validates here is one the other side
understands. Payloads are UTF-8 JSON.
"""

from edge_agent.protocol.desired import DesiredState, SignedDesiredState, SlotAssignment
from edge_agent.protocol.enrollment import EnrollRequest, EnrollResponse
from edge_agent.protocol.lifecycle import Reason, SlotEvent, SlotMode, SlotState
from edge_agent.protocol.presence import OFFLINE, ONLINE
from edge_agent.protocol.status import (
    Refusal,
    ReportedStatus,
    SlotError,
    SlotStatus,
    Transition,
    VersionRef,
)
from edge_agent.protocol.topics import DEVICE_ID_PATTERN, PREFIX, Topics, parse_device_topic

__all__ = [
    "DEVICE_ID_PATTERN",
    "OFFLINE",
    "ONLINE",
    "PREFIX",
    "DesiredState",
    "EnrollRequest",
    "EnrollResponse",
    "Reason",
    "Refusal",
    "ReportedStatus",
    "SignedDesiredState",
    "SlotAssignment",
    "SlotError",
    "SlotEvent",
    "SlotMode",
    "SlotState",
    "SlotStatus",
    "Topics",
    "Transition",
    "VersionRef",
    "parse_device_topic",
]
