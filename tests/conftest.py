import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from engines import Server  # noqa: E402
from sae_factory import write_gguf, write_sae  # noqa: E402


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
    folder = tmp_path_factory.mktemp("feature_server")
    # a steered variant (the README's example clamp), for the playground's model choice
    (folder / "god.json").write_text(json.dumps({"feature_clamps": [{"feature": 1924, "value": 3, "unit": "max",
                                                                     "tokens": "prompt"}]}))
    # and a steering vector (a random unit direction at layer 15), for the playground's vector editor
    direction = np.random.default_rng(1).normal(size=576).astype(np.float32)
    write_gguf(folder / "push.gguf", {"direction.15": direction / np.linalg.norm(direction)})
    srv = Server(["--variant", f"god={folder / 'god.json'}", "--vector", f"push={folder / 'push.gguf'}"],
                 folder / "server.log").wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def http(feature_server):
    import httpx

    with httpx.Client(base_url=feature_server.base_url, timeout=300) as c:
        yield c


THREE_SAES_KEY = "sk-steer-test"
"""The API key of the `three_saes` server: the one server of the suite started with --api-key."""


@pytest.fixture(scope="session")
def own_catalogue(tiny_model, tmp_path_factory):
    """A tiny Qwen2 and an SAE written by sae-lens (JumpReLU, 128 features, blocks.2.hook_resid_pre:
    the output of layer 1) in a read-only folder, and the catalogue the three steer-catalogue commands
    made for it elsewhere (own_catalogue.py). Yields (model, SAE folder, catalogue folder, reports)."""
    import own_catalogue
    from sae_factory import written_by
    from tiny_models import HIDDEN

    root = tmp_path_factory.mktemp("own")
    model = tiny_model("qwen2")
    sae = own_catalogue.read_only_copy(written_by("fixtures_saelens.py", root / "saelens", HIDDEN) / "jumprelu",
                                       root / "shared-cache" / "jumprelu")
    reports = own_catalogue.make(model, sae, root / "catalogue")
    return model, sae, root / "catalogue", reports


@pytest.fixture(scope="session")
def three_saes(own_catalogue, tmp_path_factory):
    """The tiny Qwen2 of `own_catalogue` with SAEs written by sae-lens (that one, with the catalogue
    built for it), eai-sparsify (TopK, layers.0) and in Gemma Scope's layout (layer_2), those two
    without a catalogue, served by server.py with --api-key. Yields the server and an httpx client
    that sends the key."""
    import httpx

    from sae_factory import write_gemma_scope, written_by
    from tiny_models import HIDDEN

    model, saelens, catalogue, _ = own_catalogue
    root = tmp_path_factory.mktemp("three")
    sparsify = written_by("fixtures_sparsify.py", root / "sparsify", HIDDEN, 0) / "layers.0"
    gemma = root / "gemma-scope" / "layer_2" / "width_16k" / "average_l0_10"
    write_gemma_scope(gemma, d_in=HIDDEN, d_sae=256)
    args = ["--model", str(model), "--max-model-len", "512", "--kv-cache-gib", "1",
            "--max-clamps", "4", "--sae", f"lens={saelens}", "--catalogue", f"lens={catalogue}",
            "--sae", f"sparsify={sparsify}", "--sae", f"scope={gemma}", "--", "--api-key", THREE_SAES_KEY]
    server = Server(args, root / "server.log").wait_ready()
    with httpx.Client(base_url=server.base_url, timeout=300,
                      headers={"Authorization": f"Bearer {THREE_SAES_KEY}"}) as http:
        yield server, http
    server.stop()
