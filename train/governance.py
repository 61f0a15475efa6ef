"""Gates against the champion: is a newly registered version good enough to replace it?

Every gate compares the challenger with the champion on the **same rows**: both ONNX files are
scored here, on the test split of the challenger's run (the frozen test set of that run; its
fingerprint is recorded), never on metrics each computed on its own data.

The gates (``GatePolicy`` states every bound):

* absolute bars, always: test ROC-AUC at least ``min_roc_auc``, Brier score at most ``max_brier``;
  the first version (no champion yet) becomes champion by these alone;
* quality, no regression beyond a margin: ROC-AUC, PR-AUC, and recall at the operating precision
  (the champion's precision at its own threshold on these rows: the precision production runs at);
* calibration: the Brier score may exceed the champion's by at most ``brier_margin``;
* shadow disagreement: the share of rows whose fraud/legitimate decision flips between the two
  models (each at its own threshold) at most ``max_flip_rate``;
* latency (when measured): the challenger's p99 at most ``max_latency_factor`` times the champion's.

``decide`` records the report on the version (``gates``, ``gate_status``, ``gate_reason``) and moves
the aliases; a refused version also gets ``passed_gate = False``, so no fallback ever serves it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
from sklearn.metrics import average_precision_score, brier_score_loss, precision_recall_curve, roc_auc_score

from fraud_common.logs import get_logger
from fraud_common.registry import lifecycle, rollout
from fraud_common.registry.base import CHALLENGER, CHAMPION, ModelRegistry, ModelVersion
from fraud_common.settings import Settings
from train.gate import QualityGateError

log = get_logger(__name__)

ACTOR = "governance-gate"
PASSED, REFUSED = "passed", "refused"


@dataclass(frozen=True)
class GatePolicy:
    """Every bound the gates apply (margins are absolute differences)."""

    min_roc_auc: float = 0.95
    # A constant prediction of the fraud rate p scores p(1-p), about 0.08 at p = 0.09.
    max_brier: float = 0.05
    roc_auc_margin: float = 0.005
    pr_auc_margin: float = 0.01
    recall_margin: float = 0.02
    brier_margin: float = 0.002
    # A safety net for broken models (a feature-order bug, a noise model flips ~15% here), not a
    # veto on improvements: a better retrain flips some borderline decisions by design.
    max_flip_rate: float = 0.05
    max_latency_factor: float = 1.5

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: float) -> "GatePolicy":
        """The defaults with the absolute ROC-AUC bar of ``settings`` (``FRAUD_MIN_ROC_AUC``)."""
        return cls(**{"min_roc_auc": float(settings.min_roc_auc), **overrides})


@dataclass(frozen=True)
class GateResult:
    """One gate: the challenger's ``value`` against ``bound`` (``at_least`` or at most)."""

    gate: str
    passed: bool
    value: float
    bound: float
    at_least: bool
    champion: float | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(gate: str, value: float, bound: float, at_least: bool, champion: float | None, what: str) -> GateResult:
    """A ``GateResult``; NaN never passes."""
    ok = not math.isnan(value) and (value >= bound if at_least else value <= bound)
    relation = ">=" if at_least else "<="
    detail = f"{what} {value:.4f} {'meets' if ok else 'fails'} {relation} {bound:.4f}"
    if champion is not None:
        detail += f" (champion {champion:.4f})"
    return GateResult(gate, ok, float(value), float(bound), at_least, champion, detail)


def recall_at_precision(labels: np.ndarray, scores: np.ndarray, precision: float) -> float:
    """The highest recall any threshold reaches with precision at least ``precision`` (0 if none)."""
    curve_precision, curve_recall, _ = precision_recall_curve(labels, scores)
    reachable = curve_recall[curve_precision >= precision]
    return float(reachable.max()) if reachable.size else 0.0


def precision_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """Precision when ``score >= threshold`` means fraud (0 when nothing is flagged)."""
    flagged = np.asarray(scores) >= threshold
    return float(np.asarray(labels)[flagged].mean()) if flagged.any() else 0.0


