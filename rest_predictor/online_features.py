"""Read a user's model features from the Feast online store, one read per request.

Two readers return the same ``[n, 13]`` matrix (``tests/test_predictor.py`` checks they agree):

* ``OnlineFeatureReader``, Feast's public API: the feature service is resolved once at load, each
  request makes one ``FeatureStore.get_online_features`` call.
* ``ProviderOnlineRead``, an adapter over Feast's private provider API (``online_read`` on the one
  feature view): about a third of the public path's CPU per request (``bench/bench_serve.py``
  records both, same run), but an API Feast may change in any release. It is checked against one
  Feast version (``CHECKED_FEAST_VERSION``, pinned by a test).

* ``BulkOnlineRead``, one vectorised read of Feast's online layout itself (the layout the feature
  step's bulk loader writes, ``fraud_common.feature_store``): SQLite, one ``IN`` query whose
  values come back as fixed-width records; Redis, one Lua call returning every requested field
  of every user as one fixed-width string. numpy decodes the ``ValueProto`` bytes of the whole
  batch at once, with no proto object per value. Checked against the same Feast version.

``feature_read="auto"`` (the default) takes the bulk read when the installed Feast is the checked
version and the public path otherwise; ``"public"``, ``"provider"`` and ``"bulk"`` force one.

With Redis all three read the Feast project of the store's registry: the namespace the served
version's snapshot records (``fraud_common.feature_store.online_project``). Opening a namespace
whose rows were deleted (no version needed it any more) fails instead of serving unknown users.
"""

from __future__ import annotations

import importlib.metadata
import sqlite3
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
from feast import FeatureStore, RepoConfig
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

from fraud_common import feature_store
from fraud_common.feature_store import ENTITY_NAME, FEATURE_SERVICE, store_config
from fraud_common.logs import get_logger
from fraud_common.settings import Settings
from rest_predictor import metrics
from rest_predictor.errors import FeatureDataError, PredictorLoadError

log = get_logger(__name__)


def fetch_snapshot(settings: Settings) -> None:
    """Copy the published store snapshot ``settings.feast_snapshot_uri`` (if any) into ``feast_dir``."""
    if not settings.feast_snapshot_uri:
        return
    try:
        feature_store.fetch_snapshot(settings.feast_snapshot_uri, settings)
    except feature_store.SnapshotError as err:
        raise PredictorLoadError(str(err)) from err


FEATURE_READS = ("auto", "public", "provider", "bulk")


def check_namespace_present(settings: Settings) -> None:
    """With Redis and a namespace recorded, that namespace's rows must exist (its digests are
    written with every row and deleted first): else PredictorLoadError naming it."""
    project = feature_store.online_project(settings)
    if project == feature_store.PROJECT:
        return  # the base project: from before namespaces, written by any loader
    import redis

    try:
        client = redis.Redis.from_url(settings.online_store_client_url)
        present = bool(client.exists(feature_store.redis_digest_key(project)))
        client.close()
    except redis.RedisError as err:
        raise PredictorLoadError(f"the Redis online store cannot be read: {err}") from err
    if not present:
        raise PredictorLoadError(
            f"the online namespace {project} holds no rows (deleted as no longer needed, or never written): "
            "this version cannot be served; promote another one"
        )


