"""The monitoring pipeline: the drift report over the last hours of the prediction log, on a schedule.

One step (``drift-report``, in the monitoring image) runs ``fraud-detection monitor`` over the
window ending when it runs, keeps report.html, summary.png and result.json as its ``report``
artifact, logs the verdict as KFP metrics and pushes it to the Pushgateway if
``FRAUD_PUSHGATEWAY_URL`` is set (the PrometheusRule's drift alert reads it there). A drift alert
is a result, not a failure: the step fails only when no verdict can be made (too few rows, no
reference).

    uv run python -m pipeline.monitoring_pipeline compile      # writes pipeline/fraud-detection-monitoring.yaml
    uv run python -m pipeline.monitoring_pipeline schedule --host https://<kfp> --reference s3://...

``schedule`` creates the KFP recurring run: a six-field cron (KFP's scheduler counts seconds
first: ``0 0 * * * *`` is hourly on the hour), ``max_concurrency=1`` (a slow report never
overlaps the next), no catch-up (after a pause, one report of the latest window, not one per
missed hour) and caching off (every run has the same parameters; a cached run would show an old
verdict). kfp.local has no scheduler: there, run it once, or ``fraud-detection monitor --every 1h``.
"""

# No `from __future__ import annotations`: KFP reads the component signatures at import time.

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from kfp import dsl, kubernetes
from kfp.dsl import Artifact, Metrics, Output

from fraud_common.settings import CONFIG, CONFIG_MAP, S3_SECRET, Settings, env_names, read_env_file
from pipeline.images import image

PIPELINE_NAME = "fraud-detection-monitoring"
COMPILED = Path(__file__).with_name(f"{PIPELINE_NAME}.yaml")
SETTINGS_ENV = Path(__file__).resolve().parents[1] / "manifests" / "config" / "settings.env"
CLUSTER = Settings.from_env(read_env_file(SETTINGS_ENV))
# The cluster's log: where every predictor replica writes (FRAUD_PREDICTION_LOG_URI in the ConfigMap).
CLUSTER_LOG_URI = CLUSTER.prediction_log_uri
HOURLY = "0 0 * * * *"
# The Pushgateway of manifests/monitoring (Service fraud-detection-pushgateway, port 9091).
PUSHGATEWAY_URL = f"http://fraud-detection-pushgateway.{CLUSTER.namespace}.svc:9091"


@dsl.component(base_image=image("monitoring"), install_kfp_package=False)
def drift_report(
    log_uri: str,
    reference_uri: str,
    hours: float,
    psi_alert: float,
    min_rows: int,
    pushgateway_url: str,
    report: Output[Artifact],
    verdict: Output[Metrics],
):
    """The drift report of the last ``hours`` of the log against ``reference_uri`` (``fraud-detection monitor``)."""
    import json
    from pathlib import Path

    from fraud_common.settings import Settings
    from monitoring.main import EXIT_ERROR, main

    settings = Settings.from_env().with_overrides(pushgateway_url=pushgateway_url)
    argv = ["monitor", "--hours", str(hours), "--psi-alert", str(psi_alert), "--min-rows", str(min_rows), "--out", report.path]
    argv += ["--log", log_uri] if log_uri else []
    argv += ["--reference", reference_uri] if reference_uri else []
    code = main(argv, settings, prog="drift-report")
    if code == EXIT_ERROR:
        raise RuntimeError("the drift report could not be made (its one-line reason is above)")
    result = json.loads((Path(report.path) / "result.json").read_text())
    verdict.log_metric("drift_alert", 1.0 if result["drift"] else 0.0)
    verdict.log_metric("rows", float(result["rows"]))
    verdict.log_metric("max_psi", max(c["psi"] for c in result["columns"]))
    report.metadata.update({"drift": result["drift"], "drifted_columns": result["drifted_columns"], "rows": result["rows"]})


