"""Names and configuration of the Feast feature store, shared by the feature step and the predictor.

Only plain data lives here (no Feast import), so the shared package stays small; callers build
``feast.RepoConfig(**store_config(settings))``.
"""

from __future__ import annotations

from pathlib import Path

from fraud_common.schemas import MODEL_FEATURES
from fraud_common.settings import Settings

PROJECT = "fraud_detection"
ENTITY_NAME = "user"
FEATURE_VIEW = "user_transaction_features"
FEATURE_SERVICE = "fraud_model_features"


def store_config(settings: Settings) -> dict:
    """Feast repo configuration: SQLite online store and file registry under ``settings.feast_dir``."""
    feast_dir = Path(settings.feast_dir)
    return {
        "project": PROJECT,
        "provider": "local",
        "registry": str(feast_dir / "registry.db"),
        "online_store": {"type": "sqlite", "path": str(feast_dir / "online_store.db")},
        "offline_store": {"type": "file"},
        "entity_key_serialization_version": 3,
    }


# File names of the store's state inside ``settings.feast_dir`` (and inside a published copy).
REGISTRY_FILE = "registry.db"
ONLINE_STORE_FILE = "online_store.db"


def feature_refs() -> list[str]:
    """The feature service's references ``view:feature``, in the model's input order."""
    return [f"{FEATURE_VIEW}:{name}" for name in MODEL_FEATURES]