class OnlineFeatureReader:
    """Reads the feature service's features for a list of users through ``get_online_features``."""

    def __init__(self, store: FeatureStore, feature_names: Sequence[str], settings: Settings | None = None) -> None:
        self.store = store
        self.settings = settings
        self.feature_names = list(feature_names)
        self.service = store.get_feature_service(FEATURE_SERVICE)  # a registry lookup: once, not per call
        if len(self.service.feature_view_projections) != 1:
            names = [p.name for p in self.service.feature_view_projections]
            raise PredictorLoadError(f"feature service {FEATURE_SERVICE!r} spans {names}; expected one feature view")
        projection = self.service.feature_view_projections[0]
        served = [f.name for f in projection.features]
        if sorted(served) != sorted(self.feature_names):
            raise PredictorLoadError(
                f"feature service {FEATURE_SERVICE!r} serves {served}; the model takes {self.feature_names}"
            )
        self.view_name = projection.name
        self.join_key = store.get_entity(ENTITY_NAME).join_key

    @classmethod
    def open(cls, settings: Settings, feature_names: Sequence[str], feature_read: str = "auto") -> "OnlineFeatureReader":
        """The reader for ``feature_read`` (see the module docstring) over the store of
        ``store_config(settings)``, after fetching any published snapshot."""
        reader_class = reader_for(feature_read)
        fetch_snapshot(settings)
        registry_file = Path(store_config(settings)["registry"])
        if not registry_file.is_file():
            raise PredictorLoadError(f"no Feast registry at {registry_file}: apply and materialize the feature repo first")
        check_namespace_present(settings)
        try:
            store = FeatureStore(config=RepoConfig(**store_config(settings)))
            return reader_class(store, feature_names, settings)
        except PredictorLoadError:
            raise
        except Exception as err:  # Feast raises many types for a missing or broken repo
            raise PredictorLoadError(f"cannot open the Feast store at {settings.feast_dir}: {err}") from err

    def read(self, user_ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Features ``[n, 13]`` float32 in model order, and the users the store does not know.

        Rows of unknown users are left at zero; callers reject the request if any are unknown.
        """
        response = self.store.get_online_features(
            features=self.service, entity_rows=[{self.join_key: u} for u in user_ids]
        ).to_dict()
        columns = [response[name] for name in self.feature_names]
        matrix = np.zeros((len(user_ids), len(self.feature_names)), dtype=np.float32)
        missing: list[str] = []
        for i, user_id in enumerate(user_ids):
            values = [column[i] for column in columns]
            if all(v is None for v in values):
                missing.append(user_id)
                continue
            matrix[i] = [_number(v, name, user_id) for v, name in zip(values, self.feature_names)]
        return matrix, missing

    def probe(self) -> None:
        """One read for a made-up user: raises if the online store cannot be queried."""
        try:
            self.read(["__readiness_probe__"])
        except Exception as err:
            raise PredictorLoadError(f"the Feast online store cannot be read ({self.store.config.online_store}): {err}") from err


class ProviderOnlineRead(OnlineFeatureReader):
    """The same read through Feast's private provider API: ``store._get_provider().online_read``.

    ``get_online_features`` re-plans each call (feature resolution, response protos, ``to_dict``);
    this adapter reads the one feature view directly, with entity keys built as Feast protos and
    serialized by the store itself. Checked against ``CHECKED_FEAST_VERSION`` only:
    ``tests/test_predictor.py`` fails on any other Feast version until it is checked again.
    """

    CHECKED_FEAST_VERSION = "0.67.0"

    def __init__(self, store: FeatureStore, feature_names: Sequence[str], settings: Settings | None = None) -> None:
        super().__init__(store, feature_names, settings)
        self.view = store.get_feature_view(self.view_name)
        self._provider = store._get_provider()  # private: no public handle on the online store exists
        self._config = store.config

    def read(self, user_ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """As ``OnlineFeatureReader.read``."""
        keys = [EntityKeyProto(join_keys=[self.join_key], entity_values=[ValueProto(string_val=u)]) for u in user_ids]
        rows = self._provider.online_read(config=self._config, table=self.view, entity_keys=keys)
        matrix = np.zeros((len(user_ids), len(self.feature_names)), dtype=np.float32)
        missing: list[str] = []
        for i, (_, values) in enumerate(rows):
            # Redis answers an unknown user with empty values, SQLite with None: both are unknown.
            if values is None or not any(v.WhichOneof("val") for v in values.values()):
                missing.append(user_ids[i])
                continue
            matrix[i] = [_proto_number(values, name, user_ids[i]) for name in self.feature_names]
        return matrix, missing


# Each value as a fixed-width record: its length, then its ValueProto bytes, zero-padded. Feature
# values here are at most 11 bytes (a tag and a 10-byte varint), so 16 bytes always fit.
RECORD_WIDTH = 16
_DOUBLE_TAG, _FLOAT_TAG, _INT64_TAG, _INT32_TAG, _BOOL_TAG = 0x29, 0x35, 0x20, 0x18, 0x38

# KEYS: the users' hashes; ARGV: the fields. One string back: for each user and field in order, a
# RECORD_WIDTH record (length byte, value bytes, zero padding); a missing field has length 0.
_REDIS_READ = """
local width = tonumber(table.remove(ARGV, 1))
local out = {}
for i = 1, #KEYS do
  local values = redis.call('HMGET', KEYS[i], unpack(ARGV))
  for j = 1, #ARGV do
    local v = values[j]
    if not v then
      out[#out + 1] = string.rep('\\0', width)
    elseif #v < width then
      out[#out + 1] = string.char(#v) .. v .. string.rep('\\0', width - 1 - #v)
    else  -- too long to be a number: length 255 marks it
      out[#out + 1] = string.char(255) .. string.rep('\\0', width - 1)
    end
  end
end
return table.concat(out)
"""


class BulkOnlineRead(ProviderOnlineRead):
    """One vectorised read of Feast's online layout (see the module docstring).

    ``read`` may run on any thread (the predictor reads batches off the event loop): SQLite
    connections are per thread, the Redis client is a thread-safe pool.
    """

    def __init__(self, store: FeatureStore, feature_names: Sequence[str], settings: Settings | None = None) -> None:
        super().__init__(store, feature_names, settings)
        self._local = threading.local()
        self.kind = self._config.online_store.type
        self.columns = {name: j for j, name in enumerate(self.feature_names)}
        if self.kind == "redis":
            import redis

            if settings is None or not settings.online_store_url:
                raise PredictorLoadError("the Redis online store needs FRAUD_ONLINE_STORE_URL")
            self.client = redis.Redis.from_url(settings.online_store_client_url)
            self.project = self._config.project  # the served version's namespace
            self.fields = [feature_store.redis_field(name) for name in self.feature_names]
            self._script = self.client.register_script(_REDIS_READ)
        elif self.kind == "sqlite":
            self.path = str(Path(self._config.online_store.path))
            width = RECORD_WIDTH - 1
            position = " ".join(f"WHEN {_sql_text(name)} THEN {j}" for j, name in enumerate(self.feature_names))
            # One row per user: its values as [feature position, length, value bytes zero-padded]
            # records, concatenated (|| yields text: cast back to a blob before cutting bytes).
            record = (
                f"char(CASE feature_name {position} ELSE 127 END) || char(min(length(value), 127)) || "
                f"substr(CAST(value || zeroblob({width}) AS BLOB), 1, {width})"
            )
            self._sql = (
                f"SELECT entity_key, CAST(group_concat(record, '') AS BLOB) FROM (SELECT entity_key, {record} AS record "
                f'FROM "{feature_store.SQLITE_TABLE}" WHERE entity_key IN ({{keys}})) GROUP BY entity_key'
            )
        else:
            raise PredictorLoadError(f"bulk read supports the sqlite and redis online stores, not {self.kind!r}")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, check_same_thread=False)
            self._local.db = db
        return db

    def read(self, user_ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """As ``OnlineFeatureReader.read``; a handful of users go through the provider read, whose
        per-call cost is lower (no numpy set-up), so single requests lose nothing."""
        unique = list(dict.fromkeys(user_ids))
        if len(unique) <= SMALL_READ:
            return super().read(user_ids)
        values, lengths, present = self._read_sqlite(unique) if self.kind == "sqlite" else self._read_redis(unique)
        decoded = decode_records(lengths, values)  # [n_unique, n_features] float64, NaN where null
        missing = [u for u, found in zip(unique, present) if not found]
        nulls = present[:, None] & np.isnan(decoded) & (lengths == 0)
        if nulls.any():
            i, j = map(int, np.argwhere(nulls)[0])
            for feature, count in zip(self.feature_names, nulls.sum(axis=0).tolist()):
                if count:
                    metrics.FEATURE_MISSING.labels(feature).inc(count)
            raise FeatureDataError(f"feature {self.feature_names[j]!r} of user {unique[i]!r} is null in the online store")
        bad = present[:, None] & (lengths < 0)
        if bad.any():
            i, j = map(int, np.argwhere(bad)[0])
            raise FeatureDataError(f"feature {self.feature_names[j]!r} of user {unique[i]!r} is not numeric")
        rows = decoded.astype(np.float32)
        rows[~present] = 0.0
        if len(unique) != len(user_ids):
            position = {u: i for i, u in enumerate(unique)}
            rows = rows[[position[u] for u in user_ids]]
            missing = [u for u in user_ids if u in set(missing)]
        return rows, missing

    def _read_sqlite(self, users: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = [feature_store.entity_key(u) for u in users]
        index = {key: i for i, key in enumerate(keys)}
        found: list[tuple[bytes, bytes]] = []
        db = self._db()
        for start in range(0, len(keys), SQLITE_IN_LIMIT):
            chunk = keys[start : start + SQLITE_IN_LIMIT]
            found += db.execute(self._sql.format(keys=",".join("?" * len(chunk))), chunk).fetchall()
        shape = (len(users), len(self.feature_names))
        lengths = np.zeros(shape, dtype=np.int64)
        values = np.zeros(shape + (RECORD_WIDTH - 1,), dtype=np.uint8)
        present = np.zeros(len(users), dtype=bool)
        if found:
            entity, packed = zip(*found)
            rows = np.fromiter(map(index.__getitem__, entity), dtype=np.int64, count=len(found))
            counts = np.fromiter(map(len, packed), dtype=np.int64, count=len(found)) // (RECORD_WIDTH + 1)
            records = np.frombuffer(b"".join(packed), dtype=np.uint8).reshape(-1, RECORD_WIDTH + 1)
            owner = np.repeat(rows, counts)
            cols = records[:, 0].astype(np.int64)
            keep = cols < len(self.feature_names)  # 127: a column the model does not take
            sizes = records[:, 1].astype(np.int64)
            sizes[sizes > RECORD_WIDTH - 1] = -1  # too long to be a number: flagged below
            lengths[owner[keep], cols[keep]] = sizes[keep]
            values[owner[keep], cols[keep]] = records[keep, 2:]
            present[rows] = True
        return values, lengths, present

    def _read_redis(self, users: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = [feature_store.redis_key(u, self.project) for u in users]
        raw = self._script(keys=keys, args=[RECORD_WIDTH, *self.fields])
        records = np.frombuffer(raw, dtype=np.uint8).reshape(len(users), len(self.fields), RECORD_WIDTH)
        lengths = records[:, :, 0].astype(np.int64)
        lengths[lengths == 255] = -1
        present = (lengths > 0).any(axis=1)  # Feast's own read: a user with no field is unknown
        return records[:, :, 1:], lengths, present

    def probe(self) -> None:
        """One read for a made-up user: raises if the online store cannot be queried."""
        try:
            self.read(["__readiness_probe__"])
        except Exception as err:
            raise PredictorLoadError(f"the online store ({self.kind}) cannot be read: {err}") from err


SQLITE_IN_LIMIT = 30_000  # below SQLite's default bound-parameter limit (32,766)
SMALL_READ = 4  # at most this many users: the provider read (cheaper per call), same values


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def decode_records(lengths: np.ndarray, records: np.ndarray) -> np.ndarray:
    """Numbers from ``ValueProto`` bytes, vectorised: ``records[..., :]`` hold each value's bytes
    (tag first, zero-padded), ``lengths`` their lengths (0: null). Doubles, floats, int32/int64
    varints and booleans; NaN for nulls; any other value sets its length to -1 (not numeric)."""
    out = np.full(lengths.shape, np.nan, dtype=np.float64)
    tag = records[..., 0]
    double = (tag == _DOUBLE_TAG) & (lengths == 9)
    out[double] = np.ascontiguousarray(records[double][:, 1:9]).view("<f8")[:, 0]
    single = (tag == _FLOAT_TAG) & (lengths == 5)
    out[single] = np.ascontiguousarray(records[single][:, 1:5]).view("<f4")[:, 0]
    flag = (tag == _BOOL_TAG) & (lengths == 2)
    out[flag] = records[flag][:, 1]
    varint = ((tag == _INT64_TAG) | (tag == _INT32_TAG)) & (lengths >= 2)
    if varint.any():
        payload = records[varint][:, 1:].astype(np.uint64)
        size = lengths[varint] - 1
        number = np.zeros(len(payload), dtype=np.uint64)
        for k in range(min(10, payload.shape[1])):
            part = (payload[:, k] & np.uint64(0x7F)) << np.uint64(7 * k)
            number |= np.where(k < size, part, np.uint64(0))
        out[varint] = number.view(np.int64)
    numeric = double | single | flag | varint | (lengths == 0)
    lengths[~numeric] = -1
    return out


def reader_for(feature_read: str) -> type[OnlineFeatureReader]:
    """The reader class for ``auto``, ``public``, ``provider`` or ``bulk``."""
    if feature_read not in FEATURE_READS:
        raise PredictorLoadError(f"feature read {feature_read!r} is not one of {FEATURE_READS}")
    installed = importlib.metadata.version("feast")
    checked = installed == ProviderOnlineRead.CHECKED_FEAST_VERSION
    if feature_read == "public" or (feature_read == "auto" and not checked):
        if feature_read == "auto":
            log.warning(
                "Feast %s is not the version the bulk read was checked against (%s): using get_online_features",
                installed, ProviderOnlineRead.CHECKED_FEAST_VERSION,
            )
        return OnlineFeatureReader
    if not checked:
        log.warning("%s read forced on Feast %s, checked only on %s", feature_read, installed, ProviderOnlineRead.CHECKED_FEAST_VERSION)
    return ProviderOnlineRead if feature_read == "provider" else BulkOnlineRead


def _number(value: object, name: str, user_id: str) -> float:
    """One feature value from ``get_online_features`` as a float (booleans as 0/1)."""
    if value is None:
        metrics.FEATURE_MISSING.labels(name).inc()
        raise FeatureDataError(f"feature {name!r} of user {user_id!r} is null in the online store")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise FeatureDataError(f"feature {name!r} of user {user_id!r} is not numeric ({type(value).__name__})") from None


def _proto_number(values: dict[str, ValueProto], name: str, user_id: str) -> float:
    """One feature value from ``online_read`` as a float (booleans as 0/1); null or non-numeric is a data error."""
    value = values.get(name)
    kind = value.WhichOneof("val") if value is not None else None
    if kind is None:
        metrics.FEATURE_MISSING.labels(name).inc()
        raise FeatureDataError(f"feature {name!r} of user {user_id!r} is null in the online store")
    try:
        return float(getattr(value, kind))
    except (TypeError, ValueError):
        raise FeatureDataError(f"feature {name!r} of user {user_id!r} is not numeric ({kind})") from None
