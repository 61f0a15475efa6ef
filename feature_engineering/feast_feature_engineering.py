"""Feast feature store step: apply the definitions, materialize to the online store, build the training set.

Public API (the pipeline and the predictor use these):

* ``apply_and_materialize(settings, end_date=None, full=False, prepared_uri=None) -> MaterializeReport``
* ``retrieve_training_data(settings, out_path=None, missing="error", prepared_uri=None) -> pandas.DataFrame``
* ``open_store(settings) -> feast.FeatureStore``
* ``collect_namespaces(settings) -> list[str]``: delete the Redis namespaces no version needs
* ``main(argv)``: ``python feast_feature_engineering.py apply|retrieve|publish|fetch|gc|config ...``

``prepared_uri`` is the folder data preparation wrote (``features/`` and ``entities/``); by
default ``settings.prepared_uri``, in the pipeline the input artifact's path. The online store is
a SQLite file by default, so that one machine needs no server (a predictor elsewhere downloads a
snapshot of it: ``fraud_common.feature_store.publish_snapshot`` / ``fetch_snapshot``), or the
shared Redis of ``FRAUD_ONLINE_STORE_URL`` that every predictor replica reads live (the cluster's).
Materialization writes Feast's own online layout in bulk (``feature_engineering.online_loader``)
instead of ``FeatureStore.materialize``, which converts and writes row by row.

With Redis every run writes a namespace of its own (a Feast project ``fraud_detection_<tag>``,
recorded in ``feast_dir`` and so in the run's snapshot): the rows a registered version reads are
never written again, and a run the gates refuse changes nothing served. The namespace of
``feast_dir`` is reused (rewriting only changed users) while no registered version records it;
otherwise the step starts a new one, which is a full write. Before writing, the step deletes the
namespaces the registry no longer needs (``collect_namespaces``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from feature_engineering import online_loader
from fraud_common import schemas, storage
from fraud_common.artifacts import IGNORED_PREFIXES, arrow_filesystem
from fraud_common.feature_store import (
    FEATURE_SERVICE,
    FEATURE_VIEW,
    NAMESPACES_KEY,
    ONLINE_STORE_FILE,
    PROJECT,
    REGISTRY_FILE,
    SnapshotError,
    fetch_snapshot,
    new_namespace,
    online_project,
    publish_snapshot,
    read_namespace,
    redis_digest_key,
    store_config,
    uses_redis,
    write_namespace,
)
from fraud_common.logs import get_logger, setup_logging
from fraud_common.settings import Settings

log = get_logger(__name__)

# Materialization windows start here on a full run: every event time in the data is later.
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MISSING_POLICIES = ("error", "drop", "keep")


class FeatureStoreError(RuntimeError):
    """The prepared data or the store's state cannot be used."""


@dataclass(frozen=True)
class MaterializeReport:
    """What one ``apply_and_materialize`` call did.

    ``rows_in_window`` counts the source rows whose event time is at or before the window's end
    (the online store keeps the latest one per user); ``users_written`` the users whose row was
    written. ``online_users_before``/``after`` count the users the online store holds.
    """

    objects_applied: int
    mode: str  # "full" (every user written) or "incremental" (only users whose row changed)
    window_start: str
    window_end: str
    rows_in_window: int
    online_users_before: int
    online_users_after: int
    users_written: int  # users whose latest row changed (all of them on a full run)
    apply_seconds: float
    materialize_seconds: float
    seconds: float
    online_project: str = PROJECT  # the Feast project written: with Redis, the run's namespace
    namespaces_deleted: tuple[str, ...] = ()  # Redis namespaces no version needed any more

    @property
    def rows_per_second(self) -> float:
        """Source rows per second of materialization."""
        return self.rows_in_window / self.materialize_seconds if self.materialize_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """The report as plain JSON-able data."""
        return {**asdict(self), "namespaces_deleted": list(self.namespaces_deleted),
                "rows_per_second": round(self.rows_per_second, 1)}


# ---------------------------------------------------------------------------------------------
# Store


def open_store(settings: Settings):  # noqa: ANN201 - feast.FeatureStore, imported lazily
    """A FeatureStore whose registry and SQLite online store live under ``settings.feast_dir``."""
    from feast import FeatureStore, RepoConfig

    Path(settings.feast_dir).mkdir(parents=True, exist_ok=True)
    return FeatureStore(config=RepoConfig(repo_path=Path(settings.feast_dir), **store_config(settings)))


