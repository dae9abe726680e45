"""Evaluation of the multi-domain style model (docs/method.md §7 and §9).

* pictures per domain: latent-guided (inputs × flow samples of each domain) and reference-guided
  (inputs × reference images of each domain) grids;
* LPIPS diversity per domain (docs/method.md §9's protocol with flow samples as styles);
* unification: how well a small classifier tells latent styles f(z; θ_u) from reference styles E_u(x) of
  the same domain, on held-out codes (accuracy ≈ 0.5: one shared space; ≈ 1: two separable spaces);
* smoothness: along a straight line between two reference styles of one domain, the LPIPS between
  consecutive frames: their mean and variance (an even walk has a low variance).
"""
from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from step_ray import storage
from step_ray.checkpoints import load_saved_modules, recipe_section
from step_ray.data.domains import list_domain_split
from step_ray.data.store import domain_store
from step_ray.eval.embedding import image_grid, save_png
from step_ray.eval.metrics import LPIPSConfig, diversity, load_lpips, lpips_distance
from step_ray.eval.pictures import to_uint8
from step_ray.models.multidomain import MultiDomainConfig, build_multidomain


def _style_dim(nets) -> int:
    return nets["style_encoder"].cfg.style_dim


@torch.no_grad()
def latent_grid(nets: dict, x: torch.Tensor, num_domains: int, samples: int, seed: int = 0) -> np.ndarray:
    """Row i: input i, then for each domain `samples` outputs G(x_i, f(z_k; θ_u)) (the same z_k for every row)."""
    device = next(nets["generator"].parameters()).device
    x = x.to(device)
    z = torch.randn(samples, _style_dim(nets), generator=torch.Generator().manual_seed(seed)).to(device)
    rows = [[img] for img in to_uint8(x)]
    for u in range(num_domains):
        s = nets["flow"](z, torch.full((samples,), u, device=device, dtype=torch.long))
        out = nets["generator"](x.repeat_interleave(samples, 0), s.repeat(len(x), 1))
        pictures = to_uint8(out).reshape(len(x), samples, *to_uint8(out[:1]).shape[1:])
        for row, pics in zip(rows, pictures):
            row.extend(pics)
    return image_grid(rows)


@torch.no_grad()
def reference_grid(nets: dict, x: torch.Tensor, refs: torch.Tensor, ref_domains: torch.Tensor) -> np.ndarray:
    """Top row: blank, the references; row i: input i, then G(x_i, E_u(ref_j)) with u the reference's domain."""
    device = next(nets["generator"].parameters()).device
    x, refs, ref_domains = x.to(device), refs.to(device), ref_domains.to(device)
    s = nets["style_encoder"](refs, ref_domains)
    out = nets["generator"](x.repeat_interleave(len(refs), 0), s.repeat(len(x), 1))
    pictures = to_uint8(out).reshape(len(x), len(refs), *to_uint8(out[:1]).shape[1:])
    top = to_uint8(refs)
    rows = [[np.full_like(top[0], 255)] + list(top)]
    rows += [[a] + list(p) for a, p in zip(to_uint8(x), pictures)]
    return image_grid(rows)


