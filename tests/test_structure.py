"""The repository's seams: one settings object everywhere, steps that never import each other,
no test-only code in a product package.

Import rule: a step package (and ``fraud_common``) imports only the standard library, third-party
packages, ``fraud_common`` and itself. ``pipeline`` is the orchestrator: at module level it
imports the same; a step package only inside a function body (a KFP component, which runs in
that step's image, or a CLI subcommand that runs that step on this machine).
"""

from __future__ import annotations

import ast
import inspect
import re
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from fraud_common import settings as settings_module
from fraud_common.settings import (
    CONFIG,
    CONFIG_MAP,
    LOCAL,
    ONLINE_STORE_SECRET,
    REGISTRY_SECRET,
    S3_SECRET,
    Settings,
    default_of,
    env_names,
    pipeline_parameters,
    read_env_file,
)
from pipeline import cli

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "manifests" / "config"
STEP_PACKAGES = (
    "synthetic_data_generation",
    "data_preparation",
    "feature_engineering",
    "train",
    "rest_predictor",
    "monitoring",
    "pipeline",
)
SHARED = "fraud_common"
PRODUCT_PACKAGES = (*STEP_PACKAGES, SHARED)
# Parameters of the pipeline that are not settings: how the pipeline is executed.
EXECUTION_PARAMETERS = {"platform"}


# ---------------------------------------------------------------- one settings object


def _kustomization() -> dict:
    return yaml.safe_load((CONFIG_DIR / "kustomization.yaml").read_text())


def _generated_env_files() -> dict[str, list[Path]]:
    """Name of each generated ConfigMap/Secret -> its env files (manifests/config)."""
    kustomization = _kustomization()
    generators = kustomization.get("configMapGenerator", []) + kustomization.get("secretGenerator", [])
    return {g["name"]: [CONFIG_DIR / e for e in g["envs"]] for g in generators}


def test_manifests_generate_the_objects_the_settings_name() -> None:
    kustomization = _kustomization()
    assert [g["name"] for g in kustomization["configMapGenerator"]] == [CONFIG_MAP]
    # The S3 Secret is created by setup.sh with generated keys (test below), not from a file.
    assert {g["name"] for g in kustomization["secretGenerator"]} == {REGISTRY_SECRET}
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True  # fixed names


@pytest.mark.parametrize("source", [CONFIG, S3_SECRET, REGISTRY_SECRET])
def test_each_env_file_holds_exactly_the_settings_of_its_object(source: str) -> None:
    name = CONFIG_MAP if source == CONFIG else source
    in_files: set[str] = set()
    if source == S3_SECRET:  # setup.sh's ensure_s3_secret: `--from-literal=KEY=...`
        in_files = set(re.findall(r"--from-literal=([A-Z_]+)=", (REPO / "setup.sh").read_text()))
    for path in _generated_env_files().get(name, []):
        in_files |= set(read_env_file(path))
    declared = set(env_names(source))
    assert not in_files - declared, f"{name}: keys no setting declares with source {source!r}: {sorted(in_files - declared)}"
    assert not declared - in_files, f"{name}: settings missing from its env file: {sorted(declared - in_files)}"


def test_overlay_config_maps_only_override_known_settings() -> None:
    for path in REPO.glob("*/settings*.env"):
        unknown = set(read_env_file(path)) - set(env_names(CONFIG))
        assert not unknown, f"{path.relative_to(REPO)}: {sorted(unknown)} are not ConfigMap settings"


def test_cluster_settings_parse_and_round_trip() -> None:
    values = read_env_file(CONFIG_DIR / "settings.env")
    cluster = Settings.from_env(values).to_env()
    assert {key: cluster[key] for key in values} == values


def test_every_setting_declares_its_variable_and_source_once() -> None:
    names = env_names()
    assert len(names) == len(set(names)), "two settings read the same variable"
    assert set(Settings.from_env({}).to_env()) == set(names)
    for spec in fields(Settings):
        assert spec.metadata["source"] in settings_module.SOURCES, spec.name
        if spec.metadata["source"] in (S3_SECRET, REGISTRY_SECRET):
            assert not spec.metadata["parameter"], f"{spec.name}: a credential cannot be a pipeline parameter"


def _pipeline_signature() -> inspect.Signature:
    return inspect.signature(cli.load_pipeline_module().fraud_detection_pipeline.pipeline_func)


def test_pipeline_parameters_are_the_settings_marked_parameter() -> None:
    parameters = set(_pipeline_signature().parameters) - EXECUTION_PARAMETERS
    marked = set(pipeline_parameters())
    assert not parameters - marked, f"pipeline parameters that are not settings: {sorted(parameters - marked)}"
    assert not marked - parameters, f"settings marked parameter the pipeline lacks: {sorted(marked - parameters)}"


def test_pipeline_parameter_defaults_are_the_cluster_settings() -> None:
    cluster_env = read_env_file(CONFIG_DIR / "settings.env")
    cluster = Settings.from_env(cluster_env)
    for name, parameter in _pipeline_signature().parameters.items():
        if name in EXECUTION_PARAMETERS:
            continue
        spec = next(f for f in fields(Settings) if f.name == name)
        if spec.metadata["source"] == CONFIG:
            assert parameter.default == getattr(cluster, name), f"{name}: pipeline default != settings.env"
        else:
            assert spec.metadata["source"] == LOCAL
            assert parameter.default == getattr(Settings.from_env({}), name), name


