"""``monitor`` and ``feedback``: the monitoring step's entry point.

    monitor   compare a window of the prediction log with the training reference; write
              report.html, summary.png, result.json and metrics.prom; exit 0 (no drift),
              1 (drift alert), 2 (error); ``--every 1h`` repeats it (a scheduler where none runs)
    feedback  store a delivery of late labels and print the realized performance they reveal
    simulate  send traffic (optionally drifted) to a running predictor and write its labels

``main(argv)`` takes the subcommand first (``["monitor", "--reference", ...]``). The
``fraud-detection`` CLI adds the same two subcommands to its own parser with ``add_commands``.
Every error is one line on stderr. Heavy modules are imported when a command runs, not here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Callable, Sequence

from fraud_common import storage
from fraud_common.logs import get_logger, setup_logging
from fraud_common.settings import Settings
from monitoring.config import DriftThresholds, MonitorError

log = get_logger(__name__)

EXIT_OK, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2


def monitoring_root(settings: Settings) -> str:
    """Where the log, the label store and the reports live by default."""
    return str(settings.home / "monitoring")


def default_uris(settings: Settings) -> dict[str, str]:
    """Default locations: the log the predictor writes (``FRAUD_PREDICTION_LOG_URI``), labels and reports."""
    from fraud_common.prediction_log import default_log_uri

    root = monitoring_root(settings)
    return {"predictions": default_log_uri(settings), **{name: storage.join(root, name) for name in ("labels", "reports")}}


def parse_time(text: str) -> datetime:
    """An ISO 8601 time; without a zone it is UTC."""
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise MonitorError(f"{text!r} is not an ISO 8601 time (e.g. 2026-12-01T00:00:00Z)") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def window_of(args: argparse.Namespace) -> tuple[datetime, datetime]:
    """``[start, end)`` from --start/--end/--hours (default: the last 24 hours)."""
    end = parse_time(args.end) if args.end else datetime.now(timezone.utc)
    if args.hours is not None and not args.hours > 0:
        raise MonitorError(f"--hours {args.hours} must be positive")
    start = parse_time(args.start) if args.start else end - timedelta(hours=args.hours or 24)
    return start, end


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``15m``, ``1h``, ``1d`` (or a bare number of seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text or "")
    if not match or float(match.group(1)) <= 0:
        raise MonitorError(f"{text!r} is not a positive duration like 30s, 15m, 1h or 1d")
    return float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]


def default_reference(settings: Settings) -> str:
    """The training data on one machine: the prepared features (the monitor keeps the train split)."""
    from monitoring.sources import prepared_features

    return prepared_features(settings)


def cmd_monitor(args: argparse.Namespace, settings: Settings) -> int:
    """Write the report of one window (or, with --every, of each period's window); exit code by the verdict."""
    if not args.every:
        return monitor_once(args, settings)
    period = parse_duration(args.every)
    if args.runs is not None and args.runs < 1:
        raise MonitorError(f"--runs {args.runs} must be at least 1")
    code, done = EXIT_OK, 0
    while True:
        started = time.monotonic()
        try:
            code = monitor_once(args, settings)
        except (ValueError, storage.StorageError) as err:  # one bad window does not stop the schedule
            print(f"monitor: {err}", file=sys.stderr)
            code = EXIT_ERROR
        done += 1
        if args.runs is not None and done >= args.runs:
            return code
        time.sleep(max(0.0, period - (time.monotonic() - started)))


def monitor_once(args: argparse.Namespace, settings: Settings) -> int:
    """Write the report of one window; exit code by its verdict."""
    from monitoring.monitor import monitor
    from monitoring.report import write_report
    from monitoring.verdict_metrics import publish

    uris = default_uris(settings)
    start, end = window_of(args)
    thresholds = DriftThresholds(psi_alert=args.psi_alert, ks_min_statistic=args.ks_min_statistic, min_rows=args.min_rows)
    if not 0 < thresholds.psi_moderate < thresholds.psi_alert:
        raise MonitorError(f"--psi-alert {args.psi_alert} must be above the moderate band's {thresholds.psi_moderate}")
    result = monitor(
        args.log or uris["predictions"], args.reference or default_reference(settings), start, end, settings,
        labels_uri=args.labels or uris["labels"], thresholds=thresholds,
    )
    out = args.out or storage.join(uris["reports"], f"{end:%Y%m%dT%H%M%SZ}")
    paths = write_report(result, out, settings)
    publish(result, out, settings, time.time())
    worst = max(result.columns, key=lambda c: c.psi)
    if result.drifted:
        print(f"Drift alert in {result.rows:,} predictions: {', '.join(result.drifted)}. Report: {paths['html']}")
        return EXIT_DRIFT
    print(f"No drift in {result.rows:,} predictions (largest PSI {worst.psi:.3f}, {worst.name}). Report: {paths['html']}")
    return EXIT_OK


def cmd_feedback(args: argparse.Namespace, settings: Settings) -> int:
    """Store a label delivery and print the realized metrics over everything stored."""
    from fraud_common.prediction_log import DECISION, REQUEST_ID, SCORE, SCORED_AT, USER_ID, read_log
    from monitoring import feedback

    uris = default_uris(settings)
    stored, labels = feedback.ingest(args.labels, args.store or uris["labels"], settings)
    end = datetime.now(timezone.utc)
    window = read_log(args.log or uris["predictions"], settings, end - timedelta(days=args.days), end + timedelta(minutes=1))
    line = f"Stored {len(labels):,} labels in {stored}"
    if window.num_rows == 0:
        print(f"{line}; no logged predictions in the last {args.days:g} days to join them to.")
        return EXIT_OK
    predictions = window.select([REQUEST_ID, USER_ID, SCORED_AT, SCORE, DECISION]).to_pandas()
    all_labels = feedback.load_labels(args.store or uris["labels"], settings)
    joined = feedback.join(predictions, all_labels)
    overall, _ = feedback.realized_metrics(joined)
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    o = overall.to_dict()
    print(
        f"{line}; {len(joined):,} of {len(all_labels):,} stored labels match a prediction logged in the last "
        f"{args.days:g} days: precision {fmt(o['precision'])}, recall {fmt(o['recall'])}, ROC-AUC {fmt(o['roc_auc'])}."
    )
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace, settings: Settings) -> int:
    """Send the traffic, print what happened and where the labels are."""
    from pathlib import Path

    from monitoring.simulate import PRESET_DRIFT, DriftSpec, simulate

    base = PRESET_DRIFT if args.drift else DriftSpec()
    drift = DriftSpec(
        online_order_share=args.online_order_share if args.online_order_share is not None else base.online_order_share,
        amount_scale=args.amount_scale if args.amount_scale is not None else base.amount_scale,
        distance_scale=args.distance_scale if args.distance_scale is not None else base.distance_scale,
    )
    url = args.url or f"http://{settings.serve_host}:{settings.serve_port}"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    labels = Path(args.labels_out) if args.labels_out else Path(monitoring_root(settings)) / "simulated-labels" / f"{stamp}.csv"
    began = datetime.now(timezone.utc).replace(microsecond=0)
    result = simulate(url, settings, args.count, args.rate, drift, args.source, labels, args.concurrency, args.seed)
    errors = f", {sum(result.errors.values())} not answered {result.errors}" if result.errors else ""
    print(
        f"Sent {result.sent:,} transactions ({drift.describe()}) to {url} in {result.seconds:.1f}s "
        f"({result.rate:.0f}/s): {result.answered:,} answered, {result.fraud_decisions:,} flagged as fraud{errors}. "
        f"Labels: {result.labels_uri}"
    )
    print(f"Report on this traffic alone: fraud-detection monitor --start {began.isoformat().replace('+00:00', 'Z')}")
    return EXIT_OK if not result.errors else EXIT_ERROR


