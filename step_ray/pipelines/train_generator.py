"""`jobs/train_generator.py`: stage 2 (E frozen) then stage 3 (E and G) from a stage-1 checkpoint, or a
baseline's joint stage, then the IMLE mapper and the evaluation. Each stage is the generator recipe
(step_ray.recipes.generator) on the one engine; this module decides their order and what each starts from.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from step_ray import storage
from step_ray.config import ConfigError
from step_ray.data.pix2pix import BadImageError, DataConfig, list_split, load_pair, load_split, to_tensor
from step_ray.data.scan import PairedSplits, prepare_paired_splits
from step_ray.engine.launch import WorkersLostError, checkpoint_uri
from step_ray.engine.loop import train
from step_ray.engine.monitor import MonitorConfig, RunMonitor, sample_grid
from step_ray.engine.settings import RunSettings
from step_ray.pipelines.results import StageResult, TrainResult
from step_ray.eval.generator_eval import EvalConfig, evaluate, load_generator
from step_ray.recipes.generator import GeneratorRecipe, GeneratorTraining, fit_to_image_size, resolve_reconstruction
from step_ray.pipelines.mapper import IMLEConfig, save_mapper, train_mapper
from step_ray.style.encode import encode, encoder_config_of, load_encoder


def resolve_stage_config(cfg: GeneratorTraining, run: RunSettings, inputs: PairedSplits, stage: str
                         ) -> tuple[GeneratorTraining, str]:
    """The config one generator stage trains with, and its reconstruction line: E's settings from the
    checkpoint E comes from (so the saved config.yaml describes the networks in the checkpoint exactly),
    the "for the image size" settings resolved, the reconstruction term chosen (resolve_reconstruction).
    Everything that cannot work fails here, in the driver, not in a worker."""
    source = cfg.init_checkpoint or (cfg.encoder_checkpoint if cfg.encoder_init == "checkpoint" else "")
    if not source and not run.resume and cfg.encoder_init == "checkpoint":
        raise ValueError(f"{stage}: set encoder_checkpoint (a stage-1 checkpoint) or init_checkpoint")
    if source:
        encoder = encoder_config_of(source)
        cfg = dataclasses.replace(cfg, encoder=encoder, generator=dataclasses.replace(cfg.generator, nz=encoder.nz))
    cfg = fit_to_image_size(cfg, inputs.data.image_size)
    cfg, reconstruction = resolve_reconstruction(cfg)
    print(f"[{stage}] reconstruction: {reconstruction}", flush=True)
    cfg.resolved_load_size(inputs.data.image_size)  # a load_size below the crop fails here, not in a worker
    cfg.generator.check_image_size(inputs.data.image_size)
    if inputs.data.image_size < cfg.discriminator.min_side():
        raise ValueError(f"data.image_size={inputs.data.image_size} is below the discriminator's minimum "
                         f"{cfg.discriminator.min_side()} (lower discriminator.n_layers or num_scales)")
    return cfg, reconstruction


def train_generator_stage(cfg: GeneratorTraining, run: RunSettings, inputs: PairedSplits, stage: str,
                          callbacks: tuple = (), job: Any = None):
    """One generator stage (stage2: E frozen; stage3: E and G from a stage-2 checkpoint; joint: a baseline's
    E from scratch) on Ray Train. Returns (ray.train.Result, run folder URI, the resolved config)."""
    if stage == "stage2" and not cfg.encoder_checkpoint and not run.resume:
        raise ValueError("stage 2 needs encoder_checkpoint: a stage-1 checkpoint folder (local or s3://)")
    if stage == "stage3" and not cfg.init_checkpoint and not run.resume:
        raise ValueError("stage 3 needs a stage-2 checkpoint (init_checkpoint)")
    cfg, reconstruction = resolve_stage_config(cfg, run, inputs, stage)
    recipe = GeneratorRecipe(cfg, inputs, name=stage, reconstruction=reconstruction, job=job)
    result, run_uri = train(recipe, run, callbacks)
    return result, run_uri, cfg


# ----------------------------------------------------------------------------------------------------
# the job: stage 2, then stage 3, then (optionally) the IMLE mapper and the evaluation


@dataclass(frozen=True)
class GeneratorRunSettings(RunSettings):
    """RunSettings whose best checkpoints are ranked by the validation PSNR."""

    checkpoint_metric: str = "val_psnr"
    checkpoint_mode: Literal["max", "min"] = "max"


# train.<setting> -> what sets it in this job (each stage's recipe config is built from those)
_STAGE_DECIDES = {
    "max_epochs": "stage2_epochs / stage3_epochs (a stage's epochs are its own setting)",
    "decay_epochs": "stage3_decay_epochs",
    "init_checkpoint": "stage2_checkpoint (stage 3 starts from it)",
    "encoder_checkpoint": "encoder_checkpoint (top level: stage 2 takes E from it)",
}


@dataclass(frozen=True)
class GeneratorJobConfig:
    """`jobs/train_generator.py`: stage 2 (E frozen) then stage 3 (E and G) from a stage-1 checkpoint,
    then the mapper and the evaluation. `train` holds the settings both stages share."""

    encoder_checkpoint: str = ""  # stage-1 checkpoint folder, local or s3://
    stage2_checkpoint: str = ""  # set: skip stage 2 and start stage 3 from this stage-2 checkpoint
    data: DataConfig = field(default_factory=DataConfig)
    val_split: str = "val"
    train: GeneratorTraining = field(default_factory=GeneratorTraining)
    stage2_epochs: int = 10
    stage3_epochs: int = 10
    stage3_decay_epochs: int = 0  # stage 3's last N epochs decay the lr linearly to 0
    run: GeneratorRunSettings = field(default_factory=GeneratorRunSettings)
    train_mapper: bool = True
    mapper: IMLEConfig = field(default_factory=IMLEConfig)
    evaluate: bool = True
    # how to evaluate; what (checkpoint, mapper, data) is this job's
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        # nothing a user sets is overwritten: the settings this job decides per stage are refused, by name
        defaults = GeneratorTraining()
        for name, instead in _STAGE_DECIDES.items():
            if getattr(self.train, name) != getattr(defaults, name):
                raise ConfigError(f"train.{name} is decided per stage by train_generator; set {instead}")
        if self.train.train_encoder and self.train.encoder_init == "checkpoint":
            raise ConfigError("train.train_encoder: stage 2 freezes the pre-trained E and stage 3 trains it; "
                              "train_encoder=true is the joint stage of a baseline (train.encoder_init=scratch)")
        if self.evaluate and (self.eval.checkpoint or self.eval.mapper or self.eval.data != DataConfig()
                              or self.eval.split != "val"):
            raise ConfigError("eval.checkpoint, eval.mapper, eval.data and eval.split are this job's: it evaluates "
                              "what it trained on data / val_split (jobs/evaluate.py evaluates any checkpoint)")
        if self.stage2_epochs < 0 or self.stage3_epochs < 0 or self.stage2_epochs + self.stage3_epochs < 1:
            raise ValueError("stage2_epochs and stage3_epochs must be >= 0, and not both 0")
        if self.stage2_checkpoint and not self.stage3_epochs:
            raise ValueError("stage2_checkpoint skips stage 2, so stage3_epochs must be >= 1")


def encode_split(encoder_checkpoint: str, data: DataConfig, split: str = "train", max_images: int = 0, seed: int = 0,
                 paths: list[str] | None = None, chunk: int = 256) -> np.ndarray:
    """Style codes of a split's target images (for the mapper): a seeded random subset of `max_images`
    files (0: all), streamed `chunk` images at a time with only their B halves kept, so memory stays
    at one chunk of images plus the codes whatever the split's size. Unreadable files are skipped."""
    files = list(paths) if paths is not None else list_split(data.prepare(), split)
    if max_images and len(files) > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(len(files), max_images, replace=False))
        files = [files[i] for i in rows]
    encoder = load_encoder(encoder_checkpoint)
    codes = []
    for start in range(0, len(files), chunk):
        targets = []
        for uri in files[start : start + chunk]:
            try:
                targets.append(load_pair(uri, data.direction, data.image_size, data.min_side)[1])
            except BadImageError:
                continue
        if targets:
            codes.append(encode(np.stack(targets), encoder))
    if not codes:
        raise ValueError(f"no readable images to encode in {split}")
    return np.concatenate(codes)


