"""SAE training pieces: BatchTopK's inference threshold, and resuming from a checkpoint."""

from __future__ import annotations

import pytest
import torch

from steer_workbench import trainer
from steer_workbench.trainer import TrainConfig, train_sae


def _acts(n: int = 6144, d: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    dictionary = torch.randn(128, d, generator=gen)
    codes = torch.rand(n, 128, generator=gen) * (torch.rand(n, 128, generator=gen) < 0.05)
    return codes @ dictionary + 0.05 * torch.randn(n, d, generator=gen)


CFG = TrainConfig(d_sae=96, k=6, lr=3e-3, batch_size=512, epochs=4, checkpoint_every=4, dead_after_tokens=2048)


def test_batchtopk_saves_a_jumprelu_whose_threshold_keeps_k_per_token_on_average():
    acts = _acts()
    sae = train_sae(acts, CFG, "blocks.3.hook_resid_post", "synthetic")
    assert sae.cfg.architecture == "jumprelu" and sae.per_feature
    assert torch.all(sae.threshold == sae.threshold[0])  # one threshold, as BatchTopK calibrates it
    f, norm = sae.encode(acts)
    assert abs((f > 0).sum(-1).float().mean().item() - CFG.k) < 0.3
    fvu = (acts - sae.decode(f, norm)).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
    assert fvu < 0.6


def test_topk_saves_a_topk_sae():
    sae = train_sae(_acts(), TrainConfig(**{**CFG.__dict__, "activation": "topk", "epochs": 1}), "blocks.3.hook_resid_post",
                    "synthetic")
    assert sae.cfg.architecture == "topk" and sae.cfg.k == CFG.k
    assert ((sae.encode(_acts()[:100])[0] > 0).sum(-1) <= CFG.k).all()


def test_an_interrupted_run_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, monkeypatch):
    acts = _acts()
    whole = train_sae(acts, CFG, "blocks.3.hook_resid_post", "synthetic", tmp_path / "whole.pt")

    class Interrupted(trainer.tqdm):
        def update(self, n=1):
            super().update(n)
            if self.n == 10:  # after the checkpoint at step 8, two steps lost
                raise KeyboardInterrupt

    checkpoint = tmp_path / "cut.pt"
    monkeypatch.setattr(trainer, "tqdm", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_sae(acts, CFG, "blocks.3.hook_resid_post", "synthetic", checkpoint)
    assert torch.load(checkpoint, weights_only=True)["step"] == 8
    monkeypatch.undo()
    resumed = train_sae(acts, CFG, "blocks.3.hook_resid_post", "synthetic", checkpoint)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
        torch.testing.assert_close(getattr(resumed, name), getattr(whole, name), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="another run"):
        train_sae(acts[:5000], CFG, "blocks.3.hook_resid_post", "synthetic", checkpoint)


def test_threshold_calibration_is_exact_when_one_chunk_holds_most_of_the_large_values():
    from steer_workbench.trainer import calibrate_threshold

    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(64, 50, generator=gen)
    acts[:8] += 5.0  # the first chunk of 8 fires far more than its share
    theta = calibrate_threshold(lambda a: a, acts, k=3, tokens=64, chunk=8)
    assert (acts > theta).sum().item() == 3 * 64 - 1  # the (k·N)-th largest: k·N − 1 lie strictly above


def test_continuing_from_a_saved_sae_starts_from_its_function_and_adds_latents(tmp_path):
    acts = _acts()
    first = train_sae(acts, TrainConfig(**{**CFG.__dict__, "activation": "topk", "epochs": 1}), "blocks.3.hook_resid_post",
                      "synthetic")
    first.save(tmp_path / "first")
    wider = TrainConfig(**{**CFG.__dict__, "d_sae": 128, "epochs": 0, "init": str(tmp_path / "first")})
    with pytest.raises(ValueError, match="cannot continue"):
        train_sae(acts[:, :16], wider, "blocks.3.hook_resid_post", "synthetic")
    # No steps: the continued SAE's first latents compute what the saved one did (BatchTopK's
    # threshold is calibrated afresh, so compare pre-activations and decoder rows).
    start = train_sae(acts, wider, "blocks.3.hook_resid_post", "synthetic")
    torch.testing.assert_close(start.encode_pre(acts[:50])[:, :CFG.d_sae], first.encode_pre(acts[:50]),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(start.W_dec[:CFG.d_sae], first.W_dec, rtol=1e-4, atol=1e-5)
    top = start.encode_pre(acts).topk(CFG.k, dim=-1).indices  # the new latents do not take the saved ones' place
    assert (top < CFG.d_sae).float().mean() > 0.99
    trained = train_sae(acts, TrainConfig(**{**wider.__dict__, "epochs": 4}), "blocks.3.hook_resid_post", "synthetic")
    f, _ = trained.encode(acts)
    assert (f[:, CFG.d_sae:] > 0).any(0).float().mean() > 0.5  # AuxK brought most new latents to life


@pytest.mark.parametrize("select", ["topk", "batchtopk"])
def test_sparse_step_has_the_gradients_of_the_dense_formulation(select):
    """The trainer's backward touches only active entries; it must equal autograd through the dense
    [B, d_sae] codes (ReLU of the selected pre-activations, zeros elsewhere)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 16, generator=gen, dtype=torch.float64)
    params = [torch.randn(shape, generator=gen, dtype=torch.float64)
              for shape in ((16,), (16, 64), (64,), (64, 16))]  # b_dec, W_enc, b_enc, W_dec

    def grads(sparse: bool) -> list[torch.Tensor]:
        b_dec, W_enc, b_enc, W_dec = [p.clone().requires_grad_() for p in params]
        pre = (x - b_dec) @ W_enc + b_enc
        active = (trainer._topk if select == "topk" else trainer._batch_topk)(pre.detach(), 5)
        if sparse:
            f = trainer._ActivePre.apply(b_dec, W_enc, b_enc, x, pre.detach(), active)
            recon = trainer._SparseDecode.apply(f, W_dec, active)
        else:
            mask = torch.zeros_like(pre, dtype=torch.bool)
            mask[active.rows, active.cols] = True
            recon = torch.where(mask, torch.relu(pre), 0.0) @ W_dec
        (x - recon - b_dec).pow(2).sum().backward()
        return [b_dec.grad, W_enc.grad, b_enc.grad, W_dec.grad]

    for sparse_grad, dense_grad in zip(grads(True), grads(False)):
        torch.testing.assert_close(sparse_grad, dense_grad)


def test_batch_topk_keeps_the_k_b_largest_of_the_batch_even_when_one_row_holds_most_of_them():
    gen = torch.Generator().manual_seed(4)
    pre = torch.randn(32, 200, generator=gen)
    pre[3] += 10.0  # row 3 holds more of the batch's largest entries than its 8k candidates
    active = trainer._batch_topk(pre, 4)
    kept = torch.zeros_like(pre, dtype=torch.bool)
    kept[active.rows, active.cols] = True
    expected = torch.zeros_like(kept).flatten()
    expected[pre.flatten().topk(4 * 32).indices] = True
    assert torch.equal(kept, expected.view_as(pre) & (pre > 0))
    assert torch.equal(active.rows, active.rows.sort().values)


def test_resampling_gives_dead_latents_the_directions_the_sae_misses(tmp_path):
    acts = _acts()
    first = train_sae(acts, TrainConfig(**{**CFG.__dict__, "d_sae": 32, "epochs": 1}), "blocks.3.hook_resid_post",
                      "synthetic")
    first.save(tmp_path / "first")

    def continued(resample_every: int) -> tuple[float, float]:
        cfg = TrainConfig(**{**CFG.__dict__, "d_sae": 160, "epochs": 8, "init": str(tmp_path / "first"),
                             "resample_every": resample_every})
        sae = train_sae(acts, cfg, "blocks.3.hook_resid_post", "synthetic")
        f, norm = sae.encode(acts)
        fvu = (acts - sae.decode(f, norm)).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
        return float((f == 0).all(0).float().mean()), float(fvu)

    (dead_without, fvu_without), (dead_with, fvu_with) = continued(0), continued(8)
    assert dead_with == 0.0 and dead_without > 0.0
    assert fvu_with < fvu_without - 0.02


def test_continuing_from_an_sae_with_copied_latents_starts_the_copies_afresh(tmp_path):
    acts = _acts()
    first = train_sae(acts, TrainConfig(**{**CFG.__dict__, "activation": "topk", "epochs": 1}), "blocks.3.hook_resid_post",
                      "synthetic")
    first.W_enc[:, 5], first.b_enc[5], first.W_dec[5] = first.W_enc[:, 0], first.b_enc[0], first.W_dec[0]
    first.save(tmp_path / "first")
    start = train_sae(acts, TrainConfig(**{**CFG.__dict__, "epochs": 0, "init": str(tmp_path / "first")}),
                      "blocks.3.hook_resid_post", "synthetic")
    assert trainer.duplicate_latents(first.W_dec).nonzero()[:, 0].tolist() == [5]
    assert not trainer.duplicate_latents(start.W_dec).any()
    pre = start.encode_pre(acts[:200])
    torch.testing.assert_close(pre[:, :5], first.encode_pre(acts[:200])[:, :5], rtol=1e-4, atol=1e-4)
    assert pre[:, 5].abs().max() < 0.1 * pre[:, 0].abs().max()  # silent, like a new latent


def test_resampling_more_dead_latents_than_a_batch_has_tokens_makes_no_copies(tmp_path):
    acts = _acts()
    first = train_sae(acts, TrainConfig(**{**CFG.__dict__, "d_sae": 32, "epochs": 1}), "blocks.3.hook_resid_post",
                      "synthetic")
    first.save(tmp_path / "first")
    cfg = TrainConfig(**{**CFG.__dict__, "d_sae": 1200, "epochs": 1, "resample_every": 2,
                         "init": str(tmp_path / "first")})  # 1,168 new latents, dead, against 512-token batches
    wide = train_sae(acts, cfg, "blocks.3.hook_resid_post", "synthetic")
    assert not trainer.duplicate_latents(wide.W_dec).any()


def test_resampling_draws_only_from_the_worse_reconstructed_half_of_the_batch():
    """A source token the SAE nearly reconstructs would get an encoder column of norm (median value /
    its tiny error) that fires on every token: resampling as many latents as the batch has tokens
    must still leave those tokens out."""
    gen = torch.Generator().manual_seed(0)
    d_in, d_sae, batch = 16, 64, 32
    err = torch.randn(batch, d_in, generator=gen)
    err[::2] *= 1e-3  # half the batch nearly reconstructed
    params = [torch.nn.Parameter(t) for t in (torch.zeros(d_in, d_sae), torch.zeros(d_sae), torch.zeros(d_sae, d_in),
                                              torch.zeros(d_in))]
    opt = torch.optim.Adam(params)
    dead = torch.arange(d_sae)
    resampled = trainer._resample(dead, err, torch.ones(100), params, opt, gen)
    assert resampled.numel() == batch // 2
    sources = params[2][resampled]  # unit error directions of the tokens drawn
    drawn = (sources @ (err / err.norm(dim=-1, keepdim=True)).t()).abs().argmax(-1)
    assert (drawn % 2 == 1).all()
    assert params[0][:, resampled].norm(dim=0).max() <= 1 / err[1::2].norm(dim=-1).min() + 1e-6
