"""The registry contract: registered model, version, artifact, and what each version records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class RegistryError(RuntimeError):
    """The registry refused a request or does not hold what was asked for."""


class ModelNotFound(RegistryError):
    """No registered model or version matches the request."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered version of a model and its artifact.

    ``metadata`` holds: ``metrics`` (dict of test metrics), ``threshold`` (float),
    ``feature_names`` (list, model input order), ``data_fingerprint`` (str), ``run_id`` (str),
    ``code_version`` (str) and ``passed_gate`` (bool).
    """

    model_name: str
    version: str
    artifact_uri: str
    model_format: str = "onnx"
    format_version: str = "1"
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""  # ISO-8601 UTC, set by the registry

    @property
    def passed_gate(self) -> bool:
        return bool(self.metadata.get("passed_gate", False))

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def feature_names(self) -> list[str]:
        return list(self.metadata["feature_names"])


class ModelRegistry(Protocol):
    """What every backend offers; downstream code sees nothing else."""

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
        """Record a new version; raises ``RegistryError`` if the version name already exists."""
        ...

    def list_versions(self, model_name: str) -> list[ModelVersion]:
        """All versions of a model, oldest first (empty if the model is unknown)."""
        ...

    def get_version(self, model_name: str, version: str | None = None) -> ModelVersion:
        """A named version, or with ``version=None`` the newest that passed the gate.

        Raises ``ModelNotFound`` when there is none.
        """
        ...
