"""The generator step does only the work its variant needs: BicycleGAN v0 has the official
networks' shapes and splits its batch between the two branches as the official code does, a run without
EMA builds no G_ema, Adam is fused, and the benchmark's by-part profile charges backward to its network."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from step_ray.config import config_from_dict
from step_ray.engine.settings import OptimConfig
from step_ray.models import DiscriminatorConfig, PatchDiscriminator
from step_ray.recipes.generator import (GeneratorTraining, build_networks, ema_generator, fit_to_image_size,
                                        make_optimizers, train_step)
from step_ray.recipes.variants import variant_base

REPO = Path(__file__).resolve().parents[1]


def variant(name: str, side: int = 32, **extra) -> GeneratorTraining:
    tree = {**variant_base(name)["train"], "lambda_vgg": 0.0, "lambda_l1": 10.0, **extra}
    return fit_to_image_size(config_from_dict(GeneratorTraining, tree), side)


def small(cfg: GeneratorTraining) -> GeneratorTraining:
    return dataclasses.replace(cfg, generator=dataclasses.replace(cfg.generator, base_channels=8),
                               discriminator=dataclasses.replace(cfg.discriminator, base_channels=8))


@pytest.mark.parametrize("layers, official", [(2, 830_626), (3, 3_458_978)])
def test_bicycle_v0_discriminator_has_the_official_shape(layers, official):
    """The parameter counts of junyanz/BicycleGAN's D_NLayersMulti(input_nc=3, ndf=64, num_D=2) with
    n_layers 2 (basic_128_multi) and 3 (basic_256_multi), counted from its code (instance norm, no affine)."""
    d = variant("bicycle_v0", 256).discriminator
    assert (d.a_channels, d.scale_widths, d.minibatch_stddev) == (0, "halved", False)
    net = PatchDiscriminator(dataclasses.replace(d, n_layers=layers))
    assert sum(p.numel() for p in net.parameters()) == official
    same = PatchDiscriminator(dataclasses.replace(d, n_layers=layers, scale_widths="same"))
    assert sum(p.numel() for p in same.parameters()) > official  # the old shape: both scales full width


def test_halved_scale_widths():
    cfg = DiscriminatorConfig(base_channels=64, num_scales=3, n_layers=2, scale_widths="halved")
    assert [cfg.at_scale(s).base_channels for s in range(3)] == [64, 32, 16]
    assert [cfg.at_scale(s).max_channels for s in range(3)] == [512, 256, 128]
    with pytest.raises(ValueError, match="halved"):
        DiscriminatorConfig(base_channels=2, num_scales=3, scale_widths="halved")


def test_split_batch_gives_each_branch_half_the_batch():
    """BiCycleGANModel.forward: G(A1, E(B1)) and G(A1, z_r); D sees B1 against the first, D_r sees B2
    against the second; nothing else of the second pair is used."""
    cfg = small(variant("bicycle_v0"))
    assert cfg.split_batch and cfg.batch_size == 2
    torch.manual_seed(0)
    nets = build_networks(cfg, torch.device("cpu"))
    opt_g, opt_d = make_optimizers(cfg, nets, None, "cpu")
    seen = {name: [] for name in ("generator", "encoder", "discriminator", "discriminator_random")}
    for name, log in seen.items():
        nets[name].register_forward_hook(
            lambda m, args, out, log=log: log.append([a.clone() for a in args if torch.is_tensor(a)])
        )
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    logs = train_step(cfg, nets, opt_g, opt_d, a, b, None, 0)
    assert {"loss_d", "loss_d_random", "l1", "kl", "latent"} <= set(logs)
    g_inputs = seen["generator"][0][0]
    assert torch.equal(g_inputs, torch.cat([a[:1], a[:1]]))  # A1 with E(B1) and with z_r: one G pass
    assert torch.equal(seen["encoder"][0][0], b[:1])  # E(B1), then E(G(A1, z_r))
    assert len(seen["encoder"]) == 2 and seen["encoder"][1][0].shape[0] == 1
    d_step, d_r_step = seen["discriminator"][0], seen["discriminator_random"][0]
    assert torch.equal(d_step[1][:1], b[:1]) and torch.equal(d_r_step[1][:1], b[1:])  # the reals of each D
    # the whole batch in both branches without it: twice the G work
    full = dataclasses.replace(cfg, split_batch=False)
    seen["generator"].clear()
    train_step(full, nets, opt_g, opt_d, a, b, None, 1)
    assert seen["generator"][0][0].shape[0] == 4


def test_split_batch_of_one_uses_the_pair_for_both_branches():
    cfg = small(variant("bicycle_v0"))
    nets = build_networks(cfg, torch.device("cpu"))
    opt_g, opt_d = make_optimizers(cfg, nets, None, "cpu")
    logs = train_step(cfg, nets, opt_g, opt_d, torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32), None, 0)
    assert logs is not None and "loss_d_random" in logs


def test_split_batch_needs_the_random_branch():
    with pytest.raises(ValueError, match="split_batch"):
        variant("ours_v4", split_batch=True)


def test_no_ema_builds_no_copy_of_g():
    cfg = small(variant("bicycle_v0"))
    assert cfg.ema_decay == 0
    nets = build_networks(cfg, torch.device("cpu"))
    assert "generator_ema" not in nets and ema_generator(nets) is nets["generator"]
    with_ema = build_networks(small(variant("bicycle_v1")), torch.device("cpu"))
    assert ema_generator(with_ema) is with_ema["generator_ema"]


def test_fused_adam_is_the_default_and_takes_the_same_step():
    torch.manual_seed(0)
    w = torch.randn(1000)
    grads = [torch.randn(1000) for _ in range(3)]
    out = []
    for fused in (True, False):
        p = torch.nn.Parameter(w.clone())
        opt = OptimConfig(fused=fused).build([p])
        assert opt.defaults["fused"] is (True if fused else None)
        for g in grads:
            p.grad = g.clone()
            opt.step()
        out.append(p.detach())
    assert OptimConfig().fused
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-6)


def test_profile_parts_charge_backward_to_the_network(tmp_path):
    """benchmarks/generator_step.py's attribution: a conv's backward counts for the module whose
    forward ran it, the optimiser's step for the optimiser."""
    out = tmp_path / "attribution.json"
    subprocess.run([sys.executable, "benchmarks/generator_step.py", "--check-attribution", "--json", str(out)],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    record = json.loads(out.read_text())
    assert {"command", "date", "machine", "figures"} <= set(record)
    parts, figures = record["figures"]["parts_ms"], record["figures"]
    backward = figures["convolution_backward_ms"]
    assert backward > 0 and parts["G"] + parts["D"] >= 0.9 * backward
    assert parts["optimiser"] > 0
    assert sum(parts.values()) == pytest.approx(figures["total_ms"], rel=1e-6)


def test_one_vgg_pass_over_b_serves_the_loss_and_a_vgg_gram_encoder(monkeypatch):
    """Stage 2 with a vgg_gram E: VGG(B) is computed once per step (E's input and the perceptual targets,
    the cycle term's too), on E's own VGG; the losses are those of separate passes."""
    import step_ray.recipes.generator as gen
    from step_ray.models.encoder import EncoderConfig
    from step_ray.style.vgg import VGGConfig

    cfg = small(variant("ours_v1", lambda_vgg=0.02, lambda_l1=0.0))  # the cycle term: VGG(B) a second time before
    cfg = dataclasses.replace(cfg, encoder=EncoderConfig(backbone="vgg_gram", vgg_weights="random", sketch_channels=4),
                              vgg=VGGConfig(weights="random", layer_weights=cfg.vgg.layer_weights))
    assert gen.shares_target_features(cfg)
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1

    def one_step(share: bool):
        monkeypatch.setattr(gen, "shares_target_features", lambda c: share)
        torch.manual_seed(0)
        nets = build_networks(cfg, torch.device("cpu"))
        gen.freeze(nets["encoder"])
        opt_g, opt_d = make_optimizers(cfg, nets, None, "cpu")
        vgg = gen.perceptual_vgg(cfg, nets, "cpu")
        assert (vgg is nets["encoder"].frozen_stem.vgg) is share
        calls = []
        for net in {id(vgg): vgg, id(nets["encoder"].frozen_stem.vgg): nets["encoder"].frozen_stem.vgg}.values():
            net.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
        torch.manual_seed(1)
        return train_step(cfg, nets, opt_g, opt_d, a, b, vgg, 0), len(calls)

    shared, shared_calls = one_step(True)
    separate, separate_calls = one_step(False)
    # E's VGG on B, on the cycle's swapped output and on G(A, z_r); the loss's VGG(B) (once for the direct
    # and the cycle term: it used to be computed for each), VGG(B̂), VGG of the cycle's rebuild; shared:
    # E reads the loss's VGG(B)
    assert (separate_calls, shared_calls) == (6, 5)
    assert shared.keys() == separate.keys()
    for k in shared:
        assert shared[k] == pytest.approx(separate[k], rel=1e-5, abs=1e-7), k
