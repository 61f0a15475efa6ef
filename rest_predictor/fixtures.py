"""Small, self-made serving state for tests and the serving bench (never imported by the predictor).

Builds what the real pipeline would leave behind, at any size: a Parquet of per-user features,
a Feast store over it (entity, feature view, feature service named as in
``fraud_common.feature_store``) materialized into the SQLite online store, a tiny ONNX model
(sigmoid of a linear function of the 13 raw inputs, with the metadata the trainer writes), and a
registry record pointing at it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from fraud_common import schemas
from fraud_common.feature_store import ENTITY_NAME, FEATURE_SERVICE, FEATURE_VIEW, store_config
from fraud_common.settings import Settings

INT_FEATURES = ("num_prev_transactions",)
# Weights chosen so probabilities spread over (0, 1) for the value ranges generated below.
WEIGHTS = np.array(
    [0.02, 0.05, 0.6, -0.4, -0.8, -1.0, 1.5, 0.05, 0.004, 0.003, 0.01, -0.02, 0.001],
    dtype=np.float32,
)
BIAS = -2.0


@dataclass(frozen=True)
class ServingState:
    """Where a built state lives and what it holds."""

    settings: Settings
    features_path: Path
    model_path: Path
    model_version: str
    n_users: int


def make_features(n_users: int, seed: int = 7) -> pd.DataFrame:
    """One row per user: ``user_id``, event/created timestamps and the 13 model features."""
    rng = np.random.default_rng(seed)
    label_time = pd.Timestamp(schemas.DEFAULT_LABEL_TIME)
    frame = pd.DataFrame({schemas.ENTITY_KEY: [schemas.user_id(i) for i in range(n_users)]})
    frame[schemas.EVENT_TIMESTAMP] = label_time
    frame[schemas.CREATED_TIMESTAMP] = label_time
    frame["distance_from_home"] = rng.gamma(1.0, 25.0, n_users)
    frame["distance_from_last_transaction"] = rng.gamma(0.8, 5.0, n_users)
    frame["ratio_to_median_purchase_price"] = rng.gamma(1.2, 1.5, n_users)
    for flag in schemas.FLAG_COLUMNS:
        frame[flag] = rng.random(n_users) < 0.5
    frame["num_prev_transactions"] = rng.integers(0, 40, n_users).astype("int64")
    frame["avg_prev_transaction_amount"] = rng.gamma(2.0, 40.0, n_users)
    frame["max_prev_transaction_amount"] = frame["avg_prev_transaction_amount"] * (1 + rng.random(n_users))
    frame["stdv_prev_transaction_amount"] = rng.gamma(1.5, 10.0, n_users)
    frame["days_since_last_transaction"] = rng.gamma(1.0, 10.0, n_users)
    frame["days_since_first_transaction"] = frame["days_since_last_transaction"] + rng.gamma(2.0, 60.0, n_users)
    return frame


def write_onnx_model(path: Path, threshold: float = 0.5) -> Path:
    """A tiny ONNX model: ``sigmoid(features @ WEIGHTS + BIAS)``, metadata as the trainer writes it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = len(schemas.MODEL_FEATURES)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "weights"], ["logit_raw"]),
            helper.make_node("Add", ["logit_raw", "bias"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["probability"]),
        ],
        "tiny_fraud_model",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        initializer=[
            numpy_helper.from_array(WEIGHTS.reshape(n, 1), "weights"),
            numpy_helper.from_array(np.array([BIAS], dtype=np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(
        model,
        {"feature_names": json.dumps(list(schemas.MODEL_FEATURES)), "threshold": repr(threshold)},
    )
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def build_feast_store(settings: Settings, features_path: Path) -> None:
    """Apply entity, feature view and feature service over the Parquet, then materialize it online."""
    from feast import Entity, FeatureService, FeatureStore, FeatureView, Field, FileSource, RepoConfig
    from feast.types import Bool, Float64, Int64
    from feast.value_type import ValueType

    Path(settings.feast_dir).mkdir(parents=True, exist_ok=True)
    store = FeatureStore(config=RepoConfig(**store_config(settings)))
    user = Entity(name=ENTITY_NAME, join_keys=[schemas.ENTITY_KEY], value_type=ValueType.STRING)
    source = FileSource(
        path=str(features_path),
        timestamp_field=schemas.EVENT_TIMESTAMP,
        created_timestamp_column=schemas.CREATED_TIMESTAMP,
    )

    def feast_type(name: str):  # noqa: ANN202 - a Feast type object
        if name in schemas.FLAG_COLUMNS:
            return Bool
        return Int64 if name in INT_FEATURES else Float64

    view = FeatureView(
        name=FEATURE_VIEW,
        entities=[user],
        ttl=timedelta(days=3650),
        schema=[Field(name=name, dtype=feast_type(name)) for name in schemas.MODEL_FEATURES],
        source=source,
        online=True,
    )
    service = FeatureService(name=FEATURE_SERVICE, features=[view])
    store.apply([user, view, service])
    label_time = datetime.fromisoformat(schemas.DEFAULT_LABEL_TIME)
    store.materialize(start_date=label_time - timedelta(days=1), end_date=label_time + timedelta(seconds=1))


def build_serving_state(home: Path, n_users: int = 200, registry=None) -> ServingState:  # noqa: ANN001
    """Write features, Feast store, model and registry record under ``home``.

    ``registry`` defaults to ``open_registry(settings)``; pass another one (same protocol) to use it.
    """
    settings = Settings.from_env({"FRAUD_HOME": str(home)})
    data_dir = Path(settings.data_uri) / "serving-fixture"
    data_dir.mkdir(parents=True, exist_ok=True)
    features_path = data_dir / "features.parquet"
    make_features(n_users).to_parquet(features_path, index=False)
    build_feast_store(settings, features_path)
    model_path = write_onnx_model(Path(settings.models_uri) / "fixture" / "model.onnx")
    if registry is None:
        from fraud_common.registry import open_registry

        registry = open_registry(settings)
    version = f"fixture-{len(registry.list_versions(settings.model_name)) + 1}"
    registry.register(
        settings.model_name,
        version,
        str(model_path),
        {
            "metrics": {"roc_auc": 0.99},
            "threshold": 0.5,
            "feature_names": list(schemas.MODEL_FEATURES),
            "data_fingerprint": "fixture",
            "run_id": "fixture",
            "code_version": "fixture",
            "passed_gate": True,
        },
    )
    return ServingState(settings, features_path, model_path, version, n_users)
