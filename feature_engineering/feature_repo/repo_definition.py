"""Feast definitions of the fraud feature store: one entity, one source, one view, one service.

The one definition of the store's objects: `feast apply` (the CLI, run with this folder as repo)
picks up the module-level objects built from the environment's settings; the feature step, the
tests and the benches call ``build_definitions(settings, path)`` with the prepared features'
folder instead, so every path comes from ``fraud_common.settings.Settings`` or an artifact.
"""

from __future__ import annotations

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Bool, Float64, Int64, PrimitiveFeastType, String

from fraud_common import schemas
from fraud_common.feature_store import ENTITY_NAME, FEATURE_SERVICE, FEATURE_VIEW
from fraud_common.settings import Settings
from fraud_common.storage import is_s3, join

SOURCE_NAME = "prepared_user_features"

# Types that hand back the values the model sees: the prepared Parquet's doubles stay Float64
# (the model casts to float32 itself), flags are booleans (0/1 for the model), counts integers.
FEATURE_TYPES: dict[str, PrimitiveFeastType] = {
    **{name: Float64 for name in schemas.FLOAT_COLUMNS},
    **{name: Bool for name in schemas.FLAG_COLUMNS},
    **{name: Float64 for name in schemas.HISTORY_FEATURES},
    "num_prev_transactions": Int64,
}

# ttl 0 means "no expiry": every label row happens at one fixed label time, so historical
# retrieval must look back without limit and the online store must keep serving old rows.
FEATURE_TTL = timedelta(0)


def source_path(settings: Settings, prepared_uri: str | None = None) -> str:
    """Where Feast's file source reads the prepared features of ``prepared_uri``.

    ``prepared_uri`` defaults to ``settings.prepared_uri``. A local folder is read in place. For
    an s3:// one the runner first copies the Parquet to ``<feast_dir>/offline/features``: Feast's
    file offline store reads through dask/fsspec, which needs s3fs, and s3fs cannot be installed
    beside this workspace's botocore.
    """
    prepared_uri = prepared_uri or settings.prepared_uri
    if is_s3(prepared_uri):
        return join(settings.feast_dir, "offline", schemas.FEATURES_DIR)
    return join(prepared_uri, schemas.FEATURES_DIR)


def build_definitions(
    settings: Settings, path: str | None = None
) -> tuple[Entity, FileSource, FeatureView, FeatureService]:
    """The store's objects, reading features from ``path`` (default: ``source_path(settings)``)."""
    path = path or source_path(settings)
    user = Entity(
        name=ENTITY_NAME,
        join_keys=[schemas.ENTITY_KEY],
        value_type=ValueType.STRING,
        description="A card holder; one label transaction per user.",
    )
    source = FileSource(
        name=SOURCE_NAME,
        path=path,
        timestamp_field=schemas.EVENT_TIMESTAMP,
        created_timestamp_column=schemas.CREATED_TIMESTAMP,
        # Only used when the path is s3:// (direct reads need s3fs, see source_path).
        s3_endpoint_override=settings.s3_endpoint or None,
    )
    view = FeatureView(
        name=FEATURE_VIEW,
        entities=[user],
        ttl=FEATURE_TTL,
        schema=[Field(name=schemas.ENTITY_KEY, dtype=String)]
        + [Field(name=name, dtype=FEATURE_TYPES[name]) for name in schemas.MODEL_FEATURES],
        source=source,
        online=True,
        description="The model's inputs per user: the label transaction and its history aggregates.",
    )
    service = FeatureService(
        name=FEATURE_SERVICE,
        features=[view[list(schemas.MODEL_FEATURES)]],
        description="Exactly the model's inputs, in the model's order.",
    )
    return user, source, view, service


user, prepared_user_features, user_transaction_features, fraud_model_features = build_definitions(
    Settings.from_env()
)
