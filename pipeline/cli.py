"""The ``fraud-detection`` command: every lifecycle stage from one entry point.

    fraud-detection generate   synthetic raw CSVs (local folder or s3://)
    fraud-detection prepare    Spark data preparation (local[*])
    fraud-detection run        the whole pipeline with kfp.local, then a live predictor
    fraud-detection serve      the predictor alone, on what is registered
    fraud-detection compile    the Kubeflow pipeline's YAML

Commands print one line per step; each step's full output goes to
``$FRAUD_HOME/logs/<run id>/<step>.log``. ``--verbose`` shows everything and adds tracebacks.
A mistake (bad option, missing data, unreachable storage or registry, busy port) ends with one
line on stderr saying what was wrong and what to do. Step packages are imported lazily, so each
subcommand only loads what it needs.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from fraud_common import storage
from fraud_common.logs import get_logger, setup_logging
from fraud_common.settings import Settings, SettingsError, pipeline_parameters
from pipeline.console import Console, StepFailed, new_run_dir

log = get_logger("fraud-detection")
PROG = "fraud-detection"
PIPELINE_FILE = Path(__file__).with_name("fraud-detection-e2e.py")
COMPILED_PIPELINE = PIPELINE_FILE.with_suffix(".yaml")
MIN_USERS = 10  # one label row per split file at 80/10/10 (the generator's own minimum)
# The generator's manifest beside the CSVs it wrote (users, seed, label time): data without it
# is the user's own and is never replaced.
from fraud_common.schemas import RAW_MANIFEST_FILE as GENERATED_MARKER  # noqa: E402


class UserError(Exception):
    """A mistake the user can fix; ``str`` says what was wrong and what to do."""

    exit_code = 2


class EnvironmentProblem(UserError):
    """Something the command needs is missing or unreachable (not a bad option)."""

    exit_code = 1


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


# --- Option values -------------------------------------------------------------------------------


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def user_count(text: str) -> int:
    """``--users``: an integer of at least ``MIN_USERS``."""
    value = _integer(text)
    if value < MIN_USERS:
        raise argparse.ArgumentTypeError(f"{value} is too few: give at least {MIN_USERS} (one user per split at 80/10/10)")
    return value


def seed_value(text: str) -> int:
    """``--seed``: a non-negative integer."""
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: give an integer from 0")
    return value


def port_number(text: str) -> int:
    """``--port``: a TCP port from 1 to 65535."""
    value = _integer(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port: give a number from 1 to 65535")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): what was wrong and where help is."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --- Data -------------------------------------------------------------------------------------


def _label_files() -> list[str]:
    from fraud_common.schemas import SPLIT_FILES

    return [name for _, name in SPLIT_FILES]


def existing_users(settings: Settings, raw_uri: str) -> tuple[int | None, bool]:
    """(users in the raw label files or None if there are none, whether this tool generated them)."""
    marker = storage.join(raw_uri, GENERATED_MARKER)
    if not storage.exists(storage.join(raw_uri, _label_files()[0]), settings):
        return None, False
    if storage.exists(marker, settings):
        with_marker = json.loads(storage.read_bytes(marker, settings))
        return int(with_marker["users"]), True
    users = 0
    for name in _label_files():
        uri = storage.join(raw_uri, name)
        if storage.exists(uri, settings):
            users += max(0, storage.read_bytes(uri, settings).rstrip(b"\n").count(b"\n"))  # lines after the header
    return users, False


def generate_data(out: str, users: int, seed: int, settings: Settings, progress: bool) -> Any:
    """Write synthetic raw CSVs (and the marker naming their size) to a folder or an s3:// prefix."""
    from synthetic_data_generation.generate import generate

    storage.exists(out, settings)  # an unreachable S3 endpoint fails now, not after generating
    if not storage.is_s3(out):
        report = generate(Path(out), users=users, seed=seed, progress=progress)
    else:
        with tempfile.TemporaryDirectory(prefix="fraud-generate-") as tmp:
            report = generate(Path(tmp) / "raw", users=users, seed=seed, progress=progress)
            storage.upload(Path(tmp) / "raw", out, settings)
    return report


