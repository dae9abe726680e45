"""Throughput of the style-statistics pipeline against a naive single-process loop, in one run.

    python benchmarks/style_stats.py --images 2000 --side 64 --workers 2 --rounds 2 --json /tmp/style_stats.json
    python benchmarks/style_stats.py --sides gpu --rounds 1       # the pipeline with one GPU actor alone

Every side computes the same thing on the same synthetic images with the same VGG-16 (the real one when
step_ray.weights finds it): decode the target half, resize, VGG-16 forward to relu5_2, Gram matrices, the
305,888-number descriptor and its reduction: by default the product's (`ReductionConfig()`: PCA-256 fitted
on a seeded sample in a first pass, the residual norm, a CountSketch-8,192 of the residual), or with
--reduction random a seeded Gaussian projection to --dim numbers (no fit pass).
* naive: one process, one image at a time (PIL decode, forward, Gram, projection), torch's default
  threads; run in a fresh process so its peak memory is its own.
* ray: `compute_style_stats` with N model actors on the CPU, on a fresh local Ray with all cores (one
  subprocess per run), end to end (actor start-up, decoding, writing Parquet included; Ray's own start
  excluded, a cluster is normally up); "steady" is the pipeline's rate once every actor has finished its
  first batch (the summary's steady_images_per_second).
* gpu: the same pipeline with one GPU actor at --gpu-side px, where torch sees a GPU (else skipped).
* baseline (with --baseline-code DIR): the ray side from another checkout of step_ray.
The sides alternate (naive, ray, ray, naive, ...) for --rounds rounds, so that a machine shared with other
jobs loads them alike; each ratio is taken against the naive run of its own round, with the load average
before and after every run. Peak memory per worker is each actor's ru_maxrss as the pipeline's summary
reports it.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import harness


def naive_loop(root: str, side: int, reduction_kw: dict) -> dict:
    """The baseline, in its own process: returns seconds, images and the process's peak RSS. A PCA reduction
    is fitted first, as the pipeline fits it (a seeded sample of images, their full descriptors)."""
    warnings.simplefilter("ignore", RuntimeWarning)  # random-VGG warning: the benchmark records the source
    import numpy as np
    import torch

    from step_ray.data.pix2pix import DataConfig, list_split
    from step_ray.style.statistics import StyleStatsConfig, descriptors_in_process
    from step_ray.style.reduce import Reduction, ReductionConfig
    from step_ray.style.gram import descriptor_size
    from step_ray.style.vgg import load_vgg

    cfg = StyleStatsConfig(data=DataConfig(root=root, image_size=side), reduction=ReductionConfig(**reduction_kw),
                           splits=("train",))
    uris = list_split(root, "train")
    vgg = load_vgg(cfg.vgg)
    reduction = Reduction(cfg.reduction, descriptor_size(vgg.channels))
    start = time.perf_counter()
    if reduction.needs_fit:
        count = min(cfg.reduction.fit_sample, len(uris))
        chosen = np.random.default_rng(cfg.reduction.seed).choice(len(uris), size=count, replace=False)
        reduction.fit(descriptors_in_process(cfg, sorted(uris[i] for i in chosen), None, vgg))
    fit_seconds = time.perf_counter() - start
    reduction.transform_tensor(torch.zeros(1, reduction.input_dim))  # the matrices built before the main pass
    descriptors = descriptors_in_process(cfg, uris, reduction, vgg)
    seconds = time.perf_counter() - start
    return {
        "images": len(uris),
        "seconds": seconds,
        "fit_seconds": fit_seconds,
        "images_per_second": len(uris) / seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "torch_threads": torch.get_num_threads(),
        "first_descriptors": descriptors[:4].tolist(),
    }


def ray_run(root: str, side: int, reduction_kw: dict, workers: int, batch_size: int, output: str, use_gpu: str) -> dict:
    from step_ray.data.pix2pix import DataConfig
    from step_ray.style.statistics import StyleStatsConfig, compute_style_stats, read_descriptors, read_metadata
    from step_ray.style.reduce import ReductionConfig

    cfg = StyleStatsConfig(
        data=DataConfig(root=root, image_size=side),
        reduction=ReductionConfig(**reduction_kw),
        splits=("train",),
        output=output,
        batch_size=batch_size,
        num_actors=workers,
        use_gpu=use_gpu,
        force=True,
    )
    start = time.perf_counter()
    compute_style_stats(cfg)
    seconds = time.perf_counter() - start
    summary = read_metadata(output)["summary"]
    ids, descriptors, _ = read_descriptors(output)
    return {
        "steady_images_per_second": summary.get("steady_images_per_second"),
        "startup_seconds_per_worker": summary.get("startup_seconds_per_worker"),
        "workers": summary["actors"],
        "device": summary["device"],
        "images": summary["images"],
        "seconds_end_to_end": seconds,
        "images_per_second_end_to_end": summary["images"] / seconds,
        "pipeline_seconds": summary["seconds"],
        "images_per_second_pipeline": summary["images_per_second"],
        "busy_seconds_per_worker": summary["busy_seconds_per_worker"],
        "peak_rss_bytes_per_worker": summary["peak_rss_bytes_per_worker"],
        "peak_gpu_bytes_per_worker": summary["peak_gpu_bytes_per_worker"],
        "torch_threads": summary["torch_threads"],
        "first_descriptors": descriptors[:4].tolist(),
    }


def ray_subprocess(args, root: str, workers: int, output: str, use_gpu: str, code: str | None = None) -> dict:
    """One pipeline run on a fresh local Ray in a subprocess (with `code` first on its path, if given)."""
    env = dict(os.environ)
    if code:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(code).resolve()), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = f"{output}.json"
    command = [sys.executable, __file__, "--one-run", json.dumps(dict(
        root=root, side=args.side if use_gpu != "always" else args.gpu_side, reduction=reduction_kw(args),
        workers=workers, batch_size=args.batch_size, output=output, use_gpu=use_gpu, json=out))]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(Path(out).read_text())


def _one_run(spec: dict) -> None:
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    run = ray_run(spec["root"], spec["side"], spec["reduction"], spec["workers"], spec["batch_size"],
                  spec["output"], spec["use_gpu"])
    run["gpus"] = int(ray.cluster_resources().get("GPU", 0))
    ray.shutdown()
    Path(spec["json"]).write_text(json.dumps(run))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--sides", nargs="+", default=["naive", "ray", "gpu"], choices=["naive", "ray", "gpu"])
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="CPU actors of each ray run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline-code", default="", help="another checkout's root: adds a ray run of its step_ray")
    parser.add_argument("--one-run", default="", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reduction", default="default", choices=["default", "random"],
                        help="default: ReductionConfig() (PCA fitted in a first pass + residual + sketch); random: a "
                             "seeded Gaussian projection to --dim (no fit pass)")
    parser.add_argument("--dim", type=int, default=128, help="the random projection's size")
    parser.add_argument("--gpu-side", type=int, default=256)
    # Outside the repository: the working tree is shared and its ignored folders get cleaned.
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "step_ray_bench" / "style_data"))
    parser.add_argument("--json", default="", help="write the record (command, date, machine, figures) here")
    return parser.parse_args(argv)


def sides(args, tmp: str) -> dict:
    """One callable per side; each returns its run's figures with the load average around it."""
    from step_ray.data.synthetic import SyntheticConfig, generate_synthetic

    def data(side: int) -> str:
        return str(generate_synthetic(f"{args.data_dir}_{args.images}_{side}", SyntheticConfig(
            num_train=args.images, num_val=0, image_size=side)))

    def timed(fn, *a):
        def run():
            before = harness.load()
            out = fn(*a)
            out.update(load_before=before, load_after=harness.load())
            return out
        return run

    out, root = {}, data(args.side)
    if "naive" in args.sides:
        out["naive"] = timed(naive_subprocess, root, args.side, reduction_kw(args))
    for w in args.workers if "ray" in args.sides else []:
        out[f"ray x{w}"] = timed(ray_subprocess, args, root, w, f"{tmp}/ray{w}", "never")
        if args.baseline_code:
            out[f"baseline x{w}"] = timed(ray_subprocess, args, root, w, f"{tmp}/base{w}", "never", args.baseline_code)
    if "gpu" in args.sides and _has_gpu():
        out["gpu"] = timed(ray_subprocess, args, data(args.gpu_side), 1, f"{tmp}/gpu", "always")
    return out


