"""Stage 1 (docs/method.md §4) as a recipe: the style encoder E trained on mined triplets.

Each step encodes a batch of (anchor, positive, negative) target images and takes one triplet-loss step;
rank 0 validates by how well distances between E's codes order held-out triplets as the exact style
distance does (and, on labelled data, k-NN accuracy of the codes). The triplets of each rank come from
the TripletSampler, whose position is checkpointed with the rest (step_ray.engine.loop owns the loop).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray.train.torch
import torch
from scipy.stats import spearmanr

from step_ray.checkpoints import unwrap
from step_ray.data.pix2pix import DataConfig
from step_ray.data.store import target_store
from step_ray.engine.distributed import random_flip
from step_ray.engine.loop import Recipe, Worker
from step_ray.engine.precision import checkpoint_activations
from step_ray.engine.settings import LoopConfig, OptimConfig
from step_ray.eval.embedding import neighbour_grid
from step_ray.eval.pictures import to_uint8
from step_ray.losses import triplet_loss
from step_ray.mining import TripletSampler
from step_ray.models import EncoderConfig
from step_ray.models.encoder import ResidualDownBlock
from step_ray.style.encode import build_encoder


@dataclass(frozen=True)
class Stage1Training(LoopConfig):
    """Encoder training. Official StEP: α = 0.1, λ = 0.01, batch 12, Adam 1e-3, β = (0, 0.99)."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    # Official lr 1e-3 with β1 = 0 diverged here (mean z² jumped from 0.25 to 94 in the second epoch on the
    # synthetic set, k-NN accuracy fell 0.96 -> 0.76); 1e-4 trained smoothly to 0.98.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4))
    margin: float = 0.1
    l2_weight: float = 0.01
    batch_size: int = 12  # triplets per worker per step
    max_epochs: int = 4
    activation_checkpointing: bool = False  # recompute E's residual blocks' activations in backward
    knn_k: int = 5
    knn_reference: int = 2000  # train images encoded as the k-NN reference set
    val_triplets: int = 2000  # held-out triplets whose order is checked against exact distances
    fit_images: int = 512  # encoder.backbone=vgg_gram: training images its feature centring is fitted on
    # vgg_gram: the frozen stem's outputs for training images and their mirror images (21 KB an image at
    # the default sketch), computed on first use and kept for as many images as fit in this many MB
    # (a step then trains the head alone: the same numbers, far faster); images beyond it, or all with 0,
    # go through the frozen VGG at every use. Stage 1 says once when the bank cannot hold the set.
    stem_cache_mb: int = 2048

    def __post_init__(self):
        super().__post_init__()
        if self.knn_k < 1:
            raise ValueError(f"knn_k must be >= 1, got {self.knn_k}")
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


