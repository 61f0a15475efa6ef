"""Bench: the drift report over 1M logged predictions, and the prediction log writer's cost.

    uv run python bench/bench_monitoring.py                 # 1M logged rows, 800k reference rows
    uv run python bench/bench_monitoring.py --rows 100000   # smaller

Report: the log is written as the writer writes it (hourly Parquet files over 24 hours), the
reference is a Parquet file with the model's features and a score; the figure is the wall time of
``monitoring.monitor.monitor`` (read, statistics) plus ``write_report`` (plots, HTML, PNG, JSON),
split into those parts. Peer in the same run: one column's KS + Wasserstein as the report
computes them (one pass over the sorted samples) against scipy's ``ks_2samp`` +
``wasserstein_distance`` on the same 1M/800k rows.

Writer (in process, no server): the cost of ``append`` per request on the request path, against
its peers in the same run: the same loop with the log sampled off (``sample_rate=0``, the early
return) and with no log at all; the writer thread's cost per row (Arrow columns + zstd Parquet +
atomic write); and the sustained rate end to end (appends until every row is in a file). The
predictor-level cost (p99 at concurrency 1, throughput at 16, log on vs off) needs the wired
predictor and is not measured here.

Writes bench/results/monitoring.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "monitoring.json"
T0 = datetime(2026, 11, 30, 0, 0, tzinfo=timezone.utc)


def synthetic_columns(rng: np.random.Generator, n: int, drifted: bool) -> dict[str, np.ndarray]:
    """Skewed float columns, 0/1 flags and a score; drifted: online orders up, distances doubled."""
    from fraud_common.schemas import FLAG_COLUMNS, MODEL_FEATURES

    columns = {name: rng.lognormal(0.0, 1.0, n).astype(np.float32) for name in MODEL_FEATURES}
    for name in FLAG_COLUMNS:
        columns[name] = (rng.random(n) < 0.4).astype(np.float32)
    if drifted:
        columns["online_order"] = (rng.random(n) < 0.7).astype(np.float32)
        columns["distance_from_home"] *= 2.0
    columns["score"] = rng.beta(1.0, 30.0, n).astype(np.float32)
    return columns


def write_log(settings, uri: str, rows: int, rng: np.random.Generator) -> float:  # noqa: ANN001
    """Log ``rows`` predictions spread over 24 h through the writer (batches of 1000 users); seconds."""
    from fraud_common.prediction_log import PredictionLogConfig, PredictionLogWriter
    from fraud_common.schemas import MODEL_FEATURES

    columns = synthetic_columns(rng, rows, drifted=True)
    features = np.column_stack([columns[name] for name in MODEL_FEATURES])
    batch = 1000
    started = time.perf_counter()
    config = PredictionLogConfig(uri=uri, max_rows=200_000, max_seconds=60)
    with PredictionLogWriter(config, settings, MODEL_FEATURES) as writer:
        for i, lo in enumerate(range(0, rows, batch)):
            hi = min(rows, lo + batch)
            while not writer.append(
                f"req-{i}", [f"user_{j}" for j in range(lo, hi)], features[lo:hi], columns["score"][lo:hi],
                columns["score"][lo:hi] > 0.1, "fraud-detection", "3", 0.002,
                T0.timestamp() + 86_400 * lo / rows,
            ):
                time.sleep(0.01)  # buffer full: the bench waits, the predictor would drop
    return time.perf_counter() - started


def bench_report(rows: int, reference_rows: int, scratch: Path) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fraud_common.settings import Settings
    from monitoring.monitor import monitor
    from monitoring.report import write_report

    settings = Settings.from_env({"FRAUD_HOME": str(scratch / "home")})
    rng = np.random.default_rng(0)
    reference = scratch / "reference.parquet"
    pq.write_table(pa.table(synthetic_columns(rng, reference_rows, drifted=False)), reference)
    log_uri = str(scratch / "log")
    log_seconds = write_log(settings, log_uri, rows, rng)
    files = list(Path(log_uri).rglob("*.parquet"))
    started = time.perf_counter()
    result = monitor(log_uri, str(reference), T0, T0 + timedelta(hours=24), settings)
    analysed = time.perf_counter()
    paths = write_report(result, str(scratch / "report"), settings)
    done = time.perf_counter()
    return {
        "logged_rows": result.rows,
        "reference_rows": result.reference_rows,
        "log_files": len(files),
        "log_bytes": sum(f.stat().st_size for f in files),
        "log_bytes_per_row": round(sum(f.stat().st_size for f in files) / rows, 1),
        "seconds_to_write_log_through_writer": round(log_seconds, 2),
        "report_wall_seconds": round(done - started, 2),
        "read_and_statistics_seconds": round(analysed - started, 2),
        "plots_and_files_seconds": round(done - analysed, 2),
        "drifted_columns_found": result.drifted,
        "html_bytes": Path(paths["html"]).stat().st_size,
    }


def bench_statistics_peer(rows: int, reference_rows: int) -> dict:
    """One skewed column: KS + Wasserstein as the report computes them vs scipy's functions, same data."""
    from scipy import stats

    from monitoring.drift import ecdf_distances, ks_pvalue

    rng = np.random.default_rng(1)
    reference, current = rng.lognormal(0, 1, reference_rows), rng.lognormal(0.1, 1, rows)
    started = time.perf_counter()
    ref_sorted, cur_sorted = np.sort(reference), np.sort(current)
    d, w = ecdf_distances(ref_sorted, cur_sorted)
    ks_pvalue(d, reference.size, current.size)
    ours = time.perf_counter() - started
    started = time.perf_counter()
    ks = stats.ks_2samp(reference, current)
    w_scipy = stats.wasserstein_distance(reference, current)
    theirs = time.perf_counter() - started
    return {
        "rows": rows, "reference_rows": reference_rows,
        "one_pass_seconds": round(ours, 3), "scipy_ks_2samp_plus_wasserstein_seconds": round(theirs, 3),
        "same_values": bool(abs(d - ks.statistic) < 1e-12 and abs(w - w_scipy) < 1e-9 * max(1.0, w_scipy)),
    }


