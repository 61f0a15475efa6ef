"""Kubeflow Pipelines components: thin, typed wrappers around the step code.

Each component body only translates KFP artifacts to and from the step's own functions, so the
local run (kfp.local) and the cluster run execute the same implementation. Bodies import inside
the function because KFP ships each function's source alone into its container; a step package
is imported only inside the component that runs in that step's image.

Artifacts carry the data: every output artifact's URI is where its data is (the prepared
Parquet, the Feast store snapshot, the training set, the ONNX model, the registered version's
record), with a summary in its metadata (rows, schema fingerprint, time range, duration) that
the KFP UI shows. A step reads only its input artifacts (``.path``: kfp.local's local path, or
the copy KFP's launcher downloads from S3 in a cluster); only the first step takes a data
location, the raw CSVs under ``data_uri``.

``platform`` selects the form of the two cluster-only actions: ``kubernetes`` submits a
SparkApplication (which writes straight to the artifact's S3 URI) and deploys an
InferenceService; ``local`` runs Spark in-process and checks that the predictor loads the
registered model with the run's store snapshot (the CLI then serves it on localhost);
``docker`` starts those two as containers of their images (``pipeline/docker.py``), with the
data passing through the object store as on a cluster.
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
    spark_driver_cores: int,
    spark_driver_memory: str,
    spark_executor_instances: int,
    spark_executor_cores: int,
    spark_executor_memory: str,
    spark_timeout_seconds: int,
    run_id: str,
    prepared: Output[Dataset],
):
    """Turn the raw CSVs under ``data_uri``/raw into point-in-time features (Spark) in ``prepared``."""
    from fraud_common import schemas, storage
    from fraud_common.artifacts import parquet_summary, pipeline_step, storage_uri

    with pipeline_step(prepared, data_uri=data_uri.rstrip("/")) as settings:
        if platform == "local":
            from data_preparation.main import prepare

            written = prepared.path
            report = prepare(settings.raw_uri, written, settings)
            details = {"users_without_history": report.users_without_history, "history_rows": report.history_rows}
        elif platform == "docker":
            from pathlib import Path

            from pipeline.docker import run_spark_job

            # The Spark container is a sibling of this one: it sees the object store, not this
            # container's files. It writes under the run's prefix; the artifact gets a copy.
            staged = storage.join(settings.data_uri, "runs", run_id, "prepared")
            details = run_spark_job(settings, spark_image, run_id, spark_timeout_seconds,
                                    Path(prepared.path).parent / "spark.log", input_uri=settings.raw_uri, output_uri=staged)
            written = prepared.path
            storage.download(staged, written, settings)
        else:
            from pipeline.k8s import launch_spark_preparation

            # Spark writes to the object store itself: straight into this artifact's location.
            written = storage_uri(prepared.uri)
            details = launch_spark_preparation(
                settings, namespace, spark_image, run_id,
                spark_driver_cores, spark_driver_memory,
                spark_executor_instances, spark_executor_cores, spark_executor_memory,
                spark_timeout_seconds, input_uri=settings.raw_uri, output_uri=written,
            )
        entities = parquet_summary(storage.join(written, schemas.ENTITIES_DIR), settings)
        prepared.metadata.update(
            {
                **parquet_summary(storage.join(written, schemas.FEATURES_DIR), settings),
                "entity_rows": entities["rows"],
                "layout": f"{schemas.FEATURES_DIR}/ and {schemas.ENTITIES_DIR}/ Parquet folders",
                "raw_uri": settings.raw_uri,
                **details,
            }
        )


@dsl.component(base_image=image("feature-engineering"), **_COMMON)
def feature_engineering(
    prepared: Input[Dataset],
    feature_store: Output[Artifact],
):
    """Apply the Feast definitions, materialize ``prepared`` online, publish the store as ``feature_store``."""
    from fraud_common.artifacts import file_summary, pipeline_step
    from fraud_common.feature_store import optional_snapshot_files, publish_snapshot, snapshot_files
    from feature_engineering.feast_feature_engineering import apply_and_materialize

    with pipeline_step(feature_store) as settings:
        report = apply_and_materialize(settings, prepared_uri=prepared.path)
        # The snapshot is what later steps and the predictor pods read: the registry and a
        # consistent copy of the SQLite online store, or with the shared Redis the registry and
        # the run's namespace (online_namespace.json), which registration copies beside the model.
        publish_snapshot(settings, feature_store.path)
        feature_store.metadata.update(
            {
                **report.to_dict(),
                "rows_materialized": report.rows_in_window,
                "online_users": report.online_users_after,
                **file_summary(feature_store.path, snapshot_files(settings) + optional_snapshot_files(settings)),
            }
        )


@dsl.component(base_image=image("feature-engineering"), **_COMMON)
def retrieve_features(
    prepared: Input[Dataset],
    feature_store: Input[Artifact],
    training_set: Output[Dataset],
):
    """Build the point-in-time training set with Feast's historical retrieval over the store's registry."""
    import shutil
    import tempfile
    from pathlib import Path

    from fraud_common.artifacts import parquet_summary, pipeline_step, storage_uri
    from fraud_common.feature_store import NAMESPACE_FILE, REGISTRY_FILE
    from feature_engineering.feast_feature_engineering import retrieve_training_data

    with tempfile.TemporaryDirectory(prefix="feast-registry-") as feast_dir:
        with pipeline_step(training_set, feast_dir=feast_dir) as settings:
            # Historical retrieval needs the registry only (and, with Redis, the namespace naming
            # its project); a copy keeps the input artifact as it is.
            for name in (REGISTRY_FILE, NAMESPACE_FILE):
                if (Path(feature_store.path) / name).is_file():
                    shutil.copyfile(Path(feature_store.path) / name, Path(feast_dir) / name)
            retrieve_training_data(settings, out_path=Path(training_set.path), prepared_uri=prepared.path)
            training_set.metadata.update({**parquet_summary(training_set.path, settings), "format": "parquet",
                                          # the version records it: the predictor seeds card histories from it
                                          "prepared_uri": storage_uri(prepared.uri)})


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
    from pathlib import Path

    from fraud_common.artifacts import pipeline_step
    from train.train import TrainConfig, run_training

    with pipeline_step(model) as settings, tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(max_epochs=settings.train_max_epochs, seed=settings.train_seed)
        outcome = run_training(Path(training_set.path), Path(tmp) / "out", settings, config)
        shutil.copyfile(outcome.model_path, model.path)
        Path(evaluation.path).mkdir(parents=True, exist_ok=True)
        for produced in (outcome.metrics_path, outcome.curves_path, outcome.reliability_path):
            shutil.copy(produced, Path(evaluation.path) / Path(produced).name)
    for name, value in outcome.metrics.items():
        if isinstance(value, (int, float)):
            metrics.log_metric(name, float(value))
    metrics.log_metric("reference_roc_auc", float(outcome.metrics["reference"]["roc_auc"]))
    curve = outcome.roc_curve
    classification_metrics.log_roc_curve(curve["fpr"], curve["tpr"], curve["thresholds"])
    classification_metrics.log_confusion_matrix(outcome.confusion_categories, outcome.confusion_matrix)
    evaluation.metadata.update({"files": sorted(p.name for p in Path(evaluation.path).iterdir())})
    model.metadata.update(
        {
            "format": "onnx",
            "bytes": Path(model.path).stat().st_size,
            "threshold": outcome.threshold,
            "feature_names": list(outcome.feature_names),
            "data_fingerprint": outcome.data_fingerprint,
            "training_rows": training_set.metadata.get("rows"),
            "metrics": {k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float))},
        }
    )


@dsl.component(base_image=image("train"), **_COMMON)
def register_model(
    model_name: str,
    min_roc_auc: float,
    run_id: str,
    model: Input[Model],
    feature_store: Input[Artifact],
    training_set: Input[Dataset],
    registered_model: Output[Artifact],
):
    """Check the quality gate, upload the ONNX file and record the version in the registry.

    The run's feature store snapshot is stored with the version and recorded on it with the
    training data (fingerprint, time range, URI): promotion later serves exactly that store.
    """
    import json
    from pathlib import Path

    from fraud_common.artifacts import pipeline_step, storage_uri
    from fraud_common.registry.serving import snapshot_of
    from train.register import code_version, publish_model

    with pipeline_step(registered_model, model_name=model_name, min_roc_auc=min_roc_auc) as settings:
        version = publish_model(
            settings,
            model_path=model.path,
            metrics=model.metadata["metrics"],
            threshold=float(model.metadata["threshold"]),
            feature_names=list(model.metadata["feature_names"]),
            data_fingerprint=str(model.metadata["data_fingerprint"]),
            run_id=run_id,
            code_version=code_version(settings),
            feature_store_dir=Path(feature_store.path),
            training_data={**dict(training_set.metadata), "uri": storage_uri(training_set.uri)},
        )
        record = {
            "model_name": version.model_name,
            "model_version": version.version,
            "artifact_uri": version.artifact_uri,
            "registry_backend": settings.registry_backend,
            "registry_uri": settings.registry_uri,
            "registered_model_id": version.registered_model_id,
            "model_version_id": version.version_id,
            "feast_snapshot_uri": snapshot_of(version),
        }
        # The artifact is the registered version's record: which registry holds which version.
        with open(registered_model.path, "w") as handle:
            json.dump(record, handle, indent=2)
        registered_model.metadata.update(record)


@dsl.component(base_image=image("train"), **_COMMON)
def evaluate_against_champion(
    model_name: str,
    min_roc_auc: float,
    require_approval: bool,
    approval_timeout_seconds: int,
    platform: str,
    canary_steps: str,
    training_set: Input[Dataset],
    registered_model: Input[Artifact],
    decision: Output[Artifact],
    gates: Output[Metrics],
):
    """Gate the registered version against the champion on the run's test split; promote or refuse.

    ``decision`` names the champion after the decision (what ``serve`` deploys); a refusal fails
    the step after recording the gates on the version, so nothing downstream changes. On a
    cluster with ``canary_steps`` a passing version stays challenger: the ``canary`` step rolls
    it out. The embedded run has no live traffic to canary on: it promotes at the gate (a running
    local predictor takes ``fraud-detection canary VERSION``).
    """
    import json
    from pathlib import Path

    from fraud_common import storage
    from fraud_common.artifacts import pipeline_step
    from fraud_common.registry import CHAMPION, open_registry
    from fraud_common.registry.serving import snapshot_of
    from train.data import load_dataset, split_arrays
    from train.governance import GatePolicy, decide, evaluate_against_champion, raise_if_refused, served_rows

    with pipeline_step(decision, model_name=model_name, min_roc_auc=min_roc_auc) as settings:
        test = split_arrays(load_dataset(Path(training_set.path)))["test"]
        registry = open_registry(settings)
        # Recent served traffic for the shadow gate, when the predictor logs its requests (the
        # prediction log's setting; absent: the test rows).
        from fraud_common import schemas

        served = served_rows(settings.prediction_log_uri, settings, list(schemas.MODEL_FEATURES))
        report = evaluate_against_champion(
            registry, model_name, registered_model.metadata["model_version"], test.features, test.labels,
            lambda uri: storage.read_bytes(uri, settings), GatePolicy.from_settings(settings), served=served,
        )
        outcome = decide(
            registry, model_name, report, promote_now=not (platform == "kubernetes" and canary_steps.strip()),
            require_approval=require_approval, approval_timeout_seconds=approval_timeout_seconds,
        )
        for name, value in report.kfp_metrics().items():
            gates.log_metric(name, value)
        champion = registry.get_version(model_name, alias=CHAMPION)
        record = {
            "outcome": outcome.outcome,
            "reason": outcome.reason,
            "challenger": report.challenger,
            "model_name": champion.model_name,
            "model_version": champion.version,
            "artifact_uri": champion.artifact_uri,
            "registered_model_id": champion.registered_model_id,
            "model_version_id": champion.version_id,
            # The store the champion was registered with: what serve deploys beside it.
            "feast_snapshot_uri": snapshot_of(champion),
        }
        with open(decision.path, "w") as handle:
            json.dump(record, handle, indent=2)
        decision.metadata.update(record)
    raise_if_refused(outcome)


@dsl.component(base_image=image("pipeline"), **_COMMON)
def canary(
    platform: str,
    namespace: str,
    service_name: str,
    predictor_image: str,
    serve_timeout_seconds: int,
    canary_steps: str,
    decision: Input[Artifact],
    rollout: Output[Artifact],
    metrics: Output[Metrics],
):
    """Roll a challenger out through an InferenceGraph Splitter (10 → 50 → 100 %), checks at each step.

    Only on a cluster and only for a version the gates left as challenger; otherwise the
    decision passes through. The challenger gets its own InferenceService; the router graph
    ``<service>-router`` weighs it against the champion's; every step's figures go onto the
    version (``canary``) and into ``metrics``. A failed check puts 100 % back on the champion,
    marks the version rolled back and fails the step, so ``serve`` changes nothing.
    """
    import json

    from fraud_common.artifacts import pipeline_step

    record = dict(decision.metadata)
    with pipeline_step(rollout) as settings:
        ran = platform == "kubernetes" and canary_steps.strip() and record.get("outcome") == "challenger"
        metrics.log_metric("canary_ran", float(bool(ran)))
        if ran:
            from fraud_common.registry import open_registry, rollout as rules
            from fraud_common.registry.serving import snapshot_of
            from pipeline.k8s import challenger_service_name, kubernetes_apis, launch_inference_service, run_graph_canary

            registry, name = open_registry(settings), record["model_name"]
            version = record["challenger"]
            policy = rules.CanaryPolicy(steps=rules.parse_steps(canary_steps), step_seconds=30.0,
                                        step_timeout_seconds=900.0, min_requests=100)
            rules.start(registry, name, version, policy, rules.ACTOR)
            challenger = registry.get_version(name, version)
            isvc = challenger_service_name(service_name, version)
            launch_inference_service(settings, namespace, isvc, predictor_image, name, version, serve_timeout_seconds,
                                     feast_snapshot_uri=snapshot_of(challenger))
            api, _ = kubernetes_apis()
            passed, results = run_graph_canary(api, namespace, service_name, (service_name, record["model_version"]),
                                               (isvc, version), policy)
            for result in results:
                rules.record_step(registry, name, version, result)
                for check in result.checks:
                    metrics.log_metric(f"step_{result.percent}_{check.name}", float(check.value))
                metrics.log_metric(f"step_{result.percent}_passed", float(result.passed))
            if passed:
                champion = rules.finish_promoted(registry, name, version, rules.ACTOR)
                record.update(outcome="promoted", model_version=champion.version, artifact_uri=champion.artifact_uri,
                              registered_model_id=champion.registered_model_id, model_version_id=champion.version_id,
                              feast_snapshot_uri=snapshot_of(champion), canary_service=isvc)
            else:
                reason = "; ".join(r.reason for r in results if not r.passed)
                rules.finish_rolled_back(registry, name, version, rules.ACTOR, reason)
                record.update(outcome="rolled_back", reason=reason)
        with open(rollout.path, "w") as handle:
            json.dump(record, handle, indent=2)
        rollout.metadata.update(record)
    if record.get("outcome") == "rolled_back":
        raise RuntimeError(f"canary of {record['challenger']} rolled back: {record['reason']}")


@dsl.component(base_image=image("pipeline"), **_COMMON)
def serve(
    platform: str,
    namespace: str,
    service_name: str,
    predictor_image: str,
    serve_timeout_seconds: int,
    registered_model: Input[Artifact],
    feature_store: Input[Artifact],
    endpoint: Output[Artifact],
):
    """Deploy (or roll) the predictor to the registered version with the run's feature store snapshot."""
    import json
    import tempfile

    from fraud_common.artifacts import pipeline_step, storage_uri

    name = registered_model.metadata["model_name"]
    version = registered_model.metadata["model_version"]
    # The served version's own store (recorded at registration); this run's only for a version
    # from before such records. A run whose challenger was not promoted deploys the champion
    # with the champion's store, never this run's.
    snapshot = registered_model.metadata.get("feast_snapshot_uri") or storage_uri(feature_store.uri)
    with tempfile.TemporaryDirectory(prefix="feast-check-") as feast_dir, pipeline_step(endpoint) as settings:
        if platform == "local":
            from rest_predictor.predictor import check_loadable

            # What a predictor pod does: fetch the snapshot, open the store, load the model, probe.
            check_loadable(settings.with_overrides(
                model_name=name, serve_model_version=version, feast_snapshot_uri=snapshot, feast_dir=feast_dir
            ))
            url = f"http://{settings.serve_host}:{settings.serve_port}"
        elif platform == "docker":
            from pathlib import Path

            from fraud_common import storage
            from pipeline.docker import start_predictor

            # The predictor container fetches its store snapshot by URI, as a pod does: publish
            # the served version's own snapshot (its recorded one; this run's only for a version
            # from before such records) to the object store first.
            published = storage.join(settings.data_uri, "serving", name, version, "feature_store")
            with storage.local_copy(registered_model.metadata.get("feast_snapshot_uri") or feature_store.path, settings) as local:
                storage.upload(local, published, settings)
            snapshot = published
            url = start_predictor(settings, predictor_image, service_name, name, version, serve_timeout_seconds,
                                  Path(endpoint.path).parent / "predictor.log", feast_snapshot_uri=snapshot)
        else:
            from pipeline.k8s import launch_inference_service

            url = launch_inference_service(
                settings, namespace, service_name, predictor_image, name, version, serve_timeout_seconds,
                feast_snapshot_uri=snapshot,
                registered_model_id=registered_model.metadata.get("registered_model_id", ""),
                model_version_id=registered_model.metadata.get("model_version_id", ""),
            )
            canary_service = registered_model.metadata.get("canary_service", "")
            if canary_service:
                from pipeline.k8s import finish_graph_canary

                # The service now runs the promoted version: the router back on it, the canary's gone.
                finish_graph_canary(namespace, service_name, canary_service)
        record = {"url": url, "model_name": name, "model_version": version, "feast_snapshot_uri": snapshot}
        with open(endpoint.path, "w") as handle:
            json.dump(record, handle, indent=2)
        endpoint.metadata.update(record)
