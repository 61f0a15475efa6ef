"""The Kubeflow Model Registry backend, through the ``model-registry`` client.

A version's metadata becomes the model version's custom properties. The registry accepts only
scalar properties (str, int, float, bool), so:

- ``metrics`` (a non-empty dict of finite numbers) is flattened to ``metric_<name>`` properties,
  which the registry UI shows as columns;
- finite scalars are stored as they are;
- anything else (lists such as ``feature_names``, dicts, ``None``, NaN) is stored as a JSON
  string, and its key is listed in the ``metadata_json_keys`` property so it is decoded on read.

The artifact (URI, ``model_format_name``, ``model_format_version``) is the version's model
artifact, named after the registered model (the client's convention).

Aliases. The Kubeflow registry has none, so a version's ``stage`` custom property holds its
alias (``champion``, ``challenger`` or ""), ``stage_sequence`` the number of the alias change
that set it, ``stage_set_by``/``_at``/``_reason`` who, when and why, and ``alias_events`` (JSON)
the alias changes written onto that version; the union over the versions is the history. A
superseded champion is ``ARCHIVED``. Moving an alias takes two updates, in this order:

1. the new holder gets ``stage=<alias>`` with a ``stage_sequence`` higher than any before (and
   the event, so the history is complete after this one update);
2. every other version claiming the alias gets ``stage=""`` (a champion is also archived).

Recovery rule on read: of the versions claiming an alias, the one with the highest
``stage_sequence`` holds it and the others are read as if step 2 had run (a stale champion
reads as ``ARCHIVED``). An interruption before step 1 leaves the old holder, one after it the
new one: never none and never two. The next alias change repairs the stale claimants. (There is
no compare-and-set: two concurrent promotions may pick the same sequence; the later registered
version then wins on read.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Coroutine, TypeVar
from urllib.parse import urlparse

from fraud_common.logs import get_logger
from fraud_common.registry.base import (
    ALIASES,
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
    RegistryUnavailable,
    check_names,
    newest_passed_gate,
    normalise_metadata,
)
from fraud_common.settings import Settings

if TYPE_CHECKING:
    from model_registry import ModelRegistry as KubeflowClient
    from model_registry.types import ModelVersion as KubeflowVersion

log = get_logger(__name__)
T = TypeVar("T")

METRIC_PREFIX = "metric_"
JSON_KEYS_PROPERTY = "metadata_json_keys"
DEFAULT_PAGE_SIZE = 100
STAGE = "stage"
STAGE_SEQUENCE = "stage_sequence"
STAGE_SET_BY = "stage_set_by"
STAGE_SET_AT = "stage_set_at"
STAGE_REASON = "stage_reason"
ALIAS_EVENTS = "alias_events"
# Custom properties that carry aliases, not training metadata.
ALIAS_PROPERTIES = (STAGE, STAGE_SEQUENCE, STAGE_SET_BY, STAGE_SET_AT, STAGE_REASON, ALIAS_EVENTS)


def _import_client() -> type:
    """Import the client without letting it configure the root logger.

    ``model_registry._client`` calls ``logging.basicConfig`` at import time, which adds a second
    handler (own format) to the root logger when the program has none yet; a temporary handler
    on the root makes that call a no-op.
    """
    root = logging.getLogger()
    placeholder = logging.NullHandler()
    root.addHandler(placeholder)
    try:
        from model_registry import ModelRegistry
    finally:
        root.removeHandler(placeholder)
    return ModelRegistry


def _is_scalar(value: Any) -> bool:
    """Whether the registry can hold ``value`` as a custom property as it is."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, (bool, int, str))


