"""The chat-reply corpus: prompts are varied and deterministic; generation answers with the real model
through vLLM and resumes from what it already wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engines import MODEL
from steer_workbench.chat_corpus import CHATS_FILE, done_ids, generate, plan_conversations


def test_plans_are_deterministic_varied_and_partly_multi_turn():
    plans = plan_conversations(400, seed=3)
    assert plans == plan_conversations(400, seed=3) and plans != plan_conversations(400, seed=4)
    assert len({p.prompt for p in plans}) > 390
    assert 0.15 < sum(p.follow_up is not None for p in plans) / len(plans) < 0.35
    assert plan_conversations(500, seed=3)[:400] == plans  # raising the count keeps what was planned


@pytest.mark.slow
def test_generation_writes_chats_and_resumes(tmp_path):
    before = os.environ.get("STEER_PLUGIN_DISABLE")
    plans = plan_conversations(6, seed=0)
    path = generate(tmp_path, plans[:4], MODEL, batch=3, max_tokens=8)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [c["id"] for c in lines] == [0, 1, 2, 3]
    for chat, plan in zip(lines, plans):
        roles = [m["role"] for m in chat["messages"]]
        assert roles == (["user", "assistant"] * (2 if plan.follow_up else 1))
        assert chat["messages"][0]["content"] == plan.prompt and chat["messages"][1]["content"]
    with path.open("a") as f:
        f.write('{"id": 4, "mess')  # a line cut by an interruption
    assert done_ids(tmp_path / CHATS_FILE) == {0, 1, 2, 3}
    # The command resumes it, with the engine in its own process (offline_engine's own_process).
    subprocess.run([sys.executable, "-m", "steer_workbench.chat_corpus", "--out", str(tmp_path),
                    "--conversations", "6", "--batch", "3", "--max-tokens", "8", "--model-dir", MODEL],
                   check=True, timeout=600)
    assert done_ids(tmp_path / CHATS_FILE) == set(range(6))
    assert os.environ.get("STEER_PLUGIN_DISABLE") == before  # later servers of this process keep the plugin
