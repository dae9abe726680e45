"""The GPU check: the stage check (stage 1 and a short ablation on facades) and the speed benchmarks on one
GPU, every part capped in time and the whole run too.

    bash tools/gpu/check.sh               # on a lent GPU machine: unpacks what it lacks, then runs this
    python tools/gpu/check.py --dry-run   # here: the same parts on the CPU at tiny sizes, in a temporary folder
    python tools/gpu/check.py --parts stage1 ours_v4 --image-size 256 --stage1-epochs 10

Parts, in this order, each the project's own job or benchmark in a process session of its own:
1. stage1: `jobs/pretrain.py --config configs/facades.yaml` (style statistics, mining, the style encoder) at
   --image-size for --stage1-epochs epochs; its held-out val_triplet_acc and val_rank_corr.
2. ours_v4, bicycle_v0: `jobs/train_generator.py --variant V` on facades, trained, mapped (IMLE) and
   evaluated on the val split, the same image budget for both: StEP trains stage 2 (E frozen, from part 1's
   checkpoint) then stage 3, the baseline (E from scratch) one joint stage as long. PSNR, LPIPS, diversity,
   images/s, and the project's ablation table of the two rows (step_ray.eval.ablation_table).
3. style_stats, mining, generator_step, memory: `benchmarks/<part>.py` on the GPU (the pipeline with one GPU
   actor at 256 px; the default reduction and mining with FAISS's GPU index against the exact sets; one
   generator step per variant in fp32 and bf16 at 256 px; peak memory of a stage-3 step at 256 and 512 px).
4. multidomain (only with --parts multidomain): `jobs/train_multidomain.py` on the synthetic style families at
   --multidomain-size for --multidomain-epochs epochs, and its evaluation (unification, smoothness, DCI,
   StarGAN v2's protocol with FID / KID): the longer run the CPU cannot afford.
A part past its cap is ended with every process of its session (Ray's too) and recorded `timeout`, and the
next starts; no part gets more than what is left of --budget-s, so one hung part cannot take the rest. The
stage parts share one Ray instance (RAY_ADDRESS's, else one started here); each speed part starts its own.

The caps are estimates (no run on a GPU has measured them yet): stage 1 at 128 px, 20 epochs of 9 steps
(the vgg_gram encoder trains a linear head on a stem computed once per image) plus style statistics,
mining and Ray Train's start ~60 s; a variant, 2 + 2 epochs of 400 images at batch 8 (~45 GFLOP an image
with the VGG loss: launch-bound, ~30-50 ms a step) plus start-up, mapper and evaluation ~70 s; each speed
part ~30-50 s, mostly process and Ray starts. 480 s in all, so that with the machine's start (1-2 min) and
the bundle's staging calls the lease stays within its 15 device minutes.

It writes <tag>.json and <tag>.md to --out-dir (default: <work>/results) and, with $OUT set (the device
machine's result folder), copies both and the parts' log tails there (3 files).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
STAGE_PARTS = ("stage1", "ours_v4", "bicycle_v0")
SPEED_PARTS = ("style_stats", "mining", "generator_step", "memory")
EXTRA_PARTS = ("multidomain",)  # on request only (--parts multidomain): the default parts fill the 15 minutes
MULTIDOMAIN_CONFIG = "configs/multidomain_synthetic.yaml"
STAGE1_CONFIG = "configs/facades.yaml"
STAGE1_RUN = "stage1-gpu-check"
KILL_GRACE_S = 10.0  # of a part's cap, kept for ending it
LEFTOVER_WAIT_S = 10.0  # after a part's main process ends: how long the rest of its session gets to end

# (GPU, dry run) of every setting; the command line overrides them
DEFAULTS = {"image_size": (128, 32), "stage1_epochs": (20, 1), "stage2_epochs": (2, 1), "stage3_epochs": (2, 1),
            "train_images": (0, 16), "val_images": (0, 8), "mapper_epochs": (100, 5), "eval_inputs": (50, 4),
            "eval_styles": (8, 3), "budget_s": (480.0, 900.0), "reserve_s": (10.0, 10.0),
            "multidomain_size": (64, 32), "multidomain_epochs": (20, 1), "multidomain_steps": (0, 4)}
CAPS = {"stage1": (90, 180), "ours_v4": (85, 150), "bicycle_v0": (85, 150), "style_stats": (50, 120),
        "mining": (60, 180), "generator_step": (55, 150), "memory": (45, 120), "multidomain": (420, 300)}
# dry run only: narrow networks and small sets, so the CPU path takes minutes
DRY_STAGE1 = ("style.num_actors=1", "style.reduction.dim=8", "train.batch_size=4", "train.val_triplets=200",
              "train.knn_reference=16")
DRY_GENERATOR = ("train.generator.base_channels=8", "train.discriminator.base_channels=8", "train.val_images=4",
                 "train.batch_size=4", "train.monitor.grid_inputs=2", "train.monitor.grid_references=2",
                 "eval.grid_inputs=2", "eval.grid_references=2", "eval.interpolation_steps=2", "eval.mapper_samples=50")
SPEED_ARGS = {  # (GPU, dry run)
    "style_stats": ("--sides gpu --images 1000 --gpu-side 256 --rounds 1",
                    "--sides ray --images 16 --side 32 --workers 1 --rounds 1 --reduction random --dim 16"),
    "mining": ("--n 5000 --anchors 250 --rounds 2",
               "--n 128 --anchors 32 --rounds 1 --set reduction.dim=16 --set reduction.fit_sample=64 "
               "--set reduction.sketch=1024"),
    "generator_step": ("--variants ours_v4 bicycle_v0 --image-size 256 --batch-size 8 --steps 10 --warmup 3 "
                       "--precision fp32 bf16 --rounds 1",
                       "--variants ours_v4 bicycle_v0 --image-size 32 --batch-size 2 --steps 1 --warmup 1 "
                       "--precision fp32 bf16 --rounds 1 --images 8 --set generator.base_channels=8 "
                       "--set discriminator.base_channels=8"),
    "memory": ("--sizes 256 512 --batches 4 --modes plain bf16 --steps 3",
               "--sizes 64 --batches 1 --modes plain bf16 --steps 1 --base-channels 8"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the CPU, tiny sizes, a temporary folder")
    p.add_argument("--parts", nargs="+", default=[*STAGE_PARTS, *SPEED_PARTS],
                   choices=[*STAGE_PARTS, *SPEED_PARTS, *EXTRA_PARTS])
    p.add_argument("--data-root", default="", help="facades (pix2pix layout); default .gpu_data/facades if present, "
                                                   "else ../shared/data/facades")
    p.add_argument("--work-dir", default="", help="runs, logs, caches (default: a new temporary folder)")
    p.add_argument("--out-dir", default="", help="where the tables go (default <work>/results)")
    p.add_argument("--tag", default="", help="file name stem (default gpu_check_<date>, gpu_check_dryrun_<date>)")
    for key in DEFAULTS:
        p.add_argument("--" + key.replace("_", "-"), type=float if key.endswith("_s") else int)
    p.add_argument("--cap", nargs="*", default=[], metavar="PART=SECONDS", help="another cap for a part")
    args = p.parse_args(argv)
    mode = 1 if args.dry_run else 0
    for key, values in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, values[mode])
    args.caps = {k: float(v[mode]) for k, v in CAPS.items()}
    for item in args.cap:
        name, _, value = item.partition("=")
        if name not in args.caps:
            p.error(f"--cap {item}: no part {name!r}")
        args.caps[name] = float(value)
    args.parts = [part for part in (*STAGE_PARTS, *SPEED_PARTS, *EXTRA_PARTS) if part in args.parts]  # this order
    args.use_gpu = "never" if args.dry_run else "always"
    return args


# ----------------------------------------------------------------------------------------------------
# one part: a process session of its own, capped, nothing of it left running after it


def session_processes(sid: int) -> list[int]:
    """The live (not zombie) processes of session `sid`, from /proc."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # ended meanwhile
            if int(fields[3]) == sid and fields[0] != "Z":  # after the name: state, ppid, pgrp, session
                out.append(int(entry.name))
    return out