@dsl.pipeline(name=PIPELINE_NAME, description="Drift report of the prediction log against the training reference.")
def monitoring_pipeline(
    reference_uri: str = "",
    log_uri: str = CLUSTER_LOG_URI,
    hours: float = 1.0,
    psi_alert: float = 0.25,
    min_rows: int = 500,
    pushgateway_url: str = PUSHGATEWAY_URL,
) -> None:
    """One drift report. ``reference_uri``: the served version's training set (the ``training_set``
    artifact of the run that trained it; empty: ``<data>/prepared/features``). ``pushgateway_url``
    empty: the verdict is not pushed."""
    task = drift_report(
        log_uri=log_uri, reference_uri=reference_uri, hours=hours, psi_alert=psi_alert, min_rows=min_rows,
        pushgateway_url=pushgateway_url,
    )
    task.set_display_name("drift report").set_caching_options(False)
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, {key: key for key in env_names(CONFIG)})
    kubernetes.use_secret_as_env(task, S3_SECRET, {key: key for key in env_names(S3_SECRET)})


def compile_pipeline(output: Path = COMPILED) -> Path:
    """Write the pipeline's YAML to ``output``."""
    from kfp import compiler

    compiler.Compiler().compile(monitoring_pipeline, str(output))
    return output


def check_cron(expression: str) -> str:
    """``expression`` if it is a six-field cron (seconds first), as KFP's scheduler reads it."""
    fields = expression.split()
    if len(fields) != 6 or not all(re.fullmatch(r"[0-9*/,\-?A-Za-z]+", f) for f in fields):
        raise ValueError(
            f"cron {expression!r} has {len(fields)} fields; KFP wants six, seconds first (e.g. {HOURLY!r} for hourly)"
        )
    return expression


def recurring_run(experiment_id: str, cron: str, params: dict[str, Any], package: Path = COMPILED) -> dict[str, Any]:
    """The arguments of ``kfp.Client.create_recurring_run`` for the scheduled drift report."""
    return {
        "experiment_id": experiment_id,
        "job_name": f"{PIPELINE_NAME}-{cron.replace(' ', '_').replace('*', 'x').replace('/', 'every')}",
        "description": f"drift report on cron {cron!r} (seconds first)",
        "cron_expression": check_cron(cron),
        "max_concurrency": 1,
        "no_catchup": True,
        "enable_caching": False,
        "params": params,
        "pipeline_package_path": str(package),
    }


def schedule(client: Any, experiment: str, cron: str, params: dict[str, Any], package: Path = COMPILED) -> Any:
    """Create the recurring run with ``client`` (a ``kfp.Client``) in ``experiment`` (made if missing)."""
    found = client.create_experiment(name=experiment)  # returns the existing one if it is there
    return client.create_recurring_run(**recurring_run(found.experiment_id, cron, params, package))


def main(argv: Sequence[str] | None = None) -> int:
    """``compile [--output PATH]`` or ``schedule --host URL [--cron C] [--reference URI] ...``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.monitoring_pipeline", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", help=f"write {COMPILED.name}")
    comp.add_argument("--output", type=Path, default=COMPILED)
    sch = sub.add_parser("schedule", help="create the recurring run on a KFP server")
    sch.add_argument("--host", required=True, help="KFP API endpoint (e.g. the ml-pipeline route)")
    sch.add_argument("--experiment", default=PIPELINE_NAME)
    sch.add_argument("--cron", default=HOURLY, help=f"six fields, seconds first (default {HOURLY!r}: hourly)")
    sch.add_argument("--reference", default="", help="the served version's training set (its training_set artifact URI)")
    sch.add_argument("--log", default=CLUSTER_LOG_URI, help=f"prediction log root (default {CLUSTER_LOG_URI})")
    sch.add_argument("--hours", type=float, default=1.0, help="window length (default 1: the hour before each run)")
    args = parser.parse_args(argv)
    if args.command == "compile":
        print(compile_pipeline(args.output))
        return 0
    try:
        check_cron(args.cron)
    except ValueError as err:
        print(f"schedule: {err}", file=sys.stderr)
        return 2
    import kfp

    params = {"reference_uri": args.reference, "log_uri": args.log, "hours": args.hours}
    job = schedule(kfp.Client(host=args.host), args.experiment, args.cron, params)
    print(f"recurring run {getattr(job, 'recurring_run_id', job)} created: {args.cron!r}, max_concurrency=1, no catch-up")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
