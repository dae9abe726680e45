"""The multi-domain disentangled style model (METHOD §7, seed 004; StarGAN v2 family), under the project's
Ray Train conventions.

A conditional neural spline flow f(z; θ_u) (zuko; θ_u = MLP(u)) maps Gaussian noise to domain u's style
space, a style encoder with per-domain heads gives reference styles, G(x, s) injects a style by AdaIN.

    L_D   = L_adv(D) + λ_r1 R1
    L_Ds  = BCE(D_s(E(x_ref)) → real, D_s(f(z)) → fake)                                (when λ_uni > 0)
    L_G   = L_adv + λ_sty |s − E(G(x, s))| + λ_cyc |x − G(G(x, s), E(x))| − λ_ds(t) |G(x, s1) − G(x, s2)|
            + λ_uni BCE(D_s(f(z)) → real) + λ_smooth max(α + ‖E(x) − E(aug x)‖ − ‖E(x) − E(x_n)‖, 0)

Each step does StarGAN v2's four updates: D with latent and with reference styles, then G (+ flow + E)
with latent styles, then G alone with reference styles; D_s is updated with the D steps. λ_ds decays
linearly with the optimiser step, which is checkpointed (StarGAN v2 mutated its config, so a resumed run
restarted the decay). No EMA copies (StarGAN v2 evaluates EMA weights; a short CPU run does not need them).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from step_ray.data.domains import DomainDataConfig, DomainImages, DomainStore, list_domain_split
from step_ray.losses.multidomain import (MultiDomainLossWeights, adversarial_d_loss, adversarial_g_loss, augment_for_smoothness,
                                         cycle_loss, diversity_sensitive_loss, generator_objective, r1_penalty,
                                         smoothness_triplet_loss, style_reconstruction_loss, unification_d_loss,
                                         unification_g_loss)
from step_ray.metrics import record_epoch
from step_ray.models.multidomain import MultiDomainConfig, build_multidomain
from step_ray.train.common import (EpochMeter, OptimConfig, RunSettings, average_gradients, broadcast_parameters,
                                   epoch_batches, improves, fit, note_restart, report_epoch, resume_folder,
                                   seed_everything, worker_device)
from step_ray.checkpoints import load_checkpoint
from step_ray.train.generator import no_parameter_grads
from step_ray.train.guard import NonFiniteConfig, NonFiniteGuard, guarded, seed_streams
from step_ray.train.monitor import IntervalMeter, MonitorConfig, RunMonitor

STAGE = "multidomain"


@dataclass(frozen=True)
class MultiDomainTrainConfig:
    """StarGAN v2's defaults where the seed gives none (METHOD §7): Adam 1e-4 β (0, 0.99), weight decay 1e-4,
    the mapping (here the flow) at 1e-6, λ_sty = λ_cyc = λ_ds = 1 (λ_ds decayed), R1 1, λ_uni = λ_smooth = 1."""

    model: MultiDomainConfig = field(default_factory=MultiDomainConfig)
    weights: MultiDomainLossWeights = field(default_factory=MultiDomainLossWeights)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, betas=(0.0, 0.99), weight_decay=1e-4))
    flow_lr: float = 1e-6
    batch_size: int = 8  # per worker
    max_epochs: int = 10
    max_steps: int = 0
    seed: int = 0
    val_images: int = 64
    image_cache_mb: int = 4096
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    nonfinite: NonFiniteConfig = field(default_factory=NonFiniteConfig)  # what a NaN/Inf loss does

    def __post_init__(self):
        if min(self.batch_size, self.max_epochs) < 1 or self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (L_smooth needs another image in the batch) and max_epochs >= 1")
        if self.flow_lr <= 0:
            raise ValueError("flow_lr must be > 0")


def make_optimizers(cfg: MultiDomainTrainConfig, nets: dict) -> dict[str, torch.optim.Optimizer]:
    o = cfg.optim
    return {
        "optimizer_g": o.build(nets["generator"].parameters()),
        "optimizer_e": o.build(nets["style_encoder"].parameters()),
        "optimizer_f": torch.optim.Adam(nets["flow"].parameters(), lr=cfg.flow_lr, betas=o.betas, weight_decay=o.weight_decay),
        "optimizer_d": o.build(itertools.chain(nets["discriminator"].parameters(), nets["style_discriminator"].parameters())),
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


def _g_terms(cfg, nets, step, x_real, y_org, y_trg, s_trg, s_trg2, latent: bool, x_ref=None) -> tuple[torch.Tensor, dict]:
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
    if latent and w.uni and x_ref is not None:
        # both sides move: the flow's styles towards "reference", E's reference styles towards "latent"
        # (the seed pulls E's codes to the flow's; METHOD asks only that the two be indistinguishable)
        ds_net = nets["style_discriminator"]
        terms["uni"] = unification_g_loss(ds_net(s_trg, y_trg), ds_net(e(x_ref, y_trg), y_trg))
    if latent and w.smooth:
        # the negative is the nearest other image of the same domain (seed 004: x_n^u)
        terms["smooth"] = smoothness_triplet_loss(e(x_real, y_org), e(augment_for_smoothness(x_real), y_org), w.smooth_margin,
                                                  domains=y_org)
    return generator_objective(w, step, terms)


def multidomain_step(cfg: MultiDomainTrainConfig, nets: dict, opts: dict, x_real: torch.Tensor, y_org: torch.Tensor,
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
    if w.uni:
        uni_d, part = unification_d_loss(nets["style_discriminator"](s_ref, y_trg), nets["style_discriminator"](s_lat, y_trg))
        loss_d, logs = loss_d + uni_d, {**logs, **part}
    opts["optimizer_d"].zero_grad(set_to_none=True)
    ok = guarded(guard, state, "loss_d", loss_d)
    if ok:
        loss_d.backward()
        average_gradients(*ds_)
        opts["optimizer_d"].step()
    elif guard.rollback_pending:
        return None
    logs["loss_d"] = float(loss_d.detach())

    # G, the flow and E with latent styles
    with no_parameter_grads(*ds_):
        loss_g, g_logs = _g_terms(cfg, nets, step, x_real, y_org, y_trg, f(z1, y_trg), f(z2, y_trg), latent=True, x_ref=x_ref)
    if guard is not None:
        loss_g = guard.inject(loss_g, state)
    for name in ("optimizer_g", "optimizer_f", "optimizer_e"):
        opts[name].zero_grad(set_to_none=True)
    if guarded(guard, state, "loss_g (latent)", loss_g):
        loss_g.backward()
        average_gradients(nets["generator"], f, e)
        for name in ("optimizer_g", "optimizer_f", "optimizer_e"):
            opts[name].step()
    elif guard.rollback_pending:
        return None
    else:
        ok = False
    logs.update({f"{k}_latent" if k != "lambda_ds" else k: v for k, v in g_logs.items()})

    # G alone with reference styles
    with no_parameter_grads(*ds_, f, e):
        loss_r, r_logs = _g_terms(cfg, nets, step, x_real, y_org, y_trg, e(x_ref, y_trg), e(x_ref2, y_trg), latent=False)
    opts["optimizer_g"].zero_grad(set_to_none=True)
    if guarded(guard, state, "loss_g (reference)", loss_r):
        loss_r.backward()
        average_gradients(nets["generator"])
        opts["optimizer_g"].step()
    else:
        ok = False
    logs.update({f"{k}_ref": v for k, v in r_logs.items() if k != "lambda_ds"})
    if guard is not None:
        guard.step_done(ok)
    return logs if ok else None


@torch.no_grad()
def validate_multidomain(cfg: MultiDomainTrainConfig, nets: dict, x: torch.Tensor, y: torch.Tensor, seed: int, device) -> dict[str, float]:
    """Cheap per-epoch numbers: how far latent styles are from reference styles of the same domain
    (mean distance of each latent style to its nearest reference style, against reference-to-reference),
    and how much G's output moves with the style (mean |G(x, s1) − G(x, s2)|)."""
    for net in nets.values():
        net.eval()
    x, y = x.to(device), y.to(device)
    gen = torch.Generator().manual_seed(seed)
    s_ref = nets["style_encoder"](x, y)
    s_lat = nets["flow"](torch.randn(len(x), cfg.model.style_dim, generator=gen).to(device), y)
    d_lat, d_ref = [], []
    for dom in y.unique():
        r, l = s_ref[y == dom], s_lat[y == dom]
        if len(r) < 2:
            continue
        d_lat.append(torch.cdist(l, r).min(1).values.mean())
        rr = torch.cdist(r, r) + torch.eye(len(r), device=device) * 1e9
        d_ref.append(rr.min(1).values.mean())
    s2 = nets["flow"](torch.randn(len(x), cfg.model.style_dim, generator=gen).to(device), y)
    g = nets["generator"]
    moved = (g(x, s_lat) - g(x, s2)).abs().mean().item()
    for net in nets.values():
        net.train()
    lat, ref = (torch.stack(d_lat).mean().item(), torch.stack(d_ref).mean().item()) if d_lat else (float("nan"), float("nan"))
    return {"val_latent_to_ref": lat, "val_ref_to_ref": ref, "val_style_gap": lat / max(ref, 1e-9), "val_style_effect": moved}


