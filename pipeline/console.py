"""What a person sees of a command: one line per step, everything else in one log file per step.

Each step's output (kfp.local's executor logs, Spark's JVM, the step's own logging, warnings)
is redirected at the file-descriptor level, so subprocesses and C libraries are captured too,
into ``<FRAUD_HOME>/logs/<run id>/<step>.log``. The terminal gets one line per step (name, time,
key figure), an elapsed-time spinner while a step runs on a TTY, and, when a step fails, the last
lines of its log and the log's path. ``verbose=True`` turns the capture off: everything shows.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

TAIL_LINES = 20
NAME_WIDTH = 25  # the longest step name, evaluate-against-champion
# The last "SomeError: message" line of a Python traceback in a step's log.
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Exit|Interrupt|Failure|Found))\b:? ?(.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class StepFailed(RuntimeError):
    """A pipeline step exited with an error; its log holds the whole story."""

    def __init__(self, step: str, reason: str, log_path: Path | None) -> None:
        where = f" (full log: {log_path})" if log_path else ""
        super().__init__(f"step {step} failed: {reason}{where}")
        self.step, self.reason, self.log_path = step, reason, log_path


@dataclass
class Step:
    """One step of a command: its log file, and the key figure the caller sets when it is done."""

    name: str
    log_path: Path | None
    figure: str = ""
    seconds: float = 0.0


def new_run_dir(home: Path, command: str) -> Path:
    """A fresh ``<home>/logs/<run id>`` folder; the run id is the start time (and the command)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in itertools.count():
        run_dir = home / "logs" / (f"{stamp}-{command}" + (f"-{attempt}" if attempt else ""))
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def last_lines(path: Path, count: int = TAIL_LINES) -> list[str]:
    """The last ``count`` non-blank lines of a log file, without colour codes."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 64_000))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = [_ANSI.sub("", line).rstrip() for line in text.splitlines()]
    lines = [line for line in lines if line.strip() and not set(line.strip()) <= {"-"}]
    return lines[-count:]


def failure_reason(lines: list[str]) -> str:
    """The message of the last exception named in a log's lines, else a generic reason."""
    for line in reversed(lines):
        match = _ERROR_LINE.match(line.strip())
        if match and "finished with status" not in line:
            return match.group(2).strip() or match.group(1)
    return "it exited with an error"


