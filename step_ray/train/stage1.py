"""Stage 1 (METHOD §4): pre-train the style encoder E on mined triplets, with Ray Train DDP.

Driver: `train_stage1(cfg, inputs)` builds a TorchTrainer (resources, storage, checkpoints, failures).
Worker: `stage1_worker_loop` reads its rank's triplets from the TripletSampler, trains, validates on
rank 0 and reports metrics and a checkpoint every epoch. Everything the loop needs to continue — model,
optimiser, epoch, step, the plateau counter, the metric history — lives in the checkpoint, so a resumed
or restarted run continues exactly where it stopped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from step_ray.data.pix2pix import DataConfig, load_pair, to_tensor
from step_ray.losses import triplet_loss
from step_ray.metrics import record_epoch
from step_ray.models import EncoderConfig, StyleEncoder
from step_ray.train.guard import NonFiniteConfig, NonFiniteGuard, seed_streams
from step_ray.train.monitor import IntervalMeter, MonitorConfig, RunMonitor
from step_ray.train.common import (EpochMeter, MixedPrecision, OptimConfig, RunSettings, checkpoint_activations,
                                   improves, fit, note_restart, report_epoch, resume_folder, seed_everything,
                                   worker_device)
from step_ray.checkpoints import load_checkpoint, unwrap


@dataclass(frozen=True)
class Stage1Config:
    """Encoder training. Official StEP: α = 0.1, λ = 0.01, batch 12, Adam 1e-3, β = (0, 0.99)."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    # Official lr 1e-3 with β1 = 0 diverged here (mean z² jumped from 0.25 to 94 in the second epoch on the
    # synthetic set, k-NN accuracy fell 0.96 -> 0.76); 1e-4 trained smoothly to 0.98 (see the issue note).
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    margin: float = 0.1
    l2_weight: float = 0.01
    batch_size: int = 12  # triplets per worker per step
    max_epochs: int = 4
    max_steps: int = 0  # a step budget; 0: none
    patience: int = 0  # stop after this many epochs without a better checkpoint metric; 0: never
    flip: bool = True  # random horizontal flips: they keep the style
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast (fp16: with a grad scaler); GPU workers only
    activation_checkpointing: bool = False  # recompute E's residual blocks' activations in backward
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # TensorBoard scalars and neighbour grids
    nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig)  # what a NaN/Inf loss does
    seed: int = 0
    knn_k: int = 5
    knn_reference: int = 2000  # train images encoded as the k-NN reference set
    val_triplets: int = 2000  # held-out triplets whose order is checked against exact distances
    image_cache_mb: int = 4096  # decoded training images kept in memory per worker

    def __post_init__(self):
        for name in ("batch_size", "max_epochs", "knn_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.margin < 0 or self.l2_weight < 0:
            raise ValueError("margin and l2_weight must be >= 0")


@dataclass
class Stage1Inputs:
    """What the driver hands every worker: paths, mined neighbours, validation ground truth."""

    data: DataConfig
    train_paths: list[str]  # row i of the neighbour lists is train_paths[i]
    train_style_ids: np.ndarray  # -1 where unknown
    close_ids: np.ndarray  # [n, k_c]
    far_ids: np.ndarray  # [n, k_f]
    val_paths: list[str]
    val_style_ids: np.ndarray
    val_distances: np.ndarray  # exact style distances between val images [m, m]
    weight_source: str = ""


class ImageStore:
    """Target images by row index, decoded on first use and kept while they fit in the budget."""

    def __init__(self, paths: list[str], data: DataConfig, budget_mb: int):
        self.paths, self.data = paths, data
        side = data.image_size
        self.capacity = max(1, int(budget_mb * 2**20 // (side * side * 3)))
        self.cache: dict[int, np.ndarray] = {}

    def get(self, index: int) -> np.ndarray:
        img = self.cache.get(index)
        if img is None:
            _, img = load_pair(self.paths[index], self.data.direction, self.data.image_size, self.data.min_side)
            if len(self.cache) < self.capacity:
                self.cache[index] = img
        return img

    def batch(self, indices) -> torch.Tensor:
        return to_tensor(np.stack([self.get(int(i)) for i in indices]))


def held_out_triplets(distances: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Random (a, b, c) of distinct val images whose exact order d(a,b) vs d(a,c) is not a tie."""
    rng = np.random.default_rng(seed)
    m = distances.shape[0]
    t = rng.integers(0, m, size=(count * 2, 3))
    t = t[(t[:, 0] != t[:, 1]) & (t[:, 0] != t[:, 2]) & (t[:, 1] != t[:, 2])]
    gap = np.abs(distances[t[:, 0], t[:, 1]] - distances[t[:, 0], t[:, 2]])
    return t[gap > 1e-12][:count]


@torch.no_grad()
def encode_batches(model: torch.nn.Module, images: torch.Tensor, device, batch: int = 64) -> np.ndarray:
    model.eval()
    out = [model(images[i : i + batch].to(device)).float().cpu() for i in range(0, len(images), batch)]
    return torch.cat(out).numpy()


def knn_accuracy(query: np.ndarray, query_labels: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray, k: int) -> float:
    """Majority vote of the k nearest reference codes (L2); ties go to the nearest voter's label."""
    d = ((query[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    nearest = np.argsort(d, axis=1)[:, :k]
    votes = ref_labels[nearest]
    correct = 0
    for row, label in zip(votes, query_labels):
        values, counts = np.unique(row, return_counts=True)
        best = values[counts == counts.max()]
        pred = row[0] if row[0] in best else best[0]
        correct += int(pred == label)
    return correct / len(query_labels)


def validation_metrics(z_val: np.ndarray, inputs: Stage1Inputs, triplets: np.ndarray,
                       z_ref: np.ndarray | None, ref_labels: np.ndarray | None, k: int) -> dict[str, float]:
    """Does z order images as the exact style distance does? And (synthetic) does it cluster by style?"""
    from scipy.stats import spearmanr

    dz = ((z_val[:, None, :] - z_val[None, :, :]) ** 2).sum(-1)
    a, b, c = triplets.T
    exact = inputs.val_distances
    agree = (dz[a, b] < dz[a, c]) == (exact[a, b] < exact[a, c])
    iu = np.triu_indices(len(z_val), 1)
    rho = spearmanr(dz[iu], exact[iu]).statistic
    out = {"val_triplet_acc": float(agree.mean()), "val_rank_corr": float(np.nan_to_num(rho))}
    if z_ref is not None and (inputs.val_style_ids >= 0).all():
        out["val_knn_acc"] = knn_accuracy(z_val, inputs.val_style_ids, z_ref, ref_labels, k)
    return out


def stage1_worker_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg: Stage1Config = loop_config["train"]
    inputs: Stage1Inputs = loop_config["inputs"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device()
    amp = MixedPrecision(cfg.precision, device)

    seed_everything(cfg.seed)  # same initial weights on every rank (DDP broadcasts them anyway)
    model = StyleEncoder(cfg.encoder).to(device)
    optimizer = cfg.optim.build(model.parameters())
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best": None, "bad_epochs": 0, "history": [], "stopped": ""}
    with resume_folder(loop_config) as folder:
        if folder is not None:
            import os

            scaler = {k: v for k, v in amp.stateful().items() if os.path.exists(os.path.join(folder, f"{k}.pt"))}
            state = load_checkpoint(folder, {"encoder": model}, {"optimizer": optimizer, **scaler}, map_location=device)
            note_restart(state)
    if cfg.activation_checkpointing:
        from step_ray.models.encoder import ResidualDownBlock

        checkpoint_activations(model, lambda m: isinstance(m, ResidualDownBlock))
    model = ray.train.torch.prepare_model(model)

    from step_ray.mining import TripletSampler

    sampler = TripletSampler(inputs.close_ids, inputs.far_ids, seed=cfg.seed, rank=rank, world_size=world)
    if "sampler" in state:  # checks the checkpoint was made for these neighbours
        sampler.load_state_dict(state["sampler"])
    store = ImageStore(inputs.train_paths, inputs.data, cfg.image_cache_mb)
    if rank == 0:
        val_images = torch.cat([ImageStore(inputs.val_paths, inputs.data, 0).batch([i]) for i in range(len(inputs.val_paths))])
        triplets = held_out_triplets(inputs.val_distances, cfg.val_triplets, cfg.seed)
        labelled = (inputs.train_style_ids >= 0).all()
        ref_rows = np.random.default_rng(cfg.seed).permutation(len(inputs.train_paths))[: cfg.knn_reference]
        ref_labels = inputs.train_style_ids[ref_rows]

    if rank == 0 and "untrained" not in state:
        # the same validation on the freshly initialised encoder: the baseline every epoch is read against
        net = unwrap(model)
        z_ref = encode_batches(net, store.batch(ref_rows), device) if labelled else None
        state["untrained"] = validation_metrics(encode_batches(net, val_images, device), inputs, triplets, z_ref,
                                                ref_labels if labelled else None, cfg.knn_k)

    monitor = RunMonitor(loop_config.get("run_folder", ""), "stage1", enabled=rank == 0 and cfg.monitor.enabled)
    interval = IntervalMeter()
    guard = NonFiniteGuard(cfg.nonfinite, "stage1", rank)
    modules, optimizers = {"encoder": model}, {"optimizer": optimizer, **amp.stateful()}
    guard.remember(modules, optimizers, state)
    while state["epoch"] < cfg.max_epochs and not state["stopped"]:
        epoch = state["epoch"]
        seed_everything(cfg.seed, *seed_streams(epoch, rank, state))
        sampler.set_epoch(epoch)
        model.train()
        meter = EpochMeter()
        for batch in np.array_split(sampler.epoch_triplets(epoch), max(1, math.ceil(len(sampler) / cfg.batch_size))):
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                state["stopped"] = f"step budget {cfg.max_steps} reached"
                break
            x = store.batch(batch.reshape(-1)).to(device)  # rows a0 p0 n0 a1 p1 n1 ...
            if cfg.flip:
                flip = torch.rand(x.shape[0], device=device) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(3), x)
            with amp.autocast():
                z = model(x)
            z = z.float().view(len(batch), 3, -1)
            loss, logs = triplet_loss(z[:, 0], z[:, 1], z[:, 2], cfg.margin, cfg.l2_weight)
            loss = guard.inject(loss, state)
            optimizer.zero_grad(set_to_none=True)
            finite = guard.finite(state, "triplet loss", loss)
            guard.step_done(finite)
            if guard.rollback_pending:
                break
            if finite:
                amp.backward(loss)
                amp.step(optimizer)
                amp.update()
            state["step"] += 1
            if not finite:
                continue
            meter.add(logs, len(batch))
            interval.add(logs, len(batch))
            if cfg.monitor.scalars_every and state["step"] % cfg.monitor.scalars_every == 0:
                scalars = interval.take(world)
                scalars["images_per_s"] *= 3  # a triplet is three images
                monitor.scalars(state["step"], scalars)
                record_epoch("stage1", {**scalars, "step": state["step"]}, rank=rank)
        if guard.rollback_pending:  # back to the last checkpoint's weights, optimiser and state; replay
            state = guard.restore(modules, optimizers, state)
            sampler.set_epoch(state["epoch"])
            continue
        seconds = meter.seconds()
        metrics: dict[str, Any] = meter.means()
        metrics.update(
            epoch=epoch,
            step=state["step"],
            nonfinite_steps=guard.take_epoch_count(),
            epoch_seconds=seconds,
            images_per_s=3 * meter.rate(seconds, world),
            triplets_per_s=meter.rate(seconds, world),
        )
        if rank == 0:
            net = unwrap(model)
            metrics.update({f"untrained_{k}": v for k, v in state["untrained"].items()})
            z_val = encode_batches(net, val_images, device)
            z_ref = encode_batches(net, store.batch(ref_rows), device) if labelled else None
            metrics.update(validation_metrics(z_val, inputs, triplets, z_ref, ref_labels if labelled else None, cfg.knn_k))
            monitor.scalars(state["step"], {k: v for k, v in metrics.items() if k != "step"})
            if cfg.monitor.enabled and cfg.monitor.grid_every and (epoch + 1) % cfg.monitor.grid_every == 0:
                monitor.image("neighbours", state["step"], neighbours_grid(cfg.monitor, val_images, z_val, inputs.val_distances),
                              png_name=f"stage1_epoch{epoch:04d}.png")
            score = metrics.get(loop_config["checkpoint_metric"])
            if improves(score, state["best"], loop_config["checkpoint_mode"]):
                state["best"], state["bad_epochs"] = score, 0
            else:
                state["bad_epochs"] += 1
            if cfg.patience and state["bad_epochs"] >= cfg.patience:
                state["stopped"] = f"no better {loop_config['checkpoint_metric']} for {cfg.patience} epochs"
        state["stopped"] = _broadcast(state["stopped"], world)
        state["epoch"] = epoch + 1
        sampler.set_epoch(epoch + 1)
        state["sampler"] = sampler.state_dict()
        if rank == 0:
            state["history"].append(metrics)
            print(_progress_line(metrics, cfg.max_epochs), flush=True)
        record_epoch("stage1", metrics, rank=rank)  # Ray metrics for the dashboard / Prometheus
        report_epoch(metrics, epoch, rank, modules, optimizers, state, loop_config["config"])
        guard.remember(modules, optimizers, state)
    monitor.close()


def neighbours_grid(m: MonitorConfig, val_images: torch.Tensor, z_val: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Fixed validation anchors; per anchor a row of its nearest images by E's codes and a row by the
    exact style distance: the two rows converge as E learns."""
    from step_ray.eval.embedding import neighbour_grid
    from step_ray.eval.pictures import to_uint8

    anchors = np.random.default_rng(m.seed).choice(len(val_images), min(m.grid_inputs, len(val_images)), replace=False)
    return neighbour_grid(to_uint8(val_images), np.asarray(z_val), exact, anchors, k=min(m.grid_references, len(val_images) - 1))


def _broadcast(value: str, world: int) -> str:
    """Rank 0's stop decision, on every rank (all ranks must leave the loop together)."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _progress_line(m: dict[str, Any], max_epochs: int) -> str:
    parts = [f"[stage1] epoch {m['epoch'] + 1}/{max_epochs}", f"loss {m.get('train_loss', float('nan')):.4f}",
             f"active {m.get('train_active_fraction', float('nan')):.2f}", f"{m['images_per_s']:.0f} img/s"]
    for key in ("val_knn_acc", "val_triplet_acc", "val_rank_corr"):
        if key in m:
            parts.append(f"{key} {m[key]:.3f}")
    return " | ".join(parts)


def train_stage1(cfg: Stage1Config, run: RunSettings, inputs: Stage1Inputs, full_config: Any):
    """Run the TorchTrainer; returns (ray.train.Result, run folder URI)."""
    loop_config = {
        "train": cfg,
        "inputs": inputs,
        "config": full_config,
        "checkpoint_metric": run.checkpoint_metric,
        "checkpoint_mode": run.checkpoint_mode,
    }
    return fit(stage1_worker_loop, loop_config, run, "stage1")
