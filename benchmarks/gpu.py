"""GPU run (issue 22, item 5): the project's speed and memory benchmarks on one GPU, in one capped script.

    python benchmarks/gpu.py              # one H200-class GPU: ~6-7 min expected, capped at 8 (480 s)
    python benchmarks/gpu.py --dry-run    # the same parts on the CPU at tiny sizes (32-64 px, n <= 1,370): ~2.5 min

On a lent GPU machine `benchmarks/gpu.sh` runs this after unpacking what that machine lacks (Ray,
faiss-gpu, lpips, zuko, VGG-16's weights, facades: `benchmarks/gpu_bundle.sh run`, see BENCHMARKS.md).
Each part is the project's own benchmark script, called through its command line in a subprocess of its own
process group with its own wall-clock cap (`gpu_step.run_part`: past its cap it is killed, recorded as
`timeout`, and the next part starts), all under one global cap (`--budget-s`):

1. style_stats: `benchmarks/style_stats.py --skip-naive --workers 1 --side 32 --gpu-side 256` -- the Ray Data
   style-statistics pipeline end to end (decode, VGG-16, Gram, projection, Parquet), CPU at 32 px and, where
   Ray sees a GPU, one GPU actor at 256 px, fp32 (the script has no precision flag: the bf16 pipeline is not
   run; part 2 times bf16 on the same model);
2. descriptor_precision: `benchmarks/descriptor_precision.py --device cuda --image-size 256 --precisions
   fp32 bf16 fp32` -- the pipeline's model (`StyleDescriptorModel`, real VGG-16) on the 500 facades photos,
   images/s per precision (model only, batches of 32 already in memory) and bf16's recall@k_c (5) and far
   precision (13) against fp32. fp32 runs first as the warm-up (cuDNN's autotuning, CUDA's start) and
   again last; the second fp32 pass is the reference and the rate reported;
3. mining: `benchmarks/mining.py --n 1000 --timing-only-n 50000 137000 --shards 2 --approx ivf` -- FAISS
   mining (k_close 5 nearest, k_far 13 furthest of every vector) on a stand-in database of the reduced
   shape (137k x 128, a Gaussian mixture: FAISS's cost depends on n, d, k only), flat in one process and
   flat / IVF sharded over 2 Ray actors sharing the GPU; with the faiss-gpu-cu12 wheel FAISS puts every
   index on the GPU (`faiss_gpus` says whether it saw one);
4. knn_torch: this script's own brute-force k-NN in torch on the GPU (fp32 |q|^2 + |x|^2 - 2 q.x in blocks of
   4,096 queries, `topk` for the 5+1 nearest and 13 furthest) at the same n on the same kind of stand-in:
   a reference for FAISS's times, labelled "torch brute force", and, where FAISS has a GPU, a check that
   FAISS's GPU flat index (through the cuBLAS stand-in of gpu_bundle.sh) returns the same neighbours;
5. stage1: `benchmarks/stage1.py --workers 1 --image-size 256` -- stage-1 training (Ray Train, one worker
   on the GPU) on 800 synthetic images, its last epoch's triplets/s (style statistics and mining run first);
6. generator: `benchmarks/generator_step.py --variants ours_v4 bicycle_v0 --image-size 256 --batch-size 8
   --steps 20 --warmup 3 --device cuda --precision fp32 bf16 --rounds 1` -- one generator train_step per
   variant and precision, images/s and ms per part (G, D, E, VGG, optimiser, EMA); `missing` where the tree
   has no such script;
7. memory: `benchmarks/memory.py --device cuda --sizes 256 512 --modes plain bf16 --batches 4 --steps 3` --
   peak GPU memory (`max_memory_allocated`) and images/s of one stage-3 step at 256 and 512 px.

It writes `gpu_<date>.json` and `.md` to `--out-dir` (default benchmarks/results; the dry run: its work
folder) with the date, GPU, versions, every part's status, wall time and cap, and the numbers; with $OUT set
(the device machine's result folder) the two tables and the parts' log tails go there too (3 files).

GPU time, estimated (no GPU has run this project yet: the figures below are reasoned guesses, the caps keep
the run inside 8 min). H200: ~790 TFLOP/s bf16 dense, ~400 TF32, ~60 fp32 without tensor cores, 4.3 TB/s.
1. VGG-16 to conv5_2 at 256 px is ~40 GFLOP an image (15.5 at 224 px for all 13 convs, x (256/224)^2; the
   Gram matrices add ~1): at a realistic 30-50 % of TF32 peak ~3-5k images/s, so 2,000 images are bound by
   decoding PNGs in Ray Data (16 CPUs, ~1-2k images/s) and by start-up: Ray ~5 s, synthetic images (2,000 at
   256 px + 2,000 at 32 px) ~20 s, the CPU pass at 32 px ~10 s, the GPU actor's start ~10 s: ~60 s; cap 80 s.
2. 3 x 500 images x 40 GFLOP = 60 TFLOP: ~1 s of GPU, plus 1.2 MB of descriptor an image copied back
   (0.6 GB a pass), loading facades and imports: ~20 s; cap 50 s.
3. flat search, both directions: 2 x 2 n^2 d FLOP = 9.6 TFLOP at n = 137k: < 1 s; IVF training and the
   GPU index copies ~1 s; each run is a fresh process (~5 s with torch's import) and each sharded run starts
   its own Ray (~5-8 s): 8 runs (2 at n = 1,000, 3 at each stand-in size) + 1,000 descriptors at 32 px on the
   CPU: ~70-90 s; cap 100 s.
4. the same FLOPs in fp32 (~60 TFLOP/s): ~0.3 s at 137k, plus topk over 137k columns; ~10 s with start-up;
   cap 25 s.
5. Ray ~5 s, 896 synthetic images at 256 px ~10 s, style statistics on the GPU ~15 s, mining ~3 s, Ray
   Train's start ~10 s, 3 epochs of 800 triplets (3 images each through the encoder, ~70 steps of 12, launch
   bound: ~3-5 s an epoch, the first decoding the images into the worker's cache): ~60 s; cap 90 s.
6. 4 fresh processes (2 variants x 2 precisions), each ~8 s of imports, facades and CUDA start plus 23 steps of
   batch 8 at 256 px (~1 TFLOP a step with VGG's loss: launch bound, ~50-100 ms) and a profiled pass: ~60 s;
   cap 70 s.
7. 4 fresh processes (2 sizes x 2 modes), ~8 s each with 4 steps at batch 4: ~35-45 s; cap 55 s.
Caps 80 + 50 + 100 + 25 + 90 + 70 + 55 = 470 s, 10 s kept for the tables: `--budget-s` 480. On the device
add ~20 s of unpacking (gpu.sh): ~8.3 min at most against a call's 10, and the lease (start ~1-2 min, three
staging calls, this call) ~12-13 of the 15 device minutes.

Dry run (`--dry-run`): every part, the same scripts and flags, on the CPU at tiny sizes (32 px; memory 64 px,
its smallest, with 8-filter networks; 16 style images, the first 16 facades (`--images 16`); mining n = 64 and
a 1,370-vector stand-in at d = 16 (PCA needs more samples than dimensions); stage 1 one epoch of 24 images with
3 nearest / 8 furthest (`--set mining.k_far=8`: PretrainJobConfig's 700 needs more than 700 images); one
generator step (after one warm-up, plus the profiled one) with 8-filter networks), results in a temporary
folder; tests/test_gpu_bench.py runs it. Nearly all of its time is fixed cost, not the sizes: ~20 fresh
Python processes importing torch (~2-4 CPU-s each) and 5 Ray starts (~8-10 CPU-s each with their actors): ~190
CPU-seconds in all, ~2.5 min on an idle 2-core machine. Its caps are ~3-4 x each part's idle time. Every part
records its CPU seconds (its whole process session, from /proc) and the load average before and after, and
whatever of a part is still running after it (Ray's processes leave the part's process group, not its
session) is ended before the next part starts, so that no two Ray instances run at once.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import gpu_step  # noqa: E402  (the issue-21 script: run_part, finite, machine_info, default_data_root)
from gpu_step import finite  # noqa: E402

PARTS = ("style_stats", "descriptor_precision", "mining", "knn_torch", "stage1", "generator", "memory")
# (GPU run, dry run) of every size and cap; the command line overrides the caps and the budget
GPU = {"style_images": 2000, "style_side": 256, "precision_side": 256, "precision_images": 0, "mining_n": [1000],
       "mining_timing_n": [50000, 137000], "mining_dim": 128, "mining_fit": 512, "mining_sample": 200, "stage1_train": 800,
       "stage1_side": 256, "stage1_epochs": 3, "stage1_batch": 12, "gen_side": 256, "gen_batch": 8, "gen_steps": 20,
       "gen_warmup": 3, "gen_images": 64, "mem_sizes": [256, 512], "mem_batches": [4], "mem_steps": 3}
GPU.update({"stage1_val": 96, "stage1_set": [], "mem_base_channels": 64, "gen_profile": True})
DRY = {"style_images": 16, "style_side": 32, "precision_side": 32, "precision_images": 16, "mining_n": [64],
       "mining_timing_n": [1370], "mining_dim": 16, "mining_fit": 32, "mining_sample": 16, "stage1_train": 24,
       "stage1_val": 8, "stage1_side": 32, "stage1_epochs": 1, "stage1_batch": 4, "gen_side": 32, "gen_batch": 2,
       "gen_steps": 1, "gen_warmup": 1, "gen_images": 8, "gen_profile": True, "mem_sizes": [64], "mem_batches": [1],
       "mem_steps": 1, "mem_base_channels": 8,
       # stage 1 on 24 images: PretrainJobConfig's k_far = 700 needs more than 700, so 3 nearest / 8 furthest;
       # one style actor, an 8-number reduction, the k-NN reference and the checked triplets cut to the set
       "stage1_set": ["mining.k_close=3", "mining.k_far=8", "style.num_actors=1", "style.reduction.dim=8",
                      "train.knn_reference=16", "train.val_triplets=50"]}
CAPS = {  # seconds: (GPU run, dry run); the dry run's are 6-10 x its parts' times on an idle 2-core machine
    # (BENCHMARKS.md, "GPU run, prepared"), so that a CI machine under load still passes; its budget, 4 x its
    # idle ~150 s, stays under tests/test_gpu_bench.py's 700 s
    "style_stats": (80, 120), "descriptor_precision": (50, 60), "mining": (100, 240), "knn_torch": (25, 40),
    "stage1": (90, 180), "generator": (70, 180), "memory": (55, 120)}
BUDGET = (480.0, 600.0)
# dry run only: narrow generator networks (as gpu_step.py's dry run), so 4 fresh processes take seconds
DRY_GENERATOR_SET = ("generator.base_channels=8", "discriminator.base_channels=8")
LEFTOVER_WAIT_S = 10.0  # after a part: how long its processes (Ray's, say) get to end before they are killed
RESERVE_S = 10.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the CPU, tiny sizes, a temporary folder")
    p.add_argument("--data-root", default="", help="facades (pix2pix layout); default .gpu_data/facades if present, "
                                                   "else ../shared/data/facades")
    p.add_argument("--work-dir", default="", help="logs and scratch (default: a new temporary folder)")
    p.add_argument("--out-dir", default="", help="where the tables go (default benchmarks/results; dry run: <work>/results)")
    p.add_argument("--tag", default="", help="file name stem (default gpu_<date>, dry run gpu_dryrun_<date>)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--budget-s", type=float, help="wall-clock cap of the whole script")
    p.add_argument("--cap", nargs="*", default=[], metavar="PART=SECONDS", help="another cap for a part")
    p.add_argument("--device", default="", help="cuda | cpu (default: cuda where torch sees one; the dry run: cpu)")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # knn_torch's own process
    p.add_argument("--child-json", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    mode = 1 if args.dry_run else 0
    args.sizes = DRY if args.dry_run else GPU
    args.caps = {k: float(v[mode]) for k, v in CAPS.items()}
    for item in args.cap:
        name, _, value = item.partition("=")
        if name not in args.caps:
            p.error(f"--cap {item}: no part {name!r}")
        args.caps[name] = float(value)
    if args.budget_s is None:
        args.budget_s = BUDGET[mode]
    return args


# ----------------------------------------------------------------------------------------------------
# running a part: its CPU time, and nothing of it left running after it (one Ray instance at a time)


def _processes() -> dict[tuple[int, int], tuple[int, int, float, bool]]:
    """Every process now: (pid, start time) -> (parent pid, session id, CPU seconds of its own, a zombie), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # ended meanwhile
        # fields[0] is stat's 3rd field (state): ppid 4, session 6, utime 14, stime 15, starttime 22
        out[(int(entry.name), int(fields[19]))] = (int(fields[1]), int(fields[3]),
                                                  (int(fields[11]) + int(fields[12])) / tick, fields[0] == b"Z")
    return out