def multidomain_worker_loop(loop_config: dict[str, Any]) -> None:
    import ray.train

    cfg: MultiDomainTrainConfig = loop_config["train"]
    data: DomainDataConfig = loop_config["data"]
    train_images: DomainImages = loop_config["train_images"]
    val_images: DomainImages = loop_config["val_images"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device()
    seed_everything(cfg.seed)
    nets = {k: v.to(device) for k, v in build_multidomain(cfg.model).items()}
    opts = make_optimizers(cfg, nets)
    state: dict[str, Any] = {"stage": STAGE, "epoch": 0, "step": 0, "best": None, "history": [], "stopped": ""}
    with resume_folder(loop_config) as folder:
        if folder is not None:  # resume, or restart after a lost worker: the newest complete checkpoint
            state = load_checkpoint(folder, nets, opts, map_location=device)
            note_restart(state)
    state["stopped"] = ""
    broadcast_parameters(*nets.values())
    store = DomainStore(train_images, data, cfg.image_cache_mb)
    n = len(train_images.paths)
    # every image once per epoch; L_smooth needs two images in every batch (the sizes do not depend on the seed)
    smallest = min(len(rows) for r in range(world) for rows in epoch_batches(n, cfg.batch_size, 0, r, world))
    if smallest < 2:
        raise ValueError(f"{n} training images for {world} workers of batch {cfg.batch_size} leave a batch of "
                         f"{smallest} (L_smooth needs 2)")
    if rank == 0:
        val_store = DomainStore(val_images, data, 0)
        val_rows = np.random.default_rng(cfg.seed).permutation(len(val_images.paths))[: cfg.val_images]
        val_x, val_y = val_store.batch(val_rows), torch.as_tensor(val_images.domains[val_rows])
    monitor = RunMonitor(loop_config.get("run_folder", ""), STAGE, enabled=rank == 0 and cfg.monitor.enabled)
    interval = IntervalMeter()
    num_domains = len(train_images.names)
    guard = NonFiniteGuard(cfg.nonfinite, STAGE, rank)
    guard.remember(nets, opts, state)

    while state["epoch"] < cfg.max_epochs and not state["stopped"]:
        epoch = state["epoch"]
        streams = seed_streams(epoch, rank, state)
        seed_everything(cfg.seed, *streams)
        rng = np.random.default_rng([cfg.seed, *streams])
        meter = EpochMeter()
        for rows in epoch_batches(n, cfg.batch_size, [cfg.seed, epoch], rank, world):
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                state["stopped"] = f"step budget {cfg.max_steps} reached"
                break
            y_trg = rng.integers(0, num_domains, len(rows))
            x_real = store.batch(rows).to(device)
            x_ref = store.batch(store.references(y_trg, rng)).to(device)
            x_ref2 = store.batch(store.references(y_trg, rng)).to(device)
            y_org = torch.as_tensor(train_images.domains[rows], device=device)
            logs = multidomain_step(cfg, nets, opts, x_real, y_org, x_ref, x_ref2, torch.as_tensor(y_trg, device=device),
                                    state["step"], guard, state)
            if guard.rollback_pending:
                break
            state["step"] += 1
            if logs is None:  # a non-finite loss: that update was dropped
                continue
            meter.add(logs, len(rows))
            interval.add(logs, len(rows))
            if cfg.monitor.scalars_every and state["step"] % cfg.monitor.scalars_every == 0:
                scalars = interval.take(world)
                monitor.scalars(state["step"], scalars)
                record_epoch(STAGE, {**scalars, "step": state["step"]}, rank=rank)
        if guard.rollback_pending:  # back to the last checkpoint's weights, optimisers and state; replay
            state = guard.restore(nets, opts, state)
            continue
        seconds = meter.seconds()
        metrics: dict[str, Any] = meter.means()
        metrics.update(stage=STAGE, epoch=epoch, step=state["step"], epoch_seconds=seconds,
                       nonfinite_steps=guard.take_epoch_count(), images_per_s=meter.rate(seconds, world))
        if rank == 0:
            metrics.update(validate_multidomain(cfg, nets, val_x, val_y, cfg.seed, device))
            if improves(metrics.get(loop_config["checkpoint_metric"]), state["best"], loop_config["checkpoint_mode"]):
                state["best"] = metrics.get(loop_config["checkpoint_metric"])
            state["history"].append(metrics)
            print(f"[multidomain] epoch {epoch + 1}/{cfg.max_epochs} | loss_g {metrics.get('train_loss_g_latent', float('nan')):.4f} | "
                  f"loss_d {metrics.get('train_loss_d', float('nan')):.4f} | {metrics['images_per_s']:.1f} img/s | "
                  f"style gap {metrics['val_style_gap']:.2f}", flush=True)
            monitor.scalars(state["step"], {k: v for k, v in metrics.items() if k not in ("stage", "step")})
            if cfg.monitor.enabled and cfg.monitor.grid_every and (epoch + 1) % cfg.monitor.grid_every == 0:
                from step_ray.eval.multidomain_eval import latent_grid

                monitor.image("latent_guided", state["step"], latent_grid(nets, val_x[: cfg.monitor.grid_inputs], num_domains,
                                                                          max(1, cfg.monitor.grid_samples), cfg.monitor.seed),
                              png_name=f"{STAGE}_epoch{epoch:04d}.png")
        state["epoch"] = epoch + 1
        record_epoch(STAGE, metrics, rank=rank)
        report_epoch(metrics, epoch, rank, nets, opts, state, loop_config["config"])
        guard.remember(nets, opts, state)
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            state["stopped"] = f"step budget {cfg.max_steps} reached"
    monitor.close()


# ----------------------------------------------------------------------------------------------------
# the driver


@dataclass(frozen=True)
class MultiDomainRunSettings(RunSettings):
    checkpoint_metric: str = "val_style_gap"  # latent styles as close to reference styles as those are to each other
    checkpoint_mode: Literal["max", "min"] = "min"


@dataclass(frozen=True)
class TrainMultiDomainConfig:
    """`jobs/train_multidomain.py`: train on N >= 2 domains, then evaluate (grids, diversity, unification, smoothness)."""

    data: DomainDataConfig = field(default_factory=DomainDataConfig)
    val_split: str = "val"
    train: MultiDomainTrainConfig = field(default_factory=MultiDomainTrainConfig)
    run: MultiDomainRunSettings = field(default_factory=MultiDomainRunSettings)
    evaluate: bool = True
    eval_inputs: int = 32
    eval_styles: int = 8

    def __post_init__(self):
        self.train.model.check_image_size(self.data.image_size)


def run_train_multidomain(cfg: TrainMultiDomainConfig, callbacks: tuple = ()) -> dict[str, Any]:
    from step_ray import storage
    from step_ray.config import config_to_dict
    from step_ray.train.common import write_json
    from step_ray.train.generator import last_checkpoint

    started = time.perf_counter()
    train_images, val_images = list_domain_split(cfg.data, "train"), list_domain_split(cfg.data, cfg.val_split)
    if train_images.names != val_images.names:
        raise ValueError(f"train domains {train_images.names} differ from {cfg.val_split} domains {val_images.names}")
    if len(train_images.names) != cfg.train.model.num_domains:
        raise ValueError(f"the data has {len(train_images.names)} domains {train_images.names}; "
                         f"set train.model.num_domains={len(train_images.names)}")
    loop_config = {"train": cfg.train, "data": cfg.data, "train_images": train_images, "val_images": val_images,
                   "config": cfg.train, "checkpoint_metric": cfg.run.checkpoint_metric, "checkpoint_mode": cfg.run.checkpoint_mode}
    result, run_uri = fit(multidomain_worker_loop, loop_config, cfg.run, STAGE, callbacks)
    if result.error:
        raise result.error
    out: dict[str, Any] = {"multidomain": last_checkpoint(result, cfg.run), "multidomain_run": run_uri,
                           "multidomain_metrics": result.metrics, "train_seconds": time.perf_counter() - started,
                           "images_per_s": (result.metrics or {}).get("images_per_s"), "domains": train_images.names}
    if cfg.evaluate:
        from step_ray.eval.multidomain_eval import evaluate_multidomain

        record = evaluate_multidomain(load_multidomain(out["multidomain"]), cfg.data, cfg.val_split,
                                      storage.join(out["multidomain"], "eval"), num_inputs=cfg.eval_inputs,
                                      num_styles=cfg.eval_styles, seed=cfg.train.seed)
        out["eval"], out["eval_metrics"] = record["output"], record["metrics"]
    out["metrics"] = storage.join(run_uri, "train_multidomain.json")
    write_json(out["metrics"], {**out, "config": config_to_dict(cfg)})
    return out


def load_multidomain(checkpoint: str, device: str | torch.device = "cpu") -> dict[str, torch.nn.Module]:
    """Every network of a multi-domain checkpoint (local or s3://), in eval mode."""
    from step_ray.checkpoints import load_saved_modules

    nets = load_saved_modules(checkpoint, MultiDomainTrainConfig, lambda cfg: build_multidomain(cfg.model), where=STAGE)
    return {k: v.to(device) for k, v in nets.items()}
