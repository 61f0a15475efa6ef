"""The monitor: a window of the prediction log against the training reference, plus realized
performance where labels have arrived. Returns a ``MonitorResult``; ``monitoring.report`` draws it.

The reference is the served version's training set: a Parquet file or folder (local or s3://) with
the model's features and, if it has one, a ``score`` column; when it has a ``set`` column only the
``train`` rows count.
"""

from __future__ import annotations

import io
from datetime import datetime, timedelta, timezone
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fraud_common import storage
from fraud_common.prediction_log import DECISION, MODEL_VERSION, REQUEST_ID, SAMPLE_RATE, SCORE, SCORED_AT, USER_ID, read_log
from fraud_common.schemas import MODEL_FEATURES, SET_COLUMN
from fraud_common.settings import Settings
from monitoring import feedback
from monitoring.config import DriftThresholds, MonitorError
from monitoring.drift import compare
from monitoring.report import MonitorResult
from monitoring.sources import data_files

SCORE_BINS = np.linspace(0.0, 1.0, 51)
REFERENCE_SPLIT = "train"  # a reference with a ``set`` column is its training rows


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
