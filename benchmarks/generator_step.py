"""One generator `train_step` per variant, timed and split by part (G, D, E, VGG, optimiser, EMA), against
the official BicycleGAN PyTorch code (junyanz/BicycleGAN) at the same settings.

    git --git-dir <mirror of junyanz/BicycleGAN> archive HEAD -- '*.py' | tar -x -C /tmp/bicyclegan   (its code)
    python benchmarks/generator_step.py --variants bicycle_v0 --image-size 128 --batch-size 2 --steps 8 --warmup 2 \\
        --rounds 4 --official-repo /tmp/bicyclegan [--code <a checkout before a change>] \\
        --json benchmarks/results/generator_step_bicycle128_cpu.json
    python benchmarks/generator_step.py --variants ours_v4 bicycle_v0 --image-size 256 --batch-size 8 \\
        --steps 20 --warmup 3 --device cuda --precision fp32 bf16 --json OUT.json                (a GPU)

What is timed. step_ray: `step_ray.recipes.generator.train_step` (one D step, one G/E step, EMA) on batches
already on the device, facades pairs cropped as the recipe crops them (`pair_store`); "with data" also
times `ImageStore.batch` in the loop (its decode cache warm, as after the first epoch). Official:
`BiCycleGANModel.optimize_parameters` with its own options (`--netG unet_128 --netD basic_128_multi
--netD2 basic_128_multi --netE resnet_128` at 128 px, the 256 ones at 256 px; load size × 286/256; batch 2),
its data loader included in "with data" (its own `--num_threads` workers, decoding every image anew)
and excluded in "step". Each round runs every side in a fresh process, in turn (ours, official, ours,
official, ...; every other round in the reverse order: benchmarks/harness.py), so a noisy machine slows
both; the ratio is of the medians over rounds.

By part: one extra profiled run per variant (`torch.profiler`, a few steps). Every network's forward
runs inside a `part:<name>` range; a backward op is charged to the part whose forward op has its
autograd sequence number; `Optimizer.step`/`zero_grad` are the optimiser, `part:EMA` the EMA update;
the rest (loss arithmetic, concatenation, random codes) is "other". Times are self CPU time per step; the
record keeps the profile's total and its convolution backward time beside the parts.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parents[1]

PARTS = ("G", "D", "E", "VGG", "optimiser", "EMA", "other")
NET_PART = {"generator": "G", "generator_ema": "EMA", "discriminator": "D", "discriminator_random": "D", "encoder": "E"}
FACADES = ROOT.parent / "shared" / "data" / "facades"


# ----------------------------------------------------------------------------------------------------
# step_ray's side


def variant_config(name: str, image_size: int, overrides: list[str]):
    """The variant's resolved GeneratorTraining at `image_size` (overrides: dotted train.* keys)."""
    from step_ray.config import config_from_dict, dotted_to_tree, merge_trees, parse_override
    from step_ray.recipes.generator import GeneratorTraining, fit_to_image_size, resolve_reconstruction
    from step_ray.recipes.variants import variant_base

    extra = dotted_to_tree(dict(parse_override(o) for o in overrides))
    cfg = config_from_dict(GeneratorTraining, merge_trees(variant_base(name)["train"], extra), where=name)
    cfg = fit_to_image_size(cfg, image_size)
    cfg, _ = resolve_reconstruction(cfg)
    return cfg


def facades_store(cfg, image_size: int, images: int, root: str = ""):
    from step_ray.data.pix2pix import DataConfig, list_split
    from step_ray.data.store import pair_store

    data = DataConfig(root=root or str(FACADES), direction="BtoA", image_size=image_size)
    paths = list_split(data.root, "train")[:images]
    return pair_store(paths, data, 4096, cfg.resolved_load_size(image_size))


