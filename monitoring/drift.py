"""Drift statistics of record: quantile-binned PSI, two-sample Kolmogorov-Smirnov, Wasserstein.

PSI (population stability index) compares the share of rows per bin:
``PSI = sum_i (c_i - r_i) * ln(c_i / r_i)``, where ``r_i`` and ``c_i`` are the reference's and the
current window's shares of bin ``i``. The bins come from the *reference's* deciles (interior cut
points at its 10th..90th percentiles, numpy's linear quantiles, repeated cut points merged, bins
closed on the right), so every bin holds about a tenth of the reference however skewed the column
is; equal-width bins put most of a skewed column in one bin and understate its drift. A share of 0
(an empty bin) is floored at ``EPSILON`` = 1e-4 so the logarithm is finite. Conventional bands:
below 0.1 stable, 0.1 to 0.25 a moderate shift worth a look, 0.25 and above a major shift.

KS and Wasserstein are computed together from the two sorted samples (``ecdf_distances``; the
tests hold them equal to ``scipy.stats.ks_2samp`` and ``wasserstein_distance``, which are several
times slower at a million rows). The KS statistic D is the largest gap between the two empirical CDFs (for a 0/1 flag: the change
in the share of ones). With hundreds of thousands of rows its p-value is tiny for any shift at
all, so a feature counts as drifted by KS only if the test is significant *and* D is large enough
to matter. Wasserstein (earth mover's) distance is reported in the feature's own units and in
reference standard deviations, for reading, not for alerting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


import numpy as np
from scipy import stats

from monitoring.config import DECILES, EPSILON, DriftThresholds

@dataclass
class ColumnDrift:
    """One column's comparison of the window with the reference."""

    name: str
    reference_rows: int
    current_rows: int
    current_missing: int  # NaN in the window (not used in the statistics)
    psi: float
    psi_band: str  # stable | moderate | major
    ks_statistic: float
    ks_pvalue: float
    wasserstein: float
    wasserstein_in_std: float  # wasserstein / reference standard deviation (0 std: nan)
    reference_mean: float
    current_mean: float
    drifted: bool
    reasons: list[str] = field(default_factory=list)
    edges: list[float] = field(default_factory=list)  # interior cut points from the reference
    reference_shares: list[float] = field(default_factory=list)
    current_shares: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form (NaN becomes None)."""
        return {k: _jsonable(v) for k, v in asdict(self).items()}


def _jsonable(value: object) -> object:
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def quantile_edges(reference: np.ndarray, bins: int = DECILES) -> np.ndarray:
    """Interior cut points at the reference's 1/bins..(bins-1)/bins quantiles, repeats merged."""
    if reference.size == 0:
        raise ValueError("reference is empty")
    return np.unique(np.quantile(reference, np.arange(1, bins) / bins))


