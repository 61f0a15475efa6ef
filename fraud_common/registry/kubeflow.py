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
    ModelNotFound,
    ModelVersion,
    RegistryError,
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
        if key.startswith(METRIC_PREFIX) or key == JSON_KEYS_PROPERTY:
            raise RegistryError(
                f"metadata key {key!r} is reserved by the Kubeflow registry mapping "
                f"(prefix {METRIC_PREFIX!r}, {JSON_KEYS_PROPERTY!r}); put metrics under 'metrics'"
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
    properties = dict(properties or {})
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

    def _with_artifact(self, model_name: str, record: "KubeflowVersion") -> ModelVersion:
        """Our ``ModelVersion`` for a client version record, with its model artifact."""
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
        return ModelVersion(
            model_name=model_name,
            version=record.name,
            artifact_uri=artifact.uri,
            model_format=artifact.model_format_name or "",
            format_version=artifact.model_format_version or "",
            metadata=decode_properties(record.custom_properties),
            created_at=_iso_from_epoch_ms(record.create_time_since_epoch),
        )

    def list_versions(self, model_name: str) -> list[ModelVersion]:
        """All versions of a model, oldest first (empty if the model is unknown)."""
        return [self._with_artifact(model_name, record) for record in self._versions(model_name)]

    def get_version(self, model_name: str, version: str | None = None) -> ModelVersion:
        """A named version, or with ``version=None`` the newest that passed the gate."""
        if version is not None:
            record = self._find_version(model_name, version)
            if record is None:
                raise ModelNotFound(
                    f"model {model_name!r} has no version {version!r} in the Kubeflow model registry at {self.address}"
                )
            return self._with_artifact(model_name, record)
        records = {record.name: record for record in self._versions(model_name)}
        # Choose on metadata alone, then fetch only the chosen version's artifact.
        candidates = [
            ModelVersion(model_name, name, "", metadata=decode_properties(record.custom_properties))
            for name, record in records.items()
        ]
        chosen = newest_passed_gate(model_name, candidates, f"the Kubeflow model registry at {self.address}")
        return self._with_artifact(model_name, records[chosen.version])


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