class PartProcesses(threading.Thread):
    """A part's processes: all of the session `gpu_step.run_part` starts it in (start_new_session; Ray's
    raylet and GCS leave the part's process group, not its session), read from /proc every 0.25 s. `cpu_s`
    adds each one's own CPU time as last seen (a process that lives < 0.25 s may be missed; the children's
    rusage, the other lower bound, is taken where larger); `end` then waits for what is left of them (Ray's
    processes shutting down, or those of a part killed at its cap, which leave the process group run_part
    kills) and kills it, so that no part's Ray outlives it into the next part."""

    def __init__(self):
        super().__init__(daemon=True)
        self.me, self.before = os.getpid(), set()
        self.sessions: set[int] = set()
        self.cpu: dict[tuple[int, int], float] = {}
        self.gcs: set[tuple[int, int]] = set()  # the part's Ray GCS servers seen: one a Ray instance
        self.ray_max = 0  # the most Ray instances (GCS servers) of the part's running at once
        self.halt = threading.Event()
        self.usable = os.path.isdir("/proc/self")
        if self.usable:
            self.before = set(_processes())

    def scan(self) -> set[tuple[int, int]]:
        """The part's processes still running (zombies are done), their CPU times noted."""
        now = {k: v for k, v in _processes().items() if k not in self.before}
        self.sessions |= {pid for (pid, _), (ppid, sid, _, _) in now.items() if ppid == self.me and sid == pid}
        mine = {k for k, (_, sid, _, _) in now.items() if sid in self.sessions}
        for k in mine:
            if k not in self.cpu:
                try:
                    with open(f"/proc/{k[0]}/comm") as f:
                        if f.read().strip() == "gcs_server":
                            self.gcs.add(k)
                except OSError:
                    pass
            self.cpu[k] = max(self.cpu.get(k, 0.0), now[k][2])
        alive = {k for k in mine if not now[k][3]}
        self.ray_max = max(self.ray_max, len(alive & self.gcs))
        return alive

    def run(self):
        while self.usable and not self.halt.wait(0.25):
            try:
                self.scan()
            except Exception:  # never let the watch end the run
                pass

    def end(self) -> tuple[float, int]:
        """CPU seconds seen; the number of the part's processes still running after LEFTOVER_WAIT_S, killed."""
        self.halt.set()
        self.join(timeout=5)
        if not self.usable:
            return 0.0, 0
        left, waited = self.scan(), 0.0
        while left and waited < LEFTOVER_WAIT_S:
            time.sleep(0.5)
            waited += 0.5
            left = self.scan()
        killed = len(left)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid, _ in left:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            if left:
                time.sleep(2.0)
                left = self.scan()
        return sum(self.cpu.values()), killed


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_part(name: str, cmd: list[str], log: Path, cap: float, env: dict[str, str]) -> dict[str, Any]:
    """gpu_step.run_part (the cap, the log, the kill at the cap), with the part's CPU time, the load average
    before and after, its leftover processes ended, and a failed part's log tail."""
    load, cpu0 = os.getloadavg(), _children_cpu()
    watch = PartProcesses()
    watch.start()
    try:
        part = gpu_step.run_part(name, cmd, log, cap, env)
    finally:
        polled, killed = watch.end()
    part["cpu_s"] = round(max(polled, _children_cpu() - cpu0), 1)
    part["ray_instances"], part["ray_instances_at_once"] = len(watch.gcs), watch.ray_max
    part["load_before"], part["load_after"] = [round(x, 2) for x in load], [round(x, 2) for x in os.getloadavg()]
    if killed:
        part["leftover_killed"] = killed
    if part["status"] != "ok" and log.is_file():
        part["log_tail"] = log.read_text(errors="replace").splitlines()[-40:]
    print(f"[gpu] {name}: {part['status']}, {part['wall_s']:.0f}s wall, {part['cpu_s']:.0f}s CPU, "
          f"{part['ray_instances']} Ray instance(s) ({part['ray_instances_at_once']} at most at once), load "
          f"{part['load_before'][0]:.1f} -> {part['load_after'][0]:.1f}" + (f", {killed} leftover processes killed"
                                                                           if killed else ""), flush=True)
    return part


