"""The embedded model registry: one SQLite file with the Kubeflow Model Registry's concepts.

Tables mirror the Kubeflow registry: a *registered model* has *model versions*, each version has
one *model artifact* (URI, ``model_format_name``, ``model_format_version``). A version's metadata
is a JSON document. Aliases live in their own table (one holder per model and alias, by its
primary key) and every alias change is appended to ``alias_event``; a swap is one transaction,
so a reader sees the old champion or the new one, never both or neither. Every call opens its own connection, so the object can be shared between
threads; the file is in WAL mode so a predictor can read while a pipeline registers, and a
registration (version + artifact) is one transaction, so readers never see half of it.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from fraud_common.logs import get_logger
from fraud_common.registry.base import (
    ARCHIVED,
    CHAMPION,
    LIVE,
    AliasEvent,
    ModelNotFound,
    ModelVersion,
    RegistryError,
    champion_or_fallback,
    check_actor,
    check_alias,
    check_clear,
    check_move,
    check_names,
    newest_passed_gate,
    normalise_metadata,
)

log = get_logger(__name__)

# 2 added aliases, alias events and the version state; a version-1 file is upgraded on open.
SCHEMA_VERSION = 2
# Seconds a connection waits for another writer's lock before giving up.
BUSY_TIMEOUT_SECONDS = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS registered_model (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS model_version (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    registered_model_id INTEGER NOT NULL REFERENCES registered_model(id),
    name                TEXT NOT NULL,
    description         TEXT NOT NULL DEFAULT '',
    metadata            TEXT NOT NULL,
    created_at          TEXT NOT NULL,
    state               TEXT NOT NULL DEFAULT 'LIVE',
    UNIQUE (registered_model_id, name)
);
CREATE TABLE IF NOT EXISTS model_artifact (
    id                   INTEGER PRIMARY KEY AUTOINCREMENT,
    model_version_id     INTEGER NOT NULL UNIQUE REFERENCES model_version(id),
    name                 TEXT NOT NULL,
    uri                  TEXT NOT NULL,
    model_format_name    TEXT NOT NULL,
    model_format_version TEXT NOT NULL,
    created_at           TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS model_alias (
    registered_model_id INTEGER NOT NULL REFERENCES registered_model(id),
    alias               TEXT NOT NULL,
    model_version_id    INTEGER NOT NULL UNIQUE REFERENCES model_version(id),
    PRIMARY KEY (registered_model_id, alias)
);
CREATE TABLE IF NOT EXISTS alias_event (
    registered_model_id INTEGER NOT NULL REFERENCES registered_model(id),
    sequence            INTEGER NOT NULL,
    alias               TEXT NOT NULL,
    version             TEXT NOT NULL,
    previous            TEXT NOT NULL,
    kind                TEXT NOT NULL,
    actor               TEXT NOT NULL,
    reason              TEXT NOT NULL,
    at                  TEXT NOT NULL,
    PRIMARY KEY (registered_model_id, sequence)
);
"""

# Oldest first: the AUTOINCREMENT id is the registration order (timestamps can tie).
_SELECT_VERSIONS = """
SELECT m.name, v.name, a.uri, a.model_format_name, a.model_format_version, v.metadata, v.created_at,
       m.id, v.id, COALESCE(al.alias, ''), v.state
FROM model_version v
JOIN registered_model m ON m.id = v.registered_model_id
JOIN model_artifact a ON a.model_version_id = v.id
LEFT JOIN model_alias al ON al.model_version_id = v.id
WHERE m.name = ?
"""


