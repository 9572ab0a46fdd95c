"""The vocabulary of a slot's lifecycle, shared by the agent that lives it and the server that
reads its reports: states, the events between them, slot modes, and the failure reasons that
either side acts on. ``StrEnum`` members are their own wire strings, so reports stay plain JSON.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Reason", "SlotEvent", "SlotMode", "SlotState"]


class SlotState(StrEnum):
    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    STAGING = "STAGING"
    SWITCHING = "SWITCHING"
    PROBATION = "PROBATION"
    ROLLING_BACK = "ROLLING_BACK"
    COMMITTED = "COMMITTED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"


class SlotEvent(StrEnum):
    """What a lifecycle step reports; the transition table alone decides the next state."""

    DEPLOY = "deploy"
    SUCCESS = "success"
    #: The step failed for a reason that the same bytes will meet again: never retried by
    #: the agent for the same document.
    FAILURE = "failure"
    #: The step failed for a reason that may pass (network, disk space): the next document
    #: naming the same bundle, or the agent's restart, tries again.
    RETRYABLE_FAILURE = "retryable_failure"
    #: A newer desired state took over while the step was under way.
    SUPERSEDED = "superseded"
    #: The agent stopped (crash, power loss) while the step was under way.
    INTERRUPTED = "interrupted"


class SlotMode(StrEnum):
    ACTIVE = "active"
    #: Runs beside an active slot on sampled requests and never answers.
    SHADOW = "shadow"


class Reason(StrEnum):
    """Failure reasons that code compares (on the agent or the server). Every error carries a
    reason string; those not listed here are only reported, never branched on."""

    # desired state
    DESIRED_STATE_MALFORMED = "desired_state_malformed"
    DESIRED_STATE_EXPIRED = "desired_state_expired"
    WRONG_DEVICE = "wrong_device"
    STALE_SEQ = "stale_seq"
    REPLAYED_SEQ = "replayed_seq"
    # download and verification
    DIGEST_MISMATCH = "digest_mismatch"
    OVERSIZE = "oversize"
    BUNDLE_MISMATCH = "bundle_mismatch"
    # staging and serving
    LOAD_FAILED = "load_failed"
    INFERENCE_FAILED = "inference_failed"
    SELFTEST_FAILED = "selftest_failed"
    # probation
    ERROR_RATE = "error_rate"
    NONFINITE_OUTPUTS = "nonfinite_outputs"
    LATENCY_REGRESSION = "latency_regression"
    # the lifecycle itself
    SUPERSEDED = "superseded"
    INTERRUPTED = "interrupted"
    INTERRUPTED_IN_PROBATION = "interrupted_in_probation"
    RESTORE_FAILED = "restore_failed"
