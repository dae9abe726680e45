"""The style encoder E: image -> low-dimensional style code z (METHOD §4)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class EncoderConfig:
    """Official StEP encoder: 4x4 stride-2 conv 3->64, residual blocks 64->128->192->256 each followed by
    average-pool down-sampling, LeakyReLU 0.2, global average pooling, a linear head to nz (= 8)."""

    nz: int = 8
    in_channels: int = 3
    base_channels: int = 64
    block_channels: tuple[int, ...] = (128, 192, 256)
    norm: str = "none"  # none | instance | batch
    variational: bool = False  # a second (log-variance) head, for the VAE baselines

    def __post_init__(self):
        if self.nz < 1:
            raise ValueError(f"nz must be >= 1, got {self.nz}")
        if self.norm not in ("none", "instance", "batch"):
            raise ValueError(f"norm must be none, instance or batch, got {self.norm!r}")
        if not self.block_channels:
            raise ValueError("block_channels must name at least one block")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class ResidualDownBlock(nn.Module):
    """norm-act-conv3x3 twice with a 1x1 shortcut, then 2x average-pool (BicycleGAN's BasicBlock shape)."""

    def __init__(self, cin: int, cout: int, norm: str = "none"):
        super().__init__()
        self.body = nn.Sequential(
            _norm(norm, cin),
            nn.LeakyReLU(0.2),
            nn.Conv2d(cin, cin, 3, padding=1),
            _norm(norm, cin),
            nn.LeakyReLU(0.2),
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.AvgPool2d(2),
        )
        self.shortcut = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class StyleEncoder(nn.Module):
    """E(x) -> z in R^nz. Input images in [-1, 1], any side that is a multiple of 2^(1+len(blocks))."""

    def __init__(self, cfg: EncoderConfig = EncoderConfig()):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.base_channels, 4, stride=2, padding=1)]
        cin = cfg.base_channels
        for cout in cfg.block_channels:
            layers.append(ResidualDownBlock(cin, cout, cfg.norm))
            cin = cout
        layers += [nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.mean = nn.Linear(cin, cfg.nz)
        self.logvar = nn.Linear(cin, cfg.nz) if cfg.variational else None

    def forward(self, x: torch.Tensor, with_logvar: bool = False):
        """The deterministic code (the mean for a variational encoder); with_logvar=True: (mean, log-variance)
        of q(z|x), a variational encoder only. One forward for both, so a DDP-wrapped E works either way."""
        h = self.features(x)
        if not with_logvar:
            return self.mean(h)
        if self.logvar is None:
            raise RuntimeError("with_logvar=True needs EncoderConfig(variational=True)")
        return self.mean(h), self.logvar(h)

    def distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of q(z|x); only for a variational encoder."""
        return self(x, with_logvar=True)
