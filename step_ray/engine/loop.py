"""The one epoch loop. Every method is a `Recipe`; `run_recipe` is the Ray Train worker function that
trains any of them, and `train` the driver call that launches it.

The loop owns what every method needs and none should write again: resume (Ray's checkpoint or the run
folder's newest complete one), the seeded random streams of each epoch and rank, the step budget and
patience, the NaN/Inf guard and its rollback, the epoch and interval meters, rank-0 validation and
grids, the best-metric bookkeeping, the checkpoint + report of each epoch, and the Ray metrics. A recipe
says which networks and optimisers a method has, how it starts, what one epoch's batches are, how one
step changes the networks, and how it validates:

    recipe.build(worker)                     -> {name: module}
    recipe.make_optimizers(worker, modules)  -> {name: optimizer}            (a resumed run: then loaded)
    recipe.initialise(worker, modules)       -> {name: optimizer}            (a fresh run: e.g. E from stage 1)
    recipe.prepare(worker, state)            data stores, frozen parts, validation data (after the weights)
    recipe.batches(worker, epoch, streams)   -> [(examples, batch)]          this rank's steps of one epoch,
                                                as descriptions (rows, crop windows: every random draw made)
    recipe.begin_epoch(worker, epoch)        -> metrics (e.g. the lr factor)
    recipe.load(batch)                       -> tensors: a description decoded, cropped, stacked (CPU only)
    recipe.step(worker, loaded, state, guard) -> logs, or None for a dropped update
    recipe.validate(worker, state)           -> metrics (rank 0)
    recipe.grid(worker, state)               -> (tag, uint8 image) or None (rank 0, every monitor.grid_every)
    recipe.end_epoch(worker, state)          what else the checkpointed state must hold
    recipe.progress(metrics)                 -> the parts of the epoch's progress line

No recipe loops over epochs. `load` runs ahead of the step, in `train.loader_workers` forked processes
(step_ray.data.loader; 0: in this process, just before the step), so it reads only the description and
what `prepare` built (the image stores) and draws nothing random: the numbers are the same for any number
of loader workers. Every epoch reports `data_wait_share`, the share of its step loop spent waiting for
the next batch, and `loader_workers`.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import numpy as np
import ray.train
import torch

from step_ray.checkpoints import load_checkpoint, run_record, save_checkpoint
from step_ray.config import verbose
from step_ray.data.loader import loader_cpus, prefetch, resolve_workers
from step_ray.engine.distributed import (broadcast_object, gather_objects, parameters_sha256, seed_everything,
                                         worker_device)
from step_ray.engine.guard import NonFiniteGuard, assert_finite_weights, seed_streams
from step_ray.engine.launch import fit, resume_folder
from step_ray.engine.monitor import EpochMeter, IntervalMeter, RunMonitor
from step_ray.engine.precision import MixedPrecision
from step_ray.engine.settings import LoopConfig, RunSettings
from step_ray.prometheus import record_epoch


def epoch_batches(n: int, batch_size: int, seed, rank: int, world: int) -> list:
    """This rank's batches of row indices for one epoch: a permutation of all `n` rows, seeded by `seed`
    (e.g. [run seed, epoch]), cut into `world` shares differing by at most one row, each cut into the same
    number of batches, so every rank takes the same number of steps (the gradient all-reduce needs that)
    and every row is used exactly once per epoch. Only when that would leave a rank an empty batch
    (batch_size 1 with uneven shares) are the shares made equal by leaving out the last n % world rows."""
    if n < world:
        raise ValueError(f"{n} training images for {world} workers")
    order = np.random.default_rng(seed).permutation(n)
    steps = max(1, math.ceil(math.ceil(n / world) / batch_size))
    if n // world < steps:
        order = order[: n - n % world]
        steps = max(1, math.ceil(n // world / batch_size))
    return np.array_split(np.array_split(order, world)[rank], steps)


def improves(score: float | None, best: float | None, mode: str) -> bool:
    """Is `score` a better checkpoint metric than `best` ("max" or "min" is better)?"""
    if score is None:
        return False
    return best is None or (score > best if mode == "max" else score < best)


def note_restart(state: dict[str, Any]) -> None:
    """Record, in the state the checkpoints carry, that the loop restarted here (a lost worker, a resumed
    job): where it picked up, so a run's history shows every restart."""
    state.setdefault("restarts", []).append({"epoch": state.get("epoch", 0), "step": state.get("step", 0)})


