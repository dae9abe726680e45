"""The generator G(A, z): the pix2pix U-Net with the style code z tiled and concatenated (docs/method.md §5).

`z_injection="input"` concatenates z to the input image only (BicycleGAN's G_Unet_add_input);
`"all"` concatenates it to the input of every encoder layer (BicycleGAN's G_Unet_add_all). The decoder
is the usual U-Net one: transposed convs with skip connections, tanh output in [-1, 1].
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class GeneratorConfig:
    """U-Net depth `num_downs`: the image side must be a multiple of 2**num_downs (8 for 256 px, 5 for 32 px).
    0 means "for the image size": `fitted(side)` resolves it to the deepest of at most 6 the side allows."""

    nz: int = 8  # 0: no style input (a plain pix2pix U-Net)
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 64
    max_channels: int = 512
    num_downs: int = 6  # 0: resolved by fitted(image side)
    z_injection: Literal["input", "all"] = "all"
    norm: Literal["instance", "batch", "none"] = "instance"
    dropout: float = 0.0  # in the innermost decoder blocks (pix2pix uses 0.5; StEP none)

    def __post_init__(self):
        if self.nz < 0:
            raise ValueError(f"nz must be >= 0, got {self.nz}")
        if self.num_downs != 0 and self.num_downs < 2:
            raise ValueError(f"num_downs must be >= 2 (or 0: for the image size), got {self.num_downs}")
        if self.z_injection not in ("input", "all"):
            raise ValueError(f"z_injection must be 'input' or 'all', got {self.z_injection!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def fitted(self, side: int, deepest: int = 6) -> "GeneratorConfig":
        """num_downs=0 resolved for `side`: the deepest U-Net (at most `deepest`) whose side divides."""
        if self.num_downs:
            return self
        downs = max(d for d in range(2, deepest + 1) if side % 2**d == 0) if side % 4 == 0 else 0
        if not downs:
            raise ValueError(f"image side {side} is not divisible by 4: no U-Net depth fits it")
        return dataclasses.replace(self, num_downs=downs)

    def check_image_size(self, side: int) -> None:
        if not self.num_downs:
            raise ValueError("generator.num_downs=0 must be resolved for the image size (GeneratorConfig.fitted)")
        if side % (2**self.num_downs):
            raise ValueError(f"generator.num_downs={self.num_downs} needs an image side divisible by "
                             f"{2**self.num_downs}; got {side}")


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


def tile_z(z: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """z [N, nz] -> [N, nz, H, W] matching `like`'s spatial size."""
    return z[:, :, None, None].expand(-1, -1, like.shape[2], like.shape[3])


class UNetGenerator(nn.Module):
    """G(A, z) -> B̂ in [-1, 1]; A in [-1, 1] NCHW, z [N, nz]."""

    def __init__(self, cfg: GeneratorConfig = GeneratorConfig()):
        super().__init__()
        if not cfg.num_downs:
            raise ValueError("generator.num_downs=0 must be resolved for the image size (GeneratorConfig.fitted)")
        self.cfg = cfg
        n = cfg.num_downs
        chans = [min(cfg.base_channels * 2**i, cfg.max_channels) for i in range(n)]
        self.downs = nn.ModuleList()
        for i in range(n):
            cin = cfg.in_channels if i == 0 else chans[i - 1]
            if cfg.nz and (i == 0 or cfg.z_injection == "all"):
                cin += cfg.nz
            conv = nn.Conv2d(cin, chans[i], 4, stride=2, padding=1)
            if i == 0:
                self.downs.append(nn.Sequential(conv))
            elif i == n - 1:  # innermost: 1x1 at the full depth, no norm
                self.downs.append(nn.Sequential(nn.LeakyReLU(0.2), conv))
            else:
                self.downs.append(nn.Sequential(nn.LeakyReLU(0.2), conv, norm_layer(cfg.norm, chans[i])))
        self.ups = nn.ModuleList()  # ups[i] mirrors downs[i]; applied innermost first
        for i in range(n):
            cin = chans[i] if i == n - 1 else 2 * chans[i]
            if i == 0:
                self.ups.append(nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(cin, cfg.out_channels, 4, 2, 1), nn.Tanh()))
            else:
                layers = [nn.ReLU(), nn.ConvTranspose2d(cin, chans[i - 1], 4, 2, 1), norm_layer(cfg.norm, chans[i - 1])]
                if cfg.dropout and i >= n - 3:
                    layers.append(nn.Dropout(cfg.dropout))
                self.ups.append(nn.Sequential(*layers))

    def forward(self, a: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        if cfg.nz and (z is None or z.shape[1] != cfg.nz):
            raise ValueError(f"G expects z of shape [N, {cfg.nz}], got {None if z is None else tuple(z.shape)}")
        skips, h = [], a
        for i, down in enumerate(self.downs):
            if cfg.nz and (i == 0 or cfg.z_injection == "all"):
                h = torch.cat([h, tile_z(z.to(h.dtype), h)], 1)
            h = down(h)
            skips.append(h)
        for i in reversed(range(cfg.num_downs)):
            h = self.ups[i](h if i == cfg.num_downs - 1 else torch.cat([h, skips[i]], 1))
        return h
