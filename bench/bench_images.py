"""Bench: the step images — build time, size, and whether each runs as it should.

    uv run python bench/bench_images.py [--cold] [--skip-build] [--pipeline-users N]

Builds the five images with ``./build_images.sh --skip-s3a-jars`` (``--cold``: no layer cache,
every package installed again from the build's uv cache mount), then for each image: its size, whether its
default command exits 0, the user it runs as (the image config and ``id -u`` inside), and whether
the default command also works under an arbitrary UID in group 0 (``--user 123456:0``, as
OpenShift runs it). ``--pipeline-users N`` also runs ``fraud-detection run --platform docker``
(every step in its image) and, as its peer in the same run, the embedded ``local`` platform,
each at N users. Needs podman (``container-engine``; ``--service`` for the pipeline run).
Records everything in bench/results/images.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import images  # noqa: E402

RESULTS = REPO / "bench" / "results" / "images.json"
# Goals from the issue: each image holds only what its step imports.
SIZE_GOALS_MB = {"rest-predictor": 600, "train": 1800}
BUILD_LINE = re.compile(r"^(ok|FAIL)\s+(\S+)\s+(\d+)s")
RANDOM_USER = "123456:0"


def podman(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)


def build(cold: bool) -> tuple[dict[str, dict], float]:
    """Run build_images.sh; each image's build seconds and status from its one-line report."""
    env = dict(os.environ)
    command = [str(REPO / "build_images.sh"), "--skip-s3a-jars"] + (["--no-cache"] if cold else [])
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    total = time.monotonic() - started
    print(done.stdout, end="", flush=True)
    builds = {}
    for line in done.stdout.splitlines():
        found = BUILD_LINE.match(line)
        if found:
            builds[found.group(2)] = {"status": found.group(1), "build_seconds": int(found.group(3))}
    return builds, total


def check_image(step: str) -> dict:
    """Size, default command, user and random-UID behaviour of one built image."""
    ref = images.image(step)
    inspected = json.loads(podman("image", "inspect", ref).stdout)[0]
    config = inspected["Config"]
    started = time.monotonic()
    default = podman("run", "--rm", ref)
    default_seconds = time.monotonic() - started
    # --passwd=false: no passwd entry for the UID, as under OpenShift (podman adds one by default).
    random_uid = podman("run", "--rm", "--passwd=false", "--user", RANDOM_USER, ref)
    uid = podman("run", "--rm", ref, "id", "-u").stdout.strip()
    # The predictor's default command is its ModelServer: with nothing registered it stops with
    # one line (exit 1); the docker platform run below shows it serving.
    expected_exit = 1 if step == "rest-predictor" else 0
    size_mb = round(inspected["Size"] / 1e6)
    goal = SIZE_GOALS_MB.get(step)
    return {
        "ref": ref,
        "id": inspected["Id"],
        "size_mb": size_mb,
        "size_goal_mb": goal,
        "within_size_goal": None if goal is None else size_mb <= goal,
        "code_version": config.get("Labels", {}).get("org.opencontainers.image.revision"),
        "default_command": config.get("Entrypoint", []) + (config.get("Cmd") or []),
        "default_command_exit": default.returncode,
        "default_command_expected_exit": expected_exit,
        "default_command_seconds": round(default_seconds, 1),
        "default_command_tail": (default.stdout + default.stderr).strip().splitlines()[-1:],
        "config_user": config.get("User"),
        "id_u_inside": uid,
        "runs_as_root": config.get("User") in ("", "0", "root") or uid == "0",
        "random_uid_exit": random_uid.returncode,
        "random_uid_tail": (random_uid.stdout + random_uid.stderr).strip().splitlines()[-1:],
    }


def run_platform(platform: str, users: int, home: Path) -> dict:
    """docker: generate, the pipeline in images, the predictor container's first answer.
    local (the peer): ``fraud-detection run --no-serve``, generate and the pipeline in this venv."""
    from fraud_common.settings import Settings

    sys.path.insert(0, str(REPO / "tests"))
    from conftest import free_port

    port = free_port()
    env = {"FRAUD_HOME": str(home), "FRAUD_SERVE_PORT": str(port), "FRAUD_MIN_ROC_AUC": "0.5"}
    settings = Settings.from_env(env)
    started = time.monotonic()
    if platform == "docker":
        from pipeline.docker import run_in_images

        result = run_in_images(settings, users=users, seed=42, serve_forever=False)
        return {"seconds_to_first_answer": round(time.monotonic() - started, 1),
                "generate_seconds": result["generate_seconds"], "pipeline_seconds": result["pipeline_seconds"],
                "answer": result["answer"]}
    command = [sys.executable, "-m", "pipeline.cli", "--home", str(home), "run", "--users", str(users), "--no-serve",
               "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, **env, "PYTHONPATH": str(REPO)})
    return {"seconds_to_registered_model": round(time.monotonic() - started, 1), "exit": done.returncode,
            "note": "the peer stops after registration (--no-serve); the docker figure includes the predictor's first answer"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cold", action="store_true", help="build without the layer cache")
    parser.add_argument("--skip-build", action="store_true", help="measure the images already built")
    parser.add_argument("--pipeline-users", type=int, default=0, help="also run both platforms at N users")
    args = parser.parse_args(argv)

    result: dict = {"bench": "images", "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "engine": podman("--version").stdout.strip(), "s3a_jars": "skip (no Maven access here)"}
    if not args.skip_build:
        builds, total = build(args.cold)
        # --no-cache rebuilds every layer; the wheels still come from the build's uv cache mount
        # (downloaded once, by an earlier build), so this is install time, not download time.
        result.update(build_cache=("no layer cache (--no-cache); wheels from the uv cache mount" if args.cold
                                   else "warm (layers reused)"),
                      build_total_seconds=round(total, 1), builds=builds)
    result["images"] = {}
    for step in images.STEPS:
        result["images"][step] = check_image(step)
        row = result["images"][step]
        print(f"{step:<20} {row['size_mb']:>6} MB  default exit {row['default_command_exit']}  "
              f"uid {row['id_u_inside']}  random uid exit {row['random_uid_exit']}", flush=True)
    if args.pipeline_users:
        result["pipeline"] = {"users": args.pipeline_users}
        with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
            for platform in ("docker", "local"):
                result["pipeline"][platform] = run_platform(platform, args.pipeline_users, Path(tmp) / platform)
                print(f"{platform}: {result['pipeline'][platform]}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = RESULTS.with_suffix(".json.tmp")
    tmp_file.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_file, RESULTS)
    print(f"wrote {RESULTS.relative_to(REPO)}")
    ok = all(r["default_command_exit"] == r["default_command_expected_exit"] == r["random_uid_exit"]
             and not r["runs_as_root"]
             for r in result["images"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
