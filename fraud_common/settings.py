"""One typed settings object, read from environment variables with local defaults.

No other module reads the environment. Every field names its variable and where its value comes
from in a cluster (``source``):

* ``config``: the ConfigMap ``fraud-detection-config`` (``manifests/config/settings.env`` holds
  the cluster's values; a test keeps that file's keys and these fields equal).
* ``fraud-detection-s3`` / ``fraud-detection-registry``: those Secrets (credentials only);
  ``fraud-online-store``: the Redis password, a Secret setup.sh generates (never committed).
* ``local``: not in the ConfigMap: meaningful on one machine only (``FRAUD_HOME``, the local
  server), set per pod by the pipeline (the served model version, the Feast snapshot), or read
  at build/compile time (image names).

Fields marked ``parameter`` are also parameters of the Kubeflow pipeline under the same name, so
a run can change them; their defaults there are the cluster's values. On a laptop the defaults
put everything under ``FRAUD_HOME``.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

# Names of the cluster objects that carry the settings (manifests/config/kustomization.yaml
# generates them; the pipeline, the SparkApplication and the InferenceService refer to them).
CONFIG_MAP = "fraud-detection-config"
S3_SECRET = "fraud-detection-s3"
REGISTRY_SECRET = "fraud-detection-registry"
# online store: the Redis password, generated at setup time (setup.sh), never in the repository.
ONLINE_STORE_SECRET = "fraud-online-store"
CONFIG = "config"
LOCAL = "local"
SOURCES = (CONFIG, S3_SECRET, REGISTRY_SECRET, ONLINE_STORE_SECRET, LOCAL)

REGISTRY_BACKENDS = ("local", "kubeflow")


class SettingsError(ValueError):
    """An environment variable holds a value that cannot be used."""


def _setting(env: str, default: Any = "", source: str = CONFIG, parameter: bool = False) -> Any:
    """A dataclass field read from the variable ``env``; ``default`` "" may be derived in from_env."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}")
    return field(default=default, metadata={"env": env, "source": source, "parameter": parameter})


def _parse(kind: Callable[[str], Any], name: str, raw: str) -> Any:
    try:
        return kind(raw)
    except ValueError:
        what = {int: "an integer", float: "a number"}.get(kind, "valid")
        raise SettingsError(f"{name}={raw!r} is not {what}") from None


