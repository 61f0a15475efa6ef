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
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

from fraud_common import storage
from fraud_common.feature_store import ENTITY_NAME, FEATURE_SERVICE, FEATURE_VIEW, feature_refs, snapshot_files
from fraud_common.registry.base import ModelVersion
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
    the shared Redis: ``feature_store.snapshot_files``) to ``uri``; returns ``uri``.

    Local targets are written to a temporary folder and renamed into place, so a reader never
    sees half a snapshot; an S3 object appears whole, and the record naming it is written after.
    """
    source = Path(local_dir)
    files = snapshot_files(settings)
    missing = [name for name in files if not (source / name).is_file()]
    if missing:
        raise storage.StorageError(f"feature store snapshot {source} lacks {missing}")
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
                   training_data: Mapping[str, Any]) -> dict[str, Any]:
    """The ``serving`` block of a version's record (see the module docstring)."""
    keep = ("uri", "rows", "time_min", "time_max", "schema_fingerprint", "prepared_uri")
    return {
        "features": {
            "definitions_fingerprint": definitions_fingerprint(),
            "feature_service": FEATURE_SERVICE,
            "feature_view": FEATURE_VIEW,
            "feature_names": list(feature_names),
            "snapshot_uri": snapshot_uri,
        },
        "training_data": {"fingerprint": data_fingerprint, **{k: training_data[k] for k in keep if k in training_data}},
    }


def prepared_of(version: ModelVersion) -> str:
    """The prepared features a version was trained from ("" when not recorded): what the
    predictor seeds the card histories from."""
    return str(((version.metadata.get(SERVING_KEY) or {}).get("training_data") or {}).get("prepared_uri") or "")


def snapshot_of(version: ModelVersion) -> str:
    """The feature store snapshot a version was registered with ("" for versions from before)."""
    return str(((version.metadata.get(SERVING_KEY) or {}).get("features") or {}).get("snapshot_uri") or "")


def definitions_of(version: ModelVersion) -> str:
    """The feature definitions fingerprint a version records ("" when it records none)."""
    return str(((version.metadata.get(SERVING_KEY) or {}).get("features") or {}).get("definitions_fingerprint") or "")


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
