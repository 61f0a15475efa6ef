"""Synthetic card transactions: label sets (train/validate/test) and per-user transaction history.

Output (names from ``fraud_common.schemas``), written into one local folder:

* ``train.csv``, ``test.csv``, ``validate.csv``: one label row per user, 80/10/10 of the users in
  that order (``schemas.SPLIT_FILES``, the upstream blueprint's order), so label row *i* overall
  belongs to ``user_{i}``. Columns ``schemas.LABEL_COLUMNS``; flags and the label are written as
  ``0.0``/``1.0`` like the public data set.
* ``raw_transaction_datasource.csv``: ``schemas.HISTORY_COLUMNS``, 1 to 34 rows per user
  (uniform), grouped by user and in time order within a user. Timestamps are UTC, written as
  ISO 8601 ``YYYY-MM-DDTHH:MM:SS+00:00``; amounts lie in 10..1000 with two decimals.
* ``generation.json`` (``schemas.RAW_MANIFEST_FILE``): the label time, users and seed, so that
  preparation uses the label time the data was made for.

Generative model (per user; all draws from ``SeedSequence([seed, chunk_index])``)
--------------------------------------------------------------------------------
History. A user has a typical amount ``A ~ LogNormal(ln 60, 0.7)`` and a volatility
``s ~ LogNormal(ln 0.35, 0.5)``; each transaction amount is ``A * exp(s * N(0, 1))``, clipped to
10..1000. The account is ``age`` days old (12% new accounts: 1..30 days; others 30..365 days) and
the last transaction before the label time happened ``dormancy`` days before it (mostly an
exponential with mean 4 days; 8% dormant: 30..200 days; never more than ``age``, never less than
2 hours, so every timestamp of an earlier row is strictly before the label time). The first
earlier transaction is at ``age``, the last at ``dormancy``, the rest uniform in between. About 10%
of users also have 1 to 3 transactions AFTER the label time (up to 30 days after): a
point-in-time-correct data preparation must ignore them. Every user has at least one earlier row.

Label row (the transaction at the label time, ``schemas.DEFAULT_LABEL_TIME`` by default).
``distance_from_home ~ LogNormal(ln 10, 1.40)``, ``distance_from_last_transaction ~
LogNormal(0, 1.79)``, a ratio ``r ~ LogNormal(0, 1.094)`` (these reproduce the public file's
quartiles), flags Bernoulli with the public rates (repeat 0.882, chip 0.35, PIN 0.101, online
0.651). The label amount is ``r`` times the median of the user's earlier amounts, in cents, and
``ratio_to_median_purchase_price`` is that amount divided by that median, so the ratio agrees
exactly with the history file.

Fraud rule. With ``n`` earlier transactions, ``cv`` their standard deviation over their mean
(0 when ``n == 1``), ``last``/``first`` the days since the last/first earlier transaction::

    z = B0 + K * ( 1.2 * ln r + 1.8 * max(ln r - ln 3, 0)          # much larger than usual
                 + 1.4 * online - 3.0 * pin - 0.4 * chip - 0.5 * repeat
                 + 0.6 * ln(home / 10) + 0.8 * max(ln(home / 50), 0) # far from home
                 + 0.15 * ln(last_distance)
                 + 1.6 * exp(-(n - 1) / 3)                           # few earlier transactions
                 + 1.2 * [first < 30]                                # new account
                 + 1.0 * max(ln(last / 14), 0)                       # long dormancy
                 + 2.5 * (cv - 0.35) )                               # erratic earlier amounts
    fraud ~ Bernoulli(sigmoid(z)), then 0.5% of labels are replaced by a fair coin (label noise).

with ``K = FRAUD_SCALE = 3.0`` and ``B0 = FRAUD_INTERCEPT = -12.78`` (about 8.7% fraud). The
Bernoulli draw and the label noise keep a strong model below a perfect score; the history terms
carry signal that the label columns alone do not have. Measured at 100k users
(bench/bench_generate.py): gradient boosting reaches test ROC-AUC ~0.98 with the point-in-time
history aggregates and ~0.955 on the label columns alone.

Performance: users are generated in fixed chunks (``CHUNK_USERS``) with vectorised numpy, each
chunk formatted with pyarrow's CSV writer into a part file by a process pool; the parent appends
the parts in chunk order, so the bytes do not depend on the number of workers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from fraud_common import schemas
from fraud_common.logs import get_logger, setup_logging
from fraud_common.settings import Settings
from fraud_common.storage import is_s3

log = get_logger(__name__)

DEFAULT_USERS = 50_000
CHUNK_USERS = 25_000  # fixed: the bytes depend on it, never on the number of workers
MIN_CHUNKS_FOR_POOL = 4  # by default, fewer chunks than this are made in-process
MIN_HISTORY, MAX_HISTORY = 1, 34
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

AMOUNT_MIN, AMOUNT_MAX = 10.0, 1000.0
POST_LABEL_SHARE = 0.10  # share of users with transactions after the label time
DAY = 86_400
MIN_GAP_SECONDS = 2 * 3600  # earlier rows end at least this long before the label time
MAX_CREATED_DELAY, MAX_UPDATED_DELAY = 120, 600  # seconds: transaction -> created -> updated
LUT_DAYS_BEFORE, LUT_DAYS_AFTER = 400, 40  # date range covered by the timestamp formatter

# Label-row marginals (public data profile) and the fraud rule's coefficients (see docstring).
FLAG_RATES = {"repeat_retailer": 0.882, "used_chip": 0.350, "used_pin_number": 0.101, "online_order": 0.651}
FRAUD_INTERCEPT = -12.78  # calibrated for a fraud rate of about 8.7%
FRAUD_SCALE = 3.0  # sharpness: sets how well a strong model can do (~0.98 ROC-AUC)
LABEL_NOISE = 0.005

CATEGORIES = (
    "grocery",
    "restaurants",
    "gas_transport",
    "online_shopping",
    "travel",
    "entertainment",
    "health",
    "home",
    "electronics",
    "personal_care",
)
CATEGORY_WEIGHTS = (0.20, 0.14, 0.12, 0.14, 0.05, 0.07, 0.06, 0.08, 0.05, 0.09)
CITIES = (
    ("New York", "NY"),
    ("Los Angeles", "CA"),
    ("Chicago", "IL"),
    ("Houston", "TX"),
    ("Phoenix", "AZ"),
    ("Philadelphia", "PA"),
    ("San Antonio", "TX"),
    ("San Diego", "CA"),
    ("Dallas", "TX"),
    ("Seattle", "WA"),
)
CITY_WEIGHTS = (0.22, 0.17, 0.12, 0.10, 0.07, 0.07, 0.06, 0.06, 0.07, 0.06)
HOME_CITY_SHARE = 0.85


@dataclass
class GenerationReport:
    """What ``generate`` wrote: rows per file, where, and how long it took."""

    out_dir: Path
    users: int
    seed: int
    label_time: str
    rows: dict[str, int] = field(default_factory=dict)  # file name -> data rows
    paths: dict[str, Path] = field(default_factory=dict)  # file name -> final path (manifest too)
    seconds: float = 0.0
    fraud_rate: float = 0.0
    post_label_rows: int = 0
    workers: int = 1
    worker_peak_rss_mb: float = 0.0  # largest peak RSS of a process that generated chunks


@dataclass
class ChunkData:
    """One chunk of users in memory: label columns, hidden label amounts and history columns."""

    first_user: int
    labels: dict[str, np.ndarray]  # schemas.LABEL_COLUMNS -> values
    label_amount: np.ndarray  # the label transaction's amount (not written; for coherence checks)
    history: pa.Table  # schemas.HISTORY_COLUMNS
    post_label_rows: int


@dataclass
class ChunkResult:
    """What a worker hands back: label columns and the part file holding the history rows."""

    chunk_index: int
    first_user: int
    labels: dict[str, np.ndarray]
    history_rows: int
    post_label_rows: int
    part_path: Path
    peak_rss_mb: float  # of the process that made the chunk


# ---------------------------------------------------------------------------------------------
# Simulation


def parse_label_time(label_time: str) -> int:
    """Seconds since the epoch of an ISO 8601 timestamp with a time zone."""
    try:
        moment = datetime.fromisoformat(label_time)
    except ValueError:
        raise ValueError(f"label time {label_time!r} is not an ISO 8601 timestamp") from None
    if moment.tzinfo is None:
        raise ValueError(f"label time {label_time!r} has no time zone (e.g. add +00:00)")
    return int(moment.astimezone(timezone.utc).timestamp())


def chunk_rng(seed: int, chunk_index: int) -> np.random.Generator:
    """The random stream of one chunk: depends only on the seed and the chunk's position."""
    return np.random.default_rng(np.random.SeedSequence([seed, chunk_index]))