def end_session(sid: int, wait_s: float) -> int:
    """Waits up to `wait_s` for the session's processes to end, then kills those left; how many were left."""
    deadline = time.monotonic() + wait_s
    while session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.25)
    left = session_processes(sid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_processes(sid):
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(1.0 if session_processes(sid) else 0)
    return len(left)


def run_part(name: str, cmd: list[str], log: Path, cap_s: float, env: dict[str, str]) -> dict[str, Any]:
    """`cmd` with its output in `log`, in a new session; at `cap_s` its process group, then its session, is
    ended. Returns its status (ok, failed, timeout, skipped), wall time and, if not ok, its log's last line."""
    if cap_s <= 1:
        return {"part": name, "status": "skipped", "wall_s": 0.0, "cap_s": round(cap_s, 1), "error": "no time left"}
    print(f"[check] {name}: start (cap {cap_s:.0f}s): {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, cap_s - KILL_GRACE_S))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            status, rc = "timeout", None
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=KILL_GRACE_S / 2)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
    leftover = end_session(proc.pid, LEFTOVER_WAIT_S if status != "timeout" else 0.0)
    part = {"part": name, "status": status, "wall_s": round(time.perf_counter() - started, 1), "cap_s": round(cap_s, 1),
            "returncode": rc, "session": proc.pid, "leftover_killed": leftover, "log": str(log)}
    if status != "ok":
        tail = log.read_text(errors="replace").splitlines()[-40:]
        part["error"] = next((ln.strip() for ln in reversed(tail) if ln.strip()), status)[:300]
        part["log_tail"] = tail
    print(f"[check] {name}: {status} in {part['wall_s']:.0f}s" + (f", {leftover} leftover processes killed" if leftover
                                                                    else ""), flush=True)
    return part


def printed(log: Path, job: str, key: str) -> str:
    """The value a job printed as `[job] key value` (the last such line)."""
    pattern = re.compile(rf"^\[{re.escape(job)}\] {re.escape(key)}\s+(\S+)\s*$")
    found = ""
    for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
        m = pattern.match(line)
        if m:
            found = m.group(1)
    return found


def finite(value: Any) -> float | None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if number and math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------------
# the stage check


def default_data_root() -> str:
    local = REPO / ".gpu_data" / "facades"
    return str(local) if (local / "train").is_dir() else str((REPO.parent / "shared" / "data" / "facades").resolve())


def subset_data(root: Path, out: Path, n_train: int, n_val: int) -> tuple[str, int, int]:
    """The set to train on: `root` itself, or a copy of its first N train / M val files (the jobs' order);
    with its numbers of training and validation files."""
    from step_ray.data.pix2pix import list_split

    counts = {}
    for split, n in (("train", n_train), ("val", n_val)):
        files = list_split(str(root), split)
        counts[split] = len(files[:n] if n else files)
        if n_train or n_val:
            (out / split).mkdir(parents=True, exist_ok=True)
            for f in files[:n] if n else files:
                shutil.copy2(f, out / split / Path(f).name)
    return str(out if n_train or n_val else root), counts["train"], counts["val"]


def mining_overrides(n_train: int) -> list[str]:
    """configs/facades.yaml's k_close / k_far, unless the (dry run's) subset is too small for them: then half
    the images as the far set and at most a quarter as the close set."""
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
    return cmd + (list(DRY_STAGE1) if args.dry_run else [])


def stage1_results(log: Path, work: Path) -> dict[str, Any]:
    """Stage 1's checkpoint (the best; else the newest written, if it was cut short) and its numbers."""
    run_folder = work / "runs" / STAGE1_RUN
    out: dict[str, Any] = {"checkpoint": printed(log, "pretrain", "checkpoint")}
    text = log.read_text(errors="replace") if log.is_file() else ""
    for step, key in (("style statistics", "style_stats_s"), ("triplet mining", "mining_s")):
        m = re.search(rf"^\[pretrain\] {step}: \S+ \(([\d.]+)s\)", text, re.M)
        out[key] = float(m.group(1)) if m else None
    metrics_file = Path(printed(log, "pretrain", "metrics") or run_folder / "metrics.json")
    states = sorted(glob.glob(str(run_folder / "checkpoint_epoch*" / "state.json")))
    history: list[dict] = []
    if metrics_file.is_file():
        history = json.loads(metrics_file.read_text()).get("history") or []
    elif states:  # cut short: the newest checkpoint's state holds the history so far
        history = json.loads(Path(states[-1]).read_text()).get("history") or []
    if not out["checkpoint"] and states:
        out["checkpoint"] = str(Path(states[-1]).parent)
    out["epochs"] = len(history)
    if history:
        last = history[-1]
        best = max(history, key=lambda h: finite(h.get("val_triplet_acc")) or -1.0)
        for key in ("val_triplet_acc", "val_rank_corr", "val_knn_acc", "images_per_s", "epoch_seconds"):
            out[key] = finite(last.get(key))
        out["steps"] = last.get("step")
        out["best_epoch"], out["best_val_triplet_acc"] = best.get("epoch"), finite(best.get("val_triplet_acc"))
    return out


def uses_stage1(variant: str) -> bool:
    from step_ray.recipes.variants import get_variant

    return get_variant(variant).train.get("encoder_init", "checkpoint") != "scratch"


def variant_command(args, variant: str, data_root: str, checkpoint: str, work: Path) -> list[str]:
    cmd = [sys.executable, "jobs/train_generator.py", "--variant", variant, f"data.root={data_root}",
           "data.direction=BtoA", f"data.image_size={args.image_size}", f"stage2_epochs={args.stage2_epochs}",
           f"stage3_epochs={args.stage3_epochs}", f"run.storage_path={work / 'runs'}", f"run.name={variant}",
           f"run.use_gpu={args.use_gpu}", "run.max_failures=0", "run.keep_checkpoints=1",
           f"mapper.epochs={args.mapper_epochs}", f"eval.num_inputs={args.eval_inputs}",
           f"eval.num_styles={args.eval_styles}", f"eval.method={variant}"]
    if uses_stage1(variant):
        cmd.append(f"encoder_checkpoint={checkpoint}")
    return cmd + (list(DRY_GENERATOR) if args.dry_run else [])


def variant_results(variant: str, log: Path, n_train: int, args) -> dict[str, Any]:
    """What the variant's job summary says: stages, throughput, the evaluation."""
    from step_ray.recipes.variants import get_variant

    v = get_variant(variant)
    out: dict[str, Any] = {"variant": variant, "family": v.family, "version": v.version,
                           "encoder": "stage 1" if uses_stage1(variant) else "scratch",
                           "images_planned": (args.stage2_epochs + args.stage3_epochs) * n_train}
    summary = printed(log, "train_generator", "summary")
    if not summary or not Path(summary).is_file():
        return out
    record = json.loads(Path(summary).read_text())
    stages = record.get("stages") or []
    out["reconstruction"] = (record.get("details") or {}).get("reconstruction")
    out["train_s"] = finite(record.get("train_seconds"))
    out["stages"] = {s["name"]: {"epochs": int(s["metrics"].get("epoch", -1)) + 1, "steps": s["metrics"].get("step"),
                                 "images_per_s": finite(s["metrics"].get("images_per_s"))} for s in stages}
    out["epochs"] = sum(s["epochs"] for s in out["stages"].values())
    out["images_seen"] = out["epochs"] * n_train
    last = stages[-1]["metrics"] if stages else {}
    out["images_per_s"], out["val_psnr"] = finite(last.get("images_per_s")), finite(last.get("val_psnr"))
    metrics = record.get("eval_metrics") or {}
    for key in ("psnr", "lpips", "psnr_other_style", "diversity_refs", "diversity_mapper"):
        out[key] = finite(metrics.get(key))
    out["config"] = record.get("config")
    return out


def ablation_table(variants: list[dict[str, Any]], folder: Path, title: str) -> str:
    """The project's ablation table (as a sweep writes it) of the variants' rows; its Markdown."""
    from step_ray.config import config_from_dict
    from step_ray.eval.ablation_table import write_results
    from step_ray.pipelines.train_generator import GeneratorJobConfig
    from step_ray.recipes.variants import components, variant_base

    rows = []
    for v in variants:
        tree = v.get("config") or variant_base(v["variant"])
        train = config_from_dict(GeneratorJobConfig, tree, where=v["variant"]).train
        evaluated = v.get("psnr") is not None
        row = {"trial_id": v["variant"], "variant": v["variant"], "family": v["family"], "version": v["version"],
               "seed": 0, "params": "{}", "status": "TERMINATED" if evaluated else "ERROR", "evaluated": evaluated,
               "epochs": v.get("epochs"), "val_psnr": v.get("val_psnr"), "error": v.get("error", ""),
               "train_seconds": v.get("train_s"), **components(train)}
        row.update({k: v.get(k) for k in ("psnr", "lpips", "diversity_refs", "diversity_mapper", "psnr_other_style",
                                          "images_per_s")})
        rows.append(row)
    return Path(write_results(rows, str(folder), title=title)["md"]).read_text()


# ----------------------------------------------------------------------------------------------------
# the speed benchmarks


def speed_command(args, part: str, data_root: str, work: Path) -> list[str]:
    cmd = [sys.executable, f"benchmarks/{part}.py", *SPEED_ARGS[part][1 if args.dry_run else 0].split(),
           "--json", str(work / f"{part}.json")]
    if part in ("generator_step", "memory"):
        cmd += ["--device", "cpu" if args.dry_run else "cuda"]
    if part == "generator_step":
        cmd += ["--data", data_root]
    if part == "style_stats":
        cmd += ["--data-dir", str(work / "style_data")]
    if part == "mining":
        cmd += ["--cache", str(work / "mining_data")]
    return cmd


def headline(part: str, f: dict[str, Any]) -> str:
    """One line of a speed part's figures for the table (the JSON holds them all)."""
    if part == "style_stats":
        runs = [(name, r) for name, rs in (f.get("runs") or {}).items() for r in rs]
        return "; ".join(f"{name} ({r.get('device')}, {r.get('images')} images): "
                         f"{r.get('images_per_second_pipeline', 0):.1f} images/s in the pipeline, "
                         f"{r.get('images_per_second_end_to_end', 0):.1f} end to end" for name, r in runs)
    if part == "mining":
        t = f["timing"]
        return (f"n {f['n']}, index {f['index']}{' on the GPU' if f['gpu'] else ''}: close recall "
                f"{f['close_recall']:.3f}, far precision {f['far_precision']:.3f}, mining {t['mining_s']} s, "
                f"exact {t['exact_all_anchors_s']} s, {t['speedup']}×")
    if part == "generator_step":
        return "; ".join(f"{key}: {s['images_per_s']:.2f} images/s"
                         + (f", {s['peak_memory_mib']:.0f} MiB" if "peak_memory_mib" in s else "")
                         for key, s in f["summary"].items())
    return "; ".join(f"{r['size']} px {r['mode']} batch {r['batch']}: " + ("OOM" if r.get("oom") else
                     f"{r['peak_mib']:.0f} MiB, {r['images_per_s']:.2f} images/s") for r in f["rows"])


def speed_results(part: str, work: Path) -> dict[str, Any]:
    path = work / f"{part}.json"
    if not path.is_file():
        return {}
    figures = json.loads(path.read_text())["figures"]
    try:
        return {"figures": figures, "headline": headline(part, figures)}
    except (KeyError, TypeError, ValueError) as exc:  # a record of another shape: the JSON still has it
        return {"figures": figures, "headline": f"(unread: {exc!r})"}


# ----------------------------------------------------------------------------------------------------
# the tables


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if finite(value) is not None else "–"


def markdown(report: dict[str, Any], ablation_md: str) -> str:
    m, s = report["machine"], report["settings"]
    gpu = f"{m['gpu']['name']} ({m['gpu']['memory_gib']} GiB)" if m.get("gpu") else "none (CPU)"
    dry = " (DRY RUN, CPU)" if report["dry_run"] else ""
    lines = [f"# GPU check: stage 1, ablation, speed — {report['date'][:10]}{dry}", "",
             f"- {report['date']}; {gpu}, {m['cpus']} CPUs; torch {m['torch']} (CUDA {m.get('cuda')}), "
             f"Python {m['python']}"]
    if s["train_images_used"]:
        lines.append(f"- facades BtoA, {s['train_images_used']} train / {s['val_images_used']} val at "
                     f"{s['image_size']} px; stage 1 {s['stage1_epochs']} epochs; variants {s['stage2_epochs']} + "
                     f"{s['stage3_epochs']} epochs")
    lines += [f"- wall time {report['total_wall_s']:.0f} s (cap {s['budget_s']:.0f} s)", "",
              "## Parts", "", "| part | status | wall s | cap s | note |", "|---|---|---|---|---|"]
    for p in report["parts"]:
        lines.append(f"| {p['part']} | {p['status']} | {p['wall_s']:.1f} | {p['cap_s']:.0f} | "
                     f"{str(p.get('error', '')).replace('|', '/')[:120]} |")
    st = report.get("stage1")
    if st:
        lines += ["", "## Stage 1", "", "| epochs / steps | val_triplet_acc | val_rank_corr | best val_triplet_acc "
                  "(epoch) | images/s | style stats s | mining s |", "|---|---|---|---|---|---|---|",
                  f"| {st.get('epochs', 0)} / {st.get('steps', '–')} | {_num(st.get('val_triplet_acc'))} | "
                  f"{_num(st.get('val_rank_corr'))} | {_num(st.get('best_val_triplet_acc'))} "
                  f"({st.get('best_epoch', '–')}) | {_num(st.get('images_per_s'), 1)} | "
                  f"{_num(st.get('style_stats_s'), 1)} | {_num(st.get('mining_s'), 1)} |"]
    if report.get("variants"):
        lines += ["", "## Ablation", "", "| variant | E | status | images | train s | images/s | PSNR ↑ | LPIPS ↓ | "
                  "div. refs ↑ | div. samples ↑ |", "|---|---|---|---|---|---|---|---|---|---|"]
        for v in report["variants"]:
            lines.append(f"| {v['variant']} | {v['encoder']} | {v['status']} | {v.get('images_seen', '–')} | "
                         f"{_num(v.get('train_s'), 1)} | {_num(v.get('images_per_s'), 1)} | {_num(v.get('psnr'), 2)} | "
                         f"{_num(v.get('lpips'))} | {_num(v.get('diversity_refs'))} | "
                         f"{_num(v.get('diversity_mapper'))} |")
        lines += ["", ablation_md.split("\n", 2)[-1].strip() if ablation_md else "(no ablation table)"]
    md = report.get("multidomain")
    if md:
        lines += ["", "## Multi-domain model", "", "| " + " | ".join(md) + " |", "|---" * len(md) + "|",
                  "| " + " | ".join(_num(v) if not isinstance(v, (str, dict)) else str(v)[:60] for v in md.values())
                  + " |"]
    if report.get("speed"):
        lines += ["", "## Speed", "", "| benchmark | figures |", "|---|---|"]
        lines += [f"| {part} | {r.get('headline', '–')} |" for part, r in report["speed"].items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], table: str, out_dir: Path, tag: str) -> None:
    """<out_dir>/<tag>.json and .md; with $OUT set (at most 8 files come back from there), copies of both and
    the last 150 lines of every part's log in one <tag>_logs.txt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{tag}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out_dir / f"{tag}.md").write_text(table)
    print(table, flush=True)
    print(f"[check] done in {report['total_wall_s']:.0f}s: {out_dir / tag}.json, .md", flush=True)
    if not os.environ.get("OUT"):
        return
    dest = Path(os.environ["OUT"])
    dest.mkdir(parents=True, exist_ok=True)
    for suffix in (".json", ".md"):
        shutil.copy2(out_dir / f"{tag}{suffix}", dest / f"{tag}{suffix}")
    with open(dest / f"{tag}_logs.txt", "w") as f:
        for p in report["parts"]:
            if p.get("log") and Path(p["log"]).is_file():
                f.write(f"===== {p['part']} ({p['status']}, {p['wall_s']} s): the last 150 lines\n")
                f.write("\n".join(Path(p["log"]).read_text(errors="replace").splitlines()[-150:]) + "\n")


# ----------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import platform

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "gpu": None, "gpu_count": torch.cuda.device_count()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
    for module in ("ray", "faiss"):
        try:
            info[module] = __import__(module).__version__
        except ImportError as exc:
            info[module] = f"not importable: {exc}"
    if not info["faiss"].startswith("not"):
        import faiss

        info["faiss_gpus"] = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    return info


def start_ray(env: dict[str, str], gpus: int) -> bool:
    """One Ray instance for the stage parts' jobs (they join it through RAY_ADDRESS), unless env names one."""
    if env.get("RAY_ADDRESS"):
        return False
    import ray

    from step_ray.cluster import init_ray

    init_ray(include_dashboard=False, configure_logging=False, **({"num_gpus": gpus} if gpus else {}))
    # what ray.init set for itself (its auth token, its address mode) the jobs need too
    env.update({k: v for k, v in os.environ.items() if k.startswith("RAY_")})
    env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return True