def reduction_kw(args) -> dict:
    return {} if args.reduction == "default" else {"method": "random", "dim": args.dim}


def naive_subprocess(root: str, side: int, reduction: dict) -> dict:
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(naive_loop, root, side, reduction).result()


def compare(runs: dict) -> None:
    """Each run against the naive run of its own round: speed-up and the largest descriptor difference."""
    import numpy as np

    for name, rounds in runs.items():
        for r, run in enumerate(rounds):
            if name == "naive" or "naive" not in runs:
                continue
            naive = runs["naive"][r]
            run["max_abs_diff_vs_naive"] = float(np.abs(np.asarray(run["first_descriptors"])
                                                        - np.asarray(naive["first_descriptors"])).max())
            run["speedup_vs_naive_end_to_end"] = run["images_per_second_end_to_end"] / naive["images_per_second"]
            if run.get("steady_images_per_second"):
                run["speedup_vs_naive_steady"] = run["steady_images_per_second"] / naive["images_per_second"]
    for rounds in runs.values():
        for run in rounds:
            run.pop("first_descriptors", None)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.one_run:
        _one_run(json.loads(args.one_run))
        return {}
    from step_ray.style.vgg import VGGConfig, vgg_weight_source

    with tempfile.TemporaryDirectory() as tmp:
        runs = harness.alternate(sides(args, tmp), args.rounds)
    compare(runs)
    figures = {"images": args.images, "side": args.side, "gpu_side": args.gpu_side, "reduction": args.reduction,
               "dim": args.dim if args.reduction == "random" else None, "batch_size": args.batch_size,
               "vgg_weights": vgg_weight_source(VGGConfig()), "runs": runs}
    print(markdown(runs))
    rec = harness.record(figures)
    harness.write(args.json, rec)
    return rec


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def markdown(runs: dict) -> str:
    rows = [
        "| side | round | workers | device | load before → after | images/s end to end | images/s steady | "
        "peak RSS per worker (MiB) | × naive end to end | × naive steady |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rounds in runs.items():
        for r, x in enumerate(rounds, 1):
            rate = x.get("images_per_second_end_to_end", x.get("images_per_second"))
            rss = x.get("peak_rss_bytes_per_worker") or {"naive": x.get("peak_rss_bytes", 0)}
            ratio = [
                f"{x[k]:.2f}" if k in x else "–" for k in ("speedup_vs_naive_end_to_end", "speedup_vs_naive_steady")
            ]
            rows.append(
                f"| {name} | {r} | {x.get('workers', 1)} | {x.get('device', 'cpu')} | {x['load_before'][0]:.1f} → "
                f"{x['load_after'][0]:.1f} | {rate:.1f} | {x.get('steady_images_per_second') or '–'} | "
                f"{', '.join(f'{v / 2**20:.0f}' for v in rss.values())} | {ratio[0]} | {ratio[1]} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
