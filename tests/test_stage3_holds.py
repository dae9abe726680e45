"""Stage 3 must not undo stage 2: E fine-tuned with G keeps the codes G_ema learned, and G keeps using z.

In one process (the generator recipe's own train_step; no Ray), on real facades at 32 px with tiny nets:
a fixed-seed stage 2 (E frozen) then a short stage 3 from that same state, with the default E learning
rate (encoder_lr_scale 0.1) and with E at G's rate (1.0, the old behaviour) as the contrast.
"""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from step_ray.data.pix2pix import DataConfig, list_split
from step_ray.data.store import pair_store
from step_ray.eval.metrics import psnr
from step_ray.models import DiscriminatorConfig, EncoderConfig, GeneratorConfig
from step_ray.recipes.generator import GeneratorTraining, build_networks, freeze, make_optimizers, train_step


def _codes_and_margin(nets, a, b, other):
    with torch.no_grad():
        e = nets["encoder"].eval()
        z = e(b)
        own = psnr(nets["generator_ema"](a, z), b).mean().item()
        cross = psnr(nets["generator_ema"](a, e(b[other])), b).mean().item()
    return z, own - cross


@pytest.fixture
def after_stage2(facades_root, tmp_path):
    torch.manual_seed(0)
    data = DataConfig(root=str(facades_root), direction="BtoA", image_size=32)
    cfg = GeneratorTraining(
        encoder=EncoderConfig(base_channels=16, block_channels=(32, 32)),
        generator=GeneratorConfig(num_downs=5, base_channels=16),
        discriminator=DiscriminatorConfig(base_channels=8, num_scales=1, n_layers=1),
        lambda_vgg=0.0, lambda_l1=10.0, batch_size=8, ema_decay=0.9, ema_warmup=False)
    nets = build_networks(cfg, "cpu")
    freeze(nets["encoder"])
    opt_g, opt_d = make_optimizers(cfg, nets, None, "cpu")
    store = pair_store(list_split(str(facades_root), "train")[:96], data, 64)
    val_a, val_b = pair_store(list_split(str(facades_root), "val")[:32], data, 0).batch(np.arange(32))
    other = np.roll(np.arange(32), 7)
    rng = np.random.default_rng(0)
    for step in range(60):
        train_step(cfg, nets, opt_g, opt_d, *store.batch(rng.choice(96, 8, replace=False)), None, step)
    z2, margin2 = _codes_and_margin(nets, val_a, val_b, other)
    torch.save(opt_g.state_dict(), tmp_path / "optimizer_g.pt")  # where a stage-3 run finds stage 2's moments
    torch.save(opt_d.state_dict(), tmp_path / "optimizer_d.pt")
    return cfg, nets, str(tmp_path), store, (val_a, val_b, other), z2, margin2


def _stage3(after_stage2, scale: float, steps: int = 30):
    cfg, nets, stage2_folder, store, (val_a, val_b, other), z2, _ = after_stage2
    cfg3 = dataclasses.replace(cfg, train_encoder=True, encoder_lr_scale=scale)
    nets = copy.deepcopy(nets)
    nets["encoder"].requires_grad_(True).train()
    torch.manual_seed(1)
    # as the recipe: stage 2's moments, E's group added
    opt_g, opt_d = make_optimizers(cfg3, nets, stage2_folder, "cpu")
    rng = np.random.default_rng(1)
    for step in range(steps):
        train_step(cfg3, nets, opt_g, opt_d, *store.batch(rng.choice(96, 8, replace=False)), None, 60 + step)
    z3, margin3 = _codes_and_margin(nets, val_a, val_b, other)
    return float((z3 - z2).norm() / z2.norm()), margin3


def test_stage3_keeps_g_using_the_style_code(after_stage2):
    *_, margin2 = after_stage2
    assert margin2 > 0.05, margin2  # stage 2 taught G to use z: the photo's own code beats another's
    moved, margin = _stage3(after_stage2, GeneratorTraining().encoder_lr_scale)
    assert margin > 0.5 * margin2, (margin, margin2)
    moved_fast, margin_fast = _stage3(after_stage2, 1.0)
    # the cause, shown: at G's learning rate E's codes run away from the ones G_ema learned
    assert moved < 0.5 * moved_fast, (moved, moved_fast)
    print(f"stage 2 margin {margin2:.3f} dB; stage 3 default: margin {margin:.3f}, codes moved {moved:.2f}; "
          f"E at G's lr: margin {margin_fast:.3f}, moved {moved_fast:.2f}")
