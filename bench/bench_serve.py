"""Serving benchmark: Feast's public online read against the private provider read, same run.

    uv run python bench/bench_serve.py [--home FRAUD_HOME] [--users 50000] [--rounds 2]
                                       [--c1-duration 10] [--duration 20] [--concurrency 16]
                                       [--requests 2000] [--client auto|wrk|python]

The predictor reads features either through ``FeatureStore.get_online_features`` (``public``,
the default) or through Feast's private provider API (``provider``, ``ProviderOnlineRead``). This
bench measures both, interleaved so that other work on the machine weighs on both alike:

* in-process CPU per call (``time.process_time``) of the online read alone and of a whole
  ``preprocess`` + ``predict``, alternating the two paths over several rounds;
* end to end over loopback: one predictor subprocess per path (``--feature-read``), both up at
  once, load phases alternating public/provider at concurrency 1 and at ``--concurrency``,
  ``--rounds`` times. Load comes from ``wrk`` (C, keep-alive, Lua POST bodies over random known
  users) when installed, else from an asyncio/aiohttp client. Each phase also records the
  server's CPU seconds per request (its /proc counters).

Without ``--home`` it builds a state with ``tests/helpers.py`` (``--users`` users, cached in
``--cache``). The load generator runs on the same 2 cores as the servers: figures are
pessimistic, and only the ratio between the paths is meant to travel. Results go to stdout and
bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "serve.json"
ROUTE = "/v1/models/onnx-model:predict"
PATHS = ("public", "provider")  # the --feature-read choices compared
DEFAULT_PATH = "provider"

WRK_SCRIPT = """
local n_users = {n_users}
math.randomseed({seed})
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  return wrk.format(nil, nil, nil, '{{"user_id": "user_' .. math.random(0, n_users - 1) .. '"}}')
end
done = function(summary, latency, requests)
  local s = summary.errors
  io.write(string.format(
    'WRKJSON {{"requests": %d, "duration_us": %d, "non_2xx": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "p50_ms": %.4f, "p95_ms": %.4f, "p99_ms": %.4f, "max_ms": %.4f, "mean_ms": %.4f}}\\n',
    summary.requests, summary.duration, s.status, s.connect, s.read, s.write, s.timeout,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, latency.mean / 1000))
end
"""


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_home(args: argparse.Namespace) -> tuple[Path, int]:
    """The FRAUD_HOME to serve and how many users it holds (built with the fixtures if needed)."""
    if args.home:
        return Path(args.home), args.users
    home = Path(args.cache) / f"serve-{args.users}"
    marker = home / ".complete"
    if not marker.exists():
        sys.path.insert(0, str(REPO / "tests"))  # the shared test helper
        from helpers import build_serving_state

        shutil.rmtree(home, ignore_errors=True)
        started = time.perf_counter()
        build_serving_state(home, args.users)
        marker.write_text("ok")
        print(f"built serving state for {args.users} users in {time.perf_counter() - started:.1f} s at {home}")
    return home, args.users


def start_server(home: Path, port: int, log_path: Path, feature_read: str) -> subprocess.Popen:
    """The predictor in a subprocess reading features through ``feature_read``; returns once it reports ready."""
    import requests

    env = {**os.environ, "FRAUD_HOME": str(home), "FRAUD_SERVE_PORT": str(port), "FRAUD_LOG_LEVEL": "WARNING"}
    log = log_path.open("w")
    command = [sys.executable, "-m", "rest_predictor.predictor", "--feature-read", feature_read]
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=log, cwd=REPO)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"predictor exited with {proc.returncode}; log:\n{log_path.read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit("predictor not ready within 240 s")


def run_wrk(port: int, n_users: int, concurrency: int, duration: float) -> dict:
    """One wrk run of ``duration`` seconds (wrk always runs its full duration)."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT.format(n_users=n_users, seed=random.randrange(1 << 30)))
    try:
        cmd = [
            "wrk", "-t1", f"-c{concurrency}", f"-d{int(duration)}s", "--timeout", "5s",
            "-s", script.name, f"http://127.0.0.1:{port}{ROUTE}",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(script.name)
    line = next(ln for ln in out.splitlines() if ln.startswith("WRKJSON "))
    raw = json.loads(line[len("WRKJSON "):])
    errors = raw["non_2xx"] + raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
    seconds = raw["duration_us"] / 1e6
    return {
        "client": "wrk", "concurrency": concurrency, "requests": raw["requests"], "errors": errors,
        "seconds": round(seconds, 3), "throughput_rps": round(raw["requests"] / seconds, 1),
        **{k: round(raw[k], 3) for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms")},
    }


async def _python_load(port: int, n_users: int, concurrency: int, duration: float, max_requests: int) -> dict:
    """The same load from aiohttp (keep-alive, one connection per worker)."""
    import aiohttp

    url = f"http://127.0.0.1:{port}{ROUTE}"
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration
    per_worker = max_requests // concurrency if max_requests else 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        done = 0
        while time.perf_counter() < stop_at and (not per_worker or done < per_worker):
            body = b'{"user_id": "user_%d"}' % random.randrange(n_users)
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
                    await resp.read()
                    errors += resp.status != 200
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - started)
            done += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        began = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - began
    latencies.sort()

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 3)

    return {
        "client": "python-aiohttp", "concurrency": concurrency, "requests": len(latencies), "errors": errors,
        "seconds": round(seconds, 3), "throughput_rps": round(len(latencies) / seconds, 1),
        "p50_ms": pct(0.50), "p95_ms": pct(0.95), "p99_ms": pct(0.99), "max_ms": pct(1.0),
        "mean_ms": round(sum(latencies) / len(latencies) * 1000, 3),
    }