class Console:
    """Step lines on the terminal; each step's output in its own log file (unless verbose)."""

    def __init__(self, log_dir: Path | None, verbose: bool = False) -> None:
        self.log_dir = log_dir
        self.verbose = verbose or log_dir is None
        # The terminal as it was at start, kept open while fds 1 and 2 point at log files.
        self._out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding=sys.stdout.encoding, errors="replace")
        self._err = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1, encoding=sys.stderr.encoding, errors="replace")
        self._tty = self._out.isatty()
        self.current: Step | None = None

    def say(self, text: str = "") -> None:
        """A line for the user, on the terminal's stdout (whatever fd 1 points at now)."""
        self._out.write(text + "\n")
        self._out.flush()

    def error(self, text: str) -> None:
        """A line for the user on the terminal's stderr."""
        self._err.write(text + "\n")
        self._err.flush()

    def close(self) -> None:
        for stream in (self._out, self._err):
            with contextlib.suppress(OSError):
                stream.close()

    @contextlib.contextmanager
    def capture(self, name: str) -> Iterator[Path | None]:
        """Send fds 1 and 2 (and so ``sys.stdout``/``sys.stderr``) to ``<log dir>/<name>.log``."""
        if self.verbose:
            yield None
            return
        assert self.log_dir is not None
        path = self.log_dir / f"{name}.log"
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
        saved_streams = (sys.stdout, sys.stderr)
        log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        # Python-level writers too, in case sys.stdout/stderr were replaced (notebooks, pytest).
        log_stream = open(os.dup(log_fd), "w", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
        try:
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            sys.stdout = sys.stderr = log_stream
            yield path
        finally:
            sys.stdout, sys.stderr = saved_streams
            with contextlib.suppress(ValueError, OSError):
                log_stream.close()
                sys.stdout.flush()
                sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in (*saved, log_fd):
                os.close(fd)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Step]:
        """Run one step: output to its log, a spinner on a TTY, one line at the end.

        An exception is written to the log and re-raised (the CLI turns it into one line);
        for ``StepFailed`` (a subprocess failed) the log's last lines are shown too.
        """
        started = time.monotonic()
        with self.capture(name) as path:
            step = Step(name, path)
            self.current = step
            stop = self._spinner(step, started)
            try:
                yield step
                self.current = None
            except BaseException as err:  # left as ``current``: the step that was running
                step.seconds = time.monotonic() - started
                stop()
                if path is not None and not isinstance(err, StepFailed):
                    traceback.print_exc()  # into the step's log
                interrupted = isinstance(err, KeyboardInterrupt)
                self._line("✗", step, "interrupted" if interrupted else "failed")
                if isinstance(err, StepFailed) and path is not None:
                    self._show_tail(path)
                raise
            finally:
                stop()
        step.seconds = time.monotonic() - started
        self._line("✓", step, step.figure)

    def fail_step(self, step: Step) -> StepFailed:
        """The error for a step whose subprocess failed, naming the reason found in its log."""
        sys.stdout.flush()
        sys.stderr.flush()
        reason = failure_reason(last_lines(step.log_path, 200)) if step.log_path else "it exited with an error"
        return StepFailed(step.name, reason, step.log_path)

    def _line(self, mark: str, step: Step, figure: str) -> None:
        self.say(f"  {mark} {step.name:<{NAME_WIDTH}} {step.seconds:6.1f}s  {figure}".rstrip())

    def _show_tail(self, path: Path) -> None:
        lines = last_lines(path)
        self.say(f"    last {len(lines)} lines of {path}:")
        for line in lines:
            self.say(f"    | {line}")

    def _spinner(self, step: Step, started: float) -> Callable[[], None]:
        """Redraw "<name> <elapsed>" on a TTY until the returned function is called."""
        if not self._tty or self.verbose:
            return lambda: None
        done = threading.Event()

        def draw() -> None:
            for frame in itertools.cycle("|/-\\"):
                if done.wait(0.25):
                    break
                self._out.write(f"\r  {frame} {step.name:<{NAME_WIDTH}} {time.monotonic() - started:6.0f}s")
                self._out.flush()
            self._out.write("\r\x1b[K")
            self._out.flush()

        thread = threading.Thread(target=draw, daemon=True)
        thread.start()

        def stop() -> None:
            if not done.is_set():
                done.set()
                thread.join(1)

        return stop


@contextlib.contextmanager
def kfp_tasks_as_steps(console: Console, figure: Callable[[str, dict[str, Any]], str]) -> Iterator[None]:
    """Run each kfp.local task as a ``console.step``: its output in its own log, one line each.

    kfp.local's DAG runner calls ``task_dispatcher.run_single_task_implementation`` once per task
    (kfp 2.16); wrapping that call for the duration of the run, rather than editing kfp, gives
    each task its own log. ``figure(step, outputs)`` names the step's key figure.
    """
    from kfp.local import executor_input_utils, status, task_dispatcher

    original = task_dispatcher.run_single_task_implementation

    def run_task(*args: Any, **kwargs: Any) -> tuple[dict[str, Any], Any]:
        component = kwargs.get("component_name") or args[1]
        name = executor_input_utils.get_local_task_resource_name(component)
        with console.step(name) as step:
            outputs, task_status = original(*args, **kwargs)
            if task_status == status.Status.FAILURE:
                raise console.fail_step(step)
            try:
                step.figure = figure(name, outputs)
            except Exception as err:  # a missing figure must not fail a finished step
                step.figure = f"(no figure: {err})"
        return outputs, task_status

    task_dispatcher.run_single_task_implementation = run_task
    try:
        yield
    finally:
        task_dispatcher.run_single_task_implementation = original


def print_traceback(stream: TextIO | None = None) -> None:
    """The current exception's traceback (``--verbose``)."""
    traceback.print_exc(file=stream or sys.stderr)
