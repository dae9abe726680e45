"""Why does stage 3 collapse? Stage 2 once, then stage 3 from that same state under each candidate fix,
in one process (the generator recipe's own `train_step`; no Ray), on facades labels -> photo.

    python experiments/stage3_drift.py --encoder runs/stage1-.../checkpoint_epoch0099 --stage2-steps 150 \
        --stage3-steps 100 --out experiments/results/stage3_drift_facades64.json

Every `--every` stage-3 steps, on 64 val pairs: PSNR of G_ema(A, E(B)) (what validation reports), of
G_ema(A, E_ema(B)) where an E_ema exists, of the live G(A, E(B)), the margin over another photo's code,
mean z² of E's val codes and how far they moved from the stage-2 codes (relative L2).

Candidates (docs/method.md §5 leaves them open): `base` (E in G's optimiser at G's lr 1e-3, β (0, 0.99));
`e_lr_0.1` (E's group at a tenth of G's lr); `z_l2` (mean z² penalty 0.01 anchoring the codes' scale);
`encoder_ema` (an E_ema beside G_ema, the pair evaluated together); `frozen` (stage 2 continued: the
reference a working stage 3 should at least match).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time

import numpy as np
import torch

from step_ray import storage
from step_ray.data.pix2pix import DataConfig, list_split
from step_ray.data.store import pair_store
from step_ray.eval.metrics import other_style_rows, psnr
from step_ray.recipes.generator import (GeneratorTraining, build_networks, ema_decay_at, fit_to_image_size, freeze,
                                        make_optimizers, train_step, update_ema)
from step_ray.style.encode import encoder_config_of, load_encoder
from step_ray.style.vgg import load_vgg

CANDIDATES = ("frozen", "base", "e_lr_0.1", "z_l2", "encoder_ema")


@torch.no_grad()
def measure(nets: dict, e_ema, val_a, val_b, other, z0) -> dict[str, float]:
    e, g_ema, g = nets["encoder"], nets["generator_ema"], nets["generator"]
    was = e.training, g.training
    e.eval(), g.eval()
    z, z_other = e(val_b), e(val_b[other])
    out = {"psnr_ema": psnr(g_ema(val_a, z), val_b).mean().item(),
           "psnr_ema_other": psnr(g_ema(val_a, z_other), val_b).mean().item(),
           "psnr_live": psnr(g(val_a, z), val_b).mean().item(),
           "z_sq": z.pow(2).mean().item(), "z_moved": ((z - z0).norm() / z0.norm()).item()}
    out["margin_ema"] = out["psnr_ema"] - out["psnr_ema_other"]
    if e_ema is not None:
        ze, ze_other = e_ema(val_b), e_ema(val_b[other])
        out["psnr_ema_pair"] = psnr(g_ema(val_a, ze), val_b).mean().item()
        out["margin_ema_pair"] = out["psnr_ema_pair"] - psnr(g_ema(val_a, ze_other), val_b).mean().item()
    e.train(was[0]), g.train(was[1])
    return {k: round(v, 4) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True, help="stage-1 checkpoint")
    p.add_argument("--data", default="../shared/data/facades")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--stage2-steps", type=int, default=150)
    p.add_argument("--stage3-steps", type=int, default=100)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    p.add_argument("--out", default="")
    args = p.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    data = DataConfig(root=args.data, direction="BtoA", image_size=args.image_size)
    cfg2 = fit_to_image_size(GeneratorTraining(encoder=encoder_config_of(args.encoder), batch_size=args.batch),
                             args.image_size)
    nets = build_networks(cfg2, "cpu")
    nets["encoder"].load_state_dict(load_encoder(args.encoder).state_dict())
    freeze(nets["encoder"])
    opt_g, opt_d = make_optimizers(cfg2, nets, None, "cpu")
    vgg = load_vgg(cfg2.vgg)
    store = pair_store(list_split(args.data, "train"), data, 1024, cfg2.resolved_load_size(args.image_size))
    val_a, val_b = pair_store(list_split(args.data, "val"), data, 0).batch(np.arange(64))
    other = other_style_rows(-np.ones(64, np.int64), 0)
    rng = np.random.default_rng(0)

    def batch():
        return store.batch(rng.choice(len(store.paths), args.batch, replace=False), rng)

    for step in range(args.stage2_steps):
        train_step(cfg2, nets, opt_g, opt_d, *batch(), vgg, step)
    with torch.no_grad():
        z0 = nets["encoder"].eval()(val_b)
    after2 = measure(nets, None, val_a, val_b, other, z0)
    print("stage 2", json.dumps(after2), flush=True)
    saved = copy.deepcopy(nets), opt_g.state_dict(), opt_d.state_dict(), rng.bit_generator.state
    result = {
        "encoder": args.encoder,
        "image_size": args.image_size,
        "batch": args.batch,
        "stage2_steps": args.stage2_steps,
        "stage3_steps": args.stage3_steps,
        "vgg": vgg.weight_source,
        "after_stage2": after2,
        "candidates": {},
    }
    for name in args.candidates:
        nets = copy.deepcopy(saved[0])
        rng.bit_generator.state = saved[3]
        cfg3 = dataclasses.replace(cfg2, train_encoder=name != "frozen", lambda_z_l2=0.01 if name == "z_l2" else 0.0)
        opt_g = cfg3.optim_g.build(nets["generator"].parameters())
        opt_g.load_state_dict(saved[1])
        opt_d = cfg3.optim_d.build(nets["discriminator"].parameters())
        opt_d.load_state_dict(saved[2])
        if cfg3.train_encoder:
            nets["encoder"].requires_grad_(True).train()
            opt_g.add_param_group({"params": list(nets["encoder"].parameters()),
                                   "lr": cfg3.optim_g.lr * (0.1 if name == "e_lr_0.1" else 1.0)})
        e_ema = copy.deepcopy(nets["encoder"]).requires_grad_(False).eval() if name == "encoder_ema" else None
        history = []
        for step in range(args.stage3_steps):
            t = args.stage2_steps + step
            train_step(cfg3, nets, opt_g, opt_d, *batch(), vgg, t)
            if e_ema is not None:
                update_ema(e_ema, nets["encoder"], ema_decay_at(cfg3, t))
            if (step + 1) % args.every == 0:
                history.append({"step": step + 1, **measure(nets, e_ema, val_a, val_b, other, z0)})
                print(name, json.dumps(history[-1]), flush=True)
        result["candidates"][name] = history
    result["seconds"] = time.perf_counter() - started
    if args.out:
        storage.write_json(args.out, result)


if __name__ == "__main__":
    main()
