"""Gates against the champion and the champion lifecycle (promote, rollback, approve, listing).

The models are small logistic ONNX files scored by onnxruntime, registered in a real registry
(the local SQLite one, and the Kubeflow client against the stand-in server of test_registry).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_registry import kubeflow_settings, stand_in  # noqa: F401 - the fixture is used by name

from fraud_common.registry import RegistryError
from fraud_common.registry import lifecycle
from fraud_common.registry.kubeflow import KubeflowModelRegistry
from fraud_common.registry.local import LocalModelRegistry
from train import governance
from train.gate import QualityGateError
from train.governance import GatePolicy

MODEL = "fraud-detection"
TRUE_WEIGHTS = np.array([3.0, 2.0, -1.5])
BIAS = -4.0
# The test rows are weaker than production's: bars sized for them, margins as shipped.
POLICY = GatePolicy(min_roc_auc=0.85, max_brier=0.1)


def logistic_onnx(weights: np.ndarray, bias: float) -> bytes:
    """``sigmoid(features @ weights + bias)`` as an ONNX model, one float32 input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = len(weights)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "weights"], ["raw"]),
            helper.make_node("Add", ["raw", "bias"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["probability"]),
        ],
        "logistic",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", n])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1])],
        initializer=[
            numpy_helper.from_array(np.asarray(weights, dtype=np.float32).reshape(n, 1), "weights"),
            numpy_helper.from_array(np.array([bias], dtype=np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture(scope="module")
def test_rows() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(4000, 3)).astype(np.float32)
    probability = 1 / (1 + np.exp(-(features @ TRUE_WEIGHTS + BIAS)))
    return features, (rng.random(len(features)) < probability).astype(np.int64)


class Scenario:
    """A registry, a folder of model files, and the gates run the way the pipeline runs them."""

    def __init__(self, registry: Any, folder: Path, rows: tuple[np.ndarray, np.ndarray]) -> None:
        self.registry, self.folder, (self.features, self.labels) = registry, folder, rows

    def register(self, version: str, weights: Any, threshold: float = 0.5, passed_gate: bool = True) -> None:
        path = self.folder / f"{version}.onnx"
        path.write_bytes(logistic_onnx(np.asarray(weights, dtype=float), BIAS))
        self.registry.register(MODEL, version, str(path), {
            "metrics": {"roc_auc": 0.9}, "threshold": threshold, "feature_names": ["a", "b", "c"],
            "data_fingerprint": f"sha256:{version}", "run_id": version, "code_version": "test",
            "passed_gate": passed_gate,
        })

    def evaluate(self, version: str, policy: GatePolicy = POLICY, **decide: Any) -> governance.Decision:
        report = governance.evaluate_against_champion(
            self.registry, MODEL, version, self.features, self.labels, lambda uri: Path(uri).read_bytes(), policy
        )
        return governance.decide(self.registry, MODEL, report, **decide)

    def champion(self) -> str:
        return self.registry.get_version(MODEL, alias="champion").version


@pytest.fixture
def scenario(tmp_path: Path, test_rows: tuple[np.ndarray, np.ndarray]) -> Scenario:
    return Scenario(LocalModelRegistry(tmp_path / "registry.db"), tmp_path, test_rows)


# --- The gate functions -----------------------------------------------------------------------


def test_recall_at_precision_and_flip_rate_by_hand() -> None:
    labels, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9])
    assert governance.recall_at_precision(labels, scores, 1.0) == 0.5  # only 0.9 flagged
    assert governance.recall_at_precision(labels, scores, 2 / 3) == 1.0  # 0.4 and up: 2 of 3 are fraud
    assert governance.recall_at_precision(np.array([0, 1]), np.array([0.9, 0.1]), 1.0) == 0.0
    assert governance.precision_at(labels, scores, 0.5) == 0.5
    assert governance.flip_rate(scores, 0.5, np.array([0.1, 0.4, 0.6, 0.9]), 0.5) == 0.5
    with pytest.raises(ValueError, match="same rows"):
        governance.flip_rate(scores, 0.5, scores[:3], 0.5)


