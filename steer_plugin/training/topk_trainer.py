"""TopK SAE training (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

Inputs are scaled by one scalar so the mean squared norm is d_in; the scale is folded into the
saved weights, so the file is a plain SAELens `topk` SAE with normalize_activations="none".
An AuxK loss (k_aux latents among the dead ones reconstruct the residual error) keeps latents alive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from steer_plugin.sae import SAE, SAEConfig


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one SAE training run."""

    d_sae: int = 4608
    """Number of latents (8 x d_model for SmolLM2-135M)."""
    k: int = 40
    """Active latents per token."""
    lr: float = 4e-4
    """Adam learning rate; decays linearly to 0 over the last 20% of steps."""
    batch_size: int = 4096
    """Tokens per optimiser step."""
    epochs: int = 3
    """Passes over the captured activations."""
    k_aux: int = 256
    """Latents used by the AuxK loss."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (the paper's value)."""
    dead_after_tokens: int = 200_000
    """A latent that has not fired for this many tokens counts as dead for AuxK."""
    seed: int = 0
    """Seed of initialisation and batch order."""


def _topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))


def train_topk(acts: torch.Tensor, cfg: TrainConfig, hook_name: str, model_name: str) -> SAE:
    """acts: [N, d_in] float32 residual stream -> trained SAE (scale folded in)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    d_in = acts.shape[1]
    scale = math.sqrt(d_in / acts[:100_000].pow(2).sum(-1).mean().item())

    W_dec = torch.randn(cfg.d_sae, d_in, generator=gen)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    W_dec = torch.nn.Parameter(W_dec)
    W_enc = torch.nn.Parameter(W_dec.detach().t().clone())
    b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))
    b_dec = torch.nn.Parameter(acts[:100_000].mean(0) * scale)
    params = [W_enc, b_enc, W_dec, b_dec]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999))
    steps_per_epoch = acts.shape[0] // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    decay_from = int(total * 0.8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < decay_from else max(0.0, (total - s) / max(1, total - decay_from)))
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)

    bar = tqdm(total=total, desc="train SAE", unit="step")
    for _epoch in range(cfg.epochs):
        order = torch.randperm(acts.shape[0], generator=gen)
        for step in range(steps_per_epoch):
            x = acts[order[step * cfg.batch_size:(step + 1) * cfg.batch_size]] * scale  # [B, d_in]
            pre = (x - b_dec) @ W_enc + b_enc  # [B, d_sae]
            f = _topk(pre, cfg.k)
            x_hat = f @ W_dec + b_dec
            err = x - x_hat
            total_var = (x - x.mean(0)).pow(2).sum()
            mse = err.pow(2).sum() / total_var  # FVU of this batch

            fired = (f > 0).any(0)
            since_fired = torch.where(fired, 0, since_fired + x.shape[0])
            dead = since_fired > cfg.dead_after_tokens
            loss = mse
            if dead.any():
                k_aux = min(cfg.k_aux, int(dead.sum()))
                aux_pre = pre.masked_fill(~dead, float("-inf"))
                aux_f = _topk(aux_pre, k_aux).nan_to_num(0.0)
                err_hat = aux_f @ W_dec
                aux = (err.detach() - err_hat).pow(2).sum() / err.detach().pow(2).sum().clamp_min(1e-8)
                loss = loss + cfg.aux_coef * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                W_dec /= W_dec.norm(dim=-1, keepdim=True)
            bar.set_postfix(fvu=f"{mse.item():.3f}", dead=int(dead.sum()))
            bar.update()
    bar.close()

    with torch.no_grad():  # fold the input scale: pre = (s·x − b)W + c  ==  (x − b/s)(sW) + c
        weights = {"W_enc": W_enc * scale, "b_enc": b_enc.clone(),
                   "W_dec": W_dec / scale, "b_dec": b_dec / scale}
    sae_cfg = SAEConfig(architecture="topk", d_in=d_in, d_sae=cfg.d_sae, k=cfg.k, hook_name=hook_name,
                        model_name=model_name, apply_b_dec_to_input=True)
    return SAE(sae_cfg, {n: t.detach().contiguous() for n, t in weights.items()})
