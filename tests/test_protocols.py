"""The workbench's experiment protocols (`steer_workbench.protocols`): what tunes a recommendation is
kept apart from what judges it. (Import rules between the packages: `test_layout.py`.)"""

from __future__ import annotations

from steer_workbench import protocols


def test_tuning_and_judging_prompts_are_kept_apart():
    tuned = set(protocols.SWEEP_PROMPTS)
    assert not tuned & set(protocols.NEUTRAL_PROMPTS) and not tuned & set(protocols.JOURNEY_QUESTIONS)
    assert not set(protocols.NEUTRAL_PROMPTS) & set(protocols.JOURNEY_QUESTIONS)
