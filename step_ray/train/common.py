"""What every Ray Train stage shares: run settings, optimiser config, device, seeding, checkpoints.

The driver side (`make_trainer`) picks resources and storage; the per-worker side (`worker_device`,
`seed_everything`, `report_epoch`) is called from inside the training loop. The checkpoint format itself
(save, load, manifest) lives in `step_ray.checkpoints`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import itertools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from step_ray import storage
from step_ray.checkpoints import local_checkpoint_dir, save_checkpoint


@dataclass(frozen=True)
class OptimConfig:
    """Adam; the official StEP settings by default."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.0, 0.99)
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def build(self, params) -> torch.optim.Adam:
        return torch.optim.Adam(params, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)


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

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.keep_checkpoints < 1:
            raise ValueError("keep_checkpoints must be >= 1")
        if self.storage_retries < 0 or self.storage_retry_wait_s < 0:
            raise ValueError("storage_retries and storage_retry_wait_s must be >= 0")


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else torch.cuda.device_count()


def wants_gpu(run: RunSettings) -> bool:
    """GPU workers when the cluster has GPUs (auto), never, or always (fails fast if there are none)."""
    if run.use_gpu == "never":
        return False
    gpus = cluster_gpus()
    if run.use_gpu == "always" and gpus < run.num_workers:
        raise RuntimeError(f"run.use_gpu=always needs {run.num_workers} GPUs; the Ray cluster has {gpus}")
    return gpus >= run.num_workers if run.use_gpu == "auto" else True


def run_name(run: RunSettings, stage: str) -> str:
    """The run folder's name: given, the newest existing one (resume), or a new timestamped one."""
    if run.name:
        return run.name
    if run.resume:
        latest = latest_run(run.storage_path, stage)
        if latest is None:
            raise FileNotFoundError(f"--resume: no earlier {stage} run under {run.storage_path}")
        return latest
    return f"{stage}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}"


def latest_run(storage_path: str, stage: str) -> str | None:
    import pyarrow.fs as pafs

    fs, root = storage.resolve(storage_path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    except OSError:
        return None
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith(f"{stage}-"))
    return names[-1] if names else None


def make_trainer(loop, loop_config: dict, run: RunSettings, stage: str, callbacks: tuple = ()):
    """A TorchTrainer with DDP workers, storage (local or S3), best-N checkpoints and fault tolerance.
    `callbacks`: Ray Train callbacks, e.g. Tune's report forwarding when the run is a Tune trial."""
    import ray.train
    from ray.train.torch import TorchTrainer

    name = run_name(run, stage)
    if not storage.is_s3(run.storage_path):
        Path(run.storage_path).mkdir(parents=True, exist_ok=True)
    else:
        storage.check_writable(run.storage_path, "run.storage_path")
    fs, root = storage.resolve(run.storage_path)
    use_gpu = wants_gpu(run)
    trainer = TorchTrainer(
        loop,
        train_loop_config={**loop_config, "run_folder": storage.join(run.storage_path, name)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": run.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=run.keep_checkpoints,
                checkpoint_score_attribute=run.checkpoint_metric,
                checkpoint_score_order=run.checkpoint_mode,
            ),
            callbacks=list(callbacks) or None,
        ),
    )
    return trainer, storage.join(run.storage_path, name)


_STORAGE_FAILURES = ("AWS Error", "curlCode", "Could not connect", "Connection refused", "No space left on device",
                     "Disk quota exceeded", "Read-only file system")


def is_storage_failure(exc: BaseException) -> bool:
    """Did the run stop because storage failed (S3 unreachable, a full disk) rather than the training?
    Ray Train retries lost workers itself, but a failed write of its own run state ends the whole run."""
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in _STORAGE_FAILURES)


