"""Training, calibration, ONNX export, evaluation, the quality gate and registration (tiny synthetic data)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from scipy.special import expit
from sklearn.metrics import brier_score_loss

from fraud_common import schemas
from fraud_common.registry import open_registry
from helpers import training_frame
from train.calibrate import FITTERS, Calibration, choose_calibration, is_monotone
from train.data import DatasetError, feature_matrix, split_arrays, validate_frame
from train.evaluate import (
    choose_threshold,
    classification_metrics,
    confusion_matrix_for_kfp,
    roc_curve_points,
    score_on_splits,
)
from train.export import export_onnx, onnx_scores, read_metadata
from train.gate import QualityGateError, check_gate
from train.model import predict_logits, predict_scores
from train.register import code_version, data_fingerprint, publish_model, register_model
from train.train import TrainConfig, run_training, train_model

FAST = TrainConfig(hidden_units=(32, 16), max_epochs=4, batch_size=512, learning_rate=5e-3, patience=2)


@pytest.fixture(scope="session")
def frame() -> pd.DataFrame:
    return training_frame(20_000, seed=1)


@pytest.fixture(scope="session")
def splits(frame: pd.DataFrame):
    return split_arrays(frame)


@pytest.fixture(scope="session")
def trained(frame: pd.DataFrame):
    """One network trained once for the whole session (few epochs)."""
    return train_model(frame, FAST)


@pytest.fixture(scope="session")
def scores(trained, splits) -> dict[str, np.ndarray]:
    return {name: predict_scores(trained.model, split.features) for name, split in splits.items()}


@pytest.fixture(scope="session")
def logits(trained, splits) -> dict[str, np.ndarray]:
    return {name: predict_logits(trained.model, split.features) for name, split in splits.items()}


@pytest.fixture(scope="session", params=["platt", "isotonic"])
def calibrated_onnx(request, trained, splits, logits, tmp_path_factory) -> tuple[Calibration, Path]:
    """Each calibration method fitted on the valid split and baked into an exported graph."""
    calibration = FITTERS[request.param](logits["valid"], splits["valid"].labels)
    path = tmp_path_factory.mktemp(f"onnx-{request.param}") / "model.onnx"
    return calibration, export_onnx(trained.model, trained.feature_names, 0.3, path, calibration)


@pytest.fixture(scope="session")
def onnx_path(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_onnx(trained.model, trained.feature_names, 0.4321, path)


def test_network_clearly_beats_chance_on_easy_data(splits, scores) -> None:
    metrics = classification_metrics(splits["test"].labels, scores["test"], 0.5)
    assert metrics["roc_auc"] > 0.85
    assert metrics["pr_auc"] > 2 * splits["test"].labels.mean()


def test_onnx_equals_keras_on_whole_test_split(onnx_path, splits, scores) -> None:
    got = onnx_scores(onnx_path, splits["test"].features)
    assert got.shape == (len(splits["test"]), 1)
    np.testing.assert_allclose(got[:, 0], scores["test"], atol=1e-5, rtol=0)


def test_calibrated_onnx_equals_offline_calibrated_scores(calibrated_onnx, trained, splits, logits) -> None:
    calibration, path = calibrated_onnx
    got = onnx_scores(path, splits["test"].features)
    assert got.shape == (len(splits["test"]), 1)
    np.testing.assert_allclose(got[:, 0], calibration.apply(logits["test"]), atol=1e-5, rtol=0)
    # The map really is in the graph: the served score is not the network's raw sigmoid.
    assert np.abs(got[:, 0] - predict_scores(trained.model, splits["test"].features)).max() > 0.05
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["features"] and [o.name for o in graph.output] == ["probability"]
    assert json.loads(read_metadata(path)["calibration"])["method"] == calibration.method


def test_calibration_lowers_the_brier_score_on_held_out_rows(splits, logits) -> None:
    """Fitted on valid, judged on test: balanced class weights overstate fraud, calibration fixes it."""
    valid, test = splits["valid"], splits["test"]
    before = brier_score_loss(test.labels, expit(logits["test"]))
    for fit in FITTERS.values():
        assert brier_score_loss(test.labels, fit(logits["valid"], valid.labels).apply(logits["test"])) < before
    chosen = choose_calibration(logits["valid"], valid.labels)
    after = brier_score_loss(test.labels, chosen.apply(logits["test"]))
    assert after < 0.8 * before
    # Calibrated, the mean score is near the fraud rate; the raw sigmoid's is far above it.
    assert abs(chosen.apply(logits["test"]).mean() - test.labels.mean()) < 0.02
    assert expit(logits["test"]).mean() > test.labels.mean() + 0.05


def test_calibration_map_is_monotone(calibrated_onnx, splits, logits) -> None:
    calibration, path = calibrated_onnx
    grid = np.linspace(-40.0, 40.0, 20_001)
    assert is_monotone(calibration)
    assert np.all(np.diff(calibration.apply(grid)) >= 0)
    # The served graph keeps the network's order: sorted by logit, its scores never go down.
    order = np.argsort(logits["test"], kind="stable")
    served = onnx_scores(path, splits["test"].features[order])[:, 0]
    assert np.all(np.diff(served) >= -1e-6)
    assert not is_monotone(Calibration("platt", slope=-0.5))
    # Logits that rank backwards: no decreasing map is chosen, whatever the fit would prefer.
    reversed_map = choose_calibration(-logits["valid"], splits["valid"].labels)
    assert is_monotone(reversed_map) and np.all(np.diff(reversed_map.apply(grid)) >= 0)


def test_onnx_has_one_input_and_takes_raw_values(onnx_path, trained, frame) -> None:
    graph = onnx.load(str(onnx_path)).graph
    assert [i.name for i in graph.input] == ["features"]
    assert len(graph.output) == 1
    # Raw values as retrieval returns them (bools, far-out distances), no scaling by the caller.
    raw = frame.loc[frame["set"] == "test"].head(500).copy()
    raw.loc[raw.index[:5], "distance_from_home"] = [0.0, 1e4, 5e3, 0.5, 2e3]
    raw.loc[raw.index[:5], "ratio_to_median_purchase_price"] = [268.0, 0.004, 50.0, 1.0, 10.0]
    assert raw["online_order"].dtype == bool
    values = feature_matrix(raw)
    expected = trained.model.predict(values, verbose=0)
    np.testing.assert_allclose(onnx_scores(onnx_path, values), expected, atol=1e-5, rtol=0)
    # The preprocessing really is inside: shifting a raw input changes the score.
    shifted = values.copy()
    shifted[:, 2] *= 20
    assert np.abs(onnx_scores(onnx_path, shifted) - expected).max() > 1e-3


def test_onnx_metadata_has_feature_names_and_threshold(onnx_path) -> None:
    metadata = read_metadata(onnx_path)
    assert json.loads(metadata["feature_names"]) == list(schemas.MODEL_FEATURES)
    assert float(metadata["threshold"]) == pytest.approx(0.4321)


def test_gate_refuses_metrics_below_the_bar_with_the_figures() -> None:
    with pytest.raises(QualityGateError, match=r"test ROC-AUC 0\.8123 is below the quality bar 0\.9500"):
        check_gate({"roc_auc": 0.8123}, 0.95)
    with pytest.raises(QualityGateError, match="no usable test ROC-AUC"):
        check_gate({"pr_auc": 0.99}, 0.95)
    check_gate({"roc_auc": 0.96}, 0.95)  # at or above the bar: no error


def test_gate_refuses_a_model_trained_on_shuffled_labels(frame) -> None:
    small = frame.iloc[:6000].copy()
    small["set"] = np.repeat(["train", "valid", "test"], [4000, 1000, 1000])
    small[schemas.LABEL] = np.random.default_rng(3).permutation(small[schemas.LABEL].to_numpy())
    weak = train_model(small, replace(FAST, max_epochs=1))
    parts = split_arrays(small)
    metrics = score_on_splits(
        parts["valid"].labels, predict_scores(weak.model, parts["valid"].features),
        parts["test"].labels, predict_scores(weak.model, parts["test"].features),
    )
    assert metrics["roc_auc"] < 0.7
    with pytest.raises(QualityGateError, match="model not registered"):
        check_gate(metrics, 0.9)


def test_threshold_is_chosen_on_valid_not_test(splits, scores) -> None:
    valid, test = splits["valid"], splits["test"]
    base = score_on_splits(valid.labels, scores["valid"], test.labels, scores["test"])
    flipped_test = 1 - test.labels
    other = score_on_splits(valid.labels, scores["valid"], flipped_test, scores["test"])
    assert other["threshold"] == base["threshold"]
    assert other["roc_auc"] != base["roc_auc"]  # the test labels did matter for the metrics
    assert base["threshold"] == choose_threshold(valid.labels, scores["valid"])
    noisy_valid = valid.labels.copy()
    noisy_valid[np.argsort(scores["valid"])[-200:]] = 0  # most suspicious valid rows relabelled
    assert choose_threshold(noisy_valid, scores["valid"]) != base["threshold"]


def test_threshold_maximises_f1_on_a_known_case() -> None:
    labels = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    # threshold 0.4: tp=4, fp=1 -> F1 = 8/9, the best of all cuts
    assert choose_threshold(labels, scores) == pytest.approx(0.4)


def test_kfp_shapes_of_roc_points_and_confusion_matrix(splits, scores) -> None:
    points = roc_curve_points(splits["test"].labels, scores["test"])
    assert set(points) == {"fpr", "tpr", "thresholds"}
    assert 2 <= len(points["fpr"]) <= 200
    assert len(points["fpr"]) == len(points["tpr"]) == len(points["thresholds"])
    assert points["fpr"][0] == 0.0 and points["fpr"][-1] == 1.0 and points["tpr"][-1] == 1.0
    assert all(0.0 <= t <= 1.0 for t in points["thresholds"])
    json.dumps(points)  # plain JSON types
    categories, matrix = confusion_matrix_for_kfp(splits["test"].labels, scores["test"], 0.5)
    assert categories == ["legitimate", "fraud"]
    assert sum(map(sum, matrix)) == len(splits["test"])
    assert matrix[1][0] + matrix[1][1] == int(splits["test"].labels.sum())
    assert all(isinstance(v, int) for row in matrix for v in row)


def test_bad_frames_are_refused_with_the_column_named(frame) -> None:
    with pytest.raises(DatasetError, match="used_pin_number"):
        validate_frame(frame.drop(columns=["used_pin_number"]))
    broken = frame.groupby("set").head(50).copy()
    broken.loc[broken.index[3], "distance_from_home"] = np.nan
    with pytest.raises(DatasetError, match="distance_from_home"):
        validate_frame(broken)
    bad_sets = frame.groupby("set").head(50).copy()
    bad_sets["set"] = "validate"
    with pytest.raises(DatasetError, match="validate"):
        validate_frame(bad_sets)


def test_data_fingerprint_ignores_row_order_but_not_content(frame) -> None:
    small = frame.head(2000)
    fingerprint = data_fingerprint(small)
    assert fingerprint.startswith("sha256:")
    assert data_fingerprint(small.sample(frac=1.0, random_state=0)) == fingerprint
    changed = small.copy()
    changed.loc[changed.index[7], "ratio_to_median_purchase_price"] += 0.001
    assert data_fingerprint(changed) != fingerprint


def test_code_version_is_a_nonempty_string(settings) -> None:
    assert code_version(settings).strip()
    assert code_version(settings.with_overrides(code_version="abc1234")) == "git:abc1234"


def test_register_refuses_below_bar_and_registers_a_good_model(settings, onnx_path) -> None:
    common = dict(
        artifact_uri=str(onnx_path),
        threshold=0.4321,
        feature_names=list(schemas.MODEL_FEATURES),
        data_fingerprint="sha256:abc",
        code_version="test",
    )
    bar = settings.with_overrides(min_roc_auc=0.9)
    with pytest.raises(QualityGateError, match=r"0\.8000 is below the quality bar 0\.9000"):
        register_model(bar, metrics={"roc_auc": 0.8}, run_id="run-weak", **common)
    assert open_registry(bar).list_versions(bar.model_name) == []

    good = {"roc_auc": 0.97, "pr_auc": 0.8, "precision": 0.7, "recall": 0.6, "f1": 0.65,
            "reference": {"roc_auc": 0.971}}
    version = register_model(bar, metrics=good, run_id="run-good-0123456789", **common)
    assert version.version.endswith("run-good-012")
    assert version.passed_gate and version.threshold == pytest.approx(0.4321)
    assert version.feature_names == list(schemas.MODEL_FEATURES)
    assert version.metadata["run_id"] == "run-good-0123456789"
    assert version.metadata["metrics"]["roc_auc"] == pytest.approx(0.97)
    assert version.metadata["metrics"]["reference_roc_auc"] == pytest.approx(0.971)
    assert open_registry(bar).get_version(bar.model_name).version == version.version


def test_publish_uploads_then_registers_and_gate_blocks_upload(settings, onnx_path) -> None:
    bar = settings.with_overrides(min_roc_auc=0.9)
    args = dict(threshold=0.4, feature_names=list(schemas.MODEL_FEATURES),
                data_fingerprint="sha256:abc", code_version="test")
    with pytest.raises(QualityGateError):
        publish_model(bar, onnx_path, {"roc_auc": 0.5}, run_id="weak-run", **args)
    assert not Path(bar.models_uri).exists()  # nothing uploaded for a refused model
    version = publish_model(bar, onnx_path, {"roc_auc": 0.99}, run_id="good-run", **args)
    assert version.artifact_uri.startswith(bar.models_uri)
    assert Path(version.artifact_uri).read_bytes() == onnx_path.read_bytes()


def test_run_training_writes_model_metrics_and_curves(frame, tmp_path, settings) -> None:
    small = frame.iloc[:8000].copy()
    small["set"] = np.repeat(["train", "valid", "test"], [6000, 1000, 1000])
    dataset = tmp_path / "training.parquet"
    small.to_parquet(dataset)
    out = tmp_path / "out"
    outcome = run_training(dataset, out, settings, replace(FAST, max_epochs=2))
    assert sorted(p.name for p in out.iterdir()) == ["curves.png", "metrics.json", "model.onnx", "reliability.png"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".training-")]  # staging removed
    written = json.loads(outcome.metrics_path.read_text())
    for key in ("roc_auc", "pr_auc", "precision", "recall", "f1", "threshold", "confusion_matrix"):
        assert key in written
    assert written["reference"]["model"] == "HistGradientBoostingClassifier"
    assert 0.5 < written["reference"]["roc_auc"] <= 1.0
    assert written["threshold"] == pytest.approx(outcome.threshold)
    assert float(read_metadata(outcome.model_path)["threshold"]) == pytest.approx(outcome.threshold)
    assert outcome.curves_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert outcome.reliability_path == out / written["reliability_diagram"]
    assert outcome.reliability_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The Brier scores are top-level numbers, so the KFP step logs them as Metrics.
    assert isinstance(outcome.metrics["brier"], float) and isinstance(outcome.metrics["brier_uncalibrated"], float)
    assert written["brier"] < written["brier_uncalibrated"]
    assert written["reference"]["brier"] > 0
    assert written["calibration"]["method"] in ("platt", "isotonic")
    assert sum(written["reliability"]["rows"]) == 1000
    # What is served is what was reported: the ONNX scores give the test Brier score and ROC-AUC,
    # and the threshold is the best-F1 cut of the served (calibrated) scores on valid.
    parts = split_arrays(small)
    served_test = onnx_scores(outcome.model_path, parts["test"].features)[:, 0]
    assert brier_score_loss(parts["test"].labels, served_test) == pytest.approx(written["brier"], abs=1e-5)
    served_valid = onnx_scores(outcome.model_path, parts["valid"].features)[:, 0]
    assert choose_threshold(parts["valid"].labels, served_valid) == pytest.approx(outcome.threshold, abs=1e-4)
    assert outcome.data_fingerprint == data_fingerprint(pd.read_parquet(dataset))
