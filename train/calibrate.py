"""Calibration: turn the network's logit into a probability that means what it says.

The network is trained with balanced class weights, so its raw sigmoid overstates fraud (the F1
threshold lands near 0.9). A one-dimensional map fitted on the **valid** split fixes that:

- ``platt``: ``sigmoid(a * logit + b)``, a logistic regression on the logit. Strictly increasing
  (``a > 0``), so the ranking and ROC-AUC are unchanged.
- ``isotonic``: a non-decreasing piecewise-linear map through knots fitted by isotonic regression.
  More flexible, but it pools rows into plateaus, and ties cost ROC-AUC.

Both act on the logit (the input of the network's last sigmoid), not on the saturated float32
probability, whose ``logit(p)`` loses precision near 1. ``choose_calibration`` compares the two by
cross-validation inside the valid split and keeps the lower Brier score among the maps that do not
cost ranking quality. Each map is also written as ONNX nodes (``onnx_nodes``) with its parameters as
constants, so the served graph computes exactly what ``apply`` computes here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.special import expit
from onnx import NodeProto, TensorProto, helper, numpy_helper
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score
from sklearn.model_selection import StratifiedKFold

from fraud_common.logs import get_logger

log = get_logger(__name__)

Method = Literal["platt", "isotonic"]
METHODS: tuple[Method, ...] = ("platt", "isotonic")
# A map may cost at most this much cross-validated valid ROC-AUC versus the raw logit; isotonic
# plateaus (tied scores) usually cost more, Platt costs nothing.
RANKING_TOLERANCE = 0.0005
CV_FOLDS = 5


@dataclass(frozen=True)
class Calibration:
    """A monotone map from the network's logit to a calibrated fraud probability.

    ``platt`` uses ``slope``/``intercept``; ``isotonic`` uses the increasing ``knots`` (logits)
    and non-decreasing ``values`` (probabilities), linear between knots and flat outside them.
    """

    method: Method
    slope: float = 1.0
    intercept: float = 0.0
    knots: tuple[float, ...] = ()
    values: tuple[float, ...] = ()
    report: dict = field(default_factory=dict, compare=False)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (float64, same shape as ``logits``)."""
        z = np.asarray(logits, dtype=np.float64)
        if self.method == "platt":
            return expit(self.slope * z + self.intercept)
        return np.interp(z, self.knots, self.values)

    def to_dict(self) -> dict:
        """Parameters and the selection report, for metrics.json."""
        out: dict = {"method": self.method}
        if self.method == "platt":
            out.update(slope=self.slope, intercept=self.intercept)
        else:
            out.update(knots=len(self.knots))
        out.update(self.report)
        return out

    def onnx_nodes(self, logit: str, probability: str) -> tuple[list[NodeProto], list[TensorProto]]:
        """Nodes (and constant initializers) computing ``probability = apply(logit)`` in ONNX."""
        if self.method == "platt":
            constants = [_scalar("calibration_slope", self.slope), _scalar("calibration_intercept", self.intercept)]
            nodes = [
                helper.make_node("Mul", [logit, "calibration_slope"], ["calibration_scaled"]),
                helper.make_node("Add", ["calibration_scaled", "calibration_intercept"], ["calibration_z"]),
                helper.make_node("Sigmoid", ["calibration_z"], [probability]),
            ]
            return nodes, constants
        return _isotonic_nodes(np.asarray(self.knots), np.asarray(self.values), logit, probability)


