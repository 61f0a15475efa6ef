"""The real-time fraud predictor: Feast online features in, ONNX fraud probability out.

A ``kserve.Model`` named ``onnx-model`` served by ``kserve.ModelServer`` on ``settings.serve_port``
(one worker process, gRPC off). ``load`` finds the model version in the registry (the one named
by ``FRAUD_SERVE_MODEL_VERSION``, else the newest that passed the gate), fetches the ONNX artifact
(local path or ``s3://``), opens the Feast store (after copying a published snapshot from
``FRAUD_FEAST_SNAPSHOT_URI`` if set) and becomes ready only when a probe read and the model
session both work. Each scored request does exactly one online-store read and one ONNX run.

Wire formats
------------
``POST /v1/models/onnx-model:predict``

* one user: ``{"user_id": "user_0"}`` →
  ``{"user_id": "user_0", "prediction": [[0.0123]], "fraud": false,
  "model_name": "fraud-detection", "model_version": "..."}``
* a batch: ``{"user_ids": ["user_0", "user_1"]}`` →
  ``{"user_ids": [...], "prediction": [[p0], [p1]], "fraud": [false, true],
  "model_name": ..., "model_version": ...}``; rows in request order, duplicates allowed, at most
  ``FRAUD_MAX_BATCH_SIZE`` ids. ``prediction`` is always the model's ``[n, 1]`` output and
  ``fraud`` is ``prediction >= threshold`` (the threshold stored with the model).
  Every answer also carries ``request_id`` (v2: the response ``id``): the caller's
  ``X-Request-Id`` (or v2 request ``id``) if given, else a new one; scored requests are appended
  to the prediction log under it (``rest_predictor.served_log``, ``FRAUD_PREDICTION_LOG_*``).

* a new transaction: ``{"user_id": "user_0", "distance_from_home": 12.3,
  "distance_from_last_transaction": 0.4, "ratio_to_median_purchase_price": 1.9,
  "repeat_retailer": 1, "used_chip": 0, "used_pin_number": 0, "online_order": 1}`` (optional
  ``transaction_amount``, ``date_of_transaction``: ISO 8601, default now) → the same answer plus
  ``as_of`` and ``history`` (the six history features, derived from the card's history state as of
  that time, ``rest_predictor.history_store``); ``{"transactions": [...]}`` for a batch.

``POST /v2/models/onnx-model/infer`` (Open Inference Protocol): input ``user_id`` (BYTES
``[n]``) alone scores stored users; with the seven transaction fields as inputs of the same name
(FP32 / BOOL ``[n]``, optional ``date_of_transaction`` BYTES) it scores new transactions. JSON and
binary tensor bodies both work; a body without ``Inference-Header-Content-Length`` is JSON
whatever its content type. Outputs ``prediction`` (FP32 ``[n, 1]``) and ``fraud`` (BOOL ``[n]``),
``model_version`` set; ``GET /v2/models/onnx-model`` lists every input and output with datatype
and shape. kserve also serves ``/v2/health/ready``, ``/v1/models/onnx-model`` and ``/metrics``.

``POST /v1/transactions`` records ``{"user_id", "transaction_amount"[, "date_of_transaction"]}``
(or ``{"transactions": [...]}``) in the cards' history states, atomically per batch, and answers
``{"recorded": n}``; ``python -m rest_predictor.push`` is its CLI.

Errors are HTTP errors with body ``{"error": "<what was wrong>"}``, raised as ``kserve.errors``
types: 400 (``InvalidInput``) for a body that is not strict JSON (``NaN``, lone surrogates,
invalid UTF-8), a bad ``Inference-Header-Content-Length``, a request that does not fit the
schema, a missing, empty or non-string ``user_id``, ``user_ids`` not a non-empty list of strings,
both keys at once; 404 (``ModelNotFound``) when any requested user has no features in the online
store (the message lists them; a batch is answered whole or not at all); 413 for a batch above
the limit; 500 (``InferenceError``) for a broken feature value. The server keeps serving after
any of them (``tests/test_predictor_fuzz.py`` sends thousands of generated requests to check).

Run: ``uv run python -m rest_predictor.predictor [--port 8081] [--model-version V] [--feature-read auto|public|provider]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import logging
import threading
import time
import urllib.request
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import kserve
import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from kserve import InferRequest
from kserve.errors import InvalidInput
from starlette.exceptions import HTTPException

from fraud_common import history, schemas
from fraud_common.logs import get_logger, setup_logging
from fraud_common.registry import ModelRegistry, open_registry
from fraud_common.registry.serving import feature_settings, prepared_of
from fraud_common.settings import Settings
from rest_predictor import canary, metrics
from rest_predictor.errors import (
    BatchTooLarge,
    ClientErrorLogFilter,
    PredictorLoadError,
    UnknownUser,
    batch_too_large_handler,
    http_error_handler,
    validation_error_handler,
)
from rest_predictor.model_artifact import LoadedModel, resolve_version
from rest_predictor.online_features import FEATURE_READS, OnlineFeatureReader
from rest_predictor.history_store import (
    AsyncRedisHistory,
    HistoryStore,
    HistoryStoreError,
    Recorded,
    RedisHistoryStore,
    open_history_store,
    seed_from_prepared,
)
from rest_predictor.payloads import (
    USER_ID,
    USER_IDS,
    V2_INPUT,
    _checked_user_id,
    _decode_json,
    parse_v1,
    parse_v2,
    v1_response,
    v1_transaction_response,
    v2_response,
    v2_user_ids,
)
from rest_predictor.transactions import (
    Transactions,
    format_us,
    parse_json_transactions,
    parse_v2_transactions,
    v2_input_types,
    v2_output_types,
)
from rest_predictor.push import PUSH_PATH
from rest_predictor.served_log import ServedLog  # monitoring: request ids, metrics, prediction log
from rest_predictor.request_guard import GuardedDataPlane, StrictJsonMiddleware

log = get_logger(__name__)

SERVED_NAME = metrics.MODEL_NAME


@dataclass
class Scoring:
    """What ``preprocess`` hands to ``predict``: the users, their features and the request's form."""

    user_ids: list[str]
    features: np.ndarray
    batch: bool
    v2_request: InferRequest | None = None
    transactions: Transactions | None = None  # the transaction form: what was scored, as of when
    history_rows: np.ndarray | None = None  # [n, 6] float64 history features of the transactions


