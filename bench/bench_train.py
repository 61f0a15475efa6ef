"""Bench: training + calibration + evaluation (network and reference) + ONNX export at full scale.

Target: at most 180 s wall for 800k train / 100k valid / 100k test rows on a 2-core machine.

    uv run python bench/bench_train.py --dataset training.parquet   # retrieval output
    uv run python bench/bench_train.py                              # 1M generated users

Writes bench/results/train.json.
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

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared test helper
TARGET_SECONDS = 180.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, help="training frame (Parquet) in the retrieval output format")
    parser.add_argument("--data-uri", help="a data root with prepared/ features: the training set is built "
                        "from it by Feast's historical retrieval first (timed separately)")
    parser.add_argument("--rows", type=int, default=1_000_000, help="generated users when --dataset is absent")
    parser.add_argument("--max-epochs", type=int, default=None, help="override TrainConfig.max_epochs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from fraud_common.logs import setup_logging
    from fraud_common.settings import Settings
    from train.train import TrainConfig, run_training

    setup_logging("INFO")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        settings = Settings.from_env({"FRAUD_HOME": str(Path(scratch) / "home")})
        retrieval_seconds = None
        if args.data_uri is not None:
            from feature_engineering.feast_feature_engineering import retrieve_training_data

            settings = settings.with_overrides(data_uri=args.data_uri.rstrip("/"))
            dataset = Path(scratch) / "training_set.parquet"
            started = time.perf_counter()
            retrieve_training_data(settings, out_path=dataset)
            retrieval_seconds = round(time.perf_counter() - started, 2)
            source = f"Feast historical retrieval over {args.data_uri}/prepared"
        elif args.dataset is not None:
            dataset, source = args.dataset, f"dataset {args.dataset}"
        else:
            from helpers import training_frame

            print(f"no --dataset given: generating {args.rows:,} users with the product generator "
                  "(point-in-time features by tests/helpers.py); figures are for synthetic data", flush=True)
            dataset = Path(scratch) / "synthetic.parquet"
            training_frame(args.rows, seed=0).to_parquet(dataset)
            source = f"generated ({args.rows} users, synthetic_data_generation seed 0)"
        config = TrainConfig() if args.max_epochs is None else TrainConfig(max_epochs=args.max_epochs)
        load_before = os.getloadavg()
        started = time.perf_counter()
        outcome = run_training(dataset, Path(scratch) / "out", settings, config)
        wall = time.perf_counter() - started
        load_after = os.getloadavg()

    metrics = outcome.metrics
    rows = sum(metrics["rows"].values())
    result = {
        "bench": "train",
        "source": source,
        "rows": metrics["rows"],
        "wall_seconds": round(wall, 2),
        "retrieval_seconds_not_in_wall": retrieval_seconds,
        "target_seconds": TARGET_SECONDS,
        "within_target": wall <= TARGET_SECONDS,
        "network_train_seconds": round(metrics["timing"]["network_train_seconds"], 2),
        "reference_seconds": round(metrics["timing"]["reference_seconds"], 2),
        "rows_per_second": round(rows / wall, 1),
        "epochs_run": metrics["training"]["epochs_run"],
        "network": {k: metrics[k] for k in ("roc_auc", "pr_auc", "brier", "precision", "recall", "f1", "threshold")},
        "network_uncalibrated": metrics["uncalibrated"],
        "calibration": metrics["calibration"],
        "reference": {
            k: metrics["reference"][k]
            for k in ("roc_auc", "pr_auc", "brier", "precision", "recall", "f1", "threshold", "iterations")
        },
        "reference_gap": metrics["reference_gap"],
        "meets_reference": metrics["meets_reference"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "cpu_count": os.cpu_count(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(args.out)
    print(f"source: {source}")
    print(f"rows train/valid/test: {metrics['rows']['train']}/{metrics['rows']['valid']}/{metrics['rows']['test']}")
    print(f"train+eval wall: {wall:.1f} s (target {TARGET_SECONDS:.0f} s; network {result['network_train_seconds']} s, "
          f"reference {result['reference_seconds']} s, {result['epochs_run']} epochs)")
    before = metrics["uncalibrated"]
    print(f"network   test ROC-AUC {metrics['roc_auc']:.4f}  PR-AUC {metrics['pr_auc']:.4f}  Brier {metrics['brier']:.5f}"
          f"  threshold {metrics['threshold']:.4f}  ({metrics['calibration']['method']}-calibrated on valid)")
    print(f"  before calibration: ROC-AUC {before['roc_auc']:.4f}  PR-AUC {before['pr_auc']:.4f}"
          f"  Brier {before['brier']:.5f}  threshold {before['threshold']:.4f}")
    print(f"reference test ROC-AUC {metrics['reference']['roc_auc']:.4f}  PR-AUC {metrics['reference']['pr_auc']:.4f}"
          f"  Brier {metrics['reference']['brier']:.5f}"
          f"  (gap {metrics['reference_gap']:+.4f}, target ≤ 0.005: {'met' if metrics['meets_reference'] else 'NOT met'})")
    print(f"peak RSS {result['peak_rss_mb']} MB; load {load_before[0]:.2f} → {load_after[0]:.2f} on {os.cpu_count()} cores")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
