"""Kubernetes launchers used by the pipeline's cluster steps: SparkApplications and InferenceServices.

The functions build custom-resource bodies (plain dicts, validated in the tests against the
CRDs) and drive them through a ``kubernetes.client.CustomObjectsApi`` passed in by the caller,
so tests stand the API in at its calls. Nothing here reads the environment or carries a
credential: S3 keys reach the Spark pods and the predictor as env vars from the
``fraud-detection-s3`` Secret (``envFrom``), settings from the ``fraud-detection-config``
ConfigMap.

Rerun semantics (documented choices):

* A SparkApplication whose name already exists (a retried step of the same run) is deleted,
  waited for until gone, and created again: the old attempt is ours (same run id) and its state
  says nothing about this attempt. Finished applications are removed by the operator after
  ``timeToLiveSeconds``.
* An InferenceService that exists is patched (JSON merge patch), so rerunning the pipeline rolls
  the predictor to the new model version instead of failing with "already exists".
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from typing import Any, Callable, Iterable, Mapping

from kubernetes.client.exceptions import ApiException

from fraud_common.logs import get_logger
from fraud_common.settings import CONFIG_MAP, REGISTRY_SECRET, S3_SECRET, default_of  # noqa: F401 - re-exported
from fraud_common.spark_s3 import s3a_conf

_log = get_logger(__name__)

PROJECT = "fraud-detection"
# The project namespace is a setting (FRAUD_NAMESPACE); this is its default, which the manifests use.
NAMESPACE = default_of("namespace")
PIPELINE_SERVICE_ACCOUNT = "fraud-detection-pipeline"
SPARK_SERVICE_ACCOUNT = "fraud-detection-spark"
PREDICTOR_SERVICE_ACCOUNT = "fraud-detection-predictor"
PART_OF_LABEL = "app.kubernetes.io/part-of"

SPARK_GROUP, SPARK_API_VERSION, SPARK_PLURAL = "sparkoperator.k8s.io", "v1beta2", "sparkapplications"
KSERVE_GROUP, KSERVE_API_VERSION, KSERVE_PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
# Spark inside the data-preparation image: the locked pyspark version (a test keeps them equal).
SPARK_VERSION = "4.3.0"
PREDICTOR_PORT = 8080
MODEL_VERSION_ANNOTATION = "fraud-detection.io/model-version"

SPARK_SUCCEEDED = {"COMPLETED"}
SPARK_FAILED = {"FAILED", "SUBMISSION_FAILED"}
# KServe modelStatus transitions that will not resolve by waiting.
ISVC_TERMINAL = {"BlockedByFailedLoad", "InvalidSpec"}

Sleep = Callable[[float], None]
Clock = Callable[[], float]


class SparkApplicationFailed(RuntimeError):
    """The SparkApplication ended in FAILED or SUBMISSION_FAILED; the message carries the reason."""


class InferenceServiceFailed(RuntimeError):
    """The InferenceService cannot become Ready; the message carries KServe's reason."""


def project_labels(component: str, **extra: str) -> dict[str, str]:
    """The labels every object of this project carries (``clear_runs.sh`` selects on them)."""
    return {PART_OF_LABEL: PROJECT, "app.kubernetes.io/component": component, **extra}


def kubernetes_name(*parts: str, max_length: int = 40) -> str:
    """A DNS-1035 name from ``parts`` (lowercase, ``-``), shortened with a hash when too long.

    40 characters by default because Spark derives longer names (``<app>-driver``,
    ``<app>-<hash>-driver-svc``) that must stay within 63.
    """
    raw = "-".join(p for p in parts if p)
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if not name or not name[0].isalpha():
        name = f"x-{name}".rstrip("-")
    if len(name) > max_length:
        digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
        name = f"{name[: max_length - 9].rstrip('-')}-{digest}"
    return name


def env_sources(
    config_maps: Iterable[str] = (CONFIG_MAP,), secrets: Iterable[str] = (S3_SECRET,)
) -> list[dict[str, Any]]:
    """``envFrom`` entries (EnvFromSource) for the project's ConfigMap and Secrets."""
    sources: list[dict[str, Any]] = [{"configMapRef": {"name": name}} for name in config_maps]
    sources += [{"secretRef": {"name": name}} for name in secrets]
    return sources


