"""Find, rank and download checkpoints of step_ray runs, on a local disk or S3.

    python -m step_ray.checkpoints list s3://bucket/step_ray                 # runs, their checkpoints, metrics
    python -m step_ray.checkpoints best s3://bucket/step_ray --metric val_triplet_acc --mode max
    python -m step_ray.checkpoints pull s3://bucket/step_ray/stage1-.../checkpoint_epoch0004 ./ckpt
    python -m step_ray.checkpoints pull s3://bucket/step_ray ./ckpt --metric val_knn_acc   # the best one

A URI is a storage path (`run.storage_path`: it holds run folders `<stage>-<time>/`), one run folder (it
holds `checkpoint_*/` folders), or one checkpoint folder (it holds `state.json`). A checkpoint's metrics
are the last entry of its `state.json` history (the epoch it was saved at). `--json` prints
machine-readable output.

Credentials come from the standard AWS chain (environment, shared files, instance profile) through
pyarrow; `AWS_ENDPOINT_URL` names an S3-compatible endpoint. Nothing printed or written here contains
them: every line leaving this module passes through `redact`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import pyarrow.fs as pafs

if TYPE_CHECKING:  # annotations only: torch is imported by the functions that need it
    import torch

import yaml

from step_ray import storage
from step_ray.config import config_from_dict, config_to_dict, config_to_yaml

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
RUN_METRICS_FILE = "metrics.json"
DEFAULT_METRIC, DEFAULT_MODE = "val_triplet_acc", "max"
_FALLBACK_METRICS = ("val_triplet_acc", "val_psnr")  # stage 1's and the generator stages' defaults (max)
_SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")


class CheckpointError(RuntimeError):
    """No such run or checkpoint, or nothing to rank by the requested metric."""


@dataclass
class CheckpointInfo:
    uri: str
    run: str
    name: str
    epoch: int | None
    metrics: dict[str, Any] = field(default_factory=dict)
    checkpoint_metric: str | None = None  # what the run ranked its checkpoints by (config.yaml)
    checkpoint_mode: str | None = None


@dataclass
class RunInfo:
    uri: str
    name: str
    checkpoints: list[CheckpointInfo]
    best_checkpoint: str | None = None  # as recorded in the run's metrics.json, when there is one


def redact(text: str) -> str:
    """`text` with any credential value from the environment replaced by `***`."""
    for var in _SECRET_VARS:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    # a secret-looking `key=value` pair that came from somewhere else (an error message, a URL)
    return re.sub(r"(?i)(secret[_-]?access[_-]?key|session[_-]?token|x-amz-security-token)([=:]\s*)[^\s&,'\"]+",
                  r"\1\2***", text)


def _uri(fs_path: str, like: str) -> str:
    return f"s3://{fs_path}" if storage.is_s3(like) else fs_path


def _children(uri: str) -> list[pafs.FileInfo]:
    fs, path = storage.resolve(uri)
    try:
        return fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    except OSError as exc:
        raise CheckpointError(f"{uri}: cannot be listed: {storage._short(exc)}") from exc


def _read_json(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except (OSError, FileNotFoundError, ValueError):
        return None


def epoch_from_name(name: str) -> int | None:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else None


def _ranking_of(checkpoint_uri: str) -> tuple[str | None, str | None]:
    """The run's own checkpoint_metric / checkpoint_mode, from the checkpoint's config.yaml."""
    try:
        cfg = yaml.safe_load(storage.read_bytes(storage.join(checkpoint_uri, CONFIG_FILE))) or {}
    except Exception:
        return None, None
    run = cfg.get("run") if isinstance(cfg, dict) else None
    if not isinstance(run, dict):
        return None, None
    return run.get("checkpoint_metric"), run.get("checkpoint_mode")


def manifest_mismatch(files: dict[str, dict], sizes: dict[str, int]) -> str | None:
    """The first file listed in a manifest (`files`: name -> {bytes, sha256}) that `sizes` (name -> bytes
    found in the folder) lacks or has at another size, described; None when all of them match."""
    for name, entry in files.items():
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != entry.get("bytes"):
            return f"{name} has {sizes[name]} bytes, the manifest says {entry.get('bytes')}"
    return None


def check_complete(uri: str) -> None:
    """Raise CheckpointError unless the folder holds manifest.json and every file it lists, at its size.
    Ray uploads a checkpoint file by file, so a folder seen during (or after a failed) upload may lack some;
    such a folder is never listed, ranked or pulled. (`load_checkpoint` also checks the sha256s.)"""
    manifest = _read_json(storage.join(uri, MANIFEST_FILE))
    if manifest is None or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{uri} is incomplete: no readable {MANIFEST_FILE}")
    sizes = {i.base_name: i.size for i in _children(uri) if i.type == pafs.FileType.File}
    problem = manifest_mismatch(manifest["files"], sizes)
    if problem:
        raise CheckpointError(f"{uri} is incomplete: {problem}")


def read_checkpoint(uri: str, run: str = "") -> CheckpointInfo:
    """One complete checkpoint folder's epoch and metrics (the last entry of its state.json history)."""
    uri = uri.rstrip("/")
    name = uri.rsplit("/", 1)[-1]
    check_complete(uri)
    state = _read_json(storage.join(uri, STATE_FILE))
    if state is None:
        raise CheckpointError(f"{uri} is not a checkpoint: no readable {STATE_FILE}")
    history = state.get("history") or []
    metrics = {k: v for k, v in (history[-1] if history else {}).items() if isinstance(v, (int, float, str))}
    epoch = metrics.get("epoch", epoch_from_name(name))
    metric, mode = _ranking_of(uri)
    return CheckpointInfo(uri=uri, run=run or uri.rsplit("/", 2)[-2], name=name,
                          epoch=int(epoch) if isinstance(epoch, (int, float)) else None, metrics=metrics,
                          checkpoint_metric=metric, checkpoint_mode=mode)


