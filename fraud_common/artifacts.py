"""What a pipeline artifact says about its data: where it is and a summary to show in the KFP UI.

An artifact's URI is where its data is. Under kfp.local it is a local path below the pipeline
root; in a cluster it is ``s3://`` (or ``minio://``, KFP standalone's spelling for its MinIO)
below the pipeline root, and ``artifact.path`` is the local copy KFP's launcher downloads before
and uploads after the step. Steps that write to the object store themselves (the Spark job) use
``storage_uri(artifact.uri)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from fraud_common import schemas, storage
from fraud_common.settings import Settings

# KFP standalone names its MinIO bucket minio://; the object store is S3-compatible.
KFP_SCHEMES = {"minio": "s3", "s3": "s3"}
# Spark's _SUCCESS marker and Hadoop's .crc files are not data.
IGNORED_PREFIXES = ("_", ".")


@contextlib.contextmanager
def pipeline_step(timed: Any, **overrides: object) -> Iterator[Settings]:
    """A pipeline step's frame: logging, its settings (with the run's parameters), its duration.

    Yields ``Settings.from_env().with_overrides(**overrides)``; when the body succeeds, records
    ``duration_seconds`` in the metadata of the output artifact ``timed`` (the CLI reads it).
    """
    from fraud_common.logs import setup_logging

    settings = Settings.from_env().with_overrides(**overrides)
    setup_logging(settings.log_level)
    started = time.monotonic()
    yield settings
    timed.metadata["duration_seconds"] = round(time.monotonic() - started, 1)


def storage_uri(artifact_uri: str) -> str:
    """The URI ``fraud_common.storage`` reads and writes for a KFP artifact URI (local paths as they are)."""
    scheme, sep, rest = artifact_uri.partition("://")
    if not sep:
        return artifact_uri
    if scheme not in KFP_SCHEMES:
        raise storage.StorageError(f"artifact URI {artifact_uri!r}: only local paths, s3:// and minio:// are supported")
    return f"{KFP_SCHEMES[scheme]}://{rest}"


def schema_fingerprint(schema: pa.Schema) -> str:
    """A short hash of column names and types, in order: equal fingerprints, same layout."""
    text = ";".join(f"{f.name}:{f.type}" for f in schema)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def parquet_summary(
    uri: str, settings: Settings, time_column: str = schemas.EVENT_TIMESTAMP, group_by: str | None = schemas.SET_COLUMN
) -> dict:
    """Rows, schema fingerprint, columns and time range of a Parquet file or folder (local or s3://).

    With ``group_by``, also the rows per value of that column (``rows_by_set``).
    """
    fs, path = arrow_filesystem(uri, settings)
    try:
        dataset = pads.dataset(path, format="parquet", filesystem=fs, ignore_prefixes=list(IGNORED_PREFIXES))
    except (FileNotFoundError, OSError) as err:
        raise storage.StorageError(f"cannot read Parquet at {uri}: {err}") from err
    wanted = [c for c in (time_column, group_by) if c and c in dataset.schema.names]
    table = dataset.to_table(columns=wanted)
    summary: dict = {
        "rows": table.num_rows,
        "columns": len(dataset.schema),
        "schema_fingerprint": schema_fingerprint(dataset.schema),
    }
    if time_column in wanted and table.num_rows:
        low, high = pc.min_max(table[time_column]).values()
        summary["time_min"] = low.as_py().isoformat()
        summary["time_max"] = high.as_py().isoformat()
    if group_by in wanted:
        counts = pc.value_counts(table[group_by]).to_pylist()
        summary[f"rows_by_{group_by}"] = {str(c["values"]): int(c["counts"]) for c in counts}
    return summary


def arrow_filesystem(uri: str, settings: Settings) -> tuple[pa.fs.FileSystem | None, str]:
    """A pyarrow filesystem and path for a local path or s3:// URI (credentials from settings)."""
    import pyarrow.fs as pafs

    if not storage.is_s3(uri):
        return None, uri
    endpoint, scheme = settings.s3_endpoint, "https"
    if endpoint and "://" in endpoint:
        scheme, endpoint = endpoint.split("://", 1)
    fs = pafs.S3FileSystem(
        access_key=settings.s3_access_key or None,
        secret_key=settings.s3_secret_key or None,
        region=settings.s3_region or None,
        endpoint_override=endpoint or None,
        scheme=scheme,
    )
    bucket, key = storage.split_s3(uri)
    return fs, f"{bucket}/{key}"


def file_summary(path: Path | str, names: Sequence[str] = ()) -> dict:
    """Size in bytes of a file or folder (and which of ``names`` it holds)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    summary: dict = {"bytes": sum(f.stat().st_size for f in files)}
    if names:
        summary["files"] = sorted(n for n in names if (path / n).exists())
    return summary
