"""Model registry backends: local SQLite, and Kubeflow through the real client against a stand-in.

The stand-in is a small HTTP server on a loopback port implementing the REST endpoints the
``model-registry`` client calls for register / list / get, with an in-memory store. It checks
every request body against the client's own OpenAPI types (``mr_openapi`` models, unknown fields
refused) and answers 400 on a mismatch, so a body the real server would not accept fails here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest
from conftest import REPO_ROOT, free_port
from mr_openapi import models as mr

from fraud_common.registry import (
    ModelNotFound,
    ModelVersion,
    RegistryError,
    open_registry,
)
from fraud_common.registry.kubeflow import (
    KubeflowModelRegistry,
    connection_args,
    decode_properties,
    encode_properties,
)
from fraud_common.registry.local import LocalModelRegistry
from fraud_common.settings import Settings

API = "/api/model_registry/v1"
TOKEN = "test-token"
MODEL = "fraud-detection"
FEATURES = ["distance_from_last_transaction", "ratio_to_median_purchase_price", "used_pin_number"]
METADATA_TYPES = {
    cls.__name__: cls
    for cls in (
        mr.MetadataBoolValue,
        mr.MetadataDoubleValue,
        mr.MetadataIntValue,
        mr.MetadataStringValue,
        mr.MetadataStructValue,
        mr.MetadataProtoValue,
    )
}


# --- The stand-in Kubeflow Model Registry server ---------------------------------------------


class BadRequest(ValueError):
    """A request body or parameter the real server would refuse."""


def strict_parse(model_class: type, payload: Any) -> Any:
    """``payload`` as ``model_class`` (an ``mr_openapi`` model), refusing unknown fields."""
    if not isinstance(payload, dict):
        raise BadRequest(f"{model_class.__name__}: body must be a JSON object, got {type(payload).__name__}")
    allowed = {field.alias or name for name, field in model_class.model_fields.items()}
    unknown = set(payload) - allowed
    if unknown:
        raise BadRequest(f"{model_class.__name__}: unknown fields {sorted(unknown)}")
    for key, value in (payload.get("customProperties") or {}).items():
        kind = METADATA_TYPES.get(value.get("metadataType") if isinstance(value, dict) else None)
        if kind is None:
            raise BadRequest(f"customProperties[{key!r}]: unknown metadataType in {value!r}")
        strict_parse(kind, value)
    try:
        return model_class.from_dict(payload)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        raise BadRequest(f"{model_class.__name__}: {exc}") from None


def as_response(model_class: type, payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` after checking the client can read it as ``model_class``.

    (The models' ``to_dict`` drops read-only fields such as the timestamps, so the checked
    payload itself is sent.)
    """
    model_class.from_dict(payload)
    return payload


