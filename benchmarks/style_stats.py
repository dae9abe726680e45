"""Throughput of the style-statistics pipeline against a naive single-process loop, in one run.

    python benchmarks/style_stats.py --images 2000 --side 64 --workers 2 --rounds 2 --json /tmp/bm_style/style_stats.json

Both compute the same thing on the same synthetic images with the same VGG-16 (the real one when
step_ray.weights finds it): decode the target half, resize, VGG-16 forward to conv5_2, Gram matrices, the
305,888-number descriptor and its random projection to --dim numbers.
* naive: one process, one image at a time (PIL decode, forward, Gram, projection), torch's default
  threads; run in a fresh process so its peak memory is its own.
* ray: `compute_style_stats` with N model actors on a fresh local Ray with all cores (one subprocess per
  run), end to end (actor start-up, decoding, writing Parquet included; Ray's own start excluded, a
  cluster is normally up); "steady" is the pipeline's rate once every actor has finished its first
  batch (the summary's steady_images_per_second).
Runs alternate (naive, ray…, naive, ray…) for --rounds rounds, so that a machine shared with other jobs
loads both sides alike; each ratio is taken against the naive run of its own round, with the load
average before and after every run. --baseline-code DIR adds, each round, a ray run of another checkout
of step_ray (e.g. the code before a change). Peak memory per worker is each actor's ru_maxrss as the
pipeline's summary reports it. Where the Ray cluster has a GPU, a GPU run at --gpu-side is added.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


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
    from step_ray.style.statistics import StyleStatsConfig, descriptors_in_process
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
    from step_ray.style.statistics import StyleStatsConfig, compute_style_stats, read_descriptors, read_metadata
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
        root=root, side=args.side if use_gpu != "always" else args.gpu_side, dim=args.dim, seed=args.seed,
        workers=workers, batch_size=args.batch_size, output=output, use_gpu=use_gpu, json=out))]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(Path(out).read_text())


def _one_run(spec: dict) -> None:
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    run = ray_run(spec["root"], spec["side"], spec["dim"], spec["seed"], spec["workers"], spec["batch_size"],
                  spec["output"], spec["use_gpu"])
    run["gpus"] = int(ray.cluster_resources().get("GPU", 0))
    ray.shutdown()
    Path(spec["json"]).write_text(json.dumps(run))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline-code", default="", help="another checkout's root: adds a ray run of its step_ray")
    parser.add_argument("--one-run", default="", help=argparse.SUPPRESS)
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
    if args.one_run:
        _one_run(json.loads(args.one_run))
        return {}

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
    result["rounds"] = []
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.rounds):
            entry: dict = {"round": index + 1, "ray": []}
            if not args.skip_naive:
                print(f"round {index + 1}: naive loop over {args.images} images at {args.side}px ...", flush=True)
                before = _load()
                with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                    naive = pool.submit(naive_loop, root, args.side, args.dim, args.seed).result()
                naive["load_before"], naive["load_after"] = before, _load()
                entry["naive"] = naive
                print(f"  {naive['images_per_second']:.1f} images/s", flush=True)
            runs = [(w, None) for w in args.workers] + ([(w, args.baseline_code) for w in args.workers]
                                                        if args.baseline_code else [])
            for workers, code in runs:
                label = f"baseline {code}" if code else "this code"
                print(f"round {index + 1}: ray pipeline ({label}), {workers} actor(s) ...", flush=True)
                before = _load()
                run = ray_subprocess(args, root, workers, f"{tmp}/r{index}_w{workers}_{'b' if code else 'n'}", "never", code)
                run["load_before"], run["load_after"] = before, _load()
                run["code"] = code or "this"
                if "naive" in entry:
                    naive = entry["naive"]
                    got = np.asarray(run["first_descriptors"])
                    run["max_abs_diff_vs_naive"] = float(np.abs(got - np.asarray(naive["first_descriptors"])).max())
                    run["speedup_vs_naive_end_to_end"] = run["images_per_second_end_to_end"] / naive["images_per_second"]
                    if run.get("steady_images_per_second"):
                        run["speedup_vs_naive_steady"] = run["steady_images_per_second"] / naive["images_per_second"]
                entry["ray"].append(run)
                print(f"  {run['images_per_second_end_to_end']:.1f} images/s end to end, "
                      f"{run.get('steady_images_per_second')} steady", flush=True)
            result["rounds"].append(entry)
        if _has_gpu():
            gpu_root = str(generate_synthetic(f"{args.data_dir}_{args.images}_{args.gpu_side}", SyntheticConfig(
                num_train=args.images, num_val=0, image_size=args.gpu_side)))
            run = ray_subprocess(args, gpu_root, 1, f"{tmp}/gpu", "always")
            run["side"] = args.gpu_side
            result["ray_gpu"] = run
    result["load_average_after"] = os.getloadavg()
    for entry in [*(r.get("naive") for r in result["rounds"]), *(x for r in result["rounds"] for x in r["ray"]),
                  result.get("ray_gpu")]:
        if entry:
            entry.pop("first_descriptors", None)
    print(markdown(result))
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return result


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def markdown(result: dict) -> str:
    mib = 2**20
    rows = ["| round | run | workers | load before → after | images/s end to end | images/s steady | actor start s | "
            "busy s per worker | peak RSS per worker (MiB) | × naive end to end | × naive steady |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]

    def load(entry):
        return f"{entry['load_before'][0]:.1f} → {entry['load_after'][0]:.1f}"

    for entry in result["rounds"]:
        if "naive" in entry:
            n = entry["naive"]
            rows.append(f"| {entry['round']} | naive loop ({n['torch_threads']} torch threads) | 1 process | {load(n)} | "
                        f"{n['images_per_second']:.1f} | {n['images_per_second']:.1f} | – | {n['seconds']:.1f} | "
                        f"{n['peak_rss_bytes'] / mib:.0f} | 1.00 | 1.00 |")
        for run in entry["ray"]:
            rows.append(_ray_row(entry["round"], run, load(run)))
    if "ray_gpu" in result:
        rows.append(_ray_row("–", result["ray_gpu"], "–"))
    return "\n".join(rows)


def _ray_row(round_, run: dict, load: str) -> str:
    mib = 2**20
    busy = ", ".join(f"{v:.1f}" for v in run["busy_seconds_per_worker"].values())
    rss = ", ".join(f"{v / mib:.0f}" for v in run["peak_rss_bytes_per_worker"].values())
    start = ", ".join(f"{v:.1f}" for v in (run.get("startup_seconds_per_worker") or {}).values()) or "–"
    e2e = f"{run['speedup_vs_naive_end_to_end']:.2f}" if "speedup_vs_naive_end_to_end" in run else "–"
    steady = f"{run['speedup_vs_naive_steady']:.2f}" if "speedup_vs_naive_steady" in run else "–"
    rate = f"{run['steady_images_per_second']:.1f}" if run.get("steady_images_per_second") else "–"
    name = f"ray data, {run['device']}" + ("" if run.get("code", "this") == "this" else f" (baseline: {run['code']})")
    return (f"| {round_} | {name} ({run['torch_threads']} torch threads/actor) | {run['workers']} actor(s) | {load} | "
            f"{run['images_per_second_end_to_end']:.1f} | {rate} | {start} | {busy} | {rss} | {e2e} | {steady} |")


if __name__ == "__main__":
    main()