# ----------------------------------------------------------------------------------------------------
# the parts' commands


def has_flag(script: Path, flag: str) -> bool:
    return script.is_file() and flag in script.read_text(errors="replace")


def commands(args, work: Path, data_root: Path, device: str) -> dict[str, list[str] | None]:
    s, py, b = args.sizes, sys.executable, REPO / "benchmarks"
    out = {
        "style_stats": [py, str(b / "style_stats.py"), "--skip-naive", "--workers", "1", "--images", str(s["style_images"]),
                        "--side", "32", "--gpu-side", str(s["style_side"]), "--batch-size", "32", "--dim", "128",
                        "--data-dir", str(work / "style_data"), "--json", str(work / "style_stats.json")],
        "descriptor_precision": [py, str(b / "descriptor_precision.py"), "--image-size", str(s["precision_side"]),
                                 "--data", str(data_root), "--precisions", "fp32", "bf16", "fp32",
                                 "--device", device, "--json", str(work / "descriptor_precision.json")],
        "mining": [py, str(b / "mining.py"), "--n", *map(str, s["mining_n"]), "--image-size", "32",
                   "--fit-sample", str(s["mining_fit"]), "--sample", str(s["mining_sample"]),
                   "--exact-all-max", str(max(s["mining_n"])), "--shards", "2", "--approx", "ivf",
                   "--timing-only-n", *map(str, s["mining_timing_n"]), "--dim", str(s["mining_dim"]),
                   "--json", str(work / "mining.json")],
        "knn_torch": [py, str(Path(__file__).resolve()), "--child", "knn_torch", "--device", device,
                      "--child-json", str(work / "knn_torch.json"), *(["--dry-run"] if args.dry_run else [])],
        "stage1": [py, str(b / "stage1.py"), "--workers", "1", "--num-train", str(s["stage1_train"]),
                   "--num-val", str(s["stage1_val"]), "--image-size", str(s["stage1_side"]),
                   "--epochs", str(s["stage1_epochs"]), "--batch-size", str(s["stage1_batch"]),
                   *[x for item in s["stage1_set"] for x in ("--set", item)], "--out", str(work / "stage1.json")],
        "memory": [py, str(b / "memory.py"), "--device", device, "--sizes", *map(str, s["mem_sizes"]),
                   "--modes", "plain", "bf16", "--batches", *map(str, s["mem_batches"]), "--steps", str(s["mem_steps"]),
                   "--json", str(work / "memory.json")],
    }
    if s["precision_images"]:  # the first N photos (0: all 500)
        out["descriptor_precision"] += ["--images", str(s["precision_images"])]
    if s["mem_base_channels"] != 64:  # 64: the official networks, memory.py's default
        out["memory"] += ["--base-channels", str(s["mem_base_channels"])]
    if has_flag(b / "style_stats.py", '"--rounds"'):  # its newer form alternates rounds; one is enough here
        out["style_stats"] += ["--rounds", "1"]
    gen = b / "generator_step.py"
    if gen.is_file():
        out["generator"] = [py, str(gen), "--variants", "ours_v4", "bicycle_v0", "--image-size", str(s["gen_side"]),
                            "--batch-size", str(s["gen_batch"]), "--steps", str(s["gen_steps"]), "--warmup",
                            str(s["gen_warmup"]), "--device", device, "--precision", "fp32", "bf16",
                            "--json", str(work / "generator_step.json")]
        for flag, value in (("--rounds", "1"), ("--images", str(s["gen_images"])), ("--data", str(data_root))):
            if has_flag(gen, f'"{flag}"'):
                out["generator"] += [flag, value]
        if not s["gen_profile"] and has_flag(gen, '"--no-profile"'):
            out["generator"].append("--no-profile")
        if args.dry_run and has_flag(gen, '"--set"'):
            out["generator"] += [x for item in DRY_GENERATOR_SET for x in ("--set", item)]
    else:
        out["generator"] = None
    return out


