"""Bench: Feast apply + materialize and historical retrieval on synthetic prepared Parquet.

Usage: uv run python bench/bench_feature_store.py [--rows 50000 1000000] [--no-retrieve]
Writes bench/results/feast_feature_store.json. Each size runs in a fresh temporary FRAUD_HOME.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


from fraud_common.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results" / "feast_feature_store.json"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared test helper


def write_prepared(root: Path, rows: int, seed: int = 0) -> None:
    """Prepared features and entities as data preparation writes them, from ``rows`` generated users."""
    from helpers import label_features, write_prepared as write_frames

    write_frames(root, label_features(rows, seed))


def run(rows: int, retrieve: bool) -> dict:
    from feature_engineering.feast_feature_engineering import apply_and_materialize, retrieve_training_data
    from fraud_common.feature_store import fetch_snapshot, publish_snapshot

    with tempfile.TemporaryDirectory(prefix="feast-bench-") as tmp:
        settings = Settings.from_env({"FRAUD_HOME": tmp})
        write_prepared(Path(settings.data_uri), rows)
        report = apply_and_materialize(settings)
        result = {"rows": rows, **report.to_dict()}
        rerun = apply_and_materialize(settings)
        result["rerun_materialize_seconds"] = rerun.materialize_seconds
        result["rerun_rows_in_window"] = rerun.rows_in_window
        result["online_store_bytes"] = (Path(settings.feast_dir) / "online_store.db").stat().st_size
        # What each pipeline run adds: the feature step publishes the store as its artifact, the
        # serve step (and each predictor pod) fetches that snapshot.
        snapshot = Path(tmp) / "snapshot"
        started = time.perf_counter()
        publish_snapshot(settings, str(snapshot))
        result["publish_snapshot_seconds"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        fetch_snapshot(str(snapshot), settings.with_overrides(feast_dir=str(Path(tmp) / "fetched")))
        result["fetch_snapshot_seconds"] = round(time.perf_counter() - started, 3)
        if retrieve:
            started = time.perf_counter()
            frame = retrieve_training_data(settings)
            seconds = time.perf_counter() - started
            result["retrieve_seconds"] = round(seconds, 3)
            result["retrieve_rows_per_second"] = round(len(frame) / seconds, 1)
        # Process-wide peak so far: run one size per invocation for a per-size figure.
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 1_000_000])
    parser.add_argument("--no-retrieve", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    runs = []
    for rows in args.rows:
        runs.append(run(rows, not args.no_retrieve))
        print(json.dumps(runs[-1]), flush=True)
    # Keep earlier runs of other sizes, so 50k and 1M can be measured separately.
    previous = json.loads(RESULTS.read_text()).get("runs", []) if RESULTS.exists() else []
    measured = {run["rows"] for run in runs}
    runs = sorted([r for r in previous if r["rows"] not in measured] + runs, key=lambda r: r["rows"])
    out = {
        "name": "feast_feature_store",
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loadavg": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "note": "shared, busy machine: figures are pessimistic; apply_seconds includes importing Feast",
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