class StandInRegistry:
    """In-memory store and request log of the stand-in server."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.calls: list[dict[str, Any]] = []
        self.models: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.artifacts: dict[str, dict[str, Any]] = {}  # by model version id
        self._ids = itertools.count(1)
        self._last_ms = 0
        self.lock = threading.Lock()
        # Answer 503 to every PATCH after this many more (None: never): an interrupted writer.
        self.patches_left: int | None = None

    def stamp(self) -> dict[str, str]:
        """A new id and strictly increasing creation time (milliseconds, as the server sends)."""
        self._last_ms = max(self._last_ms + 1, int(time.time() * 1000))
        ms = str(self._last_ms)
        return {"id": str(next(self._ids)), "createTimeSinceEpoch": ms, "lastUpdateTimeSinceEpoch": ms}

    def paths(self) -> list[tuple[str, str]]:
        return [(call["method"], call["path"]) for call in self.calls]

    def handle(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, Any]:
        """(status, JSON body) for one request."""
        route = path[len(API) :] if path.startswith(API) else path
        if method == "GET" and route == "/registered_models":
            return 200, self.page(mr.RegisteredModelList, list(self.models.values()), query)
        if method == "GET" and route == "/registered_model":
            found = [m for m in self.models.values() if m["name"] == query.get("name")]
            return (200, found[0]) if found else (404, self.error(404, f"registered model {query.get('name')!r}"))
        if method == "POST" and route == "/registered_models":
            create = strict_parse(mr.RegisteredModelCreate, body)
            if any(m["name"] == create.name for m in self.models.values()):
                return 409, self.error(409, f"registered model {create.name!r} exists")
            record = as_response(mr.RegisteredModel, {**create.to_dict(), **self.stamp()})
            self.models[record["id"]] = record
            return 201, record
        if method == "GET" and route == "/model_version":
            parent, name = query.get("parentResourceId"), query.get("name")
            found = [v for v in self.versions.values() if v["registeredModelId"] == parent and v["name"] == name]
            return (200, found[0]) if found else (404, self.error(404, f"model version {name!r}"))
        if method == "POST" and route == "/model_versions":
            create = strict_parse(mr.ModelVersionCreate, body)
            if create.registered_model_id not in self.models:
                return 404, self.error(404, f"registered model id {create.registered_model_id!r}")
            if any(
                v["registeredModelId"] == create.registered_model_id and v["name"] == create.name
                for v in self.versions.values()
            ):
                return 409, self.error(409, f"model version {create.name!r} exists")
            record = as_response(mr.ModelVersion, {**create.to_dict(), **self.stamp()})
            self.versions[record["id"]] = record
            return 201, record
        if method == "GET" and (match := re.fullmatch(r"/registered_models/([^/]+)/versions", route)):
            if match[1] not in self.models:
                return 404, self.error(404, f"registered model id {match[1]!r}")
            mine = [v for v in self.versions.values() if v["registeredModelId"] == match[1]]
            return 200, self.page(mr.ModelVersionList, mine, query)
        if method == "POST" and (match := re.fullmatch(r"/model_versions/([^/]+)/artifacts", route)):
            if not isinstance(body, dict) or body.get("artifactType") != "model-artifact":
                raise BadRequest(f"only model-artifact bodies are expected here, got {body!r}")
            create = strict_parse(mr.ModelArtifactCreate, body)
            if match[1] not in self.versions:
                return 404, self.error(404, f"model version id {match[1]!r}")
            record = as_response(mr.ModelArtifact, {**create.to_dict(), **self.stamp()})
            self.artifacts[match[1]] = record
            return 201, record
        if method == "PATCH" and (match := re.fullmatch(r"/model_versions/([^/]+)", route)):
            update = strict_parse(mr.ModelVersionUpdate, body)
            if match[1] not in self.versions:
                return 404, self.error(404, f"model version id {match[1]!r}")
            if self.patches_left is not None:
                if self.patches_left <= 0:
                    return 503, self.error(503, "stand-in: writer interrupted")
                self.patches_left -= 1
            # The sent fields replace the stored ones (customProperties as a whole map).
            changed = {**self.versions[match[1]], **update.to_dict(), "lastUpdateTimeSinceEpoch": self.stamp()["lastUpdateTimeSinceEpoch"]}
            self.versions[match[1]] = as_response(mr.ModelVersion, changed)
            return 200, self.versions[match[1]]
        if method == "GET" and route == "/model_artifact":
            found = self.artifacts.get(query.get("parentResourceId", ""))
            if found is None or found.get("name") != query.get("name"):
                return 404, self.error(404, f"model artifact {query.get('name')!r}")
            return 200, found
        return 404, self.error(404, f"the stand-in does not implement {method} {path}")

    @staticmethod
    def error(status: int, message: str) -> dict[str, str]:
        return mr.Error(code=str(status), message=message).to_dict()

    @staticmethod
    def page(list_class: type, items: list[dict[str, Any]], query: dict[str, str]) -> dict[str, Any]:
        """One page as the server pages: an offset token, '' after the last page."""
        allowed = {"pageSize", "orderBy", "sortOrder", "nextPageToken"}
        if set(query) - allowed:
            raise BadRequest(f"unknown query parameters {sorted(set(query) - allowed)}")
        order = mr.OrderByField(query.get("orderBy", "ID"))
        field = {"ID": "id", "CREATE_TIME": "createTimeSinceEpoch", "LAST_UPDATE_TIME": "lastUpdateTimeSinceEpoch"}
        items = sorted(items, key=lambda item: (int(item[field[order.value]]), int(item["id"])))
        if mr.SortOrder(query.get("sortOrder", "ASC")) == mr.SortOrder.DESC:
            items.reverse()
        size = int(query.get("pageSize", "100"))
        start = int(query.get("nextPageToken") or 0)
        chunk = items[start : start + size]
        token = str(start + size) if start + size < len(items) else ""
        body = {"items": chunk, "nextPageToken": token, "pageSize": size, "size": len(chunk)}
        return as_response(list_class, body)


class _Handler(BaseHTTPRequestHandler):
    store: StandInRegistry  # set on the per-server subclass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
        pass

    def _serve(self) -> None:
        url = urlparse(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query, keep_blank_values=True).items()}
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        call = {"method": self.command, "path": url.path[len(API) :], "query": query, "body": None}
        with self.store.lock:
            self.store.calls.append(call)
            try:
                if self.store.token and self.headers.get("Authorization") != f"Bearer {self.store.token}":
                    status, payload = 401, self.store.error(401, "missing or wrong bearer token")
                else:
                    if raw:
                        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
                            raise BadRequest(f"Content-Type {self.headers.get('Content-Type')!r}")
                        call["body"] = json.loads(raw)
                    status, payload = self.store.handle(self.command, url.path, query, call["body"])
            except (BadRequest, json.JSONDecodeError) as exc:
                status, payload = 400, self.store.error(400, str(exc))
        call["status"] = status
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = _serve


@pytest.fixture
def stand_in() -> Iterator[tuple[StandInRegistry, int]]:
    """A stand-in Kubeflow Model Registry on a loopback port: (store, port)."""
    store = StandInRegistry(TOKEN)
    handler = type("Handler", (_Handler,), {"store": store})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield store, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def kubeflow_settings(tmp_path: Path, port: int) -> Settings:
    return Settings.from_env(
        {
            "FRAUD_HOME": str(tmp_path / "home"),
            "FRAUD_REGISTRY_BACKEND": "kubeflow",
            "FRAUD_REGISTRY_URI": "http://127.0.0.1",
            "FRAUD_REGISTRY_PORT": str(port),
            "FRAUD_REGISTRY_TOKEN": TOKEN,
        }
    )


@pytest.fixture(params=["local", "kubeflow"])
def registry(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Each backend in turn; the Kubeflow one pages by 2 so paging is exercised."""
    if request.param == "local":
        return LocalModelRegistry(tmp_path / "state" / "registry.db")
    _store, port = request.getfixturevalue("stand_in")
    return KubeflowModelRegistry.from_settings(kubeflow_settings(tmp_path, port), page_size=2)