def _now() -> str:
    """The current UTC time as ISO-8601 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class LocalModelRegistry:
    """A ``ModelRegistry`` kept in the SQLite file at ``path`` (created with its folder if absent)."""

    def __init__(self, path: str | Path) -> None:
        text = str(path)
        if not text or "://" in text:
            raise RegistryError(
                f"the local registry needs a local file path (FRAUD_REGISTRY_URI), got {text!r}; "
                "use FRAUD_REGISTRY_BACKEND=kubeflow for a registry server"
            )
        self.path = Path(text).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._create_schema()
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open the model registry {self.path}: {exc}") from exc

    def __repr__(self) -> str:
        return f"LocalModelRegistry({str(self.path)!r})"

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection in autocommit mode; callers open transactions explicitly."""
        with closing(sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)) as conn:
            conn.execute("PRAGMA foreign_keys = ON")
            yield conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the lock up front (no upgrade deadlock between writers)."""
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _create_schema(self) -> None:
        with self._connect() as conn:
            # WAL lets readers proceed while a writer commits; the mode is stored in the file.
            conn.execute("PRAGMA journal_mode = WAL")
        with self._write() as conn:
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found not in (0, 1, SCHEMA_VERSION):
                raise RegistryError(
                    f"{self.path} has registry schema version {found}; this code reads version {SCHEMA_VERSION}"
                )
            if found == 1:  # before aliases: every version was live
                conn.execute(f"ALTER TABLE model_version ADD COLUMN state TEXT NOT NULL DEFAULT '{LIVE}'")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def register(
        self,
        model_name: str,
        version: str,
        artifact_uri: str,
        metadata: dict[str, Any],
        model_format: str = "onnx",
        format_version: str = "1",
        description: str = "",
    ) -> ModelVersion:
        """Record a new version and its artifact in one transaction.

        Raises ``RegistryError`` if ``model_name`` already has a version called ``version``.
        """
        check_names(model_name, version, artifact_uri)
        document = json.dumps(normalise_metadata(metadata), sort_keys=True)
        created_at = _now()
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO registered_model (name, created_at) VALUES (?, ?)",
                    (model_name, created_at),
                )
                model_id = conn.execute(
                    "SELECT id FROM registered_model WHERE name = ?", (model_name,)
                ).fetchone()[0]
                try:
                    cursor = conn.execute(
                        "INSERT INTO model_version (registered_model_id, name, description, metadata, created_at)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (model_id, version, description or "", document, created_at),
                    )
                except sqlite3.IntegrityError:
                    raise RegistryError(
                        f"model {model_name!r} already has a version {version!r} in {self.path}; "
                        "version names are unique, pick a new one"
                    ) from None
                conn.execute(
                    "INSERT INTO model_artifact (model_version_id, name, uri, model_format_name,"
                    " model_format_version, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (cursor.lastrowid, model_name, artifact_uri, model_format, format_version, created_at),
                )
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot register {model_name}:{version} in {self.path}: {exc}") from exc
        log.info("registered %s version %s -> %s", model_name, version, artifact_uri)
        return self.get_version(model_name, version)

    def _select(self, model_name: str, version: str | None = None) -> list[ModelVersion]:
        """Versions of ``model_name`` oldest first (only ``version`` if given)."""
        query, params = _SELECT_VERSIONS, [model_name]
        if version is not None:
            query += " AND v.name = ?"
            params.append(version)
        try:
            with self._connect() as conn:
                rows = conn.execute(query + " ORDER BY v.id", params).fetchall()
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot read the model registry {self.path}: {exc}") from exc
        return [
            ModelVersion(
                model_name=name,
                version=ver,
                artifact_uri=uri,
                model_format=fmt,
                format_version=fmt_version,
                metadata=json.loads(document),
                created_at=created_at,
                registered_model_id=str(model_id),
                version_id=str(version_id),
                alias=alias,
                state=state,
            )
            for name, ver, uri, fmt, fmt_version, document, created_at, model_id, version_id, alias, state in rows
        ]

    def list_versions(self, model_name: str) -> list[ModelVersion]:
        """All versions of a model, oldest first (empty if the model is unknown)."""
        return self._select(model_name)

    def get_version(self, model_name: str, version: str | None = None, alias: str | None = None) -> ModelVersion:
        """A named version; or the holder of ``alias``; or with neither the newest that passed the gate."""
        if version is not None:
            found = self._select(model_name, version)
            if not found:
                raise ModelNotFound(f"model {model_name!r} has no version {version!r} in {self.path}")
            return found[0]
        versions = self._select(model_name)
        if alias is None:
            return newest_passed_gate(model_name, versions, str(self.path))
        check_alias(alias)
        if alias == CHAMPION:
            return champion_or_fallback(model_name, versions, self.alias_history(model_name), str(self.path))
        for candidate in versions:
            if candidate.alias == alias:
                return candidate
        raise ModelNotFound(f"model {model_name!r} has no {alias} in {self.path}")

    def _ids(self, conn: sqlite3.Connection, model_name: str, version: str) -> tuple[int, int]:
        """(registered model id, version id) of ``model_name``:``version``, or ``ModelNotFound``."""
        row = conn.execute(
            "SELECT m.id, v.id FROM model_version v JOIN registered_model m ON m.id = v.registered_model_id"
            " WHERE m.name = ? AND v.name = ?",
            (model_name, version),
        ).fetchone()
        if row is None:
            raise ModelNotFound(f"model {model_name!r} has no version {version!r} in {self.path}")
        return row[0], row[1]

    def _holder(self, conn: sqlite3.Connection, model_id: int, alias: str) -> tuple[int, str] | None:
        """(version id, version name) holding ``alias``, if any."""
        return conn.execute(
            "SELECT v.id, v.name FROM model_alias al JOIN model_version v ON v.id = al.model_version_id"
            " WHERE al.registered_model_id = ? AND al.alias = ?",
            (model_id, alias),
        ).fetchone()

    def _record_event(self, conn: sqlite3.Connection, model_id: int, alias: str, version: str, previous: str,
                      kind: str, actor: str, reason: str) -> None:
        sequence = conn.execute(
            "SELECT COALESCE(MAX(sequence), 0) + 1 FROM alias_event WHERE registered_model_id = ?", (model_id,)
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO alias_event (registered_model_id, sequence, alias, version, previous, kind, actor, reason, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (model_id, sequence, alias, version, previous, kind, actor, reason, _now()),
        )

    def set_alias(self, model_name: str, alias: str, version: str, actor: str, reason: str,
                  kind: str = "set") -> ModelVersion:
        """Give ``alias`` to ``version`` in one transaction (see ``ModelRegistry.set_alias``)."""
        check_alias(alias, kind)
        check_actor(actor, reason)
        try:
            with self._write() as conn:
                model_id, version_id = self._ids(conn, model_name, version)
                held = self._holder(conn, model_id, alias)
                own = conn.execute(
                    "SELECT alias FROM model_alias WHERE model_version_id = ?", (version_id,)
                ).fetchone()
                check_move(model_name, version, alias, held[1] if held else "", own[0] if own else "")
                if own is not None:  # the challenger being promoted
                    conn.execute("DELETE FROM model_alias WHERE model_version_id = ?", (version_id,))
                if held is not None:
                    conn.execute(
                        "DELETE FROM model_alias WHERE registered_model_id = ? AND alias = ?", (model_id, alias)
                    )
                    if alias == CHAMPION:
                        conn.execute("UPDATE model_version SET state = ? WHERE id = ?", (ARCHIVED, held[0]))
                conn.execute(
                    "INSERT INTO model_alias (registered_model_id, alias, model_version_id) VALUES (?, ?, ?)",
                    (model_id, alias, version_id),
                )
                conn.execute("UPDATE model_version SET state = ? WHERE id = ?", (LIVE, version_id))
                self._record_event(conn, model_id, alias, version, held[1] if held else "", kind, actor, reason)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot set the {alias} of {model_name} in {self.path}: {exc}") from exc
        log.info("%s of %s is now %s (%s, by %s: %s)", alias, model_name, version, kind, actor, reason)
        return self.get_version(model_name, version)

    def clear_alias(self, model_name: str, alias: str, actor: str, reason: str) -> None:
        """Take ``challenger`` from its holder, recording who and why (no-op without one)."""
        check_clear(alias, actor, reason)
        try:
            with self._write() as conn:
                row = conn.execute("SELECT id FROM registered_model WHERE name = ?", (model_name,)).fetchone()
                held = self._holder(conn, row[0], alias) if row else None
                if held is None:
                    return
                conn.execute("DELETE FROM model_alias WHERE registered_model_id = ? AND alias = ?", (row[0], alias))
                self._record_event(conn, row[0], alias, "", held[1], "clear", actor, reason)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot clear the {alias} of {model_name} in {self.path}: {exc}") from exc
        log.info("%s of %s cleared (was %s; by %s: %s)", alias, model_name, held[1], actor, reason)

    def alias_history(self, model_name: str) -> list[AliasEvent]:
        """Every alias change of the model, oldest first."""
        try:
            with self._connect() as conn:
                rows = conn.execute(
                    "SELECT e.alias, e.version, e.previous, e.kind, e.actor, e.reason, e.at, e.sequence"
                    " FROM alias_event e JOIN registered_model m ON m.id = e.registered_model_id"
                    " WHERE m.name = ? ORDER BY e.sequence",
                    (model_name,),
                ).fetchall()
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot read the model registry {self.path}: {exc}") from exc
        return [AliasEvent(model_name, *row) for row in rows]

    def update_metadata(self, model_name: str, version: str, changes: dict[str, Any]) -> ModelVersion:
        """Set some metadata keys of a version in one transaction; other keys are kept."""
        changes = normalise_metadata(changes)
        try:
            with self._write() as conn:
                _model_id, version_id = self._ids(conn, model_name, version)
                document = conn.execute("SELECT metadata FROM model_version WHERE id = ?", (version_id,)).fetchone()[0]
                merged = {**json.loads(document), **changes}
                conn.execute(
                    "UPDATE model_version SET metadata = ? WHERE id = ?",
                    (json.dumps(merged, sort_keys=True), version_id),
                )
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot update {model_name}:{version} in {self.path}: {exc}") from exc
        return self.get_version(model_name, version)
