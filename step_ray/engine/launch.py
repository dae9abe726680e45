"""The driver side of a run: resources, storage, the TorchTrainer, storage-failure retries, the bounded
wait for workers after a lost node, and where a worker resumes from. `fit` is what a pipeline calls;
`resume_folder` is what the epoch loop calls.

A lost node reaches Ray Train as lost workers: it restarts the worker group (`run.max_failures`) and asks
for all `run.num_workers` again. On a cluster that does not replace the node, Ray 2.60's controller then
waits for them in rounds of RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s), each round a
WorkerGroupStartupTimeoutError that FailureConfig.controller_failure_limit (-1: unlimited by default)
lets it retry: for ever. `fit` limits those rounds to `run.node_loss_wait_s` in all and then raises
`WorkersLostError`, which a job prints as one `error:` line with the command that resumes the run.
(Ray 2.60's elastic ScalingConfig(num_workers=(min, max)) would continue on fewer workers: it sizes the
group from what Ray Data's autoscaling coordinator has reserved, and below min_workers it too waits
without a timeout. A smaller group would change the effective batch and every rank's share of the data
mid-run, so a run here keeps the size it was configured with.)"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import math
import os
import shlex
import time
from pathlib import Path

import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from step_ray import storage
from step_ray.checkpoints import CheckpointError, epoch_from_name, list_checkpoints, local_checkpoint_dir
from step_ray.cluster import alive_nodes, describe_nodes
from step_ray.config import verbose
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
    names = sorted(i.base_name for i in infos
                   if i.type == pafs.FileType.Directory and i.base_name.startswith(f"{stage}-"))
    return names[-1] if names else None


def run_folder(run: RunSettings, name: str) -> str:
    """The run's folder as its workers and the user are given it: an s3:// URI, or an absolute local
    path. A relative one (the default storage_path "runs") would be resolved by each worker against its
    own working directory, inside Ray's session folder, where its TensorBoard files and sample grids were
    lost. `run` itself keeps the path as the user set it (the saved config shows that)."""
    return storage.absolute(storage.join(run.storage_path, name))


# Ray Train's own setting and default (ray.train.v2._internal.constants): how long one start of the worker
# group waits for Ray to place its workers before that start fails and the controller tries again.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
RAY_START_TIMEOUT_S = 60.0


def start_rounds(run: RunSettings) -> tuple[float, int]:
    """(seconds per start of the worker group, starts allowed to time out) such that the failed starts of
    a run wait `run.node_loss_wait_s` in all. Rounds of Ray's 60 s (the placement group is asked for
    afresh each round, as Ray does), or of the user's RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S when set.
    Ray counts the rounds per controller, i.e. per trainer.fit(): a resume after a storage failure
    (`fit`) starts the count again."""
    wait = run.node_loss_wait_s
    user_round = os.environ.get(START_TIMEOUT_ENV, "").strip()
    if user_round:
        per_round = float(user_round)
        return per_round, max(1, math.ceil(wait / per_round - 1e-9))
    rounds = max(1, math.ceil(wait / RAY_START_TIMEOUT_S - 1e-9))
    return wait / rounds, rounds


@contextlib.contextmanager
def start_timeout(seconds: float):
    """RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for the controller `trainer.fit()` starts: Ray Train passes
    the driver's value of its variables to the controller when fit() launches it (only if it is set), and
    the controller's worker groups read it there. Restored afterwards; a value the user set is left alone."""
    if os.environ.get(START_TIMEOUT_ENV, "").strip():
        yield
        return
    os.environ[START_TIMEOUT_ENV] = f"{seconds:g}"
    try:
        yield
    finally:
        os.environ.pop(START_TIMEOUT_ENV, None)


