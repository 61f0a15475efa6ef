"""The model registry interface: the only way downstream steps find models.

Backends: ``local`` (a SQLite file, for the embedded run) and ``kubeflow`` (the Kubeflow Model
Registry through the ``model-registry`` client). See ``base.py`` for the contract (versions and
the ``champion``/``challenger`` aliases) and ``lifecycle.py`` for promote, rollback and approve.
"""

from fraud_common.registry.base import (
    CHALLENGER,
    CHAMPION,
    AliasEvent,
    ModelNotFound,
    ModelRegistry,
    ModelVersion,
    RegistryError,
    RegistryUnavailable,
)
from fraud_common.settings import Settings

__all__ = [
    "CHALLENGER", "CHAMPION", "AliasEvent", "ModelNotFound", "ModelRegistry", "ModelVersion", "RegistryError",
    "RegistryUnavailable", "open_registry",
]


def open_registry(settings: Settings) -> ModelRegistry:
    """The registry backend named by ``settings.registry_backend``."""
    if settings.registry_backend == "kubeflow":
        from fraud_common.registry.kubeflow import KubeflowModelRegistry

        return KubeflowModelRegistry.from_settings(settings)
    from fraud_common.registry.local import LocalModelRegistry

    return LocalModelRegistry(settings.registry_uri)
