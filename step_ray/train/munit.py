"""MUNIT (METHOD §7, unpaired): two auto-encoders whose content codes are shared between the domains
and whose style codes are not, trained under the project's Ray Train conventions.

    L_G = λ_gan (LSGAN_G(D_a(x_ba)) + LSGAN_G(D_b(x_ab))) + λ_x (|x̂_a − x_a| + |x̂_b − x_b|)
          + λ_c (|ĉ_a − c_a| + |ĉ_b − c_b|) + λ_s (|ŝ_a − s_a| + |ŝ_b − s_b|)
          [+ λ_cyc (|x_aba − x_a| + |x_bab − x_b|)] [+ λ_vgg (VGG_IN(x_ba, x_b) + VGG_IN(x_ab, x_a))]
    with c, s' = E(x), x̂ = G(c, s'), s ~ N(0, I), x_ba = G_a(c_b, s_a), x_ab = G_b(c_a, s_b), (ĉ, ŝ) = E(x_ba/x_ab)

Training reads a pix2pix-layout set without its pairing: each step takes A images and B images from two
independent permutations. Validation (rank 0) does use the pairs, where they exist: PSNR of A→B with the
true B's style code, and with a random style (the gap says whether the style code carries B's style).

Like the generator stages, the worker keeps everything needed to continue (both generators, both Ds, both
optimisers, epoch, step, best metric, history) in the checkpoint it reports every epoch; gradients are
averaged across workers explicitly (MUNIT passes through each encoder several times per step).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from step_ray.data.pix2pix import DataConfig
from step_ray.losses import lsgan_discriminator_loss, lsgan_generator_loss
from step_ray.losses.munit import (MUNITLossWeights, content_reconstruction_loss, cycle_consistency_loss,
                                   image_reconstruction_loss, instance_normalised_perceptual_loss, munit_generator_loss,
                                   style_reconstruction_loss)
from step_ray.metrics import record_epoch
from step_ray.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from step_ray.models.munit import MUNITConfig, MUNITGenerator, init_weights_, munit_discriminator_config
from step_ray.style.vgg import VGGConfig
from step_ray.train.common import (EpochMeter, MixedPrecision, OptimConfig, average_gradients, broadcast_parameters,
                                   epoch_batches, improves, fit, note_restart, report_epoch, resume_folder,
                                   seed_everything, worker_device)
from step_ray.checkpoints import load_checkpoint
from step_ray.eval.metrics import psnr as psnr_batch
from step_ray.train.generator import GeneratorInputs, GeneratorRunSettings, PairStore, no_parameter_grads
from step_ray.train.guard import NonFiniteConfig, NonFiniteGuard, guarded, seed_streams
from step_ray.train.monitor import IntervalMeter, MonitorConfig, RunMonitor

STAGE = "munit"


@dataclass(frozen=True)
class MUNITTrainConfig:
    """Official edges2shoes defaults (METHOD §7): Adam 1e-4 β (0.5, 0.999), weight decay 1e-4, lr halved every
    100k iterations, batch 1, λ_x 10, λ_c = λ_s = 1, λ_cyc = λ_vgg = 0, LSGAN 1."""

    model: MUNITConfig = field(default_factory=MUNITConfig)
    discriminator: DiscriminatorConfig = field(default_factory=munit_discriminator_config)
    weights: MUNITLossWeights = field(default_factory=MUNITLossWeights)
    vgg: VGGConfig = field(default_factory=lambda: VGGConfig(layers=("relu5_3",), layer_weights=(1.0,)))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.5, 0.999), weight_decay=1e-4))
    lr_halve_every: int = 100_000  # optimiser steps
    batch_size: int = 1  # per worker
    max_epochs: int = 10
    max_steps: int = 0  # 0: no step budget
    flip: bool = True
    seed: int = 0
    val_images: int = 64
    image_cache_mb: int = 4096
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig)  # what a NaN/Inf loss does

    def __post_init__(self):
        if min(self.batch_size, self.max_epochs, self.lr_halve_every) < 1:
            raise ValueError("batch_size, max_epochs and lr_halve_every must be >= 1")


def build_munit(cfg: MUNITTrainConfig, device) -> dict[str, torch.nn.Module]:
    """gen_a / gen_b: each domain's content encoder, style encoder and decoder; dis_a / dis_b: MUNIT's
    Gaussian-initialised multi-scale LSGAN discriminators (unconditional)."""
    return {
        "gen_a": MUNITGenerator(cfg.model).to(device),
        "gen_b": MUNITGenerator(cfg.model).to(device),
        "dis_a": init_weights_(PatchDiscriminator(cfg.discriminator), "gaussian").to(device),
        "dis_b": init_weights_(PatchDiscriminator(cfg.discriminator), "gaussian").to(device),
    }


def make_munit_optimizers(cfg: MUNITTrainConfig, nets: dict):
    opt_gen = cfg.optim.build(itertools.chain(nets["gen_a"].parameters(), nets["gen_b"].parameters()))
    opt_dis = cfg.optim.build(itertools.chain(nets["dis_a"].parameters(), nets["dis_b"].parameters()))
    return opt_gen, opt_dis


def _both(first, second):
    """One loss term summed over the two domains; its logs keep each domain's value (suffix _a, _b)."""
    (la, logs_a), (lb, logs_b) = first, second
    logs = {f"{k}_a": v for k, v in logs_a.items()} | {f"{k}_b": v for k, v in logs_b.items()}
    return la + lb, logs