def record_ranks(state: dict[str, Any], w: Worker, node_id: str, modules: dict[str, torch.nn.Module]) -> None:
    """Every rank's Ray node and weight digest at this checkpoint, in rank order, into rank 0's state
    (`ranks`, `weights_in_sync`): where each worker ran, and that the gradient averaging kept every
    replica equal to the checkpointed one. A collective: every rank calls it at the end of each epoch."""
    ranks = gather_objects({"node_id": node_id, "weights_sha256": parameters_sha256(modules)})
    if w.rank != 0:
        return
    state["ranks"] = ranks
    state["weights_in_sync"] = len({r["weights_sha256"] for r in ranks}) == 1
    if not state["weights_in_sync"]:
        print(f"[{state['stage']}] warning: the ranks' weights differ after epoch {state['epoch']} "
              f"({', '.join(r['weights_sha256'][:12] for r in ranks)}); the checkpoint holds rank 0's", flush=True)


def report_epoch(metrics: dict[str, Any], epoch: int, rank: int, modules: dict[str, torch.nn.Module],
                 optimizers: dict[str, Any], state: dict[str, Any], record: dict[str, Any]) -> None:
    """The end of an epoch on every rank: rank 0 saves everything needed to continue and reports it as
    checkpoint_epochNNNN; the other ranks report their metrics (Ray Train needs a report from each)."""
    if rank != 0:
        ray.train.report(metrics)
        return
    assert_finite_weights(modules, f"epoch {epoch}")
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(folder, modules, optimizers, state, record)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_epoch{epoch:04d}")


@dataclass
class Worker:
    """Where a recipe runs: this worker's rank, the group's size, its device and precision, its run folder."""

    rank: int
    world: int
    device: torch.device
    amp: MixedPrecision
    run_folder: str = ""


class Recipe:
    """A method: its networks, optimisers, batches, step and validation (see the module docstring).

    A recipe object is built by the driver with its settings and inputs, pickled to every worker, and
    there given its networks; only `cfg` (a LoopConfig) and `name` are read by the loop itself."""

    cfg: LoopConfig
    name: str  # the stage: stage1, stage2, stage3, joint, munit, multidomain; names runs, metrics, lines
    job: Any = None  # the job's whole config, saved with every checkpoint (a recipe may leave it out)
    images_per_example: ClassVar[int] = 1  # stage 1's example is a triplet: three images
    example_name: ClassVar[str] = ""  # set: also report "<example_name>_per_s"

    def build(self, w: Worker) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def make_optimizers(self, w: Worker, modules: dict[str, torch.nn.Module]) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def initialise(self, w: Worker, modules: dict[str, torch.nn.Module]) -> dict[str, torch.optim.Optimizer]:
        """A fresh run's starting point; by default the networks' seeded init and new optimisers."""
        return self.make_optimizers(w, modules)

    def prepare(self, w: Worker, state: dict[str, Any]) -> None:
        """After the weights are in place (fresh or resumed): data, frozen parts, validation inputs."""

    def batches(self, w: Worker, epoch: int, streams: tuple[int, ...]) -> Iterable[tuple[int, Any]]:
        raise NotImplementedError

    def begin_epoch(self, w: Worker, epoch: int) -> dict[str, Any]:
        return {}

    def load(self, batch: Any) -> Any:
        """The CPU part of a step: one description from `batches` -> what `step` takes (decoded, cropped,
        stacked CPU tensors). Runs in a loader worker process when loader_workers > 0: it may read only the
        description and what `prepare` built for it, draws no random numbers and touches no network or
        device. By default the description itself."""
        return batch

    def step(self, w: Worker, batch: Any, state: dict[str, Any], guard: NonFiniteGuard) -> dict[str, float] | None:
        raise NotImplementedError

    def validate(self, w: Worker, state: dict[str, Any]) -> dict[str, float]:
        return {}

    def grid(self, w: Worker, state: dict[str, Any]) -> tuple[str, np.ndarray] | None:
        return None

    def end_epoch(self, w: Worker, state: dict[str, Any]) -> None:
        pass

    def progress(self, metrics: dict[str, Any]) -> list[str]:
        return [f"loss {metrics.get('train_loss', float('nan')):.4f}"]

    def record(self, run: RunSettings) -> dict[str, Any]:
        """What every checkpoint's config.yaml holds: method, run, recipe settings (+ the job's config)."""
        return run_record(self.name, self.cfg, run, self.job)


