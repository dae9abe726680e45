"""The paper's baselines and ablations (docs/method.md §7) as named, versioned settings of the one generator trainer.

A variant is a partial `GeneratorTraining` (the `train` section of `GeneratorJobConfig`): it switches
loss terms (λ = 0 is off) and model parts (a variational E, a second D, E from scratch or pre-trained).
`jobs/train_generator.py --variant NAME` lays it under the YAML file and the command line, and the name
is recorded as `train.variant` in every checkpoint's config.yaml. The defaults of `GeneratorTraining`
are `ours_v4`, the final StEP model (LSGAN + λ_rec · reconstruction).

Loss terms per variant (log names of step_ray.recipes.generator.G_TERMS; "rec" is vgg or l1):

    bicycle_v0  gan_g rec kl gan_random latent      official recipe: L1 ×10, Adam 2e-4 β (0.5, 0.999), 2 Ds on B
                                                    alone, no EMA, the batch split between the two branches
    bicycle_v1  gan_g rec kl gan_random latent      BicycleGAN with StEP's networks and losses
    bicycle_v2  gan_g rec    gan_random latent      v1 without the VAE (deterministic E, no KL)
    bicycle_v3  gan_g rec z_l2 gan_random latent    v2 with an L2 penalty on z instead of KL
    munitp_v1   gan_g rec kl cycle gan_random latent          paired MUNIT: cross-cycle reconstruction, VAE
    munitp_v2   gan_g rec cycle gan_random latent             no VAE
    munitp_v3   gan_g rec z_l2 cycle gan_random latent        L2 instead of KL
    ours_v1     gan_g rec z_l2 cycle gan_random latent        MUNIT-p v3 + the pre-trained style encoder
    ours_v2     gan_g rec z_l2 gan_random latent              v1 without the cyclic reconstruction
    ours_v3     gan_g rec z_l2                                v2 without random-z sampling
    ours_v4     gan_g rec                                     v3 without the L2 penalty: StEP
    munit       MUNIT, unpaired (its own loop: step_ray.recipes.munit; jobs/train_munit.py, or in a sweep)

Reading of the paper where it is silent (stated in the README too): every variant keeps the direct
reconstruction G(A, E(B)) ≈ B (Ours v2 "without cyclic reconstruction" still reconstructs); the random-z
branch is BicycleGAN's cLR-GAN (GAN on G(A, z_r) and |E(G(A, z_r)) − z_r|); the L2 weight on z is 0.01,
the value of λ_kl it replaces; baselines train E from scratch with G in one stage as long as stages 2 + 3.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

# the random-z branch and BicycleGAN's weights for it (docs/method.md §7: λ_GAN2 = 1, λ_z = 0.5), λ_kl = 0.01
_RANDOM_Z = {"lambda_gan_random": 1.0, "lambda_latent": 0.5}
_VAE = {"encoder": {"variational": True}, "lambda_kl": 0.01}
_L2_ON_Z = {"lambda_z_l2": 0.01}
_SCRATCH = {"encoder_init": "scratch", "train_encoder": True, "encoder_lr_scale": 1.0}
_CYCLE = {"lambda_cycle": 1.0}


@dataclass(frozen=True)
class Variant:
    name: str
    family: str  # the row group of the ablation table
    version: str
    summary: str
    train: Mapping[str, Any] = field(default_factory=dict)  # a partial GeneratorTraining (MUNIT: MUNITTraining)
    recipe: Literal["generator", "munit", "multidomain"] = "generator"  # which recipe trains it (its pipeline:
                                                                        # step_ray.pipelines.sweep.PIPELINES)


def _merged(*parts: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, Mapping) else value
    return out


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("bicycle_v0", "BicycleGAN", "v0", "the official BicycleGAN recipe",
            _merged(_SCRATCH, _VAE, _RANDOM_Z, {
                "lambda_vgg": 0.0, "lambda_l1": 10.0, "random_discriminator": "separate", "ema_decay": 0.0,
                "optim_g": {"lr": 2e-4, "betas": [0.5, 0.999]}, "optim_d": {"lr": 2e-4, "betas": [0.5, 0.999]},
                "generator": {"z_injection": "all"},
                # BicycleGAN's D (D_NLayersMulti, its default conditional_D off): B only, 64 filters, 2 scales
                # with the coarser one half as wide, no minibatch statistic (StEP's: (A, B), 32 filters, 3 scales)
                "discriminator": {"a_channels": 0, "base_channels": 64, "num_scales": 2, "minibatch_stddev": False,
                                  "scale_widths": "halved"},
                # its batch of 2 is one pair per branch (BiCycleGANModel.forward)
                "split_batch": True,
                "encoder": {"norm": "instance"}, "batch_size": 2})),
    Variant("bicycle_v1", "BicycleGAN", "v1", "BicycleGAN with StEP's networks and losses",
            _merged(_SCRATCH, _VAE, _RANDOM_Z)),
    Variant("bicycle_v2", "BicycleGAN", "v2", "v1 without the VAE (deterministic E, no KL)",
            _merged(_SCRATCH, _RANDOM_Z)),
    Variant("bicycle_v3", "BicycleGAN", "v3", "v2 with an L2 penalty on z instead of KL",
            _merged(_SCRATCH, _RANDOM_Z, _L2_ON_Z)),
    Variant("munitp_v1", "MUNIT-p", "v1", "paired MUNIT: cross-cycle reconstruction, VAE",
            _merged(_SCRATCH, _VAE, _CYCLE, _RANDOM_Z)),
    Variant("munitp_v2", "MUNIT-p", "v2", "v1 without the VAE", _merged(_SCRATCH, _CYCLE, _RANDOM_Z)),
    Variant("munitp_v3", "MUNIT-p", "v3", "v2 with an L2 penalty on z instead of KL",
            _merged(_SCRATCH, _CYCLE, _RANDOM_Z, _L2_ON_Z)),
    Variant("ours_v1", "Ours", "v1", "MUNIT-p v3 with the pre-trained style encoder",
            _merged(_CYCLE, _RANDOM_Z, _L2_ON_Z)),
    Variant("ours_v2", "Ours", "v2", "v1 without the cyclic reconstruction", _merged(_RANDOM_Z, _L2_ON_Z)),
    Variant("ours_v3", "Ours", "v3", "v2 without random-z sampling", _merged(_L2_ON_Z)),
    Variant("ours_v4", "Ours", "v4", "v3 without the L2 penalty: StEP (LSGAN + λ_rec · rec)", {}),
    Variant("munit", "MUNIT", "", "unpaired MUNIT (official weights; step_ray.recipes.munit)", {}, recipe="munit"),
    Variant("multidomain", "Multi-domain", "full",
            "flow latent styles + L_uni + L_smooth (step_ray.recipes.multidomain)", {}, recipe="multidomain"),
    Variant("multidomain_plain", "Multi-domain", "no uni/smooth", "the same without L_uni and L_smooth",
            {"weights": {"uni": 0.0, "smooth": 0.0}}, recipe="multidomain"),
)}
VARIANT_NAMES = tuple(VARIANTS)
GENERATOR_VARIANTS = tuple(name for name, v in VARIANTS.items() if v.recipe == "generator")


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def variant_base(name: str) -> dict[str, Any]:
    """The variant as a base layer for `load_config(GeneratorJobConfig, ..., base=...)` (for MUNIT:
    `MUNITJobConfig`, which has no variant record)."""
    variant = get_variant(name)
    if variant.recipe != "generator":
        return {"train": dict(variant.train)}
    return {"train": {**variant.train, "variant": name}}


def components(train) -> dict[str, Any]:
    """What a resolved GeneratorTraining (or MUNITTraining) switches on: the ablation table's columns."""
    if hasattr(train, "flow_lr"):  # the multi-domain model: flow latent styles, cycle, E from scratch
        return {"encoder": "scratch", "vae": False, "kl": False, "l2_z": False, "cycle": train.weights.cyc > 0,
                "random_z": True, "rec": "–"}
    if hasattr(train, "weights"):  # MUNIT: content/style encoders from scratch, random styles, cycle optional
        return {"encoder": "scratch", "vae": False, "kl": False, "l2_z": False, "cycle": train.weights.cyc > 0,
                "random_z": True, "rec": "L1"}
    return {
        "encoder": "scratch" if train.encoder_init == "scratch" else "pre-trained",
        "vae": train.encoder.variational,
        "kl": train.lambda_kl > 0,
        "l2_z": train.lambda_z_l2 > 0,
        "cycle": train.lambda_cycle > 0,
        "random_z": train.lambda_gan_random > 0 or train.lambda_latent > 0,
        "rec": "+".join(n for n, w in (("VGG", train.lambda_vgg), ("L1", train.lambda_l1)) if w),
    }