# ----------------------------------------------------------------------------------------------------
# knn_torch: the brute-force reference (its own process, like every part)


def stand_in(n: int, dim: int = 128, styles: int = 32, seed: int = 1):
    """mining.py's stand-in database: a Gaussian mixture of `styles` centres in `dim` dimensions."""
    import numpy as np

    mix = np.random.default_rng(seed)
    centres = mix.standard_normal((styles, dim)).astype(np.float32) * 3.0
    return centres[mix.integers(0, styles, n)] + mix.standard_normal((n, dim)).astype(np.float32)


def torch_knn(x, k_close: int, k_far: int, device: str, block: int = 4096):
    """Each row's k_close nearest (itself excluded) and k_far furthest, exact, fp32, in blocks of queries."""
    import torch

    xs = torch.from_numpy(x).to(device)
    norms = (xs * xs).sum(1)
    close, far = [], []
    for start in range(0, len(xs), block):
        q = xs[start:start + block]
        d = norms[start:start + block, None] + norms[None] - 2.0 * (q @ xs.T)
        d[torch.arange(len(q), device=device), torch.arange(start, start + len(q), device=device)] = float("inf")
        close.append(d.topk(k_close, dim=1, largest=False).indices)
        d[torch.arange(len(q), device=device), torch.arange(start, start + len(q), device=device)] = -float("inf")
        far.append(d.topk(k_far, dim=1, largest=True).indices)
    return torch.cat(close).cpu().numpy(), torch.cat(far).cpu().numpy()


