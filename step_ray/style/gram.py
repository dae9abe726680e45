"""Gram matrices, the exact style distance of docs/method.md §2, and its descriptor form.

Normalisation (the official StEP code's convention, docs/method.md §2):

    G_l = F_l F_lᵀ / (N_l · M_l)             F_l: N_l channels × M_l = H_l·W_l positions
    style_distance(a, x) = Σ_l w_l · mean_ij (G_l(a)_ij − G_l(x)_ij)²
                         = Σ_l w_l / N_l² · Σ_ij (ΔG_l)_ij²

Gatys' form, 1 / (4 N_l² M_l²) · Σ_ij (Δ(F Fᵀ))², is the same sum with layer weights w_l · N_l² / 4, so both
conventions are reachable through `layer_weights` alone.

Descriptor: v_l(x) = sqrt(w_l) / N_l · triu(G_l(x)) with the off-diagonal entries multiplied by √2, and
v(x) = concat_l v_l(x). Because G_l is symmetric, Σ_ij ΔG_ij² = Σ_i ΔG_ii² + 2 Σ_{i<j} ΔG_ij², hence
‖v(a) − v(x)‖² = style_distance(a, x) exactly, with Σ_l N_l(N_l + 1)/2 numbers per image.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import torch


def gram_matrices(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """[N, C, H, W] feature maps -> [N, C, C] Gram matrices F Fᵀ / (C·H·W), in float32.

    Computed outside autocast: sums over H·W products overflow float16 for large feature maps.
    Channels-last maps (the fast layout for CPU convolutions) are used as [N, H·W, C] views, FᵀF,
    instead of being copied to NCHW first: the same product, one copy fewer.
    """
    grams = []
    for f in features:
        n, c, h, w = f.shape
        with torch.autocast(device_type=f.device.type, enabled=False):
            f = f.float()
            if c > 1 and f.is_contiguous(memory_format=torch.channels_last):
                positions = f.permute(0, 2, 3, 1).reshape(n, h * w, c)
                gram = torch.bmm(positions.transpose(1, 2), positions)
            else:
                flat = f.reshape(n, c, h * w)
                gram = torch.bmm(flat, flat.transpose(1, 2))
            grams.append(gram / (c * h * w))
    return grams


def _weights(layer_weights: Sequence[float] | None, count: int) -> list[float]:
    if layer_weights is None or len(layer_weights) == 0:
        return [1.0] * count
    if len(layer_weights) != count:
        raise ValueError(f"{len(layer_weights)} layer weights for {count} feature maps")
    return [float(w) for w in layer_weights]


def style_distance(
    features_a: Sequence[torch.Tensor],
    features_b: Sequence[torch.Tensor],
    layer_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Exact style distance of row i of `features_a` to row i of `features_b`: a [N] tensor."""
    if len(features_a) != len(features_b):
        raise ValueError(f"{len(features_a)} vs {len(features_b)} feature maps")
    weights = _weights(layer_weights, len(features_a))
    total = None
    for w, ga, gb in zip(weights, gram_matrices(features_a), gram_matrices(features_b)):
        term = w * (ga - gb).pow(2).mean(dim=(1, 2))
        total = term if total is None else total + term
    return total


@lru_cache(maxsize=64)
def _triu_index_and_scale(channels: int, weight: float, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the upper triangle of a C×C matrix and the factor each entry is multiplied by."""
    # Cached across calls, so made outside inference mode: an inference tensor could not take part in
    # a later autograd computation (a style loss with gradients).
    with torch.inference_mode(False):
        rows, cols = torch.triu_indices(channels, channels, device=device)
        index = rows * channels + cols
        scale = torch.full((index.numel(),), math.sqrt(2.0), device=device)
        scale[rows == cols] = 1.0
        return index, scale * (math.sqrt(weight) / channels)


def descriptor_size(channels: Sequence[int]) -> int:
    """Length of the descriptor for layers with these channel counts: Σ C(C+1)/2."""
    return sum(c * (c + 1) // 2 for c in channels)


def style_descriptor(features: Sequence[torch.Tensor], layer_weights: Sequence[float] | None = None) -> torch.Tensor:
    """[N, D] float32 descriptors whose squared L2 distances are `style_distance` (module docstring)."""
    weights = _weights(layer_weights, len(features))
    parts = []
    for w, g in zip(weights, gram_matrices(features)):
        n, c, _ = g.shape
        index, scale = _triu_index_and_scale(c, w, str(g.device))
        parts.append(torch.index_select(g.reshape(n, c * c), 1, index) * scale)
    return torch.cat(parts, dim=1)


def descriptors_from_images(vgg, images: torch.Tensor, layer_weights: Sequence[float] | None = None) -> torch.Tensor:
    """Images in [-1, 1] NCHW -> style descriptors (no gradient)."""
    with torch.inference_mode():
        return style_descriptor(vgg(images), layer_weights)


def exact_distance_matrix(vgg, images: torch.Tensor, layer_weights: Sequence[float] | None = None,
                          batch: int = 16) -> torch.Tensor:
    """Exact (unreduced) style distances between all pairs of `images` (float NCHW in [-1, 1]) [n, n], in
    float64 from the descriptors' Gram form: d(i, j) = |v_i|² + |v_j|² − 2 v_i·v_j, clamped at 0."""
    chunks = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            chunks.append(style_descriptor(vgg(images[i : i + batch]), layer_weights).double())
    v = torch.cat(chunks)
    sq = (v * v).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * v @ v.T).clamp_min(0)
    d.fill_diagonal_(0)
    return d