def _generation_figure(report: Any) -> str:
    history = report.rows.get("raw_transaction_datasource.csv", 0)
    return f"{report.users:,} users, {history:,} history rows, fraud rate {report.fraud_rate:.2%}"


def cmd_generate(args: argparse.Namespace, console: Console) -> int:
    """Write synthetic raw CSVs to a local folder or an s3:// prefix."""
    settings = _settings(args)
    out = args.out or settings.raw_uri
    with console.step("generate-data") as step:
        report = generate_data(out, args.users, args.seed, settings, progress=console.verbose and not args.no_progress)
        step.figure = _generation_figure(report)
    console.say(f"Raw data in {out}")
    return 0


def _require_raw_data(raw_uri: str, settings: Settings, flag: str) -> None:
    if not storage.exists(storage.join(raw_uri, _label_files()[0]), settings):
        raise EnvironmentProblem(
            f"no raw data at {raw_uri} (train.csv is missing): run `{PROG} generate` first, or pass {flag}"
        )


def cmd_prepare(args: argparse.Namespace, console: Console) -> int:
    """Run Spark data preparation in local mode."""
    settings = _settings(args)
    raw, out = args.input or settings.raw_uri, args.output or settings.prepared_uri
    _require_raw_data(raw, settings, "--input FOLDER")
    with console.step("prepare-data") as step:
        from data_preparation.main import prepare

        report = prepare(raw, out, settings, label_time=args.label_time, allow_no_history=args.allow_no_history)
        dropped = sum(report.dropped_history_rows.values())
        step.figure = f"{_rows_figure(report.rows_per_split)}, {dropped:,} history rows not counted"
    console.say(f"Prepared features in {out}")
    return 0


def cmd_compile(args: argparse.Namespace, console: Console) -> int:
    """Compile the pipeline to YAML, and with the default output the monitoring pipeline too."""
    module = load_pipeline_module()
    console.say(str(module.compile_pipeline(Path(args.output))))
    if Path(args.output) == COMPILED_PIPELINE:
        from pipeline import monitoring_pipeline

        console.say(str(monitoring_pipeline.compile_pipeline()))
    return 0


# --- Run ----------------------------------------------------------------------------------------


