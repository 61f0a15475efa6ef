"""The docker platform: the same pipeline with every step in its own image, no cluster.

``fraud-detection run --platform docker`` runs ``pipeline/fraud-detection-e2e.py`` with kfp.local's
``DockerRunner`` against a Docker API (podman's ``system service`` here: ``DOCKER_HOST``). Each
component runs in the image its ``base_image`` names. Where the cluster creates a SparkApplication
or an InferenceService, the launcher steps (pipeline image) start a container of the Spark image
or the predictor image through the same API (:func:`run_spark_job`, :func:`start_predictor`).

What stands in for the cluster's services:

* S3: a real S3 server (the one ``S3_ENDPOINT_URL`` names, else moto's server mode started here)
  holds everything the steps write: raw and prepared data, models, the Feast snapshot.
* Spark reads and writes through the S3 client, not s3a: the image is built without the
  hadoop-aws jars here (no Maven access), so the job runs ``local[*]`` and stages its input and
  output in the container's own temporary folder.
* The Model Registry server and the steps' shared Feast registry: a SQLite registry and the Feast
  folder in one host directory mounted into the step containers (like a volume). The predictor
  gets a consistent copy of the registry file inside its container, nothing mounted: its model
  and features come by ``s3://`` URI.

Settings are the ConfigMap's and Secrets' (``manifests/config/*.env``), with the endpoints of this
machine put in; the containers use the host network so that ``127.0.0.1`` means the same to all.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sqlite3
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Mapping, TextIO

from fraud_common.logs import get_logger
from fraud_common.settings import Settings

log = get_logger(__name__)

# Where the launcher steps find the Docker API inside their container (the host socket, mounted).
SOCKET_IN_CONTAINER = "/var/run/docker.sock"
DEFAULT_SOCKET = "/tmp/podman.sock"
# What the embedded ModelServer answers on (rest_predictor.metrics.MODEL_NAME).
SERVED_MODEL = "onnx-model"
PREDICTOR_PREFIX = "fraud-detection-predictor-"
SPARK_PREFIX = "fraud-detection-prepare-"
LABEL = "io.fraud-detection.platform"
# The registry copy handed to the predictor container (inside it, not on the host).
PREDICTOR_REGISTRY = "/tmp/registry/registry.db"
BUCKET = "fraud-detection"
REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "manifests" / "config"


class DockerPlatformError(RuntimeError):
    """The docker platform cannot run here (no engine, a missing image, a failed container)."""


# ---------------------------------------------------------------- shared by both sides


def docker_client() -> Any:
    """A Docker API client from ``DOCKER_HOST`` (or podman's socket at the default path)."""
    import docker

    if not os.environ.get("DOCKER_HOST") and Path(DEFAULT_SOCKET).exists():
        os.environ["DOCKER_HOST"] = f"unix://{DEFAULT_SOCKET}"
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except Exception as exc:  # docker raises DockerException or requests' errors
        raise DockerPlatformError(
            f"no Docker API answers at {os.environ.get('DOCKER_HOST', 'the default socket')}: "
            f"start one with `container-engine --service` and export DOCKER_HOST ({exc.__class__.__name__})"
        ) from None
    return client


def _replace_container(client: Any, name: str) -> None:
    """Remove a container of that name (a previous run's, or the version being rolled)."""
    import docker

    try:
        old = client.containers.get(name)
    except docker.errors.NotFound:
        return
    log.info("removing the previous container %s", name)
    old.remove(force=True)


def _save_logs(container: Any, path: Path) -> Path:
    """Write a container's whole output (stdout and stderr) to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(container.logs(stdout=True, stderr=True))
    return path


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------- launchers (pipeline image)


def run_spark_job(
    settings: Settings, image: str, run_id: str, timeout_seconds: int, log_path: Path, *, input_uri: str, output_uri: str
) -> dict[str, Any]:
    """Run data preparation from ``input_uri`` to ``output_uri`` as a ``local[*]`` Spark job in a
    container of ``image``; wait for it.

    The docker form of ``k8s.launch_spark_preparation``: same image, same arguments, the step's
    settings as env. The container's whole log is written to ``log_path``.
    """
    client = docker_client()
    name = SPARK_PREFIX + _short(run_id)
    _replace_container(client, name)
    command = ["python", "-m", "data_preparation.main", "--input", input_uri,
               "--output", output_uri, "--master", "local[*]"]
    log.info("starting %s (%s): %s", name, image, " ".join(command[2:]))
    container = client.containers.run(
        image, command=command, name=name, detach=True, environment=settings.to_env(),
        network_mode="host", labels={LABEL: "docker", "io.fraud-detection.run-id": run_id},
    )
    try:
        exit_code = _wait(container, timeout_seconds)
        _save_logs(container, log_path)
    finally:
        container.remove(force=True)
    if exit_code != 0:
        raise DockerPlatformError(f"the Spark container {name} exited with {exit_code}; its log ({log_path}) ends:\n{_tail(log_path)}")
    return {"spark_container": name, "image": image, "state": "COMPLETED", "log": str(log_path)}


def _wait(container: Any, timeout_seconds: int) -> int:
    """The container's exit code; kill it past the timeout."""
    try:
        return int(container.wait(timeout=timeout_seconds)["StatusCode"])
    except Exception as exc:  # requests' ReadTimeout (or ConnectionError) from the API client
        container.kill()
        raise DockerPlatformError(f"{container.name} did not finish within {timeout_seconds}s ({exc.__class__.__name__})") from None


def registry_snapshot(registry_path: str | Path) -> bytes:
    """A tar holding a consistent copy of the SQLite registry (WAL included) as ``registry/registry.db``."""
    with tempfile.TemporaryDirectory(prefix="registry-copy-") as tmp:
        copy = Path(tmp) / "registry.db"
        with sqlite3.connect(f"file:{registry_path}?mode=ro", uri=True) as source, sqlite3.connect(copy) as target:
            source.backup(target)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for member, path in (("registry", None), ("registry/registry.db", copy)):
                info = tarfile.TarInfo(member)
                # The image's user (1001, group 0) owns it; group-writable for an arbitrary UID.
                info.uid, info.gid, info.mtime = 1001, 0, int(time.time())
                if path is None:
                    info.type, info.mode = tarfile.DIRTYPE, 0o775
                    tar.addfile(info)
                else:
                    data = path.read_bytes()
                    info.size, info.mode = len(data), 0o664
                    tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()


def predictor_env(settings: Settings, model_name: str, model_version: str, feast_snapshot_uri: str = "") -> dict[str, str]:
    """The predictor container's env: the step's settings, the version to serve, nothing host-local."""
    env = settings.to_env()
    env.update({
        "FRAUD_HOME": "/tmp/fraud-detection",
        "FRAUD_MODEL_NAME": model_name,
        "FRAUD_SERVE_MODEL_VERSION": model_version,
        "FRAUD_SERVE_HOST": "0.0.0.0",
        "FRAUD_SERVE_PORT": str(settings.serve_port),
        "FRAUD_FEAST_DIR": "/tmp/feast",
        "FRAUD_FEAST_SNAPSHOT_URI": feast_snapshot_uri,
    })
    if settings.registry_backend == "local":
        env["FRAUD_REGISTRY_URI"] = PREDICTOR_REGISTRY
    return env


def start_predictor(
    settings: Settings,
    image: str,
    service_name: str,
    model_name: str,
    model_version: str,
    timeout_seconds: int,
    log_path: Path,
    *,
    feast_snapshot_uri: str = "",
) -> str:
    """Start (or roll) the predictor container on ``settings.serve_port``; return its URL once ready.

    The docker form of ``k8s.launch_inference_service``. With the local registry the container
    gets a copy of the registry file (put into it before it starts); the model and the Feast
    snapshot it fetches by URI. The log so far is written to ``log_path``.
    """
    client = docker_client()
    name = PREDICTOR_PREFIX + service_name
    _replace_container(client, name)
    container = client.containers.create(
        image, name=name, environment=predictor_env(settings, model_name, model_version, feast_snapshot_uri), network_mode="host",
        labels={LABEL: "docker", "io.fraud-detection.model-version": f"{model_name}:{model_version}"},
    )
    if settings.registry_backend == "local":
        container.put_archive("/tmp", registry_snapshot(settings.registry_uri))
    container.start()
    url = f"http://127.0.0.1:{settings.serve_port}"
    try:
        _wait_ready(container, f"{url}/v1/models/{SERVED_MODEL}", timeout_seconds)
    finally:
        _save_logs(container, log_path)
    log.info("predictor %s serves %s version %s at %s", name, model_name, model_version, url)
    return url


def _wait_ready(container: Any, url: str, timeout_seconds: float) -> None:
    """Poll the model's readiness route; fail early if the container exits."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        container.reload()
        if container.status in ("exited", "dead"):
            raise DockerPlatformError(f"the predictor container {container.name} exited before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200 and json.loads(response.read()).get("ready"):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise DockerPlatformError(f"the predictor container {container.name} was not ready at {url} within {timeout_seconds:.0f}s")


def _short(run_id: str) -> str:
    """A container-name-safe part of a run id."""
    cleaned = "".join(ch if ch.isascii() and ch.isalnum() else "-" for ch in run_id.lower()).strip("-")
    return cleaned[-40:] or "run"


# ---------------------------------------------------------------- host side (the CLI)


def cluster_env(config_dir: Path = CONFIG_DIR) -> dict[str, str]:
    """What the ConfigMap and the registry Secret give every step on the cluster (manifests/config).

    The S3 keys are not among them: setup.sh generates them per cluster; ``step_env`` adds this
    machine's."""
    env: dict[str, str] = {}
    for name in ("settings.env", "registry.dev.env"):
        path = config_dir / name
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                env[key.strip()] = value.strip()
    return env


def step_env(settings: Settings, state_dir: Path, s3: Mapping[str, str]) -> dict[str, str]:
    """Every step container's env: the cluster's settings with this machine's endpoints put in."""
    env = cluster_env()
    env.update({
        "FRAUD_HOME": str(state_dir),
        "FRAUD_DATA_URI": f"s3://{BUCKET}/data",
        "FRAUD_MODELS_URI": f"s3://{BUCKET}/models",
        "FRAUD_FEAST_SNAPSHOT_URI": f"s3://{BUCKET}/feast",
        # The cluster's registry and per-pod Feast folder, here one mounted folder.
        "FRAUD_REGISTRY_BACKEND": "local",
        "FRAUD_REGISTRY_URI": str(state_dir / "registry.db"),
        "FRAUD_REGISTRY_PORT": str(settings.registry_port),
        "FRAUD_FEAST_DIR": str(state_dir / "feast"),
        # No Redis here: the online store is the file store in that folder, as on one machine.
        "FRAUD_ONLINE_STORE_URL": "",
        "FRAUD_MODEL_NAME": settings.model_name,
        "FRAUD_MIN_ROC_AUC": repr(settings.min_roc_auc),
        "FRAUD_SERVE_PORT": str(settings.serve_port),
        "FRAUD_LOG_LEVEL": settings.log_level,
        "DOCKER_HOST": f"unix://{SOCKET_IN_CONTAINER}",
        **s3,
    })
    return env


def missing_images(client: Any, refs: list[str]) -> list[str]:
    """The image references that the engine does not have locally."""
    import docker

    missing = []
    for ref in refs:
        try:
            client.images.get(ref)
        except docker.errors.ImageNotFound:
            missing.append(ref)
    return missing


class _Tee(io.TextIOBase):
    """Writes to the terminal and to a log file (kfp.local prints every container's output)."""

    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)


