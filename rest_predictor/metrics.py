"""Prometheus metrics of the predictor, in the default registry that kserve's ``/metrics`` serves.

A small pure-ASGI middleware (no per-request allocation beyond a closure) classifies every
inference request by its HTTP status, so requests rejected before ``predict`` runs (malformed
JSON, v2 schema errors) are counted too, and times it from the first byte in to the last out.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from prometheus_client import Counter, Histogram

MODEL_NAME = "onnx-model"

REQUESTS = Counter(
    "fraud_predictor_requests",
    "Inference requests answered, by outcome (ok, bad_request, unknown_user, too_large, error).",
    ["outcome"],
)
UNKNOWN_USERS = Counter(
    "fraud_predictor_unknown_users",
    "User ids asked for that have no features in the online store.",
)
SCORED_USERS = Counter("fraud_predictor_scored_users", "User ids scored (a batch counts each user).")
# Fine-grained where a healthy predictor lives (0.5-50 ms), coarse above.
LATENCY = Histogram(
    "fraud_predictor_request_latency_seconds",
    "Time from request start to response end for inference requests.",
    buckets=(
        0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075,
        0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ),
)

OUTCOMES = {200: "ok", 400: "bad_request", 422: "bad_request", 404: "unknown_user", 413: "too_large"}
# Pre-bound children: no label lookup per request.
_OUTCOME_COUNTERS = {status: REQUESTS.labels(outcome) for status, outcome in OUTCOMES.items()}
_ERROR_COUNTER = REQUESTS.labels("error")
for _outcome in ("ok", "bad_request", "unknown_user", "too_large"):
    REQUESTS.labels(_outcome)  # export every outcome from the start, at 0

_V1_SUFFIX = f"/{MODEL_NAME}:predict"
_V2_SUFFIX = f"/{MODEL_NAME}/infer"

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


def is_inference_path(path: str) -> bool:
    """Whether ``path`` is one of the served model's inference routes (v1 predict, v2 infer)."""
    return path.endswith(_V1_SUFFIX) or path.endswith(_V2_SUFFIX)


class RequestMetricsMiddleware:
    """Counts inference requests by outcome and observes their latency."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not is_inference_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            _OUTCOME_COUNTERS.get(status, _ERROR_COUNTER).inc()
            LATENCY.observe(time.perf_counter() - started)
