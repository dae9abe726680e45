"""The multi-domain disentangled style model (docs/method.md §7, seed 004; StarGAN v2 family), under the project's
Ray Train conventions.

A conditional neural spline flow f(z; θ_u) (zuko; θ_u = MLP(u)) maps Gaussian noise to domain u's style
space, a style encoder with per-domain heads gives reference styles, G(x, s) injects a style by AdaIN.

    L_D   = L_adv(D) + λ_r1 R1
    L_Ds  = BCE(D_s(E(x_ref)) → real, D_s(f(z)) → fake)                   (λ_uni > 0, uni_form adversarial)
    L_G   = L_adv + λ_sty |s − E(G(x, s))| + λ_cyc |x − G(G(x, s), E(x))| − λ_ds(t) |G(x, s1) − G(x, s2)|
            + λ_uni BCE(D_s(f(z)) → real)                                    (uni_form adversarial)
            + λ_smooth max(α + ‖E(x) − E(aug x)‖ − ‖E(x) − E(x_n)‖, 0)
    L_f   = λ_uni · −log p_f(E(x)) / style_dim, f's affine layer at E(x)'s running moments (uni_form likelihood)
            and in L_G  + λ_uni KL(N(μ_u, Σ_u) ‖ N(0, I)) / style_dim of E's styles (likelihood, uni_moves both)

Each step does StarGAN v2's four updates: D with latent and with reference styles, then G (+ flow + E)
with latent styles, then G alone with reference styles; D_s is updated with the D steps, the likelihood
form's L_f right after them. λ_ds decays linearly with the optimiser step, which is checkpointed (StarGAN v2
mutated its config, so a resumed run restarted the decay). No EMA copies (StarGAN v2 evaluates EMA
weights; a short CPU run does not need them).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from step_ray.data.domains import DomainDataConfig, DomainImages
from step_ray.data.store import domain_store
from step_ray.engine.distributed import broadcast_parameters, no_parameter_grads, random_flip, sum_over_ranks
from step_ray.engine.guard import NonFiniteGuard, guarded_update
from step_ray.engine.loop import Recipe, Worker, epoch_batches
from step_ray.engine.settings import LoopConfig, OptimConfig
from step_ray.eval.multidomain_eval import latent_grid, unification_accuracy
from step_ray.losses.multidomain import (MultiDomainLossWeights, adversarial_d_loss, adversarial_g_loss,
                                         augment_for_smoothness, cycle_loss, diversity_sensitive_loss,
                                         generator_objective, r1_penalty,
                                         smoothness_triplet_loss, style_reconstruction_loss, unification_d_loss,
                                         unification_g_loss, unification_likelihood_loss,
                                         unification_prior_loss)
from step_ray.models.multidomain import MultiDomainConfig, build_multidomain


@dataclass(frozen=True)
class MultiDomainTraining(LoopConfig):
    """StarGAN v2's defaults where the seed gives none (docs/method.md §7): Adam 1e-4 β (0, 0.99), weight decay 1e-4,
    the mapping (here the flow) at 1e-6, λ_sty = λ_cyc = λ_ds = 1 (λ_ds decayed), R1 1, λ_uni = λ_smooth = 1."""

    model: MultiDomainConfig = field(default_factory=MultiDomainConfig)
    weights: MultiDomainLossWeights = field(default_factory=MultiDomainLossWeights)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.0, 0.99), weight_decay=1e-4))
    flow_lr: float = 1e-6
    # D_s's learning rate (None: optim.lr, as D's); it plays against E and the flow, which move at their own rates
    style_disc_lr: float | None = None
    # which styles L_uni moves towards the other side: "both" (the flow's and E's), "reference" (E's only,
    # the seed's "CNN codes close to the MLP's"), "latent" (the flow's only). In the likelihood form the flow
    # always moves, and "both" adds E's pull towards the flow's base N(0, I) (`unification_prior_loss`)
    uni_moves: Literal["both", "reference", "latent"] = "both"
    # how L_uni matches the two kinds of style: "adversarial" (the seed's: D_s against the flow and E) or
    # "likelihood" (the flow fitted to E's detached reference styles by maximum likelihood; no D_s). The
    # seed's game barely moves the held-out classifier at CPU budgets (experiments/README.md)
    uni_form: Literal["adversarial", "likelihood"] = "adversarial"
    # the likelihood form: weight of a step's styles in the flow's running style moments once a domain has
    # been seen in 1/momentum steps' worth (before that, their exact mean)
    style_moments_momentum: float = 0.05
    # the likelihood form: the splines' learning rate on it (flow_lr stays the image losses' rate)
    uni_flow_lr: float = 1e-3
    # the likelihood form: at the end of every epoch the affine layer takes the exact moments of E's styles of
    # up to this many training images (the running ones trail E while it trains); 0: running moments only
    style_moments_refit_images: int = 4096
    # the likelihood form: after that refit, the splines take this many steps (batches of 256, at uni_flow_lr)
    # on those styles, so that the flow ends each epoch fitted to E as it is (E moves faster than the flow's
    # one update a step follows); 0: none. Needs style_moments_refit_images > 0
    style_flow_refit_steps: int = 500
    val_images: int = 64
    # StarGAN v2 flips its inputs; off by default here so earlier runs' numbers stand (true: x_real flipped)
    flip: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (L_smooth needs another image in the batch)")
        if self.precision != "fp32":  # its four updates (R1's double backward among them) have no grad scaler
            raise ValueError(f"the multi-domain model trains in fp32 only; got precision={self.precision!r}")
        if self.flow_lr <= 0:
            raise ValueError("flow_lr must be > 0")
        if self.style_disc_lr is not None and self.style_disc_lr <= 0:
            raise ValueError("style_disc_lr must be > 0 (or null: optim.lr)")
        if self.uni_moves not in ("both", "reference", "latent"):
            raise ValueError(f"uni_moves must be both, reference or latent, got {self.uni_moves!r}")
        if self.uni_form not in ("adversarial", "likelihood"):
            raise ValueError(f"uni_form must be adversarial or likelihood, got {self.uni_form!r}")
        if self.uni_form == "likelihood" and self.uni_moves == "reference":
            raise ValueError("uni_moves=reference applies to the adversarial form; the likelihood form always fits "
                             "the flow (uni_moves=latent: the flow only, both: the flow and E)")
        if self.uni_flow_lr <= 0:
            raise ValueError("uni_flow_lr must be > 0")
        if self.style_moments_refit_images < 0:
            raise ValueError("style_moments_refit_images must be >= 0")
        if self.style_flow_refit_steps < 0:
            raise ValueError("style_flow_refit_steps must be >= 0")
        if not 0 < self.style_moments_momentum <= 1:
            raise ValueError(f"style_moments_momentum must be in (0, 1], got {self.style_moments_momentum}")


def make_optimizers(cfg: MultiDomainTraining, nets: dict) -> dict[str, torch.optim.Optimizer]:
    o = cfg.optim
    return {
        "optimizer_g": o.build(nets["generator"].parameters()),
        "optimizer_e": o.build(nets["style_encoder"].parameters()),
        "optimizer_f": torch.optim.Adam(nets["flow"].parameters(), lr=cfg.flow_lr, betas=o.betas,
                                        weight_decay=o.weight_decay),
        "optimizer_d": o.build(nets["discriminator"].parameters()),
        "optimizer_uni": torch.optim.Adam(nets["flow"].parameters(), lr=cfg.uni_flow_lr, betas=o.betas,
                                          weight_decay=o.weight_decay),
        "optimizer_ds": torch.optim.Adam(nets["style_discriminator"].parameters(), lr=cfg.style_disc_lr or o.lr,
                                         betas=o.betas, weight_decay=o.weight_decay),
    }


def _d_step(cfg, nets, x_real, y_org, y_trg, s_trg) -> tuple[torch.Tensor, dict]:
    """StarGAN v2's compute_d_loss: real images of their own domain against fakes in the target domain, + R1."""
    w = cfg.weights
    d = nets["discriminator"]
    x_real = x_real.detach().requires_grad_(w.r1 > 0)
    out_real = d(x_real, y_org)
    with torch.no_grad():
        x_fake = nets["generator"](x_real.detach(), s_trg)
    loss, logs = adversarial_d_loss(out_real, d(x_fake, y_trg))
    if w.r1:
        r1, part = r1_penalty(out_real, x_real)
        loss, logs = loss + w.r1 * r1, {**logs, **part}
    return loss, logs


