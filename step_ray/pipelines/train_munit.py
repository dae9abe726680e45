"""`jobs/train_munit.py`: the MUNIT recipe (step_ray.recipes.munit) on a pix2pix-layout set used
unpaired, then its evaluation (step_ray.eval.munit_eval)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from step_ray import storage
from step_ray.data.pix2pix import DataConfig
from step_ray.data.scan import prepare_paired_splits
from step_ray.engine.launch import checkpoint_uri
from step_ray.engine.loop import train
from step_ray.eval.metrics import LPIPSConfig
from step_ray.eval.munit_eval import evaluate_munit, load_munit
from step_ray.pipelines.results import StageResult, TrainResult
from step_ray.pipelines.train_generator import GeneratorRunSettings
from step_ray.recipes.munit import MUNITRecipe, MUNITTraining


@dataclass(frozen=True)
class MUNITJobConfig:
    """`jobs/train_munit.py`: MUNIT on a pix2pix-layout set used unpaired, then its evaluation."""

    data: DataConfig = field(default_factory=DataConfig)
    val_split: str = "val"
    train: MUNITTraining = field(default_factory=MUNITTraining)
    run: GeneratorRunSettings = field(default_factory=GeneratorRunSettings)  # best checkpoints by val_psnr
    evaluate: bool = True
    eval_inputs: int = 100
    eval_styles: int = 16

    def __post_init__(self):
        self.train.model.check_image_size(self.data.image_size)


def run_train_munit(cfg: MUNITJobConfig, callbacks: tuple = ()) -> TrainResult:
    """Train, then evaluate the last checkpoint."""
    started = time.perf_counter()
    inputs = prepare_paired_splits(cfg.data, cfg.val_split)
    if inputs.data.image_size < cfg.train.discriminator.min_side():
        raise ValueError(f"data.image_size={inputs.data.image_size} is below the discriminator's minimum "
                         f"{cfg.train.discriminator.min_side()} (lower train.discriminator.n_layers or num_scales)")
    result, run_uri = train(MUNITRecipe(cfg.train, inputs, job=cfg), cfg.run, callbacks)
    checkpoint = checkpoint_uri(result.checkpoint, cfg.run)
    out = TrainResult("train_munit", checkpoint, [StageResult("munit", checkpoint, run_uri, result.metrics or {})],
                      train_seconds=time.perf_counter() - started)
    print(f"[train_munit] done training: {checkpoint}", flush=True)
    if cfg.evaluate:
        nets = load_munit(checkpoint)
        record = evaluate_munit(nets["gen_a"], nets["gen_b"], inputs.data, cfg.val_split,
                                storage.join(checkpoint, "eval"), LPIPSConfig(), num_inputs=cfg.eval_inputs,
                                num_styles=cfg.eval_styles)
        out.outputs["eval"], out.eval_metrics = record["output"], record["metrics"]
    out.seconds = time.perf_counter() - started
    out.write(storage.join(run_uri, "train_munit.json"), cfg)
    return out
