"""MUNIT building blocks (docs/method.md §7): networks and losses, CPU, tiny configs."""
import dataclasses
import io
import warnings

import pytest
import torch
from torch import nn

from step_ray.losses.gan import lsgan_generator_loss
from step_ray.losses.munit import (MUNITLossWeights, content_reconstruction_loss, cycle_consistency_loss,
                                   image_reconstruction_loss, instance_normalised_perceptual_loss,
                                   munit_generator_loss, style_reconstruction_loss)
from step_ray.models.discriminator import PatchDiscriminator
from step_ray.models.munit import (AdaIN, ContentEncoder, Decoder, LayerNorm2d, MUNITConfig, MUNITGenerator,
                                   MUNITStyleEncoder, munit_discriminator_config)
from step_ray.style.vgg import VGGConfig, load_vgg

TINY = MUNITConfig(dim=8, mlp_dim=16, n_res=1)


@pytest.fixture(autouse=True)
def _one_thread():
    # Networks this small run fastest on one thread; several threads on a busy machine cost 100x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_shapes_range_and_style_changes_output():
    torch.manual_seed(0)
    g = MUNITGenerator(TINY)
    x = _images()
    c, s = g.encode(x)
    assert c.shape == (2, 8 * 4, 8, 8) and TINY.content_channels == 32
    assert s.shape == (2, 8)
    y = g.decode(c, s)
    assert y.shape == x.shape and y.abs().max() <= 1
    assert torch.equal(g(x, s), y)
    assert (g(x, s) - g(x, torch.randn(2, 8))).abs().max() > 1e-4
    # style is per sample: changing sample 1's code leaves sample 0 untouched
    s2 = s.clone()
    s2[1] += 1
    y2 = g.decode(c, s2)
    assert torch.allclose(y2[0], y[0]) and not torch.allclose(y2[1], y[1])
    with pytest.raises(ValueError, match="style of shape"):
        g.decode(c, torch.randn(2, 4))


def test_adain_params_match_mlp_and_are_cleared():
    dec = Decoder(dataclasses.replace(TINY, n_res=2))
    layers = dec.adain_layers()
    assert len(layers) == 4  # two per residual block
    assert dec.num_adain_params() == sum(2 * m.num_features for m in layers) == 4 * 2 * 32
    assert dec.mlp.net[-1].out_features == dec.num_adain_params()
    assert sum(isinstance(m, nn.Linear) for m in dec.mlp.modules()) == 3
    assert sum(isinstance(m, LayerNorm2d) for m in dec.modules()) == TINY.n_downsample
    dec(torch.randn(2, 32, 8, 8), torch.randn(2, 8))
    assert all(m.weight is None and m.bias is None for m in layers)  # nothing stale between calls
    with pytest.raises(RuntimeError, match="unset"):
        AdaIN(4)(torch.randn(1, 4, 2, 2))


def test_adain_normalises_then_applies_per_sample_affine():
    layer = AdaIN(3)
    x = torch.randn(2, 3, 5, 5) * 4 + 2
    layer.weight, layer.bias = torch.full((2, 3), 2.0), torch.full((2, 3), -1.0)
    y = layer(x)
    assert torch.allclose(y.mean((2, 3)), torch.full((2, 3), -1.0), atol=1e-5)
    assert torch.allclose(y.var((2, 3), unbiased=False), torch.full((2, 3), 4.0), atol=1e-3)


