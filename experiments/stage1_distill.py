"""Can the style encoder E represent the style distance at all? Train it to regress the PCA-k codes of
the exact style descriptors (fitted on the training images) instead of the triplet loss, for a fixed
budget, and score its triplet order on train and val images as experiments/stage1_fit.py does.

If E fits the linear codes (≈ the PCA ceiling on train), the triplet signal is what limits stage 1; if it
cannot fit even them, E's architecture or optimisation is.

    python experiments/stage1_distill.py --data ../shared/data/facades --image-size 64 --epochs 30 \
        --out experiments/results/stage1_distill_facades64.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from step_ray import storage
from step_ray.data.pix2pix import list_split, load_target, to_tensor
from step_ray.models import EncoderConfig, StyleEncoder
from step_ray.recipes.stage1 import held_out_triplets
from step_ray.style.vgg import VGGConfig, load_vgg, vgg_weight_source

from stage1_fit import descriptors, ordering, squared_distances  # experiments/ is the script's folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--direction", default="BtoA")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--pca", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--flip", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    vgg_cfg = VGGConfig()
    vgg = load_vgg(vgg_cfg)
    splits = {}
    for split in ("train", "val"):
        images = np.stack([load_target(f, args.direction, args.image_size) for f in list_split(args.data, split)])
        v = descriptors(vgg, images, vgg_cfg.resolved_layer_weights()).numpy()
        exact = squared_distances(v)
        splits[split] = {"images": images, "v": v, "exact": exact, "triplets": held_out_triplets(exact, 2000, seed=0)}
    mean = splits["train"]["v"].mean(0)
    x = splits["train"]["v"] - mean
    eigval, eigvec = np.linalg.eigh(x @ x.T)
    comps = x.T @ eigvec[:, np.argsort(eigval)[::-1][: args.pca]]
    comps /= np.linalg.norm(comps, axis=0, keepdims=True)
    codes = {s: (d["v"] - mean) @ comps for s, d in splits.items()}
    scale = float(np.abs(codes["train"]).std())  # targets of unit spread; distances keep their order
    target = torch.as_tensor(codes["train"] / scale, dtype=torch.float32)
    encoder = StyleEncoder(EncoderConfig(nz=args.pca))
    opt = torch.optim.Adam(encoder.parameters(), lr=args.lr, betas=(0.0, 0.99))
    train_x = to_tensor(splits["train"]["images"])
    history = []
    for epoch in range(args.epochs):
        encoder.train()
        order = torch.randperm(len(train_x))
        total = 0.0
        for i in range(0, len(order), args.batch):
            rows = order[i : i + args.batch]
            xb = train_x[rows]
            if args.flip:
                flip = (torch.rand(len(xb)) < 0.5)[:, None, None, None]
                xb = torch.where(flip, xb.flip(3), xb)
            loss = (encoder(xb) - target[rows]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
        entry = {"epoch": epoch, "mse": total / len(order)}
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            encoder.eval()
            with torch.no_grad():
                for split, d in splits.items():
                    z = torch.cat(
                        [encoder(to_tensor(d["images"][i : i + 64])) for i in range(0, len(d["images"]), 64)]
                    ).numpy()
                    entry[split] = ordering(z, d["exact"], d["triplets"])
        history.append(entry)
        print(json.dumps(entry), flush=True)
    result = {"data": args.data, "image_size": args.image_size, "vgg": vgg_weight_source(vgg_cfg), "pca": args.pca,
              "epochs": args.epochs, "batch": args.batch, "lr": args.lr, "flip": args.flip,
              "ceiling": {s: ordering(c, splits[s]["exact"], splits[s]["triplets"]) for s, c in codes.items()},
              "history": history, "seconds": time.perf_counter() - started}
    print("ceiling", json.dumps(result["ceiling"]), flush=True)
    if args.out:
        storage.write_json(args.out, result)


if __name__ == "__main__":
    main()
