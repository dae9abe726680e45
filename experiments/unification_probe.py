"""Why the multi-domain model's L_uni does not merge the spaces: the whole model trained in one process,
probed every --every steps on held-out images.

    python experiments/unification_probe.py --steps 500 --every 100 [train key=value ...] \
        --json experiments/results/unification_probe.json

The train section of --config, by default the CPU config `configs/multidomain_synthetic.yaml` (4 style
families of the synthetic set at 32 px, style_dim 16, batch 8), the model's own step (`multidomain_step`:
StarGAN v2's four updates with L_uni and L_smooth), each step on random training images with random target
domains and two references of each (drawn per step, not per epoch as the recipe does). At each
probe, on the 640 held-out images: the held-out classifier's accuracy (`unification_accuracy`, 0.5 is one
space), D_s's own accuracy on the current codes (below 0.5: it calls reference styles latent and latent
ones reference, i.e. it lags behind what it plays against), the mean norm and per-dimension spread of each
kind of style, and the distance between their means. Overrides are keys of that train section
(`flow_lr=1e-4`, `style_disc_lr=1e-3`, `weights.uni=0`, `uni_moves=reference`, ...).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--config", default="configs/multidomain_synthetic.yaml", help="its train section is used")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic-dir", default="data/synthetic-val640")
    p.add_argument("--json", default="")
    args, overrides = p.parse_known_args(argv)

    import numpy as np
    import torch

    from step_ray.config import load_config
    from step_ray.data.domains import DomainDataConfig, list_domain_split
    from step_ray.data.store import domain_store
    from step_ray.data.synthetic import SyntheticConfig
    from step_ray.eval.multidomain_eval import unification_accuracy
    from step_ray.models.multidomain import build_multidomain
    from step_ray.pipelines.train_multidomain import MultiDomainJobConfig
    from step_ray.recipes.multidomain import make_optimizers, multidomain_step

    torch.set_num_threads(1)
    overrides = [f"train.{o}" for o in [f"seed={args.seed}", *overrides]]
    cfg = load_config(MultiDomainJobConfig, args.config, overrides).train
    torch.manual_seed(args.seed)
    data = DomainDataConfig(synthetic_dir=args.synthetic_dir, synthetic=SyntheticConfig(num_val=640), image_size=32)
    train, val = list_domain_split(data, "train"), list_domain_split(data, "val")
    train_store, val_store = domain_store(train, data, 0), domain_store(val, data, 0)
    x_val, y_val = val_store.batch(np.arange(len(val.paths))), torch.as_tensor(val.domains)
    nets = build_multidomain(cfg.model)
    opts = make_optimizers(cfg, nets)
    by_domain = [train.rows_of(d) for d in range(cfg.model.num_domains)]
    rng = np.random.default_rng(args.seed)

    def probe(step: int) -> dict:
        for net in nets.values():
            net.eval()
        with torch.no_grad():
            s_ref = torch.cat([nets["style_encoder"](x_val[i:i + 128], y_val[i:i + 128])
                               for i in range(0, len(x_val), 128)])
            noise = torch.randn(len(y_val), cfg.model.style_dim, generator=torch.Generator().manual_seed(1))
            s_lat = nets["flow"](noise, y_val)
            d_s = nets["style_discriminator"]
            ds_acc = 0.5 * ((d_s(s_ref, y_val) > 0).float().mean() + (d_s(s_lat, y_val) <= 0).float().mean())
        for net in nets.values():
            net.train()
        return {"step": step, "unification_accuracy": unification_accuracy(s_lat, s_ref, y_val, args.seed),
                "ds_accuracy": float(ds_acc), "ref_norm": float(s_ref.norm(dim=1).mean()),
                "latent_norm": float(s_lat.norm(dim=1).mean()), "ref_spread": float(s_ref.std(0).mean()),
                "latent_spread": float(s_lat.std(0).mean()),
                "mean_gap": float((s_ref.mean(0) - s_lat.mean(0)).norm())}

    history, started = [probe(0)], time.perf_counter()
    print(json.dumps({k: round(v, 3) for k, v in history[-1].items()}), flush=True)
    for step in range(args.steps):
        rows = rng.choice(len(train.paths), cfg.batch_size, replace=False)
        y_trg = rng.integers(0, cfg.model.num_domains, cfg.batch_size)
        ref = np.array([rng.choice(by_domain[d]) for d in y_trg])
        ref2 = np.array([rng.choice(by_domain[d]) for d in y_trg])
        multidomain_step(cfg, nets, opts, train_store.batch(rows), torch.as_tensor(train.domains[rows]),
                         train_store.batch(ref), train_store.batch(ref2), torch.as_tensor(y_trg), step)
        if (step + 1) % args.every == 0:
            history.append({**probe(step + 1), "seconds": time.perf_counter() - started})
            print(json.dumps({k: round(v, 3) for k, v in history[-1].items()}), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "overrides": overrides, "history": history},
                                              indent=1))


if __name__ == "__main__":
    main()
