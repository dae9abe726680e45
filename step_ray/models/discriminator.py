"""The conditional multi-scale PatchGAN discriminator D(A, B) (docs/method.md §5).

Each scale is a pix2pix NLayerDiscriminator on concat(A, B): 4x4 convs, instance norm, LeakyReLU 0.2,
`n_layers` stride-2 convs, and (official StEP) a minibatch-standard-deviation channel before the last
conv. Scale s sees the input average-pooled s times. `forward` returns one patch map per scale.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from step_ray.models.generator import norm_layer


@dataclass(frozen=True)
class DiscriminatorConfig:
    a_channels: int = 3  # 0: unconditional (D sees B only)
    b_channels: int = 3
    base_channels: int = 64
    max_channels: int = 512
    n_layers: int = 3  # 0: resolved by fitted(image side): 3, or fewer where the image is too small for 3
    num_scales: int = 2
    norm: Literal["instance", "batch", "none"] = "instance"
    minibatch_stddev: bool = True
    # "halved": scale s has base_channels / 2**s filters and at most max_channels / 2**s (BicycleGAN's
    # D_NLayersMulti: 0.83 M parameters at 64 filters, 2 scales, 2 layers, against 1.33 M with "same")
    scale_widths: Literal["same", "halved"] = "same"

    def __post_init__(self):
        if self.n_layers < 0 or self.num_scales < 1:
            raise ValueError("discriminator n_layers must be >= 1 (or 0: for the image size) and num_scales >= 1")
        if self.scale_widths not in ("same", "halved"):
            raise ValueError(f"discriminator scale_widths must be same or halved, got {self.scale_widths!r}")
        if self.scale_widths == "halved" and self.base_channels < 2 ** (self.num_scales - 1):
            raise ValueError(f"discriminator base_channels={self.base_channels} cannot be halved over "
                             f"{self.num_scales} scales")

    def fitted(self, side: int, most: int = 3) -> "DiscriminatorConfig":
        """n_layers=0 resolved for `side`: the most layers (at most `most`) the coarsest scale still fits."""
        if self.n_layers:
            return self
        for layers in range(most, 0, -1):
            candidate = dataclasses.replace(self, n_layers=layers)
            if candidate.min_side() <= side:
                return candidate
        raise ValueError(f"a {self.num_scales}-scale discriminator needs images of at least "
                         f"{dataclasses.replace(self, n_layers=1).min_side()} px; got {side} (lower num_scales)")

    def at_scale(self, s: int) -> "DiscriminatorConfig":
        """The settings of scale `s` (0 = full resolution): its own width when scale_widths="halved"."""
        if self.scale_widths == "same" or s == 0:
            return self
        return dataclasses.replace(self, base_channels=int(round(self.base_channels / 2**s)),
                                   max_channels=self.max_channels // 2**s)

    def min_side(self) -> int:
        """The smallest input side for which the coarsest scale still yields a patch map."""
        if not self.n_layers:
            raise ValueError("discriminator.n_layers=0 must be resolved for the image size "
                             "(DiscriminatorConfig.fitted)")
        side = 1  # output size of the last conv (k4 s1 p1: out = in - 1)
        side += 1  # the penultimate stride-1 conv
        side += 1
        side = side * 2**self.n_layers
        return side * 2 ** (self.num_scales - 1)


class MinibatchStdDev(nn.Module):
    """Appends one channel: the mean over features of the std over each group of consecutive samples."""

    def forward(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        n, c, h, w = x.shape
        if n % groups:
            raise ValueError(f"batch {n} does not split into {groups} groups")
        g = x.view(groups, n // groups, c, h, w)
        std = (g.var(1, unbiased=False) + 1e-8).sqrt().mean([1, 2, 3])  # [groups]
        stat = std.repeat_interleave(n // groups).view(n, 1, 1, 1).expand(n, 1, h, w)
        return torch.cat([x, stat.to(x.dtype)], 1)


class PatchGAN(nn.Module):
    """One scale: a PatchGAN on concat(A, B)."""

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        ch = lambda i: min(cfg.base_channels * 2**i, cfg.max_channels)  # noqa: E731
        layers: list[nn.Module] = [nn.Conv2d(cfg.a_channels + cfg.b_channels, ch(0), 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, cfg.n_layers):
            layers += [nn.Conv2d(ch(i - 1), ch(i), 4, 2, 1), norm_layer(cfg.norm, ch(i)), nn.LeakyReLU(0.2)]
        cin = ch(cfg.n_layers - 1)
        layers += [nn.Conv2d(cin, ch(cfg.n_layers), 4, 1, 1), norm_layer(cfg.norm, ch(cfg.n_layers)), nn.LeakyReLU(0.2)]
        self.body = nn.Sequential(*layers)
        self.mbstd = MinibatchStdDev() if cfg.minibatch_stddev else None
        self.head = nn.Conv2d(ch(cfg.n_layers) + (1 if self.mbstd else 0), 1, 4, 1, 1)

    def forward(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        h = self.body(x)
        if self.mbstd is not None:
            h = self.mbstd(h, groups)
        return self.head(h)


class PatchDiscriminator(nn.Module):
    """D(A, B) -> [patch logits per scale]; `groups` > 1 when the batch stacks independent halves
    (e.g. real and fake), so the minibatch statistic never mixes them."""

    def __init__(self, cfg: DiscriminatorConfig = DiscriminatorConfig()):
        super().__init__()
        if not cfg.n_layers:
            raise ValueError("discriminator.n_layers=0 must be resolved for the image size "
                             "(DiscriminatorConfig.fitted)")
        self.cfg = cfg
        self.scales = nn.ModuleList(PatchGAN(cfg.at_scale(s)) for s in range(cfg.num_scales))
        self.down = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    def forward(self, a: torch.Tensor | None, b: torch.Tensor, groups: int = 1) -> list[torch.Tensor]:
        if min(b.shape[2:]) < self.cfg.min_side():
            raise ValueError(f"discriminator with n_layers={self.cfg.n_layers}, num_scales={self.cfg.num_scales} "
                             f"needs images of at least {self.cfg.min_side()} px; got {tuple(b.shape[2:])}")
        x = b if not self.cfg.a_channels else torch.cat([a, b], 1)
        out = []
        for i, d in enumerate(self.scales):
            if i:
                x = self.down(x)
            out.append(d(x, groups))
        return out
