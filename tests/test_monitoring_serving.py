"""The predictor's side of monitoring, through a real ModelServer on a real port: request ids,
the prediction log it writes (flushed at shutdown), and its Prometheus metrics."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from fraud_common import prediction_log as plog
from fraud_common import schemas
from helpers import ServingState, build_serving_state
from rest_predictor import metrics, push
from rest_predictor.errors import PredictorLoadError
from rest_predictor.model_artifact import LoadedModel
from rest_predictor.served_log import ServedLog, request_id_of, usable_request_id
from test_predictor import V1, V2, offline_features, running_predictor

N_USERS = 30


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> ServingState:
    return build_serving_state(tmp_path_factory.mktemp("monitoring-serving") / "home", N_USERS)


def samples(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample at /metrics, keyed by (name, sorted labels)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_request_ids_are_kept_when_usable_else_made() -> None:
    assert usable_request_id("order-42") == "order-42"
    for bad in ("", " padded", "x" * 129, "tab\there", "naïve", None, 7):
        assert usable_request_id(bad) is None
    assert request_id_of({"x-request-id": "from-header"}, None) == "from-header"
    made = request_id_of({"x-request-id": "bad\nid"}, None)
    assert len(made) == 32 and made != request_id_of(None, None)
    assert metrics.PUSH_PATH == push.PUSH_PATH


def test_served_requests_are_logged_counted_and_flushed_at_shutdown(state: ServingState, tmp_path: Path) -> None:
    log_uri = tmp_path / "prediction-log"
    # A 1-hour time bound and a large buffer: the rows can only reach a file through the shutdown flush.
    env = {"FRAUD_PREDICTION_LOG_URI": str(log_uri), "FRAUD_PREDICTION_LOG_MAX_SECONDS": "3600"}
    sent: dict[str, tuple[str, float]] = {}  # request id -> (user, score)
    with running_predictor(state, tmp_path, env) as (url, _):
        before = samples(url)
        one = requests.post(url + V1, json={"user_id": "user_1"}, headers={"X-Request-Id": "caller-1"}, timeout=10).json()
        assert one["request_id"] == "caller-1"
        sent["caller-1"] = ("user_1", one["prediction"][0][0])
        batch = requests.post(url + V1, json={"user_ids": ["user_2", "user_3", "user_2"]}, timeout=10).json()
        assert len(batch["request_id"]) == 32
        v2 = {"id": "v2-request", "inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": ["user_4"]}]}
        answer = requests.post(url + V2, json=v2, timeout=10).json()
        assert answer["id"] == "v2-request"
        anonymous = requests.post(url + V2, json={"inputs": v2["inputs"]}, timeout=10).json()
        assert len(anonymous["id"]) == 32 and anonymous["id"] != batch["request_id"]
        assert requests.post(url + V1, json={"user_id": "nobody"}, timeout=10).status_code == 404
        assert requests.post(url + V1, data=b"{not json", timeout=10).status_code == 400
        after = samples(url)
        assert not list(log_uri.rglob("*.parquet")), "nothing should be written before the buffer is due"

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    scored = 1 + 3 + 1 + 1
    assert grew("fraud_predictor_scores_count") == scored
    assert grew("fraud_predictor_decisions_total", decision="fraud") + grew("fraud_predictor_decisions_total", decision="legit") == scored
    assert grew("fraud_predictor_http_requests_total", route="v1_predict", status="200") == 2
    assert grew("fraud_predictor_http_requests_total", route="v1_predict", status="404") == 1
    assert grew("fraud_predictor_http_requests_total", route="v1_predict", status="400") == 1
    assert grew("fraud_predictor_http_requests_total", route="v2_infer", status="200") == 2
    assert grew("fraud_predictor_unknown_users_total") == 1
    info = {dict(labels)["model_version"]: value for (name, labels), value in after.items() if name == "fraud_predictor_model_info"}
    assert info == {state.model_version: 1.0}
    # The score histogram's buckets hold the right users: user_1's score is at or below every bound above it.
    le = next(b for b in metrics.SCORE_BUCKETS if one["prediction"][0][0] <= b)
    assert grew("fraud_predictor_scores_bucket", le=repr(float(le))) >= 1

    # Clean shutdown (SIGINT): every scored row is in the log, features as served.
    now = datetime.now(timezone.utc)
    table = plog.read_log(str(log_uri), state.settings, now - timedelta(hours=1), now + timedelta(minutes=1)).to_pandas()
    assert len(table) == scored
    assert sorted(table[plog.REQUEST_ID].unique()) == sorted({"caller-1", batch["request_id"], "v2-request", anonymous["id"]})
    assert table.groupby(plog.REQUEST_ID).size()[batch["request_id"]] == 3
    row = table[table[plog.REQUEST_ID] == "caller-1"].iloc[0]
    assert row[plog.USER_ID] == "user_1" and row[plog.MODEL_VERSION] == state.model_version
    assert row[plog.SCORE] == pytest.approx(sent["caller-1"][1], abs=1e-6)
    np.testing.assert_allclose(row[list(schemas.MODEL_FEATURES)].to_numpy(float), offline_features(state, ["user_1"])[0], rtol=1e-5)
    assert bool(row[plog.DECISION]) == bool(one["fraud"])
    assert (table[plog.LATENCY_MS] > 0).all() and (table[plog.SAMPLE_RATE] == 1.0).all()


def test_log_off_writes_nothing(state: ServingState, tmp_path: Path) -> None:
    default = Path(plog.default_log_uri(state.settings))
    with running_predictor(state, tmp_path, {"FRAUD_PREDICTION_LOG_URI": "off"}) as (url, _):
        answer = requests.post(url + V1, json={"user_id": "user_1"}, timeout=10).json()
        assert len(answer["request_id"]) == 32  # ids are given whether or not the log is on
    assert not default.exists() or not list(default.rglob("*.parquet"))


def test_bad_log_settings_make_the_predictor_not_ready(tmp_path: Path) -> None:
    from fraud_common.settings import Settings

    model = LoadedModel(None, "features", "probability", list(schemas.MODEL_FEATURES), 0.5, "fraud-detection", "1", "")  # type: ignore[arg-type]
    bad = Settings.from_env({"FRAUD_HOME": str(tmp_path), "FRAUD_PREDICTION_LOG_SAMPLE_RATE": "1.5"})
    with pytest.raises(PredictorLoadError, match="sample rate 1.5 is not between 0 and 1"):
        ServedLog.open(bad, model)
    off = Settings.from_env({"FRAUD_HOME": str(tmp_path), "FRAUD_PREDICTION_LOG_SAMPLE_RATE": "0"})
    assert ServedLog.open(off, model).writer is None


def test_a_null_feature_in_the_store_is_counted_by_feature_before_it_fails_the_request() -> None:
    from feast.protos.feast.types.Value_pb2 import Value as ValueProto

    from rest_predictor import metrics
    from rest_predictor.errors import FeatureDataError
    from rest_predictor.online_features import _number, _proto_number

    def count(feature: str) -> float:
        return metrics.FEATURE_MISSING.labels(feature)._value.get()

    before = count("used_chip")
    with pytest.raises(FeatureDataError, match="used_chip"):
        _number(None, "used_chip", "user_1")
    with pytest.raises(FeatureDataError, match="used_chip"):
        _proto_number({"used_chip": ValueProto()}, "used_chip", "user_1")
    assert _number(1.5, "used_chip", "user_1") == 1.5  # a value is not counted
    assert count("used_chip") == before + 2
