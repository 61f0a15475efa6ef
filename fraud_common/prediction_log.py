"""The prediction log: every scored request appended, off the request path, to Parquet files.

Layout under the log's root (a local folder or ``s3://bucket/prefix``), partitioned by the hour a
row was scored (UTC)::

    <root>/date=2026-12-01/hour=22/part-20261201T223015123456Z-<host>-<pid>-<seq>.parquet

One row per scored user: ``LOG_COLUMNS`` below, the model's features as served (float32, named as
the model names them), the score and the decision. Rows of one request share its ``request_id``.

Durability, stated as the tests check it:

* ``append`` only puts references into an in-memory buffer; a background thread turns them into
  a file. The request path never waits for storage.
* Rows not yet in a file never exceed ``max_rows``: that is what a kill can lose (one buffer).
  Rows beyond it are dropped and counted (``dropped_rows``), never waited for. The writer starts a
  file when half of ``max_rows`` is buffered or the oldest buffered row is ``max_seconds`` old, so
  appends go on while a file is written.
* ``close`` (also run at interpreter exit) writes everything buffered: nothing is lost on a clean
  shutdown.
* Files are never half-written: local files go to a temporary name and are renamed into place
  (``fraud_common.storage.write_bytes``); an S3 object appears whole or not at all. Readers skip
  the temporary names.
* ``sample_rate`` keeps that share of requests (whole requests, so a batch stays together); each
  row records the rate it was sampled at, so counts can be scaled back.
"""

from __future__ import annotations

import atexit
import io
import itertools
import os
import random
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fraud_common import storage
from fraud_common.logs import get_logger
from fraud_common.settings import Settings

log = get_logger(__name__)

REQUEST_ID = "request_id"
USER_ID = "user_id"
SCORED_AT = "scored_at"
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"
SCORE = "score"
DECISION = "fraud"
LATENCY_MS = "latency_ms"
SAMPLE_RATE = "sample_rate"
# Columns every log file has besides the model's features (which sit between these and SCORE).
LOG_COLUMNS: tuple[str, ...] = (REQUEST_ID, USER_ID, SCORED_AT, MODEL_NAME, MODEL_VERSION)
OUTCOME_COLUMNS: tuple[str, ...] = (SCORE, DECISION, LATENCY_MS, SAMPLE_RATE)
TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")


class PredictionLogError(ValueError):
    """The log's configuration or an appended record cannot be used."""


@dataclass(frozen=True)
class PredictionLogConfig:
    """Where the log goes and how much it may hold in memory."""

    uri: str  # local folder or s3://bucket/prefix
    sample_rate: float = 1.0  # share of requests logged, 0..1
    max_rows: int = 20_000  # rows not yet in a file, at most (what a kill can lose)
    max_seconds: float = 30.0  # oldest buffered row is written within this time

    def __post_init__(self) -> None:
        if not self.uri:
            raise PredictionLogError("prediction log URI is empty")
        if not 0.0 <= self.sample_rate <= 1.0:
            raise PredictionLogError(f"sample rate {self.sample_rate!r} is not between 0 and 1")
        if self.max_rows < 2:
            raise PredictionLogError(f"max_rows {self.max_rows!r} must be at least 2")
        if not self.max_seconds > 0:
            raise PredictionLogError(f"max_seconds {self.max_seconds!r} must be positive")


LOG_OFF = "off"  # FRAUD_PREDICTION_LOG_URI value that turns the log off


def default_log_uri(settings: Settings) -> str:
    """The log root the settings name: ``FRAUD_PREDICTION_LOG_URI``, else ``<home>/monitoring/predictions``."""
    uri = settings.prediction_log_uri.rstrip("/")
    return uri if uri else str(settings.home / "monitoring" / "predictions")


def config_from_settings(settings: Settings) -> PredictionLogConfig | None:
    """The predictor's log configuration, or None when the settings turn the log off."""
    uri = default_log_uri(settings)
    if uri.lower() == LOG_OFF or settings.prediction_log_sample_rate == 0:
        return None
    return PredictionLogConfig(
        uri=uri,
        sample_rate=settings.prediction_log_sample_rate,
        max_rows=settings.prediction_log_max_rows,
        max_seconds=settings.prediction_log_max_seconds,
    )


