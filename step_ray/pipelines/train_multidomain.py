"""`jobs/train_multidomain.py`: the multi-domain recipe (step_ray.recipes.multidomain) on N >= 2 domains,
then its evaluation (step_ray.eval.multidomain_eval)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

from step_ray import storage
from step_ray.data.domains import DomainDataConfig, list_domain_split
from step_ray.engine.launch import checkpoint_uri
from step_ray.engine.loop import train
from step_ray.eval.fid import FIDConfig
from step_ray.engine.settings import RunSettings
from step_ray.pipelines.results import StageResult, TrainResult
from step_ray.eval.multidomain_eval import evaluate_multidomain, load_multidomain
from step_ray.recipes.multidomain import MultiDomainRecipe, MultiDomainTraining


@dataclass(frozen=True)
class MultiDomainRunSettings(RunSettings):
    checkpoint_metric: str = "val_style_gap"  # latent styles as close to reference styles as those are to each other
    checkpoint_mode: Literal["max", "min"] = "min"


@dataclass(frozen=True)
class MultiDomainJobConfig:
    """`jobs/train_multidomain.py`: train on N >= 2 domains, then evaluate (grids, diversity, unification,
    smoothness)."""

    data: DomainDataConfig = field(default_factory=DomainDataConfig)
    val_split: str = "val"
    train: MultiDomainTraining = field(default_factory=MultiDomainTraining)
    run: MultiDomainRunSettings = field(default_factory=MultiDomainRunSettings)
    evaluate: bool = True
    eval_inputs: int = 32  # held-out inputs per target domain (from the other domains)
    eval_styles: int = 8  # styles per input: flow samples, or references of the target domain
    fid: FIDConfig = field(default_factory=FIDConfig)

    def __post_init__(self):
        self.train.model.check_image_size(self.data.image_size)


def run_train_multidomain(cfg: MultiDomainJobConfig, callbacks: tuple = ()) -> TrainResult:
    """Train on the domains of `data`, then evaluate the last checkpoint."""
    started = time.perf_counter()
    train_images, val_images = list_domain_split(cfg.data, "train"), list_domain_split(cfg.data, cfg.val_split)
    if train_images.names != val_images.names:
        raise ValueError(f"train domains {train_images.names} differ from {cfg.val_split} domains {val_images.names}")
    if len(train_images.names) != cfg.train.model.num_domains:
        raise ValueError(f"the data has {len(train_images.names)} domains {train_images.names}; "
                         f"set train.model.num_domains={len(train_images.names)}")
    recipe = MultiDomainRecipe(cfg.train, cfg.data, train_images, val_images, job=cfg)
    result, run_uri = train(recipe, cfg.run, callbacks)
    checkpoint = checkpoint_uri(result.checkpoint, cfg.run)
    out = TrainResult("train_multidomain", checkpoint,
                      [StageResult("multidomain", checkpoint, run_uri, result.metrics or {})],
                      details={"domains": train_images.names}, train_seconds=time.perf_counter() - started)
    if cfg.evaluate:
        record = evaluate_multidomain(load_multidomain(checkpoint), cfg.data, cfg.val_split,
                                      storage.join(checkpoint, "eval"), num_inputs=cfg.eval_inputs,
                                      num_styles=cfg.eval_styles, seed=cfg.train.seed, fid_cfg=cfg.fid)
        out.outputs["eval"], out.eval_metrics = record["output"], record["metrics"]
    out.seconds = time.perf_counter() - started
    out.write(storage.join(run_uri, "train_multidomain.json"), cfg)
    return out
