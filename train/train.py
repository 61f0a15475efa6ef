"""Training step: fit the network, calibrate it, evaluate it against a reference, export ONNX.

Entry points: ``train_model`` (frame → Keras model), ``run_training`` (dataset file → model.onnx,
metrics.json, curves.png, reliability.png in an output folder) and the CLI ``python -m train.train``.
Training never touches the registry; the separate register step does (``train.register``).

Order on the splits: the network fits on train (early-stopped on valid); the calibration map and
then the decision threshold (on calibrated scores) are chosen on valid; test only reports.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np
import pandas as pd

from fraud_common.logs import get_logger, setup_logging
from fraud_common.settings import Settings
from train.data import FEATURE_NAMES, DatasetError, Split, load_dataset, split_arrays, validate_frame
from train.model import build_network, log_mask, standardisation_stats, transform_features

log = get_logger(__name__)

ClassWeighting = Literal["balanced", "sqrt", "none"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes one training run."""

    hidden_units: tuple[int, ...] = (64, 32)
    dropout: float = 0.0
    max_epochs: int = 20
    # Largest batch; small training sets use smaller ones (see ``effective_batch_size``).
    batch_size: int = 2048
    learning_rate: float = 3e-3
    # Epochs without a better validation ROC-AUC before stopping; the best weights are restored.
    patience: int = 3
    # Smallest gain in validation ROC-AUC that counts as better (stops long tails of 1e-5 gains).
    min_delta: float = 1e-4
    seed: int = 42
    # How the rare fraud class is up-weighted in the loss: "balanced" gives both classes equal
    # total weight, "sqrt" the square root of that factor, "none" leaves the loss as it is.
    class_weighting: ClassWeighting = "balanced"
    # Deterministic TF kernels: cheap on CPU and makes reruns give the same model.
    deterministic: bool = True


@dataclass
class TrainedModel:
    """A fitted network and what happened while fitting it."""

    model: keras.Model
    feature_names: list[str]
    config: TrainConfig
    epochs_run: int
    best_epoch: int
    best_valid_auc: float
    train_seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)


def class_weights(labels: np.ndarray, weighting: ClassWeighting) -> dict[int, float] | None:
    """Loss weights per class; the negative class keeps weight 1."""
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if weighting == "none" or positives == 0 or negatives == 0:
        return None
    factor = negatives / positives
    if weighting == "sqrt":
        factor = float(np.sqrt(factor))
    elif weighting != "balanced":
        raise ValueError(f"class_weighting={weighting!r}: use 'balanced', 'sqrt' or 'none'")
    return {0: 1.0, 1: float(factor)}


