"""The CPU's measured float32 ceiling, against which the style-statistics rates are read.

    python benchmarks/cpu_peak.py

Prints: GFLOP/s of a large float32 matrix product on all cores (what the BLAS reaches, close to the FMA
peak), and the FLOPs of one style descriptor (VGG-16 to relu5_2, Gram matrices) at --size px, counted by
torch.utils.flop_counter, so an images/s figure converts into GFLOP/s and a share of that ceiling.
"""
from __future__ import annotations

import argparse
import os
import warnings

import torch

import harness


def matmul_gflops(n: int = 4096, repeats: int = 5) -> float:
    """The best of `repeats` timed products (after one warm-up)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / min(harness.timed(lambda: a @ b, rounds=repeats)) / 1e9


def descriptor_gflop(size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from step_ray.style.gram import style_descriptor
    from step_ray.style.vgg import VGGConfig, load_vgg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        vgg = load_vgg(VGGConfig())
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        style_descriptor(vgg(torch.randn(1, 3, size, size)), VGGConfig().resolved_layer_weights())
    return counter.get_total_flops() / 1e9


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--json", default="", help="write the record (command, date, machine, figures) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    figures = {
        "matmul_gflops": round(matmul_gflops(), 1),
        "descriptor_gflop_per_image": round(descriptor_gflop(args.size), 3),
        "size": args.size,
    }
    print(figures)
    rec = harness.record(figures)
    harness.write(args.json, rec)
    return rec


if __name__ == "__main__":
    main()
