"""Spark data preparation: label rows + point-in-time history aggregates → Parquet for Feast.

Runs in a cluster as ``spark-submit main.py --input s3://.../raw --output s3://.../prepared``
(Spark reads and writes s3a:// directly) and on one machine in-process with ``local[*]`` (S3 data
is then staged through a temporary folder, since the local JVM has no S3 connector).

Steps: validate the raw CSVs (pyarrow, streaming, before any Spark work) → number the label rows
train, validate, test in file order (user_i / txn_i) without a single-partition window → join the
history to each label row's user and aggregate the transactions strictly before its ``created``
→ write ``features/`` and ``entities/`` to a staging location → move them into place.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from fraud_common import schemas, storage
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
MICROS_PER_DAY = 86_400_000_000.0
_ROW = "_row"  # overall label row index (train, validate, test in file order)
_LABEL_TIME = "_label_time"
_TS = "_ts"
_USER_INDEX = "_user_index"
_LAST = "_last"
_FIRST = "_first"
# The id spellings come from schemas: user_id(i) == USER_PREFIX + str(i), likewise for txn.
USER_PREFIX = schemas.user_id(0).removesuffix("0")
TRANSACTION_PREFIX = schemas.transaction_id(0).removesuffix("0")
_AMOUNT = "_amount"

__all__ = ["PrepareReport", "ValidationError", "main", "prepare"]


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


# --- Spark session ------------------------------------------------------------------------------


def _is_local(master: str | None) -> bool:
    return master is not None and master.startswith("local")


def spark_session(master: str | None, settings: Settings, s3a: bool = False) -> "SparkSession":
    """One SparkSession for the process (reused by later calls), UTC, quiet."""
    from pyspark.sql import SparkSession

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


def _csv_schema(header: tuple[str, ...], numeric: tuple[str, ...]):  # noqa: ANN202 - StructType
    """A schema in the file's own column order: numbers as double, everything else as text."""
    from pyspark.sql.types import DoubleType, StringType, StructField, StructType

    return StructType([StructField(c, DoubleType() if c in numeric else StringType()) for c in header])


