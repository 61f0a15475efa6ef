"""The Kubeflow pipeline: the committed YAML is current and wires every step, image, secret and artifact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from fraud_common.settings import CONFIG, CONFIG_MAP, env_names
from pipeline import cli
from pipeline.images import image

STEPS = cli.STEP_ORDER


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict]]:
    out = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    cli.load_pipeline_module().compile_pipeline(out)
    text = out.read_text()
    return text, list(yaml.safe_load_all(text))


def test_committed_yaml_matches_the_dsl(compiled: tuple[str, list[dict]]) -> None:
    committed = cli.COMPILED_PIPELINE.read_text()
    assert committed == compiled[0], "pipeline/fraud-detection-e2e.yaml is stale: run `uv run fraud-detection compile`"


def test_every_step_runs_in_its_own_image(compiled: tuple[str, list[dict]]) -> None:
    spec = compiled[1][0]
    executors = spec["deploymentSpec"]["executors"]
    images = {name.removeprefix("exec-"): ex["container"]["image"] for name, ex in executors.items()}
    assert set(images) == set(STEPS)
    assert images["prepare-data"] == image("pipeline")
    assert images["feature-engineering"] == images["retrieve-features"] == image("feature-engineering")
    assert images["train-model"] == images["register-model"] == images["evaluate-against-champion"] == image("train")
    assert images["serve"] == images["canary"] == image("pipeline")
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["spark_image"]["defaultValue"] == image("data-preparation")
    assert defaults["predictor_image"]["defaultValue"] == image("rest-predictor")


# What each step writes and what it reads: (artifact, type) out, (input name <- producer step) in.
OUTPUTS = {
    "prepare-data": {"prepared": "system.Dataset"},
    "feature-engineering": {"feature_store": "system.Artifact"},
    "retrieve-features": {"training_set": "system.Dataset"},
    "train-model": {
        "model": "system.Model",
        "metrics": "system.Metrics",
        "classification_metrics": "system.ClassificationMetrics",
        "evaluation": "system.Artifact",
    },
    "register-model": {"registered_model": "system.Artifact"},
    "evaluate-against-champion": {"decision": "system.Artifact", "gates": "system.Metrics"},
    "canary": {"rollout": "system.Artifact", "metrics": "system.Metrics"},
    "serve": {"endpoint": "system.Artifact"},
}
INPUTS = {
    "prepare-data": {},
    "feature-engineering": {"prepared": ("prepare-data", "prepared")},
    "retrieve-features": {"prepared": ("prepare-data", "prepared"), "feature_store": ("feature-engineering", "feature_store")},
    "train-model": {"training_set": ("retrieve-features", "training_set")},
    "register-model": {
        "model": ("train-model", "model"),
        "feature_store": ("feature-engineering", "feature_store"),
        "training_set": ("retrieve-features", "training_set"),
    },
    "evaluate-against-champion": {
        "training_set": ("retrieve-features", "training_set"),
        "registered_model": ("register-model", "registered_model"),
    },
    "canary": {"decision": ("evaluate-against-champion", "decision")},
    "serve": {
        "registered_model": ("canary", "rollout"),
        "feature_store": ("feature-engineering", "feature_store"),
    },
}


def test_tasks_pass_typed_artifacts(compiled: tuple[str, list[dict]]) -> None:
    components = compiled[1][0]["components"]
    for step, expected in OUTPUTS.items():
        artifacts = components[f"comp-{step}"].get("outputDefinitions", {}).get("artifacts", {})
        assert {name: a["artifactType"]["schemaTitle"] for name, a in artifacts.items()} == expected, step
    tasks = compiled[1][0]["root"]["dag"]["tasks"]
    for step, expected in INPUTS.items():
        wired = tasks[step].get("inputs", {}).get("artifacts", {})
        flows = {
            name: (a["taskOutputArtifact"]["producerTask"], a["taskOutputArtifact"]["outputArtifactKey"])
            for name, a in wired.items()
        }
        assert flows == expected, step


def test_only_the_first_step_takes_a_data_location(compiled: tuple[str, list[dict]]) -> None:
    """Later steps read their input artifacts, not a data root threaded through as a string."""
    components = compiled[1][0]["components"]
    for step in STEPS:
        parameters = set(components[f"comp-{step}"].get("inputDefinitions", {}).get("parameters", {}))
        locations = {p for p in parameters if p.endswith(("_uri", "_path", "_dir"))}
        assert locations == ({"data_uri"} if step == "prepare-data" else set()), step


def test_credentials_come_from_secrets_and_config_maps(compiled: tuple[str, list[dict]]) -> None:
    text, docs = compiled
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(platform) == {f"exec-{step}" for step in STEPS}
    for name, config in platform.items():
        secrets = {s["secretName"]: {m["secretKey"] for m in s["keyToEnv"]} for s in config["secretAsEnv"]}
        assert secrets["fraud-detection-s3"] == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, name
        config_maps = {c["configMapName"] for c in config["configMapAsEnv"]}
        assert config_maps == {CONFIG_MAP}, name
    assert "fraud-detection-registry" in {s["secretName"] for s in platform["exec-register-model"]["secretAsEnv"]}
    for literal in ("minio123", "AWS_SECRET_ACCESS_KEY: ", "password"):
        assert literal not in text


def test_config_map_keys_the_pipeline_reads_exist_in_the_manifests() -> None:
    import subprocess

    module = cli.load_pipeline_module()
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(Path(cli.__file__).parents[1] / "manifests")],
        check=True, capture_output=True, text=True,
    ).stdout
    maps = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "ConfigMap"
            and d["metadata"]["name"] == CONFIG_MAP]
    assert maps, f"manifests/ defines no {CONFIG_MAP} ConfigMap"
    for config_map in maps:
        assert set(module.CONFIG_KEYS) == set(env_names(CONFIG)) == set(config_map["data"])


# ---------------------------------------------------------------- the cluster form of the components


def _cluster_env(monkeypatch: pytest.MonkeyPatch, s3_server: dict[str, str], home: Path) -> None:
    for name in [n for n in os.environ if n.startswith(("FRAUD_", "AWS_", "S3_"))]:
        monkeypatch.delenv(name)
    for name, value in {**s3_server, "FRAUD_HOME": str(home)}.items():
        monkeypatch.setenv(name, value)


def test_cluster_prepare_has_spark_write_into_the_artifact_uri(
    monkeypatch: pytest.MonkeyPatch, s3_server: dict[str, str], tmp_path: Path
) -> None:
    """On kubernetes the SparkApplication writes straight to the output artifact's S3 location."""
    import pandas as pd
    from kfp.dsl import Dataset

    from fraud_common import schemas, storage
    from pipeline import components, k8s

    _cluster_env(monkeypatch, s3_server, tmp_path)
    launched = {}

    def fake_spark(settings, *args, input_uri, output_uri, **kwargs):  # noqa: ANN001, ANN202
        """Stands in for the SparkApplication: writes what Spark writes where it was told to."""
        launched.update(input_uri=input_uri, output_uri=output_uri, args=args)
        frame = pd.DataFrame({
            schemas.ENTITY_KEY: ["user_0", "user_1"], schemas.SET_COLUMN: ["train", "test"],
            schemas.EVENT_TIMESTAMP: pd.to_datetime(["2025-06-01", "2025-06-01"], utc=True),
        })
        for folder in (schemas.FEATURES_DIR, schemas.ENTITIES_DIR):
            storage.write_bytes(storage.join(output_uri, folder, "part-0.parquet"), frame.to_parquet(), settings)
        return {"spark_application": "ns/prepare-run", "state": "COMPLETED"}

    monkeypatch.setattr(k8s, "launch_spark_preparation", fake_spark)
    prepared = Dataset(name="prepared", uri="minio://pipeline-root/v2/artifacts/run/prepare-data/prepared")
    components.prepare_data.python_func(
        platform="kubernetes", data_uri="s3://fraud-detection/data/", namespace="ns", spark_image="img",
        spark_driver_cores=1, spark_driver_memory="1g", spark_executor_instances=1, spark_executor_cores=1,
        spark_executor_memory="1g", spark_timeout_seconds=60, run_id="run", prepared=prepared,
    )
    assert launched["input_uri"] == "s3://fraud-detection/data/raw"
    assert launched["output_uri"] == "s3://pipeline-root/v2/artifacts/run/prepare-data/prepared"
    assert prepared.uri.startswith("minio://")  # KFP records the artifact where Spark wrote it
    assert prepared.metadata["rows"] == prepared.metadata["entity_rows"] == 2
    assert prepared.metadata["rows_by_set"] == {"train": 1, "test": 1}
    assert prepared.metadata["state"] == "COMPLETED" and "duration_seconds" in prepared.metadata


