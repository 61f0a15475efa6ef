"""The monitoring step's one config object (thresholds) and its error type; imports nothing heavy,
so the CLI can build its parser without loading numpy, scipy or matplotlib."""

from __future__ import annotations

from dataclasses import dataclass

EPSILON = 1e-4  # share that stands in for an empty PSI bin
DECILES = 10


class MonitorError(ValueError):
    """The monitor cannot produce a verdict (no data, missing columns, a bad window)."""


@dataclass(frozen=True)
class DriftThresholds:
    """When a column counts as drifted; the defaults are the conventional values."""

    psi_moderate: float = 0.1  # PSI band edge: stable below, moderate from here
    psi_alert: float = 0.25  # PSI band edge: major shift, raises the alert
    ks_alpha: float = 0.01  # KS p-value below this is significant...
    ks_min_statistic: float = 0.1  # ...and alerts only if D is at least this
    bins: int = DECILES
    epsilon: float = EPSILON
    min_rows: int = 500  # a window with fewer logged rows is an error, not a verdict
