"""The one shared test helper: data made by the product's own generator, and a serving state.

Every data set the tests and benches use comes from ``synthetic_data_generation.generate`` (one
fraud rule, documented there), at whatever size the caller needs:

* ``label_features``: the label rows with their point-in-time history aggregates, shaped like data
  preparation's output (``schemas.PREPARED_COLUMNS``), computed here in pandas from the generator's
  in-memory chunks (the same rows ``generate()`` writes): an independent check on Spark's result
  and a fast source for model and serving tests.
* ``training_frame``: the same rows in the Feast retrieval's format, for training.
* ``build_serving_state``: what the pipeline leaves behind for the predictor (prepared Parquet, the
  product's Feast repo applied and materialized, a tiny ONNX model, a registry record).

Benches import this file too (``sys.path`` gets ``tests/``); the product never does.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from fraud_common import schemas
from fraud_common.settings import Settings
from synthetic_data_generation import generate as gen

DAY_SECONDS = 86_400.0
TRAINING_COLUMNS: tuple[str, ...] = (
    schemas.ENTITY_KEY,
    schemas.EVENT_TIMESTAMP,
    schemas.SET_COLUMN,
    schemas.LABEL,
) + schemas.MODEL_FEATURES


# ---------------------------------------------------------------------------------------------
# Data from the product generator


def generated_chunks(users: int, seed: int, label_time: str = schemas.DEFAULT_LABEL_TIME) -> Iterator[gen.ChunkData]:
    """The generator's chunks for ``users`` users: exactly the rows ``generate()`` would write."""
    if users < 10:
        raise ValueError(f"users={users}: the generator needs at least 10")
    label_epoch = gen.parse_label_time(label_time)
    for index, first in enumerate(range(0, users, gen.CHUNK_USERS)):
        yield gen.simulate_chunk(seed, index, first, min(gen.CHUNK_USERS, users - first), label_epoch)


def history_frame(history: pa.Table) -> pd.DataFrame:
    """History rows as pandas: ``user_id``, UTC ``created``/``date_of_transaction``, amount."""
    columns = {schemas.ENTITY_KEY: history.column(schemas.ENTITY_KEY).to_pandas().astype(str)}
    for name in ("created", "date_of_transaction"):
        text = history.column(name)
        text = text.cast(pa.string()) if pa.types.is_dictionary(text.type) else text
        columns[name] = pc.cast(text, pa.timestamp("us", "UTC")).to_pandas()
    columns["transaction_amount"] = history.column("transaction_amount").to_pandas()
    return pd.DataFrame(columns)


def point_in_time_aggregates(history: pd.DataFrame, label_time: pd.Timestamp) -> pd.DataFrame:
    """Per user: ``schemas.HISTORY_FEATURES`` over the rows known at ``label_time`` (happened AND
    recorded before it), zeros where a statistic is undefined. Indexed by ``user_id``."""
    known = history[(history["date_of_transaction"] < label_time) & (history["created"] < label_time)]
    grouped = known.groupby(schemas.ENTITY_KEY)
    when = grouped["date_of_transaction"]
    amounts = grouped["transaction_amount"]
    return pd.DataFrame(
        {
            "num_prev_transactions": grouped.size().astype("int64"),
            "avg_prev_transaction_amount": amounts.mean(),
            "max_prev_transaction_amount": amounts.max(),
            "stdv_prev_transaction_amount": amounts.std(ddof=1).fillna(0.0),
            "days_since_last_transaction": (label_time - when.max()).dt.total_seconds() / DAY_SECONDS,
            "days_since_first_transaction": (label_time - when.min()).dt.total_seconds() / DAY_SECONDS,
        }
    )


def label_features(users: int = 2_000, seed: int = 7, label_time: str = schemas.DEFAULT_LABEL_TIME) -> pd.DataFrame:
    """Generated label rows with their point-in-time features: ``schemas.PREPARED_COLUMNS``, one
    row per user in user order (train, test, validate as the generator splits them)."""
    moment = pd.Timestamp(label_time).tz_convert("UTC")
    sets = np.empty(users, dtype=object)
    split_of_file = {file: split for split, file in schemas.SPLIT_FILES}
    for file, start, end in gen.split_bounds(users):
        sets[start:end] = split_of_file[file]
    frames = []
    for chunk in generated_chunks(users, seed, label_time):
        n = len(chunk.labels[schemas.LABEL])
        index = np.arange(chunk.first_user, chunk.first_user + n)
        frame = pd.DataFrame(
            {
                schemas.ENTITY_KEY: [schemas.user_id(i) for i in index],
                schemas.TRANSACTION_KEY: [schemas.transaction_id(i) for i in index],
                schemas.SET_COLUMN: sets[index],
                schemas.LABEL: chunk.labels[schemas.LABEL] == 1,
                schemas.EVENT_TIMESTAMP: moment,
                schemas.CREATED_TIMESTAMP: moment,
                **{name: chunk.labels[name] for name in schemas.FLOAT_COLUMNS},
                **{name: chunk.labels[name] == 1 for name in schemas.FLAG_COLUMNS},
            }
        )
        aggregates = point_in_time_aggregates(history_frame(chunk.history), moment)
        frame = frame.join(aggregates, on=schemas.ENTITY_KEY)
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    frame["num_prev_transactions"] = frame["num_prev_transactions"].fillna(0).astype("int64")
    frame[list(schemas.HISTORY_FEATURES)] = frame[list(schemas.HISTORY_FEATURES)].fillna(0.0)
    for name in (schemas.EVENT_TIMESTAMP, schemas.CREATED_TIMESTAMP):
        frame[name] = frame[name].astype("datetime64[us, UTC]")
    return frame[list(schemas.PREPARED_COLUMNS)]


