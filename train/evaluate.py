"""Evaluation: threshold choice, test metrics, the reference model, curves for people and KFP.

Threshold rule: the decision threshold is the score that maximises F1 on the **valid** split
(precision and recall weigh equally; fraud is rare, so accuracy would be meaningless). The test
split is used only to report metrics at that threshold, never to choose it.

Calibration is judged by the Brier score (mean squared error of the probability, lower is better)
and a reliability diagram: observed fraud rate against mean predicted probability per score bin.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

from fraud_common.logs import get_logger
from train.data import Split

log = get_logger(__name__)

# The network may trail the reference by at most this much test ROC-AUC (development target).
REFERENCE_TOLERANCE = 0.005
CLASS_NAMES = ["legitimate", "fraud"]
RELIABILITY_BINS = 10


def choose_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold with the highest F1 on these (validation) labels."""
    labels = np.asarray(labels)
    if labels.min(initial=0) == labels.max(initial=0):
        return 0.5  # one class only: no trade-off to optimise
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last precision/recall pair has no threshold (recall 0 by convention).
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(thresholds[int(np.argmax(f1))])


def confusion_counts(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, int]:
    """True/false negatives/positives when ``score >= threshold`` means fraud."""
    actual = np.asarray(labels).astype(bool)
    predicted = np.asarray(scores) >= threshold
    return {
        "tn": int(np.sum(~actual & ~predicted)),
        "fp": int(np.sum(~actual & predicted)),
        "fn": int(np.sum(actual & ~predicted)),
        "tp": int(np.sum(actual & predicted)),
    }


def classification_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """ROC-AUC, PR-AUC (average precision), Brier score and precision/recall/F1 at ``threshold``."""
    counts = confusion_counts(labels, scores, threshold)
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    both_classes = 0 < int(np.sum(labels)) < len(labels)
    return {
        "roc_auc": float(roc_auc_score(labels, scores)) if both_classes else float("nan"),
        "pr_auc": float(average_precision_score(labels, scores)) if both_classes else float("nan"),
        "brier": float(brier_score_loss(labels, scores)) if len(labels) else float("nan"),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "threshold": float(threshold),
        "confusion_matrix": counts,
        "rows": int(len(labels)),
        "fraud_rate": float(np.mean(labels)) if len(labels) else 0.0,
    }


def score_on_splits(
    valid_labels: np.ndarray, valid_scores: np.ndarray, test_labels: np.ndarray, test_scores: np.ndarray
) -> dict:
    """Threshold from the valid split, metrics on the test split (plus valid ROC-AUC)."""
    threshold = choose_threshold(valid_labels, valid_scores)
    metrics = classification_metrics(test_labels, test_scores, threshold)
    metrics["valid_roc_auc"] = float(roc_auc_score(valid_labels, valid_scores))
    return metrics


@dataclass
class ReferenceResult:
    """The reference model's scores and how long it took."""

    valid_scores: np.ndarray
    test_scores: np.ndarray
    iterations: int
    seconds: float


def fit_reference(train: Split, valid: Split, test: Split, seed: int = 0) -> ReferenceResult:
    """Gradient-boosted trees on the same raw features, early-stopped on the valid split."""
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    started = time.perf_counter()
    model = HistGradientBoostingClassifier(
        max_iter=300, learning_rate=0.1, early_stopping=True, n_iter_no_change=10, random_state=seed
    )
    # One OpenMP thread: on a busy 2-core machine, two spinning OpenMP threads made the fit 5-7x
    # slower (measured 31-39 s vs 5 s for 30 iterations on 800k rows); on a quiet one the loss is small.
    with threadpool_limits(limits=1, user_api="openmp"):
        model.fit(train.features, train.labels, X_val=valid.features, y_val=valid.labels)
    result = ReferenceResult(
        valid_scores=model.predict_proba(valid.features)[:, 1],
        test_scores=model.predict_proba(test.features)[:, 1],
        iterations=int(model.n_iter_),
        seconds=time.perf_counter() - started,
    )
    log.info("reference model: %d boosting iterations in %.1f s", result.iterations, result.seconds)
    return result


def compare_to_reference(network: Mapping, reference: Mapping) -> dict:
    """Gap in test ROC-AUC and whether the network meets the development target."""
    gap = float(reference["roc_auc"]) - float(network["roc_auc"])
    meets = gap <= REFERENCE_TOLERANCE
    if not meets:
        log.warning(
            "network test ROC-AUC %.4f trails the reference %.4f by %.4f (target: at most %.3f)",
            network["roc_auc"], reference["roc_auc"], gap, REFERENCE_TOLERANCE,
        )
    return {"reference_gap": gap, "meets_reference": meets, "reference_tolerance": REFERENCE_TOLERANCE}