class S3Server:
    """The S3 endpoint of the run: ``S3_ENDPOINT_URL`` if set, else moto's server mode on a free port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._server: Any = None

    def __enter__(self) -> dict[str, str]:
        if self.settings.s3_endpoint:
            return {"S3_ENDPOINT_URL": self.settings.s3_endpoint, "AWS_ACCESS_KEY_ID": self.settings.s3_access_key,
                    "AWS_SECRET_ACCESS_KEY": self.settings.s3_secret_key, "AWS_DEFAULT_REGION": self.settings.s3_region}
        try:
            from moto.server import ThreadedMotoServer
        except ImportError:
            raise DockerPlatformError("the docker platform needs an S3 server: set S3_ENDPOINT_URL or install moto[server]") from None
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self._server.start()
        log.info("S3 server (moto) on 127.0.0.1:%d", port)
        return {"S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "docker-platform",
                "AWS_SECRET_ACCESS_KEY": "docker-platform", "AWS_DEFAULT_REGION": self.settings.s3_region}

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()


def docker_runner(step_environment: Mapping[str, str], state_dir: Path) -> Any:
    """kfp.local's DockerRunner: host network, the settings as env, the state folder and the API socket.

    The runner's options hold for every step container (kfp.local has no per-task options), so all
    of them see the socket; on the cluster only the launcher steps' service account may create pods.
    """
    import docker
    from kfp import local

    socket_path = os.environ.get("DOCKER_HOST", f"unix://{DEFAULT_SOCKET}").removeprefix("unix://")
    share_socket_with_group_0(Path(socket_path))
    mounts = [
        docker.types.Mount(target=str(state_dir), source=str(state_dir), type="bind"),
        docker.types.Mount(target=SOCKET_IN_CONTAINER, source=socket_path, type="bind"),
    ]
    return local.DockerRunner(network_mode="host", environment=dict(step_environment), mounts=mounts)


def share_socket_with_group_0(socket: Path) -> None:
    """Let the launcher steps (UID 1001, group 0) use the API socket that root's podman made 0600."""
    mode = socket.stat().st_mode
    if mode & 0o060 != 0o060 and socket.stat().st_uid == os.geteuid():
        socket.chmod(mode | 0o060)
        log.info("made %s group-0 read/writable for the launcher steps", socket)


