"""The generator's loss terms on real batches: is λ_rec · VGG comparable to the GAN term? (docs/method.md §5)

    python experiments/loss_balance.py --steps 40 --image-size 64 --json runs/bench_loss_balance.json

Stage-2 steps of the one generator trainer (no Ray: one process) on facades (labels → photo, 64 px,
batch 8, E frozen at its seeded random init: its weights do not change the scale of the terms), with the
default config: LSGAN weight 1, λ_rec = 0.02, VGG-16 post-ReLU relu1_2…relu5_2 with layer weights
1/32 … 1 and the activation scale of `train.vgg_scale`. At every step the same batch's VGG term is also
priced at the old scale 0.1 (torchvision-scale activations: ≈ 3,300× weaker) and L1 × 10 (the fallback),
so the three reconstruction terms are compared on identical outputs. Reports the mean of each term
over the first and the last `--window` steps.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


FACADES = Path(__file__).resolve().parents[2] / "shared" / "data" / "facades"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--data", default=str(FACADES))
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    import dataclasses

    import numpy as np
    import torch

    from step_ray.data.pix2pix import DataConfig, list_split
    from step_ray.losses import l1_loss
    from step_ray.losses.perceptual import vgg_perceptual_loss
    from step_ray.style.vgg import load_vgg
    from step_ray.data.store import pair_store
    from step_ray.recipes.generator import (
        GeneratorTraining,
        build_networks,
        fit_to_image_size,
        freeze,
        make_optimizers,
        train_step,
    )

    torch.manual_seed(0)
    data = DataConfig(root=args.data, direction="BtoA", image_size=args.image_size)
    cfg = fit_to_image_size(dataclasses.replace(GeneratorTraining(), batch_size=args.batch), args.image_size)
    nets = build_networks(cfg, "cpu")
    freeze(nets["encoder"])
    opt_g, opt_d = make_optimizers(cfg, nets, None, "cpu")
    vgg = load_vgg(cfg.vgg)
    store = pair_store(list_split(args.data, "train"), data, 1024, cfg.resolved_load_size(args.image_size))
    rng = np.random.default_rng(0)
    rows = []
    started = time.perf_counter()
    for step in range(args.steps):
        a, b = store.batch(rng.choice(len(store.paths), args.batch, replace=False), rng)
        logs = train_step(cfg, nets, opt_g, opt_d, a, b, vgg, step)
        with torch.no_grad():  # the same outputs priced three ways (G after this step's update: close enough)
            z = nets["encoder"](b)
            fake = nets["generator"](a, z)
            weights = cfg.vgg.resolved_layer_weights()
            official, _ = vgg_perceptual_loss(vgg, fake, b, weights, cfg.vgg_scale)
            old, _ = vgg_perceptual_loss(vgg, fake, b, weights, 0.1)
            l1, _ = l1_loss(fake, b)
        rows.append(
            {
                "step": step,
                "gan_g": logs["gan_g"],
                "loss_d": logs["loss_d"],
                "vgg_train": cfg.lambda_vgg * logs["vgg"],
                "vgg_official_scale": cfg.lambda_vgg * float(official),
                "vgg_scale_0.1": cfg.lambda_vgg * float(old),
                "l1_x10": 10 * float(l1),
            }
        )
        print(
            f"[loss_balance] step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in rows[-1].items() if k != "step"),
            flush=True,
        )

    def window(part):
        return {k: float(np.mean([r[k] for r in part])) for k in rows[0] if k != "step"}

    out = {"image_size": args.image_size, "batch": args.batch, "steps": args.steps, "vgg_scale": cfg.vgg_scale,
           "lambda_vgg": cfg.lambda_vgg, "vgg_weights": vgg.weight_source, "layers": list(cfg.vgg.layers),
           "seconds": time.perf_counter() - started, "machine": platform.processor() or platform.machine(),
           "first": window(rows[: args.window]), "last": window(rows[-args.window:]), "rows": rows}
    for name in ("first", "last"):
        w = out[name]
        print(
            f"[loss_balance] {name} {args.window} steps: GAN {w['gan_g']:.3f} | λ_rec·VGG at scale {cfg.vgg_scale:.2f} "
            f"{w['vgg_official_scale']:.3f} | at scale 0.1 {w['vgg_scale_0.1']:.2e} | L1×10 {w['l1_x10']:.3f}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
