"""Style descriptors in bf16/fp16 autocast against fp32: distance error and neighbour recall (docs/method.md §2-3).

    python experiments/descriptor_precision.py --image-size 64 --json runs/bench_descriptor_precision.json
    python experiments/descriptor_precision.py --image-size 32 --images 16 --device cpu     # a quick smoke run

The pipeline's own model (`step_ray.style.statistics.StyleDescriptorModel`, real VGG-16, post-ReLU layers,
unreduced 305,888-number descriptors) computes every facades photo (train + val, 500 images) once per
precision. Against fp32 it reports the relative error of all pairwise style distances, recall@k of each
anchor's k_close = 5 nearest and precision of its k_far furthest (k_far = 13), i.e. the sets mining
would draw triplets from. On CPU, bf16 autocast runs oneDNN's bf16 kernels (AVX-512-BF16/AMX where the
processor has them, emulated otherwise); on a GPU the same command measures the GPU's.
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
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--data", default=str(FACADES))
    p.add_argument("--images", type=int, default=0, help="the first N photos (train first, then val); 0: all")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--k-close", type=int, default=5)
    p.add_argument("--k-far", type=int, default=13)
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from step_ray.data.pix2pix import DataConfig, load_split
    from step_ray.style.statistics import StyleDescriptorModel
    from step_ray.style.vgg import VGGConfig

    data = DataConfig(root=args.data, direction="BtoA", image_size=args.image_size)
    parts = []
    for split in ("train", "val"):
        left = args.images - sum(len(x) for x in parts) if args.images else None
        if left is None or left > 0:
            parts.append(load_split(data, split, limit=left).b)
    images = np.concatenate(parts)
    if len(images) <= max(args.k_close, args.k_far):
        raise SystemExit(f"descriptor_precision: {len(images)} images, need more than max(k_close, k_far) = "
                         f"{max(args.k_close, args.k_far)}")
    desc, seconds = {}, {}
    for precision in args.precisions:
        model = StyleDescriptorModel(VGGConfig(), None, args.device, torch.get_num_threads(), precision)
        started = time.perf_counter()
        desc[precision] = np.concatenate([model.descriptors(images[i : i + 32]) for i in range(0, len(images), 32)])
        seconds[precision] = time.perf_counter() - started
        weights = model.vgg.weight_source

    def sq_distances(x):
        x = torch.from_numpy(x).double()
        n = (x * x).sum(1)
        return (n[:, None] + n[None] - 2 * x @ x.T).clamp_min(0).numpy()

    ref = sq_distances(desc["fp32"])
    off = ~np.eye(len(ref), dtype=bool)
    order = np.argsort(np.where(off, ref, np.inf), 1)
    ref_close = order[:, : args.k_close]
    ref_far = np.argsort(np.where(off, -ref, np.inf), 1)[:, : args.k_far]
    rows = []
    for precision in args.precisions:
        d = sq_distances(desc[precision])
        rel = np.abs(d - ref)[off] / ref[off]
        close = np.argsort(np.where(off, d, np.inf), 1)[:, : args.k_close]
        far = np.argsort(np.where(off, -d, np.inf), 1)[:, : args.k_far]
        recall = np.mean([len(set(a) & set(b)) / args.k_close for a, b in zip(close, ref_close)])
        far_precision = np.mean([len(set(a) & set(b)) / args.k_far for a, b in zip(far, ref_far)])
        first_changed = float(np.mean(close[:, 0] != ref_close[:, 0]))
        rows.append({"precision": precision, "seconds": seconds[precision], "rel_err_mean": float(rel.mean()),
                     "rel_err_p99": float(np.quantile(rel, 0.99)), "rel_err_max": float(rel.max()),
                     f"recall@{args.k_close}": float(recall), f"far_precision@{args.k_far}": float(far_precision),
                     "nearest_changed": first_changed})
        print(f"[precision] {precision}: {seconds[precision]:.1f}s | distance rel. error mean {rel.mean():.2e}, p99 "
              f"{np.quantile(rel, 0.99):.2e}, max {rel.max():.2e} | recall@{args.k_close} {recall:.3f} | far precision "
              f"{far_precision:.3f} | nearest neighbour changed for {first_changed:.1%} of anchors", flush=True)
    out = {"images": len(images), "image_size": args.image_size, "device": args.device, "vgg_weights": weights,
           "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "results": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
