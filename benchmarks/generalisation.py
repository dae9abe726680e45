"""Generalisation (docs/method.md §9): one generator variant trained on facades with style encoders pre-trained on
different datasets, one table. Each input is a sweep experiment folder (jobs/sweep.py: its trials.csv)
whose trials differ only in `trial.encoder_checkpoint`, labelled by where that E was pre-trained:

    python benchmarks/generalisation.py --variant ours_v4 \
        --sweep "runs/sweeps/ablation-facades64:facades (the target set)" \
        --sweep "runs/sweeps/generalisation-synthetic-E:synthetic shared_palette set" \
        --encoder <facades stage-1 checkpoint> --encoder <synthetic stage-1 checkpoint> \
        --data ../shared/data/facades --direction BtoA --image-size 64 \
        --out benchmarks/results/generalisation_facades64.md

Columns: how well each E orders the target set's styles (held-out triplet-order accuracy and rank
correlation of ‖z_a − z_b‖ with the exact VGG style distance on its val split, as stage 1 validates;
`--encoder`, one per sweep, in the same order), then mean ± std over the seeds of PSNR and LPIPS of
G(A, E(B)) against B, PSNR with another photo's code (and the margin: how much G uses the code), the
diversity over reference codes and over IMLE mapper samples.
"""
from __future__ import annotations

import argparse
import csv
import io
import math

import numpy as np
import torch

from step_ray import storage
from step_ray.data.pix2pix import DataConfig, list_split, load_target, to_tensor
from step_ray.pipelines.pretrain import exact_val_distances
from step_ray.recipes.stage1 import held_out_triplets, style_order_metrics
from step_ray.style.encode import encode, load_encoder
from step_ray.style.statistics import StyleStatsConfig

COLUMNS = (("psnr", "PSNR ↑", 2), ("lpips", "LPIPS ↓", 3), ("psnr_other_style", "PSNR, another photo's code", 2),
           ("margin", "margin (dB) ↑", 3), ("diversity_refs", "div. refs ↑", 3), ("diversity_mapper", "div. samples ↑", 3))


def read_trials(folder: str, variant: str) -> list[dict[str, float]]:
    """The evaluated trials of `variant` in a sweep's trials.csv, with margin = PSNR − PSNR other style."""
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(storage.join(folder, "trials.csv")).decode())))
    out = []
    for row in rows:
        if row["variant"] != variant or row.get("evaluated") not in ("True", "true", "1"):
            continue
        values = {k: float(row[k]) if row.get(k) not in (None, "") else math.nan
                  for k in ("psnr", "lpips", "psnr_other_style", "diversity_refs", "diversity_mapper")}
        values["margin"] = values["psnr"] - values["psnr_other_style"]
        values["seed"] = int(row["seed"])
        out.append(values)
    return out


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


def cell(values: list[float], digits: int) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "–"
    mean = f"{np.mean(values):.{digits}f}"
    return mean + (f" ± {np.std(values):.{digits}f}" if len(values) > 1 else "")


def table(groups: list[tuple[str, list[dict[str, float]]]], variant: str, order: list[dict[str, float]] | None = None) -> str:
    head = ["E pre-trained on"] + (["E's style order on facades val (acc / rho)"] if order else []) + \
        [title for _, title, _ in COLUMNS] + ["seeds"]
    lines = [f"Generalisation: {variant} trained on facades, E pre-trained on each set", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (label, trials) in enumerate(groups):
        cells = [label] + ([f"{order[i]['order_acc']:.3f} / {order[i]['order_rho']:.3f}"] if order else []) + [cell([t[key] for t in trials], digits) for key, _, digits in COLUMNS]
        cells.append(", ".join(str(t["seed"]) for t in sorted(trials, key=lambda t: t["seed"])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
    text = table(groups, args.variant, order)
    print(text)
    if args.out:
        storage.write_bytes(args.out, text.encode())


if __name__ == "__main__":
    main()
