"""Evaluation of a MUNIT model (two generators, domains A and B) with the paper's protocol (docs/method.md §9).

A→B translation of x_a with style s is ``gen_b.decode(gen_a.encode(x_a)[0], s)``. On the validation split:
* "psnr", "lpips": A→B with the true B's style code, ``gen_b.encode(b)[1]``, against b (paired data only);
* "psnr_random_style": the same with one N(0, I) style per image; the gap to "psnr" says whether the style
  code carries the target's style;
* "diversity_refs" / "diversity_random": `num_inputs` inputs × `num_styles` styles (from B references
  through gen_b's style encoder, or from MUNIT's N(0, I) prior), mean pairwise LPIPS per input;
* "recon_psnr_a", "recon_psnr_b": each domain's own auto-encoding, decode(encode(x)).
Pictures: transfer.png (inputs × B references) and sampling.png (inputs × prior samples).

Everything random (styles, reference choices) comes from one ``torch.Generator(seed)`` drawn in a fixed
order before any network runs, so the numbers do not depend on `batch_size` or on the device.
Work is done in batches and the outputs are reduced batch by batch: a 256 px content map is 4 MB per
image, so holding a whole split's codes or 1,600 diversity outputs at once would cost gigabytes.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from step_ray import storage
from step_ray.checkpoints import load_saved_modules, recipe_section
from step_ray.data.pix2pix import load_split, to_tensor
from step_ray.eval.embedding import save_png
from step_ray.eval.metrics import LPIPSConfig, diverse_rows, diversity, load_lpips, lpips_distance, psnr
from step_ray.eval.pictures import sampling_grid, transfer_grid
from step_ray.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from step_ray.models.munit import MUNITConfig, MUNITGenerator

PAIRED_KEYS = ("psnr", "lpips", "psnr_random_style")


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    return (slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size))


@torch.no_grad()
def _translate(gen_a, gen_b, a: Tensor, styles: Tensor) -> Tensor:
    """A→B of `a` with `styles` (row by row), each half on its generator's device; images back on the CPU."""
    content = gen_a.encode(a.to(_device(gen_a)))[0]
    return gen_b.decode(content.to(_device(gen_b)), styles.to(_device(gen_b))).float().cpu()


@torch.no_grad()
def _style_codes(gen, x: Tensor, batch_size: int) -> Tensor:
    """gen's style code of every row of x, [N, style_dim] on the CPU."""
    return torch.cat([gen.encode(x[s].to(_device(gen)))[1].float().cpu() for s in _batches(len(x), batch_size)])


@torch.no_grad()
def _recon_psnr(gen, x: Tensor, batch_size: int) -> float:
    """Mean PSNR of decode(encode(x)) against x: the within-domain auto-encoder."""
    out = []
    for s in _batches(len(x), batch_size):
        xi = x[s].to(_device(gen))
        out.append(psnr(gen.decode(*gen.encode(xi)).float().cpu(), x[s]))
    return float(torch.cat(out).mean())


