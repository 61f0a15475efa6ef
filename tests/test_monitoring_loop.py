"""The whole monitoring loop on one machine, as the README tells it: a real predictor writing the
prediction log, simulated traffic (normal, then drifted), the drift report over each, late labels,
and the report with realized metrics. Only the data is small."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from fraud_common import prediction_log as plog
from helpers import ServingState, build_serving_state
from monitoring.main import EXIT_DRIFT, EXIT_OK, main
from monitoring.simulate import PRESET_DRIFT, DriftSpec, simulate
from test_predictor import running_predictor

USERS = 3000
REQUESTS = 800


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> ServingState:
    return build_serving_state(tmp_path_factory.mktemp("monitoring-loop") / "home", USERS)


def logged_rows(state: ServingState, start: datetime) -> int:
    end = datetime.now(timezone.utc) + timedelta(minutes=1)
    return plog.read_log(plog.default_log_uri(state.settings), state.settings, start, end, columns=[plog.REQUEST_ID]).num_rows


def wait_for_rows(state: ServingState, start: datetime, rows: int, timeout: float = 30.0) -> None:
    """Until the log holds ``rows`` rows since ``start`` (the writer's time bound is 1 s here)."""
    deadline = time.monotonic() + timeout
    while logged_rows(state, start) < rows:
        assert time.monotonic() < deadline, f"log holds {logged_rows(state, start)} of {rows} rows after {timeout}s"
        time.sleep(0.2)


def monitor(state: ServingState, start: datetime, end: datetime, out: Path, capsys) -> tuple[int, dict, str]:  # noqa: ANN001
    code = main(["monitor", "--start", start.isoformat(), "--end", end.isoformat(), "--out", str(out)], state.settings)
    printed = capsys.readouterr()
    assert code in (EXIT_OK, EXIT_DRIFT), printed.err
    return code, json.loads((out / "result.json").read_text()), (out / "report.html").read_text()


def test_run_simulate_monitor_drift_feedback(state: ServingState, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    with running_predictor(state, tmp_path, {"FRAUD_PREDICTION_LOG_MAX_SECONDS": "1"}) as (url, _):
        t0 = datetime.now(timezone.utc)
        normal = simulate(url, state.settings, REQUESTS, rate=0, drift=DriftSpec(), labels_path=tmp_path / "normal.csv", seed=1)
        assert (normal.answered, normal.errors) == (REQUESTS, {})
        wait_for_rows(state, t0, REQUESTS)
        t1 = datetime.now(timezone.utc)
        code, result, _ = monitor(state, t0, t1, tmp_path / "report-normal", capsys)
        assert code == EXIT_OK, result["drifted_columns"]
        assert result["rows"] == REQUESTS and result["drift"] is False

        drifted = simulate(url, state.settings, REQUESTS, rate=0, drift=PRESET_DRIFT, labels_path=tmp_path / "drifted.csv", seed=2)
        assert drifted.answered == REQUESTS
        wait_for_rows(state, t0, 2 * REQUESTS)
        t2 = datetime.now(timezone.utc)

    code, result, html = monitor(state, t1, t2, tmp_path / "report-drifted", capsys)
    assert code == EXIT_DRIFT
    assert {"online_order", "ratio_to_median_purchase_price"} <= set(result["drifted_columns"])
    for name in result["drifted_columns"]:
        assert name in html
    untouched = {c["name"]: c for c in result["columns"]}["days_since_last_transaction"]
    assert not untouched["drifted"], "history features were not drifted and must not alert"
    assert (tmp_path / "report-drifted" / "summary.png").stat().st_size > 10_000
    assert 'fraud_monitor_drift_alert 1.0' in (tmp_path / "report-drifted" / "metrics.prom").read_text()

    for labels in ("normal.csv", "drifted.csv"):
        assert main(["feedback", "--labels", str(tmp_path / labels)], state.settings) == 0
        assert "match a prediction" in capsys.readouterr().out
    code, result, html = monitor(state, t0, t2, tmp_path / "report-labelled", capsys)
    performance = result["performance"]
    assert performance["labels_matched"] == 2 * REQUESTS
    overall = performance["overall"]
    assert overall["labelled"] == 2 * REQUESTS and overall["positives"] > 0
    assert overall["roc_auc"] is not None and 0.0 <= overall["roc_auc"] <= 1.0
    assert overall["recall"] is not None
    assert "ROC-AUC" in html


def test_simulate_errors_are_one_line_exit_2(state: ServingState, capsys) -> None:  # noqa: ANN001
    from conftest import free_port

    cases = [
        (["--online-order-share", "1.5"], "online-order share 1.5 is not between 0 and 1"),
        (["--amount-scale", "0"], "amount-scale 0.0 must be positive"),
        (["--source", "/nonexistent"], "no Parquet files at /nonexistent"),
        (["--url", f"http://127.0.0.1:{free_port()}", "--count", "3"], "no request to http://127.0.0.1:"),
        (["--url", "ftp://host"], "is not an http(s) URL"),
    ]
    for extra, message in cases:
        assert main(["simulate", *extra], state.settings) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