def encode_properties(metadata: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """Version metadata as scalar custom properties (see the module docstring)."""
    metadata = normalise_metadata(metadata)
    properties: dict[str, bool | int | float | str] = {}
    json_keys: list[str] = []
    for key, value in metadata.items():
        if key.startswith(METRIC_PREFIX) or key == JSON_KEYS_PROPERTY or key in ALIAS_PROPERTIES:
            raise RegistryError(
                f"metadata key {key!r} is reserved by the Kubeflow registry mapping "
                f"(prefix {METRIC_PREFIX!r}, {JSON_KEYS_PROPERTY!r}, the alias properties "
                f"{', '.join(ALIAS_PROPERTIES)}); put metrics under 'metrics'"
            )
        metrics_flat = (
            key == "metrics"
            and isinstance(value, dict)
            and value
            and all(_is_scalar(v) for v in value.values())
        )
        if metrics_flat:
            for name, number in value.items():
                properties[f"{METRIC_PREFIX}{name}"] = number
        elif _is_scalar(value):
            properties[key] = value
        else:
            properties[key] = json.dumps(value, sort_keys=True)
            json_keys.append(key)
    if json_keys:
        properties[JSON_KEYS_PROPERTY] = json.dumps(sorted(json_keys))
    return properties


def decode_properties(properties: dict[str, Any] | None) -> dict[str, Any]:
    """The metadata that ``encode_properties`` turned into ``properties``."""
    properties = {k: v for k, v in (properties or {}).items() if k not in ALIAS_PROPERTIES}
    json_keys = json.loads(str(properties.pop(JSON_KEYS_PROPERTY, "[]")))
    metadata: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    for key, value in properties.items():
        if key.startswith(METRIC_PREFIX):
            metrics[key[len(METRIC_PREFIX) :]] = value
        elif key in json_keys:
            metadata[key] = json.loads(value)
        else:
            metadata[key] = value
    if metrics:
        metadata["metrics"] = metrics
    return metadata


def connection_args(settings: Settings) -> tuple[str, int, bool]:
    """(server address, port, is_secure) for the client; the scheme decides TLS."""
    address = settings.registry_uri.rstrip("/")
    scheme = urlparse(address).scheme
    if scheme not in ("http", "https"):
        raise RegistryError(
            f"FRAUD_REGISTRY_URI={settings.registry_uri!r}: the Kubeflow registry address must start with "
            "http:// or https:// (e.g. http://model-registry-service.kubeflow.svc.cluster.local)"
        )
    return address, settings.registry_port, scheme == "https"


def _describe(exc: BaseException) -> str:
    """One line about a client error (an HTTP error's string holds all response headers)."""
    status = getattr(exc, "status", None)
    if status is None:
        return f"{type(exc).__name__}: {exc}"
    message = getattr(getattr(exc, "data", None), "message", None) or getattr(exc, "body", None) or ""
    return f"HTTP {status} {getattr(exc, 'reason', '') or ''}: {message}".rstrip(": ")


def _iso_from_epoch_ms(value: str | None) -> str:
    """The registry's milliseconds-since-epoch string as ISO-8601 UTC ('' if absent)."""
    if not value:
        return ""
    return datetime.fromtimestamp(int(value) / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


def _order_key(version: "KubeflowVersion") -> tuple[int, int, str]:
    """Registration order: creation time, then the numeric id (ties within one millisecond)."""
    created = int(version.create_time_since_epoch or 0)
    ident = version.id or ""
    return created, int(ident) if ident.isdigit() else 0, ident


def _props(record: "KubeflowVersion") -> dict[str, Any]:
    return dict(record.custom_properties or {})


def _events(model_name: str, record: "KubeflowVersion") -> list[AliasEvent]:
    """The alias events written onto one version."""
    raw = _props(record).get(ALIAS_EVENTS)
    return [AliasEvent.from_dict(model_name, item) for item in json.loads(raw)] if raw else []


def _claim_key(record: "KubeflowVersion") -> tuple[int, tuple[int, int, str]]:
    return int(_props(record).get(STAGE_SEQUENCE) or 0), _order_key(record)


def resolve_aliases(records: list["KubeflowVersion"]) -> dict[str, str]:
    """Version name -> alias by the recovery rule: per alias, the claimant with the highest sequence."""
    held: dict[str, str] = {}
    for alias in ALIASES:
        claimants = [r for r in records if _props(r).get(STAGE) == alias]
        if claimants:
            held[max(claimants, key=_claim_key).name] = alias
    return held


def _stale(records: list["KubeflowVersion"], alias: str, keep: str) -> list["KubeflowVersion"]:
    """Versions other than ``keep`` whose ``stage`` still claims ``alias``."""
    return [r for r in records if _props(r).get(STAGE) == alias and r.name != keep]


class KubeflowModelRegistry:
    """A ``ModelRegistry`` backed by a Kubeflow Model Registry server."""

    def __init__(self, client: "KubeflowClient", address: str, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        """Wrap a connected client; ``address`` only names the server in messages."""
        self._client = client
        self.address = address
        self._page_size = page_size

    def __repr__(self) -> str:
        return f"KubeflowModelRegistry({self.address!r})"

    @classmethod
    def from_settings(cls, settings: Settings, page_size: int = DEFAULT_PAGE_SIZE) -> "KubeflowModelRegistry":
        """Connect to ``settings.registry_uri``:``registry_port`` as ``registry_author``."""
        address, port, secure = connection_args(settings)
        return cls.connect(address, port, settings.registry_author, settings.registry_token, secure, page_size)

    @classmethod
    def connect(
        cls,
        address: str,
        port: int,
        author: str,
        token: str = "",
        is_secure: bool = True,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> "KubeflowModelRegistry":
        """Open a client (it checks the server by listing one registered model).

        Without ``token`` the client falls back to the pod's service-account token, if any.
        """
        client_class = _import_client()
        where = f"{address}:{port}"
        try:
            with warnings.catch_warnings():
                # Expected on plain-HTTP registries without auth; the server says so if it minds.
                warnings.filterwarnings("ignore", message="User access token is missing")
                client = client_class(
                    address,
                    port,
                    author=author,
                    is_secure=is_secure,
                    user_token=token or None,
                    # The client warns about port/scheme combinations that are fine in clusters.
                    log_level=logging.ERROR,
                    async_runner=_run_coroutine,
                )
        except Exception as exc:  # the client raises StoreError, ApiException or aiohttp errors
            raise RegistryUnavailable(
                f"cannot connect to the Kubeflow model registry at {where}: {_describe(exc)}"
            ) from exc
        log.debug("connected to the Kubeflow model registry at %s", where)
        return cls(client, where, page_size)

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one client call, turning its errors into ``RegistryError`` naming ``what``."""
        try:
            return fn(*args, **kwargs)
        except RegistryError:
            raise
        except Exception as exc:
            raise RegistryError(f"Kubeflow model registry at {self.address}: {what} failed: {_describe(exc)}") from exc

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
        """Record a new version with its artifact; refuses a version name the model already has."""
        check_names(model_name, version, artifact_uri)
        properties = encode_properties(metadata)
        if self._find_version(model_name, version) is not None:
            raise RegistryError(
                f"model {model_name!r} already has a version {version!r} in the Kubeflow model registry at "
                f"{self.address}; version names are unique, pick a new one"
            )
        self._call(
            f"registering {model_name}:{version}",
            self._client.register_model,
            model_name,
            artifact_uri,
            version=version,
            model_format_name=model_format,
            model_format_version=format_version,
            version_description=description or None,
            metadata=properties,
        )
        log.info("registered %s version %s -> %s in %s", model_name, version, artifact_uri, self.address)
        return self.get_version(model_name, version)

    def _find_version(self, model_name: str, version: str) -> "KubeflowVersion | None":
        """The client's version record, or None if the model or the version is unknown."""
        from model_registry.exceptions import StoreError

        try:
            # The client raises StoreError only when the registered model does not exist.
            return self._client.get_model_version(model_name, version)
        except StoreError:
            return None
        except Exception as exc:
            raise RegistryError(
                f"Kubeflow model registry at {self.address}: looking up {model_name}:{version} failed: {_describe(exc)}"
            ) from exc

    def _versions(self, model_name: str) -> list["KubeflowVersion"]:
        """The client's version records of ``model_name``, oldest first (empty if unknown)."""
        from model_registry.exceptions import StoreError

        def fetch() -> list["KubeflowVersion"]:
            try:
                pager = self._client.get_model_versions(model_name)
            except StoreError:  # raised only when the registered model does not exist
                return []
            return list(pager.order_by_creation_time().page_size(self._page_size))

        return sorted(self._call(f"listing versions of {model_name!r}", fetch), key=_order_key)

    def _with_artifact(self, model_name: str, record: "KubeflowVersion", alias: str = "") -> ModelVersion:
        """Our ``ModelVersion`` for a client version record, with its model artifact.

        ``alias`` is the one the recovery rule gave it; a champion claimant that lost by that
        rule reads as archived, as if the interrupted swap had finished.
        """
        artifact = self._call(
            f"reading the artifact of {model_name}:{record.name}",
            self._client.get_model_artifact,
            model_name,
            record.name,
        )
        if artifact is None or not artifact.uri:
            raise RegistryError(
                f"version {record.name!r} of model {model_name!r} in {self.address} has no model artifact "
                "(registration interrupted?)"
            )
        state = getattr(record.state, "value", record.state) or LIVE
        if _props(record).get(STAGE) == CHAMPION and alias != CHAMPION:
            state = ARCHIVED
        return ModelVersion(
            model_name=model_name,
            version=record.name,
            artifact_uri=artifact.uri,
            model_format=artifact.model_format_name or "",
            format_version=artifact.model_format_version or "",
            metadata=decode_properties(record.custom_properties),
            created_at=_iso_from_epoch_ms(record.create_time_since_epoch),
            registered_model_id=record.registered_model_id or "",
            version_id=record.id or "",
            alias=alias,
            state=str(state),
        )

    def list_versions(self, model_name: str) -> list[ModelVersion]:
        """All versions of a model, oldest first (empty if the model is unknown)."""
        records = self._versions(model_name)
        aliases = resolve_aliases(records)
        return [self._with_artifact(model_name, r, aliases.get(r.name, "")) for r in records]

    def get_version(self, model_name: str, version: str | None = None, alias: str | None = None) -> ModelVersion:
        """A named version; or the holder of ``alias``; or with neither the newest that passed the gate."""
        where = f"the Kubeflow model registry at {self.address}"
        if version is not None:
            record = self._find_version(model_name, version)
            if record is None:
                raise ModelNotFound(f"model {model_name!r} has no version {version!r} in {where}")
            if not _props(record).get(STAGE):
                return self._with_artifact(model_name, record)
            # It claims an alias: whether it holds it depends on the other versions.
            return self._with_artifact(model_name, record, resolve_aliases(self._versions(model_name)).get(version, ""))
        records = {record.name: record for record in self._versions(model_name)}
        aliases = resolve_aliases(list(records.values()))
        # Choose on metadata alone, then fetch only the chosen version's artifact.
        candidates = [
            ModelVersion(model_name, name, "", metadata=decode_properties(record.custom_properties),
                         alias=aliases.get(name, ""))
            for name, record in records.items()
        ]
        if alias is None:
            chosen = newest_passed_gate(model_name, candidates, where)
        elif alias == CHAMPION:
            history = [event for record in records.values() for event in _events(model_name, record)]
            chosen = champion_or_fallback(model_name, candidates, history, where)
        else:
            check_alias(alias)
            found = [c for c in candidates if c.alias == alias]
            if not found:
                raise ModelNotFound(f"model {model_name!r} has no {alias} in {where}")
            chosen = found[0]
        return self._with_artifact(model_name, records[chosen.version], aliases.get(chosen.version, ""))

    def _update(self, what: str, record: "KubeflowVersion", properties: dict[str, Any], state: str | None = None) -> None:
        """One PATCH of a version: its custom properties (all of them, as the client sends) and state."""
        from model_registry.types import ModelVersionState

        changes: dict[str, Any] = {"custom_properties": properties}
        if state is not None:
            changes["state"] = ModelVersionState(state)
        self._call(what, self._client.update, record.model_copy(update=changes))

    def alias_history(self, model_name: str) -> list[AliasEvent]:
        """Every alias change of the model, oldest first (the union of the versions' events)."""
        events = [event for record in self._versions(model_name) for event in _events(model_name, record)]
        return sorted(events, key=lambda e: e.sequence)

    def _change(self, model_name: str, alias: str, target: "KubeflowVersion | None", previous: str,
                kind: str, actor: str, reason: str, records: list["KubeflowVersion"]) -> None:
        """Step 1 (the target claims ``alias``, or for a clear the holder drops it) then step 2."""
        sequence = 1 + max(
            [e.sequence for r in records for e in _events(model_name, r)]
            + [int(_props(r).get(STAGE_SEQUENCE) or 0) for r in records],
            default=0,
        )
        at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        event = AliasEvent(model_name, alias, target.name if target else "", previous, kind, actor, reason, at, sequence)
        carrier = target if target is not None else next(r for r in records if r.name == previous)
        properties = {
            **_props(carrier),
            STAGE: alias if target is not None else "",
            STAGE_SEQUENCE: sequence,
            STAGE_SET_BY: actor,
            STAGE_SET_AT: at,
            STAGE_REASON: reason,
            ALIAS_EVENTS: json.dumps([e.to_dict() for e in _events(model_name, carrier)] + [event.to_dict()]),
        }
        self._update(f"setting the {alias} of {model_name} to {event.version or '(none)'}", carrier, properties,
                     LIVE if target is not None else None)
        for stale in _stale(records, alias, keep=target.name if target else ""):
            if stale.name == carrier.name:
                continue
            self._update(
                f"taking the {alias} from {model_name}:{stale.name}",
                stale,
                {**_props(stale), STAGE: ""},
                ARCHIVED if alias == CHAMPION else None,
            )

    def set_alias(self, model_name: str, alias: str, version: str, actor: str, reason: str,
                  kind: str = "set") -> ModelVersion:
        """Give ``alias`` to ``version`` in two updates, safe to interrupt (module docstring)."""
        check_alias(alias, kind)
        check_actor(actor, reason)
        records = self._versions(model_name)
        target = next((r for r in records if r.name == version), None)
        if target is None:
            raise ModelNotFound(
                f"model {model_name!r} has no version {version!r} in the Kubeflow model registry at {self.address}"
            )
        aliases = resolve_aliases(records)
        holder = next((name for name, held in aliases.items() if held == alias), "")
        check_move(model_name, version, alias, holder, aliases.get(version, ""))
        self._change(model_name, alias, target, holder, kind, actor, reason, records)
        log.info("%s of %s is now %s (%s, by %s: %s)", alias, model_name, version, kind, actor, reason)
        return self.get_version(model_name, version)

    def clear_alias(self, model_name: str, alias: str, actor: str, reason: str) -> None:
        """Take ``challenger`` from its holder, recording who and why (no-op without one)."""
        check_clear(alias, actor, reason)
        records = self._versions(model_name)
        holder = next((name for name, held in resolve_aliases(records).items() if held == alias), "")
        if holder:
            self._change(model_name, alias, None, holder, "clear", actor, reason, records)
            log.info("%s of %s cleared (was %s; by %s: %s)", alias, model_name, holder, actor, reason)

    def update_metadata(self, model_name: str, version: str, changes: dict[str, Any]) -> ModelVersion:
        """Set some metadata keys of a version (one update); other keys and the alias are kept."""
        record = self._find_version(model_name, version)
        if record is None:
            raise ModelNotFound(
                f"model {model_name!r} has no version {version!r} in the Kubeflow model registry at {self.address}"
            )
        merged = {**decode_properties(record.custom_properties), **normalise_metadata(changes)}
        kept = {k: v for k, v in _props(record).items() if k in ALIAS_PROPERTIES}
        self._update(f"updating the metadata of {model_name}:{version}", record, {**encode_properties(merged), **kept})
        return self.get_version(model_name, version)


_runner: ThreadPoolExecutor | None = None
_runner_lock = threading.Lock()


def _run_coroutine(coro: Coroutine[Any, Any, T]) -> T:
    """Run one client coroutine on a private thread with its own event loop.

    Without a runner the client patches asyncio globally (``nest_asyncio``) and runs on the
    caller's loop, which breaks callers that already run an event loop (an async web server).
    """
    global _runner
    with _runner_lock:
        if _runner is None:
            _runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kubeflow-registry")
    return _runner.submit(asyncio.run, coro).result()
