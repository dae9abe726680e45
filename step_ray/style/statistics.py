"""Style statistics at scale: a Ray Data graph from a pix2pix folder to reduced style descriptors.

    read_binary_files (target halves' files, local or s3://)
      -> decode + resize        CPU tasks (fused with the read), bad files flagged, not dropped
      -> VGG -> Gram -> descriptor -> reduction
                                map_batches with a callable class on an actor pool
                                (one GPU per actor when the cluster has GPUs; fp32 unless `precision` says otherwise)
      -> streamed to the driver (small: d floats per image), written as they arrive:
         <output>/descriptors/*.parquet   good rows: image_id, path, split, style_id, descriptor
         <output>/errors.csv             bad rows: path, reason
         <output>/reduction.npz          the reduction, to project new images later
         <output>/metadata.json          weight source, layers, image side, reduction, summary;
                                         written last, so its presence means "complete"

Bad files travel through the Ray Data graph as flagged rows instead of being dropped by the decode step, so
the driver can list them and can check that every listed file came out exactly once.
PCA needs a fit first: a first pass of the same graph, on a seeded sample of images and without
reduction, brings full descriptors to the driver. The driver projects those sample descriptors itself once
the PCA is fitted, so the second pass covers only the images outside the sample (every image is put
through the VGG once).

One streaming execution per pass: the driver consumes the actors' output blocks while later ones are
still being computed, writing good rows to Parquet (large row groups) and keeping bad rows and the
workers' statistics, instead of materialising the results and re-reading them in four more executions.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import resource
import socket
import time
from dataclasses import dataclass, field
from typing import Literal, Mapping, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from step_ray import storage
from step_ray.cluster import (PreflightError, alive_nodes, check_shared_storage, copies_that_fit, describe_nodes,
                              even_share, init_ray)
from step_ray.config import config_to_dict
from step_ray.data.pix2pix import (
    BadImageError,
    DataConfig,
    DatasetError,
    image_id,
    load_pair,
    scan_folder,
    read_style_ids,
    to_tensor,
)
from step_ray.style.gram import descriptor_size, descriptors_from_images, style_descriptor
from step_ray.style.reduce import Reduction, ReductionConfig
from step_ray.style.stages import bad_rows, decode_target_batch, good_rows
from step_ray.prometheus import record_style_images
from step_ray.style.vgg import VGGConfig, layer_channels, load_vgg, vgg_weight_source

log = logging.getLogger(__name__)

OUTPUT_FORMAT = 1  # bump when the meaning of the written descriptors changes
DESCRIPTORS_DIR = "descriptors"
METADATA_FILE = "metadata.json"
ERRORS_FILE = "errors.csv"
REDUCTION_FILE = "reduction.npz"


@dataclass(frozen=True)
class StyleStatsConfig:
    """Style descriptors of every target image of a pix2pix dataset, computed with Ray Data.

    Resources: `num_actors` model replicas (capped at the number of GPUs when GPUs are used), each with
    `cpus_per_actor` logical CPUs (0 = 1 on GPU; on CPU an even share of what the decode tasks, at
    `decode_cpus` each, leave free) and `torch_threads` intra-op threads (0 = its CPU share, at least 1).
    `images_per_read_task` sets how many files one read+decode task handles. `rows_per_file` is the
    most rows one Parquet file of descriptors holds (row groups of up to `rows_per_group` rows, fewer when
    a group would exceed 64 MiB, e.g. unreduced descriptors).
    `force` recomputes even when `output` already holds a result of the same config.
    """

    data: DataConfig = field(default_factory=DataConfig)
    vgg: VGGConfig = field(default_factory=VGGConfig)
    reduction: ReductionConfig = field(default_factory=ReductionConfig)
    splits: tuple[str, ...] = ("train", "val")
    output: str = "runs/style_stats"
    batch_size: int = 32
    num_actors: int = 2
    use_gpu: Literal["auto", "always", "never"] = "auto"
    # fp32 by default: bf16 autocast moved style distances by ~1 % and changed nearest neighbours.
    # bf16/fp16 autocast the VGG forward on any device (Gram matrices stay fp32); see experiments/README.md,
    # "Style descriptors: bf16 against fp32".
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    cpus_per_actor: float = 0.0
    torch_threads: int = 0
    decode_cpus: float = 0.25
    images_per_read_task: int = 64
    rows_per_file: int = 100_000
    rows_per_group: int = 16_384
    force: bool = False

    def __post_init__(self):
        if not self.splits:
            raise ValueError("splits must name at least one split")
        if self.batch_size < 1 or self.num_actors < 1:
            raise ValueError(f"batch_size and num_actors must be >= 1, got {self.batch_size}, {self.num_actors}")
        if self.cpus_per_actor < 0 or self.torch_threads < 0:
            raise ValueError("cpus_per_actor and torch_threads must be >= 0 (0 = automatic)")
        if self.decode_cpus <= 0:
            raise ValueError(f"decode_cpus must be > 0, got {self.decode_cpus}")
        if self.images_per_read_task < 1 or self.rows_per_file < 1 or self.rows_per_group < 1:
            raise ValueError("images_per_read_task, rows_per_file and rows_per_group must be >= 1")
        if not self.output:
            raise ValueError("output must name a folder (local path or s3://bucket/prefix)")


class StyleDescriptors(NamedTuple):
    """What `read_descriptors` returns; unpacks as (ids, descriptors, table)."""

    ids: list[str]
    descriptors: np.ndarray  # [n, d] float32, row i belongs to ids[i]
    table: "pandas.DataFrame"  # image_id, path, split, style_id (-1 unknown), in the same order  # noqa: F821


# ----------------------------------------------------------------------------------------------------
# Pipeline stages (run inside Ray workers)


def _fixed_size_list(rows: np.ndarray) -> pa.FixedSizeListArray:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1])


class StyleDescriptorModel:
    """Ray Data callable class: a batch of target images -> their (reduced) style descriptors.

    One instance per actor holds the VGG and the projection matrix, so they are built once per worker.
    Rows flagged bad by the decode step pass through with a NaN descriptor. Each output row also
    carries the worker's name, its peak memory, its busy time so far, its start-up time and when its
    batch finished, for the run's summary (none of these reach the Parquet files).
    """

    def __init__(
        self,
        vgg_cfg: VGGConfig,
        reduction_uri: str | None,
        device: str,
        torch_threads: int,
        precision: str = "fp32",
    ):
        started = time.perf_counter()
        torch.set_num_threads(torch_threads)
        self.device = torch.device(device)
        self.vgg = load_vgg(vgg_cfg, self.device)
        if self.device.type == "cpu":
            # oneDNN convolutions run faster on NHWC than on NCHW for VGG's 3×3 layers.
            self.vgg = self.vgg.to(memory_format=torch.channels_last)
        self.layer_weights = vgg_cfg.resolved_layer_weights()
        self.reduction = Reduction.load(reduction_uri) if reduction_uri else None
        self.output_dim = self.reduction.output_dim if self.reduction else descriptor_size(self.vgg.channels)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if self.reduction is not None:
            # Build the projection matrix (157 MB for the random one) now, while decode tasks fill the
            # input queue, rather than inside the first batch.
            self.reduction.transform_tensor(torch.zeros(1, self.reduction.input_dim, device=self.device))
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.busy_seconds = 0.0  # time inside __call__: the summary sets it against wall time
        self.startup_seconds = time.perf_counter() - started  # torch import excluded (module level)

    def descriptors(self, images: np.ndarray) -> np.ndarray:
        """uint8 NHWC -> [n, d] float32 (the same arithmetic as pix2pix.to_tensor, on the device)."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        use_autocast = self.autocast_dtype is not None
        with torch.inference_mode(), torch.autocast(self.device.type, self.autocast_dtype or torch.float32,
                                                    enabled=use_autocast):
            desc = style_descriptor(self.vgg(x), self.layer_weights)
            if self.reduction is not None:
                desc = self.reduction.transform_tensor(desc)
        return desc.float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        start = time.perf_counter()
        good = np.array([e == "" for e in batch["error"]], dtype=bool)
        out = np.full((len(good), self.output_dim), np.nan, np.float32)
        if good.any():
            out[good] = self.descriptors(batch["image"][good])
            for split, count in zip(*np.unique(np.asarray(batch["split"])[good].astype(str), return_counts=True)):
                record_style_images(int(count), str(split))
        self.busy_seconds += time.perf_counter() - start
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        gpu_peak = torch.cuda.max_memory_allocated() if self.device.type == "cuda" else 0
        count = len(good)
        return pa.table(
            {
                "image_id": pa.array([str(v) for v in batch["image_id"]], pa.string()),
                "path": pa.array([str(v) for v in batch["path"]], pa.string()),
                "split": pa.array([str(v) for v in batch["split"]], pa.string()),
                "style_id": pa.array(np.asarray(batch["style_id"], np.int64)),
                "error": pa.array([str(v) for v in batch["error"]], pa.string()),
                "descriptor": _fixed_size_list(out),
                "worker": pa.array([self.worker] * count, pa.string()),
                "peak_rss_bytes": pa.array(np.full(count, peak_rss, np.int64)),
                "gpu_peak_bytes": pa.array(np.full(count, gpu_peak, np.int64)),
                "busy_seconds": pa.array(np.full(count, self.busy_seconds, np.float64)),
                "startup_seconds": pa.array(np.full(count, self.startup_seconds, np.float64)),
                "finished_at": pa.array(np.full(count, time.time(), np.float64)),  # wall clock, for the summary
            }
        )


