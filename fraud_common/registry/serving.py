"""What a registered version needs to be served: its feature store and the data it was trained on.

A version's record carries ``serving`` (written once, at registration)::

    {"features": {"definitions_fingerprint": "sha256:...", "feature_service": ..., "feature_view": ...,
                  "feature_names": [...], "snapshot_uri": "<folder with registry.db + online_store.db>"},
     "training_data": {"fingerprint": "sha256:...", "uri": ..., "prepared_uri": ..., "rows": n, "time_min": ..., "time_max": ...,
                       "schema_fingerprint": ...}}

The snapshot is copied next to the model file at registration (``version_store_uri``), so it
belongs to the version, not to the run that made it, and later runs never write to it. A
predictor serving a version fetches *that* snapshot into a folder of its own
(``serving_feast_dir``): the feature step of a later run, which rewrites ``FRAUD_FEAST_DIR``,
changes nothing the live predictor reads. Promotion moves the champion alias, and the predictor
then swaps model, threshold and feature store together.

With the shared Redis online store the rows themselves are not in the snapshot: they live under
the namespace (Feast project) of the run that wrote them, which the snapshot names
(``online_namespace.json``; ``features.online_project`` on the record when the registration
passes it). Later runs write other namespaces, so a version's rows never change either.
``namespaces_in_use`` says which namespaces the registry still needs (the feature step deletes
the others: ``feature_engineering.feast_feature_engineering.collect_namespaces``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Mapping

from fraud_common import storage
from fraud_common.feature_store import (
    ENTITY_NAME,
    FEATURE_SERVICE,
    FEATURE_VIEW,
    NAMESPACE_FILE,
    PROJECT,
    SnapshotError,
    check_namespace,
    feature_refs,
    optional_snapshot_files,
    parse_namespace,
    snapshot_files,
)
from fraud_common.registry.base import CHALLENGER, CHAMPION, ModelRegistry, ModelVersion, previous_champion
from fraud_common.registry.lifecycle import refusal
from fraud_common.settings import Settings

SERVING_KEY = "serving"


def definitions_fingerprint() -> str:
    """``sha256:<hex>`` of the served feature definitions (entity, view, service, features in order).

    Two versions with the same fingerprint read the same online features: a canary can score the
    challenger on the live store's rows.
    """
    document = {"entity": ENTITY_NAME, "view": FEATURE_VIEW, "service": FEATURE_SERVICE, "features": feature_refs()}
    return "sha256:" + hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def version_store_uri(model_uri: str) -> str:
    """Where a version's feature store snapshot lives: beside its model file."""
    return storage.join(model_uri.rsplit("/", 1)[0], "feature_store")


def store_snapshot(local_dir: str | Path, uri: str, settings: Settings) -> str:
    """Copy a snapshot folder (``registry.db``, and ``online_store.db`` unless the online store is
    the shared Redis: ``feature_store.snapshot_files``; with Redis its namespace record) to
    ``uri``; returns ``uri``.

    Local targets are written to a temporary folder and renamed into place, so a reader never
    sees half a snapshot; an S3 object appears whole, and the record naming it is written after.
    """
    source = Path(local_dir)
    required = snapshot_files(settings)
    missing = [name for name in required if not (source / name).is_file()]
    if missing:
        raise storage.StorageError(f"feature store snapshot {source} lacks {missing}")
    files = [*required, *(name for name in optional_snapshot_files(settings) if (source / name).is_file())]
    if storage.is_s3(uri):
        for name in files:
            storage.upload(source / name, storage.join(uri, name), settings)
        return uri
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        for name in files:
            storage.share_published_file(source / name, staging / name)  # the run's artifact: write-once
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return uri


def serving_record(snapshot_uri: str, feature_names: list[str], data_fingerprint: str,
                   training_data: Mapping[str, Any], online_project: str = "") -> dict[str, Any]:
    """The ``serving`` block of a version's record (see the module docstring); ``online_project``:
    the Redis namespace of its rows, when known at registration (the snapshot names it anyway)."""
    keep = ("uri", "rows", "time_min", "time_max", "schema_fingerprint", "prepared_uri")
    features = {
        "definitions_fingerprint": definitions_fingerprint(),
        "feature_service": FEATURE_SERVICE,
        "feature_view": FEATURE_VIEW,
        "feature_names": list(feature_names),
        "snapshot_uri": snapshot_uri,
    }
    if online_project:
        features["online_project"] = check_namespace(online_project)
    return {
        "features": features,
        "training_data": {"fingerprint": data_fingerprint, **{k: training_data[k] for k in keep if k in training_data}},
    }


