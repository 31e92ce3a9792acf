"""The server in vLLM's distributed shapes, each on this one machine as it runs across hosts: data
parallel (two engines behind vLLM's load balancer, and with the second engine on a `--headless`
node), several API servers, and pipeline / tensor parallel over two node processes (`--nnodes 2`).
In every shape: steering takes effect, identity clamps and unsteered requests are bit-identical,
`return_features` comes back on every request and inspection answers every time, whichever engine
ran them, and the workers' metrics reach /metrics from every engine and node, counted once.

Tiny random models (the default model's 9 heads do not split over two ranks); configuration only
through `--additional-config` (server.py), never the environment.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engines import Server
from sae_factory import write_sae
from server_process import free_port
from tiny_models import HIDDEN

pytestmark = pytest.mark.slow

PROMPT = "Once upon a time, in a land far away"
STRONG = [{"feature": 3, "value": 60.0}]
IDENTITY = [{"feature": 3, "value": 1.0, "mode": "scale"}]
REQUESTS = 6
"""Concurrent requests per check: enough that vLLM's balancer sends some to every engine."""


def _scrape(server: Server) -> dict:
    """/metrics as a Prometheus server reads it (gzip asked for, as Prometheus does)."""
    r = httpx.get(f"{server.base_url}/metrics", headers={"Accept-Encoding": "gzip"}, timeout=60)
    assert r.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(r.text) for s in f.samples}


def _complete(http: httpx.Client, clamps=None, **extra) -> dict:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, **extra}
    if clamps is not None:
        body["feature_clamps"] = clamps
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _concurrently(fn, n: int = REQUESTS) -> list:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: fn(), range(n)))


def _counter(scrape: dict, name: str, **labels) -> float:
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


def check_serving(server: Server, sae: str, engines: int) -> None:
    """The checks every shape passes. engines: how many engines serve (each must have run requests)."""
    with httpx.Client(base_url=server.base_url, timeout=300) as http:
        plain = _complete(http)["text"]
        before = _scrape(server)
        steered = _concurrently(lambda: _complete(http, STRONG)["text"])
        identity = _concurrently(lambda: _complete(http, IDENTITY)["text"])
        assert set(steered) != {plain} and len(set(steered)) == 1, (plain, steered)
        assert identity == [plain] * REQUESTS
        assert _concurrently(lambda: _complete(http)["text"]) == [plain] * REQUESTS

        recorded = _concurrently(lambda: _complete(http, STRONG, return_features=3)["features"])
        assert all([f["index"] for f in features] == list(range(8)) for features in recorded), recorded
        streamed = http.post("/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 4,
                                                      "temperature": 0, "stream": True, "return_features": 2})
        assert streamed.status_code == 200 and '"steer.features"' in streamed.text

        assert [s["id"] for s in http.get("/v1/saes").json()["data"]] == [sae]  # the API servers' own routes
        inspected = _concurrently(lambda: http.post("/v1/features/inspect", json={"text": PROMPT, "top_k": 2}))
        assert all(r.status_code == 200 and r.json()["num_tokens"] == len(r.json()["tokens"]) > 0
                   for r in inspected), [r.text[:200] for r in inspected]

        after = _scrape(server)
        clamps = 2 * REQUESTS + REQUESTS  # set clamps: steered and recorded requests; scale: identity
        set_before = _counter(before, "steer_clamps_applied_total", sae=sae, mode="set")
        scale_before = _counter(before, "steer_clamps_applied_total", sae=sae, mode="scale")
        assert _counter(after, "steer_clamps_applied_total", sae=sae, mode="set") - set_before == 2 * REQUESTS
        assert _counter(after, "steer_clamps_applied_total", sae=sae, mode="scale") - scale_before == clamps - 2 * REQUESTS
        assert _counter(after, "steer_steered_tokens_total", sae=sae) > _counter(before, "steer_steered_tokens_total", sae=sae)
        assert any(name == "steer_sae_info" for name, _ in after)
        ran = {dict(labels).get("engine") for (name, labels), value in after.items()
               if name == "vllm:request_success_total" and value > 0}
        assert len(ran) == engines, ran  # requests reached every engine


@pytest.fixture(scope="module")
def model_and_sae(tiny_model, tmp_path_factory):
    """A tiny Llama (3 layers) and an SAE on its last layer: under pipeline parallel 2, on the second
    node's rank, so recordings and metrics come from the other node."""
    sae = write_sae(tmp_path_factory.mktemp("dist") / "dist_sae", architecture="jumprelu", d_in=HIDDEN, d_sae=256,
                    layer=2)
    return str(tiny_model("llama")), str(sae)


