"""The monitoring pipeline: its committed YAML, one run under kfp.local (no scheduler there), the
recurring-run definition a KFP server would get, and ``monitor --every`` as the local schedule."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from fraud_common import prediction_log as plog
from fraud_common.schemas import FLAG_COLUMNS, MODEL_FEATURES
from fraud_common.settings import CONFIG, CONFIG_MAP, S3_SECRET, Settings, env_names
from monitoring.main import main
from pipeline import monitoring_pipeline as mp
from pipeline.images import image


def _columns(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    columns = {name: rng.lognormal(0.0, 1.0, n) for name in MODEL_FEATURES}
    for name in FLAG_COLUMNS:
        columns[name] = (rng.random(n) < 0.4).astype(float)
    return columns


def write_reference(path: Path) -> str:
    pq.write_table(pa.table(_columns(np.random.default_rng(3), 4000)), path / "reference.parquet")
    return str(path / "reference.parquet")


def write_recent_log(settings: Settings, uri: str, n: int, drifted: bool = False) -> None:
    """``n`` rows scored over the last few minutes."""
    columns = _columns(np.random.default_rng(4), n)
    if drifted:
        columns["online_order"] = np.ones(n)
    features = np.column_stack([columns[name] for name in MODEL_FEATURES]).astype(np.float32)
    now = time.time()
    with plog.PredictionLogWriter(plog.PredictionLogConfig(uri=uri), settings, MODEL_FEATURES) as writer:
        for i in range(n):
            score = np.array([[0.05]], np.float32)
            writer.append(f"r{i}", [f"user_{i}"], features[i : i + 1], score, np.array([False]), "fraud-detection", "1", 0.001, now - 300 + i * 0.1)


def test_committed_yaml_matches_the_dsl(tmp_path: Path) -> None:
    out = mp.compile_pipeline(tmp_path / "monitoring.yaml")
    assert mp.COMPILED.read_text() == out.read_text(), "stale: run `uv run python -m pipeline.monitoring_pipeline compile`"


def test_the_step_runs_in_the_monitoring_image_uncached_with_the_cluster_settings() -> None:
    spec, platform = list(yaml.safe_load_all(mp.COMPILED.read_text()))
    (executor,) = spec["deploymentSpec"]["executors"].values()
    assert executor["container"]["image"] == image("monitoring")
    (task,) = spec["root"]["dag"]["tasks"].values()
    assert not task.get("cachingOptions", {}).get("enableCache"), "a cached run would repeat an old verdict"
    (env,) = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
    assert env["configMapAsEnv"][0]["configMapName"] == CONFIG_MAP
    assert {k["configMapKey"] for k in env["configMapAsEnv"][0]["keyToEnv"]} == set(env_names(CONFIG))
    assert {s["secretName"] for s in env["secretAsEnv"]} == {S3_SECRET}
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert parameters["log_uri"]["defaultValue"].startswith("s3://") and parameters["hours"]["defaultValue"] == 1.0


def test_recurring_run_is_six_field_cron_one_at_a_time_without_catch_up() -> None:
    calls: list[tuple[str, dict]] = []

    class RecordingClient:  # stands in for kfp.Client: there is no KFP API server here
        def create_experiment(self, name: str) -> SimpleNamespace:
            calls.append(("create_experiment", {"name": name}))
            return SimpleNamespace(experiment_id="exp-1")

        def create_recurring_run(self, **kwargs: object) -> SimpleNamespace:
            calls.append(("create_recurring_run", kwargs))
            return SimpleNamespace(recurring_run_id="rr-1")

    job = mp.schedule(RecordingClient(), "monitoring", "0 */15 * * * *", {"reference_uri": "s3://b/ref"})
    assert job.recurring_run_id == "rr-1"
    (_, experiment), (_, run) = calls
    assert experiment == {"name": "monitoring"}
    assert run["experiment_id"] == "exp-1" and run["cron_expression"] == "0 */15 * * * *"
    assert (run["max_concurrency"], run["no_catchup"], run["enable_caching"]) == (1, True, False)
    assert run["pipeline_package_path"] == str(mp.COMPILED) and run["params"] == {"reference_uri": "s3://b/ref"}
    # The arguments are ones kfp.Client.create_recurring_run takes.
    import inspect

    from kfp import Client

    assert set(run) <= set(inspect.signature(Client.create_recurring_run).parameters)
    with pytest.raises(ValueError, match="six, seconds first"):
        mp.check_cron("*/15 * * * *")  # five-field cron: KFP would read the minutes as seconds
    assert mp.main(["schedule", "--host", "http://127.0.0.1:1", "--cron", "0 * * * *"]) == 2


@pytest.mark.filterwarnings("ignore:You may be attemping to run a task")  # the step image is ours
def test_one_run_under_kfp_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kfp import local

    home = tmp_path / "home"
    settings = Settings.from_env({"FRAUD_HOME": str(home)})
    for key, value in settings.to_env().items():  # the step subprocess reads its settings from here
        monkeypatch.setenv(key, value)
    log_uri = str(tmp_path / "log")
    write_recent_log(settings, log_uri, 1500, drifted=True)
    reference = write_reference(tmp_path)
    root = tmp_path / "runs"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    mp.monitoring_pipeline(reference_uri=reference, log_uri=log_uri, hours=1.0, min_rows=1000, pushgateway_url="")
    (result_file,) = root.rglob("result.json")
    result = json.loads(result_file.read_text())
    assert result["drift"] is True and result["drifted_columns"] == ["online_order"] and result["rows"] == 1500
    assert (result_file.parent / "report.html").exists()
    (executor_output,) = root.rglob("executor_output.json")  # the KFP metrics the step logged
    verdict = json.loads(executor_output.read_text())["artifacts"]["verdict"]["artifacts"][0]["metadata"]
    assert verdict["drift_alert"] == 1.0 and verdict["rows"] == 1500


def test_monitor_every_repeats_on_its_period(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    settings = Settings.from_env({"FRAUD_HOME": str(tmp_path / "home")})
    write_recent_log(settings, plog.default_log_uri(settings), 800)
    reference = write_reference(tmp_path)
    started = time.monotonic()
    code = main(["monitor", "--reference", reference, "--hours", "1", "--every", "1s", "--runs", "2"], settings)
    assert code == 0 and time.monotonic() - started >= 1.0
    reports = sorted((tmp_path / "home" / "monitoring" / "reports").iterdir())
    assert len(reports) == 2 and all((r / "result.json").exists() and (r / "metrics.prom").exists() for r in reports)
    assert capsys.readouterr().out.count("No drift in 800 predictions") == 2
    assert main(["monitor", "--reference", reference, "--every", "soon"], settings) == 2
    assert "not a positive duration" in capsys.readouterr().err
