"""Shared package: settings parsing and storage I/O on local paths and a real S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest

from fraud_common import schemas, storage
from fraud_common.artifacts import parquet_summary, storage_uri
from fraud_common.schemas import MODEL_FEATURES, PREPARED_COLUMNS
from fraud_common.spark_s3 import s3a_conf
from fraud_common.settings import Settings, SettingsError


def test_settings_defaults_live_under_home(tmp_path: Path) -> None:
    s = Settings.from_env({"FRAUD_HOME": str(tmp_path)})
    assert s.data_uri == str(tmp_path / "data")
    assert s.registry_uri == str(tmp_path / "registry.db")
    assert s.serve_port == 8081 and s.min_roc_auc == 0.95


def test_settings_round_trip_through_env(tmp_path: Path) -> None:
    s = Settings.from_env({"FRAUD_HOME": str(tmp_path), "FRAUD_MIN_ROC_AUC": "0.9", "FRAUD_SERVE_PORT": "9000"})
    assert Settings.from_env(s.to_env()) == s


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("FRAUD_MIN_ROC_AUC", "high"),
        ("FRAUD_SERVE_PORT", "80.5"),
        ("FRAUD_REGISTRY_BACKEND", "mlflow"),
        ("FRAUD_SPARK_DRIVER_CORES", "two"),
        ("FRAUD_TRAIN_MAX_EPOCHS", "1e3"),
    ],
)
def test_settings_reject_bad_values_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_model_features_are_prepared_columns() -> None:
    assert set(MODEL_FEATURES) <= set(PREPARED_COLUMNS)
    assert len(set(MODEL_FEATURES)) == len(MODEL_FEATURES) == 13


def test_local_write_is_atomic_and_readable(tmp_path: Path, settings: Settings) -> None:
    target = tmp_path / "a" / "b.bin"
    storage.write_bytes(str(target), b"hello", settings)
    assert storage.read_bytes(str(target), settings) == b"hello"
    assert [p.name for p in target.parent.iterdir()] == ["b.bin"]  # no temporary left behind


def test_published_file_is_shared_by_a_read_only_link_or_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os
    import stat

    source = tmp_path / "run" / "online_store.db"
    source.parent.mkdir()
    source.write_bytes(b"snapshot")
    linked = storage.share_published_file(source, tmp_path / "models" / "v1" / "online_store.db")
    assert linked.read_bytes() == b"snapshot" and os.stat(linked).st_ino == os.stat(source).st_ino
    assert stat.S_IMODE(os.stat(source).st_mode) == 0o444  # a writer fails instead of changing both
    replaced = storage.share_published_file(source, linked)  # over an existing file: a rename, no temp left
    assert replaced.read_bytes() == b"snapshot" and sorted(p.name for p in linked.parent.iterdir()) == ["online_store.db"]

    def no_links(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(storage.os, "link", no_links)
    copied = storage.share_published_file(source, tmp_path / "elsewhere" / "online_store.db")
    assert copied.read_bytes() == b"snapshot" and os.stat(copied).st_ino != os.stat(source).st_ino


def test_s3_round_trip_of_files_and_folders(tmp_path: Path, s3_settings: Settings) -> None:
    folder = tmp_path / "src"
    (folder / "sub").mkdir(parents=True)
    (folder / "one.txt").write_text("1")
    (folder / "sub" / "two.txt").write_text("2")
    uri = storage.join(s3_settings.data_uri, "copy")
    written = storage.upload(folder, uri, s3_settings)
    assert sorted(written) == storage.list_files(uri, s3_settings)
    assert storage.exists(uri, s3_settings)
    back = storage.download(uri, tmp_path / "back", s3_settings)
    assert (back / "sub" / "two.txt").read_text() == "2"
    storage.write_bytes(storage.join(uri, "x.bin"), b"xyz", s3_settings)
    assert storage.read_bytes(storage.join(uri, "x.bin"), s3_settings) == b"xyz"
    with storage.local_copy(storage.join(uri, "one.txt"), s3_settings) as path:
        assert path.read_text() == "1"
    storage.delete(uri, s3_settings)
    assert not storage.exists(uri, s3_settings)


def test_reading_a_missing_object_names_it(s3_settings: Settings) -> None:
    uri = storage.join(s3_settings.data_uri, "missing.bin")
    storage.ensure_bucket(storage.split_s3(uri)[0], s3_settings)
    with pytest.raises(storage.StorageError, match="missing.bin"):
        storage.read_bytes(uri, s3_settings)


def test_settings_derive_image_names_from_registry_and_tag() -> None:
    s = Settings.from_env({"FRAUD_IMAGE_REGISTRY": "registry.example/me/", "FRAUD_IMAGE_TAG": "1.2"})
    assert s.spark_image == "registry.example/me/data-preparation:1.2"
    assert s.predictor_image == "registry.example/me/rest-predictor:1.2"
    assert Settings.from_env({"FRAUD_SPARK_IMAGE": "mine:1"}).spark_image == "mine:1"


def test_spark_s3_settings_never_carry_keys() -> None:
    conf = s3a_conf("https://s3.example:9000", "eu-west-1")
    assert conf["spark.hadoop.fs.s3a.connection.ssl.enabled"] == "true"
    assert conf["spark.hadoop.fs.s3a.endpoint.region"] == "eu-west-1"
    assert conf["spark.hadoop.fs.s3a.aws.credentials.provider"].endswith("EnvironmentVariableCredentialsProvider")
    assert conf["spark.hadoop.fs.s3a.input.stream.type"] == "classic"
    assert not [key for key in conf if key.endswith(("access.key", "secret.key"))]
    assert "spark.hadoop.fs.s3a.endpoint" not in s3a_conf("")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [("/runs/a/prepared", "/runs/a/prepared"), ("s3://b/k", "s3://b/k"), ("minio://mlpipeline/v2/x", "s3://mlpipeline/v2/x")],
)
def test_artifact_uris_map_to_storage_uris(uri: str, expected: str) -> None:
    assert storage_uri(uri) == expected


def test_unsupported_artifact_uri_is_named() -> None:
    with pytest.raises(storage.StorageError, match="gs://b/k"):
        storage_uri("gs://b/k")


def _prepared_frame():  # noqa: ANN202 - a pandas DataFrame
    import pandas as pd

    return pd.DataFrame(
        {
            schemas.ENTITY_KEY: ["user_0", "user_1", "user_2"],
            schemas.SET_COLUMN: ["train", "train", "test"],
            schemas.EVENT_TIMESTAMP: pd.to_datetime(["2025-05-01", "2025-06-01", "2025-05-15"], utc=True),
        }
    )


def test_parquet_summary_counts_rows_sets_and_time_range(tmp_path: Path, s3_settings: Settings) -> None:
    frame = _prepared_frame()
    local = tmp_path / "features"
    local.mkdir()
    frame.iloc[:2].to_parquet(local / "part-0.parquet", index=False)
    frame.iloc[2:].to_parquet(local / "part-1.parquet", index=False)
    (local / "_SUCCESS").write_bytes(b"")
    summary = parquet_summary(str(local), s3_settings)
    assert summary["rows"] == 3 and summary["rows_by_set"] == {"train": 2, "test": 1}
    assert (summary["time_min"], summary["time_max"]) == ("2025-05-01T00:00:00+00:00", "2025-06-01T00:00:00+00:00")
    remote = storage.join(s3_settings.data_uri, "summary", "features")
    storage.upload(local, remote, s3_settings)
    assert parquet_summary(remote, s3_settings) == summary
    renamed = frame.rename(columns={schemas.SET_COLUMN: "split"})
    renamed.to_parquet(tmp_path / "other.parquet", index=False)
    assert parquet_summary(str(tmp_path / "other.parquet"), s3_settings)["schema_fingerprint"] != summary["schema_fingerprint"]
