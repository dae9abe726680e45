"""The mining job: style-statistics descriptors (local or s3://) in, close/far neighbour Parquet out.

Output layout: `<output>/neighbours.parquet` (row, image_id, close_ids, close_dist, far_ids, far_dist;
ids are row numbers of that file) and `<output>/metadata.json` (config, config hash, counts, timings).
A run whose output already carries the same hash is skipped, so the stage-1 chain
(style stats → mining → training) redoes only what changed. The hash covers the mining config, the split
and the descriptors' own metadata.json, so recomputed descriptors invalidate old neighbours.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time

import numpy as np

from step_ray import storage
from step_ray.cluster import init_ray
from step_ray.config import config_to_dict
from step_ray.mining.config import MineTripletsConfig
from step_ray.mining.index import gpu_wanted
from step_ray.mining.neighbours import Neighbours, mine_neighbours

log = logging.getLogger(__name__)

NEIGHBOURS_FILE = "neighbours.parquet"
METADATA_FILE = "metadata.json"


def neighbours_uri(output: str) -> str:
    return storage.join(output, NEIGHBOURS_FILE)


def config_hash(cfg: MineTripletsConfig, descriptor_metadata: bytes) -> str:
    """Hash of what determines the result (not where it is written)."""
    tree = config_to_dict(cfg)
    tree.pop("output")
    tree["mining"].pop("query_batch")  # batching changes speed, never the answer
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


def _done(cfg: MineTripletsConfig, digest: str) -> bool:
    meta_uri = storage.join(cfg.output, METADATA_FILE)
    if not (storage.exists(meta_uri) and storage.exists(neighbours_uri(cfg.output))):
        return False
    try:
        return json.loads(storage.read_bytes(meta_uri)).get("config_hash") == digest
    except ValueError:
        return False


def mine_triplets(cfg: MineTripletsConfig) -> str:
    """Mine close and far sets for the `split` rows of the descriptor table; returns the output folder."""
    from step_ray.style.pipeline import read_descriptors  # deferred: it imports torch, which mining's Ray tasks (they import this package) must not load

    storage.check_readable(cfg.descriptors, "descriptors")
    storage.check_writable(cfg.output)
    digest = config_hash(cfg, _descriptor_metadata(cfg.descriptors))
    if _done(cfg, digest):
        log.info("neighbours at %s are up to date (config hash %s); skipping", cfg.output, digest)
        return cfg.output

    start = time.perf_counter()
    image_ids, descriptors, table = read_descriptors(cfg.descriptors)
    # `table` is the pandas frame read_descriptors documents (image_id, path, split, style_id), row-aligned.
    keep = np.nonzero(np.asarray(table["split"]).astype(str) == cfg.split)[0]
    if len(keep) == 0:
        raise ValueError(f"{cfg.descriptors} holds no rows of split '{cfg.split}'")
    image_ids = [image_ids[i] for i in keep]
    descriptors = np.ascontiguousarray(descriptors[keep], dtype=np.float32)
    read_s = time.perf_counter() - start

    if cfg.mining.num_shards > 1:
        init_ray()  # RAY_ADDRESS, when set, names the cluster; else a local instance on 127.0.0.1
    start = time.perf_counter()
    # A PCA reduction with `residual` writes the residual norm after its components (mined
    # asymmetrically) and, with `sketch`, the residual's CountSketch after that (used to re-rank).
    residual, sketch = _descriptor_layout(cfg.descriptors)
    neighbours = mine_neighbours(descriptors, cfg.mining, residual_column=residual, sketch_width=sketch)
    mine_s = time.perf_counter() - start
    neighbours.save(neighbours_uri(cfg.output), image_ids)
    metadata = {
        "config": config_to_dict(cfg),
        "config_hash": digest,
        "num_images": len(image_ids),
        "descriptor_dim": int(descriptors.shape[1]),
        "residual_column": residual,
        "sketch_width": sketch,
        "rerank_seconds": neighbours.info.get("rerank_seconds"),
        "gpu": gpu_wanted(cfg.mining),
        "read_seconds": round(read_s, 3),
        "mine_seconds": round(mine_s, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # metadata.json last: its hash is what marks the output complete.
    storage.write_bytes(storage.join(cfg.output, METADATA_FILE), json.dumps(metadata, indent=1).encode())
    log.info("mined %d images in %.1f s -> %s", len(image_ids), mine_s, cfg.output)
    return cfg.output


def load_neighbours(output: str) -> Neighbours:
    """The neighbours a `mine_triplets` run wrote under `output`."""
    return Neighbours.load(neighbours_uri(output))
