"""Kubernetes launchers (pipeline/k8s.py): bodies valid against the CRDs, and the wait loops.

The CustomObjectsApi is stood in only at its API calls by ``FakeCustomObjects``, which keeps
objects in a dict, records every call and answers ``get`` with scripted statuses. Time is a
fake clock advanced by the fake sleep, so timeouts are exercised without waiting.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from pipeline import images, k8s
from conftest import CRDS_DIR

NS = "fraud-detection"


# ---------------------------------------------------------------- CRD validation (shared helper)

def _strict(schema: Any) -> Any:
    """Copy of an openAPIV3Schema where objects reject unknown fields (the API server would prune
    them silently, which would hide a misspelt field)."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, api_version: str):
    """A jsonschema validator for ``kind`` at ``group/version`` from the CRDs in ../shared/crds."""
    import jsonschema

    if not CRDS_DIR.is_dir():
        pytest.skip(f"CRD schemas not available: {CRDS_DIR} is absent")
    group, version = api_version.split("/")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    for path in sorted(CRDS_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)
        spec = crd.get("spec", {})
        if spec.get("group") != group or spec.get("names", {}).get("kind") != kind:
            continue
        for entry in spec["versions"]:
            if entry["name"] == version:
                schema = _strict(entry["schema"]["openAPIV3Schema"])
                # metadata is validated by the API server itself; the CRD leaves it open.
                schema.setdefault("properties", {})["metadata"] = {"type": "object"}
                return jsonschema.Draft7Validator(schema)
    raise AssertionError(f"no CRD for {kind} {api_version} in {CRDS_DIR}")


def crd_errors(obj: dict[str, Any]) -> list[str]:
    """Validation errors of a custom resource against its CRD (empty when valid)."""
    validator = crd_validator(obj["kind"], obj["apiVersion"])
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


# ---------------------------------------------------------------- the stand-in API

def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """JSON merge patch (RFC 7386): dicts merge, everything else (lists too) replaces."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class FakeCustomObjects:
    """Records calls; keeps objects; ``get`` returns the object with the next scripted status."""

    def __init__(self, statuses: list[dict[str, Any]] | None = None, create_conflicts: int = 0,
                 gone_after_delete_gets: int = 1):
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.statuses = list(statuses or [])
        self.calls: list[tuple[str, str]] = []
        self.create_conflicts = create_conflicts
        self.gone_after_delete_gets = gone_after_delete_gets
        self.deleting: dict[tuple[str, str, str], int] = {}

    def _status(self) -> dict[str, Any]:
        if not self.statuses:
            return {}
        return self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.calls.append(("create", body["metadata"]["name"]))
        key = (plural, namespace, body["metadata"]["name"])
        if self.create_conflicts > 0 or key in self.objects:
            self.create_conflicts -= 1
            self.objects.setdefault(key, {**copy.deepcopy(body), "metadata": {**body["metadata"], "generation": 1}})
            raise ApiException(status=409, reason="AlreadyExists")
        stored = copy.deepcopy(body)
        stored["metadata"]["generation"] = 1
        self.objects[key] = stored
        return copy.deepcopy(stored)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", name))
        key = (plural, namespace, name)
        if key in self.deleting:
            self.deleting[key] -= 1
            if self.deleting[key] < 0:
                del self.deleting[key]
                self.objects.pop(key, None)
        if key not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        return {**copy.deepcopy(self.objects[key]), "status": self._status()}

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self.calls.append(("patch", name))
        key = (plural, namespace, name)
        if key not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        merged = _merge(self.objects[key], body)
        merged["metadata"]["generation"] = self.objects[key]["metadata"].get("generation", 1) + 1
        self.objects[key] = merged
        return copy.deepcopy(merged)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **_: Any):
        self.calls.append(("delete", name))
        key = (plural, namespace, name)
        if key not in self.objects:
            raise ApiException(status=404, reason="NotFound")
        # Deletion is asynchronous: the object stays visible for a few gets.
        self.deleting[key] = self.gone_after_delete_gets - 1
        return {}

    def verbs(self) -> list[str]:
        return [verb for verb, _ in self.calls]


class FakeClock:
    """``clock`` and ``sleep`` for the wait loops: sleeping advances time, nothing waits."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeCoreApi:
    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    def read_namespaced_pod_log(self, name: str, namespace: str, tail_lines: int) -> str:
        self.asked.append((namespace, name))
        return "Traceback ...\nFileNotFoundError: s3a://fraud-detection/data/raw/train.csv"


