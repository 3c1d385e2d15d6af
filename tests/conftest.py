"""Test fixtures: one real Prefect server per session, tiny models, generated datasets."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Before anything imports prefect or transformers: no hub, a private model cache, a patient server.
_HOME = Path(tempfile.mkdtemp(prefix="loraflow-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_HOME / "hf")
os.environ.setdefault("LORAFLOW_HOME", str(_HOME / "loraflow"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
if os.environ.get("PYTEST_XDIST_WORKER"):  # two test processes on two cores: one torch thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
    shutil.rmtree(_HOME, ignore_errors=True)


@pytest.fixture
def shapes(tmp_path) -> Path:
    from loraflow.dataset import generate_shapes

    folder = tmp_path / "shapes"
    generate_shapes(folder, variants=1)
    return folder


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 120) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3 server on loopback (what s3fs's own tests use), as a real process.

    Credentials are read from the environment by s3fs/botocore, as on a real worker; the secret
    key is planted so tests can check it never leaks.
    """
    import subprocess
    import sys

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "loraflow-test-key", "AWS_SECRET_ACCESS_KEY": ENV_SECRET,
                       "AWS_DEFAULT_REGION": "us-east-1"})
    try:
        wait_for(endpoint + "/moto-api/")
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)


ENV_SECRET = "env-planted-secret-7f3a9c"