def munit_step(cfg: MUNITTrainConfig, nets: dict, opt_gen, opt_dis, x_a: torch.Tensor, x_b: torch.Tensor, vgg=None,
               amp: MixedPrecision | None = None, guard: NonFiniteGuard | None = None,
               state: dict | None = None) -> dict[str, float] | None:
    """One D update then one G update (MUNIT's dis_update / gen_update). Only the terms with a weight > 0
    are computed. With a `guard`, an update whose loss is NaN/Inf (on any rank) is dropped; the logs are
    then None."""
    amp = amp or MixedPrecision("fp32", x_a.device)
    gen_a, gen_b, dis_a, dis_b = nets["gen_a"], nets["gen_b"], nets["dis_a"], nets["dis_b"]
    w = cfg.weights
    style_dim = cfg.model.style_dim
    s_a = torch.randn(len(x_a), style_dim, device=x_a.device)
    s_b = torch.randn(len(x_b), style_dim, device=x_b.device)

    # D: real images against translations with random styles
    with torch.no_grad(), amp.autocast():
        x_ba = gen_a.decode(gen_b.encode(x_b)[0], s_a)
        x_ab = gen_b.decode(gen_a.encode(x_a)[0], s_b)
    with amp.autocast():
        loss_da, logs_da = lsgan_discriminator_loss(dis_a(None, x_a), dis_a(None, x_ba))
        loss_db, logs_db = lsgan_discriminator_loss(dis_b(None, x_b), dis_b(None, x_ab))
    loss_d = loss_da + loss_db
    opt_dis.zero_grad(set_to_none=True)
    ok = guarded(guard, state, "loss_d", loss_d)
    if ok:
        amp.backward(loss_d)
        average_gradients(dis_a, dis_b)
        amp.step(opt_dis)
    elif guard.rollback_pending:
        return None
    logs = {"loss_d": logs_da["loss_d"] + logs_db["loss_d"]}

    # G: both auto-encoders
    with no_parameter_grads(dis_a, dis_b), amp.autocast():
        c_a, s_a_own = gen_a.encode(x_a)
        c_b, s_b_own = gen_b.encode(x_b)
        x_ba = gen_a.decode(c_b, s_a)
        x_ab = gen_b.decode(c_a, s_b)
        c_b_rec, s_a_rec = gen_a.encode(x_ba)
        c_a_rec, s_b_rec = gen_b.encode(x_ab)
        terms: dict[str, Any] = {}
        if w.gan:
            terms["gan"] = _both(lsgan_generator_loss(dis_a(None, x_ba)), lsgan_generator_loss(dis_b(None, x_ab)))
        if w.x:
            terms["x"] = _both(image_reconstruction_loss(gen_a.decode(c_a, s_a_own), x_a),
                               image_reconstruction_loss(gen_b.decode(c_b, s_b_own), x_b))
        if w.c:
            terms["c"] = _both(content_reconstruction_loss(c_a_rec, c_a), content_reconstruction_loss(c_b_rec, c_b))
        if w.s:
            terms["s"] = _both(style_reconstruction_loss(s_a_rec, s_a), style_reconstruction_loss(s_b_rec, s_b))
        if w.cyc:  # style-augmented cycle: back to the own domain with its own style code
            terms["cyc"] = _both(cycle_consistency_loss(gen_a.decode(c_a_rec, s_a_own), x_a),
                                 cycle_consistency_loss(gen_b.decode(c_b_rec, s_b_own), x_b))
        if w.vgg:
            terms["vgg"] = _both(instance_normalised_perceptual_loss(vgg, x_ba, x_b),
                                 instance_normalised_perceptual_loss(vgg, x_ab, x_a))
        loss_g, g_logs = munit_generator_loss(w, terms)
    if guard is not None:
        loss_g = guard.inject(loss_g, state)
    opt_gen.zero_grad(set_to_none=True)
    if guarded(guard, state, "loss_g", loss_g):
        amp.backward(loss_g)
        average_gradients(gen_a, gen_b)
        amp.step(opt_gen)
    else:
        ok = False
    amp.update()
    if guard is not None:
        guard.step_done(ok)
    return {**logs, **g_logs} if ok else None