def spark_state(state: str, error: str = "", pod: str = "") -> dict[str, Any]:
    status: dict[str, Any] = {"applicationState": {"state": state}}
    if error:
        status["applicationState"]["errorMessage"] = error
    if pod:
        status["driverInfo"] = {"podName": pod}
    return status


def _spark_body(name: str = "prepare-run1") -> dict[str, Any]:
    return k8s.spark_application(
        name=name,
        namespace=NS,
        image=images.image("data-preparation"),
        main_application_file="local:///app/data_preparation/spark_job.py",
        arguments=["--raw", "s3://fraud-detection/data/raw", "--out", "s3://fraud-detection/data/prepared"],
        driver_cores=1,
        driver_memory="1g",
        executor_instances=2,
        executor_cores=1,
        executor_memory="2g",
        env={"FRAUD_DATA_URI": "s3://fraud-detection/data"},
        s3_endpoint="http://minio-service.kubeflow.svc:9000",
        ttl_seconds_after_finished=600,
    )


def _isvc_body(version: str = "1") -> dict[str, Any]:
    return k8s.inference_service(
        name="fraud-detection",
        namespace=NS,
        image=images.image("rest-predictor"),
        model_name="fraud-detection",
        model_version=version,
    )


def _env(body: dict[str, Any]) -> dict[str, str]:
    container = body["spec"]["predictor"]["containers"][0]
    return {item["name"]: item["value"] for item in container["env"] if "value" in item}  # not the Secret references


# ---------------------------------------------------------------- bodies

