"""Losses on style codes for the baselines (docs/method.md §7): the VAE's KL term and cLR-GAN's latent regression.

The L2 penalty on z (the v3 variants' replacement for KL) is `embedding_l2_penalty` from stage 1.
"""
from __future__ import annotations

import torch


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ_d (μ² + σ² − log σ² − 1), summed over code dimensions and averaged
    over the batch (BicycleGAN's convention, so its λ_kl = 0.01 means the same here)."""
    kl = 0.5 * (mean.float().pow(2) + logvar.float().exp() - logvar.float() - 1).sum(1).mean()
    return kl, {"kl": float(kl.detach())}


def latent_reconstruction_loss(z_recovered: torch.Tensor,
                               z_drawn: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """mean |E(G(A, z_r)) − z_r|: the code a random-z output was made with must be recoverable (cLR-GAN)."""
    loss = (z_recovered.float() - z_drawn.float()).abs().mean()
    return loss, {"latent": float(loss.detach())}