def _budget_spent(cfg: LoopConfig, state: dict[str, Any]) -> str:
    if cfg.max_steps and state["step"] >= cfg.max_steps:
        return f"step budget {cfg.max_steps} reached"
    return ""


def _patience_spent(cfg: LoopConfig, state: dict[str, Any], metric: str) -> str:
    if cfg.patience and state.get("bad_epochs", 0) >= cfg.patience:
        return f"no better {metric} for {cfg.patience} epochs"
    return ""


def loader_workers_for(cfg: LoopConfig, rank: int, stage: str) -> int:
    """`cfg.loader_workers` resolved against the CPUs Ray reserved for this worker (run.cpus_per_worker);
    rank 0 says so when the loader and the step would use more cores than that (Ray does not stop them)."""
    cpus = loader_cpus()
    workers = resolve_workers(cfg.loader_workers, cpus)
    if rank == 0 and cpus is not None and workers + 1 > cpus:
        print(f"[{stage}] note: {workers} loader workers and the step use {workers + 1} cores, Ray reserved {cpus:g} "
              f"per worker (run.cpus_per_worker={workers + 1} reserves them)", flush=True)
    return workers


def _start(recipe: Recipe, w: Worker, modules: dict, loop_config: dict[str, Any]) -> tuple[dict, dict[str, Any]]:
    """The optimisers and the loop state: fresh, or everything from our own checkpoint (a resume, or a
    restart after a lost worker)."""
    state: dict[str, Any] = {"stage": recipe.name, "epoch": 0, "step": 0, "best": None, "bad_epochs": 0,
                             "history": [], "stopped": ""}
    with resume_folder(loop_config) as folder:
        if folder is not None:
            optimizers = recipe.make_optimizers(w, modules)
            scaler = {k: v for k, v in w.amp.stateful().items() if os.path.exists(os.path.join(folder, f"{k}.pt"))}
            state = load_checkpoint(folder, modules, {**optimizers, **scaler}, map_location=w.device)
            state.setdefault("bad_epochs", 0)
            note_restart(state)
        else:
            optimizers = recipe.initialise(w, modules)
    return optimizers, state


def _steps(recipe: Recipe, w: Worker, state: dict[str, Any], guard: NonFiniteGuard, loaded, meter: EpochMeter,
           interval: IntervalMeter, monitor: RunMonitor) -> None:
    """One epoch's steps, until the batches or the step budget run out or a rollback is pending."""
    cfg: LoopConfig = recipe.cfg
    while not _budget_spent(cfg, state):
        item = next(loaded, None)  # the time blocked here is the epoch's data wait
        if item is None:
            break
        examples, batch = item
        logs = recipe.step(w, batch, state, guard)
        if guard.rollback_pending:
            break
        state["step"] += 1
        if logs is None:  # a non-finite loss: that update was dropped
            continue
        meter.add(logs, examples)
        interval.add(logs, examples)
        if cfg.monitor.scalars_every and state["step"] % cfg.monitor.scalars_every == 0:
            scalars = interval.take(w.world)
            scalars["images_per_s"] *= recipe.images_per_example
            monitor.scalars(state["step"], scalars)
            record_epoch(recipe.name, {**scalars, "step": state["step"]}, rank=w.rank)  # the dashboard, between epochs


def _validate(recipe: Recipe, w: Worker, state: dict[str, Any], metrics: dict[str, Any], loop_config: dict[str, Any],
              monitor: RunMonitor) -> None:
    """Rank 0, after an epoch: validation, the best-metric and patience bookkeeping, the epoch's console
    line, the scalars and the sample grid."""
    cfg: LoopConfig = recipe.cfg
    metric, mode, epoch = loop_config["checkpoint_metric"], loop_config["checkpoint_mode"], state["epoch"]
    metrics.update(recipe.validate(w, state))
    score = metrics.get(metric)
    if improves(score, state["best"], mode):
        state["best"], state["bad_epochs"] = score, 0
    else:
        state["bad_epochs"] += 1
    state["stopped"] = _patience_spent(cfg, state, metric)
    state["history"].append(metrics)
    print(" | ".join([f"[{recipe.name}] epoch {epoch + 1}/{cfg.max_epochs}", *recipe.progress(metrics)]), flush=True)
    monitor.scalars(state["step"], {k: v for k, v in metrics.items() if k not in ("stage", "step")})
    if cfg.monitor.enabled and cfg.monitor.grid_every and (epoch + 1) % cfg.monitor.grid_every == 0:
        picture = recipe.grid(w, state)
        if picture is not None:
            monitor.image(picture[0], state["step"], picture[1], png_name=f"{recipe.name}_epoch{epoch:04d}.png")


