"""End to end on tiny data: `fraud-detection run` twice, then the live predictor it starts.

This is what a new user does first; it runs the real pipeline with kfp.local (Spark local mode,
Feast SQLite online store, Keras→ONNX, local registry) and a real KServe ModelServer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import requests

from fraud_common.registry import open_registry
from fraud_common.schemas import FEATURES_DIR, MODEL_FEATURES
from fraud_common.settings import Settings
from pipeline import cli

from conftest import free_port

pytestmark = pytest.mark.slow
USERS = 4000


def _run(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e") / "state"


@pytest.fixture(scope="module")
def env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAUD_", "AWS_", "S3_"))}
    # Tiny data gives a noisier model than the default size; the bar is lowered for the test only.
    env.update({"FRAUD_HOME": str(home), "FRAUD_MIN_ROC_AUC": "0.80", "FRAUD_SERVE_PORT": str(free_port())})
    return env


@pytest.fixture(scope="module")
def first_run(env: dict[str, str]) -> subprocess.CompletedProcess:
    result = _run(env, "run", "--users", str(USERS), "--no-serve", "--no-progress")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def server(first_run: subprocess.CompletedProcess, env: dict[str, str]) -> Iterator[dict]:
    """A second `run` (new version), left serving; yields its base URL and captured output."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "--no-progress"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "curl -X POST" in line:
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(600):
        proc.kill()
        pytest.fail("predictor never became ready:\n" + "".join(lines[-80:]))
    yield {"url": f"http://127.0.0.1:{env['FRAUD_SERVE_PORT']}", "proc": proc, "lines": lines}
    if proc.poll() is None:
        proc.kill()


def test_every_artifact_of_the_run_holds_its_data(first_run: subprocess.CompletedProcess, env: dict[str, str]) -> None:
    """kfp.local's executor outputs: each artifact's URI is a real path holding its data, with metadata."""
    import onnx
    import pandas as pd

    from fraud_common.schemas import ENTITIES_DIR

    settings = Settings.from_env(env)
    run = min((settings.home / "runs").glob("fraud-detection-e2e-*"), key=lambda p: p.stat().st_mtime)
    outputs = {}
    for step in cli.STEP_ORDER:
        produced = json.loads((run / step / "executor_output.json").read_text())["artifacts"]
        outputs |= {name: entry["artifacts"][0] for name, entry in produced.items()}
        durations = [a["artifacts"][0]["metadata"].get("duration_seconds") for a in produced.values()]
        assert any(d is not None for d in durations), f"{step} records no duration_seconds"
        for name, entry in produced.items():
            uri = Path(entry["artifacts"][0]["uri"])
            assert uri.is_relative_to(run / step), (name, uri)
            assert entry["artifacts"][0]["metadata"], f"{step}.{name} has no metadata"
            if name not in ("metrics", "classification_metrics", "gates"):  # KFP keeps those in metadata only
                assert uri.is_file() or any(uri.iterdir()), f"{step}.{name}: nothing at {uri}"

    prepared, meta = Path(outputs["prepared"]["uri"]), outputs["prepared"]["metadata"]
    features = pd.read_parquet(prepared / FEATURES_DIR)
    assert meta["rows"] == len(features) == USERS == meta["entity_rows"] == len(pd.read_parquet(prepared / ENTITIES_DIR))
    assert sum(meta["rows_by_set"].values()) == USERS and meta["schema_fingerprint"]
    assert meta["time_min"] <= meta["time_max"]
    store = Path(outputs["feature_store"]["uri"])
    assert {p.name for p in store.iterdir()} >= {"registry.db", "online_store.db"}
    assert outputs["feature_store"]["metadata"]["online_users"] == USERS
    training_set = outputs["training_set"]
    assert len(pd.read_parquet(training_set["uri"])) == training_set["metadata"]["rows"] == USERS
    onnx.checker.check_model(onnx.load(outputs["model"]["uri"]))
    registered = json.loads(Path(outputs["registered_model"]["uri"]).read_text())
    versions = open_registry(settings).list_versions(settings.model_name)
    assert registered["model_version"] == versions[0].version
    endpoint = json.loads(Path(outputs["endpoint"]["uri"]).read_text())
    # The served store is the version's own copy of this run's snapshot (recorded at registration).
    recorded = versions[0].metadata["serving"]["features"]["snapshot_uri"]
    assert endpoint["feast_snapshot_uri"] == recorded == registered["feast_snapshot_uri"]
    assert all((Path(recorded) / name).read_bytes() == (store / name).read_bytes()
               for name in ("registry.db", "online_store.db"))


def _predict(url: str, body: object) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{url}/v1/models/onnx-model:predict", data=data, timeout=10)


def test_rerun_registers_a_new_version_and_serves_it(server: dict, env: dict[str, str]) -> None:
    settings = Settings.from_env(env)
    versions = open_registry(settings).list_versions(settings.model_name)
    assert len(versions) == 2 and len({v.version for v in versions}) == 2
    answer = _predict(server["url"], {"user_id": "user_0"}).json()
    assert answer["model_version"] == versions[-1].version


