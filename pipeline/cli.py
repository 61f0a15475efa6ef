"""The ``fraud-detection`` command: every lifecycle stage from one entry point.

    fraud-detection generate   synthetic raw CSVs (local folder or s3://)
    fraud-detection prepare    Spark data preparation (local[*])
    fraud-detection run        the whole pipeline with kfp.local, then a live predictor
    fraud-detection serve      the predictor alone, on what is registered
    fraud-detection compile    the Kubeflow pipeline's YAML

Step packages are imported lazily, so each subcommand only loads what it needs.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import ModuleType

from fraud_common import storage
from fraud_common.logs import get_logger, setup_logging
from fraud_common.settings import Settings, SettingsError, pipeline_parameters

log = get_logger("fraud-detection")
PIPELINE_FILE = Path(__file__).with_name("fraud-detection-e2e.py")
COMPILED_PIPELINE = PIPELINE_FILE.with_suffix(".yaml")


def load_pipeline_module() -> ModuleType:
    """Import ``pipeline/fraud-detection-e2e.py`` (its file name is not a module name)."""
    spec = importlib.util.spec_from_file_location("pipeline.fraud_detection_e2e", PIPELINE_FILE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, with the command line's overrides applied."""
    env = dict(os.environ)
    if getattr(args, "home", None):
        env["FRAUD_HOME"] = str(args.home)
        env.pop("FRAUD_DATA_URI", None)
    if getattr(args, "port", None):
        env["FRAUD_SERVE_PORT"] = str(args.port)
    return Settings.from_env(env)


def cmd_generate(args: argparse.Namespace) -> int:
    """Write synthetic raw CSVs to a local folder or an s3:// prefix."""
    from synthetic_data_generation.generate import generate

    settings = _settings(args)
    out = args.out or settings.raw_uri
    if not storage.is_s3(out):
        report = generate(Path(out), users=args.users, seed=args.seed, progress=not args.no_progress)
    else:
        with tempfile.TemporaryDirectory(prefix="fraud-generate-") as tmp:
            report = generate(Path(tmp) / "raw", users=args.users, seed=args.seed, progress=not args.no_progress)
            storage.upload(Path(tmp) / "raw", out, settings)
    log.info("generated %s in %s", report.rows, out)
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Run Spark data preparation in local mode."""
    from data_preparation.main import ValidationError, prepare

    settings = _settings(args)
    try:
        report = prepare(args.input or settings.raw_uri, args.output or settings.prepared_uri, settings)
    except ValidationError as err:
        log.error("%s", err)
        return 2
    log.info("prepared %s", report)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile the pipeline to YAML."""
    module = load_pipeline_module()
    print(module.compile_pipeline(Path(args.output)))
    return 0


