"""Traffic simulation: scored requests sent to a running predictor at a set rate, optionally
drifted, with the labels written for ``fraud-detection feedback``.

Where the traffic comes from: rows of the prepared data set (``<data>/prepared/features``) outside
the training split, drawn with replacement. Each becomes a new-transaction request (v1
transaction form) for that row's card, dated at the row's own time, so the predictor derives the
same history features the row holds: undrifted traffic is the population the model was trained
on, and a drift report over it must stay quiet. Drift changes the transactions' own fields
(``DriftSpec``): the share of online orders, the amount relative to the card's median, the
distance from home. The rows' labels stay as they were (the drift is in the inputs only).

Each request carries an ``X-Request-Id`` the predictor keeps (``sim-<run>-<n>``), so the label
file can name it before the answers are back: ``request_id, user_id, label, label_time``.
"""

from __future__ import annotations

import csv
import http.client
import io
import itertools
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fraud_common import schemas, storage
from fraud_common.logs import get_logger
from fraud_common.settings import Settings
from monitoring.config import MonitorError
from monitoring.sources import data_files, prepared_features

log = get_logger(__name__)

V1_PATH = "/v1/models/onnx-model:predict"
TRAINING_SPLIT = "train"
ONLINE_ORDER = "online_order"
AMOUNT = "ratio_to_median_purchase_price"
DISTANCE = "distance_from_home"
SOURCE_COLUMNS = (schemas.ENTITY_KEY, schemas.EVENT_TIMESTAMP, schemas.SET_COLUMN, schemas.LABEL, *schemas.FLOAT_COLUMNS, *schemas.FLAG_COLUMNS)


@dataclass(frozen=True)
class DriftSpec:
    """How simulated transactions differ from the source rows; the default changes nothing."""

    online_order_share: float | None = None  # share of online orders (None: as in the data)
    amount_scale: float = 1.0  # multiplies ratio_to_median_purchase_price
    distance_scale: float = 1.0  # multiplies distance_from_home

    def __post_init__(self) -> None:
        if self.online_order_share is not None and not 0.0 <= self.online_order_share <= 1.0:
            raise MonitorError(f"online-order share {self.online_order_share} is not between 0 and 1")
        for name in ("amount_scale", "distance_scale"):
            if not getattr(self, name) > 0:
                raise MonitorError(f"{name.replace('_', '-')} {getattr(self, name)} must be positive")

    @property
    def is_drift(self) -> bool:
        return self.online_order_share is not None or self.amount_scale != 1.0 or self.distance_scale != 1.0

    def describe(self) -> str:
        parts = []
        if self.online_order_share is not None:
            parts.append(f"online-order share {self.online_order_share:.0%}")
        if self.amount_scale != 1.0:
            parts.append(f"amounts ×{self.amount_scale:g}")
        if self.distance_scale != 1.0:
            parts.append(f"distance from home ×{self.distance_scale:g}")
        return ", ".join(parts) or "no drift"


# What ``--drift`` alone means: the classic card-fraud shift, more online orders with larger amounts.
PRESET_DRIFT = DriftSpec(online_order_share=0.9, amount_scale=2.5)


@dataclass
class SimulationResult:
    """What was sent and how it was answered."""

    sent: int = 0
    answered: int = 0
    errors: dict[int, int] = field(default_factory=dict)  # HTTP status (0: no answer) -> count
    seconds: float = 0.0
    labels_uri: str | None = None
    fraud_decisions: int = 0

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


def default_source(settings: Settings) -> str:
    """The prepared features the served model was trained from (``monitoring.sources.prepared_features``)."""
    return prepared_features(settings)


def read_source(uri: str, settings: Settings) -> pa.Table:
    """The source rows outside the training split (all rows when the data has no split column)."""
    files = data_files(uri, settings, (".parquet",))
    if not files:
        raise MonitorError(f"no Parquet files at {uri} to draw traffic from (run `fraud-detection run` first, or pass --source)")
    tables = []
    for path in files:
        source = io.BytesIO(storage.read_bytes(path, settings)) if storage.is_s3(path) else path
        schema = pq.read_schema(source)
        if hasattr(source, "seek"):
            source.seek(0)
        missing = [c for c in SOURCE_COLUMNS if c not in schema.names and c != schemas.SET_COLUMN]
        if missing:
            raise MonitorError(f"{path} lacks columns {missing}; the simulator needs prepared features")
        tables.append(pq.read_table(source, columns=[c for c in SOURCE_COLUMNS if c in schema.names]))
    table = pa.concat_tables(tables, promote_options="permissive")
    if schemas.SET_COLUMN in table.column_names:
        held_out = table.filter(pc.not_equal(table[schemas.SET_COLUMN], TRAINING_SPLIT))
        table = held_out if held_out.num_rows else table
    if table.num_rows == 0:
        raise MonitorError(f"{uri} has no rows")
    return table


