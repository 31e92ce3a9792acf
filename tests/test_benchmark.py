"""The benchmark script runs end to end in quick mode (no assertion on any timing)."""

import json
import subprocess
import sys

import pytest

from engines import REPO

pytestmark = pytest.mark.slow


def test_quick_benchmark_writes_json_markdown_and_plot(random_sae_dir, tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_serving.py"), "--quick",
                             "--sae", str(random_sae_dir), "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {(r["server"], r["workload"]) for r in report["rows"]} >= {("vanilla", "none"), ("plugin", "distinct")}
    assert all(r["tok_per_s"] > 0 for r in report["rows"])
    assert [hf["batch"] for hf in report["hf_baseline"]] == [4] and report["hf_baseline"][0]["tok_per_s"] > 0
    assert report["op_profile"]["plugin"]["op_calls"] > 0
    for name in ("results.json", "results.md", "ratios.png"):
        assert (out / name).stat().st_size > 0
