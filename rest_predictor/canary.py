"""Champion and challenger in one predictor: the traffic split, its checks' figures, reload, metrics.

The embedded predictor hosts the champion and, during a canary, the challenger. ``TrafficSplit``
sends a request to the challenger when a stable hash of its first user id falls below the
canary's percentage (so a card keeps one version during a step), times each version's scoring,
counts its errors, and scores every challenger request with the champion too (a shadow run on
the same rows: the challenger's decisions and score distribution are compared with the
champion's on exactly that traffic). During a canary the challenger reads the live store, the
champion's; its own store becomes live with it at promotion (``reload``), model, threshold and
features swapped in one event-loop step.

Control routes (loopback clients only: the canary driver runs beside the predictor; on a cluster
the InferenceGraph splits traffic and these stay closed):

* ``GET /v1/canary``: hosted versions, percentage and the current step's figures;
* ``PUT /v1/canary`` ``{"version": V, "percent": P}``: host V as challenger at P %, new step;
* ``DELETE /v1/canary``: every request back to the champion, the challenger unloaded;
* ``POST /v1/canary/benchmark`` ``{"version": V, "requests": N}``: the latency gate's figures,
  both versions' p99 over the same N stored-user requests (features read + ONNX) in this process;
* ``POST /v1/reload``: serve the registry's champion now (after ``promote`` or ``rollback``).

Fault injection (drills and the rollback scenario): ``FRAUD_FAULT_VERSION`` names a version that
answers ``FRAUD_FAULT_ERROR_RATE`` of its requests with a 500 and sleeps ``FRAUD_FAULT_DELAY_MS``
per request. Empty by default; a production predictor never sets them.

Prometheus (kserve's ``/metrics``), every series labelled by ``model_version``:
``fraud_model_requests_total{outcome}``, ``fraud_model_scoring_seconds``, ``fraud_model_score``,
``fraud_model_traffic_percent``, ``fraud_model_served{alias}``, ``fraud_model_gate_passed{gate}``,
``fraud_model_gate_value{gate}``, ``fraud_canary_decisions_total{decision}``, and for every
registered version (read from the registry every 30 s and on reload, so refused versions that are
never hosted show too) ``fraud_model_version_status{status}`` and its gate gauges.
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse
from kserve.errors import InferenceError, InvalidInput
from prometheus_client import Counter, Gauge, Histogram

from fraud_common.logs import get_logger
from fraud_common.registry import CHALLENGER, CHAMPION, ModelRegistry, ModelVersion, RegistryError
from fraud_common.registry.lifecycle import refusal
from fraud_common.registry.rollout import StepStats, VersionStats
from fraud_common.registry.serving import definitions_of, feature_settings
from fraud_common.settings import Settings
from rest_predictor.errors import PredictorLoadError
from rest_predictor.model_artifact import LoadedModel, fetch_artifact, open_session
from rest_predictor.online_features import OnlineFeatureReader

log = get_logger(__name__)

CANARY_PATH = "/v1/canary"
BENCHMARK_PATH = "/v1/canary/benchmark"
RELOAD_PATH = "/v1/reload"
DECISION_PATH = "/v1/canary/decisions"
LOOPBACK = {"127.0.0.1", "::1", "localhost"}
# Figures kept per step (a step is judged on its latest rows; memory stays bounded).
WINDOW = 20_000

MODEL_REQUESTS = Counter("fraud_model_requests", "Requests scored, by model version and outcome (ok, error).",
                         ["model_version", "outcome"])
SCORING_SECONDS = Histogram(
    "fraud_model_scoring_seconds", "Time a model version takes to score one request.", ["model_version"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
SCORES = Histogram("fraud_model_score", "Fraud probabilities answered, by model version.", ["model_version"],
                   buckets=tuple(round(0.05 * i, 2) for i in range(1, 21)))
TRAFFIC_PERCENT = Gauge("fraud_model_traffic_percent", "Share of requests sent to a model version.", ["model_version"])
SERVED = Gauge("fraud_model_served", "1 for each hosted version, labelled by its alias.", ["model_version", "alias"])
GATE_PASSED = Gauge("fraud_model_gate_passed", "Gate results recorded on a hosted version (1 passed).",
                    ["model_version", "gate"])
GATE_VALUE = Gauge("fraud_model_gate_value", "The challenger's figure each gate compared.", ["model_version", "gate"])
DECISION_KINDS = ("gate_passed", "gate_refused", "step_passed", "step_failed", "promoted", "rolled_back")
DECISIONS = Counter("fraud_canary_decisions", "Canary decisions: " + ", ".join(DECISION_KINDS) + ".",
                    ["model_version", "decision"])


@dataclass
class ServedVersion:
    """A hosted version: its registry record, its ONNX session and (champion only) its feature store."""

    record: ModelVersion
    model: LoadedModel
    features: OnlineFeatureReader | None = None

    @property
    def version(self) -> str:
        return self.record.version


def open_version(settings: Settings, record: ModelVersion, feature_read: str, with_store: bool) -> ServedVersion:
    """Fetch and open a version's model; with ``with_store`` also its own feature store, probed."""
    artifact = fetch_artifact(record.artifact_uri, settings, settings.home / "serving-cache" / record.version)
    model = open_session(artifact, record)
    model.score(np.zeros((1, len(model.feature_names)), dtype=np.float32))  # the session answers
    features = None
    if with_store:
        features = OnlineFeatureReader.open(feature_settings(settings, record), model.feature_names, feature_read)
        features.probe()
    return ServedVersion(record, model, features)