def _is_checkpoint_dir(info: pafs.FileInfo) -> bool:
    return info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint")


def list_checkpoints(run_uri: str) -> list[CheckpointInfo]:
    """The checkpoints of one run folder, by epoch."""
    run_uri = run_uri.rstrip("/")
    run = run_uri.rsplit("/", 1)[-1]
    out = []
    for info in _children(run_uri):
        if _is_checkpoint_dir(info):
            try:
                out.append(read_checkpoint(_uri(info.path, run_uri), run))
            except CheckpointError:
                continue  # a checkpoint being written, or an unrelated folder
    return sorted(out, key=lambda c: (c.epoch if c.epoch is not None else -1, c.name))


def list_runs(uri: str) -> list[RunInfo]:
    """Every run under a storage path (or the one run `uri` names), with its checkpoints."""
    uri = uri.rstrip("/")
    if storage.is_s3(uri):
        storage.check_readable(uri, "runs")
    elif not Path(uri).expanduser().exists():
        raise CheckpointError(f"{uri} does not exist")
    children = _children(uri)
    if any(_is_checkpoint_dir(i) for i in children):
        candidates = [uri]
    else:
        candidates = [_uri(i.path, uri) for i in children if i.type == pafs.FileType.Directory]
    runs = []
    for run_uri in sorted(candidates):
        checkpoints = list_checkpoints(run_uri)
        if not checkpoints:
            continue
        summary = _read_json(storage.join(run_uri, RUN_METRICS_FILE)) or {}
        best = summary.get("best_checkpoint")
        runs.append(RunInfo(uri=run_uri, name=run_uri.rsplit("/", 1)[-1], checkpoints=checkpoints,
                            best_checkpoint=best if isinstance(best, str) else None))
    return runs


