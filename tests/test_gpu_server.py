"""server.py on a CUDA GPU with CUDA graphs on (vLLM's default there): steering, feature metrics,
`return_features` and inspection all work on the graph path, and a step with more clamped features
than the graph slice holds runs without graphs and replies the same. Skipped without a GPU."""

from __future__ import annotations

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from engines import Server
from sae_factory import write_sae
from tiny_models import HIDDEN

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TEXT = "Once upon a time, in a land far away"
STRONG = [{"feature": 3, "value": 60.0}]
IDENTITY = [{"feature": 3, "value": 1.0, "mode": "scale"}]
WIDE = STRONG + [{"feature": f, "value": 1.0, "mode": "scale"} for f in (20, 21, 22, 23)]  # 5 > 4 features


@pytest.fixture(scope="module")
def gpu_server(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    sae = write_sae(root / "sae", architecture="jumprelu", d_in=HIDDEN, d_sae=256, layer=1)
    server = Server(["--model", str(tiny_model("llama")), "--max-model-len", "512", "--sae", str(sae),
                     "--metrics-sample-every", "1", "--graph-columns", "4"], root / "server.log").wait_ready()
    with httpx.Client(base_url=server.base_url, timeout=300) as http:
        yield server, http
    server.stop()


def _text(http, clamps=None, **extra) -> dict:
    body = {"model": "SmolLM2-135M-Instruct", "prompt": TEXT, "max_tokens": 8, "temperature": 0, **extra}
    if clamps is not None:
        body["feature_clamps"] = clamps
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _scrape(server) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(httpx.get(f"{server.base_url}/metrics").text)
            for s in family.samples}


def test_steering_under_cuda_graphs(gpu_server):
    server, http = gpu_server
    assert "graph_safe=True" in server.log_path.read_text()
    plain = _text(http)["text"]
    assert _text(http, IDENTITY)["text"] == plain
    strong = _text(http, STRONG)["text"]
    assert strong != plain
    assert _text(http, WIDE)["text"] == strong  # a step without graphs, the same reply


def test_metrics_and_recording_under_cuda_graphs(gpu_server):
    server, http = gpu_server
    before = _scrape(server)
    choice = _text(http, STRONG, return_features=4)
    assert len(choice["features"]) == 8 and all(1 <= len(f["features"]) <= 4 for f in choice["features"])
    assert all(f["features"][0]["id"] == 3 for f in choice["features"])  # the clamped feature leads
    inspected = http.post("/v1/features/inspect", json={"text": TEXT, "top_k": 2}).json()
    assert inspected["num_tokens"] == len(inspected["tokens"]) > 0
    _text(http)  # one more step, so every sampled step's counts have landed
    after = _scrape(server)
    sampled = ("steer_feature_sampled_tokens_total", (("sae", "sae"),))
    assert after[sampled] > before.get(sampled, 0)
    active = ("steer_feature_active_tokens_total", (("feature", "3"), ("sae", "sae")))
    assert after[active] - before.get(active, 0) >= 8  # clamped on every generated token


def test_the_kv_cache_is_sized_after_the_saes_are_on_the_gpu(tiny_model, tmp_path):
    """vLLM sizes its KV cache from the memory left once the model is loaded; the SAEs are loaded with
    it (in Worker.load_model), so a 1 GiB SAE shrinks the KV cache by about 1 GiB of blocks instead of
    overcommitting the GPU."""
    from engines import offline_llm

    model = str(tiny_model("llama"))
    sae = write_sae(tmp_path / "wide", architecture="jumprelu", d_in=HIDDEN, d_sae=2**20, layer=1)
    blocks = {}
    for name, saes in (("vanilla", None), ("plugin", sae)):
        with offline_llm(saes, plugin=saes is not None, model=model, max_model_len=512, dtype="float32",
                         gpu_memory_utilization=0.3) as llm:
            blocks[name] = llm.llm_engine.vllm_config.cache_config.num_gpu_blocks
    block_bytes = 2 * 3 * 16 * 2 * (HIDDEN // 2) * 4  # K and V, 3 layers, 16 tokens, 2 heads of 64, float32
    sae_bytes = 4 * (2 * HIDDEN * 2**20 + 2 * 2**20 + HIDDEN)  # W_enc, W_dec, b_enc, threshold, b_dec
    assert (blocks["vanilla"] - blocks["plugin"]) * block_bytes >= 0.9 * sae_bytes, blocks
