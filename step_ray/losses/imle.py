"""The IMLE objective of the style mapper (docs/method.md §6): each data code's nearest mapped noise sample.

    e_i = argmin_{r_j} ‖z_i − M(r_j)‖²,   {r_j} ~ N(0, I)

The nearest sample is found with a FAISS IndexFlatL2 over M(r_j); the mapper is fitted by
step_ray.pipelines.mapper.train_mapper.
"""
from __future__ import annotations

import faiss
import numpy as np
import torch

from step_ray.models import StyleMapper


def nearest_noise(mapper: StyleMapper, codes: np.ndarray, pool: int,
                  gen: torch.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """A fresh noise pool, its mapped samples indexed by FAISS; for each code, its nearest sample's noise."""
    r = torch.randn(pool, mapper.cfg.noise_dim, generator=gen)
    with torch.no_grad():
        samples = mapper(r).float().numpy()
    index = faiss.IndexFlatL2(samples.shape[1])
    index.add(np.ascontiguousarray(samples, np.float32))
    dist, idx = index.search(np.ascontiguousarray(codes, np.float32), 1)
    return r[idx[:, 0]], dist[:, 0]


def imle_objective(mapper: StyleMapper, codes: np.ndarray, pool: int, seed: int = 0) -> float:
    """Mean squared distance from each code to its nearest of `pool` fresh samples (lower: better covered)."""
    _, dist = nearest_noise(mapper, np.asarray(codes, np.float32), pool, torch.Generator().manual_seed(seed))
    return float(dist.mean())
