"""Benchmark of the synthetic data generator, plus a check of how learnable its labels are.

    uv run python bench/bench_generate.py                  # 1,000,000 users + quality check
    uv run python bench/bench_generate.py --users 200000 --quality-users 0

Target: 1,000,000 users (about 17.5 million history rows) in at most 60 s wall and 4 GB peak RSS
on a 2-core machine. The quality check takes ``--quality-users`` generated users with their
point-in-time history aggregates (``tests/helpers.py``: the generator's rows, aggregated in
pandas), fits scikit-learn's HistGradientBoostingClassifier on the train split and reports test
ROC-AUC with and without the history features.
Figures go to stdout and to bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from fraud_common import schemas
from synthetic_data_generation.generate import generate

RESULTS = Path(__file__).resolve().parent / "results" / "generate.json"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared test helper


def peak_rss_mb() -> dict[str, float]:
    """Peak resident set size of this process and of its largest child (MiB; Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"self_mb": round(own, 1), "largest_child_mb": round(children, 1)}


def bench_generation(users: int, out_root: Path, seed: int) -> dict[str, object]:
    """Generate ``users`` users and time it."""
    out_dir = out_root / "raw"
    started = time.perf_counter()
    report = generate(out_dir, users=users, seed=seed, progress=False)
    wall = time.perf_counter() - started
    history_rows = report.rows[schemas.HISTORY_FILE]
    total_rows = sum(report.rows.values())
    sizes = {name: path.stat().st_size for name, path in report.paths.items()}
    rss = peak_rss_mb()
    # Forkserver workers are not our direct children: they report their own peak.
    rss["largest_worker_mb"] = round(report.worker_peak_rss_mb, 1)
    return {
        "users": users,
        "wall_seconds": round(wall, 2),
        "rows": report.rows,
        "rows_per_second": round(total_rows / wall),
        "history_rows_per_second": round(history_rows / wall),
        "bytes_written": sum(sizes.values()),
        "mb_per_second": round(sum(sizes.values()) / wall / 1e6, 1),
        "peak_rss": rss,
        "workers": report.workers,
        # The parent and the workers run at the same time, so their sum bounds the total.
        "peak_rss_upper_bound_mb": round(rss["self_mb"] + report.workers * max(rss["largest_worker_mb"], rss["largest_child_mb"]), 1),
        "fraud_rate": round(report.fraud_rate, 4),
        "post_label_rows": report.post_label_rows,
    }


def quality_check(users: int, seed: int) -> dict[str, object]:
    """Test ROC-AUC of a gradient-boosted model with and without the history features."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    from helpers import label_features

    data = label_features(users, seed)
    train = data[data[schemas.SET_COLUMN] == "train"]
    test = data[data[schemas.SET_COLUMN] == "test"]
    label_only = list(schemas.FLOAT_COLUMNS + schemas.FLAG_COLUMNS)
    with_history = list(schemas.MODEL_FEATURES)
    result: dict[str, object] = {"users": users, "test_rows": len(test), "test_fraud_rate": round(float(test[schemas.LABEL].mean()), 4)}
    for name, columns in (("roc_auc_label_features", label_only), ("roc_auc_with_history", with_history)):
        model = HistGradientBoostingClassifier(max_iter=300, random_state=0)
        model.fit(train[columns], train[schemas.LABEL])
        result[name] = round(float(roc_auc_score(test[schemas.LABEL], model.predict_proba(test[columns])[:, 1])), 4)
    fraud = data[schemas.LABEL] == 1
    result["mean_history_features_fraud_vs_not"] = {
        column: [round(float(data.loc[fraud, column].mean()), 2), round(float(data.loc[~fraud, column].mean()), 2)]
        for column in schemas.HISTORY_FEATURES
    }
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--quality-users", type=int, default=100_000, help="0 skips the ROC-AUC check")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)

    out_root = args.out or Path(tempfile.mkdtemp(prefix="bench-generate-"))
    try:
        figures: dict[str, object] = {
            "name": "generate",
            "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(),
            "loadavg_before": os.getloadavg(),
            "target": {"users": 1_000_000, "max_wall_seconds": 60, "max_peak_rss_mb": 4096},
        }
        figures["generation"] = bench_generation(args.users, out_root, args.seed)
        figures["loadavg_after_generation"] = os.getloadavg()
        shutil.rmtree(out_root / "raw", ignore_errors=True)
        if args.quality_users:
            figures["quality"] = quality_check(args.quality_users, args.seed)
    finally:
        if args.out is None:
            shutil.rmtree(out_root, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(figures, indent=2) + "\n")
    tmp.replace(RESULTS)
    json.dump(figures, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
