"""The whole of stage 1 as one job: style statistics -> triplet mining -> encoder training.

Each step's output goes to a cache folder named by a hash of the inputs and config that determine it, so
a step whose output already exists for the same inputs is skipped. The run folder (checkpoints,
metrics.json, embedding.png, neighbours.png) is printed at the end.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from step_ray import storage
from step_ray.checkpoints import STATE_FILE
from step_ray.config import ConfigError, config_to_dict, config_to_yaml
from step_ray.data.pix2pix import DataConfig, load_target, to_tensor
from step_ray.engine.launch import best_checkpoint, checkpoint_uri
from step_ray.engine.loop import train
from step_ray.engine.settings import RunSettings
from step_ray.eval.embedding import neighbour_grid, plot_embedding, save_png
from step_ray.mining import MineTripletsJobConfig, MiningConfig, load_neighbours, mine_triplets
from step_ray.pipelines.results import StageResult, TrainResult
from step_ray.recipes.stage1 import Stage1Training, Stage1Inputs, Stage1Recipe
from step_ray.style.encode import encode, load_encoder
from step_ray.style.gram import exact_distance_matrix
from step_ray.style.statistics import StyleStatsConfig, compute_style_stats, read_descriptor_rows
from step_ray.style.vgg import load_vgg


@dataclass(frozen=True)
class PretrainJobConfig:
    """`jobs/pretrain.py`: style stats, mining, stage-1 training, on the dataset `data` (spelt as in every job)."""

    data: DataConfig = field(default_factory=DataConfig)
    style: StyleStatsConfig = field(default_factory=StyleStatsConfig)  # the style_stats job's settings, less its data
    # A large far set (docs/method.md §3): with 13 furthest of 800 images every negative comes from the one or
    # two most distant styles, and nearby styles are never pushed apart. 700 of the default synthetic set's
    # 800 is everything but one style's worth (100) of nearest images, so every other style is a negative;
    # with 400 the two blotch styles, close in VGG space, never were (k-NN 0.91 against 0.96 after 10
    # epochs, experiments/synthetic_difficulty.py). MiningConfig itself keeps the official 13. Must stay <
    # the train size (configs/facades.yaml: 200 of 400).
    mining: MiningConfig = field(default_factory=lambda: MiningConfig(k_far=700))
    # 12 epochs (Stage1Training's own default is 4): the synthetic styles share a palette, so an untrained E
    # cannot tell them apart and stage 1 has to learn them; at lr 1e-4 that takes ~600 steps (9 epochs).
    train: Stage1Training = field(default_factory=lambda: Stage1Training(max_epochs=12))
    # "auto": on a set labelled by style (the synthetic one) the best checkpoint is the one whose codes
    # group the held-out images by style best (val_knn_acc), what the embedding picture shows; otherwise
    # the held-out triplet order (val_triplet_acc). On the synthetic set triplet order is flat and noisy
    # (0.69-0.71 over 12 epochs) while k-NN climbs from 0.41 to 0.97: ranking by it picked epoch 3.
    run: RunSettings = field(default_factory=lambda: RunSettings(checkpoint_metric="auto"))
    cache_dir: str = ""  # outputs of the style and mining steps; empty: <run.storage_path>/cache
    val_split: str = "val"
    grid_anchors: int = 6

    def __post_init__(self):
        if self.style.data != DataConfig():  # one spelling of the dataset: pretrain reads `data`
            raise ConfigError("pretrain reads its dataset from `data` (data.root=..., data.direction=...); "
                              "style.data is the style_stats job's spelling")

    def resolved_cache_dir(self) -> str:
        return self.cache_dir or storage.join(self.run.storage_path, "cache")


def config_hash(cfg: Any, ignore: tuple[str, ...] = ("output", "force")) -> str:
    """Hash of what determines a step's result: its config less where it is written."""
    tree = {k: v for k, v in config_to_dict(cfg).items() if k not in ignore}
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:12]


def exact_val_distances(style: StyleStatsConfig, paths: list[str], data: DataConfig) -> np.ndarray:
    """Exact (unreduced) style distances between the given images: the validation ground truth."""
    vgg = load_vgg(style.vgg)
    images = to_tensor(np.stack([load_target(p, data.direction, data.image_size, data.min_side) for p in paths]))
    return exact_distance_matrix(vgg, images, style.vgg.resolved_layer_weights()).float().numpy()


def _cached_matrix(uri: str, compute) -> np.ndarray:
    if storage.exists(uri):
        return np.load(io.BytesIO(storage.read_bytes(uri)))
    value = compute()
    buf = io.BytesIO()
    np.save(buf, value)
    storage.write_bytes(uri, buf.getvalue())
    return value


