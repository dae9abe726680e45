"""Watching a run headless: losses, throughput and sample grids while it trains.

Rank 0 of each stage owns one `RunMonitor`. The training loop hands it numbers and finished uint8
images; a background thread writes them as TensorBoard event files under `<run folder>/tensorboard`
and the grids also as PNGs under `<run folder>/samples/` (next to the checkpoint folders), so the step
never waits on disk or S3. On S3 the thread writes the events locally and copies the folder up after
each batch of writes. The same scalars go to the Ray dashboard through `step_ray.prometheus`.

    tensorboard --logdir runs/            # every stage of every run, side by side
"""
from __future__ import annotations

import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from step_ray import storage
from step_ray.eval.embedding import image_grid, save_png
from step_ray.eval.pictures import to_uint8

TENSORBOARD_DIR = "tensorboard"
SAMPLES_DIR = "samples"


@dataclass(frozen=True)
class MonitorConfig:
    """What rank 0 writes while a stage trains (every stage config holds one as `monitor`)."""

    enabled: bool = True
    scalars_every: int = 20  # optimiser steps between loss/throughput points; 0: once per epoch only
    grid_every: int = 1  # epochs between sample grids; 0: none
    grid_inputs: int = 4  # rows of the grid (fixed validation inputs)
    grid_references: int = 4  # columns from fixed reference images' codes
    grid_samples: int = 2  # columns from sampled codes (a Gaussian fitted to the references' codes)
    seed: int = 0  # which validation images, which sampled codes: the same every epoch

    def __post_init__(self):
        if min(self.scalars_every, self.grid_every, self.grid_inputs, self.grid_references, self.grid_samples) < 0:
            raise ValueError("monitor settings must be >= 0")
        if self.grid_every and (self.grid_inputs < 1 or self.grid_references < 1):
            raise ValueError("a sample grid needs grid_inputs >= 1 and grid_references >= 1")


class RunMonitor:
    """TensorBoard scalars/images and PNG grids for one stage of one run, written off the training thread.

    `scalars` and `image` only enqueue; `close` drains the queue (call it when the stage ends). The
    overhead on the training thread is the enqueue (and, for grids, making the grid: a no-grad forward
    of a few images, which the caller does)."""

    def __init__(self, run_folder: str, stage: str, enabled: bool = True):
        self.run_folder, self.stage, self.enabled = run_folder, stage, enabled and bool(run_folder)
        self.queue: queue.Queue = queue.Queue()
        self.errors: list[str] = []
        self.written = 0
        if not self.enabled:
            return
        self.remote = storage.is_s3(run_folder)
        self._tmp = tempfile.TemporaryDirectory(prefix="step_ray_tb_") if self.remote else None
        self.local_dir = Path(self._tmp.name) if self._tmp else Path(run_folder) / TENSORBOARD_DIR
        self.thread = threading.Thread(target=self._work, name=f"monitor-{stage}", daemon=True)
        self.thread.start()

    # ---- called by the training loop (cheap)

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        if self.enabled:
            numbers = {k: float(v) for k, v in values.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)}
            self.queue.put(("scalars", step, numbers))

    def image(self, tag: str, step: int, image: np.ndarray, png_name: str = "") -> None:
        """`image`: uint8 HWC. Also saved as samples/<png_name> in the run folder when a name is given."""
        if self.enabled:
            self.queue.put(("image", step, (tag, np.ascontiguousarray(image), png_name)))

    def close(self, timeout: float = 120.0) -> None:
        if not self.enabled:
            return
        self.queue.put(("close", 0, None))
        self.thread.join(timeout)
        if self._tmp is not None:
            self._tmp.cleanup()
        if self.errors:
            print(f"[monitor] {len(self.errors)} write errors, first: {self.errors[0]}", flush=True)

    # ---- the writer thread

    def _work(self) -> None:
        from torch.utils.tensorboard import SummaryWriter  # deferred: tensorboard loads only where a monitor writes

        self.local_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(log_dir=str(self.local_dir), filename_suffix=f".{self.stage}")
        closing = False
        while not closing:
            items = [self.queue.get()]
            while True:  # everything queued so far, then one flush (and one upload)
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            for kind, step, payload in items:
                try:
                    if kind == "close":
                        closing = True
                    elif kind == "scalars":
                        for key, value in payload.items():
                            writer.add_scalar(f"{self.stage}/{key}", value, step)
                    elif kind == "image":
                        tag, image, png_name = payload
                        writer.add_image(f"{self.stage}/{tag}", image, step, dataformats="HWC")
                        if png_name:
                            save_png(storage.join(self.run_folder, SAMPLES_DIR, png_name), image)
                    self.written += kind != "close"
                except Exception as exc:  # a full disk or a lost bucket must not stop training
                    self.errors.append(f"{kind}: {exc!r}")
            try:
                writer.flush()
                if self.remote:
                    self._upload()
            except Exception as exc:
                self.errors.append(f"flush: {exc!r}")
        writer.close()
        if self.remote:
            try:
                self._upload()
            except Exception as exc:
                self.errors.append(f"upload: {exc!r}")

    def _upload(self) -> None:
        for path in self.local_dir.iterdir():
            if path.is_file():
                storage.write_bytes(storage.join(self.run_folder, TENSORBOARD_DIR, path.name), path.read_bytes())


