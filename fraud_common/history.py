"""A card's transaction-history aggregates: one definition for the Spark batch job and the push path.

The model's six history features (``schemas.HISTORY_FEATURES``) derive from a small per-user
state that can be updated one transaction at a time and stays exact:

* ``count``, ``total`` (sum of amounts), ``max`` of amounts;
* ``mean`` and ``m2`` (sum of squared deviations), updated with Welford's step in the form Spark's
  ``stddev_samp`` uses (``CentralMomentAgg``: ``delta = x - mean; mean += delta / n;
  m2 += delta * (delta - delta / n)``);
* ``first_us`` / ``last_us``: earliest and latest transaction time, microseconds since the epoch.

Features from a state as of a moment (``history_features``): ``avg = total / count`` (Spark's
``avg``), ``stdv = sqrt(m2 / (count - 1))`` (Spark's ``stddev_samp``; null for fewer than two
values, which the batch job turns into 0), days since the last and first transaction computed at
that moment, never stored. No history: every feature 0.

``spark_state_aggregates`` and ``spark_history_features`` are the same definitions as Spark column
expressions; ``data_preparation.main`` builds its aggregates from them. A parity test replays
generated histories through the push path and compares with Spark's output for every user.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np

from fraud_common.schemas import HISTORY_FEATURES

if TYPE_CHECKING:
    from pyspark.sql import Column

MICROS_PER_DAY = 86_400_000_000.0
STATE_FIELDS: tuple[str, ...] = ("count", "total", "mean", "m2", "max", "first_us", "last_us")


@dataclass(frozen=True)
class HistoryState:
    """Everything the history features of one card need; ``count == 0`` means no history."""

    count: int = 0
    total: float = 0.0
    mean: float = 0.0
    m2: float = 0.0
    max: float = 0.0
    first_us: int = 0
    last_us: int = 0


EMPTY = HistoryState()


def add(state: HistoryState, amount: float, when_us: int) -> HistoryState:
    """``state`` with one more transaction of ``amount`` at ``when_us`` (any order of arrival)."""
    if state.count == 0:
        return HistoryState(1, amount, amount, 0.0, amount, when_us, when_us)
    n = state.count + 1
    delta = amount - state.mean
    delta_n = delta / n
    return HistoryState(
        count=n,
        total=state.total + amount,
        mean=state.mean + delta_n,
        m2=state.m2 + delta * (delta - delta_n),
        max=max(state.max, amount),
        first_us=min(state.first_us, when_us),
        last_us=max(state.last_us, when_us),
    )


def add_all(state: HistoryState, transactions: Iterable[tuple[float, int]]) -> HistoryState:
    """``state`` after ``(amount, when_us)`` transactions, in order."""
    for amount, when_us in transactions:
        state = add(state, amount, when_us)
    return state


def history_features(state: HistoryState, as_of_us: int) -> tuple[float, ...]:
    """The six ``schemas.HISTORY_FEATURES`` of ``state`` as of ``as_of_us``, in that order."""
    n = state.count
    if n == 0:
        return (0.0,) * len(HISTORY_FEATURES)
    stdv = math.sqrt(state.m2 / (n - 1)) if n > 1 else 0.0
    return (
        float(n),
        state.total / n,
        state.max,
        stdv,
        (as_of_us - state.last_us) / MICROS_PER_DAY,
        (as_of_us - state.first_us) / MICROS_PER_DAY,
    )


def state_columns(features: Mapping[str, np.ndarray], as_of_us: np.ndarray) -> dict[str, np.ndarray]:
    """The states behind prepared rows' history features computed at ``as_of_us`` (their event
    times), as one array per ``STATE_FIELDS`` name: a whole prepared data set in a few numpy passes.

    Exact for ``count``, ``max`` and both times (microseconds are recovered by rounding, half to
    even as Python's ``round``); ``total`` and ``m2`` are recovered from the mean and the stddev to
    within a few ulps. A row with no history gives the empty state (all zeros).
    """
    count = np.asarray(features["num_prev_transactions"], dtype=np.float64).astype(np.int64)
    mean = np.asarray(features["avg_prev_transaction_amount"], dtype=np.float64)
    stdv = np.asarray(features["stdv_prev_transaction_amount"], dtype=np.float64)
    as_of = np.asarray(as_of_us, dtype=np.int64)

    def micros_before(days_name: str) -> np.ndarray:
        days = np.asarray(features[days_name], dtype=np.float64)
        return as_of - np.rint(days * MICROS_PER_DAY).astype(np.int64)

    columns = {
        "count": count,
        "total": mean * count,
        "mean": mean,
        "m2": stdv * stdv * (count - 1),
        "max": np.asarray(features["max_prev_transaction_amount"], dtype=np.float64),
        "first_us": micros_before("days_since_first_transaction"),
        "last_us": micros_before("days_since_last_transaction"),
    }
    empty = count == 0
    return {name: np.where(empty, 0, columns[name]).astype(columns[name].dtype) for name in STATE_FIELDS}


def state_from_features(features: Mapping[str, float], as_of_us: int) -> HistoryState:
    """``state_columns`` of one prepared row."""
    columns = state_columns({name: np.array([features[name]]) for name in HISTORY_FEATURES}, np.array([as_of_us]))
    return HistoryState(*(columns[name][0].item() for name in STATE_FIELDS))


# --- Wire form (the online stores keep one short text value per card) -------------------------


def encode(state: HistoryState) -> bytes:
    """``state`` as ``b"count total mean m2 max first_us last_us"`` (floats round-trip exactly)."""
    return encode_values(tuple(getattr(state, name) for name in STATE_FIELDS))


def encode_values(values: Sequence) -> bytes:
    """``encode`` of a state given as its ``STATE_FIELDS`` values (int, four floats, int, int)."""
    return " ".join(map(repr, values)).encode()


def decode(raw: bytes | str) -> HistoryState:
    """The inverse of ``encode``; ``ValueError`` for anything else."""
    parts = (raw.decode() if isinstance(raw, bytes) else raw).split()
    if len(parts) != len(STATE_FIELDS):
        raise ValueError(f"history state needs {len(STATE_FIELDS)} fields, got {len(parts)}")
    count, first_us, last_us = int(parts[0]), int(parts[5]), int(parts[6])
    total, mean, m2, top = (float(p) for p in parts[1:5])
    return HistoryState(count, total, mean, m2, top, first_us, last_us)


# --- The same definitions in Spark -----------------------------------------------------------


def spark_state_aggregates(amount: "Column", when_us: "Column") -> list["Column"]:
    """Aggregate columns over the counted rows (``amount``/``when_us`` null where a row does not
    count): ``count``, ``total``, ``max``, ``stdv`` (Spark's ``stddev_samp``, this module's
    Welford step), ``first_us``, ``last_us``."""
    from pyspark.sql import functions as F

    return [
        F.count(amount).alias("count"),
        F.sum(amount).alias("total"),
        F.max(amount).alias("max"),
        F.stddev_samp(amount).alias("stdv"),
        F.min(when_us).alias("first_us"),
        F.max(when_us).alias("last_us"),
    ]


def spark_history_features(as_of_us: "Column") -> list["Column"]:
    """``schemas.HISTORY_FEATURES`` from the columns of ``spark_state_aggregates`` (after a left
    join, so null where a user has no history) as of ``as_of_us``: the definitions of
    ``history_features``, no history giving 0."""
    from pyspark.sql import functions as F

    count = F.coalesce(F.col("count"), F.lit(0).cast("long"))
    defined = count > 0
    values = {
        "num_prev_transactions": count,
        "avg_prev_transaction_amount": F.when(defined, F.col("total") / count),
        "max_prev_transaction_amount": F.col("max"),
        "stdv_prev_transaction_amount": F.when(count > 1, F.col("stdv")),
        "days_since_last_transaction": (as_of_us - F.col("last_us")) / MICROS_PER_DAY,
        "days_since_first_transaction": (as_of_us - F.col("first_us")) / MICROS_PER_DAY,
    }
    return [
        (values[name] if name == "num_prev_transactions" else F.coalesce(values[name], F.lit(0.0))).alias(name)
        for name in HISTORY_FEATURES
    ]