def bin_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of ``values`` in each bin ``(-inf, e0], (e0, e1], ..., (e_last, inf)``."""
    index = np.searchsorted(edges, values, side="left")
    counts = np.bincount(index, minlength=edges.size + 1)
    return counts / max(values.size, 1)


def psi_from_shares(reference_shares: np.ndarray, current_shares: np.ndarray, epsilon: float = EPSILON) -> float:
    """PSI of two share vectors over the same bins, empty shares floored at ``epsilon``."""
    r = np.maximum(reference_shares, epsilon)
    c = np.maximum(current_shares, epsilon)
    return float(np.sum((c - r) * np.log(c / r)))


def psi(reference: np.ndarray, current: np.ndarray, bins: int = DECILES, epsilon: float = EPSILON) -> float:
    """Quantile-binned PSI of ``current`` against ``reference`` (bins from the reference)."""
    edges = quantile_edges(reference, bins)
    return psi_from_shares(bin_shares(reference, edges), bin_shares(current, edges), epsilon)


def ecdf_distances(reference_sorted: np.ndarray, current_sorted: np.ndarray) -> tuple[float, float]:
    """KS statistic D and Wasserstein-1 distance from both samples' empirical CDFs, in one pass.

    Both CDFs are evaluated (right-continuous) at every value of the pooled sample: D is the
    largest gap, Wasserstein the area between them (the gap times the width of each interval
    between consecutive pooled values). Inputs must be sorted.
    """
    pooled = np.sort(np.concatenate([reference_sorted, current_sorted]), kind="stable")
    gap = np.abs(
        np.searchsorted(reference_sorted, pooled, side="right") / reference_sorted.size
        - np.searchsorted(current_sorted, pooled, side="right") / current_sorted.size
    )
    return float(gap.max()), float(np.sum(gap[:-1] * np.diff(pooled)))


def ks_pvalue(statistic: float, n: int, m: int) -> float:
    """Two-sided p-value of D for samples of sizes n and m: the asymptotic form scipy's ks_2samp
    uses for large samples, the Kolmogorov distribution at the effective size n*m/(n+m)."""
    return float(np.clip(stats.kstwo.sf(statistic, np.round(n * m / (n + m))), 0.0, 1.0))


def psi_band(value: float, thresholds: DriftThresholds = DriftThresholds()) -> str:
    """``stable`` below 0.1, ``moderate`` below 0.25, ``major`` from 0.25 (by default)."""
    if value >= thresholds.psi_alert:
        return "major"
    if value >= thresholds.psi_moderate:
        return "moderate"
    return "stable"


def compare_column(
    name: str, reference: np.ndarray, current: np.ndarray, thresholds: DriftThresholds = DriftThresholds()
) -> ColumnDrift:
    """All statistics of one column, and whether it drifted by the thresholds."""
    reference = np.asarray(reference, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    reference = np.sort(reference[np.isfinite(reference)])
    finite = np.isfinite(current)
    missing = int(current.size - finite.sum())
    current = np.sort(current[finite])
    if reference.size == 0 or current.size == 0:
        raise ValueError(f"column {name!r} has no finite values in the {'reference' if reference.size == 0 else 'window'}")
    edges = quantile_edges(reference, thresholds.bins)
    ref_shares, cur_shares = bin_shares(reference, edges), bin_shares(current, edges)
    value = psi_from_shares(ref_shares, cur_shares, thresholds.epsilon)
    ks_statistic, distance = ecdf_distances(reference, current)
    pvalue = ks_pvalue(ks_statistic, reference.size, current.size)
    std = float(reference.std())
    band = psi_band(value, thresholds)
    reasons = []
    if band == "major":
        reasons.append(f"PSI {value:.3f} >= {thresholds.psi_alert}")
    if pvalue < thresholds.ks_alpha and ks_statistic >= thresholds.ks_min_statistic:
        reasons.append(f"KS D {ks_statistic:.3f} >= {thresholds.ks_min_statistic} (p {pvalue:.1e} < {thresholds.ks_alpha})")
    return ColumnDrift(
        name=name,
        reference_rows=int(reference.size),
        current_rows=int(current.size),
        current_missing=missing,
        psi=value,
        psi_band=band,
        ks_statistic=ks_statistic,
        ks_pvalue=pvalue,
        wasserstein=distance,
        wasserstein_in_std=distance / std if std > 0 else float("nan"),
        reference_mean=float(reference.mean()),
        current_mean=float(current.mean()),
        drifted=bool(reasons),
        reasons=reasons,
        edges=[float(e) for e in edges],
        reference_shares=[float(s) for s in ref_shares],
        current_shares=[float(s) for s in cur_shares],
    )


def compare(
    reference: dict[str, np.ndarray], current: dict[str, np.ndarray], thresholds: DriftThresholds = DriftThresholds()
) -> list[ColumnDrift]:
    """``compare_column`` for every column of ``reference`` (``current`` must have them all)."""
    missing = [name for name in reference if name not in current]
    if missing:
        raise ValueError(f"window lacks columns {missing}")
    return [compare_column(name, reference[name], current[name], thresholds) for name in reference]
