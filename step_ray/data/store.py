"""The one in-memory image store every recipe reads its training images through.

Rows of a split are decoded on first use by `read(path)` (any of the readers in step_ray.data: a
pix2pix pair, its target half, a domain image) and kept while they fit in the memory budget; `batch`
stacks rows into float NCHW tensors in [-1, 1], one tensor per array the reader returns, with the same
random crop of every array when they were read larger than `crop`.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import numpy as np
import torch

from step_ray.data.domains import DomainDataConfig, DomainImages, load_domain_image
from step_ray.data.pix2pix import DataConfig, load_pair, load_target, to_tensor


class ImageStore:
    """`read(path)` -> one uint8 HWC array or a tuple of them (A, B), cached by row within `budget_mb`."""

    def __init__(self, paths: Sequence[str], read: Callable[[str], np.ndarray | tuple[np.ndarray, ...]],
                 side: int, budget_mb: int, arrays: int = 1, crop: int = 0):
        self.paths, self.read = list(paths), read
        self.side, self.crop = side, crop or side
        self.capacity = max(1, int(budget_mb * 2**20 // (arrays * side * side * 3)))
        self.cache: dict[int, np.ndarray | tuple[np.ndarray, ...]] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, row: int):
        item = self.cache.get(row)
        if item is None:
            item = self.read(self.paths[row])
            if len(self.cache) < self.capacity:
                self.cache[row] = item
        return item

    def batch(self, rows, rng: np.random.Generator | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The rows as tensors; read larger than `crop`, every array of a row gets the same random window
        (one position per row, drawn from `rng`)."""
        items = [self.get(int(i)) for i in rows]
        single = not isinstance(items[0], tuple)
        items = [(x,) if single else x for x in items]
        margin = self.side - self.crop
        if margin > 0:
            if rng is None:
                raise ValueError("ImageStore.batch needs an rng to crop images read larger than the crop")
            cropped = []
            for arrays in items:
                y, x = rng.integers(0, margin + 1, size=2)
                cropped.append(tuple(a[y : y + self.crop, x : x + self.crop] for a in arrays))
            items = cropped
        out = tuple(to_tensor(np.stack([arrays[k] for arrays in items])) for k in range(len(items[0])))
        return out[0] if single else out


def pair_store(paths: Sequence[str], data: DataConfig, budget_mb: int, load_size: int = 0) -> ImageStore:
    """(A, B) pairs read at `load_size` (default the image size), cropped back to data.image_size."""
    side = load_size or data.image_size
    read = functools.partial(load_pair, direction=data.direction, size=side, min_side=data.min_side,
                             a_resample=data.a_resample)
    return ImageStore(paths, read, side, budget_mb, arrays=2, crop=data.image_size)


def target_store(paths: Sequence[str], data: DataConfig, budget_mb: int) -> ImageStore:
    """The target images B only, at data.image_size."""
    read = functools.partial(load_target, direction=data.direction, size=data.image_size, min_side=data.min_side)
    return ImageStore(paths, read, data.image_size, budget_mb)


def domain_store(images: DomainImages, data: DomainDataConfig, budget_mb: int) -> ImageStore:
    """The images of a multi-domain split, at data.image_size."""
    read = functools.partial(load_domain_image, kind=images.kind, size=data.image_size, min_side=data.min_side)
    return ImageStore(images.paths, read, data.image_size, budget_mb)