def build_step(cfg, device):
    """Networks, optimisers and the VGG of one stage, as GeneratorRecipe.initialise/prepare set them up."""
    from step_ray.recipes.generator import build_networks, freeze, make_optimizers

    try:
        from step_ray.recipes.generator import perceptual_vgg
    except ImportError:  # an older tree (--code) whose perceptual loss always loaded its own VGG
        from step_ray.style.vgg import load_vgg

        def perceptual_vgg(cfg, nets, device):
            return load_vgg(cfg.vgg, device) if cfg.lambda_vgg else None

    nets = build_networks(cfg, device)
    opt_g, opt_d = make_optimizers(cfg, nets, None, device)
    if not cfg.train_encoder:
        freeze(nets["encoder"])
    vgg = perceptual_vgg(cfg, nets, device)
    for name in ("generator", "discriminator", "discriminator_random"):
        if name in nets:
            nets[name].train()
    return nets, opt_g, opt_d, vgg


def label_parts(nets: dict, vgg) -> None:
    """Each network's forward inside a `part:<name>` profiler range."""
    from torch.profiler import record_function

    def wrap(module, label):
        forward = module.forward

        def labelled(*args, **kwargs):
            with record_function(f"part:{label}"):
                return forward(*args, **kwargs)
        module.forward = labelled

    for name, module in nets.items():
        wrap(module, NET_PART.get(name, "other"))
    if vgg is not None:
        wrap(vgg, "VGG")


def part_times(events, steps: int) -> dict[str, float]:
    """Self CPU ms per step by part, from a profiler's events (see the module docstring)."""
    def own_part(e):
        while e is not None:
            if e.name.startswith("part:"):
                return e.name[5:]
            if e.name.startswith("Optimizer."):
                return "optimiser"
            e = e.cpu_parent
        return None

    forward_part = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::engine::evaluate_function"):
            forward_part.setdefault((e.thread, e.sequence_nr), own_part(e) or "other")
    totals = dict.fromkeys(PARTS, 0.0)
    for e in events:
        part, node = None, e
        while node is not None and part is None:
            if node.name.startswith("autograd::engine::evaluate_function"):
                part = forward_part.get((node.fwd_thread, node.sequence_nr), "other")
            elif node.name.startswith("part:"):
                part = node.name[5:]
            elif node.name.startswith("Optimizer."):
                part = "optimiser"
            node = node.cpu_parent
        totals[part or "other"] += e.self_cpu_time_total / 1000.0
    return {k: v / steps for k, v in totals.items()}