def latest_run(settings: Settings) -> Path | None:
    """The folder of the newest local pipeline run, if any."""
    runs = sorted((settings.home / "runs").glob("fraud-detection-e2e-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def run_artifact_uri(run_dir: Path, step: str, name: str) -> str:
    """The URI of output artifact ``name`` of ``step`` in a local run (from executor_output.json)."""
    output = json.loads((run_dir / step / "executor_output.json").read_text())
    return output["artifacts"][name]["artifacts"][0]["uri"]


def example_user(settings: Settings) -> str:
    """A real user id with served features: the first user of the test split of the latest run."""
    import pyarrow.dataset as ds

    from fraud_common.schemas import ENTITIES_DIR, ENTITY_KEY, SET_COLUMN

    try:
        run = latest_run(settings)
        prepared = run_artifact_uri(run, "prepare-data", "prepared") if run else settings.prepared_uri
        with storage.local_copy(storage.join(prepared, ENTITIES_DIR), settings) as path:
            table = ds.dataset(str(path), format="parquet").to_table(
                columns=[ENTITY_KEY], filter=ds.field(SET_COLUMN) == "test"
            )
    except Exception:  # noqa: BLE001 - unreadable here (the predictor reads its own copy): any id shows the call
        return "user_0"
    return str(table.column(ENTITY_KEY)[0]) if table.num_rows else "user_0"


def curl_line(settings: Settings, user: str) -> str:
    """The command a user pastes to get a prediction."""
    host = "localhost" if settings.serve_host in ("127.0.0.1", "0.0.0.0") else settings.serve_host
    return (
        f"curl -X POST {host}:{settings.serve_port}/v1/models/onnx-model:predict "
        f"-H 'Content-Type: application/json' -d '{{\"user_id\": \"{user}\"}}'"
    )


STEP_ORDER = (
    "prepare-data", "feature-engineering", "retrieve-features", "train-model", "register-model",
    "evaluate-against-champion", "canary", "serve",
)


def _rows_figure(rows_per_split: dict[str, Any]) -> str:
    """"N rows (train a, valid b, test c)"; artifact metadata holds numbers as floats."""
    from fraud_common.schemas import SPLITS

    counts = {split: int(count) for split, count in rows_per_split.items()}
    order = sorted(counts, key=lambda split: SPLITS.index(split) if split in SPLITS else len(SPLITS))
    parts = ", ".join(f"{split} {counts[split]:,}" for split in order)
    return f"{sum(counts.values()):,} rows ({parts})"


def step_figure(step: str, outputs: dict[str, Any]) -> str:
    """The key figure of a finished pipeline step, from its output artifacts' metadata."""
    meta = {name: dict(getattr(artifact, "metadata", {}) or {}) for name, artifact in outputs.items()}
    if step == "prepare-data":
        prepared = meta["prepared"]
        text = _rows_figure(prepared.get("rows_by_set") or prepared.get("rows_per_split", {}))
        without = prepared.get("users_without_history")
        return f"{text}, {int(without):,} without history" if without is not None else text
    if step == "feature-engineering":
        return f"{int(meta['feature_store'].get('rows_materialized', 0)):,} rows in the online store"
    if step == "retrieve-features":
        return f"{int(meta['training_set'].get('rows', 0)):,} rows in the training set"
    if step == "train-model":
        roc = meta["model"].get("metrics", {}).get("roc_auc")
        reference = meta.get("metrics", {}).get("reference_roc_auc")
        text = f"test ROC-AUC {roc:.4f}" if roc is not None else "trained"
        return f"{text} (gradient boosting {reference:.4f})" if reference is not None else text
    if step == "register-model":
        registered = meta["registered_model"]
        return f"{registered.get('model_name')} version {registered.get('model_version')}"
    if step == "evaluate-against-champion":
        decision = meta["decision"]
        return f"champion: {decision.get('model_name')} version {decision.get('model_version')}"
    if step == "canary":
        rollout = meta["rollout"]
        if rollout.get("canary_service") or rollout.get("outcome") == "rolled_back":
            return f"{rollout.get('outcome')}: {rollout.get('challenger')}"
        return "no canary (promoted at the gate)" if rollout.get("outcome") == "promoted" else str(rollout.get("outcome", ""))
    if step == "serve":
        return "the champion loads"
    return ""


def run_pipeline_locally(settings: Settings, console: Console) -> float:
    """Execute the @dsl.pipeline with kfp.local's SubprocessRunner; returns seconds taken."""
    from kfp import local

    from pipeline.console import kfp_tasks_as_steps

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
    with kfp_tasks_as_steps(console, step_figure):
        module.fraud_detection_pipeline(**parameters, platform="local")
    return time.monotonic() - started


def ensure_data(args: argparse.Namespace, settings: Settings, console: Console) -> None:
    """Generate the raw data when there is none, or when ``--users`` asks for another size.

    Data of another size is regenerated only if this tool made it (its marker file says so);
    anything else is the user's data and is never overwritten. ``--reuse-data`` keeps any data.
    """
    raw = settings.raw_uri
    users, generated = existing_users(settings, raw)
    wanted = args.users
    if users is not None and (args.reuse_data or wanted is None or wanted == users):
        console.say(f"  = {'data':<20} {0:6.1f}s  reusing {users:,} users in {raw}")
        return
    if users is not None and not generated:
        raise UserError(
            f"{raw} holds data this tool did not generate ({users:,} users); refusing to replace it "
            f"with {wanted:,} users: pass --reuse-data to use it, or move it away"
        )
    with console.step("generate-data") as step:
        from synthetic_data_generation.generate import DEFAULT_USERS

        report = generate_data(raw, wanted or DEFAULT_USERS, args.seed, settings, progress=console.verbose and not args.no_progress)
        replaced = f" (replaced {users:,})" if users is not None else ""
        step.figure = _generation_figure(report) + replaced


def check_port_free(settings: Settings) -> None:
    """Fail before any work when the predictor's port is taken."""
    host = settings.serve_host
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, settings.serve_port))
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                raise EnvironmentProblem(
                    f"port {settings.serve_port} on {host} is in use (or not allowed): stop what listens there, "
                    "or pass --port N (or set FRAUD_SERVE_PORT)"
                ) from err
            raise


def check_registry(settings: Settings) -> None:
    """Fail before any work when the model registry cannot be opened."""
    from fraud_common.registry import open_registry

    open_registry(settings).list_versions(settings.model_name)