def unification_accuracy(latent: torch.Tensor, reference: torch.Tensor, domains: torch.Tensor, seed: int = 0,
                         steps: int = 300) -> float:
    """Held-out accuracy of an MLP telling latent (0) from reference (1) styles, given the domain too.
    Balanced classes, half of each for training: 0.5 is chance (a unified space)."""
    gen = torch.Generator().manual_seed(seed)
    n = min(len(latent), len(reference))
    num_domains = int(domains.max()) + 1
    feats = torch.cat([torch.cat([latent[:n], torch.nn.functional.one_hot(domains[:n], num_domains).float()], 1),
                       torch.cat([reference[:n], torch.nn.functional.one_hot(domains[:n], num_domains).float()], 1)])
    labels = torch.cat([torch.zeros(n), torch.ones(n)])
    feats = (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-6)
    order = torch.randperm(2 * n, generator=gen)
    train, test = order[: n], order[n:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = torch.nn.Sequential(torch.nn.Linear(feats.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(clf(feats[train]).squeeze(1), labels[train])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float(((clf(feats[test]).squeeze(1) > 0).float() == labels[test]).float().mean())


@torch.no_grad()
def interpolation_smoothness(lp, nets: dict, x: torch.Tensor, s0: torch.Tensor, s1: torch.Tensor,
                             steps: int = 8) -> dict[str, float]:
    """LPIPS between consecutive frames G(x, (1−t) s0 + t s1): mean and variance over all frames and inputs."""
    device = next(nets["generator"].parameters()).device
    ts = torch.linspace(0, 1, steps, device=device)
    frames = [nets["generator"](x.to(device), (1 - t) * s0.to(device) + t * s1.to(device)).cpu() for t in ts]
    gaps = torch.stack([lpips_distance(lp, frames[k], frames[k + 1]) for k in range(steps - 1)])  # [steps-1, N]
    return {"interp_lpips_mean": float(gaps.mean()), "interp_lpips_var": float(gaps.var(unbiased=False)),
            "interp_lpips_max_over_mean": float(gaps.max(0).values.mean() / gaps.mean().clamp_min(1e-12))}


@torch.no_grad()
def evaluate_multidomain(nets: dict, data, split: str, output: str, num_inputs: int = 32, num_styles: int = 8,
                         seed: int = 0, lpips_cfg=None) -> dict[str, Any]:
    """All of the above on a split; writes metrics.json, latent_guided.png, reference_guided.png under `output`."""
    started = time.perf_counter()
    storage.check_writable(output, "eval output")
    images = list_domain_split(data, split)
    store = domain_store(images, data, 0)
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(images.paths))
    x_all, y_all = store.batch(rows), torch.as_tensor(images.domains[rows])
    x = x_all[:num_inputs]
    num_domains = len(images.names)
    lp = load_lpips(lpips_cfg or LPIPSConfig())
    gen = torch.Generator().manual_seed(seed)
    style_dim = _style_dim(nets)
    m: dict[str, Any] = {"domains": images.names, "images": len(rows), "lpips_weights": lp.weight_source}

    # diversity per domain: num_inputs × num_styles flow samples
    per_domain = []
    for u in range(num_domains):
        z = torch.randn(num_styles, style_dim, generator=gen)
        s = nets["flow"](z, torch.full((num_styles,), u, dtype=torch.long))
        out = torch.stack([nets["generator"](x[i : i + 1].repeat(num_styles, 1, 1, 1), s) for i in range(len(x))])
        per_domain.append(diversity(lp, out))
    m["diversity_per_domain"] = dict(zip(images.names, per_domain))
    m["diversity_latent"] = float(np.mean(per_domain))

    # unification: latent vs reference styles of the same domains
    s_ref = torch.cat([nets["style_encoder"](x_all[i : i + 64], y_all[i : i + 64]) for i in range(0, len(x_all), 64)])
    s_lat = nets["flow"](torch.randn(len(y_all), style_dim, generator=gen), y_all)
    m["unification_accuracy"] = unification_accuracy(s_lat, s_ref, y_all, seed)

    # smoothness: interpolate between two reference styles of the same domain, for each input
    pairs = [(int(rng.choice(images.rows_of(u))), int(rng.choice(images.rows_of(u)))) for u in y_all[: len(x)].tolist()]
    s0 = nets["style_encoder"](store.batch([p[0] for p in pairs]), y_all[: len(x)])
    s1 = nets["style_encoder"](store.batch([p[1] for p in pairs]), y_all[: len(x)])
    m.update(interpolation_smoothness(lp, nets, x, s0, s1))

    pictures = {"latent_guided": latent_grid(nets, x[:6], num_domains, 3, seed)}
    ref_rows = [int(rng.choice(images.rows_of(u))) for u in range(num_domains) for _ in range(2)]
    pictures["reference_guided"] = reference_grid(nets, x[:6], store.batch(ref_rows),
                                                  torch.as_tensor(images.domains[ref_rows]))
    uris = {}
    for name, image in pictures.items():
        uris[name] = storage.join(output, f"{name}.png")
        save_png(uris[name], image)
    m["seconds"] = time.perf_counter() - started
    storage.write_bytes(storage.join(output, "metrics.json"),
                        json.dumps({"metrics": m, "pictures": uris}, indent=1, default=float).encode())
    return {"metrics": m, "pictures": uris, "output": output}


def load_multidomain(checkpoint: str, device: str | torch.device = "cpu") -> dict[str, torch.nn.Module]:
    """Every network of a multi-domain checkpoint (local or s3://), in eval mode."""
    nets = load_saved_modules(checkpoint,
                              lambda record: build_multidomain(recipe_section(record, "model", MultiDomainConfig)))
    return {k: v.to(device) for k, v in nets.items()}
