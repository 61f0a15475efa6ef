"""Prometheus metrics of the predictor, in the default registry that kserve's ``/metrics`` serves.

kserve's ModelServer exports only latency histograms of its own steps; these say what the
predictor decided and for whom:

* ``fraud_predictor_http_requests_total{route, status}``: every request to the model's routes
  (``v1_predict``, ``v2_infer``, ``push``), by HTTP status, counted in a pure-ASGI middleware so
  requests rejected before ``predict`` runs (malformed JSON, v2 schema errors) are counted too.
  The error rate is the share with ``status=~"5.."``.
* ``fraud_predictor_requests_total{outcome}``: the inference requests by outcome (ok,
  bad_request, unknown_user, too_large, error), and their latency histogram.
* ``fraud_predictor_scores``: a histogram of every scored user's fraud probability (observed a
  request at a time with numpy, not a user at a time), ``fraud_predictor_decisions_total{decision}``,
  ``fraud_predictor_unknown_users_total`` and ``fraud_predictor_feature_missing_total{feature}``
  (a served feature that is not a finite number).
* ``fraud_predictor_model_info{model_name, model_version}``: 1 for the version being served.

``REQUEST_STARTED`` carries the time the middleware saw the request's first byte to the code
that logs the prediction (``rest_predictor.served_log``), so the logged latency is the request's.
"""

from __future__ import annotations

import threading
import time
from contextvars import ContextVar
from typing import Any, Awaitable, Callable, Iterator, Sequence

import numpy as np
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from rest_predictor.push import PUSH_PATH  # a light module: no kserve

MODEL_NAME = "onnx-model"

REQUESTS = Counter(
    "fraud_predictor_requests",
    "Inference requests answered, by outcome (ok, bad_request, unknown_user, too_large, error).",
    ["outcome"],
)
HTTP_REQUESTS = Counter(
    "fraud_predictor_http_requests",
    "Requests to the model's routes (v1_predict, v2_infer, push), by route and HTTP status.",
    ["route", "status"],
)
UNKNOWN_USERS = Counter(
    "fraud_predictor_unknown_users",
    "User ids asked for that have no features in the online store.",
)
SCORED_USERS = Counter("fraud_predictor_scored_users", "User ids scored (a batch counts each user).")
DECISIONS = Counter("fraud_predictor_decisions", "Scored users by decision (fraud, legit).", ["decision"])
FEATURE_MISSING = Counter(
    "fraud_predictor_feature_missing",
    "Served feature values that were not a finite number, by feature.",
    ["feature"],
)
MODEL_INFO = Gauge(
    "fraud_predictor_model_info",
    "1 for the model version this predictor serves.",
    ["model_name", "model_version"],
)
# Fine-grained where a healthy predictor lives (0.5-50 ms), coarse above.
LATENCY = Histogram(
    "fraud_predictor_request_latency_seconds",
    "Time from request start to response end for inference requests.",
    buckets=(
        0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.0075,
        0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    ),
)
# Upper bounds of the score histogram: tenths, finer in the top tenth where decisions are made.
SCORE_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

OUTCOMES = {200: "ok", 400: "bad_request", 422: "bad_request", 404: "unknown_user", 413: "too_large"}
# Pre-bound children: no label lookup per request.
_OUTCOME_COUNTERS = {status: REQUESTS.labels(outcome) for status, outcome in OUTCOMES.items()}
_ERROR_COUNTER = REQUESTS.labels("error")
for _outcome in ("ok", "bad_request", "unknown_user", "too_large"):
    REQUESTS.labels(_outcome)  # export every outcome from the start, at 0
_FRAUD, _LEGIT = DECISIONS.labels("fraud"), DECISIONS.labels("legit")

_V1_SUFFIX = f"/{MODEL_NAME}:predict"
_V2_SUFFIX = f"/{MODEL_NAME}/infer"

# Set by the middleware for each request it sees (perf_counter seconds); None outside a request.
REQUEST_STARTED: ContextVar[float | None] = ContextVar("fraud_request_started", default=None)

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