def check_attribution() -> dict:
    """A "generator" conv feeding a "discriminator" conv, backward and an Adam step, profiled: the parts as
    part_times charges them, the convolutions' backward time and the profile's total (ms)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    g, d = torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.Conv2d(64, 1, 3, padding=1)
    label_parts({"generator": g, "discriminator": d}, None)
    opt = torch.optim.Adam([*g.parameters(), *d.parameters()])
    x = torch.randn(4, 3, 64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        d(g(x)).square().mean().backward()
        opt.step()
    events = prof.events()
    return {"parts_ms": part_times(events, 1), "total_ms": sum(e.self_cpu_time_total for e in events) / 1000,
            "convolution_backward_ms": sum(e.self_cpu_time_total for e in events
                                           if e.name == "aten::convolution_backward") / 1000}


def ours_worker(args) -> dict:
    """One side's round in this process: warm-up, then `steps` timed steps (and a profile with --profile)."""
    import numpy as np
    import torch

    from step_ray.engine.precision import MixedPrecision
    from step_ray.recipes.generator import train_step

    torch.manual_seed(0)
    device = torch.device(args.device)
    cfg = variant_config(args.variant, args.image_size, args.set)
    store = facades_store(cfg, args.image_size, args.images, args.data)
    nets, opt_g, opt_d, vgg = build_step(cfg, device)
    amp = MixedPrecision(args.precision, device)
    rng = np.random.default_rng(0)
    rows = [rng.choice(len(store), cfg.batch_size, replace=False) for _ in range(args.warmup + args.steps)]
    for r in rows:  # the decode cache warm, as after the first epoch
        store.batch(r, rng)
    batches = [tuple(t.to(device) for t in store.batch(r, rng)) for r in rows]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step = 0
    for a, b in batches[: args.warmup]:
        train_step(cfg, nets, opt_g, opt_d, a, b, vgg, step, amp)
        step += 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    for a, b in batches[args.warmup:]:
        train_step(cfg, nets, opt_g, opt_d, a, b, vgg, step, amp)
        step += 1
    sync()
    step_s = (time.perf_counter() - start) / args.steps
    cpu_s = (time.process_time() - cpu) / args.steps
    start = time.perf_counter()
    for r in rows[args.warmup:]:
        a, b = store.batch(r, rng)
        train_step(cfg, nets, opt_g, opt_d, a.to(device), b.to(device), vgg, step, amp)
        step += 1
    sync()
    with_data_s = (time.perf_counter() - start) / args.steps
    out = {"side": "step_ray", "variant": args.variant, "step_s": step_s, "with_data_s": with_data_s, "cpu_s": cpu_s,
           "images_per_s": cfg.batch_size / step_s, "images_per_s_with_data": cfg.batch_size / with_data_s,
           "batch_size": cfg.batch_size,
           "parameters_m": {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in nets.items()}}
    if device.type == "cuda":
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        label_parts(nets, vgg)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        n = min(args.steps, 4)
        with profile(activities=activities) as prof:
            for a, b in batches[:n]:
                train_step(cfg, nets, opt_g, opt_d, a, b, vgg, step, amp)
                step += 1
            sync()
        events = prof.events()
        out["parts_ms"] = part_times(events, n)
        out["profile_total_ms"] = sum(e.self_cpu_time_total for e in events) / 1000.0 / n
        out["convolution_backward_ms"] = sum(e.self_cpu_time_total for e in events
                                             if e.name == "aten::convolution_backward") / 1000.0 / n
    return out


# ----------------------------------------------------------------------------------------------------
# the official BicycleGAN code


def official_options(args) -> list[str]:
    size = "128" if args.image_size <= 128 else "256"
    return ["--dataroot", args.data or str(FACADES), "--name", "bench", "--checkpoints_dir", "/tmp/bicyclegan_bench",
            "--gpu_ids", "0" if args.device == "cuda" else "-1", "--direction", "BtoA",
            "--netG", f"unet_{size}", "--netD", f"basic_{size}_multi", "--netD2", f"basic_{size}_multi",
            "--netE", f"resnet_{size}", "--crop_size", str(args.image_size),
            "--load_size", str(int(round(args.image_size * 286 / 256))), "--batch_size", str(args.batch_size),
            "--max_dataset_size", str(args.images), "--display_id", "0"]


def official_worker(args) -> dict:
    import contextlib
    import io

    import torch

    sys.path.insert(0, args.official_repo)
    sys.argv = ["train.py", *official_options(args)]
    from data import create_dataset  # the official repo's packages
    from models import create_model
    from options.train_options import TrainOptions

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        opt = TrainOptions().parse()
        dataset = create_dataset(opt)
        model = create_model(opt)
        model.setup(opt)

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    def batches():
        while True:
            for data in dataset:
                yield data

    source = batches()
    cached = [next(source) for _ in range(args.warmup + args.steps)]
    for data in cached[: args.warmup]:
        model.set_input(data)
        model.optimize_parameters()
    sync()
    start, cpu = time.perf_counter(), time.process_time()
    for data in cached[args.warmup:]:
        model.set_input(data)
        model.optimize_parameters()
    sync()
    step_s = (time.perf_counter() - start) / args.steps
    cpu_s = (time.process_time() - cpu) / args.steps
    start = time.perf_counter()
    for _ in range(args.steps):  # its loader: decode, resize, crop in its worker processes
        model.set_input(next(source))
        model.optimize_parameters()
    sync()
    with_data_s = (time.perf_counter() - start) / args.steps
    params = {n: sum(p.numel() for p in getattr(model, f"net{n}").parameters()) / 1e6 for n in model.model_names}
    return {"side": "official", "variant": "bicycle_v0", "step_s": step_s, "with_data_s": with_data_s, "cpu_s": cpu_s,
            "images_per_s": args.batch_size / step_s, "images_per_s_with_data": args.batch_size / with_data_s,
            "batch_size": args.batch_size, "parameters_m": params}