def metadata(passed_gate: bool = True, roc_auc: float = 0.97, run_id: str = "run-1") -> dict[str, Any]:
    return {
        "metrics": {"roc_auc": roc_auc, "pr_auc": 0.81, "precision": 0.9, "recall": 0.7, "f1": 0.79, "n_test": 1200},
        "threshold": 0.42,
        "feature_names": FEATURES,
        "data_fingerprint": "sha256:abc123",
        "run_id": run_id,
        "code_version": "0.1.0+g1234567",
        "passed_gate": passed_gate,
    }


# --- Both backends ----------------------------------------------------------------------------


def test_round_trip_keeps_every_field(registry: Any) -> None:
    first = registry.register(MODEL, "v1", "s3://models/v1/model.onnx", metadata(), description="first")
    second = registry.register(MODEL, "v2", "/models/v2/model.onnx", metadata(passed_gate=False, run_id="run-2"))
    assert first == registry.get_version(MODEL, "v1")
    assert registry.list_versions(MODEL) == [first, second]
    assert (first.model_name, first.version, first.artifact_uri) == (MODEL, "v1", "s3://models/v1/model.onnx")
    assert (first.model_format, first.format_version) == ("onnx", "1")
    assert first.metadata == metadata()
    assert isinstance(first.metadata["metrics"]["n_test"], int) and first.passed_gate is True
    assert first.feature_names == FEATURES and first.threshold == 0.42
    assert second.metadata["run_id"] == "run-2" and not second.passed_gate
    assert datetime.fromisoformat(first.created_at).utcoffset() is not None
    assert first.created_at <= second.created_at


def test_default_version_is_newest_that_passed_the_gate(registry: Any) -> None:
    registry.register(MODEL, "v1", "/m/1.onnx", metadata(run_id="r1"))
    registry.register(MODEL, "v2", "/m/2.onnx", metadata(run_id="r2"))
    registry.register(MODEL, "v3", "/m/3.onnx", metadata(passed_gate=False, run_id="r3"))
    chosen = registry.get_version(MODEL)
    assert (chosen.version, chosen.artifact_uri, chosen.metadata["run_id"]) == ("v2", "/m/2.onnx", "r2")
    assert [v.version for v in registry.list_versions(MODEL)] == ["v1", "v2", "v3"]


def test_duplicate_version_is_refused_naming_it(registry: Any) -> None:
    registry.register(MODEL, "v1", "/m/1.onnx", metadata())
    with pytest.raises(RegistryError, match="'v1'"):
        registry.register(MODEL, "v1", "/m/other.onnx", metadata(run_id="again"))
    [only] = registry.list_versions(MODEL)
    assert only.artifact_uri == "/m/1.onnx"


def test_unknown_model_or_version_is_model_not_found(registry: Any) -> None:
    assert registry.list_versions("no-such-model") == []
    with pytest.raises(ModelNotFound, match="no-such-model"):
        registry.get_version("no-such-model")
    with pytest.raises(ModelNotFound, match="no-such-model"):
        registry.get_version("no-such-model", "v1")
    registry.register(MODEL, "v1", "/m/1.onnx", metadata(passed_gate=False))
    with pytest.raises(ModelNotFound, match="none passed the quality gate"):
        registry.get_version(MODEL)
    with pytest.raises(ModelNotFound, match="'v9'"):
        registry.get_version(MODEL, "v9")


def test_versions_are_kept_per_model(registry: Any) -> None:
    registry.register("model-a", "v1", "/a/1.onnx", metadata())
    registry.register("model-b", "v1", "/b/1.onnx", metadata(run_id="b"))
    assert [v.artifact_uri for v in registry.list_versions("model-a")] == ["/a/1.onnx"]
    assert registry.get_version("model-b").metadata["run_id"] == "b"


def test_bad_input_is_refused_before_writing(registry: Any) -> None:
    with pytest.raises(RegistryError, match="artifact URI"):
        registry.register(MODEL, "v1", "", metadata())
    with pytest.raises(RegistryError, match="run_id"):
        registry.register(MODEL, "v1", "/m/1.onnx", {**metadata(), "run_id": object()})
    assert registry.list_versions(MODEL) == []