def _user_level(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Per-user latent traits: history length, post-label count, amounts, account age, dormancy."""
    n_total = rng.integers(MIN_HISTORY, MAX_HISTORY + 1, n)
    # Users with a single row keep it before the label time, so pick post users among the rest.
    has_post = (rng.random(n) < POST_LABEL_SHARE * MAX_HISTORY / (MAX_HISTORY - 1)) & (n_total >= 2)
    n_post = np.where(has_post, np.minimum(rng.integers(1, 4, n), n_total - 1), 0)
    typical = np.exp(rng.normal(np.log(60.0), 0.7, n))
    volatility = np.clip(np.exp(rng.normal(np.log(0.35), 0.5, n)), 0.03, 2.0)
    new_account = rng.random(n) < 0.12
    age_days = np.where(new_account, rng.uniform(1, 30, n), rng.uniform(30, 365, n))
    dormant = rng.random(n) < 0.08
    dormancy_days = np.where(dormant, rng.uniform(30, 200, n), rng.exponential(4.0, n))
    min_gap = MIN_GAP_SECONDS / DAY
    dormancy_days = np.clip(np.minimum(dormancy_days, age_days), min_gap, None)
    age_days = np.maximum(age_days, dormancy_days)
    return {
        "n_total": n_total,
        "n_post": n_post,
        "n_pre": n_total - n_post,
        "typical": typical,
        "volatility": volatility,
        "age_days": age_days,
        "dormancy_days": dormancy_days,
        "home_city": rng.choice(len(CITIES), n, p=CITY_WEIGHTS).astype(np.int8),
        "token_bytes": rng.integers(0, 256, (n, 16), dtype=np.uint8),
    }


def _history_times(rng: np.random.Generator, users: dict[str, np.ndarray], label_epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Transaction times (epoch seconds) of every history row, grouped by user, in time order."""
    n_total, n_pre = users["n_total"], users["n_pre"]
    rows = int(n_total.sum())
    n = len(n_total)
    owner = np.repeat(np.arange(n, dtype=np.int64), n_total)
    starts = np.cumsum(n_total) - n_total
    position = np.arange(rows) - np.repeat(starts, n_total)
    pre = position < np.repeat(n_pre, n_total)
    first_ago = np.repeat(users["age_days"], n_total) * DAY
    last_ago = np.repeat(users["dormancy_days"], n_total) * DAY
    # First earlier row at the account's age, the last at the dormancy, the others in between.
    share = rng.random(rows)
    share[position == 0] = 1.0
    share[position == np.repeat(n_pre - 1, n_total)] = 0.0
    seconds_ago = np.floor(last_ago + share * (first_ago - last_ago))
    seconds_after = np.floor(rng.uniform(3600, 30 * DAY, rows))
    offset_from_label = np.where(pre, -seconds_ago, seconds_after).astype(np.int64)
    # Sort within users by time: the user is the high part of the key, the time the low part.
    lut_start = LUT_DAYS_BEFORE * DAY
    key = (owner << 26) | (offset_from_label + lut_start)
    key.sort()
    sorted_offset = (key & ((1 << 26) - 1)) - lut_start
    return label_epoch + sorted_offset, pre


def _amounts_cents(rng: np.random.Generator, users: dict[str, np.ndarray]) -> np.ndarray:
    """History amounts in cents around each user's typical amount, within 10..1000."""
    n_total = users["n_total"]
    typical = np.repeat(users["typical"], n_total)
    volatility = np.repeat(users["volatility"], n_total)
    amount = typical * np.exp(volatility * rng.standard_normal(int(n_total.sum())))
    return np.round(np.clip(amount, AMOUNT_MIN, AMOUNT_MAX) * 100).astype(np.int64)


def _earlier_stats(cents: np.ndarray, pre: np.ndarray, n_pre: np.ndarray) -> dict[str, np.ndarray]:
    """Median, mean and sample standard deviation of each user's earlier amounts."""
    n = len(n_pre)
    pre_cents = cents[pre]
    owner = np.repeat(np.arange(n, dtype=np.int64), n_pre)
    starts = np.cumsum(n_pre) - n_pre
    ordered = np.sort((owner << 20) | pre_cents) & ((1 << 20) - 1)
    median = (ordered[starts + (n_pre - 1) // 2] + ordered[starts + n_pre // 2]) / 200.0
    amounts = pre_cents / 100.0
    total = np.add.reduceat(amounts, starts)
    squares = np.add.reduceat(amounts * amounts, starts)
    mean = total / n_pre
    variance = np.where(n_pre > 1, (squares - n_pre * mean * mean) / np.maximum(n_pre - 1, 1), 0.0)
    return {"median": median, "mean": mean, "std": np.sqrt(np.clip(variance, 0.0, None))}


def fraud_logit(
    ratio: np.ndarray,
    flags: dict[str, np.ndarray],
    distance_from_home: np.ndarray,
    distance_from_last: np.ndarray,
    n_earlier: np.ndarray,
    earlier_cv: np.ndarray,
    days_since_first: np.ndarray,
    days_since_last: np.ndarray,
) -> np.ndarray:
    """The fraud rule's log-odds (documented in the module docstring)."""
    log_ratio = np.log(ratio)
    score = (
        1.2 * log_ratio
        + 1.8 * np.maximum(log_ratio - np.log(3.0), 0.0)
        + 1.4 * flags["online_order"]
        - 3.0 * flags["used_pin_number"]
        - 0.4 * flags["used_chip"]
        - 0.5 * flags["repeat_retailer"]
        + 0.6 * np.log(distance_from_home / 10.0)
        + 0.8 * np.maximum(np.log(distance_from_home / 50.0), 0.0)
        + 0.15 * np.log(distance_from_last)
        + 1.6 * np.exp(-(n_earlier - 1) / 3.0)
        + 1.2 * (days_since_first < 30)
        + 1.0 * np.maximum(np.log(days_since_last / 14.0), 0.0)
        + 2.5 * (earlier_cv - 0.35)
    )
    return FRAUD_INTERCEPT + FRAUD_SCALE * score


def _label_rows(
    rng: np.random.Generator, stats: dict[str, np.ndarray], history: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Label columns (floats and 0/1 flags) and the label transactions' amounts."""
    n = len(stats["median"])
    distance_from_home = np.exp(rng.normal(np.log(10.0), 1.40, n))
    distance_from_last = np.exp(rng.normal(0.0, 1.79, n))
    draw_ratio = np.exp(rng.normal(0.0, 1.094, n))
    flags = {name: (rng.random(n) < rate).astype(np.float64) for name, rate in FLAG_RATES.items()}
    # The amount is a whole number of cents; the ratio is recomputed from it so both agree.
    label_amount = np.maximum(np.round(draw_ratio * stats["median"] * 100), 1) / 100.0
    ratio = label_amount / stats["median"]
    cv = np.where(stats["mean"] > 0, stats["std"] / stats["mean"], 0.0)
    logit = fraud_logit(
        ratio,
        flags,
        distance_from_home,
        distance_from_last,
        history["n_pre"],
        cv,
        history["days_since_first"],
        history["days_since_last"],
    )
    fraud = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    noisy = rng.random(n) < LABEL_NOISE
    fraud = np.where(noisy, rng.random(n) < 0.5, fraud)
    labels = {
        "distance_from_home": distance_from_home,
        "distance_from_last_transaction": distance_from_last,
        "ratio_to_median_purchase_price": ratio,
        **flags,
        schemas.LABEL: fraud.astype(np.float64),
    }
    return {name: labels[name] for name in schemas.LABEL_COLUMNS}, label_amount


# ---------------------------------------------------------------------------------------------
# Formatting


def _fixed_width_strings(chars: np.ndarray) -> pa.Array:
    """A pyarrow string array over the rows of a 2-D uint8 array (no per-value Python work)."""
    rows, width = chars.shape
    offsets = np.arange(0, (rows + 1) * width, width, dtype=np.int32)
    data = np.ascontiguousarray(chars).reshape(-1)
    return pa.StringArray.from_buffers(rows, pa.py_buffer(offsets), pa.py_buffer(data))


class TimestampFormatter:
    """Formats epoch seconds as ``YYYY-MM-DDTHH:MM:SS+00:00`` with lookup tables (fast)."""

    def __init__(self, label_epoch: int) -> None:
        self.first_day = label_epoch // DAY - LUT_DAYS_BEFORE
        days = np.arange(self.first_day, label_epoch // DAY + LUT_DAYS_AFTER + 1).astype("datetime64[D]")
        self.dates = np.frombuffer(days.astype("S10").tobytes(), np.uint8).reshape(-1, 10)
        seconds = np.arange(DAY)
        clock = np.stack([seconds // 3600, seconds // 60 % 60, seconds % 60], axis=1)
        digits = np.stack([clock // 10, clock % 10], axis=2).reshape(DAY, 6) + ord("0")
        self.clock = np.full((DAY, 8), ord(":"), np.uint8)
        self.clock[:, [0, 1, 3, 4, 6, 7]] = digits

    def format(self, epoch: np.ndarray) -> pa.Array:
        """String array of the timestamps (UTC)."""
        day = epoch // DAY - self.first_day
        if len(day) and (day.min() < 0 or day.max() >= len(self.dates)):
            raise ValueError("timestamp outside the formatter's date range")
        out = np.empty((len(epoch), 25), np.uint8)
        out[:, 0:10] = self.dates[day]
        out[:, 10] = ord("T")
        out[:, 11:19] = self.clock[epoch % DAY]
        out[:, 19:25] = np.frombuffer(b"+00:00", np.uint8)
        return _fixed_width_strings(out)


def _uuid_strings(token_bytes: np.ndarray) -> pa.Array:
    """UUID version 4 strings from 16 random bytes per row."""
    raw = token_bytes.copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    hex_digits = np.frombuffer(b"0123456789abcdef", np.uint8)
    nibbles = np.stack([raw >> 4, raw & 0x0F], axis=2).reshape(len(raw), 32)
    out = np.full((len(raw), 36), ord("-"), np.uint8)
    out[:, [i for i in range(36) if i not in (8, 13, 18, 23)]] = hex_digits[nibbles]
    return _fixed_width_strings(out)


def _user_id_strings(first_user: int, n: int) -> pa.Array:
    """``user_{i}`` for the chunk's users."""
    return pa.array([schemas.user_id(first_user + i) for i in range(n)], pa.string())


def _dictionary(indices: np.ndarray, values: pa.Array) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(indices), values)


_CSV_OPTIONS = pa_csv.WriteOptions(include_header=False, quoting_style="none", batch_size=65_536)
FLAG_TEXT = ("0.0", "1.0")  # how the public file writes flags and the label


def header_line(columns: Sequence[str]) -> bytes:
    """The CSV header row."""
    return (",".join(columns) + "\n").encode()


def label_table(labels: dict[str, np.ndarray], start: int = 0, stop: int | None = None) -> pa.Table:
    """Label rows ``start:stop`` as a table ready for CSV (flags as ``0.0``/``1.0``)."""
    columns = {}
    for name in schemas.LABEL_COLUMNS:
        values = labels[name][start:stop]
        if name in schemas.FLOAT_COLUMNS:
            columns[name] = pa.array(values, pa.float64())
        else:
            columns[name] = _dictionary(values.astype(np.int8), pa.array(FLAG_TEXT, pa.string()))
    return pa.table(columns)


# ---------------------------------------------------------------------------------------------
# One chunk


def simulate_chunk(seed: int, chunk_index: int, first_user: int, n_users: int, label_epoch: int) -> ChunkData:
    """Generate the label rows and history rows of users ``first_user .. first_user+n_users-1``."""
    rng = chunk_rng(seed, chunk_index)
    users = _user_level(rng, n_users)
    times, pre = _history_times(rng, users, label_epoch)
    cents = _amounts_cents(rng, users)
    stats = _earlier_stats(cents, pre, users["n_pre"])
    n_total, n_pre = users["n_total"], users["n_pre"]
    starts = np.cumsum(n_total) - n_total
    history_facts = {
        "n_pre": n_pre,
        "days_since_first": (label_epoch - times[starts]) / DAY,
        "days_since_last": (label_epoch - times[starts + n_pre - 1]) / DAY,
    }
    labels, label_amount = _label_rows(rng, stats, history_facts)

    rows = len(times)
    created = times + rng.integers(0, MAX_CREATED_DELAY + 1, rows)
    updated = created + rng.integers(0, MAX_UPDATED_DELAY + 1, rows)
    owner = np.repeat(np.arange(n_users, dtype=np.int32), n_total)
    away = rng.random(rows) >= HOME_CITY_SHARE
    city = np.where(away, rng.integers(0, len(CITIES), rows), np.repeat(users["home_city"], n_total)).astype(np.int8)
    category = rng.choice(len(CATEGORIES), rows, p=CATEGORY_WEIGHTS).astype(np.int8)

    formatter = _formatter(label_epoch)
    history = pa.table(
        {
            "user_id": _dictionary(owner, _user_id_strings(first_user, n_users)),
            "created": formatter.format(created),
            "updated": formatter.format(updated),
            "date_of_transaction": formatter.format(times),
            "transaction_amount": pa.array(cents / 100.0, pa.float64()),
            "transaction_category": _dictionary(category, pa.array(CATEGORIES)),
            "card_token": _dictionary(owner, _uuid_strings(users["token_bytes"])),
            "city": _dictionary(city, pa.array([name for name, _ in CITIES])),
            "state": _dictionary(city, pa.array([state for _, state in CITIES])),
        }
    ).select(list(schemas.HISTORY_COLUMNS))
    return ChunkData(first_user, labels, label_amount, history, int((~pre).sum()))


_FORMATTERS: dict[int, TimestampFormatter] = {}


def _formatter(label_epoch: int) -> TimestampFormatter:
    """One lookup-table formatter per process and label time."""
    if label_epoch not in _FORMATTERS:
        _FORMATTERS[label_epoch] = TimestampFormatter(label_epoch)
    return _FORMATTERS[label_epoch]


def _write_chunk(seed: int, chunk_index: int, first_user: int, n_users: int, label_epoch: int, part_path: Path) -> ChunkResult:
    """Worker: simulate one chunk, write its history rows to ``part_path``."""
    chunk = simulate_chunk(seed, chunk_index, first_user, n_users, label_epoch)
    pa_csv.write_csv(chunk.history, str(part_path), write_options=_CSV_OPTIONS)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return ChunkResult(chunk_index, first_user, chunk.labels, chunk.history.num_rows, chunk.post_label_rows, part_path, peak_rss_mb)


# ---------------------------------------------------------------------------------------------
# Whole data set


def split_bounds(users: int) -> list[tuple[str, int, int]]:
    """(file name, first user, end user) of each label file in ``schemas.SPLIT_FILES`` order
    (train, test, validate): 80/10/10."""
    first_end = int(round(users * SPLIT_FRACTIONS[0]))
    second_end = first_end + int(round(users * SPLIT_FRACTIONS[1]))
    ends = (first_end, second_end, users)
    starts = (0, first_end, second_end)
    return [(file, start, end) for (_, file), start, end in zip(schemas.SPLIT_FILES, starts, ends)]


def _chunks(users: int) -> list[tuple[int, int, int]]:
    """(chunk index, first user, number of users) covering all users."""
    return [(index, first, min(CHUNK_USERS, users - first)) for index, first in enumerate(range(0, users, CHUNK_USERS))]


def _append_file(target: BinaryIO, part_path: Path) -> None:
    """Append a part file to ``target`` inside the kernel, then delete the part."""
    target.flush()
    with open(part_path, "rb") as part:
        remaining = os.fstat(part.fileno()).st_size
        while remaining > 0:
            copied = os.copy_file_range(part.fileno(), target.fileno(), remaining)
            if copied == 0:
                raise OSError(f"could not append {part_path}")
            remaining -= copied
    part_path.unlink()


def _worker_context():  # noqa: ANN202 - multiprocessing context
    """Forkserver: workers start from a clean single-threaded server (pyarrow keeps threads, and
    forking a threaded process can deadlock) that has the heavy libraries imported already, so
    later pools in the same process start fast."""
    context = get_context("forkserver")
    # Heavy imports only: preloading this module itself confuses ``python -m`` runs.
    context.set_forkserver_preload(["numpy", "pyarrow", "pyarrow.csv", "pandas", "fraud_common.schemas"])
    return context


def _ordered_results(specs: list[tuple[int, int, int]], seed: int, label_epoch: int, work_dir: Path, workers: int) -> Iterator[ChunkResult]:
    """Chunk results in chunk order, with at most ``2 * workers`` chunks in flight."""
    def part(index: int) -> Path:
        return work_dir / f"part-{index:06d}.csv"

    if workers <= 1:
        for index, first, n in specs:
            yield _write_chunk(seed, index, first, n, label_epoch, part(index))
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context()) as pool:
        pending: list[Future[ChunkResult]] = []
        queue = iter(specs)
        for index, first, n in queue:
            pending.append(pool.submit(_write_chunk, seed, index, first, n, label_epoch, part(index)))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.pop(0).result()
            next_spec = next(queue, None)
            if next_spec is not None:
                index, first, n = next_spec
                pending.append(pool.submit(_write_chunk, seed, index, first, n, label_epoch, part(index)))
            yield result


def _progress_bar(total: int, enabled: bool):  # noqa: ANN202 - tqdm or None
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="user", desc="generate", mininterval=1.0)


def generate(
    out_dir: Path,
    users: int = DEFAULT_USERS,
    seed: int = 42,
    progress: bool = True,
    *,
    label_time: str = schemas.DEFAULT_LABEL_TIME,
    workers: int | None = None,
) -> GenerationReport:
    """Write the label sets and the transaction history for ``users`` users into ``out_dir``.

    Files are built in a temporary folder beside ``out_dir`` and moved into place only when all
    are complete; other files in ``out_dir`` are left alone. ``workers`` defaults to the number
    of CPUs (1 for runs of a few chunks); the output bytes are the same for any value.
    """
    if users < 10:
        raise ValueError(f"users={users}: need at least 10 users (one per split file at 80/10/10)")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    label_epoch = parse_label_time(label_time)
    specs = _chunks(users)
    if workers is None:
        # Starting worker processes costs more than it saves on a few chunks.
        workers = (os.cpu_count() or 1) if len(specs) >= MIN_CHUNKS_FOR_POOL else 1
    workers = max(1, min(workers, len(specs)))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir = out_dir.parent / f".{out_dir.name}.generating-{os.getpid()}"
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir()
    report = GenerationReport(out_dir=out_dir, users=users, seed=seed, label_time=label_time, workers=workers)
    log.info("generating %d users (seed %d, %d chunks, %d workers) into %s", users, seed, len(specs), workers, out_dir)
    try:
        _generate_into(work_dir, users, seed, label_epoch, specs, workers, progress, report)
        manifest = {"label_time": label_time, "users": users, "seed": seed}
        (work_dir / schemas.RAW_MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in [*report.rows, schemas.RAW_MANIFEST_FILE]:
            os.replace(work_dir / name, out_dir / name)
            report.paths[name] = out_dir / name
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    report.seconds = time.perf_counter() - started
    log.info("wrote %s in %.1f s (fraud rate %.4f)", report.rows, report.seconds, report.fraud_rate)
    return report


def _generate_into(
    work_dir: Path,
    users: int,
    seed: int,
    label_epoch: int,
    specs: list[tuple[int, int, int]],
    workers: int,
    progress: bool,
    report: GenerationReport,
) -> None:
    """Stream every chunk into the final files inside ``work_dir`` and fill in ``report``."""
    bounds = split_bounds(users)
    label_files = {name: open(work_dir / name, "wb") for name, _, _ in bounds}
    history_file = open(work_dir / schemas.HISTORY_FILE, "wb")
    bar = _progress_bar(users, progress)
    frauds = 0
    try:
        for handle in label_files.values():
            handle.write(header_line(schemas.LABEL_COLUMNS))
        history_file.write(header_line(schemas.HISTORY_COLUMNS))
        report.rows = {name: 0 for name, _, _ in bounds} | {schemas.HISTORY_FILE: 0}
        for result in _ordered_results(specs, seed, label_epoch, work_dir, workers):
            _append_file(history_file, result.part_path)
            n = len(result.labels[schemas.LABEL])
            chunk_end = result.first_user + n
            for name, start, end in bounds:
                lo, hi = max(start, result.first_user), min(end, chunk_end)
                if lo < hi:
                    table = label_table(result.labels, lo - result.first_user, hi - result.first_user)
                    label_files[name].flush()
                    pa_csv.write_csv(table, label_files[name], write_options=_CSV_OPTIONS)
                    report.rows[name] += hi - lo
            report.rows[schemas.HISTORY_FILE] += result.history_rows
            report.post_label_rows += result.post_label_rows
            frauds += int(result.labels[schemas.LABEL].sum())
            report.worker_peak_rss_mb = max(report.worker_peak_rss_mb, result.peak_rss_mb)
            if bar is not None:
                bar.update(n)
    finally:
        for handle in [*label_files.values(), history_file]:
            handle.close()
        if bar is not None:
            bar.close()
    report.fraud_rate = frauds / users


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    """``python -m synthetic_data_generation.generate``: write the raw CSVs into a local folder."""
    parser = argparse.ArgumentParser(prog="python -m synthetic_data_generation.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=DEFAULT_USERS, help=f"number of users (label rows), default {DEFAULT_USERS}")
    parser.add_argument("--out", type=Path, default=None, help="local output folder, default: <FRAUD_DATA_URI>/raw")
    parser.add_argument("--seed", type=int, default=42, help="random seed, default 42")
    parser.add_argument("--label-time", default=schemas.DEFAULT_LABEL_TIME, help="when the label transactions happen (ISO 8601 with zone)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes, default: number of CPUs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    setup_logging(settings.log_level)
    if args.out is None:
        if is_s3(settings.raw_uri):
            parser.error(f"FRAUD_DATA_URI is {settings.data_uri}: give a local --out (uploads: fraud-detection generate)")
        args.out = Path(settings.raw_uri)
    try:
        report = generate(args.out, args.users, args.seed, not args.no_progress, label_time=args.label_time, workers=args.workers)
    except ValueError as error:
        parser.error(str(error))
    for name, rows in report.rows.items():
        print(f"{report.paths[name]}: {rows} rows")
    print(f"{report.paths[schemas.RAW_MANIFEST_FILE]}: label time {report.label_time}")
    print(f"{report.users} users in {report.seconds:.1f} s, fraud rate {report.fraud_rate:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
