"""Find the model version to serve, fetch its ONNX artifact and open a low-latency session."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fraud_common import schemas, storage
from fraud_common.logs import get_logger
from fraud_common.registry import ModelNotFound, ModelRegistry, ModelVersion, RegistryError
from fraud_common.settings import Settings
from rest_predictor.errors import PredictorLoadError

log = get_logger(__name__)


@dataclass
class LoadedModel:
    """An open ONNX session and what the server needs to answer with it."""

    session: ort.InferenceSession
    input_name: str
    output_name: str
    feature_names: list[str]
    threshold: float
    model_name: str
    version: str
    artifact_uri: str

    def score(self, features: np.ndarray) -> np.ndarray:
        """Fraud probabilities ``[n, 1]`` (float32) for a ``[n, 13]`` float32 feature matrix."""
        return self.session.run([self.output_name], {self.input_name: features})[0]


def resolve_version(registry: ModelRegistry, settings: Settings) -> ModelVersion:
    """The version named by ``settings.serve_model_version``, else the champion (before any
    promotion: the newest version that passed the gate)."""
    wanted = settings.serve_model_version or None
    try:
        version = registry.get_version(settings.model_name, wanted, alias=None if wanted else "champion")
    except ModelNotFound as err:
        which = f"version {wanted!r}" if wanted else "version that passed the quality gate"
        raise PredictorLoadError(
            f"model registry has no {which} of model {settings.model_name!r} ({err}); "
            "run the pipeline first, or set FRAUD_SERVE_MODEL_VERSION to a registered version"
        ) from err
    except RegistryError as err:
        raise PredictorLoadError(f"model registry refused the lookup of {settings.model_name!r}: {err}") from err
    if version.model_format.lower() != "onnx":
        raise PredictorLoadError(
            f"model {version.model_name!r} version {version.version!r} has format "
            f"{version.model_format!r}; this predictor serves only 'onnx'"
        )
    return version


def fetch_artifact(uri: str, settings: Settings, cache_dir: Path) -> bytes:
    """The ONNX file's bytes from a local path or s3:// URI (S3 copies are kept in ``cache_dir``)."""
    try:
        if not storage.is_s3(uri):
            return storage.read_bytes(uri, settings)
        cache_dir.mkdir(parents=True, exist_ok=True)
        local = storage.download(uri, cache_dir / "model.onnx", settings)
        return Path(local).read_bytes()
    except (storage.StorageError, OSError) as err:
        raise PredictorLoadError(f"cannot fetch the model artifact {uri}: {err}") from err


def session_options() -> ort.SessionOptions:
    """Options for one small model on a 2-core machine: one thread, no thread pool hand-offs.

    A request scores one to a few rows, so intra-op parallelism only adds synchronisation; the
    server's concurrency comes from the event loop, not from onnxruntime threads.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def open_session(model_bytes: bytes, version: ModelVersion) -> LoadedModel:
    """Open the session and check its interface against the contract and the registry record."""
    label = f"model {version.model_name!r} version {version.version!r} ({version.artifact_uri})"
    try:
        session = ort.InferenceSession(model_bytes, sess_options=session_options(), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for bad files
        raise PredictorLoadError(f"{label} is not a loadable ONNX model: {err}") from err
    inputs, outputs = session.get_inputs(), session.get_outputs()
    n_features = len(schemas.MODEL_FEATURES)
    if len(inputs) != 1 or inputs[0].shape[-1] != n_features or inputs[0].type != "tensor(float)":
        found = [(i.name, i.type, i.shape) for i in inputs]
        raise PredictorLoadError(f"{label}: expected one float input [batch, {n_features}], found {found}")
    meta = session.get_modelmeta().custom_metadata_map
    feature_names = _feature_names(meta, version, label)
    return LoadedModel(
        session=session,
        input_name=inputs[0].name,
        output_name=outputs[0].name,
        feature_names=feature_names,
        threshold=_threshold(meta, version, label),
        model_name=version.model_name,
        version=version.version,
        artifact_uri=version.artifact_uri,
    )


def _feature_names(meta: dict[str, str], version: ModelVersion, label: str) -> list[str]:
    """Input order from the ONNX metadata (registry record as fallback); must be the 13 model features."""
    raw = meta.get("feature_names")
    try:
        names = json.loads(raw) if raw else list(version.metadata.get("feature_names", []))
    except json.JSONDecodeError as err:
        raise PredictorLoadError(f"{label}: metadata feature_names is not JSON: {raw[:80]!r}") from err
    if sorted(names) != sorted(schemas.MODEL_FEATURES):
        raise PredictorLoadError(
            f"{label}: feature_names {names} are not the model features {list(schemas.MODEL_FEATURES)}"
        )
    return list(names)


def _threshold(meta: dict[str, str], version: ModelVersion, label: str) -> float:
    """Decision threshold from the ONNX metadata (registry record as fallback)."""
    raw = meta.get("threshold", version.metadata.get("threshold"))
    try:
        threshold = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PredictorLoadError(f"{label}: no usable decision threshold (found {raw!r})") from None
    if not 0.0 <= threshold <= 1.0:
        raise PredictorLoadError(f"{label}: threshold {threshold} is outside [0, 1]")
    return threshold
