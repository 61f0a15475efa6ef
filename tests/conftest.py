"""Fixtures shared by all tests: isolated settings and a real S3-compatible server (moto)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterator

import pytest

from fraud_common.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
CRDS_DIR = SHARED_DIR / "crds"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings whose whole local state lives in this test's temporary folder."""
    return Settings.from_env({"FRAUD_HOME": str(tmp_path / "home")})


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A real S3-compatible HTTP server (moto in server mode) on a loopback port."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {
            "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "test-access-key",
            "AWS_SECRET_ACCESS_KEY": "test-secret-key",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        server.stop()


@pytest.fixture
def s3_settings(tmp_path: Path, s3_server: dict[str, str]) -> Settings:
    """Settings pointing the data root at a bucket on the test S3 server."""
    env = {"FRAUD_HOME": str(tmp_path / "home"), "FRAUD_DATA_URI": f"s3://fraud-test-{tmp_path.name[-8:].lower().replace('_', '-')}/data", **s3_server}
    return Settings.from_env(env)