def stage_check(args, report: dict[str, Any], env: dict[str, str], data: tuple[str, int, int], work: Path,
                deadline: float) -> None:
    """Stage 1, then each variant (the StEP one skipped without a stage-1 checkpoint), then their table."""
    root, n_train, _ = data
    parts = [p for p in STAGE_PARTS if p in args.parts]
    if not parts:
        return
    started_ray = start_ray(env, report["machine"]["gpu_count"])
    checkpoint, report["variants"] = "", []
    for name in parts:
        log, cap = work / "logs" / f"{name}.log", min(args.caps[name], deadline - time.perf_counter() - args.reserve_s)
        if name == "stage1":
            report["parts"].append(run_part(name, stage1_command(args, root, n_train, work), log, cap, env))
            report["stage1"] = stage1_results(log, work)
            checkpoint = report["stage1"].get("checkpoint", "")
            continue
        if uses_stage1(name) and not checkpoint:
            part = {"part": name, "status": "skipped", "wall_s": 0.0, "cap_s": 0.0, "error": "no stage-1 checkpoint"}
        else:
            part = run_part(name, variant_command(args, name, root, checkpoint, work), log, cap, env)
        report["parts"].append(part)
        report["variants"].append({**variant_results(name, log, n_train, args), "status": part["status"]})
    if report["variants"]:
        try:
            title = f"GPU check {report['date'][:10]}"
            report["ablation_md"] = ablation_table(report["variants"], work / "ablation", title)
        except Exception as exc:  # the other tables are still written
            report["ablation_error"] = repr(exc)[:300]
    for v in report["variants"]:
        v.pop("config", None)
    if started_ray:
        import ray

        ray.shutdown()


