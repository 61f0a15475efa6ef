"""The command line a new user meets: every mistake ends in one line on stderr, never a traceback.

Each case runs the real CLI in a subprocess (``python -m pipeline.cli``) on its own FRAUD_HOME
and checks the exit code, that stderr is exactly one line naming what was wrong and what to do,
and that no traceback shows. Unreachable services are real closed ports on loopback.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from conftest import REPO_ROOT, free_port
from fraud_common.schemas import SPLIT_FILES


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FRAUD_", "AWS_", "S3_"))}
    env.update({"FRAUD_HOME": str(home), "FRAUD_SERVE_PORT": str(free_port()), **extra})
    return env


def _cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )


def _start(env: dict[str, str], *args: str) -> subprocess.Popen:
    """The CLI as a terminal starts it: with Ctrl-C's default action, even when this test run
    inherited SIGINT ignored (a shell's background job), which Python would then keep ignoring."""
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Exit ``code``, one line on stderr holding every word, no traceback anywhere."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"stderr is not one line:\n{result.stderr[-3000:]}"
    assert result.returncode == code, (result.returncode, lines[0])
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A loopback port something listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _label_rows(raw: Path) -> int:
    return sum(len((raw / name).read_text().splitlines()) - 1 for _, name in SPLIT_FILES)


# --- Bad option values ---------------------------------------------------------------------------


BAD_OPTIONS = [
    (["generate", "--users", "5"], ["--users", "at least 10"]),
    (["generate", "--users", "0"], ["--users", "at least 10"]),
    (["generate", "--users", "-3"], ["--users", "at least 10"]),
    (["generate", "--users", "abc"], ["--users", "'abc' is not an integer"]),
    (["run", "--users", "2.5"], ["--users", "'2.5' is not an integer"]),
    (["generate", "--seed", "-1"], ["--seed", "negative"]),
    (["serve", "--port", "70000"], ["--port", "1 to 65535"]),
    (["run", "--port", "0"], ["--port", "1 to 65535"]),
    (["frobnicate"], ["invalid choice", "--help"]),
]


@pytest.mark.parametrize(("args", "words"), BAD_OPTIONS, ids=[" ".join(args) for args, _ in BAD_OPTIONS])
def test_bad_option_values_get_one_line(home: Path, args: list[str], words: list[str]) -> None:
    assert_one_line_error(_cli(_env(home), *args), 2, *words)
    assert not (home / "data").exists()


# --- Missing or unreachable data, storage and registry --------------------------------------------


def test_prepare_without_data_says_how_to_make_it(home: Path) -> None:
    assert_one_line_error(_cli(_env(home), "prepare"), 1, "no raw data", "fraud-detection generate")


@pytest.mark.parametrize(
    "args",
    [["prepare"], ["run", "--no-serve"], ["generate", "--users", "100", "--out", "s3://fraud-cli/data/raw"]],
    ids=["prepare", "run", "generate"],
)
def test_unreachable_s3_is_named(home: Path, args: list[str]) -> None:
    env = _env(home, FRAUD_DATA_URI="s3://fraud-cli/data", S3_ENDPOINT_URL=f"http://127.0.0.1:{free_port()}",
               AWS_ACCESS_KEY_ID="key", AWS_SECRET_ACCESS_KEY="secret")
    assert_one_line_error(_cli(env, *args), 1, "unreachable", "S3_ENDPOINT_URL")


@pytest.mark.parametrize("args", [["serve"], ["run", "--no-serve"]], ids=["serve", "run"])
def test_unreachable_registry_is_named_before_any_work(home: Path, args: list[str]) -> None:
    env = _env(home, FRAUD_REGISTRY_BACKEND="kubeflow", FRAUD_REGISTRY_URI="http://127.0.0.1",
               FRAUD_REGISTRY_PORT=str(free_port()))
    assert_one_line_error(_cli(env, *args), 1, "cannot connect", "model registry", "FRAUD_REGISTRY_URI")
    assert not (home / "data").exists()


def test_serve_before_any_model_is_registered(home: Path) -> None:
    assert_one_line_error(_cli(_env(home), "serve"), 1, "nothing to serve", "fraud-detection run")


@pytest.mark.parametrize("command", ["serve", "run"])
def test_port_in_use_is_named_before_any_work(home: Path, listening_port: int, command: str) -> None:
    result = _cli(_env(home), command, "--port", str(listening_port))
    assert_one_line_error(result, 1, f"port {listening_port}", "in use", "--port")
    assert not (home / "data").exists()


# --- run and existing data ------------------------------------------------------------------------


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def _cmdline(process: psutil.Process) -> list[str]:
    """A process's command line, or nothing when it is gone or a zombie: Spark starts and reaps
    many short-lived processes, and one of them vanishing must not hide the step's executor."""
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _interrupt_once_running(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    """SIGINT to the CLI once the pipeline's first step runs in its subprocess; output and exit code."""
    deadline = time.monotonic() + timeout
    cli = psutil.Process(proc.pid)
    while time.monotonic() < deadline and proc.poll() is None and not any(
        "executor_main" in " ".join(_cmdline(child)) for child in _children(cli)
    ):
        time.sleep(0.1)
    time.sleep(1)  # the step's subprocess is starting Spark
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _processes_using(home: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(home) in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_ctrl_c_during_a_run_is_one_line_and_leaves_no_process(home: Path) -> None:
    proc = _start(_env(home), "run", "--users", "2000", "--no-serve")
    result = _interrupt_once_running(proc)
    assert_one_line_error(result, 130, "interrupted", "prepare-data", "rerun")
    deadline = time.monotonic() + 15
    while _processes_using(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _processes_using(home), "the step subprocesses outlived the interrupted run"


def test_run_with_another_size_regenerates_the_data_it_made(home: Path) -> None:
    env = _env(home)
    assert _cli(env, "generate", "--users", "100").returncode == 0
    raw = home / "data" / "raw"
    assert _label_rows(raw) == 100
    result = _interrupt_once_running(_start(env, "run", "--users", "200", "--no-serve"))
    assert "replaced 100" in result.stdout, result.stdout
    assert _label_rows(raw) == 200
    assert json.loads((raw / "generation.json").read_text())["users"] == 200


def test_run_with_reuse_data_keeps_the_size(home: Path) -> None:
    env = _env(home)
    assert _cli(env, "generate", "--users", "100").returncode == 0
    result = _interrupt_once_running(_start(env, "run", "--users", "200", "--reuse-data", "--no-serve"))
    assert "reusing 100 users" in result.stdout, result.stdout
    assert _label_rows(home / "data" / "raw") == 100


def test_run_never_replaces_data_it_did_not_generate(home: Path) -> None:
    env = _env(home)
    assert _cli(env, "generate", "--users", "100").returncode == 0
    raw = home / "data" / "raw"
    (raw / "generation.json").unlink()  # now it is the user's own data
    before = (raw / "train.csv").read_bytes()
    result = _cli(env, "run", "--users", "200", "--no-serve")
    assert_one_line_error(result, 2, "did not generate", "--reuse-data")
    assert (raw / "train.csv").read_bytes() == before


# --- A failing step, unknown errors, --verbose ----------------------------------------------------


def test_a_failing_step_shows_its_log_tail_and_path(home: Path) -> None:
    env = _env(home)
    assert _cli(env, "generate", "--users", "100").returncode == 0
    train = home / "data" / "raw" / "train.csv"
    lines = train.read_text().splitlines()
    lines[5] = "abc," + lines[5].split(",", 1)[1]  # a distance that is not a number
    train.write_text("\n".join(lines) + "\n")
    result = _cli(env, "run", "--no-serve", timeout=300)
    message = assert_one_line_error(result, 1, "step prepare-data failed", "train.csv", "full log:")
    log_path = Path(message.split("full log: ")[1].rstrip(")"))
    assert log_path.name == "prepare-data.log" and "Traceback" in log_path.read_text()
    tail = [line for line in result.stdout.splitlines() if line.startswith("    | ")]
    assert 0 < len(tail) <= 20 and any("abc" in line for line in tail)


def test_an_unknown_error_is_one_line_pointing_at_verbose(
    home: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from pipeline import cli

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setenv("FRAUD_HOME", str(home))
    monkeypatch.setattr(cli, "generate_data", broken)
    assert cli.main(["generate", "--users", "100"]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "internal error: RuntimeError: disk on fire (rerun with --verbose for the traceback" in err[0]
    (log_dir,) = (home / "logs").iterdir()
    assert "Traceback" in (log_dir / "generate.log").read_text()

    assert cli.main(["--verbose", "generate", "--users", "100"]) == 1
    err = capfd.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("fraud-detection: internal error")


def test_verbose_adds_the_traceback_to_the_one_line(home: Path) -> None:
    result = _cli(_env(home), "--verbose", "serve")
    assert result.returncode == 1
    assert "Traceback" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("fraud-detection: nothing to serve")


def test_kfp_local_still_calls_the_task_hook_through_its_module() -> None:
    """The per-step logs wrap ``task_dispatcher.run_single_task_implementation``; a kfp upgrade
    that stops calling it through the module would silently merge the logs again."""
    import inspect

    from kfp.local import task_dispatcher
    from kfp.local.orchestrator import orchestrator_utils

    assert callable(task_dispatcher.run_single_task_implementation)
    assert "task_dispatcher.run_single_task_implementation(" in inspect.getsource(orchestrator_utils)