def test_numpy_values_are_stored_as_plain_numbers(tmp_path: Path) -> None:
    # Both backends normalise through base.normalise_metadata; the property mapping test covers Kubeflow.
    stored = LocalModelRegistry(tmp_path / "registry.db").register(
        MODEL, "v1", "/m/1.onnx", {**metadata(), "threshold": np.float32(0.5), "passed_gate": np.bool_(True),
                                  "metrics": {"roc_auc": np.float64(0.96), "n_test": np.int64(7)}}
    )
    assert stored.metadata["metrics"] == {"roc_auc": 0.96, "n_test": 7}
    assert stored.threshold == 0.5 and stored.passed_gate is True


def test_backends_return_the_same_records(tmp_path: Path, stand_in: tuple[StandInRegistry, int]) -> None:
    local = LocalModelRegistry(tmp_path / "registry.db")
    kubeflow = KubeflowModelRegistry.from_settings(kubeflow_settings(tmp_path, stand_in[1]))
    odd = {**metadata(), "metrics": {}, "notes": None, "extra": {"nested": [1, 2.5, "x"]}, "nan": math.inf}
    for backend in (local, kubeflow):
        backend.register(MODEL, "v1", "/m/1.onnx", metadata(), description="d")
        backend.register(MODEL, "v2", "s3://b/m/2.onnx", odd, model_format="onnx", format_version="1")
        backend.register(MODEL, "v3", "/m/3.onnx", metadata(passed_gate=False))

    def without_time(versions: list[ModelVersion]) -> list[ModelVersion]:
        # Each registry numbers its own records; the ids only need to be there.
        assert all(v.registered_model_id and v.version_id for v in versions)
        return [dataclasses.replace(v, created_at="", registered_model_id="", version_id="") for v in versions]

    assert without_time(local.list_versions(MODEL)) == without_time(kubeflow.list_versions(MODEL))
    assert without_time([local.get_version(MODEL)]) == without_time([kubeflow.get_version(MODEL)])


# --- Local backend ----------------------------------------------------------------------------


def test_local_data_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "not" / "yet" / "there" / "registry.db"
    stored = LocalModelRegistry(path).register(MODEL, "v1", "/m/1.onnx", metadata())
    assert path.exists()
    reopened = LocalModelRegistry(str(path))
    assert reopened.list_versions(MODEL) == [stored]
    reopened.register(MODEL, "v2", "/m/2.onnx", metadata())
    assert [v.version for v in LocalModelRegistry(path).list_versions(MODEL)] == ["v1", "v2"]


def test_local_refuses_a_uri_instead_of_a_path() -> None:
    with pytest.raises(RegistryError, match="local file path"):
        LocalModelRegistry("s3://bucket/registry.db")