def summary_lines(settings: Settings, seconds: float) -> list[str]:
    """What the run produced: the registered version, its test metrics, where the evaluation is."""
    from fraud_common.registry import open_registry

    version = open_registry(settings).get_version(settings.model_name)
    metrics = version.metadata.get("metrics", {})
    run = latest_run(settings)
    lines = [
        f"Pipeline finished in {seconds:.0f}s. Registered {version.model_name} version {version.version}: "
        f"test ROC-AUC {metrics.get('roc_auc', float('nan')):.4f}, PR-AUC {metrics.get('pr_auc', float('nan')):.4f}, "
        f"threshold {version.threshold:.3f}"
    ]
    if run:
        lines.append(f"Evaluation (metrics and plots): {run / 'train-model' / 'evaluation'}")
    return lines


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    """Generate data if needed, run the pipeline locally, then serve the new model."""
    settings = _settings(args)
    started = time.monotonic()
    if not args.no_serve:
        check_port_free(settings)
    if args.platform == "docker":  # every step in its image: pipeline/docker.py
        from pipeline.docker import run_in_images
        from synthetic_data_generation.generate import DEFAULT_USERS

        run_in_images(settings, users=args.users or DEFAULT_USERS, seed=args.seed, serve_forever=not args.no_serve)
        return 0
    check_registry(settings)
    console.say(f"{PROG} run: step logs in {console.log_dir or '(--verbose: shown here)'}")
    ensure_data(args, settings, console)
    seconds = run_pipeline_locally(settings, console)
    for line in summary_lines(settings, seconds):
        console.say(line)
    if args.no_serve:
        return 0
    return _serve(settings, console, started)


def _serve(settings: Settings, console: Console, started: float | None = None) -> int:
    """Start the predictor on localhost and print a curl line once it is ready."""
    from fraud_common.registry import ModelNotFound, open_registry

    check_port_free(settings)
    try:
        version = open_registry(settings).get_version(settings.model_name, settings.serve_model_version or None)
    except ModelNotFound as err:
        raise EnvironmentProblem(
            f"nothing to serve: {err}; run `{PROG} run` first to train and register a model"
        ) from err
    user = example_user(settings)

    def announce() -> None:
        took = f" ({time.monotonic() - started:.0f}s after start)" if started else ""
        console.say(
            f"Predictor for {version.model_name} version {version.version} ready on port {settings.serve_port}{took}. Try:"
        )
        console.say(f"  {curl_line(settings, user)}")

    from rest_predictor.predictor import serve

    with console.capture("predictor") as path:
        if path is not None:
            console.say(f"Starting the predictor (log: {path}); Ctrl-C stops it.")
        serve(settings, on_ready=announce)
    console.say("Predictor stopped.")
    return 0


def cmd_serve(args: argparse.Namespace, console: Console) -> int:
    """Serve the registered model (newest that passed the gate, or --version)."""
    settings = _settings(args)
    if args.version:
        settings = settings.with_overrides(serve_model_version=args.version)
    return _serve(settings, console)


# --- Command line -------------------------------------------------------------------------------


def _actor() -> str:
    """Who runs a lifecycle command, recorded with every alias change."""
    import getpass

    return f"{getpass.getuser()} ({PROG} CLI)"


def cmd_models(args: argparse.Namespace, console: Console) -> int:
    """List every version with alias, test metrics, data fingerprint and status."""
    from fraud_common.registry import open_registry
    from fraud_common.registry.lifecycle import format_models, list_models

    settings = _settings(args)
    console.say(format_models(list_models(open_registry(settings), settings.model_name)))
    return 0


def cmd_lifecycle(args: argparse.Namespace, console: Console) -> int:
    """promote VERSION, rollback, approve VERSION: one registry change, who/when/why recorded."""
    from fraud_common.registry import lifecycle, open_registry

    settings = _settings(args)
    registry, name = open_registry(settings), settings.model_name
    if args.command == "promote":
        done = lifecycle.promote(registry, name, args.version, _actor(), args.reason, force=args.force)
    elif args.command == "rollback":
        done = lifecycle.rollback(registry, name, _actor(), args.reason)
    else:
        done = lifecycle.approve(registry, name, args.version, _actor(), args.reason)
    console.say(f"{name} {done.version}: {lifecycle.version_status(done)}")
    console.say(_reload_local_predictor(settings))
    return 0


