"""Serving benchmark: latency at concurrency 1, throughput at concurrency 16, over loopback.

    uv run python bench/bench_serve.py [--home FRAUD_HOME] [--users 50000] [--requests 2000]
                                       [--c1-duration 15] [--duration 60] [--concurrency 16]
                                       [--client auto|wrk|python]

Starts the predictor (``python -m rest_predictor.predictor``) in a subprocess on a free loopback
port against ``--home`` (a FRAUD_HOME with a registered model and a materialized Feast store).
Without ``--home`` it builds one with ``tests/helpers.py`` (``--users`` generated users, cached in
``--cache``). Load comes from ``wrk`` (C, keep-alive, Lua for POST bodies over random known users)
when installed, else from an asyncio/aiohttp client. Both are bounded: a request count at
concurrency 1 for the Python client (wrk always runs for a duration: ``--c1-duration``), a
duration at concurrency 16. Also records the server's CPU seconds per request
(its own /proc counters), the figure that bounds throughput once the machine is quiet.

The load generator runs on the same 2 cores as the server, and other work on the machine
competes too: figures are pessimistic. Results go to stdout and bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
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


def start_server(home: Path, port: int, log_path: Path) -> subprocess.Popen:
    """The predictor in a subprocess; returns once it reports ready."""
    import requests

    env = {**os.environ, "FRAUD_HOME": str(home), "FRAUD_SERVE_PORT": str(port), "FRAUD_LOG_LEVEL": "WARNING"}
    log = log_path.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "rest_predictor.predictor"], env=env, stdout=log, stderr=log, cwd=REPO)
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


def component_costs(home: Path, n_users: int, calls: int = 1000) -> dict:
    """CPU microseconds per call of each piece of a request, measured in this process.

    Shows where the time goes: the Feast read through ``get_online_features`` versus the online
    store's ``online_read`` (what the predictor uses), the ONNX run, and the whole ``predict``.
    """
    from fraud_common.settings import Settings
    from rest_predictor.predictor import FraudPredictor

    predictor = FraudPredictor(Settings.from_env({"FRAUD_HOME": str(home), "FRAUD_LOG_LEVEL": "WARNING"}))
    predictor.load()
    features, model = predictor.features, predictor.model
    users = [f"user_{random.randrange(n_users)}" for _ in range(calls)]
    row = features.read(users[:1])[0]

    def cpu_us(fn, n: int) -> float:  # noqa: ANN001
        started = time.process_time()
        for i in range(n):
            fn(users[i % len(users)])
        return round((time.process_time() - started) / n * 1e6, 1)

    return {
        "feast_get_online_features_us": cpu_us(lambda u: features.read_with_feature_service([u]), max(50, calls // 10)),
        "feast_online_store_read_us": cpu_us(lambda u: features.read([u]), calls),
        "onnx_run_us": cpu_us(lambda u: model.score(row), calls),
        "predict_total_us": cpu_us(lambda u: predictor.predict({"user_id": u}), calls),
    }


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="FRAUD_HOME with a registered model and a materialized store")
    parser.add_argument("--users", type=int, default=50_000, help="users to build (or known to exist in --home)")
    parser.add_argument("--cache", default="/tmp/fraud-bench", help="where a built state is kept between runs")
    parser.add_argument("--requests", type=int, default=2000, help="requests at concurrency 1 (Python client)")
    parser.add_argument("--c1-duration", type=float, default=15.0, help="seconds at concurrency 1 (wrk)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds at high concurrency")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    args = parser.parse_args(argv)
    client = "wrk" if args.client == "wrk" or (args.client == "auto" and shutil.which("wrk")) else "python"

    home, n_users = prepare_home(args)
    costs = component_costs(home, n_users)
    print("CPU per call (in-process):", costs)
    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"bench-serve-{port}.log"
    wall_start = time.perf_counter()
    started = time.perf_counter()
    proc = start_server(home, port, log_path)
    startup_s = time.perf_counter() - started
    server = psutil.Process(proc.pid)
    try:
        measure(client, port, n_users, 1, 3, 200, server)  # warm-up: lazy imports, page cache, allocator
        # wrk is duration-bound (--c1-duration); the Python client stops after --requests.
        latency = measure(client, port, n_users, 1, args.c1_duration if client == "wrk" else 600, args.requests, server)
        print(f"concurrency 1: {latency['requests']} requests, p50 {latency['p50_ms']} ms, p95 {latency['p95_ms']} ms, "
              f"p99 {latency['p99_ms']} ms, errors {latency['errors']}")
        # A second opinion at concurrency 1: the Python client times each of --requests requests itself.
        latency_python = measure("python", port, n_users, 1, 600, args.requests, server) if client == "wrk" else latency
        print(f"concurrency 1 (python client): {latency_python['requests']} requests, p50 {latency_python['p50_ms']} ms, "
              f"p95 {latency_python['p95_ms']} ms, p99 {latency_python['p99_ms']} ms, errors {latency_python['errors']}")
        load = measure(client, port, n_users, args.concurrency, args.duration, 0, server)
        print(f"concurrency {args.concurrency}: {load['throughput_rps']} req/s over {load['seconds']} s, "
              f"{load['requests']} requests, errors {load['errors']}, p99 {load['p99_ms']} ms, "
              f"server CPU {load['server_cpu_ms_per_request']} ms/request")
        server_rss_mb = peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    result = {
        "name": "serve",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "client": client,
        "users": n_users,
        "home": str(home),
        "server_startup_s": round(startup_s, 2),
        "component_cpu_us": costs,
        "concurrency_1": latency,
        "concurrency_1_python_client": latency_python,
        f"concurrency_{args.concurrency}": load,
        "targets": {"p99_ms_at_c1": 5.0, "rps_at_c16": 1000, "errors": 0},
        "met": {
            "p99_at_c1": latency["p99_ms"] <= 5.0,
            "rps_at_c16": load["throughput_rps"] >= 1000 and args.concurrency == 16 and args.duration >= 60,
            "zero_errors": latency["errors"] == 0 and latency_python["errors"] == 0 and load["errors"] == 0,
        },
        "wall_s": round(time.perf_counter() - wall_start, 2),
        "server_peak_rss_mb": server_rss_mb,
        "loadavg": os.getloadavg(),
        "cpu_count": os.cpu_count(),
        "note": "client and server share the same 2 cores",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(RESULTS)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
