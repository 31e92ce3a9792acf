"""TopK and BatchTopK SAE training (Gao et al. 2024; Bussmann et al. 2024, "BatchTopK SAEs").

TopK keeps the k largest pre-activations of each token. BatchTopK keeps the k·B largest of a batch
of B tokens (so a token may use more or fewer than k latents) and, at inference, is a JumpReLU with
one threshold: the value that keeps k latents per token on average, calibrated on training tokens
after training. It is saved as a SAELens `jumprelu` SAE, whose activation is per feature: steering
then needs only the clamped features' encoder columns, not a full encode.

Inputs are scaled by one scalar so the mean squared norm is d_in; the scale is folded into the
saved weights (normalize_activations="none"). An AuxK loss (k_aux latents among the dead ones
reconstruct the residual error) keeps latents alive, and dead latents are resampled (Bricken et
al. 2023, "Towards Monosemanticity"): each becomes the direction of the residual error of a token
drawn with probability ∝ its squared error, scaled to fire on that token as an ordinary latent
does; each token gives at most one latent (drawn with replacement, a token gives several: copies
that fire together and never part, docs/reports/batchtopk-12k-sae-2026-12-05.md). Without resampling, many
of the latents a continuation adds stay dead (docs/reports/workbench-settings.md). Training saves a
checkpoint every `checkpoint_every` steps and resumes from it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from steer_plugin.core.files import replaced_on_success
from steer_plugin.core.sae import SAE, SAEConfig


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one SAE training run."""

    activation: str = "batchtopk"
    """`topk` (saved as SAELens topk) or `batchtopk` (saved as jumprelu with its inference threshold)."""
    d_sae: int = 8192
    """Number of latents."""
    k: int = 32
    """Active latents per token (on average over a batch for batchtopk)."""
    lr: float = 4e-4
    """Adam learning rate; decays linearly to 0 over the last 20% of steps."""
    batch_size: int = 4096
    """Tokens per optimiser step."""
    epochs: int = 2
    """Passes over the captured activations."""
    k_aux: int = 256
    """Latents used by the AuxK loss."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss (the paper's value)."""
    dead_after_tokens: int = 200_000
    """A latent that has not fired for this many tokens counts as dead for AuxK."""
    checkpoint_every: int = 100
    """Optimiser steps between checkpoints."""
    seed: int = 0
    """Seed of initialisation and batch order."""
    init: str = ""
    """An SAE folder to continue from (same d_in; any activation): its latents become the first ones,
    the rest up to d_sae start random and silent and are resampled. Empty: all random."""
    resample_every: int = 100
    """Every this many steps, dead latents are resampled from the batch's worst-reconstructed tokens
    (0: never)."""
    resample_until: float = 0.6
    """No resampling after this fraction of the steps, so the last latents resampled have time to train."""


warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")  # used as documented


