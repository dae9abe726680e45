"""Multi-domain disentangled style model losses (docs/method.md §7): tiny CPU checks against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from step_ray.losses.multidomain import (
    GENERATOR_TERMS,
    MultiDomainLossWeights,
    adversarial_d_loss,
    adversarial_g_loss,
    augment_for_smoothness,
    cycle_loss,
    diversity_sensitive_loss,
    generator_objective,
    nearest_other_index,
    r1_penalty,
    smoothness_triplet_loss,
    style_reconstruction_loss,
    unification_d_loss,
    unification_g_loss,
    unification_likelihood_loss,
    unification_prior_loss,
)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------- BCE terms
def test_adversarial_losses_at_zero_logits_are_log2():
    zeros = torch.zeros(4)
    d, d_logs = adversarial_d_loss(zeros, zeros)
    g, g_logs = adversarial_g_loss(zeros)
    assert d.item() == pytest.approx(2 * LOG2)
    assert d_logs["d_real"] == pytest.approx(LOG2) and d_logs["d_fake"] == pytest.approx(LOG2)
    assert g.item() == pytest.approx(LOG2) and g_logs["adv"] == pytest.approx(LOG2)


def test_adversarial_losses_match_softplus_formula():
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([[1.0], [-3.0]])
    d, _ = adversarial_d_loss(real, fake)
    # BCE(l, 1) = log(1 + e^-l), BCE(l, 0) = log(1 + e^l)
    expected = (sum(math.log1p(math.exp(-v)) for v in [2.0, -1.0, 0.5]) / 3
                + sum(math.log1p(math.exp(v)) for v in [1.0, -3.0]) / 2)
    assert d.item() == pytest.approx(expected, rel=1e-6)
    g, _ = adversarial_g_loss(fake)
    assert g.item() == pytest.approx(sum(math.log1p(math.exp(-v)) for v in [1.0, -3.0]) / 2, rel=1e-6)


def test_unification_losses():
    ref, lat = torch.tensor([3.0, 1.0]), torch.tensor([-2.0, 0.0])
    d, logs = unification_d_loss(ref, lat)
    exp_real = (math.log1p(math.exp(-3.0)) + math.log1p(math.exp(-1.0))) / 2
    exp_fake = (math.log1p(math.exp(-2.0)) + LOG2) / 2
    assert logs["uni_d_real"] == pytest.approx(exp_real, rel=1e-6)
    assert logs["uni_d_fake"] == pytest.approx(exp_fake, rel=1e-6)
    assert d.item() == pytest.approx(exp_real + exp_fake, rel=1e-6)

    g, g_logs = unification_g_loss(torch.zeros(3))
    assert g.item() == pytest.approx(LOG2) and set(g_logs) == {"uni"}
    both, both_logs = unification_g_loss(torch.zeros(3), torch.zeros(2))  # flow and encoder both fool D_s
    assert both.item() == pytest.approx(2 * LOG2) and both_logs["uni_ref"] == pytest.approx(LOG2)
    with pytest.raises(ValueError):
        unification_g_loss(None)

    # the likelihood form: nats per dimension of the codes under the flow; N(0, I) at s = 0 gives ½ log 2π
    dim = 8
    nll, nll_logs = unification_likelihood_loss(torch.full((5,), -dim / 2 * math.log(2 * math.pi)), dim)
    assert nll.item() == pytest.approx(0.5 * math.log(2 * math.pi)) and set(nll_logs) == {"uni"}
    with pytest.raises(ValueError):
        unification_likelihood_loss(torch.zeros(5, dim), dim)


def test_unification_prior_loss_has_the_gradient_of_the_gaussian_kl():
    """Its surrogate's gradient with respect to each code is the gradient of the exact
    KL(N(μ̂, Σ̂) ‖ N(0, I)) of the codes' own mean and covariance, when the running moments equal those."""
    torch.manual_seed(0)
    d, n = 4, 64
    mixing = torch.diag(torch.tensor([3.0, 1.0, 0.3, 0.05]))
    codes = (torch.tensor([[1.0, -2.0, 0.5, 0.0]]) + torch.randn(n, d) @ mixing).requires_grad_(True)
    mean = codes.mean(0, keepdim=True)
    cov = (codes - mean).T @ (codes - mean) / n
    kl = 0.5 * (torch.trace(cov) + mean.pow(2).sum() - d - torch.logdet(cov)) / d
    (exact,) = torch.autograd.grad(kl, codes)
    domains = torch.zeros(n, dtype=torch.long)
    loss, logs = unification_prior_loss(codes, domains, mean.detach(), cov.detach()[None], ridge=0.0)
    (surrogate,) = torch.autograd.grad(loss, codes)
    assert torch.allclose(surrogate, exact, rtol=1e-3, atol=1e-6)
    assert logs["uni_prior_kl"] == pytest.approx(kl.item(), rel=1e-4)
    # at the flow's base N(0, I) there is nothing to pull
    at_base, base_logs = unification_prior_loss(codes, domains, torch.zeros(1, d), torch.eye(d)[None], ridge=0.0)
    (zero,) = torch.autograd.grad(at_base, codes)
    assert zero.abs().max() == 0 and base_logs["uni_prior_kl"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        unification_prior_loss(codes, torch.zeros(n + 1, dtype=torch.long), mean, cov[None])


def test_unification_prior_loss_spreads_a_collapsed_code_to_unit_covariance():
    """A linear encoder whose codes lie along one direction (variance 25 there, 10⁻⁴ elsewhere) off the origin,
    trained on the surrogate alone with running moments as the recipe keeps them, ends near the flow's base."""
    torch.manual_seed(0)
    d, u = 4, 2
    images = torch.randn(512, 6)
    domains = torch.arange(512) % u
    encoder = torch.nn.Linear(6, d)
    with torch.no_grad():
        encoder.weight.copy_(torch.outer(torch.tensor([5.0, 0, 0, 0]), torch.tensor([1.0, 0, 0, 0, 0, 0]))
                             + 1e-2 * torch.randn(d, 6))
        encoder.bias.copy_(torch.tensor([3.0, -2.0, 1.0, 0.0]))
    opt = torch.optim.Adam(encoder.parameters(), lr=1e-2)

    def moments():
        with torch.no_grad():
            s = encoder(images)
            m = torch.stack([s[domains == k].mean(0) for k in range(u)])
            return m, torch.stack([torch.cov(s[domains == k].T, correction=0) for k in range(u)])

    mean, cov = moments()
    assert torch.linalg.eigvalsh(cov).min() < 1e-3 and torch.linalg.eigvalsh(cov).max() > 20
    for step in range(1500):
        rows = torch.randint(0, 512, (32,))
        loss, _ = unification_prior_loss(encoder(images[rows]), domains[rows], mean, cov)
        opt.zero_grad()
        loss.backward()
        opt.step()
        new_mean, new_cov = moments()  # the recipe's running moments, here exact
        mean, cov = 0.9 * mean + 0.1 * new_mean, 0.9 * cov + 0.1 * new_cov
    mean, cov = moments()
    eig = torch.linalg.eigvalsh(cov)
    assert eig.min() > 0.7 and eig.max() < 1.3, eig
    assert mean.norm(dim=1).max() < 0.2, mean


# ----------------------------------------------------------------------------------------------- R1
def test_r1_zero_for_constant_discriminator():
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    b = torch.tensor(0.7, requires_grad=True)
    logits = x.flatten(1).sum(1) * 0.0 + b
    r1, logs = r1_penalty(logits, x)
    assert r1.item() == 0.0 and logs["r1"] == 0.0


def test_r1_linear_discriminator_known_value_and_double_backward():
    torch.manual_seed(0)
    w = torch.randn(2, 3, 3, requires_grad=True)
    x = torch.randn(4, 2, 3, 3, requires_grad=True)
    logits = (w * x).flatten(1).sum(1)  # D(x) = Σ w·x, so ∂D/∂x = w for every sample
    r1, _ = r1_penalty(logits, x)
    assert r1.item() == pytest.approx(0.5 * w.detach().pow(2).sum().item(), rel=1e-5)
    r1.backward()  # create_graph=True: the penalty reaches D's parameters, d(½‖w‖²)/dw = w
    assert torch.allclose(w.grad, w.detach(), atol=1e-6)


def test_r1_requires_grad_on_images():
    x = torch.randn(2, 1, 2, 2)
    w = torch.ones(1, 2, 2, requires_grad=True)
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty((w * x).flatten(1).sum(1), x)


# ----------------------------------------------------------------------------------------------- L1 terms
def test_l1_terms_and_ds_detaches_second_output():
    a = torch.tensor([[1.0, -1.0]], requires_grad=True)
    b = torch.tensor([[0.0, 1.0]], requires_grad=True)
    for fn, key in [(style_reconstruction_loss, "sty"), (cycle_loss, "cyc"), (diversity_sensitive_loss, "ds")]:
        loss, logs = fn(a, b)
        assert loss.item() == pytest.approx(1.5) and logs[key] == pytest.approx(1.5)
    ds, _ = diversity_sensitive_loss(a, b)
    ds.backward()
    assert b.grad is None and a.grad is not None
    with pytest.raises(ValueError):
        cycle_loss(a, torch.zeros(2, 2))


# ----------------------------------------------------------------------------------------------- smoothness
def test_smoothness_hand_built_three_points():
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    s_aug = torch.tensor([[0.2, 0.0], [1.0, 0.1], [0.0, 3.0]])
    # nearest others: 0 → 1 (1 < 3), 1 → 0 (1 < √10), 2 → 0 (3 < √10)
    assert nearest_other_index(s).tolist() == [1, 0, 0]
    loss, logs = smoothness_triplet_loss(s, s_aug, margin=1.0)
    # hinges: 1 + 0.2 − 1 = 0.2, 1 + 0.1 − 1 = 0.1, 1 + 0 − 3 < 0 → 0
    assert loss.item() == pytest.approx(0.1, abs=1e-6)
    assert logs["smooth"] == pytest.approx(0.1, abs=1e-6)
    assert logs["smooth_active"] == pytest.approx(2 / 3)


def test_smoothness_zero_when_positive_equal_and_others_far_self_ignored():
    s = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]])
    # if row i were its own negative, d_neg = 0 and every hinge would be the margin
    loss, logs = smoothness_triplet_loss(s, s.clone(), margin=0.5)
    assert loss.item() == 0.0 and logs["smooth_active"] == 0.0
    idx = nearest_other_index(s)
    assert (idx != torch.arange(4)).all()


