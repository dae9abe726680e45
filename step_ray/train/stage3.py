"""Stage 3 (METHOD §5): fine-tune E and G together, starting from a stage-2 checkpoint.

A thin setting of the one generator trainer (step_ray.train.generator): `train_encoder=True`, G, G_ema,
D, E and the optimiser states from `init_checkpoint` (a stage-2 checkpoint, local or s3://); E joins
G's optimiser as a second parameter group.
"""
from __future__ import annotations

import dataclasses

from step_ray.train.generator import GeneratorInputs, GeneratorTrainConfig, train_generator_stage


def train_stage3(cfg: GeneratorTrainConfig, run, inputs: GeneratorInputs, stage2_checkpoint: str = "", callbacks: tuple = ()):
    """Returns (ray.train.Result, run folder URI, resolved config)."""
    start = stage2_checkpoint or cfg.init_checkpoint
    if not start and not run.resume:
        raise ValueError("stage 3 needs a stage-2 checkpoint (init_checkpoint)")
    cfg = dataclasses.replace(cfg, train_encoder=True, init_checkpoint=start)
    return train_generator_stage(cfg, run, inputs, "stage3", callbacks)
