"""Payloads of the retained ``online`` topic; ``offline`` is also each agent's Last Will."""

ONLINE = b"online"
OFFLINE = b"offline"
