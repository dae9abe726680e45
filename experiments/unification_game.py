"""L_uni on its own: can the style discriminator game merge reference and latent styles at all, and how fast?

    python experiments/unification_game.py --steps 1500 --style-disc-lr 1e-3 --flow-lr 1e-4 \
        --json experiments/results/unification_game.json
    python experiments/unification_game.py --form likelihood --flow-lr 1e-3 --steps 3000 --batch 64

The multi-domain model's L_uni (docs/method.md §7) with everything else taken away: E's per-domain heads on
the trunk features of the synthetic set's images (the trunk frozen at its seeded init, computed once), the
domain-conditioned flow and D_s, the model's own classes, losses and Adam settings (β (0, 0.99), weight
decay 1e-4), batches of --batch codes with their domains. Each step: D_s on detached codes, then the
fooling loss for the sides that move (--moves). Every --every steps, on held-out images: the held-out
classifier's accuracy (the evaluation's `unification_accuracy`: 0.5 is one space), D_s's own accuracy,
and the per-dimension spread of each kind of style. What this isolates: whether the game converges at
the model's learning rates and batch, with no other loss pulling E or the flow. `--form likelihood` is the
non-adversarial form (the model's `train.uni_form=likelihood`): each step moves the flow's affine layer to
the running mean and covariance of the reference styles and its splines by gradient on their likelihood;
E and D_s do not move. Trailing key=value arguments override the
config (e.g. train.model.flow_hidden=[128,128]).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--encoder-lr", type=float, default=1e-4)
    p.add_argument("--flow-lr", type=float, default=1e-6, help="the model's default (StarGAN v2's mapping lr)")
    p.add_argument("--style-disc-lr", type=float, default=1e-4)
    p.add_argument("--moves", choices=["both", "reference", "latent"], default="both")
    p.add_argument("--config", default="configs/multidomain_synthetic.yaml", help="its train.model is used")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic-dir", default="data/synthetic-val640")
    p.add_argument("--num-val", type=int, default=640, help="held-out images of the synthetic set (160 a domain)")
    p.add_argument("--form", choices=["adversarial", "likelihood"], default="adversarial")
    p.add_argument("--momentum", type=float, default=0.01,
                   help="the likelihood form's style_moments_momentum; 0: the splines alone, no affine layer")
    p.add_argument("--json", default="")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from step_ray.data.domains import DomainDataConfig, list_domain_split
    from step_ray.data.store import domain_store
    from step_ray.data.synthetic import SyntheticConfig
    from step_ray.eval.multidomain_eval import unification_accuracy
    from step_ray.losses.multidomain import (unification_d_loss, unification_g_loss,
                                             unification_likelihood_loss)
    from step_ray.config import load_config
    from step_ray.models.multidomain import build_multidomain
    from step_ray.pipelines.train_multidomain import MultiDomainJobConfig
    from step_ray.recipes.multidomain import fit_style_moments

    torch.manual_seed(args.seed)
    cfg = load_config(MultiDomainJobConfig, args.config, args.overrides).train.model
    data = DomainDataConfig(synthetic_dir=args.synthetic_dir, synthetic=SyntheticConfig(num_val=args.num_val),
                            image_size=32)
    train, val = list_domain_split(data, "train"), list_domain_split(data, "val")
    nets = build_multidomain(cfg)
    e, flow, d_s = nets["style_encoder"], nets["flow"], nets["style_discriminator"]
    with torch.no_grad():
        h_train = e.trunk(domain_store(train, data, 0).batch(np.arange(len(train.paths))))
        h_val = e.trunk(domain_store(val, data, 0).batch(np.arange(len(val.paths))))
    y_train, y_val = torch.as_tensor(train.domains), torch.as_tensor(val.domains)

    def reference(h, y):
        return torch.stack([head(h) for head in e.heads], 1)[torch.arange(len(h)), y]

    betas = (0.0, 0.99)
    opt_e = torch.optim.Adam(e.heads.parameters(), lr=args.encoder_lr, betas=betas, weight_decay=1e-4)
    opt_f = torch.optim.Adam(flow.parameters(), lr=args.flow_lr, betas=betas, weight_decay=1e-4)
    opt_ds = torch.optim.Adam(d_s.parameters(), lr=args.style_disc_lr, betas=betas, weight_decay=1e-4)
    rng, probe_noise = np.random.default_rng(args.seed), torch.Generator().manual_seed(99)
    history, started = [], time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.every == 0:
            with torch.no_grad():
                s_ref = reference(h_val, y_val)
                s_lat = flow(torch.randn(len(y_val), cfg.style_dim, generator=probe_noise), y_val)
                ds_acc = 0.5 * ((d_s(s_ref, y_val) > 0).float().mean() + (d_s(s_lat, y_val) <= 0).float().mean())
            row = {"step": step, "unification_accuracy": unification_accuracy(s_lat, s_ref, y_val, args.seed),
                   "ds_accuracy": float(ds_acc), "ref_spread": float(s_ref.std(0).mean()),
                   "latent_spread": float(s_lat.std(0).mean()), "seconds": time.perf_counter() - started}
            history.append(row)
            print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)
        rows = torch.as_tensor(rng.choice(len(y_train), args.batch, replace=False))
        y, z = y_train[rows], torch.randn(args.batch, cfg.style_dim)
        with torch.no_grad():
            s_ref, s_lat = reference(h_train[rows], y), flow(z, y)
        if args.form == "likelihood":
            if args.momentum > 0:
                fit_style_moments(flow, s_ref, y, cfg.num_domains, args.momentum)
            loss, _ = unification_likelihood_loss(flow.log_prob(s_ref, y), cfg.style_dim)
            opt_f.zero_grad()
            loss.backward()
            opt_f.step()
            continue
        loss_d, _ = unification_d_loss(d_s(s_ref, y), d_s(s_lat, y))
        opt_ds.zero_grad()
        loss_d.backward()
        opt_ds.step()
        for param in d_s.parameters():
            param.requires_grad_(False)
        loss_g, _ = unification_g_loss(d_s(flow(z, y), y) if args.moves in ("both", "latent") else None,
                                       d_s(reference(h_train[rows], y), y) if args.moves in ("both", "reference")
                                       else None)
        opt_e.zero_grad()
        opt_f.zero_grad()
        loss_g.backward()
        opt_e.step()
        opt_f.step()
        for param in d_s.parameters():
            param.requires_grad_(True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "history": history}, indent=1))


if __name__ == "__main__":
    main()
