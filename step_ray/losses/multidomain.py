"""Losses of the multi-domain disentangled style model (docs/method.md §7, seed 004; StarGAN v2 family).

Pure functions of tensors (and of callables passed in) returning (loss, dict of floats for logging); they do
not know the network classes. Notation, per target domain u (the caller selects the domain's output branch):
  x_fake = G(x, s^u), s^u a latent style f(z; θ_u) or a reference style E^u(x_ref)
  adversarial          BCE-with-logits, real → 1, fake → 0 (StarGAN v2's non-saturating adv_loss)
  R1                   ½ E‖∇_x D(x)‖² on real images (StarGAN v2's r1_reg, weight λ_r1 = 1)
  style reconstruction mean |E^u(x_fake) − s^u|                                  (λ_sty = 1)
  cycle                mean |G(x_fake, E^{y}(x)) − x|                             (λ_cyc = 1)
  diversity-sensitive  mean |G(x, s1) − G(x, s2)|, subtracted                    (λ_ds = 1 → 0 linearly)
  unification          style discriminator D_s^u on reference vs latent styles   (λ_uni = 1)
                       or, in its likelihood form, −log p_flow(E^u(x_ref) | u) / style_dim (the flow)
                       and KL(N(μ_u, Σ_u) ‖ N(0, I)) / style_dim of E's styles' moments (E)
  smoothness           max(α + ‖E(x) − E(aug(x))‖ − ‖E(x) − E(x_n)‖, 0),
                       x_n the in-batch nearest other image in style space        (λ_smooth = 1)
Full generator objective: L_adv + λ_sty L_sty + λ_cyc L_cyc − λ_ds L_ds + λ_uni L_uni + λ_smooth L_smooth
(`generator_objective`). The discriminator's objective is the trainer's: `adversarial_d_loss` +
λ_r1·`r1_penalty` (no ½ on the BCE sum, as in StarGAN v2).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

Term = tuple[torch.Tensor, dict[str, float]]


# --------------------------------------------------------------------------------------------- helpers
def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _l1(pred: torch.Tensor, target: torch.Tensor, key: str, detach_target: bool) -> Term:
    if pred.shape != target.shape:
        raise ValueError(f"{key}: shapes differ, {tuple(pred.shape)} vs {tuple(target.shape)}")
    target = target.detach() if detach_target else target
    loss = (pred.float() - target.float()).abs().mean()
    return loss, {key: float(loss.detach())}


# --------------------------------------------------------------------------------------------- image GAN
def adversarial_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> Term:
    """BCE(D(x_real), 1) + BCE(D(x_fake), 0), each averaged over all logits (StarGAN v2: no ½).
    Logs the two BCE values ("d_real", "d_fake": losses, not mean logits as in `gan.py`) and "d_adv"."""
    real = _bce(real_logits, 1.0)
    fake = _bce(fake_logits, 0.0)
    loss = real + fake
    return loss, {"d_real": float(real.detach()), "d_fake": float(fake.detach()), "d_adv": float(loss.detach())}


def adversarial_g_loss(fake_logits: torch.Tensor) -> Term:
    """Non-saturating generator loss BCE(D(x_fake), 1)."""
    loss = _bce(fake_logits, 1.0)
    return loss, {"adv": float(loss.detach())}


def r1_penalty(real_logits: torch.Tensor, real_images: torch.Tensor) -> Term:
    """Zero-centred gradient penalty on real images: ½ · mean_batch ‖∂(Σ real_logits)/∂real_images‖².

    `real_images` must have requires_grad=True *before* D is applied (``x.requires_grad_()``) and
    `real_logits` must be computed from them with grad enabled; the gradient is taken with create_graph=True,
    so the penalty back-propagates into D's parameters."""
    if not real_images.requires_grad:
        raise ValueError("r1_penalty: real_images must have requires_grad=True (call x.requires_grad_() "
                         "before the discriminator forward)")
    if not real_logits.requires_grad:
        raise ValueError("r1_penalty: real_logits carry no graph (computed under torch.no_grad()?)")
    (grad,) = torch.autograd.grad(outputs=real_logits.float().sum(), inputs=real_images,
                                  create_graph=True, retain_graph=True, allow_unused=True)
    if grad is None:
        raise ValueError("r1_penalty: real_logits do not depend on real_images (were the images detached or "
                         "copied before the discriminator?)")
    loss = 0.5 * grad.float().pow(2).reshape(grad.shape[0], -1).sum(1).mean()
    return loss, {"r1": float(loss.detach())}