def quality_figures(labels: np.ndarray, scores: np.ndarray, operating_precision: float) -> dict[str, float]:
    """ROC-AUC, PR-AUC, Brier and recall at ``operating_precision`` of one model on the test rows."""
    if not 0 < int(np.sum(labels)) < len(labels):
        raise ValueError("the test rows need both classes to compare models")
    return {
        "roc_auc": float(roc_auc_score(labels, scores)),
        "pr_auc": float(average_precision_score(labels, scores)),
        "brier": float(brier_score_loss(labels, scores)),
        "recall_at_precision": recall_at_precision(labels, scores, operating_precision),
    }


def quality_gates(challenger: dict[str, float], champion: dict[str, float] | None, policy: GatePolicy) -> list[GateResult]:
    """Absolute bars, then (with a champion) no regression beyond the margins."""
    results = [
        _check("min_roc_auc", challenger["roc_auc"], policy.min_roc_auc, True, None, "ROC-AUC"),
        _check("max_brier", challenger["brier"], policy.max_brier, False, None, "Brier score"),
    ]
    if champion is None:
        return results
    return results + [
        _check("roc_auc", challenger["roc_auc"], champion["roc_auc"] - policy.roc_auc_margin, True,
               champion["roc_auc"], f"ROC-AUC (margin {policy.roc_auc_margin})"),
        _check("pr_auc", challenger["pr_auc"], champion["pr_auc"] - policy.pr_auc_margin, True,
               champion["pr_auc"], f"PR-AUC (margin {policy.pr_auc_margin})"),
        _check("recall_at_precision", challenger["recall_at_precision"],
               champion["recall_at_precision"] - policy.recall_margin, True, champion["recall_at_precision"],
               f"recall at precision {champion['operating_precision']:.4f} (margin {policy.recall_margin})"),
        _check("brier", challenger["brier"], champion["brier"] + policy.brier_margin, False,
               champion["brier"], f"Brier score (margin {policy.brier_margin})"),
    ]


def flip_rate(champion_scores: np.ndarray, champion_threshold: float,
              challenger_scores: np.ndarray, challenger_threshold: float) -> float:
    """Share of rows whose decision differs between the two models (each at its own threshold)."""
    champion_scores, challenger_scores = np.ravel(champion_scores), np.ravel(challenger_scores)
    if champion_scores.shape != challenger_scores.shape or not champion_scores.size:
        raise ValueError(f"both models must score the same rows, got {champion_scores.size} and {challenger_scores.size}")
    return float(np.mean((champion_scores >= champion_threshold) != (challenger_scores >= challenger_threshold)))


def disagreement_gate(rate: float, policy: GatePolicy, rows: int, source: str = "test set") -> GateResult:
    """Shadow disagreement: the share of flipped decisions under ``max_flip_rate``."""
    return _check("shadow_disagreement", rate, policy.max_flip_rate, False, None,
                  f"flipped decisions on {rows} rows of the {source}")


def latency_gate(challenger_p99_ms: float, champion_p99_ms: float, policy: GatePolicy) -> GateResult:
    """The challenger's p99 (same load, same predictor) within ``max_latency_factor`` of the champion's.

    One definition with the canary's latency gate (``fraud_common.registry.rollout.latency_result``),
    which the predictor's measurement feeds.
    """
    return GateResult(**rollout.latency_result(challenger_p99_ms, champion_p99_ms, policy.max_latency_factor))