def knn_child(args) -> dict[str, Any]:
    import numpy as np
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32, as FAISS's flat index
    sizes = args.sizes["mining_timing_n"]
    out: dict[str, Any] = {"device": device, "method": "torch brute force (fp32 mm + topk, 4,096-query blocks)",
                           "k_close": 5, "k_far": 13, "dim": 128, "levels": []}

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    torch_knn(stand_in(2048), 5, 13, device)  # warm-up: kernels, allocator
    sync()
    for n in sizes:
        x = stand_in(n)
        sync()
        t = time.perf_counter()
        torch_knn(x, 5, 13, device)
        sync()
        seconds = time.perf_counter() - t
        # one n x n x 128 product (2 n^2 d FLOP) serves both the nearest and the furthest
        out["levels"].append({"n": n, "seconds": round(seconds, 3), "tflops": round(2.0 * n * n * 128 / seconds / 1e12, 3)})
        print(f"[knn_torch] n={n}: {seconds:.3f}s", flush=True)
    # FAISS on the GPU (faiss-gpu-cu12 through the cuBLAS stand-in) against the exact torch answer
    check: dict[str, Any] = {}
    try:
        import faiss

        check["faiss"] = faiss.__version__
        check["faiss_gpus"] = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
        if check["faiss_gpus"]:
            x = stand_in(20000, seed=3)
            res = faiss.StandardGpuResources()
            index = faiss.GpuIndexFlatL2(res, x.shape[1])
            index.add(x)
            _, ids = index.search(x, 6)
            close, _ = torch_knn(x, 5, 13, device)
            got = [set(r[r != i][:5]) for i, r in enumerate(ids)]
            check["faiss_gpu_flat_recall_vs_torch"] = float(np.mean([len(g & set(c)) / 5 for g, c in zip(got, close)]))
            t = time.perf_counter()
            index.search(x, 6)
            check["faiss_gpu_flat_20k_search_s"] = round(time.perf_counter() - t, 4)
    except Exception as exc:  # recorded, not fatal: mining's own part says what FAISS did
        check["error"] = repr(exc)[:300]
    out["faiss_check"] = check
    print(f"[knn_torch] faiss check: {check}", flush=True)
    return out


