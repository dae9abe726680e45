"""The style mapper M: unit-Gaussian noise -> style space (docs/method.md §6), trained by IMLE in
step_ray.pipelines.mapper."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class MapperConfig:
    """Official StEP: noise 8, three hidden layers of 128 with tanh, linear output 8."""

    noise_dim: int = 8
    nz: int = 8
    hidden: tuple[int, ...] = (128, 128, 128)
    activation: Literal["tanh", "relu", "leaky_relu"] = "tanh"

    def __post_init__(self):
        if self.noise_dim < 1 or self.nz < 1:
            raise ValueError("mapper noise_dim and nz must be >= 1")


class StyleMapper(nn.Module):
    def __init__(self, cfg: MapperConfig = MapperConfig()):
        super().__init__()
        self.cfg = cfg
        act = {"tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2)}[cfg.activation]
        layers: list[nn.Module] = []
        cin = cfg.noise_dim
        for width in cfg.hidden:
            layers += [nn.Linear(cin, width), act()]
            cin = width
        layers.append(nn.Linear(cin, cfg.nz))
        self.net = nn.Sequential(*layers)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.net(r)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n style codes from fresh noise (no gradient)."""
        device = next(self.parameters()).device
        r = torch.randn(n, self.cfg.noise_dim, generator=generator).to(device)
        with torch.no_grad():
            return self(r)
