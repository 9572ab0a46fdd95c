"""What an operator asks of a rollout: the request body of ``POST /v1/rollouts`` and its rules.

A spec is checked completely before anything is written: stages that do not increase or pass
100 %, a gate that does not exist, a threshold of the wrong type, a selector that does not
parse are each refused naming the field (pydantic's 422 names the location; the rules that
need more than one field raise :class:`InvalidInputError` with ``field``).

Strategies:

- ``all_at_once``: one stage of 100 % (the default; gates optional).
- ``canary``: stages of a growing share of the cohort (default 1 → 10 → 50 → 100 %).
- ``shadow``: the candidate runs beside the active slot on sampled requests and never answers;
  one stage, gated on agreement. A passing candidate stays as the shadow; a breach gives the
  shadow slot back what it had.
- ``stage_then_activate`` (blue-green on the device): every device downloads, verifies, loads
  and warms the candidate beside its active version (a shadow slot that answers nobody) and
  reports it staged; when all have (or failed, or timed out), one step switches every staged
  device at once, and the switch-time spread is recorded.
- ``ab``: a fixed split of the cohort (``split_pct`` on the candidate, arm B; the rest keep
  their version, arm A) held for ``bake_s``; then a verdict on error rate and latency with a
  confidence figure (:mod:`fleet_server.rollouts.verdict`): B wins → the candidate goes to
  the whole cohort (or waits for ``promote`` with manual approval); otherwise arm B gets its
  previous version back and the rollout ends, keeping A.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import Field, model_validator

from edge_agent.protocol.desired import SLOT_PATTERN
from fleet_server.api.schemas import RequestBody
from fleet_server.devices.selectors import Selector
from fleet_server.errors import InvalidInputError

__all__ = [
    "DEFAULT_PREDICTION_SHIFT",
    "EVIDENCE_SETTINGS",
    "GateSpec",
    "HilStageSpec",
    "RampSpec",
    "RateSpec",
    "RolloutCreate",
    "Strategy",
    "default_gates",
]

ROLLOUT_ID_PATTERN = r"^[0-9a-f]{16}$"


class Strategy(StrEnum):
    ALL_AT_ONCE = "all_at_once"
    CANARY = "canary"
    SHADOW = "shadow"
    STAGE_THEN_ACTIVATE = "stage_then_activate"
    AB = "ab"


#: Strategies the engine runs today.
SUPPORTED = frozenset(
    {
        Strategy.ALL_AT_ONCE,
        Strategy.CANARY,
        Strategy.SHADOW,
        Strategy.STAGE_THEN_ACTIVATE,
        Strategy.AB,
    }
)
DEFAULT_CANARY_STAGES = [1.0, 10.0, 50.0, 100.0]


class RampSpec(RequestBody):
    """Exponential ramp (as AWS IoT Jobs' ``exponentialRate``): start at
    ``base_per_minute``; each time ``after_succeeded`` more devices serve the version, multiply
    the rate by ``increase_factor`` (never above ``RateSpec.max_per_minute`` when set)."""

    base_per_minute: int = Field(ge=1, le=1_000_000)
    increase_factor: float = Field(gt=1, le=10)
    after_succeeded: int = Field(ge=1, le=1_000_000)


class RateSpec(RequestBody):
    #: At most this many devices are notified in any 60 s; None: no limit.
    max_per_minute: int | None = Field(default=None, ge=1, le=1_000_000)
    ramp: RampSpec | None = None


class GateSpec(RequestBody):
    """Health gates, each a threshold (None: off), judged on the devices of the current stage
    only. A breach aborts the rollout and rolls every touched device back."""

    #: At least this many of the stage's devices must have sent telemetry for the rollout
    #: before the stage can pass (judged when the bake time is over; at the stage timeout,
    #: too few is a breach).
    min_devices_reporting: int | None = Field(default=None, ge=0, le=10_000_000)
    #: Devices that failed to install (download, verify, self-test) or refused the document.
    max_install_failure_pct: float | None = Field(default=None, ge=0, le=100)
    #: Devices whose agent rolled the version back on probation.
    max_agent_rollback_pct: float | None = Field(default=None, ge=0, le=100)
    #: Devices that did not report the version within the stage timeout.
    max_timed_out_pct: float | None = Field(default=None, ge=0, le=100)
    #: Failed requests over all requests the stage's devices served with the version.
    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    #: p95 latency against the previous version's on the same profile (worst profile).
    max_latency_ratio: float | None = Field(default=None, gt=0)
    #: Worst PSI of any input or output group against the bundle's baseline.
    max_psi: float | None = Field(default=None, gt=0)
    #: Shadow strategy: top-1 agreement of the candidate with the active model.
    min_shadow_agreement: float | None = Field(default=None, ge=0, le=1)
    #: Canary, A/B and shadow: PSI of the candidate's predictions (top-1 class frequencies,
    #: or binned output values) against the version it replaces, over the same window and
    #: profile. On by default (:data:`DEFAULT_PREDICTION_SHIFT`) whenever the previous version
    #: has predictions in telemetry; ``null`` turns it off.
    max_prediction_shift: float | None = Field(default=None, gt=0)
    #: Online accuracy of the candidate (labels applications sent back), at least.
    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    #: The previous version's online accuracy minus the candidate's, at most.
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1)
    #: Telemetry gates judge a profile only once it served this many requests.
    min_requests: int = Field(default=100, ge=1, le=10**12)
    #: Accuracy gates judge a version only once this many of its predictions were labelled.
    min_labels: int = Field(default=100, ge=1, le=10**12)


#: PSI above 0.25 is the usual "a shift worth acting on"; an honest retrain that changes a
#: few percent of top-1 decisions scores ~0.01-0.03, a model that answers one class scores > 2.
DEFAULT_PREDICTION_SHIFT = 0.25
#: Strategies that compare the candidate's predictions with the previous version's by default.
SHIFT_STRATEGIES = frozenset({Strategy.CANARY, Strategy.AB, Strategy.SHADOW})
#: Settings that are not gates (thresholds of evidence).
EVIDENCE_SETTINGS = frozenset({"min_requests", "min_labels"})


def default_gates(strategy: Strategy) -> GateSpec:
    """Gates when the request names none: a staged rollout stops at the first failed install
    or agent rollback; all at once keeps today's behaviour (no gate)."""
    if strategy == Strategy.ALL_AT_ONCE:
        return GateSpec()
    if strategy == Strategy.SHADOW:
        return GateSpec(max_install_failure_pct=0, min_shadow_agreement=0.9)
    return GateSpec(max_install_failure_pct=0, max_agent_rollback_pct=0)


class HilStageSpec(RequestBody):
    """Stage 0 is a hardware-in-the-loop run: no fleet device is notified until the rig's
    runner has passed the version; a failed run aborts the rollout with its report linked, and
    no verdict within ``timeout_s`` (no runner, or one that died) fails the stage too."""

    rig: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    #: Scenarios by name (None: every one the rig's kind supports).
    scenarios: list[str] | None = Field(default=None, min_length=1, max_length=50)
    timeout_s: float = Field(default=1800, gt=0, le=7 * 86400)


class RolloutCreate(RequestBody):
    model: str = Field(min_length=1, max_length=128)
    version: str = Field(min_length=1, max_length=64)
    #: Explicit device ids (a fixed cohort)…
    devices: list[str] | None = Field(default=None, max_length=100_000)
    #: …or a selector: the set-based form (``hw=rpi4,site in (berlin,paris),!exempt``), or the
    #: older object of labels that must all match. The cohort is dynamic: devices that come to
    #: match while the rollout runs join it, devices that stop matching are released.
    selector: str | dict[str, str] | None = None
    #: The slot on the device; default: the model name (shadows: "<shadow_of>-shadow").
    slot: str | None = Field(default=None, pattern=SLOT_PATTERN)
    #: Shadow: the active slot whose live requests the candidate also runs on.
    shadow_of: str | None = Field(default=None, pattern=SLOT_PATTERN)
    sample_rate: float = Field(default=0.1, ge=0, le=1)
    strategy: Strategy = Field(default=Strategy.ALL_AT_ONCE, strict=False)
    #: Cumulative shares of the cohort, in percent, increasing, the last 100.
    stages: list[float] | None = Field(default=None, min_length=1, max_length=20)
    rate: RateSpec = Field(default_factory=RateSpec)
    gates: GateSpec | None = None
    #: After a stage's devices all serve (or ended), how long they serve before the gates
    #: are judged.
    bake_s: float = Field(default=0, ge=0, le=30 * 86400)
    #: A notified device that has not reported the version after this long is timed out.
    stage_timeout_s: float = Field(default=1800, gt=0, le=30 * 86400)
    #: Wait for ``promote`` after each passing stage instead of promoting automatically.
    manual_approval: bool = False
    #: A/B: the share of the cohort on the candidate (arm B), and how sure the verdict must be.
    split_pct: float | None = Field(default=None, gt=0, lt=100)
    min_confidence: float = Field(default=0.95, gt=0.5, lt=1)
    #: The active rollout on the same slot this one replaces (required when cohorts overlap).
    supersedes: str | None = Field(default=None, pattern=ROLLOUT_ID_PATTERN)
    #: A HIL stage before the fleet's first stage (a rig registered with the server).
    hil: HilStageSpec | None = None
    #: After the bake, how long a stage waits for every configured gate's evidence (requests,
    #: labels, predictions of both versions, reporting devices) before it stops…
    max_bake_s: float = Field(default=3600, gt=0, le=30 * 86400)
    #: …for approval (``promote``), or aborts with a fleet rollback.
    on_no_evidence: Literal["approval", "abort"] = "approval"
    #: Deploy a version whose inputs or outputs differ from what the slot serves (audited).
    allow_breaking: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> RolloutCreate:
        has_selector = self.selector is not None and self.selector != {}
        if bool(self.devices) == has_selector:
            raise InvalidInputError(
                "name the target devices either by 'devices' or by 'selector'", field="devices"
            )
        if self.strategy not in SUPPORTED:
            raise InvalidInputError(
                f"strategy {self.strategy!r} is not available yet; use one of "
                f"{', '.join(sorted(SUPPORTED))}",
                field="strategy",
            )
        if self.strategy == Strategy.SHADOW and self.shadow_of is None:
            raise InvalidInputError(
                "strategy 'shadow' needs shadow_of: the active slot it runs beside",
                field="shadow_of",
            )
        if self.shadow_of is not None and self.strategy in (
            Strategy.CANARY,
            Strategy.STAGE_THEN_ACTIVATE,
        ):
            raise InvalidInputError("shadow_of goes with strategy 'shadow'", field="shadow_of")
        if self.stages is not None:
            if self.strategy != Strategy.CANARY:
                raise InvalidInputError(
                    f"stages are for strategy 'canary'; {self.strategy} has one stage of 100 %",
                    field="stages",
                )
            previous = 0.0
            for i, pct in enumerate(self.stages):
                if not 0 < pct <= 100:
                    raise InvalidInputError(
                        f"stage {i + 1} is {pct} %: each stage is a share in (0, 100]",
                        field="stages",
                    )
                if pct <= previous:
                    raise InvalidInputError(
                        f"stage {i + 1} ({pct} %) does not increase on stage {i} ({previous} %)",
                        field="stages",
                    )
                previous = pct
            if self.stages[-1] != 100:
                raise InvalidInputError(
                    f"the last stage is {self.stages[-1]} %; it must be 100", field="stages"
                )
        if self.split_pct is not None and self.strategy != Strategy.AB:
            raise InvalidInputError("split_pct is for strategy 'ab'", field="split_pct")
        if self.strategy == Strategy.AB and self.bake_s <= 0:
            raise InvalidInputError(
                "strategy 'ab' holds its split for bake_s seconds: give bake_s > 0",
                field="bake_s",
            )
        if self.shadow_of is not None and self.strategy == Strategy.AB:
            raise InvalidInputError("shadow_of goes with strategy 'shadow'", field="shadow_of")
        if isinstance(self.selector, str):
            Selector.parse(self.selector)  # raises naming the character
        return self

    def cohort_selector(self) -> Selector | None:
        if self.selector is None:
            return None
        if isinstance(self.selector, str):
            return Selector.parse(self.selector)
        return Selector.from_labels(self.selector)

    def stage_list(self) -> list[float]:
        if self.strategy == Strategy.CANARY:
            return list(self.stages or DEFAULT_CANARY_STAGES)
        if self.strategy == Strategy.AB:
            return [self.split_pct or 50.0, 100.0]
        return [100.0]

    def effective_gates(self) -> GateSpec:
        gates = self.gates if self.gates is not None else default_gates(self.strategy)
        if self.strategy in SHIFT_STRATEGIES and (
            self.gates is None or "max_prediction_shift" not in self.gates.model_fields_set
        ):
            gates = gates.model_copy(update={"max_prediction_shift": DEFAULT_PREDICTION_SHIFT})
        return gates

    def plan(self) -> dict[str, Any]:
        """What the engine stores and runs by (JSON)."""
        return {
            "strategy": str(self.strategy),
            "stages": self.stage_list(),
            "rate": self.rate.model_dump(),
            "gates": self.effective_gates().model_dump(),
            "bake_s": self.bake_s,
            "stage_timeout_s": self.stage_timeout_s,
            "manual_approval": self.manual_approval,
            "sample_rate": self.sample_rate,
            "shadow_of": self.shadow_of,
            "min_confidence": self.min_confidence,
            "hil": self.hil.model_dump() if self.hil is not None else None,
            "max_bake_s": self.max_bake_s,
            "on_no_evidence": self.on_no_evidence,
            "allow_breaking": self.allow_breaking,
        }
