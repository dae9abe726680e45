"""MUNIT (docs/method.md §7, unpaired): two auto-encoders whose content codes are shared between the domains
and whose style codes are not, trained under the project's Ray Train conventions.

    L_G = λ_gan (LSGAN_G(D_a(x_ba)) + LSGAN_G(D_b(x_ab))) + λ_x (|x̂_a − x_a| + |x̂_b − x_b|)
          + λ_c (|ĉ_a − c_a| + |ĉ_b − c_b|) + λ_s (|ŝ_a − s_a| + |ŝ_b − s_b|)
          [+ λ_cyc (|x_aba − x_a| + |x_bab − x_b|)] [+ λ_vgg (VGG_IN(x_ba, x_b) + VGG_IN(x_ab, x_a))]
    with c, s' = E(x), x̂ = G(c, s'), s ~ N(0, I), x_ba = G_a(c_b, s_a), x_ab = G_b(c_a, s_b), (ĉ, ŝ) = E(x_ba/x_ab)

Training reads a pix2pix-layout set without its pairing: each step takes A images and B images from two
independent permutations. Validation (rank 0) does use the pairs, where they exist: PSNR of A→B with the
true B's style code, and with a random style (the gap says whether the style code carries B's style).

A recipe of step_ray.engine.loop like the others (its checkpoints hold both generators, both Ds and both
optimisers); gradients are averaged across workers explicitly (MUNIT passes through each encoder several
times per step).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from step_ray.data.scan import PairedSplits
from step_ray.data.store import pair_store
from step_ray.engine.distributed import broadcast_parameters, no_parameter_grads, random_flip
from step_ray.engine.guard import NonFiniteGuard, guarded_update
from step_ray.engine.loop import Recipe, Worker, epoch_batches
from step_ray.engine.precision import MixedPrecision
from step_ray.engine.settings import LoopConfig, OptimConfig
from step_ray.eval.embedding import image_grid
from step_ray.eval.metrics import load_lpips, lpips_distance, psnr
from step_ray.eval.pictures import to_uint8
from step_ray.losses import lsgan_discriminator_loss, lsgan_generator_loss
from step_ray.losses.munit import (MUNITLossWeights, content_reconstruction_loss, cycle_consistency_loss,
                                   image_reconstruction_loss, instance_normalised_perceptual_loss, munit_generator_loss,
                                   style_reconstruction_loss)
from step_ray.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from step_ray.models.munit import MUNITConfig, MUNITGenerator, init_weights_, munit_discriminator_config
from step_ray.style.vgg import VGGConfig, load_vgg


@dataclass(frozen=True)
class MUNITTraining(LoopConfig):
    """Official edges2shoes defaults (docs/method.md §7): Adam 1e-4 β (0.5, 0.999), weight decay 1e-4, lr halved every
    100k iterations, batch 1, λ_x 10, λ_c = λ_s = 1, λ_cyc = λ_vgg = 0, LSGAN 1."""

    model: MUNITConfig = field(default_factory=MUNITConfig)
    discriminator: DiscriminatorConfig = field(default_factory=munit_discriminator_config)
    weights: MUNITLossWeights = field(default_factory=MUNITLossWeights)
    vgg: VGGConfig = field(default_factory=lambda: VGGConfig(layers=("relu5_3",), layer_weights=(1.0,)))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.5, 0.999), weight_decay=1e-4))
    lr_halve_every: int = 100_000  # optimiser steps
    batch_size: int = 1  # per worker
    val_images: int = 64
    val_lpips: bool = True  # also LPIPS (AlexNet) of A→B with B's own style code against B, as the generator's

    def __post_init__(self):
        super().__post_init__()
        if self.lr_halve_every < 1:
            raise ValueError("lr_halve_every must be >= 1")


def build_munit(cfg: MUNITTraining, device) -> dict[str, torch.nn.Module]:
    """gen_a / gen_b: each domain's content encoder, style encoder and decoder; dis_a / dis_b: MUNIT's
    Gaussian-initialised multi-scale LSGAN discriminators (unconditional)."""
    return {
        "gen_a": MUNITGenerator(cfg.model).to(device),
        "gen_b": MUNITGenerator(cfg.model).to(device),
        "dis_a": init_weights_(PatchDiscriminator(cfg.discriminator), "gaussian").to(device),
        "dis_b": init_weights_(PatchDiscriminator(cfg.discriminator), "gaussian").to(device),
    }


def make_munit_optimizers(cfg: MUNITTraining, nets: dict):
    opt_gen = cfg.optim.build(itertools.chain(nets["gen_a"].parameters(), nets["gen_b"].parameters()))
    opt_dis = cfg.optim.build(itertools.chain(nets["dis_a"].parameters(), nets["dis_b"].parameters()))
    return opt_gen, opt_dis


def _both(first, second):
    """One loss term summed over the two domains; its logs keep each domain's value (suffix _a, _b)."""
    (la, logs_a), (lb, logs_b) = first, second
    logs = {f"{k}_a": v for k, v in logs_a.items()} | {f"{k}_b": v for k, v in logs_b.items()}
    return la + lb, logs