def test_cluster_serve_gives_the_predictor_the_runs_feature_store(
    monkeypatch: pytest.MonkeyPatch, s3_server: dict[str, str], tmp_path: Path
) -> None:
    from kfp.dsl import Artifact

    from pipeline import components, k8s

    _cluster_env(monkeypatch, s3_server, tmp_path)
    calls = []
    monkeypatch.setattr(k8s, "launch_inference_service", lambda *args, **kwargs: calls.append((args, kwargs)) or "http://isvc")
    registered = Artifact(name="registered_model", uri=str(tmp_path / "registered"),
                          metadata={"model_name": "fraud-detection", "model_version": "7",
                                    "registered_model_id": "3", "model_version_id": "12"})
    store = Artifact(name="feature_store", uri="s3://pipeline-root/run/feature-engineering/feature_store")
    endpoint = Artifact(name="endpoint", uri=str(tmp_path / "endpoint"))
    components.serve.python_func(
        platform="kubernetes", namespace="ns", service_name="svc", predictor_image="img:1",
        serve_timeout_seconds=60, registered_model=registered, feature_store=store, endpoint=endpoint,
    )
    ((args, kwargs),) = calls
    assert args[1:] == ("ns", "svc", "img:1", "fraud-detection", "7", 60)
    assert kwargs == {"feast_snapshot_uri": store.uri, "registered_model_id": "3", "model_version_id": "12"}
    assert endpoint.metadata["url"] == "http://isvc" and "duration_seconds" in endpoint.metadata
    assert json.loads((tmp_path / "endpoint").read_text())["feast_snapshot_uri"] == store.uri
