"""Eager references of the steering ops: per token, literally x' = x + decode(f') - decode(f), and
x' = x + scale * direction for each vector.

Slow and obvious on purpose; the parity tests hold `ops.py` to it."""

from __future__ import annotations

import torch

from steer_plugin.core.sae import SAE
from steer_plugin.core.spec import NO_CONDITION, ClampPlan, VectorPlan


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
        acts = _acts(pos, prompt_len)
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


def _acts(pos: int, prompt_len: int) -> dict[int, bool]:
    """spec.TOKENS_CODE -> whether that scope acts at this position."""
    return {0: True, 1: pos < prompt_len, 2: pos >= prompt_len - 1}


def reference_vectors(directions: torch.Tensor, hidden: torch.Tensor, token_plans: list[VectorPlan | None],
                      token_positions: list[int], token_prompt_lens: list[int]) -> torch.Tensor:
    """directions: [V, d_in] each vector's direction at this layer; hidden: [T, d_in]; per token its
    request's vectors (or None), position and prompt length -> hidden with the vectors added [T, d_in]."""
    out = hidden.clone()
    for t, plan in enumerate(token_plans):
        if plan is None:
            continue
        acts = _acts(token_positions[t], token_prompt_lens[t])
        for v, scale, tokens in plan.rows:
            if acts[tokens] and scale != 0:
                out[t] = out[t] + float(scale) * directions[v]
    return out