def effective_batch_size(n_train: int, largest: int) -> int:
    """``largest``, shrunk so that each epoch has at least ~100 steps on small training sets.

    Full scale (800k rows) keeps the large batch for speed; an embedded run on a few thousand rows
    would otherwise get a handful of updates per epoch and stop undertrained.
    """
    return int(min(largest, max(64, n_train // 100)))


class _EpochLog(keras.callbacks.Callback):
    """One log line per epoch (Keras' own progress bar is off)."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        log.info(
            "epoch %d: loss %.4f, valid loss %.4f, valid ROC-AUC %.4f",
            epoch + 1, logs.get("loss", float("nan")), logs.get("val_loss", float("nan")),
            logs.get("val_auc", float("nan")),
        )


def fit_arrays(train: Split, valid: Split, config: TrainConfig) -> TrainedModel:
    """Fit the network on arrays (features in ``FEATURE_NAMES`` order)."""
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    names = list(FEATURE_NAMES)
    mean, std = standardisation_stats(transform_features(train.features, log_mask(names)))
    model = build_network(names, mean, std, config.hidden_units, config.dropout)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.AUC(name="auc", num_thresholds=500)],
    )
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_auc",
        mode="max",
        patience=config.patience,
        min_delta=config.min_delta,
        restore_best_weights=True,
    )
    started = time.perf_counter()
    history = model.fit(
        train.features,
        train.labels.astype(np.float32),
        validation_data=(valid.features, valid.labels.astype(np.float32)),
        batch_size=effective_batch_size(len(train), config.batch_size),
        epochs=config.max_epochs,
        class_weight=class_weights(train.labels, config.class_weighting),
        callbacks=[stopper, _EpochLog()],
        shuffle=True,
        verbose=0,
    )
    seconds = time.perf_counter() - started
    valid_auc = history.history.get("val_auc", [float("nan")])
    best = int(np.nanargmax(valid_auc)) if len(valid_auc) else 0
    log.info(
        "trained %d epochs in %.1f s; best epoch %d, valid ROC-AUC %.4f",
        len(valid_auc), seconds, best + 1, valid_auc[best],
    )
    return TrainedModel(
        model=model,
        feature_names=names,
        config=config,
        epochs_run=len(valid_auc),
        best_epoch=best + 1,
        best_valid_auc=float(valid_auc[best]),
        train_seconds=seconds,
        history={k: [float(x) for x in v] for k, v in history.history.items()},
    )


def train_model(frame: pd.DataFrame, config: TrainConfig | None = None) -> TrainedModel:
    """Fit the network on the ``train`` split, stopping early on the ``valid`` split."""
    validate_frame(frame)
    splits = split_arrays(frame)
    return fit_arrays(splits["train"], splits["valid"], config or TrainConfig())


@dataclass
class TrainingOutcome:
    """What one training run produced (files in ``out_dir``) and the figures the pipeline logs."""

    model_path: Path
    metrics_path: Path
    curves_path: Path
    reliability_path: Path
    metrics: dict[str, Any]
    threshold: float
    feature_names: list[str]
    data_fingerprint: str
    # For KFP ClassificationMetrics: log_roc_curve(fpr, tpr, thresholds), log_confusion_matrix(...)
    roc_curve: dict[str, list[float]]
    confusion_categories: list[str]
    confusion_matrix: list[list[int]]


def _json_ready(value: Any) -> Any:
    """NaN becomes null so metrics.json is strict JSON."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def run_training(
    dataset_path: Path, out_dir: Path, settings: Settings, config: TrainConfig | None = None
) -> TrainingOutcome:
    """Train, calibrate, evaluate (network and reference); write model.onnx, metrics.json and plots.

    The files are written to a temporary folder beside ``out_dir`` and moved in at the end.
    The registry is not touched: registration is the separate register step.
    """
    from scipy.special import expit

    from train import evaluate
    from train.calibrate import choose_calibration
    from train.export import export_onnx
    from train.model import predict_logits
    from train.register import data_fingerprint

    config = config or TrainConfig()
    started = time.perf_counter()
    frame = load_dataset(Path(dataset_path))
    splits = split_arrays(frame)
    log.info(
        "dataset %s: %s rows (train/valid/test), fraud rate %.4f",
        dataset_path, "/".join(str(len(splits[s])) for s in ("train", "valid", "test")),
        float(np.mean(splits["train"].labels)),
    )
    fingerprint = data_fingerprint(frame)
    del frame  # the arrays are all we need from here on

    # The reference fits on one core (its OpenMP threads are limited to one) while the network
    # trains: on two cores the pair takes about the longer of the two, not their sum.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference") as pool:
        reference_fit = pool.submit(evaluate.fit_reference, splits["train"], splits["valid"], splits["test"], config.seed)
        trained = fit_arrays(splits["train"], splits["valid"], config)
        reference_run = reference_fit.result()
    valid_logits = predict_logits(trained.model, splits["valid"].features)
    test_logits = predict_logits(trained.model, splits["test"].features)
    # Before calibration: the network's own sigmoid, threshold chosen on valid as always.
    uncalibrated = evaluate.score_on_splits(
        splits["valid"].labels, expit(valid_logits), splits["test"].labels, expit(test_logits)
    )
    calibration = choose_calibration(valid_logits, splits["valid"].labels, config.seed)
    valid_scores, test_scores = calibration.apply(valid_logits), calibration.apply(test_logits)
    network = evaluate.score_on_splits(
        splits["valid"].labels, valid_scores, splits["test"].labels, test_scores
    )
    reference = evaluate.score_on_splits(
        splits["valid"].labels, reference_run.valid_scores, splits["test"].labels, reference_run.test_scores
    )
    reference.update(model="HistGradientBoostingClassifier", iterations=reference_run.iterations)
    threshold = float(network["threshold"])
    metrics: dict[str, Any] = {
        **network,
        "reference": reference,
        **evaluate.compare_to_reference(network, reference),
        # Top-level numbers are logged as KFP Metrics: the Brier score before calibration beside it.
        "brier_uncalibrated": uncalibrated["brier"],
        "calibration": calibration.to_dict(),
        "uncalibrated": {
            k: uncalibrated[k] for k in ("roc_auc", "pr_auc", "brier", "f1", "threshold", "valid_roc_auc")
        },
        "reliability": evaluate.reliability_points(splits["test"].labels, test_scores),
        "reliability_diagram": "reliability.png",
        "quality_bar": settings.min_roc_auc,
        "passes_quality_bar": bool(network["roc_auc"] >= settings.min_roc_auc),
        "training": {
            "epochs_run": trained.epochs_run,
            "best_epoch": trained.best_epoch,
            "best_valid_auc_keras": trained.best_valid_auc,
            "config": asdict(config),
        },
        "timing": {
            "network_train_seconds": trained.train_seconds,
            "reference_seconds": reference_run.seconds,
        },
        "rows": {name: len(split) for name, split in splits.items()},
        "data_fingerprint": fingerprint,
    }
    log.info(
        "test ROC-AUC network %.4f, reference %.4f; PR-AUC network %.4f, reference %.4f; threshold %.4f",
        network["roc_auc"], reference["roc_auc"], network["pr_auc"], reference["pr_auc"], threshold,
    )
    log.info(
        "test Brier network %.5f (%.5f before %s calibration), reference %.5f",
        network["brier"], uncalibrated["brier"], calibration.method, reference["brier"],
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".training-", dir=out_dir.parent))
    try:
        export_onnx(trained.model, trained.feature_names, threshold, staging / "model.onnx", calibration)
        evaluate.plot_curves(
            staging / "curves.png",
            splits["test"].labels,
            {"network": test_scores, "reference (gradient boosting)": reference_run.test_scores},
        )
        evaluate.plot_reliability(
            staging / "reliability.png",
            splits["test"].labels,
            {
                f"network, {calibration.method}-calibrated": test_scores,
                "network, uncalibrated": expit(test_logits),
                "reference (gradient boosting)": reference_run.test_scores,
            },
        )
        metrics["timing"]["total_seconds"] = time.perf_counter() - started
        (staging / "metrics.json").write_text(json.dumps(_json_ready(metrics), indent=2, sort_keys=True))
        # metrics.json last: its presence marks a complete run.
        for name in ("model.onnx", "curves.png", "reliability.png", "metrics.json"):
            (staging / name).replace(out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    categories, matrix = evaluate.confusion_matrix_for_kfp(splits["test"].labels, test_scores, threshold)
    return TrainingOutcome(
        model_path=out_dir / "model.onnx",
        metrics_path=out_dir / "metrics.json",
        curves_path=out_dir / "curves.png",
        reliability_path=out_dir / "reliability.png",
        metrics=metrics,
        threshold=threshold,
        feature_names=list(trained.feature_names),
        data_fingerprint=fingerprint,
        roc_curve=evaluate.roc_curve_points(splits["test"].labels, test_scores),
        confusion_categories=categories,
        confusion_matrix=matrix,
    )


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m train.train --dataset training.parquet --out runs/train``."""
    parser = argparse.ArgumentParser(description="Train the fraud model, evaluate it, export ONNX.")
    parser.add_argument("--dataset", type=Path, required=True, help="training frame (Parquet) from retrieval")
    parser.add_argument(
        "--out", type=Path, required=True, help="folder for model.onnx, metrics.json, curves.png, reliability.png"
    )
    parser.add_argument("--max-epochs", type=int, default=TrainConfig.max_epochs)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    setup_logging(settings.log_level)
    try:
        outcome = run_training(
            args.dataset, args.out, settings, TrainConfig(max_epochs=args.max_epochs, seed=args.seed)
        )
    except DatasetError as exc:
        log.error("%s", exc)
        return 2
    summary = {
        "model": str(outcome.model_path),
        "metrics": str(outcome.metrics_path),
        "test_roc_auc": outcome.metrics["roc_auc"],
        "reference_test_roc_auc": outcome.metrics["reference"]["roc_auc"],
        "test_brier": outcome.metrics["brier"],
        "test_brier_uncalibrated": outcome.metrics["brier_uncalibrated"],
        "calibration": outcome.metrics["calibration"]["method"],
        "threshold": outcome.threshold,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
