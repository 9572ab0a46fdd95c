"""The broker's ACL: each device confined to its own topics by pattern (its certificate CN,
or its username, is ``%u``), the server's identities free under the prefix, and each
decommissioned device denied everything. Written by ``edgefleet broker-config`` and rewritten
by the server when a device is decommissioned (:mod:`fleet_server.auth.broker_files`).

Facts from Mosquitto 2.0.11: subscriptions outside the ACL are granted but their messages are
filtered (so tests check delivery, not SUBACK); the dynamic-security plugin cannot use ``%u``
patterns, hence a plain file; a ``user X`` block with ``topic deny #`` is obeyed on X's live
connection once the broker rereads the file (SIGHUP).
"""

from __future__ import annotations

from edge_agent.protocol.topics import PREFIX
from fleet_server.auth.ca import SERVER_IDENTITY

ACL = f"""# written by edgefleet broker-config
# Every device (its certificate CN is its username): only its own topics.
pattern read {PREFIX}/devices/%u/desired
pattern read {PREFIX}/devices/%u/cmd
pattern read {PREFIX}/devices/%u/ack
pattern write {PREFIX}/devices/%u/status
pattern write {PREFIX}/devices/%u/telemetry
pattern write {PREFIX}/devices/%u/online

# The fleet server.
user {SERVER_IDENTITY}
topic readwrite {PREFIX}/#
"""
#: Identities for the server's ingest processes (``edgefleet serve --ingest-processes`` and
#: ``edgefleet ingest --index``): the broker forces each connection's client id to its
#: identity, so each process needs one of its own.
INGEST_IDENTITIES = 8


def ingest_identity(index: int) -> str:
    return f"edgefleet-ingest-{index}"


def acl_text(denied: list[str] | tuple[str, ...] = ()) -> str:
    """The broker's ACL file: devices confined to their own topics, the server's identities
    free under the prefix, and ``denied`` (decommissioned devices) allowed nothing at all,
    even on a connection that is already up."""
    ingest = "".join(
        f"\nuser {ingest_identity(i)}\ntopic readwrite {PREFIX}/#\n"
        for i in range(1, INGEST_IDENTITIES + 1)
    )
    deny = "".join(f"\nuser {device_id}\ntopic deny #\n" for device_id in denied)
    return (
        ACL
        + "\n# The server's ingest processes."
        + ingest
        + ("\n# Decommissioned devices: nothing, even on a live connection." + deny if deny else "")
    )