def component_costs(home: Path, n_users: int, rounds: int = 5, calls: int = 400) -> dict:
    """CPU microseconds per call, in this process, for each path: the online read alone and a whole
    ``preprocess`` + ``predict``; the paths alternate for ``rounds`` rounds and the median is kept."""
    from fraud_common.settings import Settings
    from rest_predictor.predictor import FraudPredictor

    settings = Settings.from_env({"FRAUD_HOME": str(home), "FRAUD_LOG_LEVEL": "WARNING"})
    predictors = {path: FraudPredictor(settings, feature_read=path) for path in PATHS}
    for predictor in predictors.values():
        predictor.load()
    users = [f"user_{random.randrange(n_users)}" for _ in range(calls)]

    def cpu_us(fn) -> float:  # noqa: ANN001
        fn(users[0])  # warm
        started = time.process_time()
        for user in users:
            fn(user)
        return (time.process_time() - started) / len(users) * 1e6

    samples: dict[str, dict[str, list[float]]] = {path: {"online_read_us": [], "request_us": []} for path in PATHS}
    for _ in range(rounds):
        for path, predictor in predictors.items():
            reader = predictor.features
            samples[path]["online_read_us"].append(cpu_us(lambda u: reader.read([u])))
            samples[path]["request_us"].append(cpu_us(lambda u: predictor.predict(predictor.preprocess({"user_id": u}))))
    onnx_row = predictors["public"].features.read(users[:1])[0]
    model = predictors["public"].model
    return {
        path: {name: round(statistics.median(values), 1) for name, values in by_name.items()}
        | {f"{name}_rounds": [round(v, 1) for v in values] for name, values in by_name.items()}
        for path, by_name in samples.items()
    } | {"onnx_run_us": round(cpu_us_simple(lambda: model.score(onnx_row)), 1), "calls_per_round": calls, "rounds": rounds}


def cpu_us_simple(fn, n: int = 2000) -> float:  # noqa: ANN001
    """CPU microseconds per call of ``fn()``."""
    started = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - started) / n * 1e6


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def measure(client: str, port: int, n_users: int, concurrency: int, duration: float, max_requests: int, server: psutil.Process) -> dict:
    """Run one load phase and add the server's CPU seconds per request."""
    cpu_before = sum(server.cpu_times()[:2])
    if client == "wrk":
        result = run_wrk(port, n_users, concurrency, duration)
    else:
        result = asyncio.run(_python_load(port, n_users, concurrency, duration, max_requests))
    cpu_used = sum(server.cpu_times()[:2]) - cpu_before
    result["server_cpu_ms_per_request"] = round(cpu_used / max(1, result["requests"]) * 1000, 4)
    result["server_cpu_share"] = round(cpu_used / max(1e-9, result["seconds"]), 3)
    return result


def phase(client: str, port: int, n_users: int, concurrency: int, args: argparse.Namespace, server: psutil.Process) -> dict:
    """One load phase at ``concurrency``: duration-bound for wrk; request-bound at c1 for the Python client."""
    if concurrency == 1:
        return measure(client, port, n_users, 1, args.c1_duration if client == "wrk" else 600, args.requests, server)
    return measure(client, port, n_users, concurrency, args.duration, 0, server)