# --------------------------------------------------------------------------------------------- generator terms
def style_reconstruction_loss(s_pred: torch.Tensor, s: torch.Tensor, detach_target: bool = False) -> Term:
    """mean |E^u(G(x, s)) − s|. As in StarGAN v2 the target style keeps its gradient (the mapping/flow that
    made it is updated by the generator step too); `detach_target=True` makes it a fixed target."""
    return _l1(s_pred, s, "sty", detach_target)


def cycle_loss(x_rec: torch.Tensor, x: torch.Tensor) -> Term:
    """mean |G(G(x, s^u), E^{y}(x)) − x|, the real image x a fixed target."""
    return _l1(x_rec, x, "cyc", detach_target=True)


def diversity_sensitive_loss(x_fake1: torch.Tensor, x_fake2: torch.Tensor) -> Term:
    """mean |G(x, s1) − G(x, s2)| with the second output detached (as StarGAN v2). Returned positive: the
    caller *subtracts* it (`generator_objective` does)."""
    return _l1(x_fake1, x_fake2, "ds", detach_target=True)


# --------------------------------------------------------------------------------------------- unification
def unification_d_loss(ref_logits: torch.Tensor, latent_logits: torch.Tensor) -> Term:
    """Style discriminator D_s^u: BCE(D_s(s_reference), 1) + BCE(D_s(s_latent), 0). The caller detaches the
    style codes (or steps only D_s's optimiser) and selects each row's domain branch."""
    real = _bce(ref_logits, 1.0)
    fake = _bce(latent_logits, 0.0)
    loss = real + fake
    return loss, {"uni_d_real": float(real.detach()), "uni_d_fake": float(fake.detach()),
                  "uni_d": float(loss.detach())}


def unification_g_loss(latent_logits: torch.Tensor | None, ref_logits: torch.Tensor | None = None) -> Term:
    """Non-saturating fooling loss for D_s. `latent_logits` → BCE(D_s(s_latent), 1): the flow moves its
    styles towards the reference styles. Optional `ref_logits` → BCE(D_s(s_reference), 0): the reference
    encoder moves towards the flow's styles, the direction the seed's text describes ("CNN codes close to the
    MLP's", so they inherit the flow's independent components); passing both trains both sides of the
    min-max of L_uni. At least one must be given. Logs "uni" (the total) and, when both, "uni_latent",
    "uni_ref"."""
    if latent_logits is None and ref_logits is None:
        raise ValueError("unification_g_loss needs latent_logits, ref_logits or both")
    parts: dict[str, torch.Tensor] = {}
    if latent_logits is not None:
        parts["uni_latent"] = _bce(latent_logits, 1.0)
    if ref_logits is not None:
        parts["uni_ref"] = _bce(ref_logits, 0.0)
    loss = sum(parts.values())
    logs = {"uni": float(loss.detach())}
    if len(parts) > 1:
        logs.update({k: float(v.detach()) for k, v in parts.items()})
    return loss, logs


def unification_likelihood_loss(log_prob: torch.Tensor, style_dim: int) -> Term:
    """The non-adversarial form of L_uni: the flow fitted to the reference styles by maximum likelihood,
    −mean log p_flow(s_reference | u) / style_dim (nats per dimension). A flow is a density model, so its
    samples follow what it is fitted to; the caller detaches the reference styles (only the flow moves: E
    maximising its codes' density under the flow would shrink them). Logs "uni"."""
    if log_prob.ndim != 1:
        raise ValueError(f"unification_likelihood_loss expects per-code log-densities [N], got {tuple(log_prob.shape)}")
    loss = -log_prob.float().mean() / style_dim
    return loss, {"uni": float(loss.detach())}