def test_spark_application_body_is_valid_against_the_crd() -> None:
    body = _spark_body()
    assert crd_errors(body) == []
    spec = body["spec"]
    assert spec["timeToLiveSeconds"] == 600
    assert spec["sparkConf"]["spark.hadoop.fs.s3a.endpoint"] == "http://minio-service.kubeflow.svc:9000"
    assert spec["sparkConf"]["spark.hadoop.fs.s3a.path.style.access"] == "true"
    assert spec["driver"]["serviceAccount"] == k8s.SPARK_SERVICE_ACCOUNT
    for role in ("driver", "executor"):
        refs = spec[role]["envFrom"]
        assert {"secretRef": {"name": "fraud-detection-s3"}} in refs
        assert {"configMapRef": {"name": "fraud-detection-config"}} in refs
    assert body["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fraud-detection"


def test_spark_application_carries_no_credentials() -> None:
    text = json.dumps(_spark_body()).lower()
    # Keys reach the pods only through the Secret; no access/secret key setting is spelled out.
    assert "fs.s3a.access.key" not in text and "fs.s3a.secret.key" not in text
    assert "minio123" not in text and "aws_secret_access_key" not in text


def test_crd_validation_can_fail() -> None:
    body = _spark_body()
    body["spec"]["driver"]["cores"] = "one"
    body["spec"]["executor"]["memroy"] = "2g"  # misspelt field
    errors = crd_errors(body)
    assert any("cores" in e for e in errors) and any("memroy" in e for e in errors)


def test_spark_version_matches_the_locked_pyspark() -> None:
    assert k8s.SPARK_VERSION == importlib.metadata.version("pyspark")


def test_spark_application_rejects_non_positive_resources() -> None:
    with pytest.raises(ValueError, match="executor_instances=0"):
        k8s.spark_application("x", NS, "img", "local:///a.py", executor_instances=0)


def test_inference_service_body_is_valid_against_the_crd() -> None:
    body = _isvc_body("7")
    assert crd_errors(body) == []
    # KServe 0.17+ calls the no-Knative mode "Standard" ("RawDeployment" is a legacy alias).
    assert body["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    env = _env(body)
    assert env["FRAUD_SERVE_MODEL_VERSION"] == "7" and env["FRAUD_MODEL_NAME"] == "fraud-detection"
    predictor = body["spec"]["predictor"]
    assert predictor["serviceAccountName"] == k8s.PREDICTOR_SERVICE_ACCOUNT
    assert predictor["containers"][0]["ports"][0]["containerPort"] == 8080
    names = {ref.get("secretRef", {}).get("name") for ref in predictor["containers"][0]["envFrom"]}
    assert {"fraud-detection-s3", "fraud-detection-registry"} <= names


def test_kubernetes_name_is_dns_safe_and_short() -> None:
    run_id = "0A1B2C3D-4e5f-6789-abcd-ef0123456789_long_suffix_from_kfp"
    name = k8s.kubernetes_name("prepare", run_id)
    assert len(name) <= 40 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    assert name == k8s.kubernetes_name("prepare", run_id)
    assert name != k8s.kubernetes_name("prepare", run_id + "x")


def test_image_references_come_from_one_place() -> None:
    assert images.image("train") == f"{images.REGISTRY}/train:{images.TAG}"
    assert images.image("pipeline", tag="dev") .endswith("/pipeline:dev")
    with pytest.raises(ValueError, match="unknown image step"):
        images.image("trainer")


# ---------------------------------------------------------------- run_spark_application

def test_spark_success_path_polls_until_completed() -> None:
    api = FakeCustomObjects([spark_state(""), spark_state("SUBMITTED"), spark_state("RUNNING"), spark_state("COMPLETED")])
    time = FakeClock()
    status = k8s.run_spark_application(api, _spark_body(), timeout_seconds=600, poll_seconds=5,
                                       sleep=time.sleep, clock=time.clock)
    assert status["applicationState"]["state"] == "COMPLETED"
    assert api.verbs() == ["create", "get", "get", "get", "get"]
    assert time.now == 15


def test_spark_failure_raises_with_the_driver_reason_and_log_tail() -> None:
    reason = "driver container failed with ExitCode: 1, Reason: Error"
    api = FakeCustomObjects([spark_state("RUNNING"), spark_state("FAILED", reason, pod="prepare-run1-driver")])
    core = FakeCoreApi()
    time = FakeClock()
    with pytest.raises(k8s.SparkApplicationFailed, match="ExitCode: 1") as info:
        k8s.run_spark_application(api, _spark_body(), 600, core_api=core, sleep=time.sleep, clock=time.clock)
    assert "FileNotFoundError" in str(info.value)
    assert core.asked == [(NS, "prepare-run1-driver")]


def test_spark_submission_failure_is_a_failure() -> None:
    api = FakeCustomObjects([spark_state("SUBMISSION_FAILED", "image pull back-off")])
    time = FakeClock()
    with pytest.raises(k8s.SparkApplicationFailed, match="SUBMISSION_FAILED: image pull back-off"):
        k8s.run_spark_application(api, _spark_body(), 600, sleep=time.sleep, clock=time.clock)


def test_spark_timeout_names_the_app_and_its_last_state_and_deletes_it() -> None:
    api = FakeCustomObjects([spark_state("RUNNING")])
    time = FakeClock()
    with pytest.raises(TimeoutError, match=r"fraud-detection/prepare-run1 .*60s.*RUNNING"):
        k8s.run_spark_application(api, _spark_body(), 60, poll_seconds=10, sleep=time.sleep, clock=time.clock)
    assert api.verbs()[-1] == "delete"
    assert api.verbs().count("get") == 7  # t = 0, 10, ..., 60


def test_spark_existing_app_from_an_earlier_attempt_is_replaced() -> None:
    api = FakeCustomObjects([spark_state("COMPLETED")], create_conflicts=1, gone_after_delete_gets=2)
    time = FakeClock()
    k8s.run_spark_application(api, _spark_body(), 600, sleep=time.sleep, clock=time.clock)
    assert api.verbs() == ["create", "delete", "get", "get", "create", "get"]


# ---------------------------------------------------------------- deploy_inference_service

class FakeApps:
    """AppsV1Api at its one call: ``read_namespaced_deployment`` answers with scripted Deployments
    (None: 404, the Deployment does not exist yet); the last one repeats."""

    def __init__(self, deployments: list[dict[str, Any] | None]):
        self.deployments = list(deployments)
        self.asked: list[tuple[str, str]] = []

    def read_namespaced_deployment(self, name: str, namespace: str) -> dict[str, Any]:
        self.asked.append((namespace, name))
        current = self.deployments.pop(0) if len(self.deployments) > 1 else self.deployments[0]
        if current is None:
            raise ApiException(status=404, reason="NotFound")
        return copy.deepcopy(current)


def _deployment(version: str, generation: int = 2, observed: int = 2, replicas: int = 1, updated: int = 1,
                total: int = 1, available: int = 1, conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The predictor Deployment as KServe's Standard mode builds it, with a rollout status."""
    return {
        "metadata": {"name": "fraud-detection-predictor", "generation": generation},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "isvc.fraud-detection-predictor"}},
                 "template": {"spec": {"containers": [
            {"name": "kserve-container", "env": [{"name": "FRAUD_SERVE_MODEL_VERSION", "value": version}]}]}}},
        "status": {"observedGeneration": observed, "replicas": total, "updatedReplicas": updated,
                   "availableReplicas": available, "conditions": conditions or []},
    }