def summarize(rounds: list[dict]) -> dict:
    """Median of each figure over the rounds, and the rounds themselves."""
    keys = ("throughput_rps", "p50_ms", "p95_ms", "p99_ms", "server_cpu_ms_per_request")
    return {
        **{key: round(statistics.median(r[key] for r in rounds), 4) for key in keys},
        "requests": sum(r["requests"] for r in rounds),
        "errors": sum(r["errors"] for r in rounds),
        "rounds": rounds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="FRAUD_HOME with a registered model and a materialized store")
    parser.add_argument("--users", type=int, default=50_000, help="users to build (or known to exist in --home)")
    parser.add_argument("--cache", default="/tmp/fraud-bench", help="where a built state is kept between runs")
    parser.add_argument("--rounds", type=int, default=2, help="alternating public/provider rounds per concurrency")
    parser.add_argument("--requests", type=int, default=2000, help="requests at concurrency 1 (Python client)")
    parser.add_argument("--c1-duration", type=float, default=10.0, help="seconds per concurrency-1 phase (wrk)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per high-concurrency phase")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    args = parser.parse_args(argv)
    client = "wrk" if args.client == "wrk" or (args.client == "auto" and shutil.which("wrk")) else "python"

    from rest_predictor.online_features import ProviderOnlineRead, reader_for

    assert reader_for("auto") is ProviderOnlineRead, "auto no longer picks the provider read: update DEFAULT_PATH"
    home, n_users = prepare_home(args)
    wall_start = time.perf_counter()
    costs = component_costs(home, n_users)
    print("CPU per call (in-process):", json.dumps({p: {k: v for k, v in costs[p].items() if "rounds" not in k} for p in PATHS}))
    procs: dict[str, subprocess.Popen] = {}
    ports: dict[str, int] = {}
    startup_s: dict[str, float] = {}
    phases: dict[str, dict[int, list[dict]]] = {path: {1: [], args.concurrency: []} for path in PATHS}
    try:
        for path in PATHS:
            ports[path] = free_port()
            started = time.perf_counter()
            procs[path] = start_server(home, ports[path], Path(tempfile.gettempdir()) / f"bench-serve-{path}-{ports[path]}.log", path)
            startup_s[path] = round(time.perf_counter() - started, 2)
        servers = {path: psutil.Process(proc.pid) for path, proc in procs.items()}
        for path in PATHS:  # warm-up: lazy imports, page cache, allocator
            measure(client, ports[path], n_users, 1, 3, 200, servers[path])
        for round_no in range(args.rounds):
            for concurrency in (1, args.concurrency):
                # Alternate which path goes first so a drift in background load does not favour one.
                for path in PATHS if round_no % 2 == 0 else PATHS[::-1]:
                    result = phase(client, ports[path], n_users, concurrency, args, servers[path])
                    phases[path][concurrency].append(result)
                    print(f"round {round_no + 1} {path:8s} c{concurrency:<2d}: {result['throughput_rps']} req/s, "
                          f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, server CPU "
                          f"{result['server_cpu_ms_per_request']} ms/request, errors {result['errors']}")
        peak_rss = {path: peak_rss_mb(proc.pid) for path, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    end_to_end = {
        path: {f"concurrency_{c}": summarize(rounds) for c, rounds in by_c.items()} for path, by_c in phases.items()
    }
    c_hi = f"concurrency_{args.concurrency}"
    public, provider = end_to_end["public"], end_to_end["provider"]
    comparison = {
        "online_read_cpu_us_saved_per_call": round(costs["public"]["online_read_us"] - costs["provider"]["online_read_us"], 1),
        "request_cpu_ratio_provider_to_public": round(costs["provider"]["request_us"] / costs["public"]["request_us"], 3),
        "c1_p50_ratio_provider_to_public": round(provider["concurrency_1"]["p50_ms"] / public["concurrency_1"]["p50_ms"], 3),
        f"c{args.concurrency}_throughput_ratio_provider_to_public": round(
            provider[c_hi]["throughput_rps"] / public[c_hi]["throughput_rps"], 3
        ),
        "server_cpu_per_request_ratio_provider_to_public": round(
            provider[c_hi]["server_cpu_ms_per_request"] / public[c_hi]["server_cpu_ms_per_request"], 3
        ),
    }
    default = end_to_end[DEFAULT_PATH]
    result = {
        "name": "serve",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "client": client,
        "users": n_users,
        "home": str(home),
        "feast_version": importlib.metadata.version("feast"),
        "server_startup_s": startup_s,
        "in_process_cpu_us": costs,
        "end_to_end": end_to_end,
        "comparison": comparison,
        "default_path": f"{DEFAULT_PATH} (what --feature-read auto picks on Feast {ProviderOnlineRead.CHECKED_FEAST_VERSION})",
        "targets": {"p99_ms_at_c1": 5.0, "rps_at_c16": 1000, "errors": 0},
        "met_by_default_path": {
            "p99_at_c1": default["concurrency_1"]["p99_ms"] <= 5.0,
            "rps_at_c16": default[c_hi]["throughput_rps"] >= 1000 and args.concurrency == 16,
            "zero_errors": all(end_to_end[p][c]["errors"] == 0 for p in PATHS for c in end_to_end[p]),
        },
        "wall_s": round(time.perf_counter() - wall_start, 2),
        "server_peak_rss_mb": peak_rss,
        "loadavg": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "note": "client and both servers share the same 2 cores with other work; compare the paths, "
        "not the absolute figures",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(RESULTS)
    print(json.dumps({k: result[k] for k in ("in_process_cpu_us", "comparison", "met_by_default_path", "loadavg")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