def test_smoothness_gradient_reaches_codes_and_augmented_codes():
    torch.manual_seed(0)
    s = torch.randn(4, 3, requires_grad=True)
    s_aug = (s.detach() + 0.1 * torch.randn(4, 3)).requires_grad_()
    loss, _ = smoothness_triplet_loss(s, s_aug, margin=10.0)  # large margin: every hinge active
    loss.backward()
    assert s.grad is not None and s_aug.grad is not None
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0 and s_aug.grad.abs().sum() > 0
    # identical positive (zero distance): gradient stays finite
    s2 = torch.randn(3, 2, requires_grad=True)
    loss2, _ = smoothness_triplet_loss(s2, s2, margin=10.0)
    loss2.backward()
    assert torch.isfinite(s2.grad).all()


def test_smoothness_batch_of_one_and_domains():
    with pytest.raises(ValueError, match="at least 2"):
        smoothness_triplet_loss(torch.zeros(1, 4), torch.zeros(1, 4), margin=0.1)
    s = torch.tensor([[0.0], [1.0], [10.0], [11.5], [100.0]])
    dom = torch.tensor([0, 1, 0, 1, 2])
    assert nearest_other_index(s).tolist() == [1, 0, 3, 2, 3]
    assert nearest_other_index(s, dom).tolist() == [2, 3, 0, 1, -1]
    loss, logs = smoothness_triplet_loss(s, s.clone(), margin=11.0, domains=dom)
    # rows 0..3 used, hinges 11 − 10, 11 − 10.5, 1, 0.5 (row 4 has no same-domain partner)
    assert loss.item() == pytest.approx(0.75) and logs["smooth_active"] == 1.0