def _ready(generation: int = 1, url: str = "http://fraud-detection-predictor.fraud-detection.svc.cluster.local") -> dict:
    return {"observedGeneration": generation, "address": {"url": url},
            "conditions": [{"type": "PredictorReady", "status": "True"}, {"type": "Ready", "status": "True"}]}


def test_serve_creates_then_a_second_deploy_waits_for_the_new_versions_rollout() -> None:
    api = FakeCustomObjects([{}, _ready()])
    apps = FakeApps([None, _deployment("1", generation=1, observed=1)])
    time = FakeClock()
    url = k8s.deploy_inference_service(api, _isvc_body("1"), 300, apps_api=apps, sleep=time.sleep, clock=time.clock)
    assert url.endswith("svc.cluster.local")
    assert api.verbs() == ["get", "create", "get", "get"]
    assert apps.asked[0] == (NS, "fraud-detection-predictor")

    # Second run: the InferenceService stays Ready on the old pods (and in Standard mode its
    # observedGeneration is the Deployment's, so it may even look "current") while the rollout runs.
    api.calls.clear()
    api.statuses = [_ready(2)]
    apps = FakeApps([
        _deployment("1", generation=1, observed=1),            # KServe has not updated the template yet
        _deployment("2", generation=2, observed=1),            # new template, controller behind
        _deployment("2", updated=1, total=2, available=1),     # an old pod still serves
        _deployment("2", updated=1, total=1, available=0),     # new pod not available yet
        _deployment("2"),                                      # rolled out
    ])
    time.now = 0
    k8s.deploy_inference_service(api, _isvc_body("2"), 300, poll_seconds=5, apps_api=apps,
                                 sleep=time.sleep, clock=time.clock)
    assert len(apps.asked) == 5 and time.now == 20, "returned before the new version was rolled out"
    assert "create" not in api.verbs() and api.verbs().count("patch") == 1
    stored = api.objects[("inferenceservices", NS, "fraud-detection")]
    assert _env(stored)["FRAUD_SERVE_MODEL_VERSION"] == "2"
    assert stored["metadata"]["annotations"][k8s.MODEL_VERSION_ANNOTATION] == "fraud-detection:2"


@pytest.mark.parametrize(("deployment", "done", "says"), [
    (_deployment("7"), True, "rolled out"),
    (_deployment("6"), False, "serves version '6'"),
    (_deployment("7", generation=3, observed=2), False, "generation 3 not observed"),
    (_deployment("7", replicas=2, updated=1, total=2, available=2), False, "1 of 2 replicas updated"),
    (_deployment("7", updated=1, total=2), False, "1 old replicas still running"),
    (_deployment("7", available=0), False, "0 of 1 updated replicas available"),
])
def test_rollout_state_names_what_is_missing(deployment, done, says) -> None:
    state, message = k8s.rollout_state(deployment, "7")
    assert state is done and says in message


def test_rollout_state_reads_a_client_model_too() -> None:
    from kubernetes import client

    model = client.ApiClient()._ApiClient__deserialize(_deployment("7"), "V1Deployment")
    assert k8s.rollout_state(k8s._as_dict(model), "7") == (True, "rolled out")


def test_serve_conflict_on_create_patches_instead() -> None:
    api = FakeCustomObjects([_ready(2)], create_conflicts=1)
    time = FakeClock()
    # get says 404 (object not there yet), create says 409 (it appeared meanwhile).
    k8s.deploy_inference_service(api, _isvc_body("3"), 300, apps_api=FakeApps([_deployment("3")]),
                                 sleep=time.sleep, clock=time.clock)
    assert api.verbs() == ["get", "create", "patch", "get"]