def _definitions(settings: Settings, source: Path) -> list:
    from feature_engineering.feature_repo.repo_definition import build_definitions

    return list(build_definitions(settings, path=str(source)))


def _online_db(settings: Settings) -> Path:
    return Path(settings.feast_dir) / ONLINE_STORE_FILE


def count_online_users(settings: Settings) -> int:
    """How many users the online store holds values for (0 when there is no store yet)."""
    if not uses_redis(settings) and not _online_db(settings).exists():
        return 0
    try:
        writer = open_writer(settings)
    except FeatureStoreError:
        return 0  # no table yet: nothing applied
    try:
        return writer.count()
    finally:
        writer.abort()


# ---------------------------------------------------------------------------------------------
# Reading prepared Parquet


def read_parquet(uri: str, settings: Settings, columns: Sequence[str]) -> pd.DataFrame:
    """Columns of a Parquet file or folder (local or s3://), with a clear error when any is missing."""
    fs, path = arrow_filesystem(uri, settings)
    try:
        dataset = pads.dataset(path, format="parquet", filesystem=fs, ignore_prefixes=list(IGNORED_PREFIXES))
    except (FileNotFoundError, OSError) as err:
        raise FeatureStoreError(f"cannot read Parquet at {uri}: {err}") from err
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise FeatureStoreError(
            f"Parquet at {uri} lacks columns {missing}; it has {dataset.schema.names}"
        )
    return dataset.to_table(columns=list(columns)).to_pandas()


def _source_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return [p for p in files if not any(part.startswith(IGNORED_PREFIXES) for part in p.relative_to(path).parts)]


def stage_source(settings: Settings, prepared_uri: str | None = None) -> Path:
    """The local folder Feast's file source reads; for an s3:// ``prepared_uri``, a fresh copy of it.

    The copy lands in a temporary folder and replaces the previous copy at the end.
    """
    from feature_engineering.feature_repo.repo_definition import source_path

    prepared_uri = prepared_uri or settings.prepared_uri
    target = Path(source_path(settings, prepared_uri))
    if not storage.is_s3(prepared_uri):
        if not target.exists() or not _source_files(target):
            raise FeatureStoreError(f"no prepared features at {target}: run data preparation first")
        return target
    remote = storage.join(prepared_uri, schemas.FEATURES_DIR)
    if not storage.exists(remote, settings):
        raise FeatureStoreError(f"no prepared features at {remote}: run data preparation first")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        storage.download(remote, tmp / "copy", settings)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp / "copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("staged %s to %s", remote, target)
    return target


def _check_source(path: Path) -> None:
    """Fail early, naming the folder, when the prepared features lack a column the view needs."""
    schema = pads.dataset(str(path), format="parquet", ignore_prefixes=list(IGNORED_PREFIXES)).schema
    needed = (schemas.ENTITY_KEY, schemas.EVENT_TIMESTAMP, schemas.CREATED_TIMESTAMP) + schemas.MODEL_FEATURES
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise FeatureStoreError(f"prepared features at {path} lack columns {missing}; they have {schema.names}")


# ---------------------------------------------------------------------------------------------
# Apply and materialize


def open_writer(settings: Settings) -> online_loader.OnlineWriter:
    """The bulk writer of the configured online store (``store_config``): SQLite, or Redis in the
    namespace ``feast_dir`` records."""
    if uses_redis(settings):
        return online_loader.RedisWriter(redis_client(settings), online_project(settings))
    try:
        return online_loader.SqliteWriter(_online_db(settings))
    except online_loader.LoadError as err:
        raise FeatureStoreError(str(err)) from err


def redis_client(settings: Settings):  # noqa: ANN201 - redis.Redis
    """A connected client of the Redis online store; FeatureStoreError (password redacted) if unreachable."""
    import redis

    try:
        client = redis.Redis.from_url(settings.online_store_client_url)
        client.ping()
    except redis.RedisError as err:
        raise FeatureStoreError(f"cannot reach the online store {_redacted(settings.online_store_url)}: {err}") from err
    return client


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(f":{parts.password}@", ":***@") if parts.password else url


def read_source(source: Path) -> pd.DataFrame:
    """The columns the view materializes, from the staged prepared features."""
    columns = [schemas.ENTITY_KEY, schemas.EVENT_TIMESTAMP, schemas.CREATED_TIMESTAMP, *schemas.MODEL_FEATURES]
    dataset = pads.dataset(str(source), format="parquet", ignore_prefixes=list(IGNORED_PREFIXES))
    frame = dataset.to_table(columns=columns).to_pandas()
    for column in (schemas.EVENT_TIMESTAMP, schemas.CREATED_TIMESTAMP):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame


