"""Bench: from a fresh clone to the first successful prediction, as a new user does it.

    uv run python bench/bench_quickstart.py [--repo .] [--users 50000]

Clones the repository's HEAD into a temporary folder, runs ``uv sync --frozen`` (the package
cache is warm on this machine, so this measures installing, not downloading), then
``uv run fraud-detection run`` exactly as the README says, waits for the printed curl line,
sends that request and stops the server with Ctrl-C (SIGINT). Prints and records the time to
the first prediction and each step's duration in bench/results/quickstart.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import requests

RESULTS = Path(__file__).resolve().parent / "results" / "quickstart.json"
TARGET_SECONDS = 300.0
STEP_LINE = re.compile(r"^\s+✓ ([a-z-]+)\s+[\d.]+s")  # the CLI's line for a finished step


def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--users", type=int, default=None, help="default: the CLI's quickstart size")
    args = parser.parse_args(argv)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAUD_", "VIRTUAL_ENV"))}
    port = free_port()
    env["FRAUD_SERVE_PORT"] = str(port)  # the only deviation from the README: a free port
    with tempfile.TemporaryDirectory(prefix="quickstart-") as tmp:
        clone = Path(tmp) / "fraud-detection"
        started = time.monotonic()
        subprocess.run(["git", "clone", "--quiet", str(args.repo), str(clone)], check=True)
        cloned = time.monotonic()
        subprocess.run(["uv", "sync", "--frozen", "--quiet"], cwd=clone, env=env, check=True)
        synced = time.monotonic()
        command = ["uv", "run", "fraud-detection", "run"]
        if args.users:
            command += ["--users", str(args.users)]
        proc = subprocess.Popen(
            command, cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        step_times: dict[str, float] = {}
        last_mark = synced
        curl = None
        for line in proc.stdout:  # type: ignore[union-attr]
            match = STEP_LINE.search(line)
            if match:
                now = time.monotonic()
                step_times[match.group(1)] = round(now - last_mark, 1)
                last_mark = now
            if "curl -X POST" in line:
                curl = line.strip()
                break
        if curl is None:
            print("the run ended without printing a curl line", file=sys.stderr)
            return 1
        ready = time.monotonic()
        user = curl.split('"user_id": "')[1].split('"')[0]
        answer = requests.post(
            f"http://127.0.0.1:{port}/v1/models/onnx-model:predict", json={"user_id": user}, timeout=10
        )
        answered = time.monotonic()
        proc.send_signal(signal.SIGINT)
        exit_code = proc.wait(timeout=60)

    result = {
        "bench": "quickstart",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "users": args.users or "default",
        "clone_seconds": round(cloned - started, 1),
        "uv_sync_seconds": round(synced - cloned, 1),
        "run_to_ready_seconds": round(ready - synced, 1),
        "step_seconds_incl_startup": step_times,
        "time_to_first_prediction_seconds": round(answered - started, 1),
        "target_seconds": TARGET_SECONDS,
        "within_target": answered - started <= TARGET_SECONDS and answer.status_code == 200,
        "first_prediction": answer.json(),
        "exit_code_after_ctrl_c": exit_code,
        "loadavg": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if answer.status_code == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