def rows_fingerprint(features: np.ndarray, labels: np.ndarray) -> str:
    """``sha256:<hex>`` of the test rows as scored (float32 features, int labels, in order)."""
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(features, dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return f"sha256:{digest.hexdigest()}"


@dataclass
class GateReport:
    """All gates of one challenger against one champion ("" for the first version)."""

    challenger: str
    champion: str
    results: list[GateResult]
    test_rows: int
    test_fingerprint: str
    figures: dict[str, dict[str, float]] = field(default_factory=dict)  # "challenger"/"champion" -> figures
    evaluated_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="milliseconds"))

    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.results)

    @property
    def reason(self) -> str:
        """Why it was refused: every failed gate's one line ("" when all passed)."""
        return "; ".join(result.detail for result in self.results if not result.passed)

    def to_record(self) -> dict[str, Any]:
        """What is written onto the version in the registry."""
        record: dict[str, Any] = {
            "gates": {
                "champion": self.champion,
                "test_rows": self.test_rows,
                "test_fingerprint": self.test_fingerprint,
                "evaluated_at": self.evaluated_at,
                "figures": self.figures,
                "results": {result.gate: result.to_dict() for result in self.results},
            },
            "gate_status": PASSED if self.passed else REFUSED,
            "gate_reason": self.reason,
        }
        if not self.passed:
            record["passed_gate"] = False
        return record

    def kfp_metrics(self) -> dict[str, float]:
        """Flat numbers for a KFP ``Metrics`` artifact (the run's UI shows them)."""
        metrics = {f"gate_{r.gate}_passed": float(r.passed) for r in self.results}
        for side, figures in self.figures.items():
            metrics.update({f"{side}_{name}": float(value) for name, value in figures.items()})
        metrics["gates_passed"] = float(self.passed)
        return metrics


