"""The contracts every part of edgefleet shares: the agent, and the server and converters
that build on it. Nothing here imports anything else of edgefleet's.

    errors.py     the exception tree (one root, branches named for what the caller does)
    canonical.py  canonical JSON, the bytes every signature covers
    durable.py    atomic, power-loss-safe file writes
    structs.py    the msgspec base of every message, manifest, keyring, journal and config
    failpoints.py named crash points for fault-injection tests
    npy.py        the process-wide lock around numpy's .npy header parsing
"""