def _g_terms(cfg, nets, step, x_real, y_org, y_trg, s_trg, s_trg2, latent: bool,
             x_ref=None) -> tuple[torch.Tensor, dict]:
    """StarGAN v2's compute_g_loss, plus L_uni and L_smooth on the latent-guided pass."""
    w = cfg.weights
    g, e = nets["generator"], nets["style_encoder"]
    x_fake = g(x_real, s_trg)
    terms: dict[str, Any] = {}
    if w.adv:
        terms["adv"] = adversarial_g_loss(nets["discriminator"](x_fake, y_trg))
    if w.sty:
        terms["sty"] = style_reconstruction_loss(e(x_fake, y_trg), s_trg)
    if w.ds:
        terms["ds"] = diversity_sensitive_loss(x_fake, g(x_real, s_trg2).detach())
    if w.cyc:
        terms["cyc"] = cycle_loss(g(x_fake, e(x_real, y_org)), x_real)
    if latent and w.uni and x_ref is not None and cfg.uni_form == "adversarial":
        # both sides move: the flow's styles towards "reference", E's reference styles towards "latent"
        # (the seed pulls E's codes to the flow's; docs/method.md asks only that the two be indistinguishable)
        ds_net = nets["style_discriminator"]
        moves = cfg.uni_moves
        terms["uni"] = unification_g_loss(ds_net(s_trg, y_trg) if moves in ("both", "latent") else None,
                                          ds_net(e(x_ref, y_trg), y_trg) if moves in ("both", "reference") else None)
    if latent and w.uni and x_ref is not None and cfg.uni_form == "likelihood" and cfg.uni_moves == "both":
        flow = nets["flow"]
        terms["uni"] = unification_prior_loss(e(x_ref, y_trg), y_trg, flow.style_mean, flow.style_covariance())
    if latent and w.smooth:
        # the negative is the nearest other image of the same domain (seed 004: x_n^u)
        terms["smooth"] = smoothness_triplet_loss(e(x_real, y_org), e(augment_for_smoothness(x_real), y_org),
                                                  w.smooth_margin, domains=y_org)
    return generator_objective(w, step, terms)