# ----------------------------------------------------------------------------------------------------
# Driver side


@dataclass(frozen=True)
class ResourcePlan:
    use_gpu: bool
    num_actors: int
    cpus_per_actor: float
    torch_threads: int

    @property
    def device(self) -> str:
        return "cuda" if self.use_gpu else "cpu"


def plan_resources(cfg: StyleStatsConfig, nodes: Sequence[Mapping[str, float]] | Mapping[str, float]) -> ResourcePlan:
    """Actor count, CPUs and threads per actor for these nodes (each alive node's resources; one mapping
    is a single-node cluster). Ray places each actor whole on one node, so the actors are sized to pack
    onto the nodes together, not from the cluster's total (1.75 CPUs per actor on two 1-CPU nodes waited
    forever); and decode tasks always keep room to run, `decode_cpus` free on one node (an actor pool
    holding every CPU would starve its own input)."""
    nodes = [nodes] if isinstance(nodes, Mapping) else list(nodes)
    gpus = int(sum(n.get("GPU", 0) for n in nodes))
    if cfg.use_gpu == "always" and gpus == 0:
        raise PreflightError("use_gpu=always but the Ray cluster has no GPU")
    use_gpu = cfg.use_gpu == "always" or (cfg.use_gpu == "auto" and gpus > 0)
    actors = cfg.num_actors
    if use_gpu:
        gpu_slots = copies_that_fit({"GPU": 1}, nodes)  # a GPU actor holds one whole GPU
        if actors > gpu_slots:
            log.warning("num_actors=%d but the cluster has %d GPUs: using %d actors", actors, gpu_slots, gpu_slots)
            actors = gpu_slots
    spare = even_share(nodes, actors, "CPU", alongside={"GPU": 1} if use_gpu else None, reserve=cfg.decode_cpus)
    if spare <= 0:
        raise PreflightError(f"style statistics: no room on the nodes for {actors} actor(s) beside decode_cpus="
                             f"{cfg.decode_cpus:g} (the Ray cluster has {describe_nodes(nodes)})")
    wanted = cfg.cpus_per_actor or (1.0 if use_gpu else spare)
    per_actor = min(wanted, spare)
    if per_actor < wanted:
        log.info("cpus_per_actor %.3g -> %.3g so %d actors fit on %s with room for decode tasks",
                 wanted, per_actor, actors, describe_nodes(nodes))
    threads = cfg.torch_threads or max(1, round(per_actor))
    return ResourcePlan(use_gpu=use_gpu, num_actors=actors, cpus_per_actor=per_actor, torch_threads=threads)


