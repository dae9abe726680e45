"""FAISS indexes of one database shard: an L2 index for nearest and an inner-product index for furthest.

Furthest search with a nearest-neighbour library (docs/method.md §3): ‖q − x‖² = ‖q‖² − 2 q·x + ‖x‖², so the x
furthest from q maximise ⟨[q, 1], [−2x, ‖x‖²]⟩. The far index holds those augmented database vectors
under METRIC_INNER_PRODUCT; a query's squared distance is its inner product plus ‖q‖².

IVF on the far side. Ordinary IVF training and assignment would run k-means and nearest-centroid
assignment on the *augmented* vectors under the inner product, which groups nothing useful. Instead one
k-means in the original space serves both sides: the near index uses the centroids c under L2; the far
index's coarse quantizer holds the augmented centroids [−2c, ‖c‖²] under the inner product, so probing
its "best" lists probes the lists whose centroid is furthest from q, and every vector is added to the list
of its nearest centroid (precomputed assignment, `add_core`). The furthest points of q lie, up to the
cluster radius, in the furthest clusters; the benchmark measures what this costs in precision.

Every search excludes the query itself by id (never by "drop rank 0": duplicates tie at distance 0), and
any row an approximate index leaves short (-1 ids when the probed lists hold too few vectors) is
completed by an exact search of that row against the shard, so results are always full.
"""
from __future__ import annotations

import logging
import math

import faiss
import numpy as np

from step_ray.mining.config import MAX_K, MiningConfig

log = logging.getLogger(__name__)


def faiss_gpu_count() -> int:
    """GPUs FAISS can use here (0 with the faiss-cpu wheel)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def gpu_wanted(cfg: MiningConfig) -> bool:
    return cfg.use_gpu == "auto" and faiss_gpu_count() > 0


def augment_database(x: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """[−2x, ‖x‖²]: inner products with [q, 1] are ‖q − x‖² − ‖q‖²."""
    return np.ascontiguousarray(np.hstack([-2.0 * x, norms[:, None]]), dtype=np.float32)


def augment_queries(q: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.hstack([q, np.ones((len(q), 1), np.float32)]), dtype=np.float32)


def _pad_columns(x: np.ndarray, multiple: int) -> np.ndarray:
    """Zero columns up to a multiple of `multiple` (PQ needs dim % m == 0; zeros change no distance)."""
    extra = (-x.shape[1]) % multiple
    if extra == 0:
        return np.ascontiguousarray(x, dtype=np.float32)
    return np.ascontiguousarray(np.hstack([x, np.zeros((len(x), extra), np.float32)]), dtype=np.float32)


def exact_rows(
    queries: np.ndarray,
    query_ids: np.ndarray | None,
    database: np.ndarray,
    db_norms: np.ndarray,
    first_id: int,
    k: int,
    furthest: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (squared L2) of a few query rows against an in-memory shard, self excluded.

    Used to complete rows an approximate index left short; float64 so ties break like the reference.
    Returns global ids and distances padded with -1 / ±inf when the shard holds fewer than k others.
    """
    q = queries.astype(np.float64)
    d2 = (q * q).sum(1)[:, None] - 2.0 * q @ database.astype(np.float64).T + db_norms.astype(np.float64)[None, :]
    np.maximum(d2, 0.0, out=d2)
    fill = -np.inf if furthest else np.inf
    if query_ids is not None:
        local = np.asarray(query_ids) - first_id
        rows = np.nonzero((local >= 0) & (local < database.shape[0]))[0]
        d2[rows, local[rows]] = fill
    order = np.argsort(-d2 if furthest else d2, axis=1, kind="stable")[:, :k]
    dist = np.take_along_axis(d2, order, axis=1)
    ids = order.astype(np.int64) + first_id
    missing = ~np.isfinite(dist)
    ids[missing] = -1
    out_ids = np.full((len(q), k), -1, np.int64)
    out_dist = np.full((len(q), k), fill, np.float32)
    out_ids[:, : ids.shape[1]] = ids
    out_dist[:, : ids.shape[1]] = dist
    return out_ids, out_dist


