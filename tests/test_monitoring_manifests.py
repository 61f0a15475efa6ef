"""manifests/monitoring: rendered by the real ``kubectl kustomize``, custom resources validated
against the Prometheus Operator CRDs in ../shared/crds, core objects against Kubernetes' schemas,
and every metric an alert or a dashboard panel names is one the predictor or the monitor exports."""

from __future__ import annotations

import http.server
import json
import re
import threading
from typing import Any

import pytest

from pipeline import k8s
from pipeline import monitoring_pipeline as mp
from test_cluster import K8S_VERSION, _find, _render
from test_k8s import crd_errors

PROMETHEUS_GROUP = "monitoring.coreos.com"


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return _render("manifests/monitoring")


def exported_metric_names() -> set[str]:
    """Every series name the predictor's registry and the monitor's verdict registry can export."""
    from prometheus_client import REGISTRY

    import rest_predictor.metrics  # noqa: F401 - registers the predictor's metrics
    from monitoring.feedback import RealizedMetrics
    from monitoring.report import MonitorResult
    from monitoring.verdict_metrics import verdict_registry

    result = MonitorResult("", "", "", "", 0, 0, {}, [], None, [], None)  # type: ignore[arg-type]
    result.overall = RealizedMetrics("all", 1, 1, 1, 1.0, 1.0, 1.0)
    names = set()
    for registry in (REGISTRY, verdict_registry(result, 0.0)):
        for family in registry.collect():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
            names |= {family.name + s for s in suffixes}
    return names


def referenced_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\bfraud_[a-z_]+\b", expr))


def test_custom_resources_are_valid_against_the_operator_crds(objects) -> None:  # noqa: ANN001
    custom = [o for o in objects if o["apiVersion"].split("/")[0] == PROMETHEUS_GROUP]
    assert sorted(o["kind"] for o in custom) == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
    for obj in custom:
        assert crd_errors(obj) == [], f"{obj['kind']} {obj['metadata']['name']}"
    broken = {**custom[0], "spec": {**custom[0]["spec"], "podMetricsEndpoint": []}}  # a misspelt field
    assert crd_errors(broken), "the validation must be able to fail"


def test_core_objects_are_valid_kubernetes_and_labelled(objects) -> None:  # noqa: ANN001
    import kubernetes_validate

    for obj in objects:
        assert obj["metadata"]["namespace"] == "fraud-detection"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fraud-detection"
        if obj["apiVersion"].split("/")[0] != PROMETHEUS_GROUP:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_pod_monitor_scrapes_the_port_and_pods_the_pipeline_deploys(objects) -> None:  # noqa: ANN001
    isvc = k8s.inference_service("fraud-detection", "fraud-detection", "image", "fraud-detection", "1")
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    (endpoint,) = _find(objects, "PodMonitor", "fraud-detection-predictor")["spec"]["podMetricsEndpoints"]
    assert endpoint["portNumber"] == k8s.PREDICTOR_PORT == 8080  # not 9091, KServe's annotation's port
    assert {"containerPort": 8080, "protocol": "TCP"} in container["ports"] and endpoint["path"] == "/metrics"
    selector = _find(objects, "PodMonitor", "fraud-detection-predictor")["spec"]["selector"]["matchLabels"]
    assert selector.items() <= predictor["labels"].items(), "the PodMonitor must select the predictor's pods"


def test_alerts_cover_latency_errors_traffic_and_drift_on_exported_metrics(objects) -> None:  # noqa: ANN001
    rules = [r for g in _find(objects, "PrometheusRule", "fraud-detection")["spec"]["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"FraudPredictorHighLatency", "FraudPredictorErrors", "FraudPredictorNoTraffic", "FraudFeatureDrift",
            "FraudDriftReportStale"} <= names
    exported = exported_metric_names()
    for rule in rules:
        unknown = referenced_metrics(rule["expr"]) - exported
        assert not unknown, f"{rule['alert']} names metrics nothing exports: {sorted(unknown)}"
    assert referenced_metrics("rate(fraud_predictor_nonexistent_total[5m])") - exported, "the check must be able to fail"


def test_dashboard_is_provisioned_for_the_grafana_sidecar_and_plots_exported_metrics(objects) -> None:  # noqa: ANN001
    config_map = _find(objects, "ConfigMap", "fraud-detection-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["fraud-detection.json"])
    exported = exported_metric_names()
    plotted = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            unknown = referenced_metrics(target["expr"]) - exported
            assert not unknown, f"panel {panel['title']!r} plots metrics nothing exports: {sorted(unknown)}"
            plotted |= referenced_metrics(target["expr"])
    for needed in ("fraud_predictor_scores_bucket", "fraud_predictor_decisions_total", "fraud_predictor_model_info",
                   "fraud_predictor_feature_missing_total", "fraud_predictor_unknown_users_total", "fraud_monitor_psi"):
        assert needed in plotted, needed


def test_the_pipeline_pushes_to_the_pushgateway_the_manifests_deploy(objects) -> None:  # noqa: ANN001
    service = _find(objects, "Service", "fraud-detection-pushgateway")
    (port,) = service["spec"]["ports"]
    assert mp.PUSHGATEWAY_URL == f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{port['port']}"
    monitor = _find(objects, "ServiceMonitor", "fraud-detection-pushgateway")
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True  # keep the pushed job label the alerts select on


def test_main_manifests_stay_free_of_operator_kinds() -> None:
    # manifests/ must apply on a bare kind cluster: monitoring is its own overlay.
    assert not [o for o in _render("manifests") if o["apiVersion"].startswith(PROMETHEUS_GROUP)]


def test_monitor_pushes_its_verdict_over_http(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Against a plain HTTP server standing in for the Pushgateway (there is none on this machine):
    the verdict arrives as a PUT of Prometheus text under the monitor's job."""
    from fraud_common.settings import Settings
    from monitoring.report import MonitorResult
    from monitoring.verdict_metrics import JOB, publish
    from monitoring.drift import compare
    import numpy as np

    received: list[tuple[str, str, bytes]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
            received.append((self.command, self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rng = np.random.default_rng(0)
        columns = compare({"online_order": (rng.random(2000) < 0.3).astype(float)}, {"online_order": np.ones(2000)})
        result = MonitorResult("", "", "", "", 2000, 2000, {}, [], None, columns, None)  # type: ignore[arg-type]
        settings = Settings.from_env({"FRAUD_HOME": str(tmp_path), "FRAUD_PUSHGATEWAY_URL": f"127.0.0.1:{server.server_port}"})
        assert publish(result, str(tmp_path / "out"), settings, 1234.0) == settings.pushgateway_url
    finally:
        server.shutdown()
    ((method, path, body),) = received
    assert (method, path) == ("PUT", f"/metrics/job/{JOB}")
    text = body.decode()
    assert "fraud_monitor_drift_alert 1.0" in text and 'fraud_monitor_column_drifted{column="online_order"} 1.0' in text
    assert (tmp_path / "out" / "metrics.prom").read_bytes() == body