def training_frame(users: int = 20_000, seed: int = 1) -> pd.DataFrame:
    """A training set in the Feast retrieval's format (``TRAINING_COLUMNS``) from generated data."""
    return label_features(users, seed)[list(TRAINING_COLUMNS)]


def feature_rows(users: list[str], times: list[pd.Timestamp], seed: int) -> pd.DataFrame:
    """Prepared rows (``schemas.PREPARED_COLUMNS``) for the given users at the given event times,
    values from generated users of ``seed`` (another seed, other values)."""
    n = len(users)
    frame = label_features(max(n, 10), seed).head(n).copy()
    frame[schemas.ENTITY_KEY] = users
    frame[schemas.TRANSACTION_KEY] = [f"txn_{seed}_{i}" for i in range(n)]
    frame[schemas.SET_COLUMN] = "train"
    for name in (schemas.EVENT_TIMESTAMP, schemas.CREATED_TIMESTAMP):
        frame[name] = pd.Series(times).astype("datetime64[us, UTC]").to_numpy()
    return frame.reset_index(drop=True)


def write_prepared(data_uri: Path, frame: pd.DataFrame) -> Path:
    """Write ``frame`` (``PREPARED_COLUMNS``) where preparation would: ``<data>/prepared/{features,entities}``."""
    prepared = Path(data_uri) / "prepared"
    for folder, columns in ((schemas.FEATURES_DIR, schemas.PREPARED_COLUMNS), (schemas.ENTITIES_DIR, schemas.ENTITY_COLUMNS)):
        (prepared / folder).mkdir(parents=True, exist_ok=True)
        frame[list(columns)].to_parquet(prepared / folder / "part-00000.parquet", index=False)
    return prepared / schemas.FEATURES_DIR


def write_upstream_shaped(raw: Path, users: int, seed: int, generated_at: datetime) -> dict[str, pd.DataFrame]:
    """Raw CSVs shaped like the upstream Kubeflow blueprint's: every file carries pandas' unnamed
    index column; user ids run over train, test, validate; each user has 1-5 history rows, the last
    at ``generated_at`` and the others 10-364 days before it, naive timestamps, ``created`` equal to
    the transaction time. Label values come from the product generator.

    Returns ``labels`` (indexed by user id, with ``set``) and ``history`` as written.
    """
    raw.mkdir(parents=True, exist_ok=True)
    prepared = label_features(users, seed)
    rng = np.random.default_rng(seed)
    labels = pd.DataFrame({name: prepared[name].astype(float) for name in schemas.LABEL_COLUMNS})
    labels.index = prepared[schemas.ENTITY_KEY]
    labels[schemas.SET_COLUMN] = prepared[schemas.SET_COLUMN].to_numpy()
    for split, file in schemas.SPLIT_FILES:
        labels.loc[labels[schemas.SET_COLUMN] == split, list(schemas.LABEL_COLUMNS)].reset_index(drop=True).to_csv(raw / file)
    per_user = rng.integers(1, 6, users)
    owners = np.repeat(np.arange(users), per_user)
    last = np.cumsum(per_user) - 1
    days_back = rng.integers(10, 365, len(owners)).astype("timedelta64[D]")
    when = np.datetime64(generated_at, "us") - days_back
    when[last] = np.datetime64(generated_at, "us")
    history = pd.DataFrame(
        {
            "user_id": [schemas.user_id(i) for i in owners],
            "created": when,
            "updated": when,
            "date_of_transaction": when,
            "transaction_amount": np.round(rng.uniform(10, 1000, len(owners)), 2),
            "transaction_category": rng.choice(["Groceries", "Dining", "Travel"], len(owners)),
            "card_token": [f"card-{i}" for i in owners],
            "city": "Chicago",
            "state": "IL",
        }
    )
    history.to_csv(raw / schemas.HISTORY_FILE)
    return {"labels": labels, "history": history}


# ---------------------------------------------------------------------------------------------
# Serving state for the predictor tests and the serving bench

# A tiny stand-in model: weights chosen so scores spread over (0, 1) on generated features.
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
    """One prepared row per user (``schemas.PREPARED_COLUMNS``) from the product generator."""
    return label_features(max(n_users, 10), seed).head(n_users).reset_index(drop=True)


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


def build_feast_store(settings: Settings) -> None:
    """Apply the product's feature repo over the prepared Parquet and materialize it online."""
    from feature_engineering.feast_feature_engineering import apply_and_materialize

    apply_and_materialize(settings)


def build_serving_state(home: Path, n_users: int = 200, registry=None) -> ServingState:  # noqa: ANN001
    """Write prepared features, the Feast store, a model and a registry record under ``home``.

    ``registry`` defaults to ``open_registry(settings)``; pass another one (same protocol) to use it.
    """
    settings = Settings.from_env({"FRAUD_HOME": str(home)})
    features_path = write_prepared(Path(settings.data_uri), make_features(n_users))
    build_feast_store(settings)
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


def wait_until_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout_seconds: float = 180) -> None:
    """Poll the predictor's ``/v2/health/ready`` until 200; fail with its log's tail if it exits
    or does not get ready within ``timeout_seconds``."""
    import requests

    deadline = time.monotonic() + timeout_seconds
    while True:
        assert proc.poll() is None, f"predictor exited early:\n{log_path.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"predictor not ready:\n{log_path.read_text()[-4000:]}"
        try:
            if requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