def fit(loop, loop_config: dict, run: RunSettings, stage: str, callbacks: tuple = ()):
    """make_trainer + fit, resuming the same run after a storage failure, up to run.storage_retries times
    (the workers continue from the newest complete checkpoint: `resume_folder`). Returns (result, run
    folder URI)."""
    import dataclasses

    trainer, run_uri = make_trainer(loop, loop_config, run, stage, callbacks)
    name = run_uri.rstrip("/").rsplit("/", 1)[-1]
    for attempt in range(run.storage_retries + 1):
        try:
            return trainer.fit(), run_uri
        except Exception as exc:
            if attempt == run.storage_retries or not is_storage_failure(exc):
                raise
            first = next((line for line in str(exc).splitlines() if any(m in line for m in _STORAGE_FAILURES)), str(exc))
            print(f"[{stage}] storage failure: {first.strip()[:300]}; resuming {name} from its last complete checkpoint "
                  f"in {run.storage_retry_wait_s:g}s (retry {attempt + 1}/{run.storage_retries})", flush=True)
            time.sleep(run.storage_retry_wait_s)
            trainer, _ = make_trainer(loop, loop_config, dataclasses.replace(run, name=name, resume=True), stage, callbacks)
    raise AssertionError("unreachable")


def latest_complete_checkpoint(run_uri: str) -> str:
    """The newest checkpoint folder of a run whose files match its manifest ("" when none or unreadable)."""
    from step_ray.checkpoints import CheckpointError, list_checkpoints

    try:
        found = list_checkpoints(run_uri)
    except (CheckpointError, OSError):
        return ""
    return found[-1].uri if found else ""


@contextlib.contextmanager
def resume_folder(loop_config: dict):
    """The checkpoint folder a worker loop continues from, or None for a fresh start: Ray Train's latest
    registered checkpoint, or the run folder's newest complete one (manifest checked) when that is newer.
    It is newer when a worker, the job or storage failed after a checkpoint was uploaded but before Ray
    recorded it (Ray registers reports asynchronously): that checkpoint's work is kept, not recomputed."""
    import ray.train

    from step_ray.checkpoints import epoch_from_name

    def epoch_of(uri: str) -> int:
        epoch = epoch_from_name(str(uri).rstrip("/"))
        return -1 if epoch is None else epoch

    checkpoint = ray.train.get_checkpoint()
    fallback = latest_complete_checkpoint(loop_config["run_folder"]) if loop_config.get("run_folder") else ""
    if fallback and epoch_of(fallback) > (epoch_of(checkpoint.path) if checkpoint is not None else -1):
        folder, tmp = local_checkpoint_dir(fallback)
        try:
            yield folder
        finally:
            if tmp is not None:
                tmp.cleanup()
    elif checkpoint is not None:
        with checkpoint.as_directory() as folder:
            yield folder
    else:
        yield None


# ----------------------------------------------------------------------------------------------------
# per-worker helpers


def worker_device() -> torch.device:
    import ray.train.torch

    return ray.train.torch.get_device()


def seed_everything(seed: int, *streams: int) -> None:
    """Seed torch from (seed, *streams): each epoch and rank gets its own reproducible stream, so a
    resumed run draws exactly the numbers an uninterrupted one would."""
    import numpy as np

    s = int(np.random.SeedSequence([seed, *streams]).generate_state(1)[0])
    torch.manual_seed(s)


class EpochMeter:
    """One epoch of one worker: batch means of the logged losses, and the group's examples per second.

    Every rank takes the same number of steps, so the group's rate is world size × this worker's.
    """

    def __init__(self):
        self.started = time.perf_counter()
        self.sums: dict[str, float] = {}
        self.batches = 0
        self.examples = 0

    def add(self, logs: dict[str, float], examples: int) -> None:
        self.batches += 1
        self.examples += examples
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def means(self) -> dict[str, float]:
        return {f"train_{k}": v / max(1, self.batches) for k, v in self.sums.items()}

    def rate(self, seconds: float, world: int) -> float:
        return self.examples * world / max(seconds, 1e-9)