def bench_writer(requests: int, scratch: Path) -> dict:
    from fraud_common.prediction_log import PredictionLogConfig, PredictionLogWriter
    from fraud_common.schemas import MODEL_FEATURES
    from fraud_common.settings import Settings

    settings = Settings.from_env({"FRAUD_HOME": str(scratch / "home")})
    n_features = len(MODEL_FEATURES)

    def request_arrays(i: int):  # what the predictor builds per request anyway
        return [f"user_{i}"], np.ones((1, n_features), np.float32), np.full((1, 1), 0.01, np.float32)

    def loop(writer: PredictionLogWriter | None) -> float:
        kept = 0
        started = time.perf_counter()
        for i in range(requests):
            users, feats, scores = request_arrays(i)
            if writer is not None:
                kept += writer.append(f"req-{i}", users, feats, scores, scores[:, 0] > 0.5, "fraud-detection", "3", 0.002)
        return time.perf_counter() - started

    no_log = loop(None)
    with PredictionLogWriter(PredictionLogConfig(uri=str(scratch / "off"), sample_rate=0.0), settings, MODEL_FEATURES) as off:
        sampled_off = loop(off)
    # max_rows above the request count: the loop measures append, not drops.
    config = PredictionLogConfig(uri=str(scratch / "on"), max_rows=2 * requests, max_seconds=60)
    cpu_started = time.process_time()
    writer = PredictionLogWriter(config, settings, MODEL_FEATURES)
    on = loop(writer)
    close_started = time.perf_counter()
    writer.close()
    drained = time.perf_counter() - close_started
    cpu = time.process_time() - cpu_started
    # The writer thread's work per row, timed alone on one full buffer of single-row requests.
    probe = PredictionLogWriter(PredictionLogConfig(uri=str(scratch / "probe"), max_rows=100_000, max_seconds=3600), settings, MODEL_FEATURES)
    for i in range(20_000):
        users, feats, scores = request_arrays(i)
        probe.append(f"req-{i}", users, feats, scores, scores[:, 0] > 0.5, "fraud-detection", "3", 0.002)
    with probe._lock:  # noqa: SLF001 - the bench times the writer's own step
        batch = probe._take()  # noqa: SLF001
    write_started = time.perf_counter()
    probe._write(batch)  # noqa: SLF001
    write_seconds = time.perf_counter() - write_started
    probe.close()
    return {
        "requests": requests,
        "rows_per_request": 1,
        "loop_without_log_us_per_request": round(1e6 * no_log / requests, 2),
        "loop_log_sampled_off_us_per_request": round(1e6 * sampled_off / requests, 2),
        "loop_log_on_us_per_request": round(1e6 * on / requests, 2),
        "append_cost_us_per_request": round(1e6 * (on - no_log) / requests, 2),
        "writer_thread_us_per_row": round(1e6 * write_seconds / 20_000, 2),
        "sustained_rows_per_second_until_in_files": round(writer.written_rows / (on + drained)),
        "process_cpu_us_per_row_total": round(1e6 * cpu / writer.written_rows, 2),
        "written_rows": writer.written_rows,
        "dropped_rows": writer.dropped_rows,
        "files": writer.written_files,
    }


# What the monitoring step needs beyond fraud-common (which already brings numpy, pandas, pyarrow).
ADDED_DISTRIBUTIONS = (
    "scipy", "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pillow", "pyparsing", "prometheus-client",
)


def install_size_mb() -> dict:
    """Installed size of the distributions the monitoring step adds to a fraud-common image (RECORD files)."""
    from importlib import metadata

    sizes = {}
    for name in ADDED_DISTRIBUTIONS:
        dist = metadata.distribution(name)
        total = sum((Path(dist.locate_file(f)).stat().st_size for f in dist.files or [] if Path(dist.locate_file(f)).is_file()))
        sizes[name] = round(total / 2**20, 1)
    return {"per_distribution_mb": sizes, "total_mb": round(sum(sizes.values()), 1),
            "added_to_the_workspace_lock": 0,
            "note": "all already locked (scipy and matplotlib through train, prometheus-client through the predictor): "
            "uv sync installs nothing new; counted for a monitoring-only image, which also carries fraud-pipeline "
            "(kfp, for the KFP executor) like the train image; that image was not built here"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="logged predictions in the report's window")
    parser.add_argument("--reference-rows", type=int, default=800_000, help="reference (training) rows")
    parser.add_argument("--requests", type=int, default=200_000, help="single-row appends for the writer figures")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from fraud_common.logs import setup_logging

    setup_logging("ERROR")  # the log-writing phase fills its buffer on purpose (it waits, then retries)
    with tempfile.TemporaryDirectory(prefix="bench-monitoring-") as scratch:
        writer = bench_writer(args.requests, Path(scratch))
        print(json.dumps(writer, indent=2), flush=True)
        report = bench_report(args.rows, args.reference_rows, Path(scratch))
        print(json.dumps(report, indent=2), flush=True)
        peer = bench_statistics_peer(args.rows, args.reference_rows)
        print(json.dumps(peer, indent=2), flush=True)
    result = {
        "bench": "monitoring",
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 1)},
        "report": report,
        "statistics_per_column": peer,
        "install_size": install_size_mb(),
        "writer": writer,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
