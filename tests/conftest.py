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