def _env_list(env: Mapping[str, str] | None) -> list[dict[str, str]]:
    return [{"name": key, "value": str(value)} for key, value in sorted((env or {}).items())]


_RESTRICTED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def spark_application(
    name: str,
    namespace: str,
    image: str,
    main_application_file: str,
    arguments: Iterable[str] = (),
    service_account: str = SPARK_SERVICE_ACCOUNT,
    driver_cores: int = 1,
    driver_memory: str = "2g",
    executor_instances: int = 2,
    executor_cores: int = 1,
    executor_memory: str = "2g",
    env_from: list[dict[str, Any]] | None = None,
    env: Mapping[str, str] | None = None,
    s3_endpoint: str = "",
    s3_region: str = "",
    ttl_seconds_after_finished: int = 3600,
    spark_version: str = SPARK_VERSION,
    labels: Mapping[str, str] | None = None,
    image_pull_policy: str = "IfNotPresent",
) -> dict[str, Any]:
    """A ``sparkoperator.k8s.io/v1beta2`` SparkApplication running a PySpark file in ``image``.

    ``env_from`` defaults to the project's ConfigMap and S3 Secret; ``env`` adds plain
    variables (e.g. the run's ``FRAUD_DATA_URI``) to driver and executors.
    """
    if driver_cores < 1 or executor_cores < 1 or executor_instances < 1:
        raise ValueError(
            f"Spark resources must be positive: driver_cores={driver_cores}, "
            f"executor_cores={executor_cores}, executor_instances={executor_instances}"
        )
    sources = env_sources() if env_from is None else env_from
    pod_labels = {**project_labels("data-preparation"), "fraud-detection.io/spark-app": name, **(labels or {})}
    pod_common = {
        "labels": pod_labels,
        "envFrom": sources,
        "env": _env_list(env),
        "securityContext": _RESTRICTED,
    }
    return {
        "apiVersion": f"{SPARK_GROUP}/{SPARK_API_VERSION}",
        "kind": "SparkApplication",
        "metadata": {"name": name, "namespace": namespace, "labels": pod_labels},
        "spec": {
            "type": "Python",
            "pythonVersion": "3",
            "mode": "cluster",
            "image": image,
            "imagePullPolicy": image_pull_policy,
            "mainApplicationFile": main_application_file,
            "arguments": [str(a) for a in arguments],
            "sparkVersion": spark_version,
            # Ivy's default cache is under $HOME, which a non-root image may not have writable.
            "sparkConf": {**s3a_conf(s3_endpoint, s3_region), "spark.jars.ivy": "/tmp/.ivy2"},
            # Retries belong to the pipeline step, not to the operator: fail once, report why.
            "restartPolicy": {"type": "Never"},
            "timeToLiveSeconds": int(ttl_seconds_after_finished),
            "driver": {
                **pod_common,
                "cores": int(driver_cores),
                "memory": driver_memory,
                "serviceAccount": service_account,
            },
            "executor": {
                **pod_common,
                "instances": int(executor_instances),
                "cores": int(executor_cores),
                "memory": executor_memory,
            },
        },
    }


def _name_of(body: Mapping[str, Any]) -> tuple[str, str]:
    meta = body["metadata"]
    return meta["namespace"], meta["name"]


def _wait_gone(api: Any, group: str, version: str, plural: str, namespace: str, name: str,
               deadline: float, poll_seconds: float, sleep: Sleep, clock: Clock) -> None:
    """Poll until the object is gone (404) or the deadline passes."""
    while True:
        try:
            api.get_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as err:
            if err.status == 404:
                return
            raise
        if clock() >= deadline:
            raise TimeoutError(f"{plural} {namespace}/{name} was not deleted in time (still present)")
        sleep(poll_seconds)


def _spark_state(obj: Mapping[str, Any]) -> tuple[str, str]:
    state = (obj.get("status") or {}).get("applicationState") or {}
    return state.get("state") or "", state.get("errorMessage") or ""