class FraudPredictor(kserve.Model):
    """Scores users by id: ``preprocess`` reads their features from Feast, ``predict`` runs ONNX.

    ``feature_read`` picks the online read: ``auto`` (the provider adapter on the Feast version it
    was checked against, else the public API), ``public`` or ``provider``; see
    ``rest_predictor.online_features``.
    """

    def __init__(
        self, settings: Settings, registry: ModelRegistry | None = None, name: str = SERVED_NAME,
        feature_read: str = "auto",
    ) -> None:
        super().__init__(name)
        self.settings = settings
        self.registry = registry  # None: open_registry(settings) at load time
        self.feature_read = feature_read
        self.model: LoadedModel | None = None
        self.features: OnlineFeatureReader | None = None
        self.history: HistoryStore | None = None
        self.async_history: AsyncRedisHistory | None = None  # the event loop's client of a Redis store
        self._columns: list[int] = []  # model input position -> position in schemas.MODEL_FEATURES
        self.traffic: canary.TrafficSplit | None = None  # champion and, during a canary, challenger
        self.control: canary.CanaryControl | None = None  # the loopback control routes' logic
        self.served_log = ServedLog()  # monitoring: replaced in load

    def _registry(self) -> ModelRegistry:
        if self.registry is None:
            self.registry = open_registry(self.settings)
        return self.registry

    def load(self) -> bool:
        """Resolve, fetch and open the model and the feature store; ready only if both work.

        The store is the one the version was registered with (``fraud_common.registry.serving``),
        in a folder of this predictor's own: later pipeline runs do not touch what it reads.
        """
        self.ready = False
        version = resolve_version(self._registry(), self.settings)
        served = canary.open_version(self.settings, version, self.feature_read, with_store=True)
        model, features = served.model, served.features
        try:
            history_store = open_history_store(self.settings)
            # From the data the served version was trained on (a run's prepared artifact).
            seed_from_prepared(history_store, self.settings, prepared_uri=prepared_of(version))
            history_store.read(["__readiness_probe__"])
        except (HistoryStoreError, OSError) as err:
            raise PredictorLoadError(f"the card history store cannot be used: {err}") from err
        if sorted(model.feature_names) != sorted(schemas.MODEL_FEATURES):
            raise PredictorLoadError(f"model takes {model.feature_names}; transactions give {list(schemas.MODEL_FEATURES)}")
        self.history = history_store
        self.use_champion(served)
        self.traffic = canary.TrafficSplit(served, canary.Fault.from_settings(self.settings))
        self.control = canary.CanaryControl(self.settings, self._registry, self.feature_read, self.traffic,
                                            self.use_champion)
        canary.watch_registry(self._registry, self.settings.model_name)
        self.served_log = ServedLog.open(self.settings, model, self.served_log)  # monitoring
        if isinstance(history_store, RedisHistoryStore):
            self.async_history = AsyncRedisHistory(history_store.url)
        self.ready = True
        log.info(
            "serving model %s version %s (%s), threshold %.4f, features from %s (%s)",
            model.model_name, model.version, model.artifact_uri, model.threshold,
            feature_settings(self.settings, version).feast_dir, type(features).__name__,
        )
        return self.ready

    def use_champion(self, served: "canary.ServedVersion") -> None:
        """Serve ``served``'s model and store from the next request on (one assignment each, on the loop)."""
        self._columns = [schemas.MODEL_FEATURES.index(name) for name in served.model.feature_names]
        self.model, self.features = served.model, served.features

    def preprocess(self, payload: dict | bytes | InferRequest, headers: dict[str, str] | None = None) -> Scoring:
        """Parse the v1 body or v2 ``InferRequest`` and read the users' features (one online read).

        Synchronous on purpose: for a single request kserve calls it on the event loop, with no
        thread hop; ``__call__`` runs it on a worker thread for a batch.
        Raises ``InvalidInput`` (400), ``BatchTooLarge`` (413) or ``UnknownUser`` (404).
        """
        features = self.features
        assert features is not None, "preprocess called before load"
        limit = self.settings.max_batch_size
        if isinstance(payload, (bytes, str)):
            payload = _decode_json(payload)
        txns = self.parse_transactions(payload)
        if txns is not None:
            return self.score_transactions(txns, self.history.read(txns.user_ids), _v2(payload))
        if isinstance(payload, InferRequest):
            user_ids, batch, v2_request = parse_v2(payload, limit), True, payload
        else:
            (user_ids, batch), v2_request = parse_v1(payload, limit), None
        rows, missing = features.read(user_ids)
        if missing:
            metrics.UNKNOWN_USERS.inc(len(missing))
            raise UnknownUser(missing)
        return Scoring(user_ids, rows, batch, v2_request)

    def parse_transactions(self, payload: Any) -> Transactions | None:
        """The transactions of a transaction-form request, or None for the stored-user form.

        v1: an object with keys other than ``user_id``/``user_ids``; v2: ``user_id`` with more inputs.
        """
        limit = self.settings.max_batch_size
        if isinstance(payload, InferRequest):
            inputs = payload.inputs or []
            if len(inputs) > 1 and any(i.name == V2_INPUT for i in inputs):
                ids = v2_user_ids(next(i for i in inputs if i.name == V2_INPUT), limit)
                return parse_v2_transactions(payload, ids)
            return None
        if isinstance(payload, dict) and set(payload) - {USER_ID, USER_IDS}:
            return parse_json_transactions(payload, limit, _checked_user_id)
        return None

    async def __call__(self, body: Any, headers: dict[str, str] | None = None, verb: Any = None) -> Any:
        """kserve's call, except for two kinds of request that would block the event loop:

        * a batch (``user_ids``, ``transactions``, a v2 input of more than one row) is read and
          scored on a worker thread (``asyncio.to_thread``): its one store read and one ONNX run
          take milliseconds, during which the loop keeps answering single requests;
        * a single transaction over a Redis store awaits its history read (``redis.asyncio``).

        A single stored-user request stays on kserve's path, on the loop, with no thread hop.
        Either way the work is ``preprocess``/``predict``, the same code."""
        from kserve.model import InferenceVerb

        verb = InferenceVerb.PREDICT if verb is None else verb
        if verb != InferenceVerb.PREDICT:
            return await super().__call__(body, headers, verb)
        payload = _decode_json(body) if isinstance(body, (bytes, str)) else body
        if isinstance(payload, InferRequest):
            batch = any(len(i.shape) and int(np.prod(i.shape)) > 1 for i in payload.inputs or [])
        else:
            batch = isinstance(payload, dict) and ("user_ids" in payload or "transactions" in payload)
        if batch:
            scoring = await asyncio.to_thread(self.preprocess, payload, headers)
            if inspect.iscoroutinefunction(self.predict):
                return await self.predict(scoring, headers), {}
            return await asyncio.to_thread(self.predict, scoring, headers), {}
        if self.async_history is None:
            return await super().__call__(payload, headers, verb)
        txns = self.parse_transactions(payload)
        if txns is None:
            return await super().__call__(payload, headers, verb)
        states = await self.async_history.read(txns.user_ids)
        return self.predict(self.score_transactions(txns, states, _v2(payload)), headers), {}

    def score_transactions(
        self, txns: Transactions, states: list[history.HistoryState], v2_request: InferRequest | None = None
    ) -> Scoring:
        """The model inputs of new transactions: their own fields and their cards' history states
        (one store read) as of each transaction's time. ``InvalidInput`` for a time before the
        card's latest recorded transaction (the store cannot tell what was known then)."""
        assert txns.fields is not None
        rows = np.empty((len(states), len(schemas.MODEL_FEATURES)), dtype=np.float32)
        rows[:, : txns.fields.shape[1]] = txns.fields
        history_rows = np.empty((len(states), len(schemas.HISTORY_FEATURES)), dtype=np.float64)
        for i, (state, when) in enumerate(zip(states, txns.when_us.tolist())):
            if state.count and when < state.last_us:
                raise InvalidInput(
                    f"date_of_transaction {format_us(when)} of {txns.user_ids[i]!r} is before the card's latest "
                    f"recorded transaction ({format_us(state.last_us)}); history is known only as of a later time"
                )
            history_rows[i] = history.history_features(state, when)
        rows[:, txns.fields.shape[1] :] = history_rows
        return Scoring(txns.user_ids, rows[:, self._columns], txns.batch, v2_request, txns, history_rows)

    async def record(self, txns: Transactions) -> None:
        """Record pushed transactions in their cards' histories (one atomic store update)."""
        assert self.history is not None and txns.amounts is not None
        recorded = [
            Recorded(user_id, amount, when)
            for user_id, amount, when in zip(txns.user_ids, txns.amounts.tolist(), txns.when_us.tolist())
        ]
        if self.async_history is not None:
            await self.async_history.record(recorded)
        else:
            self.history.record(recorded)  # SQLite: in-process, a fraction of a millisecond

    def get_input_types(self) -> list[dict]:
        """v2 metadata: every input the v2 route takes (see ``rest_predictor.transactions``)."""
        return v2_input_types()

    def get_output_types(self) -> list[dict]:
        """v2 metadata: the outputs of every v2 answer."""
        return v2_output_types()

    def validate(self, payload: Any) -> Any:
        """``preprocess`` has checked the request; kserve's generic payload checks do not apply."""
        return payload

    def predict(self, payload: Scoring, headers: dict[str, str] | None = None) -> Any:
        """Score the preprocessed users and answer in the request's form (v1 dict or v2 ``InferResponse``)."""
        traffic = self.traffic
        assert traffic is not None, "predict called before load"
        # The champion, or the challenger for its share of a canary (rest_predictor.canary).
        scores, model = traffic.score(payload.features, payload.user_ids)
        metrics.SCORED_USERS.inc(len(payload.user_ids))
        if payload.v2_request is not None:
            response = v2_response(payload.v2_request, scores, model.threshold, self.name, model.version)
        elif payload.transactions is not None:
            response = v1_transaction_response(
                payload.transactions, payload.history_rows, scores, model.threshold, model.model_name, model.version
            )
        else:
            response = v1_response(payload.user_ids, payload.batch, scores, model.threshold, model.model_name, model.version)
        # monitoring: request id, metrics, prediction log
        return self.served_log.finish(response, payload.user_ids, payload.features, scores, model, payload.v2_request, headers)

    def stop(self) -> None:
        """kserve's shutdown hook (ModelServer.stop unloads each model): flush the prediction log."""
        self.served_log.close()  # monitoring
        super().stop()