def multidomain_command(args, work: Path) -> list[str]:
    """The multi-domain model on the synthetic style families (rendered at --multidomain-size), the config's
    networks, for --multidomain-epochs epochs (of 100 steps; --multidomain-steps caps them), then its
    evaluation (StarGAN v2's protocol with FID/KID, unification, smoothness, DCI)."""
    size = args.multidomain_size
    # data.root empty: the config names a folder of its own, which the device machine does not have
    cmd = [sys.executable, "jobs/train_multidomain.py", "--config", MULTIDOMAIN_CONFIG, "data.root=",
           f"data.synthetic_dir={work / 'synthetic'}", f"data.synthetic.image_size={size}", f"data.image_size={size}",
           "data.synthetic.num_val=640", f"train.max_epochs={args.multidomain_epochs}",
           f"run.storage_path={work / 'runs'}", "run.name=multidomain", f"run.use_gpu={args.use_gpu}",
           f"fid.cache_dir={work / 'cache' / 'fid'}"]
    if args.multidomain_steps:
        cmd.append(f"train.max_steps={args.multidomain_steps}")
    return cmd + (["eval_inputs=2", "eval_styles=2"] if args.dry_run else [])


def multidomain_results(log: Path) -> dict[str, Any]:
    """The job summary's evaluation and the last epoch's unification figures."""
    summary = printed(log, "train_multidomain", "summary")
    if not summary or not Path(summary).is_file():
        return {}
    record = json.loads(Path(summary).read_text())
    m = record.get("eval_metrics") or {}
    stage = (record.get("stages") or [{}])[-1].get("metrics") or {}
    out = {key: finite(m.get(key)) for key in ("unification_accuracy", "diversity_latent", "diversity_reference",
                                               "fid_latent", "fid_reference", "kid_latent", "kid_reference",
                                               "fid_floor", "interp_lpips_max_over_mean")}
    out["dci"] = m.get("dci")
    out.update({key: finite(stage.get(key)) for key in ("epoch", "images_per_s", "val_unification_accuracy",
                                                         "val_ds_accuracy")})
    out["train_s"] = finite(record.get("train_seconds"))
    return out


