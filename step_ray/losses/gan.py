"""Least-squares GAN losses (docs/method.md §5) over multi-scale discriminator outputs.

Each takes the list of patch-logit maps a `PatchDiscriminator` returns; per scale the squared error is
averaged over patches and batch, and the scales are summed (pix2pixHD / BicycleGAN convention).
"""
from __future__ import annotations

import torch


def _as_list(x):
    return x if isinstance(x, (list, tuple)) else [x]


def lsgan_generator_loss(fake_logits) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ_scales mean((D(A, B̂) − 1)²): G wants its outputs scored as real."""
    loss = sum((f.float() - 1).pow(2).mean() for f in _as_list(fake_logits))
    return loss, {"gan_g": float(loss.detach())}


def lsgan_discriminator_loss(real_logits, fake_logits) -> tuple[torch.Tensor, dict[str, float]]:
    """½ Σ_scales [mean((D(A, B) − 1)²) + mean(D(A, B̂)²)]."""
    real = sum((r.float() - 1).pow(2).mean() for r in _as_list(real_logits))
    fake = sum(f.float().pow(2).mean() for f in _as_list(fake_logits))
    loss = 0.5 * (real + fake)
    return loss, {
        "loss_d": float(loss.detach()),
        "d_real": float(sum(r.detach().float().mean() for r in _as_list(real_logits)) / len(_as_list(real_logits))),
        "d_fake": float(sum(f.detach().float().mean() for f in _as_list(fake_logits)) / len(_as_list(fake_logits))),
    }