def _read_csv(spark: "SparkSession", uri: str, header: tuple[str, ...], numeric: tuple[str, ...]) -> "DataFrame":
    return (
        spark.read.option("header", "true")
        .option("mode", "FAILFAST")
        .schema(_csv_schema(header, numeric))
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
    """The three label sets, numbered and typed, with ``set``, ids and UTC timestamps."""
    from functools import reduce

    from pyspark.sql import functions as F

    created = F.lit(label_time.strftime("%Y-%m-%d %H:%M:%S.%f")).cast("timestamp")
    frames, first_row = [], 0
    for split, file_name in schemas.SPLIT_FILES:
        raw_frame = _read_csv(spark, storage.join(raw, file_name), summaries[split].header, schemas.LABEL_COLUMNS)
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
    """Per label row: aggregates of its user's transactions strictly before the row's ``created``.

    Keyed by the label row index (a long: cheaper to hash than the ``user_i`` string). The label
    keys are broadcast, so the large history is joined where it lies and pre-aggregated per
    partition before the only shuffle. Works with a different ``created`` on every row.
    """
    from pyspark.sql import functions as F

    keys = labels.select(F.col(_ROW).alias(_USER_INDEX), F.col(schemas.EVENT_TIMESTAMP).alias(_LABEL_TIME))
    earlier = history.join(F.broadcast(keys), _USER_INDEX).where(F.col(_TS) < F.col(_LABEL_TIME))
    return earlier.groupBy(_USER_INDEX).agg(
        F.count(F.lit(1)).alias("num_prev_transactions"),
        F.avg(_AMOUNT).alias("avg_prev_transaction_amount"),
        F.max(_AMOUNT).alias("max_prev_transaction_amount"),
        F.stddev_samp(_AMOUNT).alias("stdv_prev_transaction_amount"),
        F.max(_TS).alias(_LAST),
        F.min(_TS).alias(_FIRST),
    )


def read_history(spark: "SparkSession", raw: str, summary: FileSummary) -> "DataFrame":
    """The history columns the aggregates need, typed (timestamps read as UTC).

    ``user_i`` becomes the long ``i``; ids of another shape (or ``user_007``) cannot belong to a
    label row, so they are dropped here rather than carried through the join.
    """
    from pyspark.sql import functions as F

    frame = _read_csv(spark, storage.join(raw, schemas.HISTORY_FILE), summary.header, ("transaction_amount",))
    user = F.col(schemas.ENTITY_KEY)
    index = F.expr(f"try_cast(substring({schemas.ENTITY_KEY}, {len(USER_PREFIX) + 1}) AS BIGINT)")
    return (
        frame.select(
            index.alias(_USER_INDEX),
            user,
            F.col("date_of_transaction").cast("timestamp").alias(_TS),
            F.col("transaction_amount").alias(_AMOUNT),
        )
        .where(F.concat(F.lit(USER_PREFIX), F.col(_USER_INDEX).cast("string")) == user)
        .drop(schemas.ENTITY_KEY)
    )


def prepared_features(spark: "SparkSession", raw: str, summaries: dict[str, FileSummary], label_time: datetime) -> "DataFrame":
    """One row per label row, exactly ``schemas.PREPARED_COLUMNS``, in label row order."""
    from pyspark.sql import functions as F

    labels = label_rows(spark, raw, summaries, label_time)
    aggregates = history_aggregates(read_history(spark, raw, summaries["history"]), labels)
    joined = labels.join(aggregates, labels[_ROW] == aggregates[_USER_INDEX], "left")
    created = F.unix_micros(F.col(schemas.EVENT_TIMESTAMP))
    days = {
        "days_since_last_transaction": (created - F.unix_micros(_LAST)) / MICROS_PER_DAY,
        "days_since_first_transaction": (created - F.unix_micros(_FIRST)) / MICROS_PER_DAY,
    }
    # No earlier history: explicit zeros (the row is kept, never dropped).
    filled = joined.select(
        F.col(_ROW),
        *[F.col(c) for c in schemas.PREPARED_COLUMNS if c not in schemas.HISTORY_FEATURES],
        F.coalesce(F.col("num_prev_transactions"), F.lit(0).cast("long")).alias("num_prev_transactions"),
        *[
            F.coalesce(days.get(c, F.col(c)), F.lit(0.0)).alias(c)
            for c in schemas.HISTORY_FEATURES
            if c != "num_prev_transactions"
        ],
    )
    return filled.orderBy(_ROW).select(*schemas.PREPARED_COLUMNS)


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
    label_time: str = schemas.DEFAULT_LABEL_TIME,
    master: str | None = "local[*]",
) -> PrepareReport:
    """Validate ``raw_uri``'s CSVs and write prepared ``features/`` and ``entities/`` to ``out_uri``.

    ``master=None`` keeps whatever spark-submit configured (the cluster case). Raises
    ``ValidationError`` before any Spark work when an input is bad; nothing is written then.
    """
    started = time.perf_counter()
    raw_uri, out_uri = _normalise(raw_uri), _normalise(out_uri)
    label_ts = parse_label_time(label_time)
    with tempfile.TemporaryDirectory(prefix="fraud-prepare-") as work:
        raw = raw_uri
        if storage.is_s3(raw_uri) and _is_local(master):
            raw = _download_raw(raw_uri, Path(work) / "raw", settings)
        summaries = validate_inputs(raw, settings)
        validation_seconds = time.perf_counter() - started
        log.info("validated inputs in %.1fs: %s", validation_seconds, {k: v.rows for k, v in summaries.items()})

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
        try:
            features = prepared_features(spark, _spark_uri(raw), summaries, label_ts)
            counts = _write(spark, features, _spark_uri(spark_out))
            if storage.is_s3(out_uri):
                if stage_locally:
                    _drop_checksums(Path(spark_out))
                    storage.upload(spark_out, staging, settings)
                _replace_s3(staging, out_uri, settings)
            else:
                _drop_checksums(Path(staging))
                _replace_local(Path(staging), Path(out_uri))
        finally:
            if storage.exists(staging, settings):
                storage.delete(staging, settings)

    no_history = counts.pop("_no_history")
    report = PrepareReport(
        rows_per_split=counts,
        users_without_history=no_history,
        seconds=time.perf_counter() - started,
        features_uri=storage.join(out_uri, schemas.FEATURES_DIR),
        entities_uri=storage.join(out_uri, schemas.ENTITIES_DIR),
        validation_seconds=validation_seconds,
        history_rows=summaries["history"].rows,
    )
    log.info("prepared %s in %.1fs (%d users without history)", counts, report.seconds, no_history)
    return report


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
    return str(local)


def _spark_uri(uri: str) -> str:
    return storage.to_s3a(uri)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``main.py --input <raw uri> --output <prepared uri>``; non-zero exit on bad input."""
    parser = argparse.ArgumentParser(prog="data_preparation", description="Prepare point-in-time features with Spark.")
    parser.add_argument("--input", required=True, help="folder of the raw CSVs (local path or s3://)")
    parser.add_argument("--output", required=True, help="folder for features/ and entities/ (local path or s3://)")
    parser.add_argument("--label-time", default=schemas.DEFAULT_LABEL_TIME, help="UTC time of every label row")
    parser.add_argument(
        "--master",
        default=None,
        help="Spark master, e.g. local[*]; default: what spark-submit configured (local[*] without it)",
    )
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    setup_logging(settings.log_level)
    try:
        report = prepare(args.input, args.output, settings, label_time=args.label_time, master=args.master)
    except ValidationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except storage.StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"prepared {sum(report.rows_per_split.values())} rows {report.rows_per_split} "
        f"({report.users_without_history} without history) in {report.seconds:.1f}s → {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
