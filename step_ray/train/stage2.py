"""Stage 2 (METHOD §5): train G and D with the stage-1 encoder E frozen.

A thin setting of the one generator trainer (step_ray.train.generator): `train_encoder=False`, E from
`encoder_checkpoint` (a stage-1 checkpoint, local or s3://). The checkpoint holds G, G_ema, D, both
optimisers, the frozen E and the stage's resolved config.
"""
from __future__ import annotations

import dataclasses

from step_ray.train.generator import GeneratorInputs, GeneratorTrainConfig, train_generator_stage


def train_stage2(cfg: GeneratorTrainConfig, run, inputs: GeneratorInputs, callbacks: tuple = ()):
    """Returns (ray.train.Result, run folder URI, resolved config)."""
    if not cfg.encoder_checkpoint and not run.resume:
        raise ValueError("stage 2 needs encoder_checkpoint: a stage-1 checkpoint folder (local or s3://)")
    cfg = dataclasses.replace(cfg, train_encoder=False, init_checkpoint="")
    return train_generator_stage(cfg, run, inputs, "stage2", callbacks)