def _descriptor_dataset(
    cfg: StyleStatsConfig,
    uris: Sequence[str],
    style_ids: dict[str, int],
    plan: ResourcePlan,
    reduction_uri: str | None,
):
    """The lazy Ray Dataset: files -> decoded targets -> descriptors (rows for bad files included)."""
    import ray.data

    fs, _ = storage.resolve(uris[0])
    fs_paths = [storage.resolve(u)[1] for u in uris]
    blocks = max(1, math.ceil(len(uris) / cfg.images_per_read_task))
    files = ray.data.read_binary_files(
        fs_paths,
        include_paths=True,
        filesystem=fs,
        num_cpus=cfg.decode_cpus,
        override_num_blocks=blocks,
    )
    decoded = files.map_batches(
        decode_target_batch,
        batch_size=None,
        num_cpus=cfg.decode_cpus,
        fn_kwargs=dict(
            direction=cfg.data.direction,
            image_size=cfg.data.image_size,
            min_side=cfg.data.min_side,
            fail_on_bad=cfg.data.on_bad_image == "fail",
            style_ids=style_ids,
            uri_prefix="s3://" if storage.is_s3(uris[0]) else "",
        ),
    )
    return decoded.map_batches(
        StyleDescriptorModel,
        fn_constructor_kwargs=dict(
            vgg_cfg=cfg.vgg,
            reduction_uri=reduction_uri,
            device=plan.device,
            torch_threads=plan.torch_threads,
            precision=cfg.precision,
        ),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.num_actors),
        num_cpus=plan.cpus_per_actor,
        num_gpus=1 if plan.use_gpu else 0,
    )


