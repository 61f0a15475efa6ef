"""Spark data preparation on tiny hand-built CSVs: point-in-time aggregates, ids, types, bad input, S3."""

from __future__ import annotations

import csv
import hashlib
import shutil
import statistics
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_preparation.main import PrepareReport, main, prepare, spark_session
from data_preparation.validation import ValidationError
from fraud_common import schemas, storage
from fraud_common.settings import Settings

LABEL_TIME = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
LABEL_TIME_TEXT = "2025-03-01T12:00:00+00:00"
UTC = timezone.utc

# Label rows per file, in file order. distance_from_home is unique so a row can be traced to its
# overall index: 100 + index.
SPLIT_SIZES = {"train": 5, "valid": 3, "test": 3}


def _label_row(index: int) -> dict[str, str]:
    return {
        "distance_from_home": f"{100 + index}.0",
        "distance_from_last_transaction": f"{index * 0.5}",
        "ratio_to_median_purchase_price": f"{1 + index / 10}",
        "repeat_retailer": "1.0" if index % 2 else "0.0",
        "used_chip": "1.0" if index % 3 == 0 else "0.0",
        "used_pin_number": "0.0",
        "online_order": "1.0" if index % 4 else "0.0",
        "fraud": "1.0" if index in (2, 6, 9) else "0.0",
    }


def _history() -> list[tuple[str, datetime, float, str]]:
    """(user, time, amount, how the time is written). Includes rows at and after the label time."""
    at = LABEL_TIME
    rows = [
        # user_0: three earlier, one exactly at the label time (written with another zone), one after.
        ("user_0", at - timedelta(days=30, hours=6), 120.0, "naive"),
        ("user_0", at - timedelta(days=2, minutes=30), 80.5, "iso_z"),
        ("user_0", at - timedelta(seconds=1), 15.25, "naive"),
        ("user_0", at, 999.0, "plus2"),
        ("user_0", at + timedelta(days=1), 500.0, "naive"),
        # user_1: one earlier transaction: stddev is 0.
        ("user_1", at - timedelta(days=10), 42.0, "naive"),
        # user_2: nothing at all. user_3: only at and after the label time.
        ("user_3", at, 10.0, "naive"),
        ("user_3", at + timedelta(hours=1), 20.0, "naive"),
        # user_5 (validate) and user_9 (test) have histories; user_99 has no label row.
        ("user_5", at - timedelta(days=365), 1000.0, "naive"),
        ("user_5", at - timedelta(days=100, hours=3), 10.0, "iso_z"),
        ("user_5", at - timedelta(days=1), 500.0, "naive"),
        ("user_5", at - timedelta(days=1), 500.0, "naive"),
        ("user_9", at - timedelta(hours=12), 33.3, "naive"),
        ("user_9", at - timedelta(hours=6), 66.6, "naive"),
        ("user_99", at - timedelta(days=3), 77.0, "naive"),
        # Look-alike ids belong to nobody: not user_1, not user_0.
        ("user_01", at - timedelta(days=5), 9.0, "naive"),
        ("user_", at - timedelta(days=5), 9.0, "naive"),
        ("USER_0", at - timedelta(days=5), 9.0, "naive"),
    ]
    return rows