def _scalar(name: str, value: float) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _isotonic_nodes(
    knots: np.ndarray, values: np.ndarray, logit: str, probability: str
) -> tuple[list[NodeProto], list[TensorProto]]:
    """Piecewise-linear interpolation: find the segment, then ``y[i] + slope[i] * (z - x[i])``.

    One segment per row (a gather, not a sum over all segments) keeps float32 error at a few ulps.
    """
    slopes = np.diff(values) / np.diff(knots)
    constants = [
        _scalar("calibration_low", knots[0]),
        _scalar("calibration_high", knots[-1]),
        numpy_helper.from_array(knots[1:-1].astype(np.float32), "calibration_inner_knots"),
        numpy_helper.from_array(knots[:-1].astype(np.float32), "calibration_segment_start"),
        numpy_helper.from_array(values[:-1].astype(np.float32), "calibration_segment_value"),
        numpy_helper.from_array(slopes.astype(np.float32), "calibration_segment_slope"),
        numpy_helper.from_array(np.asarray([1], dtype=np.int64), "calibration_axis"),
    ]
    nodes = [
        helper.make_node("Clip", [logit, "calibration_low", "calibration_high"], ["calibration_z"]),
        # Segment index = number of inner knots at or below z: [batch, 1] against [K-2].
        helper.make_node("GreaterOrEqual", ["calibration_z", "calibration_inner_knots"], ["calibration_above"]),
        helper.make_node("Cast", ["calibration_above"], ["calibration_above_int"], to=TensorProto.INT64),
        helper.make_node(
            "ReduceSum", ["calibration_above_int", "calibration_axis"], ["calibration_segment"], keepdims=1
        ),
        helper.make_node("Gather", ["calibration_segment_start", "calibration_segment"], ["calibration_x0"]),
        helper.make_node("Gather", ["calibration_segment_value", "calibration_segment"], ["calibration_y0"]),
        helper.make_node("Gather", ["calibration_segment_slope", "calibration_segment"], ["calibration_slope"]),
        helper.make_node("Sub", ["calibration_z", "calibration_x0"], ["calibration_offset"]),
        helper.make_node("Mul", ["calibration_offset", "calibration_slope"], ["calibration_rise"]),
        helper.make_node("Add", ["calibration_y0", "calibration_rise"], [probability]),
    ]
    return nodes, constants


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> Calibration:
    """Logistic regression of the label on the logit (no penalty worth the name)."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1, 1)
    regression = LogisticRegression(C=1e6, solver="newton-cholesky", max_iter=100).fit(z, np.asarray(labels))
    return Calibration("platt", slope=float(regression.coef_[0, 0]), intercept=float(regression.intercept_[0]))


def fit_isotonic(logits: np.ndarray, labels: np.ndarray) -> Calibration:
    """Isotonic regression of the label on the logit, kept as its knots."""
    regression = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
    regression.fit(np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64))
    knots = np.asarray(regression.X_thresholds_, dtype=np.float64)
    values = np.asarray(regression.y_thresholds_, dtype=np.float64)
    if len(knots) < 2:  # one pooled block: a constant map still needs one segment
        knots = np.array([knots[0], knots[0] + 1.0])
        values = np.array([values[0], values[0]])
    return Calibration("isotonic", knots=tuple(knots.tolist()), values=tuple(values.tolist()))


FITTERS = {"platt": fit_platt, "isotonic": fit_isotonic}


def is_monotone(calibration: Calibration) -> bool:
    """Whether the map never decreases (Platt with a non-positive slope would reverse or flatten)."""
    if calibration.method == "platt":
        return calibration.slope > 0
    return bool(np.all(np.diff(calibration.values) >= 0) and np.all(np.diff(calibration.knots) > 0))


def cross_validated(method: Method, logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """Out-of-fold Brier score and ROC-AUC loss of ``method`` within one split (stratified k-fold).

    The ROC-AUC loss is the mean over held-out folds of raw-logit AUC minus mapped AUC: the ranking
    each fold's map costs on rows it did not see (pooling folds would mix several maps' scales).
    """
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    held_out = np.empty(len(labels))
    auc_losses: list[float] = []
    monotone = True
    folds = StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=seed)
    for fit_rows, score_rows in folds.split(logits.reshape(-1, 1), labels):
        fold_map = FITTERS[method](logits[fit_rows], labels[fit_rows])
        monotone &= is_monotone(fold_map)
        held_out[score_rows] = fold_map.apply(logits[score_rows])
        fold_labels = labels[score_rows]
        auc_losses.append(
            roc_auc_score(fold_labels, logits[score_rows]) - roc_auc_score(fold_labels, held_out[score_rows])
        )
    return {
        "cv_brier": float(brier_score_loss(labels, held_out)),
        "cv_roc_auc_loss": float(np.mean(auc_losses)),
        "monotone": bool(monotone),
    }


def choose_calibration(logits: np.ndarray, labels: np.ndarray, seed: int = 0) -> Calibration:
    """Fit Platt and isotonic on these (valid) rows and keep the better, refitted on all of them.

    Better means the lower cross-validated Brier score among the maps that are monotone and lose at
    most ``RANKING_TOLERANCE`` cross-validated ROC-AUC against the raw logit; Platt if none qualifies
    (it never changes the ranking when its slope is positive).
    """
    labels = np.asarray(labels)
    if np.sum(labels) < CV_FOLDS or np.sum(1 - labels) < CV_FOLDS:
        raise ValueError("calibration needs both classes in the valid split (at least 5 frauds)")
    candidates = {method: cross_validated(method, logits, labels, seed) for method in METHODS}
    for scores in candidates.values():
        scores["qualifies"] = bool(scores["monotone"] and scores["cv_roc_auc_loss"] <= RANKING_TOLERANCE)
    qualified = [m for m in METHODS if candidates[m]["qualifies"]]
    chosen: Method = min(qualified, key=lambda m: candidates[m]["cv_brier"]) if qualified else "platt"
    fitted = FITTERS[chosen](logits, labels)
    if not is_monotone(fitted):
        log.warning("the %s map fitted on all valid rows is not increasing; using isotonic", chosen)
        chosen, fitted = "isotonic", fit_isotonic(logits, labels)
    report = {
        "fitted_on": "valid",
        "selection": f"lowest {CV_FOLDS}-fold cross-validated Brier on valid among monotone maps "
        f"losing at most {RANKING_TOLERANCE} ROC-AUC",
        "candidates": candidates,
    }
    log.info(
        "calibration: %s (cv Brier platt %.5f, isotonic %.5f; cv ROC-AUC loss platt %.5f, isotonic %.5f)",
        chosen, candidates["platt"]["cv_brier"], candidates["isotonic"]["cv_brier"],
        candidates["platt"]["cv_roc_auc_loss"], candidates["isotonic"]["cv_roc_auc_loss"],
    )
    return Calibration(
        chosen, fitted.slope, fitted.intercept, fitted.knots, fitted.values, report=report
    )
