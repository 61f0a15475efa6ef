"""The fraud-detection pipeline: raw CSVs to a live predictor, as one Kubeflow pipeline.

Compile it with ``uv run fraud-detection compile`` (or ``python pipeline/fraud-detection-e2e.py``)
and upload ``pipeline/fraud-detection-e2e.yaml`` in the KFP or OpenShift AI dashboard.
``uv run fraud-detection run`` executes this same definition on one machine with kfp.local.
"""


import sys
from pathlib import Path

from kfp import dsl, kubernetes

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.components import (  # noqa: E402
    feature_engineering,
    prepare_data,
    register_model,
    retrieve_features,
    serve,
    train_model,
)
from pipeline.images import image  # noqa: E402

PIPELINE_NAME = "fraud-detection-e2e"
CONFIG_MAP = "fraud-detection-config"
S3_SECRET = "fraud-detection-s3"
REGISTRY_SECRET = "fraud-detection-registry"
# Settings every step reads (fraud_common.settings); values come from the ConfigMap.
CONFIG_KEYS = (
    "S3_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "FRAUD_REGISTRY_BACKEND",
    "FRAUD_REGISTRY_URI",
    "FRAUD_REGISTRY_PORT",
    "FRAUD_MODELS_URI",
    "FRAUD_FEAST_DIR",
    "FRAUD_FEAST_SNAPSHOT_URI",
)


def _wire_settings(task: dsl.PipelineTask, needs_registry: bool = False) -> dsl.PipelineTask:
    """Give a step its settings from the ConfigMap and its credentials from Secrets."""
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, {key: key for key in CONFIG_KEYS})
    kubernetes.use_secret_as_env(
        task, S3_SECRET, {"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"}
    )
    if needs_registry:
        kubernetes.use_secret_as_env(task, REGISTRY_SECRET, {"FRAUD_REGISTRY_TOKEN": "FRAUD_REGISTRY_TOKEN"})
    return task


@dsl.pipeline(name=PIPELINE_NAME, description="Card-fraud scoring: Spark features, Feast, Keras→ONNX, registry, KServe.")
def fraud_detection_pipeline(
    data_uri: str = "s3://fraud-detection/data",
    namespace: str = "fraud-detection",
    model_name: str = "fraud-detection",
    min_roc_auc: float = 0.95,
    platform: str = "kubernetes",
    spark_image: str = image("data-preparation"),
    predictor_image: str = image("rest-predictor"),
    service_name: str = "fraud-detection",
    spark_driver_cores: int = 1,
    spark_driver_memory: str = "2g",
    spark_executor_instances: int = 2,
    spark_executor_cores: int = 1,
    spark_executor_memory: str = "2g",
    spark_timeout_seconds: int = 1800,
    serve_timeout_seconds: int = 600,
) -> None:
    """Prepare → features → training set → train → register → serve, with typed artifacts between."""
    prepared = _wire_settings(
        prepare_data(
            platform=platform,
            data_uri=data_uri,
            namespace=namespace,
            spark_image=spark_image,
            driver_cores=spark_driver_cores,
            driver_memory=spark_driver_memory,
            executor_instances=spark_executor_instances,
            executor_cores=spark_executor_cores,
            executor_memory=spark_executor_memory,
            timeout_seconds=spark_timeout_seconds,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ).set_display_name("prepare data (Spark)")
    )
    features = _wire_settings(
        feature_engineering(
            platform=platform, data_uri=data_uri, prepared=prepared.outputs["prepared"]
        ).set_display_name("feature store (Feast)")
    )
    training_set = _wire_settings(
        retrieve_features(
            data_uri=data_uri, feature_store=features.outputs["feature_store"]
        ).set_display_name("retrieve training set")
    )
    trained = _wire_settings(
        train_model(training_set=training_set.outputs["training_set"]).set_display_name("train and evaluate")
    )
    trained.set_cpu_limit("2").set_memory_limit("8G")
    registered = _wire_settings(
        register_model(
            model_name=model_name,
            min_roc_auc=min_roc_auc,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            model=trained.outputs["model"],
        ).set_display_name("gate and register"),
        needs_registry=True,
    )
    _wire_settings(
        serve(
            platform=platform,
            namespace=namespace,
            service_name=service_name,
            predictor_image=predictor_image,
            timeout_seconds=serve_timeout_seconds,
            registered_model=registered.outputs["registered_model"],
        ).set_display_name("serve (KServe)"),
        needs_registry=True,
    )


def compile_pipeline(output: Path) -> Path:
    """Write the pipeline's YAML to ``output``."""
    from kfp import compiler

    compiler.Compiler().compile(fraud_detection_pipeline, str(output))
    return output


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_suffix(".yaml")
    print(compile_pipeline(target))