def test_local_readers_never_see_half_a_registration(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    LocalModelRegistry(path)
    names = [f"v{i:02d}" for i in range(25)]
    observed: list[list[ModelVersion]] = []
    errors: list[BaseException] = []

    def write() -> None:
        try:
            writer = LocalModelRegistry(path)
            for name in names:
                writer.register(MODEL, name, f"/m/{name}.onnx", metadata(run_id=name))
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    reader = LocalModelRegistry(path)
    while thread.is_alive():
        observed.append(reader.list_versions(MODEL))
    thread.join()
    observed.append(reader.list_versions(MODEL))
    assert errors == []
    final = observed[-1]
    assert [v.version for v in final] == names
    for snapshot in observed:
        assert snapshot == final[: len(snapshot)]


# --- open_registry ----------------------------------------------------------------------------


def test_open_registry_picks_the_backend_from_settings(
    settings: Settings, tmp_path: Path, stand_in: tuple[StandInRegistry, int]
) -> None:
    local = open_registry(settings)
    assert isinstance(local, LocalModelRegistry) and local.path == Path(settings.registry_uri)
    remote = open_registry(kubeflow_settings(tmp_path, stand_in[1]))
    assert isinstance(remote, KubeflowModelRegistry)
    remote.register(MODEL, "v1", "/m/1.onnx", metadata())
    assert len(stand_in[0].versions) == 1 and local.list_versions(MODEL) == []


# --- Kubeflow backend -------------------------------------------------------------------------


def test_kubeflow_register_calls_and_stored_properties(
    tmp_path: Path, stand_in: tuple[StandInRegistry, int]
) -> None:
    store, port = stand_in
    registry = KubeflowModelRegistry.from_settings(kubeflow_settings(tmp_path, port))
    assert store.paths() == [("GET", "/registered_models")]  # the client's connection check
    store.calls.clear()
    registry.register(MODEL, "v1", "s3://models/v1/model.onnx", metadata(), description="first")
    assert store.paths() == [
        ("GET", "/registered_model"),  # our duplicate check: model unknown, so no version lookup
        ("GET", "/registered_model"),  # the client's register_model
        ("POST", "/registered_models"),
        ("GET", "/model_version"),
        ("POST", "/model_versions"),
        ("POST", "/model_versions/2/artifacts"),
        ("GET", "/registered_model"),  # reading the version back
        ("GET", "/model_version"),
        ("GET", "/registered_model"),  # get_model_artifact looks the version up again
        ("GET", "/model_version"),
        ("GET", "/model_artifact"),
    ]
    assert all(call["status"] in (200, 201, 404) for call in store.calls)
    bodies = {call["path"]: call["body"] for call in store.calls if call["method"] == "POST"}
    assert bodies["/registered_models"] == {"name": MODEL, "owner": "fraud-detection", "state": "LIVE"}
    version = bodies["/model_versions"]
    assert (version["name"], version["author"], version["description"]) == ("v1", "fraud-detection", "first")
    props = version["customProperties"]
    assert props["metric_roc_auc"] == {"double_value": 0.97, "metadataType": "MetadataDoubleValue"}
    assert props["metric_n_test"] == {"int_value": "1200", "metadataType": "MetadataIntValue"}
    assert props["passed_gate"] == {"bool_value": True, "metadataType": "MetadataBoolValue"}
    assert json.loads(props["feature_names"]["string_value"]) == FEATURES
    assert json.loads(props["metadata_json_keys"]["string_value"]) == ["feature_names"]
    assert set(props) == {
        "metric_roc_auc", "metric_pr_auc", "metric_precision", "metric_recall", "metric_f1", "metric_n_test",
        "threshold", "feature_names", "data_fingerprint", "run_id", "code_version", "passed_gate",
        "metadata_json_keys",
    }
    artifact = bodies["/model_versions/2/artifacts"]
    assert (artifact["artifactType"], artifact["name"], artifact["uri"]) == ("model-artifact", MODEL,
                                                                           "s3://models/v1/model.onnx")
    assert (artifact["modelFormatName"], artifact["modelFormatVersion"]) == ("onnx", "1")
    query = store.calls[3]["query"]
    assert query == {"name": "v1", "parentResourceId": "1"}


def test_kubeflow_default_version_reads_only_the_chosen_artifact(
    tmp_path: Path, stand_in: tuple[StandInRegistry, int]
) -> None:
    store, port = stand_in
    registry = KubeflowModelRegistry.from_settings(kubeflow_settings(tmp_path, port), page_size=1)
    for i in range(3):
        registry.register(MODEL, f"v{i}", f"/m/{i}.onnx", metadata(passed_gate=i != 2))
    store.calls.clear()
    assert registry.get_version(MODEL).version == "v1"
    versions_pages = [c for c in store.calls if c["path"] == "/registered_models/1/versions"]
    # The client's pager stops when the server's token comes round to the first page's again.
    assert [c["query"].get("nextPageToken") for c in versions_pages] == [None, "1", "2", ""]
    assert {c["query"]["orderBy"] for c in versions_pages} == {"CREATE_TIME"}
    v1_id = next(v["id"] for v in store.versions.values() if v["name"] == "v1")
    artifact_reads = [c["query"] for c in store.calls if c["path"] == "/model_artifact"]
    assert artifact_reads == [{"name": MODEL, "parentResourceId": v1_id}]


def test_stand_in_refuses_bodies_outside_the_client_types(stand_in: tuple[StandInRegistry, int]) -> None:
    store, port = stand_in

    def post(body: Any) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{API}/registered_models",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def with_property(value: dict[str, Any]) -> dict[str, Any]:
        return {"name": "m", "customProperties": {"k": {**value, "metadataType": "MetadataStringValue"}}}

    assert post({"name": "m", "unknownField": 1}) == 400
    assert post({"name": 5}) == 400
    assert post(with_property({"string_value": 3})) == 400
    assert post(with_property({"value": "x"})) == 400
    assert store.models == {}
    assert post(with_property({"string_value": "x"})) == 201


def test_kubeflow_token_is_sent(tmp_path: Path, stand_in: tuple[StandInRegistry, int]) -> None:
    settings = kubeflow_settings(tmp_path, stand_in[1]).with_overrides(registry_token="wrong")
    with pytest.raises(RegistryError, match=f"127.0.0.1:{stand_in[1]}: HTTP 401 Unauthorized: missing or wrong"):
        KubeflowModelRegistry.from_settings(settings)
    assert stand_in[0].calls[-1]["status"] == 401


def test_kubeflow_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(RegistryError, match=f"cannot connect .*127.0.0.1:{port}"):
        KubeflowModelRegistry.from_settings(kubeflow_settings(tmp_path, port))


def test_kubeflow_works_inside_a_running_event_loop(tmp_path: Path, stand_in: tuple[StandInRegistry, int]) -> None:
    registry = KubeflowModelRegistry.from_settings(kubeflow_settings(tmp_path, stand_in[1]))
    registry.register(MODEL, "v1", "/m/1.onnx", metadata())

    async def handler() -> str:  # e.g. an async web server loading the model on request
        return registry.get_version(MODEL).version

    assert asyncio.run(handler()) == "v1"


@pytest.mark.parametrize(
    ("uri", "port", "expected"),
    [
        ("http://model-registry.kubeflow.svc", 8080, ("http://model-registry.kubeflow.svc", 8080, False)),
        ("https://registry.example.com/", 443, ("https://registry.example.com", 443, True)),
    ],
)
def test_kubeflow_security_follows_the_address_scheme(
    tmp_path: Path, uri: str, port: int, expected: tuple[str, int, bool]
) -> None:
    settings = kubeflow_settings(tmp_path, port).with_overrides(registry_uri=uri)
    assert connection_args(settings) == expected


def test_kubeflow_address_without_scheme_is_refused(tmp_path: Path) -> None:
    settings = kubeflow_settings(tmp_path, 8080).with_overrides(registry_uri="model-registry:8080")
    with pytest.raises(RegistryError, match="FRAUD_REGISTRY_URI='model-registry:8080'"):
        connection_args(settings)


def test_property_mapping_round_trips_and_guards_reserved_keys() -> None:
    original = {**metadata(), "metrics": {"roc_auc": 0.9, "bad": float("nan")}, "none": None, "empty": []}
    decoded = decode_properties(encode_properties(original))
    assert math.isnan(decoded["metrics"].pop("bad")) and decoded == {**original, "metrics": {"roc_auc": 0.9}}
    assert decode_properties(encode_properties({"metrics": {}})) == {"metrics": {}}
    with pytest.raises(RegistryError, match="metric_auc"):
        encode_properties({"metric_auc": 0.9})
    numpy_props = encode_properties({"metrics": {"n": np.int64(3)}, "threshold": np.float32(0.5), "ok": np.bool_(1)})
    assert numpy_props == {"metric_n": 3, "threshold": 0.5, "ok": True}
    assert [type(v) for v in numpy_props.values()] == [int, float, bool]


def test_importing_the_client_leaves_the_root_logger_alone() -> None:
    code = (
        "import logging; from fraud_common.registry.kubeflow import _import_client; _import_client(); "
        "print(len(logging.getLogger().handlers))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert result.stdout.strip() == "0"


# --- Aliases (champion / challenger) ----------------------------------------------------------


def aliases_of(registry: Any) -> list[tuple[str, str, str]]:
    return [(v.version, v.alias, v.state) for v in registry.list_versions(MODEL)]


def test_champion_falls_back_to_newest_passed_until_an_alias_exists(registry: Any) -> None:
    for name in ("v1", "v2", "v3"):
        registry.register(MODEL, name, f"/m/{name}.onnx", metadata(passed_gate=name != "v3"))
    assert registry.get_version(MODEL, alias="champion").version == "v2"  # today's rule, no alias yet
    with pytest.raises(ModelNotFound, match="no challenger"):
        registry.get_version(MODEL, alias="challenger")
    registry.set_alias(MODEL, "champion", "v1", "alice", "first version")
    # A newer version that passed the gate no longer changes what is served.
    assert registry.get_version(MODEL, alias="champion").version == "v1"
    assert registry.get_version(MODEL).version == "v2"  # the default without alias is unchanged
    assert aliases_of(registry) == [("v1", "champion", "LIVE"), ("v2", "", "LIVE"), ("v3", "", "LIVE")]


def test_champion_swap_archives_the_old_one_and_records_who_when_why(registry: Any) -> None:
    for name in ("v1", "v2"):
        registry.register(MODEL, name, f"/m/{name}.onnx", metadata())
    registry.set_alias(MODEL, "champion", "v1", "pipeline", "first version: absolute bars")
    challenger = registry.set_alias(MODEL, "challenger", "v2", "pipeline", "evaluating")
    assert (challenger.alias, registry.get_version(MODEL, alias="challenger").version) == ("challenger", "v2")
    promoted = registry.set_alias(MODEL, "champion", "v2", "bob", "gates passed")
    assert (promoted.alias, promoted.state) == ("champion", "LIVE")
    assert aliases_of(registry) == [("v1", "", "ARCHIVED"), ("v2", "champion", "LIVE")]
    with pytest.raises(ModelNotFound, match="no challenger"):
        registry.get_version(MODEL, alias="challenger")
    history = registry.alias_history(MODEL)
    assert [(e.alias, e.version, e.previous, e.kind, e.actor, e.reason, e.sequence) for e in history] == [
        ("champion", "v1", "", "set", "pipeline", "first version: absolute bars", 1),
        ("challenger", "v2", "", "set", "pipeline", "evaluating", 2),
        ("champion", "v2", "v1", "set", "bob", "gates passed", 3),
    ]
    assert all(datetime.fromisoformat(e.at).utcoffset() is not None for e in history)
    assert history[0].at <= history[1].at <= history[2].at
    # Back to v1 (a rollback): live again, v2 archived.
    registry.set_alias(MODEL, "champion", "v1", "carol", "canary failed", kind="rollback")
    assert aliases_of(registry) == [("v1", "champion", "LIVE"), ("v2", "", "ARCHIVED")]
    assert registry.alias_history(MODEL)[-1].kind == "rollback"


def test_alias_changes_are_checked(registry: Any) -> None:
    for name in ("v1", "v2"):
        registry.register(MODEL, name, f"/m/{name}.onnx", metadata())
    registry.set_alias(MODEL, "champion", "v1", "a", "first")
    with pytest.raises(RegistryError, match="unknown alias 'production'"):
        registry.set_alias(MODEL, "production", "v2", "a", "x")
    with pytest.raises(RegistryError, match="actor"):
        registry.set_alias(MODEL, "challenger", "v2", " ", "x")
    with pytest.raises(RegistryError, match="reason"):
        registry.set_alias(MODEL, "challenger", "v2", "a", "")
    with pytest.raises(RegistryError, match="already the champion"):
        registry.set_alias(MODEL, "champion", "v1", "a", "again")
    with pytest.raises(RegistryError, match="is the champion; it cannot become challenger"):
        registry.set_alias(MODEL, "challenger", "v1", "a", "x")
    with pytest.raises(ModelNotFound, match="'v9'"):
        registry.set_alias(MODEL, "challenger", "v9", "a", "x")
    with pytest.raises(RegistryError, match="cannot be cleared"):
        registry.clear_alias(MODEL, "champion", "a", "x")
    registry.clear_alias(MODEL, "challenger", "a", "nothing to clear")  # no holder: no event
    assert len(registry.alias_history(MODEL)) == 1
    registry.set_alias(MODEL, "challenger", "v2", "a", "evaluating")
    registry.clear_alias(MODEL, "challenger", "gate", "refused: ROC-AUC regression")
    assert aliases_of(registry) == [("v1", "champion", "LIVE"), ("v2", "", "LIVE")]
    last = registry.alias_history(MODEL)[-1]
    assert (last.alias, last.version, last.previous, last.kind, last.reason) == (
        "challenger", "", "v2", "clear", "refused: ROC-AUC regression")


def test_update_metadata_merges_and_keeps_the_alias(registry: Any) -> None:
    registry.register(MODEL, "v1", "/m/1.onnx", metadata())
    registry.set_alias(MODEL, "champion", "v1", "a", "first")
    gates = {"roc_auc": {"passed": True, "challenger": 0.97, "champion": None}}
    updated = registry.update_metadata(MODEL, "v1", {"gates": gates, "gate_status": "passed"})
    assert updated.metadata == {**metadata(), "gates": gates, "gate_status": "passed"}
    assert updated == registry.get_version(MODEL, "v1") and updated.alias == "champion"
    with pytest.raises(ModelNotFound, match="'v9'"):
        registry.update_metadata(MODEL, "v9", {"gate_status": "x"})


def test_backends_show_the_same_aliases_and_history(tmp_path: Path, stand_in: tuple[StandInRegistry, int]) -> None:
    local = LocalModelRegistry(tmp_path / "registry.db")
    kubeflow = KubeflowModelRegistry.from_settings(kubeflow_settings(tmp_path, stand_in[1]))
    for backend in (local, kubeflow):
        for name in ("v1", "v2", "v3"):
            backend.register(MODEL, name, f"/m/{name}.onnx", metadata(run_id=name))
        backend.set_alias(MODEL, "champion", "v1", "pipeline", "first version")
        backend.set_alias(MODEL, "challenger", "v2", "pipeline", "evaluating")
        backend.update_metadata(MODEL, "v2", {"gates": {"brier": {"passed": True}}, "gate_status": "passed"})
        backend.set_alias(MODEL, "champion", "v2", "alice", "gates passed")
        backend.set_alias(MODEL, "challenger", "v3", "pipeline", "evaluating")
        backend.clear_alias(MODEL, "challenger", "pipeline", "refused")

    def comparable(registry: Any) -> tuple[list[ModelVersion], list[dict[str, Any]]]:
        versions = [
            dataclasses.replace(v, created_at="", registered_model_id="", version_id="")
            for v in registry.list_versions(MODEL)
        ]
        history = [{**e.to_dict(), "at": ""} for e in registry.alias_history(MODEL)]
        return versions, history

    assert comparable(local) == comparable(kubeflow)
    versions, history = comparable(kubeflow)
    assert [(v.alias, v.state) for v in versions] == [("", "ARCHIVED"), ("champion", "LIVE"), ("", "LIVE")]
    assert [e["sequence"] for e in history] == [1, 2, 3, 4, 5]
    assert local.get_version(MODEL, alias="champion") == dataclasses.replace(
        local.list_versions(MODEL)[1]
    ) and kubeflow.get_version(MODEL, alias="champion").version == "v2"


def test_previous_champion_replays_promotions_and_rollbacks() -> None:
    from fraud_common.registry.base import AliasEvent, previous_champion

    def events(*steps: tuple[str, str, str]) -> list[AliasEvent]:
        return [AliasEvent(MODEL, alias, version, "", kind, "a", "r", "", i + 1)
                for i, (alias, version, kind) in enumerate(steps)]

    assert previous_champion([]) == ""
    assert previous_champion(events(("champion", "A", "set"))) == ""
    promoted = [("champion", "A", "set"), ("challenger", "B", "set"), ("champion", "B", "set"), ("champion", "C", "set")]
    assert previous_champion(events(*promoted)) == "B"
    assert previous_champion(events(*promoted, ("champion", "B", "rollback"))) == "A"
    assert previous_champion(events(*promoted, ("champion", "B", "rollback"), ("champion", "A", "rollback"))) == ""
    assert previous_champion(events(*promoted, ("champion", "B", "rollback"), ("champion", "D", "set"))) == "B"


# --- Kubeflow: the two-update swap, interrupted ------------------------------------------------


def stored_stages(store: StandInRegistry) -> dict[str, tuple[str, str]]:
    """Version name -> (raw ``stage`` property, state) as the stand-in holds them."""
    return {
        v["name"]: (v.get("customProperties", {}).get("stage", {}).get("string_value", ""), v["state"])
        for v in store.versions.values()
    }


@pytest.mark.parametrize("patches_before_failure", [0, 1])
def test_kubeflow_interrupted_swap_shows_exactly_one_champion(
    tmp_path: Path, stand_in: tuple[StandInRegistry, int], patches_before_failure: int
) -> None:
    store, port = stand_in
    registry = KubeflowModelRegistry.from_settings(kubeflow_settings(tmp_path, port))
    for name in ("v1", "v2", "v3"):
        registry.register(MODEL, name, f"/m/{name}.onnx", metadata())
    registry.set_alias(MODEL, "champion", "v1", "a", "first")
    store.patches_left = patches_before_failure
    with pytest.raises(RegistryError, match="HTTP 503"):
        registry.set_alias(MODEL, "champion", "v2", "a", "better")
    expected = "v1" if patches_before_failure == 0 else "v2"
    if patches_before_failure == 1:
        # The interruption left two claimants in the store...
        assert stored_stages(store)["v1"] == ("champion", "LIVE")
        assert stored_stages(store)["v2"] == ("champion", "LIVE")
    # ...but every read shows one champion, and the other as the finished swap would.
    champions = [v.version for v in registry.list_versions(MODEL) if v.alias == "champion"]
    assert champions == [expected]
    assert registry.get_version(MODEL, alias="champion").version == expected
    assert registry.get_version(MODEL, "v1").alias == ("champion" if expected == "v1" else "")
    assert registry.get_version(MODEL, "v1").state == ("LIVE" if expected == "v1" else "ARCHIVED")
    assert [e.version for e in registry.alias_history(MODEL) if e.alias == "champion"] == (
        ["v1"] if expected == "v1" else ["v1", "v2"])
    # The next change repairs the stale claimant.
    store.patches_left = None
    registry.set_alias(MODEL, "champion", "v3", "a", "newer")
    v2_state = "LIVE" if expected == "v1" else "ARCHIVED"  # v2 was champion only if its update went through
    assert stored_stages(store) == {"v1": ("", "ARCHIVED"), "v2": ("", v2_state), "v3": ("champion", "LIVE")}
    assert aliases_of(registry) == [("v1", "", "ARCHIVED"), ("v2", "", v2_state), ("v3", "champion", "LIVE")]


def test_kubeflow_alias_properties_are_not_metadata() -> None:
    with pytest.raises(RegistryError, match="'stage' is reserved"):
        encode_properties({"stage": "champion"})
    assert decode_properties({"stage": "champion", "stage_sequence": 3, "run_id": "r"}) == {"run_id": "r"}


# --- Local: upgrade of a registry written before aliases ----------------------------------------

SCHEMA_1 = """
CREATE TABLE registered_model (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL);
CREATE TABLE model_version (id INTEGER PRIMARY KEY AUTOINCREMENT,
    registered_model_id INTEGER NOT NULL REFERENCES registered_model(id), name TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '', metadata TEXT NOT NULL, created_at TEXT NOT NULL,
    UNIQUE (registered_model_id, name));
CREATE TABLE model_artifact (id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_version_id INTEGER NOT NULL UNIQUE REFERENCES model_version(id), name TEXT NOT NULL,
    uri TEXT NOT NULL, model_format_name TEXT NOT NULL, model_format_version TEXT NOT NULL,
    created_at TEXT NOT NULL);
INSERT INTO registered_model VALUES (1, 'fraud-detection', '2026-01-01T00:00:00.000+00:00');
INSERT INTO model_version VALUES (1, 1, 'v1', '', '{"passed_gate": true}', '2026-01-01T00:00:00.000+00:00');
INSERT INTO model_artifact VALUES (1, 1, 'fraud-detection', '/m/1.onnx', 'onnx', '1', '2026-01-01T00:00:00.000+00:00');
PRAGMA user_version = 1;
"""


def test_local_registry_from_before_aliases_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "registry.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA_1)
    registry = LocalModelRegistry(path)
    assert aliases_of(registry) == [("v1", "", "LIVE")]
    assert registry.get_version(MODEL, alias="champion").version == "v1"
    registry.set_alias(MODEL, "champion", "v1", "a", "adopted")
    assert aliases_of(LocalModelRegistry(path)) == [("v1", "champion", "LIVE")]
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
