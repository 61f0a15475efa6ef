"""Register step: gate, upload the ONNX file to the models store, record it in the registry.

Training never writes to the registry; this is the only place that does, and it checks the quality
gate before anything is uploaded or recorded.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from datetime import datetime, timezone
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from fraud_common import storage
from fraud_common.feature_store import read_namespace
from fraud_common.logs import get_logger
from fraud_common.registry import ModelVersion, open_registry
from fraud_common.registry.serving import serving_record, store_snapshot, version_store_uri
from fraud_common.settings import Settings
from train.gate import check_gate

log = get_logger(__name__)

# Test metrics copied into the registry record (the full metrics.json stays with the run).
RECORDED_METRICS = ("roc_auc", "pr_auc", "brier", "precision", "recall", "f1", "valid_roc_auc")


def version_name(run_id: str, now: datetime | None = None) -> str:
    """A unique, sortable version name that names the run: ``v20250601-120000-<run id>``."""
    if not run_id or not run_id.strip():
        raise ValueError("run_id must be a non-empty string (the pipeline run that trained the model)")
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id.strip()).strip("-")[:12] or "run"
    return f"v{stamp}-{slug}"


def registry_metrics(metrics: Mapping) -> dict:
    """The test metrics kept in the registry record, plus the reference's ROC-AUC if known."""
    recorded = {name: float(metrics[name]) for name in RECORDED_METRICS if name in metrics}
    if "confusion_matrix" in metrics:
        recorded["confusion_matrix"] = {k: int(v) for k, v in dict(metrics["confusion_matrix"]).items()}
    reference = metrics.get("reference")
    if isinstance(reference, Mapping) and "roc_auc" in reference:
        recorded["reference_roc_auc"] = float(reference["roc_auc"])
    return recorded


def register_model(
    settings: Settings,
    artifact_uri: str,
    metrics: Mapping,
    threshold: float,
    feature_names: Sequence[str],
    data_fingerprint: str,
    run_id: str,
    code_version: str,
    serving: Mapping | None = None,
) -> ModelVersion:
    """Record an already uploaded model; refuses (``QualityGateError``) below ``settings.min_roc_auc``.

    ``serving`` (``fraud_common.registry.serving.serving_record``): the feature store snapshot and
    training data the version needs; a predictor serves the version with exactly that store.
    """
    check_gate(metrics, settings.min_roc_auc)
    version = version_name(run_id)
    record = {
        "metrics": registry_metrics(metrics),
        "threshold": float(threshold),
        "feature_names": list(feature_names),
        "data_fingerprint": data_fingerprint,
        "run_id": run_id,
        "code_version": code_version,
        "passed_gate": True,
        "quality_bar": float(settings.min_roc_auc),
    }
    if serving:
        record["serving"] = dict(serving)
    registry = open_registry(settings)
    registered = registry.register(
        model_name=settings.model_name,
        version=version,
        artifact_uri=artifact_uri,
        metadata=record,
        model_format="onnx",
        format_version="1",
        description=f"trained by run {run_id}; test ROC-AUC {float(metrics['roc_auc']):.4f}",
    )
    log.info("registered %s version %s (%s)", settings.model_name, version, artifact_uri)
    return registered


def model_artifact_uri(settings: Settings, run_id: str) -> str:
    """Where a run's ONNX file lives in the models store."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id.strip()).strip("-") or "run"
    return storage.join(settings.models_uri, settings.model_name, slug, "model.onnx")


def publish_model(
    settings: Settings,
    model_path: Path,
    metrics: Mapping,
    threshold: float,
    feature_names: Sequence[str],
    data_fingerprint: str,
    run_id: str,
    code_version: str,
    feature_store_dir: Path | None = None,
    training_data: Mapping | None = None,
) -> ModelVersion:
    """The whole register step: gate, upload ``model_path`` to ``settings.models_uri``, register.

    With ``feature_store_dir`` (the run's Feast snapshot) the snapshot is copied beside the model
    and recorded on the version with ``training_data`` (its URI, rows, time range): what the
    version is served with once promoted, untouched by later runs.
    """
    check_gate(metrics, settings.min_roc_auc)  # before uploading anything
    model_path = Path(model_path)
    if not model_path.is_file():
        raise FileNotFoundError(f"model file {model_path} does not exist")
    uri = model_artifact_uri(settings, run_id)
    storage.write_bytes(uri, model_path.read_bytes(), settings)
    log.info("uploaded %s to %s", model_path, uri)
    serving = None
    if feature_store_dir is not None:
        snapshot = store_snapshot(feature_store_dir, version_store_uri(uri), settings)
        serving = serving_record(snapshot, list(feature_names), data_fingerprint, training_data or {},
                                 online_project=read_namespace(feature_store_dir))
        log.info("stored the version's feature store snapshot at %s", snapshot)
    return register_model(
        settings, uri, metrics, threshold, feature_names, data_fingerprint, run_id, code_version, serving
    )


def data_fingerprint(frame: pd.DataFrame) -> str:
    """``sha256:<hex>`` of the frame's columns, dtypes and rows, independent of row order.

    Rows are hashed with pandas' vectorised hash (columns in name order), the row hashes sorted,
    and sha256 taken over the schema and the sorted hashes: a million rows take about a second.
    """
    columns = sorted(frame.columns)
    digest = hashlib.sha256()
    for name in columns:
        digest.update(f"{name}:{frame[name].dtype};".encode())
    row_hashes = pd.util.hash_pandas_object(frame[columns], index=False).to_numpy(dtype=np.uint64)
    digest.update(np.sort(row_hashes).tobytes())
    return f"sha256:{digest.hexdigest()}"


def code_version(settings: Settings) -> str:
    """The images' baked-in ``git describe`` (``FRAUD_CODE_VERSION``), else the source tree's,
    else the package version."""
    baked = settings.code_version.strip()
    if baked and baked != "unknown":
        return f"git:{baked}"
    here = Path(__file__).resolve().parent
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=here, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        if described:
            return f"git:{described}"
    except (OSError, subprocess.SubprocessError):
        pass  # no git or not a checkout (container image): fall back to the package version
    try:
        return f"train=={package_metadata.version('train')}"
    except package_metadata.PackageNotFoundError:
        return "unknown"