def epoch_batches(n: int, batch_size: int, seed, rank: int, world: int) -> list:
    """This rank's batches of row indices for one epoch: a permutation of all `n` rows, seeded by `seed`
    (e.g. [run seed, epoch]), cut into `world` shares differing by at most one row, each cut into the same
    number of batches, so every rank takes the same number of steps (the gradient all-reduce needs that)
    and every row is used exactly once per epoch. Only when that would leave a rank an empty batch
    (batch_size 1 with uneven shares) are the shares made equal by leaving out the last n % world rows."""
    import math

    import numpy as np

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


class MixedPrecision:
    """`precision` = fp32 | bf16 | fp16 for one training loop: autocast around forwards and, for fp16, a
    gradient scaler around backward and the optimiser steps. GPU only: on a CPU worker it is plain fp32
    (CPU autocast would change the numbers without saving memory worth having)."""

    def __init__(self, precision: str, device: torch.device):
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.device_type = torch.device(device).type
        self.enabled = precision != "fp32" and self.device_type == "cuda"
        self.dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda") if self.enabled and precision == "fp16" else None
        self.name = precision if self.enabled else "fp32"

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """After the gradients are averaged over ranks: an inf on any rank is then on every rank, so all
        ranks skip the same steps and keep the same scale."""
        if self.scaler is not None:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update(self) -> None:
        if self.scaler is not None:
            self.scaler.update()

    def stateful(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume exactly (the fp16 loss scale)."""
        return {"grad_scaler": self.scaler} if self.scaler is not None else {}


def checkpoint_activations(module: torch.nn.Module, is_block) -> torch.nn.Module:
    """Recompute the activations inside every submodule `is_block(m)` accepts during backward instead of
    storing them (torch's checkpoint wrapper, non-reentrant). Applied from outside: the model files stay
    plain. State dicts keep their keys, so checkpoints load with or without it."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (CheckpointImpl, apply_activation_checkpointing,
                                                                               checkpoint_wrapper)

    apply_activation_checkpointing(
        module, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=is_block)
    return module


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_parameters(*modules: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers to every rank (what DDP does when it wraps a model)."""
    if _world() == 1:
        return
    import torch.distributed as dist

    for module in modules:
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(tensor.data, 0)


def average_gradients(*modules: torch.nn.Module) -> None:
    """Mean of the gradients over ranks, in one flat all-reduce (StyleGAN2-ADA's way). Unlike DDP's
    hooks it allows any number of passes through a module before one backward (the GAN baselines'
    cycle and latent terms do that). A parameter without a gradient counts as zero on that rank."""
    world = _world()
    if world == 1:
        return
    import torch.distributed as dist

    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone() if p.grad is None else p.grad.copy_(g.view_as(p))


def note_restart(state: dict[str, Any]) -> None:
    """Record, in the state the checkpoints carry, that the loop restarted here (a lost worker, a resumed
    job): where it picked up, so a run's history shows every restart."""
    state.setdefault("restarts", []).append({"epoch": state.get("epoch", 0), "step": state.get("step", 0)})


def report_epoch(metrics: dict[str, Any], epoch: int, rank: int, modules: dict[str, torch.nn.Module],
                 optimizers: dict[str, Any], state: dict[str, Any], cfg: Any) -> None:
    """The end of an epoch on every rank: rank 0 saves everything needed to continue and reports it as
    checkpoint_epochNNNN; the other ranks report their metrics (Ray Train needs a report from each)."""
    import ray.train

    from step_ray.train.guard import assert_finite_weights

    if rank != 0:
        ray.train.report(metrics)
        return
    assert_finite_weights(modules, f"epoch {epoch}")
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(folder, modules, optimizers, state, cfg)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_dir_name=f"checkpoint_epoch{epoch:04d}")


def write_json(uri: str, obj: Any) -> None:
    storage.write_bytes(uri, json.dumps(obj, indent=1, default=float).encode())