class EpochMeter:
    """One epoch of one worker: batch means of the logged losses, and the group's examples per second.

    Every rank takes the same number of steps, so the group's rate is world size × this worker's.
    """

    def __init__(self):
        self.started = time.perf_counter()
        self.sums: dict[str, float] = {}
        self.batches = 0
        self.examples = 0

    def add(self, logs: dict[str, float], examples: int) -> None:
        self.batches += 1
        self.examples += examples
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0.0) + value

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def means(self) -> dict[str, float]:
        return {f"train_{k}": v / max(1, self.batches) for k, v in self.sums.items()}

    def rate(self, seconds: float, world: int) -> float:
        return self.examples * world / max(seconds, 1e-9)


class IntervalMeter:
    """Loss means and throughput since the last scalar point (the per-epoch meter's shorter sibling)."""

    def __init__(self):
        self.meter = EpochMeter()

    def add(self, logs: dict[str, float], examples: int) -> None:
        self.meter.add(logs, examples)

    def take(self, world: int) -> dict[str, float]:
        seconds = self.meter.seconds()
        out = {**self.meter.means(), "images_per_s": self.meter.rate(seconds, world)}
        self.meter = EpochMeter()
        return out


def code_samples(codes, count: int, seed: int):
    """`count` codes from a diagonal Gaussian fitted to `codes` [n, nz], fixed by `seed`: the sample columns
    of a grid while no IMLE mapper exists yet (E's codes are not N(0, I), so plain Gaussian codes would
    show G off its training distribution)."""
    mean, std = codes.float().mean(0), codes.float().std(0, unbiased=False).clamp_min(1e-6)
    noise = torch.randn(count, codes.shape[1], generator=torch.Generator().manual_seed(seed))
    return mean + std * noise


def sample_grid(generator, encoder, a, references, samples_codes=None, device="cpu") -> np.ndarray:
    """Top row: blank, the references, then one blank per sampled code; row i: input i, G(A_i, E(ref_j)) for
    each reference, then G(A_i, s) for each sampled code s."""
    was = encoder.training
    encoder.eval()
    with torch.no_grad():
        z_refs = encoder(references.to(device)).float()
        codes = z_refs if samples_codes is None else torch.cat([z_refs, samples_codes.to(device)])
        n, m = len(a), len(codes)
        out = generator(a.to(device).repeat_interleave(m, 0), codes.repeat(n, 1)).float().cpu()
    encoder.train(was)
    refs = list(to_uint8(references))
    blank = np.full_like(refs[0], 255)
    rows = [[blank] + refs + [blank] * (m - len(refs))]
    pictures = to_uint8(out)
    outs = pictures.reshape(n, m, *pictures.shape[1:])
    for ai, row in zip(to_uint8(a), outs):
        rows.append([ai] + list(row))
    return image_grid(rows)
