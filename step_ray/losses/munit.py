"""MUNIT's generator-side losses (Huang et al. 2018; docs/method.md §7): pure functions returning (loss, logs).

The adversarial terms are the project's LSGAN losses (step_ray.losses.gan) on an unconditional
`PatchDiscriminator`, called as D(None, image). Official MUNIT sums them over scales the same way; its D
loss has no ½ factor, a constant that Adam all but cancels.

Per domain i (j the other one), with c_i, s_i = E_i(x_i) and s_j ~ N(0, I):
  x_i→j = G_j(c_i, s_j);  c_i', s_j' = E_j(x_i→j)
  image reconstruction   |G_i(c_i, s_i) − x_i|                    (λ_x = 10)
  content reconstruction |c_i' − c_i|                              (λ_c = 1)
  style reconstruction   |s_j' − s_j|                              (λ_s = 1)
  style-augmented cycle  |G_i(c_i', s_i) − x_i|                    (λ_cyc = 0 for edges2shoes)
  domain-invariant VGG   |IN(φ(x_i→j)) − IN(φ(x_i))|²              (λ_vgg = 0 for edges2shoes)
Each weight multiplies the sum of the two domains' terms (as in the official trainer).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

Term = tuple[torch.Tensor, dict[str, float]]


def _l1(fake: torch.Tensor, target: torch.Tensor, key: str, detach_target: bool = True) -> Term:
    if fake.shape != target.shape:
        raise ValueError(f"{key}: shapes differ, {tuple(fake.shape)} vs {tuple(target.shape)}")
    target = target.detach() if detach_target else target
    loss = (fake.float() - target.float()).abs().mean()
    return loss, {key: float(loss.detach())}


def image_reconstruction_loss(x_rec: torch.Tensor, x: torch.Tensor) -> Term:
    """mean |G(E^c(x), E^s(x)) − x|: within-domain auto-encoding."""
    return _l1(x_rec, x, "recon_x")


def content_reconstruction_loss(c_rec: torch.Tensor, c: torch.Tensor, detach_target: bool = False) -> Term:
    """mean |E^c_j(G_j(c, s)) − c|. Official MUNIT lets the gradient reach the original code c too (the
    content encoder is pulled from both ends), hence `detach_target=False` by default; True makes c a fixed
    target."""
    return _l1(c_rec, c, "recon_c", detach_target)


def style_reconstruction_loss(s_rec: torch.Tensor, s: torch.Tensor) -> Term:
    """mean |E^s_j(G_j(c, s)) − s| for a style s drawn from the prior (a fixed target)."""
    return _l1(s_rec, s, "recon_s")


def cycle_consistency_loss(x_cyc: torch.Tensor, x: torch.Tensor) -> Term:
    """mean |G_i(E^c_j(x_i→j), E^s_i(x_i)) − x_i|: the style-augmented (weak) cycle consistency."""
    return _l1(x_cyc, x, "cycle")


def instance_normalised_perceptual_loss(vgg: torch.nn.Module, fake: torch.Tensor, real: torch.Tensor,
                                        layer_weights: Sequence[float] | None = None) -> Term:
    """MUNIT's domain-invariant VGG loss: MSE between instance-normalised (no affine) VGG features of `fake`
    and `real`, images in [-1, 1]. Instance norm removes per-channel feature statistics, i.e. mostly the
    domain's style, so the loss compares content across domains. `vgg` maps images to a list of feature
    maps (a `VGGFeatures`); per-map MSEs are averaged, or summed with `layer_weights`. `real` gets no
    gradient. Official MUNIT uses one map, VGG-16 relu5_3: ``VGGConfig(layers=("relu5_3",))``."""
    with torch.no_grad():
        real_feats = vgg(real)
    fake_feats = vgg(fake)
    if len(fake_feats) != len(real_feats):
        raise ValueError(f"vgg returned {len(fake_feats)} fake and {len(real_feats)} real feature maps")
    weights = [1.0 / len(fake_feats)] * len(fake_feats) if layer_weights is None else list(layer_weights)
    if len(weights) != len(fake_feats):
        raise ValueError(f"{len(weights)} layer weights for {len(fake_feats)} feature maps")
    terms = [F.mse_loss(F.instance_norm(f.float()), F.instance_norm(r.detach().float()))
             for f, r in zip(fake_feats, real_feats)]
    loss = sum(w * t for w, t in zip(weights, terms))
    return loss, {"vgg_in": float(loss.detach()), **{f"vgg_in_l{i}": float(t.detach()) for i, t in enumerate(terms)}}


@dataclass(frozen=True)
class MUNITLossWeights:
    """λ per generator term; official edges2shoes defaults (gan_w, recon_x_w, recon_c_w, recon_s_w,
    recon_x_cyc_w, vgg_w). A zero weight means "do not compute the term" (see `active`)."""

    gan: float = 1.0
    x: float = 10.0
    c: float = 1.0
    s: float = 1.0
    cyc: float = 0.0
    vgg: float = 0.0

    def __post_init__(self):
        negative = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) < 0}
        if negative:
            raise ValueError(f"MUNIT loss weights must be >= 0, got {negative}")

    def active(self) -> tuple[str, ...]:
        """Names of the terms with a non-zero weight: the ones a training step needs to compute."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name) > 0)


_TERM_NAMES = tuple(f.name for f in fields(MUNITLossWeights))


def munit_generator_loss(weights: MUNITLossWeights, terms: Mapping[str, Term]) -> Term:
    """Σ weight·loss over the terms given, keyed by weight name (gan, x, c, s, cyc, vgg); terms left out
    count as zero, so a caller computes only `weights.active()`. Two-domain callers pass each term already
    summed over the domains. Logs: every term's own logs plus "loss_g"."""
    unknown = sorted(set(terms) - set(_TERM_NAMES))
    if unknown:
        raise ValueError(f"unknown MUNIT loss terms {unknown}; known: {list(_TERM_NAMES)}")
    if not terms:
        raise ValueError("munit_generator_loss needs at least one term")
    total: torch.Tensor | None = None
    logs: dict[str, float] = {}
    for name, (loss, term_logs) in terms.items():
        weighted = getattr(weights, name) * loss.float()
        total = weighted if total is None else total + weighted
        logs.update(term_logs)
    assert total is not None
    logs["loss_g"] = float(total.detach())
    return total, logs