@torch.no_grad()
def validate_munit(nets: dict, a: torch.Tensor, b: torch.Tensor, style_dim: int, seed: int, device) -> dict[str, float]:
    """On paired validation images: A→B with the true B's style code, and with a random style, against B;
    and each domain's own reconstruction."""
    gen_a, gen_b = nets["gen_a"], nets["gen_b"]
    for g in (gen_a, gen_b):
        g.eval()
    gen = torch.Generator().manual_seed(seed)
    true, rand, rec_a, rec_b = [], [], [], []
    for i in range(0, len(a), 32):
        ai, bi = a[i : i + 32].to(device), b[i : i + 32].to(device)
        c_a, s_a = gen_a.encode(ai)
        c_b, s_b = gen_b.encode(bi)
        true.append(psnr_batch(gen_b.decode(c_a, s_b), bi).cpu())
        rand.append(psnr_batch(gen_b.decode(c_a, torch.randn(len(ai), style_dim, generator=gen).to(device)), bi).cpu())
        rec_a.append(psnr_batch(gen_a.decode(c_a, s_a), ai).cpu())
        rec_b.append(psnr_batch(gen_b.decode(c_b, s_b), bi).cpu())
    for g in (gen_a, gen_b):
        g.train()
    p, q = torch.cat(true).mean().item(), torch.cat(rand).mean().item()
    return {"val_psnr": p, "val_psnr_random_style": q, "val_psnr_margin": p - q,
            "val_recon_psnr_a": torch.cat(rec_a).mean().item(), "val_recon_psnr_b": torch.cat(rec_b).mean().item()}


