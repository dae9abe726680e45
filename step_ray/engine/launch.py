"""The driver side of a run: resources, storage, the TorchTrainer, storage-failure retries, and where a
worker resumes from. `fit` is what a pipeline calls; `resume_folder` is what the epoch loop calls."""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import time
from pathlib import Path

import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from step_ray import storage
from step_ray.checkpoints import CheckpointError, epoch_from_name, list_checkpoints, local_checkpoint_dir
from step_ray.engine.settings import RunSettings


def cluster_gpus() -> int:
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


def checkpoint_uri(checkpoint, run: RunSettings) -> str:
    """A Ray Train checkpoint's folder as a URI (Ray drops the s3:// of an S3 run's paths)."""
    path = checkpoint.path
    return f"s3://{path}" if storage.is_s3(run.storage_path) and not path.startswith("s3://") else path


def best_checkpoint(result, run: RunSettings) -> tuple[str, dict]:
    """The run's best checkpoint by its own `checkpoint_metric` and the metrics reported with it (the last
    checkpoint and the last metrics when none reported the metric)."""
    ranked = [(m.get(run.checkpoint_metric), c, m) for c, m in (result.best_checkpoints or [])
              if m.get(run.checkpoint_metric) is not None]
    if ranked:
        ranked.sort(key=lambda t: t[0], reverse=run.checkpoint_mode == "max")
        return checkpoint_uri(ranked[0][1], run), dict(ranked[0][2])
    return checkpoint_uri(result.checkpoint, run), dict(result.metrics or {})