def export_gates(record: ModelVersion) -> None:
    """The gate results recorded on a version, as gauges labelled by its version."""
    results = ((record.metadata.get("gates") or {}).get("results") or {})
    for gate, result in results.items():
        GATE_PASSED.labels(record.version, gate).set(1.0 if result.get("passed") else 0.0)
        GATE_VALUE.labels(record.version, gate).set(float(result.get("value", float("nan"))))


STATUS = Gauge("fraud_model_version_status", "1 for each registered version's status (champion, refused, rolled back...).",
               ["model_version", "status"])
# Seconds between two reads of the registry for the version metrics (every replica reads it).
REGISTRY_METRICS_SECONDS = 30.0


def export_versions(registry: ModelRegistry, model_name: str) -> None:
    """Every registered version's status and gate results as gauges: refused versions, never
    hosted, show up in Prometheus too."""
    from fraud_common.registry.lifecycle import version_status

    for record in registry.list_versions(model_name):
        status = version_status(record)
        for stale in [key for key in _exported if key[0] == record.version and key[1] != status]:
            STATUS.labels(*stale).set(0)  # kserve's multi-process metrics cannot remove a series
        STATUS.labels(record.version, status).set(1)
        _exported.add((record.version, status))
        export_gates(record)


_exported: set[tuple[str, str]] = set()


def watch_registry(registry: Callable[[], ModelRegistry], model_name: str,
                   every: float = REGISTRY_METRICS_SECONDS) -> None:
    """Refresh ``export_versions`` in a daemon thread; a registry outage only logs."""
    import threading

    def loop() -> None:
        while True:
            try:
                export_versions(registry(), model_name)
            except Exception as err:  # noqa: BLE001 - metrics must never stop the predictor
                log.warning("version metrics not refreshed: %s", err)
            time.sleep(every)

    threading.Thread(target=loop, name="registry-metrics", daemon=True).start()


def score_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 distance between two score samples, in probability units (NaN if one is empty).

    The mean gap between their quantile functions: robust where most scores sit near 0 (a small
    shift of that bulk moves a Kolmogorov-Smirnov distance a lot, this one barely).
    """
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if not a.size or not b.size:
        return float("nan")
    levels = (np.arange(1000) + 0.5) / 1000
    return float(np.mean(np.abs(np.quantile(a, levels) - np.quantile(b, levels))))


def bucket(key: str) -> int:
    """A stable 0..99 bucket of a routing key (crc32: the same card lands in the same bucket everywhere)."""
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % 100


class _Window:
    """One version's figures during the current step."""

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latencies: deque[float] = deque(maxlen=WINDOW)

    def stats(self) -> VersionStats:
        p99 = float(np.percentile(np.fromiter(self.latencies, float), 99)) * 1000 if self.latencies else 0.0
        return VersionStats(self.requests, self.errors, p99)


