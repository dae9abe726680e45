"""Triplet mining benchmark: sharded FAISS mining against the exact (brute-force) reference.

    python benchmarks/mining.py --n 2000 10000 50000 --json runs/bench_mining.json

What is measured, for each database size n (the first n images of one synthetic set):
* descriptors: the synthetic style set's target images (step_ray.data.synthetic, rendered in memory at
  --image-size px) through VGG-16 (pretrained if the torch cache has it, else the fixed-seed random
  VGG, labelled), Gram, full descriptor (~306k floats), PCA to --dim fitted on --fit-sample images.
  One pass over the images: each chunk of unreduced descriptors is reduced for the database *and*
  folded into the exact reference of every anchor set, so the unreduced database never exists whole.
* exact reference: `ExactAccumulator` over the unreduced descriptors, for all anchors where n <=
  --exact-all-max, else for a random sample of --sample anchors; its time is the matrix-product time
  only (descriptor computation excluded), and for sampled runs the full cost is per-anchor time × n.
* FAISS mining: `mine_neighbours` on the reduced descriptors, in a fresh process per run (clean peak
  memory), in-process (1 shard) and sharded over --shards Ray actors; wall time includes building the
  indexes (and starting the actors), not the descriptors, which both sides need.
* quality on the anchor sample: close-set recall@k_c and far-set precision against the exact reference
  on unreduced descriptors (what mining is for), and, for approximate indexes, against flat FAISS on the
  same reduced vectors (the index's own error).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_ray.mining import ExactAccumulator, MiningConfig, close_recall, far_precision, mine_neighbours  # noqa: E402


def _peak_rss() -> int:
    from step_ray.mining.neighbours import _peak_rss_bytes

    return _peak_rss_bytes()


def _faiss_run(path: str, n: int, cfg: MiningConfig, ray_cpus: int) -> dict:
    """One FAISS mining run in this (fresh) process; returns timing, memory and the ids."""
    baseline = _peak_rss()
    x = np.load(path, mmap_mode="r")[:n].copy()
    if cfg.num_shards > 1:
        import ray

        ray.init(num_cpus=ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    start = time.perf_counter()
    nb = mine_neighbours(x, cfg)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "driver_peak_rss": _peak_rss(),
        "driver_baseline_rss": baseline,
        "shards": nb.info.get("shards", []),
        "search_seconds": nb.info.get("search_seconds"),
        "close_ids": nb.close_ids,
        "far_ids": nb.far_ids,
    }


def faiss_run(path: str, n: int, cfg: MiningConfig) -> dict:
    with cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(_faiss_run, path, n, cfg, os.cpu_count() or 1).result()


class SyntheticImages:
    """Target halves of the synthetic style set, rendered on demand (no 50k PNGs on disk)."""

    def __init__(self, num_styles: int, size: int, seed: int = 0):
        from step_ray.data.synthetic import make_styles

        self.styles = make_styles(num_styles, seed)
        self.size, self.seed = size, seed

    def style_of(self, index: int):
        return self.styles[index % len(self.styles)]

    def batch(self, indices) -> torch.Tensor:
        from step_ray.data.pix2pix import to_tensor
        from step_ray.data.synthetic import render_pair

        b = np.stack([render_pair(int(i), "train", self.style_of(int(i)), self.size, self.seed)[:, self.size :] for i in indices])
        return to_tensor(b)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[2000, 10000, 50000])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--styles", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--fit-sample", type=int, default=1024)
    parser.add_argument("--sample", type=int, default=500, help="anchors checked against the exact reference")
    parser.add_argument("--exact-all-max", type=int, default=2000, help="exact over all anchors up to this n")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--k-close", type=int, default=5)
    parser.add_argument("--k-far", type=int, default=13)
    parser.add_argument("--approx", nargs="*", default=["ivf"], help="approximate index kinds also timed")
    parser.add_argument("--approx-min-n", type=int, default=10000)
    parser.add_argument(
        "--timing-only-n", type=int, nargs="*", default=[],
        help="sizes timed on a stand-in database (a Gaussian mixture of the reduced dimension), with no "
        "descriptors and no recall: FAISS cost depends on n, d and k only; exact cost extrapolated as n²",
    )
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    from step_ray.style.gram import descriptors_from_images
    from step_ray.style.reduce import Reduction, ReductionConfig
    from step_ray.style.vgg import VGGConfig, load_vgg
    from step_ray.mining import faiss_gpu_count

    levels = sorted(set(args.n))
    total = levels[-1]
    rng = np.random.default_rng(0)
    images = SyntheticImages(args.styles, args.image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        vgg = load_vgg(VGGConfig())
    timings = {"render_vgg_s": 0.0, "reduce_s": 0.0}

    def descriptors(indices) -> torch.Tensor:
        out = []
        for s in range(0, len(indices), args.chunk):
            t0 = time.perf_counter()
            out.append(descriptors_from_images(vgg, images.batch(indices[s : s + args.chunk])))
            timings["render_vgg_s"] += time.perf_counter() - t0
        return torch.cat(out)

    # Anchor sets, PCA fit, then one streaming pass.
    anchors = {
        n: (np.arange(n) if n <= args.exact_all_max else np.sort(rng.choice(n, min(args.sample, n), replace=False)))
        for n in levels
    }
    t0 = time.perf_counter()
    fit_ids = np.sort(rng.choice(total, min(args.fit_sample, total), replace=False))
    fit_desc = descriptors(fit_ids).numpy()
    full_dim = fit_desc.shape[1]
    # Plain PCA (residual=False), as in the runs recorded in BENCHMARKS.md; the residual coordinate and
    # the choice of d are measured by benchmarks/mining_recall.py.
    reduction = Reduction(ReductionConfig(method="pca", dim=args.dim, fit_sample=len(fit_ids), residual=False),
                          full_dim).fit(fit_desc)
    del fit_desc
    fit_s = time.perf_counter() - t0
    print(f"PCA {full_dim} -> {args.dim} fitted on {len(fit_ids)} images in {fit_s:.1f} s "
          f"(explained variance {reduction.explained_variance_ratio:.3f})", flush=True)

    accumulators = {}
    for n in levels:
        queries = descriptors(anchors[n])
        accumulators[n] = ExactAccumulator(queries, args.k_close, args.k_far, query_ids=anchors[n])
    exact_s = {n: 0.0 for n in levels}
    reduced = np.empty((total, args.dim), np.float32)
    stream_start = time.perf_counter()
    for start in range(0, total, args.chunk):
        stop = min(total, start + args.chunk)
        chunk = descriptors(np.arange(start, stop))
        t0 = time.perf_counter()
        reduced[start:stop] = reduction.transform_tensor(chunk).numpy()
        timings["reduce_s"] += time.perf_counter() - t0
        for n in levels:
            if start < n:
                t0 = time.perf_counter()
                accumulators[n].add(chunk[: min(stop, n) - start])
                exact_s[n] += time.perf_counter() - t0
        if (start // args.chunk) % 40 == 0:
            print(f"  streamed {stop}/{total} images, {time.perf_counter() - stream_start:.0f} s", flush=True)
    exact = {n: accumulators[n].result() for n in levels}
    del accumulators

    # The sampled exact runs use few queries per database pass, which is less efficient than a full
    # all-anchors pass would be; the lower bound prices every n at the best throughput measured.
    best_flops = max(2.0 * len(anchors[n]) * n * full_dim / exact_s[n] for n in levels)
    results = {
        "exact_best_gflops": round(best_flops / 1e9, 1),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "faiss_gpus": faiss_gpu_count(),
        "vgg_weights": vgg.weight_source,
        "image_size": args.image_size,
        "descriptor_dim_full": full_dim,
        "descriptor_dim_reduced": args.dim,
        "pca_explained_variance": reduction.explained_variance_ratio,
        "timings": {**{k: round(v, 1) for k, v in timings.items()}, "pca_fit_s": round(fit_s, 1)},
        "args": vars(args),
        "levels": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "reduced.npy")
        np.save(path, reduced)
        for n in levels:
            ref = exact[n]
            rows = anchors[n]
            per_anchor = exact_s[n] / len(rows)
            level = {
                "n": n,
                "exact_anchors": len(rows),
                "exact_measured_s": round(exact_s[n], 2),
                "exact_per_anchor_ms": round(per_anchor * 1e3, 3),
                "exact_all_anchors_s": round(per_anchor * n, 1),
                "exact_all_anchors_extrapolated": len(rows) < n,
                "exact_all_anchors_lower_bound_s": round(2.0 * n * n * full_dim / best_flops, 1),
                "runs": [],
            }
            variants = [("flat", 1), ("flat", args.shards)]
            if n >= args.approx_min_n:
                variants += [(kind, args.shards) for kind in args.approx]
            flat_ids = None
            for kind, shards in variants:
                cfg = MiningConfig(k_close=args.k_close, k_far=args.k_far, index=kind, num_shards=shards)
                run = faiss_run(path, n, cfg)
                entry = {
                    "index": kind,
                    "shards": shards,
                    "seconds": round(run["seconds"], 2),
                    "sharded_search_only_s": run["search_seconds"],
                    "speedup_vs_exact": round(per_anchor * n / run["seconds"], 1),
                    "speedup_vs_exact_lower_bound": round(2.0 * n * n * full_dim / best_flops / run["seconds"], 1),
                    "close_recall": round(close_recall(run["close_ids"][rows], ref.close_ids), 4),
                    "far_precision": round(far_precision(run["far_ids"][rows], ref.far_ids), 4),
                    "driver_peak_rss_mb": round(run["driver_peak_rss"] / 2**20),
                    "driver_baseline_rss_mb": round(run["driver_baseline_rss"] / 2**20),
                    "shard_peak_rss_mb": [round(s.get("peak_rss_bytes", 0) / 2**20) for s in run["shards"]] if shards > 1 else [],
                    "gpu": any(s.get("gpu") for s in run["shards"]),
                }
                if kind == "flat" and flat_ids is None:
                    flat_ids = (run["close_ids"], run["far_ids"])
                elif kind != "flat":
                    entry["close_recall_vs_flat"] = round(close_recall(run["close_ids"], flat_ids[0]), 4)
                    entry["far_precision_vs_flat"] = round(far_precision(run["far_ids"], flat_ids[1]), 4)
                level["runs"].append(entry)
                print(f"n={n} {kind} x{shards}: {entry}", flush=True)
            results["levels"].append(level)

    if args.timing_only_n:
        # Exact cost per (anchor, database row) from the largest measured level: linear in both.
        largest = levels[-1]
        per_pair = exact_s[largest] / (len(anchors[largest]) * largest)
        mix = np.random.default_rng(1)
        results["timing_only"] = []
        with tempfile.TemporaryDirectory() as tmp:
            for n in args.timing_only_n:
                centres = mix.standard_normal((args.styles, args.dim)).astype(np.float32) * 3.0
                stand_in = centres[mix.integers(0, args.styles, n)] + mix.standard_normal((n, args.dim)).astype(np.float32)
                path = str(Path(tmp) / f"stand_in_{n}.npy")
                np.save(path, stand_in)
                exact_all = per_pair * n * n
                bound = 2.0 * n * n * full_dim / best_flops
                level = {"n": n, "exact_all_anchors_s": round(exact_all, 1), "exact_all_anchors_lower_bound_s": round(bound, 1), "runs": []}
                kinds = [("flat", 1), ("flat", args.shards)] + [(kind, args.shards) for kind in args.approx]
                for kind, shards in kinds:
                    run = faiss_run(path, n, MiningConfig(k_close=args.k_close, k_far=args.k_far, index=kind, num_shards=shards))
                    entry = {
                        "index": kind,
                        "shards": shards,
                        "seconds": round(run["seconds"], 2),
                        "sharded_search_only_s": run["search_seconds"],
                        "speedup_vs_exact": round(exact_all / run["seconds"], 1),
                        "speedup_vs_exact_lower_bound": round(bound / run["seconds"], 1),
                        "driver_peak_rss_mb": round(run["driver_peak_rss"] / 2**20),
                        "shard_peak_rss_mb": [round(s.get("peak_rss_bytes", 0) / 2**20) for s in run["shards"]] if shards > 1 else [],
                    }
                    level["runs"].append(entry)
                    print(f"timing-only n={n} {kind} x{shards}: {entry}", flush=True)
                results["timing_only"].append(level)

    print(markdown(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def markdown(results: dict) -> str:
    lines = [
        "| n | index | shards | FAISS s (search only) | exact s, all anchors (lower bound) | speed-up (vs bound) "
        "| recall@k_c | far precision | peak RSS MB (driver / shards) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for level in results["levels"]:
        exact = f"{level['exact_all_anchors_s']}" + (" extrap." if level["exact_all_anchors_extrapolated"] else "")
        exact += f" ({level['exact_all_anchors_lower_bound_s']})"
        for run in level["runs"]:
            extra = ""
            if "close_recall_vs_flat" in run:
                extra = f" (vs flat {run['close_recall_vs_flat']} / {run['far_precision_vs_flat']})"
            shards = "/".join(str(m) for m in run["shard_peak_rss_mb"]) or "-"
            search = f" ({run['sharded_search_only_s']})" if run["sharded_search_only_s"] is not None else ""
            lines.append(
                f"| {level['n']} | {run['index']} | {run['shards']} | {run['seconds']}{search} | {exact} | "
                f"{run['speedup_vs_exact']}× ({run['speedup_vs_exact_lower_bound']}×) | {run['close_recall']} | {run['far_precision']}{extra} | "
                f"{run['driver_peak_rss_mb']} / {shards} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