def add_commands(
    sub: argparse._SubParsersAction, settings_of: Callable[[argparse.Namespace], Settings], prog: str = "monitoring"
) -> None:
    """Add ``monitor``, ``feedback`` and ``simulate`` to a CLI's subparsers; ``settings_of(args)`` gives the settings.

    Each sets ``func(args) -> int``, which runs the command and turns any error into one line on
    stderr and exit code 2.
    """
    mon = sub.add_parser("monitor", help="drift report of a window of the prediction log (exit 0 no drift, 1 drift, 2 error)")
    mon.add_argument("--reference", help="training reference: Parquet file or folder, local or s3:// "
                     "(default: $FRAUD_DATA_URI/prepared/features, else those of the newest local pipeline run)")
    mon.add_argument("--log", help="prediction log root (default: $FRAUD_HOME/monitoring/predictions)")
    mon.add_argument("--labels", help="label store (default: $FRAUD_HOME/monitoring/labels; used if present)")
    mon.add_argument("--start", help="window start, ISO 8601 (default: --hours before --end)")
    mon.add_argument("--end", help="window end, ISO 8601 (default: now)")
    mon.add_argument("--hours", type=float, help="window length when --start is not given (default 24)")
    mon.add_argument("--out", help="report folder (default: $FRAUD_HOME/monitoring/reports/<end>)")
    mon.add_argument("--psi-alert", type=float, default=DriftThresholds.psi_alert, help="PSI that raises the alert (default 0.25)")
    mon.add_argument("--ks-min-statistic", type=float, default=DriftThresholds.ks_min_statistic,
                     help="KS D that raises the alert when significant (default 0.1)")
    mon.add_argument("--min-rows", type=int, default=DriftThresholds.min_rows, help="fewest logged rows for a verdict (default 500)")
    mon.add_argument("--every", help="repeat every DURATION (30s, 15m, 1h, 1d), each over the last --hours; "
                     "for a machine with no scheduler (kfp.local)")
    mon.add_argument("--runs", type=int, help="with --every: stop after this many reports (default: until Ctrl-C)")
    fb = sub.add_parser("feedback", help="store late labels and show realized performance")
    fb.add_argument("--labels", required=True, help="label file or folder (CSV/Parquet: request_id, label, label_time[, user_id])")
    fb.add_argument("--store", help="label store (default: $FRAUD_HOME/monitoring/labels)")
    fb.add_argument("--log", help="prediction log root (default: $FRAUD_HOME/monitoring/predictions)")
    fb.add_argument("--days", type=float, default=30.0, help="how far back to join labels to the log (default 30)")
    sim = sub.add_parser("simulate", help="send traffic (optionally drifted) to a running predictor; write its labels")
    sim.add_argument("--url", help="predictor base URL (default: http://$FRAUD_SERVE_HOST:$FRAUD_SERVE_PORT)")
    sim.add_argument("--count", type=int, default=2000, help="transactions to send (default 2000)")
    sim.add_argument("--rate", type=float, default=100.0, help="requests per second (default 100; 0: as fast as possible)")
    sim.add_argument("--concurrency", type=int, default=4, help="requests in flight at most (default 4)")
    sim.add_argument("--source", help="prepared features to draw from (default: as monitor's --reference)")
    sim.add_argument("--drift", action="store_true", help="drift the traffic: 90%% online orders, amounts x2.5 "
                     "(unless the options below say otherwise)")
    sim.add_argument("--online-order-share", type=float, help="share of online orders (0-1)")
    sim.add_argument("--amount-scale", type=float, help="multiply ratio_to_median_purchase_price")
    sim.add_argument("--distance-scale", type=float, help="multiply distance_from_home")
    sim.add_argument("--labels-out", help="label file to write (default: $FRAUD_HOME/monitoring/simulated-labels/<time>.csv)")
    sim.add_argument("--seed", type=int, help="random seed of the drawn traffic")
    for parser, command in ((mon, cmd_monitor), (fb, cmd_feedback), (sim, cmd_simulate)):
        # ``*console``: the fraud-detection CLI may pass its console as well. ``verbose``: these
        # commands print their own few lines; the CLI must not send them to a step log file.
        parser.set_defaults(
            func=lambda args, *console, command=command: run(command, args, settings_of, prog, *console), verbose=True
        )


