"""Fitting the IMLE style mapper, the last step of the generator job (docs/method.md §6): M(r), r ~ N(0, I), learns
to cover every style code of the data.

    M = argmin Σ_i ‖z_i − M(e_i)‖²,   e_i = argmin_{r_j} ‖z_i − M(r_j)‖²,   {r_j} ~ N(0, I)

Every `recompute_every` epochs a fresh pool of noise (`pool_factor` × the data) is mapped and, with a
FAISS IndexFlatL2 over M(r_j), each code z_i gets its nearest sample's noise e_i; the epochs between
regress M(e_i) onto z_i. Small enough to train in-process (no Ray needed). Saved as a checkpoint folder
(mapper.pt, state.json, config.yaml) with the run.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from step_ray import storage
from step_ray.models import MapperConfig, StyleMapper
from step_ray.checkpoints import run_record, save_checkpoint
from step_ray.losses.imle import nearest_noise


@dataclass(frozen=True)
class IMLEConfig:
    """Official StEP: pool 10x, neighbours every 5 epochs, 500 epochs, batch 64, Adam 1e-2 β (0.5, 0.999),
    x0.7 / 50 epochs."""

    mapper: MapperConfig = field(default_factory=MapperConfig)
    epochs: int = 500
    batch_size: int = 64
    pool_factor: int = 10
    recompute_every: int = 5
    lr: float = 1e-2
    betas: tuple[float, float] = (0.5, 0.999)
    lr_decay: float = 0.7
    lr_decay_every: int = 50
    max_codes: int = 50000
    seed: int = 0
    num_threads: int = 1  # torch threads while training: a tiny MLP is fastest (and kindest to others) on one

    def __post_init__(self):
        for name in ("epochs", "batch_size", "pool_factor", "recompute_every", "lr_decay_every", "max_codes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def train_mapper(codes: np.ndarray, cfg: IMLEConfig = IMLEConfig(),
                 log_every: int = 50) -> tuple[StyleMapper, dict[str, Any]]:
    """Fit M to the codes [N, nz]; returns (M in eval mode, {"history": per-epoch losses, ...})."""
    codes = np.asarray(codes, np.float32)
    rng = np.random.default_rng(cfg.seed)
    if len(codes) > cfg.max_codes:
        codes = codes[rng.choice(len(codes), cfg.max_codes, replace=False)]
    if codes.shape[1] != cfg.mapper.nz:
        raise ValueError(f"codes have {codes.shape[1]} dims; mapper.nz is {cfg.mapper.nz}")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _train(codes, cfg, log_every)
    finally:
        torch.set_num_threads(threads)


def _train(codes: np.ndarray, cfg: IMLEConfig, log_every: int) -> tuple[StyleMapper, dict[str, Any]]:
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    mapper = StyleMapper(cfg.mapper)
    opt = torch.optim.Adam(mapper.parameters(), lr=cfg.lr, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_decay_every, gamma=cfg.lr_decay)
    z = torch.from_numpy(codes)
    history: list[dict[str, float]] = []
    started = time.perf_counter()
    for epoch in range(cfg.epochs):
        if epoch % cfg.recompute_every == 0:
            mapper.eval()
            noise, nn_dist = nearest_noise(mapper, codes, cfg.pool_factor * len(codes), gen)
            mapper.train()
        order = torch.randperm(len(z), generator=gen)
        total = 0.0
        for i in range(0, len(z), cfg.batch_size):
            rows = order[i : i + cfg.batch_size]
            loss = (mapper(noise[rows]) - z[rows]).pow(2).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(rows)
        sched.step()
        entry = {"epoch": epoch, "loss": total / len(z)}
        if epoch % cfg.recompute_every == 0:
            entry["nn_distance"] = float(nn_dist.mean())  # the IMLE objective at the fresh pool
        history.append(entry)
        if log_every and (epoch % log_every == 0 or epoch == cfg.epochs - 1):
            print(f"[mapper] epoch {epoch + 1}/{cfg.epochs} | loss {entry['loss']:.4f} "
                  f"| lr {sched.get_last_lr()[0]:.2e}", flush=True)
    mapper.eval()
    return mapper, {"history": history, "num_codes": len(codes), "seconds": time.perf_counter() - started}


def save_mapper(uri: str, mapper: StyleMapper, cfg: IMLEConfig, info: dict[str, Any]) -> str:
    """A checkpoint folder (local or s3://) with mapper.pt, state.json (history) and config.yaml."""
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(folder, {"mapper": mapper}, {}, info, run_record("mapper", cfg, None))
        for path in sorted(Path(folder).iterdir()):
            storage.write_bytes(storage.join(uri, path.name), path.read_bytes())
    return uri