def monitor_mapper(run_folder: str, checkpoint: str, mapper, info: dict, data: DataConfig, split: str,
                   m: MonitorConfig) -> None:
    """The mapper's loss curve, and the fixed-seed grid with mapper samples G(A, M(r)) next to the reference
    styles, in the final stage's TensorBoard events and as samples/mapper_samples.png."""
    monitor = RunMonitor(run_folder, "mapper")
    for entry in info["history"]:
        monitor.scalars(entry["epoch"], entry)
    val = load_split(data, split, limit=max(m.grid_inputs, m.grid_references) * 4)
    a, b = to_tensor(val.a), to_tensor(val.b)
    rng = np.random.default_rng(m.seed)
    inputs = rng.choice(len(a), min(m.grid_inputs, len(a)), replace=False)
    refs = rng.choice(len(b), min(m.grid_references, len(b)), replace=False)
    with torch.no_grad():
        samples = mapper(torch.randn(max(1, m.grid_samples), mapper.cfg.noise_dim,
                                     generator=torch.Generator().manual_seed(m.seed)))
    g, _ = load_generator(checkpoint)
    monitor.image("samples_mapper", len(info["history"]),
                  sample_grid(g, load_encoder(checkpoint), a[inputs], b[refs], samples), png_name="mapper_samples.png")
    monitor.close()