class ScoreHistogram(Collector):
    """A Prometheus histogram of scores that takes a whole request's scores in one numpy call.

    ``prometheus_client.Histogram.observe`` costs a lock and a bucket search per value; a batch of
    1,000 users would pay that 1,000 times on the request path.
    """

    name = "fraud_predictor_scores"

    def __init__(self, buckets: Sequence[float] = SCORE_BUCKETS) -> None:
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._counts = np.zeros(len(self.bounds) + 1, dtype=np.int64)  # last: above the top bound (+Inf)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, scores: np.ndarray) -> None:
        """Count every score of a request (any shape)."""
        values = np.asarray(scores, dtype=np.float64).ravel()
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self._counts))
        total = float(values.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self._counts).tolist()
            total = self._sum
        buckets = [(repr(float(b)), c) for b, c in zip(self.bounds.tolist(), cumulative)] + [("+Inf", cumulative[-1])]
        yield HistogramMetricFamily(self.name, "Fraud probability of every scored user.", buckets=buckets, sum_value=total)


SCORES = ScoreHistogram()
REGISTRY.register(SCORES)


def observe_scored(scores: np.ndarray, decisions: np.ndarray, features: np.ndarray, feature_names: Sequence[str]) -> None:
    """Count one scored request: its scores, its decisions and any feature that was not finite."""
    SCORES.observe(scores)
    fraud = int(np.count_nonzero(decisions))
    if fraud:
        _FRAUD.inc(fraud)
    if len(decisions) - fraud:
        _LEGIT.inc(len(decisions) - fraud)
    finite = np.isfinite(features)
    if not finite.all():
        for name, bad in zip(feature_names, (~finite).sum(axis=0).tolist()):
            if bad:
                FEATURE_MISSING.labels(name).inc(bad)


_served: list[tuple[str, str]] = []  # the labels of the info series exported now


def set_model_info(model_name: str, model_version: str) -> None:
    """Export the served version as the only ``fraud_predictor_model_info`` series.

    Removes the previous series by its labels: ``clear()`` warns once Feast has switched
    prometheus_client's environment to multi-process mode (``feast.metrics`` sets the variable).
    """
    for labels in _served:
        MODEL_INFO.remove(*labels)
    _served[:] = [(model_name, model_version)]
    MODEL_INFO.labels(model_name, model_version).set(1)


def is_inference_path(path: str) -> bool:
    """Whether ``path`` is one of the served model's inference routes (v1 predict, v2 infer)."""
    return path.endswith(_V1_SUFFIX) or path.endswith(_V2_SUFFIX)


def route_of(path: str) -> str | None:
    """The route label of a path the metrics count, or None for the rest (health, metadata, /metrics)."""
    if path.endswith(_V1_SUFFIX):
        return "v1_predict"
    if path.endswith(_V2_SUFFIX):
        return "v2_infer"
    if path == PUSH_PATH:
        return "push"
    return None


_HTTP_COUNTERS: dict[tuple[str, int], Any] = {}


def _http_counter(route: str, status: int) -> Any:
    counter = _HTTP_COUNTERS.get((route, status))
    if counter is None:  # a handful of (route, status) pairs: bound once each
        counter = _HTTP_COUNTERS[(route, status)] = HTTP_REQUESTS.labels(route, str(status))
    return counter


for _route in ("v1_predict", "v2_infer", "push"):
    _http_counter(_route, 200)  # export the routes from the start, at 0


class RequestMetricsMiddleware:
    """Counts the model's requests by route and status (inference ones by outcome too) and times them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        route = route_of(scope["path"]) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        token = REQUEST_STARTED.set(started)
        status = 500

        async def send_and_note_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            REQUEST_STARTED.reset(token)
            _http_counter(route, status).inc()
            if route != "push":
                _OUTCOME_COUNTERS.get(status, _ERROR_COUNTER).inc()
                LATENCY.observe(time.perf_counter() - started)
