"""Bench: the whole embedded pipeline at 1M users, step by step, optionally beside another checkout.

    uv run python bench/bench_pipeline.py [--users 1000000] [--peer /path/to/other/checkout]

Runs ``uv run fraud-detection --home <fresh tmp> run --users N --no-serve`` in this checkout (and,
with ``--peer``, in another one, e.g. a worktree of an older commit, one after the other in the
same run) and reads each step's seconds from the CLI's step lines and the pipeline's total from
its last line. Data generation is a step of ``run`` but not of the KFP pipeline: it is reported
beside the pipeline, which starts at data preparation. The machine is shared (2 cores); the load
average is recorded. Results: stdout and bench/results/pipeline_1m_users.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "pipeline_1m_users.json"
STEP_LINE = re.compile(r"^\s*✓\s+(?P<step>[a-z-]+)\s+(?P<seconds>[0-9.]+)s\b")
TOTAL_LINE = re.compile(r"Pipeline finished in (?P<seconds>[0-9.]+)s")


def run_checkout(checkout: Path, users: int) -> dict:
    """One full run of ``checkout``'s CLI in a fresh FRAUD_HOME; its step and total seconds."""
    home = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    command = ["uv", "run", "fraud-detection", "--home", str(home), "run", "--users", str(users), "--no-serve"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAUD_")}
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, timeout=3600)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    steps = {m["step"]: float(m["seconds"]) for m in map(STEP_LINE.match, done.stdout.splitlines()) if m}
    total = TOTAL_LINE.search(done.stdout)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True).stdout.strip()
    return {
        "checkout": str(checkout),
        "commit": commit,
        "steps_seconds": steps,
        "pipeline_seconds": float(total["seconds"]) if total else None,
        "generate_seconds": steps.get("generate-data"),
        "wall_seconds_incl_cli_start_and_generation": round(wall, 1),
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--peer", type=Path, help="another checkout to run the same way, after this one")
    args = parser.parse_args(argv)
    results: dict = {
        "name": "pipeline_1m_users",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": f"uv run fraud-detection --home <fresh tmp> run --users {args.users} --no-serve",
        "users": args.users,
        "machine": {"cpus": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
                    "note": "2-core machine; the pipeline is prepare-data .. serve, generation reported beside it"},
        "target": "whole pipeline at 1M users <= 180 s",
    }
    results["this"] = run_checkout(REPO, args.users)
    print(json.dumps(results["this"]), flush=True)
    if args.peer is not None:
        results["peer"] = run_checkout(args.peer.resolve(), args.users)
        print(json.dumps(results["peer"]), flush=True)
    seconds = results["this"]["pipeline_seconds"]
    results["target_met"] = seconds is not None and seconds <= 180
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
