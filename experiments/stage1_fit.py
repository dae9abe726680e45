"""Does a stage-1 encoder underfit or overfit the style distance? Its triplet-order accuracy and rank
correlation on training images against held-out ones, beside the linear ceiling (PCA-k of the exact
descriptors, fitted on the training images) on both.

    python experiments/stage1_fit.py --checkpoint runs/stage1-.../checkpoint_epoch0099 \
        --data ../shared/data/facades --direction BtoA --image-size 64 --out experiments/results/stage1_fit.json

Train and val are scored the same way: random triplets (a, b, c) of distinct images of that split whose
exact order d(a,b) vs d(a,c) is not a tie; accuracy is how often ‖z_a − z_b‖ < ‖z_a − z_c‖ agrees with it,
rank correlation is Spearman's between all pairwise code distances and the exact distances.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from step_ray import storage
from step_ray.data.pix2pix import list_split, load_target, to_tensor
from step_ray.recipes.stage1 import held_out_triplets
from step_ray.style.encode import encode
from step_ray.style.gram import style_descriptor
from step_ray.style.vgg import VGGConfig, load_vgg, vgg_weight_source


def descriptors(vgg, images: np.ndarray, weights) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([style_descriptor(vgg(to_tensor(images[i : i + 16])), weights).double()
                          for i in range(0, len(images), 16)])


def squared_distances(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64)
    sq = (v * v).sum(1)
    d = np.clip(sq[:, None] + sq[None, :] - 2 * v @ v.T, 0, None)
    np.fill_diagonal(d, 0)
    return d


def ordering(codes: np.ndarray, exact: np.ndarray, triplets: np.ndarray) -> dict[str, float]:
    dz = squared_distances(codes)
    a, b, c = triplets.T
    iu = np.triu_indices(len(codes), 1)
    return {"triplet_acc": float(((dz[a, b] < dz[a, c]) == (exact[a, b] < exact[a, c])).mean()),
            "rank_corr": float(spearmanr(dz[iu], exact[iu]).statistic)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--direction", default="BtoA")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--train-images", type=int, default=0, help="0: all")
    parser.add_argument("--triplets", type=int, default=2000)
    parser.add_argument("--pca", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    started = time.perf_counter()
    vgg_cfg = VGGConfig()
    vgg = load_vgg(vgg_cfg)
    splits = {}
    for split in ("train", "val"):
        files = list_split(args.data, split)
        files = files[: args.train_images] if split == "train" and args.train_images else files
        images = np.stack([load_target(f, args.direction, args.image_size) for f in files])
        v = descriptors(vgg, images, vgg_cfg.resolved_layer_weights())
        exact = squared_distances(v.numpy())
        splits[split] = {"images": images, "v": v.numpy(), "exact": exact,
                         "triplets": held_out_triplets(exact, args.triplets, seed=0)}
    mean = splits["train"]["v"].mean(0)
    # PCA by the Gram trick on the centred train descriptors (n << dims)
    x = splits["train"]["v"] - mean
    eigval, eigvec = np.linalg.eigh(x @ x.T)
    order = np.argsort(eigval)[::-1]
    result = {"checkpoint": args.checkpoint, "data": args.data, "image_size": args.image_size,
              "vgg": vgg_weight_source(vgg_cfg), "images": {k: len(s["images"]) for k, s in splits.items()}}
    for split, s in splits.items():
        row = {"encoder": ordering(encode(s["images"], args.checkpoint), s["exact"], s["triplets"])}
        for k in args.pca:
            comps = x.T @ eigvec[:, order[:k]]
            comps /= np.linalg.norm(comps, axis=0, keepdims=True)
            row[f"pca{k}"] = ordering((s["v"] - mean) @ comps, s["exact"], s["triplets"])
        result[split] = row
        print(split, json.dumps(row), flush=True)
    result["seconds"] = time.perf_counter() - started
    if args.out:
        storage.write_json(args.out, result)


if __name__ == "__main__":
    main()