def score_onnx(model_bytes: bytes, features: np.ndarray) -> np.ndarray:
    """Fraud probabilities of an exported model (the artifact contract: one float32 input)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    inputs = {session.get_inputs()[0].name: np.ascontiguousarray(features, dtype=np.float32)}
    return np.ravel(session.run([session.get_outputs()[0].name], inputs)[0]).astype(np.float64)


def current_champion(registry: ModelRegistry, model_name: str, challenger: str) -> ModelVersion | None:
    """The champion to compare ``challenger`` with, or None for the first version.

    A registry from before aliases has no champion but serves the newest version that passed
    the gate: that version (other than the challenger) is adopted as champion first, so that a
    refused challenger can never become the served fallback.
    """
    if any(event.alias == CHAMPION for event in registry.alias_history(model_name)):
        return registry.get_version(model_name, alias=CHAMPION)
    versions = registry.list_versions(model_name)
    names = [v.version for v in versions]
    earlier = versions[: names.index(challenger)] if challenger in names else versions
    served = [v for v in earlier if v.passed_gate]
    if not served:
        return None
    return registry.set_alias(
        model_name, CHAMPION, served[-1].version, ACTOR,
        "adopted as champion: the version served before aliases (newest that passed the gate)",
    )


def evaluate_against_champion(
    registry: ModelRegistry,
    model_name: str,
    version: str,
    features: np.ndarray,
    labels: np.ndarray,
    read_artifact: Callable[[str], bytes],
    policy: GatePolicy,
    latency_p99_ms: tuple[float, float] | None = None,
    served: np.ndarray | None = None,
) -> GateReport:
    """Score challenger and champion on the same test rows and run every gate.

    ``read_artifact`` returns a model file's bytes from its URI; ``latency_p99_ms`` is
    (challenger, champion) measured by the predictor under the same load, when available.
    ``served``: feature rows of recent served traffic (``served_rows``); the shadow
    disagreement is measured on them when there are any, else on the test rows.
    """
    challenger = registry.get_version(model_name, version)
    champion = current_champion(registry, model_name, version)
    labels = np.asarray(labels).astype(np.int64)
    challenger_scores = score_onnx(read_artifact(challenger.artifact_uri), features)
    figures: dict[str, dict[str, float]] = {}
    champion_figures = None
    if champion is not None:
        champion_scores = score_onnx(read_artifact(champion.artifact_uri), features)
        operating_precision = precision_at(labels, champion_scores, champion.threshold)
        champion_figures = {**quality_figures(labels, champion_scores, operating_precision),
                            "operating_precision": operating_precision}
        figures["champion"] = champion_figures
    else:
        operating_precision = precision_at(labels, challenger_scores, challenger.threshold)
    figures["challenger"] = {**quality_figures(labels, challenger_scores, operating_precision),
                             "operating_precision": operating_precision}
    results = quality_gates(figures["challenger"], champion_figures, policy)
    if champion is not None:
        if served is not None and len(served):
            shadow_rows, source = np.asarray(served, dtype=np.float32), "served traffic"
            rate = flip_rate(score_onnx(read_artifact(champion.artifact_uri), shadow_rows), champion.threshold,
                             score_onnx(read_artifact(challenger.artifact_uri), shadow_rows), challenger.threshold)
        else:
            shadow_rows, source = features, "test set"
            rate = flip_rate(champion_scores, champion.threshold, challenger_scores, challenger.threshold)
        figures["challenger"]["flip_rate"] = rate
        figures["challenger"]["shadow_rows"] = float(len(shadow_rows))
        results.append(disagreement_gate(rate, policy, len(shadow_rows), source))
        if latency_p99_ms is not None:
            results.append(latency_gate(*latency_p99_ms, policy))
    report = GateReport(
        challenger=version,
        champion=champion.version if champion is not None else "",
        results=results,
        test_rows=int(len(labels)),
        test_fingerprint=rows_fingerprint(features, labels),
        figures=figures,
    )
    log.info("gates of %s against %s: %s%s", version, report.champion or "(no champion)",
             PASSED if report.passed else REFUSED, f" ({report.reason})" if report.reason else "")
    return report


def served_rows(log_uri: str, settings: Settings, feature_names: list[str], hours: float = 24.0,
                max_rows: int = 50_000) -> np.ndarray | None:
    """The model inputs of the latest ``max_rows`` requests the predictor logged in the last ``hours``.

    None when there is no log (``log_uri`` empty, or nothing logged): the shadow gate then uses
    the test rows. Rows are in ``feature_names`` order (the model input order).
    """
    if not log_uri:
        return None
    from datetime import timedelta

    from fraud_common.prediction_log import SCORED_AT, read_log

    end = datetime.now(timezone.utc)
    table = read_log(log_uri, settings, end - timedelta(hours=hours), end, columns=list(feature_names))
    if not table.num_rows or any(name not in table.column_names for name in feature_names):
        return None
    table = table.sort_by([(SCORED_AT, "descending")]).slice(0, max_rows)
    return np.column_stack([table[name].to_numpy(zero_copy_only=False) for name in feature_names]).astype(np.float32)


@dataclass(frozen=True)
class Decision:
    """What ``decide`` did: ``outcome`` is promoted, challenger, refused or approval_timed_out."""

    outcome: str
    champion: str  # the champion after the decision (what production serves)
    reason: str


def decide(
    registry: ModelRegistry,
    model_name: str,
    report: GateReport,
    promote_now: bool = True,
    require_approval: bool = False,
    approval_timeout_seconds: float = 3600.0,
    wait: Callable[..., bool] = lifecycle.wait_for_approval,
) -> Decision:
    """Record ``report`` on the version, then refuse it, make it challenger, or promote it.

    ``promote_now=False`` stops at challenger (a canary promotes later); with
    ``require_approval`` the version waits for ``approve`` up to ``approval_timeout_seconds``.
    """
    version = report.challenger
    registry.update_metadata(model_name, version, report.to_record())
    champion = report.champion
    if not report.passed:
        if registry.get_version(model_name, version).alias == CHALLENGER:
            registry.clear_alias(model_name, CHALLENGER, ACTOR, f"refused: {report.reason}")
        return Decision(REFUSED, champion, report.reason)
    against = f"against champion {champion}" if champion else "first version: absolute bars"
    registry.set_alias(model_name, CHALLENGER, version, ACTOR, f"gates passed ({against})")
    if require_approval:
        lifecycle.request_approval(registry, model_name, version, ACTOR)
        if not wait(registry, model_name, version, approval_timeout_seconds):
            registry.clear_alias(model_name, CHALLENGER, ACTOR, "approval timed out")
            return Decision("approval_timed_out", champion, f"no approval within {approval_timeout_seconds:.0f} s")
    if not promote_now:
        return Decision("challenger", champion, f"gates passed ({against}); awaiting rollout")
    lifecycle.promote(registry, model_name, version, ACTOR, f"gates passed ({against})")
    return Decision("promoted", version, f"gates passed ({against})")


def raise_if_refused(decision: Decision) -> None:
    """For callers that stop on a refusal (the pipeline step fails, naming the failed gates)."""
    if decision.outcome == REFUSED:
        raise QualityGateError(f"refused at the gate (champion {decision.champion or 'none'}): {decision.reason}")