def test_quality_gates_apply_the_stated_margins() -> None:
    champion = {"roc_auc": 0.96, "pr_auc": 0.80, "brier": 0.030, "recall_at_precision": 0.70,
                "operating_precision": 0.75}
    at_margin = {"roc_auc": 0.955, "pr_auc": 0.79, "brier": 0.032, "recall_at_precision": 0.68}
    policy = GatePolicy()
    assert all(r.passed for r in governance.quality_gates(at_margin, champion, policy))
    for gate, worse in (("roc_auc", 0.9549), ("pr_auc", 0.7899), ("recall_at_precision", 0.6799), ("brier", 0.0321)):
        results = {r.gate: r for r in governance.quality_gates({**at_margin, gate: worse}, champion, policy)}
        assert [name for name, r in results.items() if not r.passed] == [gate]
    nan = governance.quality_gates({**at_margin, "roc_auc": float("nan")}, None, policy)
    assert [r.gate for r in nan] == ["min_roc_auc", "max_brier"] and not nan[0].passed  # first version: bars only


def test_latency_gate_compares_p99s() -> None:
    policy = GatePolicy(max_latency_factor=1.5)
    assert governance.latency_gate(15.0, 10.0, policy).passed
    slow = governance.latency_gate(15.1, 10.0, policy)
    assert not slow.passed and "15.1000 fails <= 15.0000" in slow.detail
    with pytest.raises(ValueError, match="positive"):
        governance.latency_gate(5.0, 0.0, policy)


# --- The scenario through the gates -----------------------------------------------------------


def test_first_is_champion_by_bars_better_is_promoted_bad_is_refused(scenario: Scenario) -> None:
    scenario.register("v1", [3.0, 2.0, -1.0])  # underweights a feature: weaker, above the bars
    first = scenario.evaluate("v1")
    assert (first.outcome, first.champion, scenario.champion()) == ("promoted", "v1", "v1")
    gates = scenario.registry.get_version(MODEL, "v1").metadata["gates"]
    assert set(gates["results"]) == {"min_roc_auc", "max_brier"} and gates["champion"] == ""

    scenario.register("v2", TRUE_WEIGHTS)
    second = scenario.evaluate("v2")
    assert (second.outcome, scenario.champion()) == ("promoted", "v2")
    v2 = scenario.registry.get_version(MODEL, "v2")
    results = v2.metadata["gates"]["results"]
    assert set(results) == {"min_roc_auc", "max_brier", "roc_auc", "pr_auc", "recall_at_precision", "brier",
                            "shadow_disagreement"}
    assert all(r["passed"] for r in results.values()) and v2.metadata["gate_status"] == "passed"
    assert results["roc_auc"]["value"] > results["roc_auc"]["champion"]
    assert v2.metadata["gates"]["test_rows"] == 4000 and v2.metadata["gates"]["test_fingerprint"].startswith("sha256:")

    scenario.register("v3", [-0.2, 0.3, 0.1])  # noise: would be "newest that passed" without aliases
    third = scenario.evaluate("v3")
    assert third.outcome == "refused" and scenario.champion() == "v2"
    assert "ROC-AUC" in third.reason and "fails" in third.reason
    v3 = scenario.registry.get_version(MODEL, "v3")
    assert (v3.metadata["gate_status"], v3.metadata["passed_gate"], v3.alias) == ("refused", False, "")
    assert v3.metadata["gate_reason"] == third.reason
    with pytest.raises(QualityGateError, match="refused at the gate \\(champion v2\\): ROC-AUC"):
        governance.raise_if_refused(third)

    rows = {row.version: row for row in lifecycle.list_models(scenario.registry, MODEL)}
    assert [(r.alias, r.status) for r in rows.values()] == [("", "archived"), ("champion", "champion"), ("", "refused")]
    assert rows["v3"].reason == third.reason and rows["v2"].data_fingerprint == "sha256:v2"
    table = lifecycle.format_models(list(rows.values()))
    assert table.splitlines()[0].split()[:3] == ["VERSION", "ALIAS", "STATUS"] and "refused" in table

    with pytest.raises(RegistryError, match="refused at the gate"):
        lifecycle.promote(scenario.registry, MODEL, "v3", "alice", "by hand")
    restored = lifecycle.rollback(scenario.registry, MODEL, "alice", "v2 misbehaves")
    assert restored.version == "v1" and scenario.champion() == "v1"
    assert lifecycle.version_status(scenario.registry.get_version(MODEL, "v2")) == "rolled back"
    assert scenario.registry.get_version(MODEL, "v2").metadata["rolled_back"]["by"] == "alice"
    with pytest.raises(RegistryError, match="no previous champion"):
        lifecycle.rollback(scenario.registry, MODEL, "alice", "again")


