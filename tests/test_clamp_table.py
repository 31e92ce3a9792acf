"""The worker's per-step clamp table and the step layout it reads, on real host buffers."""

from __future__ import annotations

import json

import numpy as np
import torch

from steer_plugin.spec import SAELimits
from steer_plugin.worker.clamp_table import ClampTable
from steer_plugin.worker.step_layout import StepLayout

LIMITS = SAELimits(d_sae=64, max_clamps=4, max_activation=np.full(64, 2.0, dtype=np.float32))


def _table(**kwargs) -> ClampTable:
    return ClampTable(LIMITS, max_tokens=32, max_reqs=4, device=torch.device("cpu"), **kwargs)


def _layout(clamps: dict[str, list | None], scheduled, computed, prompt) -> StepLayout:
    args = {rid: None if c is None else {"feature_clamps": json.dumps(c)} for rid, c in clamps.items()}
    return StepLayout(list(clamps), np.array(scheduled), np.array(computed), np.array(prompt), args.get)


def test_layout_positions_and_prompt_flags():
    # a: prefill chunk of 3 (positions 2..4 of a 4-token prompt, so 4 is its first generated position)
    # b: one decode token at position 9 of a 6-token prompt
    layout = _layout({"a": None, "b": None}, [3, 1], [2, 9], [4, 6])
    assert layout.num_tokens == 4 and layout.starts.tolist() == [0, 3]
    assert layout.token_request.tolist() == [0, 0, 0, 1]
    assert layout.token_position.tolist() == [2, 3, 4, 9]
    assert layout.token_is_prompt.tolist() == [True, True, False, False]
    assert layout.positions_of(1).tolist() == [9]


def test_rows_follow_token_scope_and_request():
    table = _table()
    table.fill(_layout({
        "plain": None,
        "both": [{"feature": 5, "value": 1.5}],
        "scoped": [{"feature": 7, "value": 3.0, "tokens": "prompt"}, {"feature": 9, "value": 2.0, "mode": "scale",
                                                                        "tokens": "generated"}],
    }, [2, 2, 3], [0, 0, 1], [2, 2, 3]))
    rows = table.tok_row[:7].tolist()
    assert rows[:2] == [-1, -1]  # unsteered request: untouched
    assert rows[2] == rows[3] >= 0  # "all": one row for its prompt positions
    prompt_row, _, gen_row = rows[4:7]  # positions 1, 2 (prompt) and 3 (generated)
    assert rows[5] == prompt_row and gen_row not in (-1, prompt_row)
    assert table.feature[prompt_row, 0] == 7 and table.add[prompt_row, 0] == 3.0 and table.mul[prompt_row, 0] == 0
    assert table.feature[gen_row, 0] == 9 and table.mul[gen_row, 0] == 2.0 and table.add[gen_row, 0] == 0
    assert (table.feature[prompt_row, 1:] == LIMITS.d_sae).all()  # padding: the dummy column, no change
    assert (table.mul[prompt_row, 1:] == 1).all() and (table.add[prompt_row, 1:] == 0).all()
    assert (table.tok_row[7:] == -1).all()
    assert table.num_steered_tokens == 5 and table.steered_tokens.tolist() == [2, 3, 4, 5, 6]
    assert table.columns.tolist() == [5, 7, 9]


def test_an_idle_step_clears_the_previous_rows():
    table = _table()
    table.fill(_layout({"a": [{"feature": 1, "value": 1.0}]}, [4], [0], [4]))
    assert table.num_steered_tokens == 4
    table.fill(_layout({"b": None}, [4], [0], [4]))
    assert table.num_steered_tokens == 0 and (table.tok_row == -1).all()


def test_each_clamp_set_is_parsed_once_per_request_and_counted():
    seen, steps = [], []
    table = _table(on_new_plan=seen.append, on_step=steps.append)
    for step in range(3):
        table.fill(_layout({"a": [{"feature": 1, "value": 1.0, "unit": "max"}]}, [1], [5 + step], [4]))
    assert len(seen) == 1 and float(seen[0].add[0]) == 2.0  # unit max: 1 x max activation 2.0
    assert steps == [1, 1, 1]


def test_reset_leaves_no_rows_behind():
    table = _table()
    table.fill(_layout({"a": [{"feature": 1, "value": 1.0}]}, [4], [0], [4]))
    table.reset()
    assert (table.tok_row == -1).all() and table.num_steered_tokens == 0