def munit_worker_loop(loop_config: dict[str, Any]) -> None:
    import ray.train

    from step_ray.style.vgg import load_vgg

    cfg: MUNITTrainConfig = loop_config["train"]
    inputs: GeneratorInputs = loop_config["inputs"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device()
    amp = MixedPrecision(cfg.precision, device)
    seed_everything(cfg.seed)
    nets = build_munit(cfg, device)
    opt_gen, opt_dis = make_munit_optimizers(cfg, nets)
    optimizers = {"optimizer_gen": opt_gen, "optimizer_dis": opt_dis, **amp.stateful()}
    state: dict[str, Any] = {"stage": STAGE, "epoch": 0, "step": 0, "best": None, "history": [], "stopped": ""}
    with resume_folder(loop_config) as folder:
        if folder is not None:  # resume, or restart after a lost worker: the newest complete checkpoint
            state = load_checkpoint(folder, nets, optimizers, map_location=device)
            note_restart(state)
    state["stopped"] = ""
    broadcast_parameters(*nets.values())
    vgg = load_vgg(cfg.vgg, device) if cfg.weights.vgg else None
    for opt in (opt_gen, opt_dis):
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])

    store = PairStore(inputs.train_paths, inputs.data, cfg.image_cache_mb)
    if rank == 0:
        val_rows = np.arange(min(cfg.val_images, len(inputs.val_paths)))
        val_a, val_b = PairStore(inputs.val_paths, inputs.data, 0).batch(val_rows)
    monitor = RunMonitor(loop_config.get("run_folder", ""), STAGE, enabled=rank == 0 and cfg.monitor.enabled)
    interval = IntervalMeter()
    guard = NonFiniteGuard(cfg.nonfinite, STAGE, rank)
    guard.remember(nets, optimizers, state)
    n = len(inputs.train_paths)

    while state["epoch"] < cfg.max_epochs and not state["stopped"]:
        epoch = state["epoch"]
        seed_everything(cfg.seed, *seed_streams(epoch, rank, state))
        # unpaired: the A side and the B side of a step come from two independent permutations, each
        # image used once per epoch on each side (the two lists have the same shapes on every rank)
        batches_a = epoch_batches(n, cfg.batch_size, [cfg.seed, epoch, 0], rank, world)
        batches_b = epoch_batches(n, cfg.batch_size, [cfg.seed, epoch, 1], rank, world)
        meter = EpochMeter()
        for rows_a, rows_b in zip(batches_a, batches_b):
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                state["stopped"] = f"step budget {cfg.max_steps} reached"
                break
            factor = 0.5 ** (state["step"] // cfg.lr_halve_every)  # MUNIT's step decay, from checkpointed state
            for opt in (opt_gen, opt_dis):
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * factor
            x_a = store.batch(rows_a)[0].to(device)
            x_b = store.batch(rows_b)[1].to(device)
            if cfg.flip:
                x_a = torch.where((torch.rand(len(x_a), device=device) < 0.5)[:, None, None, None], x_a.flip(3), x_a)
                x_b = torch.where((torch.rand(len(x_b), device=device) < 0.5)[:, None, None, None], x_b.flip(3), x_b)
            logs = munit_step(cfg, nets, opt_gen, opt_dis, x_a, x_b, vgg, amp, guard, state)
            if guard.rollback_pending:
                break
            state["step"] += 1
            if logs is None:  # a non-finite loss: that update was dropped
                continue
            meter.add(logs, len(rows_a))
            interval.add(logs, len(rows_a))
            if cfg.monitor.scalars_every and state["step"] % cfg.monitor.scalars_every == 0:
                scalars = interval.take(world)
                monitor.scalars(state["step"], scalars)
                record_epoch(STAGE, {**scalars, "step": state["step"]}, rank=rank)
        if guard.rollback_pending:  # back to the last checkpoint's weights, optimisers and state; replay
            state = guard.restore(nets, optimizers, state)
            continue
        seconds = meter.seconds()
        metrics: dict[str, Any] = meter.means()
        metrics.update(stage=STAGE, epoch=epoch, step=state["step"], epoch_seconds=seconds,
                       nonfinite_steps=guard.take_epoch_count(), images_per_s=meter.rate(seconds, world))
        if rank == 0:
            metrics.update(validate_munit(nets, val_a, val_b, cfg.model.style_dim, cfg.seed, device))
            if improves(metrics.get(loop_config["checkpoint_metric"]), state["best"], loop_config["checkpoint_mode"]):
                state["best"] = metrics.get(loop_config["checkpoint_metric"])
            state["history"].append(metrics)
            print(f"[munit] epoch {epoch + 1}/{cfg.max_epochs} | loss_g {metrics.get('train_loss_g', float('nan')):.4f} | "
                  f"loss_d {metrics.get('train_loss_d', float('nan')):.4f} | {metrics['images_per_s']:.1f} img/s | "
                  f"val_psnr {metrics['val_psnr']:.2f} | random style {metrics['val_psnr_random_style']:.2f}", flush=True)
            monitor.scalars(state["step"], {k: v for k, v in metrics.items() if k not in ("stage", "step")})
            if cfg.monitor.enabled and cfg.monitor.grid_every and (epoch + 1) % cfg.monitor.grid_every == 0:
                monitor.image("samples", state["step"], munit_grid(cfg, nets, val_a, val_b, device),
                              png_name=f"{STAGE}_epoch{epoch:04d}.png")
        state["epoch"] = epoch + 1
        record_epoch(STAGE, metrics, rank=rank)
        report_epoch(metrics, epoch, rank, nets, optimizers, state, loop_config["config"])
        guard.remember(nets, optimizers, state)
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            state["stopped"] = f"step budget {cfg.max_steps} reached"
    monitor.close()


@torch.no_grad()
def munit_grid(cfg: MUNITTrainConfig, nets: dict, val_a: torch.Tensor, val_b: torch.Tensor, device) -> np.ndarray:
    """Fixed val inputs × fixed B references (example-guided), then fixed random styles."""
    from step_ray.eval.embedding import image_grid
    from step_ray.eval.pictures import to_uint8

    m = cfg.monitor
    rng = np.random.default_rng(m.seed)
    a = val_a[rng.choice(len(val_a), min(m.grid_inputs, len(val_a)), replace=False)].to(device)
    refs = val_b[rng.choice(len(val_b), min(m.grid_references, len(val_b)), replace=False)].to(device)
    gen_a, gen_b = nets["gen_a"], nets["gen_b"]
    styles = torch.cat([gen_b.encode(refs)[1],
                        torch.randn(m.grid_samples, cfg.model.style_dim, generator=torch.Generator().manual_seed(m.seed)).to(device)])
    content = gen_a.encode(a)[0]
    out = gen_b.decode(content.repeat_interleave(len(styles), 0), styles.repeat(len(a), 1))
    pictures = to_uint8(out).reshape(len(a), len(styles), *to_uint8(out[:1]).shape[1:])
    blank = np.full_like(to_uint8(refs[:1])[0], 255)
    rows = [[blank] + list(to_uint8(refs)) + [blank] * m.grid_samples]
    rows += [[x] + list(row) for x, row in zip(to_uint8(a), pictures)]
    return image_grid(rows)


# ----------------------------------------------------------------------------------------------------
# the driver


@dataclass(frozen=True)
class TrainMUNITConfig:
    """`jobs/train_munit.py`: MUNIT on a pix2pix-layout set used unpaired, then its evaluation."""

    data: DataConfig = field(default_factory=DataConfig)
    val_split: str = "val"
    train: MUNITTrainConfig = field(default_factory=MUNITTrainConfig)
    run: GeneratorRunSettings = field(default_factory=GeneratorRunSettings)  # best checkpoints by val_psnr
    evaluate: bool = True
    eval_inputs: int = 100
    eval_styles: int = 16

    def __post_init__(self):
        self.train.model.check_image_size(self.data.image_size)


def run_train_munit(cfg: TrainMUNITConfig, callbacks: tuple = ()) -> dict[str, Any]:
    """Train, then evaluate the last checkpoint; returns {"munit": checkpoint, "eval_metrics": ..., ...}."""
    from step_ray import storage
    from step_ray.config import config_to_dict
    from step_ray.train.common import write_json
    from step_ray.train.generator import last_checkpoint, prepare_generator_inputs

    started = time.perf_counter()
    inputs = prepare_generator_inputs(cfg.data, cfg.val_split)
    if inputs.data.image_size < cfg.train.discriminator.min_side():
        raise ValueError(f"data.image_size={inputs.data.image_size} is below the discriminator's minimum "
                         f"{cfg.train.discriminator.min_side()} (lower train.discriminator.n_layers or num_scales)")
    loop_config = {"train": cfg.train, "inputs": inputs, "config": cfg.train,
                   "checkpoint_metric": cfg.run.checkpoint_metric, "checkpoint_mode": cfg.run.checkpoint_mode}
    result, run_uri = fit(munit_worker_loop, loop_config, cfg.run, STAGE, callbacks)
    if result.error:
        raise result.error
    out: dict[str, Any] = {"munit": last_checkpoint(result, cfg.run), "munit_run": run_uri,
                           "munit_metrics": result.metrics, "train_seconds": time.perf_counter() - started}
    out["images_per_s"] = (result.metrics or {}).get("images_per_s")
    print(f"[train_munit] done training: {out['munit']}", flush=True)
    if cfg.evaluate:
        from step_ray.eval.metrics import LPIPSConfig
        from step_ray.eval.munit_eval import evaluate_munit

        nets = load_munit(out["munit"])
        record = evaluate_munit(nets["gen_a"], nets["gen_b"], inputs.data, cfg.val_split, storage.join(out["munit"], "eval"),
                                LPIPSConfig(), num_inputs=cfg.eval_inputs, num_styles=cfg.eval_styles)
        out["eval"], out["eval_metrics"] = record["output"], record["metrics"]
    out["metrics"] = storage.join(run_uri, "train_munit.json")
    write_json(out["metrics"], {**out, "config": config_to_dict(cfg)})
    return out


def load_munit(checkpoint: str, device: str | torch.device = "cpu") -> dict[str, torch.nn.Module]:
    """gen_a, gen_b, dis_a, dis_b of a MUNIT checkpoint (local or s3://), in eval mode."""
    from step_ray.checkpoints import load_saved_modules

    nets = load_saved_modules(checkpoint, MUNITTrainConfig, lambda cfg: build_munit(cfg, "cpu"), where="munit")
    return {k: v.to(device) for k, v in nets.items()}
