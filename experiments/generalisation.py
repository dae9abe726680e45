"""Generalisation (docs/method.md §9): one generator variant trained on facades with style encoders pre-trained on
different datasets, one table. Each input is a sweep experiment folder (jobs/sweep.py: its trials.csv)
whose trials differ only in `trial.encoder_checkpoint`, labelled by where that E was pre-trained:

    python experiments/generalisation.py --variant ours_v4 \
        --sweep "runs/sweeps/ablation-facades64:facades (the target set)" \
        --sweep "runs/sweeps/generalisation-synthetic-E:synthetic shared_palette set" \
        --encoder <facades stage-1 checkpoint> --encoder <synthetic stage-1 checkpoint> \
        --data ../shared/data/facades --direction BtoA --image-size 64 \
        --out docs/results/generalisation_facades64.md

Columns (step_ray.eval.generalisation): how well each E orders the target set's styles (held-out triplet-order
accuracy and rank correlation of ‖z_a − z_b‖ with the exact VGG style distance on its val split, as stage 1 validates;
`--encoder`, one per sweep, in the same order), then mean ± std over the seeds of PSNR and LPIPS of
G(A, E(B)) against B, PSNR with another photo's code (and the margin: how much G uses the code), the
diversity over reference codes and over IMLE mapper samples.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from step_ray import storage
from step_ray.data.pix2pix import DataConfig, list_split, load_target, to_tensor
from step_ray.eval.generalisation import generalisation_table, read_trials
from step_ray.pipelines.pretrain import exact_val_distances
from step_ray.recipes.stage1 import held_out_triplets, style_order_metrics
from step_ray.style.encode import encode, load_encoder
from step_ray.style.statistics import StyleStatsConfig


def style_order(checkpoints: list[str], root: str, direction: str, image_size: int) -> list[dict[str, float]]:
    """Each E's held-out triplet-order accuracy and rank correlation on the val split of `root`: stage 1's
    own validation (its exact distances, its 2,000 held-out triplets, its metrics)."""
    data = DataConfig(root=root, direction=direction, image_size=image_size)
    paths = list_split(root, "val")
    images = to_tensor(np.stack([load_target(f, direction, image_size, data.min_side) for f in paths]))
    exact = exact_val_distances(StyleStatsConfig(), paths, data)
    triplets = held_out_triplets(exact, 2000, seed=0)
    out = []
    for checkpoint in checkpoints:
        m = style_order_metrics(encode(images, load_encoder(checkpoint)), exact, triplets)
        out.append({"order_acc": m["val_triplet_acc"], "order_rho": m["val_rank_corr"]})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", action="append", required=True, help="experiment folder:label (repeat)")
    p.add_argument("--variant", default="ours_v4")
    p.add_argument("--encoder", action="append", default=[], help="each sweep's stage-1 checkpoint (same order)")
    p.add_argument("--data", default="", help="the target set (pix2pix layout) whose val split the Es order")
    p.add_argument("--direction", default="BtoA")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--out", default="")
    args = p.parse_args()
    if args.encoder and (len(args.encoder) != len(args.sweep) or not args.data):
        raise SystemExit("--encoder: one per --sweep, in the same order, with --data")
    groups = []
    for spec in args.sweep:
        folder, _, label = spec.partition(":")
        trials = read_trials(folder, args.variant)
        if not trials:
            raise SystemExit(f"{folder}: no evaluated {args.variant} trial in its trials.csv")
        groups.append((label or folder, trials))
    torch.manual_seed(0)
    order = style_order(args.encoder, args.data, args.direction, args.image_size) if args.encoder else None
    text = generalisation_table(groups, args.variant, order)
    print(text)
    if args.out:
        storage.write_bytes(args.out, text.encode())


if __name__ == "__main__":
    main()
