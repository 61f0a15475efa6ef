"""Bulk materialization: the latest feature row of every changed user, written in Feast's own online layout.

``FeatureStore.materialize`` converts every row to protos one at a time and writes one SQL
statement (SQLite) or one pipelined HSET (Redis) per row: about 200 s for 1M users × 13 features.
This loader writes the same bytes in bulk, and only for users whose row changed since the last
load, so ``get_online_features`` (and the predictor's reader) read it exactly as if Feast had
written it; ``tests/test_feature_store.py`` compares the two byte for byte, for both stores.

* Values are encoded column-wise: doubles as the ``ValueProto`` bytes ``<double_val tag> +
  8 bytes little-endian`` built with numpy, booleans and counts through ``ValueProto`` once per
  distinct value. Keys and field names: ``fraud_common.feature_store`` (shared with the reader).
* What changed: a 64-bit digest per user over its values and timestamps, kept in the store
  itself (a table beside Feast's in SQLite, one hash per namespace in Redis), so every writer of
  a shared store sees the same state. A rerun on the same data writes nothing; a new Redis
  namespace starts empty, so its first load writes every user.
* Redis namespaces: a writer writes one Feast project (``fraud_common.feature_store``: the
  feature step's per-run namespace); ``delete_namespace`` removes one (UNLINK over a SCAN).
* SQLite: one transaction of sorted upserts (``INSERT .. ON CONFLICT``, as Feast's statement).
* Redis: the HSET commands are packed as RESP bytes here and sent on one connection in chunks;
  the server answers each with the number of fields it created, which is checked.

Pinned to the layout of ``CHECKED_FEAST_VERSION`` (the predictor's provider read is pinned to the
same version); the byte-equality test fails when a Feast upgrade changes it.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from fraud_common import feature_store, schemas
from fraud_common.feature_store import FEATURE_VIEW, PROJECT
from fraud_common.logs import get_logger

log = get_logger(__name__)

CHECKED_FEAST_VERSION = "0.67.0"
# Users per write batch: bounds memory (~13 rows of ~100 bytes each per user) at 1M users.
CHUNK_USERS = 20_000
DIGEST_TABLE = f"{PROJECT}_{FEATURE_VIEW}__digests"
REDIS_DIGEST_KEY = feature_store.redis_digest_key(PROJECT)  # the base project's
# Keys per SCAN step and per UNLINK when a namespace is deleted.
DELETE_BATCH = 5_000


class LoadError(RuntimeError):
    """The features cannot be written to the online store."""


@dataclass(frozen=True)
class Encoded:
    """One chunk of users in Feast's online encoding."""

    user_ids: list[str]
    entity_keys: list[bytes]  # serialize_entity_key, v3
    values: dict[str, list[bytes]]  # feature -> ValueProto bytes per user
    texts: dict[str, list[str]]  # feature -> Feast's ``value_text`` per user
    event_ts: np.ndarray  # datetime64, UTC without a zone, per user
    created_ts: np.ndarray


# ---------------------------------------------------------------------------------------------
# Selecting and encoding


def latest_per_user(frame: pd.DataFrame, end: datetime) -> pd.DataFrame:
    """The row Feast's materialization keeps per user: event time at or before ``end``, the
    latest event time, ties broken by the latest created time."""
    times = frame[schemas.EVENT_TIMESTAMP]
    kept = frame.loc[times <= pd.Timestamp(end)]
    ordered = kept.sort_values([schemas.ENTITY_KEY, schemas.EVENT_TIMESTAMP, schemas.CREATED_TIMESTAMP], kind="stable")
    return ordered.drop_duplicates(schemas.ENTITY_KEY, keep="last").reset_index(drop=True)


def digests(latest: pd.DataFrame) -> np.ndarray:
    """A 64-bit digest (as int64) per user over its feature values and both timestamps."""
    columns = [*schemas.MODEL_FEATURES, schemas.EVENT_TIMESTAMP, schemas.CREATED_TIMESTAMP]
    return pd.util.hash_pandas_object(latest[columns], index=False).to_numpy(dtype=np.uint64).view(np.int64)