def log_schema(feature_names: Sequence[str]) -> pa.Schema:
    """The Arrow schema of a log file for a model with these features."""
    clash = set(feature_names) & set(LOG_COLUMNS + OUTCOME_COLUMNS)
    if clash:
        raise PredictionLogError(f"feature names clash with log columns: {sorted(clash)}")
    return pa.schema(
        [
            (REQUEST_ID, pa.string()),
            (USER_ID, pa.string()),
            (SCORED_AT, TIMESTAMP_TYPE),
            (MODEL_NAME, pa.string()),
            (MODEL_VERSION, pa.string()),
            *[(name, pa.float32()) for name in feature_names],
            (SCORE, pa.float32()),
            (DECISION, pa.bool_()),
            (LATENCY_MS, pa.float32()),
            (SAMPLE_RATE, pa.float32()),
        ]
    )


class _Request(NamedTuple):
    """One appended request, kept as the caller's arrays until the writer builds columns.

    The buffer holds these as plain tuples in this field order, with the user ids as a tuple:
    the collector stops tracking an exact tuple of strings, numbers and arrays, so a full buffer
    adds nothing to a full collection. A buffer of NamedTuples and lists made each one walk it:
    10 ms pauses every half second at 1,500 req/s, the predictor's p99.
    """

    request_id: str
    user_ids: Sequence[str]
    features: np.ndarray  # [n, n_features]
    scores: np.ndarray  # [n] or [n, 1]
    decisions: np.ndarray  # [n] bool
    model_name: str
    model_version: str
    latency_ms: float
    scored_at: float  # seconds since the epoch


_USER_IDS = _Request._fields.index("user_ids")


