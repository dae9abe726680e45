"""Generator (stage 2) training throughput: images/s with 1 and 2 Ray Train DDP workers (and a GPU if lent).

    python benchmarks/generator.py --image-size 64 --workers 1 2 --epochs 2 --json /tmp/generator.json

What is measured: the stage-2 worker loop (one D step and one G step per batch: U-Net G with z at every
layer, 2-scale PatchGAN D, the VGG-16 perceptual loss on conv1_2..conv5_2, EMA update) on the synthetic
style set, batch --batch per worker. `images_per_s` is the loop's own number for the last epoch
(images seen by all workers / epoch wall time, data decoding included, validation and checkpointing
excluded); the first epoch is a warm-up (image cache, allocator). Ray start-up is not timed. The stage-1
encoder is a freshly initialised one saved as a checkpoint: its weights do not change the cost.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import harness


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--num-train", type=int, default=192)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--base-channels", type=int, default=64, help="G and D width (official: 64 for the U-Net)")
    p.add_argument("--use-gpu", default="auto", choices=["auto", "never", "always"])
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--json", default="", help="write the record (command, date, machine, figures) here")
    args = p.parse_args(argv)

    import ray
    import torch

    from step_ray.config import load_config
    from step_ray.data.synthetic import SyntheticConfig, generate_synthetic
    from step_ray.models import EncoderConfig, StyleEncoder
    from step_ray.checkpoints import save_checkpoint
    from step_ray.pipelines.train_generator import GeneratorJobConfig
    from step_ray.data.scan import prepare_paired_splits
    from step_ray.pipelines.train_generator import train_generator_stage

    tmp = Path(tempfile.mkdtemp(prefix="bench_generator_"))
    generate_synthetic(tmp / "data", SyntheticConfig(num_train=args.num_train, num_val=16, image_size=args.image_size))
    save_checkpoint(
        tmp / "stage1",
        {"encoder": StyleEncoder(EncoderConfig())},
        {},
        {},
        {"method": "stage1", "run": {}, "recipe": {"encoder": {}}},
    )
    num_downs = {32: 5, 64: 6, 128: 7, 256: 8}[args.image_size]
    ray.init(
        address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    rows = []
    for workers in args.workers:
        cfg = load_config(GeneratorJobConfig, None, [
            f"data.root={tmp / 'data'}", f"data.image_size={args.image_size}", f"encoder_checkpoint={tmp / 'stage1'}",
            f"train.generator.num_downs={num_downs}", f"train.generator.base_channels={args.base_channels}",
            f"train.discriminator.base_channels={args.base_channels}", f"train.batch_size={args.batch}",
            "train.val_images=16", f"run.storage_path={tmp / 'runs'}", f"run.num_workers={workers}",
            f"run.use_gpu={args.use_gpu}", f"run.cpus_per_worker={args.cpus_per_worker}", "run.max_failures=0",
        ])
        from dataclasses import replace

        train = replace(cfg.train, encoder_checkpoint=cfg.encoder_checkpoint, max_epochs=args.epochs)
        started = time.perf_counter()
        result, _, _ = train_generator_stage(train, cfg.run, prepare_paired_splits(cfg.data), "stage2")
        history = json.loads((Path(result.checkpoint.path) / "state.json").read_text())["history"]
        last = history[-1]
        rows.append({"workers": workers, "images_per_s": last["images_per_s"], "epoch_seconds": last["epoch_seconds"],
                     "steps_per_epoch": last["step"] // len(history), "wall_seconds": time.perf_counter() - started,
                     "device": "cuda" if torch.cuda.is_available() and args.use_gpu != "never" else "cpu"})
        print(f"[bench] {workers} worker(s): {last['images_per_s']:.1f} img/s "
              f"(epoch {last['epoch_seconds']:.1f}s, {rows[-1]['steps_per_epoch']} steps/worker)", flush=True)
    rec = harness.record(
        {
            "image_size": args.image_size,
            "batch_per_worker": args.batch,
            "base_channels": args.base_channels,
            "num_train": args.num_train,
            "results": rows,
        }
    )
    print(json.dumps(rec["figures"], indent=1))
    harness.write(args.json, rec)
    return rec


if __name__ == "__main__":
    main()