def munit_step(cfg: MUNITTraining, nets: dict, opt_gen, opt_dis, x_a: torch.Tensor, x_b: torch.Tensor, vgg=None,
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
    ok = guarded_update(guard, state, "loss_d", loss_d, [opt_dis], [dis_a, dis_b], amp)
    if not ok and guard.rollback_pending:
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
    if not guarded_update(guard, state, "loss_g", loss_g, [opt_gen], [gen_a, gen_b], amp):
        ok = False
    amp.update()
    if guard is not None:
        guard.step_done(ok)
    return {**logs, **g_logs} if ok else None


@torch.no_grad()
def validate_munit(nets: dict, a: torch.Tensor, b: torch.Tensor, style_dim: int, seed: int, device,
                   lpips_model=None) -> dict[str, float]:
    """On paired validation images: A→B with the true B's style code, and with a random style, against B
    (PSNR; with an LPIPS model also LPIPS of the first); and each domain's own reconstruction."""
    gen_a, gen_b = nets["gen_a"], nets["gen_b"]
    for g in (gen_a, gen_b):
        g.eval()
    gen = torch.Generator().manual_seed(seed)
    true, rand, rec_a, rec_b, perceptual = [], [], [], [], []
    for i in range(0, len(a), 32):
        ai, bi = a[i : i + 32].to(device), b[i : i + 32].to(device)
        c_a, s_a = gen_a.encode(ai)
        c_b, s_b = gen_b.encode(bi)
        fake = gen_b.decode(c_a, s_b)
        true.append(psnr(fake, bi).cpu())
        if lpips_model is not None:
            perceptual.append(lpips_distance(lpips_model, fake, bi))
        rand.append(psnr(gen_b.decode(c_a, torch.randn(len(ai), style_dim, generator=gen).to(device)), bi).cpu())
        rec_a.append(psnr(gen_a.decode(c_a, s_a), ai).cpu())
        rec_b.append(psnr(gen_b.decode(c_b, s_b), bi).cpu())
    for g in (gen_a, gen_b):
        g.train()
    p, q = torch.cat(true).mean().item(), torch.cat(rand).mean().item()
    out = {"val_psnr": p, "val_psnr_random_style": q, "val_psnr_margin": p - q,
           "val_recon_psnr_a": torch.cat(rec_a).mean().item(), "val_recon_psnr_b": torch.cat(rec_b).mean().item()}
    if perceptual:
        out["val_lpips"] = torch.cat(perceptual).mean().item()
    return out


@dataclass
class MUNITRecipe(Recipe):
    """Both auto-encoders and both Ds; unpaired batches: the A side and the B side of a step come from two
    independent permutations, each image used once per epoch on each side."""

    cfg: MUNITTraining
    inputs: PairedSplits
    job: Any = None
    name: str = "munit"

    def build(self, w: Worker) -> dict[str, torch.nn.Module]:
        return build_munit(self.cfg, w.device)

    def make_optimizers(self, w: Worker, modules):
        self.nets = modules
        self.opt_gen, self.opt_dis = make_munit_optimizers(self.cfg, modules)
        return {"optimizer_gen": self.opt_gen, "optimizer_dis": self.opt_dis}

    def prepare(self, w: Worker, state) -> None:
        cfg, inputs = self.cfg, self.inputs
        broadcast_parameters(*self.nets.values())
        self.vgg = load_vgg(cfg.vgg, w.device) if cfg.weights.vgg else None
        for opt in (self.opt_gen, self.opt_dis):
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
        self.store = pair_store(inputs.train_paths, inputs.data, cfg.image_cache_mb)
        if w.rank == 0:
            rows = np.arange(min(cfg.val_images, len(inputs.val_paths)))
            self.val_a, self.val_b = pair_store(inputs.val_paths, inputs.data, 0).batch(rows)
            self.lpips = load_lpips(device=w.device) if cfg.val_lpips else None

    def batches(self, w: Worker, epoch: int, streams):
        n, cfg = len(self.inputs.train_paths), self.cfg
        batches_a = epoch_batches(n, cfg.batch_size, [cfg.seed, epoch, 0], w.rank, w.world)
        batches_b = epoch_batches(n, cfg.batch_size, [cfg.seed, epoch, 1], w.rank, w.world)
        return [(len(ra), (ra, rb)) for ra, rb in zip(batches_a, batches_b)]

    def load(self, batch):
        rows_a, rows_b = batch
        return self.store.batch(rows_a)[0], self.store.batch(rows_b)[1]

    def step(self, w: Worker, batch, state, guard):
        factor = 0.5 ** (state["step"] // self.cfg.lr_halve_every)  # MUNIT's step decay, from checkpointed state
        for opt in (self.opt_gen, self.opt_dis):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        x_a, x_b = (x.to(w.device, non_blocking=True) for x in batch)
        if self.cfg.flip:  # each side its own flips: the two images are unrelated
            (x_a,), (x_b,) = random_flip(x_a), random_flip(x_b)
        return munit_step(self.cfg, self.nets, self.opt_gen, self.opt_dis, x_a, x_b, self.vgg, w.amp, guard, state)

    def validate(self, w: Worker, state):
        return validate_munit(self.nets, self.val_a, self.val_b, self.cfg.model.style_dim, self.cfg.seed, w.device,
                              self.lpips)

    def grid(self, w: Worker, state):
        return "samples", munit_grid(self.cfg, self.nets, self.val_a, self.val_b, w.device)

    def progress(self, m: dict[str, Any]) -> list[str]:
        return [f"loss_g {m.get('train_loss_g', float('nan')):.4f}",
                f"loss_d {m.get('train_loss_d', float('nan')):.4f}",
                f"{m['images_per_s']:.1f} img/s", f"val_psnr {m['val_psnr']:.2f}",
                f"random style {m['val_psnr_random_style']:.2f}"]


@torch.no_grad()
def munit_grid(cfg: MUNITTraining, nets: dict, val_a: torch.Tensor, val_b: torch.Tensor, device) -> np.ndarray:
    """Fixed val inputs × fixed B references (example-guided), then fixed random styles."""
    m = cfg.monitor
    rng = np.random.default_rng(m.seed)
    a = val_a[rng.choice(len(val_a), min(m.grid_inputs, len(val_a)), replace=False)].to(device)
    refs = val_b[rng.choice(len(val_b), min(m.grid_references, len(val_b)), replace=False)].to(device)
    gen_a, gen_b = nets["gen_a"], nets["gen_b"]
    styles = torch.cat([gen_b.encode(refs)[1],
                        torch.randn(m.grid_samples, cfg.model.style_dim,
                                    generator=torch.Generator().manual_seed(m.seed)).to(device)])
    content = gen_a.encode(a)[0]
    out = gen_b.decode(content.repeat_interleave(len(styles), 0), styles.repeat(len(a), 1))
    pictures = to_uint8(out).reshape(len(a), len(styles), *to_uint8(out[:1]).shape[1:])
    blank = np.full_like(to_uint8(refs[:1])[0], 255)
    rows = [[blank] + list(to_uint8(refs)) + [blank] * m.grid_samples]
    rows += [[x] + list(row) for x, row in zip(to_uint8(a), pictures)]
    return image_grid(rows)
