"""Reconstruction losses for the generator (docs/method.md §5): the VGG perceptual loss and the L1 fallback.

The perceptual loss uses the same `VGGFeatures` module as the style statistics (step_ray.style.vgg):
official StEP takes the MSE of VGG-16 activations scaled by 0.1 at five layers with weights
1/32, 1/16, 1/8, 1/4, 1. The target's features carry no gradient.

Scale (docs/method.md §5): the official network is the Caffe VGG-16 fed BGR values in 0–255 minus the means, so
its activations are about 255·σ ≈ 57.6 times those of torchvision's weights on ImageNet-normalised
inputs (σ ≈ 0.226, the mean of the normalisation's stds). Scaling by 0.1 alone would make the loss
≈ 57.6² ≈ 3,300 times weaker than the official one; `OFFICIAL_SCALE` = 0.1 × 57.6 matches its magnitude.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

OFFICIAL_LAYER_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
# Caffe-scale activations over torchvision-scale ones: 255 × mean(0.229, 0.224, 0.225).
CAFFE_ACTIVATION_RATIO = 255.0 * (0.229 + 0.224 + 0.225) / 3
OFFICIAL_SCALE = 0.1 * CAFFE_ACTIVATION_RATIO  # ≈ 5.76: the official 0.1 on the Caffe network's activations


def feature_matching_loss(fake_feats: Sequence[torch.Tensor], real_feats: Sequence[torch.Tensor],
                          layer_weights: Sequence[float] = OFFICIAL_LAYER_WEIGHTS, scale: float = OFFICIAL_SCALE
                          ) -> tuple[torch.Tensor, dict[str, float]]:
    """Σ_l w_l · mean((scale·φ_l(B̂) − scale·φ_l(B))²) on precomputed feature lists."""
    if len(fake_feats) != len(real_feats) or len(fake_feats) != len(layer_weights):
        raise ValueError(f"{len(fake_feats)} fake / {len(real_feats)} real feature maps for {len(layer_weights)} "
                         "layer weights")
    terms = [w * F.mse_loss(scale * f.float(), scale * r.detach().float())
             for w, f, r in zip(layer_weights, fake_feats, real_feats)]
    loss = torch.stack(terms).sum()
    return loss, {"vgg": float(loss.detach()), **{f"vgg_l{i}": float(t.detach()) for i, t in enumerate(terms)}}


def vgg_perceptual_loss(vgg: torch.nn.Module, fake: torch.Tensor, real: torch.Tensor,
                        layer_weights: Sequence[float] = OFFICIAL_LAYER_WEIGHTS, scale: float = OFFICIAL_SCALE
                        ) -> tuple[torch.Tensor, dict[str, float]]:
    """The perceptual loss of images in [-1, 1] through `vgg` (a VGGFeatures: x -> list of feature maps)."""
    with torch.no_grad():
        real_feats = vgg(real)
    return feature_matching_loss(vgg(fake), real_feats, layer_weights, scale)


def l1_loss(fake: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    loss = (fake.float() - real.float()).abs().mean()
    return loss, {"l1": float(loss.detach())}