def run(
    command: Callable[[argparse.Namespace, Settings], int],
    args: argparse.Namespace,
    settings_of: Callable[[argparse.Namespace], Settings],
    prog: str,
    console: object | None = None,
) -> int:
    """Run one command; any error becomes one line on stderr and exit code 2.

    ``console``: the fraud-detection CLI's console, whose ``say``/``error`` reach the terminal
    while the CLI sends fds 1 and 2 to its log files; the command's lines go there.
    """
    if console is not None and hasattr(console, "say") and hasattr(console, "error"):
        with contextlib.redirect_stdout(_Lines(console.say)), contextlib.redirect_stderr(_Lines(console.error)):
            return run(command, args, settings_of, prog)
    name = command.__name__.removeprefix("cmd_")
    try:
        settings = settings_of(args)
        setup_logging(settings.log_level)
        return command(args, settings)
    except (ValueError, storage.StorageError) as err:  # every error type of ours is one of these
        print(f"{prog} {name}: {err}", file=sys.stderr)
    except Exception as err:  # noqa: BLE001 - a one-line error, the traceback at debug level
        log.debug("unexpected error", exc_info=True)
        print(f"{prog} {name}: unexpected {type(err).__name__}: {err}", file=sys.stderr)
    return EXIT_ERROR


class _Lines(io.TextIOBase):
    """A text stream that hands each complete line to ``emit``."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.emit, self.pending = emit, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self.emit(line)
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.emit(self.pending)
            self.pending = ""


def main(argv: Sequence[str] | None = None, settings: Settings | None = None, prog: str = "monitoring") -> int:
    """Run ``monitor`` or ``feedback`` (the first argument); returns the exit code."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_commands(parser.add_subparsers(dest="command", required=True), lambda _: settings or Settings.from_env(), prog)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