def multidomain_check(args, report: dict[str, Any], env: dict[str, str], work: Path, deadline: float) -> None:
    if "multidomain" not in args.parts:
        return
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    cap = min(args.caps["multidomain"], deadline - time.perf_counter() - args.reserve_s)
    log = work / "logs" / "multidomain.log"
    part = run_part("multidomain", multidomain_command(args, work), log, cap, env)
    report["parts"].append(part)
    report["multidomain"] = {"status": part["status"], **multidomain_results(log)}


def speed_check(args, report: dict[str, Any], env: dict[str, str], data_root: str, work: Path, deadline: float) -> None:
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}  # each benchmark starts its own Ray where it needs one
    report["speed"] = {}
    for name in [p for p in SPEED_PARTS if p in args.parts]:
        cap = min(args.caps[name], deadline - time.perf_counter() - args.reserve_s)
        part = run_part(name, speed_command(args, name, data_root, work), work / "logs" / f"{name}.log", cap, env)
        report["parts"].append(part)
        report["speed"][name] = {"status": part["status"], **speed_results(name, work)}


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    date = datetime.datetime.now().isoformat(timespec="seconds")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out_dir or work / "results").resolve()
    tag = args.tag or f"gpu_check_{'dryrun_' if args.dry_run else ''}{date[:10]}"
    data_root = Path(args.data_root or default_data_root()).resolve()
    if any(p in (*STAGE_PARTS, "generator_step") for p in args.parts) and not (data_root / "train").is_dir():
        raise SystemExit(f"check: no facades at {data_root} (train/ and val/): pass --data-root")
    stages = any(p in STAGE_PARTS for p in args.parts)
    data = ("", 0, 0)
    if stages:
        data = subset_data(data_root, work / "data" / "facades", args.train_images, args.val_images)
    paths = [str(REPO), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(paths)}
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # a Ray instance started here hands it to its workers
    for key, value in (("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"), ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")):
        os.environ.setdefault(key, value)  # Ray Train's controller polls every 2 s by default: on one machine, 0.25
        env.setdefault(key, value)
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a GPU machine
    report: dict[str, Any] = {"date": date, "dry_run": args.dry_run, "machine": machine(), "work_dir": str(work),
                              "parts": []}
    report["settings"] = {**{k: getattr(args, k) for k in DEFAULTS}, "parts": args.parts, "caps": args.caps,
                          "data_root": str(data_root), "train_images_used": data[1], "val_images_used": data[2]}
    print(f"[check] work folder {work}; data {data_root}; machine {json.dumps(report['machine'])}", flush=True)
    deadline = t0 + args.budget_s
    stage_check(args, report, env, data, work, deadline)
    speed_check(args, report, env, str(data_root), work, deadline)
    multidomain_check(args, report, env, work, deadline)
    report["total_wall_s"] = round(time.perf_counter() - t0, 1)
    write_report(report, markdown(report, report.pop("ablation_md", "")), out_dir, tag)
    return report


if __name__ == "__main__":
    main()
