"""Serving: the models a device answers with, and the local API in front of them.

table.py    slot → loaded model; atomic swap; in-flight requests finish on the old model
predict.py  the in-process request path, counted per model
stats.py    per-model counters (requests, errors, NaN/inf, latency) that probation reads
shadow.py   a candidate running beside the active model on sampled requests
feedback.py request ids, answers kept for labels, labels joined and counted
http.py     the local HTTP/1.1 and Unix-socket API
codec.py    the API's tensor encodings (shared with the client)
metrics.py  the agent's Prometheus metrics (GET /metrics), read at scrape time
client.py   a small Python client for the local API
"""

from edge_agent.serving.feedback import FeedbackStore
from edge_agent.serving.http import (
    MAX_BODY_BYTES,
    InferenceHTTPServer,
    InferenceUnixServer,
    start_http,
    start_unix,
)
from edge_agent.serving.predict import Prediction, predict, run_counted
from edge_agent.serving.stats import ModelStats, StatsSnapshot
from edge_agent.serving.table import ServingModel, SlotTable

__all__ = [
    "MAX_BODY_BYTES",
    "FeedbackStore",
    "InferenceHTTPServer",
    "InferenceUnixServer",
    "ModelStats",
    "Prediction",
    "ServingModel",
    "SlotTable",
    "StatsSnapshot",
    "predict",
    "run_counted",
    "start_http",
    "start_unix",
]
