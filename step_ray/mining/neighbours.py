"""Close and far sets of every anchor: the `Neighbours` record, its Parquet form, and sharded FAISS mining.

Sharding: the database rows are split into `num_shards` contiguous blocks, each held by one Ray actor
with its own near and far indexes (on its own GPU where the cluster has GPUs). Every query batch goes to
every shard; each shard answers its local top-k (self excluded, global ids) and the driver keeps the
global top-k of the union. Because the top-k of a union is the top-k of the per-part top-k's, a flat
(exact) index gives the same answer sharded or not.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from step_ray import storage
from step_ray.cluster import alive_nodes, check_placement, even_share
from step_ray.prometheus import record_mining_progress
from step_ray.mining.config import MAX_K, MiningConfig
from step_ray.mining.index import ShardIndex, gpu_wanted

log = logging.getLogger(__name__)


@dataclass
class Neighbours:
    """Row i holds anchor i's close set (ascending squared style distance) and far set (descending).

    Ids are row indices into the mined table; `image_ids` (when known) names those rows.
    """

    close_ids: np.ndarray  # int64 [n, k_close]
    close_dist: np.ndarray  # float32 [n, k_close]
    far_ids: np.ndarray  # int64 [n, k_far]
    far_dist: np.ndarray  # float32 [n, k_far]
    image_ids: list[str] | None = None
    # Diagnostics of the run that produced these sets (shards, devices, peak memory); not persisted.
    info: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        self.close_ids = np.asarray(self.close_ids, np.int64)
        self.far_ids = np.asarray(self.far_ids, np.int64)
        self.close_dist = np.asarray(self.close_dist, np.float32)
        self.far_dist = np.asarray(self.far_dist, np.float32)
        n = len(self.close_ids)
        if self.close_dist.shape != self.close_ids.shape or self.far_dist.shape != self.far_ids.shape:
            raise ValueError("ids and distances must have the same shape")
        if len(self.far_ids) != n:
            raise ValueError(f"close ({n}) and far ({len(self.far_ids)}) sets cover different anchors")
        if self.image_ids is not None and len(self.image_ids) != n:
            raise ValueError(f"{len(self.image_ids)} image ids for {n} anchors")

    def __len__(self) -> int:
        return len(self.close_ids)

    @property
    def k_close(self) -> int:
        return self.close_ids.shape[1]

    @property
    def k_far(self) -> int:
        return self.far_ids.shape[1]

    def to_table(self, image_ids: Sequence[str] | None = None) -> pa.Table:
        names = list(image_ids) if image_ids is not None else self.image_ids
        if names is None:
            names = [str(i) for i in range(len(self))]
        if len(names) != len(self):
            raise ValueError(f"{len(names)} image ids for {len(self)} anchors")

        def fixed(values: np.ndarray, kind: pa.DataType) -> pa.Array:
            return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), kind), values.shape[1])

        return pa.table(
            {
                "row": pa.array(np.arange(len(self), dtype=np.int64)),
                "image_id": pa.array(names, pa.string()),
                "close_ids": fixed(self.close_ids, pa.int64()),
                "close_dist": fixed(self.close_dist, pa.float32()),
                "far_ids": fixed(self.far_ids, pa.int64()),
                "far_dist": fixed(self.far_dist, pa.float32()),
            }
        )

    def save(self, uri: str, image_ids: Sequence[str] | None = None) -> str:
        """One Parquet file at `uri` (local or s3://), written whole (never a half-written file)."""
        sink = io.BytesIO()
        # row groups of 8,192 anchors (~70 MB at k_f = 700), so that load() reads a bounded piece at a time
        pq.write_table(self.to_table(image_ids), sink, compression="zstd", row_group_size=8192)
        storage.write_bytes(uri, sink.getvalue())
        return str(uri)

    @classmethod
    def from_table(cls, table: pa.Table) -> "Neighbours":
        # Without copies beyond the one a column needs (n·(k_c + k_f)·12 bytes: 1.2 GB at 137k images and
        # k_f = 700; a sort, a combine and an astype each used to add another): save() writes rows in
        # order, so the table is sorted only when it is not.
        rows = table.column("row").to_numpy()
        if not np.array_equal(rows, np.arange(table.num_rows)):
            table = table.sort_by("row")
            if not np.array_equal(table.column("row").to_numpy(), np.arange(table.num_rows)):
                raise ValueError("neighbour table rows are not 0..n-1")

        arrays = {name: _list_chunks_to_matrix(table.column(name).chunks, table.num_rows,
                                               table.schema.field(name).type.list_size, dtype)
                  for name, dtype in _MATRIX_COLUMNS}
        return cls(**arrays, image_ids=table.column("image_id").to_pylist())

    @classmethod
    def load(cls, uri: str) -> "Neighbours":
        """Read one row group and one column at a time into the arrays: memory n·(k_c + k_f)·12 bytes
        plus one group, where reading the whole table first held it twice (4 GB at 137k, k_f = 700)."""
        storage.check_readable(uri, "neighbours file")
        fs, path = storage.resolve(uri)
        with fs.open_input_file(path) as stream:
            parquet = pq.ParquetFile(stream)
            rows = parquet.read(columns=["row"]).column("row").to_numpy()
            if not np.array_equal(rows, np.arange(len(rows))):  # not as save() writes: the general path
                return cls.from_table(parquet.read())
            ids = parquet.read(columns=["image_id"]).column("image_id").to_pylist()

            def chunks(name: str):  # the column one row group at a time
                for group in range(parquet.num_row_groups):
                    yield from parquet.read_row_group(group, columns=[name]).column(name).chunks

            arrays = {name: _list_chunks_to_matrix(chunks(name), len(rows),
                                                   parquet.schema_arrow.field(name).type.list_size, dtype)
                      for name, dtype in _MATRIX_COLUMNS}
        pa.default_memory_pool().release_unused()
        return cls(**arrays, image_ids=ids)


_MATRIX_COLUMNS = (("close_ids", np.int64), ("close_dist", np.float32), ("far_ids", np.int64), ("far_dist", np.float32))


def _list_chunks_to_matrix(chunks, rows: int, width: int, dtype) -> np.ndarray:
    """Fixed-size-list chunks, in row order, written straight into one [rows, width] array (no combined
    copy of the column, no astype copy)."""
    out, start = np.empty((rows, width), dtype), 0
    for chunk in chunks:
        out[start : start + len(chunk)] = chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
        start += len(chunk)
    return out


def _merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int, furthest: bool):
    """Global top-k of per-shard top-k lists (padding is -1 / ±inf and sorts last)."""
    ids = np.concatenate([p[0] for p in parts], axis=1)
    dist = np.concatenate([p[1] for p in parts], axis=1)
    order = np.argsort(-dist if furthest else dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(dist, order, axis=1)


def _query_batches(n: int, batch: int):
    for start in range(0, n, batch):
        yield start, min(n, start + batch)


def _mine_in_process(x: np.ndarray, cfg: MiningConfig, queries: np.ndarray):
    shard = ShardIndex(x, 0, cfg)
    n = len(x)
    out = _empty(n, cfg)
    for start, stop in _query_batches(n, cfg.query_batch):
        ids = np.arange(start, stop, dtype=np.int64)
        out[0][start:stop], out[1][start:stop] = shard.search_close(queries[start:stop], ids, cfg.k_close)
        out[2][start:stop], out[3][start:stop] = shard.search_far(queries[start:stop], ids, cfg.k_far)
        record_mining_progress(int(stop), n)
    return out


def _empty(n: int, cfg: MiningConfig):
    return (
        np.empty((n, cfg.k_close), np.int64),
        np.empty((n, cfg.k_close), np.float32),
        np.empty((n, cfg.k_far), np.int64),
        np.empty((n, cfg.k_far), np.float32),
    )


class _ShardWorker:
    """Body of the Ray actor holding one shard's indexes."""

    def __init__(self, vectors: np.ndarray, first_id: int, cfg: MiningConfig, threads: int):
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
        self.index = ShardIndex(vectors, first_id, cfg)

    def ready(self) -> dict:
        return {"first_id": self.index.first_id, "size": self.index.size, "gpu": self.index.on_gpu}

    def peak_rss_bytes(self) -> int:
        return _peak_rss_bytes()

    def search(self, queries: np.ndarray, query_ids: np.ndarray, k_close: int, k_far: int):
        return (
            self.index.search_close(queries, query_ids, k_close),
            self.index.search_far(queries, query_ids, k_far),
        )


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process. Linux: VmHWM, which (unlike ru_maxrss) is not inherited
    from the parent across fork + exec, so a freshly spawned worker reports its own peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _mine_sharded(x: np.ndarray, cfg: MiningConfig, info: dict, query_rows: np.ndarray):
    import ray

    if not ray.is_initialized():
        raise RuntimeError("sharded mining (num_shards > 1) needs Ray: call ray.init() first")
    nodes = alive_nodes()
    gpus = sum(node.get("GPU", 0.0) for node in nodes)
    shards = cfg.num_shards
    # Actors ask for a GPU only when the cluster has some (and the config allows it); with fewer GPUs
    # than shards they share them. Each actor is placed whole on one node, so shares are sized for the
    # shards to pack onto the nodes together (sized from the cluster's totals, 3 shards on two 1-GPU
    # nodes asked 0.67 GPU each and one never started). CPU requests are fractional for small nodes.
    num_gpus = min(1.0, even_share(nodes, shards, "GPU")) if (gpus > 0 and cfg.use_gpu == "auto") else 0.0
    cpu_share = even_share(nodes, shards, "CPU", alongside={"GPU": num_gpus} if num_gpus else None)
    num_cpus = min(1.0, cpu_share)
    threads = max(1, int(cpu_share))
    check_placement(f"mining.num_shards={shards} shard actors", {"CPU": num_cpus, "GPU": num_gpus}, shards, nodes)
    actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_ShardWorker)
    bounds = np.linspace(0, len(x), shards + 1).astype(np.int64)
    actors = [
        actor_cls.remote(x[bounds[s] : bounds[s + 1]], int(bounds[s]), cfg, threads) for s in range(shards)
    ]
    try:
        started = time.perf_counter()
        shards_info = ray.get([a.ready.remote() for a in actors])
        info["start_and_build_seconds"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        log.info("mining shards: %s", shards_info)
        n = len(x)
        out = _empty(n, cfg)
        pending: deque = deque()

        def collect():
            start, stop, futures = pending.popleft()
            answers = ray.get(futures)
            close = _merge_topk([a[0] for a in answers], cfg.k_close, furthest=False)
            far = _merge_topk([a[1] for a in answers], cfg.k_far, furthest=True)
            out[0][start:stop], out[1][start:stop] = close
            out[2][start:stop], out[3][start:stop] = far
            record_mining_progress(int(stop), n)

        for start, stop in _query_batches(n, cfg.query_batch):
            queries = ray.put(query_rows[start:stop])
            ids = np.arange(start, stop, dtype=np.int64)
            pending.append((start, stop, [a.search.remote(queries, ids, cfg.k_close, cfg.k_far) for a in actors]))
            # Two batches in flight keep every shard busy while bounding driver memory (k_far can be 2,048).
            if len(pending) > 2:
                collect()
        while pending:
            collect()
        info["search_seconds"] = round(time.perf_counter() - started, 3)
        for shard, peak in zip(shards_info, ray.get([a.peak_rss_bytes.remote() for a in actors])):
            shard["peak_rss_bytes"] = peak
        info["shards"] = shards_info
        return out
    finally:
        for actor in actors:
            ray.kill(actor)


class SketchRows:
    """Residual sketches in the order mining wants them, read from where they are kept: `rows[i]` is the
    row, in `source`, of row i. `source` is an [N, width] array in memory or the path of a float32 file.

    From a file, rows are read with positioned reads (runs of consecutive file rows in one read) into
    memory the caller owns, never mapped: the mining driver's memory stays at the search columns (~1 KB an
    image) plus one re-ranking block, whatever n, while the sketches (32 KB an image at the default width)
    stay in the file and the page cache (~25 µs a row here against ~4 in memory; a memory map per block
    cost ~8 page faults a row and left the mapped pages in the resident set while it lasted)."""

    def __init__(self, source: "str | np.ndarray", width: int, rows: np.ndarray):
        self.source, self.width = source, int(width)
        self.rows = np.asarray(rows, np.int64)
        self.shape = (len(self.rows), self.width)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index) -> np.ndarray:
        wanted = self.rows[index]
        if not isinstance(self.source, str):
            return self.source[wanted]
        order = np.argsort(wanted, kind="stable")
        ordered = wanted[order]
        out = np.empty((len(ordered), self.width), np.float32)
        if not len(ordered):
            return out
        row_bytes = self.width * 4
        starts = np.concatenate([[0], np.nonzero(np.diff(ordered) != 1)[0] + 1, [len(ordered)]])
        with open(self.source, "rb", buffering=0) as handle:
            for start, stop in zip(starts[:-1], starts[1:]):
                target = memoryview(out[start:stop]).cast("B")
                offset, done = int(ordered[start]) * row_bytes, 0
                while done < target.nbytes:  # one read returns at most ~2 GB on Linux
                    got = os.preadv(handle.fileno(), [target[done:]], offset + done)
                    if got <= 0:
                        raise OSError(f"{self.source}: short read of sketch rows {ordered[start]}..{ordered[stop - 1]}")
                    done += got
        if np.array_equal(order, np.arange(len(order))):  # asked in file order (the usual case): no reorder copy
            return out
        result = np.empty_like(out)
        result[order] = out
        return result