def unification_prior_loss(s: torch.Tensor, domains: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor,
                           ridge: float = 1e-3) -> Term:
    """E's side of L_uni's likelihood form: each domain's reference styles, as a Gaussian N(μ_u, Σ_u), pulled
    towards the flow's base N(0, I), by KL(N(μ_u, Σ_u) ‖ N(0, I)) = ½ (tr Σ_u + ‖μ_u‖² − d − log det Σ_u) / d.

    μ_u and Σ_u are running estimates over many steps (the flow's `style_mean` and covariance, detached: a
    batch holds a few styles of a domain, fewer than d), so the loss is the per-code surrogate whose gradient
    with respect to μ_u and Σ_u is the KL's, μ_u / d and ½ (I − Σ_u⁻¹) / d:

        mean_i [ ½ (s_i − μ_{u_i})ᵀ (I − (Σ_{u_i} + ridge·I)⁻¹) (s_i − μ_{u_i}) + s_iᵀ μ_{u_i} ] / d

    It spreads directions with less than unit variance, shrinks those with more, and draws the domains'
    means in. Why it exists: with only the flow moving, the flow copies whatever E does, nothing anchors E,
    and E's styles grew to norms in the hundreds along one direction, where G ignores them
    (experiments/README.md). `ridge` bounds the pull on a direction E does not use yet. Logs
    "uni_prior_kl" (the KL of the running moments, mean over the batch's domains)."""
    if s.ndim != 2 or domains.shape != s.shape[:1]:
        raise ValueError(f"unification_prior_loss expects codes [N, d] and domains [N], got {tuple(s.shape)}, "
                         f"{tuple(domains.shape)}")
    d = s.shape[1]
    eye = torch.eye(d, device=s.device, dtype=torch.float32)
    mean, cov = mean.detach().float(), covariance.detach().float()
    pull = eye - torch.linalg.inv(cov + ridge * eye)  # [U, d, d]
    y = domains.long()
    dev = s.float() - mean[y]
    spread = 0.5 * torch.einsum("nd,nde,ne->n", dev, pull[y], dev)
    loss = (spread + (s.float() * mean[y]).sum(1)).mean() / d
    present = y.unique()
    kl = 0.5 * (torch.diagonal(cov[present], dim1=-2, dim2=-1).sum(-1) + mean[present].pow(2).sum(-1) - d
                - torch.linalg.slogdet(cov[present] + 1e-12 * eye).logabsdet) / d
    return loss, {"uni_prior_kl": float(kl.mean())}


# --------------------------------------------------------------------------------------------- smoothness
def nearest_other_index(s: torch.Tensor, domains: torch.Tensor | None = None) -> torch.Tensor:
    """For each row i of s (B, ...), the index of the nearest *other* row by Euclidean distance (no
    gradient: an index). With `domains` (B,), only rows of the same domain count; a row with no same-domain
    partner gets -1. Ties go to the lowest index."""
    if s.shape[0] < 2:
        raise ValueError(f"nearest_other_index needs a batch of at least 2, got {s.shape[0]}")
    with torch.no_grad():
        flat = s.detach().float().reshape(s.shape[0], -1)
        dist = torch.cdist(flat, flat)
        excluded = torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
        if domains is not None:
            domains = domains.to(s.device).reshape(-1)
            if domains.shape[0] != s.shape[0]:
                raise ValueError(f"{domains.shape[0]} domain labels for a batch of {s.shape[0]}")
            excluded = excluded | (domains[:, None] != domains[None, :])
        dist = dist.masked_fill(excluded, float("inf"))
        idx = dist.argmin(1)
        return torch.where(excluded.all(1), torch.full_like(idx, -1), idx)


def smoothness_triplet_loss(s: torch.Tensor, s_aug: torch.Tensor, margin: float,
                            domains: torch.Tensor | None = None) -> Term:
    """L_smooth = mean_i max(α + ‖s_i − s_aug_i‖ − ‖s_i − s_n(i)‖, 0), with s = E(x), s_aug = E(aug(x)) and
    n(i) the in-batch nearest other row of s (`nearest_other_index`: chosen without gradient, while both
    distances carry gradient to s, s_aug and s_n(i)). Distances are plain (not squared) Euclidean norms, as
    in the seed. `domains` (B,) optionally restricts negatives to the same domain (the seed writes
    x_n^u = argmin_y ‖E^u(x^u) − E^u(y^u)‖); rows without a same-domain partner are left out of the mean.
    Logs "smooth" and "smooth_active" (fraction of the used rows with a positive hinge)."""
    if s.shape != s_aug.shape:
        raise ValueError(f"smooth: shapes differ, {tuple(s.shape)} vs {tuple(s_aug.shape)}")
    if s.shape[0] < 2:
        raise ValueError(f"smoothness_triplet_loss needs a batch of at least 2 (an in-batch negative), "
                         f"got {s.shape[0]}")
    if margin < 0:
        raise ValueError(f"smoothness margin must be >= 0, got {margin}")
    flat = s.float().reshape(s.shape[0], -1)
    flat_aug = s_aug.float().reshape(s.shape[0], -1)
    nn_idx = nearest_other_index(s, domains)
    rows = (nn_idx >= 0).nonzero().reshape(-1)
    if rows.numel() == 0:  # every row alone in its domain: nothing to contrast, a zero that keeps the graph
        loss = 0.0 * (flat.sum() + flat_aug.sum())
        return loss, {"smooth": 0.0, "smooth_active": 0.0}
    anchor = flat[rows]
    d_pos = torch.linalg.vector_norm(anchor - flat_aug[rows], dim=1)
    d_neg = torch.linalg.vector_norm(anchor - flat[nn_idx[rows]], dim=1)
    hinge = torch.relu(margin + d_pos - d_neg)
    loss = hinge.mean()
    return loss, {"smooth": float(loss.detach()), "smooth_active": float((hinge > 0).float().mean())}


