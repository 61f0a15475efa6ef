"""New transactions in requests: which fields come with them, how they are checked, what is derived.

A transaction to score carries the card (``user_id``) and the model's seven own fields
(``TRANSACTION_FIELDS``: the three distances/ratios, the four 0/1 flags). The six history
features are not sent: they derive from the card's history state in the online store, as of the
transaction's time (``date_of_transaction``, default: the server's clock). ``transaction_amount``
is optional when scoring (the model does not take it) and required when recording, so the same
object can be scored and then pushed.

Every check names the field: missing, unknown, wrong type, out of range (``RANGES``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
from kserve import InferRequest
from kserve.errors import InvalidInput

from fraud_common import schemas
from rest_predictor.errors import BatchTooLarge, one_line

USER_ID = "user_id"
AMOUNT = "transaction_amount"
WHEN = "date_of_transaction"
TRANSACTIONS = "transactions"
TRANSACTION_FIELDS: tuple[str, ...] = schemas.FLOAT_COLUMNS + schemas.FLAG_COLUMNS
# Closed ranges of the numeric fields. Distances are in the public data set's unit (miles);
# a transaction more than half the earth's circumference away is a broken client, not fraud.
RANGES: dict[str, tuple[float, float]] = {
    "distance_from_home": (0.0, 12_500.0),
    "distance_from_last_transaction": (0.0, 12_500.0),
    "ratio_to_median_purchase_price": (0.0, 1_000_000.0),
    AMOUNT: (0.0, 1_000_000_000.0),
}
# A transaction dated later than this ahead of the server's clock is rejected (clock skew allowed).
MAX_FUTURE_US = 5 * 60 * 1_000_000


@dataclass
class Transactions:
    """Checked transactions, column-wise: what scoring and recording need."""

    user_ids: list[str]
    fields: np.ndarray | None  # [n, 7] float32 in TRANSACTION_FIELDS order; None for a push without them
    amounts: np.ndarray | None  # [n] float64, None when not sent
    when_us: np.ndarray  # [n] int64, µs since the epoch
    batch: bool


def now_us() -> int:
    """The server's clock in µs since the epoch."""
    return time.time_ns() // 1000