def test_norm_placement():
    assert any(isinstance(m, nn.InstanceNorm2d) for m in ContentEncoder(TINY).modules())
    style = MUNITStyleEncoder(TINY)
    assert not any(isinstance(m, (nn.InstanceNorm2d, nn.BatchNorm2d, AdaIN, LayerNorm2d)) for m in style.modules())
    strided = [m for m in style.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert [m.out_channels for m in strided] == [16, 32, 32, 32]  # 2 widening + 2 constant-width


def test_config_rejects_impossible_values():
    for bad in (dict(style_dim=0), dict(dim=0), dict(mlp_dim=0), dict(n_downsample=-1), dict(n_res=0),
                dict(style_n_downsample=1), dict(in_channels=0), dict(activation="gelu"), dict(pad="circular")):
        with pytest.raises(ValueError):
            MUNITConfig(**bad)
    with pytest.raises(ValueError, match="divisible by 4"):
        TINY.check_image_size(30)
    TINY.check_image_size(32)
    d = MUNITConfig()
    assert (d.style_dim, d.dim, d.mlp_dim, d.n_downsample, d.n_res, d.style_n_downsample) == (8, 64, 256, 2, 4, 4)


def test_discriminator_config():
    cfg = munit_discriminator_config()
    assert (cfg.a_channels, cfg.n_layers, cfg.num_scales, cfg.norm, cfg.minibatch_stddev) == (0, 4, 3, "none", False)
    # the official shape needs >= 192 px, so 32 px tests shrink it
    assert cfg.min_side() == 192
    d = PatchDiscriminator(munit_discriminator_config(base_channels=8, n_layers=1))
    out = d(None, _images())
    assert len(out) == 3 and all(o.shape[:2] == (2, 1) for o in out)
    assert lsgan_generator_loss(out)[0].item() > 0


@pytest.mark.parametrize("fn,key", [(image_reconstruction_loss, "recon_x"), (content_reconstruction_loss, "recon_c"),
                                    (style_reconstruction_loss, "recon_s"), (cycle_consistency_loss, "cycle")])
def test_l1_losses(fn, key):
    target = torch.randn(2, 4, 3, 3)
    loss, logs = fn(target.clone(), target)
    assert loss.item() == 0 and logs == {key: 0.0}
    fake = torch.randn(2, 4, 3, 3, requires_grad=True)
    real = target.clone().requires_grad_(True)
    kwargs = {"detach_target": True} if fn is content_reconstruction_loss else {}
    loss, logs = fn(fake, real, **kwargs)
    assert loss.item() > 0 and logs[key] == pytest.approx(loss.item())
    loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0 and real.grad is None


def test_content_loss_reaches_the_original_code_by_default():
    # official MUNIT: recon_c pulls both the re-encoded and the original content code
    c_rec, c = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(2, 4, 3, 3, requires_grad=True)
    content_reconstruction_loss(c_rec, c)[0].backward()
    assert c_rec.grad is not None and c.grad is not None and c.grad.abs().sum() > 0


def test_instance_normalised_perceptual_loss():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # offline: random VGG
        vgg = load_vgg(VGGConfig(layers=("conv1_2", "conv2_2"), layer_weights=(1.0, 1.0)))
    real = _images(2, seed=1)
    loss, logs = instance_normalised_perceptual_loss(vgg, real.clone(), real)
    assert loss.item() == pytest.approx(0.0, abs=1e-10) and set(logs) == {"vgg_in", "vgg_in_l0", "vgg_in_l1"}
    # a per-image affine change of brightness/contrast is (almost) invisible after instance norm
    shifted, _ = instance_normalised_perceptual_loss(vgg, real * 0.5 + 0.1, real)
    fake = _images(2, seed=2).requires_grad_(True)
    real.requires_grad_(True)
    loss, logs = instance_normalised_perceptual_loss(vgg, fake, real)
    assert loss.item() > 0 and logs["vgg_in"] == pytest.approx(loss.item())
    assert shifted.item() < loss.item()
    loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0 and real.grad is None


def test_generator_loss_weights_and_terms():
    with pytest.raises(ValueError, match=">= 0"):
        MUNITLossWeights(c=-1)
    w = MUNITLossWeights()
    assert (w.gan, w.x, w.c, w.s, w.cyc, w.vgg) == (1, 10, 1, 1, 0, 0)
    assert w.active() == ("gan", "x", "c", "s")
    terms = {"gan": (torch.tensor(0.5), {"gan_g": 0.5}), "x": (torch.tensor(0.2), {"recon_x": 0.2}),
             "s": (torch.tensor(0.3), {"recon_s": 0.3})}
    total, logs = munit_generator_loss(w, terms)
    assert total.item() == pytest.approx(0.5 + 10 * 0.2 + 0.3)
    assert set(logs) == {"gan_g", "recon_x", "recon_s", "loss_g"} and logs["loss_g"] == pytest.approx(total.item())
    with pytest.raises(ValueError, match="unknown"):
        munit_generator_loss(w, {"kl": (torch.tensor(1.0), {})})


def test_autoencoding_learns():
    torch.manual_seed(0)
    g = MUNITGenerator(TINY)
    x = _images(4, seed=3)
    opt = torch.optim.Adam(g.parameters(), lr=1e-3)

    def recon() -> torch.Tensor:
        c, s = g.encode(x)
        return image_reconstruction_loss(g.decode(c, s), x)[0]

    first = recon().item()
    for _ in range(20):
        opt.zero_grad()
        loss, _ = munit_generator_loss(MUNITLossWeights(), {"x": (recon(), {})})
        loss.backward()
        opt.step()
    assert recon().item() < 0.8 * first


def test_state_dict_round_trip():
    torch.manual_seed(0)
    g = MUNITGenerator(TINY)
    buf = io.BytesIO()
    torch.save(g.state_dict(), buf)
    buf.seek(0)
    fresh = MUNITGenerator(TINY)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x, s = _images(), torch.randn(2, 8)
    assert torch.equal(g(x, s), fresh(x, s))
    assert all(torch.equal(a, b) for a, b in zip(g.encode(x), fresh.encode(x)))
