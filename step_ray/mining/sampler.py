"""(anchor, positive, negative) triplets per epoch from mined close and far sets (docs/method.md §3).

Every anchor appears once per epoch across all ranks, in an order that is a fixed function of
(seed, epoch); its positive is drawn uniformly from its close set and its negative uniformly from its far
set. All ranks draw the same epoch-wide permutation and choices, then each takes every world_size-th
entry, so the shares are disjoint and no communication is needed.

Equal shares: when n is not a multiple of world_size, the permutation is padded with its own first
entries (as torch's DistributedSampler does), so a few anchors appear twice in that epoch and every rank
has ceil(n / world_size) triplets; `drop_last=True` instead drops the permutation's tail, giving
floor(n / world_size) each (the dropped anchors differ from epoch to epoch).
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np


class TripletSampler:
    def __init__(
        self,
        close_ids: np.ndarray,
        far_ids: np.ndarray,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        close = np.asarray(close_ids, np.int64)
        far = np.asarray(far_ids, np.int64)
        if close.ndim != 2 or far.ndim != 2 or len(close) != len(far) or len(close) == 0:
            raise ValueError(f"close_ids and far_ids must be [n, k] for the same n > 0, got {close.shape}, {far.shape}")
        n = len(close)
        if close.shape[1] < 1 or far.shape[1] < 1:
            raise ValueError("close and far sets must be non-empty")
        for name, ids in (("close_ids", close), ("far_ids", far)):
            if ids.min() < 0 or ids.max() >= n:
                raise ValueError(f"{name} must index the {n} anchors (found ids outside [0, {n}))")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if drop_last and n < world_size:
            raise ValueError(f"drop_last with {n} anchors leaves nothing for {world_size} ranks")
        self.close_ids, self.far_ids = close, far
        self.seed, self.rank, self.world_size, self.drop_last = int(seed), int(rank), int(world_size), drop_last
        self.epoch = 0

    @classmethod
    def from_neighbours(cls, neighbours, seed: int = 0, rank: int = 0, world_size: int = 1, drop_last: bool = False):
        return cls(neighbours.close_ids, neighbours.far_ids, seed, rank, world_size, drop_last)

    @classmethod
    def for_ray_train_worker(cls, close_ids, far_ids, seed: int = 0, drop_last: bool = False):
        """This Ray Train worker's sampler (rank and world size from the train context)."""
        from ray import train

        context = train.get_context()
        return cls(close_ids, far_ids, seed, context.get_world_rank(), context.get_world_size(), drop_last)

    @property
    def num_anchors(self) -> int:
        return len(self.close_ids)

    def __len__(self) -> int:
        n, w = self.num_anchors, self.world_size
        return n // w if self.drop_last else math.ceil(n / w)

    def epoch_triplets(self, epoch: int) -> np.ndarray:
        """This rank's [len(self), 3] int64 (anchor, positive, negative) ids for `epoch`."""
        n, total = self.num_anchors, len(self) * self.world_size
        rng = np.random.default_rng([self.seed, int(epoch)])
        order = rng.permutation(n)
        pos_rank = rng.integers(0, self.close_ids.shape[1], size=n)
        neg_rank = rng.integers(0, self.far_ids.shape[1], size=n)
        if total > n:
            pad = np.resize(np.arange(n), total - n)  # wraps when world_size exceeds n
            order, pos_rank, neg_rank = (np.concatenate([a, a[pad]]) for a in (order, pos_rank, neg_rank))
        mine = slice(self.rank, total, self.world_size)
        anchors = order[:total][mine]
        positives = self.close_ids[anchors, pos_rank[:total][mine]]
        negatives = self.far_ids[anchors, neg_rank[:total][mine]]
        return np.stack([anchors, positives, negatives], axis=1)

    # Iteration follows torch's DistributedSampler: set_epoch, then iterate.
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for a, p, n in self.epoch_triplets(self.epoch):
            yield int(a), int(p), int(n)

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "rank": self.rank,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
            "num_anchors": self.num_anchors,
            "k_close": int(self.close_ids.shape[1]),
            "k_far": int(self.far_ids.shape[1]),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore seed and epoch; rank and world size stay this worker's (a resume may rescale)."""
        for key in ("num_anchors", "k_close", "k_far"):
            if key in state and state[key] != self.state_dict()[key]:
                raise ValueError(
                    f"sampler state was saved for {key}={state[key]}, these neighbours have {self.state_dict()[key]}"
                )
        self.seed = int(state["seed"])
        self.epoch = int(state.get("epoch", 0))
        self.drop_last = bool(state.get("drop_last", self.drop_last))