class PredictionLogWriter:
    """Appends scored requests to the log; a daemon thread writes the files."""

    def __init__(
        self,
        config: PredictionLogConfig,
        settings: Settings,
        feature_names: Sequence[str],
        seed: int | None = None,
    ) -> None:
        self.config = config
        self.settings = settings
        self.feature_names = tuple(feature_names)
        self.schema = log_schema(self.feature_names)
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._buffer: list[tuple] = []  # plain tuples in _Request's order
        self._buffered_rows = 0  # in the buffer
        self._writing_rows = 0  # handed to the writer, not yet in a file
        self._oldest = 0.0  # monotonic time of the buffer's first request
        self._closing = False
        self._dropping = False
        self._file_seq = itertools.count()
        self._name_tag = f"{socket.gethostname()}-{os.getpid()}"
        self.appended_rows = 0
        self.dropped_rows = 0
        self.written_rows = 0
        self.written_files = 0
        self.failed_rows = 0
        # Build and encode one row now: a bad feature list fails here, and every module the write
        # path imports lazily (pyarrow imports pandas) is loaded before an exit-time flush needs it.
        probe = _Request("probe", ["probe"], np.zeros((1, len(self.feature_names)), np.float32),
                         np.zeros(1, np.float32), np.zeros(1, bool), "", "", 0.0, time.time())
        pq.write_table(self.to_table([probe]), io.BytesIO(), compression="zstd")
        self._thread = threading.Thread(target=self._run, name="prediction-log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # -- request path -----------------------------------------------------------------------

    def append(
        self,
        request_id: str,
        user_ids: Sequence[str],
        features: np.ndarray,
        scores: np.ndarray,
        decisions: np.ndarray,
        model_name: str,
        model_version: str,
        latency_seconds: float,
        scored_at: float | None = None,
    ) -> bool:
        """Queue one scored request (all its rows); returns whether it was kept.

        Costs a lock and a list append: no copying of the arrays, no I/O. The arrays must not be modified
        afterwards (the predictor builds fresh ones per request).
        """
        rate = self.config.sample_rate
        if rate < 1.0 and (rate == 0.0 or self._random.random() >= rate):
            return False
        rows = len(user_ids)
        record = (  # _Request's fields, as a plain tuple (see _Request)
            request_id, tuple(user_ids), features, scores, decisions, model_name, model_version,
            latency_seconds * 1000.0, time.time() if scored_at is None else scored_at,
        )
        with self._lock:
            if self._buffered_rows + self._writing_rows + rows > self.config.max_rows:
                if not self._dropping:  # once per full buffer, not per request
                    log.warning("prediction log full (%d rows not yet written): dropping rows", self.config.max_rows)
                    self._dropping = True
                self.dropped_rows += rows
                return False
            if not self._buffer:
                self._oldest = time.monotonic()
            self._buffer.append(record)
            self._buffered_rows += rows
            self.appended_rows += rows
            if self._buffered_rows >= self.config.max_rows // 2:
                self._wake.notify()
        return True

    # -- writer -----------------------------------------------------------------------------

    def _due(self) -> bool:
        if not self._buffer:
            return False
        if self._closing or self._buffered_rows >= self.config.max_rows // 2:
            return True
        return time.monotonic() - self._oldest >= self.config.max_seconds

    def _take(self) -> list[tuple]:
        """Move the buffer to the writer (caller holds the lock)."""
        batch, self._buffer = self._buffer, []
        self._writing_rows += self._buffered_rows
        self._buffered_rows = 0
        return batch

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._due() and not self._closing:
                    wait = self.config.max_seconds
                    if self._buffer:
                        wait = max(0.0, self._oldest + self.config.max_seconds - time.monotonic())
                    self._wake.wait(timeout=wait)
                if self._closing and not self._buffer:
                    return
                batch = self._take()
            self._write(batch)

    def _write(self, batch: list[tuple]) -> None:
        """Write one file per hour the batch spans; on failure log it and count the rows lost."""
        rows = sum(len(r[_USER_IDS]) for r in batch)
        try:
            table = self.to_table(batch)
            for uri, part in self._partitions(table):
                sink = io.BytesIO()
                pq.write_table(part, sink, compression="zstd")
                storage.write_bytes(uri, sink.getvalue(), self.settings)
                self.written_files += 1
            self.written_rows += rows
        except Exception as err:  # noqa: BLE001 - the server must keep serving; say what was lost
            self.failed_rows += rows
            log.error("prediction log: %d rows not written to %s: %s", rows, self.config.uri, err)
        finally:
            with self._lock:
                self._writing_rows -= rows
                self._dropping = False

    def to_table(self, batch: Sequence[_Request]) -> pa.Table:
        """The Arrow table of a batch of requests, in the log's schema (one pass per column, no per-row Python)."""
        request_ids, user_ids, features, scores, decisions, names, versions, latencies, times = zip(*batch)
        counts = np.fromiter(map(len, user_ids), dtype=np.int64, count=len(batch))
        rows = int(counts.sum())
        values = np.concatenate(features, axis=None).astype(np.float32, copy=False)  # axis=None flattens each
        if values.size != rows * len(self.feature_names):
            raise PredictionLogError(f"{values.size} feature values for {rows} rows; the model has {len(self.feature_names)} features")
        values = values.reshape(rows, len(self.feature_names))
        owner = pa.array(np.repeat(np.arange(len(batch)), counts))

        def per_request(items: tuple) -> pa.Array:
            return pa.DictionaryArray.from_arrays(owner, pa.array(items, pa.string())).cast(pa.string())

        columns = {
            REQUEST_ID: per_request(request_ids),
            USER_ID: pa.array(list(itertools.chain.from_iterable(user_ids)), pa.string()),
            SCORED_AT: pa.array(np.repeat((np.array(times) * 1e6).astype(np.int64), counts), TIMESTAMP_TYPE),
            MODEL_NAME: per_request(names),
            MODEL_VERSION: per_request(versions),
        }
        for i, name in enumerate(self.feature_names):
            columns[name] = pa.array(values[:, i])
        columns[SCORE] = pa.array(np.concatenate(scores, axis=None).astype(np.float32, copy=False))
        columns[DECISION] = pa.array(np.concatenate(decisions, axis=None).astype(bool, copy=False))
        columns[LATENCY_MS] = pa.array(np.repeat(np.array(latencies, dtype=np.float32), counts))
        columns[SAMPLE_RATE] = pa.array(np.full(rows, self.config.sample_rate, dtype=np.float32))
        for name in (SCORE, DECISION):
            if len(columns[name]) != rows:
                raise PredictionLogError(f"{len(columns[name])} values of {name!r} for {rows} rows")
        return pa.Table.from_pydict(columns, schema=self.schema)

    def _partitions(self, table: pa.Table):  # noqa: ANN202 - iterator of (uri, table)
        """Split a table by the UTC hour of ``scored_at``; one file URI per hour."""
        hours = pc.floor_temporal(table[SCORED_AT], unit="hour")
        for hour in pc.unique(hours).to_pylist():
            part = table.filter(pc.equal(hours, pa.scalar(hour, TIMESTAMP_TYPE)))
            now = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            name = f"part-{now}-{self._name_tag}-{next(self._file_seq):06d}.parquet"
            yield storage.join(self.config.uri, partition_path(hour), name), part

    # -- shutdown ---------------------------------------------------------------------------

    def flush(self, timeout: float = 30.0) -> None:
        """Write everything appended so far, and wait until it is in files."""
        with self._wake:
            batch = self._take() if self._buffer else []
        if batch:
            self._write(batch)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._writing_rows == 0:
                    return
            time.sleep(0.005)

    def close(self) -> None:
        """Stop the writer thread after it wrote everything; safe to call twice."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)
        self.flush()  # rows appended after the thread stopped (a request finishing during shutdown)

    def __enter__(self) -> "PredictionLogWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def partition_path(hour: datetime) -> str:
    """``date=YYYY-MM-DD/hour=HH`` of an hour (UTC)."""
    hour = hour.astimezone(timezone.utc)
    return f"date={hour:%Y-%m-%d}/hour={hour:%H}"


def _hour_of(uri: str) -> datetime | None:
    """The UTC hour a file's partition path names, or None if it is not a log file."""
    parts = uri.replace("\\", "/").split("/")
    if len(parts) < 3 or parts[-1].startswith(".") or not parts[-1].endswith(".parquet"):
        return None
    date, hour = parts[-3], parts[-2]
    if not (date.startswith("date=") and hour.startswith("hour=")):
        return None
    try:
        return datetime.strptime(f"{date[5:]} {hour[5:]}", "%Y-%m-%d %H").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def log_files(uri: str, settings: Settings, start: datetime, end: datetime) -> list[str]:
    """The log files holding rows scored in ``[start, end)`` (by their hour partitions)."""
    files: list[str] = []
    day = start.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    while day < end:
        for path in storage.list_files(storage.join(uri, f"date={day:%Y-%m-%d}"), settings):
            hour = _hour_of(path)
            if hour is not None and start - timedelta(hours=1) < hour < end:
                files.append(path)
        day += timedelta(days=1)
    return files


def read_log(
    uri: str, settings: Settings, start: datetime, end: datetime, columns: Sequence[str] | None = None
) -> pa.Table:
    """Every logged row scored in ``[start, end)``, as one table (empty if none)."""
    if start.tzinfo is None or end.tzinfo is None:
        raise PredictionLogError("window bounds must carry a time zone")
    if columns is not None and SCORED_AT not in columns:
        columns = [*columns, SCORED_AT]
    tables = []
    paths = log_files(uri, settings, start, end) if storage.exists(uri, settings) else []
    for path in paths:
        if storage.is_s3(path):
            table = pq.read_table(io.BytesIO(storage.read_bytes(path, settings)), columns=columns)
        else:
            table = pq.read_table(path, columns=columns)
        tables.append(table)
    if not tables:
        return pa.table({SCORED_AT: pa.array([], TIMESTAMP_TYPE)})
    table = pa.concat_tables(tables, promote_options="permissive")
    scored = table[SCORED_AT]
    keep = pc.and_(
        pc.greater_equal(scored, pa.scalar(start, TIMESTAMP_TYPE)), pc.less(scored, pa.scalar(end, TIMESTAMP_TYPE))
    )
    return table.filter(keep)
