"""What watching a run costs the training thread: generator steps with and without the RunMonitor.

    python benchmarks/monitor_overhead.py --steps 60 --rounds 3 --json runs/bench_monitor.json
    python benchmarks/monitor_overhead.py --s3        # the same, event files and grids going to a local moto S3

The loop is the stage-2/3 step (train_step) on 64 px images, batch 8, 32 base channels, L1 reconstruction.
"watched" sends the losses and throughput to the monitor every --scalars-every steps (default 1; a run's
default is 20) and builds a sample grid (4 inputs × 4 references + 2 sampled codes: a no-grad forward of
24 images, E over 16) every --grid-every steps (default 10; a run's default is once per epoch), i.e. by
default far more often than a real run. Plain and watched runs alternate (plain, watched, watched,
plain, ...) so that machine noise hits both; the ratio of their median step times is the overhead.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import harness


def run_round(
    watched: bool, steps: int, folder: str, scalars_every: int = 1, grid_every: int = 10
) -> tuple[float, int]:
    import torch

    from step_ray.models import DiscriminatorConfig, EncoderConfig, GeneratorConfig
    from step_ray.recipes.generator import GeneratorTraining, build_networks, make_optimizers, train_step, training_grid
    from step_ray.engine.monitor import IntervalMeter, RunMonitor

    cfg = GeneratorTraining(train_encoder=True, encoder=EncoderConfig(base_channels=32, block_channels=(64, 128)),
                               generator=GeneratorConfig(num_downs=6, base_channels=32),
                               discriminator=DiscriminatorConfig(base_channels=32), lambda_vgg=0.0, lambda_l1=10.0)
    torch.manual_seed(0)
    nets = build_networks(cfg, "cpu")
    opt_g, opt_d = make_optimizers(cfg, nets, None, "cpu")
    a, b = torch.rand(8, 3, 64, 64) * 2 - 1, torch.rand(8, 3, 64, 64) * 2 - 1
    val_a, val_b = torch.rand(16, 3, 64, 64) * 2 - 1, torch.rand(16, 3, 64, 64) * 2 - 1
    monitor = RunMonitor(folder, "bench", enabled=watched)
    interval = IntervalMeter()
    train_step(cfg, nets, opt_g, opt_d, a, b, None, 0)  # warm-up
    started = time.perf_counter()
    for step in range(1, steps + 1):
        logs = train_step(cfg, nets, opt_g, opt_d, a, b, None, step)
        interval.add(logs, len(a))
        if watched and step % scalars_every == 0:
            monitor.scalars(step, interval.take(1))
        if watched and step % grid_every == 0:
            monitor.image(
                "samples", step, training_grid(cfg, nets, val_a, val_b, "cpu"), png_name=f"step{step:04d}.png"
            )
    seconds = time.perf_counter() - started  # the training thread's time; the writer drains in close()
    monitor.close()
    return seconds / steps, monitor.written


def start_s3() -> object:
    """A moto S3 server on 127.0.0.1 with the bucket `bench`; the AWS variables point at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s",
                      AWS_DEFAULT_REGION="us-east-1")
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
    return server


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--s3", action="store_true", help="write to a moto S3 server on 127.0.0.1")
    p.add_argument("--scalars-every", type=int, default=1, help="steps between scalar points (a run's default: 20)")
    p.add_argument("--grid-every", type=int, default=10, help="steps between grids (a run's default: once per epoch)")
    p.add_argument("--json", default="", help="write the record (command, date, machine, figures) here")
    args = p.parse_args(argv)
    server = start_s3() if args.s3 else None
    count = iter(range(args.rounds))
    with tempfile.TemporaryDirectory() as tmp:
        def watched():
            folder = f"s3://bench/run{next(count)}" if args.s3 else f"{tmp}/run{next(count)}"
            return run_round(True, args.steps, folder, args.scalars_every, args.grid_every)

        runs = harness.alternate({"plain": lambda: run_round(False, args.steps, ""), "watched": watched}, args.rounds)
    if server is not None:
        server.stop()
    plain, watched_s = [r[0] for r in runs["plain"]], [r[0] for r in runs["watched"]]
    ratio = harness.median(watched_s) / harness.median(plain)
    written = runs["watched"][-1][1]
    print(f"median step: plain {harness.median(plain) * 1e3:.1f} ms, watched {harness.median(watched_s) * 1e3:.1f} ms: "
          f"overhead {100 * (ratio - 1):+.1f}% ({written} items per round: scalars every {args.scalars_every} steps, "
          f"a grid every {args.grid_every})")
    rec = harness.record(
        {
            "s3": args.s3,
            "scalars_every": args.scalars_every,
            "grid_every": args.grid_every,
            "steps": args.steps,
            "plain_ms": [x * 1e3 for x in plain],
            "watched_ms": [x * 1e3 for x in watched_s],
            "items_written_per_round": written,
            "overhead": ratio - 1,
        }
    )
    harness.write(args.json, rec)
    return rec


if __name__ == "__main__":
    main()
