"""Late labels (chargebacks) joined to logged predictions, and the performance they reveal.

A label file (CSV or Parquet, a file or a folder) has one row per labelled prediction:
``request_id``, ``label`` (0/1 or true/false: was it fraud) and ``label_time`` (when the label was
known), optionally ``user_id`` (needed when a request scored a batch of users: the pair then
names the row). ``ingest`` validates a file and stores it in the label store (one Parquet file per
delivery, written atomically); ``load_labels`` reads the store back, the latest label per
prediction winning. ``join`` matches labels to the log by request id; ``realized_metrics`` turns
the matched rows into precision and recall at the served decision and ROC-AUC of the score, per
time bucket of scoring time.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from scipy import stats

from fraud_common import storage
from fraud_common.prediction_log import DECISION, REQUEST_ID, SCORE, SCORED_AT, USER_ID
from fraud_common.settings import Settings
from monitoring.sources import data_files

LABEL = "label"
LABEL_TIME = "label_time"
LABEL_COLUMNS = (REQUEST_ID, LABEL, LABEL_TIME)


class FeedbackError(ValueError):
    """A label file or the label store cannot be used."""


def _read_table(uri: str, settings: Settings) -> pa.Table:
    """One CSV or Parquet file, or every such file under a folder, as one table."""
    files = data_files(uri, settings, (".csv", ".parquet"))
    if not files:
        raise FeedbackError(f"no label file (.csv or .parquet) at {uri}")
    tables = []
    for path in files:
        data = storage.read_bytes(path, settings)
        try:
            if path.endswith(".csv"):
                options = pacsv.ConvertOptions(column_types={REQUEST_ID: pa.string(), USER_ID: pa.string()})
                tables.append(pacsv.read_csv(io.BytesIO(data), convert_options=options))
            else:
                tables.append(pq.read_table(io.BytesIO(data)))
        except (pa.ArrowInvalid, OSError) as err:
            raise FeedbackError(f"{path}: not readable as {path.rsplit('.', 1)[-1]}: {str(err).splitlines()[0]}") from None
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as err:
        raise FeedbackError(f"label files under {uri} disagree on columns: {err}") from None


def validate_labels(table: pa.Table, where: str) -> pd.DataFrame:
    """Labels as a frame with checked types: string ids, 0/1 labels, UTC label times."""
    missing = [c for c in LABEL_COLUMNS if c not in table.column_names]
    if missing:
        raise FeedbackError(f"{where}: missing columns {missing} (need {list(LABEL_COLUMNS)}, optional {USER_ID!r})")
    keep = [c for c in (*LABEL_COLUMNS, USER_ID) if c in table.column_names]
    frame = table.select(keep).to_pandas()
    if frame.empty:
        raise FeedbackError(f"{where}: no label rows")
    if frame[REQUEST_ID].isna().any():
        raise FeedbackError(f"{where}: {int(frame[REQUEST_ID].isna().sum())} rows have no request_id")
    frame[REQUEST_ID] = frame[REQUEST_ID].astype(str)
    if USER_ID in frame:
        frame[USER_ID] = frame[USER_ID].astype(str)
    raw = frame[LABEL]
    if raw.dtype == bool:
        frame[LABEL] = raw.astype(np.int8)
    else:
        values = pd.to_numeric(raw, errors="coerce")
        bad = ~values.isin([0, 1])
        if bad.any():
            first = raw[bad].iloc[0]
            raise FeedbackError(f"{where}: {int(bad.sum())} labels are not 0/1 or true/false (first: {first!r})")
        frame[LABEL] = values.astype(np.int8)
    times = pd.to_datetime(frame[LABEL_TIME], utc=True, errors="coerce", format="mixed")
    if times.isna().any():
        first = frame[LABEL_TIME][times.isna()].iloc[0]
        raise FeedbackError(f"{where}: {int(times.isna().sum())} label_time values are not timestamps (first: {first!r})")
    frame[LABEL_TIME] = times
    return frame


def ingest(source_uri: str, store_uri: str, settings: Settings, now: datetime | None = None) -> tuple[str, pd.DataFrame]:
    """Validate a label delivery and store it in the label store; returns (file written, labels)."""
    labels = validate_labels(_read_table(source_uri, settings), source_uri)
    now = now or datetime.now(timezone.utc)
    target = storage.join(store_uri, f"labels-{now:%Y%m%dT%H%M%S%fZ}.parquet")
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(labels, preserve_index=False), sink, compression="zstd")
    storage.write_bytes(target, sink.getvalue(), settings)
    return target, labels


def load_labels(store_uri: str, settings: Settings) -> pd.DataFrame | None:
    """Every stored label, the latest ``label_time`` winning per prediction; None if the store is empty."""
    if not storage.exists(store_uri, settings):
        return None
    labels = validate_labels(_read_table(store_uri, settings), store_uri)
    keys = [REQUEST_ID, USER_ID] if USER_ID in labels and labels[USER_ID].notna().all() else [REQUEST_ID]
    return labels.sort_values(LABEL_TIME).drop_duplicates(keys, keep="last").reset_index(drop=True)


def join(predictions: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Logged predictions with their label, where one has arrived (inner join by request id).

    Keyed by ``request_id`` and, when the labels carry it, ``user_id``. A label that names only a
    request id cannot be given to one row of a batch request: that is an error, not a guess.
    """
    keys = [REQUEST_ID]
    if USER_ID in labels and labels[USER_ID].notna().all():
        keys.append(USER_ID)
    else:
        rows_per_request = predictions.groupby(REQUEST_ID).size()
        labelled_batches = rows_per_request[rows_per_request > 1].index.intersection(labels[REQUEST_ID])
        if len(labelled_batches):
            raise FeedbackError(
                f"{len(labelled_batches)} labelled requests scored several users (first: {labelled_batches[0]!r}); "
                f"their labels need a {USER_ID!r} column"
            )
    columns = [c for c in (REQUEST_ID, USER_ID, SCORED_AT, SCORE, DECISION) if c in predictions]
    return predictions[columns].merge(labels[[*keys, LABEL, LABEL_TIME]], on=keys, how="inner")


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) identity; ties count one half.

    ``(sum of the positives' ranks - P(P+1)/2) / (P*N)``; nan unless both classes are present.
    """
    labels = np.asarray(labels).astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


@dataclass
class RealizedMetrics:
    """Performance over the labelled predictions scored in one time bucket."""

    start: str  # ISO time of the bucket's start ("all" for the whole window)
    labelled: int
    positives: int
    flagged: int  # predictions decided as fraud
    precision: float  # of the flagged, the share that was fraud (nan if none flagged)
    recall: float  # of the fraud, the share flagged (nan if no fraud)
    roc_auc: float

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}


def metrics_of(start: str, joined: pd.DataFrame) -> RealizedMetrics:
    """Precision and recall of the served decision, ROC-AUC of the score, over ``joined``."""
    label = joined[LABEL].to_numpy().astype(bool)
    decided = joined[DECISION].to_numpy().astype(bool)
    hits = int((label & decided).sum())
    flagged, positives = int(decided.sum()), int(label.sum())
    return RealizedMetrics(
        start=start,
        labelled=len(joined),
        positives=positives,
        flagged=flagged,
        precision=hits / flagged if flagged else float("nan"),
        recall=hits / positives if positives else float("nan"),
        roc_auc=roc_auc(label, joined[SCORE].to_numpy()),
    )


def realized_metrics(joined: pd.DataFrame, bucket: str = "1h") -> tuple[RealizedMetrics, list[RealizedMetrics]]:
    """Metrics over the whole join and per ``bucket`` of scoring time (a pandas frequency)."""
    overall = metrics_of("all", joined)
    if joined.empty:
        return overall, []
    starts = pd.to_datetime(joined[SCORED_AT], utc=True).dt.floor(bucket)
    buckets = [metrics_of(start.isoformat(), part) for start, part in joined.groupby(starts, sort=True)]
    return overall, buckets
