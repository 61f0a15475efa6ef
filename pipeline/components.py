"""Kubeflow Pipelines components: thin, typed wrappers around the step code.

Each component body only translates KFP artifacts to and from the step's own functions, so the
local run (kfp.local) and the cluster run execute the same implementation. Bodies import inside
the function because KFP ships each function's source alone into its container.

``platform`` selects the form of the two cluster-only actions: ``kubernetes`` submits a
SparkApplication and deploys an InferenceService; ``local`` runs Spark in-process and checks
that the predictor can load the registered model (the CLI then serves it on localhost);
``docker`` starts those two as containers of their images (pipeline/docker.py).
"""


from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from pipeline.images import image

# uv venvs have no pip and the step images carry kfp already: never pip-install it at run time.
_COMMON = {"install_kfp_package": False}


@dsl.component(base_image=image("pipeline"), **_COMMON)
def prepare_data(
    platform: str,
    data_uri: str,
    namespace: str,
    spark_image: str,
    driver_cores: int,
    driver_memory: str,
    executor_instances: int,
    executor_cores: int,
    executor_memory: str,
    timeout_seconds: int,
    run_id: str,
    prepared: Output[Dataset],
):
    """Turn the raw CSVs into point-in-time features (Spark)."""
    import json
    import time

    from fraud_common.logs import setup_logging
    from fraud_common.settings import Settings

    setup_logging()
    started = time.monotonic()
    settings = Settings.from_env().with_overrides(data_uri=data_uri.rstrip("/"))
    if platform == "local":
        from data_preparation.main import prepare

        report = prepare(settings.raw_uri, settings.prepared_uri, settings)
        details = {"rows_per_split": report.rows_per_split, "users_without_history": report.users_without_history}
    elif platform == "docker":
        from pathlib import Path

        from pipeline.docker import run_spark_job

        details = run_spark_job(settings, spark_image, run_id, timeout_seconds, Path(prepared.path).parent / "spark.log")
    else:
        from pipeline.k8s import launch_spark_preparation

        details = launch_spark_preparation(
            settings=settings,
            namespace=namespace,
            image=spark_image,
            run_id=run_id,
            driver_cores=driver_cores,
            driver_memory=driver_memory,
            executor_instances=executor_instances,
            executor_cores=executor_cores,
            executor_memory=executor_memory,
            timeout_seconds=timeout_seconds,
        )
    prepared.metadata.update(
        {"uri": settings.prepared_uri, "duration_seconds": round(time.monotonic() - started, 1), **details}
    )
    with open(prepared.path, "w") as handle:
        json.dump(prepared.metadata, handle, indent=2, default=str)


@dsl.component(base_image=image("feature-engineering"), **_COMMON)
def feature_engineering(
    platform: str,
    data_uri: str,
    prepared: Input[Dataset],
    feature_store: Output[Artifact],
):
    """Register the feature definitions with Feast and materialize them into the online store."""
    import json
    import time

    from fraud_common.logs import setup_logging
    from fraud_common.settings import Settings
    from feature_engineering.feast_feature_engineering import apply_and_materialize, publish_store

    setup_logging()
    started = time.monotonic()
    settings = Settings.from_env().with_overrides(data_uri=data_uri.rstrip("/"))
    report = apply_and_materialize(settings)
    details = {**report.to_dict(), "rows_materialized": report.rows_in_window, "feast_dir": settings.feast_dir}
    if platform != "local":
        # The predictor pods read this snapshot; a production store would be Redis or Postgres.
        publish_store(settings, settings.feast_snapshot_uri)
        details["snapshot_uri"] = settings.feast_snapshot_uri
    feature_store.metadata.update({**details, "duration_seconds": round(time.monotonic() - started, 1)})
    with open(feature_store.path, "w") as handle:
        json.dump(feature_store.metadata, handle, indent=2, default=str)


@dsl.component(base_image=image("feature-engineering"), **_COMMON)
def retrieve_features(
    data_uri: str,
    feature_store: Input[Artifact],
    training_set: Output[Dataset],
):
    """Build the point-in-time training set with Feast's historical retrieval."""
    import time
    from pathlib import Path

    from fraud_common.logs import setup_logging
    from fraud_common.settings import Settings
    from feature_engineering.feast_feature_engineering import retrieve_training_data

    setup_logging()
    started = time.monotonic()
    settings = Settings.from_env().with_overrides(data_uri=data_uri.rstrip("/"))
    frame = retrieve_training_data(settings, out_path=Path(training_set.path))
    training_set.metadata.update(
        {
            "rows": len(frame),
            "rows_by_set": {str(k): int(v) for k, v in frame["set"].value_counts().items()},
            "format": "parquet",
            "duration_seconds": round(time.monotonic() - started, 1),
        }
    )