def _plugin_args(model: str, sae: str, *vllm: str) -> list[str]:
    return ["--model", model, "--served-model-name", "m", "--max-model-len", "512", "--kv-cache-gib", "1",
            "--sae", sae, "--", *vllm]


def test_data_parallel_2_behind_the_load_balancer(model_and_sae, tmp_path):
    """`--data-parallel-size 2`: two engines, and (vLLM's default for it) two API servers."""
    model, sae = model_and_sae
    server = Server(_plugin_args(model, sae, "--data-parallel-size", "2", "--enforce-eager"),
                    tmp_path / "server.log").wait_ready()
    try:
        check_serving(server, "dist_sae", engines=2)
    finally:
        server.stop()


@contextmanager
def _data_parallel_over_two_nodes(model: str, sae: str, tmp_path, node1_env: dict | None = None):
    """DP 2, rank 0 and the API server on the head node, rank 1 on a `--headless` node started apart
    (as on a second host). Yields the head (not waited for)."""
    dp = ["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--data-parallel-address", "127.0.0.1",
          "--data-parallel-rpc-port", str(free_port()), "--enforce-eager"]
    with ExitStack() as stack:
        node1 = Server(_plugin_args(model, sae, *dp, "--data-parallel-start-rank", "1", "--headless"),
                       tmp_path / "node1.log", env=node1_env)
        stack.callback(node1.stop)
        head = Server(_plugin_args(model, sae, *dp), tmp_path / "head.log")
        stack.callback(head.stop)
        yield head


def test_data_parallel_2_with_the_second_engine_on_a_headless_node(model_and_sae, tmp_path):
    """The plugin on the headless node gets its configuration from --additional-config alone."""
    with _data_parallel_over_two_nodes(*model_and_sae, tmp_path) as head:
        check_serving(head.wait_ready(), "dist_sae", engines=2)


@pytest.mark.parametrize("parallel", ["--pipeline-parallel-size", "--tensor-parallel-size"])
def test_two_node_processes_split_one_engine(model_and_sae, tmp_path, parallel):
    """PP 2 / TP 2 over two node processes (`--nnodes 2 --node-rank 0|1`, vLLM's multiprocess backend),
    the head serving through two API servers. Compiled mode: eager PP crashes on CPU in vLLM 0.32."""
    model, sae = model_and_sae
    nodes = [parallel, "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
             "--distributed-executor-backend", "mp"]
    with ExitStack() as stack:
        node1 = Server(_plugin_args(model, sae, *nodes, "--node-rank", "1", "--headless"), tmp_path / "node1.log",
                       env={"VLLM_CPU_OMP_THREADS_BIND": "1"})
        stack.callback(node1.stop)
        head = Server(_plugin_args(model, sae, *nodes, "--node-rank", "0", "--api-server-count", "2"),
                      tmp_path / "head.log", env={"VLLM_CPU_OMP_THREADS_BIND": "0"})
        stack.callback(head.stop)
        check_serving(head.wait_ready(), "dist_sae", engines=1)
        head_log, node1_log = head.log_path.read_text(), node1.log_path.read_text()
        assert head_log.count("Started server process") == 2  # two API servers
        assert "action=installed sae=dist_sae" in node1_log  # the second node steers (TP: both do)
        if parallel == "--pipeline-parallel-size":  # the SAE's layer is the second node's alone
            assert "action=skip_install sae=dist_sae" in head_log


def test_a_node_without_the_plugin_stops_the_start(model_and_sae, tmp_path):
    """A headless data-parallel node whose environment has the plugin off: its engine would run steered
    requests unsteered, so the head refuses to start, naming the cause."""
    with _data_parallel_over_two_nodes(*model_and_sae, tmp_path, node1_env={"STEER_PLUGIN_DISABLE": "1"}) as head:
        with pytest.raises(RuntimeError, match="server exited"):
            head.wait_ready(timeout=600)
        assert "does not run the steering plugin" in head.log_path.read_text()


def _two_gpus_and_ray() -> bool:
    import importlib.util

    import torch

    return torch.cuda.device_count() >= 2 and importlib.util.find_spec("ray") is not None


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus_and_ray(), reason="Ray runs on GPU platforms only (vLLM's CPU platform: 'current "
                    "platform cpu does not support ray'); needs two GPUs and `pip install ray`")
def test_ray_tensor_parallel_2(model_and_sae, tmp_path):
    """Ray's executor (`--distributed-executor-backend ray`) forwards only some environment variables to
    its workers; the plugin's configuration travels in vLLM's config, so the same checks hold."""
    model, sae = model_and_sae
    server = Server(_plugin_args(model, sae, "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray"),
                    tmp_path / "server.log").wait_ready()
    try:
        check_serving(server, "dist_sae", engines=1)
    finally:
        server.stop()