def _failed_load() -> dict[str, Any]:
    return {"modelStatus": {
        "transitionStatus": "BlockedByFailedLoad",
        "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "no model version passed the gate"}},
        "conditions": [{"type": "Ready", "status": "False", "reason": "PredictorNotReady"}]}


def test_serve_terminal_failure_of_the_new_version_raises_with_kserve_reason() -> None:
    api = FakeCustomObjects([_failed_load()])
    time = FakeClock()
    with pytest.raises(k8s.InferenceServiceFailed, match="ModelLoadFailed: no model version passed the gate"):
        k8s.deploy_inference_service(api, _isvc_body("1"), 300, apps_api=FakeApps([_deployment("1", available=0)]),
                                     sleep=time.sleep, clock=time.clock)
    assert time.now == 0  # terminal: no waiting for the deadline


def test_serve_ignores_the_previous_versions_failure_until_its_template_is_replaced() -> None:
    api = FakeCustomObjects([_failed_load(), _failed_load(), _ready()])
    apps = FakeApps([_deployment("1", available=0), _deployment("2", available=0), _deployment("2")])
    time = FakeClock()
    with pytest.raises(k8s.InferenceServiceFailed):
        k8s.deploy_inference_service(api, _isvc_body("2"), 300, apps_api=apps, sleep=time.sleep, clock=time.clock)
    assert time.now == 5, "the old template's failure must not count; the new template's does"


def test_serve_stuck_rollout_of_the_new_version_is_a_failure() -> None:
    stuck = _deployment("2", updated=1, total=2, available=0, conditions=[
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
         "message": 'ReplicaSet "fraud-detection-predictor-7f9" has timed out progressing.'}])
    api = FakeCustomObjects([_ready()])
    time = FakeClock()
    with pytest.raises(k8s.InferenceServiceFailed, match="version 2: ProgressDeadlineExceeded"):
        k8s.deploy_inference_service(api, _isvc_body("2"), 300, apps_api=FakeApps([stuck]),
                                     sleep=time.sleep, clock=time.clock)


def test_serve_not_ready_with_a_reason_at_the_deadline_is_a_failure() -> None:
    stuck = {"conditions": [
        {"type": "Ready", "status": "False", "reason": "PredictorNotReady",
         "message": "ImagePullBackOff: quay.io/fraud-detection-blueprint/rest-predictor:0.1.0"}]}
    api = FakeCustomObjects([stuck])
    time = FakeClock()
    with pytest.raises(k8s.InferenceServiceFailed, match="0 of 1 updated replicas available.*ImagePullBackOff"):
        k8s.deploy_inference_service(api, _isvc_body("1"), 30, poll_seconds=10,
                                     apps_api=FakeApps([_deployment("1", available=0)]),
                                     sleep=time.sleep, clock=time.clock)


def test_serve_timeout_without_a_reason_names_what_it_waited_for() -> None:
    api = FakeCustomObjects([{}])
    time = FakeClock()
    with pytest.raises(TimeoutError, match="not Ready within 30s .Deployment fraud-detection-predictor not created yet"):
        k8s.deploy_inference_service(api, _isvc_body(), 30, poll_seconds=10, apps_api=FakeApps([None]),
                                     sleep=time.sleep, clock=time.clock)


def test_predictor_gets_a_projected_registry_token_and_no_stored_one() -> None:
    body = _isvc_body("4")
    predictor = body["spec"]["predictor"]
    container = predictor["containers"][0]
    token_path = _env(body)["KF_PIPELINES_SA_TOKEN_PATH"]
    mount = container["volumeMounts"][0]
    assert token_path == f"{mount['mountPath']}/token" and mount["readOnly"] is True
    (volume,) = [v for v in predictor["volumes"] if v["name"] == mount["name"]]
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"]["path"] == "token"
    assert 600 <= source["serviceAccountToken"]["expirationSeconds"] <= 86400
    assert "FRAUD_REGISTRY_TOKEN" not in _env(body)
    assert crd_errors(body) == []


def test_registry_link_labels_name_the_version_for_both_dashboards() -> None:
    labels = k8s.registry_link_labels("12", "34", "model-registry-service", "kubeflow")
    assert labels == {
        "modelregistry.opendatahub.io/registered-model-id": "12",
        "modelregistry.opendatahub.io/model-version-id": "34",
        "modelregistry.opendatahub.io/name": "model-registry-service",
        "modelregistry.kubeflow.org/registered-model-id": "12",
        "modelregistry.kubeflow.org/model-version-id": "34",
        "modelregistry.kubeflow.org/name": "model-registry-service",
        "modelregistry.kubeflow.org/namespace": "kubeflow",
    }
    assert k8s.registry_link_labels() == {}
    with pytest.raises(ValueError, match="model-version-id='a b' is not a valid Kubernetes label value"):
        k8s.registry_link_labels("1", "a b")