def parse_time(value: Any, where: str, clock_us: int) -> int:
    """An ISO 8601 time (naive means UTC) as µs since the epoch; not later than the clock allows."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise InvalidInput(f"{where} must be an ISO 8601 time string, got {type(value).__name__}")
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(one_line(f"{where} is not an ISO 8601 time: {value[:40]!r}")) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    when = (moment - datetime(1970, 1, 1, tzinfo=timezone.utc)) // _MICRO
    if when > clock_us + MAX_FUTURE_US:
        raise InvalidInput(f"{where} {moment.isoformat()} is in the future (server time {format_us(clock_us)})")
    return when


_MICRO = datetime.resolution  # timedelta(microseconds=1)


def format_us(when_us: int) -> str:
    """µs since the epoch as ISO 8601 UTC."""
    return datetime.fromtimestamp(when_us / 1e6, tz=timezone.utc).isoformat()


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{where}.{name} must be a number, got {type(value).__name__}")
    low, high = RANGES[name]
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidInput(f"{where}.{name} must be between {low:g} and {high:g}, got {value!r}")
    return float(value)


def _flag(value: Any, name: str, where: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return float(value)
    raise InvalidInput(f"{where}.{name} must be true/false or 0/1, got {str(value)[:40]!r}")


def _check_keys(body: dict, where: str, required: Sequence[str], optional: Sequence[str]) -> None:
    missing = [f for f in required if f not in body]
    extra = sorted(str(k) for k in body if k not in required and k not in optional)
    if missing or extra:
        problems = []
        if missing:
            problems.append("missing " + ", ".join(missing))
        if extra:
            problems.append("unknown " + ", ".join(repr(k[:40]) for k in extra[:5]))
        hint = "" if missing else (
            f" (a transaction has {USER_ID}, {', '.join(TRANSACTION_FIELDS)}; optional {AMOUNT}, {WHEN})"
        )
        raise InvalidInput(one_line(f"{where}: {'; '.join(problems)}{hint}"))


def parse_json_transactions(
    body: dict, max_batch_size: int, check_user_id, for_push: bool = False, clock_us: int | None = None,
) -> Transactions:
    """Transactions of a v1 body: one flat transaction object or ``{"transactions": [...]}``.

    ``for_push``: ``transaction_amount`` is required and the model fields are optional.
    """
    clock_us = now_us() if clock_us is None else clock_us
    if TRANSACTIONS in body:
        if len(body) != 1:
            raise InvalidInput(f'send "{TRANSACTIONS}" alone, not with {sorted(k for k in body if k != TRANSACTIONS)[:5]}')
        items, batch = body[TRANSACTIONS], True
        if not isinstance(items, list):
            raise InvalidInput(f'"{TRANSACTIONS}" must be a list of objects, got {type(items).__name__}')
        if not items:
            raise InvalidInput(f'"{TRANSACTIONS}" is empty; send at least one transaction')
        if len(items) > max_batch_size:
            raise BatchTooLarge(f'"{TRANSACTIONS}" holds {len(items)} transactions; at most {max_batch_size} per request')
    else:
        items, batch = [body], False
    required = (USER_ID, AMOUNT) if for_push else (USER_ID, *TRANSACTION_FIELDS)
    optional = (*TRANSACTION_FIELDS, WHEN) if for_push else (AMOUNT, WHEN)
    n = len(items)
    user_ids: list[str] = []
    fields = np.zeros((n, len(TRANSACTION_FIELDS)), dtype=np.float32)
    has_fields = not for_push
    amounts = np.zeros(n, dtype=np.float64)
    has_amounts = for_push
    when_us = np.full(n, clock_us, dtype=np.int64)
    for i, item in enumerate(items):
        where = f"{TRANSACTIONS}[{i}]" if batch else "transaction"
        if not isinstance(item, dict):
            raise InvalidInput(f"{where} must be a JSON object, got {type(item).__name__}")
        _check_keys(item, where, required, optional)
        user_ids.append(check_user_id(item[USER_ID], f"{where}.{USER_ID}"))
        given = [f for f in TRANSACTION_FIELDS if f in item]
        if for_push and given and len(given) != len(TRANSACTION_FIELDS):
            missing = [f for f in TRANSACTION_FIELDS if f not in item]
            raise InvalidInput(f"{where}: send all of the model's fields or none; missing {', '.join(missing)}")
        for j, name in enumerate(TRANSACTION_FIELDS):
            if name in item:
                fields[i, j] = _flag(item[name], name, where) if name in schemas.FLAG_COLUMNS else _number(item[name], name, where)
        if AMOUNT in item:
            amounts[i] = _number(item[AMOUNT], AMOUNT, where)
            has_amounts = True
        if WHEN in item:
            when_us[i] = parse_time(item[WHEN], f"{where}.{WHEN}", clock_us)
    return Transactions(user_ids, fields if has_fields else None, amounts if has_amounts else None, when_us, batch)


# --- Open Inference Protocol v2 --------------------------------------------------------------

FLOAT_TYPES = ("FP32", "FP64")
NUMBER_TYPES = FLOAT_TYPES + ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")


def v2_input_types() -> list[dict]:
    """Metadata of every v2 input: ``user_id`` alone scores stored users; with the seven
    transaction fields (``date_of_transaction`` and ``transaction_amount`` optional) it scores
    new transactions. Flags also accept any integer or float type holding 0/1."""
    inputs = [{"name": USER_ID, "datatype": "BYTES", "shape": [-1]}]
    inputs += [{"name": name, "datatype": "FP32", "shape": [-1]} for name in schemas.FLOAT_COLUMNS]
    inputs += [{"name": name, "datatype": "BOOL", "shape": [-1]} for name in schemas.FLAG_COLUMNS]
    inputs += [{"name": WHEN, "datatype": "BYTES", "shape": [-1]}, {"name": AMOUNT, "datatype": "FP64", "shape": [-1]}]
    return inputs


def v2_output_types() -> list[dict]:
    """Metadata of the v2 outputs."""
    return [
        {"name": "prediction", "datatype": "FP32", "shape": [-1, 1]},
        {"name": "fraud", "datatype": "BOOL", "shape": [-1]},
    ]


def _tensor(tensor, n: int) -> np.ndarray:  # noqa: ANN001 - kserve InferInput
    try:
        values = tensor.as_numpy()
    except Exception as err:  # shape/data mismatches surface as numpy or kserve errors
        raise InvalidInput(one_line(f'v2 input "{tensor.name}" data does not match its shape {tensor.shape}: {err}')) from None
    values = values.reshape(-1) if values.ndim == 2 and values.shape[-1] == 1 else values
    if values.ndim != 1 or len(values) != n:
        raise InvalidInput(f'v2 input "{tensor.name}" must have shape [{n}] like "{USER_ID}", got {list(values.shape)}')
    return values


def parse_v2_transactions(request: InferRequest, user_ids: list[str], clock_us: int | None = None) -> Transactions:
    """Transactions of a v2 request whose inputs are ``user_id`` plus the transaction fields."""
    clock_us = now_us() if clock_us is None else clock_us
    by_name = {t.name: t for t in request.inputs}
    known = {USER_ID, *TRANSACTION_FIELDS, WHEN, AMOUNT}
    unknown = sorted(set(by_name) - known)
    missing = [f for f in TRANSACTION_FIELDS if f not in by_name]
    if unknown or missing or len(by_name) != len(request.inputs):
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(repr(u[:40]) for u in unknown[:5])}"] if unknown else []
        ) + (["an input given twice"] if len(by_name) != len(request.inputs) else [])
        raise InvalidInput(one_line(
            f"v2 transaction inputs: {'; '.join(problems)} (send {USER_ID} alone, or with {', '.join(TRANSACTION_FIELDS)})"
        ))
    n = len(user_ids)
    fields = np.zeros((n, len(TRANSACTION_FIELDS)), dtype=np.float32)
    for j, name in enumerate(TRANSACTION_FIELDS):
        tensor = by_name[name]
        flag = name in schemas.FLAG_COLUMNS
        allowed = NUMBER_TYPES + ("BOOL",) if flag else NUMBER_TYPES
        if tensor.datatype not in allowed:
            raise InvalidInput(f'v2 input "{name}" must have datatype {"BOOL" if flag else "FP32"} (or a number type), got {tensor.datatype!r}')
        values = _tensor(tensor, n).astype(np.float64)
        if flag:
            bad = ~np.isin(values, (0.0, 1.0))
            if bad.any():
                raise InvalidInput(f'v2 input "{name}"[{int(np.argmax(bad))}] must be 0/1 or true/false')
        else:
            low, high = RANGES[name]
            bad = ~(np.isfinite(values) & (values >= low) & (values <= high))
            if bad.any():
                i = int(np.argmax(bad))
                raise InvalidInput(f'v2 input "{name}"[{i}] must be between {low:g} and {high:g}, got {values[i]!r}')
        fields[:, j] = values
    when_us = np.full(n, clock_us, dtype=np.int64)
    if WHEN in by_name:
        if by_name[WHEN].datatype != "BYTES":
            raise InvalidInput(f'v2 input "{WHEN}" must have datatype BYTES (ISO 8601 strings)')
        for i, value in enumerate(_tensor(by_name[WHEN], n).tolist()):
            when_us[i] = parse_time(value, f'v2 input "{WHEN}"[{i}]', clock_us)
    amounts = None
    if AMOUNT in by_name:
        if by_name[AMOUNT].datatype not in NUMBER_TYPES:
            raise InvalidInput(f'v2 input "{AMOUNT}" must have a number datatype, got {by_name[AMOUNT].datatype!r}')
        amounts = _tensor(by_name[AMOUNT], n).astype(np.float64)
        for i, value in enumerate(amounts.tolist()):
            _number(value, AMOUNT, f'v2 input "{AMOUNT}"[{i}]')
    return Transactions(user_ids, fields, amounts, when_us, True)