def _predictor_url(settings: Settings) -> str:
    host = "127.0.0.1" if settings.serve_host in ("0.0.0.0", "") else settings.serve_host
    return f"http://{host}:{settings.serve_port}"


def _reload_local_predictor(settings: Settings) -> str:
    """Tell a predictor running on this machine to serve the registry's champion now."""
    from fraud_common.registry import RegistryError
    from rest_predictor.canary import RELOAD_PATH, call

    url = _predictor_url(settings)
    try:
        status = call(url, "POST", RELOAD_PATH, timeout=120)
    except RegistryError as err:
        if "no predictor at" in str(err):
            return f"no predictor on {url}: the next `{PROG} serve` serves the new champion"
        raise
    return f"predictor on {url} now serves {status['champion']}"


def cmd_canary(args: argparse.Namespace, console: Console) -> int:
    """Latency gate in the running predictor, then the canary steps; promote or roll back automatically."""
    from fraud_common.registry import open_registry
    from fraud_common.registry.rollout import CanaryPolicy, parse_steps
    from rest_predictor.canary import Replay, run_canary

    settings = _settings(args)
    try:
        steps = parse_steps(args.steps or settings.canary_steps)
    except ValueError as err:
        raise UserError(str(err)) from None
    policy = CanaryPolicy(steps=steps, min_requests=args.min_requests,
                          step_seconds=args.step_seconds or settings.canary_step_seconds)
    url = args.url or _predictor_url(settings)
    users = [f"user_{i}" for i in range(args.users)] if args.users else []
    registry = open_registry(settings)
    with console.step("canary") as step:
        replay = Replay(url, users) if args.replay and users else None
        if replay is not None:
            replay.__enter__()
        try:
            outcome = run_canary(url, registry, settings.model_name, args.version, policy, _actor(),
                                 benchmark_users=users[:500], benchmark_requests=args.benchmark_requests,
                                 latency_factor=args.latency_factor)
        finally:
            if replay is not None:
                replay.__exit__(None, None, None)
        step.figure = f"{outcome.outcome} after {outcome.seconds:.1f}s ({outcome.reason})"
    for record in outcome.steps:
        console.say(f"  {record['percent']:>3} %  {'passed' if record['passed'] else 'FAILED'}  "
                    f"{record['stats']['challenger']['requests']} challenger requests in {record['seconds']:.1f}s")
    console.say(f"{settings.model_name}: champion {outcome.champion}")
    return 0 if outcome.outcome == "promoted" else 1


