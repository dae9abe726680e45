"""The CPU's measured float32 ceiling, against which the style-statistics rates are read (BENCHMARKS.md,
"Style statistics": why ≥ 3× the naive loop cannot be reached end to end on this machine).

    python benchmarks/cpu_peak.py

Prints: GFLOP/s of a large float32 matrix product on all cores (what the BLAS reaches, close to the FMA
peak), and the FLOPs of one style descriptor (VGG-16 to relu5_2, Gram matrices) at --size px, counted by
torch.utils.flop_counter, so an images/s figure converts into GFLOP/s and a share of that ceiling.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def matmul_gflops(n: int = 4096, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


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
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "load": list(os.getloadavg()),
           "matmul_gflops": round(matmul_gflops(), 1), "descriptor_gflop_per_image": round(descriptor_gflop(args.size), 3),
           "size": args.size}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
