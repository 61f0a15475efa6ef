"""What the prediction log costs the predictor: the same run with the log on and off.

    uv run python bench/bench_prediction_log.py [--home FRAUD_HOME] [--users 50000] [--rounds 3]
                                                [--c1-duration 10] [--duration 20] [--concurrency 16]

Two predictor subprocesses over the same state, both up at once: one writes the prediction log
(``FRAUD_PREDICTION_LOG_URI`` a temporary folder, sample rate 1, the default buffers), one has it
off. Load phases alternate between them (which goes first alternates per round, so a change in
background load weighs on both), at concurrency 1 (p99) and at ``--concurrency`` (throughput),
with ``bench/bench_serve.py``'s clients (wrk if installed, else aiohttp). The issue's bound: the
log costs at most 10% on p99 at c1 and on throughput at c16. Both servers are restarted every
round, in alternating order. After each stop (SIGTERM, a clean shutdown), every answered request
of the logging server must be in the log's files.

Results go to stdout and bench/results/prediction_log.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import bench_serve  # noqa: E402 - the serving bench's server start, clients and summaries

RESULTS = REPO / "bench" / "results" / "prediction_log.json"
MODES = ("log_off", "log_on")


def start(home: Path, mode: str, log_dir: Path) -> tuple[subprocess.Popen, int]:
    """A predictor with the log on (under ``log_dir``) or off; returns it and its port."""
    port = bench_serve.free_port()
    saved = dict(os.environ)
    os.environ["FRAUD_PREDICTION_LOG_URI"] = str(log_dir) if mode == "log_on" else "off"
    try:
        proc = bench_serve.start_server(home, port, Path(tempfile.gettempdir()) / f"bench-plog-{mode}-{port}.log", "auto")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return proc, port


def in_process_cost(home: Path, n_users: int, log_dir: Path, rounds: int = 7, calls: int = 2000) -> dict:
    """CPU microseconds per ``preprocess`` + ``predict`` in this process, with the log's step on and
    off in turn on one loaded predictor (the median over ``rounds``): the log's own cost on the
    request path, free of the differences between two server processes."""
    import random
    import statistics

    from fraud_common.settings import Settings
    from rest_predictor.predictor import FraudPredictor
    from rest_predictor.served_log import ServedLog

    settings = Settings.from_env({"FRAUD_HOME": str(home), "FRAUD_LOG_LEVEL": "WARNING",
                                  "FRAUD_PREDICTION_LOG_URI": str(log_dir.parent / "in-process")})
    predictor = FraudPredictor(settings)
    predictor.load()
    logging_step, silent_step = predictor.served_log, ServedLog(None)
    users = [f"user_{random.randrange(n_users)}" for _ in range(calls)]
    samples: dict[str, list[float]] = {"log_on": [], "log_off": []}
    for round_no in range(rounds):
        for mode in (("log_on", "log_off") if round_no % 2 == 0 else ("log_off", "log_on")):
            predictor.served_log = logging_step if mode == "log_on" else silent_step
            started = time.process_time()
            for user in users:
                predictor.predict(predictor.preprocess({"user_id": user}))
            samples[mode].append((time.process_time() - started) / calls * 1e6)
    predictor.served_log = logging_step
    predictor.stop()  # writes what the on rounds logged (in its writer thread; counted in process_time too)
    on, off = statistics.median(samples["log_on"]), statistics.median(samples["log_off"])
    return {"request_cpu_us_log_on": round(on, 1), "request_cpu_us_log_off": round(off, 1),
            "append_cost_us": round(on - off, 1), "increase": round(on / off - 1, 4),
            "rounds": {k: [round(v, 1) for v in vals] for k, vals in samples.items()}, "calls_per_round": calls,
            "rows_written": logging_step.writer.written_rows if logging_step.writer else 0}


def logged_rows(log_dir: Path) -> int:
    from fraud_common import prediction_log as plog
    from fraud_common.settings import Settings

    settings = Settings.from_env({"FRAUD_HOME": str(log_dir.parent)})
    now = datetime.now(timezone.utc)
    return plog.read_log(str(log_dir), settings, now - timedelta(days=1), now + timedelta(hours=1), columns=[plog.REQUEST_ID]).num_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="FRAUD_HOME with a registered model and a materialized store")
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--cache", default="/tmp/fraud-bench")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000, help="requests per concurrency-1 phase (Python client)")
    parser.add_argument("--c1-duration", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    args = parser.parse_args(argv)
    client = "wrk" if args.client == "wrk" or (args.client == "auto" and shutil.which("wrk")) else "python"
    home, n_users = bench_serve.prepare_home(args)
    log_dir = Path(tempfile.mkdtemp(prefix="bench-plog-")) / "predictions"
    load_before = os.getloadavg()
    wall = time.perf_counter()
    phases: dict[str, dict[int, list[dict]]] = {m: {1: [], args.concurrency: []} for m in MODES}
    answered_on, peak_rss = 0, {m: 0.0 for m in MODES}
    for round_no in range(args.rounds):
        # Fresh servers each round, started in alternating order: a first run of this bench with
        # the two servers kept up found the one started first slower in every round, log or not.
        order = MODES if round_no % 2 == 0 else MODES[::-1]
        procs, ports = {}, {}
        try:
            for mode in order:
                procs[mode], ports[mode] = start(home, mode, log_dir)
            servers = {m: psutil.Process(p.pid) for m, p in procs.items()}
            for mode in order:  # warm-up (its requests are logged too)
                warm = bench_serve.measure(client, ports[mode], n_users, 1, 3, 200, servers[mode])
                answered_on += (warm["requests"] - warm["errors"]) if mode == "log_on" else 0
            for concurrency in (1, args.concurrency):
                for mode in order:
                    result = bench_serve.phase(client, ports[mode], n_users, concurrency, args, servers[mode])
                    phases[mode][concurrency].append(result)
                    answered_on += (result["requests"] - result["errors"]) if mode == "log_on" else 0
                    print(f"round {round_no + 1} {mode:7s} c{concurrency:<2d}: {result['throughput_rps']} req/s, "
                          f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, server CPU "
                          f"{result['server_cpu_ms_per_request']} ms/request, errors {result['errors']}")
            for m, p in procs.items():
                peak_rss[m] = max(peak_rss[m], bench_serve.peak_rss_mb(p.pid))
        finally:
            for proc in procs.values():
                proc.terminate()  # SIGTERM: kserve's clean shutdown, which flushes the log
            for proc in procs.values():
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    # Last: it loads a predictor into this process, which also runs the load client.
    in_process = in_process_cost(home, n_users, log_dir)
    print("in process, CPU per request:", json.dumps({k: v for k, v in in_process.items() if k != "rounds"}))
    summary = {m: {f"concurrency_{c}": bench_serve.summarize(r) for c, r in by_c.items()} for m, by_c in phases.items()}
    hi = f"concurrency_{args.concurrency}"
    off, on = summary["log_off"], summary["log_on"]
    p99_cost = on["concurrency_1"]["p99_ms"] / off["concurrency_1"]["p99_ms"] - 1
    throughput_cost = 1 - on[hi]["throughput_rps"] / off[hi]["throughput_rps"]
    rows = logged_rows(log_dir)
    result = {
        "name": "prediction_log",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "client": client,
        "users": n_users,
        "rounds": args.rounds,
        "in_process": in_process,
        "end_to_end": summary,
        "cost": {
            "p99_c1_increase": round(p99_cost, 4),
            f"throughput_c{args.concurrency}_decrease": round(throughput_cost, 4),
            "server_cpu_per_request_ratio_on_to_off": round(
                on[hi]["server_cpu_ms_per_request"] / off[hi]["server_cpu_ms_per_request"], 3
            ),
        },
        "bound": 0.10,
        "within_bound": {"p99_c1": p99_cost <= 0.10, f"throughput_c{args.concurrency}": throughput_cost <= 0.10},
        "log": {
            "answered_requests_on_logging_server": answered_on,
            "rows_in_log_after_clean_shutdown": rows,
            # >=: the log may hold a request the client did not count (it stopped waiting at a phase's end).
            "nothing_lost": rows >= answered_on,
            "files": len(list(log_dir.rglob("*.parquet"))),
            "bytes": sum(p.stat().st_size for p in log_dir.rglob("*.parquet")),
        },
        "server_peak_rss_mb": peak_rss,
        "wall_s": round(time.perf_counter() - wall, 1),
        "loadavg_at_start": load_before,
        "loadavg": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "note": "client and both servers share 2 cores with other work; the on/off ratio is the figure, not the absolutes",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(RESULTS)
    print(json.dumps({k: result[k] for k in ("cost", "within_bound", "log", "loadavg")}, indent=2))
    shutil.rmtree(log_dir.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