def _v2(payload: Any) -> InferRequest | None:
    return payload if isinstance(payload, InferRequest) else None


def build_server(settings: Settings, predictor: FraudPredictor | None = None) -> kserve.ModelServer:
    """A one-process ModelServer on ``settings.serve_port`` with request guards, metrics and two handlers.

    kserve serves one global FastAPI app and maps its own error types there; we add only what it
    lacks: a 413, a 400 in place of FastAPI's 422 (which fails on ``NaN`` or surrogates), the
    framework's 4xx in the same ``{"error": ...}`` form, a strict JSON check in front of the
    inference routes, and a data plane whose decode failures are 400s.
    """
    from kserve.model_server import app

    server = kserve.ModelServer(
        http_port=settings.serve_port, enable_grpc=False, workers=1, enable_latency_logging=False
    )
    # The REST server is built from this attribute in start(): kserve's decode, with its failures as 400s.
    server.dataplane = GuardedDataPlane(model_registry=server.registered_models)
    # kserve's routes still use a response class FastAPI now deprecates; nothing for us to change.
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    # Per-request log lines cost more than the prediction itself: keep them below INFO.
    for chatty in ("kserve.trace", "uvicorn.access"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    logging.getLogger("kserve").addFilter(ClientErrorLogFilter())
    app.add_exception_handler(BatchTooLarge, batch_too_large_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_middleware(StrictJsonMiddleware)
    if predictor is not None:
        add_push_route(app, predictor)
        canary.add_canary_routes(app, lambda: predictor.control)
    app.add_middleware(metrics.RequestMetricsMiddleware)  # added last = outermost: counts the guard's 400s too
    return server


def add_push_route(app, predictor: FraudPredictor) -> None:  # noqa: ANN001 - FastAPI
    """``POST /v1/transactions``: record one transaction or ``{"transactions": [...]}`` in the cards' histories.

    A transaction to record needs ``user_id`` and ``transaction_amount``; ``date_of_transaction``
    defaults to now; the model's fields may come along (checked, not stored). Answers
    ``{"recorded": n}``; bad bodies are 400s naming the field, too many transactions a 413.
    """
    async def push(request: Request) -> JSONResponse:
        body = _decode_json(await request.body())
        if not isinstance(body, dict):
            raise InvalidInput(f"push body must be a JSON object (a transaction or {{\"transactions\": [...]}}), got {type(body).__name__}")
        txns = parse_json_transactions(body, predictor.settings.max_batch_size, _checked_user_id, for_push=True)
        await predictor.record(txns)
        return JSONResponse({"recorded": len(txns.user_ids)})

    app.add_api_route(PUSH_PATH, push, methods=["POST"], summary="Record transactions in the cards' histories")


def serve(
    settings: Settings,
    registry: ModelRegistry | None = None,
    on_ready: Callable[[], None] | None = None,
    feature_read: str = "auto",
) -> None:
    """Load the predictor and serve it until Ctrl-C / SIGTERM; raises ``PredictorLoadError`` if not ready.

    ``on_ready`` is called once the HTTP server answers its readiness route.
    """
    predictor = FraudPredictor(settings, registry, feature_read=feature_read)
    predictor.load()
    server = build_server(settings, predictor)
    use_uvloop()

    def ready() -> None:
        freeze_loaded_heap()
        if on_ready is not None:
            on_ready()

    threading.Thread(target=_call_when_ready, args=(settings.serve_port, ready), daemon=True).start()
    log.info("predictor listening on port %d (model %s)", settings.serve_port, SERVED_NAME)
    server.start([predictor])


def _call_when_ready(port: int, on_ready: Callable[[], None], timeout_seconds: float = 120.0) -> None:
    """Poll the v2 readiness route on loopback, then call ``on_ready`` once."""
    url = f"http://127.0.0.1:{port}/v2/models/{SERVED_NAME}/ready"
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    on_ready()
                    return
        except OSError:
            pass
        time.sleep(0.2)
    log.error("predictor did not answer %s within %.0fs", url, timeout_seconds)


def check_loadable(settings: Settings, registry: ModelRegistry | None = None) -> None:
    """Load the predictor once without serving: the local form of a deployment's readiness check."""
    FraudPredictor(settings, registry).load()


def freeze_loaded_heap() -> None:
    """Move everything the ready server holds (Feast, ONNX Runtime, pandas, the model, the app) out
    of the collector's reach. Requests awaiting a store read outlive the young generations, so full collections come
    often; without this each one walks the whole loaded heap (~80 ms here, the p99 of the Redis path)."""
    gc.collect()
    gc.freeze()


def use_uvloop() -> None:
    """Run the server on uvloop when installed: ModelServer.start uses ``asyncio.run``, so the
    policy decides the loop, and uvloop's transports cost far less per request than asyncio's."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    # ModelServer.setup_event_loop asks for the current loop before asyncio.run; give it one.
    asyncio.set_event_loop(asyncio.new_event_loop())


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m rest_predictor.predictor [--port N] [--model-version V] [--log-level L]``."""
    parser = argparse.ArgumentParser(description="Serve the registered fraud model over HTTP (KServe).")
    parser.add_argument("--port", type=int, help="HTTP port (default: FRAUD_SERVE_PORT)")
    parser.add_argument("--model-version", help="registered version to serve (default: newest that passed the gate)")
    parser.add_argument("--log-level", help="log level (default: FRAUD_LOG_LEVEL)")
    parser.add_argument(
        "--feature-read", choices=FEATURE_READS, default="auto",
        help="online read: auto (default: the bulk read of Feast's layout on the Feast version it was "
        "checked against, else get_online_features), bulk, provider (Feast's provider online_read) or public",
    )
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    overrides: dict[str, object] = {}
    if args.port is not None:
        overrides["serve_port"] = args.port
    if args.model_version:
        overrides["serve_model_version"] = args.model_version
    if args.log_level:
        overrides["log_level"] = args.log_level
    settings = settings.with_overrides(**overrides)
    setup_logging(settings.log_level)
    try:
        serve(settings, feature_read=args.feature_read)
    except PredictorLoadError as err:
        log.error("predictor not ready: %s", err)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
