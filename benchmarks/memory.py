"""Peak memory and images/s of one generator training step at 256 and 512 px: plain, with activation
checkpointing, and (on a GPU) bf16/fp16 autocast.

    python benchmarks/memory.py --sizes 256 512 --batches 1 2 4 --modes plain checkpointing --json /tmp/memory.json
    python benchmarks/memory.py --modes plain checkpointing bf16 bf16+checkpointing fp16   # on a GPU

Each (size, mode, batch) runs in a fresh process, so its peak is its own: the stage-3 step of
step_ray.recipes.generator.train_step (one D step and one G+E step: the official U-Net G with z at every
layer, 64 base channels, 2-scale PatchGAN D, E trained, the VGG-16 perceptual loss on five layers, EMA),
`--steps` timed steps after one warm-up step. Memory: on CUDA `torch.cuda.max_memory_allocated`; on CPU the
process's peak resident set (ru_maxrss) and its growth over the resident set after building the networks
(activations, gradients, optimiser state). A batch that does not fit is reported as OOM and larger ones
are skipped. VGG and all networks are randomly initialised: the cost does not depend on the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import harness

NUM_DOWNS = {64: 6, 128: 7, 256: 8, 512: 9}


def one(size: int, mode: str, batch: int, steps: int, device: str, threads: int, vgg_loss: bool = True,
        base_channels: int = 64) -> dict:
    """Runs inside the child process."""
    import resource

    import torch

    from step_ray.models import DiscriminatorConfig, EncoderConfig, GeneratorConfig
    from step_ray.style.vgg import VGGConfig, load_vgg
    from step_ray.losses.perceptual import OFFICIAL_LAYER_WEIGHTS
    from step_ray.engine.precision import MixedPrecision
    from step_ray.recipes.generator import (
        GeneratorTraining,
        apply_activation_checkpointing,
        build_networks,
        make_optimizers,
        train_step,
    )

    torch.set_num_threads(threads)
    precision = next((p for p in ("bf16", "fp16") if p in mode), "fp32")
    cfg = GeneratorTraining(
        train_encoder=True,
        encoder=EncoderConfig(base_channels=base_channels),
        generator=GeneratorConfig(num_downs=NUM_DOWNS[size], base_channels=base_channels),
        discriminator=DiscriminatorConfig(base_channels=base_channels),
        vgg=VGGConfig(layer_weights=OFFICIAL_LAYER_WEIGHTS),
        precision=precision,
        activation_checkpointing="checkpointing" in mode,
        batch_size=batch,
        lambda_vgg=0.02 if vgg_loss else 0.0,
        lambda_l1=0.0 if vgg_loss else 10.0,
    )
    dev = torch.device(device)
    torch.manual_seed(0)
    nets = build_networks(cfg, dev)
    opt_g, opt_d = make_optimizers(cfg, nets, None, dev)
    vgg = load_vgg(cfg.vgg, dev) if vgg_loss else None
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(cfg, nets, vgg)
    amp = MixedPrecision(precision, dev)
    a = torch.rand(batch, 3, size, size, device=dev) * 2 - 1
    b = torch.rand(batch, 3, size, size, device=dev) * 2 - 1
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        train_step(cfg, nets, opt_g, opt_d, a, b, vgg, 0, amp)  # warm-up (allocator, optimiser state)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for step in range(steps):
            logs = train_step(cfg, nets, opt_g, opt_d, a, b, vgg, step + 1, amp)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    except torch.OutOfMemoryError:
        return {"size": size, "mode": mode, "batch": batch, "oom": True}
    out = {"size": size, "mode": mode, "batch": batch, "oom": False, "precision": amp.name,
           "images_per_s": batch * steps / seconds, "step_s": seconds / steps, "loss_g": logs["loss_g"]}
    if dev.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out.update(peak_mib=peak, growth_mib=peak - rss_built)
    return out


def child(args, size: int, mode: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{size},{mode},{batch}", "--steps", str(args.steps),
           "--device", args.device, "--threads", str(args.threads), "--base-channels", str(args.base_channels)]
    cmd += ["--no-vgg"] if args.no_vgg else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"size": size, "mode": mode, "batch": batch, "oom": True,
                                              "error": proc.stderr.strip().splitlines()[-1:]}


def against_plain(rows: list[dict]) -> None:
    """Each mode against plain at the same size and batch, measured in this run."""
    for row in rows:
        base = next((r for r in rows if r["size"] == row["size"] and r["batch"] == row["batch"] and r["mode"] == "plain"
                     and not r.get("oom")), None)
        if base and not row.get("oom"):
            row["memory_vs_plain"] = row["peak_mib"] / base["peak_mib"]
            if "growth_mib" in row:
                row["growth_vs_plain"] = row["growth_mib"] / base["growth_mib"]
            row["speed_vs_plain"] = row["images_per_s"] / base["images_per_s"]


def markdown(rows: list[dict]) -> str:
    lines = ["| size | mode | batch | images/s | step s | peak MiB | growth MiB | memory × plain | speed × plain |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("oom"):
            lines.append(f"| {r['size']} | {r['mode']} | {r['batch']} | OOM | | | | | |")
            continue
        lines.append(f"| {r['size']} | {r['mode']} | {r['batch']} | {r['images_per_s']:.2f} | {r['step_s']:.2f} | "
                     f"{r['peak_mib']:.0f} | {r.get('growth_mib', float('nan')):.0f} | "
                     f"{r.get('growth_vs_plain', r.get('memory_vs_plain', float('nan'))):.2f} | "
                     f"{r.get('speed_vs_plain', float('nan')):.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--modes", nargs="+", default=["plain", "checkpointing"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="", help="cuda | cpu (default: cuda where torch sees one)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--no-vgg", action="store_true", help="L1 reconstruction instead of the VGG loss (G, D, E only)")
    p.add_argument("--base-channels", type=int, default=64,
                   help="G's, D's and E's base filters (64: the official networks; fewer: a quick smoke run)")
    p.add_argument("--json", default="", help="write the record (command, date, machine, figures) here")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.device:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        size, mode, batch = args.child.split(",")
        print(
            "RESULT "
            + json.dumps(
                one(
                    int(size),
                    mode,
                    int(batch),
                    args.steps,
                    args.device,
                    args.threads,
                    not args.no_vgg,
                    args.base_channels,
                )
            ),
            flush=True,
        )
        return None
    rows = []
    for size in args.sizes:
        for mode in args.modes:
            for batch in sorted(args.batches):
                rows.append(child(args, size, mode, batch))
                print(json.dumps(rows[-1]), flush=True)
                if rows[-1].get("oom"):
                    break  # larger batches do not fit either
    against_plain(rows)
    print(markdown(rows))
    rec = harness.record({"device": args.device, "vgg_loss": not args.no_vgg, "base_channels": args.base_channels,
                          "steps": args.steps, "rows": rows})
    harness.write(args.json, rec)
    return rec


if __name__ == "__main__":
    main()