def driver_log_tail(core_api: Any, namespace: str, pod_name: str, lines: int = 40) -> str:
    """The last ``lines`` of the driver's log, or a note on why it could not be read."""
    try:
        return core_api.read_namespaced_pod_log(name=pod_name, namespace=namespace, tail_lines=lines)
    except ApiException as err:
        return f"(driver log unavailable: {err.status} {err.reason})"


def run_spark_application(
    api: Any,
    body: dict[str, Any],
    timeout_seconds: float,
    poll_seconds: float = 5,
    delete_on_timeout: bool = True,
    core_api: Any = None,
    log: logging.Logger = _log,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
) -> dict[str, Any]:
    """Create the SparkApplication and wait until it COMPLETES; return its last status.

    An application of the same name from an earlier attempt is deleted first (see module doc).
    Raises ``SparkApplicationFailed`` with the operator's error message (plus the driver's log
    tail when ``core_api`` is given) and ``TimeoutError`` naming the last state.
    """
    namespace, name = _name_of(body)
    ref = (SPARK_GROUP, SPARK_API_VERSION, namespace, SPARK_PLURAL)
    deadline = clock() + timeout_seconds
    try:
        api.create_namespaced_custom_object(*ref, body)
    except ApiException as err:
        if err.status != 409:
            raise
        log.warning("SparkApplication %s/%s exists from an earlier attempt: deleting it", namespace, name)
        api.delete_namespaced_custom_object(*ref, name)
        _wait_gone(api, SPARK_GROUP, SPARK_API_VERSION, SPARK_PLURAL, namespace, name,
                   deadline, poll_seconds, sleep, clock)
        api.create_namespaced_custom_object(*ref, body)
    log.info("SparkApplication %s/%s created; waiting up to %ss", namespace, name, timeout_seconds)

    last_state = ""
    while True:
        obj = api.get_namespaced_custom_object(*ref, name)
        state, error = _spark_state(obj)
        if state != last_state:
            log.info("SparkApplication %s/%s: %s", namespace, name, state or "(no state yet)")
            last_state = state
        if state in SPARK_SUCCEEDED:
            return obj.get("status") or {}
        if state in SPARK_FAILED:
            message = f"SparkApplication {namespace}/{name} {state}: {error or 'no error message from the operator'}"
            pod = ((obj.get("status") or {}).get("driverInfo") or {}).get("podName")
            if core_api is not None and pod:
                message += f"\n--- driver {pod} log tail ---\n{driver_log_tail(core_api, namespace, pod)}"
            raise SparkApplicationFailed(message)
        if clock() >= deadline:
            if delete_on_timeout:
                api.delete_namespaced_custom_object(*ref, name)
            raise TimeoutError(
                f"SparkApplication {namespace}/{name} did not finish within {timeout_seconds}s "
                f"(last state: {last_state or 'none reported'}"
                f"{'; deleted' if delete_on_timeout else ''})"
            )
        sleep(poll_seconds)