# ----------------------------------------------------------------------------------------------------
# reading the parts' results


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def json_lines(log: Path) -> list[dict]:
    """The JSON objects a script printed one a line (memory.py's rows, stage1.py's rows): a part killed at
    its cap still has those."""
    rows = []
    for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def results_style_stats(work: Path, log: Path) -> dict[str, Any]:
    r = read_json(work / "style_stats.json")
    if not r:
        return {}

    def run(x):
        return None if not x else {
            "device": x.get("device"), "side": x.get("side", r.get("side")), "images": x.get("images"),
            "images_per_s_pipeline": finite(x.get("images_per_second_pipeline")),
            "images_per_s_end_to_end": finite(x.get("images_per_second_end_to_end")),
            "images_per_s_steady": finite(x.get("steady_images_per_second")),
            "peak_gpu_mib": max([v / 2**20 for v in (x.get("peak_gpu_bytes_per_worker") or {}).values() if v] or [0]) or None}

    cpu = r.get("ray") or ((r.get("rounds") or [{}])[0].get("ray")) or [None]  # before / after its rounds
    return {"vgg_weights": r.get("vgg_weights"), "cpu_32px": run(cpu[0]),
            "gpu_fp32": run(r.get("ray_gpu")), "bf16_pipeline": "not run: style_stats.py has no --precision flag"}


def results_descriptor_precision(work: Path, log: Path) -> dict[str, Any]:
    r = read_json(work / "descriptor_precision.json")
    if not r:
        return {}
    rows = {row["precision"]: row for row in r.get("results") or []}  # the last fp32 pass wins: the warm one
    out: dict[str, Any] = {"device": r.get("device"), "image_size": r.get("image_size"), "images": r.get("images"),
                           "vgg_weights": r.get("vgg_weights")}
    for p, row in rows.items():
        out[p] = {"images_per_s": finite(r["images"] / row["seconds"]) if row.get("seconds") else None,
                  "seconds": finite(row.get("seconds")), **{k: finite(v) for k, v in row.items()
                                                            if k.startswith(("recall", "far_precision", "rel_err", "nearest"))}}
    return out


def results_mining(work: Path, log: Path) -> dict[str, Any]:
    r = read_json(work / "mining.json")
    if not r:
        return {}
    levels = [{"n": lv["n"], "stand_in": False, "runs": [{k: run.get(k) for k in ("index", "shards", "seconds", "gpu",
                                                                                    "close_recall", "far_precision")}
                                                          for run in lv["runs"]]} for lv in r.get("levels") or []]
    levels += [{"n": lv["n"], "stand_in": True, "runs": [{k: run.get(k) for k in ("index", "shards", "seconds")}
                                                         for run in lv["runs"]]} for lv in r.get("timing_only") or []]
    gpus = r.get("faiss_gpus") or 0
    return {"faiss_gpus": gpus, "backend": "faiss-gpu" if gpus else "faiss (CPU)", "levels": levels,
            "k_close": r["args"]["k_close"], "k_far": r["args"]["k_far"], "dim": r["args"]["dim"]}


def results_knn_torch(work: Path, log: Path) -> dict[str, Any]:
    return read_json(work / "knn_torch.json") or {}


def results_stage1(work: Path, log: Path) -> dict[str, Any]:
    r = read_json(work / "stage1.json")
    rows = (r or {}).get("rows") or [row for row in json_lines(log) if "triplets_per_s" in row]
    if not rows:
        return {}
    row = rows[0]
    return {"workers": row.get("workers"), "device": row.get("device"), "triplets_per_s": finite(row.get("triplets_per_s")),
            "images_per_s": finite(row.get("images_per_s")), "epoch_seconds": finite(row.get("epoch_seconds")),
            "wall_seconds": finite(row.get("wall_seconds")), "machine": (r or {}).get("machine")}


def results_generator(work: Path, log: Path) -> dict[str, Any]:
    r = read_json(work / "generator_step.json")
    if not r:
        return {}
    out = {}
    for key, s in (r.get("summary") or {}).items():
        out[key] = {"images_per_s": finite(s.get("images_per_s")), "images_per_s_with_data": finite(s.get("images_per_s_with_data")),
                    "peak_memory_mib": finite(s.get("peak_memory_mib")),
                    "parts_ms": {k: finite(v) for k, v in (s.get("parts_ms") or {}).items()}}
    return {"runs": out, "args": r.get("args")}