@dataclass(frozen=True)
class Fault:
    """Injected failures of one version (see the module docstring)."""

    version: str = ""
    error_rate: float = 0.0
    delay_ms: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "Fault":
        return cls(settings.fault_version, float(settings.fault_error_rate), float(settings.fault_delay_ms))


class TrafficSplit:
    """Routes each request to the champion or the challenger and keeps the step's figures."""

    def __init__(self, champion: ServedVersion, fault: Fault = Fault(), seed: int = 0) -> None:
        self.champion = champion
        self.challenger: ServedVersion | None = None
        self.percent = 0
        self.fault = fault
        self._random = random.Random(seed)
        self._new_step()
        self._export()

    # --- routing (called from predict, on the event loop) ---

    def score(self, features: np.ndarray, user_ids: list[str]) -> tuple[np.ndarray, LoadedModel]:
        """The scores of one request and the model that gave them (champion or challenger)."""
        challenger = self.challenger
        to_challenger = challenger is not None and bool(user_ids) and bucket(user_ids[0]) < self.percent
        served = challenger if to_challenger else self.champion
        window = self._windows[served.version]
        started = time.perf_counter()
        try:
            self._inject(served.version)
            scores = served.model.score(features)
        except Exception:
            window.requests += 1
            window.errors += 1
            MODEL_REQUESTS.labels(served.version, "error").inc()
            raise
        took = time.perf_counter() - started
        window.requests += 1
        window.latencies.append(took)
        MODEL_REQUESTS.labels(served.version, "ok").inc()
        SCORING_SECONDS.labels(served.version).observe(took)
        for value in np.ravel(scores)[:64]:
            SCORES.labels(served.version).observe(float(value))
        if to_challenger:
            # The champion on the same rows: what the canary's score and decision checks compare.
            shadow = self.champion.model.score(features)
            self._pairs.append((np.ravel(scores).copy(), np.ravel(shadow).copy()))
        return scores, served.model

    def _inject(self, version: str) -> None:
        fault = self.fault
        if not fault.version or version != fault.version:
            return
        if fault.delay_ms > 0:
            time.sleep(fault.delay_ms / 1000)
        if fault.error_rate > 0 and self._random.random() < fault.error_rate:
            raise InferenceError(f"injected fault of version {version} (FRAUD_FAULT_VERSION)")

    # --- control (called from the control routes, on the event loop) ---

    def host(self, challenger: ServedVersion, percent: int) -> None:
        """Host ``challenger`` at ``percent`` % and start a new step."""
        if challenger.version == self.champion.version:
            raise InvalidInput(f"version {challenger.version} is the champion")
        if self.challenger is not None and self.challenger.version != challenger.version:
            raise InvalidInput(f"a canary of {self.challenger.version} is running; stop it first (DELETE {CANARY_PATH})")
        self.challenger, self.percent = challenger, int(percent)
        self._new_step()
        self._export()

    def stop(self) -> str:
        """Every request back to the champion; returns the challenger that was unloaded ("" if none)."""
        gone = self.challenger.version if self.challenger is not None else ""
        self.challenger, self.percent = None, 0
        if gone:
            TRAFFIC_PERCENT.labels(gone).set(0)
            SERVED.labels(gone, CHALLENGER).set(0)
        self._new_step()
        self._export()
        return gone

    def replace_champion(self, champion: ServedVersion) -> None:
        """A new champion (promotion or rollback): the canary, if any, ends with it."""
        old = self.champion.version
        if self.challenger is not None:
            self.stop()
        self.champion = champion
        if old != champion.version:
            TRAFFIC_PERCENT.labels(old).set(0)
            SERVED.labels(old, CHAMPION).set(0)
        self._new_step()
        self._export()

    def _new_step(self) -> None:
        self._started = time.monotonic()
        self._windows = {self.champion.version: _Window()}
        if self.challenger is not None:
            self._windows[self.challenger.version] = _Window()
        self._pairs: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=WINDOW)

    def _export(self) -> None:
        TRAFFIC_PERCENT.labels(self.champion.version).set(100 - self.percent)
        SERVED.labels(self.champion.version, CHAMPION).set(1)
        export_gates(self.champion.record)
        if self.challenger is not None:
            TRAFFIC_PERCENT.labels(self.challenger.version).set(self.percent)
            SERVED.labels(self.challenger.version, CHALLENGER).set(1)
            export_gates(self.challenger.record)

    def step_stats(self) -> StepStats | None:
        """The current step's figures (None without a challenger)."""
        if self.challenger is None:
            return None
        if self._pairs:
            challenger_scores = np.concatenate([p[0] for p in self._pairs])
            champion_scores = np.concatenate([p[1] for p in self._pairs])
            challenger_flags = challenger_scores >= self.challenger.model.threshold
            champion_flags = champion_scores >= self.champion.model.threshold
            flip, ks, rows = float(np.mean(challenger_flags != champion_flags)), score_distance(challenger_scores, champion_scores), challenger_scores.size
        else:
            flip, ks, rows = None, float("nan"), 0
        return StepStats(
            percent=self.percent, seconds=time.monotonic() - self._started,
            champion=self._windows[self.champion.version].stats(),
            challenger=self._windows[self.challenger.version].stats(),
            score_distance=ks, flip_rate=flip, paired_rows=rows,
        )

    def status(self) -> dict[str, Any]:
        from dataclasses import asdict

        stats = self.step_stats()
        step = asdict(stats) if stats is not None else None
        if step is not None and step["score_distance"] != step["score_distance"]:
            step["score_distance"] = None  # NaN (no scores yet) is not JSON
        return {
            "champion": self.champion.version,
            "challenger": self.challenger.version if self.challenger is not None else "",
            "percent": self.percent,
            "step": step,
        }


