"""The benchmark script: runs end to end in quick mode (no assertion on any timing), and its GPU
command at realistic width is well formed (a dry run: no server, no SAE written)."""

import json
import subprocess
import sys

import pytest

from engines import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_serving  # noqa: E402


@pytest.mark.slow
def test_quick_benchmark_writes_json_markdown_and_plot(random_sae_dir, tmp_path):
    out = tmp_path / "bench"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_serving.py"), "--quick",
                             "--sae", str(random_sae_dir), "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert {(r["server"], r["workload"]) for r in report["rows"]} >= {
        ("vanilla", "none"), ("plugin", "distinct"), ("plugin", "features"), ("plugin+metrics", "none")}
    assert all(r["tok_per_s"] > 0 and r["steady_tok_per_s"] > 0 for r in report["rows"])
    for key in ("load_format", "hidden_size", "num_layers", "d_sae", "architecture", "device", "compile_mode"):
        assert key in report["config"]
    assert report["summary"]["idle_ratio_min"] > 0 and report["summary"]["distinct_ratio_min"] > 0
    assert report["op_profile"]["plugin"]["op_calls"] > 0 and 0 < report["op_profile"]["plugin"]["op_share"] < 1
    for name in ("results.json", "results.md", "ratios.png"):
        assert (out / name).stat().st_size > 0


def test_gpu_command_at_realistic_width_is_well_formed(tmp_path):
    plan = bench_serving.main(["--dry-run", "--out", str(tmp_path), "--model-config",
                               str(REPO / "benchmarks" / "models" / "llama-3.1-8b-shaped"),
                               "--random-sae", "jumprelu:65536", "--concurrency", "1,8,32,128", "--kv-cache-gib", "0"])
    (vanilla,), (plugin,) = plan["servers"]["vanilla"], plan["servers"]["plugin"]  # one node process each
    assert "--no-plugin" in vanilla and "--no-plugin" not in plugin
    assert plugin[plugin.index("--") + 1:] == ["--load-format", "dummy"]
    assert {w for s, w in plan["plan"] if s == "plugin"} == set(bench_serving.WORKLOADS)


def test_two_node_command_starts_a_head_and_a_headless_node(tmp_path):
    plan = bench_serving.main(["--dry-run", "--out", str(tmp_path), "--pp", "2", "--nodes", "2",
                               "--servers", "vanilla,plugin", "--workloads", "none,distinct"])
    for name, (head, node1) in plan["servers"].items():
        assert head[head.index("--"):].count("--headless") == 0 and node1[-1] == "--headless", name
        for argv, rank in ((head, "0"), (node1, "1")):
            tail = argv[argv.index("--") + 1:]
            assert tail[:2] == ["--pipeline-parallel-size", "2"] and tail[tail.index("--node-rank") + 1] == rank
            assert tail[tail.index("--nnodes") + 1] == "2"
    with pytest.raises(SystemExit):
        bench_serving.main(["--dry-run", "--out", str(tmp_path), "--nodes", "2"])  # two nodes need --pp 2