def run_train_generator(cfg: GeneratorJobConfig, callbacks: tuple = ()) -> TrainResult:
    """Stage 2 then stage 3 (or a baseline's joint stage), the mapper, the evaluation. `callbacks` go to
    every stage's TorchTrainer (a sweep forwards the epoch reports to Tune)."""
    started = time.perf_counter()
    run = cfg.run
    inputs = prepare_paired_splits(cfg.data, cfg.val_split)
    stages: list[StageResult] = []
    start = cfg.stage2_checkpoint or cfg.encoder_checkpoint
    scratch = cfg.train.encoder_init == "scratch"
    if not start and not scratch:
        raise ValueError("set encoder_checkpoint (a stage-1 checkpoint) or stage2_checkpoint")
    if cfg.stage3_epochs and not scratch and not (cfg.stage2_epochs or cfg.stage2_checkpoint):
        raise ValueError("stage 3 starts from stage 2: set stage2_epochs >= 1 or stage2_checkpoint")

    def stage(name: str, train_cfg: GeneratorTraining) -> str:
        stage_run = dataclasses.replace(run, name=f"{name}-{run.name}" if run.name else "")
        try:
            result, run_uri, _ = train_generator_stage(train_cfg, stage_run, inputs, name, callbacks, job=cfg)
        except WorkersLostError as lost:
            # this job names its stage runs <stage>-<run.name>: run.name as the user gave it (already on
            # their command line) resumes them, and without one each stage resumes its newest run
            lost.resume_settings = ("run.resume=true",)
            raise
        stages.append(StageResult(name, checkpoint_uri(result.checkpoint, stage_run), run_uri, result.metrics or {}))
        print(f"[train_generator] {name} done: {stages[-1].checkpoint}", flush=True)
        return stages[-1].checkpoint

    if scratch:  # a baseline: E from random init trains with G in one stage of stage2 + stage3 epochs
        start = stage("joint", dataclasses.replace(cfg.train, train_encoder=True,
                                                   max_epochs=cfg.stage2_epochs + cfg.stage3_epochs,
                                                   decay_epochs=cfg.stage3_decay_epochs))
    elif cfg.stage2_epochs and not cfg.stage2_checkpoint:
        start = stage("stage2", dataclasses.replace(cfg.train, max_epochs=cfg.stage2_epochs, encoder_checkpoint=start))
    if cfg.stage3_epochs and not scratch:
        start = stage("stage3", dataclasses.replace(cfg.train, max_epochs=cfg.stage3_epochs,
                                                    decay_epochs=cfg.stage3_decay_epochs, train_encoder=True,
                                                    init_checkpoint=start))
    out = TrainResult("train_generator", start, stages, train_seconds=time.perf_counter() - started,
                      details={"reconstruction": resolve_reconstruction(cfg.train)[1],
                               "bad_files": [{"path": p, "reason": r} for p, r in inputs.bad_files]})
    final_run = start.rstrip("/").rsplit("/", 1)[0]
    if cfg.train_mapper:
        codes = encode_split(start, inputs.data, "train", cfg.mapper.max_codes, cfg.mapper.seed,
                             paths=inputs.train_paths)
        mapper, info = train_mapper(codes, cfg.mapper)
        out.outputs["mapper"] = save_mapper(storage.join(final_run, "mapper"), mapper, cfg.mapper,
                                            {**info, "encoder": start})
        print(f"[train_generator] mapper: {out.outputs['mapper']}", flush=True)
        if cfg.train.monitor.enabled:
            monitor_mapper(final_run, start, mapper, info, inputs.data, cfg.val_split, cfg.train.monitor)
    if cfg.evaluate:
        ev = dataclasses.replace(cfg.eval, checkpoint=start, mapper=out.outputs.get("mapper", ""), data=inputs.data,
                                 split=cfg.val_split)
        record = evaluate(ev)
        out.outputs["eval"], out.table_row, out.eval_metrics = record["output"], record["table_row"], record["metrics"]
        print(f"[train_generator] {record['table_row']}", flush=True)
    out.seconds = time.perf_counter() - started
    out.write(storage.join(final_run, "train_generator.json"), cfg)
    print(f"[train_generator] done in {out.seconds:.0f}s; summary {out.summary}", flush=True)
    return out