def apply_and_materialize(
    settings: Settings, end_date: datetime | None = None, full: bool = False, prepared_uri: str | None = None
) -> MaterializeReport:
    """Register the definitions and bring the online store up to date with the prepared features.

    Every run considers all source rows up to ``end_date`` (default now): the rows all carry the
    fixed label time, and new data with old event times is a backfill that windows counted from
    the last run would miss. Of the latest row per user, only those that differ from what the
    store holds are written (``online_loader``: Feast's layout, in bulk); ``full=True`` writes
    every user again. A rerun on the same data writes nothing. The materialized interval is
    recorded in the registry, as ``feast materialize`` does.
    """
    started = time.perf_counter()
    end = (end_date or datetime.now(timezone.utc)).astimezone(timezone.utc)
    source = stage_source(settings, prepared_uri)
    _check_source(source)

    deleted: list[str] = []
    if uses_redis(settings):
        deleted = _enter_namespace(settings)
    else:
        online_loader.create_sqlite_table(_online_db(settings))  # before Feast's apply creates its own
    project = online_project(settings)
    store = open_store(settings)
    objects = _definitions(settings, source)
    store.apply(objects)
    applied = time.perf_counter()

    view = store.get_feature_view(FEATURE_VIEW)
    frame = read_source(source)
    latest = online_loader.latest_per_user(frame, end)
    writer = open_writer(settings)
    try:
        loaded = online_loader.load(writer, online_loader.Encoder(online_loader.feature_types(view)), latest, full=full)
    except online_loader.LoadError as err:
        raise FeatureStoreError(f"{source}: {err}") from err
    mode = "full" if full or loaded.users_before == 0 else "incremental"
    store.registry.apply_materialization(view, project, EPOCH, end)
    materialized = time.perf_counter()

    report = MaterializeReport(
        objects_applied=len(objects),
        mode=mode,
        window_start=EPOCH.isoformat(),
        window_end=end.isoformat(),
        rows_in_window=int((frame[schemas.EVENT_TIMESTAMP] <= pd.Timestamp(end)).sum()),
        online_users_before=loaded.users_before,
        online_users_after=loaded.users_after,
        users_written=loaded.users_written,
        apply_seconds=round(applied - started, 3),
        materialize_seconds=round(materialized - applied, 3),
        seconds=round(time.perf_counter() - started, 3),
        online_project=project,
        namespaces_deleted=tuple(deleted),
    )
    log.info("materialized: %s", report.to_dict())
    return report


# ---------------------------------------------------------------------------------------------
# Redis namespaces


def _namespaces_in_use(settings: Settings):  # noqa: ANN202 - serving.NamespacesInUse | None
    """What the registry needs of the namespaces; None (logged) when it cannot say."""
    from fraud_common.registry import open_registry
    from fraud_common.registry.serving import namespaces_in_use

    try:
        return namespaces_in_use(open_registry(settings), settings.model_name, settings)
    except Exception as err:  # noqa: BLE001 - whatever the failure, the answer is "unknown"
        log.warning("cannot tell which online namespaces versions use (%s): none deleted, none reused", err)
        return None


def _created(raw: bytes | None) -> datetime:
    try:
        return datetime.fromisoformat(json.loads(raw or b"{}")["created"])
    except (ValueError, KeyError, TypeError):
        return EPOCH  # unreadable: as old as can be (never a run in progress)


