"""Throughput of the style-statistics pipeline against a naive single-process loop, in one run.

    python benchmarks/style_stats.py --images 2000 --side 64 --workers 1 2 --json /tmp/bm_style/style_stats.json

Both compute the same thing on the same synthetic images: decode the target half, resize, VGG-16 forward
to conv5_2, Gram matrices, the 305,888-number descriptor and its random projection to --dim numbers.
* naive: one process, one image at a time (PIL decode, forward, Gram, projection), torch's default
  threads; run in a fresh process so its peak memory is its own.
* ray: `compute_style_stats` with N model actors on a local Ray with all cores, end to end (actor
  start-up, decoding, writing Parquet included; Ray's own start excluded, a cluster is normally up).
Peak memory per worker is each actor's ru_maxrss as the pipeline's summary reports it. Where the Ray
cluster has a GPU, a GPU run at --gpu-side is added.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import resource
import tempfile
import time
import warnings
from pathlib import Path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def naive_loop(root: str, side: int, dim: int, seed: int) -> dict:
    """The baseline, in its own process: returns seconds, images and the process's peak RSS."""
    warnings.simplefilter("ignore", RuntimeWarning)  # random-VGG warning: the benchmark records the source
    import torch

    from step_ray.data.pix2pix import DataConfig, list_split
    from step_ray.style.pipeline import StyleStatsConfig, descriptors_in_process
    from step_ray.style.reduce import Reduction, ReductionConfig
    from step_ray.style.gram import descriptor_size
    from step_ray.style.vgg import load_vgg

    cfg = StyleStatsConfig(data=DataConfig(root=root, image_size=side), splits=("train",))
    uris = list_split(root, "train")
    vgg = load_vgg(cfg.vgg)
    size = descriptor_size(vgg.channels)
    reduction = Reduction(ReductionConfig(method="random", dim=dim, seed=seed), size)
    reduction.transform_tensor(torch.zeros(1, size))  # build the matrix before the clock starts
    start = time.perf_counter()
    descriptors = descriptors_in_process(cfg, uris, reduction, vgg)
    seconds = time.perf_counter() - start
    return {
        "images": len(uris),
        "seconds": seconds,
        "images_per_second": len(uris) / seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "torch_threads": torch.get_num_threads(),
        "first_descriptors": descriptors[:4].tolist(),
    }


def ray_run(root: str, side: int, dim: int, seed: int, workers: int, batch_size: int, output: str, use_gpu: str) -> dict:
    from step_ray.data.pix2pix import DataConfig
    from step_ray.style.pipeline import StyleStatsConfig, compute_style_stats, read_descriptors, read_metadata
    from step_ray.style.reduce import ReductionConfig

    cfg = StyleStatsConfig(
        data=DataConfig(root=root, image_size=side),
        reduction=ReductionConfig(method="random", dim=dim, seed=seed),
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-side", type=int, default=256)
    # Outside the repository: the working tree is shared and its ignored folders get cleaned.
    scratch = Path(tempfile.gettempdir()) / "step_ray_bench"
    parser.add_argument("--data-dir", default=str(scratch / "style_data"))
    parser.add_argument("--json", default=str(scratch / "style_stats.json"))
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args(argv)

    import numpy as np
    import ray
    import torch

    from step_ray.data.synthetic import SyntheticConfig, generate_synthetic
    from step_ray.style.vgg import VGGConfig, vgg_weight_source

    root = str(generate_synthetic(f"{args.data_dir}_{args.images}_{args.side}", SyntheticConfig(
        num_train=args.images, num_val=0, image_size=args.side)))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__},
        "load_average_before": os.getloadavg(),
        "images": args.images,
        "side": args.side,
        "dim": args.dim,
        "batch_size": args.batch_size,
        "vgg_weights": vgg_weight_source(VGGConfig()),
    }
    if not args.skip_naive:
        print(f"naive loop over {args.images} images at {args.side}px ...", flush=True)
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            result["naive"] = pool.submit(naive_loop, root, args.side, args.dim, args.seed).result()
        print(f"  {result['naive']['images_per_second']:.1f} images/s", flush=True)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    result["ray"] = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            print(f"ray pipeline, {workers} actor(s) ...", flush=True)
            run = ray_run(root, args.side, args.dim, args.seed, workers, args.batch_size, f"{tmp}/w{workers}", "never")
            result["ray"].append(run)
            print(f"  {run['images_per_second_end_to_end']:.1f} images/s end to end", flush=True)
        if ray.cluster_resources().get("GPU", 0) > 0:
            gpu_root = str(generate_synthetic(f"{args.data_dir}_{args.images}_{args.gpu_side}", SyntheticConfig(
                num_train=args.images, num_val=0, image_size=args.gpu_side)))
            gpus = int(ray.cluster_resources()["GPU"])
            run = ray_run(gpu_root, args.gpu_side, args.dim, args.seed, gpus, args.batch_size, f"{tmp}/gpu", "always")
            run["side"] = args.gpu_side
            result["ray_gpu"] = run
    result["load_average_after"] = os.getloadavg()
    ray.shutdown()

    # The same numbers from both paths (float32 summation order aside).
    if "naive" in result:
        naive = np.asarray(result["naive"]["first_descriptors"])
        for run in result["ray"]:
            got = np.asarray(run["first_descriptors"])
            run["max_abs_diff_vs_naive"] = float(np.abs(got - naive).max())
            run["speedup_vs_naive_end_to_end"] = run["images_per_second_end_to_end"] / result["naive"]["images_per_second"]
    for entry in [result.get("naive"), *result["ray"], result.get("ray_gpu")]:
        if entry:
            entry.pop("first_descriptors", None)
    print(markdown(result))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


def markdown(result: dict) -> str:
    mib = 2**20
    rows = ["| run | workers | images/s (end to end) | images/s (pipeline pass) | busy s per worker | peak RSS per worker (MiB) | × naive |",
            "|---|---|---|---|---|---|---|"]
    if "naive" in result:
        n = result["naive"]
        rows.append(f"| naive loop ({n['torch_threads']} torch threads) | 1 process | {n['images_per_second']:.1f} | – | "
                    f"{n['seconds']:.1f} | {n['peak_rss_bytes'] / mib:.0f} | 1.00 |")
    for run in result["ray"] + ([result["ray_gpu"]] if "ray_gpu" in result else []):
        busy = ", ".join(f"{v:.1f}" for v in run["busy_seconds_per_worker"].values())
        rss = ", ".join(f"{v / mib:.0f}" for v in run["peak_rss_bytes_per_worker"].values())
        speed = f"{run['speedup_vs_naive_end_to_end']:.2f}" if "speedup_vs_naive_end_to_end" in run else "–"
        rows.append(f"| ray data, {run['device']} ({run['torch_threads']} torch threads/actor) | {run['workers']} actor(s) | "
                    f"{run['images_per_second_end_to_end']:.1f} | {run['images_per_second_pipeline']:.1f} | {busy} | {rss} | {speed} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
