"""What the predictor does with a scored request besides answering it: give it a request id,
count it in the metrics and append it to the prediction log (``fraud_common.prediction_log``).

``FraudPredictor`` calls ``ServedLog.open`` in ``load``, ``finish`` at the end of ``predict`` and
``close`` when the server stops, so this stays out of the predictor's own code.

Request ids: an incoming ``X-Request-Id`` header (or the v2 request's ``id``) is kept when it is
a short printable string; otherwise a fresh one is made. v1 answers carry it as
``request_id``, v2 answers as ``id``; ``fraud-detection feedback`` joins labels on it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Sequence

import numpy as np
from kserve import InferRequest, InferResponse

from fraud_common import prediction_log as plog
from fraud_common.logs import get_logger
from fraud_common.settings import Settings
from rest_predictor import metrics
from rest_predictor.errors import PredictorLoadError
from rest_predictor.model_artifact import LoadedModel
from rest_predictor.payloads import REQUEST_ID

log = get_logger(__name__)

REQUEST_ID_HEADER = "x-request-id"  # kserve hands predict the headers with lower-case names
MAX_REQUEST_ID_LENGTH = 128


def usable_request_id(value: object) -> str | None:
    """``value`` if it can serve as a request id (1-128 printable ASCII characters), else None."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_REQUEST_ID_LENGTH:
        return None
    return value if value.isascii() and value.isprintable() and value.strip() == value else None


def request_id_of(headers: dict[str, str] | None, v2_request: InferRequest | None) -> str:
    """The caller's request id (v2 ``id`` first, then ``X-Request-Id``), or a new one."""
    for candidate in (v2_request.id if v2_request is not None else None, (headers or {}).get(REQUEST_ID_HEADER)):
        kept = usable_request_id(candidate)
        if kept is not None:
            return kept
    return uuid.uuid4().hex


class ServedLog:
    """The request-id, metrics and prediction-log step of ``predict``; ``writer`` None: no log."""

    def __init__(self, writer: plog.PredictionLogWriter | None = None) -> None:
        self.writer = writer

    @classmethod
    def open(cls, settings: Settings, model: LoadedModel, previous: "ServedLog | None" = None) -> "ServedLog":
        """Start the log the settings name (closing ``previous``) and export the served version."""
        if previous is not None:
            previous.close()
        metrics.set_model_info(model.model_name, model.version)
        try:
            config = plog.config_from_settings(settings)
            if config is None:
                log.info("prediction log off")
                return cls(None)
            writer = plog.PredictionLogWriter(config, settings, model.feature_names)
        except plog.PredictionLogError as err:  # a bad FRAUD_PREDICTION_LOG_* value: not ready, one line
            raise PredictorLoadError(f"prediction log: {err}") from None
        log.info("prediction log: %s (sample rate %g, at most %d rows or %gs in memory)",
                 config.uri, config.sample_rate, config.max_rows, config.max_seconds)
        return cls(writer)

    def finish(
        self,
        response: Any,
        user_ids: Sequence[str],
        features: np.ndarray,
        scores: np.ndarray,
        model: LoadedModel,
        v2_request: InferRequest | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """Give ``response`` its request id, count the request and queue it for the log; returns the response.

        ``features`` are the model's inputs as served (model order), ``scores`` its ``[n, 1]`` output.
        """
        request_id = request_id_of(headers, v2_request)
        decisions = scores.reshape(-1) >= model.threshold
        metrics.observe_scored(scores, decisions, features, model.feature_names)
        if self.writer is not None:
            started = metrics.REQUEST_STARTED.get()
            latency = time.perf_counter() - started if started is not None else 0.0
            self.writer.append(request_id, user_ids, features, scores, decisions, model.model_name, model.version, latency)
        if isinstance(response, InferResponse):
            response.id = request_id
        else:
            response[REQUEST_ID] = request_id
        return response

    def close(self) -> None:
        """Write every buffered row (a clean shutdown loses nothing)."""
        if self.writer is not None:
            self.writer.close()
            log.info("prediction log closed: %d rows written in %d files, %d dropped, %d failed",
                     self.writer.written_rows, self.writer.written_files, self.writer.dropped_rows, self.writer.failed_rows)