@torch.no_grad()
def _diversity(gen_a, gen_b, a: Tensor, styles: Tensor, lpips_model, batch_size: int) -> float:
    """`diversity` of A→B outputs for inputs a [n] × styles [n, S, style_dim], reduced chunk by chunk."""
    n, s = styles.shape[:2]
    per_chunk = max(1, batch_size // s)  # whole inputs per chunk, about batch_size decodes each
    total = 0.0
    for rows in _batches(n, per_chunk):
        k = rows.stop - rows.start
        rep = a[rows, None].expand(-1, s, -1, -1, -1).reshape(k * s, *a.shape[1:])
        outs = _translate(gen_a, gen_b, rep, styles[rows].reshape(k * s, -1)).view(k, s, *a.shape[1:])
        total += diversity(lpips_model, outs) * k  # diversity is a mean over inputs: weight by chunk size
    return total / n


@torch.no_grad()
def evaluate_munit_models(gen_a, gen_b, a: Tensor, b: Tensor, lpips_model, *, num_inputs: int = 100,
                          num_styles: int = 16, seed: int = 0, batch_size: int = 32,
                          paired: bool = True) -> dict[str, float]:
    """docs/method.md §9's numbers for a MUNIT model on val images a (domain A) and b (domain B), [-1, 1] NCHW;
    a[i] and b[i] are a pair when `paired` (otherwise the paired-only keys, `PAIRED_KEYS`, are left out).
    MUNIT has no batch norm or dropout, so the generators' train/eval mode does not change the numbers."""
    if num_styles < 2 or num_inputs < 1:
        raise ValueError(f"MUNIT eval needs num_styles >= 2 and num_inputs >= 1, got {num_styles}, {num_inputs}")
    if num_styles > len(b):
        raise ValueError(f"num_styles={num_styles} reference styles need that many B images; found {len(b)}")
    if paired and len(a) != len(b):
        raise ValueError(f"paired evaluation needs as many A as B images, got {len(a)} and {len(b)}")
    style_dim = gen_b.cfg.style_dim
    n_in = min(num_inputs, len(a))
    # All random draws first, in a fixed order: reproducible whatever the batch size.
    gen = torch.Generator().manual_seed(seed)
    random_style = torch.randn(len(a), style_dim, generator=gen)
    ref_rows = torch.stack([torch.randperm(len(b), generator=gen)[:num_styles] for _ in range(n_in)])
    prior_styles = torch.randn(n_in, num_styles, style_dim, generator=gen)

    s_b = _style_codes(gen_b, b, batch_size)
    m: dict[str, float] = {}
    if paired:
        p_true, d_true, p_rand = [], [], []
        for s in _batches(len(a), batch_size):
            out = _translate(gen_a, gen_b, a[s], s_b[s])
            p_true.append(psnr(out, b[s]))
            d_true.append(lpips_distance(lpips_model, out, b[s], batch_size))
            p_rand.append(psnr(_translate(gen_a, gen_b, a[s], random_style[s]), b[s]))
        m["psnr"] = float(torch.cat(p_true).mean())
        m["lpips"] = float(torch.cat(d_true).mean())
        m["psnr_random_style"] = float(torch.cat(p_rand).mean())
    m["diversity_refs"] = _diversity(gen_a, gen_b, a[:n_in], s_b[ref_rows], lpips_model, batch_size)
    m["diversity_random"] = _diversity(gen_a, gen_b, a[:n_in], prior_styles, lpips_model, batch_size)
    m["recon_psnr_a"] = _recon_psnr(gen_a, a, batch_size)
    m["recon_psnr_b"] = _recon_psnr(gen_b, b, batch_size)
    return m


@torch.no_grad()
def _grid_outputs(gen_a, gen_b, a: Tensor, styles: Tensor) -> Tensor:
    """Every input × every style: [n, m, C, H, W] (grids are small: one batch)."""
    n, m = len(a), len(styles)
    rep = a[:, None].expand(-1, m, -1, -1, -1).reshape(n * m, *a.shape[1:])
    return _translate(gen_a, gen_b, rep, styles[None].expand(n, -1, -1).reshape(n * m, -1)).view(n, m, *a.shape[1:])


@torch.no_grad()
def munit_pictures(gen_a, gen_b, a: Tensor, b: Tensor, *, inputs: int = 6, references: int = 6, samples: int = 6,
                   seed: int = 0, labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """uint8 HWC grids: "transfer" (the first `inputs` A images × `references` B images, content of a_i
    with the style of b_j) and "sampling" (the same inputs × `samples` N(0, I) styles, one set for all rows
    so columns compare). References: one per style id first when `labels` (style ids, -1 unknown) are given,
    else spread evenly over b."""
    k, r = min(inputs, len(a)), min(references, len(b))
    rows = diverse_rows(labels if labels is not None else np.full(len(b), -1), r, seed)
    refs = b[torch.as_tensor(rows)]
    transfer = _grid_outputs(gen_a, gen_b, a[:k], _style_codes(gen_b, refs, len(refs)))
    z = torch.randn(samples, gen_b.cfg.style_dim, generator=torch.Generator().manual_seed(seed))
    return {"transfer": transfer_grid(a[:k], refs, transfer),
            "sampling": sampling_grid(a[:k], _grid_outputs(gen_a, gen_b, a[:k], z))}


def evaluate_munit(gen_a, gen_b, data_cfg, split: str, output_uri: str, lpips_cfg: LPIPSConfig = LPIPSConfig(), *,
                   grid_inputs: int = 6, grid_references: int = 6, grid_samples: int = 6,
                   **kw: Any) -> dict[str, Any]:
    """Load `split` of `data_cfg` (a `DataConfig`), compute `evaluate_munit_models` (`kw`: its keyword
    arguments) and `munit_pictures`, and write metrics.json, transfer.png and sampling.png under
    `output_uri` (local or s3://). Returns {"metrics", "pictures": {name: uri}, "output"}."""
    started = time.perf_counter()
    storage.check_writable(output_uri, "munit eval output")  # fail before the work, not after
    images = load_split(data_cfg, split)
    a, b = to_tensor(images.a), to_tensor(images.b)
    lp = load_lpips(lpips_cfg, _device(gen_b))
    metrics = evaluate_munit_models(gen_a, gen_b, a, b, lp, **kw)
    grids = munit_pictures(gen_a, gen_b, a, b, inputs=grid_inputs, references=grid_references, samples=grid_samples,
                           seed=kw.get("seed", 0), labels=images.style_ids)
    pictures = {}
    for name, grid in grids.items():
        pictures[name] = storage.join(output_uri, f"{name}.png")
        save_png(pictures[name], grid)
    counts = {"images": len(a), "bad_images_skipped": len(images.errors),
              "diversity_inputs": min(kw.get("num_inputs", 100), len(a)), "diversity_styles": kw.get("num_styles", 16)}
    record = {"method": "MUNIT", "split": split, "data_root": data_cfg.resolved_root(), "metrics": metrics,
              "lpips_weights": lp.weight_source, "lpips_linear_layers": lp.lin_source, "counts": counts,
              "paired": kw.get("paired", True), "seed": kw.get("seed", 0), "pictures": pictures,
              "seconds": time.perf_counter() - started}
    storage.write_bytes(storage.join(output_uri, "metrics.json"), json.dumps(record, indent=1).encode())
    return {"metrics": metrics, "pictures": pictures, "output": output_uri}


__all__ = ["PAIRED_KEYS", "evaluate_munit", "evaluate_munit_models", "munit_pictures"]


def load_munit(checkpoint: str, device: str | torch.device = "cpu") -> dict[str, torch.nn.Module]:
    """gen_a, gen_b, dis_a, dis_b of a MUNIT checkpoint (local or s3://), in eval mode, built from the
    model settings its config.yaml records."""
    def build(record):
        model = recipe_section(record, "model", MUNITConfig)
        disc = recipe_section(record, "discriminator", DiscriminatorConfig)
        return {"gen_a": MUNITGenerator(model), "gen_b": MUNITGenerator(model),
                "dis_a": PatchDiscriminator(disc), "dis_b": PatchDiscriminator(disc)}

    return {k: v.to(device) for k, v in load_saved_modules(checkpoint, build).items()}