def test_compiled_pipeline_reads_the_config_map_and_secrets_the_settings_name() -> None:
    docs = list(yaml.safe_load_all(cli.COMPILED_PIPELINE.read_text()))
    inputs = set(docs[0]["root"]["inputDefinitions"]["parameters"])
    assert inputs - EXECUTION_PARAMETERS == set(pipeline_parameters())
    for name, executor in docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
        (config_map,) = executor["configMapAsEnv"]
        assert config_map["configMapName"] == CONFIG_MAP
        assert {k["configMapKey"] for k in config_map["keyToEnv"]} == set(env_names(CONFIG)), name
        secrets = {s["secretName"]: {k["secretKey"] for k in s["keyToEnv"]} for s in executor["secretAsEnv"]}
        assert secrets[S3_SECRET] == set(env_names(S3_SECRET)), name
        assert set(secrets) <= {S3_SECRET, REGISTRY_SECRET, ONLINE_STORE_SECRET}
        if REGISTRY_SECRET in secrets:
            assert secrets[REGISTRY_SECRET] == set(env_names(REGISTRY_SECRET)), name


def test_image_names_and_training_knobs_come_from_the_settings() -> None:
    from pipeline import images
    from train.train import TrainConfig

    defaults = Settings.from_env({})
    assert images.image("data-preparation") == defaults.spark_image
    assert images.image("rest-predictor") == defaults.predictor_image
    assert (images.REGISTRY, images.TAG) == (default_of("image_registry"), default_of("image_tag"))
    # TrainConfig keeps the model's design; the per-run knobs are settings with the same defaults.
    assert TrainConfig().max_epochs == default_of("train_max_epochs")
    assert TrainConfig().seed == default_of("train_seed")


def test_only_the_settings_module_reads_the_environment() -> None:
    readers = []
    for path in _product_files():
        text = path.read_text()
        if ("os.environ" in text or "os.getenv" in text) and path.name != "settings.py":
            readers.append(str(path.relative_to(REPO)))
    # The CLI hands the settings to kfp.local's subprocesses through the environment. Two tools'
    # own variables are not settings: data preparation points the JVM at a Java (JAVA_HOME), the
    # docker platform finds the Docker API (DOCKER_HOST).
    assert sorted(readers) == ["data_preparation/main.py", "pipeline/cli.py", "pipeline/docker.py"]


# ---------------------------------------------------------------- imports between packages


def _product_files() -> list[Path]:
    return sorted(p for package in PRODUCT_PACKAGES for p in (REPO / package).rglob("*.py"))


def _imports(tree: ast.AST) -> list[tuple[str, bool, int]]:
    """(imported top-level name, inside a function body, line) for every import in ``tree``."""
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], in_function, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], in_function, child.lineno))
            visit(child, nested)

    visit(tree, False)
    return found


def import_violations(source: str, package: str, siblings: set[str] = frozenset(), where: str = "") -> list[str]:
    """Imports in ``source`` (a module of ``package``) that break the rule in this module's docstring.

    ``siblings``: names of the modules beside it (a plain-folder import, as spark-submit runs
    data_preparation/main.py, is the package's own module).
    """
    problems = []
    for name, in_function, line in _imports(ast.parse(source)):
        if name in (package, SHARED) or name not in PRODUCT_PACKAGES or name in siblings:
            continue
        if package == "pipeline" and in_function:
            continue
        problems.append(f"{where}:{line} imports {name}")
    return problems


def test_step_packages_import_only_the_shared_package() -> None:
    problems = []
    for package in PRODUCT_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            siblings = {p.stem for p in path.parent.glob("*.py")}
            problems += import_violations(path.read_text(), package, siblings, str(path.relative_to(REPO)))
    assert problems == []


@pytest.mark.parametrize(
    ("package", "source", "broken"),
    [
        ("train", "import os\nfrom fraud_common import schemas\nfrom feature_engineering import x\n", True),
        ("train", "def f():\n    import rest_predictor.predictor\n", True),  # lazy is no excuse in a step
        ("fraud_common", "from train.train import TrainConfig\n", True),
        ("pipeline", "from train.train import run_training\n", True),  # module level in the orchestrator
        ("pipeline", "def component():\n    from train.train import run_training\n", False),
        ("rest_predictor", "import numpy\nfrom rest_predictor.errors import X\n", False),
    ],
)
def test_the_import_rule_itself(package: str, source: str, broken: bool) -> None:
    assert bool(import_violations(source, package)) is broken


# ---------------------------------------------------------------- nothing test-only in a product package


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _entry_points() -> set[str]:
    """Modules something outside Python starts: ``__main__`` guards, console scripts, the Feast CLI's repo."""
    roots = {"feature_engineering.feature_repo.repo_definition"}
    for path in _product_files():
        if '__name__ == "__main__"' in path.read_text() or path.name == "__init__.py":
            roots.add(_module_name(path))
    for pyproject in REPO.glob("*/pyproject.toml"):
        scripts = (tomllib.loads(pyproject.read_text()).get("project") or {}).get("scripts") or {}
        roots |= {target.split(":")[0] for target in scripts.values()}
    return roots


def unreachable_product_modules() -> list[str]:
    """Product modules no entry point imports (directly or through others): test-only or dead code."""
    modules = {_module_name(p): p for p in _product_files()}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets.add(node.module)
                targets |= {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        edges[name] = {t for t in targets if t in modules}
    seen, todo = set(), [m for m in _entry_points() if m in modules]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += edges[current]
    return sorted(set(modules) - seen)


def test_no_product_package_contains_test_only_modules() -> None:
    assert unreachable_product_modules() == []
