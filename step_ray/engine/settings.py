"""The settings every training run shares, defined once: the optimiser, where and on what a run runs,
and the epoch loop's own settings (`LoopConfig`, which every recipe's config extends)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from step_ray.engine.guard import NonFiniteConfig
from step_ray.engine.monitor import MonitorConfig


@dataclass(frozen=True)
class OptimConfig:
    """Adam; the official StEP settings by default."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.99)
    weight_decay: float = 0.0
    # torch's fused Adam: one kernel over each parameter and its two moments, instead of several passes
    # per tensor; on this project's 2-core CPU a 42 M-parameter U-Net's step took 0.3-0.6 s fused against
    # 1.1-1.8 s with the for-loop default (benchmarks/generator_step.py, BENCHMARKS.md). Same update up
    # to float rounding; False: torch's default implementation.
    fused: bool = True

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def build(self, params) -> torch.optim.Adam:
        return torch.optim.Adam(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay,
                                fused=self.fused or None)


@dataclass(frozen=True)
class RunSettings:
    """Where a run is stored and on what resources it runs (the driver's concerns)."""

    storage_path: str = "runs"  # local folder or s3://bucket/prefix
    name: str = ""  # empty: "<stage>-<UTC time>"; with resume=true: the newest run of this stage
    resume: bool = False
    num_workers: int = 1
    use_gpu: Literal["auto", "never", "always"] = "auto"
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # a lost worker restarts the group from the last checkpoint this often
    keep_checkpoints: int = 2  # the best N by `checkpoint_metric`
    checkpoint_metric: str = "val_triplet_acc"
    checkpoint_mode: Literal["max", "min"] = "max"
    autoscaling: bool = False  # the cluster grows on demand: do not check resources against what it has now
    storage_retries: int = 3  # a run stopped by a storage failure (S3 outage, full disk) resumes this often
    storage_retry_wait_s: float = 30.0
    # How long, in all, a run waits for Ray to place its workers before it fails with a one-line error
    # that names its last complete checkpoint and the command that resumes it. Ray Train itself retries
    # a worker group that cannot be placed without end: a run that lost a node of a fixed-size cluster
    # restarted its group and waited for the missing node for ever. Every start counts, the first one
    # included: raise it on a cluster that autoscales slower than this (step_ray.engine.launch).
    node_loss_wait_s: float = 300.0

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be >= 1")
        if self.storage_retries < 0 or self.storage_retry_wait_s < 0:
            raise ValueError("storage_retries and storage_retry_wait_s must be >= 0")
        if not self.node_loss_wait_s > 0:
            raise ValueError(f"node_loss_wait_s must be > 0, got {self.node_loss_wait_s}")


@dataclass(frozen=True)
class LoopConfig:
    """What the one epoch loop (step_ray.engine.loop) reads. A recipe's config extends it, so these are
    spelt the same in every job (`train.max_epochs`, `train.seed`, ...); a recipe changes a default by
    redeclaring the field, never by copying the loop."""

    batch_size: int = 8  # per worker
    max_epochs: int = 10
    max_steps: int = 0  # a step budget; 0: none
    patience: int = 0  # stop after this many epochs without a better checkpoint metric; 0: never
    flip: bool = True  # random horizontal flips (how a recipe applies them: its own step)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast (fp16: with a grad scaler); GPU workers only
    seed: int = 0
    image_cache_mb: int = 4096  # decoded training images kept in memory per worker (shared with its loader workers)
    # processes that load (decode, crop, stack) the next batches while a step computes (step_ray.data.loader);
    # 0: in the training process, before each step; -1: one per CPU Ray reserves for a training worker beyond
    # its first (run.cpus_per_worker - 1; so 0 with the default 1 CPU)
    loader_workers: int = -1
    loader_depth: int = 2  # batches each loader worker keeps ready (prefetch_factor)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # TensorBoard scalars and grids while training
    nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig)  # what a NaN/Inf loss does

    def __post_init__(self):
        for name in ("batch_size", "max_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps < 0 or self.patience < 0 or self.image_cache_mb < 0:
            raise ValueError("max_steps, patience and image_cache_mb must be >= 0")
        if self.loader_workers < -1 or self.loader_depth < 1:
            raise ValueError(f"loader_workers must be >= -1 (auto) and loader_depth >= 1, got {self.loader_workers}, "
                             f"{self.loader_depth}")
