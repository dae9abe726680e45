"""Evaluation of the multi-domain style model (docs/method.md §7 and §9).

* pictures per domain: latent-guided (inputs × flow samples of each domain) and reference-guided
  (inputs × reference images of each domain) grids;
* StarGAN v2's protocol per target domain: latent-guided (flow samples) and reference-guided outputs for
  held-out inputs of every other domain, their LPIPS diversity and their FID / KID against the target
  domain's real images (with the FID Inception; beside the real-vs-real floor);
* unification: how well a small classifier tells latent styles f(z; θ_u) from reference styles E_u(x) of
  the same domain, on held-out codes (accuracy ≈ 0.5: one shared space; ≈ 1: two separable spaces);
* smoothness: along a straight line between two reference styles of one domain, the LPIPS between
  consecutive frames: their mean and variance (an even walk has a low variance);
* disentanglement: DCI scores of the reference styles against the synthetic set's generating factors.
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
from step_ray.eval.disentanglement import DCI_MIN_CODES, dci_within_domains
from step_ray.eval.embedding import image_grid, save_png
from step_ray.eval.fid import FIDConfig, inception_or_none, real_features_cached, realism
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


# the factors a synthetic domain's images differ by independently (docs/method.md §8): within a family the
# band also fixes the angle and light direction (two styles a family); phase is a translation, not a style
DISENTANGLEMENT_FACTORS = ("band", "frequency_jitter", "light_jitter", "hue_jitter", "gain")


def _in_batches(fn, *tensors: torch.Tensor, size: int = 64) -> torch.Tensor:
    return torch.cat([fn(*(t[i : i + size] for t in tensors)) for i in range(0, len(tensors[0]), size)])


def _inputs_from_other_domains(domains: np.ndarray, target: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `count` rows of every domain but `target`, as evenly spread over the source domains as they allow."""
    sources = [rng.permutation(np.flatnonzero(domains == u)) for u in np.unique(domains) if u != target]
    picked, k = [], 0
    while len(picked) < count and any(k < len(rows) for rows in sources):
        picked += [int(rows[k]) for rows in sources if k < len(rows)]
        k += 1
    return np.array(picked[:count], np.int64)


@torch.no_grad()
def translation_protocol(nets: dict, store, images, real_train, lp, inception, fid_cfg: FIDConfig, data_key: dict,
                         num_inputs: int, num_styles: int, seed: int) -> list[dict[str, Any]]:
    """StarGAN v2's evaluation, per target domain u and mode (latent: flow samples of u; reference: styles
    E_u of random held-out images of u): `num_inputs` held-out images of the other domains, each translated
    with `num_styles` styles. Each row: LPIPS diversity (mean over inputs of the mean pairwise LPIPS of its
    outputs) and, with the FID Inception, FID and KID of all outputs against u's training images, beside the
    floor of u's held-out images against the same training images."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    g, e, f = nets["generator"], nets["style_encoder"], nets["flow"]
    rows = []
    for u, name in enumerate(images.names):
        src = _inputs_from_other_domains(images.domains, u, num_inputs, rng)
        x = store.batch(src)
        target = torch.full((len(x) * num_styles,), u, dtype=torch.long)
        own = images.rows_of(u)
        refs = store.batch(rng.choice(own, len(x) * num_styles, replace=len(own) < len(x) * num_styles))
        styles = {"latent": f(torch.randn(len(x) * num_styles, _style_dim(nets), generator=gen), target),
                  "reference": _in_batches(e, refs, target)}
        real = real_features_cached(inception, fid_cfg, {**data_key, "domain": name},
                                    lambda: real_train(u)) if inception is not None else None
        floor = realism(real, inception(store.batch(own)), fid_cfg, seed) if real is not None else None
        for mode, s in styles.items():
            out = _in_batches(g, x.repeat_interleave(num_styles, 0), s).reshape(len(x), num_styles, *x.shape[1:])
            row = {"domain": name, "mode": mode, "inputs": int(len(x)), "styles": num_styles,
                   "diversity": diversity(lp, out)}
            if real is not None:
                row.update(realism(real, inception(out.reshape(-1, *x.shape[1:])), fid_cfg, seed))
                row.update({"fid_floor": floor["fid"], "kid_floor": floor["kid"], "real_images": int(len(own))})
            rows.append(row)
    return rows


def protocol_summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Means over target domains: diversity_{latent,reference}, fid_/kid_{latent,reference,floor}."""
    out: dict[str, float] = {}
    for mode in ("latent", "reference"):
        mine = [r for r in rows if r["mode"] == mode]
        out[f"diversity_{mode}"] = float(np.mean([r["diversity"] for r in mine]))
        for key in ("fid", "kid"):
            if all(key in r for r in mine):
                out[f"{key}_{mode}"] = float(np.mean([r[key] for r in mine]))
    for key in ("fid", "kid"):  # one floor a domain: the latent rows carry it as the reference rows do
        if rows and all(f"{key}_floor" in r for r in rows):
            out[f"{key}_floor"] = float(np.mean([r[f"{key}_floor"] for r in rows if r["mode"] == "latent"]))
    return out


