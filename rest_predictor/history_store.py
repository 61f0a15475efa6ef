"""Each card's history state (``fraud_common.history``) in an online store: SQLite by default, Redis shared.

Transaction scoring reads the states of the request's cards (one read); the push path records
transactions, updating each card's state with ``history.add`` atomically, so concurrent pushes
for the same card never lose an update:

* ``SqliteHistoryStore`` (the embedded default, no server): one table beside Feast's online
  store, WAL mode; a push batch runs in one ``BEGIN IMMEDIATE`` transaction (read, fold, write),
  which holds SQLite's write lock from the read on, for threads and processes alike.
* ``RedisHistoryStore`` (``FRAUD_ONLINE_STORE_URL=redis://...``, the cluster's shared store): one
  string per card; a push batch is one Lua script call (``RECORD_SCRIPT``): Redis runs a script
  alone, so the read, the fold and the write of every card of the batch are atomic, in one round
  trip, with no retries (WATCH/MULTI needed two round trips and retried under contention). The
  script's fold is ``history.add`` step for step in IEEE doubles, written with ``%.17g`` so every
  value round-trips: the parity test holds it equal to Python's fold and to Spark's aggregates.

Both stores are seeded from the prepared features (``seed_from_prepared``): the state behind each
user's prepared history features, so a store that has seen no push scores like the batch data.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Protocol, Sequence

import numpy as np

from fraud_common import history, schemas, storage
from fraud_common.history import HistoryState
from fraud_common.logs import get_logger
from fraud_common.settings import Settings

log = get_logger(__name__)

SQLITE_FILE = "history.db"
REDIS_PREFIX = "fraud:history:"
REDIS_SEED_KEY = "fraud:history-seed"
SEED_CHUNK = 10_000


class HistoryStoreError(RuntimeError):
    """The history store cannot be opened or used."""


@dataclass(frozen=True)
class Recorded:
    """One transaction to record: the card, its amount and when it happened (µs since the epoch)."""

    user_id: str
    amount: float
    when_us: int


def fold(states: dict[str, HistoryState], transactions: Sequence[Recorded]) -> dict[str, HistoryState]:
    """The new state of every card in ``transactions``, from ``states`` (missing: no history)."""
    updated: dict[str, HistoryState] = {}
    for txn in transactions:
        before = updated.get(txn.user_id) or states.get(txn.user_id) or history.EMPTY
        updated[txn.user_id] = history.add(before, txn.amount, txn.when_us)
    return updated


class HistoryStore(Protocol):
    """What transaction scoring and the push path need from a store."""

    def read(self, user_ids: Sequence[str]) -> list[HistoryState]:
        """The states of ``user_ids`` in order (``history.EMPTY`` for a card never seen)."""

    def record(self, transactions: Sequence[Recorded]) -> None:
        """Apply ``transactions`` to their cards' states, atomically for the whole batch."""

    def seed(self, states: "SeedStates", marker: str) -> None:
        """Replace every state with ``states`` and remember ``marker`` (what they came from)."""

    def seed_marker(self) -> str | None:
        """The marker of the last seed, or None."""

    def close(self) -> None:
        """Release connections."""