@torch.no_grad()
def fit_style_moments(flow, styles: torch.Tensor, domains: torch.Tensor, num_domains: int, momentum: float) -> None:
    """The likelihood form of L_uni, closed-form part: the flow's affine layer moves to the running mean and
    covariance of the reference styles of every rank's batch (`StyleFlow.fit_moments`)."""
    one_hot = torch.nn.functional.one_hot(domains.long(), num_domains).to(styles.dtype)
    count, total = one_hot.sum(0), one_hot.T @ styles
    outer = torch.einsum("nu,nd,ne->ude", one_hot, styles, styles)
    sum_over_ranks(count, total, outer)
    flow.fit_moments(count, total, outer, momentum)


def multidomain_step(cfg: MultiDomainTraining, nets: dict, opts: dict, x_real: torch.Tensor, y_org: torch.Tensor,
                     x_ref: torch.Tensor, x_ref2: torch.Tensor, y_trg: torch.Tensor, step: int,
                     guard: NonFiniteGuard | None = None, state: dict | None = None) -> dict[str, float] | None:
    """One training iteration: D (latent, reference) [+ D_s], G + flow + E (latent), G (reference).
    With a `guard`, an update whose loss is NaN/Inf (on any rank) is dropped; the logs are then None."""
    w = cfg.weights
    f, e = nets["flow"], nets["style_encoder"]
    n, style_dim = len(x_real), cfg.model.style_dim
    z1, z2 = torch.randn(n, style_dim, device=x_real.device), torch.randn(n, style_dim, device=x_real.device)
    ds_ = [nets["discriminator"], nets["style_discriminator"]]
    logs: dict[str, float] = {}

    # D with latent styles, D with reference styles, and D_s telling reference from latent styles
    with torch.no_grad():
        s_lat, s_ref = f(z1, y_trg), e(x_ref, y_trg)
    loss_lat, logs_lat = _d_step(cfg, nets, x_real, y_org, y_trg, s_lat)
    loss_ref, _ = _d_step(cfg, nets, x_real, y_org, y_trg, s_ref)
    loss_d = loss_lat + loss_ref
    logs.update({f"d_{k}": v for k, v in logs_lat.items()})
    if w.uni and cfg.uni_form == "likelihood":
        # L_uni as a density fit, its own update: the affine layer to the moments of every style E gives this
        # step (two codes a domain a step lagged far behind E's shrinking codes), then the splines by
        # gradient at uni_flow_lr, apart from the image losses' pull on the flow (at flow_lr)
        with torch.no_grad():
            styles, domains = torch.cat([s_ref, e(x_ref2, y_trg), e(x_real, y_org)]), torch.cat([y_trg, y_trg, y_org])
        fit_style_moments(f, styles, domains, cfg.model.num_domains, cfg.style_moments_momentum)
        loss_u, u_logs = unification_likelihood_loss(f.log_prob(styles, domains), style_dim)
        if not guarded_update(guard, state, "loss_uni", w.uni * loss_u, [opts["optimizer_uni"]], [f]):
            if guard.rollback_pending:
                return None
        logs["uni_nll"] = u_logs["uni"]
    if w.uni and cfg.uni_form == "adversarial":
        uni_d, part = unification_d_loss(nets["style_discriminator"](s_ref, y_trg),
                                         nets["style_discriminator"](s_lat, y_trg))
        loss_d, logs = loss_d + uni_d, {**logs, **part}
    ok = guarded_update(guard, state, "loss_d", loss_d, [opts["optimizer_d"], opts["optimizer_ds"]], ds_)
    if not ok and guard.rollback_pending:
        return None
    logs["loss_d"] = float(loss_d.detach())

    # G, the flow and E with latent styles
    with no_parameter_grads(*ds_):
        loss_g, g_logs = _g_terms(cfg, nets, step, x_real, y_org, y_trg, f(z1, y_trg), f(z2, y_trg), latent=True,
                                  x_ref=x_ref)
    if guard is not None:
        loss_g = guard.inject(loss_g, state)
    latent_opts = [opts[name] for name in ("optimizer_g", "optimizer_f", "optimizer_e")]
    if not guarded_update(guard, state, "loss_g (latent)", loss_g, latent_opts, [nets["generator"], f, e]):
        if guard.rollback_pending:
            return None
        ok = False
    logs.update({f"{k}_latent" if k != "lambda_ds" else k: v for k, v in g_logs.items()})

    # G alone with reference styles
    with no_parameter_grads(*ds_, f, e):
        loss_r, r_logs = _g_terms(cfg, nets, step, x_real, y_org, y_trg, e(x_ref, y_trg), e(x_ref2, y_trg),
                                  latent=False)
    if not guarded_update(guard, state, "loss_g (reference)", loss_r, [opts["optimizer_g"]], [nets["generator"]]):
        ok = False
    logs.update({f"{k}_ref": v for k, v in r_logs.items() if k != "lambda_ds"})
    if guard is not None:
        guard.step_done(ok)
    return logs if ok else None