@torch.no_grad()
def evaluate_multidomain(nets: dict, data, split: str, output: str, num_inputs: int = 32, num_styles: int = 8,
                         seed: int = 0, lpips_cfg=None, fid_cfg: FIDConfig | None = None,
                         unification_codes: int = 1000) -> dict[str, Any]:
    """All of the above on a split (held-out images); writes metrics.json, latent_guided.png,
    reference_guided.png under `output`:
    * `protocol` (`translation_protocol`) and its means; `diversity_per_domain`: latent-guided diversity;
    * `unification_accuracy`: reference styles of up to `unification_codes` held-out images against as many
      flow samples of the same domains;
    * smoothness along reference-style interpolations (`interpolation_smoothness`);
    * `dci`: the reference styles' DCI scores against the images' generating factors, when the set records
      them (the synthetic set: `DISENTANGLEMENT_FACTORS`, within each domain)."""
    started = time.perf_counter()
    storage.check_writable(output, "eval output")
    images = list_domain_split(data, split)
    store = domain_store(images, data, 0)
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(images.paths))
    num_domains = len(images.names)
    lp = load_lpips(lpips_cfg or LPIPSConfig())
    fid_cfg = fid_cfg or FIDConfig()
    inception = inception_or_none(fid_cfg)
    gen = torch.Generator().manual_seed(seed)
    style_dim = _style_dim(nets)
    m: dict[str, Any] = {"domains": images.names, "images": len(rows), "lpips_weights": lp.weight_source,
                         "fid_weights": inception.source.label() if inception is not None else "none: not computed"}

    train_images = list_domain_split(data, "train")
    train_store = domain_store(train_images, data, 0)
    data_key = {"root": data.root or data.synthetic_dir, "split": "train", "image_size": data.image_size}
    m["protocol"] = translation_protocol(
        nets, store, images, lambda u: train_store.batch(train_images.rows_of(u)), lp, inception, fid_cfg,
        data_key, num_inputs, num_styles, seed)
    m.update(protocol_summary(m["protocol"]))
    m["diversity_per_domain"] = {r["domain"]: r["diversity"] for r in m["protocol"] if r["mode"] == "latent"}

    # unification: latent vs reference styles of the same domains
    coded = rows[:unification_codes]
    x_coded, y_coded = store.batch(coded), torch.as_tensor(images.domains[coded])
    s_ref = _in_batches(nets["style_encoder"], x_coded, y_coded)
    s_lat = nets["flow"](torch.randn(len(y_coded), style_dim, generator=gen), y_coded)
    m["unification_accuracy"] = unification_accuracy(s_lat, s_ref, y_coded, seed)
    m["unification_codes"] = int(len(coded))

    # disentanglement of the reference styles against the set's generating factors
    if all(name in images.factors for name in DISENTANGLEMENT_FACTORS):
        if np.bincount(y_coded.numpy()).max() >= DCI_MIN_CODES:
            factors = {k: v[coded] for k, v in images.factors.items()}
            m["dci"] = dci_within_domains(s_ref.numpy(), y_coded.numpy(), factors, DISENTANGLEMENT_FACTORS, seed)
            m["dci_factors"] = list(DISENTANGLEMENT_FACTORS)
        else:
            m["dci"] = f"not computed: fewer than {DCI_MIN_CODES} held-out images in every domain"

    # smoothness: interpolate between two reference styles of the same domain, for each input
    x, y_x = x_coded[:num_inputs], y_coded[:num_inputs]
    pairs = [(int(rng.choice(images.rows_of(u))), int(rng.choice(images.rows_of(u)))) for u in y_x.tolist()]
    s0 = nets["style_encoder"](store.batch([p[0] for p in pairs]), y_x)
    s1 = nets["style_encoder"](store.batch([p[1] for p in pairs]), y_x)
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
