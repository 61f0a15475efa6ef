"""Shared package: settings parsing and storage I/O on local paths and a real S3 server."""

from __future__ import annotations

from pathlib import Path

import pytest

from fraud_common import storage
from fraud_common.schemas import MODEL_FEATURES, PREPARED_COLUMNS
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
    [("FRAUD_MIN_ROC_AUC", "high"), ("FRAUD_SERVE_PORT", "80.5"), ("FRAUD_REGISTRY_BACKEND", "mlflow")],
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