@torch.no_grad()
def validate_multidomain(cfg: MultiDomainTraining, nets: dict, x: torch.Tensor, y: torch.Tensor, seed: int,
                         device) -> dict[str, float]:
    """Cheap per-epoch numbers: how far latent styles are from reference styles of the same domain
    (mean distance of each latent style to its nearest reference style, against reference-to-reference),
    how much G's output moves with the style (mean |G(x, s1) − G(x, s2)|), and the two views of
    unification: D_s's own accuracy on these codes (it trains against them: ≈ 0.5 when it cannot tell)
    and a fresh classifier's held-out accuracy (`unification_accuracy`, the evaluation's figure)."""
    for net in nets.values():
        net.eval()
    x, y = x.to(device), y.to(device)
    gen = torch.Generator().manual_seed(seed)
    s_ref = nets["style_encoder"](x, y)
    s_lat = nets["flow"](torch.randn(len(x), cfg.model.style_dim, generator=gen).to(device), y)
    d_lat, d_ref = [], []
    for dom in y.unique():
        r, lat_dom = s_ref[y == dom], s_lat[y == dom]
        if len(r) < 2:
            continue
        d_lat.append(torch.cdist(lat_dom, r).min(1).values.mean())
        rr = torch.cdist(r, r) + torch.eye(len(r), device=device) * 1e9
        d_ref.append(rr.min(1).values.mean())
    s2 = nets["flow"](torch.randn(len(x), cfg.model.style_dim, generator=gen).to(device), y)
    g = nets["generator"]
    moved = (g(x, s_lat) - g(x, s2)).abs().mean().item()
    d_s = nets["style_discriminator"]
    ds_acc = 0.5 * ((d_s(s_ref, y) > 0).float().mean() + (d_s(s_lat, y) <= 0).float().mean()).item()
    for net in nets.values():
        net.train()
    lat, ref = ((torch.stack(d_lat).mean().item(), torch.stack(d_ref).mean().item()) if d_lat
                else (float("nan"), float("nan")))
    return {"val_latent_to_ref": lat, "val_ref_to_ref": ref, "val_style_gap": lat / max(ref, 1e-9),
            "val_style_effect": moved, "val_ds_accuracy": ds_acc,
            "val_unification_accuracy": unification_accuracy(s_lat.cpu(), s_ref.cpu(), y.cpu(), seed)}