def _score(c: CheckpointInfo, metric: str) -> float | None:
    v = c.metrics.get(metric)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def rank(checkpoints: Sequence[CheckpointInfo], metric: str | None = None,
         mode: str | None = None) -> list[CheckpointInfo]:
    """Checkpoints that have `metric`, best first. Without `metric`: what the first checkpoint's run
    ranked by (its config.yaml's run.checkpoint_metric / checkpoint_mode), else val_triplet_acc or
    val_psnr (whichever is reported), max."""
    if not checkpoints:
        return []
    first = checkpoints[0]
    if not metric and not first.checkpoint_metric:  # e.g. generator runs: their config has no `run`
        metric = next((m for m in _FALLBACK_METRICS if any(m in c.metrics for c in checkpoints)), DEFAULT_METRIC)
    metric = metric or first.checkpoint_metric or DEFAULT_METRIC
    mode = mode or (first.checkpoint_mode if metric == first.checkpoint_metric else None) or DEFAULT_MODE
    if mode not in ("max", "min"):
        raise CheckpointError(f"--mode must be max or min, got {mode!r}")
    scored = [(s, c) for c in checkpoints if (s := _score(c, metric)) is not None]
    scored.sort(key=lambda t: (t[0], t[1].epoch or 0), reverse=mode == "max")
    return [c for _, c in scored]


def is_checkpoint(uri: str) -> bool:
    return storage.exists(storage.join(uri.rstrip("/"), STATE_FILE))


def best_checkpoint(uri: str, metric: str | None = None, mode: str | None = None) -> CheckpointInfo:
    """The best checkpoint under `uri` (a storage path or run) by `metric`; a checkpoint URI is itself."""
    if is_checkpoint(uri):
        return read_checkpoint(uri)
    checkpoints = [c for run in list_runs(uri) for c in run.checkpoints]
    ranked = rank(checkpoints, metric, mode)
    if not ranked:
        what = metric or (checkpoints[0].checkpoint_metric if checkpoints else None) or DEFAULT_METRIC
        raise CheckpointError(f"no checkpoint under {uri} reports the metric '{what}'"
                              + ("" if checkpoints else " (no checkpoints found)"))
    return ranked[0]


def pull(uri: str, dest: str | os.PathLike, metric: str | None = None, mode: str | None = None,
         overwrite: bool = False) -> tuple[CheckpointInfo, str]:
    """Download one checkpoint folder to `dest` (a local folder, or another storage URI).

    `uri` a checkpoint folder: that one; a run or storage path: the best by `metric`. A local `dest`
    appears whole (copied beside it, then renamed) and must not already hold files unless `overwrite`.
    """
    info = best_checkpoint(uri, metric, mode)
    src_fs, src_path = storage.resolve(info.uri)
    dest = str(dest)
    if storage.is_s3(dest):
        dst_fs, dst_path = storage.resolve(dest)
        pafs.copy_files(src_path, dst_path, source_filesystem=src_fs, destination_filesystem=dst_fs)
        return info, dest.rstrip("/")
    target = Path(dest).expanduser().resolve()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise CheckpointError(f"{target} already holds files (use --overwrite)")
    partial = target.with_name(f".{target.name}.partial{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        pafs.copy_files(src_path, str(partial), source_filesystem=src_fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            verify_checkpoint(partial)
        except IncompleteCheckpointError as exc:
            raise CheckpointError(f"{info.uri}: the copy does not match its manifest: {exc}") from None
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return info, str(target)


# ----------------------------------------------------------------------------------------------------
# command line

# ----------------------------------------------------------------------------------------------------
# The checkpoint format, written and read by every training loop: `<name>.pt` per module and optimiser
# (tensors only, loaded with weights_only=True: a checkpoint from an untrusted bucket cannot run code),
# state.json, config.yaml and manifest.json, written last. torch is imported by the functions that need it.


def unwrap(model: "torch.nn.Module") -> "torch.nn.Module":
    """The plain module inside a DDP wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model


def run_record(method: str, recipe: Any, run: Any, job: Any = None) -> dict[str, Any]:
    """What config.yaml holds, one shape for every method: `method` (stage1, stage2, stage3, joint, munit,
    multidomain, mapper), `run` (where and how it ran, how its checkpoints are ranked), `recipe` (the
    method's settings, the loop's included) and, when it came from a job, that job's whole config."""
    record = {"method": method, "run": config_to_dict(run) if run is not None else {}, "recipe": config_to_dict(recipe)}
    if job is not None:
        record["job"] = config_to_dict(job)
    return record


def read_record(checkpoint: str) -> dict[str, Any]:
    """A checkpoint folder's config.yaml (local or s3://) as a mapping (see `run_record`)."""
    record = yaml.safe_load(storage.read_bytes(storage.join(checkpoint, CONFIG_FILE))) or {}
    if not isinstance(record, dict):
        raise CheckpointError(f"{redact(checkpoint)}: config.yaml is not a mapping (not a step_ray checkpoint)")
    return record if "recipe" in record else legacy_record(record)


def legacy_record(saved: dict[str, Any]) -> dict[str, Any]:
    """A config.yaml written before the one schema (2026-12-01) read as one: stage 1 saved its whole job
    config (the recipe's settings under `train`, with `run`), every other loop only its own settings."""
    if isinstance(saved.get("train"), dict) and isinstance(saved.get("run"), dict):
        return {"method": "legacy", "run": saved["run"], "recipe": saved["train"], "job": saved}
    return {"method": "legacy", "run": {}, "recipe": saved}


def recipe_section(record: dict[str, Any], key: str, cls: type, where: str = ""):
    """One typed part of a checkpoint's recipe settings, e.g. ("encoder", EncoderConfig)."""
    return config_from_dict(cls, record["recipe"].get(key) or {}, where=where or key)


def save_checkpoint(folder: str | Path, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], state: dict[str, Any],
                    record: dict[str, Any]) -> None:
    """Write one checkpoint folder: `<name>.pt` per module and optimiser, state.json, config.yaml (`record`:
    see `run_record`)."""
    import torch  # deferred: the checkpoint CLI lists and pulls without loading torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        torch.save(unwrap(module).state_dict(), folder / f"{name}.pt")
    for name, opt in optimizers.items():
        torch.save(opt.state_dict(), folder / f"{name}.pt")
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
    (folder / CONFIG_FILE).write_text(config_to_yaml(record))
    write_manifest(folder)