def inference_service(
    name: str,
    namespace: str,
    image: str,
    model_name: str,
    model_version: str,
    service_account: str = PREDICTOR_SERVICE_ACCOUNT,
    env_from: list[dict[str, Any]] | None = None,
    env: Mapping[str, str] | None = None,
    resources: Mapping[str, Any] | None = None,
    min_replicas: int = 1,
    max_replicas: int = 1,
    labels: Mapping[str, str] | None = None,
    image_pull_policy: str = "IfNotPresent",
) -> dict[str, Any]:
    """A ``serving.kserve.io/v1beta1`` InferenceService running the predictor image (RawDeployment).

    The model name and version go into the container's env (``FRAUD_MODEL_NAME``,
    ``FRAUD_SERVE_MODEL_VERSION``), so a new version changes the pod template and rolls the
    Deployment. The predictor listens on 8080 (KServe's port for custom containers).
    """
    sources = env_sources(secrets=(S3_SECRET, REGISTRY_SECRET)) if env_from is None else env_from
    all_labels = {**project_labels("predictor"), **(labels or {})}
    container_env = {
        **(env or {}),
        "FRAUD_MODEL_NAME": model_name,
        "FRAUD_SERVE_MODEL_VERSION": model_version,
        "FRAUD_SERVE_HOST": "0.0.0.0",
        "FRAUD_SERVE_PORT": str(PREDICTOR_PORT),
    }
    container: dict[str, Any] = {
        "name": "kserve-container",
        "image": image,
        "imagePullPolicy": image_pull_policy,
        "ports": [{"containerPort": PREDICTOR_PORT, "protocol": "TCP"}],
        "envFrom": sources,
        "env": _env_list(container_env),
        "resources": dict(resources or {
            "requests": {"cpu": "500m", "memory": "1Gi"},
            "limits": {"cpu": "2", "memory": "2Gi"},
        }),
        # The server listens only after the model and Feast store are loaded.
        "readinessProbe": {"tcpSocket": {"port": PREDICTOR_PORT}, "periodSeconds": 5, "failureThreshold": 3},
        "securityContext": _RESTRICTED,
    }
    return {
        "apiVersion": f"{KSERVE_GROUP}/{KSERVE_API_VERSION}",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": all_labels,
            "annotations": {
                # No Knative/Istio: a plain Deployment + Service.
                "serving.kserve.io/deploymentMode": "RawDeployment",
                MODEL_VERSION_ANNOTATION: f"{model_name}:{model_version}",
            },
        },
        "spec": {
            "predictor": {
                "serviceAccountName": service_account,
                "minReplicas": int(min_replicas),
                "maxReplicas": int(max_replicas),
                "labels": all_labels,
                "containers": [container],
            }
        },
    }


def _isvc_failure(status: Mapping[str, Any]) -> str:
    """KServe's reason for not being Ready ("" when it gives none)."""
    failure = (status.get("modelStatus") or {}).get("lastFailureInfo") or {}
    if failure.get("reason") or failure.get("message"):
        return f"{failure.get('reason', '')}: {failure.get('message', '')}".strip(": ")
    for condition in status.get("conditions") or []:
        if condition.get("status") == "False" and (condition.get("reason") or condition.get("message")):
            return f"{condition.get('type')}: {condition.get('reason', '')} {condition.get('message', '')}".strip()
    return ""


