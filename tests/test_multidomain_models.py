"""The multi-domain disentangled style model's networks (docs/method.md §7, seed 004): CPU, tiny configs, 32x32."""
import dataclasses
import io

import pytest
import torch

from step_ray.models.multidomain import (MultiDomainConfig, MultiDomainDiscriminator, MultiDomainGenerator,
                                         MultiDomainStyleEncoder, StyleDiscriminator, StyleFlow,
                                         build_multidomain)

TINY = MultiDomainConfig(num_domains=3, style_dim=8, dim=8, max_dim=32, n_down=2, n_bottleneck=1, encoder_down=3,
                         flow_hidden=(16, 16), style_disc_hidden=(16,))
Y = torch.tensor([0, 1, 2, 1])  # every domain, one twice


@pytest.fixture(autouse=True)
def _one_thread():
    # Networks this small run fastest on one thread; several threads on a busy machine cost 100x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _noise(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, TINY.style_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("passes", [2, None])  # coupling (default) and fully autoregressive
def test_flow_is_invertible_domain_conditioned_and_trainable(passes):
    torch.manual_seed(0)
    flow = StyleFlow(dataclasses.replace(TINY, flow_passes=passes))
    z = _noise(6)
    for d in range(TINY.num_domains):
        y = torch.full((6,), d)
        s = flow(z, y)
        assert s.shape == z.shape and torch.isfinite(s).all()
        assert torch.allclose(flow.inverse(s, y), z, atol=1e-4)
        lp = flow.log_prob(s, y)
        assert lp.shape == (6,) and torch.isfinite(lp).all()
    # the same noise lands on different styles in different domains
    styles = [flow(z, torch.full((6,), d)) for d in range(TINY.num_domains)]
    for a in range(TINY.num_domains):
        for b in range(a + 1, TINY.num_domains):
            assert (styles[a] - styles[b]).abs().max() > 1e-3
    # per-row conditioning: a mixed batch equals the per-domain batches row by row
    mixed = flow(z[:4], Y)
    assert torch.allclose(mixed, torch.stack([styles[int(d)][i] for i, d in enumerate(Y)]), atol=1e-5)
    # gradients reach the hyper-network from a loss on the noise -> style direction
    flow.zero_grad()
    flow(z[:4], Y).square().mean().backward()
    grads = [p.grad for p in flow.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # sample() draws its own noise, reproducibly from a generator
    s1 = flow.sample(Y, generator=torch.Generator().manual_seed(3))
    s2 = flow.sample(Y, generator=torch.Generator().manual_seed(3))
    assert s1.shape == (4, TINY.style_dim) and torch.equal(s1, s2)
    assert torch.allclose(s1, flow(torch.randn(4, TINY.style_dim, generator=torch.Generator().manual_seed(3)), Y))


def test_flow_affine_layer_takes_the_moments_it_is_fitted_to():
    """fit_moments: a domain's running mean and covariance become the flow's affine layer, so its samples
    have them; invertibility and the change of variables hold through the layer; unseen domains keep the
    identity; non-finite sums are ignored."""
    torch.manual_seed(0)
    flow = StyleFlow(TINY)
    d = TINY.style_dim
    g = torch.Generator().manual_seed(5)
    factor = torch.randn(d, 2, generator=g)
    cov = factor @ factor.T + 0.01 * torch.eye(d)  # variance in two directions, as E's codes have it
    mean = torch.randn(d, generator=g)
    codes = mean + torch.randn(4000, d, generator=g) @ torch.linalg.cholesky(cov).T
    for chunk in codes.split(500):  # domain 1 only, in batches
        count, total = torch.tensor([0.0, len(chunk), 0.0]), torch.zeros(3, d)
        outer = torch.zeros(3, d, d)
        total[1], outer[1] = chunk.sum(0), chunk.T @ chunk
        flow.fit_moments(count, total, outer, momentum=0.01)
    assert torch.allclose(flow.style_mean[1], codes.mean(0), atol=1e-4)
    assert torch.allclose(flow.style_scale[1] @ flow.style_scale[1].T, torch.cov(codes.T, correction=0), atol=1e-3)
    assert torch.equal(flow.style_scale[0], torch.eye(d)) and torch.equal(flow.style_mean[2], torch.zeros(d))
    with torch.no_grad():  # samples carry the covariance's shape (the splines at init only bend it)
        s = flow.sample(torch.ones(4000, dtype=torch.long), generator=torch.Generator().manual_seed(6))
    top = torch.linalg.eigvalsh(torch.cov(s.T)).flip(0)
    assert top[:2].sum() / top.sum() > 0.9
    z = _noise(6)
    y = torch.tensor([0, 1, 2, 1, 1, 0])
    assert torch.allclose(flow.inverse(flow(z, y), y), z, atol=1e-4)
    # log p(s) = log N(z) + log|det dz/ds|, the Jacobian taken numerically through the whole flow
    s0, y0 = flow(z[1:2], y[1:2]).squeeze(0), y[1:2]
    jac = torch.autograd.functional.jacobian(lambda v: flow.inverse(v.unsqueeze(0), y0).squeeze(0), s0)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z[1]).sum() + torch.linalg.slogdet(jac)[1]
    assert flow.log_prob(s0.unsqueeze(0), y0).item() == pytest.approx(expected.item(), abs=1e-3)
    before = flow.style_scale.clone()
    flow.fit_moments(torch.tensor([1.0, 0.0, 0.0]), torch.full((3, d), float("nan")), torch.zeros(3, d, d), 0.01)
    assert torch.equal(flow.style_scale, before)


