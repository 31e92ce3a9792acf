"""The worker's per-step clamp table and the step layout it reads, on real host buffers."""

from __future__ import annotations

import json

import numpy as np
import torch

from steer_plugin.core.spec import Limits
from steer_plugin.worker.clamp_table import ClampTable
from steer_plugin.worker.step_layout import StepLayout

LIMITS = Limits.one(d_sae=64, max_clamps=4, max_activation=np.full(64, 2.0, dtype=np.float32))


def _table(**kwargs) -> ClampTable:
    return ClampTable(LIMITS, "sae", max_tokens=32, max_reqs=4, device=torch.device("cpu"), **kwargs)


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
    assert layout.token_kind.tolist() == [0, 1, 2, 2]  # prompt, last prompt position, generated
    assert layout.positions_of(1).tolist() == [9]


def test_rows_follow_token_scope_and_request():
    table = _table()
    table.fill(_layout({
        "plain": None,
        "both": [{"feature": 5, "value": 1.5}],
        "scoped": [{"feature": 7, "value": 3.0, "tokens": "prompt"}, {"feature": 9, "value": 2.0, "mode": "scale",
                                                                        "tokens": "generated"}],
    }, [2, 2, 4], [0, 0, 0], [2, 2, 3]))
    rows = table.tok_row[:8].tolist()
    assert rows[:2] == [-1, -1]  # unsteered request: untouched
    assert rows[2] >= 0 and rows[3] >= 0  # "all": every position
    prompt_row, prompt_row_again, last_row, gen_row = rows[4:8]  # positions 0, 1 (prompt), 2 (last prompt), 3
    assert prompt_row == prompt_row_again and len({prompt_row, last_row, gen_row}) == 3
    assert table.feature[prompt_row, 0] == 7 and table.add[prompt_row, 0] == 3.0 and table.mul[prompt_row, 0] == 0
    assert table.feature[gen_row, 0] == 9 and table.mul[gen_row, 0] == 2.0 and table.add[gen_row, 0] == 0
    assert table.feature[last_row, :2].tolist() == [7, 9]  # both scopes act on the last prompt position
    assert (table.feature[prompt_row, 1:] == LIMITS.saes["sae"].d_sae).all()  # padding: the dummy column, no change
    assert (table.mul[prompt_row, 1:] == 1).all() and (table.add[prompt_row, 1:] == 0).all()
    assert (table.tok_row[8:] == -1).all()
    assert table.num_steered_tokens == 6 and table.steered_tokens.tolist() == [2, 3, 4, 5, 6, 7]
    assert table.columns.tolist() == [5, 7, 9]


def test_generated_scope_steers_the_position_of_the_first_generated_token():
    """With max_tokens 1 the only generated token comes from the last prompt position."""
    table = _table()
    table.fill(_layout({"a": [{"feature": 2, "value": 1.0, "tokens": "generated"}]}, [5], [0], [5]))
    assert table.tok_row[:5].tolist()[:4] == [-1] * 4 and table.tok_row[4] >= 0


def test_a_request_whose_clamps_cannot_be_prepared_fails_alone():
    def check(plan):
        if 13 in plan.feature:
            raise RuntimeError("injected")

    table = _table(check_plan=check)
    table.fill(_layout({"bad": [{"feature": 13, "value": 1.0}], "good": [{"feature": 2, "value": 1.0}]},
                       [2, 2], [0, 0], [2, 2]))
    assert table.failed == {"bad"}
    assert table.tok_row[:2].tolist() == [-1, -1] and (table.tok_row[2:4] >= 0).all()


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


def test_a_plan_is_prepared_once_while_its_request_lives_across_micro_batches():
    """Under pipeline parallel vLLM alternates micro-batches: a request absent from one step is not
    finished. Its plan is kept (and counted once) until the runner no longer holds it."""
    plans = []
    table = _table(on_new_plan=plans.append)
    clamps = {"a": [{"feature": 1, "value": 1.0}], "b": [{"feature": 2, "value": 1.0}]}
    args = {rid: {"feature_clamps": json.dumps(c)} for rid, c in clamps.items()}

    def step(rid: str, alive: set[str]) -> None:
        table.fill(StepLayout([rid], np.array([1]), np.array([5]), np.array([4]), args.get, alive=alive))

    for _ in range(3):  # a, b, a, b, ... each in its own micro-batch
        step("a", {"a", "b"})
        step("b", {"a", "b"})
    assert len(plans) == 2 and table.step_steered == ["b"]
    step("b", {"b"})  # a finished: its rows are dropped
    assert set(table._rows_of) == {"b"}
    step("a", {"a", "b"})  # the same id again (a new request): prepared anew
    assert len(plans) == 3


def test_a_request_whose_vectors_cannot_be_prepared_fails_alone():
    """The vector table shares the clamp table's bookkeeping: a plan the worker cannot read (here a
    vector this worker's limits lack) fails its request, never runs it unsteered; the other is steered."""
    from steer_plugin.worker.vector_table import VectorTable

    table = VectorTable(Limits.one(d_sae=64, max_clamps=4, vectors=("calm",)), max_tokens=32, max_reqs=4,
                        device=torch.device("cpu"))
    extra = {"bad": {"steering_vectors": json.dumps([{"vector": "storm", "scale": 1.0}])},
             "good": {"steering_vectors": json.dumps([{"vector": "calm", "scale": 2.0, "tokens": "prompt"}])}}
    table.fill(StepLayout(["bad", "good"], np.array([2, 2]), np.array([0, 0]), np.array([2, 2]), extra.get))
    assert table.drain_failed() == ["bad"]
    assert table.tok_row[:2].tolist() == [-1, -1] and (table.tok_row[2:4] >= 0).all()
    assert table.scale[int(table.tok_row[2])].tolist() == [2.0]