def roc_curve_points(labels: np.ndarray, scores: np.ndarray, max_points: int = 200) -> dict[str, list[float]]:
    """ROC curve as plain lists ``fpr``, ``tpr``, ``thresholds`` (≤ ``max_points``, ends kept).

    Fits ``ClassificationMetrics.log_roc_curve(fpr, tpr, threshold)`` in KFP; sklearn's leading
    infinite threshold is replaced by 1.0 so the lists serialise as JSON.
    """
    fpr, tpr, thresholds = roc_curve(labels, scores)
    if len(fpr) > max_points:
        keep = np.unique(np.linspace(0, len(fpr) - 1, max_points).round().astype(int))
        fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    thresholds = np.clip(np.nan_to_num(thresholds, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()}


def confusion_matrix_for_kfp(
    labels: np.ndarray, scores: np.ndarray, threshold: float
) -> tuple[list[str], list[list[int]]]:
    """``(categories, matrix)`` for ``ClassificationMetrics.log_confusion_matrix``.

    Rows are the actual class, columns the predicted class, in ``CLASS_NAMES`` order.
    """
    c = confusion_counts(labels, scores, threshold)
    return list(CLASS_NAMES), [[c["tn"], c["fp"]], [c["fn"], c["tp"]]]


def plot_curves(path: Path, labels: np.ndarray, scores_by_model: Mapping[str, np.ndarray]) -> Path:
    """ROC and precision-recall curves of each model on one PNG (written by the caller's rules)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (roc_axes, pr_axes) = plt.subplots(1, 2, figsize=(11, 4.8))
    for name, scores in scores_by_model.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        roc_axes.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(labels, scores):.4f})")
        precision, recall, _ = precision_recall_curve(labels, scores)
        pr_axes.plot(recall, precision, label=f"{name} (AP {average_precision_score(labels, scores):.4f})")
    roc_axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    roc_axes.set(title="ROC curve (test)", xlabel="false positive rate", ylabel="true positive rate")
    pr_axes.set(title="Precision-recall curve (test)", xlabel="recall", ylabel="precision")
    for axes in (roc_axes, pr_axes):
        axes.legend(loc="lower right" if axes is roc_axes else "lower left")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def reliability_points(
    labels: np.ndarray, scores: np.ndarray, bins: int = RELIABILITY_BINS
) -> dict[str, list[float]]:
    """Per equal-width probability bin (empty bins left out): mean score, fraud rate, row count."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.clip(np.asarray(scores, dtype=np.float64), 0, 1)
    index = np.minimum((scores * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    filled = counts > 0
    mean_score = np.bincount(index, weights=scores, minlength=bins)[filled] / counts[filled]
    fraud_rate = np.bincount(index, weights=labels, minlength=bins)[filled] / counts[filled]
    return {
        "bin_lower": (np.flatnonzero(filled) / bins).tolist(),
        "mean_score": mean_score.tolist(),
        "fraud_rate": fraud_rate.tolist(),
        "rows": counts[filled].astype(int).tolist(),
    }


def plot_reliability(path: Path, labels: np.ndarray, scores_by_model: Mapping[str, np.ndarray]) -> Path:
    """Reliability diagram of each model (top) over the rows per score bin (bottom, log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curve_axes, count_axes) = plt.subplots(
        2, 1, figsize=(6.4, 7.2), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    curve_axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfectly calibrated")
    # Side-by-side bars per bin, one per model, in the same colour order as the curves.
    bar_width = 1.0 / RELIABILITY_BINS / (len(scores_by_model) + 1)
    for offset, (name, scores) in enumerate(scores_by_model.items()):
        points = reliability_points(labels, scores)
        brier = brier_score_loss(labels, scores)
        curve_axes.plot(points["mean_score"], points["fraud_rate"], marker="o", label=f"{name} (Brier {brier:.4f})")
        count_axes.bar(np.asarray(points["bin_lower"]) + bar_width * (offset + 1), points["rows"], width=bar_width)
    curve_axes.set(title="Reliability diagram (test)", ylabel="observed fraud rate", xlim=(0, 1), ylim=(0, 1))
    curve_axes.legend(loc="upper left")
    curve_axes.grid(alpha=0.3)
    count_axes.set(xlabel="predicted fraud probability (bin)", ylabel="rows", yscale="log")
    count_axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)