@dataclass(frozen=True)
class Settings:
    """Everything a step needs to know about where things are and how good a model must be."""

    # Root of all local state of the embedded run (git-ignored).
    home: Path = _setting("FRAUD_HOME", Path(".fraud-detection"), LOCAL)
    # Data root: a local path or s3://bucket/prefix. Raw CSVs live in <data_uri>/raw; the CLI's
    # prepare writes <data_uri>/prepared (pipeline runs write into their own artifacts).
    data_uri: str = _setting("FRAUD_DATA_URI", parameter=True)
    # S3-compatible object store (MinIO in the cluster). Empty endpoint means AWS defaults.
    s3_endpoint: str = _setting("S3_ENDPOINT_URL")
    s3_access_key: str = _setting("AWS_ACCESS_KEY_ID", source=S3_SECRET)
    s3_secret_key: str = _setting("AWS_SECRET_ACCESS_KEY", source=S3_SECRET)
    s3_region: str = _setting("AWS_DEFAULT_REGION", "us-east-1")
    # Model registry: "local" (SQLite file) or "kubeflow" (Kubeflow Model Registry).
    registry_backend: str = _setting("FRAUD_REGISTRY_BACKEND", "local")
    registry_uri: str = _setting("FRAUD_REGISTRY_URI")
    registry_port: int = _setting("FRAUD_REGISTRY_PORT", 443)
    registry_token: str = _setting("FRAUD_REGISTRY_TOKEN", source=REGISTRY_SECRET)
    registry_author: str = _setting("FRAUD_REGISTRY_AUTHOR", "fraud-detection")
    model_name: str = _setting("FRAUD_MODEL_NAME", "fraud-detection", parameter=True)
    # Where trained model artifacts are stored (local path or s3://...).
    models_uri: str = _setting("FRAUD_MODELS_URI")
    # Feast: where the feature store keeps its registry and online store.
    feast_dir: str = _setting("FRAUD_FEAST_DIR")
    # Quality bar: a model whose test ROC-AUC is below this is not registered.
    min_roc_auc: float = _setting("FRAUD_MIN_ROC_AUC", 0.95, parameter=True)
    # Training run knobs (the rest of train.train.TrainConfig is the model's design, in code).
    train_max_epochs: int = _setting("FRAUD_TRAIN_MAX_EPOCHS", 20)
    train_seed: int = _setting("FRAUD_TRAIN_SEED", 42)
    serve_host: str = _setting("FRAUD_SERVE_HOST", "127.0.0.1", LOCAL)
    serve_port: int = _setting("FRAUD_SERVE_PORT", 8081, LOCAL)
    # Largest batch a predictor accepts in one request.
    max_batch_size: int = _setting("FRAUD_MAX_BATCH_SIZE", 1000)
    log_level: str = _setting("FRAUD_LOG_LEVEL", "INFO")
    # Model version the predictor serves; empty: the newest version that passed the gate.
    serve_model_version: str = _setting("FRAUD_SERVE_MODEL_VERSION", "", LOCAL)
    # A published Feast store snapshot (folder with registry.db and online_store.db, local or
    # s3://) that the predictor copies into ``feast_dir`` before opening the store; empty: none.
    # The pipeline sets it on the predictor to its run's feature-store artifact.
    feast_snapshot_uri: str = _setting("FRAUD_FEAST_SNAPSHOT_URI", "", LOCAL)
    # The source's `git describe`, baked into each step image by build_images.sh; empty: ask git.
    code_version: str = _setting("FRAUD_CODE_VERSION", "", LOCAL)
    # Cluster: where the project's objects live and how large the Spark job is.
    namespace: str = _setting("FRAUD_NAMESPACE", "fraud-detection", parameter=True)
    service_name: str = _setting("FRAUD_SERVICE_NAME", "fraud-detection", parameter=True)
    spark_driver_cores: int = _setting("FRAUD_SPARK_DRIVER_CORES", 1, parameter=True)
    spark_driver_memory: str = _setting("FRAUD_SPARK_DRIVER_MEMORY", "2g", parameter=True)
    spark_executor_instances: int = _setting("FRAUD_SPARK_EXECUTOR_INSTANCES", 2, parameter=True)
    spark_executor_cores: int = _setting("FRAUD_SPARK_EXECUTOR_CORES", 1, parameter=True)
    spark_executor_memory: str = _setting("FRAUD_SPARK_EXECUTOR_MEMORY", "2g", parameter=True)
    spark_timeout_seconds: int = _setting("FRAUD_SPARK_TIMEOUT_SECONDS", 1800, parameter=True)
    serve_timeout_seconds: int = _setting("FRAUD_SERVE_TIMEOUT_SECONDS", 600, parameter=True)
    # Images: <image_registry>/<step>:<image_tag> (pipeline/images.py); read when compiling the
    # pipeline and building images. The two launched images can be changed per run.
    image_registry: str = _setting("FRAUD_IMAGE_REGISTRY", "quay.io/fraud-detection-blueprint", LOCAL)
    image_tag: str = _setting("FRAUD_IMAGE_TAG", "0.1.0", LOCAL)
    spark_image: str = _setting("FRAUD_SPARK_IMAGE", "", LOCAL, parameter=True)
    predictor_image: str = _setting("FRAUD_PREDICTOR_IMAGE", "", LOCAL, parameter=True)
    # online store: where the Feast online features and each card's history state live (the
    # feature step and the push path write them, every predictor replica reads them): empty for
    # SQLite files in ``feast_dir`` (the embedded default, no server), or a Redis URL (redis://,
    # rediss://, unix://) without its password; in the cluster the Redis of
    # manifests/online-store. The password comes from the Secret setup.sh generates.
    online_store_url: str = _setting("FRAUD_ONLINE_STORE_URL", "", CONFIG)
    online_store_password: str = _setting("FRAUD_ONLINE_STORE_PASSWORD", "", ONLINE_STORE_SECRET)
    # governance / canary
    # Canary steps: the challenger's share of traffic, percent, step by step (must end at 100);
    # empty: a version that passes the gates is promoted at once (no canary).
    canary_steps: str = _setting("FRAUD_CANARY_STEPS", "10,50,100", LOCAL, parameter=True)
    # Seconds each canary step lasts at least (it also waits for enough challenger requests).
    canary_step_seconds: float = _setting("FRAUD_CANARY_STEP_SECONDS", 5.0, LOCAL)
    # Fault injection, for rollback drills only: the predictor makes FRAUD_FAULT_VERSION answer
    # this share of its requests with a 500 and sleep this long per request. Empty: no faults.
    fault_version: str = _setting("FRAUD_FAULT_VERSION", "", LOCAL)
    fault_error_rate: float = _setting("FRAUD_FAULT_ERROR_RATE", 0.0, LOCAL)
    fault_delay_ms: float = _setting("FRAUD_FAULT_DELAY_MS", 0.0, LOCAL)

    @property
    def online_store_client_url(self) -> str:
        """``online_store_url`` with ``online_store_password`` in it (if it names none itself)."""
        from urllib.parse import quote, urlsplit, urlunsplit

        url, password = self.online_store_url, self.online_store_password
        parts = urlsplit(url)
        if not url or not password or parts.password or parts.scheme == "unix":
            return url
        host = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{quote(password, safe='')}@{host}"))

    # prediction log (monitoring) -------------------------------------------------------------
    # Every scored request appended to Parquet files (fraud_common.prediction_log): a local folder
    # or s3://bucket/prefix; empty: <FRAUD_HOME>/monitoring/predictions (on by default, so the
    # one-machine loop works); "off" (or a sample rate of 0): no log. In the cluster an s3://
    # prefix in the ConfigMap: every predictor replica writes there, the monitoring pipeline reads it.
    prediction_log_uri: str = _setting("FRAUD_PREDICTION_LOG_URI", "", CONFIG)
    prediction_log_sample_rate: float = _setting("FRAUD_PREDICTION_LOG_SAMPLE_RATE", 1.0, LOCAL)
    # Rows held in memory before they are in a file (what a kill can lose), and how long at most.
    prediction_log_max_rows: int = _setting("FRAUD_PREDICTION_LOG_MAX_ROWS", 20000, LOCAL)
    prediction_log_max_seconds: float = _setting("FRAUD_PREDICTION_LOG_MAX_SECONDS", 30.0, LOCAL)
    # Prometheus Pushgateway the monitor job pushes its verdict to (the drift alert's metric);
    # empty: not pushed (the verdict is still in result.json and metrics.prom beside the report).
    pushgateway_url: str = _setting("FRAUD_PUSHGATEWAY_URL", "", LOCAL)
    # end of prediction log (monitoring) ------------------------------------------------------

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Read settings from ``env`` (default: the process environment)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for spec in fields(cls):
            raw = env.get(spec.metadata["env"], "")
            kind = type(spec.default)
            if raw == "":
                values[spec.name] = spec.default
            elif kind in (int, float):
                values[spec.name] = _parse(kind, spec.metadata["env"], raw)
            else:
                values[spec.name] = kind(raw)
        home = Path(values["home"]).expanduser().resolve()
        backend = values["registry_backend"]
        if backend not in REGISTRY_BACKENDS:
            raise SettingsError(f"FRAUD_REGISTRY_BACKEND={backend!r}: use 'local' or 'kubeflow'")
        derived = {
            "home": home,
            "data_uri": values["data_uri"] or str(home / "data"),
            "registry_uri": values["registry_uri"] or (str(home / "registry.db") if backend == "local" else ""),
            "models_uri": values["models_uri"] or str(home / "models"),
            "feast_dir": values["feast_dir"] or str(home / "feast"),
        }
        values.update(derived)
        for name in ("data_uri", "models_uri", "feast_dir", "feast_snapshot_uri"):
            values[name] = values[name].rstrip("/")
        registry, tag = values["image_registry"].rstrip("/"), values["image_tag"]
        values["spark_image"] = values["spark_image"] or f"{registry}/data-preparation:{tag}"
        values["predictor_image"] = values["predictor_image"] or f"{registry}/rest-predictor:{tag}"
        return cls(**values)

    @property
    def raw_uri(self) -> str:
        """Folder of the raw CSVs (train/validate/test and the transaction history)."""
        return f"{self.data_uri}/raw"

    @property
    def prepared_uri(self) -> str:
        """Folder of the prepared Parquet written by ``fraud-detection prepare`` (the CLI)."""
        return f"{self.data_uri}/prepared"

    def with_overrides(self, **changes: object) -> "Settings":
        """A copy with some fields changed (used by tests, the CLI's flags and pipeline parameters)."""
        known = {f.name for f in fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise SettingsError(f"unknown settings: {sorted(unknown)}")
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings (for subprocesses)."""
        return {f.metadata["env"]: _text(getattr(self, f.name)) for f in fields(self)}


def _text(value: object) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def env_names(source: str | None = None) -> tuple[str, ...]:
    """The variables of every setting, or of those whose cluster value comes from ``source``."""
    return tuple(f.metadata["env"] for f in fields(Settings) if source in (None, f.metadata["source"]))


def pipeline_parameters() -> tuple[str, ...]:
    """The settings that are also pipeline parameters (same names as the fields)."""
    return tuple(f.name for f in fields(Settings) if f.metadata["parameter"])


def env_name(name: str) -> str:
    """The variable of the setting ``name``."""
    for spec in fields(Settings):
        if spec.name == name:
            return spec.metadata["env"]
    raise SettingsError(f"unknown setting {name!r}")


def read_env_file(path: Path | str) -> dict[str, str]:
    """``KEY=value`` lines of a kustomize env file (``#`` comments and blank lines skipped)."""
    values: dict[str, str] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise SettingsError(f"{path}:{number}: not KEY=value: {line!r}")
        values[key.strip()] = value.strip()
    return values


def default_of(name: str) -> Any:
    """The code default of the setting ``name`` (no environment read)."""
    for spec in fields(Settings):
        if spec.name == name and spec.default is not MISSING:
            return spec.default
    raise SettingsError(f"unknown setting {name!r}")