def _unwrap_bad_image(exc: BaseException) -> BadImageError | None:
    """The BadImageError behind a Ray task failure, if that is what it was (Ray wraps user errors in
    RayTaskError / UserCodeException and keeps the original as `.cause` or `__cause__`)."""
    pending, seen = [exc], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, BadImageError) and hasattr(current, "path"):
            return current
        pending.extend([current.__context__, current.__cause__, getattr(current, "cause", None)])
    return None


@contextlib.contextmanager
def _original_worker_errors():
    """Ray Data normally replaces a UDF's exception by a UserCodeException holding only its text; with
    this flag the original exception object (a BadImageError, say) reaches the driver."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    previous = ctx.raise_original_map_exception
    ctx.raise_original_map_exception = True
    try:
        yield
    finally:
        ctx.raise_original_map_exception = previous


def _stream(dataset):
    """Execute a dataset, yielding its output blocks (pyarrow tables) as they are produced; a
    BadImageError in a worker (on_bad_image=fail) comes back as itself."""
    try:
        yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4)
    except Exception as exc:
        bad = _unwrap_bad_image(exc)
        if bad is not None:
            raise BadImageError(bad.path, bad.reason) from exc
        raise


WORKER_COLUMNS = ["worker", "peak_rss_bytes", "gpu_peak_bytes", "busy_seconds", "startup_seconds", "finished_at"]
GROUP_BYTES = 64 * 2**20  # a row group stays below this even when rows are large (unreduced descriptors)


class _ResultWriter:
    """The driver's side of a pass: good rows go to Parquet files as blocks arrive (row groups of up to
    `rows_per_group` rows, files of up to `rows_per_file`), bad rows and per-batch worker statistics are
    kept for errors.csv and the summary."""

    def __init__(self, output: str, descriptor_dim: int, rows_per_file: int, rows_per_group: int):
        self.fs, base = storage.resolve(output)
        self.folder = f"{base}/{DESCRIPTORS_DIR}"
        self.fs.create_dir(self.folder, recursive=True)
        self.schema = pa.schema([
            ("image_id", pa.string()), ("path", pa.string()), ("split", pa.string()), ("style_id", pa.int64()),
            ("descriptor", pa.list_(pa.float32(), descriptor_dim)),
        ])
        self.rows_per_file, self.rows_per_group = rows_per_file, rows_per_group
        self.pending: list[pa.Table] = []
        self.pending_rows = self.pending_bytes = 0
        self.files = 0
        self.writer: pq.ParquetWriter | None = None
        self.stream = None
        self.rows_in_file = 0
        self.good = 0
        self.errors: list[pa.Table] = []
        self.worker_stats: list[pa.Table] = []

    def add(self, table: pa.Table) -> None:
        """One output block of the graph (all columns, good and bad rows); a block without its
        descriptor column (the PCA sample pass's) contributes only its bad rows and statistics."""
        if table.num_rows == 0:
            return
        bad = bad_rows(table)
        if bad.num_rows:
            self.errors.append(bad)
        self.worker_stats.append(table.select(WORKER_COLUMNS))
        if "descriptor" in table.column_names:
            self.add_good(good_rows(table))

    def add_good(self, good: pa.Table) -> None:
        if good.num_rows == 0:
            return
        self.pending.append(good.cast(self.schema))
        self.pending_rows += good.num_rows
        self.pending_bytes += good.nbytes
        if self.pending_rows >= self.rows_per_group or self.pending_bytes >= GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        self.pending, self.pending_rows, self.pending_bytes = [], 0, 0
        row_bytes = max(1, table.nbytes // max(1, table.num_rows))
        group = max(1, min(self.rows_per_group, GROUP_BYTES // row_bytes))
        while table.num_rows:
            if self.writer is None:
                self.stream = self.fs.open_output_stream(f"{self.folder}/part-{self.files:05d}.parquet")
                self.writer = pq.ParquetWriter(self.stream, self.schema)
                self.files += 1
            take = min(table.num_rows, self.rows_per_file - self.rows_in_file)
            self.writer.write_table(table.slice(0, take), row_group_size=group)
            self.rows_in_file += take
            self.good += take
            table = table.slice(take)
            if self.rows_in_file >= self.rows_per_file:
                self._close_file()

    def _close_file(self) -> None:
        self.writer.close()
        self.stream.close()
        self.writer = self.stream = None
        self.rows_in_file = 0

    def close(self) -> None:
        self._flush()
        if self.files == 0:  # no readable image: one empty file, so the folder still reads as a table
            self.writer = pq.ParquetWriter(self.fs.open_output_stream(f"{self.folder}/part-00000.parquet"),
                                           self.schema)
            self.stream = None
            self.writer.close()
            self.files = 1
        elif self.writer is not None:
            self._close_file()

    def error_frame(self) -> "pandas.DataFrame":  # noqa: F821
        import pandas as pd

        if not self.errors:
            return pd.DataFrame({"path": pd.Series([], dtype=object), "reason": pd.Series([], dtype=object)})
        return pa.concat_tables(self.errors).to_pandas()


def descriptor_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)


def fingerprint(cfg: StyleStatsConfig, weight_source: str, image_ids: Sequence[str]) -> str:
    """Hash of everything the descriptors depend on: not the resources, not the output location."""
    data = config_to_dict(cfg.data)
    data.pop("on_bad_image")  # decides whether a bad file stops the job, not what good files give
    data.pop("synthetic_dir")
    if cfg.data.root:
        data.pop("synthetic")
    payload = {
        "format": OUTPUT_FORMAT,
        "data": data,
        "vgg": config_to_dict(cfg.vgg),
        "weight_source": weight_source,
        "precision": cfg.precision,
        "reduction": config_to_dict(cfg.reduction),
        "splits": list(cfg.splits),
        "images": hashlib.sha256("\n".join(image_ids).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def read_metadata(output_uri: str) -> dict | None:
    """The run's metadata.json, or None when there is no complete run there."""
    uri = storage.join(output_uri, METADATA_FILE)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_bytes(uri))


def _clear_outputs(output_uri: str) -> None:
    fs, base = storage.resolve(output_uri)
    for name in (METADATA_FILE, ERRORS_FILE, REDUCTION_FILE):
        path = f"{base}/{name}"
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    path = f"{base}/{DESCRIPTORS_DIR}"
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def _list_images(cfg: StyleStatsConfig, root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files of the splits, and the entries not read (path, reason) for errors.csv."""
    uris, skipped = [], []
    for split in cfg.splits:
        listing = scan_folder(root, split)
        uris.extend(listing.files)
        skipped.extend(listing.skipped)
    return uris, skipped


class _FitPass(NamedTuple):
    """What the PCA's sample pass leaves for the main pass: the files it covered, its good rows'
    metadata and full descriptors (row-aligned), and its output blocks' bad rows and worker statistics."""

    uris: frozenset[str]
    rows: pa.Table  # image_id, path, split, style_id
    descriptors: np.ndarray  # [n, D] float32
    tables: list[pa.Table]  # the pass's blocks without their descriptor column


def _fit_reduction(cfg, uris, style_ids, plan, input_dim: int) -> tuple[Reduction, float, _FitPass | None]:
    """PCA: a first pass over a seeded sample brings full descriptors to the driver to fit on; they are
    kept, so the sample images need not go through the VGG again."""
    reduction = Reduction(cfg.reduction, input_dim)
    if not reduction.needs_fit:
        return reduction, 0.0, None
    start = time.perf_counter()
    rng = np.random.default_rng(cfg.reduction.seed)
    count = min(cfg.reduction.fit_sample, len(uris))
    sample_uris = sorted(uris[i] for i in rng.choice(len(uris), size=count, replace=False))
    # One [count, D] array filled as blocks arrive (1.2 MB a row for VGG-16): a list of blocks
    # concatenated at the end held the sample twice.
    sample = np.empty((count, input_dim), np.float32)
    filled, rows, tables = 0, [], []
    for table in _stream(_descriptor_dataset(cfg, sample_uris, style_ids, plan, reduction_uri=None)):
        good = good_rows(table)
        if good.num_rows:
            sample[filled : filled + good.num_rows] = descriptor_matrix(good["descriptor"])
            filled += good.num_rows
            rows.append(good.drop_columns(["descriptor"]))
        tables.append(table.drop_columns(["descriptor"]))
        del table, good
    sample = sample[:filled]
    if len(sample) <= cfg.reduction.dim:
        raise DatasetError(
            f"PCA to {cfg.reduction.dim} dims needs more than {cfg.reduction.dim} readable sample images, got "
            f"{len(sample)}; lower reduction.dim or use reduction.method=random"
        )
    reduction.fit(sample)
    fit = _FitPass(frozenset(sample_uris), pa.concat_tables(rows), sample, tables)
    return reduction, time.perf_counter() - start, fit


def compute_style_stats(cfg: StyleStatsConfig) -> str:
    """Descriptors of every target image of `cfg.splits`, written under `cfg.output`; returns it.

    Skips the work when `cfg.output` already holds a complete run with the same fingerprint (config,
    weight source and image list) unless `cfg.force`. Starts a local Ray only if none is running.
    """
    root = cfg.data.prepare()
    output = cfg.output
    storage.check_writable(output)
    uris, not_read = _list_images(cfg, root)
    ids = sorted(image_id(u) for u in uris)
    weight_source = vgg_weight_source(cfg.vgg)
    key = fingerprint(cfg, weight_source, ids)
    previous = read_metadata(output)
    if previous and previous.get("config_hash") == key and not cfg.force:
        log.info("style stats in %s are up to date (config hash %s): skipped", output, key)
        return output
    if len(set(ids)) != len(ids):
        raise DatasetError("two files of the dataset share an image id (<split>/<stem>)")
    _clear_outputs(output)

    init_ray()  # RAY_ADDRESS, when set, names the cluster; else a local instance on 127.0.0.1
    with _original_worker_errors():
        return _compute(cfg, root, uris, key, weight_source, not_read)


def _compute(cfg: StyleStatsConfig, root: str, uris: list[str], key: str, weight_source: str,
             not_read: list[tuple[str, str]] = ()) -> str:
    output = cfg.output
    # Decode tasks read the images and the actors the reduction wherever Ray places them.
    check_shared_storage({"data.root": root, "output": output})
    plan = plan_resources(cfg, alive_nodes())
    style_ids = read_style_ids(root)
    channels = layer_channels(cfg.vgg.arch, cfg.vgg.layers)
    input_dim = descriptor_size(channels)

    start = time.perf_counter()
    reduction, fit_seconds, fit = _fit_reduction(cfg, uris, style_ids, plan, input_dim)
    # Absolute, as the actors read it: a relative path would be resolved in each actor's own working
    # directory (Ray's session folder, on another node).
    reduction_uri = storage.join(storage.absolute(output), REDUCTION_FILE)
    reduction.save(reduction_uri)

    writer = _ResultWriter(output, reduction.output_dim, cfg.rows_per_file, cfg.rows_per_group)
    rest = uris
    if fit is not None:
        # The sample's descriptors, projected here with the fitted PCA (the same transform the actors
        # apply): its images are not computed a second time.
        for table in fit.tables:
            writer.add(table)
        projected = reduction.transform(fit.descriptors)
        writer.add_good(fit.rows.append_column("descriptor", _fixed_size_list(projected)))
        rest = [u for u in uris if u not in fit.uris]
        del fit, projected
    main_start = time.perf_counter()
    if rest:
        for table in _stream(_descriptor_dataset(cfg, rest, style_ids, plan, reduction_uri)):
            writer.add(table)
    writer.close()
    seconds = time.perf_counter() - start
    main_seconds = time.perf_counter() - main_start

    errors, decode_errors = _write_errors(writer, not_read, output)
    summary = _summary(writer, plan, len(uris), len(errors), decode_errors, len(not_read),
                       (seconds, fit_seconds, main_seconds, main_start))
    metadata = {
        "format": OUTPUT_FORMAT,
        "config_hash": key,
        "dataset_root": root,
        "splits": list(cfg.splits),
        "direction": cfg.data.direction,
        "image_size": cfg.data.image_size,
        "vgg": {
            "arch": cfg.vgg.arch,
            "weight_source": weight_source,
            "layers": list(cfg.vgg.layers),
            "layer_weights": list(cfg.vgg.resolved_layer_weights()),
            "channels": list(channels),
            "descriptor_size": input_dim,
            "gram": "F F^T / (C*H*W); distance = sum_l w_l * mean (G_a - G_b)^2",
        },
        "reduction": reduction.describe(),
        "descriptor_dim": reduction.output_dim,
        "summary": summary,
        "config": config_to_dict(cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    storage.write_bytes(storage.join(output, METADATA_FILE), json.dumps(metadata, indent=1).encode())
    log.info("style stats: %s", format_summary(summary))
    return output


def _write_errors(writer: _ResultWriter, not_read: list[tuple[str, str]], output: str):
    """errors.csv: the bad images and the entries not read; returns (that frame, the bad images' count)."""
    errors = writer.error_frame().reindex(columns=["path", "reason"])
    decode_errors = len(errors)
    if not_read:  # entries of the split folders that are not image files of the flat layout
        import pandas as pd  # deferred: pandas only when there is something to add

        errors = pd.concat([errors, pd.DataFrame(list(not_read), columns=["path", "reason"])], ignore_index=True)
    errors = errors.sort_values("path").reset_index(drop=True)
    storage.write_bytes(storage.join(output, ERRORS_FILE), errors.to_csv(index=False).encode())
    return errors, decode_errors


def _summary(writer: _ResultWriter, plan: ResourcePlan, listed: int, skipped: int, decode_errors: int,
             not_read: int, timing: tuple[float, float, float, float]) -> dict:
    """The run's counts, times, rates and per-actor figures (metadata.json's `summary`)."""
    seconds, fit_seconds, main_seconds, main_start = timing
    batches = pa.concat_tables(writer.worker_stats).to_pandas() if writer.worker_stats else None
    per_worker = batches.groupby("worker").max().sort_index() if batches is not None else None
    written = writer.good
    if written + decode_errors != listed:
        raise RuntimeError(f"{listed} files listed but {written} rows and {decode_errors} errors came out")
    steady = _steady_rate(batches, main_start) if batches is not None else None
    return {
        "images": int(written),
        "skipped": int(skipped),  # every entry not used: bad images and entries not read (errors.csv)
        "not_read": int(not_read),
        # Rows the model actors computed, over both passes: each listed file once (the PCA sample's
        # descriptors are projected by the driver, not computed again).
        "vgg_images": int(len(batches)) if batches is not None else 0,
        # Wall time of the descriptor passes, writing included (the PCA sample pass and fit too;
        # fit_seconds is that part).
        "seconds": round(seconds, 3),
        "images_per_second": round(written / seconds, 2) if seconds > 0 else None,
        "fit_seconds": round(fit_seconds, 3),
        # The main pass alone, and its rate once every actor has finished its first batch (start-up
        # excluded): what the graph sustains.
        "main_pass_seconds": round(main_seconds, 3),
        "steady_images_per_second": steady,
        "actors": plan.num_actors,
        "device": plan.device,
        "cpus_per_actor": plan.cpus_per_actor,
        "torch_threads": plan.torch_threads,
        "peak_rss_bytes_per_worker": _per_worker(per_worker, "peak_rss_bytes", int),
        "peak_gpu_bytes_per_worker": _per_worker(per_worker, "gpu_peak_bytes", int),
        # Seconds each actor spent computing; the rest of `seconds` is start-up, decoding and waiting.
        "busy_seconds_per_worker": _per_worker(per_worker, "busy_seconds", lambda v: round(float(v), 3)),
        # Seconds each actor's constructor took (VGG, weights, projection matrix; imports excluded).
        "startup_seconds_per_worker": _per_worker(per_worker, "startup_seconds", lambda v: round(float(v), 3)),
    }


def _per_worker(per_worker, column: str, convert) -> dict:
    return {} if per_worker is None else {w: convert(v) for w, v in per_worker[column].items()}


def _steady_rate(batches, pass_start: float) -> float | None:
    """Images per second of the main pass after the moment every actor had finished its first batch,
    from the batches' finish times (wall clock); None when too few batches."""
    # The main pass's batches: those finished after it started (the sample pass's finished before).
    epoch_start = time.time() - (time.perf_counter() - pass_start)
    main = batches[batches["finished_at"] >= epoch_start]
    if main.empty:
        return None
    # One entry per batch: rows of a batch share worker and finish time.
    per_batch = main.groupby(["worker", "finished_at"]).size().reset_index(name="rows").sort_values("finished_at")
    warm = per_batch.groupby("worker")["finished_at"].min().max()
    after = per_batch[per_batch["finished_at"] > warm]
    span = float(per_batch["finished_at"].max() - warm)
    if after.empty or span <= 0:
        return None
    return round(float(after["rows"].sum()) / span, 2)


def format_summary(summary: dict) -> str:
    rate = summary.get("images_per_second")
    peaks = summary.get("peak_rss_bytes_per_worker", {})
    peak = f", peak RSS per worker {max(peaks.values()) / 2**20:.0f} MiB" if peaks else ""
    skipped = f"{summary['skipped']} skipped"
    if summary.get("not_read"):
        skipped += f" ({summary['not_read']} entries not read: other extensions, sub-folders, broken links)"
    if summary["skipped"]:
        skipped += f", reasons in {ERRORS_FILE}"
    return (
        f"{summary['images']} images in {summary['seconds']:.1f} s ({rate} images/s on {summary['actors']} "
        f"{summary['device']} actor(s)), {skipped}{peak}"
    )


_ROW_COLUMNS = ["image_id", "path", "split", "style_id"]


def _read_rows(output_uri: str, columns: list[str]) -> pa.Table:
    fs, files = _descriptor_files(output_uri)
    return pq.read_table(files, filesystem=fs, columns=columns).sort_by("image_id")


def read_descriptors(output_uri: str) -> StyleDescriptors:
    """All descriptors of a run, sorted by image id: (ids, [n, d] float32, DataFrame of the rest)."""
    table = _read_rows(output_uri, _ROW_COLUMNS + ["descriptor"])
    descriptors = descriptor_matrix(table["descriptor"])
    frame = table.select(_ROW_COLUMNS).to_pandas()
    return StyleDescriptors(ids=frame["image_id"].tolist(), descriptors=descriptors, table=frame)


def descriptor_row_count(output_uri: str) -> int:
    """Rows of a run's descriptor files, from their Parquet footers (nothing else is read)."""
    fs, files = _descriptor_files(output_uri)
    total = 0
    for path in files:
        with fs.open_input_file(path) as stream:
            total += pq.ParquetFile(stream).metadata.num_rows
    return total


def iter_descriptor_batches(output_uri: str, columns: Sequence[str] = (*_ROW_COLUMNS, "descriptor")):
    """A run's rows as pyarrow RecordBatches, one row group at a time, in file order (not sorted): what
    a reader that must not hold every descriptor at once (the mining job at scale) streams through."""
    fs, files = _descriptor_files(output_uri)
    for path in files:
        with fs.open_input_file(path) as stream:
            parquet = pq.ParquetFile(stream)
            for group in range(parquet.num_row_groups):
                yield from parquet.read_row_group(group, columns=list(columns)).to_batches()


def _descriptor_files(output_uri: str) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem and the sorted Parquet files of a run's descriptors."""
    fs, base = storage.resolve(output_uri)
    folder = f"{base}/{DESCRIPTORS_DIR}"
    if fs.get_file_info(folder).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no style descriptors under {output_uri} (run compute_style_stats first)")
    infos = fs.get_file_info(pafs.FileSelector(folder))
    return fs, sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def read_descriptor_rows(output_uri: str) -> "pandas.DataFrame":  # noqa: F821
    """The rows of a run without their descriptors (image_id, path, split, style_id), sorted by image id:
    what stage 1 needs, without reading the descriptor column (34 KB per image with the default sketch)."""
    return _read_rows(output_uri, _ROW_COLUMNS).to_pandas()


def read_errors(output_uri: str) -> "pandas.DataFrame":  # noqa: F821
    import pandas as pd

    return pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(output_uri, ERRORS_FILE))), keep_default_na=False)


def descriptors_in_process(
    cfg: StyleStatsConfig,
    uris: Sequence[str],
    reduction: Reduction | None = None,
    vgg=None,
) -> np.ndarray:
    """The same descriptors without Ray, one image at a time (reference for tests and the naive
    baseline of the benchmark): PIL decode, resize, VGG forward, Gram, descriptor, reduction."""
    vgg = vgg if vgg is not None else load_vgg(cfg.vgg)
    weights = cfg.vgg.resolved_layer_weights()
    out: np.ndarray | None = None
    for row, uri in enumerate(uris):
        _, target = load_pair(uri, cfg.data.direction, cfg.data.image_size, cfg.data.min_side)
        desc = descriptors_from_images(vgg, to_tensor(target[None]), weights)
        if reduction is not None:
            desc = reduction.transform_tensor(desc)
        if out is None:
            out = np.empty((len(uris), desc.shape[1]), np.float32)
        # Copied into one array: keeping thousands of small torch-owned rows alive between the large
        # per-image temporaries fragments the heap (measured: RSS grew by GBs over 2,000 images).
        out[row] = desc[0].numpy()
    return out if out is not None else np.zeros((0, 0), np.float32)
