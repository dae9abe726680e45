"""Exact close and far sets by brute force (the paper's way), streamed so the database never sits in memory.

Unreduced style descriptors are ~306k floats (~1.2 MB) an image, so the reference holds only the query
anchors and one database chunk at a time: for each chunk it forms ‖q‖² − 2 q·x + ‖x‖² with one matrix
product and folds the chunk into a running top-k (nearest) and bottom-k (furthest). Memory is
O(q·D + c·D + q·(c + k)), time O(q·n·D).
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from step_ray.mining.neighbours import Neighbours

Chunks = Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]]


class ExactAccumulator:
    """Running exact close/far sets of fixed queries over database chunks fed one at a time.

    `add(chunk)` folds the next [c, D] database rows (ids continue from the previous chunk);
    `result()` gives the sets so far. One descriptor stream can feed several accumulators (several
    anchor samples or database sizes) without recomputing the descriptors.
    """

    def __init__(
        self,
        queries: np.ndarray,
        k_close: int,
        k_far: int,
        query_ids: Sequence[int] | np.ndarray | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ):
        self.q = torch.as_tensor(np.ascontiguousarray(queries), device=device).to(dtype)
        if self.q.ndim != 2:
            raise ValueError(f"queries must be [q, D], got shape {tuple(self.q.shape)}")
        num_q = self.q.shape[0]
        self.self_ids = None
        if query_ids is not None:
            self.self_ids = torch.as_tensor(np.asarray(query_ids, np.int64), device=device)
            if self.self_ids.shape != (num_q,):
                raise ValueError(f"query_ids must have one id per query ({num_q}), got {tuple(self.self_ids.shape)}")
        self.k_close, self.k_far, self.dtype, self.device = k_close, k_far, dtype, device
        self.q_norms = (self.q * self.q).sum(1, keepdim=True)
        self.rows = torch.arange(num_q, device=device)
        self.close_d = torch.empty((num_q, 0), dtype=dtype, device=device)
        self.close_i = torch.empty((num_q, 0), dtype=torch.int64, device=device)
        self.far_d, self.far_i = self.close_d.clone(), self.close_i.clone()
        self.rows_seen = 0

    @torch.no_grad()
    def add(self, chunk: np.ndarray | torch.Tensor) -> None:
        x = torch.as_tensor(chunk, device=self.device).to(self.dtype)
        if x.ndim != 2 or x.shape[1] != self.q.shape[1]:
            raise ValueError(f"database chunk of shape {tuple(x.shape)} does not match queries [*, {self.q.shape[1]}]")
        c, offset = x.shape[0], self.rows_seen
        if c == 0:
            return
        dist = (self.q_norms - 2.0 * (self.q @ x.T) + (x * x).sum(1)[None, :]).clamp_min_(0.0)
        ids = torch.arange(offset, offset + c, device=self.device).expand(len(self.q), c)
        near_dist, far_dist = dist, dist
        if self.self_ids is not None:
            inside = (self.self_ids >= offset) & (self.self_ids < offset + c)
            if inside.any():
                local = self.self_ids[inside] - offset
                near_dist = dist.clone()
                near_dist[self.rows[inside], local] = torch.inf
                far_dist = dist.clone()
                far_dist[self.rows[inside], local] = -torch.inf
        self.close_d, self.close_i = _fold(self.close_d, self.close_i, near_dist, ids, self.k_close, largest=False)
        self.far_d, self.far_i = _fold(self.far_d, self.far_i, far_dist, ids, self.k_far, largest=True)
        self.rows_seen += c

    def result(self) -> Neighbours:
        if (
            self.close_d.shape[1] < self.k_close
            or self.far_d.shape[1] < self.k_far
            or not (torch.isfinite(self.close_d).all() and torch.isfinite(self.far_d).all())
        ):
            raise ValueError(
                f"the database ({self.rows_seen} rows) is too small for k_close={self.k_close}, k_far={self.k_far}"
            )
        return Neighbours(
            close_ids=self.close_i.cpu().numpy(),
            close_dist=self.close_d.float().cpu().numpy(),
            far_ids=self.far_i.cpu().numpy(),
            far_dist=self.far_d.float().cpu().numpy(),
        )


def exact_neighbours(
    queries: np.ndarray,
    database_chunks: Chunks,
    k_close: int,
    k_far: int,
    query_ids: Sequence[int] | np.ndarray | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Neighbours:
    """Exact k_close nearest and k_far furthest database rows of each query under squared L2.

    `database_chunks` yields [c, D] arrays in database row order (or is a callable returning such an
    iterable); row ids count across chunks from 0. `query_ids[i]`, when given, is query i's own database
    row, excluded from both of its sets. `dtype` float64 makes near-ties exact at twice the cost.
    """
    accumulator = ExactAccumulator(queries, k_close, k_far, query_ids, dtype, device)
    for chunk in database_chunks() if callable(database_chunks) else database_chunks:
        accumulator.add(np.ascontiguousarray(chunk) if isinstance(chunk, np.ndarray) else chunk)
    return accumulator.result()


def _fold(best_d, best_i, new_d, new_i, k, largest):
    """Top-k of (running best ∪ this chunk), sorted."""
    cand_d = torch.cat([best_d, new_d], dim=1)
    cand_i = torch.cat([best_i, new_i], dim=1)
    top_d, pos = torch.topk(cand_d, min(k, cand_d.shape[1]), dim=1, largest=largest, sorted=True)
    return top_d, torch.gather(cand_i, 1, pos)


def array_chunks(database: np.ndarray, chunk_rows: int) -> Callable[[], Iterable[np.ndarray]]:
    """A re-iterable chunk source over an in-memory array (tests, small references)."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")

    def chunks():
        for start in range(0, len(database), chunk_rows):
            yield database[start : start + chunk_rows]

    return chunks


def close_recall(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of each anchor's exact close set found in its approximate close set (recall@k_c)."""
    return _overlap(approx_ids, exact_ids)


def far_precision(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean fraction of each anchor's approximate far set that belongs to its exact far set."""
    return _overlap(exact_ids, approx_ids)


def _overlap(candidates: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of |candidates_row ∩ truth_row| / |truth_row|."""
    if len(candidates) != len(truth):
        raise ValueError(f"{len(candidates)} rows against {len(truth)}")
    hits = [len(np.intersect1d(c, t)) / len(t) for c, t in zip(candidates, truth)]
    return float(np.mean(hits)) if hits else float("nan")
