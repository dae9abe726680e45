"""Batches loaded ahead of the step: how every recipe loads its batches.

A recipe's `batches` describes an epoch's steps (row indices, crop windows, reference rows: every random
choice already drawn, in the training process, from the epoch's seeded streams) and its `load` turns one
description into tensors (decode, crop, stack: CPU work, no randomness, no networks). `prefetch` runs
`load` over the epoch's descriptions, in order:

- workers == 0: in the training process, just before each step (no overlap).
- workers > 0: in that many forked worker processes (torch.utils.data.DataLoader), at most
  `workers × depth` batches ahead of the step, so the next batches are decoded while the step computes;
  pinned for a fast copy to a CUDA device.

Because `load` is a pure function of its description, the batches, and so the training numbers, are the
same for any number of workers. The workers are forked (they inherit the recipe's stores, whose image
cache lives in shared memory: step_ray.data.store), one set per epoch: the cache outlives them, and
forking costs milliseconds against an epoch of steps (persistent workers would buy nothing).
"""
from __future__ import annotations

import multiprocessing
import time
from typing import Any, Callable, Iterator, Sequence

import torch


def _as_is(item):
    return item


class _Described(torch.utils.data.Dataset):
    """An epoch's (examples, description) pairs, loaded by index."""

    def __init__(self, items: Sequence[tuple[int, Any]], load: Callable[[Any], Any]):
        self.items, self.load = items, load

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        examples, description = self.items[i]
        return examples, self.load(description)


def resolve_workers(setting: int, cpus: float | None) -> int:
    """`loader_workers` as set, or for -1 (auto) one per CPU reserved for the training worker beyond the
    one its own process computes on (`cpus`: Ray's reservation, run.cpus_per_worker; unknown: 0)."""
    if setting >= 0:
        return setting
    return max(0, int(cpus or 1) - 1)


def can_fork() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


class Prefetcher:
    """Iterates (examples, load(description)) over `items` in order, timing how long the consumer waited.

    `waited` is the seconds spent blocked in `next()` (for workers == 0: the loading itself)."""

    def __init__(self, items: Sequence[tuple[int, Any]], load: Callable[[Any], Any], workers: int = 0,
                 depth: int = 2, pin_memory: bool = False):
        self.workers = workers if workers > 0 and can_fork() else 0
        self.waited = 0.0
        if self.workers:
            loader = torch.utils.data.DataLoader(
                _Described(items, load), batch_size=None, shuffle=False, num_workers=self.workers,
                prefetch_factor=max(1, depth), pin_memory=pin_memory, collate_fn=_as_is,
                multiprocessing_context="fork", persistent_workers=False,
                generator=torch.Generator().manual_seed(0))  # its own: the global torch stream (flips) is left as is
            self._it: Iterator | None = iter(loader)
        else:
            self._it = ((examples, load(description)) for examples, description in items)

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            raise StopIteration
        started = time.perf_counter()
        try:
            return next(self._it)
        except StopIteration:
            self.close()
            raise
        finally:
            self.waited += time.perf_counter() - started

    def close(self) -> None:
        """Stop the workers (an epoch left early: a step budget, a rollback); idempotent."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def prefetch(items: Sequence[tuple[int, Any]], load: Callable[[Any], Any], workers: int = 0, depth: int = 2,
             pin_memory: bool = False) -> Prefetcher:
    """See the module docstring."""
    return Prefetcher(items, load, workers, depth, pin_memory)


def loader_cpus() -> float | None:
    """The CPUs Ray reserved for this process (a Ray Train worker), or None outside Ray."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not in a Ray worker
        return None

