"""The quality gate: a model whose test ROC-AUC is below the bar is not registered."""

from __future__ import annotations

import math
from typing import Mapping


class QualityGateError(RuntimeError):
    """The model does not meet the quality bar (or its metrics do not say)."""


def check_gate(metrics: Mapping, min_roc_auc: float) -> None:
    """Return quietly if ``metrics["roc_auc"]`` (test) reaches ``min_roc_auc``, else raise."""
    value = metrics.get("roc_auc")
    try:
        roc_auc = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise QualityGateError(
            f"metrics have no usable test ROC-AUC (roc_auc={value!r}); model not registered"
        ) from None
    if math.isnan(roc_auc) or roc_auc < min_roc_auc:
        raise QualityGateError(
            f"test ROC-AUC {roc_auc:.4f} is below the quality bar {min_roc_auc:.4f}; "
            "model not registered"
        )