class ShardIndex:
    """The near (L2) and far (augmented inner-product) indexes of database rows [first_id, first_id + m).

    Kept in one process: in-process for a single shard, inside a Ray actor for sharded mining.
    """

    def __init__(self, vectors: np.ndarray, first_id: int, cfg: MiningConfig, use_gpu: bool | None = None):
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"a shard needs a non-empty [m, d] array, got shape {x.shape}")
        self.cfg = cfg
        self.vectors = x
        self.first_id = int(first_id)
        self.size, self.dim = x.shape
        self.norms = (x.astype(np.float64) ** 2).sum(1).astype(np.float32)
        self.kind = cfg.resolved_index(self.size)
        self.on_gpu = gpu_wanted(cfg) if use_gpu is None else bool(use_gpu and faiss_gpu_count() > 0)
        if self.on_gpu and max(cfg.k_close, cfg.k_far) > MAX_K:
            raise ValueError(f"k_close={cfg.k_close}, k_far={cfg.k_far}: a FAISS GPU index returns at most {MAX_K} "
                             f"results per query; set mining.k_far <= {MAX_K} or mining.use_gpu=never (CPU: no limit)")
        self.max_k = MAX_K if self.on_gpu else max(self.size, 1)
        self._gpu_resources = faiss.StandardGpuResources() if self.on_gpu else None
        self.near, self.far = self._build()

    # -- building --------------------------------------------------------------------------------------

    def _to_device(self, index: faiss.Index) -> faiss.Index:
        if not self.on_gpu:
            return index
        try:
            return faiss.index_cpu_to_gpu(self._gpu_resources, 0, index)
        except Exception as exc:  # e.g. a PQ layout the GPU kernels do not support
            log.warning("FAISS index %s stays on CPU: GPU copy failed (%s)", type(index).__name__, exc)
            return index

    def _nlist(self) -> int:
        wanted = self.cfg.nlist or int(round(4 * math.sqrt(self.size)))
        # k-means wants ~39 training points per centroid; fewer lists than that would be noise.
        return int(max(1, min(wanted, self.size // 39 if self.size >= 39 else 1)))

    def _train_sample(self) -> np.ndarray:
        if self.size <= self.cfg.train_sample:
            return self.vectors
        rng = np.random.default_rng([self.cfg.seed, self.first_id])
        return self.vectors[np.sort(rng.choice(self.size, self.cfg.train_sample, replace=False))]

    def _build(self) -> tuple[faiss.Index, faiss.Index]:
        x, kind = self.vectors, self.kind
        augmented = augment_database(x, self.norms)
        if kind == "flat":
            near = faiss.IndexFlatL2(self.dim)
            near.add(x)
            far = faiss.IndexFlatIP(self.dim + 1)
            far.add(augmented)
            return self._to_device(near), self._to_device(far)

        nlist = self._nlist()
        sample = self._train_sample()
        kmeans = faiss.Kmeans(self.dim, nlist, niter=20, seed=self.cfg.seed, verbose=False)
        kmeans.train(sample)
        centroids = kmeans.centroids.astype(np.float32)
        centroid_norms = (centroids.astype(np.float64) ** 2).sum(1).astype(np.float32)
        _, assignment = kmeans.index.search(x, 1)
        assignment = np.ascontiguousarray(assignment[:, 0], dtype=np.int64)

        if kind == "ivf":
            near_quantizer = faiss.IndexFlatL2(self.dim)
            near_quantizer.add(centroids)
            near = faiss.IndexIVFFlat(near_quantizer, self.dim, nlist, faiss.METRIC_L2)
            near.is_trained = True
            near.add_core(self.size, faiss.swig_ptr(x), None, faiss.swig_ptr(assignment))
            far_quantizer = faiss.IndexFlatIP(self.dim + 1)
            far_quantizer.add(augment_database(centroids, centroid_norms))
            far = faiss.IndexIVFFlat(far_quantizer, self.dim + 1, nlist, faiss.METRIC_INNER_PRODUCT)
            far.is_trained = True
            far.add_core(self.size, faiss.swig_ptr(augmented), None, faiss.swig_ptr(assignment))
            self._quantizers = (near_quantizer, far_quantizer)  # the IVF indexes do not own them
            near.nprobe = min(self.cfg.nprobe, nlist)
            far.nprobe = self._far_nprobe(nlist)
            return self._to_device(near), self._to_device(far)

        # ivfpq: PQ codes of padded vectors, re-ranked exactly by IndexRefineFlat.
        m, bits = self.cfg.pq_m, self.cfg.pq_bits
        x_pad = _pad_columns(x, m)
        near_quantizer = faiss.IndexFlatL2(x_pad.shape[1])
        near_quantizer.add(_pad_columns(centroids, m))
        near = faiss.IndexIVFPQ(near_quantizer, x_pad.shape[1], nlist, m, bits)
        near.cp.seed = self.cfg.seed
        near.train(_pad_columns(sample, m))  # the quantizer already holds nlist centroids: trains PQ only
        near.add_core(self.size, faiss.swig_ptr(x_pad), None, faiss.swig_ptr(assignment))
        aug_pad = _pad_columns(augmented, m)
        far_quantizer = faiss.IndexFlatIP(aug_pad.shape[1])
        far_quantizer.add(_pad_columns(augment_database(centroids, centroid_norms), m))
        far = faiss.IndexIVFPQ(far_quantizer, aug_pad.shape[1], nlist, m, bits, faiss.METRIC_INNER_PRODUCT)
        # Residuals would be taken against the *furthest* centroid under this quantizer; code the
        # augmented vectors directly instead and let the exact re-ranking recover the order.
        far.by_residual = False
        far.cp.seed = self.cfg.seed
        sample_norms = (sample.astype(np.float64) ** 2).sum(1).astype(np.float32)
        far.train(_pad_columns(augment_database(sample, sample_norms), m))
        far.add_core(self.size, faiss.swig_ptr(aug_pad), None, faiss.swig_ptr(assignment))
        self._quantizers = (near_quantizer, far_quantizer)
        near.nprobe = min(self.cfg.nprobe, nlist)
        far.nprobe = self._far_nprobe(nlist)
        near_dev, far_dev = self._to_device(near), self._to_device(far)
        self._refine_vectors = (x_pad, aug_pad)  # IndexRefineFlat copies them; kept for clarity of lifetime
        near_refined = faiss.IndexRefineFlat(near_dev, faiss.swig_ptr(x_pad))
        far_refined = faiss.IndexRefineFlat(far_dev, faiss.swig_ptr(aug_pad))
        self._pq_bases = (near_dev, far_dev)  # the refine wrappers do not own their base indexes
        self._pad = (x_pad.shape[1], aug_pad.shape[1])
        return near_refined, far_refined

    def _far_nprobe(self, nlist: int) -> int:
        if self.cfg.far_nprobe:
            return min(self.cfg.far_nprobe, nlist)
        needed = math.ceil(2 * (self.cfg.k_far + 1) * nlist / self.size)
        return int(min(nlist, max(self.cfg.nprobe, needed)))

    # -- searching -------------------------------------------------------------------------------------

    def _search(self, index: faiss.Index, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.kind == "ivfpq":
            factor = self.cfg.refine_factor
            if self.on_gpu:  # the GPU base index returns at most MAX_K candidates
                factor = max(1, min(factor, MAX_K // k))
            index.k_factor = float(factor)
            pad = self._pad[0] if index is self.near else self._pad[1]
            q = _pad_columns(q, pad) if q.shape[1] != pad else q
        return index.search(np.ascontiguousarray(q, dtype=np.float32), k)

    def search_close(self, queries: np.ndarray, query_ids: np.ndarray | None, k: int):
        """k nearest (squared L2, ascending) among this shard, query ids excluded; global ids."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k_search = min(k + 1, self.max_k, self.size)
        dist, ids = self._search(self.near, q, k_search)
        return self._finish(q, query_ids, ids, dist.astype(np.float32), k, furthest=False)

    def search_far(self, queries: np.ndarray, query_ids: np.ndarray | None, k: int):
        """k furthest (squared L2, descending) among this shard, query ids excluded; global ids."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k_search = min(k + 1, self.max_k, self.size)
        ip, ids = self._search(self.far, augment_queries(q), k_search)
        q_norms = (q.astype(np.float64) ** 2).sum(1)[:, None]
        dist = np.where(ids >= 0, np.maximum(ip + q_norms, 0.0), -np.inf).astype(np.float32)
        return self._finish(q, query_ids, ids, dist, k, furthest=True)

    def _finish(self, q, query_ids, local_ids, dist, k, furthest):
        """Global ids, self removed by id, rows compacted to k; short rows completed exactly."""
        ids = np.where(local_ids >= 0, local_ids + self.first_id, -1).astype(np.int64)
        drop = ids < 0
        if query_ids is not None:
            drop |= ids == np.asarray(query_ids, np.int64)[:, None]
        # Stable sort on the drop mask moves kept entries to the front in their ranked order.
        order = np.argsort(drop, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)
        dist = np.take_along_axis(dist, order, axis=1)
        kept = (~drop).sum(1)
        fill = -np.inf if furthest else np.inf
        out_ids = np.full((len(q), k), -1, np.int64)
        out_dist = np.full((len(q), k), fill, np.float32)
        width = min(k, ids.shape[1])
        out_ids[:, :width] = ids[:, :width]
        out_dist[:, :width] = dist[:, :width]
        cols = np.arange(k)[None, :]
        out_ids[cols >= kept[:, None]] = -1
        out_dist[cols >= kept[:, None]] = fill

        # How many results this shard can give each row: its size, less the query if it lives here.
        available = np.full(len(q), self.size, np.int64)
        if query_ids is not None:
            local = np.asarray(query_ids, np.int64) - self.first_id
            available -= (local >= 0) & (local < self.size)
        short = np.nonzero(kept < np.minimum(k, available))[0]
        if len(short):
            sub_ids = None if query_ids is None else np.asarray(query_ids, np.int64)[short]
            out_ids[short], out_dist[short] = exact_rows(
                q[short], sub_ids, self.vectors, self.norms, self.first_id, k, furthest
            )
        return out_ids, out_dist