class WorkersLostError(RuntimeError):
    """Ray could not place the run's workers within `run.node_loss_wait_s` (after a lost node, usually):
    the run stopped instead of waiting for ever. Carries what a user needs to continue it: the run, its
    newest complete checkpoint, and the settings that resume it (`resume_settings`, added to the job's
    own command line by step_ray.preflight.fail_fast)."""

    def __init__(self, stage: str, run: RunSettings, run_uri: str, checkpoint: str, nodes: str):
        self.stage, self.run_uri, self.checkpoint = stage, run_uri, checkpoint
        self.name = run_uri.rstrip("/").rsplit("/", 1)[-1]
        # what continues this run: its folder by name (a new timestamped one otherwise). A pipeline that
        # names its runs itself replaces these (train_generator: `<stage>-<run.name>`).
        self.resume_settings: tuple[str, ...] = ("run.resume=true", f"run.name={self.name}")
        last = (f"last complete checkpoint {checkpoint}" if checkpoint
                else "no complete checkpoint yet (it restarts at epoch 0)")
        super().__init__(f"{stage} run {self.name} stopped: Ray could not start its "
                         f"run.num_workers={run.num_workers} workers within "
                         f"run.node_loss_wait_s={run.node_loss_wait_s:g} (a node left the cluster?), which "
                         f"now has {nodes}; {last}")

    def resume_command(self, script: str, args: list[str]) -> str:
        """`python <script> <args>` with the settings that resume this run in place of any the args had."""
        replaced = {s.split("=", 1)[0] for s in self.resume_settings}
        kept = [a for a in args if a != "--resume" and a.split("=", 1)[0] not in replaced]
        return shlex.join(["python", script, *kept, *self.resume_settings])


def is_placement_timeout(exc: BaseException) -> bool:
    """Did Ray Train's controller give up starting the worker group (its retries of starts that could not
    place the workers, or that failed while starting them, spent)?"""
    # Ray's own classes; the startup errors live in Ray Train's internal module in 2.60.
    from ray.train.v2._internal.exceptions import WorkerGroupStartupFailedError, WorkerGroupStartupTimeoutError

    return isinstance(exc, ray.train.ControllerError) and isinstance(
        exc.controller_failure, (WorkerGroupStartupTimeoutError, WorkerGroupStartupFailedError))


def make_trainer(loop, loop_config: dict, run: RunSettings, stage: str, callbacks: tuple = ()):
    """A TorchTrainer with DDP workers, storage (local or S3), best-N checkpoints and fault tolerance.
    `callbacks`: Ray Train callbacks, e.g. Tune's report forwarding when the run is a Tune trial.
    Returns it and the run folder (run_folder)."""
    name = run_name(run, stage)
    folder = run_folder(run, name)
    if not storage.is_s3(run.storage_path):
        Path(run.storage_path).mkdir(parents=True, exist_ok=True)
    else:
        storage.check_writable(run.storage_path, "run.storage_path")
    fs, root = storage.resolve(run.storage_path)
    use_gpu = wants_gpu(run)
    trainer = TorchTrainer(
        loop,
        train_loop_config={**loop_config, "run_folder": folder},
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": run.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=root,
            storage_filesystem=fs,
            # the starts that may time out waiting for workers (start_rounds), less the first: Ray's
            # default, -1, retries them without end
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures,
                                                   controller_failure_limit=start_rounds(run)[1] - 1),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=run.keep_checkpoints,
                checkpoint_score_attribute=run.checkpoint_metric,
                checkpoint_score_order=run.checkpoint_mode,
            ),
            callbacks=list(callbacks) or None,
            # Ray Train's INFO records (a report's whole metrics dict, each checkpoint's path) only with
            # --verbose; the print patch off, or each worker line reached the console twice (the print
            # itself and its copy through Ray Train's logger)
            logging_config=ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING"),
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
        ),
    )
    return trainer, folder


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
    folder URI). Raises WorkersLostError when Ray could not place the workers within
    run.node_loss_wait_s (start_rounds)."""
    trainer, run_uri = make_trainer(loop, loop_config, run, stage, callbacks)
    name = run_uri.rstrip("/").rsplit("/", 1)[-1]
    per_round, _ = start_rounds(run)
    for attempt in range(run.storage_retries + 1):
        try:
            with start_timeout(per_round):
                return trainer.fit(), run_uri
        except Exception as exc:
            if is_placement_timeout(exc):
                raise WorkersLostError(stage, run, run_uri, latest_complete_checkpoint(run_uri),
                                       describe_nodes(alive_nodes())) from exc
            if attempt == run.storage_retries or not is_storage_failure(exc):
                raise
            first = next((line for line in str(exc).splitlines() if any(m in line for m in _STORAGE_FAILURES)),
                         str(exc))
            print(f"[{stage}] storage failure: {first.strip()[:300]}; resuming {name} from its last complete "
                  f"checkpoint in {run.storage_retry_wait_s:g}s (retry {attempt + 1}/{run.storage_retries})",
                  flush=True)
            time.sleep(run.storage_retry_wait_s)
            trainer, _ = make_trainer(loop, loop_config, dataclasses.replace(run, name=name, resume=True), stage,
                                      callbacks)
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

