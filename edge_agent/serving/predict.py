"""The in-process serving path: run a request on the model a slot serves, and count it.

The HTTP and Unix servers are thin layers on :func:`predict`. Every outcome is counted in the
model's :class:`~edge_agent.serving.stats.ModelStats` (probation reads them): latency, runtime
errors, NaN/inf outputs. A caller's bad input (``RequestError``) is not the model's fault and
is not counted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from edge_agent.contracts.errors import RuntimeBackendError
from edge_agent.protocol.status import VersionRef
from edge_agent.protocol.telemetry import Workload
from edge_agent.serving.stats import ModelStats
from edge_agent.serving.table import ServingModel, SlotTable
from edge_agent.telemetry.figures import ModelTelemetry

__all__ = ["Prediction", "predict", "run_counted"]


@dataclass(slots=True)
class Prediction:
    outputs: dict[str, np.ndarray]
    ref: VersionRef
    latency_ms: float
    #: The id a label from the application names (None: feedback is off).
    request_id: str | None = None


def predict(
    table: SlotTable,
    name: str,
    feeds: dict[str, np.ndarray],
    workload: Workload | None = None,
) -> Prediction:
    """The in-process serving path (the HTTP API is a thin layer on this). A ``workload``
    (batch, stream) is counted in its own lane of the model, and its answers are neither kept
    for labels nor offered to a shadow (those compare versions on online requests)."""
    serving = table.acquire(name)  # not table.use(): a generator costs µs on the hot path
    try:
        if workload is None:
            result = run_counted(serving, feeds, serving.stats, serving.telemetry)
        else:
            lane = table.lane(serving, workload)
            return run_counted(serving, feeds, lane.stats, lane.telemetry)
    finally:
        serving._release()
    feedback = table.feedback
    if feedback is not None:
        result.request_id = feedback.answered(serving.answer_key, serving.classes, result.outputs)
    if table._shadows:
        slot = table.resolve(name)
        if slot is not None:
            table.offer_shadow(slot, feeds, result.outputs, result.latency_ms, result.request_id)
    return result


def run_counted(
    serving: ServingModel,
    feeds: dict[str, np.ndarray],
    stats: ModelStats,
    telemetry: ModelTelemetry | None = None,
) -> Prediction:
    """Run and record the outcome in ``stats`` (latency, runtime errors, NaN/inf outputs) and
    in ``telemetry`` (live traffic's; the agent's probes have none). A caller's bad input
    (RequestError) is not the model's fault and is not counted."""
    start = time.perf_counter()
    try:
        outputs = serving.model.run(feeds)
    except RuntimeBackendError:
        stats.record(None, error=True)
        raise
    latency_ms = (time.perf_counter() - start) * 1000
    stats.record(latency_ms, outputs=outputs)
    if telemetry is not None:
        telemetry.record(latency_ms, feeds, outputs)
    return Prediction(outputs, serving.ref, latency_ms)
