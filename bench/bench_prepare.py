"""Benchmark of data preparation at full scale: validation + Spark, wall time and peak memory.

    uv run python bench/bench_prepare.py [--users 1000000] [--data /work/bench-data]

The raw data is made once by the project's generator (1-34 history rows per user, ~17.5 on
average) and cached under --data (outside the repository). The label time is the one the
generator recorded. Figures go to stdout and to bench/results/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from fraud_common import schemas
from fraud_common.logs import setup_logging
from fraud_common.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results" / "prepare.json"


def ensure_data(data_dir: Path, users: int, seed: int) -> Path:
    """The raw folder for this size, made on first use (again when its manifest is missing or
    its files predate the train, test, validate numbering)."""
    from synthetic_data_generation.generate import generate

    raw = data_dir / f"users-{users}-seed-{seed}" / "raw"
    names = [name for _, name in schemas.SPLIT_FILES] + [schemas.HISTORY_FILE, schemas.RAW_MANIFEST_FILE]
    if all((raw / name).exists() for name in names):
        return raw
    started = time.perf_counter()
    generate(raw, users, seed, False)
    print(f"made data in {time.perf_counter() - started:.1f}s at {raw}", file=sys.stderr)
    return raw


class PeakRss:
    """Samples the RSS of this process plus its children (the Spark JVM) while it runs."""

    def __init__(self, interval: float = 0.5) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        try:
            import psutil
        except ImportError:
            return
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                total = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            self._stop.wait(interval)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _stop_jvm() -> None:
    """Stop Spark and wait for the JVM child to exit (pyspark keeps it until Python exits)."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    gateway = SparkContext._gateway  # noqa: SLF001 - a benchmark may look inside
    session = SparkSession.getActiveSession()
    if session is not None:
        session.stop()
    proc = getattr(gateway, "proc", None)
    if gateway is not None:
        gateway.shutdown()
    if proc is not None:
        proc.stdin.close()  # the JVM exits when its stdin closes
        proc.wait(timeout=60)


def file_bytes(raw: Path) -> int:
    return sum((raw / name).stat().st_size for name in [f for _, f in schemas.SPLIT_FILES] + [schemas.HISTORY_FILE])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--data", default="/work/bench-data", help="cache folder for raw data and output")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    setup_logging(settings.log_level)

    raw = ensure_data(Path(args.data), args.users, args.seed)
    out = raw.parent / "prepared"
    from data_preparation.main import prepare

    started = time.perf_counter()
    with PeakRss() as sampler:
        report = prepare(str(raw), str(out), settings)
    wall = time.perf_counter() - started
    _stop_jvm()  # so that RUSAGE_CHILDREN includes the JVM's peak
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    self_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    label_rows = sum(report.rows_per_split.values())
    result = {
        "benchmark": "prepare",
        "users": args.users,
        "label_rows": label_rows,
        "history_rows": report.history_rows,
        "input_bytes": file_bytes(raw),
        "wall_seconds": round(wall, 2),
        "validation_seconds": round(report.validation_seconds, 2),
        "spark_seconds": round(report.seconds - report.validation_seconds, 2),
        "history_rows_per_second": round(report.history_rows / wall),
        "label_rows_per_second": round(label_rows / wall),
        "users_without_history": report.users_without_history,
        "label_time": report.label_time,
        "label_time_source": report.label_time_source,
        "counted_history_rows": report.counted_history_rows,
        "dropped_history_rows": report.dropped_history_rows,
        "rows_per_split": report.rows_per_split,
        # Sampled python + JVM total (psutil); ru_maxrss: this process, and the largest child (the JVM).
        "peak_rss_sampled_bytes": sampler.peak or None,
        "peak_rss_self_bytes": self_peak,
        "peak_rss_children_bytes": children_peak,
        "loadavg": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": str(raw),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
