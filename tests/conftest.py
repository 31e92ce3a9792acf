import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from engines import Server  # noqa: E402
from sae_factory import write_sae  # noqa: E402


@pytest.fixture(scope="session")
def random_sae_dir(tmp_path_factory) -> Path:
    """A random TopK SAE on layer 15 of the default model (d_in 576), with a max table."""
    return write_sae(tmp_path_factory.mktemp("sae") / "topk", d_sae=1024)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch) -> folder of a tiny random model of that architecture (built once per session)."""
    from tiny_models import build

    root = tmp_path_factory.mktemp("tiny_models")
    return lambda arch: build(arch, root / arch)


@pytest.fixture
def anyio_backend():
    """Async tests (marked anyio) run on asyncio, as vLLM's server does."""
    return "asyncio"


@pytest.fixture(scope="session")
def feature_server(tmp_path_factory):
    """server.py with its defaults (default model and SAE, compiled mode), shared by the feature
    discovery and playground tests."""
    srv = Server([], tmp_path_factory.mktemp("feature_server") / "server.log").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def http(feature_server):
    import httpx

    with httpx.Client(base_url=feature_server.base_url, timeout=300) as c:
        yield c