@dsl.component(base_image=image("train"), **_COMMON)
def train_model(
    training_set: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    classification_metrics: Output[ClassificationMetrics],
    evaluation: Output[Artifact],
):
    """Train the network and the reference, evaluate on the test split, export ONNX."""
    import shutil
    import tempfile
    import time
    from pathlib import Path

    from fraud_common.logs import setup_logging
    from fraud_common.settings import Settings
    from train.train import run_training

    setup_logging()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        outcome = run_training(Path(training_set.path), Path(tmp) / "out", Settings.from_env())
        shutil.copyfile(outcome.model_path, model.path)
        Path(evaluation.path).mkdir(parents=True, exist_ok=True)
        for produced in (outcome.metrics_path, outcome.curves_path):
            shutil.copy(produced, Path(evaluation.path) / Path(produced).name)
    for name, value in outcome.metrics.items():
        if isinstance(value, (int, float)):
            metrics.log_metric(name, float(value))
    metrics.log_metric("reference_roc_auc", float(outcome.metrics["reference"]["roc_auc"]))
    curve = outcome.roc_curve
    classification_metrics.log_roc_curve(curve["fpr"], curve["tpr"], curve["thresholds"])
    classification_metrics.log_confusion_matrix(outcome.confusion_categories, outcome.confusion_matrix)
    model.metadata.update(
        {
            "format": "onnx",
            "threshold": outcome.threshold,
            "feature_names": list(outcome.feature_names),
            "data_fingerprint": outcome.data_fingerprint,
            "metrics": {k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float))},
            "duration_seconds": round(time.monotonic() - started, 1),
        }
    )


@dsl.component(base_image=image("train"), **_COMMON)
def register_model(
    model_name: str,
    min_roc_auc: float,
    run_id: str,
    model: Input[Model],
    registered_model: Output[Artifact],
):
    """Check the quality gate, upload the ONNX file and record the version in the registry."""
    import time

    from fraud_common.logs import setup_logging
    from fraud_common.settings import Settings
    from train.register import code_version, publish_model

    setup_logging()
    started = time.monotonic()
    settings = Settings.from_env().with_overrides(model_name=model_name, min_roc_auc=min_roc_auc)
    version = publish_model(
        settings,
        model_path=model.path,
        metrics=model.metadata["metrics"],
        threshold=float(model.metadata["threshold"]),
        feature_names=list(model.metadata["feature_names"]),
        data_fingerprint=str(model.metadata["data_fingerprint"]),
        run_id=run_id,
        code_version=code_version(),
    )
    registered_model.metadata.update(
        {
            "model_name": version.model_name,
            "model_version": version.version,
            "artifact_uri": version.artifact_uri,
            "duration_seconds": round(time.monotonic() - started, 1),
        }
    )


@dsl.component(base_image=image("pipeline"), **_COMMON)
def serve(
    platform: str,
    namespace: str,
    service_name: str,
    predictor_image: str,
    timeout_seconds: int,
    registered_model: Input[Artifact],
    endpoint: Output[Artifact],
):
    """Deploy (or roll) the predictor to the registered version."""
    import time

    from fraud_common.logs import setup_logging
    from fraud_common.settings import Settings

    setup_logging()
    started = time.monotonic()
    settings = Settings.from_env()
    name = registered_model.metadata["model_name"]
    version = registered_model.metadata["model_version"]
    if platform == "local":
        from rest_predictor.predictor import check_loadable

        check_loadable(settings.with_overrides(model_name=name, serve_model_version=version))
        url = f"http://{settings.serve_host}:{settings.serve_port}"
    elif platform == "docker":
        from pathlib import Path

        from pipeline.docker import start_predictor

        url = start_predictor(settings, predictor_image, service_name, name, version, timeout_seconds,
                              Path(endpoint.path).parent / "predictor.log")
    else:
        from pipeline.k8s import launch_inference_service

        url = launch_inference_service(
            settings=settings,
            namespace=namespace,
            service_name=service_name,
            image=predictor_image,
            model_name=name,
            model_version=version,
            timeout_seconds=timeout_seconds,
        )
    endpoint.metadata.update(
        {"url": url, "model_name": name, "model_version": version,
         "duration_seconds": round(time.monotonic() - started, 1)}
    )
