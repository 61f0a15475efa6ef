"""The registry contract: registered model, version, artifact, and what each version records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class RegistryError(RuntimeError):
    """The registry refused a request or does not hold what was asked for."""


class ModelNotFound(RegistryError):
    """No registered model or version matches the request."""


class RegistryUnavailable(RegistryError):
    """The registry server cannot be reached or refused the connection."""


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


# --- Helpers shared by the backends (additive; downstream code needs none of them). ---


def _plain(value: Any, where: str) -> Any:
    """``value`` as plain JSON types (numpy scalars unwrapped); ``where`` names it in errors."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        # bool is handled above; int/float subclasses (numpy.float64) become the builtin type.
        return int(value) if isinstance(value, int) else float(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise RegistryError(f"metadata {where or '(top level)'}: key {key!r} is not a string")
            out[key] = _plain(item, f"{where}.{key}" if where else key)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    item = getattr(value, "item", None)  # numpy scalars and 0-d arrays
    if callable(item):
        return _plain(item(), where)
    raise RegistryError(f"metadata {where}: {type(value).__name__} value {value!r} cannot be stored as JSON")


def normalise_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``metadata`` holding only JSON types, so every backend stores the same thing."""
    if not isinstance(metadata, dict):
        raise RegistryError(f"metadata must be a dict, got {type(metadata).__name__}")
    return _plain(metadata, "")


def check_names(model_name: str, version: str, artifact_uri: str) -> None:
    """Refuse empty names and URIs before anything is written."""
    for label, value in (("model name", model_name), ("version", version), ("artifact URI", artifact_uri)):
        if not isinstance(value, str) or not value.strip():
            raise RegistryError(f"{label} must be a non-empty string, got {value!r}")


def newest_passed_gate(model_name: str, versions: list[ModelVersion], where: str) -> ModelVersion:
    """The newest version (last in ``versions``, oldest first) that passed the gate.

    Raises ``ModelNotFound`` naming the model and ``where`` (the registry) when there is none.
    """
    for candidate in reversed(versions):
        if candidate.passed_gate:
            return candidate
    if not versions:
        raise ModelNotFound(f"no model named {model_name!r} is registered in {where}")
    raise ModelNotFound(
        f"model {model_name!r} has {len(versions)} version(s) in {where} but none passed the quality gate "
        f"(newest: {versions[-1].version!r})"
    )