def test_shadow_disagreement_refuses_a_version_that_flips_decisions(scenario: Scenario) -> None:
    scenario.register("v1", TRUE_WEIGHTS)
    scenario.evaluate("v1")
    scenario.register("v2", TRUE_WEIGHTS, threshold=0.05)  # same ranking, far lower threshold
    decision = scenario.evaluate("v2")
    assert decision.outcome == "refused" and scenario.champion() == "v1"
    results = scenario.registry.get_version(MODEL, "v2").metadata["gates"]["results"]
    assert [name for name, r in results.items() if not r["passed"]] == ["shadow_disagreement"]
    assert results["shadow_disagreement"]["value"] > POLICY.max_flip_rate


def test_a_registry_from_before_aliases_keeps_serving_its_version(scenario: Scenario) -> None:
    scenario.register("v1", TRUE_WEIGHTS)  # served as "newest that passed the gate"
    scenario.register("v2", [-0.2, 0.3, 0.1])
    assert scenario.champion() == "v2"  # the fallback, before any governance
    assert scenario.evaluate("v2").outcome == "refused"
    assert scenario.champion() == "v1"  # adopted as champion, then kept
    adopted = scenario.registry.alias_history(MODEL)[0]
    assert (adopted.version, adopted.actor) == ("v1", governance.ACTOR) and "adopted" in adopted.reason


def test_promote_now_false_stops_at_challenger(scenario: Scenario) -> None:
    scenario.register("v1", [3.0, 2.0, -1.0])
    scenario.evaluate("v1")
    scenario.register("v2", TRUE_WEIGHTS)
    decision = scenario.evaluate("v2", promote_now=False)
    assert (decision.outcome, decision.champion, scenario.champion()) == ("challenger", "v1", "v1")
    assert scenario.registry.get_version(MODEL, alias="challenger").version == "v2"


# --- Approval ---------------------------------------------------------------------------------


def test_approval_timeout_leaves_the_champion(scenario: Scenario) -> None:
    scenario.register("v1", [3.0, 2.0, -1.0])
    scenario.evaluate("v1")
    scenario.register("v2", TRUE_WEIGHTS)
    waited: list[float] = []

    def no_answer(registry: Any, model: str, version: str, timeout: float) -> bool:
        waited.append(timeout)
        assert registry.get_version(model, version).metadata["approval"]["status"] == "pending"
        return False

    decision = scenario.evaluate("v2", require_approval=True, approval_timeout_seconds=7, wait=no_answer)
    assert (decision.outcome, waited, scenario.champion()) == ("approval_timed_out", [7], "v1")
    with pytest.raises(Exception, match="no challenger"):
        scenario.registry.get_version(MODEL, alias="challenger")


def test_approved_version_is_promoted(scenario: Scenario) -> None:
    scenario.register("v1", [3.0, 2.0, -1.0])
    scenario.evaluate("v1")
    scenario.register("v2", TRUE_WEIGHTS)

    def approved_meanwhile(registry: Any, model: str, version: str, timeout: float) -> bool:
        assert lifecycle.version_status(registry.get_version(model, version)) == "challenger (awaiting approval)"
        lifecycle.approve(registry, model, version, "alice", "looked at the curves")
        return lifecycle.wait_for_approval(registry, model, version, timeout, sleep=pytest.fail)

    decision = scenario.evaluate("v2", require_approval=True, wait=approved_meanwhile)
    assert (decision.outcome, scenario.champion()) == ("promoted", "v2")
    approval = scenario.registry.get_version(MODEL, "v2").metadata["approval"]
    assert (approval["status"], approval["approved_by"], approval["reason"]) == ("approved", "alice",
                                                                                "looked at the curves")


def test_wait_for_approval_times_out_on_its_clock(scenario: Scenario) -> None:
    scenario.register("v1", TRUE_WEIGHTS)
    lifecycle.request_approval(scenario.registry, MODEL, "v1", "pipeline")
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    assert not lifecycle.wait_for_approval(scenario.registry, MODEL, "v1", 12, poll_seconds=5,
                                           clock=lambda: now[0], sleep=sleep)
    assert slept == [5, 5, 2]
    assert scenario.registry.get_version(MODEL, "v1").metadata["approval"]["status"] == "timed_out"
    with pytest.raises(RegistryError, match="timed out"):
        lifecycle.approve(scenario.registry, MODEL, "v1", "bob")


# --- Both backends ----------------------------------------------------------------------------


