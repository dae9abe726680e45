"""MUNIT's networks (Huang et al. 2018; docs/method.md §7, seeds 002/003): per domain, a content encoder, a style
encoder and an AdaIN decoder. Plain nn.Modules; the two-domain training loop lives elsewhere.

- `ContentEncoder`: 7x7 conv, `n_downsample` 4x4 stride-2 convs doubling the channels, `n_res` residual
  blocks; instance norm everywhere. The content code is a spatial map [N, dim·2^n_downsample, H/2^n, W/2^n].
- `MUNITStyleEncoder`: 7x7 conv, 2 stride-2 convs doubling the channels, `style_n_downsample − 2` more
  stride-2 convs at constant width, global average pooling, 1x1 conv to `style_dim`. No normalisation:
  instance norm would remove exactly the feature statistics that carry style.
- `Decoder`: `n_res` residual blocks normalised by `AdaIN`, whose per-sample scale and shift an `MLP`
  predicts from the style code; then `n_downsample` × (nearest 2x up-sampling, 5x5 conv halving the
  channels, `LayerNorm2d`, activation); a 7x7 conv and tanh to an image in [-1, 1].
- `MUNITGenerator`: one domain's auto-encoder (the three above).

Discriminator: MUNIT's multi-scale LSGAN D (official edges2shoes: dim 64, 4 layers, 3 scales, no norm,
LeakyReLU 0.2) is expressed with the project's own network,
``PatchDiscriminator(DiscriminatorConfig(a_channels=0, n_layers=4, num_scales=3, norm="none",
minibatch_stddev=False))`` (see `munit_discriminator_config`), called as ``D(None, image)``. It is the
closest equivalent, not a copy: MUNIT's D ends with a 1x1 conv right after its 4 stride-2 convs, while the
project's PatchGAN adds a 4x4 stride-1 conv and a 4x4 head, and pads with zeros rather than by reflection.
The extra stride-1 convs make that configuration need images of at least 192 px
(`DiscriminatorConfig.min_side()`); MUNIT trains at 256 px, where it works; 32 px tests must shrink it
(e.g. ``n_layers=1, num_scales=3`` or ``n_layers=2, num_scales=2``). MUNIT initialises D's weights from
N(0, 0.02): `init_weights_(d, "gaussian")`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from step_ray.models.discriminator import DiscriminatorConfig

_PAD_MODES = {"reflect": "reflect", "replicate": "replicate", "zero": "zeros"}


@dataclass(frozen=True)
class MUNITConfig:
    """One domain's MUNIT auto-encoder; defaults are the official edges2shoes ones (gen section of
    edges2shoes_folder.yaml). The style encoder always down-samples `style_n_downsample` (official: 4) times,
    independently of the content encoder's `n_downsample`."""

    style_dim: int = 8
    dim: int = 64
    mlp_dim: int = 256
    n_downsample: int = 2
    n_res: int = 4
    style_n_downsample: int = 4
    in_channels: int = 3  # the decoder outputs as many channels
    activation: Literal["relu", "lrelu"] = "relu"
    pad: Literal["reflect", "replicate", "zero"] = "reflect"

    def __post_init__(self):
        for name in ("style_dim", "dim", "mlp_dim", "in_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"munit.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_downsample < 0:
            raise ValueError(f"munit.n_downsample must be >= 0, got {self.n_downsample}")
        if self.n_res < 1:  # the AdaIN layers live in the residual blocks: without one, style is ignored
            raise ValueError(f"munit.n_res must be >= 1, got {self.n_res}")
        if self.style_n_downsample < 2:
            raise ValueError(f"munit.style_n_downsample must be >= 2, got {self.style_n_downsample}")
        if self.activation not in ("relu", "lrelu"):
            raise ValueError(f"munit.activation must be relu or lrelu, got {self.activation!r}")
        if self.pad not in _PAD_MODES:
            raise ValueError(f"munit.pad must be one of {sorted(_PAD_MODES)}, got {self.pad!r}")

    @property
    def content_channels(self) -> int:
        return self.dim * 2**self.n_downsample

    def check_image_size(self, side: int) -> None:
        """Decoded images have the input's size only if each down-sampling halves the side exactly."""
        if side % (2**self.n_downsample):
            raise ValueError(f"munit.n_downsample={self.n_downsample} needs an image side divisible by "
                             f"{2**self.n_downsample}; got {side}")


def _activation(cfg: MUNITConfig) -> nn.Module:
    return nn.ReLU() if cfg.activation == "relu" else nn.LeakyReLU(0.2)


def _conv(cfg: MUNITConfig, cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    # Padding that keeps "same" size at stride 1 and halves it exactly at stride 2 for the 4x4 kernels.
    pad = (kernel - 1) // 2 if kernel % 2 else kernel // 2 - 1
    return nn.Conv2d(cin, cout, kernel, stride, pad, padding_mode=_PAD_MODES[cfg.pad])


def _conv_block(cfg: MUNITConfig, cin: int, cout: int, kernel: int, stride: int = 1,
                norm: nn.Module | None = None) -> nn.Sequential:
    """conv → norm (optional) → activation."""
    layers: list[nn.Module] = [_conv(cfg, cin, cout, kernel, stride)]
    if norm is not None:
        layers.append(norm)
    layers.append(_activation(cfg))
    return nn.Sequential(*layers)


class AdaIN(nn.Module):
    """Adaptive instance norm: instance-normalise, then scale by `weight` and shift by `bias`, both [N, C].

    They are per-sample, not parameters: whoever owns the layer (the `Decoder`) assigns them from the
    style MLP right before the forward and clears them after, so no stale, graph-holding tensor survives a
    call and the layer never silently reuses another batch's style.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight: torch.Tensor | None = None  # the "std" half of the MLP output
        self.bias: torch.Tensor | None = None  # the "mean" half

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or self.bias is None:
            raise RuntimeError("AdaIN weight and bias are unset: run it through Decoder.forward(content, style)")
        expected = (x.shape[0], self.num_features)
        if tuple(self.weight.shape) != expected or tuple(self.bias.shape) != expected:
            raise ValueError(f"AdaIN expects weight and bias of shape {expected}, got "
                             f"{tuple(self.weight.shape)} and {tuple(self.bias.shape)}")
        h = F.instance_norm(x, eps=self.eps)
        return h * self.weight[:, :, None, None].to(h.dtype) + self.bias[:, :, None, None].to(h.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class LayerNorm2d(nn.Module):
    """Per-sample normalisation over (C, H, W) with a learnt per-channel scale and shift: MUNIT's norm in the
    decoder's up-sampling path (instance norm there would wipe out the AdaIN-injected style statistics)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(num_features))
        self.beta = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x, x.shape[1:], eps=self.eps)
        return h * self.gamma[None, :, None, None] + self.beta[None, :, None, None]


class ResBlock(nn.Module):
    """x + (conv3x3 → norm → act → conv3x3 → norm)(x); `norm` builds the norm layer for a channel count."""

    def __init__(self, cfg: MUNITConfig, channels: int, norm: Callable[[int], nn.Module]):
        super().__init__()
        self.body = nn.Sequential(
            _conv_block(cfg, channels, channels, 3, norm=norm(channels)),
            _conv(cfg, channels, channels, 3),
            norm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _instance_norm(channels: int) -> nn.Module:
    return nn.InstanceNorm2d(channels)  # no affine, as in MUNIT


class ContentEncoder(nn.Module):
    """x [N, in_channels, H, W] -> content code [N, dim·2^n_downsample, H/2^n_downsample, W/2^n_downsample]."""

    def __init__(self, cfg: MUNITConfig = MUNITConfig()):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = [_conv_block(cfg, cfg.in_channels, cfg.dim, 7, norm=_instance_norm(cfg.dim))]
        ch = cfg.dim
        for _ in range(cfg.n_downsample):
            layers.append(_conv_block(cfg, ch, 2 * ch, 4, stride=2, norm=_instance_norm(2 * ch)))
            ch *= 2
        layers += [ResBlock(cfg, ch, _instance_norm) for _ in range(cfg.n_res)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MUNITStyleEncoder(nn.Module):
    """x [N, in_channels, H, W] -> style code [N, style_dim]; sides of at least 2^style_n_downsample (and 4)."""

    def __init__(self, cfg: MUNITConfig = MUNITConfig()):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = [_conv_block(cfg, cfg.in_channels, cfg.dim, 7)]
        ch = cfg.dim
        for i in range(cfg.style_n_downsample):
            # The first two down-samplings widen; the rest only shrink the map (MUNIT caps the width there).
            cout = 2 * ch if i < 2 else ch
            layers.append(_conv_block(cfg, ch, cout, 4, stride=2))
            ch = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Conv2d(ch, cfg.style_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


class MLP(nn.Module):
    """in_dim → hidden → … → out_dim with `n_layers` linear layers and the activation between them (none
    after the last: its outputs are AdaIN scales and shifts, which may be any sign)."""

    def __init__(self, cfg: MUNITConfig, in_dim: int, hidden: int, out_dim: int, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"MLP n_layers must be >= 1, got {n_layers}")
        widths = [in_dim] + [hidden] * (n_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if i < n_layers - 1:
                layers.append(_activation(cfg))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    """(content [N, dim·2^n, h, w], style [N, style_dim]) -> image [N, in_channels, h·2^n, w·2^n] in [-1, 1]."""

    def __init__(self, cfg: MUNITConfig = MUNITConfig()):
        super().__init__()
        self.cfg = cfg
        ch = cfg.content_channels
        self.res = nn.Sequential(*(ResBlock(cfg, ch, AdaIN) for _ in range(cfg.n_res)))
        layers: list[nn.Module] = []
        for _ in range(cfg.n_downsample):
            # Nearest up-sampling + conv instead of a transposed conv avoids checkerboard artefacts.
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       _conv_block(cfg, ch, ch // 2, 5, norm=LayerNorm2d(ch // 2))]
            ch //= 2
        layers += [_conv(cfg, ch, cfg.in_channels, 7), nn.Tanh()]
        self.up = nn.Sequential(*layers)
        self.mlp = MLP(cfg, cfg.style_dim, cfg.mlp_dim, self.num_adain_params(), n_layers=3)

    def adain_layers(self) -> list[AdaIN]:
        return [m for m in self.res.modules() if isinstance(m, AdaIN)]

    def num_adain_params(self) -> int:
        """Two values (shift, scale) per channel of every AdaIN layer: the MLP's output width."""
        return sum(2 * m.num_features for m in self.adain_layers())

    def forward(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        if style.ndim != 2 or style.shape[1] != self.cfg.style_dim:
            raise ValueError(f"Decoder expects style of shape [N, {self.cfg.style_dim}], got {tuple(style.shape)}")
        params = self.mlp(style)
        layers = self.adain_layers()
        try:
            offset = 0
            for layer in layers:  # per layer: [shift (C) | scale (C)], MUNIT's layout
                c = layer.num_features
                layer.bias = params[:, offset:offset + c]
                layer.weight = params[:, offset + c:offset + 2 * c]
                offset += 2 * c
            return self.up(self.res(content))
        finally:
            for layer in layers:
                layer.weight = layer.bias = None


class MUNITGenerator(nn.Module):
    """One domain's MUNIT auto-encoder. `encode(x) -> (content, style)`, `decode(content, style) -> image`,
    `forward(x, style) = decode(content of x, style)` (translation within the decoder's domain when the
    content comes from this domain's encoder; cross-domain translation combines one generator's `encode`
    with the other's `decode`). Under DDP use the wrapper's forward: encode/decode bypass its hooks.

    Weights start from MUNIT's generator init (Kaiming-normal, fan-in, zero bias) unless `init="default"`.
    """

    def __init__(self, cfg: MUNITConfig = MUNITConfig(), init: Literal["kaiming", "gaussian", "default"] = "kaiming"):
        super().__init__()
        self.cfg = cfg
        self.enc_content = ContentEncoder(cfg)
        self.enc_style = MUNITStyleEncoder(cfg)
        self.dec = Decoder(cfg)
        init_weights_(self, init)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.enc_content(x), self.enc_style(x)

    def decode(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.dec(content, style)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.decode(self.enc_content(x), style)


def init_weights_(module: nn.Module, kind: Literal["kaiming", "gaussian", "default"] = "kaiming") -> nn.Module:
    """MUNIT's initialisations, applied in place to every Conv/Linear weight (biases zeroed): "kaiming"
    (its generators: Kaiming-normal, fan-in, gain for ReLU) or "gaussian" (its discriminators: N(0, 0.02)).
    "default" leaves PyTorch's. Norm layers keep their own init."""
    if kind not in ("kaiming", "gaussian", "default"):
        raise ValueError(f"init must be kaiming, gaussian or default, got {kind!r}")
    if kind == "default":
        return module
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            if kind == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            else:
                nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def munit_discriminator_config(**overrides) -> DiscriminatorConfig:
    """MUNIT's D in the project's terms (see the module docstring): unconditional, 4 layers, 3 scales, no
    norm, no minibatch-stddev channel. `overrides` replace fields, e.g. base_channels or n_layers for tests."""
    return dataclasses.replace(
        DiscriminatorConfig(a_channels=0, n_layers=4, num_scales=3, norm="none", minibatch_stddev=False), **overrides)