def _is_ready(status: Mapping[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def isvc_url(obj: Mapping[str, Any]) -> str:
    """The in-cluster address of the InferenceService (falls back to its public URL, then the Service name)."""
    status = obj.get("status") or {}
    namespace, name = _name_of(obj)
    return (
        (status.get("address") or {}).get("url")
        or status.get("url")
        or f"http://{name}-predictor.{namespace}.svc.cluster.local"
    )


def deploy_inference_service(
    api: Any,
    body: dict[str, Any],
    timeout_seconds: float,
    poll_seconds: float = 5,
    log: logging.Logger = _log,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
) -> str:
    """Create the InferenceService, or merge-patch it when it exists; wait for Ready; return its URL.

    Readiness counts only once KServe has observed the generation this call produced, so a
    patched service is not reported Ready on the previous version's status.
    """
    namespace, name = _name_of(body)
    ref = (KSERVE_GROUP, KSERVE_API_VERSION, namespace, KSERVE_PLURAL)
    deadline = clock() + timeout_seconds
    patch = {"metadata": {k: body["metadata"][k] for k in ("labels", "annotations")}, "spec": body["spec"]}
    try:
        api.get_namespaced_custom_object(*ref, name)
        exists = True
    except ApiException as err:
        if err.status != 404:
            raise
        exists = False
    if exists:
        applied = api.patch_namespaced_custom_object(*ref, name, patch)
        log.info("InferenceService %s/%s exists: patched to the new version", namespace, name)
    else:
        try:
            applied = api.create_namespaced_custom_object(*ref, body)
            log.info("InferenceService %s/%s created", namespace, name)
        except ApiException as err:
            if err.status != 409:
                raise
            # Created by someone else between our get and create: roll it instead.
            applied = api.patch_namespaced_custom_object(*ref, name, patch)
            log.info("InferenceService %s/%s appeared meanwhile: patched", namespace, name)
    generation = ((applied or {}).get("metadata") or {}).get("generation")

    while True:
        obj = api.get_namespaced_custom_object(*ref, name)
        status = obj.get("status") or {}
        observed = status.get("observedGeneration")
        current = generation is None or observed is None or observed >= generation
        if current and _is_ready(status):
            url = isvc_url(obj)
            log.info("InferenceService %s/%s Ready at %s", namespace, name, url)
            return url
        transition = (status.get("modelStatus") or {}).get("transitionStatus")
        if current and transition in ISVC_TERMINAL:
            raise InferenceServiceFailed(
                f"InferenceService {namespace}/{name} {transition}: {_isvc_failure(status) or 'no reason given'}"
            )
        if clock() >= deadline:
            reason = _isvc_failure(status) if current else ""
            if reason:
                raise InferenceServiceFailed(
                    f"InferenceService {namespace}/{name} not Ready within {timeout_seconds}s: {reason}"
                )
            raise TimeoutError(
                f"InferenceService {namespace}/{name} not Ready within {timeout_seconds}s "
                f"(observed generation {observed}, wanted {generation}; no failure reason reported)"
            )
        sleep(poll_seconds)


# ---------------------------------------------------------------- entry points for the KFP steps

# The PySpark program inside the data-preparation image (data_preparation/Containerfile puts the
# step folder at /app/data_preparation and /app on PYTHONPATH).
SPARK_MAIN_FILE = "local:///app/data_preparation/main.py"


def kubernetes_apis() -> tuple[Any, Any]:
    """(CustomObjectsApi, CoreV1Api) from the pod's service account, else the local kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi(), client.CoreV1Api()


def launch_spark_preparation(
    settings: Any,
    namespace: str,
    image: str,
    run_id: str,
    driver_cores: int,
    driver_memory: str,
    executor_instances: int,
    executor_cores: int,
    executor_memory: str,
    timeout_seconds: int,
    api: Any = None,
    core_api: Any = None,
    input_uri: str | None = None,
    output_uri: str | None = None,
    **wait_options: Any,
) -> dict[str, Any]:
    """Run data preparation as a SparkApplication named after the run; return what to record.

    Spark reads ``input_uri`` and writes ``output_uri`` (defaults: the settings' raw and
    prepared folders; the pipeline passes its output artifact's URI).
    """
    if api is None:
        api, core_api = kubernetes_apis()
    name = kubernetes_name("prepare", run_id)
    body = spark_application(
        name=name,
        namespace=namespace,
        image=image,
        main_application_file=SPARK_MAIN_FILE,
        arguments=["--input", input_uri or settings.raw_uri, "--output", output_uri or settings.prepared_uri],
        driver_cores=driver_cores,
        driver_memory=driver_memory,
        executor_instances=executor_instances,
        executor_cores=executor_cores,
        executor_memory=executor_memory,
        # The run's data root wins over the ConfigMap's default.
        env={"FRAUD_DATA_URI": settings.data_uri},
        s3_endpoint=settings.s3_endpoint,
        s3_region=settings.s3_region,
        labels={"fraud-detection.io/run-id": kubernetes_name(run_id, max_length=63)},
    )
    status = run_spark_application(api, body, timeout_seconds, core_api=core_api, **wait_options)
    return {
        "spark_application": f"{namespace}/{name}",
        "state": (status.get("applicationState") or {}).get("state", ""),
    }


def launch_inference_service(
    settings: Any,
    namespace: str,
    service_name: str,
    image: str,
    model_name: str,
    model_version: str,
    timeout_seconds: int,
    api: Any = None,
    feast_snapshot_uri: str = "",
    **wait_options: Any,
) -> str:
    """Create or roll the predictor InferenceService to ``model_version``; return its URL.

    ``feast_snapshot_uri``: the Feast store snapshot the predictor loads (the run's artifact).
    """
    if api is None:
        api, _ = kubernetes_apis()
    body = inference_service(
        name=service_name,
        namespace=namespace,
        image=image,
        model_name=model_name,
        model_version=model_version,
        env={"FRAUD_FEAST_SNAPSHOT_URI": feast_snapshot_uri} if feast_snapshot_uri else None,
    )
    return deploy_inference_service(api, body, timeout_seconds, **wait_options)