def test_shapes_per_domain_and_head_selection():
    torch.manual_seed(0)
    nets = build_multidomain(TINY)
    kinds = {"generator": MultiDomainGenerator, "style_encoder": MultiDomainStyleEncoder,
             "discriminator": MultiDomainDiscriminator, "style_discriminator": StyleDiscriminator, "flow": StyleFlow}
    assert set(nets) == set(kinds) and all(isinstance(nets[k], cls) for k, cls in kinds.items())
    x = _images()
    e, d, ds = nets["style_encoder"], nets["discriminator"], nets["style_discriminator"]
    for dom in range(TINY.num_domains):
        y = torch.full((4,), dom)
        s = nets["flow"](_noise(), y)
        assert s.shape == (4, TINY.style_dim)
        assert nets["generator"](x, s).shape == x.shape
        assert e(x, y).shape == (4, TINY.style_dim)
        assert d(x, y).shape == (4,)
        assert ds(s, y).shape == (4,)
    every = e.all_domains(x)
    assert every.shape == (4, TINY.num_domains, TINY.style_dim)
    assert torch.allclose(e(x, Y), every[torch.arange(4), Y])
    assert (every[:, 0] - every[:, 1]).abs().max() > 1e-4  # the heads differ
    logits = d.all_domains(x)
    assert logits.shape == (4, TINY.num_domains) and torch.allclose(d(x, Y), logits[torch.arange(4), Y])
    s = _noise()
    assert torch.allclose(ds(s, Y), ds.all_domains(s)[torch.arange(4), Y])
    with pytest.raises(ValueError, match="domain ids"):
        e(x, Y[:3])
    with pytest.raises(ValueError, match="domain ids"):
        d(x, Y.float())
    with pytest.raises(ValueError, match="style codes of shape"):
        nets["generator"](x, torch.randn(4, TINY.style_dim + 1))


def test_generator_depends_on_style_and_stays_in_range():
    torch.manual_seed(0)
    g = MultiDomainGenerator(TINY)
    x = _images()
    s = _noise()
    out = g(x, s)
    assert out.abs().max() <= 1
    assert (out - g(x, _noise(seed=2))).abs().max() > 1e-3
    # style is per sample: changing row 1's code leaves row 0 untouched
    s2 = s.clone()
    s2[1] += 1
    out2 = g(x, s2)
    assert torch.allclose(out2[0], out[0]) and not torch.allclose(out2[1], out[1])
    # gradients reach the style code (the path of L_sty / L_ds)
    s3 = s.clone().requires_grad_(True)
    g(x, s3).mean().backward()
    assert s3.grad is not None and s3.grad.abs().sum() > 0


def _outputs(nets: dict, x: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
    s = nets["flow"](z, Y)
    return {"flow": s, "generator": nets["generator"](x, s), "style_encoder": nets["style_encoder"](x, Y),
            "discriminator": nets["discriminator"](x, Y), "style_discriminator": nets["style_discriminator"](s, Y)}


def test_state_dict_round_trip():
    torch.manual_seed(0)
    nets = build_multidomain(TINY)
    buffers = {}
    for name, net in nets.items():
        buf = io.BytesIO()
        torch.save(net.state_dict(), buf)
        buffers[name] = buf.getvalue()
    torch.manual_seed(1)
    fresh = build_multidomain(TINY)
    x, z = _images(), _noise()
    with torch.no_grad():
        before = _outputs(nets, x, z)
        assert not torch.allclose(_outputs(fresh, x, z)["flow"], before["flow"])  # a different init
        for name, net in fresh.items():
            net.load_state_dict(torch.load(io.BytesIO(buffers[name]), weights_only=True))
        after = _outputs(fresh, x, z)
    for name in nets:
        assert torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("bad", [
    dict(num_domains=0), dict(style_dim=1), dict(dim=0), dict(max_dim=4), dict(n_down=-1), dict(n_bottleneck=-1),
    dict(n_down=0, n_bottleneck=0), dict(encoder_down=0), dict(in_channels=0), dict(flow_transforms=0),
    dict(flow_bins=1), dict(flow_passes=0), dict(flow_hidden=()), dict(flow_hidden=(16, 0)),
    dict(style_disc_hidden=(-1,)), dict(style_disc_hidden=[16]),
])
def test_config_rejects_impossible_values(bad):
    with pytest.raises(ValueError):
        dataclasses.replace(TINY, **bad)


def test_check_image_size():
    for side in (8, 32, 64):  # 8: G's bottleneck is 2x2, E/D's last map 1x1
        TINY.check_image_size(side)
    with pytest.raises(ValueError, match="n_down"):
        TINY.check_image_size(30)  # G halves it unevenly
    with pytest.raises(ValueError, match="encoder_down"):
        TINY.check_image_size(36)  # divisible by 4 (G), not by 8 (E, D)
    with pytest.raises(ValueError, match="n_down"):
        dataclasses.replace(TINY, n_down=3).check_image_size(8)  # a 1x1 bottleneck breaks instance norm
    MultiDomainConfig().check_image_size(256)