def transactions(table: pa.Table, count: int, drift: DriftSpec, rng: np.random.Generator) -> list[dict]:
    """``count`` transaction bodies drawn from ``table`` with ``drift`` applied; each with its label."""
    picks = rng.integers(0, table.num_rows, size=count)
    rows = table.take(pa.array(picks)).to_pydict()
    when = [t.astimezone(timezone.utc).isoformat() for t in rows[schemas.EVENT_TIMESTAMP]]
    online = rows[ONLINE_ORDER]
    if drift.online_order_share is not None:
        online = (rng.random(count) < drift.online_order_share).astype(int).tolist()
    bodies = []
    for i in range(count):
        body = {
            schemas.ENTITY_KEY: rows[schemas.ENTITY_KEY][i],
            **{name: float(rows[name][i]) for name in schemas.FLOAT_COLUMNS},
            **{name: int(rows[name][i]) for name in schemas.FLAG_COLUMNS},
            "date_of_transaction": when[i],
        }
        body[ONLINE_ORDER] = int(online[i])
        body[AMOUNT] *= drift.amount_scale
        body[DISTANCE] *= drift.distance_scale
        bodies.append({"body": body, "label": int(rows[schemas.LABEL][i])})
    return bodies


class _Sender:
    """One keep-alive HTTP connection per worker thread."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MonitorError(f"--url {url!r} is not an http(s) URL like http://127.0.0.1:8081")
        self.parts, self.timeout = parts, timeout
        self.conn: http.client.HTTPConnection | None = None

    def post(self, body: bytes, request_id: str) -> tuple[int, dict | None]:
        for attempt in (0, 1):  # one retry on a connection the server closed while idle
            if self.conn is None:
                kind = http.client.HTTPSConnection if self.parts.scheme == "https" else http.client.HTTPConnection
                self.conn = kind(self.parts.hostname, self.parts.port, timeout=self.timeout)
            try:
                self.conn.request("POST", self.parts.path.rstrip("/") + V1_PATH, body,
                                  {"Content-Type": "application/json", "X-Request-Id": request_id})
                response = self.conn.getresponse()
                data = response.read()
                return response.status, (json.loads(data) if response.status == 200 else None)
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    return 0, None
        return 0, None


def simulate(
    url: str,
    settings: Settings,
    count: int,
    rate: float,
    drift: DriftSpec = DriftSpec(),
    source_uri: str | None = None,
    labels_path: Path | None = None,
    concurrency: int = 4,
    seed: int | None = None,
    timeout: float = 10.0,
) -> SimulationResult:
    """Send ``count`` transactions at ``rate`` per second (0: as fast as the workers go); write labels."""
    if count < 1:
        raise MonitorError(f"--count {count} must be at least 1")
    if rate < 0 or concurrency < 1:
        raise MonitorError("--rate must be >= 0 and --concurrency >= 1")
    _Sender(url, timeout)  # checks the URL here: a worker thread's error would be lost
    rng = np.random.default_rng(seed)
    work = transactions(read_source(source_uri or default_source(settings), settings), count, drift, rng)
    run = uuid.uuid4().hex[:8]
    ids = [f"sim-{run}-{i:07d}" for i in range(count)]
    payloads = [json.dumps(w["body"]).encode() for w in work]
    result = SimulationResult()
    answered = [False] * count
    next_index = itertools.count()
    lock = threading.Lock()
    started = time.monotonic()

    def worker() -> None:
        sender = _Sender(url, timeout)
        while True:
            i = next(next_index)
            if i >= count:
                return
            if rate > 0:  # request i is due at start + i/rate: the rate holds whatever the latency
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            status, answer = sender.post(payloads[i], ids[i])
            with lock:
                result.sent += 1
                if status == 200 and answer is not None:
                    answered[i] = True
                    result.answered += 1
                    result.fraud_decisions += bool(answer.get("fraud"))
                else:
                    result.errors[status] = result.errors.get(status, 0) + 1

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(concurrency, count))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.seconds = time.monotonic() - started
    if result.answered == 0:
        raise MonitorError(f"no request to {url} was answered (statuses {result.errors}); is the predictor running?")
    if labels_path is not None:
        result.labels_uri = str(write_labels(labels_path, ids, work, answered))
    return result


def write_labels(path: Path, ids: Sequence[str], work: Sequence[dict], answered: Sequence[bool]) -> Path:
    """The label file of the answered requests (written to a temporary name, then moved into place)."""
    now = datetime.now(timezone.utc).isoformat()
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["request_id", "user_id", "label", "label_time"])
    for request_id, item, ok in zip(ids, work, answered):
        if ok:
            writer.writerow([request_id, item["body"][schemas.ENTITY_KEY], item["label"], now])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(out.getvalue())
    staging.replace(path)
    return path
