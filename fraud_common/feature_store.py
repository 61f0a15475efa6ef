"""Names, configuration and snapshots of the Feast feature store, shared by the feature step and the predictor.

Only plain data and file copies live here (no Feast import), so the shared package stays small;
callers build ``feast.RepoConfig(**store_config(settings))``. The Feast objects themselves
(entity, source, view, service) are defined once in ``feature_engineering/feature_repo``.

A snapshot is a folder (local or ``s3://``) holding ``registry.db`` and, with the SQLite online
store, a consistent copy of ``online_store.db``: the feature step publishes one as its pipeline
artifact, the predictor fetches one into its ``feast_dir`` before opening the store. With Redis
(``FRAUD_ONLINE_STORE_URL``) the values live in the shared server, under a namespace of the run
that wrote them: a Feast project ``fraud_detection_<tag>`` (Feast's Redis key is the entity key
followed by the project, and every Feast read uses the registry's project). The snapshot then
holds the registry of that project and ``online_namespace.json`` naming it; a snapshot without
that file (from before namespaces) reads the base project ``fraud_detection``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import sqlite3
import struct
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

from fraud_common import storage
from fraud_common.logs import get_logger
from fraud_common.schemas import ENTITY_KEY, MODEL_FEATURES
from fraud_common.settings import Settings

log = get_logger(__name__)

PROJECT = "fraud_detection"
ENTITY_NAME = "user"
FEATURE_VIEW = "user_transaction_features"
FEATURE_SERVICE = "fraud_model_features"
# File names of the store's state inside ``settings.feast_dir`` (and inside a snapshot).
REGISTRY_FILE = "registry.db"
ONLINE_STORE_FILE = "online_store.db"
SNAPSHOT_FILES = (REGISTRY_FILE, ONLINE_STORE_FILE)
# Redis only: the namespace (Feast project) whose online rows the registry beside it reads.
NAMESPACE_FILE = "online_namespace.json"
# Redis hash of the namespaces the feature steps created: project -> JSON {"created": ISO-8601 UTC}.
NAMESPACES_KEY = b"fraud:online:namespaces"
_NAMESPACE_NAME = re.compile(rf"{PROJECT}_[a-z0-9]{{1,40}}")
# Rows converted and written per online-store batch: bounds materialization's memory at 1M users.
ONLINE_WRITE_BATCH_SIZE = 50_000


# Feast's online layout (Feast 0.67, entity key serialization v3), shared by the feature step's
# bulk loader and the predictor's reader; tests check every piece against Feast's own functions.
SQLITE_TABLE = f"{PROJECT}_{FEATURE_VIEW}"
REDIS_TS_FIELD = f"_ts:{FEATURE_VIEW}".encode()
_STRING_TYPE = 2  # feast ValueType.STRING
_KEY_NAME = ENTITY_KEY.encode()
_ENTITY_KEY_PREFIX = struct.pack("<III", 1, _STRING_TYPE, len(_KEY_NAME)) + _KEY_NAME + struct.pack("<I", _STRING_TYPE)


def entity_key(user_id: str) -> bytes:
    """Feast's ``serialize_entity_key`` (v3) of one user: the SQLite ``entity_key`` column."""
    raw = user_id.encode()
    return _ENTITY_KEY_PREFIX + struct.pack("<I", len(raw)) + raw


def redis_key(user_id: str, project: str = PROJECT) -> bytes:
    """The Redis hash of one user in Feast's layout: the serialized entity key, then the project."""
    return entity_key(user_id) + project.encode()


def redis_key_pattern(project: str) -> bytes:
    """The SCAN pattern of every user's hash of ``project``: the entity key's fixed head, anything,
    the project (as Feast's own ``delete_table`` matches them; none of these bytes is a glob
    character, checked in ``redis_key_project``)."""
    return _ENTITY_KEY_PREFIX + b"*" + project.encode()


def redis_key_project(key: bytes) -> str:
    """The project a Feast Redis key of this entity belongs to ("" if the key is not one)."""
    head = len(_ENTITY_KEY_PREFIX)
    if not key.startswith(_ENTITY_KEY_PREFIX) or len(key) < head + 4:
        return ""
    (length,) = struct.unpack_from("<I", key, head)
    return key[head + 4 + length :].decode("ascii", "replace")


def redis_digest_key(project: str = PROJECT) -> bytes:
    """The Redis hash of the bulk loader's per-user digests in ``project`` (its bookkeeping of what
    the namespace holds; ``feature_engineering.online_loader``)."""
    return f"fraud:materialized:{project}:{FEATURE_VIEW}".encode()