def benchmark(champion: ServedVersion, challenger: ServedVersion, user_ids: list[str], requests: int,
              rounds: int = 10) -> dict[str, Any]:
    """Both versions' p99 (ms) over the same ``requests`` stored-user requests: features read + ONNX.

    The order alternates every request so neither version is always second (warm caches). The
    requests run in ``rounds`` slices and each version's figure is the lowest of its per-slice
    p99s (as ``timeit`` takes the minimum): stalls from other processes then move some slices,
    not the verdict. The per-slice figures are returned too.
    """
    reader = champion.features
    assert reader is not None
    pair = (("champion", champion), ("challenger", challenger))
    for warm in user_ids[:20]:  # first runs allocate: not part of the figure
        rows, _ = reader.read([warm])
        champion.model.score(rows), challenger.model.score(rows)
    per_round: dict[str, list[float]] = {"champion": [], "challenger": []}
    p50s: dict[str, list[float]] = {"champion": [], "challenger": []}
    size = max(requests // rounds, 1)
    for start in range(0, size * rounds, size):
        timings: dict[str, list[float]] = {"champion": [], "challenger": []}
        for i in range(start, start + size):
            user = [user_ids[i % len(user_ids)]]
            for side, served in (pair if i % 2 == 0 else pair[::-1]):
                started = time.perf_counter()
                rows, _ = reader.read(user)
                served.model.score(rows)
                timings[side].append(time.perf_counter() - started)
        for side, values in timings.items():
            per_round[side].append(float(np.percentile(values, 99)) * 1000)
            p50s[side].append(float(np.percentile(values, 50)) * 1000)
    # Preemption on a shared host only adds time (a p99 of a loaded 2-core box is its 4 ms
    # scheduler tick): the least-disturbed slice is the best estimate of what a model costs.
    figures: dict[str, Any] = {f"{side}_p99_ms": float(np.min(values)) for side, values in per_round.items()}
    figures |= {f"{side}_slice_p99_ms": [round(v, 4) for v in values] for side, values in per_round.items()}
    figures |= {f"{side}_p50_ms": float(np.median(values)) for side, values in p50s.items()}
    return figures | {"requests": float(size * rounds), "rounds": float(rounds)}


class CanaryControl:
    """The control routes' logic: load versions from the registry and change the split."""

    def __init__(self, settings: Settings, registry: Callable[[], ModelRegistry], feature_read: str,
                 split: TrafficSplit, on_champion: Callable[[ServedVersion], None]) -> None:
        self.settings, self.registry, self.feature_read = settings, registry, feature_read
        self.split, self.on_champion = split, on_champion
        self._lock = asyncio.Lock()

    def _record(self, version: str) -> ModelVersion:
        try:
            record = self.registry().get_version(self.settings.model_name, version)
        except RegistryError as err:
            raise InvalidInput(str(err)) from err
        why_not = refusal(record)
        if why_not:
            raise InvalidInput(f"version {version} was refused at the gate ({why_not}); it is not served")
        champion = self.split.champion.record
        if definitions_of(record) and definitions_of(champion) and definitions_of(record) != definitions_of(champion):
            raise InvalidInput(f"version {version} reads other feature definitions than the champion; promote it directly")
        return record

    async def _challenger(self, version: str) -> ServedVersion:
        hosted = self.split.challenger
        if hosted is not None and hosted.version == version:
            return hosted
        record = self._record(version)
        try:
            return await asyncio.to_thread(open_version, self.settings, record, self.feature_read, False)
        except PredictorLoadError as err:
            raise InvalidInput(f"version {version} cannot be loaded: {err}") from err

    async def set_canary(self, version: str, percent: int) -> dict[str, Any]:
        if not isinstance(percent, int) or isinstance(percent, bool) or not 0 <= percent <= 100:
            raise InvalidInput(f"percent must be an integer from 0 to 100, got {percent!r}")
        async with self._lock:
            challenger = await self._challenger(version)
            self.split.host(challenger, percent)
        log.info("canary: %s at %d %% beside champion %s", version, percent, self.split.champion.version)
        return self.split.status()

    async def stop(self) -> dict[str, Any]:
        async with self._lock:
            gone = self.split.stop()
        if gone:
            log.info("canary: every request back to champion %s (%s unloaded)", self.split.champion.version, gone)
        return self.split.status()

    async def benchmark(self, version: str, requests: int, user_ids: list[str]) -> dict[str, Any]:
        if not isinstance(requests, int) or isinstance(requests, bool) or not 10 <= requests <= 100_000:
            raise InvalidInput(f"requests must be an integer from 10 to 100000, got {requests!r}")
        if not user_ids or not all(isinstance(u, str) and u for u in user_ids):
            raise InvalidInput("user_ids must be a non-empty list of stored user ids to benchmark with")
        async with self._lock:
            challenger = await self._challenger(version)
            _, missing = self.split.champion.features.read(user_ids[:1000])
            if missing:
                raise InvalidInput(f"the live store does not know {missing[:5]}")
            # On the event loop, like requests: the same thread, the same feature reader.
            figures = benchmark(self.split.champion, challenger, list(user_ids), requests)
        log.info("latency of %s beside champion %s: %s", version, self.split.champion.version, figures)
        return figures

    async def reload(self) -> dict[str, Any]:
        """Serve the registry's champion (its model, threshold and store) if it changed."""
        async with self._lock:
            try:
                record = self.registry().get_version(self.settings.model_name, alias=CHAMPION)
            except RegistryError as err:
                raise InvalidInput(f"cannot resolve the champion: {err}") from err
            if record.version != self.split.champion.version:
                try:
                    served = await asyncio.to_thread(open_version, self.settings, record, self.feature_read, True)
                except PredictorLoadError as err:
                    raise InferenceError(f"champion {record.version} cannot be loaded; still serving "
                                         f"{self.split.champion.version}: {err}") from err
                self.split.replace_champion(served)  # one event-loop step: model, threshold, store
                self.on_champion(served)
                log.info("now serving champion %s", record.version)
        await asyncio.to_thread(export_versions, self.registry(), self.settings.model_name)
        return self.split.status()


def _loopback_only(request: Request) -> None:
    host = request.client.host if request.client else ""
    if host not in LOOPBACK:
        raise InvalidInput(f"{request.url.path} answers loopback clients only")


async def _body(request: Request) -> dict[str, Any]:
    from rest_predictor.payloads import _decode_json

    raw = await request.body()
    body = _decode_json(raw) if raw else {}
    if not isinstance(body, dict):
        raise InvalidInput("body must be a JSON object")
    return body


def add_canary_routes(app: Any, control: Callable[[], CanaryControl | None]) -> None:
    """The control routes of the module docstring on ``app`` (``control()`` once loaded)."""

    def ready() -> CanaryControl:
        found = control()
        if found is None:
            raise InvalidInput("the predictor is not loaded yet")
        return found

    async def get_canary(request: Request) -> JSONResponse:
        _loopback_only(request)
        return JSONResponse(ready().split.status())

    async def put_canary(request: Request) -> JSONResponse:
        _loopback_only(request)
        body = await _body(request)
        return JSONResponse(await ready().set_canary(str(body.get("version", "")), body.get("percent")))

    async def delete_canary(request: Request) -> JSONResponse:
        _loopback_only(request)
        return JSONResponse(await ready().stop())

    async def post_benchmark(request: Request) -> JSONResponse:
        _loopback_only(request)
        body = await _body(request)
        return JSONResponse(await ready().benchmark(
            str(body.get("version", "")), body.get("requests", 500), body.get("user_ids") or []))

    async def post_reload(request: Request) -> JSONResponse:
        _loopback_only(request)
        return JSONResponse(await ready().reload())

    app.add_api_route(CANARY_PATH, get_canary, methods=["GET"], summary="Canary state and the current step's figures")
    app.add_api_route(CANARY_PATH, put_canary, methods=["PUT"], summary="Host a challenger at a share of traffic")
    app.add_api_route(CANARY_PATH, delete_canary, methods=["DELETE"], summary="Every request back to the champion")
    app.add_api_route(BENCHMARK_PATH, post_benchmark, methods=["POST"], summary="Latency of champion and challenger")
    async def post_decision(request: Request) -> JSONResponse:
        _loopback_only(request)
        body = await _body(request)
        decision, version = str(body.get("decision", "")), str(body.get("version", ""))
        if decision not in DECISION_KINDS or not version:
            raise InvalidInput(f"decision must be one of {', '.join(DECISION_KINDS)}, with a version")
        DECISIONS.labels(version, decision).inc()
        return JSONResponse({"recorded": decision})

    app.add_api_route(RELOAD_PATH, post_reload, methods=["POST"], summary="Serve the registry's champion now")
    app.add_api_route(DECISION_PATH, post_decision, methods=["POST"], summary="Count a canary decision")


# --- The driver: runs beside the predictor (the CLI's ``canary`` command, the scenario test) ---

PREDICT_PATH = "/v1/models/onnx-model:predict"


def call(base_url: str, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """One JSON request to the predictor; a non-2xx answer raises ``RegistryError`` with its message."""
    import json
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base_url.rstrip("/") + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        detail = err.read().decode("utf-8", "replace")[:300]
        raise RegistryError(f"predictor answered {err.code} to {method} {path}: {detail}") from None
    except OSError as err:
        raise RegistryError(f"no predictor at {base_url} ({err}); start it with `fraud-detection serve`") from None


def stats_from(status: dict[str, Any]) -> StepStats:
    """``GET /v1/canary``'s step figures as ``StepStats``."""
    step = status["step"]
    return StepStats(
        percent=int(step["percent"]), seconds=float(step["seconds"]),
        champion=VersionStats(**step["champion"]), challenger=VersionStats(**step["challenger"]),
        score_distance=float("nan") if step["score_distance"] is None else float(step["score_distance"]), flip_rate=step.get("flip_rate"), paired_rows=int(step.get("paired_rows", 0)),
    )


@dataclass
class CanaryOutcome:
    """What ``run_canary`` did: ``promoted`` or ``rolled_back`` (or ``refused`` at the latency gate)."""

    outcome: str
    version: str
    champion: str
    reason: str
    steps: list[dict[str, Any]]
    latency: dict[str, Any] | None
    seconds: float


def run_canary(
    base_url: str,
    registry: ModelRegistry,
    model_name: str,
    version: str,
    policy: "Any",
    actor: str,
    benchmark_users: list[str] | None = None,
    benchmark_requests: int = 500,
    latency_factor: float = 1.5,
    sleep: Callable[[float], None] = time.sleep,
) -> CanaryOutcome:
    """Latency gate in the live predictor, then the canary steps; promote, or roll back automatically.

    ``policy`` is a ``fraud_common.registry.rollout.CanaryPolicy``. Every figure and decision is
    recorded on the version and counted in the predictor's metrics.
    """
    from fraud_common.registry import rollout

    started = time.monotonic()
    champion = registry.get_version(model_name, alias=CHAMPION).version
    # Before any record: the predictor answers and serves the registry's champion.
    serving = call(base_url, "GET", CANARY_PATH)
    if serving["champion"] != champion:
        raise RegistryError(f"the predictor at {base_url} serves {serving['champion']}, the registry's champion is "
                            f"{champion}: reload it first (POST {RELOAD_PATH}, or `fraud-detection promote`)")
    if serving["challenger"] and serving["challenger"] != version:
        raise RegistryError(f"the predictor at {base_url} is running a canary of {serving['challenger']}")
    rollout.start(registry, model_name, version, policy, actor)
    latency = None

    def decide(decision: str) -> None:
        call(base_url, "POST", DECISION_PATH, {"version": version, "decision": decision})

    def roll_back(reason: str, steps: list[dict[str, Any]]) -> CanaryOutcome:
        call(base_url, "DELETE", CANARY_PATH)  # first: every request back to the champion
        rollout.finish_rolled_back(registry, model_name, version, actor, reason)
        decide("rolled_back")
        log.warning("canary of %s rolled back: %s", version, reason)
        return CanaryOutcome("rolled_back", version, champion, reason, steps, latency, time.monotonic() - started)

    if benchmark_users:
        latency = call(base_url, "POST", BENCHMARK_PATH,
                       {"version": version, "requests": benchmark_requests, "user_ids": benchmark_users})
        result = rollout.latency_result(latency["challenger_p99_ms"], latency["champion_p99_ms"], latency_factor,
                                        benchmark_requests)
        rollout.record_gate(registry, model_name, version, result)
        decide("gate_passed" if result["passed"] else "gate_refused")
        if not result["passed"]:
            rollout.finish_rolled_back(registry, model_name, version, actor, f"refused at the gate: {result['detail']}")
            return CanaryOutcome("refused", version, champion, result["detail"], [], latency, time.monotonic() - started)
    steps: list[dict[str, Any]] = []
    for percent in policy.steps:
        call(base_url, "PUT", CANARY_PATH, {"version": version, "percent": percent})
        step_started = time.monotonic()
        while True:
            stats = stats_from(call(base_url, "GET", CANARY_PATH))
            waited = time.monotonic() - step_started
            enough = stats.challenger.requests >= policy.min_requests and waited >= policy.step_seconds
            if enough or waited >= policy.step_timeout_seconds:
                break
            # Fail fast: errors already beyond the bound cannot be undone by more traffic.
            if stats.challenger.requests >= policy.min_requests and not rollout.check_step(stats, policy).passed:
                break
            sleep(0.25)
        result = rollout.check_step(stats, policy)
        rollout.record_step(registry, model_name, version, result)
        steps.append(result.to_record())
        decide("step_passed" if result.passed else "step_failed")
        log.info("canary of %s at %d %%: %s", version, percent, "passed" if result.passed else result.reason)
        if not result.passed:
            return roll_back(f"step {percent} %: {result.reason}", steps)
    rollout.finish_promoted(registry, model_name, version, actor)
    call(base_url, "POST", RELOAD_PATH)  # the predictor now serves the new champion with its own store
    decide("promoted")
    return CanaryOutcome("promoted", version, version, "every step passed", steps, latency, time.monotonic() - started)


class Replay:
    """Background traffic for a canary without real clients: stored users, scored in a loop."""

    def __init__(self, base_url: str, user_ids: list[str], concurrency: int = 2) -> None:
        import threading

        self.base_url, self.user_ids = base_url.rstrip("/"), list(user_ids)
        self._stop = threading.Event()
        self.sent = 0
        self.failed = 0
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(concurrency)]

    def _run(self, seed: int) -> None:
        import http.client
        import json
        from urllib.parse import urlsplit

        where = urlsplit(self.base_url)
        rng = random.Random(seed)
        connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
        while not self._stop.is_set():
            body = json.dumps({"user_id": rng.choice(self.user_ids)})
            try:
                connection.request("POST", PREDICT_PATH, body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                self.sent += 1
                self.failed += response.status >= 500
            except OSError:
                connection.close()
                connection = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
                time.sleep(0.1)

    def __enter__(self) -> "Replay":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