def cmd_push(args: argparse.Namespace, console: Console) -> int:
    """Record transactions through the running predictor's push route."""
    from rest_predictor.push import run

    return run(args, _settings(args))


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    from synthetic_data_generation.generate import DEFAULT_USERS

    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, help="local state folder (default: $FRAUD_HOME or ./.fraud-detection)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show every step's full output and tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write synthetic raw CSVs")
    gen.add_argument("--users", type=user_count, default=DEFAULT_USERS, help=f"label rows / users, at least {MIN_USERS} (default {DEFAULT_USERS:,})")
    gen.add_argument("--out", help="local folder or s3://bucket/prefix (default: <data root>/raw)")
    gen.add_argument("--seed", type=seed_value, default=42)
    gen.add_argument("--no-progress", action="store_true", help="no progress bar (with --verbose)")
    gen.set_defaults(func=cmd_generate)

    prep = sub.add_parser("prepare", help="Spark data preparation")
    prep.add_argument("--input", help="raw data folder or s3:// URI (default: <data root>/raw)")
    prep.add_argument("--output", help="prepared data folder or s3:// URI (default: <data root>/prepared)")
    prep.add_argument("--label-time", help="ISO time of every label row (default: the generator's, else just "
                      "after the latest history event)")
    prep.add_argument("--allow-no-history", action="store_true",
                      help="accept data where most label rows have no earlier history")
    prep.set_defaults(func=cmd_prepare)

    run = sub.add_parser(
        "run",
        help="the whole lifecycle on this machine, then serve",
        description="Generate data if needed, run the pipeline with kfp.local, register the model, serve it.",
    )
    run.add_argument(
        "--users", type=user_count, default=None,
        help=f"size of the synthetic data. Without it: reuse the data there is, or generate {DEFAULT_USERS:,} users. "
        "With it: data of another size that this tool generated is regenerated at this size "
        "(data it did not generate is never replaced: the run stops and says so)",
    )
    run.add_argument("--reuse-data", action="store_true", help="use the existing raw data whatever its size")
    run.add_argument("--seed", type=seed_value, default=42, help="seed of generated data (default 42)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (with --verbose)")
    run.add_argument("--no-serve", action="store_true", help="stop after registration")
    run.add_argument("--port", type=port_number, help="predictor port (default 8081)")
    run.add_argument("--platform", choices=("local", "docker"), default="local",
                     help="local: steps in this venv (default); docker: each step in its image through "
                     "kfp.local's DockerRunner (build the images first: ./build_images.sh --skip-s3a-jars)")
    run.set_defaults(func=cmd_run)

    srv = sub.add_parser("serve", help="serve the registered model")
    srv.add_argument("--version", help="model version (default: newest that passed the gate)")
    srv.add_argument("--port", type=port_number, help="predictor port (default 8081)")
    srv.set_defaults(func=cmd_serve)

    comp = sub.add_parser("compile", help="compile the Kubeflow pipelines (main and monitoring) to YAML")
    comp.add_argument("--output", default=str(COMPILED_PIPELINE))
    comp.set_defaults(func=cmd_compile)

    models = sub.add_parser("models", help="list versions: alias, metrics, data fingerprint, status")
    models.set_defaults(func=cmd_models)
    promote = sub.add_parser("promote", help="make VERSION the champion")
    promote.add_argument("version")
    promote.add_argument("--reason", default="promoted by hand")
    promote.add_argument("--force", action="store_true", help="even if the gates refused it")
    promote.set_defaults(func=cmd_lifecycle)
    rollback = sub.add_parser("rollback", help="give the champion back to the previous one")
    rollback.add_argument("--reason", default="rolled back by hand")
    rollback.set_defaults(func=cmd_lifecycle)
    approve = sub.add_parser("approve", help="approve VERSION that waits for a human decision")
    approve.add_argument("version")
    approve.add_argument("--reason", default="approved")
    approve.set_defaults(func=cmd_lifecycle)
    can = sub.add_parser(
        "canary", help="roll VERSION out to the running predictor step by step; roll back on a failed check",
        description="Latency gate in the running predictor, then a growing share of traffic for the challenger "
        "with checks at each step (errors, latency, scores vs the champion); promote, or roll back automatically.",
    )
    can.add_argument("version")
    can.add_argument("--steps", help="challenger's share per step, percent (default: FRAUD_CANARY_STEPS, 10,50,100)")
    can.add_argument("--step-seconds", type=float, help="least seconds per step (default: FRAUD_CANARY_STEP_SECONDS)")
    can.add_argument("--min-requests", type=_integer, default=30, help="challenger requests a step needs (default 30)")
    can.add_argument("--users", type=_integer, default=1000,
                     help="stored users user_0..user_N-1 for the latency gate and --replay (default 1000; 0: no latency gate)")
    can.add_argument("--benchmark-requests", type=_integer, default=2000, help="requests per version in the latency gate")
    can.add_argument("--latency-factor", type=float, default=1.5,
                     help="the latency gate: challenger p99 at most this times the champion's (default 1.5)")
    can.add_argument("--replay", action="store_true", help="send stored users' requests meanwhile (no real traffic here)")
    can.add_argument("--url", help="predictor URL (default: http://127.0.0.1:FRAUD_SERVE_PORT)")
    can.add_argument("--port", type=port_number, help="predictor port (default 8081)")
    can.set_defaults(func=cmd_canary)

    from rest_predictor.push import add_arguments as add_push_arguments  # imports no kserve

    psh = sub.add_parser("push", help="record transactions in the cards' histories (via the running predictor)")
    add_push_arguments(psh)
    psh.set_defaults(func=cmd_push)

    from monitoring.main import add_commands as add_monitoring_commands  # parser only: light import

    add_monitoring_commands(sub, _settings, prog=PROG)
    for name in ("monitor", "feedback"):  # their own one-line error handling; no step console
        command_func = sub.choices[name].get_default("func")
        sub.choices[name].set_defaults(func=lambda args, console, command_func=command_func: command_func(args))
    for command in (gen, prep, run, srv, comp, models, promote, rollback, approve, can, psh):  # `fraud-detection run --verbose` works too
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