def results_memory(work: Path, log: Path) -> dict[str, Any]:
    r = read_json(work / "memory.json")
    rows = (r or {}).get("rows") or [row for row in json_lines(log) if "size" in row and "mode" in row]
    if not rows:
        return {}
    keep = ("size", "mode", "batch", "peak_mib", "growth_mib", "images_per_s", "step_s", "oom", "memory_vs_plain",
            "speed_vs_plain", "error")
    return {"rows": [{k: row[k] for k in keep if k in row} for row in rows]}


READERS = {"style_stats": results_style_stats, "descriptor_precision": results_descriptor_precision,
           "mining": results_mining, "knn_torch": results_knn_torch, "stage1": results_stage1,
           "generator": results_generator, "memory": results_memory}


# ----------------------------------------------------------------------------------------------------
# the tables


def _n(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if finite(value) is not None else "–"


def markdown(report: dict[str, Any]) -> str:
    m, r = report["machine"], report["results"]
    gpu = m.get("gpu") or "none (CPU)"
    lines = [f"# GPU run (issue 22): style statistics, mining, stage 1, generator, memory — {report['date']}"
             f"{' (DRY RUN, CPU, tiny sizes: the code path, not the numbers)' if report['dry_run'] else ''}", "",
             f"- when: {report['started_utc']} UTC; machine: {gpu}" + (f" ({m.get('gpu_memory_gib')} GiB)" if m.get("gpu") else "")
             + f", {m['cpus']} CPUs; torch {m['torch']} (CUDA {m.get('cuda')}), Ray {m.get('ray')}, faiss {m.get('faiss')} "
             f"(GPUs seen by faiss: {m.get('faiss_gpus')}), Python {m['python']}",
             f"- wall time: {report['total_wall_s']:.0f} s in all (cap {report['settings']['budget_s']:.0f} s); CPU time of the "
             f"parts' processes: {sum(p.get('cpu_s') or 0 for p in report['parts']):.0f} s", "",
             "## Parts", "", "| part | status | wall s | CPU s | load before → after | cap s | note |",
             "|---|---|---|---|---|---|---|"]
    for p in report["parts"]:
        load = f"{p['load_before'][0]:.1f} → {p['load_after'][0]:.1f}" if p.get("load_before") else "–"
        lines.append(f"| {p['part']} | {p['status']} | {p['wall_s']:.1f} | {_n(p.get('cpu_s'))} | {load} | {p['cap_s']:.0f} | "
                     f"{str(p.get('error', '')).replace('|', '/')[:120]} |")
    st, dp = r.get("style_stats") or {}, r.get("descriptor_precision") or {}
    lines += ["", "## Style statistics", "", "| run | device | px | images | images/s (pipeline) | images/s (steady) | "
              "images/s (end to end) |", "|---|---|---|---|---|---|---|"]
    for name in ("cpu_32px", "gpu_fp32"):
        x = st.get(name)
        if x:
            lines.append(f"| Ray Data pipeline, {name} | {x['device']} | {x['side']} | {x['images']} | "
                         f"{_n(x['images_per_s_pipeline'])} | {_n(x['images_per_s_steady'])} | {_n(x['images_per_s_end_to_end'])} |")
    for p in ("fp32", "bf16"):
        x = dp.get(p)
        if x:
            lines.append(f"| StyleDescriptorModel {p} (model only) | {dp['device']} | {dp['image_size']} | {dp['images']} | "
                         f"{_n(x['images_per_s'])} | – | – |")
    b = dp.get("bf16") or {}
    rk = next((k for k in b if k.startswith("recall@")), None)
    fk = next((k for k in b if k.startswith("far_precision@")), None)
    if rk:
        lines += ["", f"bf16 against fp32 ({dp['images']} facades, {dp.get('vgg_weights')}): {rk} {_n(b[rk], 3)}, "
                      f"{fk} {_n(b.get(fk), 3)}, distance rel. error mean {_n(b.get('rel_err_mean'), 5)} "
                      f"(max {_n(b.get('rel_err_max'), 5)}); {st.get('bf16_pipeline', '')}"]
    mi, kn = r.get("mining") or {}, r.get("knn_torch") or {}
    lines += ["", f"## Mining (k_close {mi.get('k_close', 5)} nearest + k_far {mi.get('k_far', 13)} furthest of every vector, "
                  f"d = {mi.get('dim', 128)}; {mi.get('backend', '–')})", "", "| n | database | index | shards | seconds |",
              "|---|---|---|---|---|"]
    for lv in mi.get("levels") or []:
        for run in lv["runs"]:
            lines.append(f"| {lv['n']} | {'stand-in' if lv['stand_in'] else 'VGG descriptors'} | {run['index']} | "
                         f"{run['shards']} | {_n(run['seconds'], 2)} |")
    for lv in kn.get("levels") or []:
        lines.append(f"| {lv['n']} | stand-in | torch brute force ({kn['device']}, {lv['tflops']} TFLOP/s) | 1 | "
                     f"{_n(lv['seconds'], 3)} |")
    if kn.get("faiss_check"):
        lines += ["", f"FAISS check: {json.dumps(kn['faiss_check'])}"]
    s1 = r.get("stage1") or {}
    lines += ["", "## Stage 1 (one worker)", "", "| device | triplets/s | images/s | epoch s | wall s |", "|---|---|---|---|---|",
              f"| {s1.get('device', '–')} | {_n(s1.get('triplets_per_s'))} | {_n(s1.get('images_per_s'))} | "
              f"{_n(s1.get('epoch_seconds'), 2)} | {_n(s1.get('wall_seconds'))} |"]
    g = r.get("generator") or {}
    lines += ["", "## Generator train_step", ""]
    if g.get("status") == "missing":
        lines.append("missing: benchmarks/generator_step.py is not in this tree")
    else:
        lines += ["| run | images/s (step) | images/s (with data) | peak MiB | ms per part |", "|---|---|---|---|---|"]
        for key, x in (g.get("runs") or {}).items():
            parts = ", ".join(f"{k} {v:.0f}" for k, v in x["parts_ms"].items() if v is not None)
            lines.append(f"| {key} | {_n(x['images_per_s'], 2)} | {_n(x['images_per_s_with_data'], 2)} | "
                         f"{_n(x['peak_memory_mib'], 0)} | {parts or '–'} |")
    mem = r.get("memory") or {}
    lines += ["", "## Memory (one stage-3 step)", "", "| px | mode | batch | peak MiB | images/s |", "|---|---|---|---|---|"]
    for row in mem.get("rows") or []:
        lines.append(f"| {row['size']} | {row['mode']} | {row['batch']} | "
                     + ("OOM / failed | |" if row.get("oom") else f"{_n(row.get('peak_mib'), 0)} | {_n(row.get('images_per_s'), 2)} |"))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------


def machine(device: str) -> dict[str, Any]:
    info = gpu_step.machine_info()
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_gpus"] = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception as exc:
        info["faiss"], info["faiss_gpus"] = f"import failed: {exc!r}"[:200], 0
    info["device"] = device
    return info


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child == "knn_torch":
        result = knn_child(args)
        Path(args.child_json).write_text(json.dumps(result, indent=1) + "\n")
        return result
    t0 = time.perf_counter()
    started = _dt.datetime.now(_dt.timezone.utc)
    date = started.strftime("%Y-%m-%d")
    deadline = t0 + args.budget_s
    import torch

    device = args.device or ("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="gpu_bench_")).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out_dir or (work / "results" if args.dry_run else REPO / "benchmarks" / "results")).resolve()
    tag = args.tag or (f"gpu_dryrun_{date}" if args.dry_run else f"gpu_{date}")
    data_root = Path(args.data_root or gpu_step.default_data_root()).resolve()
    if not (data_root / "train").is_dir() or not (data_root / "val").is_dir():
        raise SystemExit(f"gpu: no facades at {data_root} (train/ and val/): pass --data-root")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each part starts its own Ray where it needs one
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    env.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a GPU machine
    info = machine(device)
    print(f"[gpu] work folder {work}; data {data_root}; device {device}; tables -> {out_dir}/{tag}.*", flush=True)
    print(f"[gpu] machine: {json.dumps(info)}", flush=True)

    cmds = commands(args, work, data_root, device)
    parts: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for name in args.parts:
        log = work / "logs" / f"{name}.log"
        if cmds[name] is None:
            parts.append({"part": name, "status": "missing", "wall_s": 0.0, "cap_s": 0.0,
                          "error": f"benchmarks/{'generator_step' if name == 'generator' else name}.py not in this tree"})
            results[name] = {"status": "missing"}
            continue
        cap = min(args.caps[name], deadline - time.perf_counter() - RESERVE_S)
        part = run_part(name, cmds[name], log, cap, env)
        parts.append(part)
        try:
            results[name] = READERS[name](work, log) if log.is_file() else {}
        except Exception as exc:  # a result file of another shape: the part's log says more
            results[name] = {"read_error": repr(exc)[:300]}
        results[name]["status"] = part["status"]
    report = {"date": date, "started_utc": started.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": args.dry_run, "machine": info,
              "work_dir": str(work), "settings": {"budget_s": args.budget_s, "caps": args.caps, "sizes": args.sizes,
                                                  "data_root": str(data_root), "device": device},
              "commands": {k: " ".join(v[1:]) if v else None for k, v in cmds.items()}, "parts": parts, "results": results}
    report["total_wall_s"] = round(time.perf_counter() - t0, 1)
    gpu_step.write_report(report, markdown(report), parts, out_dir, tag, "gpu", log_lines=120)
    return report


if __name__ == "__main__":
    main()