def test_run_prints_one_line_per_step_and_keeps_each_steps_log(server: dict, env: dict[str, str]) -> None:
    before_curl = []
    for line in server["lines"]:
        if "curl -X POST" in line:
            break
        before_curl.append(line)
    assert 7 <= len(before_curl) <= 15, "".join(before_curl)
    assert "executor_input" not in "".join(server["lines"])
    (run_dir, *_) = sorted((Path(env["FRAUD_HOME"]) / "logs").glob("*-run"), reverse=True)
    logs = {path.stem: path.stat().st_size for path in run_dir.iterdir()}
    steps = cli.STEP_ORDER
    assert all(logs.get(step, 0) > 0 for step in steps), logs
    assert all(any(line.lstrip().startswith(f"✓ {step} ") for line in before_curl) for step in steps)


def test_printed_curl_line_names_a_real_user(server: dict) -> None:
    line = next(line for line in server["lines"] if "curl -X POST" in line)
    user = line.split('"user_id": "')[1].split('"')[0]
    answer = _predict(server["url"], {"user_id": user})
    assert answer.status_code == 200, answer.text


def test_served_scores_equal_offline_scores(server: dict, env: dict[str, str]) -> None:
    import onnxruntime as ort
    import pandas as pd

    settings = Settings.from_env(env)
    version = open_registry(settings).get_version(settings.model_name)
    session = ort.InferenceSession(version.artifact_uri, providers=["CPUExecutionProvider"])
    prepared = cli.run_artifact_uri(cli.latest_run(settings), "prepare-data", "prepared")
    offline = pd.read_parquet(Path(prepared) / FEATURES_DIR).sort_values("user_id").head(40)
    expected = session.run(None, {session.get_inputs()[0].name: offline[list(MODEL_FEATURES)].astype("float32").to_numpy()})[0]
    for user, score in zip(offline["user_id"], expected[:, 0]):
        answer = _predict(server["url"], {"user_id": user}).json()
        assert abs(answer["prediction"][0][0] - float(score)) <= 1e-5, user
        assert answer["fraud"] == (answer["prediction"][0][0] >= version.threshold)


def test_a_new_transaction_is_scored_on_the_card_history_the_served_version_was_trained_on(server: dict, env: dict[str, str]) -> None:
    """The embedded run seeds the card histories from the served version's prepared data (its
    record names it), so a new transaction of a card with history sees that history."""
    import pandas as pd

    settings = Settings.from_env(env)
    prepared = cli.run_artifact_uri(cli.latest_run(settings), "prepare-data", "prepared")
    offline = pd.read_parquet(Path(prepared) / FEATURES_DIR)
    row = offline[offline["num_prev_transactions"] > 1].sort_values("user_id").iloc[0]
    transaction = {"user_id": row["user_id"], "distance_from_home": 3.0, "distance_from_last_transaction": 0.5,
                   "ratio_to_median_purchase_price": 1.2, "repeat_retailer": 1, "used_chip": 1, "used_pin_number": 0,
                   "online_order": 0}
    answer = _predict(server["url"], transaction)
    assert answer.status_code == 200, answer.text
    history = answer.json()["history"]
    for name in ("num_prev_transactions", "avg_prev_transaction_amount", "max_prev_transaction_amount"):
        assert abs(history[name] - float(row[name])) <= 1e-6 * max(1.0, abs(float(row[name]))), name


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"user_id": "user_999999999"}, 404),
        ({}, 400),
        ({"user_id": 42}, 400),
        ({"user_id": ""}, 400),
        ({"user_ids": "user_1"}, 400),
        ("{not json", 400),
        ({"user_ids": [f"user_{i}" for i in range(5000)]}, 413),
    ],
)
def test_bad_requests_get_http_errors_and_the_server_keeps_serving(server: dict, body: object, status: int) -> None:
    answer = _predict(server["url"], body)
    assert answer.status_code == status, answer.text
    assert answer.text.strip()  # the body says what was wrong
    assert _predict(server["url"], {"user_id": "user_1"}).status_code == 200


def test_concurrent_burst_has_no_errors(server: dict) -> None:
    users = [{"user_id": f"user_{i}"} for i in range(200)]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda b: _predict(server["url"], b).status_code, users))
    assert codes == [200] * len(users)


def test_ctrl_c_stops_cleanly(server: dict) -> None:
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) in (0, 130)
    with pytest.raises(requests.ConnectionError):
        _predict(server["url"], {"user_id": "user_1"})


def test_a_model_below_the_bar_fails_the_run_and_is_not_registered(server: dict, env: dict[str, str]) -> None:
    settings = Settings.from_env(env)
    before = open_registry(settings).list_versions(settings.model_name)
    strict = {**env, "FRAUD_MIN_ROC_AUC": "0.9999"}
    result = _run(strict, "run", "--no-serve", "--no-progress")
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "below the quality bar 0.9999" in output and "register-model" in output
    assert open_registry(settings).list_versions(settings.model_name) == before
