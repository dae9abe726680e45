"""What limits stage 1 on facades? Triplet-trained linear codes of frozen-VGG features, beside the PCA ceiling.

    python experiments/stage1_hypotheses.py --data ../shared/data/facades --image-size 64 \
        --out experiments/results/stage1_heads_facades64.json

The conv encoder trained from scratch reaches 0.65 / 0.44 held-out (triplet-order accuracy / rank
correlation) after 100 epochs on the 400 photos, and 0.72 / 0.63 even when regressed onto the PCA codes
directly (experiments/stage1_fit.py, stage1_distill.py). This script separates the two things a stage-1
encoder must get right: the *signal* (do triplets mined as docs/method.md §3 says determine the global order?) and
the *representation* (which image features let a small head reach it?). Every head here is an 8-dim linear
map (plus bias) trained with the stage-1 loss (margin 0.1, L2 0.01, Adam 1e-3, β (0, 0.99); for the
32-channel sketch also lr 1e-4, and margin 0.01 with L2 0.001: configs/facades.yaml's choice) on features
computed once per image (no flips), for `--steps` steps; triplets are mined from the exact distances of the
train photos (positive among the k_c closest, negative among the k_f furthest). Features:

- `pca-32`: the exact style descriptors projected on their 32 leading principal directions (train fit):
  the oracle input, so what it reaches is the ceiling of the triplet signal itself;
- `sketch-k`: the Gram matrices of a fixed random k-channel sketch of each VGG layer (the vgg_gram encoder);
- `stats`: per-channel mean and standard deviation of each layer (AdaIN statistics).

Scores as stage1_fit.py: random triplets of distinct images of a split whose exact order is not a tie;
accuracy = agreement of ‖z_a − z_b‖ < ‖z_a − z_c‖ with it; rank correlation = Spearman over all pairs.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from step_ray import storage
from step_ray.data.pix2pix import list_split, load_target, to_tensor
from step_ray.losses import triplet_loss
from step_ray.models import EncoderConfig
from step_ray.recipes.stage1 import held_out_triplets
from step_ray.style.encode import build_encoder
from step_ray.style.gram import style_descriptor
from step_ray.style.vgg import VGGConfig, load_vgg, vgg_weight_source

from stage1_fit import ordering, squared_distances  # experiments/ is the script's folder


def features(vgg, images: torch.Tensor, sketches: dict[int, torch.nn.Module]) -> dict[str, np.ndarray]:
    out: dict[str, list] = {"v": [], "stats": [], **{f"sketch-{k}": [] for k in sketches}}
    with torch.no_grad():
        for i in range(0, len(images), 25):
            f = vgg(images[i : i + 25])
            out["v"].append(style_descriptor(f).double())
            out["stats"].append(torch.cat([torch.cat([t.mean((2, 3)), t.std((2, 3))], 1) for t in f], 1))
            for k, s in sketches.items():
                out[f"sketch-{k}"].append(s(images[i : i + 25]))
    return {name: torch.cat(parts).numpy() for name, parts in out.items()}


def train_head(x: dict[str, np.ndarray], order: np.ndarray, kc: int, kf: int, steps: int, batch: int,
               seed: int = 0, margin: float = 0.1, l2: float = 0.01, lr: float = 1e-3) -> torch.nn.Linear:
    """A linear 8-dim code trained with the stage-1 triplet loss on fixed features (train split)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    xt = torch.as_tensor(x["train"], dtype=torch.float32)
    n = len(order)
    head = torch.nn.Linear(xt.shape[1], 8)
    opt = torch.optim.Adam(head.parameters(), lr, betas=(0.0, 0.99))
    for _ in range(steps):
        a = rng.integers(0, n, batch)
        p = order[a, 1 + rng.integers(0, kc, batch)]
        q = order[a, n - 1 - rng.integers(0, kf, batch)]
        loss, _ = triplet_loss(head(xt[a]), head(xt[p]), head(xt[q]), margin, l2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--direction", default="BtoA")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--sketch", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    started = time.perf_counter()
    vgg_cfg = VGGConfig()
    vgg = load_vgg(vgg_cfg)
    sketches = {
        k: build_encoder(EncoderConfig(backbone="vgg_gram", sketch_channels=k)).features[0] for k in args.sketch
    }
    split = {}
    for name in ("train", "val"):
        images = to_tensor(
            np.stack([load_target(f, args.direction, args.image_size) for f in list_split(args.data, name)])
        )
        split[name] = features(vgg, images, sketches)
        split[name]["exact"] = squared_distances(split[name]["v"])
        split[name]["triplets"] = held_out_triplets(split[name]["exact"], 2000, seed=0)
    v_mean = split["train"]["v"].mean(0)
    centred = split["train"]["v"] - v_mean
    eigval, eigvec = np.linalg.eigh(centred @ centred.T)
    comps = centred.T @ eigvec[:, np.argsort(eigval)[::-1][:32]]
    comps /= np.linalg.norm(comps, axis=0, keepdims=True)
    for name in split:
        split[name]["pca-32"] = (split[name]["v"] - v_mean) @ comps
    result = {
        "data": args.data,
        "image_size": args.image_size,
        "vgg": vgg_weight_source(vgg_cfg),
        "steps": args.steps,
        "ceiling_pca8": {
            s: ordering(split[s]["pca-32"][:, :8], split[s]["exact"], split[s]["triplets"]) for s in split
        },
        "rows": [],
    }
    print("PCA-8 ceiling", json.dumps(result["ceiling_pca8"]), flush=True)
    order = np.argsort(split["train"]["exact"], 1)
    for feature in ["pca-32", *(f"sketch-{k}" for k in args.sketch), "stats"]:
        train = split["train"][feature]
        mean, scale = train.mean(0), train.std(0).mean()  # what the vgg_gram encoder's FeatureCentre does
        x = {s: (split[s][feature] - mean) / scale for s in split}
        raw = {s: ordering(split[s][feature], split[s]["exact"], split[s]["triplets"]) for s in split}
        # (k_c, k_f, batch, margin, L2 weight, lr); the last: margin and L2 both 10x smaller (configs/facades.yaml)
        settings = [(5, 200, 12, 0.1, 0.01, 1e-3), (50, 200, 12, 0.1, 0.01, 1e-3), (50, 200, 48, 0.1, 0.01, 1e-3)]
        if feature == "sketch-32":
            settings += [(50, 200, 48, 0.1, 0.01, 1e-4), (50, 200, 48, 0.01, 0.001, 1e-4)]
        for kc, kf, batch, margin, l2, lr in settings:
            head = train_head(x, order, kc, kf, args.steps, batch, margin=margin, l2=l2, lr=lr)
            with torch.no_grad():
                codes = {s: head(torch.as_tensor(x[s], dtype=torch.float32)).numpy() for s in split}
            scores = {s: ordering(codes[s], split[s]["exact"], split[s]["triplets"]) for s in split}
            row = {"feature": feature, "dims": int(train.shape[1]), "k_close": kc, "k_far": kf, "batch": batch,
                   "margin": margin, "l2_weight": l2, "lr": lr, "val_mean_z_sq": float((codes["val"] ** 2).mean()),
                   "untrained_features": raw, **scores}
            result["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "untrained_features"}), flush=True)
    result["seconds"] = time.perf_counter() - started
    if args.out:
        storage.write_json(args.out, result)


if __name__ == "__main__":
    main()