# ----------------------------------------------------------------------------------------------- weights
def test_weights_validate_and_ds_decays_linearly():
    w = MultiDomainLossWeights(ds=2.0, ds_decay_steps=100)
    assert w.ds_weight(0) == 2.0
    assert w.ds_weight(25) == pytest.approx(1.5)
    assert w.ds_weight(50) == pytest.approx(1.0)
    assert w.ds_weight(100) == 0.0 and w.ds_weight(1000) == 0.0
    with pytest.raises(ValueError):
        w.ds_weight(-1)
    with pytest.raises(ValueError):
        MultiDomainLossWeights(sty=-1.0)
    with pytest.raises(ValueError):
        MultiDomainLossWeights(ds_decay_steps=0)
    d = MultiDomainLossWeights()
    assert (d.adv, d.sty, d.cyc, d.ds, d.uni, d.smooth, d.r1, d.ds_decay_steps) == (1, 1, 1, 1, 1, 1, 1, 100_000)


def test_generator_objective_subtracts_ds_and_uses_only_given_terms():
    w = MultiDomainLossWeights(sty=2.0, ds=1.0, ds_decay_steps=10)
    adv = torch.tensor(1.0, requires_grad=True)
    sty = torch.tensor(0.5, requires_grad=True)
    ds = torch.tensor(3.0, requires_grad=True)
    terms = {"adv": (adv, {"adv": 1.0}), "sty": (sty, {"sty": 0.5}), "ds": (ds, {"ds": 3.0})}
    total, logs = generator_objective(w, 0, terms)
    assert total.item() == pytest.approx(1.0 + 2 * 0.5 - 3.0)
    assert set(logs) == {"adv", "sty", "ds", "lambda_ds", "loss_g"}
    assert logs["lambda_ds"] == 1.0 and logs["loss_g"] == pytest.approx(-1.0)
    total.backward()
    assert (adv.grad.item(), sty.grad.item(), ds.grad.item()) == (1.0, 2.0, -1.0)
    half, logs = generator_objective(w, 5, terms)
    assert half.item() == pytest.approx(2.0 - 1.5) and logs["lambda_ds"] == pytest.approx(0.5)
    assert generator_objective(w, 10, terms)[0].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown"):
        generator_objective(w, 0, {"r1": (adv, {})})
    with pytest.raises(ValueError):
        generator_objective(w, 0, {})
    assert set(GENERATOR_TERMS) == {"adv", "sty", "cyc", "ds", "uni", "smooth"}


# ----------------------------------------------------------------------------------------------- augmentation
def test_augment_for_smoothness():
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    y1 = augment_for_smoothness(x, torch.Generator().manual_seed(3))
    y2 = augment_for_smoothness(x, torch.Generator().manual_seed(3))
    assert y1.shape == x.shape and y1.dtype == x.dtype
    assert y1.min() >= x.min() and y1.max() <= x.max()
    assert torch.equal(y1, y2)
    assert not torch.equal(y1, x)
    # only flips and shifts of ≤ 2 px (32 / 16): the centre of each sample is the original's, maybe flipped
    for i in range(6):
        centre = y1[i, :, 8:24, 8:24]
        candidates = [x[i], x[i].flip(-1)]
        assert any(torch.equal(centre, c[:, 8 + dy:24 + dy, 8 + dx:24 + dx])
                   for c in candidates for dy in range(-2, 3) for dx in range(-2, 3))
    with pytest.raises(ValueError):
        augment_for_smoothness(torch.zeros(3, 8, 8))