def augment_for_smoothness(x: torch.Tensor, generator: torch.Generator | None = None, flip: bool = True,
                           max_shift_fraction: float = 1.0 / 16) -> torch.Tensor:
    """A small label- and style-preserving augmentation of images (B, C, H, W) for the positive of L_smooth:
    per sample, a horizontal flip with probability ½ and a translation by up to ⌊H·f⌋ × ⌊W·f⌋ pixels
    (f = `max_shift_fraction`, 1/16), done by reflection padding and cropping, so no new pixel values appear
    (the value range is kept). All randomness comes from `generator` (on its device) when given."""
    if x.dim() != 4:
        raise ValueError(f"augment_for_smoothness expects (B, C, H, W), got {tuple(x.shape)}")
    if not 0 <= max_shift_fraction < 0.5:
        raise ValueError(f"max_shift_fraction must be in [0, 0.5), got {max_shift_fraction}")
    b, _, h, w = x.shape
    ph, pw = int(h * max_shift_fraction), int(w * max_shift_fraction)
    dev = generator.device if generator is not None else torch.device("cpu")
    flips = (torch.rand(b, generator=generator, device=dev) < 0.5).tolist() if flip else [False] * b
    dy = torch.randint(0, 2 * ph + 1, (b,), generator=generator, device=dev).tolist()
    dx = torch.randint(0, 2 * pw + 1, (b,), generator=generator, device=dev).tolist()
    padded = F.pad(x, (pw, pw, ph, ph), mode="reflect") if (ph or pw) else x
    out = []
    for i in range(b):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out.append(crop.flip(-1) if flips[i] else crop)
    return torch.stack(out, 0)


# --------------------------------------------------------------------------------------------- weights
@dataclass(frozen=True)
class MultiDomainLossWeights:
    """λ of each term (docs/method.md §7: StarGAN v2's defaults, λ_uni = λ_smooth = 1). `ds` is λ_ds's initial
    value; it decays linearly to 0 over `ds_decay_steps` generator steps (StarGAN v2's ds_iter = 100k).
    `smooth_margin` is α of L_smooth: the seed gives no number, 0.1 is this project's choice (distances are
    unsquared Euclidean norms of the style codes). `r1` weights the discriminator's R1 penalty."""

    adv: float = 1.0
    sty: float = 1.0
    cyc: float = 1.0
    ds: float = 1.0
    uni: float = 1.0
    smooth: float = 1.0
    r1: float = 1.0
    smooth_margin: float = 0.1
    ds_decay_steps: int = 100_000

    def __post_init__(self):
        negative = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) < 0}
        if negative:
            raise ValueError(f"multi-domain loss weights must be >= 0, got {negative}")
        if self.ds_decay_steps <= 0:
            raise ValueError(f"ds_decay_steps must be > 0, got {self.ds_decay_steps}")

    def ds_weight(self, step: int) -> float:
        """λ_ds at generator step `step` (0-based): ds · max(0, 1 − step / ds_decay_steps). A pure function
        of the step, which the trainer checkpoints (StarGAN v2 mutates its args instead, so the decay
        restarts from the initial value on resume)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.ds * max(0.0, 1.0 - step / self.ds_decay_steps)


GENERATOR_TERMS = ("adv", "sty", "cyc", "ds", "uni", "smooth")


def generator_objective(weights: MultiDomainLossWeights, step: int, terms: Mapping[str, Term]) -> Term:
    """Σ λ·term over the terms given (names in `GENERATOR_TERMS`), with "ds" *subtracted* with weight
    `weights.ds_weight(step)`; terms left out count as zero. Logs: every term's logs, "lambda_ds", "loss_g"."""
    unknown = sorted(set(terms) - set(GENERATOR_TERMS))
    if unknown:
        raise ValueError(f"unknown multi-domain generator terms {unknown}; known: {list(GENERATOR_TERMS)}")
    if not terms:
        raise ValueError("generator_objective needs at least one term")
    lambda_ds = weights.ds_weight(step)
    total: torch.Tensor | None = None
    logs: dict[str, float] = {}
    for name, (loss, term_logs) in terms.items():
        weighted = (-lambda_ds if name == "ds" else getattr(weights, name)) * loss.float()
        total = weighted if total is None else total + weighted
        logs.update(term_logs)
    assert total is not None
    logs["lambda_ds"] = lambda_ds
    logs["loss_g"] = float(total.detach())
    return total, logs
