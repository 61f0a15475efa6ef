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
DEV_ENV_FILES = {"s3-credentials.dev.env", "registry.dev.env"}
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
    for ns in (k8s.NAMESPACE, "kubeflow"):
        _find(kind_objs, "ConfigMap", k8s.CONFIG_MAP, ns)
        _find(kind_objs, "Secret", k8s.S3_SECRET, ns)
        _find(kind_objs, "Secret", k8s.REGISTRY_SECRET, ns)
        _find(kind_objs, "ServiceAccount", k8s.PIPELINE_SERVICE_ACCOUNT, ns)
    for objs in (kind_objs, dspa_objs):
        _find(objs, "Namespace", k8s.NAMESPACE)
        _find(objs, "ServiceAccount", k8s.SPARK_SERVICE_ACCOUNT, k8s.NAMESPACE)
        _find(objs, "ServiceAccount", k8s.PREDICTOR_SERVICE_ACCOUNT, k8s.NAMESPACE)
        _find(objs, "ConfigMap", k8s.CONFIG_MAP, k8s.NAMESPACE)
    # OpenShift: steps run in the project namespace; no copy in `kubeflow`.
    assert all(o["metadata"].get("namespace") in (None, k8s.NAMESPACE) for o in dspa_objs)


def test_config_map_holds_only_known_settings(rendered) -> None:
    known = set(Settings.from_env({}).to_env())
    for folder, obj in _all(rendered):
        if obj["kind"] != "ConfigMap":
            continue
        data = obj["data"]
        unknown = set(data) - known
        assert not unknown, f"{folder}: ConfigMap keys no setting reads: {sorted(unknown)}"
        assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "FRAUD_REGISTRY_TOKEN"} & set(data)
        # The values must be accepted by the settings parser.
        settings = Settings.from_env(data)
        assert settings.registry_backend == "kubeflow"
        assert settings.data_uri.startswith("s3://") and settings.models_uri.startswith("s3://")


def test_rbac_is_namespaced_and_least_privilege(rendered) -> None:
    verbs = ["create", "get", "list", "watch", "patch", "delete"]
    for folder, objs in rendered.items():
        kinds = {o["kind"] for o in objs}
        assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, f"{folder}: cluster-wide RBAC"
        role = _find(objs, "Role", k8s.PIPELINE_SERVICE_ACCOUNT, k8s.NAMESPACE)
        grants = {(g, r): sorted(rule["verbs"]) for rule in role["rules"]
                  for g in rule["apiGroups"] for r in rule["resources"]}
        assert grants == {
            ("sparkoperator.k8s.io", "sparkapplications"): sorted(verbs),
            ("serving.kserve.io", "inferenceservices"): sorted(verbs),
            ("", "pods"): ["get"],
            ("", "pods/log"): ["get"],
        }
        spark = _find(objs, "Role", k8s.SPARK_SERVICE_ACCOUNT, k8s.NAMESPACE)
        spark_resources = {r for rule in spark["rules"] for r in rule["resources"]}
        assert spark_resources == {"pods", "services", "configmaps", "persistentvolumeclaims"}
        assert all(rule["apiGroups"] == [""] and "*" not in rule["verbs"] for rule in spark["rules"])
        for binding in (o for o in objs if o["kind"] == "RoleBinding"):
            assert binding["metadata"]["namespace"] == k8s.NAMESPACE
            assert binding["roleRef"]["kind"] == "Role"
            assert all(s["kind"] == "ServiceAccount" for s in binding["subjects"])
    kfp_binding = _find(rendered["manifests"], "RoleBinding", "fraud-detection-pipeline-kfp-runner", k8s.NAMESPACE)
    assert kfp_binding["subjects"] == [
        {"kind": "ServiceAccount", "name": k8s.PIPELINE_SERVICE_ACCOUNT, "namespace": "kubeflow"}
    ]


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


def test_no_credential_literal_outside_the_dev_env_files() -> None:
    secrets = {v for v in _dev_defaults().values() if len(v) >= 6}
    assert secrets, "the dev env files should define the S3 keys"
    suspects = []
    for folder in ("manifests", "dspa", "pipeline", "data_preparation", "rest_predictor"):
        for path in (REPO_ROOT / folder).rglob("*"):
            if path.is_file() and path.name not in DEV_ENV_FILES and path.suffix in {".yaml", ".yml", ".py", ".sh", ".env", ""}:
                text = path.read_text(errors="ignore")
                suspects += [f"{path.relative_to(REPO_ROOT)}: {s}" for s in secrets if s in text]
    for script in SCRIPTS:
        suspects += [f"{script.name}: {s}" for s in secrets if s in script.read_text()]
    assert suspects == []


# ---------------------------------------------------------------- scripts

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_scripts_pass_bash_n_and_shellcheck(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is required (Debian: apt-get install shellcheck; .ci/run installs it)"
    lint = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True, text=True)
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


def test_setup_pins_every_version() -> None:
    text = (REPO_ROOT / "setup.sh").read_text()
    for var in ("KIND_NODE_IMAGE", "KFP_VERSION", "CERT_MANAGER_VERSION", "KSERVE_VERSION",
                "MODEL_REGISTRY_VERSION", "SPARK_OPERATOR_CHART_VERSION"):
        match = re.search(rf'^{var}="([^"]+)"', text, flags=re.M)
        assert match and re.search(r"\d+\.\d+\.\d+$", match.group(1)), f"{var} is not pinned to an exact version"
    assert "--set \"spark.jobNamespaces={${NAMESPACE}}\"" in text
    assert "deploymentMode=RawDeployment" in text
    # Every kubectl wait is bounded.
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "kubectl wait --timeout=" in code and not re.search(r"kubectl wait(?! --timeout)", code)