@dataclass
class MultiDomainRecipe(Recipe):
    """G, the style encoder, the flow, D and D_s; each step StarGAN v2's four updates on a batch of real
    images, random target domains and two reference images of each target domain."""

    cfg: MultiDomainTraining
    data: DomainDataConfig
    train_images: DomainImages
    val_images: DomainImages
    job: Any = None
    name: str = "multidomain"

    def build(self, w: Worker) -> dict[str, torch.nn.Module]:
        return {k: v.to(w.device) for k, v in build_multidomain(self.cfg.model).items()}

    def make_optimizers(self, w: Worker, modules):
        self.nets = modules
        self.opts = make_optimizers(self.cfg, modules)
        return dict(self.opts)

    def prepare(self, w: Worker, state) -> None:
        cfg, images = self.cfg, self.train_images
        broadcast_parameters(*self.nets.values())
        self.store = domain_store(images, self.data, cfg.image_cache_mb)
        self.by_domain = [images.rows_of(d) for d in range(len(images.names))]
        n = len(images.paths)
        # every image once per epoch; L_smooth needs two images in every batch (the sizes do not depend on the seed)
        smallest = min(len(rows) for r in range(w.world) for rows in epoch_batches(n, cfg.batch_size, 0, r, w.world))
        if smallest < 2:
            raise ValueError(f"{n} training images for {w.world} workers of batch {cfg.batch_size} leave a batch of "
                             f"{smallest} (L_smooth needs 2)")
        if w.rank == 0:
            rows = np.random.default_rng(cfg.seed).permutation(len(self.val_images.paths))[: cfg.val_images]
            self.val_x = domain_store(self.val_images, self.data, 0).batch(rows)
            self.val_y = torch.as_tensor(self.val_images.domains[rows])

    def batches(self, w: Worker, epoch: int, streams):
        """Each step's rows, random target domains and two reference rows of each target domain."""
        rng = np.random.default_rng([self.cfg.seed, *streams])
        rows = epoch_batches(len(self.train_images.paths), self.cfg.batch_size, [self.cfg.seed, epoch], w.rank, w.world)
        out = []
        for r in rows:  # drawn in the order the steps drew them before they were loaded ahead
            y_trg = rng.integers(0, len(self.train_images.names), len(r))
            out.append((len(r), (r, y_trg, self.references(y_trg, rng), self.references(y_trg, rng))))
        return out

    def references(self, domains: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """For each wanted domain, a random training row of that domain."""
        return np.array([rng.choice(self.by_domain[d]) for d in domains], np.int64)

    def load(self, batch):
        rows, y_trg, ref, ref2 = batch
        return (self.store.batch(rows), self.store.batch(ref), self.store.batch(ref2),
                torch.as_tensor(self.train_images.domains[rows]), torch.as_tensor(y_trg))

    def step(self, w: Worker, batch, state, guard):
        x_real, x_ref, x_ref2, y_org, y_trg = (x.to(w.device, non_blocking=True) for x in batch)
        if self.cfg.flip:
            (x_real,) = random_flip(x_real)
        return multidomain_step(self.cfg, self.nets, self.opts, x_real, y_org, x_ref, x_ref2, y_trg,
                                state["step"], guard, state)

    def end_epoch(self, w: Worker, state):
        """The likelihood form: the flow's affine layer to the exact moments of E's current styles of (up to
        style_moments_refit_images) training images, each rank encoding its share, then style_flow_refit_steps
        updates of the splines on those styles (gradients averaged over ranks); every rank ends equal."""
        cfg = self.cfg
        if not (cfg.weights.uni and cfg.uni_form == "likelihood" and cfg.style_moments_refit_images):
            return
        images = self.train_images
        rows = np.random.default_rng([cfg.seed, state["epoch"]]).permutation(len(images.paths))
        rows = rows[: cfg.style_moments_refit_images][w.rank:: w.world]
        encoder, flow = self.nets["style_encoder"], self.nets["flow"]
        styles, domains = [], []
        encoder.eval()
        with torch.no_grad():
            for start in range(0, len(rows), 256):
                chunk = rows[start: start + 256]
                y = torch.as_tensor(images.domains[chunk]).to(w.device)
                styles.append(encoder(self.store.batch(chunk).to(w.device), y))
                domains.append(y)
        encoder.train()
        # a rank without rows still joins the sums and the gradient averages over ranks
        styles = torch.cat(styles) if styles else torch.zeros(0, cfg.model.style_dim, device=w.device)
        domains = torch.cat(domains) if domains else torch.zeros(0, dtype=torch.long, device=w.device)
        # momentum 1 replaces the running moments; the count restarts so that it says what they come from
        flow.style_count.zero_()
        fit_style_moments(flow, styles, domains, cfg.model.num_domains, 1.0)
        seed = np.random.default_rng([cfg.seed, state["epoch"], w.rank]).integers(2**31)
        rng = torch.Generator().manual_seed(int(seed))
        for _ in range(cfg.style_flow_refit_steps):
            if len(styles):
                pick = torch.randint(0, len(styles), (min(256, len(styles)),), generator=rng).to(w.device)
                loss, _ = unification_likelihood_loss(flow.log_prob(styles[pick], domains[pick]), cfg.model.style_dim)
            else:
                loss = sum(p.sum() for p in flow.parameters()) * 0.0
            guarded_update(None, None, "flow refit", cfg.weights.uni * loss, [self.opts["optimizer_uni"]], [flow])

    def validate(self, w: Worker, state):
        return validate_multidomain(self.cfg, self.nets, self.val_x, self.val_y, self.cfg.seed, w.device)

    def grid(self, w: Worker, state):
        m = self.cfg.monitor
        return "latent_guided", latent_grid(self.nets, self.val_x[: m.grid_inputs], len(self.train_images.names),
                                            max(1, m.grid_samples), m.seed)

    def progress(self, m: dict[str, Any]) -> list[str]:
        return [f"loss_g {m.get('train_loss_g_latent', float('nan')):.4f}",
                f"loss_d {m.get('train_loss_d', float('nan')):.4f}",
                f"{m['images_per_s']:.1f} img/s", f"style gap {m['val_style_gap']:.2f}",
                f"unification acc {m['val_unification_accuracy']:.2f}"]
