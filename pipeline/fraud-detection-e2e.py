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
    canary,
    feature_engineering,
    prepare_data,
    evaluate_against_champion,
    register_model,
    retrieve_features,
    serve,
    train_model,
)
from fraud_common.settings import (  # noqa: E402
    CONFIG,
    CONFIG_MAP,
    ONLINE_STORE_SECRET,
    REGISTRY_SECRET,
    S3_SECRET,
    Settings,
    env_names,
    read_env_file,
)
from pipeline.images import image  # noqa: E402

PIPELINE_NAME = "fraud-detection-e2e"
# The cluster's settings: the ConfigMap's values. The pipeline's parameters default to them.
SETTINGS_ENV = Path(__file__).resolve().parents[1] / "manifests" / "config" / "settings.env"
CLUSTER = Settings.from_env(read_env_file(SETTINGS_ENV)).with_overrides(
    spark_image=image("data-preparation"), predictor_image=image("rest-predictor")
)
# Settings every step reads (fraud_common.settings); values come from the ConfigMap.
CONFIG_KEYS = env_names(CONFIG)


def _wire_settings(task: dsl.PipelineTask, needs_registry: bool = False) -> dsl.PipelineTask:
    """Give a step its settings from the ConfigMap and its credentials from Secrets."""
    kubernetes.use_config_map_as_env(task, CONFIG_MAP, {key: key for key in CONFIG_KEYS})
    kubernetes.use_secret_as_env(task, S3_SECRET, {key: key for key in env_names(S3_SECRET)})
    if needs_registry:
        kubernetes.use_secret_as_env(task, REGISTRY_SECRET, {key: key for key in env_names(REGISTRY_SECRET)})
    return task


@dsl.pipeline(name=PIPELINE_NAME, description="Card-fraud scoring: Spark features, Feast, Keras→ONNX, registry, KServe.")
def fraud_detection_pipeline(
    data_uri: str = CLUSTER.data_uri,
    namespace: str = CLUSTER.namespace,
    model_name: str = CLUSTER.model_name,
    min_roc_auc: float = CLUSTER.min_roc_auc,
    platform: str = "kubernetes",
    spark_image: str = CLUSTER.spark_image,
    predictor_image: str = CLUSTER.predictor_image,
    service_name: str = CLUSTER.service_name,
    spark_driver_cores: int = CLUSTER.spark_driver_cores,
    spark_driver_memory: str = CLUSTER.spark_driver_memory,
    spark_executor_instances: int = CLUSTER.spark_executor_instances,
    spark_executor_cores: int = CLUSTER.spark_executor_cores,
    spark_executor_memory: str = CLUSTER.spark_executor_memory,
    spark_timeout_seconds: int = CLUSTER.spark_timeout_seconds,
    serve_timeout_seconds: int = CLUSTER.serve_timeout_seconds,
    canary_steps: str = CLUSTER.canary_steps,
) -> None:
    """Prepare → features → training set → train → register → gates → canary → serve; data flows in typed artifacts.

    Every parameter but ``platform`` is a setting of the same name (fraud_common.settings).
    """
    prepared = _wire_settings(
        prepare_data(
            platform=platform,
            data_uri=data_uri,
            namespace=namespace,
            spark_image=spark_image,
            spark_driver_cores=spark_driver_cores,
            spark_driver_memory=spark_driver_memory,
            spark_executor_instances=spark_executor_instances,
            spark_executor_cores=spark_executor_cores,
            spark_executor_memory=spark_executor_memory,
            spark_timeout_seconds=spark_timeout_seconds,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ).set_display_name("prepare data (Spark)")
    )
    features = _wire_settings(
        feature_engineering(prepared=prepared.outputs["prepared"]).set_display_name("feature store (Feast)")
    )
    # online store: the feature step writes the shared Redis; its password (optional: absent where
    # the store is file-based) from the Secret setup.sh generates.
    kubernetes.use_secret_as_env(features, ONLINE_STORE_SECRET, {key: key for key in env_names(ONLINE_STORE_SECRET)}, optional=True)
    training_set = _wire_settings(
        retrieve_features(
            prepared=prepared.outputs["prepared"], feature_store=features.outputs["feature_store"]
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
            feature_store=features.outputs["feature_store"],
            training_set=training_set.outputs["training_set"],
        ).set_display_name("gate and register"),
        needs_registry=True,
    )
    decided = _wire_settings(
        evaluate_against_champion(
            model_name=model_name,
            min_roc_auc=min_roc_auc,
            require_approval=False,
            approval_timeout_seconds=3600,
            platform=platform,
            canary_steps=canary_steps,
            training_set=training_set.outputs["training_set"],
            registered_model=registered.outputs["registered_model"],
        ).set_display_name("evaluate against champion"),
        needs_registry=True,
    )
    rolled_out = _wire_settings(
        canary(
            platform=platform,
            namespace=namespace,
            service_name=service_name,
            predictor_image=predictor_image,
            serve_timeout_seconds=serve_timeout_seconds,
            canary_steps=canary_steps,
            decision=decided.outputs["decision"],
        ).set_display_name("canary (InferenceGraph)"),
        needs_registry=True,
    )
    _wire_settings(
        serve(
            platform=platform,
            namespace=namespace,
            service_name=service_name,
            predictor_image=predictor_image,
            serve_timeout_seconds=serve_timeout_seconds,
            registered_model=rolled_out.outputs["rollout"],
            feature_store=features.outputs["feature_store"],
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