class Encoder:
    """Encodes feature columns as Feast 0.67 does (keys: ``fraud_common.feature_store``)."""

    def __init__(self, feature_types: dict[str, str]) -> None:
        from feast.protos.feast.types.Value_pb2 import Value

        self._value = Value
        self.feature_types = feature_types  # feature -> "double" | "bool" | "int64"
        self.double_tag = Value(double_val=1.0).SerializeToString()[:1]

    def column(self, name: str, values: np.ndarray) -> tuple[list[bytes], list[str]]:
        """ValueProto bytes and Feast's ``value_text`` of one feature column."""
        kind = self.feature_types[name]
        if kind == "double":
            numbers = values.astype(np.float64)
            records = np.empty(len(numbers), dtype=[("tag", "u1"), ("value", "<f8")])
            records["tag"] = self.double_tag[0]
            records["value"] = numbers
            buffer = records.tobytes()
            encoded = [buffer[i : i + 9] for i in range(0, len(buffer), 9)]
            return encoded, [str(v) for v in numbers.tolist()]
        python = values.astype(bool if kind == "bool" else np.int64).tolist()
        cache: dict[object, bytes] = {}
        for value in set(python):
            proto = self._value(bool_val=value) if kind == "bool" else self._value(int64_val=value)
            cache[value] = proto.SerializeToString()
        return [cache[v] for v in python], [str(v) for v in python]

    def encode(self, latest: pd.DataFrame) -> Encoded:
        """The chunk ``latest`` (one row per user) in Feast's encoding."""
        user_ids = latest[schemas.ENTITY_KEY].astype(str).tolist()
        values: dict[str, list[bytes]] = {}
        texts: dict[str, list[str]] = {}
        for name in schemas.MODEL_FEATURES:
            column = latest[name]
            if column.isna().any():
                first = latest.loc[column.isna().idxmax(), schemas.ENTITY_KEY]
                raise LoadError(f"feature {name!r} is null for {int(column.isna().sum())} users (e.g. {first!r})")
            values[name], texts[name] = self.column(name, column.to_numpy())
        return Encoded(
            user_ids=user_ids,
            entity_keys=[feature_store.entity_key(u) for u in user_ids],
            values=values,
            texts=texts,
            event_ts=_naive_utc(latest[schemas.EVENT_TIMESTAMP]),
            created_ts=_naive_utc(latest[schemas.CREATED_TIMESTAMP]),
        )


def feature_types(view) -> dict[str, str]:  # noqa: ANN001 - feast.FeatureView
    """``double``/``bool``/``int64`` per feature of the Feast view (what its protos hold)."""
    from feast.types import Bool, Float32, Float64, Int32, Int64

    kinds = {Float64: "double", Float32: "double", Bool: "bool", Int64: "int64", Int32: "int64"}
    types = {}
    for feature in view.features:
        if feature.dtype not in kinds:
            raise LoadError(f"feature {feature.name!r} has type {feature.dtype}, which the bulk loader does not encode")
        types[feature.name] = kinds[feature.dtype]
    return types


def _naive_utc(column: pd.Series) -> np.ndarray:
    return pd.to_datetime(column, utc=True).dt.tz_convert(None).to_numpy()


def _unique_map(times: np.ndarray, convert) -> list:  # noqa: ANN001 - a per-timestamp function
    """``convert`` applied once per distinct timestamp (most rows share the label time)."""
    distinct, inverse = np.unique(times, return_inverse=True)
    converted = [convert(pd.Timestamp(t).tz_localize(timezone.utc)) for t in distinct]
    return [converted[i] for i in inverse]


# ---------------------------------------------------------------------------------------------
# Writers


class OnlineWriter(Protocol):
    """One online store's bulk write and the digests of what it holds."""

    def previous_digests(self) -> dict[str, int]:
        """User id -> digest of the row last written for it."""

    def write(self, chunk: Encoded, chunk_digests: np.ndarray) -> None:
        """Write the chunk's rows and remember their digests."""

    def count(self) -> int:
        """Users the store holds."""

    def close(self) -> None:
        """Release connections (and commit)."""


