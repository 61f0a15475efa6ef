"""Champion, challenger, canary and rollback, end to end on small data.

The scenario of the governance issue, with a real predictor (``python -m rest_predictor.predictor``
on a free port), a real Feast store per version, real ONNX models (logistic regressions fitted
here and exported with the trainer's metadata), the real gates and the real canary driver, on
both registry backends (the embedded SQLite one, and the Kubeflow client against the stand-in
server of test_registry):

v1 (champion by the absolute bars) → a better v2 passes the gates, goes through the canary
10 → 50 → 100 % and becomes champion → v3 (shuffled labels), whose run re-materializes other data
into the feature step's store, is refused at the gate with the reason, and every live answer
stays byte-identical → v4 passes the gates but answers 30 % errors (fault injection) and is rolled
back automatically during the canary. Live answers are checked at each step.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pytest
import requests
from test_registry import kubeflow_settings, stand_in  # noqa: F401 - the fixture is used by name

from conftest import REPO_ROOT, free_port
from fraud_common import schemas
from fraud_common.feature_store import publish_snapshot
from fraud_common.registry import lifecycle, open_registry
from fraud_common.registry.rollout import CanaryPolicy, StepStats, VersionStats, check_step, parse_steps, wilson_lower
from fraud_common.registry.serving import serving_record, snapshot_of, store_snapshot, version_store_uri
from fraud_common.settings import Settings
from helpers import build_feast_store, label_features, wait_until_ready, write_prepared
from rest_predictor import canary
from train import governance
from train.governance import GatePolicy

V1 = "/v1/models/onnx-model:predict"
USERS = 4_000
# Small data: bars sized for a logistic model on 1,500 users; margins and bounds as shipped.
POLICY = GatePolicy(min_roc_auc=0.85, max_brier=0.1)
# Sub-millisecond p99s on a shared 2-core machine jitter by more than 1.5x; the test states its own factor.
LATENCY_FACTOR = 3.0
# The step's latency check as shipped, but 20 ms slack: a 30-request p99 is its slowest request,
# and a loaded shared host stalls a process for that long now and then.
CANARY = CanaryPolicy(steps=(10, 50, 100), min_requests=30, step_seconds=1.0, step_timeout_seconds=60.0,
                      latency_slack_ms=20.0)
FAULTY = "v4"


# --- Unit checks of the split and the step checks ----------------------------------------------


def test_steps_parse_and_refuse_nonsense() -> None:
    assert parse_steps("10,50,100") == (10, 50, 100)
    for bad in ("", "10,50", "50,10,100", "0,100", "10,x,100", "10,10,100"):
        with pytest.raises(ValueError, match="canary steps"):
            parse_steps(bad)


def test_step_checks_fail_on_errors_latency_scores_and_missing_traffic() -> None:
    SHIPPED = CanaryPolicy()  # noqa: N806 - the bounds as shipped
    fine = VersionStats(requests=100, errors=0, p99_ms=1.0)
    base = StepStats(percent=10, seconds=2.0, champion=fine, challenger=fine, score_distance=0.01, flip_rate=0.01, paired_rows=100)
    assert check_step(base, SHIPPED).passed
    cases = {
        "error_rate": {"challenger": VersionStats(100, 8, 1.0)},  # 5/100 could be noise around 1 %
        "latency_p99": {"challenger": VersionStats(100, 0, 1.0 * 1.5 + 5.01)},
        "score_distance": {"score_distance": 0.051},
        "flip_rate": {"flip_rate": 0.12},
        "traffic": {"challenger": VersionStats(29, 0, 1.0)},
    }
    assert check_step(StepStats(**{**base.__dict__, "flip_rate": 0.06}), SHIPPED).passed  # 6/100: not evidence
    assert abs(wilson_lower(8, 44) - 0.0951) < 1e-3
    for name, change in cases.items():
        result = check_step(StepStats(**{**base.__dict__, **change}), SHIPPED)
        assert [c.name for c in result.checks if not c.passed] == [name], name
        assert result.reason and not result.passed


def test_split_is_sticky_per_card_and_near_its_share() -> None:
    users = [schemas.user_id(i) for i in range(10_000)]
    share = np.mean([canary.bucket(u) < 10 for u in users])
    assert 0.08 < share < 0.12
    assert canary.bucket("user_7") == canary.bucket("user_7")
    assert canary.score_distance(np.linspace(0, 1, 500), np.linspace(0, 1, 500)) < 1e-12
    assert abs(canary.score_distance(np.zeros(10), np.ones(7)) - 1.0) < 1e-12
    assert abs(canary.score_distance(np.full(9, 0.1), np.full(5, 0.15)) - 0.05) < 1e-9


# --- The scenario --------------------------------------------------------------------------------


def logistic_onnx(path: Path, weights: np.ndarray, bias: float, threshold: float) -> Path:
    """``sigmoid(features @ weights + bias)`` with the trainer's metadata (feature names, threshold)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = len(schemas.MODEL_FEATURES)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "weights"], ["raw"]),
         helper.make_node("Add", ["raw", "bias"], ["logit"]),
         helper.make_node("Sigmoid", ["logit"], ["probability"])],
        "logistic",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        initializer=[numpy_helper.from_array(np.asarray(weights, np.float32).reshape(n, 1), "weights"),
                     numpy_helper.from_array(np.array([bias], np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {"feature_names": json.dumps(list(schemas.MODEL_FEATURES)), "threshold": repr(threshold)})
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def matrix(frame: pd.DataFrame) -> np.ndarray:
    return frame[list(schemas.MODEL_FEATURES)].astype("float32").to_numpy()


def fit(frame: pd.DataFrame, rows: int, shuffle: bool = False, seed: int = 0) -> tuple[np.ndarray, float]:
    """A logistic regression on ``rows`` training rows, standardisation folded into the weights."""
    from sklearn.linear_model import LogisticRegression

    train = frame[frame[schemas.SET_COLUMN] == "train"].sample(n=rows, random_state=seed)
    x, y = matrix(train).astype(np.float64), train[schemas.LABEL].to_numpy().astype(int)
    if shuffle:
        y = np.random.default_rng(seed).permutation(y)
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-9
    model = LogisticRegression(max_iter=2000).fit((x - mean) / scale, y)
    weights = model.coef_[0] / scale
    return weights, float(model.intercept_[0] - np.sum(model.coef_[0] * mean / scale))


class Lab:
    """One home, one registry, the runs of the scenario and the predictor that serves them."""

    def __init__(self, settings: Settings, frame: pd.DataFrame) -> None:
        self.settings, self.frame = settings, frame
        self.registry = open_registry(settings)
        test = frame[frame[schemas.SET_COLUMN] == "test"]
        self.test_features, self.test_labels = matrix(test), test[schemas.LABEL].to_numpy().astype(np.int64)
        self.users = [schemas.user_id(i) for i in range(0, USERS, 97)]
        self.url = ""
        self.figures: dict[str, Any] = {}

    def run(self, version: str, weights: np.ndarray, bias: float, data: pd.DataFrame) -> None:
        """What a pipeline run does before the gates: feature step into FRAUD_FEAST_DIR, model, registration."""
        write_prepared(Path(self.settings.data_uri), data)
        build_feast_store(self.settings)  # rewrites the feature step's store (the live one, before item 1)
        model_uri = str(Path(self.settings.models_uri) / version / "model.onnx")
        logistic_onnx(Path(model_uri), weights, bias, threshold=0.5)
        with tempfile.TemporaryDirectory() as tmp:
            publish_snapshot(self.settings, tmp)
            snapshot = store_snapshot(tmp, version_store_uri(model_uri), self.settings)
        self.registry.register(self.settings.model_name, version, model_uri, {
            "metrics": {"roc_auc": 0.9}, "threshold": 0.5, "feature_names": list(schemas.MODEL_FEATURES),
            "data_fingerprint": f"sha256:{version}", "run_id": version, "code_version": "test", "passed_gate": True,
            "serving": serving_record(snapshot, list(schemas.MODEL_FEATURES), f"sha256:{version}", {"rows": len(data)}),
        })

    def gates(self, version: str, promote_now: bool) -> governance.Decision:
        report = governance.evaluate_against_champion(
            self.registry, self.settings.model_name, version, self.test_features, self.test_labels,
            lambda uri: Path(uri).read_bytes(), POLICY,
        )
        self.figures[version] = {"gates": {r.gate: round(r.value, 4) for r in report.results}, "passed": report.passed,
                                 "reason": report.reason}
        return governance.decide(self.registry, self.settings.model_name, report, promote_now=promote_now)

    def answers(self) -> list[bytes]:
        """The live answer to each of the probe users, as bytes (each with its own fixed request id,
        which the answer echoes: nothing in it then differs between two identical requests)."""
        return [requests.post(self.url + V1, data=json.dumps({"user_id": u}), headers={"X-Request-Id": f"probe-{u}"},
                              timeout=10).content for u in self.users]

    def served_versions(self) -> set[str]:
        return {json.loads(answer)["model_version"] for answer in self.answers()}

    def canary(self, version: str) -> canary.CanaryOutcome:
        with canary.Replay(self.url, [schemas.user_id(i) for i in range(USERS)]) as replay:
            outcome = canary.run_canary(
                self.url, self.registry, self.settings.model_name, version, CANARY, "scenario-test",
                benchmark_users=self.users, benchmark_requests=2000, latency_factor=LATENCY_FACTOR,
            )
        self.figures.setdefault(version, {})["canary"] = {
            "outcome": outcome.outcome, "seconds": round(outcome.seconds, 2), "replayed_requests": replay.sent,
            "latency": outcome.latency, "reason": outcome.reason,
            "steps": [{"percent": s["percent"], "seconds": s["seconds"], "passed": s["passed"],
                       "challenger_requests": s["stats"]["challenger"]["requests"],
                       "challenger_errors": s["stats"]["challenger"]["errors"],
                       "score_distance": round(s["stats"]["score_distance"], 4), "flip_rate": s["stats"]["flip_rate"]}
                      for s in outcome.steps],
        }
        return outcome


@contextlib.contextmanager
def predictor(settings: Settings, log_path: Path) -> Iterator[str]:
    """The real predictor in a subprocess, with the v4 fault drill set; yields its URL once ready."""
    port = free_port()
    env = {**os.environ, **settings.to_env(), "FRAUD_SERVE_PORT": str(port), "FRAUD_FAULT_VERSION": FAULTY,
           "FRAUD_FAULT_ERROR_RATE": "0.3"}
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rest_predictor.predictor"], env=env, cwd=REPO_ROOT, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(proc, url, log_path)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def cli(settings: Settings, *args: str, url: str = "") -> subprocess.CompletedProcess:
    """``fraud-detection ARGS`` in a subprocess with these settings (and the predictor at ``url``)."""
    env = {**os.environ, **settings.to_env()}
    if url:
        env["FRAUD_SERVE_PORT"] = url.rsplit(":", 1)[1]
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def metric_value(url: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {name}{{{want}}}")


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return label_features(USERS, seed=7)


@pytest.mark.parametrize("backend", ["local", "kubeflow"])
def test_scenario_v1_v2_canary_v3_refused_v4_rolled_back(
    backend: str, frame: pd.DataFrame, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if backend == "local":
        settings = Settings.from_env({"FRAUD_HOME": str(tmp_path / "home")})
    else:
        _store, port = request.getfixturevalue("stand_in")
        settings = kubeflow_settings(tmp_path, port)
    lab, name = Lab(settings, frame), settings.model_name

    # v1: fitted on few rows; the first version is champion by the absolute bars alone.
    lab.run("v1", *fit(frame, rows=600, seed=1), data=frame)
    first = lab.gates("v1", promote_now=True)
    assert (first.outcome, first.champion) == ("promoted", "v1")
    with predictor(settings, tmp_path / "predictor.log") as url:
        lab.url = url
        assert lab.served_versions() == {"v1"}

        # v2: the better model; gates pass against v1, then the canary promotes it.
        lab.run("v2", *fit(frame, rows=3000, seed=2), data=frame)
        second = lab.gates("v2", promote_now=False)
        assert second.outcome == "challenger", second.reason
        assert lab.served_versions() == {"v1"}  # passing the gates changes nothing served
        outcome = lab.canary("v2")
        assert outcome.outcome == "promoted", outcome.reason
        assert [s["percent"] for s in outcome.steps] == [10, 50, 100] and all(s["passed"] for s in outcome.steps)
        assert lab.served_versions() == {"v2"}
        v2 = lab.registry.get_version(name, "v2")
        assert v2.alias == "champion" and v2.metadata["canary"]["status"] == "promoted"
        assert v2.metadata["gates"]["results"]["latency_p99"]["passed"]
        assert lab.registry.get_version(name, "v1").state == "ARCHIVED"
        v2_answers = lab.answers()

        # v3: shuffled labels, and its run materializes other users' data into the feature step's store.
        other = label_features(USERS, seed=99)
        lab.run("v3", *fit(frame, rows=3000, shuffle=True, seed=3), data=other)
        third = lab.gates("v3", promote_now=False)
        assert third.outcome == "refused" and "ROC-AUC" in third.reason
        row = {r.version: r for r in lifecycle.list_models(lab.registry, name)}["v3"]
        assert row.status == "refused" and "ROC-AUC" in row.reason
        assert lab.answers() == v2_answers  # byte-identical: model, threshold and features untouched
        requests.post(url + canary.RELOAD_PATH, timeout=30).raise_for_status()
        assert lab.answers() == v2_answers
        with pytest.raises(Exception, match="refused at the gate"):
            canary.run_canary(url, lab.registry, name, "v3", CANARY, "scenario-test")

        # v4: passes the gates, then answers 30 % errors (FRAUD_FAULT_VERSION): rolled back in the canary.
        weights, bias = fit(frame, rows=3000, seed=2)  # v2's fit, nudged: as good, a new version
        lab.run("v4", weights * 1.01, bias, data=frame)
        fourth = lab.gates("v4", promote_now=False)
        assert fourth.outcome == "challenger", fourth.reason
        if backend == "local":  # through the command line, as a user runs it
            done = cli(settings, "canary", "v4", "--replay", "--users", str(USERS), "--step-seconds", "1",
                       "--latency-factor", str(LATENCY_FACTOR), "--url", url)
            assert done.returncode == 1 and "rolled_back" in done.stdout and "champion v2" in done.stdout, done.stdout
            record = lab.registry.get_version(name, "v4").metadata["canary"]
            steps = record["steps"]
            assert "error rate" in record["reason"]
            lab.figures["v4"]["canary"] = {"outcome": record["status"], "reason": record["reason"], "via": "CLI",
                                           "started_at": record["started_at"], "finished_at": record["finished_at"],
                                           "steps": [{"percent": s["percent"], "seconds": s["seconds"],
                                                      "challenger_requests": s["stats"]["challenger"]["requests"],
                                                      "challenger_errors": s["stats"]["challenger"]["errors"]}
                                                     for s in steps]}
        else:
            outcome = lab.canary("v4")
            assert outcome.outcome == "rolled_back" and "error rate" in outcome.reason
            steps = outcome.steps
        assert [s["percent"] for s in steps] == [10]
        assert lab.answers() == v2_answers  # every request back on the champion, as before
        v4 = lab.registry.get_version(name, "v4")
        assert v4.alias == "" and v4.metadata["canary"]["status"] == "rolled_back" and v4.metadata["rolled_back"]
        assert lifecycle.version_status(v4) == "rolled back"
        assert lab.registry.get_version(name, alias="champion").version == "v2"

        # Prometheus: each decision, labelled by model version.
        assert metric_value(url, "fraud_canary_decisions_total", model_version="v2", decision="promoted") == 1
        assert metric_value(url, "fraud_canary_decisions_total", model_version="v4", decision="rolled_back") == 1
        assert metric_value(url, "fraud_model_requests_total", model_version="v4", outcome="error") > 0
        assert metric_value(url, "fraud_model_traffic_percent", model_version="v4") == 0
        assert metric_value(url, "fraud_model_gate_passed", model_version="v2", gate="roc_auc") == 1
        requests.post(url + canary.RELOAD_PATH, timeout=30).raise_for_status()  # refreshes the version metrics now
        assert metric_value(url, "fraud_model_version_status", model_version="v3", status="refused") == 1
        assert metric_value(url, "fraud_model_gate_passed", model_version="v3", gate="roc_auc") == 0
        assert metric_value(url, "fraud_model_version_status", model_version="v4", status="rolled back") == 1

        if backend == "local":
            # By hand: rollback restores the previous champion (v1, with its own store), promote v2 again;
            # the running predictor follows each without a restart.
            done = cli(settings, "rollback", "--reason", "drill", url=url)
            assert done.returncode == 0 and "now serves v1" in done.stdout, done.stdout + done.stderr
            assert lab.served_versions() == {"v1"}
            done = cli(settings, "promote", "v2", "--reason", "drill over", url=url)
            assert done.returncode == 0 and "now serves v2" in done.stdout, done.stdout + done.stderr
            assert lab.answers() == v2_answers

    if backend == "local":
        # No predictor: one line naming what to start, and nothing recorded on the version.
        before = lab.registry.get_version(name, "v4").metadata
        done = cli(settings, "canary", "v4", "--url", f"http://127.0.0.1:{free_port()}")
        assert done.returncode == 1 and "no predictor at" in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert lab.registry.get_version(name, "v4").metadata == before
        listing = cli(settings, "models").stdout
        status = {line.split()[0]: line for line in listing.splitlines()[1:]}
        assert "champion" in status["v2"] and "refused" in status["v3"] and "rolled back" in status["v4"], listing
        assert "archived" in status["v1"], listing
        # A predictor started afresh serves the same answers: v2's own store, not the feature step's.
        with predictor(settings, tmp_path / "predictor-2.log") as url:
            lab.url = url
            assert lab.answers() == v2_answers
        assert snapshot_of(lab.registry.get_version(name, "v2")) != settings.feast_dir
    # The same aliases and records on both backends: every alias change in order, every status.
    history = [(e.alias, e.version, e.kind) for e in lab.registry.alias_history(name)]
    expected = [("challenger", "v1", "set"), ("champion", "v1", "set"), ("challenger", "v2", "set"),
                ("champion", "v2", "set"), ("challenger", "v4", "set"), ("challenger", "", "clear")]
    if backend == "local":
        expected += [("champion", "v1", "rollback"), ("champion", "v2", "set")]
    assert history == expected
    assert all(e.actor and e.reason and e.at for e in lab.registry.alias_history(name))
    statuses = {row.version: row.status for row in lifecycle.list_models(lab.registry, name)}
    assert statuses == {"v1": "archived", "v2": "champion", "v3": "refused", "v4": "rolled back"}
    # The closing note's figures: FRAUD_SCENARIO_FIGURES=<folder> keeps them (bench/results in the docs).
    out = Path(os.environ.get("FRAUD_SCENARIO_FIGURES", tmp_path)) / f"governance_scenario_{backend}.json"
    out.write_text(json.dumps({"backend": backend, "users": USERS, "loadavg": os.getloadavg(), **lab.figures},
                              indent=2, default=str))


# --- The cluster's canary: InferenceGraph objects and the stepping loop --------------------------


def test_inference_graph_splitter_is_valid_against_the_crd() -> None:
    from test_k8s import crd_errors

    from pipeline import k8s

    for percent in (0, 10, 50, 100):
        body = k8s.inference_graph("fraud-detection-router", "fraud-detection", "fraud-detection",
                                   "fraud-detection-c-1234abcd", percent)
        assert crd_errors(body) == [], percent
        steps = body["spec"]["nodes"]["root"]["steps"]
        assert body["spec"]["nodes"]["root"]["routerType"] == "Splitter"
        assert sum(s["weight"] for s in steps) == 100  # KServe's webhook requires it
        assert steps[0]["serviceUrl"] == (
            "http://fraud-detection-predictor.fraud-detection.svc.cluster.local/v1/models/onnx-model:predict")
        assert body["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    assert len(k8s.inference_graph("r", "ns", "a")["spec"]["nodes"]["root"]["steps"]) == 1
    bad = k8s.inference_graph("r", "ns", "a", "b", 10)
    bad["spec"]["nodes"]["root"]["routerType"] = "Splitt"
    assert crd_errors(bad)  # the schema can fail
    with pytest.raises(ValueError, match="challenger share"):
        k8s.inference_graph("r", "ns", "a", "", 10)
    name = k8s.challenger_service_name("fraud-detection", "v20261202-010000-run-abc")
    assert name.startswith("fraud-detection-c-") and len(name) <= 40


class FakePredictors:
    """Two predictors' /metrics, real exposition text; each scrape adds the traffic of one interval."""

    def __init__(self, champion: str, challenger: str, challenger_error_rate: float) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.versions = {"champion": champion, "challenger": challenger}
        self.registries, self.requests, self.scores, self.seconds = {}, {}, {}, {}
        for side in ("champion", "challenger"):
            registry = CollectorRegistry()
            self.registries[side] = registry
            self.requests[side] = Counter("fraud_model_requests", "", ["model_version", "outcome"], registry=registry)
            self.scores[side] = Histogram("fraud_model_score", "", ["model_version"], registry=registry,
                                          buckets=tuple(round(0.05 * i, 2) for i in range(1, 21)))
            self.seconds[side] = Histogram("fraud_model_scoring_seconds", "", ["model_version"], registry=registry,
                                           buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01))
        self.error_rate = challenger_error_rate
        self.percent = 0
        self.rng = np.random.default_rng(0)

    def traffic(self, n: int = 2000) -> None:
        for _ in range(n):
            side = "challenger" if self.rng.random() * 100 < self.percent else "champion"
            version = self.versions[side]
            failed = side == "challenger" and self.rng.random() < self.error_rate
            self.requests[side].labels(version, "error" if failed else "ok").inc()
            if not failed:
                self.scores[side].labels(version).observe(float(self.rng.beta(0.3, 3)))
                self.seconds[side].labels(version).observe(0.0003)

    def read(self, url: str) -> str:
        from prometheus_client import generate_latest

        side = "challenger" if "-c-" in url else "champion"
        if side == "champion":
            self.traffic()
        return generate_latest(self.registries[side]).decode()


@pytest.mark.parametrize("error_rate", [0.0, 0.3])
def test_graph_canary_steps_the_weights_and_puts_the_champion_back_on_a_failed_check(error_rate: float) -> None:
    from test_k8s import FakeClock, FakeCustomObjects

    from pipeline import k8s

    api, clock = FakeCustomObjects(), FakeClock()
    challenger = k8s.challenger_service_name("fraud-detection", "v2")
    fake = FakePredictors("v1", "v2", error_rate)
    weights: list[int] = []

    def read(url: str) -> str:
        graph = api.objects.get(("inferencegraphs", "ns", "fraud-detection-router"))
        steps = graph["spec"]["nodes"]["root"]["steps"] if graph else []
        fake.percent = next((s["weight"] for s in steps if s["name"] == "challenger"), 0)
        if not weights or weights[-1] != fake.percent:
            weights.append(fake.percent)
        return fake.read(url)

    policy = CanaryPolicy(steps=(10, 50, 100), min_requests=30, step_seconds=30)
    passed, results = k8s.run_graph_canary(api, "ns", "fraud-detection", ("fraud-detection", "v1"), (challenger, "v2"),
                                           policy, read_metrics=read, sleep=clock.sleep, clock=clock.clock)
    final = api.objects[("inferencegraphs", "ns", "fraud-detection-router")]["spec"]["nodes"]["root"]["steps"]
    if error_rate == 0:
        assert passed and [r.percent for r in results] == [10, 50, 100] and weights == [10, 50, 100]
        assert all(r.stats.challenger.p99_ms == 0.5 for r in results)  # the bucket holding 0.3 ms
        assert all(r.stats.score_distance < 0.05 for r in results[:2])  # at 100 %: no champion traffic
        assert [s["name"] for s in final] == ["challenger"] or final[-1]["weight"] == 100
    else:
        assert not passed and [r.percent for r in results] == [10] and "error rate" in results[0].reason
        assert [(s["name"], s["weight"]) for s in final] == [("champion", 100)]  # rolled back


def test_metrics_parser_reads_labelled_samples() -> None:
    from pipeline import k8s

    text = '# HELP x\nfraud_model_requests_total{model_version="v1",outcome="ok"} 5.0\nup 1\n'
    samples = k8s.parse_metrics(text)
    assert samples[("fraud_model_requests_total", frozenset({("model_version", "v1"), ("outcome", "ok")}))] == 5.0
    assert samples[("up", frozenset())] == 1.0
    assert k8s.histogram_quantile([(0.001, 50.0), (0.002, 99.0), (float("inf"), 100.0)], 0.99) == 0.002
