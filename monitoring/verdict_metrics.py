"""The monitor's verdict as Prometheus metrics, for the cluster's drift alert.

A monitor run is a batch job: nothing scrapes it while it lives. Its verdict is written beside
the report as ``metrics.prom`` (Prometheus text format, for a node-exporter textfile collector or
a look by hand) and, when ``FRAUD_PUSHGATEWAY_URL`` is set, pushed to that Pushgateway under
job ``fraud-detection-monitor``; the PrometheusRule in ``manifests/monitoring`` alerts on
``fraud_monitor_drift_alert == 1`` and on a verdict older than two schedule periods.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Gauge, generate_latest, push_to_gateway

from fraud_common import storage
from fraud_common.logs import get_logger
from fraud_common.settings import Settings
from monitoring.report import MonitorResult

log = get_logger(__name__)

JOB = "fraud-detection-monitor"
METRICS_FILE = "metrics.prom"


def verdict_registry(result: MonitorResult, finished_at: float) -> CollectorRegistry:
    """A registry holding one monitor run's verdict, per-column PSI and realized metrics."""
    registry = CollectorRegistry()
    Gauge("fraud_monitor_drift_alert", "1 if the last drift report raised the alert, else 0.", registry=registry).set(
        1 if result.drifted else 0
    )
    Gauge("fraud_monitor_last_run_timestamp_seconds", "When the last drift report finished (Unix time).", registry=registry).set(finished_at)
    Gauge("fraud_monitor_window_rows", "Logged predictions in the last report's window.", registry=registry).set(result.rows)
    psi = Gauge("fraud_monitor_psi", "PSI of each compared column in the last report.", ["column"], registry=registry)
    drifted = Gauge("fraud_monitor_column_drifted", "1 for each column that raised the alert.", ["column"], registry=registry)
    for column in result.columns:
        psi.labels(column.name).set(column.psi)
        drifted.labels(column.name).set(1 if column.drifted else 0)
    if result.overall is not None:
        realized = Gauge("fraud_monitor_realized", "Realized performance over the labelled predictions.", ["metric"], registry=registry)
        for name in ("precision", "recall", "roc_auc"):
            value = getattr(result.overall, name)
            if value is not None and math.isfinite(value):
                realized.labels(name).set(value)
    return registry


def publish(result: MonitorResult, out_uri: str, settings: Settings, finished_at: float) -> str | None:
    """Write ``metrics.prom`` under ``out_uri`` and push to the Pushgateway if one is set; returns where pushed."""
    registry = verdict_registry(result, finished_at)
    storage.write_bytes(storage.join(out_uri, METRICS_FILE), generate_latest(registry), settings)
    if not settings.pushgateway_url:
        return None
    try:
        push_to_gateway(settings.pushgateway_url, job=JOB, registry=registry, timeout=10)
    except OSError as err:  # the report stands; a missing push shows as the stale-verdict alert
        log.error("verdict not pushed to the Pushgateway %s: %s", settings.pushgateway_url, err)
        return None
    return settings.pushgateway_url