def style_step(cfg: PretrainJobConfig) -> tuple[str, DataConfig]:
    """Step 1, style statistics (cached by config hash): their folder, and the dataset with its root resolved."""
    data = cfg.data
    data = dataclasses.replace(data, root=data.prepare())
    # The dataset location is part of the hash, and so is everything that changes the descriptors.
    style_cfg = dataclasses.replace(cfg.style, data=data, splits=tuple(sorted({"train", cfg.val_split})))
    style_out = storage.join(cfg.resolved_cache_dir(), f"style-{config_hash(style_cfg)}")
    t0 = time.perf_counter()
    compute_style_stats(dataclasses.replace(style_cfg, output=style_out))
    print(f"[pretrain] style statistics: {style_out} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return style_out, data


def mining_step(cfg: PretrainJobConfig, style_out: str) -> str:
    """Step 2, triplet mining of the training rows (cached by config hash): the neighbours' folder."""
    mine_cfg = MineTripletsJobConfig(descriptors=style_out, output=storage.join(cfg.resolved_cache_dir(), "mining"),
                                  split="train", mining=cfg.mining)
    mine_out = storage.join(cfg.resolved_cache_dir(), f"mining-{config_hash(mine_cfg)}")
    t0 = time.perf_counter()
    mine_triplets(dataclasses.replace(mine_cfg, output=mine_out))
    print(f"[pretrain] triplet mining: {mine_out} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return mine_out


def stage1_inputs(cfg: PretrainJobConfig, data: DataConfig, style_out: str, mine_out: str) -> Stage1Inputs:
    """What stage 1 trains on: the mined training rows and the validation ground truth (exact style
    distances between the validation images, cached beside the descriptors)."""
    table = read_descriptor_rows(style_out)
    neighbours = load_neighbours(mine_out)
    train_rows = table[table["split"] == "train"].set_index("image_id").loc[list(neighbours.image_ids)]
    val_rows = table[table["split"] == cfg.val_split].sort_values("image_id")
    if len(val_rows) < 3:
        raise ValueError(f"validation split '{cfg.val_split}' has {len(val_rows)} readable images; need >= 3")
    val_paths = list(val_rows["path"])
    exact_uri = storage.join(style_out, f"exact_{cfg.val_split}_distances.npy")
    t0 = time.perf_counter()
    val_distances = _cached_matrix(exact_uri, lambda: exact_val_distances(cfg.style, val_paths, data))
    print(f"[pretrain] exact validation distances: {exact_uri} ({time.perf_counter() - t0:.1f}s)", flush=True)
    meta = json.loads(storage.read_bytes(storage.join(style_out, "metadata.json")))
    return Stage1Inputs(
        data=data,
        train_paths=list(train_rows["path"]),
        train_style_ids=train_rows["style_id"].to_numpy(np.int64),
        close_ids=neighbours.close_ids,
        far_ids=neighbours.far_ids,
        val_paths=val_paths,
        val_style_ids=val_rows["style_id"].to_numpy(np.int64),
        val_distances=val_distances,
        weight_source=str(meta.get("vgg", {}).get("weight_source", "")),
    )


def prepare_inputs(cfg: PretrainJobConfig) -> tuple[Stage1Inputs, dict[str, str]]:
    """Steps 1 and 2 (cached by config hash) and the validation ground truth."""
    style_out, data = style_step(cfg)
    mine_out = mining_step(cfg, style_out)
    return stage1_inputs(cfg, data, style_out, mine_out), {"style_stats": style_out, "mining": mine_out}


def report_outputs(cfg: PretrainJobConfig, inputs: Stage1Inputs, result, run_uri: str, steps: dict[str, str],
                   best: str, best_metrics: dict[str, Any]) -> dict[str, str]:
    """metrics.json, embedding.png and neighbours.png beside the checkpoints, from the best checkpoint
    (`best`, whose reported metrics the picture's title gives)."""
    encoder = load_encoder(best)
    val_b = np.stack([load_target(p, inputs.data.direction, inputs.data.image_size, inputs.data.min_side)
                      for p in inputs.val_paths])
    z = encode(val_b, encoder)
    labels = inputs.val_style_ids
    labelled = (labels >= 0).all()
    if not labelled:  # real data: colour by k-means clusters of the exact style space
        labels = _style_clusters(inputs.val_distances, k=min(6, len(labels)))
    weights = inputs.weight_source or "unknown VGG weights"
    metrics = result.metrics or {}
    # the plot names the weight file, not its folder (a long venv path pushed the metrics off the picture);
    # metrics.json keeps the full source
    shown = weights.split(":", 1)[0] + ":" + weights.split(":", 1)[1].split("/")[-1] if ":/" in weights else weights
    title = (f"stage-1 z of {len(z)} val images, coloured by {'style id' if labelled else 'style cluster'}\n"
             f"VGG: {shown}\n"
             + ", ".join(rise_text(best_metrics, k) for k in ("val_knn_acc", "val_triplet_acc") if k in best_metrics))
    out = {
        "checkpoint": best,
        "metrics": storage.join(run_uri, "metrics.json"),
        "embedding": storage.join(run_uri, "embedding.png"),
        "neighbours": storage.join(run_uri, "neighbours.png"),
        **steps,
    }
    plot_embedding(z, labels, out["embedding"], title, "style id" if labelled else "cluster")
    anchors = np.linspace(0, len(z) - 1, min(cfg.grid_anchors, len(z))).astype(int)
    save_png(out["neighbours"], neighbour_grid(val_b, z, inputs.val_distances, anchors, k=5))
    history = _history(checkpoint_uri(result.checkpoint, cfg.run))  # the latest holds every epoch
    storage.write_json(out["metrics"], {
        "final": metrics, "history": history, "best_checkpoint": best, "vgg_weights": weights,
        "config": config_to_dict(cfg), "steps": steps,
    })
    return out


def rise_text(metrics: dict[str, Any], key: str) -> str:
    """`val_knn_acc 0.400 (untrained) -> 0.956`: a metric against the same validation of the untrained E."""
    before = metrics.get(f"untrained_{key}")
    return (f"{key} {before:.3f} (untrained) -> {metrics[key]:.3f}" if before is not None
            else f"{key} {metrics[key]:.3f}")


def _style_clusters(distances: np.ndarray, k: int) -> np.ndarray:
    """Clusters of the exact style space for colouring real data: k-medoids-like farthest-point seeds."""
    centres = [int(distances.sum(1).argmin())]
    while len(centres) < k:
        centres.append(int(distances[:, centres].min(1).argmax()))
    return distances[:, centres].argmin(1)


def _history(checkpoint_uri: str) -> list[dict]:
    return json.loads(storage.read_bytes(storage.join(checkpoint_uri, STATE_FILE))).get("history", [])


def resolved_run(run: RunSettings, inputs: Stage1Inputs) -> RunSettings:
    """`run` with checkpoint_metric "auto" resolved for this dataset (see PretrainJobConfig.run)."""
    if run.checkpoint_metric != "auto":
        return run
    labelled = bool((inputs.train_style_ids >= 0).all() and (inputs.val_style_ids >= 0).all())
    return dataclasses.replace(run, checkpoint_metric="val_knn_acc" if labelled else "val_triplet_acc",
                               checkpoint_mode="max")


def run_pretrain(cfg: PretrainJobConfig) -> TrainResult:
    """Style statistics, mining, stage 1; the result's checkpoint is the best E (by run.checkpoint_metric),
    its summary the run's metrics.json, its outputs the embedding and neighbour pictures and the cached steps."""
    started = time.perf_counter()
    inputs, steps = prepare_inputs(cfg)
    run = resolved_run(cfg.run, inputs)
    print(f"[pretrain] training the style encoder on {len(inputs.train_paths)} images "
          f"({run.num_workers} worker(s), VGG: {inputs.weight_source}; best checkpoint by {run.checkpoint_metric})",
          flush=True)
    result, run_uri = train(Stage1Recipe(cfg.train, inputs, job=cfg), run)
    train_seconds = time.perf_counter() - started
    best, best_metrics = best_checkpoint(result, run)
    out = report_outputs(cfg, inputs, result, run_uri, steps, best, best_metrics)
    stage = StageResult("stage1", checkpoint_uri(result.checkpoint, run), run_uri, result.metrics or {})
    done = TrainResult("pretrain", out.pop("checkpoint"), [stage], summary=out.pop("metrics"), outputs=out,
                       details={"vgg_weights": inputs.weight_source}, train_seconds=train_seconds,
                       seconds=time.perf_counter() - started)
    shown = [rise_text(best_metrics, k) for k in ("val_knn_acc", "val_triplet_acc", "val_rank_corr")
             if k in best_metrics]
    if shown:
        print(f"[pretrain] best checkpoint (epoch {int(best_metrics.get('epoch', -1)) + 1}): {', '.join(shown)}",
              flush=True)
    print(f"[pretrain] done in {done.seconds:.0f}s", flush=True)
    for key, value in (("checkpoint", done.checkpoint), ("metrics", done.summary), ("embedding", out["embedding"]),
                       ("neighbours", out["neighbours"])):
        print(f"[pretrain] {key:<10} {value}", flush=True)
    return done


__all__ = ["PretrainJobConfig", "run_pretrain", "config_to_yaml"]
