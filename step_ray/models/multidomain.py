"""The multi-domain disentangled style model's networks (docs/method.md §7, seed 004; StarGAN v2 family). Plain
nn.Modules: no training logic (the losses live in step_ray.losses.multidomain, the loop elsewhere).

- `StyleFlow`: the latent-style mapping. A conditional neural spline flow (zuko's `NSF`) whose spline
  parameters a hyper-network computes from the one-hot domain u, i.e. θ_u = MLP(u), s = f(z; θ_u): Gaussian
  noise z ~ N(0, I) to the style space of domain u. It replaces StarGAN v2's mapping network.
- `MultiDomainStyleEncoder`: the reference style encoder E^u: a shared residual conv trunk, global average
  pooling, one linear head per domain.
- `MultiDomainGenerator`: G(x, s): StarGAN v2's encoder (instance-normalised residual down blocks) and
  decoder (residual blocks whose AdaIN scale and shift a per-block linear layer computes from s).
- `MultiDomainDiscriminator`: the same kind of trunk as the style encoder, one real/fake logit per domain.
- `StyleDiscriminator`: D_s, an MLP on a style code with one logit per domain, "is this a reference style
  (real) rather than a latent one" (L_uni makes the two style distributions indistinguishable).

Every network but the flow starts from StarGAN v2's He init (`init_weights_(m, "kaiming")`: Kaiming-normal,
fan-in, zero bias); the flow keeps zuko's own initialisation (its masked linear layers are nn.Linear
subclasses, but re-initialising them would ignore the masks' fan-in).

Differences from StarGAN v2 (settings, not omissions, unless stated): widths start at `dim` and double per
down-sampling up to `max_dim` (StarGAN v2: 2^14 / img_size up to 512); the generator down-samples `n_down`
times (StarGAN v2: log2(img_size) − 4) and the style encoder / discriminator `encoder_down` times followed
by global average pooling (StarGAN v2: log2(img_size) − 2 times, then a 4x4 valid conv on the 4x4 map); the
generator ends with tanh (see `MultiDomainGenerator`); no high-pass-filter / face-mask skip (w_hpf, CelebA-HQ
only) is implemented.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
import zuko
from torch import nn

from step_ray.models.munit import init_weights_

_INITS = ("kaiming", "default")


@dataclass(frozen=True)
class MultiDomainConfig:
    """All networks of the multi-domain model. Defaults: StarGAN v2 (style_dim 64, widths to 512, two
    bottleneck blocks per side) where it has a value; the flow's sizes are the project's choice.

    `flow_passes`: zuko's `passes` for every spline transform. 2 (the default) makes each transform a
    coupling layer: noise -> style (the direction every training step uses, with gradients) and style ->
    noise both cost one hyper-network pass per transform. None makes the transforms fully autoregressive
    (zuko's NSF default): style -> noise is still one pass, but noise -> style then needs `style_dim`
    sequential passes per transform (measured on CPU, style_dim 64, 3 transforms, batch 8: ~46x slower
    sampling + backward than passes=2).
    """

    num_domains: int = 3
    style_dim: int = 64
    dim: int = 64  # width of the first conv of G, E and D
    max_dim: int = 512
    n_down: int = 2  # generator down-samplings (StarGAN v2: log2(img_size) - 4)
    n_bottleneck: int = 2  # residual blocks at the generator's bottleneck, per side (encoder, decoder)
    encoder_down: int = 4  # style encoder / discriminator down-samplings, then global average pooling
    in_channels: int = 3  # the generator outputs as many channels
    flow_transforms: int = 3
    flow_bins: int = 8
    flow_hidden: tuple[int, ...] = (64, 64)
    flow_passes: int | None = 2
    style_disc_hidden: tuple[int, ...] = (256, 256)

    def __post_init__(self):
        for name in ("num_domains", "dim", "in_channels", "flow_transforms", "encoder_down"):
            if getattr(self, name) < 1:
                raise ValueError(f"multidomain.{name} must be >= 1, got {getattr(self, name)}")
        if self.style_dim < 2:  # zuko's autoregressive/coupling transforms need at least two features
            raise ValueError(f"multidomain.style_dim must be >= 2, got {self.style_dim}")
        if self.max_dim < self.dim:
            raise ValueError(f"multidomain.max_dim ({self.max_dim}) must be >= dim ({self.dim})")
        if self.n_down < 0 or self.n_bottleneck < 0:
            raise ValueError(f"multidomain.n_down and n_bottleneck must be >= 0, got {self.n_down}, "
                             f"{self.n_bottleneck}")
        if self.n_down + self.n_bottleneck < 1:  # the decoder's AdaIN blocks are where the style enters
            raise ValueError("multidomain.n_down + n_bottleneck must be >= 1: without a decoder block the "
                             "generator ignores the style")
        if self.flow_bins < 2:
            raise ValueError(f"multidomain.flow_bins must be >= 2, got {self.flow_bins}")
        if self.flow_passes is not None and self.flow_passes < 1:
            raise ValueError(f"multidomain.flow_passes must be None or >= 1, got {self.flow_passes}")
        if not self.flow_hidden:  # θ_u = MLP(u): the hyper-network needs a hidden layer
            raise ValueError("multidomain.flow_hidden must name at least one hidden layer")
        for name in ("flow_hidden", "style_disc_hidden"):
            widths = getattr(self, name)
            if not isinstance(widths, tuple) or any(not isinstance(w, int) or w < 1 for w in widths):
                raise ValueError(f"multidomain.{name} must be a tuple of positive ints, got {widths!r}")

    def width(self, i: int) -> int:
        """Channels after the i-th down-sampling (i = 0: the first conv)."""
        return min(self.dim * 2**i, self.max_dim)

    def check_image_size(self, side: int) -> None:
        """G returns its input's size only if each down-sampling halves the side exactly, and its instance
        norms need a bottleneck of at least 2x2; E and D need at least a 1x1 map after their pooling."""
        g = 2**self.n_down
        if side % g or side // g < 2:
            raise ValueError(f"multidomain.n_down={self.n_down} needs an image side divisible by {g} and at "
                             f"least {2 * g}; got {side}")
        e = 2**self.encoder_down
        if side % e:
            raise ValueError(f"multidomain.encoder_down={self.encoder_down} needs an image side divisible by "
                             f"{e}; got {side}")


def _check_domains(y: torch.Tensor, n: int, num_domains: int) -> None:
    """Shape and dtype only: checking the values would synchronise with the GPU on every call (an
    out-of-range id fails in the indexing / one-hot instead)."""
    if y.ndim != 1 or y.shape[0] != n or y.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"expected domain ids as an integer tensor of shape [{n}] (values in "
                         f"[0, {num_domains})), got {y.dtype} {tuple(y.shape)}")


def _pick(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """out [N, num_domains, ...] -> out[i, y_i]."""
    return out[torch.arange(out.shape[0], device=out.device), y.long()]


class ResBlk(nn.Module):
    """StarGAN v2's residual block: (shortcut + residual) / √2, where residual = [IN] → LReLU(0.2) → conv3x3
    (cin → cin) → [avg-pool] → [IN] → LReLU → conv3x3 (cin → cout) and shortcut = [conv1x1] → [avg-pool].
    Instance norms are affine, as in StarGAN v2. (Not step_ray.models.encoder.ResidualDownBlock: that one
    pools after both convs and does not rescale by √2.)"""

    def __init__(self, cin: int, cout: int, normalize: bool = False, downsample: bool = False):
        super().__init__()
        self.downsample = downsample
        self.norm1 = nn.InstanceNorm2d(cin, affine=True) if normalize else nn.Identity()
        self.conv1 = nn.Conv2d(cin, cin, 3, 1, 1)
        self.norm2 = nn.InstanceNorm2d(cin, affine=True) if normalize else nn.Identity()
        self.conv2 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.actv = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sc = self.shortcut(x)
        if self.downsample:
            sc = F.avg_pool2d(sc, 2)
        h = self.conv1(self.actv(self.norm1(x)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        h = self.conv2(self.actv(self.norm2(h)))
        return (sc + h) / math.sqrt(2)


class StyleAdaIN(nn.Module):
    """StarGAN v2's AdaIN: (1 + γ) · IN(x) + β with [γ | β] = fc(s), per sample. (Not munit.AdaIN, whose
    scale and shift its decoder assigns from one shared MLP before each call.)"""

    def __init__(self, style_dim: int, num_features: int):
        super().__init__()
        self.norm = nn.InstanceNorm2d(num_features, affine=False)
        self.fc = nn.Linear(style_dim, 2 * num_features)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.fc(s)[:, :, None, None].chunk(2, dim=1)
        return (1 + gamma) * self.norm(x) + beta


class AdainResBlk(nn.Module):
    """StarGAN v2's decoder block: (shortcut + residual) / √2, residual = AdaIN → LReLU(0.2) → [2x nearest
    up-sampling] → conv3x3 (cin → cout) → AdaIN → LReLU → conv3x3; shortcut = [up-sampling] → [conv1x1]."""

    def __init__(self, cin: int, cout: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.upsample = upsample
        self.norm1 = StyleAdaIN(style_dim, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2 = StyleAdaIN(style_dim, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.actv = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        sc = x
        if self.upsample:
            sc = F.interpolate(sc, scale_factor=2, mode="nearest")
        sc = self.shortcut(sc)
        h = self.actv(self.norm1(x, s))
        if self.upsample:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.conv1(h)
        h = self.conv2(self.actv(self.norm2(h, s)))
        return (sc + h) / math.sqrt(2)


def _check_style(s: torch.Tensor, n: int, style_dim: int, who: str) -> None:
    if s.ndim != 2 or s.shape != (n, style_dim):
        raise ValueError(f"{who} expects style codes of shape [{n}, {style_dim}], got {tuple(s.shape)}")


class MultiDomainGenerator(nn.Module):
    """G(x [N, C, H, W] in [-1, 1], s [N, style_dim]) -> image [N, C, H, W] in [-1, 1]; sides as
    `MultiDomainConfig.check_image_size` allows."""

    def __init__(self, cfg: MultiDomainConfig = MultiDomainConfig(), init: Literal["kaiming", "default"] = "kaiming"):
        super().__init__()
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        self.cfg = cfg
        self.from_rgb = nn.Conv2d(cfg.in_channels, cfg.dim, 3, 1, 1)
        encode: list[nn.Module] = []
        decode: list[nn.Module] = []
        for i in range(cfg.n_down):
            cin, cout = cfg.width(i), cfg.width(i + 1)
            encode.append(ResBlk(cin, cout, normalize=True, downsample=True))
            decode.insert(0, AdainResBlk(cout, cin, cfg.style_dim, upsample=True))
        ch = cfg.width(cfg.n_down)
        for _ in range(cfg.n_bottleneck):
            encode.append(ResBlk(ch, ch, normalize=True))
            decode.insert(0, AdainResBlk(ch, ch, cfg.style_dim))
        self.encode = nn.Sequential(*encode)
        self.decode = nn.ModuleList(decode)
        # StarGAN v2 ends with IN → LReLU → 1x1 conv and no output non-linearity; the tanh keeps images in
        # the project's [-1, 1] range (the data, the other generators and the metrics all assume it).
        self.to_rgb = nn.Sequential(nn.InstanceNorm2d(cfg.dim, affine=True), nn.LeakyReLU(0.2),
                                    nn.Conv2d(cfg.dim, cfg.in_channels, 1), nn.Tanh())
        init_weights_(self, init)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        _check_style(s, x.shape[0], self.cfg.style_dim, "MultiDomainGenerator")
        h = self.encode(self.from_rgb(x))
        for block in self.decode:
            h = block(h, s)
        return self.to_rgb(h)


class _Trunk(nn.Module):
    """conv3x3 → `encoder_down` × ResBlk(down-sampling, no norm) → LReLU(0.2) → global average pooling:
    the shared body of the style encoder and the discriminator. x [N, C, H, W] -> [N, width(encoder_down)]."""

    def __init__(self, cfg: MultiDomainConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, cfg.dim, 3, 1, 1)]
        for i in range(cfg.encoder_down):
            layers.append(ResBlk(cfg.width(i), cfg.width(i + 1), downsample=True))
        layers += [nn.LeakyReLU(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.out_features = cfg.width(cfg.encoder_down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiDomainStyleEncoder(nn.Module):
    """The reference style encoder E^u: `forward(x, y)` -> [N, style_dim], each row from its own domain's
    head; `all_domains(x)` -> [N, num_domains, style_dim]. No instance norm (it would erase the style)."""

    def __init__(self, cfg: MultiDomainConfig = MultiDomainConfig(), init: Literal["kaiming", "default"] = "kaiming"):
        super().__init__()
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        self.cfg = cfg
        self.trunk = _Trunk(cfg)
        self.heads = nn.ModuleList(nn.Linear(self.trunk.out_features, cfg.style_dim)
                                   for _ in range(cfg.num_domains))
        init_weights_(self, init)

    def all_domains(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        return torch.stack([head(h) for head in self.heads], dim=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_domains(y, x.shape[0], self.cfg.num_domains)
        return _pick(self.all_domains(x), y)


class MultiDomainDiscriminator(nn.Module):
    """D(x, y) -> [N] real/fake logit of each row's domain; `all_domains(x)` -> [N, num_domains]."""

    def __init__(self, cfg: MultiDomainConfig = MultiDomainConfig(), init: Literal["kaiming", "default"] = "kaiming"):
        super().__init__()
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        self.cfg = cfg
        self.trunk = _Trunk(cfg)
        self.head = nn.Linear(self.trunk.out_features, cfg.num_domains)
        init_weights_(self, init)

    def all_domains(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_domains(y, x.shape[0], self.cfg.num_domains)
        return _pick(self.all_domains(x), y)


class StyleDiscriminator(nn.Module):
    """D_s for L_uni: an MLP (Linear → LReLU(0.2) per `style_disc_hidden` width, then Linear to num_domains)
    on a style code. `forward(s, y)` -> [N] logit of each row's domain, read as "s is a reference style
    (real, from E^u) rather than a latent one (fake, from the flow)". Note the seed's L_uni formula writes
    the opposite labelling (log D_s on latent styles); the two are the same game with D_s's output negated."""

    def __init__(self, cfg: MultiDomainConfig = MultiDomainConfig(), init: Literal["kaiming", "default"] = "kaiming"):
        super().__init__()
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        self.cfg = cfg
        layers: list[nn.Module] = []
        width = cfg.style_dim
        for h in cfg.style_disc_hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.2)]
            width = h
        layers.append(nn.Linear(width, cfg.num_domains))
        self.net = nn.Sequential(*layers)
        init_weights_(self, init)

    def all_domains(self, s: torch.Tensor) -> torch.Tensor:
        return self.net(s)

    def forward(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _check_style(s, s.shape[0], self.cfg.style_dim, "StyleDiscriminator")
        _check_domains(y, s.shape[0], self.cfg.num_domains)
        return _pick(self.all_domains(s), y)


class StyleFlow(nn.Module):
    """s = f(z; θ_u), θ_u = MLP(u): a conditional neural spline flow mapping z ~ N(0, I) to the style space of
    domain u, conditioned on the one-hot domain. Built as

        zuko.flows.NSF(features=style_dim, context=num_domains, transforms=flow_transforms, bins=flow_bins,
                       hidden_features=flow_hidden, passes=flow_passes)

    whose masked hyper-networks take [x, one_hot(u)] and output the spline parameters (for the first
    coupling half, or the first autoregressive feature, they depend on u alone: θ_u = MLP(u)).

    zuko's `flow(c)` is a distribution whose `.transform` maps data (style) to noise; `forward` applies its
    inverse (noise -> style), which is differentiable in z and in the flow's parameters, i.e. exactly what
    `rsample` does with its own noise. A flow preserves dimension: z and s are both [N, style_dim], so
    StarGAN v2's latent_dim (16, smaller than style_dim) does not apply here.

    zuko's splines act on [-5, 5] (identity outside): fine for z ~ N(0, I) in the sampling direction; style
    codes from the encoder that leave that box pass through `inverse` / `log_prob` partly untransformed.
    Under DDP only `forward` goes through the wrapper's hooks; `sample`, `inverse` and `log_prob` bypass them.

    On the style side the splines' output h is mapped by a per-domain affine layer, s = mean_u + scale_u h
    (scale_u lower-triangular). Its values are not trained by gradient: `fit_moments` sets them to the
    maximum-likelihood estimate for the styles the flow is fitted to (their running mean and the Cholesky
    factor of their covariance), so the splines model only what is left after whitening. They start at the
    identity (mean 0, scale I), where the flow is the plain NSF, and stay there unless `fit_moments` is
    called (the likelihood form of L_uni calls it). Why: E's reference styles put their variance in one or
    two of the style dimensions, and neither an adversarial game nor an Adam-trained affine layer reached that
    covariance in thousands of steps (experiments/README.md, "Why L_uni does not merge...").
    """

    def __init__(self, cfg: MultiDomainConfig = MultiDomainConfig()):
        super().__init__()
        self.cfg = cfg
        self.flow = zuko.flows.NSF(features=cfg.style_dim, context=cfg.num_domains, transforms=cfg.flow_transforms,
                                   bins=cfg.flow_bins, hidden_features=cfg.flow_hidden, passes=cfg.flow_passes)
        eye = torch.eye(cfg.style_dim).expand(cfg.num_domains, -1, -1)
        self.register_buffer("style_mean", torch.zeros(cfg.num_domains, cfg.style_dim))
        self.register_buffer("style_second_moment", eye.clone())  # running E[s sᵀ] per domain
        self.register_buffer("style_scale", eye.clone())  # Cholesky factor of the running covariance
        self.register_buffer("style_count", torch.zeros(cfg.num_domains))  # styles seen per domain

    def _context(self, y: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
        _check_domains(y, n, self.cfg.num_domains)
        return F.one_hot(y.long(), self.cfg.num_domains).to(device=like.device, dtype=like.dtype)

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """z [N, style_dim] (Gaussian noise), y [N] domain ids -> latent style codes s [N, style_dim]."""
        _check_style(z, z.shape[0], self.cfg.style_dim, "StyleFlow")
        h = self.flow(self._context(y, z.shape[0], z)).transform.inv(z)
        y = y.long().to(h.device)
        return self.style_mean[y] + (self.style_scale[y] @ h.unsqueeze(-1)).squeeze(-1)

    def _whiten(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = y.long().to(s.device)
        return torch.linalg.solve_triangular(self.style_scale[y], (s - self.style_mean[y]).unsqueeze(-1),
                                             upper=False).squeeze(-1)

    def sample(self, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draws z ~ N(0, I) (from `generator` if given: it must live on the flow's device) and returns
        forward(z, y): one latent style per domain id in y."""
        ref = next(self.flow.parameters())  # the flow's device and dtype
        z = torch.randn(y.shape[0], self.cfg.style_dim, generator=generator, device=ref.device, dtype=ref.dtype)
        return self(z, y)

    def inverse(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Style codes s [N, style_dim] of domains y -> the noise z that forward(z, y) maps to s."""
        _check_style(s, s.shape[0], self.cfg.style_dim, "StyleFlow.inverse")
        return self.flow(self._context(y, s.shape[0], s)).transform(self._whiten(s, y))

    def log_prob(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p(s | u = y) [N] under the flow."""
        _check_style(s, s.shape[0], self.cfg.style_dim, "StyleFlow.log_prob")
        log_det = torch.diagonal(self.style_scale[y.long().to(s.device)], dim1=-2, dim2=-1).log().sum(-1)
        return self.flow(self._context(y, s.shape[0], s)).log_prob(self._whiten(s, y)) - log_det

    def style_covariance(self) -> torch.Tensor:
        """The running covariance [U, D, D] of the styles the affine layer was fitted to (identity before any)."""
        mean = self.style_mean
        cov = self.style_second_moment - mean[:, :, None] * mean[:, None, :]
        return 0.5 * (cov + cov.transpose(1, 2))

    @torch.no_grad()
    def fit_moments(self, count: torch.Tensor, total: torch.Tensor, outer: torch.Tensor, momentum: float) -> None:
        """Moves the affine layer towards styles of which `count` [U] per domain were seen, with sums `total`
        [U, D] and sums of outer products `outer` [U, D, D] (summed over ranks by the caller, so every rank
        stays equal). A domain's running moments are the exact mean of everything seen until 1/momentum
        styles, then an exponential average with weight `momentum`; scale is the Cholesky factor of the
        covariance plus 1e-4 of its mean variance (a few styles give a singular one)."""
        seen = count > 0
        if not bool(seen.any()) or not (torch.isfinite(total).all() and torch.isfinite(outer).all()):
            return
        weight = torch.maximum(torch.full_like(count, momentum), count / (self.style_count + count).clamp_min(1))
        weight = torch.where(seen, weight, torch.zeros_like(weight))
        n = count.clamp_min(1)
        self.style_mean.lerp_(total / n[:, None], weight[:, None])
        self.style_second_moment.lerp_(outer / n[:, None, None], weight[:, None, None])
        self.style_count += count
        cov = self.style_covariance()
        eye = torch.eye(cov.shape[-1], device=cov.device, dtype=cov.dtype)
        ridge = 1e-4 * torch.diagonal(cov, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-8)
        scale, info = torch.linalg.cholesky_ex(cov + ridge[:, None, None] * eye)
        update = seen & (info == 0)
        self.style_scale[update] = scale[update]


def build_multidomain(cfg: MultiDomainConfig = MultiDomainConfig()) -> dict[str, nn.Module]:
    """Fresh networks: {"generator", "style_encoder", "discriminator", "style_discriminator", "flow"}."""
    return {
        "generator": MultiDomainGenerator(cfg),
        "style_encoder": MultiDomainStyleEncoder(cfg),
        "discriminator": MultiDomainDiscriminator(cfg),
        "style_discriminator": StyleDiscriminator(cfg),
        "flow": StyleFlow(cfg),
    }