def test_the_scenario_leaves_the_same_records_in_both_backends(
    tmp_path: Path, test_rows: tuple[np.ndarray, np.ndarray], stand_in: Any  # noqa: F811
) -> None:
    local = Scenario(LocalModelRegistry(tmp_path / "registry.db"), tmp_path, test_rows)
    kubeflow = Scenario(KubeflowModelRegistry.from_settings(kubeflow_settings(tmp_path, stand_in[1])), tmp_path,
                        test_rows)
    for run in (local, kubeflow):
        run.register("v1", [3.0, 2.0, -1.0])
        run.register("v2", TRUE_WEIGHTS)
        run.register("v3", [-0.2, 0.3, 0.1])
        assert [run.evaluate(v).outcome for v in ("v1", "v2", "v3")] == ["promoted", "promoted", "refused"]

    def comparable(run: Scenario) -> tuple[list, list]:
        rows = [dataclasses.replace(r, created_at="") for r in lifecycle.list_models(run.registry, MODEL)]
        gates = [
            {k: v for k, v in run.registry.get_version(MODEL, name).metadata["gates"].items() if k != "evaluated_at"}
            for name in ("v1", "v2", "v3")
        ]
        history = [{**e.to_dict(), "at": ""} for e in run.registry.alias_history(MODEL)]
        return rows, gates + history

    assert comparable(local) == comparable(kubeflow)
    assert [r.status for r in comparable(kubeflow)[0]] == ["archived", "champion", "refused"]


def test_shadow_gate_scores_served_traffic_when_the_predictor_logs_it(scenario: Scenario, tmp_path: Path) -> None:
    """With a prediction log, the flip rate is measured on the logged requests' features, not the test set."""
    from fraud_common.prediction_log import PredictionLogConfig, PredictionLogWriter
    from fraud_common.settings import Settings

    settings = Settings.from_env({"FRAUD_HOME": str(tmp_path / "home")})
    names = ["a", "b", "c"]
    log_uri = str(tmp_path / "prediction-log")
    assert governance.served_rows(log_uri, settings, names) is None  # nothing logged: the test set is used
    # Served traffic unlike the test rows: every card sits where the two models disagree most.
    served = np.tile(np.array([[1.5, 0.5, 2.0]], dtype=np.float32), (300, 1))
    with PredictionLogWriter(PredictionLogConfig(uri=log_uri), settings, names) as writer:
        for i in range(0, 300, 30):
            rows = served[i:i + 30]
            writer.append(f"r{i}", [f"user_{j}" for j in range(i, i + 30)], rows, np.zeros(30, np.float32),
                          np.zeros(30, bool), MODEL, "v1", 0.001)
    rows = governance.served_rows(log_uri, settings, names)
    assert rows is not None and rows.shape == (300, 3) and np.allclose(rows, served)

    scenario.register("v1", TRUE_WEIGHTS)
    scenario.evaluate("v1")
    scenario.register("v2", [3.0, 2.0, 0.0])  # ignores the third feature: flags these cards, v1 does not
    report = governance.evaluate_against_champion(
        scenario.registry, MODEL, "v2", scenario.features, scenario.labels, lambda uri: Path(uri).read_bytes(),
        POLICY, served=rows,
    )
    shadow = {r.gate: r for r in report.results}["shadow_disagreement"]
    assert "300 rows of the served traffic" in shadow.detail and shadow.value == 1.0 and not shadow.passed
    on_test = governance.evaluate_against_champion(
        scenario.registry, MODEL, "v2", scenario.features, scenario.labels, lambda uri: Path(uri).read_bytes(), POLICY,
    )
    assert "rows of the test set" in {r.gate: r for r in on_test.results}["shadow_disagreement"].detail


def test_version_snapshot_holds_the_online_store_file_only_where_the_store_is_a_file(tmp_path) -> None:
    """With the shared Redis the online rows live in Redis: the version's snapshot is the registry."""
    from fraud_common.feature_store import ONLINE_STORE_FILE, REGISTRY_FILE
    from fraud_common.registry.serving import store_snapshot
    from fraud_common.settings import Settings
    from fraud_common.storage import StorageError

    source = tmp_path / "feast"
    source.mkdir()
    (source / REGISTRY_FILE).write_bytes(b"registry")
    redis = Settings.from_env({"FRAUD_HOME": str(tmp_path), "FRAUD_ONLINE_STORE_URL": "redis://127.0.0.1:6379/0"})
    written = Path(store_snapshot(source, str(tmp_path / "v1"), redis))
    assert sorted(p.name for p in written.iterdir()) == [REGISTRY_FILE]
    sqlite = Settings.from_env({"FRAUD_HOME": str(tmp_path)})
    with pytest.raises(StorageError, match=ONLINE_STORE_FILE):
        store_snapshot(source, str(tmp_path / "v2"), sqlite)
    assert not (tmp_path / "v2").exists(), "nothing half-written"