def _sha256(path: Path) -> str:
    from step_ray.weights import sha256_of  # step_ray.weights imports torch: deferred like it

    return sha256_of(str(path))


def write_manifest(folder: str | Path) -> None:
    """manifest.json: every file of the checkpoint with its size and sha256. A checkpoint counts as
    complete only when its manifest is there and every file matches it, because an upload (Ray copies
    the folder file by file, in any order) can stop half-way."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
    manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST_FILE).write_text(json.dumps({"files": manifest}, indent=1))


class IncompleteCheckpointError(RuntimeError):
    """A checkpoint folder whose files do not match its manifest (an interrupted upload, a damaged copy)."""


def verify_checkpoint(folder: str | Path, hashes: bool = True) -> bool:
    """Raise IncompleteCheckpointError unless every file in manifest.json is present with its size (and
    sha256). False when there is no manifest (a checkpoint written before manifests existed)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return False
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise IncompleteCheckpointError(f"{folder}: unreadable {MANIFEST_FILE} ({exc})") from None
    problem = manifest_mismatch(files, {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()})
    if problem:
        raise IncompleteCheckpointError(f"{folder} is incomplete: {problem}")
    for name, entry in files.items():
        if hashes and _sha256(folder / name) != entry["sha256"]:
            raise IncompleteCheckpointError(f"{folder}: {name} does not match its sha256 (corrupt checkpoint)")
    return True


