"""The mining job: style-statistics descriptors (local or s3://) in, close/far neighbour Parquet out.

Output layout: `<output>/neighbours.parquet` (row, image_id, close_ids, close_dist, far_ids, far_dist;
ids are row numbers of that file) and `<output>/metadata.json` (config, config hash, counts, timings).
A run whose output already carries the same hash is skipped, so the stage-1 chain
(style stats → mining → training) redoes only what changed. The hash covers the mining config, the split
and the descriptors' own metadata.json, so recomputed descriptors invalidate old neighbours.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time

import numpy as np
import pyarrow.compute as pc

from step_ray import storage
from step_ray.cluster import init_ray
from step_ray.config import config_to_dict
from step_ray.mining.config import MineTripletsJobConfig
from step_ray.mining.index import gpu_wanted
from step_ray.mining.neighbours import Neighbours, SketchRows, mine_neighbours

log = logging.getLogger(__name__)

NEIGHBOURS_FILE = "neighbours.parquet"
METADATA_FILE = "metadata.json"


def neighbours_uri(output: str) -> str:
    return storage.join(output, NEIGHBOURS_FILE)


def config_hash(cfg: MineTripletsJobConfig, descriptor_metadata: bytes) -> str:
    """Hash of what determines the result (not where it is written)."""
    tree = config_to_dict(cfg)
    tree.pop("output")
    for name in ("query_batch", "sketch_memory_mb", "spill_dir"):  # speed and memory, never the answer
        tree["mining"].pop(name)
    text = json.dumps(tree, sort_keys=True)
    return hashlib.sha256(text.encode() + b"\0" + descriptor_metadata).hexdigest()[:16]


def _descriptor_metadata(descriptors: str) -> bytes:
    uri = storage.join(descriptors, "metadata.json")
    return storage.read_bytes(uri) if storage.exists(uri) else b""


def _descriptor_layout(descriptors: str) -> tuple[bool, int]:
    """(residual column?, sketch width) of the descriptors, from their metadata's reduction."""
    raw = _descriptor_metadata(descriptors)
    if not raw:
        return False, 0
    try:
        reduction = json.loads(raw).get("reduction", {})
    except ValueError:
        return False, 0
    return bool(reduction.get("residual", False)), int(reduction.get("sketch", 0))


def _done(cfg: MineTripletsJobConfig, digest: str) -> bool:
    meta_uri = storage.join(cfg.output, METADATA_FILE)
    if not (storage.exists(meta_uri) and storage.exists(neighbours_uri(cfg.output))):
        return False
    try:
        return json.loads(storage.read_bytes(meta_uri)).get("config_hash") == digest
    except ValueError:
        return False


def mine_triplets(cfg: MineTripletsJobConfig) -> str:
    """Mine close and far sets for the `split` rows of the descriptor table; returns the output folder."""
    storage.check_readable(cfg.descriptors, "descriptors")
    storage.check_writable(cfg.output)
    digest = config_hash(cfg, _descriptor_metadata(cfg.descriptors))
    if _done(cfg, digest):
        log.info("neighbours at %s are up to date (config hash %s); skipping", cfg.output, digest)
        return cfg.output

    # A PCA reduction with `residual` writes the residual norm after its components (mined
    # asymmetrically) and, with `sketch`, the residual's CountSketch after that (used to re-rank).
    residual, sketch_width = _descriptor_layout(cfg.descriptors)
    with tempfile.TemporaryDirectory(prefix="step_ray_mining_", dir=cfg.mining.spill_dir or None) as spill:
        start = time.perf_counter()
        image_ids, search, sketch = read_for_mining(cfg.descriptors, cfg.split, sketch_width,
                                                    os.path.join(spill, "sketch.f32"), cfg.mining.sketch_memory_mb)
        read_s = time.perf_counter() - start
        if cfg.mining.num_shards > 1:
            init_ray()  # RAY_ADDRESS, when set, names the cluster; else a local instance on 127.0.0.1
        start = time.perf_counter()
        neighbours = mine_neighbours(search, cfg.mining, residual_column=residual, sketch=sketch)
        mine_s = time.perf_counter() - start
    neighbours.save(neighbours_uri(cfg.output), image_ids)
    metadata = {
        "config": config_to_dict(cfg),
        "config_hash": digest,
        "num_images": len(image_ids),
        "descriptor_dim": int(search.shape[1] + sketch_width),
        "residual_column": residual,
        "sketch_width": sketch_width,
        "rerank_seconds": neighbours.info.get("rerank_seconds"),
        "sketches_kept": "" if sketch is None else ("on disk" if isinstance(sketch.source, str) else "in memory"),
        "gpu": gpu_wanted(cfg.mining),
        "read_seconds": round(read_s, 3),
        "mine_seconds": round(mine_s, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # metadata.json last: its hash is what marks the output complete.
    storage.write_bytes(storage.join(cfg.output, METADATA_FILE), json.dumps(metadata, indent=1).encode())
    log.info("mined %d images in %.1f s -> %s", len(image_ids), mine_s, cfg.output)
    return cfg.output


def read_for_mining(descriptors: str, split: str, sketch_width: int, spill_path: str, sketch_memory_mb: int = 0):
    """The `split` rows of a style-statistics run, streamed one row group at a time: (image ids sorted,
    the searched columns [n, d+1] in memory in that order, the residual sketches, or None without a
    sketch). Memory: ~4·(d+1) bytes an image (1 KB at PCA-256) plus one row group, however many images;
    the sketches (4·m bytes an image) too while they fit in `sketch_memory_mb`, else they go to a file at
    `spill_path`. Either way they come back as SketchRows in the ids' order."""
    from step_ray.style.statistics import (  # deferred: torch (mine_triplets)
        descriptor_matrix, descriptor_row_count, iter_descriptor_batches)

    total = descriptor_row_count(descriptors)
    in_memory = total * sketch_width * 4 <= sketch_memory_mb * 2**20
    kept = np.empty((total, sketch_width), np.float32) if sketch_width and in_memory else None
    ids: list[str] = []
    search = None
    with open(spill_path, "wb") if sketch_width and not in_memory else contextlib.nullcontext() as spill:
        for batch in iter_descriptor_batches(descriptors, ["image_id", "split", "descriptor"]):
            keep = pc.equal(batch["split"], split)
            rows = descriptor_matrix(batch["descriptor"].filter(keep))
            if not len(rows):
                continue
            width = rows.shape[1] - sketch_width
            if search is None:
                search = np.empty((total, width), np.float32)
            search[len(ids) : len(ids) + len(rows)] = rows[:, :width]
            if kept is not None:
                kept[len(ids) : len(ids) + len(rows)] = rows[:, width:]
            elif sketch_width:
                spill.write(np.ascontiguousarray(rows[:, width:]).tobytes())
            ids.extend(batch["image_id"].filter(keep).to_pylist())
    if not ids:
        raise ValueError(f"{descriptors} holds no rows of split '{split}'")
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")  # read_descriptors' order: by image id
    search = search[: len(ids)][order]
    sketch = SketchRows(kept if kept is not None else spill_path, sketch_width, order) if sketch_width else None
    return [ids[i] for i in order], search, sketch


def load_neighbours(output: str) -> Neighbours:
    """The neighbours a `mine_triplets` run wrote under `output`."""
    return Neighbours.load(neighbours_uri(output))