def _format_time(moment: datetime, style: str) -> str:
    if style == "iso_z":
        return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if style == "plus2":
        return moment.astimezone(timezone(timedelta(hours=2))).isoformat()
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _write_csv(path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


def write_raw(raw: Path) -> None:
    """The four raw CSVs. validate.csv lists its columns in another order (matched by name)."""
    raw.mkdir(parents=True, exist_ok=True)
    index = 0
    for split, file_name in schemas.SPLIT_FILES:
        rows = []
        for _ in range(SPLIT_SIZES[split]):
            rows.append(_label_row(index))
            index += 1
        header = list(schemas.LABEL_COLUMNS)
        if split == "valid":
            header = header[::-1]
        _write_csv(raw / file_name, header, rows)
    history = [
        {
            "user_id": user,
            "created": _format_time(moment + timedelta(minutes=1), "naive"),
            "updated": _format_time(moment + timedelta(minutes=2), "naive"),
            "date_of_transaction": _format_time(moment, style),
            "transaction_amount": repr(amount),
            "transaction_category": "grocery",
            "card_token": f"card-{user}",
            "city": "Chicago",
            "state": "IL",
        }
        for user, moment, amount, style in _history()
    ]
    _write_csv(raw / schemas.HISTORY_FILE, list(schemas.HISTORY_COLUMNS), history)


def expected_features(index: int) -> dict[str, float]:
    """Aggregates of user_{index} computed independently: transactions strictly before LABEL_TIME."""
    earlier = [(t, a) for user, t, a, _ in _history() if user == f"user_{index}" and t < LABEL_TIME]
    if not earlier:
        return {name: 0.0 for name in schemas.HISTORY_FEATURES}
    amounts = [a for _, a in earlier]
    times = [t for t, _ in earlier]
    return {
        "num_prev_transactions": len(earlier),
        "avg_prev_transaction_amount": sum(amounts) / len(amounts),
        "max_prev_transaction_amount": max(amounts),
        "stdv_prev_transaction_amount": statistics.stdev(amounts) if len(amounts) > 1 else 0.0,
        "days_since_last_transaction": (LABEL_TIME - max(times)) / timedelta(days=1),
        "days_since_first_transaction": (LABEL_TIME - min(times)) / timedelta(days=1),
    }


def tree_digest(root: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    """One local SparkSession for the whole test session."""
    session = spark_session("local[2]", Settings.from_env({}))
    yield session


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory, spark) -> tuple[Path, Path, PrepareReport]:  # noqa: ANN001
    """One successful run on the hand-built data, with label files split over many partitions."""
    root = tmp_path_factory.mktemp("prepare")
    raw, out = root / "raw", root / "prepared"
    write_raw(raw)
    # Tiny splits force several partitions per label file: the row numbering must still follow
    # file order (the parallel offset path, not the one-partition shortcut).
    spark.conf.set("spark.sql.files.maxPartitionBytes", "64")
    spark.conf.set("spark.sql.files.openCostInBytes", "0")
    try:
        parts = spark.read.option("header", "true").csv(str(raw / "train.csv")).rdd.getNumPartitions()
        assert parts > 1, "test setup should split train.csv over several partitions"
        report = prepare(str(raw), str(out), Settings.from_env({}), label_time=LABEL_TIME_TEXT, master="local[2]")
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
        spark.conf.unset("spark.sql.files.openCostInBytes")
    return raw, out, report


def _features(out: Path) -> pa.Table:
    return pq.read_table(out / schemas.FEATURES_DIR).sort_by("distance_from_home")


def test_point_in_time_aggregates_match_plain_python(prepared) -> None:  # noqa: ANN001
    _, out, _ = prepared
    table = _features(out).to_pylist()
    assert len(table) == sum(SPLIT_SIZES.values())
    for row in table:
        index = int(row["user_id"].removeprefix("user_"))
        expected = expected_features(index)
        for name, value in expected.items():
            assert row[name] == pytest.approx(value, rel=1e-9, abs=1e-9), (row["user_id"], name)
    by_user = {row["user_id"]: row for row in table}
    # Spot checks that the hand-built cases mean what they say.
    assert by_user["user_0"]["num_prev_transactions"] == 3  # at and after the label time excluded
    assert by_user["user_1"]["stdv_prev_transaction_amount"] == 0.0
    assert by_user["user_5"]["num_prev_transactions"] == 4


def test_users_without_history_are_kept_with_zeros(prepared) -> None:  # noqa: ANN001
    _, out, report = prepared
    by_user = {row["user_id"]: row for row in _features(out).to_pylist()}
    with_history = {"user_0", "user_1", "user_5", "user_9"}
    for user, row in by_user.items():
        if user in with_history:
            continue
        assert all(row[name] == 0 for name in schemas.HISTORY_FEATURES), user
    assert "user_3" in by_user and "user_2" in by_user
    assert "user_99" not in by_user
    assert report.users_without_history == sum(SPLIT_SIZES.values()) - len(with_history)
    assert report.rows_per_split == SPLIT_SIZES


def test_ids_sets_types_and_columns(prepared) -> None:  # noqa: ANN001
    _, out, _ = prepared
    table = pq.read_table(out / schemas.FEATURES_DIR)
    assert tuple(table.column_names) == schemas.PREPARED_COLUMNS
    types = table.schema
    for name in schemas.FLAG_COLUMNS + (schemas.LABEL,):
        assert types.field(name).type == pa.bool_(), name
    for name in (schemas.EVENT_TIMESTAMP, schemas.CREATED_TIMESTAMP):
        assert types.field(name).type == pa.timestamp("us", tz="UTC"), name
    rows = table.sort_by("distance_from_home").to_pylist()
    splits = [s for s, _ in schemas.SPLIT_FILES]
    expected_sets = [s for s in splits for _ in range(SPLIT_SIZES[s])]
    for index, row in enumerate(rows):
        source = _label_row(index)
        assert row["user_id"] == f"user_{index}"
        assert row["transaction_id"] == f"txn_{index}"
        assert row["set"] == expected_sets[index]
        assert row["fraud"] is (source["fraud"] == "1.0")
        for flag in schemas.FLAG_COLUMNS:
            assert row[flag] is (source[flag] == "1.0"), (index, flag)
        assert row["distance_from_last_transaction"] == float(source["distance_from_last_transaction"])
        assert row["created"] == LABEL_TIME and row["updated"] == LABEL_TIME
    entities = pq.read_table(out / schemas.ENTITIES_DIR)
    assert tuple(entities.column_names) == schemas.ENTITY_COLUMNS
    assert sorted(entities.column("user_id").to_pylist()) == sorted(r["user_id"] for r in rows)
    # No staging or retired folders are left beside the output, no checksum side files inside.
    assert sorted(p.name for p in out.parent.iterdir()) == ["prepared", "raw"]
    assert not list(out.rglob("*.crc"))


def test_default_label_time_is_used_when_not_given(tmp_path: Path, spark) -> None:  # noqa: ANN001
    raw = tmp_path / "raw"
    write_raw(raw)
    prepare(str(raw), str(tmp_path / "out"), Settings.from_env({}), master="local[2]")
    created = pq.read_table(tmp_path / "out" / schemas.FEATURES_DIR).column("created").to_pylist()
    assert set(created) == {datetime.fromisoformat(schemas.DEFAULT_LABEL_TIME)}
    # Every hand-built transaction is long before the default label time: all are counted.
    counts = pq.read_table(tmp_path / "out" / schemas.FEATURES_DIR).column("num_prev_transactions")
    labelled = {f"user_{i}" for i in range(sum(SPLIT_SIZES.values()))}
    assert sum(counts.to_pylist()) == sum(1 for user, *_ in _history() if user in labelled)


def _drop_column(column: str) -> Callable[[list[list[str]]], None]:
    def mutate(rows: list[list[str]]) -> None:
        at = rows[0].index(column)
        for row in rows:
            del row[at]

    return mutate


def _add_column(column: str) -> Callable[[list[list[str]]], None]:
    def mutate(rows: list[list[str]]) -> None:
        rows[0].append(column)
        for row in rows[1:]:
            row.append("1")

    return mutate


def _set_value(line: int, column: str, value: str) -> Callable[[list[list[str]]], None]:
    def mutate(rows: list[list[str]]) -> None:
        rows[line - 1][rows[0].index(column)] = value

    return mutate


def _empty(rows: list[list[str]]) -> None:
    rows.clear()


BAD_INPUTS = {
    "missing column": ("validate.csv", _drop_column("used_chip"), ["validate.csv", "used_chip", "missing"]),
    "extra column": ("test.csv", _add_column("bonus_points"), ["test.csv", "bonus_points", "unexpected"]),
    "non-numeric value": (
        "train.csv",
        _set_value(4, "distance_from_last_transaction", "abc"),
        ["train.csv", "distance_from_last_transaction", "line 4", "'abc'", "not a number"],
    ),
    "negative distance": (
        "train.csv",
        _set_value(2, "distance_from_home", "-3.5"),
        ["train.csv", "distance_from_home", "line 2", "'-3.5'", "negative"],
    ),
    "label 2": ("test.csv", _set_value(3, "fraud", "2.0"), ["test.csv", "fraud", "line 3", "'2.0'", "0 or 1"]),
    "flag outside 0/1": ("validate.csv", _set_value(2, "online_order", "0.5"), ["validate.csv", "online_order", "'0.5'"]),
    "empty file": ("validate.csv", _empty, ["validate.csv", "empty"]),
    "bad history amount": (
        schemas.HISTORY_FILE,
        _set_value(7, "transaction_amount", "twelve"),
        [schemas.HISTORY_FILE, "transaction_amount", "line 7", "'twelve'"],
    ),
    "bad history timestamp": (
        schemas.HISTORY_FILE,
        _set_value(3, "date_of_transaction", "2025-02-30 10:00:00"),
        [schemas.HISTORY_FILE, "date_of_transaction", "line 3", "'2025-02-30 10:00:00'", "timestamp"],
    ),
    "missing history value": (
        schemas.HISTORY_FILE,
        _set_value(5, "user_id", ""),
        [schemas.HISTORY_FILE, "user_id", "line 5", "missing"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_named_and_leaves_previous_output(case: str, prepared, tmp_path: Path) -> None:  # noqa: ANN001
    good_raw, out, _ = prepared
    file_name, mutate, fragments = BAD_INPUTS[case]
    raw = tmp_path / "raw"
    shutil.copytree(good_raw, raw)
    with (raw / file_name).open(newline="") as handle:
        rows = list(csv.reader(handle))
    mutate(rows)
    with (raw / file_name).open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    before = tree_digest(out.parent)

    with pytest.raises(ValidationError) as failure:
        prepare(str(raw), str(out), Settings.from_env({}), label_time=LABEL_TIME_TEXT, master="local[2]")

    message = str(failure.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert tree_digest(out.parent) == before


def test_cli_reports_bad_input_and_exits_non_zero(prepared, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    good_raw, _, _ = prepared
    raw = tmp_path / "raw"
    shutil.copytree(good_raw, raw)
    (raw / "train.csv").write_text((raw / "train.csv").read_text().replace("101.0", "far", 1))
    out = tmp_path / "out"
    code = main(["--input", str(raw), "--output", str(out), "--master", "local[2]"])
    assert code != 0
    error = capsys.readouterr().err
    assert "train.csv" in error and "distance_from_home" in error and "'far'" in error
    assert not out.exists()


def test_cli_rejects_a_bad_label_time(prepared, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    good_raw, _, _ = prepared
    code = main(["--input", str(good_raw), "--output", str(tmp_path / "out"), "--label-time", "soon"])
    assert code != 0
    assert "soon" in capsys.readouterr().err


def test_s3_round_trip_matches_local_output(prepared, s3_settings: Settings, tmp_path: Path) -> None:  # noqa: ANN001
    good_raw, local_out, _ = prepared
    raw_uri = storage.join(s3_settings.data_uri, "raw")
    out_uri = s3_settings.prepared_uri
    storage.upload(good_raw, raw_uri, s3_settings)
    # A previous output with a stale file: replaced as a whole.
    storage.write_bytes(storage.join(out_uri, schemas.FEATURES_DIR, "stale.parquet"), b"old", s3_settings)

    report = prepare(raw_uri, out_uri, s3_settings, label_time=LABEL_TIME_TEXT, master="local[2]")

    assert report.features_uri == storage.join(out_uri, schemas.FEATURES_DIR)
    assert report.rows_per_split == SPLIT_SIZES
    objects = storage.list_files(s3_settings.data_uri, s3_settings)
    assert not [o for o in objects if "stale" in o or ".staging" in o or o.endswith(".crc")]
    downloaded = storage.download(out_uri, tmp_path / "prepared", s3_settings)
    from_s3, from_local = _features(downloaded), _features(local_out)
    assert from_s3.column_names == from_local.column_names
    assert [f.type for f in from_s3.schema] == [f.type for f in from_local.schema]
    # The local run split its inputs over many partitions: sums may differ in the last bits.
    for s3_row, local_row in zip(from_s3.to_pylist(), from_local.to_pylist(), strict=True):
        for name, value in local_row.items():
            expected = pytest.approx(value, rel=1e-12) if isinstance(value, float) else value
            assert s3_row[name] == expected, (local_row["user_id"], name)
    entities = pq.read_table(downloaded / schemas.ENTITIES_DIR)
    assert entities.num_rows == sum(SPLIT_SIZES.values())


def test_s3_bad_input_writes_nothing(s3_settings: Settings, tmp_path: Path, prepared) -> None:  # noqa: ANN001
    good_raw, _, _ = prepared
    raw_uri = storage.join(s3_settings.data_uri, "raw")
    storage.upload(good_raw, raw_uri, s3_settings)
    storage.write_bytes(storage.join(raw_uri, "test.csv"), b"", s3_settings)
    with pytest.raises(ValidationError, match="test.csv.*empty"):
        prepare(raw_uri, s3_settings.prepared_uri, s3_settings, master="local[2]")
    assert not storage.exists(s3_settings.prepared_uri, s3_settings)