def prepare_host_dirs(root: Path) -> tuple[Path, Path, Path]:
    """``runs/``, ``state/`` and ``logs/`` below ``root``, writable by the images' group 0."""
    dirs = tuple(root / name for name in ("runs", "state", "logs"))
    for path in dirs:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o2775)
    return dirs  # type: ignore[return-value]


def upload_raw(settings: Settings, users: int, seed: int, data_uri: str) -> None:
    """Generate the raw CSVs on the host and upload them (what setup.sh's data load does)."""
    from fraud_common import storage
    from synthetic_data_generation.generate import generate

    with tempfile.TemporaryDirectory(prefix="fraud-generate-") as tmp:
        generate(Path(tmp) / "raw", users=users, seed=seed, progress=False)
        storage.ensure_bucket(BUCKET, settings)
        storage.upload(Path(tmp) / "raw", f"{data_uri}/raw", settings)


def predict_once(url: str, user: str, timeout: float = 10.0) -> dict[str, Any]:
    """The README's curl, from Python: POST ``{"user_id": user}`` and return the JSON answer."""
    request = urllib.request.Request(
        f"{url}/v1/models/{SERVED_MODEL}:predict", data=json.dumps({"user_id": user}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def run_in_images(settings: Settings, users: int, seed: int = 42, serve_forever: bool = True) -> dict[str, Any]:
    """Run the whole pipeline with every step in its image; return what happened.

    With ``serve_forever`` the predictor container keeps serving until Ctrl-C (the S3 server
    lives in this process); otherwise it is stopped once it has answered one request.
    """
    from kfp import local

    from pipeline import images
    from pipeline.cli import example_user, load_pipeline_module

    client = docker_client()
    refs = [images.image(step) for step in images.STEPS]
    missing = missing_images(client, refs)
    if missing:
        raise DockerPlatformError(f"images not built: {', '.join(missing)}; run ./build_images.sh --skip-s3a-jars first")
    root = settings.home / "docker"
    runs, state, logs = prepare_host_dirs(root)
    started = time.monotonic()
    result: dict[str, Any] = {"images": {ref: client.images.get(ref).id for ref in refs}, "logs": str(logs)}
    with S3Server(settings) as s3:
        env = step_env(settings, state, s3)
        host_settings = Settings.from_env(env)
        data_uri = env["FRAUD_DATA_URI"]
        generated = time.monotonic()
        upload_raw(host_settings, users, seed, data_uri)
        result["generate_seconds"] = round(time.monotonic() - generated, 1)
        local.init(runner=docker_runner(env, state), pipeline_root=str(runs), raise_on_error=True)
        module = load_pipeline_module()
        pipeline_log = logs / "pipeline.log"
        umask = os.umask(0o002)  # kfp.local makes the task folders here; the steps (group 0) write in them
        try:
            with pipeline_log.open("w") as handle, contextlib.redirect_stdout(_Tee(sys.stdout, handle)):
                ran = time.monotonic()
                module.fraud_detection_pipeline(
                    data_uri=data_uri, model_name=settings.model_name, min_roc_auc=settings.min_roc_auc,
                    platform="docker", spark_image=images.image("data-preparation"),
                    predictor_image=images.image("rest-predictor"), service_name="fraud-detection",
                    serve_timeout_seconds=300,
                )
                result["pipeline_seconds"] = round(time.monotonic() - ran, 1)
        finally:
            os.umask(umask)
        result["pipeline_log"] = str(pipeline_log)
        url = f"http://127.0.0.1:{settings.serve_port}"
        user = example_user(host_settings.with_overrides(data_uri=data_uri))
        result.update(url=url, user=user, answer=predict_once(url, user))
        result["seconds_to_first_answer"] = round(time.monotonic() - started, 1)
        result["step_logs"] = sorted(str(p) for p in runs.rglob("*.log"))
        container = client.containers.get(PREDICTOR_PREFIX + "fraud-detection")
        print(f"\nPredictor container {container.name} answered: {json.dumps(result['answer'])}\nTry:\n"
              f"  curl -X POST localhost:{settings.serve_port}/v1/models/{SERVED_MODEL}:predict "
              f"-H 'Content-Type: application/json' -d '{{\"user_id\": \"{user}\"}}'\n", flush=True)
        try:
            if serve_forever:
                print("Serving until Ctrl-C (the S3 server lives in this process).", flush=True)
                container.wait()
        except KeyboardInterrupt:
            pass
        finally:
            _save_logs(container, logs / "predictor.log")
            container.remove(force=True)
    result["predictor_log"] = str(logs / "predictor.log")
    (logs / "run.json").write_text(json.dumps(result, indent=2, default=str))
    return result
