"""``monitor`` and ``feedback``: the monitoring step's entry point.

    monitor   compare a window of the prediction log with the training reference; write
              report.html, summary.png and result.json; exit 0 (no drift), 1 (drift alert), 2 (error)
    feedback  store a delivery of late labels and print the realized performance they reveal

``main(argv)`` takes the subcommand first (``["monitor", "--reference", ...]``), so the
``fraud-detection`` CLI can hand its arguments on unchanged. Every error is one line on stderr.
"""

from __future__ import annotations

import argparse
import io
import sys
from datetime import datetime, timedelta, timezone
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fraud_common import storage
from fraud_common.logs import get_logger, setup_logging
from fraud_common.prediction_log import (
    DECISION, MODEL_VERSION, REQUEST_ID, SAMPLE_RATE, SCORE, SCORED_AT, USER_ID, PredictionLogError, read_log,
)
from fraud_common.schemas import MODEL_FEATURES, SET_COLUMN
from fraud_common.settings import Settings, SettingsError
from monitoring import feedback
from monitoring.drift import DriftThresholds, compare
from monitoring.report import MonitorResult, write_report
from monitoring.sources import data_files

log = get_logger(__name__)

EXIT_OK, EXIT_DRIFT, EXIT_ERROR = 0, 1, 2
SCORE_BINS = np.linspace(0.0, 1.0, 51)
REFERENCE_SPLIT = "train"  # a reference with a ``set`` column is its training rows


class MonitorError(ValueError):
    """The monitor cannot produce a verdict (no data, missing columns, a bad window)."""


def monitoring_root(settings: Settings) -> str:
    """Where the log, the label store and the reports live by default."""
    return str(settings.home / "monitoring")


def default_uris(settings: Settings) -> dict[str, str]:
    root = monitoring_root(settings)
    return {name: storage.join(root, name) for name in ("predictions", "labels", "reports")}


def _parquet_files(uri: str, settings: Settings) -> list[str]:
    if not storage.exists(uri, settings):
        raise MonitorError(f"reference not found: {uri}")
    files = data_files(uri, settings, (".parquet",))
    if not files:
        raise MonitorError(f"no Parquet files at {uri}")
    return files


def read_reference(uri: str, settings: Settings, features: Sequence[str]) -> tuple[dict[str, np.ndarray], list[str]]:
    """The reference's feature columns and its ``score`` if it has one; notes on what was used."""
    tables, notes = [], []
    for path in _parquet_files(uri, settings):
        source = io.BytesIO(storage.read_bytes(path, settings)) if storage.is_s3(path) else path
        try:
            schema = pq.read_schema(source)
            if hasattr(source, "seek"):
                source.seek(0)
            missing = [f for f in features if f not in schema.names]
            if missing:
                raise MonitorError(f"reference {path} lacks feature columns {missing}")
            columns = [*features, *(c for c in (SCORE, SET_COLUMN) if c in schema.names)]
            tables.append(pq.read_table(source, columns=columns))
        except (pa.ArrowInvalid, OSError) as err:
            raise MonitorError(f"reference {path} is not readable Parquet: {str(err).splitlines()[0]}") from None
    table = pa.concat_tables(tables, promote_options="permissive")
    if SET_COLUMN in table.column_names:
        table = table.filter(pc.equal(table[SET_COLUMN], REFERENCE_SPLIT))
        notes.append(f"reference rows: the {REFERENCE_SPLIT!r} split of {uri}")
    if table.num_rows == 0:
        raise MonitorError(f"reference {uri} has no rows")
    columns = {name: table[name].to_numpy() for name in features}
    if SCORE in table.column_names:
        columns[SCORE] = table[SCORE].to_numpy()
    else:
        notes.append("the reference has no 'score' column: the score's drift is not tested")
    return columns, notes


def _shares(values: np.ndarray) -> list[float]:
    counts, _ = np.histogram(np.clip(values, 0.0, 1.0), bins=SCORE_BINS)
    return (counts / max(values.size, 1)).tolist()


def monitor(
    log_uri: str,
    reference_uri: str,
    start: datetime,
    end: datetime,
    settings: Settings,
    labels_uri: str | None = None,
    thresholds: DriftThresholds = DriftThresholds(),
    features: Sequence[str] = MODEL_FEATURES,
) -> MonitorResult:
    """Compare the log's rows scored in ``[start, end)`` with the reference; add realized metrics if labelled."""
    start, end = start.astimezone(timezone.utc), end.astimezone(timezone.utc)
    if not start < end:
        raise MonitorError(f"window start {start.isoformat()} is not before its end {end.isoformat()}")
    reference, notes = read_reference(reference_uri, settings, features)
    window = read_log(log_uri, settings, start, end)
    if window.num_rows < thresholds.min_rows:
        raise MonitorError(
            f"{window.num_rows} logged predictions in {log_uri} from {start.isoformat()} to {end.isoformat()}; "
            f"at least {thresholds.min_rows} are needed for a verdict"
        )
    missing = [f for f in reference if f not in window.column_names]
    if missing:
        raise MonitorError(f"the log lacks columns {missing} (a model with other features was served?)")
    current = {name: window[name].to_numpy() for name in reference}
    columns = compare(reference, current, thresholds)
    versions = pc.value_counts(window[MODEL_VERSION]).to_pylist()
    hours = pc.value_counts(pc.floor_temporal(window[SCORED_AT], unit="hour")).to_pylist()
    result = MonitorResult(
        window_start=start.isoformat(),
        window_end=end.isoformat(),
        log_uri=log_uri,
        reference_uri=reference_uri,
        rows=window.num_rows,
        reference_rows=len(next(iter(reference.values()))),
        model_versions={str(v["values"]): int(v["counts"]) for v in versions},
        sample_rates=sorted(float(r) for r in pc.unique(window[SAMPLE_RATE]).to_pylist()),
        thresholds=thresholds,
        columns=columns,
        score_column=SCORE if SCORE in reference else None,
        notes=notes,
        hourly_rows=sorted((h["values"].isoformat(), int(h["counts"])) for h in hours),
        score_histogram={
            "edges": SCORE_BINS.tolist(),
            "window": _shares(window[SCORE].to_numpy()),
            "reference": _shares(reference[SCORE]) if SCORE in reference else [],
        },
    )
    if labels_uri:
        labels = feedback.load_labels(labels_uri, settings)
        if labels is not None:
            predictions = window.select([REQUEST_ID, USER_ID, SCORED_AT, SCORE, DECISION]).to_pandas()
            joined = feedback.join(predictions, labels)
            bucket = "1h" if end - start <= timedelta(hours=48) else "1D"
            result.overall, result.buckets = feedback.realized_metrics(joined, bucket)
            result.labels_matched, result.labels_total = len(joined), len(labels)
    return result


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