class SqliteHistoryStore:
    """States in one SQLite table; a connection per thread."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connection() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS user_history (user_id TEXT PRIMARY KEY, count INTEGER NOT NULL, "
                "total REAL NOT NULL, mean REAL NOT NULL, m2 REAL NOT NULL, max REAL NOT NULL, "
                "first_us INTEGER NOT NULL, last_us INTEGER NOT NULL) WITHOUT ROWID"
            )
            db.execute("CREATE TABLE IF NOT EXISTS history_seed (id INTEGER PRIMARY KEY CHECK (id = 1), marker TEXT NOT NULL)")

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    def _states(self, db: sqlite3.Connection, user_ids: Sequence[str]) -> dict[str, HistoryState]:
        found: dict[str, HistoryState] = {}
        unique = list(dict.fromkeys(user_ids))
        for start in range(0, len(unique), 900):  # below SQLite's bound-parameter limit
            chunk = unique[start : start + 900]
            rows = db.execute(
                f"SELECT user_id, {', '.join(history.STATE_FIELDS)} FROM user_history "
                f"WHERE user_id IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            for user_id, *values in rows:
                found[user_id] = HistoryState(*values)
        return found

    def read(self, user_ids: Sequence[str]) -> list[HistoryState]:
        found = self._states(self._connection(), user_ids)
        return [found.get(u, history.EMPTY) for u in user_ids]

    def record(self, transactions: Sequence[Recorded]) -> None:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")  # the write lock before the read: no other writer in between
        try:
            updated = fold(self._states(db, [t.user_id for t in transactions]), transactions)
            db.executemany(
                f"INSERT OR REPLACE INTO user_history VALUES (?, {', '.join('?' * len(history.STATE_FIELDS))})",
                [(user_id, *_values(state)) for user_id, state in updated.items()],
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def seed(self, states: "SeedStates", marker: str) -> None:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM user_history")
            db.executemany(
                f"INSERT INTO user_history VALUES (?, {', '.join('?' * len(history.STATE_FIELDS))})",
                states.rows(),
            )
            db.execute("INSERT OR REPLACE INTO history_seed VALUES (1, ?)", (marker,))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def seed_marker(self) -> str | None:
        row = self._connection().execute("SELECT marker FROM history_seed WHERE id = 1").fetchone()
        return row[0] if row else None

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


# KEYS: the batch's cards; ARGV: (index into KEYS, amount, when_us) per transaction, in order.
# The state string is history.encode's "count total mean m2 max first_us last_us".
RECORD_SCRIPT = """
local states = {}
for i = 1, #KEYS do
  local raw = redis.call('GET', KEYS[i])
  if raw then
    local s = {}
    for part in string.gmatch(raw, '%S+') do s[#s + 1] = tonumber(part) end
    if #s ~= 7 then return redis.error_reply('malformed history state at ' .. KEYS[i]) end
    states[i] = s
  end
end
for t = 1, #ARGV, 3 do
  local i, amount, when = tonumber(ARGV[t]), tonumber(ARGV[t + 1]), tonumber(ARGV[t + 2])
  local s = states[i]
  if not s or s[1] == 0 then
    states[i] = {1, amount, amount, 0.0, amount, when, when}
  else
    local n = s[1] + 1
    local delta = amount - s[3]
    local delta_n = delta / n
    states[i] = {n, s[2] + amount, s[3] + delta_n, s[4] + delta * (delta - delta_n),
                 math.max(s[5], amount), math.min(s[6], when), math.max(s[7], when)}
  end
end
local written = 0
for i = 1, #KEYS do
  local s = states[i]
  if s then
    redis.call('SET', KEYS[i], string.format('%.0f %.17g %.17g %.17g %.17g %.0f %.0f', s[1], s[2], s[3], s[4], s[5], s[6], s[7]))
    written = written + 1
  end
end
return written
"""


def record_arguments(transactions: Sequence[Recorded]) -> tuple[list[bytes], list[str]]:
    """The script's KEYS (each card once) and ARGV (index, amount, time per transaction)."""
    index: dict[str, int] = {}
    args: list[str] = []
    for txn in transactions:
        position = index.setdefault(txn.user_id, len(index) + 1)  # Lua counts from 1
        args += [str(position), repr(float(txn.amount)), str(int(txn.when_us))]
    return [RedisHistoryStore.key(u) for u in index], args


class RedisHistoryStore:
    """States as ``fraud:history:<user_id>`` strings (``history.encode``) in one Redis database."""

    def __init__(self, url: str) -> None:
        import redis

        self.url = url
        self.client = redis.Redis.from_url(url)
        self._record = self.client.register_script(RECORD_SCRIPT)

    @staticmethod
    def key(user_id: str) -> bytes:
        return (REDIS_PREFIX + user_id).encode()

    def read(self, user_ids: Sequence[str]) -> list[HistoryState]:
        raw = self.client.mget([self.key(u) for u in user_ids])
        return [history.decode(value) if value is not None else history.EMPTY for value in raw]

    def record(self, transactions: Sequence[Recorded]) -> None:
        if not transactions:
            return
        keys, args = record_arguments(transactions)
        self._record(keys=keys, args=args)

    def seed(self, states: "SeedStates", marker: str) -> None:
        stale = list(self.client.scan_iter(match=REDIS_PREFIX + "*", count=10_000))
        for start in range(0, len(stale), SEED_CHUNK):
            self.client.unlink(*stale[start : start + SEED_CHUNK])
        rows = list(states.rows())
        for start in range(0, len(rows), SEED_CHUNK):
            self.client.mset({self.key(u): history.encode_values(v) for u, *v in rows[start : start + SEED_CHUNK]})
        self.client.set(REDIS_SEED_KEY, marker)

    def seed_marker(self) -> str | None:
        value = self.client.get(REDIS_SEED_KEY)
        return value.decode() if value is not None else None

    def close(self) -> None:
        self.client.close()


class AsyncRedisHistory:
    """The Redis store's read and record for the server's event loop (``redis.asyncio``): a
    request waiting on Redis does not hold up the others. Same keys, same script."""

    def __init__(self, url: str) -> None:
        import redis.asyncio

        self.client = redis.asyncio.Redis.from_url(url)
        self._record = self.client.register_script(RECORD_SCRIPT)

    async def read(self, user_ids: Sequence[str]) -> list[HistoryState]:
        raw = await self.client.mget([RedisHistoryStore.key(u) for u in user_ids])
        return [history.decode(value) if value is not None else history.EMPTY for value in raw]

    async def record(self, transactions: Sequence[Recorded]) -> None:
        if not transactions:
            return
        keys, args = record_arguments(transactions)
        await self._record(keys=keys, args=args)


def _values(state: HistoryState) -> tuple:
    return tuple(getattr(state, name) for name in history.STATE_FIELDS)


def open_history_store(settings: Settings) -> HistoryStore:
    """The store named by ``settings.online_store_url`` (empty: SQLite in ``feast_dir``)."""
    url = settings.online_store_url
    try:
        if not url:
            return SqliteHistoryStore(Path(settings.feast_dir) / SQLITE_FILE)
        if url.split("://", 1)[0] in ("redis", "rediss", "unix"):
            store = RedisHistoryStore(settings.online_store_client_url)
            store.client.ping()
            return store
    except Exception as err:  # sqlite3 and redis raise their own types for an unusable store
        raise HistoryStoreError(f"cannot open the history store {url or 'sqlite'}: {err}") from err
    raise HistoryStoreError(f"FRAUD_ONLINE_STORE_URL={url!r}: use redis://, rediss://, unix:// or leave it empty")


# --- Seeding from the prepared features ------------------------------------------------------


class SeedStates(Mapping[str, HistoryState]):
    """Every card's state from the prepared data, as columns (``history.state_columns``): a store
    seeds 1M cards from them without building 1M objects. Also a read-only mapping user -> state."""

    def __init__(self, users: list[str], columns: dict[str, np.ndarray]) -> None:
        self.users = users
        self.columns = columns
        self._index: dict[str, int] | None = None

    def rows(self) -> Iterator[tuple]:
        """``(user_id, count, total, mean, m2, max, first_us, last_us)`` per card, as Python values."""
        return zip(self.users, *(self.columns[name].tolist() for name in history.STATE_FIELDS))

    def __getitem__(self, user_id: str) -> HistoryState:
        if self._index is None:
            self._index = {user: i for i, user in enumerate(self.users)}
        i = self._index[user_id]
        return HistoryState(*(self.columns[name][i].item() for name in history.STATE_FIELDS))

    def __iter__(self) -> Iterator[str]:
        return iter(self.users)

    def __len__(self) -> int:
        return len(self.users)


def prepared_states(settings: Settings, prepared_uri: str = "") -> tuple[SeedStates, str] | None:
    """Every user's state behind its prepared history features, and a marker of that data set.

    None when there are no prepared features. The marker hashes users, times and features, so a
    store is re-seeded only when the pipeline prepared different data.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    uri = storage.join(prepared_uri or settings.prepared_uri, schemas.FEATURES_DIR)
    if not storage.exists(uri, settings):
        return None
    columns = [schemas.ENTITY_KEY, schemas.EVENT_TIMESTAMP, *schemas.HISTORY_FEATURES]
    if storage.is_s3(uri):
        import io

        parts = [f for f in storage.list_files(uri, settings) if f.endswith(".parquet")]
        table = pa.concat_tables([pq.read_table(io.BytesIO(storage.read_bytes(p, settings)), columns=columns) for p in parts])
    else:
        table = pq.read_table(uri, columns=columns)
    users = table.column(schemas.ENTITY_KEY).to_pylist()
    times = table.column(schemas.EVENT_TIMESTAMP).cast(pa.timestamp("us", "UTC")).cast(pa.int64()).to_numpy()
    features = {name: table.column(name).to_numpy().astype(np.float64) for name in schemas.HISTORY_FEATURES}
    digest = hashlib.sha256("\0".join(users).encode())
    digest.update(times.tobytes())
    for name in schemas.HISTORY_FEATURES:
        digest.update(features[name].tobytes())
    states = SeedStates(users, history.state_columns(features, times))
    return states, f"prepared:{len(users)}:{digest.hexdigest()[:24]}"


def seed_from_prepared(store: HistoryStore, settings: Settings, force: bool = False, prepared_uri: str = "") -> bool:
    """Seed ``store`` from the prepared features (``prepared_uri``, by default the CLI's
    ``settings.prepared_uri``) unless it already holds exactly that data set.

    Returns whether it seeded. Pushed transactions survive as long as the prepared data does not
    change; a new pipeline run's data replaces them (it was computed from the newer history).
    """
    started = time.perf_counter()
    source = prepared_uri or settings.prepared_uri
    found = prepared_states(settings, source)
    if found is None:
        log.warning("no prepared features under %s: card histories start empty", source)
        return False
    states, marker = found
    if not force and store.seed_marker() == marker:
        return False
    store.seed(states, marker)
    log.info("seeded %d card histories from %s in %.1fs", len(states), source, time.perf_counter() - started)
    return True