def run_recipe(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker function: trains `loop_config["recipe"]` epoch by epoch."""
    recipe: Recipe = loop_config["recipe"]
    cfg: LoopConfig = recipe.cfg
    if not loop_config.get("verbose"):
        # Ray Train logs each report (its whole metrics dict) at INFO through the root logger, outside the
        # `ray.train` names its LoggingConfig filters; the epoch line below says what a person needs.
        logging.getLogger().setLevel(logging.WARNING)
    ctx = ray.train.get_context()
    device = worker_device()
    w = Worker(ctx.get_world_rank(), ctx.get_world_size(), device, MixedPrecision(cfg.precision, device),
               loop_config.get("run_folder", ""))

    seed_everything(cfg.seed)  # the same initial weights on every rank (rank 0's are broadcast anyway)
    modules = recipe.build(w)
    optimizers, state = _start(recipe, w, modules, loop_config)
    # the budgets are this run's settings: a resumed run with a larger one continues
    state["stopped"] = _budget_spent(cfg, state) or _patience_spent(cfg, state, loop_config["checkpoint_metric"])
    recipe.prepare(w, state)
    optimizers = {**optimizers, **w.amp.stateful()}
    loader_workers = loader_workers_for(cfg, w.rank, recipe.name)

    node_id = ray.get_runtime_context().get_node_id()
    monitor = RunMonitor(w.run_folder, recipe.name, enabled=w.rank == 0 and cfg.monitor.enabled)
    interval = IntervalMeter()
    guard = NonFiniteGuard(cfg.nonfinite, recipe.name, w.rank)
    guard.remember(modules, optimizers, state)
    while state["epoch"] < cfg.max_epochs and not state["stopped"]:
        epoch = state["epoch"]
        streams = seed_streams(epoch, w.rank, state)
        seed_everything(cfg.seed, *streams)
        batches = recipe.batches(w, epoch, streams)
        epoch_metrics = recipe.begin_epoch(w, epoch)
        meter = EpochMeter()
        loaded = prefetch(batches, recipe.load, loader_workers, cfg.loader_depth, pin_memory=w.device.type == "cuda")
        looping = time.perf_counter()
        try:
            _steps(recipe, w, state, guard, loaded, meter, interval, monitor)
        finally:
            loaded.close()
        looped = time.perf_counter() - looping
        if guard.rollback_pending:  # back to the last checkpoint's weights, optimisers and state; replay
            state = guard.restore(modules, optimizers, state)
            continue
        seconds = meter.seconds()
        rate = meter.rate(seconds, w.world)
        metrics: dict[str, Any] = meter.means()
        metrics.update(stage=recipe.name, epoch=epoch, step=state["step"], epoch_seconds=seconds,
                       nonfinite_steps=guard.take_epoch_count(), images_per_s=recipe.images_per_example * rate,
                       data_wait_share=loaded.waited / max(looped, 1e-9), loader_workers=loaded.workers,
                       **epoch_metrics)
        if recipe.example_name:
            metrics[f"{recipe.example_name}_per_s"] = rate
        if w.rank == 0:
            _validate(recipe, w, state, metrics, loop_config, monitor)
        state["stopped"] = broadcast_object(state["stopped"]) or _budget_spent(cfg, state)
        state["epoch"] = epoch + 1
        recipe.end_epoch(w, state)
        record_ranks(state, w, node_id, modules)
        record_epoch(recipe.name, metrics, rank=w.rank)  # Ray metrics for the dashboard / Prometheus
        report_epoch(metrics, epoch, w.rank, modules, optimizers, state, loop_config["record"])
        guard.remember(modules, optimizers, state)
    monitor.close()


def train(recipe: Recipe, run: RunSettings, callbacks: tuple = ()):
    """Launch `recipe` on Ray Train (resources, storage, checkpoints, failures: step_ray.engine.launch).
    Returns (ray.train.Result, run folder URI); a failed run raises its error."""
    loop_config = {"recipe": recipe, "record": recipe.record(run), "checkpoint_metric": run.checkpoint_metric,
                   "checkpoint_mode": run.checkpoint_mode, "verbose": verbose()}
    result, run_uri = fit(run_recipe, loop_config, run, recipe.name, callbacks)
    if result.error:
        raise result.error
    return result, run_uri