class _Active:
    """The active entries (rows[i], cols[i]) of a [B, d_sae] code matrix, sorted by row, as sparse
    CSR matrices: codes [B, d_sae] and their transpose [d_sae, B]. Training touches only these
    entries after the one dense encode of a step: with k of d_sae latents active, a CSR product over
    them costs a fraction of the dense [B, d_sae] × [d_sae, d_in] one."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]):
        self.rows, self.cols, self.shape = rows, cols, shape
        self._by_col = torch.argsort(cols * shape[0] + rows)  # order of the transpose's entries
        # A step builds each orientation up to twice (forward and backward): its structure once here.
        self._crow = self._crow_of(rows, shape[0])
        self._t_cols = rows[self._by_col]
        self._t_crow = self._crow_of(cols[self._by_col], shape[1])

    @staticmethod
    def _crow_of(sorted_rows: torch.Tensor, n: int) -> torch.Tensor:
        crow = torch.zeros(n + 1, dtype=torch.long)
        crow[1:] = torch.bincount(sorted_rows, minlength=n).cumsum(0)
        return crow

    def matrix(self, vals: torch.Tensor) -> torch.Tensor:
        """vals: [nnz] -> CSR [B, d_sae]."""
        return torch.sparse_csr_tensor(self._crow, self.cols, vals, self.shape,
                                       check_invariants=False)  # sorted by construction

    def transposed(self, vals: torch.Tensor) -> torch.Tensor:
        """vals: [nnz] -> CSR [d_sae, B]."""
        return torch.sparse_csr_tensor(self._t_crow, self._t_cols, vals[self._by_col], self.shape[::-1],
                                       check_invariants=False)


def _sorted_active(pre: torch.Tensor, flat: torch.Tensor, values: torch.Tensor) -> _Active:
    """Flat indices of kept pre-activations (only the positive ones stay active) -> _Active."""
    flat = flat[values > 0].sort().values
    return _Active(flat // pre.shape[1], flat % pre.shape[1], tuple(pre.shape))


def _topk(pre: torch.Tensor, k: int) -> _Active:
    """pre: [B, d_sae] -> each row's k largest entries (those that are positive)."""
    values, cols = pre.topk(k, dim=-1, sorted=False)  # [B, k]
    flat = cols + torch.arange(pre.shape[0])[:, None] * pre.shape[1]
    return _sorted_active(pre, flat.flatten(), values.flatten())


def _batch_topk(pre: torch.Tensor, k: int) -> _Active:
    """pre: [B, d_sae] -> the k·B largest entries of the whole batch (those that are positive).
    Drawn from each row's 8k largest (a full-batch top-k is several times slower), unless some row
    could hold more of them than that, where the whole batch is ranked."""
    width = min(pre.shape[1], 8 * k)
    row_values, row_cols = pre.topk(width, dim=-1, sorted=False)  # [B, width]
    values, at = row_values.flatten().topk(k * pre.shape[0], sorted=False)
    if width < pre.shape[1] and bool((row_values.min(-1).values >= values.min()).any()):
        values, flat = pre.flatten().topk(k * pre.shape[0], sorted=False)
        return _sorted_active(pre, flat, values)
    flat = (row_cols + torch.arange(pre.shape[0])[:, None] * pre.shape[1]).flatten()[at]
    return _sorted_active(pre, flat, values)


class _ActivePre(torch.autograd.Function):
    """The pre-activations (x − b_dec)·W_enc[:, col] + b_enc[col] of the active entries, read from
    the dense no-grad encode of the step, with gradients for b_dec, W_enc and b_enc through those
    entries only (a dense backward through [B, d_sae] would cost as much as the encode)."""

    @staticmethod
    def forward(ctx, b_dec, W_enc, b_enc, x, pre, active):  # pre: [B, d_sae] computed without grad
        ctx.save_for_backward(x, b_dec, W_enc)
        ctx.active = active
        return pre[active.rows, active.cols]

    @staticmethod
    def backward(ctx, grad):  # grad: [nnz]
        x, b_dec, W_enc = ctx.saved_tensors
        active = ctx.active
        grad_b_enc = grad.new_zeros(W_enc.shape[1]).index_add_(0, active.cols, grad)
        grad_W_enc = (active.transposed(grad) @ (x - b_dec)).t()  # [d_in, d_sae]
        return -(W_enc @ grad_b_enc), grad_W_enc, grad_b_enc, None, None, None


class _SparseDecode(torch.autograd.Function):
    """[B, d_in] = F @ W_dec for codes F given by their active entries' values, with gradients for
    the values and W_dec through those entries only."""

    @staticmethod
    def forward(ctx, vals, W_dec, active):  # vals: [nnz], W_dec: [d_sae, d_in]
        ctx.save_for_backward(vals, W_dec)
        ctx.active = active
        return active.matrix(vals) @ W_dec

    @staticmethod
    def backward(ctx, grad):  # grad: [B, d_in]
        vals, W_dec = ctx.saved_tensors
        active = ctx.active
        grad_vals = torch.sparse.sampled_addmm(active.matrix(vals), grad, W_dec.t(), beta=0.0).values()
        return grad_vals, active.transposed(vals) @ grad, None


