"""One typed settings object, read from environment variables with local defaults.

No other module reads the environment. In a cluster the variables come from a ConfigMap and
Secrets (wired by kfp-kubernetes); on a laptop the defaults put everything under ``FRAUD_HOME``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Mapping


class SettingsError(ValueError):
    """An environment variable holds a value that cannot be used."""


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None


@dataclass(frozen=True)
class Settings:
    """Everything a step needs to know about where things are and how good a model must be."""

    # Root of all local state of the embedded run (git-ignored).
    home: Path
    # Data root: a local path or s3://bucket/prefix. Raw CSVs live in <data_uri>/raw,
    # prepared features in <data_uri>/prepared.
    data_uri: str
    # S3-compatible object store (MinIO in the cluster). Empty endpoint means AWS defaults.
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_region: str
    # Model registry: "local" (SQLite file) or "kubeflow" (Kubeflow Model Registry).
    registry_backend: str
    registry_uri: str
    registry_port: int
    registry_token: str
    registry_author: str
    model_name: str
    # Where trained model artifacts are stored (local path or s3://...).
    models_uri: str
    # Feast: where the feature store keeps its registry and online store.
    feast_dir: str
    # Quality bar: a model whose test ROC-AUC is below this is not registered.
    min_roc_auc: float
    serve_host: str
    serve_port: int
    # Largest batch a predictor accepts in one request.
    max_batch_size: int
    log_level: str
    # Model version the predictor serves; empty: the newest version that passed the gate.
    serve_model_version: str = ""
    # A published Feast store snapshot (folder with registry.db and online_store.db, local or
    # s3://) that the predictor copies into ``feast_dir`` before opening the store; empty: none.
    feast_snapshot_uri: str = ""
    # Where each card's history state lives (the push path writes it, transaction scoring reads
    # it): empty for a SQLite file in ``feast_dir`` (no server), or a Redis URL (redis://,
    # rediss://, unix://) shared by every predictor replica.
    online_store_url: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Read settings from ``env`` (default: the process environment)."""
        env = os.environ if env is None else env
        home = Path(env.get("FRAUD_HOME") or ".fraud-detection").expanduser().resolve()
        backend = env.get("FRAUD_REGISTRY_BACKEND", "local")
        if backend not in ("local", "kubeflow"):
            raise SettingsError(f"FRAUD_REGISTRY_BACKEND={backend!r}: use 'local' or 'kubeflow'")
        default_registry = str(home / "registry.db") if backend == "local" else ""
        data_uri = env.get("FRAUD_DATA_URI") or str(home / "data")
        return cls(
            home=home,
            data_uri=data_uri.rstrip("/"),
            s3_endpoint=env.get("S3_ENDPOINT_URL", ""),
            s3_access_key=env.get("AWS_ACCESS_KEY_ID", ""),
            s3_secret_key=env.get("AWS_SECRET_ACCESS_KEY", ""),
            s3_region=env.get("AWS_DEFAULT_REGION", "us-east-1"),
            registry_backend=backend,
            registry_uri=env.get("FRAUD_REGISTRY_URI") or default_registry,
            registry_port=_int(env, "FRAUD_REGISTRY_PORT", 443),
            registry_token=env.get("FRAUD_REGISTRY_TOKEN", ""),
            registry_author=env.get("FRAUD_REGISTRY_AUTHOR", "fraud-detection"),
            model_name=env.get("FRAUD_MODEL_NAME", "fraud-detection"),
            models_uri=(env.get("FRAUD_MODELS_URI") or str(home / "models")).rstrip("/"),
            feast_dir=(env.get("FRAUD_FEAST_DIR") or str(home / "feast")).rstrip("/"),
            min_roc_auc=_float(env, "FRAUD_MIN_ROC_AUC", 0.95),
            serve_host=env.get("FRAUD_SERVE_HOST", "127.0.0.1"),
            serve_port=_int(env, "FRAUD_SERVE_PORT", 8081),
            max_batch_size=_int(env, "FRAUD_MAX_BATCH_SIZE", 1000),
            log_level=env.get("FRAUD_LOG_LEVEL", "INFO"),
            serve_model_version=env.get("FRAUD_SERVE_MODEL_VERSION", ""),
            feast_snapshot_uri=env.get("FRAUD_FEAST_SNAPSHOT_URI", "").rstrip("/"),
            online_store_url=env.get("FRAUD_ONLINE_STORE_URL", ""),
        )

    @property
    def raw_uri(self) -> str:
        """Folder of the raw CSVs (train/validate/test and the transaction history)."""
        return f"{self.data_uri}/raw"

    @property
    def prepared_uri(self) -> str:
        """Folder of the prepared Parquet written by data preparation."""
        return f"{self.data_uri}/prepared"

    def with_overrides(self, **changes: object) -> "Settings":
        """A copy with some fields changed (used by tests and the CLI's flags)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise SettingsError(f"unknown settings: {sorted(unknown)}")
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings (for subprocesses)."""
        return {
            "FRAUD_HOME": str(self.home),
            "FRAUD_DATA_URI": self.data_uri,
            "S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_DEFAULT_REGION": self.s3_region,
            "FRAUD_REGISTRY_BACKEND": self.registry_backend,
            "FRAUD_REGISTRY_URI": self.registry_uri,
            "FRAUD_REGISTRY_PORT": str(self.registry_port),
            "FRAUD_REGISTRY_TOKEN": self.registry_token,
            "FRAUD_REGISTRY_AUTHOR": self.registry_author,
            "FRAUD_MODEL_NAME": self.model_name,
            "FRAUD_MODELS_URI": self.models_uri,
            "FRAUD_FEAST_DIR": self.feast_dir,
            "FRAUD_MIN_ROC_AUC": repr(self.min_roc_auc),
            "FRAUD_SERVE_HOST": self.serve_host,
            "FRAUD_SERVE_PORT": str(self.serve_port),
            "FRAUD_MAX_BATCH_SIZE": str(self.max_batch_size),
            "FRAUD_LOG_LEVEL": self.log_level,
            "FRAUD_SERVE_MODEL_VERSION": self.serve_model_version,
            "FRAUD_FEAST_SNAPSHOT_URI": self.feast_snapshot_uri,
            "FRAUD_ONLINE_STORE_URL": self.online_store_url,
        }