@pytest.mark.parametrize(("uri", "expected"), [
    ("http://model-registry-service.kubeflow.svc.cluster.local", ("model-registry-service", "kubeflow")),
    ("https://fraud-detection-registry.rhoai-model-registries.svc:8443", ("fraud-detection-registry", "rhoai-model-registries")),
    ("https://fraud-detection-registry-rest.apps.example.com", ("", "")),
    ("http://localhost:8080", ("", "")),
])
def test_registry_service_is_read_from_in_cluster_addresses_only(uri, expected) -> None:
    assert k8s.registry_service(uri) == expected


# ---------------------------------------------------------------- entry points used by the KFP steps

def test_launch_spark_preparation_wires_the_run_into_a_valid_application() -> None:
    from fraud_common.settings import Settings

    settings = Settings.from_env({"FRAUD_DATA_URI": "s3://bucket/run-data", "S3_ENDPOINT_URL": "http://minio:9000"})
    api = FakeCustomObjects([spark_state("RUNNING"), spark_state("COMPLETED")])
    time = FakeClock()
    details = k8s.launch_spark_preparation(
        settings, NS, images.image("data-preparation"), "Run-0001", 1, "1g", 1, 1, "1g", 600,
        api=api, sleep=time.sleep, clock=time.clock,
    )
    assert details == {"spark_application": f"{NS}/prepare-run-0001", "state": "COMPLETED"}
    body = api.objects[("sparkapplications", NS, "prepare-run-0001")]
    assert crd_errors(body) == []
    spec = body["spec"]
    assert spec["arguments"] == ["--input", "s3://bucket/run-data/raw", "--output", "s3://bucket/run-data/prepared"]
    assert spec["mainApplicationFile"] == k8s.SPARK_MAIN_FILE
    assert {"name": "FRAUD_DATA_URI", "value": "s3://bucket/run-data"} in spec["driver"]["env"]
    main_file = Path(__file__).resolve().parents[1] / "data_preparation" / "main.py"
    assert main_file.is_file(), "the SparkApplication runs data_preparation/main.py"


def test_launch_inference_service_returns_the_ready_url_and_links_the_version() -> None:
    from fraud_common.settings import Settings

    settings = Settings.from_env({"FRAUD_REGISTRY_URI": "http://model-registry-service.kubeflow.svc.cluster.local"})
    api = FakeCustomObjects([{}, _ready(1, "http://svc.example")])
    time = FakeClock()
    url = k8s.launch_inference_service(settings, NS, "fraud-detection", "img:1", "fraud-detection", "5", 60,
                                       api=api, apps_api=FakeApps([_deployment("5")]),
                                       feast_snapshot_uri="s3://fraud-detection/feast/versions/5",
                                       registered_model_id="3", model_version_id="9",
                                       sleep=time.sleep, clock=time.clock)
    assert url == "http://svc.example"
    stored = api.objects[("inferenceservices", NS, "fraud-detection")]
    assert crd_errors(stored) == []
    env = _env(stored)
    assert env["FRAUD_SERVE_MODEL_VERSION"] == "5"
    # The snapshot of this version, not the ConfigMap's shared default (explicit env wins over envFrom).
    assert env["FRAUD_FEAST_SNAPSHOT_URI"] == "s3://fraud-detection/feast/versions/5"
    for labels in (stored["metadata"]["labels"], stored["spec"]["predictor"]["labels"]):
        assert labels["modelregistry.opendatahub.io/model-version-id"] == "9"
        assert labels["modelregistry.kubeflow.org/registered-model-id"] == "3"
        assert labels["modelregistry.kubeflow.org/name"] == "model-registry-service"
        assert labels["modelregistry.kubeflow.org/namespace"] == "kubeflow"


def test_launch_inference_service_without_registry_ids_adds_no_link_labels() -> None:
    from fraud_common.settings import Settings

    api = FakeCustomObjects([_ready()])
    time = FakeClock()
    k8s.launch_inference_service(Settings.from_env({}), NS, "fraud-detection", "img:1", "fraud-detection", "5", 60,
                                 api=api, apps_api=FakeApps([_deployment("5")]), sleep=time.sleep, clock=time.clock)
    stored = api.objects[("inferenceservices", NS, "fraud-detection")]
    assert not any(key.startswith("modelregistry.") for key in stored["metadata"]["labels"])
    assert "FRAUD_FEAST_SNAPSHOT_URI" not in _env(stored)
