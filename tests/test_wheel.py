"""The serving wheel: what it holds (the serving package only: no workbench module, no top-level
module of its own but `steer_plugin`), and that `pip install .` (a wheel, not editable) gives a
working `steer-server` that finds the shipped SAE, and a `steer-vllm` that starts where `vllm` cannot."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from engines import REPO, Server



@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
                    "-w", str(out)], check=True, capture_output=True, timeout=600)
    (built,) = out.glob("steer_plugin-*.whl")
    return built


def test_the_wheel_holds_the_serving_package_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"steer_plugin", wheel.name.split("-py")[0] + ".dist-info"}
    assert not [n for n in names if "workbench" in n or "training" in n]
    metadata = wheel.name.split("-py")[0] + ".dist-info"
    assert zipfile.ZipFile(wheel).read(f"{metadata}/top_level.txt").decode().split() == ["steer_plugin"]
    scripts = zipfile.ZipFile(wheel).read(f"{metadata}/entry_points.txt").decode()
    assert "steer-server = steer_plugin.launcher.serve:main" in scripts
    assert "steer-vllm = steer_plugin.launcher.vllm_serve:main" in scripts


@pytest.mark.slow
def test_wheel_install_serves_and_steers_with_the_shipped_sae(tmp_path, wheel):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    # vLLM and the rest come from this venv; the plugin, its entry points and the SAE from the wheel,
    # which comes first on the path (the checkout's editable install is shadowed), run from elsewhere.
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    where = subprocess.run([sys.executable, "-c", "import steer_plugin.core.config as c; print(c.DEFAULT_SAE_DIR)"],
                           env={**os.environ, **env}, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert where.stdout.strip().startswith(str(site / "steer_plugin" / "sae_weights"))
    # `vllm serve` as `steer-vllm serve`: it starts on vLLM's CPU wheel, where the `vllm` command cannot
    usage = subprocess.run([sys.executable, str(site / "bin" / "steer-vllm"), "serve", "--help=all"],
                           env={**os.environ, **env}, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert usage.returncode == 0 and "--api-server-count" in usage.stdout + usage.stderr, usage.stderr[-2000:]

    server = Server(["--enforce-eager", "--kv-cache-gib", "1"], tmp_path / "server.log", env=env,
                    launcher=[sys.executable, str(site / "bin" / "steer-server")], cwd=tmp_path).wait_ready()
    try:
        with httpx.Client(base_url=server.base_url, timeout=300) as http:
            assert [s["id"] for s in http.get("/v1/saes").json()["data"]] == ["smollm2-135m-instruct-l15"]
            body = {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Tell me a story."}],
                    "max_tokens": 16, "temperature": 0}
            plain = http.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
            steered = http.post("/v1/chat/completions", json={
                **body, "feature_clamps": [{"feature": 4137, "value": 4, "unit": "max"}]}).json()
            assert steered["choices"][0]["message"]["content"] != plain
            # the installed catalogue answers searches: the feature labelled "God" is among the hits
            assert 4137 in [h["id"] for h in http.get("/v1/features", params={"q": "God"}).json()["data"]]
    finally:
        server.stop()
    assert f"path={site / 'steer_plugin' / 'sae_weights'}" in server.log_path.read_text()
