"""The docker platform (pipeline/docker.py): the same pipeline with every step in its image.

The unit checks run everywhere. The end-to-end run needs a Docker API (podman's:
``container-engine --service``, ``DOCKER_HOST``) and the five images (``./build_images.sh
--skip-s3a-jars``); without them it is skipped and says which is missing.
"""

from __future__ import annotations

import io
import json
import sqlite3
import tarfile
from pathlib import Path

import pytest

from conftest import free_port
from fraud_common.settings import Settings
from pipeline import docker as docker_platform
from pipeline import images

FAKE_S3 = {"S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
           "AWS_DEFAULT_REGION": "us-east-1"}


def test_step_env_keeps_every_configmap_and_secret_key(tmp_path: Path) -> None:
    cluster = docker_platform.cluster_env()
    assert {"S3_ENDPOINT_URL", "FRAUD_DATA_URI", "FRAUD_MODELS_URI", "FRAUD_REGISTRY_TOKEN"} <= set(cluster)
    env = docker_platform.step_env(Settings.from_env({"FRAUD_HOME": str(tmp_path)}), tmp_path / "state", FAKE_S3)
    assert set(cluster) <= set(env), "every setting the cluster gives a step reaches its container"
    assert env["S3_ENDPOINT_URL"] == FAKE_S3["S3_ENDPOINT_URL"], "this machine's S3 server, not the cluster's"
    assert env["AWS_ACCESS_KEY_ID"] == FAKE_S3["AWS_ACCESS_KEY_ID"], "this machine's S3 keys"
    for key in ("FRAUD_DATA_URI", "FRAUD_MODELS_URI", "FRAUD_FEAST_SNAPSHOT_URI"):
        assert env[key].startswith("s3://"), f"{key}: what the steps write goes to S3"
    assert env["FRAUD_REGISTRY_BACKEND"] == "local" and env["FRAUD_REGISTRY_URI"].startswith(str(tmp_path / "state"))
    Settings.from_env(env)  # the steps can read it


def test_predictor_env_names_nothing_on_the_host(tmp_path: Path) -> None:
    state = tmp_path / "state"
    step = Settings.from_env(docker_platform.step_env(Settings.from_env({"FRAUD_HOME": str(tmp_path)}), state, FAKE_S3))
    env = docker_platform.predictor_env(step, "fraud-detection", "v7")
    assert not [key for key, value in env.items() if str(tmp_path) in value], "the predictor gets URIs, not host paths"
    assert env["FRAUD_REGISTRY_URI"] == docker_platform.PREDICTOR_REGISTRY
    assert env["FRAUD_SERVE_MODEL_VERSION"] == "v7" and env["FRAUD_SERVE_HOST"] == "0.0.0.0"


def test_registry_snapshot_is_consistent_even_with_uncheckpointed_wal(tmp_path: Path) -> None:
    db = tmp_path / "registry.db"
    writer = sqlite3.connect(db)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("CREATE TABLE versions (name TEXT)")
    writer.execute("INSERT INTO versions VALUES ('v1')")
    writer.commit()  # still open: the row lives in registry.db-wal only
    assert Path(f"{db}-wal").stat().st_size > 0
    archive = tarfile.open(fileobj=io.BytesIO(docker_platform.registry_snapshot(db)))
    member = archive.getmember("registry/registry.db")
    assert (member.uid, member.gid) == (1001, 0) and member.mode & 0o060 == 0o060
    out = tmp_path / "copy.db"
    out.write_bytes(archive.extractfile(member).read())
    assert sqlite3.connect(out).execute("SELECT name FROM versions").fetchall() == [("v1",)]
    writer.close()


def test_no_engine_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'absent.sock'}")
    with pytest.raises(docker_platform.DockerPlatformError, match="container-engine --service"):
        docker_platform.docker_client()


def test_container_names_are_safe_for_any_run_id() -> None:
    assert docker_platform._short("Run 42/Ü:x") == "run-42---x"  # noqa: SLF001
    assert len(docker_platform._short("x" * 300)) == 40  # noqa: SLF001


# ---------------------------------------------------------------- the whole run, in images


def _engine_or_skip():
    try:
        client = docker_platform.docker_client()
    except docker_platform.DockerPlatformError as err:
        pytest.skip(f"no Docker API here ({err})")
    missing = docker_platform.missing_images(client, [images.image(step) for step in images.STEPS])
    if missing:
        pytest.skip(f"images not built: {', '.join(missing)} (./build_images.sh --skip-s3a-jars)")
    return client


@pytest.mark.slow
def test_pipeline_runs_with_every_step_in_its_image_and_the_predictor_container_answers(tmp_path: Path) -> None:
    client = _engine_or_skip()
    port = free_port()
    settings = Settings.from_env({"FRAUD_HOME": str(tmp_path / "home"), "FRAUD_SERVE_PORT": str(port),
                                  "FRAUD_MIN_ROC_AUC": "0.5"})
    result = docker_platform.run_in_images(settings, users=3000, seed=7, serve_forever=False)

    answer = result["answer"]
    assert answer["user_id"] == result["user"] and 0.0 <= answer["prediction"][0][0] <= 1.0
    assert answer["model_name"] == "fraud-detection" and answer["model_version"]
    # Every step ran in the image its component names, and kept its log.
    log = Path(result["pipeline_log"]).read_text()
    for step in ("pipeline", "feature-engineering", "train"):
        assert f"Found image '{images.image(step)}'" in log
    logs = {Path(p).name for p in result["step_logs"]}
    assert {"spark.log", "predictor.log"} <= logs
    spark_log = next(Path(p) for p in result["step_logs"] if p.endswith("spark.log")).read_text()
    assert "prepared" in spark_log and "--skip-s3a-jars" in spark_log
    assert Path(result["predictor_log"]).is_file()
    # The registered version records the code version baked into the train image.
    registry = sqlite3.connect(Path(settings.home) / "docker" / "state" / "registry.db")
    (metadata,) = registry.execute("SELECT metadata FROM model_version ORDER BY id DESC LIMIT 1").fetchone()
    revision = client.images.get(images.image("train")).labels["org.opencontainers.image.revision"]
    assert json.loads(metadata)["code_version"] == f"git:{revision}"
    # Nothing of the run is left running.
    assert not client.containers.list(filters={"label": f"{docker_platform.LABEL}=docker"})
