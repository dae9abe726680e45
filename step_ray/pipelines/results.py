"""What every training pipeline returns: a `TrainResult` of its stages, what it wrote and how long it took.

The same record, with the job's config, is the summary JSON beside the run (`summary`), so a script reads
a finished run the way the pipeline's caller did."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from step_ray import storage
from step_ray.config import config_to_dict


@dataclass
class StageResult:
    """One training stage: its last checkpoint, its run folder, its last epoch's reported metrics."""

    name: str  # stage1, stage2, stage3, joint, munit, multidomain
    checkpoint: str
    run_folder: str
    metrics: dict[str, Any]


@dataclass
class TrainResult:
    job: str  # pretrain, train_generator, train_munit, train_multidomain
    checkpoint: str  # what the job hands on: pretrain's best E, else the last stage's last checkpoint
    stages: list[StageResult]
    summary: str = ""  # the summary JSON (this record + the job's config)
    outputs: dict[str, str] = field(default_factory=dict)  # files it wrote: embedding, mapper, eval, style_stats, ...
    eval_metrics: dict[str, Any] | None = None  # None: not evaluated
    table_row: str = ""  # the evaluation's row of the results table
    details: dict[str, Any] = field(default_factory=dict)  # per job: reconstruction, bad_files, domains, ...
    train_seconds: float = 0.0  # the training stages (Ray Train start-up included)
    seconds: float = 0.0  # the whole job

    def stage(self, name: str) -> StageResult:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"{self.job} ran no stage {name!r} (it ran {[s.name for s in self.stages]})")

    @property
    def last(self) -> StageResult:
        return self.stages[-1]

    @property
    def images_per_s(self) -> float | None:
        """The last stage's training throughput (the whole group's)."""
        return self.last.metrics.get("images_per_s") if self.stages else None

    @property
    def epochs(self) -> int:
        """Epochs trained over all stages."""
        return sum(int(s.metrics.get("epoch", -1)) + 1 for s in self.stages)

    def print_summary(self) -> None:
        """Where everything went, one line each: the stages' checkpoints, the files written, the summary."""
        for s in self.stages:
            print(f"[{self.job}] {s.name:<11} {s.checkpoint}", flush=True)
        for key, value in self.outputs.items():
            print(f"[{self.job}] {key:<11} {value}", flush=True)
        print(f"[{self.job}] {'summary':<11} {self.summary}", flush=True)

    def write(self, uri: str, config: Any) -> None:
        """The summary JSON at `uri` (local or s3://): this record and the job's config."""
        self.summary = uri
        storage.write_json(uri, {**dataclasses.asdict(self), "config": config_to_dict(config)})
