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
  the predictor to the new model version instead of failing with "already exists"; the step
  returns once the predictor Deployment has rolled out that version (``rollout_state``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import urlparse

from kubernetes.client.exceptions import ApiException

from fraud_common.logs import get_logger
from fraud_common.settings import CONFIG_MAP, REGISTRY_SECRET, S3_SECRET, default_of  # noqa: F401 - re-exported
from fraud_common.settings import ONLINE_STORE_SECRET
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
MODEL_VERSION_ENV = "FRAUD_SERVE_MODEL_VERSION"
# KServe's container name for a custom predictor (the Deployment's pod template keeps it).
PREDICTOR_CONTAINER = "kserve-container"
# KServe 0.17 renamed RawDeployment to Standard (pkg/constants: LegacyRawDeployment is normalised).
DEPLOYMENT_MODE_ANNOTATION, DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode", "Standard"
# A projected service-account token for the model-registry client, rotated by the kubelet.
REGISTRY_TOKEN_DIR = "/var/run/secrets/fraud-detection/registry"
REGISTRY_TOKEN_SECONDS = 3600

# The Role that lets a step drive SparkApplications and InferenceServices is bound to the service
# account KFP runs steps as, which the pipeline does not choose: KFP standalone's
# DefaultPipelineRunnerServiceAccount in `kubeflow`, and on OpenShift AI the Data Science
# Pipelines operator's `pipeline-runner-<DSPA name>` in the project namespace.
PIPELINE_ROLE = "fraud-detection-pipeline"
KFP_NAMESPACE = "kubeflow"
KFP_RUNNER_SERVICE_ACCOUNT = "pipeline-runner"
DSPA_NAME = "fraud-detection"
DSPA_RUNNER_SERVICE_ACCOUNT = f"pipeline-runner-{DSPA_NAME}"

# Labels linking an InferenceService to its registry version: the OpenShift AI dashboard's
# (KnownLabels in odh-dashboard) and Kubeflow Model Registry's inferenceservice controller's
# (manifests/kustomize/options/controller/overlays/base/params.env).
ODH_REGISTERED_MODEL_ID_LABEL = "modelregistry.opendatahub.io/registered-model-id"
ODH_MODEL_VERSION_ID_LABEL = "modelregistry.opendatahub.io/model-version-id"
ODH_REGISTRY_NAME_LABEL = "modelregistry.opendatahub.io/name"
KF_REGISTERED_MODEL_ID_LABEL = "modelregistry.kubeflow.org/registered-model-id"
KF_MODEL_VERSION_ID_LABEL = "modelregistry.kubeflow.org/model-version-id"
KF_REGISTRY_NAME_LABEL = "modelregistry.kubeflow.org/name"
KF_REGISTRY_NAMESPACE_LABEL = "modelregistry.kubeflow.org/namespace"
_LABEL_VALUE = re.compile(r"(?=.{1,63}$)[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")

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


def registry_link_labels(
    registered_model_id: str = "",
    model_version_id: str = "",
    registry_name: str = "",
    registry_namespace: str = "",
) -> dict[str, str]:
    """Labels that link an InferenceService to its model-registry version.

    The OpenShift AI dashboard reads ``modelregistry.opendatahub.io/*``; Kubeflow's Model Registry
    inferenceservice controller reads ``modelregistry.kubeflow.org/*`` (its params.env). Empty
    values are left out; a value that is not a valid label value is an error.
    """
    wanted = {
        ODH_REGISTERED_MODEL_ID_LABEL: registered_model_id,
        ODH_MODEL_VERSION_ID_LABEL: model_version_id,
        ODH_REGISTRY_NAME_LABEL: registry_name,
        KF_REGISTERED_MODEL_ID_LABEL: registered_model_id,
        KF_MODEL_VERSION_ID_LABEL: model_version_id,
        KF_REGISTRY_NAME_LABEL: registry_name,
        KF_REGISTRY_NAMESPACE_LABEL: registry_namespace,
    }
    labels = {key: str(value) for key, value in wanted.items() if value}
    for key, value in labels.items():
        if not _LABEL_VALUE.fullmatch(value):
            raise ValueError(f"{key}={value!r} is not a valid Kubernetes label value (63 characters of [A-Za-z0-9_.-])")
    return labels


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
    feast_snapshot_uri: str = "",
    registry_labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A ``serving.kserve.io/v1beta1`` InferenceService running the predictor image (Standard mode).

    The model name and version go into the container's env (``FRAUD_MODEL_NAME``,
    ``FRAUD_SERVE_MODEL_VERSION``), so a new version changes the pod template and rolls the
    Deployment. ``feast_snapshot_uri`` pins the Feast store snapshot of that version (it wins over
    the ConfigMap's default). ``registry_labels`` (see ``registry_link_labels``) link the service
    to its registry version. The registry client authenticates with a projected, short-lived
    service-account token (``KF_PIPELINES_SA_TOKEN_PATH``), never a stored one; the pod gets no
    API token otherwise. The predictor listens on 8080 (KServe's port for custom containers).
    """
    sources = env_sources(secrets=(S3_SECRET, REGISTRY_SECRET)) if env_from is None else env_from
    all_labels = {**project_labels("predictor"), **(labels or {}), **(registry_labels or {})}
    container_env = {
        **(env or {}),
        "FRAUD_MODEL_NAME": model_name,
        MODEL_VERSION_ENV: model_version,
        "FRAUD_SERVE_HOST": "0.0.0.0",
        "FRAUD_SERVE_PORT": str(PREDICTOR_PORT),
        # The model-registry client reads its bearer token from the file this variable names.
        "KF_PIPELINES_SA_TOKEN_PATH": f"{REGISTRY_TOKEN_DIR}/token",
    }
    if feast_snapshot_uri:
        container_env["FRAUD_FEAST_SNAPSHOT_URI"] = feast_snapshot_uri
    container: dict[str, Any] = {
        "name": PREDICTOR_CONTAINER,
        "image": image,
        "imagePullPolicy": image_pull_policy,
        "ports": [{"containerPort": PREDICTOR_PORT, "protocol": "TCP"}],
        "envFrom": sources,
        # online store: the shared Redis's password, from the Secret setup.sh generates; optional,
        # so a cluster with the file-based store (no such Secret) still starts the predictor.
        "env": _env_list(container_env) + [{
            "name": "FRAUD_ONLINE_STORE_PASSWORD",
            "valueFrom": {"secretKeyRef": {
                "name": ONLINE_STORE_SECRET, "key": "FRAUD_ONLINE_STORE_PASSWORD", "optional": True,
            }},
        }],
        "resources": dict(resources or {
            "requests": {"cpu": "500m", "memory": "1Gi"},
            "limits": {"cpu": "2", "memory": "2Gi"},
        }),
        # The server listens only after the model and Feast store are loaded.
        "readinessProbe": {"tcpSocket": {"port": PREDICTOR_PORT}, "periodSeconds": 5, "failureThreshold": 3},
        "securityContext": _RESTRICTED,
        "volumeMounts": [{"name": "registry-token", "mountPath": REGISTRY_TOKEN_DIR, "readOnly": True}],
    }
    return {
        "apiVersion": f"{KSERVE_GROUP}/{KSERVE_API_VERSION}",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": all_labels,
            "annotations": {
                # No Knative/Istio: a plain Deployment + Service ("RawDeployment" before KServe 0.17).
                DEPLOYMENT_MODE_ANNOTATION: DEPLOYMENT_MODE,
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
                "volumes": [{
                    "name": "registry-token",
                    "projected": {"sources": [{"serviceAccountToken": {
                        "path": "token", "expirationSeconds": REGISTRY_TOKEN_SECONDS,
                    }}]},
                }],
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
        or f"http://{predictor_deployment_name(name)}.{namespace}.svc.cluster.local"
    )


def predictor_deployment_name(isvc_name: str) -> str:
    """The Deployment (and Service) KServe creates for the predictor in Standard mode: ``<isvc>-predictor``."""
    return f"{isvc_name}-predictor"


def _as_dict(obj: Any) -> dict[str, Any]:
    """A Deployment as a plain dict (camelCase keys), from the client's model or from a dict."""
    if isinstance(obj, Mapping):
        return dict(obj)
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(obj)


def _template_version(deployment: Mapping[str, Any]) -> str | None:
    """The model version the Deployment's pod template serves (its predictor container's env)."""
    containers = (((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []
    for container in containers:
        if container.get("name") == PREDICTOR_CONTAINER:
            for item in container.get("env") or []:
                if item.get("name") == MODEL_VERSION_ENV:
                    return item.get("value")
    return None


def rollout_state(deployment: Mapping[str, Any], model_version: str) -> tuple[bool, str]:
    """(done, what is missing) for the predictor Deployment's rollout of ``model_version``.

    Done means what ``kubectl rollout status`` checks, for the template that serves this version:
    the controller observed the Deployment's current generation, every replica runs the new
    template, no old replica is left, and all new replicas are available.
    """
    meta, spec, status = (deployment.get(k) or {} for k in ("metadata", "spec", "status"))
    served = _template_version(deployment)
    if served != model_version:
        return False, f"pod template serves version {served!r}, not {model_version!r} yet"
    generation, observed = meta.get("generation") or 0, status.get("observedGeneration") or 0
    if observed < generation:
        return False, f"Deployment generation {generation} not observed yet (observed {observed})"
    wanted = spec.get("replicas", 1)
    updated = status.get("updatedReplicas") or 0
    total = status.get("replicas") or 0
    available = status.get("availableReplicas") or 0
    if updated < wanted:
        return False, f"{updated} of {wanted} replicas updated"
    if total > updated:
        return False, f"{total - updated} old replicas still running"
    if available < updated:
        return False, f"{available} of {updated} updated replicas available"
    return True, "rolled out"


def _rollout_failure(deployment: Mapping[str, Any]) -> str:
    """The Deployment's reason for giving up (Progressing=False, e.g. ProgressDeadlineExceeded)."""
    for condition in (deployment.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("status") == "False":
            return f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            return f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
    return ""


def deploy_inference_service(
    api: Any,
    body: dict[str, Any],
    timeout_seconds: float,
    poll_seconds: float = 5,
    apps_api: Any = None,
    log: logging.Logger = _log,
    sleep: Sleep = time.sleep,
    clock: Clock = time.monotonic,
) -> str:
    """Create the InferenceService, or merge-patch it when it exists; wait for the new version; return its URL.

    Done when the predictor Deployment KServe creates (``<name>-predictor``) has rolled out a pod
    template serving the body's model version (``rollout_state``) and the InferenceService is
    Ready. In Standard mode KServe copies the Deployment's observedGeneration into the
    InferenceService status, so that number says nothing about the InferenceService's own
    generation and is not used.
    """
    namespace, name = _name_of(body)
    ref = (KSERVE_GROUP, KSERVE_API_VERSION, namespace, KSERVE_PLURAL)
    if apps_api is None:
        apps_api = apps_v1_api()
    model_version = _template_version({"spec": {"template": {"spec": body["spec"]["predictor"]}}})
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
        api.patch_namespaced_custom_object(*ref, name, patch)
        log.info("InferenceService %s/%s exists: patched to version %s", namespace, name, model_version)
    else:
        try:
            api.create_namespaced_custom_object(*ref, body)
            log.info("InferenceService %s/%s created (version %s)", namespace, name, model_version)
        except ApiException as err:
            if err.status != 409:
                raise
            # Created by someone else between our get and create: roll it instead.
            api.patch_namespaced_custom_object(*ref, name, patch)
            log.info("InferenceService %s/%s appeared meanwhile: patched", namespace, name)

    deployment_name = predictor_deployment_name(name)
    last = ""
    while True:
        try:
            deployment = _as_dict(apps_api.read_namespaced_deployment(deployment_name, namespace))
            rolled_out, waiting_for = rollout_state(deployment, model_version)
        except ApiException as err:
            if err.status != 404:
                raise
            deployment, rolled_out, waiting_for = {}, False, f"Deployment {deployment_name} not created yet"
        obj = api.get_namespaced_custom_object(*ref, name)
        status = obj.get("status") or {}
        if rolled_out and _is_ready(status):
            url = isvc_url(obj)
            log.info("InferenceService %s/%s Ready at %s, serving version %s", namespace, name, url, model_version)
            return url
        if not rolled_out and waiting_for != last:
            log.info("InferenceService %s/%s: %s", namespace, name, waiting_for)
            last = waiting_for
        transition = (status.get("modelStatus") or {}).get("transitionStatus")
        # A failed load counts once the new template exists (it could be the previous version's).
        if transition == "InvalidSpec" or (transition in ISVC_TERMINAL and _template_version(deployment) == model_version):
            raise InferenceServiceFailed(
                f"InferenceService {namespace}/{name} {transition}: {_isvc_failure(status) or 'no reason given'}"
            )
        stuck = _rollout_failure(deployment) if _template_version(deployment) == model_version else ""
        if stuck:
            raise InferenceServiceFailed(f"InferenceService {namespace}/{name} version {model_version}: {stuck}")
        if clock() >= deadline:
            reason = _isvc_failure(status)
            detail = f"{waiting_for}" if not rolled_out else "rolled out but not Ready"
            if reason:
                raise InferenceServiceFailed(
                    f"InferenceService {namespace}/{name} not Ready within {timeout_seconds}s ({detail}): {reason}"
                )
            raise TimeoutError(
                f"InferenceService {namespace}/{name} not Ready within {timeout_seconds}s "
                f"({detail}; no failure reason reported)"
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


def apps_v1_api() -> Any:
    """AppsV1Api (reads the predictor Deployment) with the same configuration as ``kubernetes_apis``."""
    from kubernetes import client

    kubernetes_apis()
    return client.AppsV1Api()


def registry_service(registry_uri: str) -> tuple[str, str]:
    """(Service name, namespace) of an in-cluster registry address ``http(s)://<svc>.<ns>.svc...``.

    ("", "") for any other address (a Route, localhost): the labels then leave the name out.
    """
    host = urlparse(registry_uri).hostname or ""
    parts = host.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        return parts[0], parts[1]
    return "", ""


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
    registered_model_id: str = "",
    model_version_id: str = "",
    apps_api: Any = None,
    **wait_options: Any,
) -> str:
    """Create or roll the predictor InferenceService to ``model_version``; return its URL.

    ``feast_snapshot_uri``: the Feast store snapshot of this model version (the run's artifact),
    so a pod restarted later still loads the features its model was trained against.
    ``registered_model_id`` / ``model_version_id``: the registry's ids, written as the labels
    that link the service to its version (the registry's name and namespace come from
    ``settings.registry_uri``).
    """
    if api is None:
        api, _ = kubernetes_apis()
    registry_name, registry_namespace = registry_service(settings.registry_uri)
    body = inference_service(
        name=service_name,
        namespace=namespace,
        image=image,
        model_name=model_name,
        model_version=model_version,
        feast_snapshot_uri=feast_snapshot_uri,
        registry_labels=registry_link_labels(
            registered_model_id, model_version_id,
            registry_name if registered_model_id else "", registry_namespace if registered_model_id else "",
        ),
    )
    return deploy_inference_service(api, body, timeout_seconds, apps_api=apps_api, **wait_options)


# ---------------------------------------------------------------- canary: an InferenceGraph Splitter
#
# Why a Splitter: on KServe 0.21 in Standard mode (no Knative), an InferenceService's
# canaryTrafficPercent does nothing (it needs Knative revisions) and spec.canary needs Gateway API
# HTTPRoutes; an InferenceGraph with a Splitter root node is served by KServe's own router
# Deployment and needs neither. One InferenceService per version (the champion keeps the
# service's name; the challenger gets ``challenger_service_name``), the graph ``<service>-router``
# weighs them. Standard mode keeps no revisions: a rollback re-applies the champion's spec, here
# the graph's weights back to 100 % champion (the champion's InferenceService never changed).

IG_GROUP, IG_API_VERSION, IG_PLURAL = "serving.kserve.io", "v1alpha1", "inferencegraphs"
PREDICT_ROUTE = "/v1/models/onnx-model:predict"


def challenger_service_name(service_name: str, model_version: str) -> str:
    """The InferenceService of a challenger version (``<service>-c-<hash of the version>``)."""
    digest = hashlib.sha1(model_version.encode()).hexdigest()[:8]
    return kubernetes_name(service_name, "c", digest)


def router_name(service_name: str) -> str:
    """The InferenceGraph that splits traffic between champion and challenger."""
    return kubernetes_name(service_name, "router")


def predictor_service_url(isvc_name: str, namespace: str, path: str = PREDICT_ROUTE) -> str:
    """The in-cluster URL of an InferenceService's predictor (Standard mode: ``<isvc>-predictor`` Service, port 80)."""
    return f"http://{isvc_name}-predictor.{namespace}.svc.cluster.local{path}"


def inference_graph(
    name: str, namespace: str, champion_isvc: str, challenger_isvc: str = "", challenger_percent: int = 0,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A ``serving.kserve.io/v1alpha1`` InferenceGraph whose root Splitter weighs champion and challenger.

    The router posts each request to one step's ``serviceUrl`` as it came (the predictor's v1
    predict route); the weights of a Splitter are percentages and sum to 100.
    """
    percent = int(challenger_percent)
    if not 0 <= percent <= 100 or (percent and not challenger_isvc):
        raise ValueError(f"challenger share {challenger_percent!r} must be 0..100, with a challenger service for > 0")
    steps = [{"name": "champion", "serviceUrl": predictor_service_url(champion_isvc, namespace), "weight": 100 - percent}]
    if challenger_isvc and percent:
        steps.append({"name": "challenger", "serviceUrl": predictor_service_url(challenger_isvc, namespace),
                      "weight": percent})
    return {
        "apiVersion": f"{IG_GROUP}/{IG_API_VERSION}",
        "kind": "InferenceGraph",
        "metadata": {
            "name": name, "namespace": namespace,
            "labels": {**project_labels("router"), **(labels or {})},
            "annotations": {DEPLOYMENT_MODE_ANNOTATION: DEPLOYMENT_MODE},
        },
        "spec": {"nodes": {"root": {"routerType": "Splitter", "steps": steps}}},
    }


def apply_inference_graph(api: Any, body: dict[str, Any], log: logging.Logger = _log) -> None:
    """Create the InferenceGraph, or replace its spec (a merge patch replaces the steps list whole)."""
    namespace, name = _name_of(body)
    ref = (IG_GROUP, IG_API_VERSION, namespace, IG_PLURAL)
    try:
        api.get_namespaced_custom_object(*ref, name)
    except ApiException as err:
        if err.status != 404:
            raise
        api.create_namespaced_custom_object(*ref, body)
        log.info("InferenceGraph %s/%s created", namespace, name)
        return
    api.patch_namespaced_custom_object(*ref, name, {"metadata": {"labels": body["metadata"]["labels"]}, "spec": body["spec"]})
    weights = {s["name"]: s["weight"] for s in body["spec"]["nodes"]["root"]["steps"]}
    log.info("InferenceGraph %s/%s weights %s", namespace, name, weights)


_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text exposition → {(sample name, labels): value} (comments skipped)."""
    samples: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = frozenset(_LABEL.findall(match.group("labels") or ""))
            samples[(match.group("name"), labels)] = float(match.group("value"))
    return samples


def _series(samples: Mapping[tuple[str, frozenset], float], name: str, **labels: str) -> dict[frozenset, float]:
    want = set(labels.items())
    return {key[1]: value for key, value in samples.items() if key[0] == name and want <= set(key[1])}


def _delta(before: Mapping, after: Mapping, name: str, **labels: str) -> dict[frozenset, float]:
    old = _series(before, name, **labels)
    return {key: value - old.get(key, 0.0) for key, value in _series(after, name, **labels).items()}


def _buckets(before: Mapping, after: Mapping, name: str, version: str) -> list[tuple[float, float]]:
    """(upper bound, cumulative count during the step) of a histogram, ascending."""
    out = []
    for key, count in _delta(before, after, f"{name}_bucket", model_version=version).items():
        upper = dict(key)["le"]
        out.append((float("inf") if upper == "+Inf" else float(upper), count))
    return sorted(out)


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The upper bound of the first bucket holding the q-quantile (what a bucketed p99 can say)."""
    total = buckets[-1][1] if buckets else 0.0
    for upper, cumulative in buckets:
        if total and cumulative >= q * total:
            return upper
    return float("nan")


def binned_distance(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Wasserstein-1 distance of two score histograms on the same [0, 1] bucket bounds."""
    if not a or not b or not a[-1][1] or not b[-1][1]:
        return float("nan")
    distance, lower = 0.0, 0.0
    for (upper, ca), (_, cb) in zip(a, b):
        if upper == float("inf"):
            break
        distance += abs(ca / a[-1][1] - cb / b[-1][1]) * (upper - lower)
        lower = upper
    return distance


def step_stats_from_metrics(before: Mapping[str, Mapping], after: Mapping[str, Mapping], champion: str,
                            challenger: str, percent: int, seconds: float) -> Any:
    """A canary step's figures from the two predictors' ``/metrics`` before and after it.

    ``before``/``after`` map "champion"/"challenger" to ``parse_metrics`` output. Each predictor
    counts its own requests and errors (``fraud_model_requests_total``), times its scoring
    (``fraud_model_scoring_seconds``) and histograms its scores (``fraud_model_score``); the
    router sends them the same traffic at random, so their score histograms are comparable.
    """
    from fraud_common.registry.rollout import StepStats, VersionStats

    def version_stats(side: str, version: str) -> VersionStats:
        counts = _delta(before[side], after[side], "fraud_model_requests_total", model_version=version)
        requests = int(sum(counts.values()))
        errors = int(sum(v for k, v in counts.items() if ("outcome", "error") in k))
        p99 = histogram_quantile(_buckets(before[side], after[side], "fraud_model_scoring_seconds", version), 0.99)
        return VersionStats(requests, errors, 0.0 if p99 != p99 else p99 * 1000)

    distance = binned_distance(_buckets(before["challenger"], after["challenger"], "fraud_model_score", challenger),
                               _buckets(before["champion"], after["champion"], "fraud_model_score", champion))
    return StepStats(percent=percent, seconds=seconds, champion=version_stats("champion", champion),
                     challenger=version_stats("challenger", challenger), score_distance=distance)


def scrape(url: str, timeout: float = 10.0) -> str:
    """A predictor's ``/metrics`` text."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode()


def run_graph_canary(
    api: Any, namespace: str, service_name: str, champion: tuple[str, str], challenger: tuple[str, str],
    policy: Any, read_metrics: Callable[[str], str] = scrape, sleep: Sleep = time.sleep, clock: Clock = time.monotonic,
    log: logging.Logger = _log,
) -> tuple[bool, list[Any]]:
    """Step the router's weights to the challenger; back to 100 % champion on the first failed check.

    ``champion``/``challenger``: (InferenceService name, model version). Returns (all passed,
    the ``StepResult`` of each step); the caller records them and moves the registry's aliases.
    """
    from fraud_common.registry.rollout import check_step

    graph = router_name(service_name)
    urls = {side: predictor_service_url(isvc, namespace, "/metrics")
            for side, (isvc, _) in (("champion", champion), ("challenger", challenger))}
    results = []
    for percent in policy.steps:
        apply_inference_graph(api, inference_graph(graph, namespace, champion[0], challenger[0], percent), log)
        before = {side: parse_metrics(read_metrics(url)) for side, url in urls.items()}
        started = clock()
        while True:
            sleep(max(policy.step_seconds, 1.0))
            after = {side: parse_metrics(read_metrics(url)) for side, url in urls.items()}
            stats = step_stats_from_metrics(before, after, champion[1], challenger[1], percent, clock() - started)
            if stats.challenger.requests >= policy.min_requests or clock() - started >= policy.step_timeout_seconds:
                break
        result = check_step(stats, policy)
        results.append(result)
        log.info("canary step %d %%: %s", percent, "passed" if result.passed else result.reason)
        if not result.passed:
            # Standard mode keeps no revisions: re-apply the champion-only graph.
            apply_inference_graph(api, inference_graph(graph, namespace, champion[0]), log)
            return False, results
    return True, results


def finish_graph_canary(namespace: str, service_name: str, canary_service: str, api: Any = None,
                        log: logging.Logger = _log) -> None:
    """After the promoted version rolled out under the service's name: 100 % on it, the canary's service deleted."""
    if api is None:
        api, _ = kubernetes_apis()
    apply_inference_graph(api, inference_graph(router_name(service_name), namespace, service_name), log)
    try:
        api.delete_namespaced_custom_object(KSERVE_GROUP, KSERVE_API_VERSION, namespace, KSERVE_PLURAL, canary_service)
    except ApiException as err:
        if err.status != 404:
            raise