def latest_run(settings: Settings) -> Path | None:
    """The folder of the newest local pipeline run, if any."""
    runs = sorted((settings.home / "runs").glob("fraud-detection-e2e-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def run_artifact_uri(run_dir: Path, step: str, name: str) -> str:
    """The URI of output artifact ``name`` of ``step`` in a local run (from executor_output.json)."""
    import json

    output = json.loads((run_dir / step / "executor_output.json").read_text())
    return output["artifacts"][name]["artifacts"][0]["uri"]


def example_user(settings: Settings) -> str:
    """A real user id with served features: the first user of the test split of the latest run."""
    import pyarrow.dataset as ds

    from fraud_common.schemas import ENTITIES_DIR, ENTITY_KEY, SET_COLUMN

    run = latest_run(settings)
    prepared = run_artifact_uri(run, "prepare-data", "prepared") if run else settings.prepared_uri
    if not storage.exists(storage.join(prepared, ENTITIES_DIR), settings):
        return "user_0"
    with storage.local_copy(storage.join(prepared, ENTITIES_DIR), settings) as path:
        table = ds.dataset(str(path), format="parquet").to_table(
            columns=[ENTITY_KEY], filter=ds.field(SET_COLUMN) == "test"
        )
    return str(table.column(ENTITY_KEY)[0]) if table.num_rows else "user_0"


def curl_line(settings: Settings, user: str) -> str:
    """The command a user pastes to get a prediction."""
    host = "localhost" if settings.serve_host in ("127.0.0.1", "0.0.0.0") else settings.serve_host
    return (
        f"curl -X POST {host}:{settings.serve_port}/v1/models/onnx-model:predict "
        f"-H 'Content-Type: application/json' -d '{{\"user_id\": \"{user}\"}}'"
    )


STEP_ORDER = ("prepare-data", "feature-engineering", "retrieve-features", "train-model", "register-model", "serve")


def step_durations(run_dir: Path) -> dict[str, float]:
    """Each step's own duration, read from the metadata its output artifacts recorded."""
    import json

    durations: dict[str, float] = {}
    for step in STEP_ORDER:
        output = run_dir / step / "executor_output.json"
        if not output.is_file():
            continue
        artifacts = json.loads(output.read_text()).get("artifacts", {})
        for entry in artifacts.values():
            for artifact in entry.get("artifacts", []):
                if "duration_seconds" in artifact.get("metadata", {}):
                    durations[step] = float(artifact["metadata"]["duration_seconds"])
    return durations


def print_run_summary(settings: Settings, seconds: float) -> None:
    """What the run did: each step's duration, where the evaluation is, what was registered."""
    from fraud_common.registry import open_registry

    run = latest_run(settings)
    version = open_registry(settings).get_version(settings.model_name)
    metrics = version.metadata.get("metrics", {})
    lines = [f"\nPipeline finished in {seconds:.0f}s (each step's own time; the rest is process start-up):"]
    if run:
        lines += [f"  {step:<20} {took:7.1f}s" for step, took in step_durations(run).items()]
        lines.append(f"Evaluation (metrics.json, curves.png): {run / 'train-model' / 'evaluation'}")
    lines.append(
        f"Registered {version.model_name} version {version.version}: test ROC-AUC "
        f"{metrics.get('roc_auc', float('nan')):.4f}, PR-AUC {metrics.get('pr_auc', float('nan')):.4f}, "
        f"threshold {version.threshold:.3f}"
    )
    print("\n".join(lines), flush=True)


def run_pipeline_locally(settings: Settings) -> float:
    """Execute the @dsl.pipeline with kfp.local's SubprocessRunner; returns seconds taken."""
    from kfp import local

    # The step images are ours and this venv holds every step's dependencies: nothing to warn about.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task", category=RuntimeWarning)
    # Steps run in subprocesses of this venv and read their settings from the environment.
    os.environ.update(settings.to_env())
    runs = settings.home / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(runs), raise_on_error=True)
    module = load_pipeline_module()
    started = time.monotonic()
    # Every pipeline parameter is a setting of the same name: this machine's values.
    parameters = {name: getattr(settings, name) for name in pipeline_parameters()}
    module.fraud_detection_pipeline(**parameters, platform="local")
    return time.monotonic() - started


def cmd_run(args: argparse.Namespace) -> int:
    """Generate data if needed, run the pipeline locally, then serve the new model."""
    settings = _settings(args)
    if args.platform == "docker":  # every step in its image: pipeline/docker.py
        from pipeline.docker import DockerPlatformError, run_in_images

        try:
            run_in_images(settings, users=args.users, seed=args.seed, serve_forever=not args.no_serve)
        except (DockerPlatformError, RuntimeError) as err:
            log.error("%s", _plain(str(err)))
            return 1
        return 0
    started = time.monotonic()
    raw_train = storage.join(settings.raw_uri, "train.csv")
    if not storage.exists(raw_train, settings):
        log.info("no data at %s: generating %d users", settings.raw_uri, args.users)
        args.out = None
        cmd_generate(args)
    try:
        seconds = run_pipeline_locally(settings)
    except RuntimeError as err:  # kfp.local: a task failed; its own log above says why
        log.error("%s (the failing step's log is above)", _plain(str(err)))
        return 1
    print_run_summary(settings, seconds)
    if args.no_serve:
        return 0
    return _serve(settings, started)


def _plain(text: str) -> str:
    """Text without terminal colour codes (kfp.local colours task names)."""
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _serve(settings: Settings, started: float | None = None) -> int:
    """Start the predictor on localhost and print a curl line once it is ready."""
    from rest_predictor.errors import PredictorLoadError
    from rest_predictor.predictor import serve

    user = example_user(settings)

    def announce() -> None:
        took = f" ({time.monotonic() - started:.0f}s after start)" if started else ""
        print(f"\nPredictor ready on port {settings.serve_port}{took}. Try:\n  {curl_line(settings, user)}\n", flush=True)

    try:
        serve(settings, on_ready=announce)
    except PredictorLoadError as err:
        log.error("predictor not ready: %s", err)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the registered model (newest that passed the gate, or --version)."""
    settings = _settings(args)
    if args.version:
        settings = settings.with_overrides(serve_model_version=args.version)
    return _serve(settings)


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    from synthetic_data_generation.generate import DEFAULT_USERS

    parser = argparse.ArgumentParser(prog="fraud-detection", description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, help="local state folder (default: $FRAUD_HOME or ./.fraud-detection)")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write synthetic raw CSVs")
    gen.add_argument("--users", type=int, default=DEFAULT_USERS, help=f"label rows / users (default {DEFAULT_USERS:,})")
    gen.add_argument("--out", help="local folder or s3://bucket/prefix (default: <data root>/raw)")
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--no-progress", action="store_true")
    gen.set_defaults(func=cmd_generate)

    prep = sub.add_parser("prepare", help="Spark data preparation")
    prep.add_argument("--input", help="raw data folder or s3:// URI (default: <data root>/raw)")
    prep.add_argument("--output", help="prepared data folder or s3:// URI (default: <data root>/prepared)")
    prep.set_defaults(func=cmd_prepare)

    run = sub.add_parser("run", help="the whole lifecycle on this machine, then serve")
    run.add_argument("--users", type=int, default=DEFAULT_USERS, help="size of generated data if none exists")
    run.add_argument("--seed", type=int, default=42)
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--no-serve", action="store_true", help="stop after registration")
    run.add_argument("--port", type=int, help="predictor port (default 8081)")
    run.add_argument("--platform", choices=("local", "docker"), default="local",
                     help="local: steps in this venv (default); docker: each step in its image (kfp.local DockerRunner)")
    run.set_defaults(func=cmd_run)

    srv = sub.add_parser("serve", help="serve the registered model")
    srv.add_argument("--version", help="model version (default: newest that passed the gate)")
    srv.add_argument("--port", type=int, help="predictor port (default 8081)")
    srv.set_defaults(func=cmd_serve)

    comp = sub.add_parser("compile", help="compile the Kubeflow pipeline to YAML")
    comp.add_argument("--output", default=str(COMPILED_PIPELINE))
    comp.set_defaults(func=cmd_compile)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fraud-detection`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except SettingsError as err:
        print(f"fraud-detection: {err}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
