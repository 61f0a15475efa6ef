"""Monitoring: the prediction log writer, the drift statistics, the feedback join and the report CLI.

Statistics are checked against values computed by hand in the comments; the writer's durability
promises (clean shutdown loses nothing, a kill loses at most one buffer, no half-written file)
are checked on real child processes.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fraud_common import prediction_log as plog
from fraud_common import storage
from fraud_common.schemas import FLAG_COLUMNS, MODEL_FEATURES
from fraud_common.settings import Settings
from monitoring import drift, feedback
from monitoring.main import add_commands, main

T0 = datetime(2026, 11, 30, 10, 0, tzinfo=timezone.utc)


# -- drift statistics: hand-computed values ------------------------------------------------


def test_decile_edges_and_shares_of_ten_values() -> None:
    # 0..9 with numpy's linear quantiles: the q-quantile sits at position 9q, so 0.9, 1.8, ..., 8.1.
    reference = np.arange(10.0)
    edges = drift.quantile_edges(reference)
    np.testing.assert_allclose(edges, [0.9, 1.8, 2.7, 3.6, 4.5, 5.4, 6.3, 7.2, 8.1])
    np.testing.assert_allclose(drift.bin_shares(reference, edges), [0.1] * 10)
    # Bins are closed on the right: a value equal to an edge belongs to the bin below it.
    np.testing.assert_allclose(drift.bin_shares(np.array([0.9, 0.91]), edges)[:2], [0.5, 0.5])


def test_psi_of_a_flag_by_hand() -> None:
    # Reference: five 0s, five 1s. Deciles 0,0,0,0,0.5,1,1,1,1 -> cut points {0, 0.5, 1}; shares
    # (0.5, 0, 0.5, 0). Window: eight 0s, two 1s -> (0.8, 0, 0.2, 0). Empty bins in both add 0.
    # PSI = 0.3 ln(0.8/0.5) + (-0.3) ln(0.2/0.5) = 0.3 ln 1.6 + 0.3 ln 2.5 = 0.3 ln 4 = 0.415888
    reference = np.array([0] * 5 + [1] * 5, dtype=float)
    window = np.array([0] * 8 + [1] * 2, dtype=float)
    assert drift.psi(reference, window) == pytest.approx(0.3 * math.log(4), abs=1e-12)
    assert drift.psi(reference, reference) == 0.0


def test_psi_empty_bins_use_the_stated_epsilon() -> None:
    # Reference 0..9: one value per decile bin (share 0.1 each). Window: all zeros, in bin 0.
    # PSI = (1 - 0.1) ln(1/0.1) + 9 (1e-4 - 0.1) ln(1e-4/0.1) = 0.9 ln 10 + 9 * 0.0999 * ln 1000
    reference, window = np.arange(10.0), np.zeros(10)
    expected = 0.9 * math.log(10) + 9 * 0.0999 * math.log(1000)
    assert drift.EPSILON == 1e-4
    assert drift.psi(reference, window) == pytest.approx(expected, rel=1e-12)
    # Another epsilon, another value: 0.9 ln 10 + 9 (0.01 - 0.1) ln(0.01/0.1)
    assert drift.psi(reference, window, epsilon=0.01) == pytest.approx(0.9 * math.log(10) + 9 * 0.09 * math.log(10))


def test_ks_and_wasserstein_by_hand() -> None:
    # {1,2,3,4} vs {3,4,5,6}: the CDFs differ most at 2 (0.5 vs 0) -> D = 0.5; every quantile moves by 2 -> W = 2.
    column = drift.compare_column("x", np.array([1.0, 2, 3, 4]), np.array([3.0, 4, 5, 6]))
    assert column.ks_statistic == pytest.approx(0.5)
    assert column.wasserstein == pytest.approx(2.0)
    # Reference std of {1,2,3,4} is sqrt(1.25).
    assert column.wasserstein_in_std == pytest.approx(2.0 / math.sqrt(1.25))
    assert (column.reference_mean, column.current_mean) == (2.5, 4.5)


def test_ks_and_wasserstein_equal_scipy() -> None:
    from scipy import stats

    rng = np.random.default_rng(2)
    for reference, current in [
        (rng.lognormal(0, 1, 3000), rng.lognormal(0.2, 1, 2000)),
        ((rng.random(3000) < 0.4).astype(float), (rng.random(2500) < 0.5).astype(float)),  # ties everywhere
        (np.round(rng.normal(0, 1, 4000), 1), np.round(rng.normal(0.05, 1.1, 5000), 1)),
    ]:
        column = drift.compare_column("x", reference, current)
        ks = stats.ks_2samp(reference, current, method="asymp")
        assert column.ks_statistic == pytest.approx(ks.statistic, abs=1e-12)
        assert column.ks_pvalue == pytest.approx(ks.pvalue, rel=1e-6, abs=1e-300)
        assert column.wasserstein == pytest.approx(stats.wasserstein_distance(reference, current), rel=1e-9)


def test_bands_and_alert_rules() -> None:
    thresholds = drift.DriftThresholds()
    assert [drift.psi_band(v) for v in (0.0999, 0.1, 0.2499, 0.25)] == ["stable", "moderate", "moderate", "major"]
    rng = np.random.default_rng(1)
    reference = (rng.random(4000) < 0.5).astype(float)
    # Share of ones 0.5 -> 0.65: PSI = 0.15 ln(0.65/0.5) + 0.15 ln(0.5/0.35) = 0.093 (stable band),
    # but KS D = 0.15 >= 0.1 with a tiny p-value: the KS rule raises the alert.
    shifted = np.array([1.0] * 1300 + [0.0] * 700)
    column = drift.compare_column("online_order", reference, shifted, thresholds)
    assert column.psi_band == "stable" and column.psi == pytest.approx(0.093, abs=0.01)
    assert column.drifted and column.reasons[0].startswith("KS D 0.1")
    same = drift.compare_column("online_order", reference, (rng.random(2000) < 0.5).astype(float), thresholds)
    assert not same.drifted and same.reasons == []
    # NaN in the window is counted as missing and left out of the statistics.
    with_nan = drift.compare_column("x", np.arange(10.0), np.array([np.nan, 1.0, 2.0]))
    assert with_nan.current_missing == 1 and with_nan.current_rows == 2


# -- prediction log writer -----------------------------------------------------------------


FEATURES = ("amount", "online_order")


def _append(writer: plog.PredictionLogWriter, i: int, scored_at: float, users: int = 1) -> bool:
    ids = [f"user_{i}_{k}" for k in range(users)]
    features = np.array([[float(i), float(k % 2)] for k in range(users)], dtype=np.float32)
    scores = np.full((users, 1), i / 1000.0, dtype=np.float32)
    return writer.append(f"req-{i}", ids, features, scores, scores[:, 0] > 0.5, "fraud-detection", "7", 0.002, scored_at)


def test_log_round_trip_partitions_by_hour_and_windows(settings: Settings, tmp_path: Path) -> None:
    config = plog.PredictionLogConfig(uri=str(tmp_path / "log"), max_seconds=60)
    with plog.PredictionLogWriter(config, settings, FEATURES) as writer:
        base = T0.timestamp()
        _append(writer, 1, base + 10)
        _append(writer, 2, base + 20, users=3)  # a batch request: three rows, one request id
        _append(writer, 3, base + 3600 + 5)  # the next hour
    files = sorted(str(p.relative_to(tmp_path / "log")) for p in (tmp_path / "log").rglob("*.parquet"))
    assert [f.rsplit("/", 1)[0] for f in files] == ["date=2026-11-30/hour=10", "date=2026-11-30/hour=11"]
    table = plog.read_log(config.uri, settings, T0, T0 + timedelta(hours=2))
    assert table.num_rows == 5
    assert table.column_names == [*plog.LOG_COLUMNS, *FEATURES, *plog.OUTCOME_COLUMNS]
    rows = table.sort_by([(plog.SCORED_AT, "ascending"), (plog.USER_ID, "ascending")]).to_pylist()
    assert [r[plog.REQUEST_ID] for r in rows] == ["req-1", "req-2", "req-2", "req-2", "req-3"]
    assert [r["online_order"] for r in rows[1:4]] == [0.0, 1.0, 0.0]
    assert rows[0][plog.SCORED_AT] == T0 + timedelta(seconds=10)
    assert rows[0][plog.LATENCY_MS] == pytest.approx(2.0) and rows[0][plog.MODEL_VERSION] == "7"
    assert rows[0][plog.SCORE] == pytest.approx(0.001) and rows[0][plog.DECISION] is False
    # The window is half-open and cuts inside a file: only the first hour's rows.
    assert plog.read_log(config.uri, settings, T0, T0 + timedelta(hours=1)).num_rows == 4
    assert plog.read_log(config.uri, settings, T0 + timedelta(seconds=15), T0 + timedelta(hours=1)).num_rows == 3
    # A leftover temporary file (a write killed before its rename) is not read.
    (tmp_path / "log" / "date=2026-11-30" / "hour=10" / ".part-x.parquet.abc.tmp").write_bytes(b"PAR1 half")
    assert plog.read_log(config.uri, settings, T0, T0 + timedelta(hours=2)).num_rows == 5


def test_log_sampling_keeps_whole_requests_and_records_the_rate(settings: Settings, tmp_path: Path) -> None:
    config = plog.PredictionLogConfig(uri=str(tmp_path / "log"), sample_rate=0.3)
    with plog.PredictionLogWriter(config, settings, FEATURES, seed=7) as writer:
        kept = sum(_append(writer, i, T0.timestamp() + i, users=2) for i in range(2000))
    # Binomial(2000, 0.3): mean 600, sd 20.5.
    assert 520 < kept < 680
    table = plog.read_log(config.uri, settings, T0, T0 + timedelta(hours=1))
    assert table.num_rows == 2 * kept
    assert np.allclose(table[plog.SAMPLE_RATE].to_numpy(), 0.3)
    assert all(n == 2 for n in table.group_by(plog.REQUEST_ID).aggregate([([], "count_all")])["count_all"].to_pylist())
    with plog.PredictionLogWriter(plog.PredictionLogConfig(uri=str(tmp_path / "none"), sample_rate=0.0), settings, FEATURES) as off:
        assert not any(_append(off, i, T0.timestamp()) for i in range(100))
    assert not (tmp_path / "none").exists()


def test_log_bounds_unwritten_rows_and_never_blocks(settings: Settings, tmp_path: Path, monkeypatch) -> None:
    release, writing = threading.Event(), threading.Event()
    real_write = storage.write_bytes

    def slow_write(uri: str, data: bytes, s: Settings) -> None:
        writing.set()
        release.wait(10)
        real_write(uri, data, s)

    monkeypatch.setattr(plog.storage, "write_bytes", slow_write)
    config = plog.PredictionLogConfig(uri=str(tmp_path / "log"), max_rows=100, max_seconds=60)
    writer = plog.PredictionLogWriter(config, settings, FEATURES)
    for i in range(50):  # half of max_rows: the writer takes them and is stuck writing
        _append(writer, i, T0.timestamp())
    assert writing.wait(10)
    started = time.perf_counter()
    results = [_append(writer, i, T0.timestamp()) for i in range(50, 300)]
    assert time.perf_counter() - started < 1.0  # the request path did not wait for the stuck write
    assert sum(results) == 50 and writer.dropped_rows == 200  # 50 being written + 50 buffered = max_rows
    release.set()
    writer.close()
    assert writer.written_rows == writer.appended_rows == 100
    assert plog.read_log(config.uri, settings, T0, T0 + timedelta(hours=1)).num_rows == 100


def test_log_buffer_is_invisible_to_the_garbage_collector(settings: Settings, tmp_path: Path) -> None:
    # Every full collection walks what the collector tracks: a buffer of tracked rows made the
    # predictor pause ~10 ms twice a second under load (bench/bench_transactions.py).
    import gc

    config = plog.PredictionLogConfig(uri=str(tmp_path / "log"), max_rows=10_000, max_seconds=3600)
    with plog.PredictionLogWriter(config, settings, FEATURES) as writer:
        for i in range(200):
            _append(writer, i, T0.timestamp(), users=1 + i % 3)
        # Collections untrack tuples of untracked values; an outer tuple met before its inner
        # one waits for the next collection, hence two.
        gc.collect()
        gc.collect()
        with writer._lock:
            tracked = [record for record in writer._buffer if gc.is_tracked(record)]
            assert len(writer._buffer) == 200 and not tracked
    assert writer.written_rows == sum(1 + i % 3 for i in range(200))


def test_log_time_bound_writes_a_quiet_buffer(settings: Settings, tmp_path: Path) -> None:
    config = plog.PredictionLogConfig(uri=str(tmp_path / "log"), max_rows=10_000, max_seconds=0.2)
    writer = plog.PredictionLogWriter(config, settings, FEATURES)
    for i in range(3):
        _append(writer, i, time.time())
    deadline = time.monotonic() + 10
    while writer.written_rows < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert writer.written_rows == 3 and writer.written_files == 1  # written without close or a full buffer
    writer.close()


def test_log_rejects_bad_config_and_rows(settings: Settings, tmp_path: Path) -> None:
    for bad in ({"sample_rate": 1.5}, {"max_rows": 1}, {"max_seconds": 0}, {"uri": ""}):
        with pytest.raises(plog.PredictionLogError):
            plog.PredictionLogConfig(**{"uri": str(tmp_path), **bad})
    with pytest.raises(plog.PredictionLogError, match="clash"):
        plog.log_schema(["score"])
    with pytest.raises(plog.PredictionLogError, match="time zone"):
        plog.read_log(str(tmp_path), settings, datetime(2026, 1, 1), datetime(2026, 1, 2))


def test_log_on_s3(s3_settings: Settings) -> None:
    uri = storage.join(s3_settings.data_uri, "predictions")
    with plog.PredictionLogWriter(plog.PredictionLogConfig(uri=uri), s3_settings, FEATURES) as writer:
        for i in range(20):
            _append(writer, i, T0.timestamp() + i * 300)  # 100 minutes: two hour partitions
    files = storage.list_files(uri, s3_settings)
    assert len(files) == 2 and all("/date=2026-11-30/hour=1" in f for f in files)
    assert plog.read_log(uri, s3_settings, T0, T0 + timedelta(hours=3)).num_rows == 20


CHILD = textwrap.dedent(
    """
    import signal, sys, time
    import numpy as np
    from fraud_common.prediction_log import PredictionLogConfig, PredictionLogWriter
    from fraud_common.settings import Settings

    running = True

    def stop(*_):  # a server's graceful shutdown: stop taking requests, then exit normally
        global running
        running = False

    signal.signal(signal.SIGTERM, stop)
    uri, max_rows = sys.argv[1], int(sys.argv[2])
    writer = PredictionLogWriter(PredictionLogConfig(uri=uri, max_rows=max_rows, max_seconds=3600), Settings.from_env({}), ["a", "b"])
    i = 0
    while running:
        ids = [f"u{i}-{k}" for k in range(10)]
        if writer.append(f"r{i}", ids, np.ones((10, 2), np.float32), np.zeros(10, np.float32), np.zeros(10, bool), "m", "1", 0.001):
            print(writer.appended_rows, flush=True)
        i += 1
        time.sleep(0.0005)
    print("final", writer.appended_rows, flush=True)
    """
)


def _run_child_until_files(tmp_path: Path, max_rows: int, files: int) -> tuple[subprocess.Popen, Path]:
    log_dir = tmp_path / "log"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(log_dir), str(max_rows)],
        stdout=subprocess.PIPE, text=True, env={"FRAUD_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
    )
    deadline = time.monotonic() + 60
    while len(list(log_dir.rglob("*.parquet"))) < files and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert child.poll() is None, "child died"
    return child, log_dir


def _rows_in_files(log_dir: Path) -> int:
    # Every visible file must be a complete Parquet file: reading its footer fails on a torn write.
    return sum(pq.read_metadata(p).num_rows for p in log_dir.rglob("*.parquet"))


def test_log_clean_shutdown_loses_nothing(tmp_path: Path) -> None:
    child, log_dir = _run_child_until_files(tmp_path, max_rows=400, files=2)
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0 and out.splitlines()[-1].startswith("final ")
    appended = int(out.split()[-1])
    assert appended > 0 and _rows_in_files(log_dir) == appended  # the buffered rows were written at exit


def test_log_first_write_at_interpreter_exit(tmp_path: Path) -> None:
    # Nothing written before exit: the exit-time flush is the first write (lazy imports must be done by then).
    code = textwrap.dedent(
        """
        import sys, numpy as np
        from fraud_common.prediction_log import PredictionLogConfig, PredictionLogWriter
        from fraud_common.settings import Settings
        writer = PredictionLogWriter(PredictionLogConfig(uri=sys.argv[1]), Settings.from_env({}), ["a"])
        for i in range(5):
            writer.append(f"r{i}", ["u"], np.ones((1, 1), np.float32), np.zeros(1, np.float32), np.zeros(1, bool), "m", "1", 0.001)
        """
    )
    env = {"FRAUD_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "log")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "not written" not in done.stderr, done.stderr
    assert _rows_in_files(tmp_path / "log") == 5


def test_log_kill_loses_at_most_one_buffer_and_no_file_is_torn(tmp_path: Path) -> None:
    max_rows = 400
    child, log_dir = _run_child_until_files(tmp_path, max_rows=max_rows, files=3)
    child.kill()
    out, _ = child.communicate(timeout=60)
    appended = int(out.split()[-1])  # the last count the child printed before the kill
    written = _rows_in_files(log_dir)
    assert child.returncode == -signal.SIGKILL  # killed: no exit handler ran
    assert appended - max_rows <= written <= appended + 10  # +10: one append may land after its print


# -- feedback ------------------------------------------------------------------------------


def test_roc_auc_by_hand_and_against_scikit_learn() -> None:
    # Positives 0.35, 0.8; negatives 0.1, 0.4: of the 4 pairs, 3 are ordered right -> 0.75.
    assert feedback.roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == 0.75
    assert feedback.roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5  # a tie counts a half
    assert math.isnan(feedback.roc_auc(np.array([1, 1]), np.array([0.1, 0.2])))
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    labels, scores = rng.random(500) < 0.2, np.round(rng.random(500), 2)  # rounding makes ties
    assert feedback.roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def _predictions() -> pd.DataFrame:
    return pd.DataFrame(
        {
            plog.REQUEST_ID: ["a", "b", "c", "d", "e", "batch", "batch"],
            plog.USER_ID: ["u1", "u2", "u3", "u4", "u5", "u6", "u7"],
            plog.SCORED_AT: pd.to_datetime(
                ["2026-11-30T10:05Z", "2026-11-30T10:10Z", "2026-11-30T10:20Z", "2026-11-30T11:05Z",
                 "2026-11-30T11:30Z", "2026-11-30T11:40Z", "2026-11-30T11:40Z"], utc=True),
            plog.SCORE: [0.9, 0.8, 0.1, 0.7, 0.2, 0.6, 0.3],
            plog.DECISION: [True, True, False, True, False, True, False],
        }
    )


def _labels(rows: list[tuple], with_user: bool = False) -> pd.DataFrame:
    columns = [plog.REQUEST_ID, feedback.LABEL, feedback.LABEL_TIME] + ([plog.USER_ID] if with_user else [])
    return feedback.validate_labels(pa.Table.from_pylist([dict(zip(columns, r)) for r in rows]), "test")


def test_join_and_realized_metrics_by_hand() -> None:
    labels = _labels([("a", 1, "2026-12-20"), ("b", 0, "2026-12-20"), ("c", 1, "2026-12-21"), ("d", 1, "2026-12-22"), ("zzz", 1, "2026-12-22")])
    joined = feedback.join(_predictions(), labels)
    assert sorted(joined[plog.REQUEST_ID]) == ["a", "b", "c", "d"]  # "zzz" was never logged
    overall, buckets = feedback.realized_metrics(joined, "1h")
    # Flagged a, b, d; fraud a, c, d -> precision 2/3, recall 2/3. AUC: positives .9,.1,.7 vs negative .8 -> 1/3.
    assert (overall.precision, overall.recall, overall.roc_auc) == (pytest.approx(2 / 3), pytest.approx(2 / 3), pytest.approx(1 / 3))
    # 10:00 bucket: a, b, c -> precision 1/2, recall 1/2; 11:00: d alone -> 1, 1, AUC undefined.
    assert [b.start for b in buckets] == ["2026-11-30T10:00:00+00:00", "2026-11-30T11:00:00+00:00"]
    assert (buckets[0].precision, buckets[0].recall, buckets[0].labelled) == (0.5, 0.5, 3)
    assert (buckets[1].precision, buckets[1].recall) == (1.0, 1.0) and math.isnan(buckets[1].roc_auc)
    assert buckets[1].to_dict()["roc_auc"] is None


def test_batch_labels_need_a_user_id() -> None:
    with pytest.raises(feedback.FeedbackError, match="need a 'user_id' column"):
        feedback.join(_predictions(), _labels([("batch", 1, "2026-12-20")]))
    joined = feedback.join(_predictions(), _labels([("batch", 1, "2026-12-20", "u7")], with_user=True))
    assert joined[plog.USER_ID].tolist() == ["u7"] and joined[plog.SCORE].tolist() == [0.3]


def test_label_files_are_validated_and_the_latest_label_wins(settings: Settings, tmp_path: Path) -> None:
    store = str(tmp_path / "labels")
    first, second = tmp_path / "l1.csv", tmp_path / "l2.csv"
    first.write_text("request_id,label,label_time\n001,0,2026-12-20T00:00:00Z\nb,true,2026-12-20T00:00:00Z\n")
    second.write_text("request_id,label,label_time\n001,1,2026-12-25T00:00:00Z\n")
    feedback.ingest(str(first), store, settings)
    feedback.ingest(str(second), store, settings)
    labels = feedback.load_labels(store, settings).set_index(plog.REQUEST_ID)
    assert labels.loc["001", feedback.LABEL] == 1 and labels.loc["b", feedback.LABEL] == 1  # ids stay strings
    assert len(labels) == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("request_id,label,label_time\na,maybe,2026-12-20\n")
    with pytest.raises(feedback.FeedbackError, match=r"1 labels are not 0/1.*'maybe'"):
        feedback.ingest(str(bad), store, settings)
    bad.write_text("request_id,label\na,1\n")
    with pytest.raises(feedback.FeedbackError, match=r"missing columns \['label_time'\]"):
        feedback.ingest(str(bad), store, settings)
    bad.write_text("request_id,label,label_time\na,1,yesterday\n")
    with pytest.raises(feedback.FeedbackError, match="not timestamps"):
        feedback.ingest(str(bad), store, settings)
    assert feedback.load_labels(str(tmp_path / "nothing"), settings) is None


# -- the monitor command -------------------------------------------------------------------


def _features(rng: np.random.Generator, n: int, drifted: bool) -> dict[str, np.ndarray]:
    """Skewed amounts-like columns and 0/1 flags; drifted: online orders up, distances shifted."""
    columns = {name: rng.lognormal(0.0, 1.0, n) for name in MODEL_FEATURES}
    for name in FLAG_COLUMNS:
        columns[name] = (rng.random(n) < 0.4).astype(float)
    if drifted:
        columns["online_order"] = (rng.random(n) < 0.7).astype(float)
        columns["distance_from_home"] = columns["distance_from_home"] * 2.0
    columns["score"] = rng.beta(1.0, 30.0, n)
    return columns


def _log_window(settings: Settings, uri: str, rng: np.random.Generator, n: int, drifted: bool) -> None:
    columns = _features(rng, n, drifted)
    features = np.column_stack([columns[name] for name in MODEL_FEATURES]).astype(np.float32)
    with plog.PredictionLogWriter(plog.PredictionLogConfig(uri=uri), settings, MODEL_FEATURES) as writer:
        for i in range(n):
            score = columns["score"][i : i + 1]
            writer.append(f"r{i}", [f"user_{i}"], features[i : i + 1], score, score > 0.1, "fraud-detection", "3", 0.001, T0.timestamp() + i)


@pytest.fixture
def reference(tmp_path: Path) -> str:
    """A training reference with a set column (only its train rows count) and a score."""
    rng = np.random.default_rng(11)
    columns = _features(rng, 6000, drifted=False)
    columns["set"] = np.array(["train"] * 5000 + ["test"] * 1000)
    columns["distance_from_home"][5000:] = 1e6  # test rows: would look like drift if they were used
    path = tmp_path / "reference" / "part-0.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table(columns), path)
    return str(path.parent)


@pytest.mark.parametrize("drifted", [False, True])
def test_monitor_flags_drift_and_only_then(settings: Settings, tmp_path: Path, reference: str, capsys, drifted: bool) -> None:
    log_uri, out = str(tmp_path / "log"), tmp_path / "report"
    _log_window(settings, log_uri, np.random.default_rng(5), 3000, drifted)
    code = main(["monitor", "--reference", reference, "--log", log_uri, "--out", str(out),
                 "--start", "2026-11-30T10:00:00Z", "--end", "2026-11-30T12:00:00"], settings)
    result = json.loads((out / "result.json").read_text())
    assert code == (1 if drifted else 0)
    assert result["drift"] is drifted and result["rows"] == 3000 and result["reference_rows"] == 5000
    assert result["drifted_columns"] == (["distance_from_home", "online_order"] if drifted else [])
    by_name = {c["name"]: c for c in result["columns"]}
    assert list(by_name) == [*MODEL_FEATURES, "score"]
    if drifted:
        assert by_name["distance_from_home"]["psi_band"] == "major"
        assert by_name["online_order"]["ks_statistic"] == pytest.approx(0.3, abs=0.04)
    assert all(c["psi"] < 0.1 for name, c in by_name.items() if name not in result["drifted_columns"])
    page = (out / "report.html").read_text()
    assert ("Drift alert: distance_from_home, online_order" in page) is drifted and ("No drift" in page) is not drifted
    assert page.count("data:image/png;base64,") == 3 and "0.1" in page and "0.25" in page
    assert (out / "summary.png").read_bytes().startswith(b"\x89PNG")
    line = capsys.readouterr().out.strip()
    assert line.startswith("Drift alert in 3,000 predictions" if drifted else "No drift in 3,000 predictions")


def test_feedback_then_monitor_reports_realized_metrics(settings: Settings, tmp_path: Path, reference: str, capsys) -> None:
    log_uri, store, out = str(tmp_path / "log"), str(tmp_path / "labels"), tmp_path / "report"
    _log_window(settings, log_uri, np.random.default_rng(5), 1000, drifted=False)
    window = plog.read_log(log_uri, settings, T0, T0 + timedelta(hours=1)).to_pandas()
    labels = pd.DataFrame({"request_id": window["request_id"], "label": (window["score"] > 0.05).astype(int),
                           "label_time": "2026-12-20T00:00:00Z"})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    # The join window runs back from now; the logged rows are from T0, so ask for enough days.
    assert main(["feedback", "--labels", str(tmp_path / "labels.csv"), "--store", store, "--log", log_uri, "--days", "3650"], settings) == 0
    said = capsys.readouterr().out
    assert "Stored 1,000 labels" in said and "1,000 of 1,000 stored labels match" in said and "ROC-AUC 1.000" in said
    assert main(["monitor", "--reference", reference, "--log", log_uri, "--labels", store, "--out", str(out),
                 "--start", "2026-11-30T10:00:00Z", "--hours", "1"], settings) == 0
    performance = json.loads((out / "result.json").read_text())["performance"]
    assert performance["labels_matched"] == 1000 and performance["overall"]["roc_auc"] == 1.0
    expected_recall = ((window["score"] > 0.1) & (window["score"] > 0.05)).sum() / (window["score"] > 0.05).sum()
    assert performance["overall"]["precision"] == 1.0 and performance["overall"]["recall"] == pytest.approx(expected_recall)
    assert [b["start"] for b in performance["buckets"]] == ["2026-11-30T10:00:00+00:00"]
    assert "realized metrics" in (out / "report.html").read_text()


def test_monitor_and_feedback_on_s3(s3_settings: Settings, tmp_path: Path, reference: str, capsys) -> None:
    # Everything on the S3 server: the log, a single-object reference, a single-object label file, the report.
    root = storage.join(s3_settings.data_uri, "monitoring")
    log_uri, ref_uri, labels_uri = (storage.join(root, n) for n in ("predictions", "reference.parquet", "labels.csv"))
    storage.upload(Path(reference) / "part-0.parquet", ref_uri, s3_settings)
    _log_window(s3_settings, log_uri, np.random.default_rng(5), 600, drifted=False)
    storage.write_bytes(labels_uri, b"request_id,label,label_time\nr1,1,2026-12-20T00:00:00Z\nr2,0,2026-12-20T00:00:00Z\n", s3_settings)
    store = storage.join(root, "label-store")
    assert main(["feedback", "--labels", labels_uri, "--store", store, "--log", log_uri, "--days", "3650"], s3_settings) == 0
    out = storage.join(root, "report")
    assert main(["monitor", "--reference", ref_uri, "--log", log_uri, "--labels", store, "--out", out,
                 "--start", "2026-11-30T10:00:00Z", "--hours", "1"], s3_settings) == 0
    result = json.loads(storage.read_bytes(storage.join(out, "result.json"), s3_settings))
    assert result["rows"] == 600 and result["performance"]["labels_matched"] == 2
    assert storage.exists(storage.join(out, "report.html"), s3_settings)
    assert "2 of 2 stored labels match" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--reference", "{tmp}/missing"], "reference not found"),
        (["--reference", "{ref}", "--start", "yesterday"], "'yesterday' is not an ISO 8601 time"),
        (["--reference", "{ref}", "--start", "2026-11-30T10:00:00Z", "--end", "2026-11-30T09:00:00Z"], "is not before its end"),
        (["--reference", "{ref}", "--start", "2026-11-30T10:00:00Z", "--hours", "1"], "0 logged predictions"),
        (["--reference", "{tmp}/notparquet"], "no Parquet files"),
    ],
)
def test_monitor_errors_are_one_line_exit_2(settings: Settings, tmp_path: Path, reference: str, capsys, args, message) -> None:
    (tmp_path / "notparquet").mkdir()
    (tmp_path / "notparquet" / "a.csv").write_text("x\n1\n")
    argv = ["monitor", "--log", str(tmp_path / "empty-log")] + [a.format(tmp=tmp_path, ref=reference) for a in args]
    assert main(argv, settings) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_hook_is_light_and_routes_commands(settings: Settings, tmp_path: Path, capsys) -> None:
    # Building the parser must not load the heavy modules (the CLI imports step code lazily).
    probe = "import sys, monitoring.main; print(sorted(m for m in ('scipy', 'matplotlib', 'pandas') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
    # The way pipeline/cli.py wires it: its own parser, its own settings, its own name in errors.
    import argparse

    parser = argparse.ArgumentParser(prog="fraud-detection")
    add_commands(parser.add_subparsers(dest="command", required=True), lambda args: settings, prog="fraud-detection")
    args = parser.parse_args(["feedback", "--labels", str(tmp_path / "none.csv")])
    assert args.func(args) == 2
    assert capsys.readouterr().err == f"fraud-detection feedback: no label file (.csv or .parquet) at {tmp_path / 'none.csv'}\n"
