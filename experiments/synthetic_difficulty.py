"""How hard is a synthetic style set? Untrained-encoder k-NN, exact-VGG k-NN, and a short stage 1.

    OMP_NUM_THREADS=1 python experiments/synthetic_difficulty.py                       # the default set
    OMP_NUM_THREADS=1 python experiments/synthetic_difficulty.py design=hue            # the hue design
    OMP_NUM_THREADS=1 python experiments/synthetic_difficulty.py --train-epochs 12                  # + a stage 1

Arguments are `key=value` overrides of SyntheticConfig (the set is generated to a temporary folder),
plus the options below. It reports, on the val images against the train images (k-NN, k = 5, by style id):

* `untrained`: codes of a freshly initialised StyleEncoder (the official from-scratch one), for several
  seeds: what stage 1 starts from. A set a random conv net already separates tests only plumbing.
* `exact VGG`: the exact (unreduced) VGG-16 Gram descriptors, whose squared L2 distance is the style
  distance stage 1 mines its triplets by: whether the style distance itself separates the styles.
* `trained` (with --train-epochs N > 0): an in-process stage 1 on the same set — exact-descriptor close
  (k_close nearest) and far (k_far furthest) sets, the TripletSampler, the triplet loss and the optimiser
  of Stage1Training's defaults, flips — k-NN after every epoch. The job mines on PCA-reduced descriptors with
  FAISS on Ray and seeds E through the engine; this is the same recipe without Ray, to iterate on a
  design in minutes (its numbers are close to the job's, not equal).

Measured (2026-12-01, 2-core CPU shared with other work, OMP_NUM_THREADS=1; 8 styles, 800 train / 160
val, 32 px): the default shared_palette design: untrained 0.400 0.312 0.406 0.425 0.375 0.319 (seeds
0-5), exact VGG 1.000, trained (k_far 700) 0.912 after 7 epochs and 0.956 after 10; the hue design:
untrained 0.950 0.956 0.988, exact VGG 1.000.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time

import numpy as np
import torch

from step_ray.config import load_config
from step_ray.data.pix2pix import DataConfig, load_split, to_tensor
from step_ray.data.synthetic import SyntheticConfig, generate_synthetic
from step_ray.engine.distributed import random_flip
from step_ray.losses import triplet_loss
from step_ray.mining import TripletSampler
from step_ray.pipelines.pretrain import PretrainJobConfig
from step_ray.models import StyleEncoder
from step_ray.recipes.stage1 import Stage1Training, encode_batches, knn_accuracy, knn_vote_accuracy
from step_ray.style.gram import descriptors_from_images
from step_ray.style.vgg import VGGConfig, load_vgg


def untrained_knn(train_x, train_y, val_x, val_y, seeds, k: int) -> list[float]:
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        net = StyleEncoder(Stage1Training().encoder)
        out.append(
            knn_accuracy(encode_batches(net, val_x, "cpu"), val_y, encode_batches(net, train_x, "cpu"), train_y, k)
        )
    return out


def vgg_descriptors(vgg, images: torch.Tensor, batch: int = 32) -> np.ndarray:
    return np.concatenate(
        [descriptors_from_images(vgg, images[i : i + batch]).numpy() for i in range(0, len(images), batch)]
    )


def sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return np.maximum((a64 * a64).sum(1)[:, None] + (b64 * b64).sum(1)[None] - 2 * a64 @ b64.T, 0)


def train_stage1(train_x, train_y, val_x, val_y, d_train: np.ndarray, epochs: int, k_close: int, k_far: int,
                 seed: int, k: int, max_steps: int = 0, lr: float = 0.0) -> list[dict]:
    cfg = Stage1Training(
        seed=seed, optim=dataclasses.replace(Stage1Training().optim, lr=lr) if lr else Stage1Training().optim
    )
    d = d_train.copy()
    np.fill_diagonal(d, np.inf)
    close = np.argsort(d, 1)[:, :k_close]
    np.fill_diagonal(d, -np.inf)
    far = np.argsort(-d, 1)[:, :k_far]
    pos_pure = float((train_y[close] == train_y[:, None]).mean())
    neg_other = float((train_y[far] != train_y[:, None]).mean())
    torch.manual_seed(seed)
    net = StyleEncoder(cfg.encoder)
    opt = cfg.optim.build(net.parameters())
    sampler = TripletSampler(close, far, seed=seed)
    history, step = [], 0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        triplets = sampler.epoch_triplets(epoch)
        net.train()
        losses, active = [], []
        for b in np.array_split(triplets, max(1, -(-len(triplets) // cfg.batch_size))):
            x = train_x[torch.from_numpy(b.reshape(-1))]
            if cfg.flip:  # each image its own flip, as the recipe does
                (x,) = random_flip(x)
            z = net(x).view(len(b), 3, -1)
            loss, logs = triplet_loss(z[:, 0], z[:, 1], z[:, 2], cfg.margin, cfg.l2_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(logs["loss"])
            active.append(logs["active_fraction"])
            step += 1
            if max_steps and step >= max_steps:
                break
        acc = knn_accuracy(encode_batches(net, val_x, "cpu"), val_y, encode_batches(net, train_x, "cpu"), train_y, k)
        history.append(
            {
                "epoch": epoch + 1,
                "steps": step,
                "loss": float(np.mean(losses)),
                "active": float(np.mean(active)),
                "val_knn_acc": acc,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        print(f"  epoch {epoch + 1}: loss {history[-1]['loss']:.4f} active {history[-1]['active']:.2f} "
              f"k-NN {acc:.3f} ({history[-1]['seconds']}s)", flush=True)
        if max_steps and step >= max_steps:
            break
    z_val, z_ref = encode_batches(net, val_x, "cpu"), encode_batches(net, train_x, "cpu")
    history[-1]["per_style_knn"] = {int(c): knn_accuracy(z_val[val_y == c], val_y[val_y == c], z_ref, train_y, k)
                                    for c in np.unique(val_y)}
    print(f"  per-style k-NN after the last epoch: {history[-1]['per_style_knn']}", flush=True)
    history[0]["positives_same_style"] = pos_pure
    history[0]["negatives_other_style"] = neg_other
    return history


def measure(
    cfg: SyntheticConfig,
    seeds=(0, 1, 2),
    k: int = 5,
    train_epochs: int = 0,
    k_close: int = 5,
    k_far: int = 0,
    max_steps: int = 0,
    lr: float = 0.0,
    train_seed: int = 0,
    vgg_cfg: VGGConfig = VGGConfig(),
) -> dict:
    """Generate `cfg` to a temporary folder and measure it (see the module docstring)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_synthetic(tmp, cfg)
        data = DataConfig(root=str(root), image_size=cfg.image_size)
        tr, va = load_split(data, "train"), load_split(data, "val")
    train_x, val_x = to_tensor(tr.b), to_tensor(va.b)
    train_y, val_y = np.asarray(tr.style_ids), np.asarray(va.style_ids)
    out: dict = {"config": cfg.__dict__, "k": k}
    out["untrained_knn"] = untrained_knn(train_x, train_y, val_x, val_y, seeds, k)
    print(f"untrained E k-NN (seeds {list(seeds)}): {', '.join(f'{a:.3f}' for a in out['untrained_knn'])}", flush=True)
    vgg = load_vgg(vgg_cfg)
    t0 = time.perf_counter()
    dtr, dva = vgg_descriptors(vgg, train_x), vgg_descriptors(vgg, val_x)
    d_val_train = sq_distances(dva, dtr)
    out["exact_vgg_knn"] = knn_vote_accuracy(d_val_train, val_y, train_y, k)
    print(f"exact VGG descriptor k-NN: {out['exact_vgg_knn']:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    if train_epochs > 0:
        d_train = sq_distances(dtr, dtr)
        del dtr, dva
        default_far = PretrainJobConfig().mining.k_far  # the job's: 700 of 800
        far = k_far or (default_far if default_far < len(train_y) else len(train_y) // 2)
        out["trained"] = train_stage1(
            train_x, train_y, val_x, val_y, d_train, train_epochs, k_close, far, train_seed, k, max_steps, lr
        )
        print(f"mined positives of the same style {out['trained'][0]['positives_same_style']:.3f}, negatives of "
              f"another style {out['trained'][0]['negatives_other_style']:.3f}", flush=True)
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="SyntheticConfig key=value")
    parser.add_argument("--seeds", type=int, default=3, help="untrained encoders to measure (seeds 0..n-1)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--train-epochs", type=int, default=0, help="in-process stage-1 epochs (0: none)")
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--k-close", type=int, default=5)
    parser.add_argument("--k-far", type=int, default=0,
                        help="0: jobs/pretrain.py's (700), or half the train set where that is too many")
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.0, help="0: Stage1Training's default")
    parser.add_argument("--json", default="", help="also write the result here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = load_config(SyntheticConfig, None, args.overrides)
    print(f"synthetic set: {cfg}", flush=True)
    out = measure(
        cfg,
        tuple(range(args.seeds)),
        args.k,
        args.train_epochs,
        args.k_close,
        args.k_far,
        args.max_steps,
        args.lr,
        args.train_seed,
    )
    print(f"done in {out['seconds']}s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