def _enter_namespace(settings: Settings) -> list[str]:
    """Pick the namespace this feature step writes and record it in ``feast_dir``; delete the
    namespaces nobody needs first (memory stays bounded). Returns the deleted ones.

    ``feast_dir``'s namespace is reused while no registered version records it and it is young
    (a rerun of the same run: only changed users are written); else a new one is created and the
    folder's registry starts afresh, holding that project only.
    """
    from fraud_common.registry.serving import NAMESPACE_GRACE

    client = redis_client(settings)
    in_use = _namespaces_in_use(settings)
    current = read_namespace(settings.feast_dir)
    young = datetime.now(timezone.utc) - NAMESPACE_GRACE
    reusable = (
        in_use is not None and current not in ("", PROJECT) and current not in in_use.kept
        and current not in in_use.claimed and _created(client.hget(NAMESPACES_KEY, current)) >= young
    )
    project = current if reusable else new_namespace()
    if not reusable:
        stamp = json.dumps({"created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        client.hsetnx(NAMESPACES_KEY, project, stamp)  # listed before any row exists: always collectable
        Path(settings.feast_dir).mkdir(parents=True, exist_ok=True)
        (Path(settings.feast_dir) / REGISTRY_FILE).unlink(missing_ok=True)
        write_namespace(settings.feast_dir, project)
    log.info("online namespace %s (%s)", project, "reused: no version records it" if reusable else "new")
    return _collect(client, in_use, keep={project}) if in_use is not None else []


def collect_namespaces(settings: Settings, keep: Sequence[str] = ()) -> list[str]:
    """Delete the Redis namespaces no version needs (see ``_collect``); returns the deleted ones.

    Nothing is deleted when the registry cannot be read. SQLite stores have none: returns [].
    """
    if not uses_redis(settings):
        return []
    in_use = _namespaces_in_use(settings)
    if in_use is None:
        return []
    return _collect(redis_client(settings), in_use, keep=set(keep))


def _collect(client, in_use, keep: set[str]) -> list[str]:  # noqa: ANN001 - redis.Redis, serving.NamespacesInUse
    """Delete every listed namespace except: ``keep``; the registry's (champion, challenger,
    rollback target, versions registered and not yet decided); and young ones no version records
    (runs in progress). The base project's rows (from before namespaces) count as listed."""
    from fraud_common.registry.serving import NAMESPACE_GRACE

    listed = {name.decode(): _created(raw) for name, raw in client.hgetall(NAMESPACES_KEY).items()}
    if client.exists(redis_digest_key(PROJECT)):
        listed.setdefault(PROJECT, EPOCH)
    young = datetime.now(timezone.utc) - NAMESPACE_GRACE
    deleted = []
    for project, created in sorted(listed.items()):
        if project in keep or project in in_use.kept:
            continue
        if project not in in_use.claimed and created >= young:
            continue  # a run in progress
        started = time.perf_counter()
        removed = online_loader.delete_namespace(client, project)
        client.hdel(NAMESPACES_KEY, project)
        why = f"recorded by {in_use.claimed[project]}, not served" if project in in_use.claimed else "no longer needed"
        log.info("deleted online namespace %s (%s): %d users in %.2fs", project, why, removed, time.perf_counter() - started)
        deleted.append(project)
    log.info("online namespaces kept: %s", {**{p: "this run" for p in keep}, **in_use.kept})
    return deleted


# ---------------------------------------------------------------------------------------------
# Training set


def read_entities(settings: Settings, prepared_uri: str | None = None) -> pd.DataFrame:
    """The Feast entity rows written by data preparation, timestamps as UTC, labels as 0/1."""
    uri = storage.join(prepared_uri or settings.prepared_uri, schemas.ENTITIES_DIR)
    frame = read_parquet(uri, settings, schemas.ENTITY_COLUMNS)
    if frame.empty:
        raise FeatureStoreError(f"no entity rows in {uri}")
    for column in (schemas.ENTITY_KEY, schemas.EVENT_TIMESTAMP, schemas.LABEL):
        nulls = frame[column].isna()
        if nulls.any():
            raise FeatureStoreError(f"{uri}: {int(nulls.sum())} rows have no {column!r} (first at row {int(nulls.idxmax())})")
    frame[schemas.EVENT_TIMESTAMP] = pd.to_datetime(frame[schemas.EVENT_TIMESTAMP], utc=True)
    frame[schemas.LABEL] = frame[schemas.LABEL].astype("int64")
    return frame


def retrieve_training_data(
    settings: Settings,
    out_path: Path | str | None = None,
    missing: str = "error",
    prepared_uri: str | None = None,
) -> pd.DataFrame:
    """Point-in-time correct training rows through Feast's ``get_historical_features``.

    Returns columns ``user_id, created, set, fraud`` then ``schemas.MODEL_FEATURES`` in order,
    one row per entity row, in the entity rows' order. ``created`` is UTC, ``fraud`` int64 0/1,
    every feature float64 (flags 0.0/1.0), exactly the values the model's float32 input receives.
    Applies the definitions first if this store has none (no materialization is needed).
    A feature row counts only if its event time is at or before the entity row's time. Entity rows
    with no such feature row: ``missing="error"`` raises (default), ``"drop"`` drops them,
    ``"keep"`` keeps them with NaN features. Writes Parquet to ``out_path`` when given
    (temporary file, then rename).
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing={missing!r}: use one of {MISSING_POLICIES}")
    started = time.perf_counter()
    source = stage_source(settings, prepared_uri)
    store = open_store(settings)
    if FEATURE_SERVICE not in {s.name for s in store.list_feature_services()}:
        # A fresh store has no registry yet: historical retrieval needs the definitions only.
        log.info("feature service %s not registered yet: applying the definitions", FEATURE_SERVICE)
        store.apply(_definitions(settings, source))
    service = store.get_feature_service(FEATURE_SERVICE)

    entities = read_entities(settings, prepared_uri)
    order = "__entity_row"  # puts Feast's output back in the entity rows' order
    entities[order] = np.arange(len(entities))
    joined = store.get_historical_features(entity_df=entities, features=service).to_df()
    # Feast's file (dask) store drops an entity row whose only feature rows are later than it,
    # instead of returning nulls: reindexing on the entity rows brings such rows back as NaN.
    found = joined.set_index(order)[list(schemas.MODEL_FEATURES)].reindex(entities[order])

    frame = entities[list(schemas.ENTITY_COLUMNS)].reset_index(drop=True)
    for name in schemas.MODEL_FEATURES:
        # Flags arrive as bool (or object with NaN after the reindex): both become 0.0/1.0/NaN.
        column = found[name]
        try:
            frame[name] = column.where(column.notna(), np.nan).astype("float64").to_numpy()
        except (TypeError, ValueError) as err:
            raise FeatureStoreError(f"feature {name!r} is not numeric (dtype {column.dtype}): {err}") from err

    lacking = frame[list(schemas.MODEL_FEATURES)].isna().any(axis=1)
    if lacking.any():
        first = frame.loc[lacking.idxmax()]
        message = (
            f"{int(lacking.sum())} of {len(frame)} entity rows have no feature row at or before their "
            f"timestamp (e.g. {first[schemas.ENTITY_KEY]} at {first[schemas.EVENT_TIMESTAMP].isoformat()})"
        )
        if missing == "error":
            raise FeatureStoreError(message + "; prepared features and entities do not match")
        log.warning("%s: %s", message, "dropped" if missing == "drop" else "kept with NaN")
        if missing == "drop":
            frame = frame.loc[~lacking].reset_index(drop=True)
    if out_path is not None:
        _write_parquet(frame, Path(out_path))
    log.info("training rows: %d in %.1fs", len(frame), time.perf_counter() - started)
    return frame


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# The Feast CLI's configuration


def feature_store_yaml(settings: Settings) -> str:
    """``feature_store.yaml`` for the Feast CLI: ``store_config(settings)`` as YAML."""
    import yaml

    return yaml.safe_dump(store_config(settings), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# CLI


def _parse_time(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date-time: {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feast_feature_engineering", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    apply = commands.add_parser("apply", help="apply the definitions and materialize to the online store")
    apply.add_argument("--end-date", type=_parse_time, help="end of the materialization window (default: now, UTC)")
    apply.add_argument("--full", action="store_true", help="materialize everything again from the epoch")
    retrieve = commands.add_parser("retrieve", help="build the training set with get_historical_features")
    retrieve.add_argument("--out", type=Path, help="write the training set as Parquet here")
    retrieve.add_argument("--missing", choices=MISSING_POLICIES, default="error")
    publish = commands.add_parser("publish", help="copy the registry and online store to a folder or s3:// prefix")
    publish.add_argument("uri")
    fetch = commands.add_parser("fetch", help="download a published store into the local feast dir")
    fetch.add_argument("uri")
    commands.add_parser("gc", help="delete the Redis online namespaces no registered version needs")
    commands.add_parser("config", help="print feature_store.yaml for the Feast CLI (from the settings)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; prints a JSON summary of what was done."""
    args = _parser().parse_args(argv)
    settings = Settings.from_env()
    setup_logging(settings.log_level)
    try:
        if args.command == "apply":
            result: dict = apply_and_materialize(settings, args.end_date, full=args.full).to_dict()
        elif args.command == "retrieve":
            frame = retrieve_training_data(settings, args.out, missing=args.missing)
            result = {"rows": len(frame), "columns": list(frame.columns), "out": str(args.out) if args.out else None}
        elif args.command == "publish":
            result = {"written": publish_snapshot(settings, args.uri)}
        elif args.command == "fetch":
            result = {"feast_dir": str(fetch_snapshot(args.uri, settings))}
        elif args.command == "gc":
            result = {"deleted": collect_namespaces(settings)}
        else:
            print(feature_store_yaml(settings), end="")
            return 0
    except (FeatureStoreError, SnapshotError, storage.StorageError) as err:
        log.error("%s", err)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
