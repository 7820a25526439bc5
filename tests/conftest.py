"""Shared fixtures: the embedded tiny model (trained on synthetic shapes) in float32 on the CPU."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipelines.config import load_config  # noqa: E402
from pipelines.core import StreamingVideoPipeline  # noqa: E402
from pipelines.loading.weights import load_components  # noqa: E402

logging.getLogger("diffusers").setLevel(logging.ERROR)
# Apps the tests start (in this process or as `python app.py`) keep their outputs and run log in a temporary
# folder, never in the user's outputs/.
os.environ["SF_OUTPUTS_DIR"] = tempfile.mkdtemp(prefix="sf-test-outputs-")


@pytest.fixture(scope="session")
def tiny_config():
    return load_config(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_components(tiny_config):
    return load_components(tiny_config)


@pytest.fixture(scope="session")
def random_config():
    """Seeded random weights, no files: for tests that write checkpoints of the model on the fly."""
    return load_config(ROOT / "configs" / "tiny_random.yaml")


@pytest.fixture(scope="session")
def random_components(random_config):
    return load_components(random_config)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_components, tiny_config):
    return StreamingVideoPipeline(tiny_components, tiny_config)


@pytest.fixture(scope="session")
def app_server():
    from app_server import AppServer

    server = AppServer()
    yield server
    server.stop()