def _recorded(version: ModelVersion, block: str, key: str) -> str:
    """``serving.<block>.<key>`` of a version's record ("" when absent: versions from before)."""
    return str(((version.metadata.get(SERVING_KEY) or {}).get(block) or {}).get(key) or "")


def prepared_of(version: ModelVersion) -> str:
    """The prepared features a version was trained from ("" when not recorded): what the
    predictor seeds the card histories from."""
    return _recorded(version, "training_data", "prepared_uri")


def snapshot_of(version: ModelVersion) -> str:
    """The feature store snapshot a version was registered with ("" for versions from before)."""
    return _recorded(version, "features", "snapshot_uri")


def definitions_of(version: ModelVersion) -> str:
    """The feature definitions fingerprint a version records ("" when it records none)."""
    return _recorded(version, "features", "definitions_fingerprint")


def serving_feast_dir(settings: Settings, version: ModelVersion) -> Path:
    """The predictor's own folder for a version's feature store (never the feature step's)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in version.version)
    return Path(settings.home) / "serving" / version.model_name / safe / "feast"


def feature_settings(settings: Settings, version: ModelVersion) -> Settings:
    """The settings the predictor opens ``version``'s feature store with.

    A version that records its snapshot is served from it, in its own folder; one from before
    (no record) keeps the configured ``feast_dir`` and ``feast_snapshot_uri``.
    """
    recorded = snapshot_of(version)
    if not recorded:
        return settings
    return settings.with_overrides(feast_snapshot_uri=recorded, feast_dir=str(serving_feast_dir(settings, version)))


def online_project_of(version: ModelVersion, settings: Settings) -> str:
    """The Redis namespace (Feast project) ``version`` reads: the one on its record, else the one
    its snapshot names, else the base project (a snapshot from before namespaces); "" for a
    version with no snapshot (it reads the configured store). SnapshotError if unreadable."""
    recorded = _recorded(version, "features", "online_project")
    if recorded:
        return check_namespace(recorded)
    snapshot = snapshot_of(version)
    if not snapshot:
        return ""
    source = storage.join(snapshot, NAMESPACE_FILE)
    try:
        if not storage.exists(source, settings):
            return PROJECT
        return parse_namespace(storage.read_bytes(source, settings), source)
    except storage.StorageError as err:
        raise SnapshotError(f"cannot read the online namespace of {version.model_name}:{version.version}: {err}") from err


# A namespace no decided version records is a run in progress for this long after its creation
# (feature step to registration and gates); after that it is garbage like any other.
NAMESPACE_GRACE = timedelta(hours=6)


@dataclass(frozen=True)
class NamespacesInUse:
    """What the registry says of the online namespaces: ``kept`` (project -> why) must stay;
    ``claimed`` (project -> version) are recorded by recent versions that will not be served
    (refused at the gate, rolled back): not runs in progress, whatever their age."""

    kept: dict[str, str] = field(default_factory=dict)
    claimed: dict[str, str] = field(default_factory=dict)


def namespaces_in_use(registry: ModelRegistry, model_name: str, settings: Settings,
                      now: datetime | None = None, grace: timedelta = NAMESPACE_GRACE) -> NamespacesInUse:
    """Kept: the namespaces of the champion, the challenger (a canary's, or one awaiting approval),
    the rollback target (``previous_champion``) and of versions registered within ``grace`` and
    not decided yet (a run between registration and its gates). Claimed: those of recent
    versions refused at the gate or rolled back.

    Raises RegistryError or SnapshotError when any of those cannot be read: nothing may be
    deleted on a guess.
    """
    now = now or datetime.now(timezone.utc)
    versions = registry.list_versions(model_name)
    target = previous_champion(registry.alias_history(model_name))
    kept: dict[str, str] = {}
    claimed: dict[str, str] = {}
    for version in versions:
        role = version.alias if version.alias in (CHAMPION, CHALLENGER) else ("rollback target" if version.version == target else "")
        recent = _created(version) >= now - grace
        if not role and not recent:
            continue
        project = online_project_of(version, settings)
        if not project:
            continue  # no snapshot: it reads whatever the configured store holds
        if role:
            kept.setdefault(project, f"{role} {version.version}")
        elif refusal(version) or version.metadata.get("rolled_back"):
            claimed.setdefault(project, version.version)
        else:
            kept.setdefault(project, f"undecided {version.version}")
    return NamespacesInUse(kept, claimed)


def _created(version: ModelVersion) -> datetime:
    """When the registry created ``version`` (now, if it does not say: counted as recent)."""
    try:
        created = datetime.fromisoformat(version.created_at.replace("Z", "+00:00"))
    except ValueError:
        return datetime.now(timezone.utc)
    return created if created.tzinfo else created.replace(tzinfo=timezone.utc)
