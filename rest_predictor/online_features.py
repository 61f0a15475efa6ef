"""Read a user's model features from the Feast online store, one read per request.

Two readers return the same ``[n, 13]`` matrix (``tests/test_predictor.py`` checks they agree):

* ``OnlineFeatureReader``, Feast's public API: the feature service is resolved once at load, each
  request makes one ``FeatureStore.get_online_features`` call.
* ``ProviderOnlineRead``, an adapter over Feast's private provider API (``online_read`` on the one
  feature view): about a third of the public path's CPU per request (``bench/bench_serve.py``
  records both, same run), but an API Feast may change in any release. It is checked against one
  Feast version (``CHECKED_FEAST_VERSION``, pinned by a test).

``feature_read="auto"`` (the default) takes the adapter when the installed Feast is the checked
version and the public path otherwise; ``"public"`` and ``"provider"`` force one.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Sequence

import numpy as np
from feast import FeatureStore, RepoConfig
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

from fraud_common import feature_store
from fraud_common.feature_store import ENTITY_NAME, FEATURE_SERVICE, store_config
from fraud_common.logs import get_logger
from fraud_common.settings import Settings
from rest_predictor.errors import FeatureDataError, PredictorLoadError

log = get_logger(__name__)


def fetch_snapshot(settings: Settings) -> None:
    """Copy the published store snapshot ``settings.feast_snapshot_uri`` (if any) into ``feast_dir``."""
    if not settings.feast_snapshot_uri:
        return
    try:
        feature_store.fetch_snapshot(settings.feast_snapshot_uri, settings)
    except feature_store.SnapshotError as err:
        raise PredictorLoadError(str(err)) from err


FEATURE_READS = ("auto", "public", "provider")


class OnlineFeatureReader:
    """Reads the feature service's features for a list of users through ``get_online_features``."""

    def __init__(self, store: FeatureStore, feature_names: Sequence[str]) -> None:
        self.store = store
        self.feature_names = list(feature_names)
        self.service = store.get_feature_service(FEATURE_SERVICE)  # a registry lookup: once, not per call
        if len(self.service.feature_view_projections) != 1:
            names = [p.name for p in self.service.feature_view_projections]
            raise PredictorLoadError(f"feature service {FEATURE_SERVICE!r} spans {names}; expected one feature view")
        projection = self.service.feature_view_projections[0]
        served = [f.name for f in projection.features]
        if sorted(served) != sorted(self.feature_names):
            raise PredictorLoadError(
                f"feature service {FEATURE_SERVICE!r} serves {served}; the model takes {self.feature_names}"
            )
        self.view_name = projection.name
        self.join_key = store.get_entity(ENTITY_NAME).join_key

    @classmethod
    def open(cls, settings: Settings, feature_names: Sequence[str], feature_read: str = "auto") -> "OnlineFeatureReader":
        """The reader for ``feature_read`` (see the module docstring) over the store of
        ``store_config(settings)``, after fetching any published snapshot."""
        reader_class = reader_for(feature_read)
        fetch_snapshot(settings)
        registry_file = Path(store_config(settings)["registry"])
        if not registry_file.is_file():
            raise PredictorLoadError(f"no Feast registry at {registry_file}: apply and materialize the feature repo first")
        try:
            store = FeatureStore(config=RepoConfig(**store_config(settings)))
            return reader_class(store, feature_names)
        except PredictorLoadError:
            raise
        except Exception as err:  # Feast raises many types for a missing or broken repo
            raise PredictorLoadError(f"cannot open the Feast store at {settings.feast_dir}: {err}") from err

    def read(self, user_ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """Features ``[n, 13]`` float32 in model order, and the users the store does not know.

        Rows of unknown users are left at zero; callers reject the request if any are unknown.
        """
        response = self.store.get_online_features(
            features=self.service, entity_rows=[{self.join_key: u} for u in user_ids]
        ).to_dict()
        columns = [response[name] for name in self.feature_names]
        matrix = np.zeros((len(user_ids), len(self.feature_names)), dtype=np.float32)
        missing: list[str] = []
        for i, user_id in enumerate(user_ids):
            values = [column[i] for column in columns]
            if all(v is None for v in values):
                missing.append(user_id)
                continue
            matrix[i] = [_number(v, name, user_id) for v, name in zip(values, self.feature_names)]
        return matrix, missing

    def probe(self) -> None:
        """One read for a made-up user: raises if the online store cannot be queried."""
        try:
            self.read(["__readiness_probe__"])
        except Exception as err:
            raise PredictorLoadError(f"the Feast online store cannot be read ({self.store.config.online_store}): {err}") from err


class ProviderOnlineRead(OnlineFeatureReader):
    """The same read through Feast's private provider API: ``store._get_provider().online_read``.

    ``get_online_features`` re-plans each call (feature resolution, response protos, ``to_dict``);
    this adapter reads the one feature view directly, with entity keys built as Feast protos and
    serialized by the store itself. Checked against ``CHECKED_FEAST_VERSION`` only:
    ``tests/test_predictor.py`` fails on any other Feast version until it is checked again.
    """

    CHECKED_FEAST_VERSION = "0.67.0"

    def __init__(self, store: FeatureStore, feature_names: Sequence[str]) -> None:
        super().__init__(store, feature_names)
        self.view = store.get_feature_view(self.view_name)
        self._provider = store._get_provider()  # private: no public handle on the online store exists
        self._config = store.config

    def read(self, user_ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """As ``OnlineFeatureReader.read``."""
        keys = [EntityKeyProto(join_keys=[self.join_key], entity_values=[ValueProto(string_val=u)]) for u in user_ids]
        rows = self._provider.online_read(config=self._config, table=self.view, entity_keys=keys)
        matrix = np.zeros((len(user_ids), len(self.feature_names)), dtype=np.float32)
        missing: list[str] = []
        for i, (_, values) in enumerate(rows):
            if values is None:
                missing.append(user_ids[i])
                continue
            matrix[i] = [_proto_number(values, name, user_ids[i]) for name in self.feature_names]
        return matrix, missing


def reader_for(feature_read: str) -> type[OnlineFeatureReader]:
    """The reader class for ``auto``, ``public`` or ``provider``."""
    if feature_read not in FEATURE_READS:
        raise PredictorLoadError(f"feature read {feature_read!r} is not one of {FEATURE_READS}")
    installed = importlib.metadata.version("feast")
    checked = installed == ProviderOnlineRead.CHECKED_FEAST_VERSION
    if feature_read == "public" or (feature_read == "auto" and not checked):
        if feature_read == "auto":
            log.warning(
                "Feast %s is not the version the provider read was checked against (%s): using get_online_features",
                installed, ProviderOnlineRead.CHECKED_FEAST_VERSION,
            )
        return OnlineFeatureReader
    if not checked:
        log.warning("provider read forced on Feast %s, checked only on %s", installed, ProviderOnlineRead.CHECKED_FEAST_VERSION)
    return ProviderOnlineRead


def _number(value: object, name: str, user_id: str) -> float:
    """One feature value from ``get_online_features`` as a float (booleans as 0/1)."""
    if value is None:
        raise FeatureDataError(f"feature {name!r} of user {user_id!r} is null in the online store")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise FeatureDataError(f"feature {name!r} of user {user_id!r} is not numeric ({type(value).__name__})") from None


def _proto_number(values: dict[str, ValueProto], name: str, user_id: str) -> float:
    """One feature value from ``online_read`` as a float (booleans as 0/1); null or non-numeric is a data error."""
    value = values.get(name)
    kind = value.WhichOneof("val") if value is not None else None
    if kind is None:
        raise FeatureDataError(f"feature {name!r} of user {user_id!r} is null in the online store")
    try:
        return float(getattr(value, kind))
    except (TypeError, ValueError):
        raise FeatureDataError(f"feature {name!r} of user {user_id!r} is not numeric ({kind})") from None