def rerank_with_sketch(search: np.ndarray, sketch, anchors_ids: np.ndarray, k: int,
                       furthest: bool, block_bytes: int = 256 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank every anchor's candidate ids by the sketched estimate of the exact style distance.

    Rows of `search` are [y (d), ρ^½] and rows of `sketch` (an array or SketchRows, indexed by rows)
    the CountSketch s of the same images' residuals (step_ray.style.reduce with `residual` and `sketch`):
    ‖x_a − x_b‖² = ‖y_a − y_b‖² + ρ_a + ρ_b − 2 r_a·r_b, and the CountSketch gives r_a·r_b ≈ s_a·s_b
    without bias. `anchors_ids` [n, K] holds candidate ids of anchor rows 0..n-1 (-1 = none); returns the
    best k of each row (ascending, or descending when `furthest`) and their estimates. Sketch rows are
    fetched a block of anchors at a time (each distinct row once), `block_bytes` of them at most.
    """
    import torch  # here, in the driver: the shard actors import this module and must not load torch

    x = torch.from_numpy(np.ascontiguousarray(search, dtype=np.float32))
    d = x.shape[1] - 1
    if d < 1:
        raise ValueError(f"search rows of width {x.shape[1]} cannot hold a residual after the components")
    if len(sketch) != len(x):
        raise ValueError(f"{len(sketch)} sketch rows for {len(x)} search rows")
    width_m = sketch.shape[1]
    cand = np.ascontiguousarray(anchors_ids, dtype=np.int64)
    n, width = cand.shape
    if width < k:
        raise ValueError(f"{width} candidates per anchor cannot give {k} neighbours")
    y, rho = x[:, :d], x[:, d].double().square().float()
    out_ids = np.empty((n, k), np.int64)
    out_dist = np.empty((n, k), np.float32)
    block = max(1, block_bytes // max(1, (width + 1) * width_m * 4))
    fill = -torch.inf if furthest else torch.inf
    for start in range(0, n, block):
        stop = min(n, start + block)
        ids = torch.from_numpy(cand[start:stop])
        safe = ids.clamp_min(0)
        rows = torch.arange(start, stop)
        needed, where = np.unique(np.concatenate([safe.numpy().reshape(-1), rows.numpy()]), return_inverse=True)
        fetched = torch.from_numpy(np.ascontiguousarray(sketch[needed], dtype=np.float32))
        if not torch.isfinite(fetched).all():
            raise ValueError("descriptor sketches contain NaN or inf")
        local = torch.from_numpy(where)
        cand_s, anchor_s = fetched[local[: safe.numel()].view(safe.shape)], fetched[local[safe.numel():]]
        est = (y[safe] - y[rows, None]).square().sum(-1) + rho[rows, None] + rho[safe]
        est -= 2.0 * torch.einsum("bkm,bm->bk", cand_s, anchor_s)
        est = est.clamp_min(0.0).masked_fill(ids < 0, fill)
        top = torch.topk(est, k, dim=1, largest=furthest).indices
        out_ids[start:stop] = torch.gather(ids, 1, top).numpy()
        out_dist[start:stop] = torch.gather(est, 1, top).numpy()
    return out_ids, out_dist


def mine_neighbours(descriptors: np.ndarray, cfg: MiningConfig = MiningConfig(),
                    residual_column: bool = False, sketch_width: int = 0, sketch=None) -> Neighbours:
    """Every row's k_close nearest and k_far furthest other rows under squared L2 (docs/method.md §3).

    One in-process index pair when `num_shards` is 1; `num_shards` Ray actors otherwise.
    `residual_column`: the last column is a PCA residual norm ρ^½ (step_ray.style.reduce, `residual`);
    the database keeps it and queries carry 0 there, so rows are ranked by ‖y_a − y_x‖² + ρ_x, and the
    reported distances are ‖y_a − y_x‖² + ρ_a + ρ_x, the residual-corrected estimate of the style distance.
    `sketch_width` m > 0 (needs `residual_column`): the last m columns are a CountSketch of the residual,
    after the residual norm. The index searches the columns before them, for `cfg.rerank_factor`·k_close
    close candidates, which `rerank_with_sketch` re-ranks (the close distances reported are its
    estimates); the far set stays as the residual-corrected search ranks it.
    `sketch`: the sketches kept apart instead (an [n, m] array or SketchRows, as the mining job
    reads them), `descriptors` then holding only the searched columns; sketch_width is its width.
    """
    x = np.ascontiguousarray(descriptors, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"descriptors must be a [n, d] array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("descriptors contain NaN or inf")
    if sketch is not None:
        if sketch_width not in (0, sketch.shape[1]):
            raise ValueError(f"sketch_width={sketch_width} but the sketches kept apart are {sketch.shape[1]} wide")
        sketch_width = sketch.shape[1]
        if len(sketch) != len(x):
            raise ValueError(f"{len(sketch)} sketch rows for {len(x)} descriptor rows")
    if sketch_width and not residual_column:
        raise ValueError("a residual sketch is re-ranked with the residual norm: it needs residual_column")
    inline = sketch_width if sketch is None else 0
    if sketch_width < 0 or (residual_column and x.shape[1] < 2 + inline):
        raise ValueError(f"descriptors of width {x.shape[1]} cannot hold a sketch of {sketch_width} and a residual")
    if inline:
        sketch = x[:, x.shape[1] - inline :]
        x = np.ascontiguousarray(x[:, : x.shape[1] - inline])
    queries = x
    if residual_column:
        queries = x.copy()
        queries[:, -1] = 0.0
    cfg.check_database_size(len(x))
    search_cfg = cfg
    if sketch_width:
        # Candidates for the re-ranking: more of them from the index, never more than exist (or than a
        # GPU index returns); the configured k's are what the re-ranking keeps.
        cap = len(x) - 1 if not gpu_wanted(cfg) else min(len(x) - 1, MAX_K)
        search_cfg = dataclasses.replace(cfg, k_close=max(cfg.k_close, min(cap, cfg.rerank_factor * cfg.k_close)))
    index = cfg.resolved_index(-(-len(x) // cfg.num_shards))
    log.info(
        "mining %d x %d: index=%s shards=%d k_close=%d k_far=%d gpu=%s",
        *x.shape, index if index == cfg.index else f"{index} ({cfg.index})", cfg.num_shards, cfg.k_close,
        cfg.k_far, gpu_wanted(cfg),
    )
    info: dict = {"num_images": len(x), "dim": x.shape[1], "index": index, "num_shards": cfg.num_shards,
                  "residual_column": bool(residual_column), "sketch_width": int(sketch_width)}
    if cfg.num_shards == 1:
        parts = _mine_in_process(x, search_cfg, queries)
        info["shards"] = [{"first_id": 0, "size": len(x), "gpu": gpu_wanted(cfg), "peak_rss_bytes": _peak_rss_bytes()}]
    else:
        parts = _mine_sharded(x, search_cfg, info, queries)
    if residual_column:
        own = (x[:, -1].astype(np.float64) ** 2)[:, None]
        parts = (parts[0], (parts[1] + own).astype(np.float32), parts[2], (parts[3] + own).astype(np.float32))
    if sketch_width:
        # The close set only: the residual-corrected far set is already ≥ 0.997 precise on real VGG
        # descriptors (experiments/README.md, "Re-ranking with a sketch of the residual"), and its
        # rerank_factor·k_far candidates would cost 2.6× the close ones.
        started = time.perf_counter()
        close = rerank_with_sketch(x, sketch, parts[0], cfg.k_close, furthest=False)
        parts = (*close, parts[2], parts[3])
        info["rerank_seconds"] = round(time.perf_counter() - started, 3)
        info["close_candidates"] = search_cfg.k_close
    result = Neighbours(*parts, info=info)
    if (result.close_ids < 0).any() or (result.far_ids < 0).any():
        raise RuntimeError("mining left empty neighbour slots; this is a bug")
    return result
