"""Mining with the production reduction and its residual sketch re-ranking, against exact search.

    export RAY_TMPDIR=/tmp/ray_mining
    python experiments/mining_sketch.py --json experiments/results/mining_sketch_real_vgg.json

Uses the real-VGG descriptors experiments/mining_recall.py caches (10k synthetic images at 32 px, stored as
float16, with the exact close/far sets of 500 anchors; all 500 facades at 64 px with every anchor's exact
sets). For each sketch width m (0 = PCA + residual only) it fits the production
`Reduction` (PCA-`--dim` + residual + CountSketch-m, fitted once on `--fit` images and shared by every m:
the sketch needs no fit), projects every image as the style job's actors do, and runs the production
`mine_neighbours` (flat FAISS on CPU, 1 shard, in-process) on all n rows: the index on [y, ρ^½], then the
re-ranking of `--rerank-factor`·k candidates by ‖y_a − y_b‖² + ρ_a + ρ_b − 2 s_a·s_b. Quality is
recall@k_c and far precision@k_f of the anchors against the exact sets. Time: mine_neighbours in full
(index build, search, re-ranking), in rounds alternating with the exact search of a slice of anchors
(matrix products only, float32), so every speed-up is a ratio measured under one load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch


from mining_recall import _vgg, dataset_arguments, facades_set, loadavg, log, rows_f32, synthetic_set
from step_ray.mining import ExactAccumulator, MiningConfig, close_recall, far_precision, mine_neighbours
from step_ray.style.reduce import Reduction, ReductionConfig


def fit_pca(ds: dict, dim: int, fit: int) -> tuple[Reduction, float]:
    store, n = ds["store"], len(ds["store"])
    fit = min(fit, n)
    rows = np.sort(np.random.default_rng(1).permutation(n)[:fit])
    t0 = time.perf_counter()
    sample = rows_f32(store, rows)
    reduction = Reduction(ReductionConfig(dim=min(dim, fit - 1), fit_sample=fit, sketch=0), store.shape[1]).fit(sample)
    return reduction, time.perf_counter() - t0


def with_sketch(pca: Reduction, m: int) -> Reduction:
    """The same fitted PCA with a sketch of width m (the sketch is seed-defined: nothing to fit)."""
    out = Reduction(ReductionConfig(dim=pca.cfg.dim, fit_sample=pca.cfg.fit_sample, sketch=m), pca.input_dim)
    out.mean, out.components, out.explained_variance_ratio = pca.mean, pca.components, pca.explained_variance_ratio
    return out


def project(ds: dict, reductions: dict[int, Reduction], chunk: int) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    store, n = ds["store"], len(ds["store"])
    out = {m: np.empty((n, r.output_dim), np.float32) for m, r in reductions.items()}
    spent = {m: 0.0 for m in reductions}
    for r in reductions.values():  # projection matrices and S Cᵀ built before the clock runs
        r.transform_tensor(torch.zeros(1, r.input_dim))
    for s in range(0, n, chunk):
        x = torch.from_numpy(rows_f32(store, slice(s, min(n, s + chunk))))
        for m, r in reductions.items():
            t0 = time.perf_counter()
            out[m][s : s + len(x)] = r.transform_tensor(x).numpy()
            spent[m] += time.perf_counter() - t0
    return out, {m: v / n for m, v in spent.items()}


def exact_seconds_per_anchor(ds: dict, anchors: np.ndarray, args) -> float:
    store, n = ds["store"], len(ds["store"])
    acc = ExactAccumulator(rows_f32(store, anchors), args.k_close, args.k_far, query_ids=anchors)
    spent = 0.0
    for s in range(0, n, args.chunk):
        chunk = torch.from_numpy(rows_f32(store, slice(s, min(n, s + args.chunk))))
        t0 = time.perf_counter()
        acc.add(chunk)
        spent += time.perf_counter() - t0
    return spent / len(anchors)


def run_dataset(ds: dict, args) -> dict:
    n = len(ds["store"])
    pca, fit_s = fit_pca(ds, args.dim, args.fit)
    log(f"{ds['name']}: PCA-{pca.cfg.dim} fitted on {pca.cfg.fit_sample} in {fit_s:.0f} s")
    reductions = {m: with_sketch(pca, m) for m in args.sketches}
    vectors, proj_s = project(ds, reductions, args.chunk)
    cfg = MiningConfig(k_close=args.k_close, k_far=args.k_far, index="flat", num_shards=1, use_gpu="never",
                       rerank_factor=args.rerank_factor)
    anchors = ds["anchors"]
    rows = {m: {"sketch": m, "output_dim": reductions[m].output_dim, "bytes_per_image": 4 * reductions[m].output_dim,
                "projection_ms_per_image": round(proj_s[m] * 1e3, 3), "mine_s_per_round": [],
                "rerank_s_per_round": []} for m in args.sketches}
    exact = []
    loads = []
    mine_neighbours(vectors[args.sketches[0]], cfg, residual_column=True, sketch_width=args.sketches[0])  # warm-up
    for r in range(args.rounds):
        exact.append(exact_seconds_per_anchor(ds, anchors[: args.exact_slice], args))
        loads.append(loadavg())
        for m in args.sketches:
            t0 = time.perf_counter()
            found = mine_neighbours(vectors[m], cfg, residual_column=True, sketch_width=m)
            row = rows[m]
            row["mine_s_per_round"].append(round(time.perf_counter() - t0, 3))
            row["rerank_s_per_round"].append(found.info.get("rerank_seconds", 0.0))
            row["close_recall"] = round(close_recall(found.close_ids[anchors], ds["close_ids"]), 4)
            row["far_precision"] = round(far_precision(found.far_ids[anchors], ds["far_ids"]), 4)
        log(
            f"{ds['name']}: round {r}: exact {exact[-1] * n:.0f} s for all anchors; "
            + ", ".join(
                f"m={m}: {rows[m]['mine_s_per_round'][-1]:.2f} s recall {rows[m]['close_recall']} "
                f"far {rows[m]['far_precision']}"
                for m in args.sketches
            )
        )
    for m, row in rows.items():
        ratios = [e * n / t for e, t in zip(exact, row["mine_s_per_round"])]
        row["mine_s"] = round(float(np.median(row["mine_s_per_round"])), 3)
        row["speedup_vs_exact"] = round(float(np.median(ratios)), 1)
    return {"n": n, "anchors": len(anchors), "pca_dim": pca.cfg.dim, "fit_sample": pca.cfg.fit_sample,
            "fit_s": round(fit_s, 1), "explained": round(pca.explained_variance_ratio, 4),
            "rerank_factor": args.rerank_factor, "exact_all_anchors_s_per_round": [round(e * n, 1) for e in exact],
            "exact_slice_anchors": min(args.exact_slice, len(anchors)), "load_per_round": loads,
            "rows": list(rows.values())}


def markdown(name: str, res: dict) -> str:
    lines = [
        f"**{name}** (n = {res['n']}, {res['anchors']} anchors, PCA-{res['pca_dim']} + residual fitted on "
        f"{res['fit_sample']}, candidates ×{res['rerank_factor']}; exact search of all anchors "
        f"{np.median(res['exact_all_anchors_s_per_round']):.0f} s)",
        "",
        "| sketch m | bytes / image | recall@k_c | far precision@k_f | mining s (re-rank s) | speed-up vs exact "
        "| projection ms / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in res["rows"]:
        lines.append(f"| {row['sketch'] or 'none'} | {row['bytes_per_image']:,} | {row['close_recall']:.3f} | "
                     f"{row['far_precision']:.3f} | {row['mine_s']} ({np.median(row['rerank_s_per_round']):.2f}) | "
                     f"{row['speedup_vs_exact']}× | {row['projection_ms_per_image']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dataset_arguments(parser)  # the cached sets experiments/mining_recall.py made
    parser.add_argument("--sketches", type=int, nargs="+", default=[0, 4096, 8192, 16384])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--fit", type=int, default=2048)
    parser.add_argument("--rerank-factor", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--exact-slice", type=int, default=50)
    parser.add_argument("--json", default="experiments/results/mining_sketch_real_vgg.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    vgg = _vgg()
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "load_start": loadavg(),
        "vgg_weights": vgg.weight_source,
        "args": vars(args),
        "datasets": {},
    }
    for name in args.datasets:
        ds = synthetic_set(args, cache, vgg) if name == "synthetic" else facades_set(args, cache, vgg)
        results["datasets"][name] = run_dataset(ds, args)
        del ds
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1))
    results["load_end"] = loadavg()
    for name, res in results["datasets"].items():
        print(markdown(name, res))
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
