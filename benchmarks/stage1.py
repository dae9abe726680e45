"""Stage-1 training throughput: triplets/s with 1 and 2 Ray Train (DDP) workers, in one run.

    python benchmarks/stage1.py --num-train 800 --image-size 64 --epochs 3 --workers 1 2
    python benchmarks/stage1.py --num-train 24 --num-val 8 --image-size 32 --epochs 1 --workers 1 \
        --set mining.k_close=3 --set mining.k_far=8 --set train.knn_reference=16      # a tiny smoke run

Style statistics and mining run once (cached); then the same encoder training runs with each worker
count. The rate is the last epoch's (the first pays for decoding images into each worker's cache).
Prints a Markdown table; --json writes the record (command, date, machine, figures).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import harness


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-train", type=int, default=800)
    parser.add_argument("--num-val", type=int, default=96)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another PretrainJobConfig override (e.g. mining.k_far=8: the default 700 needs more "
                             "than 700 training images), after the ones above; repeatable")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary folder (images, cache, runs)")
    parser.add_argument("--json", default="", help="write the record (command, date, machine, figures) here")
    args = parser.parse_args(argv)

    import ray

    from step_ray.config import load_config
    from step_ray.pipelines.pretrain import PretrainJobConfig, prepare_inputs
    from step_ray.engine.loop import train
    from step_ray.recipes.stage1 import Stage1Recipe

    address = os.environ.get("RAY_ADDRESS")  # a running cluster; else a local Ray of its own, without the dashboard
    ray.init(address=address, log_to_driver=False, **({} if address else {"include_dashboard": False}))
    work = tempfile.mkdtemp(prefix="bench_stage1_")
    base = [
        f"data.synthetic_dir={work}/data",
        f"data.synthetic.num_train={args.num_train}",
        f"data.synthetic.num_val={args.num_val}",
        f"data.synthetic.image_size={args.image_size}",
        f"data.image_size={args.image_size}",
        f"cache_dir={work}/cache",
        f"train.max_epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        *args.set,
    ]
    inputs, _ = prepare_inputs(load_config(PretrainJobConfig, None, base))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    rows = []
    for workers in args.workers:
        cfg = load_config(
            PretrainJobConfig,
            None,
            base + [f"run.storage_path={work}/runs", f"run.num_workers={workers}", f"run.name=bench-{workers}w"],
        )
        started = time.perf_counter()
        result, _ = train(Stage1Recipe(cfg.train, inputs, job=cfg), cfg.run)
        wall = time.perf_counter() - started
        if result.error:
            raise result.error
        m = result.metrics
        rows.append({"workers": workers, "triplets_per_s": m["triplets_per_s"], "images_per_s": m["images_per_s"],
                     "epoch_seconds": m["epoch_seconds"], "wall_seconds": wall, "val_knn_acc": m.get("val_knn_acc"),
                     "device": "gpu" if gpus else "cpu"})
        print(json.dumps(rows[-1]), flush=True)
    base_rate = rows[0]["triplets_per_s"]
    lines = [
        "| workers | triplets/s | images/s | ratio to 1 worker | epoch s | val k-NN acc |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['workers']} | {r['triplets_per_s']:.1f} | {r['images_per_s']:.1f} | "
                     f"{r['triplets_per_s'] / base_rate:.2f} | {r['epoch_seconds']:.1f} | "
                     + (f"{r['val_knn_acc']:.3f} |" if isinstance(r["val_knn_acc"], (int, float)) else "– |"))
    print("\n".join(lines))
    rec = harness.record({"ray_gpus": gpus, "overrides": args.set, "rows": rows})
    harness.write(args.json, rec)
    ray.shutdown()
    if args.keep_work:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return rec


if __name__ == "__main__":
    main()
