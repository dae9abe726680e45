"""What the held-out unification classifier sees: the shape of each kind of style, and two Gaussian controls.

    python experiments/style_space_shape.py --json experiments/results/style_space_shape.json
    python experiments/style_space_shape.py --checkpoint runs/md-full/checkpoint_latest   # a trained model

For each domain of the synthetic set (held-out images), the covariance spectrum of E's reference styles and of
the flow's latent styles: the participation ratio (Σλ)² / Σλ² (the number of directions the variance is
spread over, style_dim at most) and the top variance fractions. Then the evaluation's classifier
(`unification_accuracy`, 0.5 is one space) on three pairs: the flow's styles against E's (what the model is
scored on), and two controls that replace the flow by a per-domain Gaussian with E's mean and covariance,
fitted on the held-out codes themselves (the classifier's floor for a model that matches two moments
exactly) and on the training images' codes (what a perfect moment-matching fit to the training set scores).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def spectrum(codes):
    """Participation ratio and descending variance fractions of the codes' covariance."""
    import torch

    centred = codes - codes.mean(0)
    eig = torch.linalg.eigvalsh(centred.T @ centred / len(codes)).flip(0).clamp_min(0)
    return float(eig.sum() ** 2 / (eig ** 2).sum()), (eig / eig.sum()).tolist()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/multidomain_synthetic.yaml", help="its model (without --checkpoint)")
    p.add_argument("--checkpoint", default="", help="a trained multi-domain checkpoint (default: the seeded init)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic-dir", default="data/synthetic-val640")
    p.add_argument("--num-val", type=int, default=640)
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from step_ray.config import load_config
    from step_ray.data.domains import DomainDataConfig, list_domain_split
    from step_ray.data.store import domain_store
    from step_ray.data.synthetic import SyntheticConfig
    from step_ray.eval.multidomain_eval import load_multidomain, unification_accuracy
    from step_ray.models.multidomain import build_multidomain
    from step_ray.pipelines.train_multidomain import MultiDomainJobConfig

    torch.manual_seed(args.seed)
    if args.checkpoint:
        nets = load_multidomain(args.checkpoint)
    else:
        nets = build_multidomain(load_config(MultiDomainJobConfig, args.config, []).train.model)
    encoder, flow = nets["style_encoder"].eval(), nets["flow"].eval()
    style_dim = flow.cfg.style_dim
    data = DomainDataConfig(synthetic_dir=args.synthetic_dir, synthetic=SyntheticConfig(num_val=args.num_val),
                            image_size=32)
    splits = {name: list_domain_split(data, name) for name in ("train", "val")}
    codes, domains = {}, {}
    with torch.no_grad():
        for name, images in splits.items():
            domains[name] = torch.as_tensor(images.domains)
            x = domain_store(images, data, 0).batch(np.arange(len(images.paths)))
            codes[name] = torch.cat([encoder(x[i: i + 256], domains[name][i: i + 256]) for i in range(0, len(x), 256)])
        y = domains["val"]
        latent = flow(torch.randn(len(y), style_dim, generator=torch.Generator().manual_seed(args.seed)), y)
    gen = torch.Generator().manual_seed(args.seed + 1)
    gaussian = {"val": torch.empty_like(latent), "train": torch.empty_like(latent)}
    per_domain = []
    for d in range(len(splits["val"].names)):
        rows = y == d
        for fit in gaussian:
            own = codes[fit][domains[fit] == d]
            chol = torch.linalg.cholesky(torch.cov(own.T) + 1e-6 * torch.eye(style_dim))
            noise = torch.randn(int(rows.sum()), style_dim, generator=gen)
            gaussian[fit][rows] = own.mean(0) + noise @ chol.T
        ref_pr, ref_frac = spectrum(codes["val"][rows])
        lat_pr, lat_frac = spectrum(latent[rows])
        per_domain.append({"domain": splits["val"].names[d], "reference_participation_ratio": ref_pr,
                           "latent_participation_ratio": lat_pr, "reference_top_fractions": ref_frac[:4],
                           "latent_top_fractions": lat_frac[:4]})
    result = {"args": vars(args), "style_dim": style_dim, "per_domain": per_domain,
              "accuracy_flow": unification_accuracy(latent, codes["val"], y, args.seed),
              "accuracy_gaussian_fitted_on_val": unification_accuracy(gaussian["val"], codes["val"], y, args.seed),
              "accuracy_gaussian_fitted_on_train": unification_accuracy(gaussian["train"], codes["val"], y, args.seed)}
    for row in per_domain:
        print(f"{row['domain']}: participation ratio reference {row['reference_participation_ratio']:.2f}, "
              f"latent {row['latent_participation_ratio']:.2f} (of {style_dim}); reference top fractions "
              + " ".join(f"{v:.3f}" for v in row["reference_top_fractions"]))
    print(f"held-out classifier: flow vs E {result['accuracy_flow']:.3f}; Gaussian with E's moments vs E: fitted "
          f"on the held-out codes {result['accuracy_gaussian_fitted_on_val']:.3f}, on the training codes "
          f"{result['accuracy_gaussian_fitted_on_train']:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
