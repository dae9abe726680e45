"""The paper's evaluation of one generator checkpoint (docs/method.md §9): numbers, pictures, a table row.

`evaluate(cfg)` takes any stage-2/3 checkpoint (local or s3://) and, on the validation split:
* reconstruction: B̂ = G(A, E(B)) against B, PSNR and LPIPS; and the same with B' of another style
  (another style id on the synthetic set, another image otherwise): the style code must matter;
* diversity: `num_inputs` inputs × `num_styles` styles, mean pairwise LPIPS of each input's outputs,
  with styles from random references, from mapper samples (when a mapper is given), and — the
  baseline — one fixed code for all (a deterministic G gives 0 there);
* mapper coverage (synthetic set): the style id of the val code nearest to each mapper sample, and of
  E(G(A, M(r))), and how many style ids are reached;
* pictures: transfer.png (inputs × references), sampling.png, interpolation.png, embedding.png.
Writes metrics.json (with the VGG and AlexNet weights used) and table_row.md under `output`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from step_ray import storage
from step_ray.checkpoints import load_checkpoint, local_checkpoint_dir, read_record, recipe_section
from step_ray.config import config_from_dict, config_to_dict
from step_ray.data.pix2pix import DataConfig, load_split, to_tensor
from step_ray.eval.embedding import plot_embedding, save_png
from step_ray.eval.fid import FIDConfig, inception_or_none, real_features_cached, realism
from step_ray.eval.metrics import (LPIPSConfig, diverse_rows, diversity, load_lpips, lpips_distance, other_style_rows,
                                   psnr)
from step_ray.eval.pictures import generate, interpolation_grid, sampling_grid, transfer_grid
from step_ray.models import GeneratorConfig, MapperConfig, StyleMapper, UNetGenerator
from step_ray.style.encode import load_encoder
from step_ray.style.vgg import VGGConfig, vgg_weight_source

TABLE_HEADER = ("| method | PSNR ↑ | LPIPS ↓ | PSNR other style | diversity refs ↑ | diversity mapper ↑ "
                "| diversity fixed z | mapper styles reached | FID refs ↓ | FID mapper ↓ | KID×10³ refs ↓ "
                "| FID real floor | LPIPS trunk |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


@dataclass(frozen=True)
class EvalConfig:
    checkpoint: str = ""  # a stage-2 or stage-3 checkpoint folder, local or s3://
    mapper: str = ""  # a mapper folder (step_ray.pipelines.mapper.save_mapper); empty: <run folder>/mapper if present
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "val"
    num_inputs: int = 100
    num_styles: int = 16
    max_recon_images: int = 0  # 0: the whole split
    use_ema: bool = True  # G_ema's weights (the official choice) when the checkpoint has them
    lpips: LPIPSConfig = field(default_factory=LPIPSConfig)
    fid: FIDConfig = field(default_factory=FIDConfig)  # FID/KID against the split's real photos (when found)
    output: str = ""  # empty: <checkpoint>/eval
    method: str = ""  # the table row's label; empty: the variant preset the checkpoint was trained from
    grid_inputs: int = 6
    grid_references: int = 6
    interpolation_steps: int = 8
    mapper_samples: int = 2000  # codes drawn for the coverage numbers
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self):
        if self.num_styles < 2 or self.num_inputs < 1:
            raise ValueError("eval needs num_styles >= 2 and num_inputs >= 1")
        if self.interpolation_steps < 2:
            raise ValueError("interpolation_steps must be >= 2")


def load_mapper(uri: str) -> StyleMapper:
    """The IMLE mapper saved by step_ray.pipelines.mapper.save_mapper (local or s3://), in eval mode."""
    folder, tmp = local_checkpoint_dir(uri)
    try:
        mapper = StyleMapper(recipe_section(read_record(folder), "mapper", MapperConfig))
        load_checkpoint(folder, {"mapper": mapper})
    finally:
        if tmp is not None:
            tmp.cleanup()
    return mapper.eval()


def load_generator(checkpoint: str, use_ema: bool = True,
                   device: str | torch.device = "cpu") -> tuple[UNetGenerator, dict]:
    """G (EMA weights when asked and present) of a generator checkpoint, and its recipe settings (a mapping)."""
    folder, tmp = local_checkpoint_dir(checkpoint)
    try:
        tree = dict(read_record(folder)["recipe"])
        if "generator" not in tree:
            raise ValueError(f"{checkpoint} is not a generator checkpoint (its recipe has no 'generator')")
        g = UNetGenerator(config_from_dict(GeneratorConfig, tree["generator"], where="generator"))
        name = "generator_ema" if use_ema and (Path(folder) / "generator_ema.pt").is_file() else "generator"
        g.load_state_dict(torch.load(Path(folder) / f"{name}.pt", map_location="cpu", weights_only=True))
        tree["_weights"] = name
    finally:
        if tmp is not None:
            tmp.cleanup()
    return g.to(device).eval().requires_grad_(False), tree


def _default_mapper(checkpoint: str) -> str:
    run_folder = checkpoint.rstrip("/").rsplit("/", 1)[0]
    uri = storage.join(run_folder, "mapper")
    return uri if storage.exists(storage.join(uri, "mapper.pt")) else ""


@dataclass
class _EvalInputs:
    """What one evaluation works on: the models, the split's images and their codes."""

    g: UNetGenerator
    tree: dict
    e: torch.nn.Module
    mapper: StyleMapper | None
    mapper_uri: str
    lp: Any
    a: torch.Tensor
    b: torch.Tensor
    labels: np.ndarray
    z: torch.Tensor


def _eval_inputs(cfg: EvalConfig) -> _EvalInputs:
    g, tree = load_generator(cfg.checkpoint, cfg.use_ema)
    e = load_encoder(cfg.checkpoint)
    mapper_uri = cfg.mapper or _default_mapper(cfg.checkpoint)
    mapper = load_mapper(mapper_uri) if mapper_uri else None
    lp = load_lpips(cfg.lpips)
    split = load_split(cfg.data, cfg.split)
    n_all = len(split.ids) if not cfg.max_recon_images else min(cfg.max_recon_images, len(split.ids))
    a, b = to_tensor(split.a[:n_all]), to_tensor(split.b[:n_all])
    bs = cfg.batch_size
    with torch.no_grad():
        z = torch.cat([e(b[i : i + bs]) for i in range(0, n_all, bs)])
    if not torch.isfinite(z).all():
        raise FloatingPointError(f"{cfg.checkpoint}: the encoder gives non-finite style codes (training diverged); "
                                 "nothing to evaluate")
    return _EvalInputs(g, tree, e, mapper, mapper_uri, lp, a, b, split.style_ids[:n_all], z)


def _reconstruction(x: _EvalInputs, cfg: EvalConfig) -> tuple[dict[str, Any], torch.Tensor]:
    """PSNR/LPIPS of G(A, E(B)) against B, and with another style's code (the margin shows E's code is
    used); and the reconstructions."""
    other = torch.from_numpy(other_style_rows(x.labels, cfg.seed))
    recon = generate(x.g, x.a, x.z, cfg.batch_size)
    cross = generate(x.g, x.a, x.z[other], cfg.batch_size)
    m: dict[str, Any] = {
        "psnr": float(psnr(recon, x.b).mean()),
        "lpips": float(lpips_distance(x.lp, recon, x.b, cfg.lpips.batch_size).mean()),
        "psnr_other_style": float(psnr(cross, x.b).mean()),
        "lpips_other_style": float(lpips_distance(x.lp, cross, x.b, cfg.lpips.batch_size).mean()),
        "recon_images": len(x.a),
    }
    m["psnr_margin"] = m["psnr"] - m["psnr_other_style"]
    return m, recon


def _diversity(x: _EvalInputs, cfg: EvalConfig, gen: torch.Generator):
    """num_inputs × num_styles outputs per kind of code (references, their mean, mapper samples): the
    LPIPS diversity of each, the mapper's coverage on labelled data; and the reference-guided and the
    mapper's outputs [n_in, S, C, H, W] (None without a mapper)."""
    n_all, n_in, a = len(x.a), min(cfg.num_inputs, len(x.a)), x.a
    refs = torch.stack([torch.randperm(n_all, generator=gen)[: cfg.num_styles] for _ in range(n_in)])  # [n_in, S]
    if refs.shape[1] < cfg.num_styles:
        raise ValueError(f"eval.num_styles={cfg.num_styles} needs that many {cfg.split} images; found {n_all}")

    def outputs_for(codes: torch.Tensor) -> torch.Tensor:  # codes [n_in, S, nz] -> images [n_in, S, C, H, W]
        rep = a[:n_in, None].expand(-1, cfg.num_styles, -1, -1, -1).reshape(-1, *a.shape[1:])
        return generate(x.g, rep, codes.reshape(-1, codes.shape[-1]),
                        cfg.batch_size).view(n_in, cfg.num_styles, *a.shape[1:])

    out_refs = outputs_for(x.z[refs])
    m: dict[str, Any] = {"diversity_refs": diversity(x.lp, out_refs),
                         "diversity_fixed_code": diversity(x.lp,
                                                           outputs_for(x.z.mean(0).expand(n_in, cfg.num_styles, -1))),
                         "diversity_inputs": n_in, "diversity_styles": cfg.num_styles}
    out_mapper = None
    if x.mapper is not None:
        with torch.no_grad():
            samples = x.mapper(torch.randn(n_in * cfg.num_styles, x.mapper.cfg.noise_dim, generator=gen))
        out_mapper = outputs_for(samples.view(n_in, cfg.num_styles, -1))
        m["diversity_mapper"] = diversity(x.lp, out_mapper)
        if (x.labels >= 0).all():
            m.update(_mapper_coverage(x.mapper, x.g, x.e, x.a, x.z, x.labels, cfg, gen))
    return m, out_refs, out_mapper


def _realism(x: _EvalInputs, cfg: EvalConfig, outputs: dict[str, torch.Tensor | None]) -> dict[str, Any]:
    """FID and KID of each kind of output (`outputs`: name -> images) against the split's real photos,
    beside the real-vs-real floor (the training photos against them); {} without an FID Inception."""
    inception = inception_or_none(cfg.fid)
    if inception is None:
        return {"fid_inception": "none: FID/KID not computed"}
    root = cfg.data.prepare()
    key = {"root": root, "direction": cfg.data.direction, "image_size": cfg.data.image_size,
           "min_side": cfg.data.min_side}
    real = real_features_cached(inception, cfg.fid, {**key, "split": cfg.split, "images": len(x.b)}, lambda: x.b)
    train = real_features_cached(inception, cfg.fid, {**key, "split": "train"},
                                 lambda: to_tensor(load_split(cfg.data, "train", root=root).b))
    m: dict[str, Any] = {"fid_inception": inception.source.label()}
    for name, images in {"real_floor": None, **outputs}.items():
        if name != "real_floor" and images is None:
            continue
        feats = train if name == "real_floor" else inception(images.reshape(-1, *images.shape[-3:]))
        scores = realism(real, feats, cfg.fid, cfg.seed)
        m.update({f"fid_{name}": scores["fid"], f"kid_{name}": scores["kid"], f"kid_{name}_std": scores["kid_std"],
                  f"fid_{name}_images": scores["images"]})
    m["fid_real_images"] = int(len(real))
    return m


def _pictures(x: _EvalInputs, cfg: EvalConfig, out_dir: str, out_mapper: torch.Tensor | None) -> dict[str, str]:
    """transfer.png, interpolation.png, sampling.png (with a mapper) and embedding.png in `out_dir`."""
    tag = lambda name: storage.join(out_dir, name)  # noqa: E731
    a, b, z, bs, n_all = x.a, x.b, x.z, cfg.batch_size, len(x.a)
    labelled = bool((x.labels >= 0).all())
    pictures = {}
    k, r = min(cfg.grid_inputs, n_all), min(cfg.grid_references, n_all)
    ref_rows = diverse_rows(x.labels, r, cfg.seed)
    save_png(tag("transfer.png"), transfer_grid(a[:k], b[ref_rows], outputs_for_grid(x.g, a[:k], z[ref_rows], bs)))
    pictures["transfer"] = tag("transfer.png")
    t = torch.linspace(0, 1, cfg.interpolation_steps)
    z0, z1 = z[ref_rows[0]], z[ref_rows[-1]]
    path = (1 - t)[:, None] * z0 + t[:, None] * z1
    save_png(tag("interpolation.png"),
             interpolation_grid(a[:k], outputs_for_grid(x.g, a[:k], path, bs), b[ref_rows[0]], b[ref_rows[-1]]))
    pictures["interpolation"] = tag("interpolation.png")
    if out_mapper is not None:
        save_png(tag("sampling.png"), sampling_grid(a[:k], out_mapper[:k, : cfg.grid_references]))
        pictures["sampling"] = tag("sampling.png")
    if len(z) >= 3:
        plot_labels = x.labels if labelled else np.zeros(len(z), np.int64)
        plot_embedding(z.numpy(), plot_labels, tag("embedding.png"),
                       f"E(B) of {len(z)} {cfg.split} images ({'style id' if labelled else 'unlabelled'})")
        pictures["embedding"] = tag("embedding.png")
    return pictures


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """The paper's evaluation of `cfg.checkpoint`: metrics.json, table_row.md and the pictures in `cfg.output`
    (default <checkpoint>/eval); returns the record written to metrics.json, with the row and the folder."""
    if not cfg.checkpoint:
        raise ValueError("eval: set checkpoint (a stage-2/3 checkpoint folder, local or s3://)")
    started = time.perf_counter()
    out_dir = cfg.output or storage.join(cfg.checkpoint, "eval")
    storage.check_writable(out_dir, "eval.output")
    x = _eval_inputs(cfg)
    m, recon = _reconstruction(x, cfg)
    spread, out_refs, out_mapper = _diversity(x, cfg, torch.Generator().manual_seed(cfg.seed))
    m.update(spread)
    m.update(_realism(x, cfg, {"recon": recon, "refs": out_refs, "mapper": out_mapper}))
    pictures = _pictures(x, cfg, out_dir, out_mapper)

    train_tree = {k: v for k, v in x.tree.items() if k != "_weights"}
    vgg_cfg = config_from_dict(VGGConfig, train_tree.get("vgg", {}), where="vgg")
    label = cfg.method or train_tree.get("variant") or "generator (no variant preset)"
    record = {
        "method": label,
        "checkpoint": cfg.checkpoint,
        "generator_weights": x.tree["_weights"],
        "mapper": x.mapper_uri or None,
        "metrics": m,
        "lpips_weights": x.lp.weight_source,
        "lpips_linear_layers": x.lp.lin_source,
        "vgg_weights": vgg_weight_source(vgg_cfg) if train_tree.get("lambda_vgg", 0) else "no VGG loss",
        "pictures": pictures,
        "seconds": time.perf_counter() - started,
        "eval_config": config_to_dict(cfg),
        "train_config": train_tree,
    }
    row = table_row(label, m, x.lp.weight_source)
    storage.write_bytes(storage.join(out_dir, "metrics.json"), json.dumps(record, indent=1, default=float).encode())
    storage.write_bytes(storage.join(out_dir, "table_row.md"), f"{TABLE_HEADER}\n{row}\n".encode())
    record["table_row"] = row
    record["output"] = out_dir
    return record


def outputs_for_grid(g, a: torch.Tensor, codes: torch.Tensor, bs: int) -> torch.Tensor:
    """[n inputs] × [m codes] -> [n, m, C, H, W]."""
    n, mm = len(a), len(codes)
    rep_a = a[:, None].expand(-1, mm, -1, -1, -1).reshape(-1, *a.shape[1:])
    rep_z = codes[None].expand(n, -1, -1).reshape(-1, codes.shape[-1])

    return generate(g, rep_a, rep_z, bs).view(n, mm, *a.shape[1:])


@torch.no_grad()
def _mapper_coverage(mapper, g, e, a, z, labels, cfg: EvalConfig, gen) -> dict[str, Any]:
    """Which style clusters the mapper's samples land in: by the nearest val code, in code space and
    after a round trip through the images (E(G(A, M(r))))."""
    n_styles = int(labels.max()) + 1
    samples = mapper(torch.randn(cfg.mapper_samples, mapper.cfg.noise_dim, generator=gen))
    nearest = torch.cdist(samples, z).argmin(1).numpy()
    hist = np.bincount(labels[nearest], minlength=n_styles)
    k = min(len(samples), 256)
    rows = torch.randint(0, len(a), (k,), generator=gen)

    images = generate(g, a[rows], samples[:k], cfg.batch_size)
    z_img = torch.cat([e(images[i : i + 64]) for i in range(0, k, 64)])
    hist_img = np.bincount(labels[torch.cdist(z_img, z).argmin(1).numpy()], minlength=n_styles)
    # how far samples fall from the data, relative to how far codes are from their own nearest neighbour
    d_codes = torch.cdist(z, z).fill_diagonal_(float("inf")).min(1).values.mean()
    return {
        "mapper_style_histogram": hist.tolist(),
        "mapper_styles_reached": int((hist > 0).sum()),
        "mapper_styles_reached_images": int((hist_img > 0).sum()),
        "mapper_style_histogram_images": hist_img.tolist(),
        "num_style_ids": n_styles,
        "mapper_sample_to_data_distance": float(torch.cdist(samples, z).min(1).values.mean()),
        "data_nn_distance": float(d_codes),
    }


def table_row(method: str, m: dict[str, Any], lpips_source: str) -> str:
    f = lambda key, fmt="{:.3f}": fmt.format(m[key]) if key in m else "–"  # noqa: E731
    reached = f"{m['mapper_styles_reached']}/{m['num_style_ids']}" if "mapper_styles_reached" in m else "–"
    trunk = "random AlexNet" if lpips_source.startswith("RANDOM") else "AlexNet"
    kid = (f"{1e3 * m['kid_refs']:.1f} ± {1e3 * m['kid_refs_std']:.1f}" if "kid_refs" in m else "–")
    return (f"| {method} | {f('psnr', '{:.2f}')} | {f('lpips')} | {f('psnr_other_style', '{:.2f}')} "
            f"| {f('diversity_refs')} | {f('diversity_mapper')} | {f('diversity_fixed_code')} | {reached} "
            f"| {f('fid_refs', '{:.1f}')} | {f('fid_mapper', '{:.1f}')} | {kid} | {f('fid_real_floor', '{:.1f}')} "
            f"| {trunk} |")


__all__ = ["EvalConfig", "evaluate", "load_generator", "table_row"]