def held_out_triplets(distances: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Random (a, b, c) of distinct val images whose exact order d(a,b) vs d(a,c) is not a tie."""
    rng = np.random.default_rng(seed)
    m = distances.shape[0]
    t = rng.integers(0, m, size=(count * 2, 3))
    t = t[(t[:, 0] != t[:, 1]) & (t[:, 0] != t[:, 2]) & (t[:, 1] != t[:, 2])]
    gap = np.abs(distances[t[:, 0], t[:, 1]] - distances[t[:, 0], t[:, 2]])
    return t[gap > 1e-12][:count]


@torch.no_grad()
def encode_batches(model: torch.nn.Module, images: torch.Tensor, device, batch: int = 64,
                   from_stem: bool = False) -> np.ndarray:
    """Codes of images (or, from_stem=True, of precomputed frozen-stem outputs) in batches, eval mode."""
    model.eval()
    run = (lambda x: model(x, from_stem=True)) if from_stem else model
    out = [run(images[i : i + batch].to(device)).float().cpu() for i in range(0, len(images), batch)]
    return torch.cat(out).numpy()


def knn_accuracy(query: np.ndarray, query_labels: np.ndarray, ref: np.ndarray, ref_labels: np.ndarray, k: int) -> float:
    """Majority vote of the k nearest reference codes (L2); ties go to the nearest voter's label."""
    return knn_vote_accuracy(((query[:, None, :] - ref[None, :, :]) ** 2).sum(-1), query_labels, ref_labels, k)


def knn_vote_accuracy(distances: np.ndarray, query_labels: np.ndarray, ref_labels: np.ndarray, k: int) -> float:
    """knn_accuracy's vote from a precomputed [query, ref] distance matrix (for vectors too wide to broadcast)."""
    votes = ref_labels[np.argsort(distances, axis=1)[:, :k]]
    correct = 0
    for row, label in zip(votes, query_labels):
        values, counts = np.unique(row, return_counts=True)
        best = values[counts == counts.max()]
        pred = row[0] if row[0] in best else best[0]
        correct += int(pred == label)
    return correct / len(query_labels)


def style_order_metrics(z: np.ndarray, exact: np.ndarray, triplets: np.ndarray) -> dict[str, float]:
    """How z orders images against the exact style distances: the share of held-out triplets (a, b, c)
    whose order d(a,b) < d(a,c) it keeps, and the rank correlation of all pairwise ‖z_i − z_j‖²."""
    dz = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    a, b, c = triplets.T
    agree = (dz[a, b] < dz[a, c]) == (exact[a, b] < exact[a, c])
    iu = np.triu_indices(len(z), 1)
    rho = spearmanr(dz[iu], exact[iu]).statistic
    return {"val_triplet_acc": float(agree.mean()), "val_rank_corr": float(np.nan_to_num(rho))}


def validation_metrics(z_val: np.ndarray, inputs: Stage1Inputs, triplets: np.ndarray,
                       z_ref: np.ndarray | None, ref_labels: np.ndarray | None, k: int) -> dict[str, float]:
    """Does z order images as the exact style distance does? And (synthetic) does it cluster by style?"""
    out = style_order_metrics(z_val, inputs.val_distances, triplets)
    if z_ref is not None and (inputs.val_style_ids >= 0).all():
        out["val_knn_acc"] = knn_accuracy(z_val, inputs.val_style_ids, z_ref, ref_labels, k)
    return out


@dataclass
class Stage1Recipe(Recipe):
    """E, its optimiser, triplet batches from the sampler, the triplet step, the ordering validation."""

    cfg: Stage1Training
    inputs: Stage1Inputs
    job: Any = None  # the job's whole config, saved with every checkpoint
    name: str = "stage1"
    images_per_example = 3  # a triplet
    example_name = "triplets"

    def build(self, w: Worker) -> dict[str, torch.nn.Module]:
        return {"encoder": build_encoder(self.cfg.encoder).to(w.device)}

    def initialise(self, w: Worker, modules) -> dict[str, torch.optim.Optimizer]:
        if self.cfg.encoder.backbone == "vgg_gram":  # centre its Gram features: the same seeded images on every rank
            rows = np.random.default_rng(self.cfg.seed).permutation(len(self.inputs.train_paths))[: self.cfg.fit_images]
            images = target_store([self.inputs.train_paths[r] for r in rows],
                                  self.inputs.data, 0).batch(range(len(rows)))
            modules["encoder"].fit_input_statistics(images.to(w.device))
        return self.make_optimizers(w, modules)

    def make_optimizers(self, w: Worker, modules) -> dict[str, torch.optim.Optimizer]:
        self.model = modules["encoder"]
        self.optimizer = self.cfg.optim.build(self.model.parameters())
        return {"optimizer": self.optimizer}

    def prepare(self, w: Worker, state: dict[str, Any]) -> None:
        cfg, inputs = self.cfg, self.inputs
        if cfg.activation_checkpointing:
            checkpoint_activations(self.model, lambda m: isinstance(m, ResidualDownBlock))
        self.model = ray.train.torch.prepare_model(self.model)  # DDP: one forward, one backward per step
        self.sampler = TripletSampler(inputs.close_ids, inputs.far_ids, seed=cfg.seed, rank=w.rank, world_size=w.world)
        if "sampler" in state:  # checks the checkpoint was made for these neighbours
            self.sampler.load_state_dict(state["sampler"])
        self.store = target_store(inputs.train_paths, inputs.data, cfg.image_cache_mb)
        self.stem_bank = stem_bank(unwrap(self.model), self.store, cfg.stem_cache_mb, w.device)
        if w.rank != 0:
            return
        shortfalls = [self.store.shortfall("train.image_cache_mb", cfg.image_cache_mb),
                      self.stem_bank.shortfall("train.stem_cache_mb", cfg.stem_cache_mb) if self.stem_bank else None]
        for line in filter(None, shortfalls):
            print(f"[stage1] {line}", flush=True)
        self.val_images = target_store(inputs.val_paths, inputs.data, 0).batch(range(len(inputs.val_paths)))
        self.triplets = held_out_triplets(inputs.val_distances, cfg.val_triplets, cfg.seed)
        if self.stem_bank is not None:
            with torch.no_grad():
                stem = unwrap(self.model).frozen_stem
                self.val_stem = torch.cat([stem(self.val_images[i : i + 64].to(w.device))
                                           for i in range(0, len(self.val_images), 64)])
        self.labelled = bool((inputs.train_style_ids >= 0).all())
        self.ref_rows = np.random.default_rng(cfg.seed).permutation(len(inputs.train_paths))[: cfg.knn_reference]
        if "untrained" not in state:
            # the same validation on the freshly initialised encoder: the baseline every epoch is read against
            state["untrained"] = self._validation(w)[1]

    def batches(self, w: Worker, epoch: int, streams):
        self.sampler.set_epoch(epoch)
        triplets = self.sampler.epoch_triplets(epoch)
        steps = max(1, -(-len(self.sampler) // self.cfg.batch_size))
        return [(len(b), b) for b in np.array_split(triplets, steps)]

    def load(self, batch):
        """The triplets' rows (a0 p0 n0 a1 p1 n1 ...) and, without a stem bank, their images."""
        rows = batch.reshape(-1)
        return rows, (self.store.batch(rows) if self.stem_bank is None else None)

    def begin_epoch(self, w: Worker, epoch: int) -> dict[str, Any]:
        self.model.train()  # validation (and the untrained baseline) left E in eval mode
        return {}

    def step(self, w: Worker, batch, state, guard) -> dict[str, float] | None:
        cfg, amp = self.cfg, w.amp
        rows, x = batch
        if self.stem_bank is not None:  # each image its own flip (a flip keeps the style), from the bank
            mirror = (torch.rand(len(rows)) < 0.5).long() if cfg.flip else torch.zeros(len(rows), dtype=torch.long)
            stem = self.stem_bank.lookup(rows, mirror)
            with amp.autocast():
                z = self.model(stem, from_stem=True)
        else:
            x = x.to(w.device, non_blocking=True)
            if cfg.flip:
                (x,) = random_flip(x)
            with amp.autocast():
                z = self.model(x)
        z = z.float().view(len(rows) // 3, 3, -1)
        loss, logs = triplet_loss(z[:, 0], z[:, 1], z[:, 2], cfg.margin, cfg.l2_weight)
        loss = guard.inject(loss, state)
        self.optimizer.zero_grad(set_to_none=True)
        finite = guard.finite(state, "triplet loss", loss)
        guard.step_done(finite)
        if not finite:
            return None
        amp.backward(loss)
        amp.step(self.optimizer)
        amp.update()
        return logs

    def _validation(self, w: Worker) -> tuple[np.ndarray, dict[str, float]]:
        net = unwrap(self.model)
        if self.stem_bank is not None:  # the frozen stem's outputs, computed once: validation costs only the head
            z_val = encode_batches(net, self.val_stem, w.device, from_stem=True)
            z_ref = (encode_batches(net, self.stem_bank.lookup(self.ref_rows), w.device, from_stem=True)
                     if self.labelled else None)
        else:
            z_val = encode_batches(net, self.val_images, w.device)
            z_ref = encode_batches(net, self.store.batch(self.ref_rows), w.device) if self.labelled else None
        ref_labels = self.inputs.train_style_ids[self.ref_rows] if self.labelled else None
        return z_val, validation_metrics(z_val, self.inputs, self.triplets, z_ref, ref_labels, self.cfg.knn_k)

    def validate(self, w: Worker, state) -> dict[str, float]:
        self.z_val, metrics = self._validation(w)
        return {**{f"untrained_{k}": v for k, v in state["untrained"].items()}, **metrics}

    def grid(self, w: Worker, state):
        return "neighbours", neighbours_grid(self.cfg.monitor, self.val_images, self.z_val, self.inputs.val_distances)

    def end_epoch(self, w: Worker, state) -> None:
        self.sampler.set_epoch(state["epoch"])
        state["sampler"] = self.sampler.state_dict()

    def progress(self, m: dict[str, Any]) -> list[str]:
        parts = [f"loss {m.get('train_loss', float('nan')):.4f}",
                 f"active {m.get('train_active_fraction', float('nan')):.2f}",
                 f"{m['images_per_s']:.0f} img/s"]
        return parts + [f"{k} {m[k]:.3f}" for k in ("val_knn_acc", "val_triplet_acc", "val_rank_corr") if k in m]


class StemBank:
    """The frozen stem's outputs for training images (orientation 0) and their mirror images (1), computed
    the first time a row is used and kept for rows 0 .. capacity-1 (`stem_bank` sizes it from a budget).

    Filled on use rather than before the first step, so a step budget costs stem forwards for the rows it
    draws, not for the whole set (137k images: ~270k VGG forwards up front on a CPU). Rows beyond the
    capacity go through the frozen stem at every use, only in the orientation asked for."""

    def __init__(self, stem: torch.nn.Module, store, capacity: int, device):
        self.stem, self.store, self.device = stem, store, torch.device(device)
        self.size = len(store.paths)
        self.capacity = int(min(self.size, capacity))
        self.values = torch.empty(self.capacity, 2, stem.out_features, device=self.device)
        self.filled = torch.zeros(self.capacity, dtype=torch.bool)
        self.forwards = 0  # images put through the stem (mirrors counted): what the bank has cost so far

    @staticmethod
    def row_bytes(stem: torch.nn.Module) -> int:
        return 2 * stem.out_features * 4

    def shortfall(self, setting: str, budget_mb: int) -> str | None:
        """One line for the user when the bank cannot hold every row (None when it can), as
        ImageStore.shortfall says it for decoded images."""
        if self.capacity >= self.size:
            return None
        needed = -(-self.size * self.row_bytes(self.stem) // 2**20)
        return (f"the stem bank holds {self.capacity:,} of {self.size:,} training images ({setting}={budget_mb}); "
                f"the other {self.size - self.capacity:,} go through the frozen VGG at every use; "
                f"{setting}={needed} would hold them all")

    @torch.no_grad()
    def _stem(self, rows: np.ndarray, batch: int = 64) -> torch.Tensor:
        """[len(rows), 2, d]: the stem's output for each row and its mirror."""
        out = torch.empty(len(rows), 2, self.stem.out_features, device=self.device)
        for i in range(0, len(rows), batch):
            x = self.store.batch(rows[i : i + batch]).to(self.device)
            out[i : i + len(x), 0], out[i : i + len(x), 1] = self.stem(x), self.stem(x.flip(3))
            self.forwards += 2 * len(x)
        return out

    @torch.no_grad()
    def lookup(self, rows, mirror=None) -> torch.Tensor:
        """[len(rows), d]: row i's output in orientation mirror[i] (0: as read, 1: mirrored; default 0)."""
        rows = np.asarray(rows, np.int64)
        mirror = torch.zeros(len(rows), dtype=torch.long) if mirror is None else torch.as_tensor(mirror).long().cpu()
        cached = rows < self.capacity
        todo = np.unique(rows[cached])
        todo = todo[~self.filled[torch.from_numpy(todo)].numpy()] if len(todo) else todo
        if len(todo):
            self.values[torch.from_numpy(todo)] = self._stem(todo)
            self.filled[torch.from_numpy(todo)] = True
        out = torch.empty(len(rows), self.stem.out_features, device=self.device)
        where = torch.from_numpy(np.nonzero(cached)[0])
        if len(where):
            out[where] = self.values[torch.from_numpy(rows[cached]), mirror[where]]
        rest = np.nonzero(~cached)[0]
        if len(rest):
            images = self.store.batch(rows[rest]).to(self.device)
            flip = mirror[torch.from_numpy(rest)].bool().to(self.device)
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
            out[torch.from_numpy(rest)] = torch.cat([self.stem(images[i : i + 64]) for i in range(0, len(images), 64)])
            self.forwards += len(rest)
        return out


def stem_bank(encoder, store, budget_mb: int, device) -> StemBank | None:
    """A StemBank for E's frozen stem, or None when E has none (the conv encoder) or budget_mb is 0."""
    stem = encoder.frozen_stem
    if stem is None or budget_mb <= 0:
        return None
    return StemBank(stem, store, budget_mb * 2**20 // StemBank.row_bytes(stem), device)


def neighbours_grid(m, val_images: torch.Tensor, z_val: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Fixed validation anchors; per anchor a row of its nearest images by E's codes and a row by the
    exact style distance: the two rows converge as E learns."""
    anchors = np.random.default_rng(m.seed).choice(len(val_images), min(m.grid_inputs, len(val_images)), replace=False)
    return neighbour_grid(to_uint8(val_images), np.asarray(z_val), exact, anchors,
                          k=min(m.grid_references, len(val_images) - 1))
