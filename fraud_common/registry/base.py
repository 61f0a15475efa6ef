"""The registry contract: registered model, version, artifact, what each version records, aliases.

Aliases: a model has at most one ``champion`` (the version production serves) and at most one
``challenger`` (the version being evaluated or rolled out). Every change of an alias is an
``AliasEvent`` (who, when, why) kept in the registry. A superseded champion is archived
(state ``ARCHIVED``); every other version stays ``LIVE``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class RegistryError(RuntimeError):
    """The registry refused a request or does not hold what was asked for."""


class ModelNotFound(RegistryError):
    """No registered model or version matches the request."""


CHAMPION = "champion"
CHALLENGER = "challenger"
ALIASES = (CHAMPION, CHALLENGER)
LIVE = "LIVE"
ARCHIVED = "ARCHIVED"
# Kinds of alias change: "set" moves an alias (promotion), "rollback" gives the champion back to
# the version before the current one, "clear" removes the challenger.
EVENT_KINDS = ("set", "rollback", "clear")
# Metadata keys the governance functions write onto a version (gates, approval, rollout).
GOVERNANCE_KEYS = ("gates", "gate_status", "gate_reason", "approval", "rolled_back")
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
    # The registry's own ids (the InferenceService labels that link a deployment to its version).
    registered_model_id: str = ""
    version_id: str = ""
    # ``champion``, ``challenger`` or "" (the registry resolves it; see the backends).
    alias: str = ""
    # ``LIVE``, or ``ARCHIVED`` once a newer champion superseded it.
    state: str = LIVE

    @property
    def passed_gate(self) -> bool:
        return bool(self.metadata.get("passed_gate", False))

    @property
    def threshold(self) -> float:
        return float(self.metadata["threshold"])

    @property
    def feature_names(self) -> list[str]:
        return list(self.metadata["feature_names"])


@dataclass(frozen=True)
class AliasEvent:
    """One change of an alias: ``alias`` went from ``previous`` to ``version`` ("" = nobody)."""

    model_name: str
    alias: str
    version: str
    previous: str
    kind: str  # one of EVENT_KINDS
    actor: str
    reason: str
    at: str  # ISO-8601 UTC
    sequence: int  # increases with every alias change of the model

    def to_dict(self) -> dict[str, Any]:
        return {
            "alias": self.alias, "version": self.version, "previous": self.previous, "kind": self.kind,
            "actor": self.actor, "reason": self.reason, "at": self.at, "sequence": self.sequence,
        }

    @classmethod
    def from_dict(cls, model_name: str, data: dict[str, Any]) -> "AliasEvent":
        return cls(
            model_name=model_name, alias=str(data["alias"]), version=str(data["version"]),
            previous=str(data["previous"]), kind=str(data["kind"]), actor=str(data["actor"]),
            reason=str(data["reason"]), at=str(data["at"]), sequence=int(data["sequence"]),
        )


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

    def get_version(self, model_name: str, version: str | None = None, alias: str | None = None) -> ModelVersion:
        """A named version; or the holder of ``alias``; or with neither the newest that passed the gate.

        ``alias="champion"`` falls back to the newest version that passed the gate while the
        model has never had a champion (registries from before aliases). Raises ``ModelNotFound``
        when there is none.
        """
        ...

    def set_alias(self, model_name: str, alias: str, version: str, actor: str, reason: str,
                  kind: str = "set") -> ModelVersion:
        """Give ``alias`` to ``version`` (taking it from its holder) and record who/when/why.

        A new champion stops being challenger; the champion it replaces is archived. A version
        given ``challenger`` must not be the champion.
        """
        ...

    def clear_alias(self, model_name: str, alias: str, actor: str, reason: str) -> None:
        """Take ``challenger`` from its holder (no-op without one); the champion cannot be cleared."""
        ...

    def alias_history(self, model_name: str) -> list[AliasEvent]:
        """Every alias change of the model, oldest first."""
        ...

    def update_metadata(self, model_name: str, version: str, changes: dict[str, Any]) -> ModelVersion:
        """Set some metadata keys of a version (gate results, approval); other keys are kept."""
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


def check_alias(alias: str, kind: str = "set") -> None:
    """Refuse an unknown alias or event kind."""
    if alias not in ALIASES:
        raise RegistryError(f"unknown alias {alias!r}: use one of {', '.join(ALIASES)}")
    if kind not in EVENT_KINDS:
        raise RegistryError(f"unknown alias change {kind!r}: use one of {', '.join(EVENT_KINDS)}")


def check_actor(actor: str, reason: str) -> None:
    """Every alias change names who made it and why."""
    for label, value in (("actor", actor), ("reason", reason)):
        if not isinstance(value, str) or not value.strip():
            raise RegistryError(f"an alias change needs a non-empty {label} (who and why), got {value!r}")


def check_move(model_name: str, version: str, alias: str, holder: str, own_alias: str) -> None:
    """Refuse giving ``alias`` to its holder, or to the champion (``own_alias``: what it holds now)."""
    if holder == version:
        raise RegistryError(f"{model_name}:{version} is already the {alias}")
    if own_alias == CHAMPION:
        raise RegistryError(f"{model_name}:{version} is the champion; it cannot become {alias}")


def check_clear(alias: str, actor: str, reason: str) -> None:
    """Only the challenger can be cleared (a champion is only ever replaced)."""
    check_alias(alias, "clear")
    check_actor(actor, reason)
    if alias == CHAMPION:
        raise RegistryError("the champion cannot be cleared, only replaced (promote or rollback)")


def champion_or_fallback(model_name: str, versions: list[ModelVersion], history: list[AliasEvent],
                         where: str) -> ModelVersion:
    """The champion among ``versions``; while the model never had one, the newest that passed the gate."""
    for candidate in versions:
        if candidate.alias == CHAMPION:
            return candidate
    if any(event.alias == CHAMPION for event in history):
        # Cannot happen through this interface (a champion is only ever replaced); say so.
        raise RegistryError(f"model {model_name!r} in {where} had a champion but none is visible")
    return newest_passed_gate(model_name, versions, where)


def previous_champion(history: list[AliasEvent]) -> str:
    """The version a rollback returns to: the champion before the current one ("" if none).

    Replays the champion's changes as a stack: a promotion pushes its version, a rollback pops
    the current one. So rolling back twice after A → B → C returns to B, then A.
    """
    stack: list[str] = []
    for event in sorted(history, key=lambda e: e.sequence):
        if event.alias != CHAMPION:
            continue
        if event.kind == "rollback" and stack:
            stack.pop()
            if not stack or stack[-1] != event.version:
                stack.append(event.version)  # a rollback to a version off the stack: now on top
        else:
            stack.append(event.version)
    return stack[-2] if len(stack) >= 2 else ""