# --- Errors -------------------------------------------------------------------------------------

# Errors a user can cause, by class (module.qualname, matched along the MRO so that no step
# package is imported to check), with what to do about them and the exit code.
KNOWN_ERRORS: dict[str, tuple[str, int]] = {
    "pipeline.cli.UserError": ("", 2),
    "fraud_common.settings.SettingsError": ("fix the environment variable", 2),
    "data_preparation.validation.ValidationError": ("fix the input data", 2),
    "fraud_common.registry.base.ModelNotFound": (f"run `{PROG} run` first, or pick a registered --version", 1),
    "fraud_common.registry.base.RegistryUnavailable": ("check FRAUD_REGISTRY_URI and FRAUD_REGISTRY_PORT, and that the registry runs", 1),
    "fraud_common.registry.base.RegistryError": ("check the FRAUD_REGISTRY_* settings", 1),
    "fraud_common.storage.StorageError": ("", 1),
    "rest_predictor.errors.PredictorLoadError": ("", 1),
    "feature_engineering.feast_feature_engineering.FeatureStoreError": (f"rerun `{PROG} run`", 1),
    "pipeline.console.StepFailed": ("", 1),
    "pipeline.docker.DockerPlatformError": ("", 1),
}


def explain(err: BaseException) -> tuple[str, int] | None:
    """(one line, exit code) for an error a user can cause, else None."""
    for cls in type(err).__mro__:
        known = KNOWN_ERRORS.get(f"{cls.__module__}.{cls.__qualname__}")
        if known is not None:
            hint, code = known
            code = getattr(err, "exit_code", code)
            text = " ".join(str(err).split()) or type(err).__name__
            return (f"{text}; {hint}" if hint else text), code
    if isinstance(err, OSError) and err.errno == errno.EADDRINUSE:
        return f"{err.strerror}: a port is in use; stop what listens there or pass --port N", 1
    return None


def stop_children() -> None:
    """End the processes this command started (kfp.local's task subprocesses, Spark's JVM)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with the pipeline package
        return
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=5)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fraud-detection`` console script."""
    args = build_parser().parse_args(argv)
    verbose = args.verbose
    try:
        settings = _settings(args)
    except SettingsError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    log_dir = None if verbose or args.command == "compile" else new_run_dir(settings.home, args.command)
    console = Console(log_dir, verbose=verbose)
    setup_logging(settings.log_level)
    step = None
    try:
        with console.capture(args.command):  # whatever is not inside a step
            return args.func(args, console)
    except KeyboardInterrupt:
        step = console.current
        stop_children()
        where = f" during {step.name}" if step else ""
        logs = f"; logs in {log_dir}" if log_dir else ""
        console.error(f"{PROG}: interrupted{where} (Ctrl-C); rerun the command to start again{logs}")
        return 130
    except Exception as err:  # noqa: BLE001 - the one place that turns errors into messages
        story = "".join(traceback.format_exception(err)).rstrip()
        if verbose:
            console.error(story)
        elif log_dir is not None:
            with (log_dir / f"{args.command}.log").open("a") as handle:
                handle.write(story + "\n")
        known = explain(err)
        if known is not None:
            console.error(f"{PROG}: {known[0]}")
            return known[1]
        where = f"; log: {log_dir / (args.command + '.log')}" if log_dir else ""
        console.error(f"{PROG}: internal error: {type(err).__name__}: {err} (rerun with --verbose for the traceback{where})")
        return 1
    finally:
        console.close()
        if log_dir is not None and not any(p.stat().st_size for p in log_dir.iterdir()):
            shutil.rmtree(log_dir, ignore_errors=True)  # nothing was logged: no empty run folder


if __name__ == "__main__":
    # ``python -m pipeline.cli``: run the imported module, so error classes are pipeline.cli's.
    from pipeline.cli import main as _main

    sys.exit(_main())