@torch.no_grad()
def calibrate_threshold(pre_fn, acts: torch.Tensor, k: int, tokens: int = 65_536, chunk: int = 4096) -> float:
    """The one JumpReLU threshold that keeps k latents per token on average over `tokens` training
    tokens: the (k·N)-th largest pre-activation (BatchTopK at inference over a very large batch).
    A running top-(k·N) is merged chunk by chunk: one chunk may hold more than its share of the
    largest values (documents whose tokens fire many latents), so no per-chunk quota is safe."""
    step = max(1, acts.shape[0] // tokens)
    sample = acts[::step][:tokens]
    keep = k * sample.shape[0]
    best = torch.empty(0)
    for start in range(0, sample.shape[0], chunk):
        pre = pre_fn(sample[start:start + chunk]).flatten()  # [chunk · d_sae]
        merged = torch.cat([best, pre.topk(min(keep, pre.numel())).values])
        best = merged.topk(min(keep, merged.numel())).values
    return float(best[-1])


def duplicate_latents(W_dec: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """[d_sae] bool: latents whose decoder row (W_dec: [d_sae, d_in]) points along an earlier one's
    (cosine > 0.999): copies that fire together and, trained alike, never part."""
    unit = W_dec / W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    n = W_dec.shape[0]
    dup = torch.zeros(n, dtype=torch.bool)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        cos = unit[start:end] @ unit[:end].T  # [end - start, end]
        earlier = torch.arange(end)[None, :] < torch.arange(start, end)[:, None]
        dup[start:end] = ((cos > 0.999) & earlier).any(-1)
    return dup


@torch.no_grad()
def _start_from(sae: SAE, scale: float, W_enc, b_enc, W_dec, b_dec) -> None:
    """Copy a saved SAE (raw activations) into the first latents of these parameters (inputs times
    `scale`, unit decoder rows) so that they compute the same function: latent i of norm n_i is
    scaled by scale·n_i, which keeps each token's ranking of these latents. The new latents' encoder
    columns shrink 100-fold: at unit scale their random pre-activations outrank the saved latents and
    replace them in the top k, which undoes what the saved SAE learnt, so they start silent, count as
    dead, and AuxK trains them. A saved latent that duplicates an earlier one (see duplicate_latents:
    an SAE resampled with replacement holds many) starts as a new latent instead."""
    m = sae.cfg.d_sae
    if sae.cfg.d_in != W_dec.shape[1] or m > W_dec.shape[0] or sae.cfg.normalize_activations != "none":
        raise ValueError(f"cannot continue a {sae.cfg.d_in}x{m} SAE ({sae.cfg.normalize_activations} input "
                         f"normalisation) as {W_dec.shape[1]}x{W_dec.shape[0]}")
    # This trainer always encodes x − b_dec; an SAE that encodes x gets the difference in its bias.
    b_enc_old = sae.b_enc if sae.cfg.apply_b_dec_to_input else sae.b_enc + sae.b_dec @ sae.W_enc  # [m]
    norms = sae.W_dec.norm(dim=-1)  # [m]
    kept = (~duplicate_latents(sae.W_dec)).nonzero()[:, 0]  # [m'] saved latents taken over
    fresh = torch.ones(W_dec.shape[0], dtype=torch.bool)
    fresh[kept] = False
    W_dec[kept] = sae.W_dec[kept] / norms[kept, None]
    W_enc[:, kept] = sae.W_enc[:, kept] * norms[kept]
    W_enc[:, fresh] *= 0.01
    b_enc[kept] = b_enc_old[kept] * norms[kept] * scale
    b_dec.copy_(sae.b_dec * scale)


@torch.no_grad()
def _resample(dead: torch.Tensor, err: torch.Tensor, vals: torch.Tensor,
              params: list[torch.nn.Parameter], opt: torch.optim.Adam, gen: torch.Generator) -> torch.Tensor:
    """Gives dead latents (dead: [m] indices) the direction of the residual error of a token of this
    batch (err: [B, d_in]) drawn ∝ its squared error among the worse-reconstructed half, each token at
    most once (two latents from one token would be copies that never part; the ones left over wait for
    the next resampling), and an encoder column along it that gives that token the batch's median
    active value (vals: [nnz]); their Adam moments restart. Returns the latents resampled."""
    W_enc, b_enc, W_dec, b_dec = params
    weight = err.pow(2).sum(-1)  # [B]
    # The column's norm is the median value over the source's error norm, so a nearly reconstructed
    # source gives a column far longer than the others, which fires on every token and wrecks the
    # batch's reconstruction (a wide continuation draws every token of a batch). From the worse half,
    # columns stay under the median value over the median error.
    weight = torch.where(weight >= weight.quantile(0.5), weight, 0.0)
    dead = dead[:int((weight > 0).sum())]
    if not dead.numel():  # the batch is reconstructed exactly: nothing to aim at
        return dead
    src = torch.multinomial(weight, dead.numel(), replacement=False, generator=gen)  # [m]
    size = err[src].norm(dim=-1, keepdim=True).clamp_min(1e-8)  # [m, 1]
    W_dec[dead] = err[src] / size
    # The error is about orthogonal to the reconstruction, so the source token projects about `size`
    # on its own error direction (its exact projection can be near 0 or negative: no use as a divisor).
    W_enc[:, dead] = (err[src] * (vals.median() / size.pow(2))).t()
    b_enc[dead] = 0.0
    for p, index in ((W_enc, (slice(None), dead)), (b_enc, dead), (W_dec, dead)):
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in opt.state[p]:
                opt.state[p][moment][index] = 0.0
    return dead


def train_sae(acts: torch.Tensor, cfg: TrainConfig, hook_name: str, model_name: str,
              checkpoint: Path | None = None) -> SAE:
    """acts: [N, d_in] float32 (or float16) residual stream -> trained SAE (scale folded in)."""
    if cfg.activation not in ("topk", "batchtopk"):
        raise ValueError(f"activation must be topk or batchtopk, not {cfg.activation!r}")
    activate = _topk if cfg.activation == "topk" else _batch_topk
    gen = torch.Generator().manual_seed(cfg.seed)
    d_in = acts.shape[1]
    sample = acts[:100_000].float()
    scale = math.sqrt(d_in / sample.pow(2).sum(-1).mean().item())

    W_dec = torch.randn(cfg.d_sae, d_in, generator=gen)
    W_dec /= W_dec.norm(dim=-1, keepdim=True)
    W_dec = torch.nn.Parameter(W_dec)
    W_enc = torch.nn.Parameter(W_dec.detach().t().clone())
    b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae))
    b_dec = torch.nn.Parameter(sample.mean(0) * scale)
    params = [W_enc, b_enc, W_dec, b_dec]
    if cfg.init:
        _start_from(SAE.load(cfg.init), scale, W_enc, b_enc, W_dec, b_dec)
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999))
    steps_per_epoch = acts.shape[0] // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    decay_from = int(total * 0.8)
    resample_until = int(total * cfg.resample_until)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < decay_from else max(0.0, (total - s) / max(1, total - decay_from)))
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
    done = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        if state["cfg"] != asdict(cfg) or state["n"] != acts.shape[0]:
            raise ValueError(f"{checkpoint} is from another run ({state['cfg']}, {state['n']} tokens): remove it")
        with torch.no_grad():
            for p, saved in zip(params, state["params"]):
                p.copy_(saved)
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        since_fired, done, scale = state["since_fired"], state["step"], state["scale"]

    def save_checkpoint(step: int) -> None:
        with replaced_on_success(checkpoint) as tmp:
            torch.save({"cfg": asdict(cfg), "n": acts.shape[0], "params": [p.detach() for p in params],
                        "opt": opt.state_dict(), "sched": sched.state_dict(), "since_fired": since_fired,
                        "step": step, "scale": scale}, tmp)

    bar = tqdm(total=total, initial=done, desc=f"train {cfg.activation} SAE", unit="step")
    for step in range(done, total):
        epoch, index = divmod(step, steps_per_epoch)
        if index == 0 or step == done:  # each epoch's order follows from the seed alone, so a resume sees the same
            order = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        rows = order[index * cfg.batch_size:(index + 1) * cfg.batch_size]
        x = acts[rows].float() * scale  # [B, d_in]
        with torch.no_grad():  # the one dense product of a step; the rest touches active entries only
            pre = (x - b_dec) @ W_enc + b_enc  # [B, d_sae]
            active = activate(pre, cfg.k)
        f = _ActivePre.apply(b_dec, W_enc, b_enc, x, pre, active)  # [nnz], all > 0
        err = x - (_SparseDecode.apply(f, W_dec, active) + b_dec)
        mse = err.pow(2).sum() / (x - x.mean(0)).pow(2).sum()  # FVU of this batch

        fired = torch.zeros(cfg.d_sae, dtype=torch.bool)
        fired[active.cols] = True
        since_fired = torch.where(fired, 0, since_fired + x.shape[0])
        dead = since_fired > cfg.dead_after_tokens
        loss = mse
        if dead.any():
            with torch.no_grad():
                dead_cols = dead.nonzero()[:, 0]  # ascending, so the entries stay sorted
                among_dead = _topk(pre[:, dead_cols], min(cfg.k_aux, dead_cols.numel()))
                aux_active = _Active(among_dead.rows, dead_cols[among_dead.cols], tuple(pre.shape))
            aux_f = _ActivePre.apply(b_dec, W_enc, b_enc, x, pre, aux_active)
            target = err.detach()
            aux = (target - _SparseDecode.apply(aux_f, W_dec, aux_active)).pow(2).sum() \
                / target.pow(2).sum().clamp_min(1e-8)
            loss = loss + cfg.aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            W_dec /= W_dec.norm(dim=-1, keepdim=True)
        if cfg.resample_every and (step + 1) % cfg.resample_every == 0 and step < resample_until and dead.any():
            dead_cols = dead.nonzero()[:, 0]
            resampled = _resample(dead_cols, err.detach(), f.detach(), params, opt,
                                  torch.Generator().manual_seed(cfg.seed * 1_000_003 + step))
            since_fired[resampled] = 0
        bar.set_postfix(fvu=f"{mse.item():.3f}", dead=int(dead.sum()))
        bar.update()
        if checkpoint is not None and (step + 1) % cfg.checkpoint_every == 0:
            save_checkpoint(step + 1)
    bar.close()

    with torch.no_grad():  # fold the input scale: pre = (s·x − b)W + c  ==  (x − b/s)(sW) + c
        weights = {"W_enc": W_enc * scale, "b_enc": b_enc.clone(),
                   "W_dec": W_dec / scale, "b_dec": b_dec / scale}
        if cfg.activation == "batchtopk":
            theta = calibrate_threshold(lambda x: (x.float() - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"],
                                        acts, cfg.k)
            weights["threshold"] = torch.full((cfg.d_sae,), theta)
    architecture = "topk" if cfg.activation == "topk" else "jumprelu"
    sae_cfg = SAEConfig(architecture=architecture, d_in=d_in, d_sae=cfg.d_sae,
                        k=cfg.k if architecture == "topk" else None, hook_name=hook_name,
                        model_name=model_name, apply_b_dec_to_input=True)
    return SAE(sae_cfg, {n: t.detach().contiguous() for n, t in weights.items()})
