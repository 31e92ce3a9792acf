"""Eager reference of the steering op: per token, literally x' = x + decode(f') - decode(f).

Slow and obvious on purpose; the parity tests hold `ops.py` to it."""

from __future__ import annotations

import torch

from steer_plugin.core.sae import SAE
from steer_plugin.core.spec import NO_CONDITION, ClampPlan


def reference_steer(sae: SAE, hidden: torch.Tensor, residual: torch.Tensor,
                    token_plans: list[ClampPlan | None], token_positions: list[int],
                    token_prompt_lens: list[int]) -> torch.Tensor:
    """hidden, residual: [T, d_in]; per token its request's clamp set (or None), its position in its
    sequence and its request's prompt length -> steered hidden [T, d_in].

    A "prompt" clamp acts where position < prompt length; a "generated" clamp where the position
    produces a generated token: position >= prompt length - 1. A conditional clamp acts only where its
    condition feature's activation (before any clamp) is above its threshold."""
    out = hidden.clone()
    for t, plan in enumerate(token_plans):
        if plan is None:
            continue
        pos, prompt_len = token_positions[t], token_prompt_lens[t]
        acts = {0: True, 1: pos < prompt_len, 2: pos >= prompt_len - 1}  # spec.TOKENS_CODE -> acts here?
        x = (hidden[t] + residual[t]).unsqueeze(0)  # [1, d_in]
        f, norm = sae.encode(x)
        keep = [i for i in range(len(plan)) if acts[int(plan.tokens[i])]
                and (plan.cond[i] == NO_CONDITION or float(f[0, plan.cond[i]]) > float(plan.above[i]))]
        if not keep:
            continue
        f_new = f.clone()
        for i in keep:
            j = int(plan.feature[i])
            f_new[0, j] = f[0, j] * float(plan.mul[i]) + float(plan.add[i])
        x_new = x + sae.decode(f_new, norm) - sae.decode(f, norm)
        out[t] = (x_new - residual[t].unsqueeze(0))[0]
    return out