def cmd_monitor(args: argparse.Namespace, settings: Settings) -> int:
    uris = default_uris(settings)
    start, end = window_of(args)
    thresholds = DriftThresholds(psi_alert=args.psi_alert, ks_min_statistic=args.ks_min_statistic, min_rows=args.min_rows)
    if not 0 < thresholds.psi_moderate < thresholds.psi_alert:
        raise MonitorError(f"--psi-alert {args.psi_alert} must be above the moderate band's {thresholds.psi_moderate}")
    result = monitor(
        args.log or uris["predictions"], args.reference, start, end, settings,
        labels_uri=args.labels or uris["labels"], thresholds=thresholds,
    )
    out = args.out or storage.join(uris["reports"], f"{end:%Y%m%dT%H%M%SZ}")
    paths = write_report(result, out, settings)
    worst = max(result.columns, key=lambda c: c.psi)
    if result.drifted:
        print(f"Drift alert in {result.rows:,} predictions: {', '.join(result.drifted)}. Report: {paths['html']}")
        return EXIT_DRIFT
    print(f"No drift in {result.rows:,} predictions (largest PSI {worst.psi:.3f}, {worst.name}). Report: {paths['html']}")
    return EXIT_OK


def cmd_feedback(args: argparse.Namespace, settings: Settings) -> int:
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


def build_parser(prog: str = "monitoring") -> argparse.ArgumentParser:
    """The ``monitor`` and ``feedback`` subcommands."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mon = sub.add_parser("monitor", help="drift report of a window of the prediction log")
    mon.add_argument("--reference", required=True, help="training reference: Parquet file or folder, local or s3://")
    mon.add_argument("--log", help="prediction log root (default: $FRAUD_HOME/monitoring/predictions)")
    mon.add_argument("--labels", help="label store (default: $FRAUD_HOME/monitoring/labels; used if present)")
    mon.add_argument("--start", help="window start, ISO 8601 (default: --hours before --end)")
    mon.add_argument("--end", help="window end, ISO 8601 (default: now)")
    mon.add_argument("--hours", type=float, help="window length when --start is not given (default 24)")
    mon.add_argument("--out", help="report folder (default: $FRAUD_HOME/monitoring/reports/<end>)")
    mon.add_argument("--psi-alert", type=float, default=DriftThresholds.psi_alert, help="PSI that raises the alert (default 0.25)")
    mon.add_argument("--ks-min-statistic", type=float, default=DriftThresholds.ks_min_statistic, help="KS D that raises the alert when significant (default 0.1)")
    mon.add_argument("--min-rows", type=int, default=DriftThresholds.min_rows, help="fewest logged rows for a verdict (default 500)")
    mon.set_defaults(func=cmd_monitor)
    fb = sub.add_parser("feedback", help="store late labels and show realized performance")
    fb.add_argument("--labels", required=True, help="label file or folder (CSV/Parquet: request_id, label, label_time[, user_id])")
    fb.add_argument("--store", help="label store (default: $FRAUD_HOME/monitoring/labels)")
    fb.add_argument("--log", help="prediction log root (default: $FRAUD_HOME/monitoring/predictions)")
    fb.add_argument("--days", type=float, default=30.0, help="how far back to join labels to the log (default 30)")
    fb.set_defaults(func=cmd_feedback)
    return parser


def main(argv: Sequence[str] | None = None, settings: Settings | None = None, prog: str = "monitoring") -> int:
    """Run ``monitor`` or ``feedback``; returns the exit code (2 with one line on stderr on any error)."""
    args = build_parser(prog).parse_args(argv)
    try:
        settings = settings or Settings.from_env()
        setup_logging(settings.log_level)
        return args.func(args, settings)
    except (MonitorError, feedback.FeedbackError, PredictionLogError, storage.StorageError, SettingsError) as err:
        print(f"{prog} {args.command}: {err}", file=sys.stderr)
    except Exception as err:  # noqa: BLE001 - a one-line error, the traceback at debug level
        log.debug("unexpected error", exc_info=True)
        print(f"{prog} {args.command}: unexpected {type(err).__name__}: {err}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