def create_sqlite_table(path: Path | str) -> bool:
    """Create Feast's online table before Feast's apply would; returns whether it did.

    Same name and columns as Feast's own ``CREATE TABLE IF NOT EXISTS``, which then finds it, so
    Feast reads and writes it as usual. Two differences make it half the size (1.45 GB instead of
    3.1 GB at 1M users) and faster to load and copy: ``WITHOUT ROWID``, so the primary key is the
    table rather than a second B-tree beside it; and Feast's ``<table>_ek`` index on
    ``entity_key`` (which the primary key already leads with) is an empty partial index, so
    Feast's ``CREATE INDEX IF NOT EXISTS`` finds the name and adds nothing. A store created
    before this keeps its layout.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = feature_store.SQLITE_TABLE
    with closing(sqlite3.connect(path)) as db:
        if db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone():
            return False
        db.execute(
            f'CREATE TABLE "{table}" (entity_key BLOB, feature_name TEXT, value BLOB, value_text TEXT, '
            "vector_value BLOB, event_ts timestamp, created_ts timestamp, PRIMARY KEY(entity_key, feature_name)) "
            "WITHOUT ROWID"
        )
        db.execute(f'CREATE INDEX "{table}_ek" ON "{table}" (entity_key) WHERE 0')
        db.commit()
    return True


class SqliteWriter:
    """Feast's SQLite table ``<project>_<view>``: one row per (entity key, feature).

    A chunk goes first into a temporary table with one row per user (a few Python-bound
    parameters per user instead of 13 rows), then SQLite itself fans it out into Feast's rows
    with one ``INSERT .. SELECT .. ON CONFLICT`` (Feast's upsert): the 13M row inserts of 1M
    users run in C. Users arrive sorted by entity key and the features table by name, so the
    rows reach the primary key's B-tree in order.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.table = feature_store.SQLITE_TABLE
        self.names = sorted(schemas.MODEL_FEATURES)
        # Used by one thread at a time: the loader's writer thread, then the caller (count, close).
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA synchronous=OFF")  # one transaction, committed at close: fsync once
        self.db.execute("PRAGMA cache_size=-262144")  # 256 MB: the indexes of 13M rows stay in memory
        self.db.execute("PRAGMA temp_store=MEMORY")
        exists = self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (self.table,)).fetchone()
        if not exists:
            self.db.close()
            raise LoadError(f"{self.path} has no table {self.table}: apply the feature repo first")
        self.db.execute(f'CREATE TABLE IF NOT EXISTS "{DIGEST_TABLE}" (user_id TEXT PRIMARY KEY, digest INTEGER NOT NULL) WITHOUT ROWID')
        columns = ", ".join([f"v{j} BLOB, x{j} TEXT" for j in range(len(self.names))])
        self.db.execute(f"CREATE TEMP TABLE IF NOT EXISTS staged (k BLOB, ets INTEGER, cts INTEGER, {columns})")
        self.db.execute("CREATE TEMP TABLE IF NOT EXISTS staged_features (idx INTEGER PRIMARY KEY, name TEXT)")
        self.db.execute("DELETE FROM staged_features")
        self.db.executemany("INSERT INTO staged_features VALUES (?, ?)", enumerate(self.names))
        self.db.execute("BEGIN IMMEDIATE")
        pick = lambda prefix: "CASE f.idx " + " ".join(f"WHEN {j} THEN s.{prefix}{j}" for j in range(len(self.names))) + " END"  # noqa: E731
        self._stage_sql = f"INSERT INTO staged VALUES ({', '.join('?' * (3 + 2 * len(self.names)))})"
        self._fan_out_sql = (
            f'INSERT INTO "{self.table}" (entity_key, feature_name, value, value_text, event_ts, created_ts) '
            f"SELECT s.k, f.name, {pick('v')}, {pick('x')}, s.ets, s.cts FROM staged AS s CROSS JOIN staged_features AS f "
            "WHERE true ORDER BY s.rowid, f.idx ON CONFLICT(entity_key, feature_name) DO UPDATE SET "
            "value = excluded.value, value_text = excluded.value_text, event_ts = excluded.event_ts, "
            "created_ts = excluded.created_ts"
        )

    def previous_digests(self) -> dict[str, int]:
        return dict(self.db.execute(f'SELECT user_id, digest FROM "{DIGEST_TABLE}"'))

    def write(self, chunk: Encoded, chunk_digests: np.ndarray) -> None:
        event = _unique_map(chunk.event_ts, _feast_sqlite_time)
        created = _unique_map(chunk.created_ts, _feast_sqlite_time)
        columns = [event, created]
        for name in self.names:
            columns += [chunk.values[name], chunk.texts[name]]
        self.db.executemany(self._stage_sql, zip(chunk.entity_keys, *columns))
        self.db.execute(self._fan_out_sql)
        self.db.execute("DELETE FROM staged")
        self.db.executemany(f'INSERT OR REPLACE INTO "{DIGEST_TABLE}" VALUES (?, ?)', zip(chunk.user_ids, chunk_digests.tolist()))

    def count(self) -> int:
        (count,) = self.db.execute(f'SELECT COUNT(*) FROM "{DIGEST_TABLE}"').fetchone()
        return int(count)

    def close(self) -> None:
        if self.db.in_transaction:
            self.db.execute("COMMIT")
        self.db.close()

    def abort(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self.db.close()


def _feast_sqlite_time(moment: pd.Timestamp) -> int:
    """What Feast 0.67 stores for a timestamp: the naive UTC datetime through sqlite3's last
    registered datetime adapter (``int(value.timestamp())``, which reads a naive value as local)."""
    naive = moment.tz_convert(timezone.utc).to_pydatetime().replace(tzinfo=None)
    return int(naive.timestamp())


class RedisWriter:
    """Feast's Redis layout: a hash per entity (key: entity key + project), a field per feature
    (murmur3 of ``view:feature``) and ``_ts:<view>`` (the event time as a Timestamp proto).

    ``project`` is the namespace written (the base project by default); its digests live in
    ``feature_store.redis_digest_key(project)``.
    """

    def __init__(self, client, project: str = PROJECT) -> None:  # noqa: ANN001 - redis.Redis
        self.client = client
        self.project = feature_store.check_namespace(project).encode()
        self.digest_key = feature_store.redis_digest_key(project)
        self.fields = {name: feature_store.redis_field(name) for name in schemas.MODEL_FEATURES}
        self.ts_field = feature_store.REDIS_TS_FIELD

    def previous_digests(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for user, digest in self.client.hscan_iter(self.digest_key, count=10_000):
            found[user.decode()] = int(digest)
        return found

    def write(self, chunk: Encoded, chunk_digests: np.ndarray) -> None:
        stamps = _unique_map(chunk.event_ts, _timestamp_proto)
        header = _resp_bulk(b"HSET")
        fields = [(_resp_bulk(self.fields[name]), chunk.values[name]) for name in schemas.MODEL_FEATURES]
        ts_field = _resp_bulk(self.ts_field)
        count = b"*%d\r\n" % (2 + 2 * (len(fields) + 1))
        commands = []
        for i, key in enumerate(chunk.entity_keys):
            parts = [count, header, _resp_bulk(key + self.project)]
            for field, values in fields:
                parts.append(field)
                parts.append(_resp_bulk(values[i]))
            parts.append(ts_field)
            parts.append(_resp_bulk(stamps[i]))
            commands.append(b"".join(parts))
        digests_command = [b"HSET", self.digest_key]
        for user, digest in zip(chunk.user_ids, chunk_digests.tolist()):
            digests_command += [user.encode(), str(digest).encode()]
        commands.append(b"*%d\r\n" % len(digests_command) + b"".join(_resp_bulk(p) for p in digests_command))
        self._send(commands)

    def _send(self, commands: list[bytes]) -> None:
        """Send packed commands on one connection, then read one integer reply per command."""
        connection = self.client.connection_pool.get_connection()
        try:
            connection.send_packed_command([b"".join(commands)])
            for _ in commands:
                reply = connection.read_response()
                if not isinstance(reply, int):
                    raise LoadError(f"Redis answered a bulk HSET with {reply!r}")
        finally:
            self.client.connection_pool.release(connection)

    def count(self) -> int:
        return int(self.client.hlen(self.digest_key))

    def close(self) -> None:
        self.client.close()

    def abort(self) -> None:
        self.client.close()


def delete_namespace(client, project: str) -> int:  # noqa: ANN001 - redis.Redis
    """Remove every row of the namespace ``project`` and its digests; returns the user hashes removed.

    The digests go first (a predictor refuses to open a namespace without them, so a half-deleted
    one is never served), then the users' hashes, found by SCAN over the namespace's key pattern
    and checked to be exactly Feast keys of that project, UNLINKed in batches (freed off the
    server's main thread). Card histories and other projects' keys never match.
    """
    feature_store.check_namespace(project)
    client.unlink(feature_store.redis_digest_key(project))
    removed = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=feature_store.redis_key_pattern(project), count=DELETE_BATCH):
        if feature_store.redis_key_project(key) != project:
            continue
        batch.append(key)
        if len(batch) >= DELETE_BATCH:
            removed += int(client.unlink(*batch))
            batch = []
    if batch:
        removed += int(client.unlink(*batch))
    return removed


def _resp_bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _timestamp_proto(moment: pd.Timestamp) -> bytes:
    from google.protobuf.timestamp_pb2 import Timestamp

    stamp = Timestamp()
    stamp.FromDatetime(moment.to_pydatetime())
    return stamp.SerializeToString()


# ---------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class LoadReport:
    """What one load wrote."""

    users_in_source: int  # users with a row at or before the window's end
    users_written: int  # of those, the ones whose row changed
    users_before: int
    users_after: int


def load(writer: OnlineWriter, encoder: Encoder, latest: pd.DataFrame, full: bool = False) -> LoadReport:
    """Write the rows of ``latest`` (one per user) whose digest differs from the stored one
    (every row when ``full``), in chunks; commits at the end, rolls back on failure."""
    previous = {} if full else writer.previous_digests()
    before = writer.count()
    new = digests(latest)
    users = latest[schemas.ENTITY_KEY].astype(str).to_numpy()
    if previous:
        names = users.tolist()
        old = np.fromiter((previous.get(u, 0) for u in names), dtype=np.int64, count=len(names))
        known = np.fromiter((u in previous for u in names), dtype=bool, count=len(names))
        changed = ~known | (old != new)
    else:
        changed = np.ones(len(users), dtype=bool)
    selected = np.flatnonzero(changed)
    # Entity keys order by the value's length, then its bytes: chunks in that order append to
    # SQLite's B-trees instead of inserting all over them.
    lengths = latest[schemas.ENTITY_KEY].astype(str).str.encode("utf-8").str.len().to_numpy()
    selected = selected[np.lexsort((users[selected].astype(str), lengths[selected]))]
    try:
        # The writer works on chunk k (SQLite's fan-out and Redis's socket I/O release the GIL)
        # while this thread encodes chunk k + 1; one write at a time, in order.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = None
            for start in range(0, len(selected), CHUNK_USERS):
                rows = selected[start : start + CHUNK_USERS]
                encoded = encoder.encode(latest.iloc[rows])
                if pending is not None:
                    pending.result()
                pending = pool.submit(writer.write, encoded, new[rows])
            if pending is not None:
                pending.result()
        after = writer.count()
    except BaseException:
        writer.abort()  # type: ignore[attr-defined]
        raise
    writer.close()
    return LoadReport(len(latest), int(len(selected)), before, after)

