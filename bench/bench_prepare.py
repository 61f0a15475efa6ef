"""Benchmark of data preparation at full scale: validation + Spark, wall time and peak memory.

    uv run python bench/bench_prepare.py [--users 1000000] [--data /work/bench-data] [--own-generator]

The raw data is cached under --data (outside the repository) and made once: by the project's
generator when it is installed, else (or with --own-generator) by a quick numpy maker below that
writes files of the same shape (1-34 history rows per user, ~17.5 per user on average).
Figures go to stdout and to bench/results/prepare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from fraud_common import schemas
from fraud_common.logs import setup_logging
from fraud_common.settings import Settings

RESULTS = Path(__file__).resolve().parent / "results" / "prepare.json"
SPLIT_SHARES = (0.8, 0.1, 0.1)
CHUNK_USERS = 100_000


def _label_table(rng: np.random.Generator, rows: int) -> pa.Table:
    """Label rows with roughly the public data set's marginals (values matter little here)."""
    columns = {
        "distance_from_home": np.round(rng.lognormal(2.3, 1.2, rows), 6),
        "distance_from_last_transaction": np.round(rng.lognormal(0.0, 1.4, rows), 6),
        "ratio_to_median_purchase_price": np.round(rng.lognormal(0.0, 0.9, rows), 6),
        "repeat_retailer": (rng.random(rows) < 0.88).astype(float),
        "used_chip": (rng.random(rows) < 0.35).astype(float),
        "used_pin_number": (rng.random(rows) < 0.10).astype(float),
        "online_order": (rng.random(rows) < 0.65).astype(float),
        "fraud": (rng.random(rows) < 0.087).astype(float),
    }
    return pa.table({name: columns[name] for name in schemas.LABEL_COLUMNS})


def _history_chunk(rng: np.random.Generator, first_user: int, users: int, label_time: datetime) -> pa.Table:
    """History rows of users [first_user, first_user + users): 1-34 each, ~3% after the label time."""
    per_user = rng.integers(1, 35, users)
    user_index = np.repeat(np.arange(first_user, first_user + users), per_user)
    rows = len(user_index)
    label_us = int(label_time.timestamp() * 1_000_000)
    offsets_us = rng.integers(-365 * 86_400_000_000, 10 * 86_400_000_000, rows)
    when = pa.array(label_us + offsets_us, pa.timestamp("us"))
    created = pa.array(label_us + offsets_us + rng.integers(0, 3_600_000_000, rows), pa.timestamp("us"))
    user_ids = pc.binary_join_element_wise("user_", pc.cast(pa.array(user_index), pa.string()), "")
    tokens = pa.array([str(uuid.UUID(int=int(x))) for x in rng.integers(0, 2**62, users)])
    cities = pa.array(["New York", "Los Angeles", "Chicago", "Houston", "Phoenix", "Philadelphia",
                       "San Antonio", "San Diego", "Dallas", "San Jose"])
    states = pa.array(["NY", "CA", "IL", "TX", "AZ", "PA", "TX", "CA", "TX", "CA"])
    city_index = pa.array(rng.integers(0, 10, rows))
    table = {
        "user_id": user_ids,
        "created": created,
        "updated": created,
        "date_of_transaction": when,
        "transaction_amount": np.round(rng.uniform(10, 1000, rows), 2),
        "transaction_category": pc.take(pa.array([f"category_{i}" for i in range(10)]), pa.array(rng.integers(0, 10, rows))),
        "card_token": pc.take(tokens, pa.array(user_index - first_user)),
        "city": pc.take(cities, city_index),
        "state": pc.take(states, city_index),
    }
    return pa.table({name: table[name] for name in schemas.HISTORY_COLUMNS})


def make_own_data(raw: Path, users: int, seed: int) -> None:
    """Write the four raw CSVs with numpy/pyarrow (fast stand-in for the project's generator)."""
    rng = np.random.default_rng(seed)
    label_time = datetime.fromisoformat(schemas.DEFAULT_LABEL_TIME)
    raw.mkdir(parents=True, exist_ok=True)
    counts = [int(users * share) for share in SPLIT_SHARES]
    counts[0] += users - sum(counts)
    for (_, file_name), rows in zip(schemas.SPLIT_FILES, counts, strict=True):
        pacsv.write_csv(_label_table(rng, rows), raw / file_name)
    tmp = raw / (schemas.HISTORY_FILE + ".tmp")
    writer = None
    for first in range(0, users, CHUNK_USERS):
        chunk = _history_chunk(rng, first, min(CHUNK_USERS, users - first), label_time)
        if writer is None:
            writer = pacsv.CSVWriter(tmp, chunk.schema, write_options=pacsv.WriteOptions(quoting_style="none"))
        writer.write_table(chunk)
    assert writer is not None
    writer.close()
    tmp.replace(raw / schemas.HISTORY_FILE)


def ensure_data(data_dir: Path, users: int, seed: int, own_generator: bool) -> Path:
    """The raw folder for this size, made on first use."""
    raw = data_dir / f"users-{users}-seed-{seed}{'-own' if own_generator else ''}" / "raw"
    if all((raw / name).exists() for _, name in schemas.SPLIT_FILES) and (raw / schemas.HISTORY_FILE).exists():
        return raw
    started = time.perf_counter()
    if not own_generator:
        try:
            from synthetic_data_generation.generate import generate
        except ImportError:
            print("project generator not found; using the numpy maker", file=sys.stderr)
            own_generator = True
    if own_generator:
        make_own_data(raw, users, seed)
    else:
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
    parser.add_argument("--own-generator", action="store_true", help="use the numpy maker in this script")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    setup_logging(settings.log_level)

    raw = ensure_data(Path(args.data), args.users, args.seed, args.own_generator)
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
