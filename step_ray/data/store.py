"""The one image store every recipe reads its training images through.

Rows of a split are decoded on first use by `read(path)` (any of the readers in step_ray.data: a
pix2pix pair, its target half, a domain image) and kept while they fit in the memory budget; `batch`
stacks rows into float NCHW tensors in [-1, 1], one tensor per array the reader returns, with the same
random crop of every array when they were read larger than `crop`.

The cache is one block of shared memory (an anonymous shared mapping, touched page by page as rows are
decoded, so a small dataset never costs the whole budget), made when the store is, with a slot for each
of the first `budget_mb` worth of rows. The loader worker processes a training worker forks
(step_ray.data.loader) inherit it: whichever process decodes a row first writes it there and every
process reads it from there, so the budget holds for the training worker and its loader workers together,
and memory stays bounded whatever the dataset size: rows beyond the budget are decoded on every use.
"""
from __future__ import annotations

import functools
import mmap
import multiprocessing
import threading
from typing import Callable, Sequence

import numpy as np
import torch

from step_ray.data.domains import DomainDataConfig, DomainImages, load_domain_image
from step_ray.data.pix2pix import DataConfig, load_pair, load_target, to_tensor

_EMPTY, _WRITING, _FILLED, _UNCACHEABLE = 0, 1, 2, 3


class SharedRows:
    """`count` fixed-shape uint8 rows in memory shared with forked processes, each written once.

    A slot's state moves EMPTY -> WRITING (claimed under the lock by the one process that writes it) ->
    FILLED (set under the lock after the bytes are in place, so a reader that sees FILLED under the same
    lock sees them too, on any CPU's memory order)."""

    def __init__(self, count: int, shape: tuple[int, ...]):
        self.count, self.shape = count, tuple(shape)
        self._data = mmap.mmap(-1, max(1, count * int(np.prod(shape))))
        self._states = mmap.mmap(-1, max(1, count))
        self.rows = np.frombuffer(self._data, np.uint8)[: count * int(np.prod(shape))].reshape(count, *shape)
        self.states = np.frombuffer(self._states, np.uint8)[:count]
        try:
            self.lock = multiprocessing.Lock()  # a semaphore forked processes share
        except OSError:  # no POSIX semaphores here: then no loader worker processes either (they need them too)
            self.lock = threading.Lock()

    def get(self, slot: int) -> np.ndarray | None:
        with self.lock:
            filled = self.states[slot] == _FILLED
        return self.rows[slot] if filled else None

    def put(self, slot: int, arrays: tuple[np.ndarray, ...]) -> None:
        with self.lock:
            if self.states[slot] != _EMPTY:
                return
            fits = len(arrays) == self.shape[0] and all(a.shape == self.shape[1:] and a.dtype == np.uint8
                                                        for a in arrays)
            self.states[slot] = _WRITING if fits else _UNCACHEABLE
        if not fits:
            return
        for k, a in enumerate(arrays):
            self.rows[slot, k] = a
        with self.lock:
            self.states[slot] = _FILLED

    def filled(self) -> int:
        with self.lock:
            return int((self.states == _FILLED).sum())


class ImageStore:
    """`read(path)` -> one uint8 HWC array or a tuple of them (A, B); rows 0 .. capacity-1 are cached
    (in shared memory, see the module docstring) within `budget_mb`, the rest decoded on every use."""

    def __init__(self, paths: Sequence[str], read: Callable[[str], np.ndarray | tuple[np.ndarray, ...]],
                 side: int, budget_mb: int, arrays: int = 1, crop: int = 0):
        self.paths, self.read = list(paths), read
        self.side, self.crop, self.arrays = side, crop or side, arrays
        self.capacity = min(len(self.paths), int(budget_mb * 2**20 // (arrays * side * side * 3)))
        self.shared = SharedRows(self.capacity, (arrays, side, side, 3)) if self.capacity else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self):  # a pickled copy (a spawned process) cannot share the mapping: it reads itself
        return {**self.__dict__, "capacity": 0, "shared": None}

    def shortfall(self, setting: str, budget_mb: int) -> str | None:
        """One line for the user when the cache cannot hold every row (None when it can): what happens
        instead and the budget that would hold them all."""
        if self.capacity >= len(self.paths):
            return None
        needed = -(-len(self.paths) * self.arrays * self.side * self.side * 3 // 2**20)
        return (f"the image cache holds {self.capacity:,} of {len(self.paths):,} training images "
                f"({setting}={budget_mb}); the other {len(self.paths) - self.capacity:,} are decoded at every use; "
                f"{setting}={needed} would hold them all")

    def cached_rows(self) -> int:
        return self.shared.filled() if self.shared is not None else 0

    def get(self, row: int):
        if row < self.capacity:
            hit = self.shared.get(row)
            if hit is not None:
                return tuple(hit) if self.arrays > 1 else hit[0]
        item = self.read(self.paths[row])
        if row < self.capacity:
            self.shared.put(row, item if self.arrays > 1 else (item,))
        return item

    def windows(self, count: int, rng: np.random.Generator) -> np.ndarray | None:
        """`count` rows' random crop windows [(y, x)], drawn from `rng` one row after another (the numbers
        `batch(rows, rng)` draws); None when the images are read at the crop size."""
        margin = self.side - self.crop
        if margin <= 0:
            return None
        return np.array([rng.integers(0, margin + 1, size=2) for _ in range(count)], np.int64).reshape(count, 2)

    def batch(self, rows, rng: np.random.Generator | None = None,
              windows: np.ndarray | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The rows as tensors; read larger than `crop`, every array of a row gets the same random window:
        `windows[i]` for row i, or drawn from `rng` (one position per row)."""
        items = [self.get(int(i)) for i in rows]
        single = not isinstance(items[0], tuple)
        items = [(x,) if single else x for x in items]
        if self.side > self.crop:
            if windows is None:
                if rng is None:
                    raise ValueError("ImageStore.batch needs an rng or windows to crop images read larger than "
                                     "the crop")
                windows = self.windows(len(items), rng)
            items = [tuple(a[y : y + self.crop, x : x + self.crop] for a in arrays)
                     for arrays, (y, x) in zip(items, windows)]
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