def load_checkpoint(folder: str | Path, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load tensors (weights only, never arbitrary pickles) into modules/optimisers; return state.json.
    The files are checked against the checkpoint's manifest first."""
    import torch  # deferred, as in save_checkpoint

    folder = Path(folder)
    verify_checkpoint(folder)
    for name, module in modules.items():
        unwrap(module).load_state_dict(torch.load(folder / f"{name}.pt", map_location=map_location, weights_only=True))
    for name, opt in (optimizers or {}).items():
        opt.load_state_dict(torch.load(folder / f"{name}.pt", map_location=map_location, weights_only=True))
    return json.loads((folder / STATE_FILE).read_text())


def load_saved_modules(checkpoint: str, build) -> dict[str, torch.nn.Module]:
    """Modules of a checkpoint (local or s3://) rebuilt from its own config.yaml: `build(record)` makes
    them from the record (see `run_record`), then their weights are loaded (weights only). Returned on
    the CPU in eval mode."""
    folder, tmp = local_checkpoint_dir(checkpoint)
    try:
        modules = build(read_record(folder))
        load_checkpoint(folder, modules, map_location="cpu")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {k: v.eval() for k, v in modules.items()}


def local_checkpoint_dir(uri: str) -> tuple[str, tempfile.TemporaryDirectory | None]:
    """A local folder holding the checkpoint at `uri` (downloaded first when it is on S3)."""
    if not storage.is_s3(uri):
        if not Path(uri).is_dir():
            raise FileNotFoundError(f"checkpoint {uri} does not exist")
        return uri, None
    storage.check_readable(uri, "checkpoint")
    tmp = tempfile.TemporaryDirectory(prefix="step_ray_ckpt_")
    fs, path = storage.resolve(uri)
    pafs.copy_files(path, tmp.name, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return tmp.name, tmp



_SHOWN = ("train_loss", "val_triplet_acc", "val_knn_acc", "val_rank_corr", "val_psnr", "images_per_s")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _line(c: CheckpointInfo, metric: str | None = None) -> str:
    keys = [k for k in ((metric,) if metric else ()) + _SHOWN if k and k in c.metrics]
    keys = list(dict.fromkeys(keys))
    shown = "  ".join(f"{k}={_fmt(c.metrics[k])}" for k in keys)
    epoch = "?" if c.epoch is None else c.epoch
    return f"  {c.name}  epoch={epoch}  {shown}  {c.uri}"


def _print(text: str, stream=None) -> None:
    print(redact(text), file=stream or sys.stdout, flush=True)


def _cmd_list(args) -> int:
    runs = list_runs(args.uri)
    if args.json:
        _print(json.dumps([asdict(r) for r in runs], indent=1, default=str))
        return 0
    if not runs:
        _print(f"no runs with checkpoints under {args.uri}")
        return 0
    for run in runs:
        ranked = rank(run.checkpoints, args.metric, args.mode)
        best = ranked[0].uri if ranked else None
        _print(f"{run.name}  ({len(run.checkpoints)} checkpoint{'s' if len(run.checkpoints) != 1 else ''})  {run.uri}")
        for c in run.checkpoints:
            _print(_line(c, args.metric) + ("  <- best" if c.uri == best else ""))
    return 0


def _cmd_best(args) -> int:
    c = best_checkpoint(args.uri, args.metric, args.mode)
    if args.json:
        _print(json.dumps(asdict(c), indent=1, default=str))
    else:
        _print(c.uri)
        metric = args.metric or c.checkpoint_metric or DEFAULT_METRIC
        _print(f"# {metric}={_fmt(c.metrics.get(metric))} epoch={c.epoch} run={c.run}", sys.stderr)
    return 0


def _cmd_pull(args) -> int:
    info, target = pull(args.uri, args.dest, args.metric, args.mode, overwrite=args.overwrite)
    if args.json:
        _print(json.dumps({"source": info.uri, "dest": target, "metrics": info.metrics}, indent=1, default=str))
    else:
        _print(f"pulled {info.uri} -> {target}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m step_ray.checkpoints", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--metric", help=f"rank by this reported metric (default: the run's own, else {DEFAULT_METRIC})")
        p.add_argument("--mode", choices=("max", "min"), help="higher (max) or lower (min) is better")
        p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("list", help="runs and their checkpoints, with metrics")
    p.add_argument("uri", help="storage path (local or s3://) or one run folder")
    common(p)
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("best", help="print the best checkpoint's URI")
    p.add_argument("uri", help="storage path, run folder or checkpoint")
    common(p)
    p.set_defaults(func=_cmd_best)
    p = sub.add_parser("pull", help="download a checkpoint (the best one when URI is a run or storage path)")
    p.add_argument("uri", help="checkpoint folder, or a run / storage path to take the best from")
    p.add_argument("dest", help="local folder (created) or s3:// URI")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DEST")
    common(p)
    p.set_defaults(func=_cmd_pull)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CheckpointError, storage.StorageError, OSError) as exc:
        _print(f"error: {exc}", sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
