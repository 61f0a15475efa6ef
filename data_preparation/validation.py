"""Input validation of the raw CSVs, before any Spark work.

Each file is streamed with pyarrow in blocks (constant memory, C++ parsing), every checked column
is read as text and converted with vectorised casts. Only when a cast fails does Python look at
the values one by one, to name the first bad row. A problem raises ``ValidationError`` whose
message names the file, the column, the line number and the bad value.

A leading unnamed column (the index pandas writes with ``to_csv()``, as the upstream blueprint's
generator does) is accepted with a warning and ignored. The history's latest recorded event is
noted on the way, so that preparation can infer a label time when none is given.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from fraud_common import schemas, storage
from fraud_common.logs import get_logger
from fraud_common.settings import Settings

log = get_logger(__name__)

# Large blocks amortise per-batch overhead over the 17.5M history rows.
BLOCK_SIZE = 16 << 20
HEADER_PROBE_BYTES = 64 << 10
# Free-text history columns (category, card token, city, state) are only checked for presence.
NON_NEGATIVE_COLUMNS = schemas.FLOAT_COLUMNS
BINARY_COLUMNS = schemas.FLAG_COLUMNS + (schemas.LABEL,)
HISTORY_TIMESTAMP_COLUMNS = ("created", "updated", "date_of_transaction")
HISTORY_AMOUNT = "transaction_amount"
# Header cells of a pandas index column: "" from to_csv(), "Unnamed: 0" after a read/write round trip.
INDEX_HEADERS = ("", "Unnamed: 0")


class ValidationError(ValueError):
    """A raw input file does not have the expected shape or content."""


@dataclass(frozen=True)
class FileSummary:
    """What validation learnt about one file."""

    name: str
    header: tuple[str, ...]  # column names in the file's own order (an index column included)
    rows: int
    index_column: bool = False  # a leading unnamed index column was found (and is ignored)
    latest_event_us: int | None = None  # history: latest created/date_of_transaction, UTC epoch µs


def _line(rows_before: int, index: int) -> int:
    """1-based line number of a data row (line 1 is the header)."""
    return rows_before + index + 2


def _fail(name: str, column: str, line: int, value: object, problem: str) -> ValidationError:
    return ValidationError(f"{name}: column {column!r}, line {line}: {problem} (value {value!r})")


def read_header(uri: str, settings: Settings) -> list[str]:
    """The column names on the first line of a CSV (local path or s3:// URI)."""
    name = Path(uri).name
    try:
        if storage.is_s3(uri):
            bucket, key = storage.split_s3(uri)
            response = storage.s3_client(settings).get_object(bucket, key, offset=0, length=HEADER_PROBE_BYTES)
            try:
                head = response.read()
            finally:
                response.close()
                response.release_conn()
        else:
            with open(uri, "rb") as handle:
                head = handle.read(HEADER_PROBE_BYTES)
    except FileNotFoundError:
        raise ValidationError(f"{name}: file not found at {uri}") from None
    except Exception as err:  # noqa: BLE001 - minio raises several kinds; all mean "cannot read"
        if storage.is_s3(uri):
            raise ValidationError(f"{name}: cannot read {uri}: {err}") from err
        raise
    if not head.strip():
        raise ValidationError(f"{name}: file is empty (expected a header line and data rows)")
    first_line = head.splitlines()[0].decode("utf-8-sig", errors="replace")
    return [col.strip() for col in next(csv.reader([first_line]))]


def check_columns(name: str, header: list[str], expected: tuple[str, ...]) -> None:
    """Exactly the expected columns, in any order, each once."""
    missing = [c for c in expected if c not in header]
    extra = [c for c in header if c not in expected]
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if missing:
        raise ValidationError(f"{name}: missing column(s) {missing} in header line 1 {header}; expected {list(expected)}")
    if extra:
        raise ValidationError(f"{name}: unexpected column(s) {extra} in header line 1 {header}; expected {list(expected)}")
    if duplicated:
        raise ValidationError(f"{name}: column(s) {duplicated} appear more than once in header line 1")


def _batches(uri: str, settings: Settings, columns: tuple[str, ...], name: str) -> Iterator[pa.RecordBatch]:
    """Stream the given columns as text, block by block."""
    read_options = pacsv.ReadOptions(block_size=BLOCK_SIZE, use_threads=True)
    convert_options = pacsv.ConvertOptions(
        column_types={c: pa.string() for c in columns},
        include_columns=list(columns),
        strings_can_be_null=False,
        quoted_strings_can_be_null=False,
    )
    response = None
    try:
        if storage.is_s3(uri):
            bucket, key = storage.split_s3(uri)
            response = storage.s3_client(settings).get_object(bucket, key)
            source: object = response
        else:
            source = uri
        reader = pacsv.open_csv(source, read_options=read_options, convert_options=convert_options)
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            yield batch
    except pa.ArrowInvalid as err:
        # Ragged rows and broken quoting are reported by the parser itself.
        raise ValidationError(f"{name}: cannot parse the CSV: {err}") from err
    finally:
        if response is not None:
            response.close()
            response.release_conn()


def _first_index(mask: pa.Array) -> int:
    """Index of the first True in a boolean array, or -1."""
    return pc.index(mask, True).as_py()


def _as_float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _numbers(name: str, column: str, values: pa.Array, rows_before: int) -> pa.Array:
    """Text → float64; names the first value that is not a finite number."""
    try:
        numbers = pc.cast(values, pa.float64())
    except pa.ArrowInvalid:
        for index, value in enumerate(values.to_pylist()):
            if _as_float(value) is None:
                problem = "missing value" if value.strip() == "" else "not a number"
                raise _fail(name, column, _line(rows_before, index), value, problem) from None
        raise  # pragma: no cover - Arrow and Python disagree about a number
    bad = _first_index(pc.invert(pc.is_finite(numbers)))
    if bad >= 0:
        raise _fail(name, column, _line(rows_before, bad), values[bad].as_py(), "not a finite number")
    return numbers


TIMESTAMP_TYPES = (pa.timestamp("us"), pa.timestamp("us", "UTC"))


def _timestamps(name: str, column: str, values: pa.Array, rows_before: int, state: dict[str, pa.DataType]) -> int | None:
    """Every value is an ISO-8601 timestamp (with or without a zone offset); returns the latest
    as UTC epoch microseconds (naive values are taken as UTC).

    Arrow parses naive and zoned values with different types, and a failed cast is expensive,
    so the type that worked for the previous block of this column is tried first.
    """
    last = state.get(column)
    for target in ([last] if last is not None else []) + [t for t in TIMESTAMP_TYPES if t != last]:
        try:
            parsed = pc.cast(values, target)
        except pa.ArrowInvalid:
            continue
        state[column] = target
        return pc.max(parsed.cast(pa.int64())).as_py()
    # Either a bad value or a block that mixes zoned and naive timestamps: look one by one.
    latest = None
    for index, value in enumerate(values.to_pylist()):
        moment = _parse_timestamp(value)
        if moment is None:
            raise _fail(name, column, _line(rows_before, index), value, "not an ISO-8601 timestamp")
        micros = _epoch_us(moment)
        latest = micros if latest is None else max(latest, micros)
    return latest


def _parse_timestamp(value: str) -> datetime | None:
    if value.strip() == "":
        return None
    try:
        return datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return None


def _epoch_us(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    delta = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _check_label_batch(name: str, batch: pa.RecordBatch, rows_before: int, state: dict[str, pa.DataType]) -> int | None:
    for column in schemas.FLOAT_COLUMNS + BINARY_COLUMNS:
        numbers = _numbers(name, column, batch.column(column), rows_before)
        if column in NON_NEGATIVE_COLUMNS:
            bad = _first_index(pc.less(numbers, 0.0))
            if bad >= 0:
                raise _fail(name, column, _line(rows_before, bad), batch.column(column)[bad].as_py(), "must not be negative")
        if column in BINARY_COLUMNS:
            bad = _first_index(pc.invert(pc.or_(pc.equal(numbers, 0.0), pc.equal(numbers, 1.0))))
            if bad >= 0:
                raise _fail(name, column, _line(rows_before, bad), batch.column(column)[bad].as_py(), "must be 0 or 1")
    return None


def _check_history_batch(name: str, batch: pa.RecordBatch, rows_before: int, state: dict[str, pa.DataType]) -> int | None:
    users = batch.column(schemas.ENTITY_KEY)
    bad = _first_index(pc.equal(users, ""))
    if bad >= 0:
        raise _fail(name, schemas.ENTITY_KEY, _line(rows_before, bad), users[bad].as_py(), "missing value")
    amounts = _numbers(name, HISTORY_AMOUNT, batch.column(HISTORY_AMOUNT), rows_before)
    bad = _first_index(pc.less(amounts, 0.0))
    if bad >= 0:
        raise _fail(name, HISTORY_AMOUNT, _line(rows_before, bad), batch.column(HISTORY_AMOUNT)[bad].as_py(), "must not be negative")
    latest = [_timestamps(name, column, batch.column(column), rows_before, state) for column in HISTORY_TIMESTAMP_COLUMNS]
    # The latest event on record: when a transaction happened or was recorded ("updated" is later
    # bookkeeping and does not count).
    known = [value for column, value in zip(HISTORY_TIMESTAMP_COLUMNS, latest) if column != "updated" and value is not None]
    return max(known) if known else None


def _validate_file(
    uri: str,
    settings: Settings,
    expected: tuple[str, ...],
    checked: tuple[str, ...],
    check_batch: Callable[[str, pa.RecordBatch, int, dict[str, pa.DataType]], int | None],
) -> FileSummary:
    name = Path(storage.split_s3(uri)[1] if storage.is_s3(uri) else uri).name
    header = read_header(uri, settings)
    index_column = bool(header) and header[0] in INDEX_HEADERS and header[0] not in expected
    if index_column:
        log.warning("%s: ignoring the unnamed leading index column (as pandas' to_csv writes it)", name)
    check_columns(name, header[1:] if index_column else header, expected)
    rows = 0
    latest: int | None = None
    state: dict[str, pa.DataType] = {}  # per-file memory of what parsed (see _timestamps)
    for batch in _batches(uri, settings, checked, name):
        batch_latest = check_batch(name, batch, rows, state)
        if batch_latest is not None:
            latest = batch_latest if latest is None else max(latest, batch_latest)
        rows += batch.num_rows
    if rows == 0:
        raise ValidationError(f"{name}: file has a header but no data rows")
    return FileSummary(name=name, header=tuple(header), rows=rows, index_column=index_column, latest_event_us=latest)


def validate_label_file(uri: str, settings: Settings) -> FileSummary:
    """Check one of train.csv / validate.csv / test.csv."""
    return _validate_file(uri, settings, schemas.LABEL_COLUMNS, schemas.LABEL_COLUMNS, _check_label_batch)


def validate_history_file(uri: str, settings: Settings) -> FileSummary:
    """Check raw_transaction_datasource.csv (the per-user transaction history)."""
    checked = (schemas.ENTITY_KEY, HISTORY_AMOUNT) + HISTORY_TIMESTAMP_COLUMNS
    return _validate_file(uri, settings, schemas.HISTORY_COLUMNS, checked, _check_history_batch)


def validate_inputs(raw_uri: str, settings: Settings) -> dict[str, FileSummary]:
    """Check all four raw files under ``raw_uri``; keyed by split name and ``history``."""
    summaries = {
        split: validate_label_file(storage.join(raw_uri, file_name), settings)
        for split, file_name in schemas.SPLIT_FILES
    }
    summaries["history"] = validate_history_file(storage.join(raw_uri, schemas.HISTORY_FILE), settings)
    return summaries


def parse_label_time(label_time: str) -> datetime:
    """The label time as an aware UTC datetime; naive values are taken as UTC."""
    try:
        parsed = datetime.fromisoformat(label_time.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(f"--label-time {label_time!r} is not an ISO-8601 timestamp") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


__all__ = [
    "FileSummary",
    "ValidationError",
    "parse_label_time",
    "validate_history_file",
    "validate_inputs",
    "validate_label_file",
]
