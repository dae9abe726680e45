"""Pictures of a generator (docs/method.md §9): style transfer, sampling and interpolation grids."""
from __future__ import annotations

import numpy as np
import torch

from step_ray.eval.embedding import image_grid


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def transfer_grid(inputs: torch.Tensor, references: torch.Tensor, outputs: torch.Tensor) -> np.ndarray:
    """Top row: a blank corner, then the references; row i: input i, then G(A_i, E(ref_j)) for every j.
    outputs: [n inputs, m references, C, H, W]."""
    refs = list(to_uint8(references))
    blank = np.full_like(refs[0], 255)
    rows = [[blank] + refs]
    for a, outs in zip(to_uint8(inputs), outputs):
        rows.append([a] + list(to_uint8(outs)))
    return image_grid(rows)


def sampling_grid(inputs: torch.Tensor, outputs: torch.Tensor) -> np.ndarray:
    """Row i: input i, then its outputs [n, s, C, H, W] (e.g. from mapper samples)."""
    return image_grid([[a] + list(to_uint8(outs)) for a, outs in zip(to_uint8(inputs), outputs)])


def interpolation_grid(inputs: torch.Tensor, outputs: torch.Tensor, ref_start: torch.Tensor,
                       ref_end: torch.Tensor) -> np.ndarray:
    """Top row: the two references at both ends; row i: input i, then outputs along z(t) = (1−t)z0 + t z1."""
    start, end = to_uint8(ref_start[None])[0], to_uint8(ref_end[None])[0]
    blank = np.full_like(start, 255)
    steps = outputs.shape[1]
    rows = [[blank, start] + [blank] * (steps - 2) + [end]]
    rows += [[a] + list(to_uint8(outs)) for a, outs in zip(to_uint8(inputs), outputs)]
    return image_grid(rows)


@torch.no_grad()
def generate(generator, a: torch.Tensor, z: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """G(a_i, z_i) in batches, on G's device, returned on the CPU."""
    device = next(generator.parameters()).device
    return torch.cat([generator(a[i : i + batch_size].to(device), z[i : i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(a), batch_size)])