def redis_field(feature: str) -> bytes:
    """The hash field of one feature in Feast's Redis layout: murmur3 (32-bit, little-endian) of
    ``view:feature``."""
    import mmh3  # a Feast dependency, present wherever Feast is

    return struct.pack("<I", mmh3.hash(f"{FEATURE_VIEW}:{feature}", signed=False))


class SnapshotError(RuntimeError):
    """A store snapshot cannot be published or fetched."""


def uses_redis(settings: Settings) -> bool:
    """Whether the online store is the shared Redis of ``settings.online_store_url`` (else SQLite)."""
    return bool(settings.online_store_url)


def redis_connection_string(url: str) -> str:
    """Feast's Redis ``connection_string`` (``host:port,key=value,...``) for a redis-py URL.

    ``redis://[:password@]host[:port][/db]``, ``rediss://`` (TLS) or ``unix:///path.sock``; the
    password is JSON-quoted because Feast parses every value as JSON (a digit-only password would
    become a number).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"online store URL {url!r}: use redis://, rediss:// or unix://")
    if parts.scheme == "unix":
        pieces = ["localhost:6379", f"unix_socket_path={parts.path}"]
    else:
        pieces = [f"{parts.hostname or 'localhost'}:{parts.port or 6379}"]
        database = parts.path.lstrip("/")
        if database:
            pieces.append(f"db={int(database)}")
        if parts.scheme == "rediss":
            pieces.append("ssl=true")
    if parts.username:
        pieces.append(f"username={json.dumps(unquote(parts.username))}")
    if parts.password:
        pieces.append(f"password={json.dumps(unquote(parts.password))}")
    return ",".join(pieces)


def new_namespace() -> str:
    """A fresh namespace: ``fraud_detection_r<UTC yymmddHHMMSS><4 hex>`` (sortable, unique, a valid
    Feast project name for Redis)."""
    from datetime import datetime, timezone

    return f"{PROJECT}_r{datetime.now(timezone.utc):%y%m%d%H%M%S}{secrets.token_hex(2)}"


def check_namespace(project: str) -> str:
    """``project`` if it is the base project or one ``new_namespace`` could have made; else ValueError."""
    if project != PROJECT and not _NAMESPACE_NAME.fullmatch(project):
        raise ValueError(f"online namespace {project!r} is not {PROJECT} or {PROJECT}_<lowercase letters and digits>")
    return project


def read_namespace(feast_dir: str | Path) -> str:
    """The namespace recorded in a store folder or snapshot ("" when it records none)."""
    path = Path(feast_dir) / NAMESPACE_FILE
    if not path.is_file():
        return ""
    return parse_namespace(path.read_bytes(), str(path))


def parse_namespace(raw: bytes, where: str) -> str:
    """The project of an ``online_namespace.json`` document; SnapshotError if it is not one."""
    try:
        return check_namespace(str(json.loads(raw)["project"]))
    except (ValueError, KeyError, TypeError) as err:
        raise SnapshotError(f"{where} does not name a valid online namespace: {err}") from None


def write_namespace(feast_dir: str | Path, project: str) -> None:
    """Record ``project`` as the namespace of the store folder ``feast_dir`` (written, then renamed)."""
    target = Path(feast_dir) / NAMESPACE_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump({"project": check_namespace(project)}, handle)
    os.replace(tmp, target)


def online_project(settings: Settings) -> str:
    """The Feast project the store of ``settings`` reads and writes: with Redis the namespace
    recorded in ``feast_dir`` (the base project if none is), with SQLite always the base project."""
    if not uses_redis(settings):
        return PROJECT
    return read_namespace(settings.feast_dir) or PROJECT


def store_config(settings: Settings) -> dict:
    """Feast repo configuration: file registry under ``settings.feast_dir``; online store SQLite
    there (the embedded default) or the Redis of ``settings.online_store_url`` (the cluster's),
    whose project is the namespace ``feast_dir`` records (``online_project``).

    ``feature_engineering/feature_repo/feature_store.yaml`` (the Feast CLI's copy) is generated
    from this (``python -m feature_engineering.feast_feature_engineering config``).
    """
    feast_dir = Path(settings.feast_dir)
    if uses_redis(settings):
        online: dict = {"type": "redis", "connection_string": redis_connection_string(settings.online_store_client_url)}
    else:
        online = {"type": "sqlite", "path": str(feast_dir / ONLINE_STORE_FILE)}
    return {
        "project": online_project(settings),
        "provider": "local",
        "registry": str(feast_dir / REGISTRY_FILE),
        "online_store": online,
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": 3,
        "materialization": {"online_write_batch_size": ONLINE_WRITE_BATCH_SIZE},
    }


def feature_refs() -> list[str]:
    """The feature service's references ``view:feature``, in the model's input order."""
    return [f"{FEATURE_VIEW}:{name}" for name in MODEL_FEATURES]


def snapshot_files(settings: Settings) -> tuple[str, ...]:
    """The files a snapshot must hold: the registry, and the SQLite online store unless it is Redis."""
    return (REGISTRY_FILE,) if uses_redis(settings) else SNAPSHOT_FILES


def optional_snapshot_files(settings: Settings) -> tuple[str, ...]:
    """Files a snapshot holds when its store has them: with Redis the namespace record (absent in
    snapshots from before namespaces, which read the base project)."""
    return (NAMESPACE_FILE,) if uses_redis(settings) else ()


def publish_snapshot(settings: Settings, uri: str) -> list[str]:
    """Copy the registry, a consistent snapshot of the SQLite online store (if any) and the
    namespace record (Redis) to ``uri``.

    ``uri`` is a local folder or an s3:// prefix; returns the URIs written. Local files are
    written beside their targets and renamed into place.
    """
    feast_dir = Path(settings.feast_dir)
    registry, online = feast_dir / REGISTRY_FILE, feast_dir / ONLINE_STORE_FILE
    names = snapshot_files(settings)
    for path in (registry, online)[: len(names)]:
        if not path.exists():
            raise SnapshotError(f"nothing to publish: {path} does not exist (run apply first)")
    written = []
    with tempfile.TemporaryDirectory(prefix="feast-publish-") as tmp:
        files = [(REGISTRY_FILE, registry), (ONLINE_STORE_FILE, online)][: len(names)]
        files += [(name, feast_dir / name) for name in optional_snapshot_files(settings) if (feast_dir / name).is_file()]
        for name, source in files:
            destination = storage.join(uri, name)
            if storage.is_s3(uri):
                staged = Path(tmp) / name
                _snapshot_file(source, staged)
                storage.upload(staged, destination, settings)
            else:  # straight into the target folder: one copy of a file of gigabytes, not two
                _copy_atomically(source, Path(destination), _snapshot_file)
            written.append(destination)
    log.info("published the feature store to %s", uri)
    return written


def fetch_snapshot(uri: str, settings: Settings) -> Path:
    """Download a snapshot into ``settings.feast_dir``; returns that folder.

    All files are downloaded first and moved into place only when all arrived, so a failed
    download never leaves a half-written or mismatched store behind. An optional file the
    snapshot lacks (the namespace record of a snapshot from before namespaces) is removed locally.
    """
    feast_dir = Path(settings.feast_dir)
    feast_dir.mkdir(parents=True, exist_ok=True)
    names = snapshot_files(settings)
    optional = optional_snapshot_files(settings)
    with tempfile.TemporaryDirectory(dir=feast_dir, prefix=".fetch-") as tmp:
        for name in (*names, *optional):
            source = storage.join(uri, name)
            try:
                if name in optional and not storage.exists(source, settings):
                    continue
                if storage.is_s3(source) or not Path(source).is_file():
                    storage.download(source, Path(tmp) / name, settings)
                else:  # a published snapshot on this machine: write-once, so shared, not copied
                    storage.share_published_file(source, Path(tmp) / name)
            except storage.StorageError as err:
                raise SnapshotError(f"cannot fetch the Feast store snapshot file {source}: {err}") from err
        if NAMESPACE_FILE in optional and (Path(tmp) / NAMESPACE_FILE).is_file():
            read_namespace(tmp)  # a damaged record fails here, before anything moved
        for name in (*names, *optional):
            if (Path(tmp) / name).is_file():
                os.replace(Path(tmp) / name, feast_dir / name)
            else:
                (feast_dir / name).unlink(missing_ok=True)
    log.info("fetched the feature store snapshot %s into %s", uri, feast_dir)
    return feast_dir


def _snapshot_file(source: Path, target: Path) -> None:
    """Copy one store file; the SQLite online store through SQLite's backup API, which copies a
    consistent state even while a writer is active."""
    if source.name != ONLINE_STORE_FILE:
        shutil.copyfile(source, target)
        return
    Path(target).unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(source)) as db, contextlib.closing(sqlite3.connect(target)) as copy:
        db.backup(copy)


def _copy_atomically(source: Path, target: Path, copy=shutil.copyfile) -> None:  # noqa: ANN001 - a copy function
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        copy(source, Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