# ----------------------------------------------------------------------------------------------------
# the driver


def run_side(args, side: str, variant: str, precision: str, profile: bool, code: str = "", extra=()) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", side, "--_variant", variant,
           "--_precision", precision, "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--images", str(args.images),
           "--device", args.device, "--data", args.data, "--official-repo", args.official_repo,
           *(["--profile"] if profile else []), *(["--_code", code] if code else []),
           *[x for s in [*args.set, *extra] for x in ("--set", s)]]
    tree = code or str(ROOT)
    env = {**os.environ, "PYTHONPATH": tree}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tree)
    if done.returncode:
        raise RuntimeError(f"{side} {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def variant_settings(args, variant: str) -> list[str]:
    """The per-run settings every variant gets: the batch, and the official networks' shape at this size
    (BicycleGAN's U-Net depth: 7 at 128 px, 8 at 256; its D depth: basic_128 = 2 layers, basic_256 = 3)."""
    depth = {128: 7, 256: 8}.get(args.image_size)
    out = [f"batch_size={args.batch_size}"]
    if depth:
        out.append(f"generator.num_downs={depth}")
    if variant == "bicycle_v0" and args.image_size in (128, 256):
        out.append(f"discriminator.n_layers={2 if args.image_size == 128 else 3}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["bicycle_v0"])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=64, help="facades training pairs the batches are drawn from")
    p.add_argument(
        "--data", default="", help="the facades folder (train/ of A|B pairs); default ../shared/data/facades"
    )
    p.add_argument("--device", default="", help="cuda | cpu (default: cuda where torch sees one)")
    p.add_argument("--precision", nargs="+", default=["fp32"])
    p.add_argument("--official-repo", default="", help="a checkout of junyanz/BicycleGAN's .py files; empty: not run")
    p.add_argument(
        "--set", action="append", default=[], help="extra train.* override for every variant, e.g. ema_decay=0"
    )
    p.add_argument("--code", default="", help="also run step_ray's side from this tree (e.g. a checkout of the commit "
                                              "before a change), as the row '<variant> <precision> @code'")
    p.add_argument("--code-set", action="append", default=[], help="extra override for the --code rows only")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--check-attribution", action="store_true",
                   help="profile two convolutions and an Adam step, write how their time is charged (what the by-part "
                        "table relies on) and stop")
    p.add_argument("--json", default="", help="write the record (command, date, machine, figures) here")
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--_variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--_precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--_code", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        worker(args)
        return None
    if args.check_attribution:
        rec = harness.record(check_attribution())
        harness.write(args.json, rec)
        return rec
    if not args.device:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    runs, profiles = measure(args)
    summary = summarise(runs)
    print(markdown(args, summary, profiles))
    figures = {"settings": {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "json"},
               "summary": summary, "profiles": profiles, "runs": runs}
    rec = harness.record(figures)
    harness.write(args.json, rec)
    return rec


def worker(args) -> None:
    """One side's round in this process; its result is the last line printed."""
    if args._code:  # step_ray from that tree, not this one
        sys.path.insert(0, args._code)
    args.variant, args.precision = args._variant, args._precision
    if args._worker == "official":
        result = official_worker(args)
    else:
        args.set = variant_settings(args, args.variant) + args.set
        result = ours_worker(args)
    print(json.dumps(result))


def sides(args) -> dict:
    """Every (variant, precision) of step_ray, its @code twin, and the official code, one callable each."""
    out = {}
    for variant in args.variants:
        for precision in args.precision:
            key = f"{variant} {precision}"
            out[key] = lambda v=variant, p=precision, k=key: run_side(
                args, "ours", v, p, profile=args.profile_next.pop(k, False)
            )
            if args.code:
                out[f"{key} @code"] = lambda v=variant, p=precision: run_side(
                    args, "ours", v, p, profile=False, code=args.code, extra=args.code_set
                )
    if "bicycle_v0" in args.variants and args.official_repo and "fp32" in args.precision:
        out["official"] = lambda: run_side(args, "official", "bicycle_v0", "fp32", profile=False)
    return out


def measure(args) -> tuple[dict, dict]:
    """The sides in alternating rounds, each run in a fresh process; the first of each step_ray side profiled."""
    sides_ = sides(args)
    args.profile_next = {k: not args.no_profile for k in sides_ if "@code" not in k and k != "official"}
    runs, profiles = {}, {}
    for key in harness.order(list(sides_), args.rounds):
        r = sides_[key]()
        if "parts_ms" in r:
            profiles[key] = {"parts_ms": r.pop("parts_ms"), "total_ms": r.pop("profile_total_ms"),
                             "convolution_backward_ms": r.pop("convolution_backward_ms")}
        runs.setdefault(key, []).append(r)
        harness.log(f"{key}: {r['images_per_s']:.2f} img/s step, {r['images_per_s_with_data']:.2f} with data")
    return runs, profiles


def summarise(runs: dict) -> dict:
    def med(key, field):
        return harness.median([r[field] for r in runs[key]])

    summary = {}
    for key, rs in runs.items():
        s = summary[key] = {
            "images_per_s": med(key, "images_per_s"),
            "images_per_s_with_data": med(key, "images_per_s_with_data"),
            "cpu_s_per_image": med(key, "cpu_s") / rs[0]["batch_size"],
            "parameters_m": rs[0]["parameters_m"],
        }
        if "peak_memory_mib" in rs[0]:
            s["peak_memory_mib"] = max(r["peak_memory_mib"] for r in rs)
        if "official" in runs and key != "official":
            s["x_official_step"] = s["images_per_s"] / med("official", "images_per_s")
            s["x_official_with_data"] = s["images_per_s_with_data"] / med("official", "images_per_s_with_data")
            s["x_official_cpu"] = med("official", "cpu_s") / runs["official"][0]["batch_size"] / s["cpu_s_per_image"]
    return summary


def markdown(args, summary: dict, profiles: dict) -> str:
    lines = [
        f"{args.image_size} px, batch {args.batch_size}, {args.steps} steps x {args.rounds} rounds, {args.device}",
        "",
        "| run | images/s (step) | images/s (with data) | CPU s per image (step) | × official (step) | "
        "× official (with data) | × official (CPU s) | parameters (M) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, s in summary.items():
        params = ", ".join(f"{k} {v:.2f}" for k, v in s["parameters_m"].items())
        ratio = [
            f"{s[k]:.2f}" if k in s else "–" for k in ("x_official_step", "x_official_with_data", "x_official_cpu")
        ]
        lines.append(
            f"| {key} | {s['images_per_s']:.2f} | {s['images_per_s_with_data']:.2f} | {s['cpu_s_per_image']:.2f} | "
            f"{' | '.join(ratio)} | {params} |"
        )
    if profiles:
        lines += [
            "",
            "| run (ms per step, self CPU) | " + " | ".join(PARTS) + " | total |",
            "|---|" + "---|" * (len(PARTS) + 1),
        ]
        for key, prof in profiles.items():
            parts = prof["parts_ms"]
            lines.append(
                f"| {key} | " + " | ".join(f"{parts[k]:.0f}" for k in PARTS) + f" | {sum(parts.values()):.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
