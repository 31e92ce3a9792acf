import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sae_factory import write_sae  # noqa: E402


@pytest.fixture(scope="session")
def random_sae_dir(tmp_path_factory) -> Path:
    """A random TopK SAE on layer 15 of the default model (d_in 576), with a max table."""
    return write_sae(tmp_path_factory.mktemp("sae") / "topk", d_sae=1024)


@pytest.fixture
def anyio_backend():
    """Async tests (marked anyio) run on asyncio, as vLLM's server does."""
    return "asyncio"
