"""A deterministic synthetic style dataset with known style ids, in the pix2pix layout.

A is a content map (black region edges on white, as in edges2shoes); B renders the same regions in one of
K styles. The style id of every image goes to `manifest.parquet`: the ground truth for "does E cluster
by style?". Style family (the texture kind) is recorded too; it serves as the domain for multi-domain
models. Two designs (`SyntheticConfig.design`):

* `shared_palette` (the default): a set stage 1 has to learn. Every style paints its regions from one
  shared palette (which colour lands where, and so an image's mean colour, depends on the random layout,
  not the style); a style is a texture kind (stripes, checks, dots, blotches: k mod 4), a frequency band
  (coarse 2.5-3.5 or fine 7-8.5 cycles per side: (k div 4) mod 2), an angle, and a lighting gradient
  (direction, strength). Textures are normalised to zero mean and unit RMS per image, so kinds differ in
  pattern, not in brightness or contrast; each image jitters hue, brightness (±15 %), texture phase and
  frequency, and light strength. An untrained (random-init) StyleEncoder's codes do not tell these
  styles apart (val k-NN style accuracy 0.31-0.43 over seeds 0-5, 8 styles, 800 train / 160 val, chance
  0.125), while the exact VGG-16 Gram descriptors do (1.000), and `jobs/pretrain.py` lifts E to
  0.97-1.00 in 12 epochs (`experiments/synthetic_difficulty.py`, tests/test_data.py).
* `hue` (the earlier default): each style has its own palette (hue family) as well as its own
  texture, lighting and noise. A random conv net sees hue at once (untrained k-NN 0.95-0.99), so this set
  tests plumbing, not learning. Kept byte-identical for the numbers measured on it.
"""
from __future__ import annotations

import colorsys
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from step_ray.config import load_config

TEXTURES = ("stripes", "checks", "dots", "blotches")
DESIGNS = ("shared_palette", "hue")
MANIFEST = "manifest.parquet"


@dataclass(frozen=True)
class SyntheticConfig:
    """What `generate_synthetic` renders."""

    num_styles: int = 8
    num_train: int = 800
    num_val: int = 160
    image_size: int = 32  # side of each half; files are (2·size) × size (small: the 2-core demo runs in minutes)
    seed: int = 0
    design: Literal["shared_palette", "hue"] = "shared_palette"  # which style family (module docstring)

    def __post_init__(self):
        if self.num_styles < 1:
            raise ValueError(f"num_styles must be >= 1, got {self.num_styles}")
        if self.num_train < 1 or self.num_val < 0:
            raise ValueError("num_train must be >= 1 and num_val >= 0")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.design not in DESIGNS:
            raise ValueError(f"design must be one of {', '.join(DESIGNS)}, got {self.design!r}")


@dataclass(frozen=True)
class Style:
    style_id: int
    texture: str
    hues: tuple[float, ...]  # palette as hues in [0, 1)
    saturation: float
    frequency: float  # texture cycles per image side
    angle: float  # radians
    contrast: float  # texture modulation depth
    light_angle: float
    light_strength: float
    noise: float
    gain_jitter: float = 0.0  # per-image brightness gain drawn from 1 ± this (shared_palette design)
    normalise_texture: bool = False  # zero mean, unit RMS per image: kinds differ in pattern, not brightness
    blotch_sharpness: float = 1.5  # tanh gain of the blotch noise (large: crisp-edged blobs)

    @property
    def family(self) -> int:
        return TEXTURES.index(self.texture)


def make_styles(num_styles: int, seed: int = 0, design: str = "shared_palette") -> list[Style]:
    """K styles of `design` (see the module docstring)."""
    if design == "hue":
        return _hue_styles(num_styles, seed)
    if design == "shared_palette":
        return _shared_palette_styles(num_styles, seed)
    raise ValueError(f"design must be one of {', '.join(DESIGNS)}, got {design!r}")


SHARED_HUES = (0.07, 0.13, 0.19, 0.57)  # one palette for every style of the shared_palette design
SHARED_SATURATION = 0.7
FREQUENCY_BANDS = ((2.5, 3.5), (7.0, 8.5))  # cycles per image side: coarse, fine


def _shared_palette_styles(num_styles: int, seed: int) -> list[Style]:
    """K styles that share one palette: kind = k mod 4, frequency band = (k div 4) mod 2, and angle and
    lighting drawn per style."""
    styles = []
    for k in range(num_styles):
        rng = np.random.default_rng([seed, 6113, k])
        lo, hi = FREQUENCY_BANDS[(k // len(TEXTURES)) % len(FREQUENCY_BANDS)]
        styles.append(
            Style(
                style_id=k,
                texture=TEXTURES[k % len(TEXTURES)],
                hues=SHARED_HUES,
                saturation=SHARED_SATURATION,
                frequency=float(rng.uniform(lo, hi)),
                angle=float(rng.uniform(0, np.pi)),
                contrast=0.6,
                light_angle=float(rng.uniform(0, 2 * np.pi)),
                light_strength=float(rng.uniform(0.1, 0.45)),
                noise=0.02,
                gain_jitter=0.15,
                normalise_texture=True,
                blotch_sharpness=4.0,
            )
        )
    return styles


def _hue_styles(num_styles: int, seed: int) -> list[Style]:
    """K styles: textures cycle through the four kinds, hues spread evenly, the rest drawn per style."""
    styles = []
    for k in range(num_styles):
        rng = np.random.default_rng([seed, 7919, k])
        base = (k * 0.381966 + 0.05) % 1.0  # golden-ratio steps keep neighbouring ids far apart in hue
        styles.append(
            Style(
                style_id=k,
                texture=TEXTURES[k % len(TEXTURES)],
                hues=tuple(float((base + d) % 1.0) for d in (0.0, 0.06, 0.12, 0.5)),
                saturation=float(rng.uniform(0.55, 0.9)),
                frequency=float(rng.uniform(3.0, 9.0)),
                angle=float(rng.uniform(0, np.pi)),
                contrast=float(rng.uniform(0.25, 0.45)),
                light_angle=float(rng.uniform(0, 2 * np.pi)),
                light_strength=float(rng.uniform(0.1, 0.4)),
                noise=float(rng.choice([0.0, 0.03, 0.08])),
            )
        )
    return styles


def _layout(rng: np.random.Generator, size: int, max_regions: int = 8) -> np.ndarray:
    """Region labels: a background and a few overlapping rectangles and ellipses."""
    labels = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[0:size, 0:size]
    for r in range(1, int(rng.integers(3, max_regions + 1))):
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        hy, hx = rng.uniform(0.1, 0.35, 2) * size
        if rng.random() < 0.5:
            mask = (np.abs(yy - cy) < hy) & (np.abs(xx - cx) < hx)
        else:
            mask = ((yy - cy) / hy) ** 2 + ((xx - cx) / hx) ** 2 < 1.0
        labels[mask] = r
    return labels


def content_map(labels: np.ndarray) -> np.ndarray:
    """A: black one-pixel edges between regions on white, RGB uint8."""
    edge = np.zeros(labels.shape, bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    img = np.where(edge, 0, 255).astype(np.uint8)
    return np.repeat(img[:, :, None], 3, axis=2)


def _texture(style: Style, size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """The texture field in [-1, 1] (or normalised) and the per-image draws it used (phase, frequency)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * np.pi)
    f = style.frequency * rng.uniform(0.9, 1.1)
    u = np.cos(style.angle) * xx + np.sin(style.angle) * yy
    v = -np.sin(style.angle) * xx + np.cos(style.angle) * yy
    if style.texture == "stripes":
        t = np.sin(2 * np.pi * f * u + phase)
    elif style.texture == "checks":
        t = np.sign(np.sin(2 * np.pi * f * u + phase) * np.sin(2 * np.pi * f * v + phase))
    elif style.texture == "dots":
        t = (np.sin(2 * np.pi * f * u + phase) * np.sin(2 * np.pi * f * v)) > 0.6
        t = t.astype(np.float64) * 2 - 1
    else:  # blotches: smooth low-frequency noise
        g = max(2, int(f))
        coarse = rng.standard_normal((g + 1, g + 1))
        idx = np.linspace(0, g, size)
        i0 = np.floor(idx).astype(int).clip(0, g - 1)
        w = idx - i0
        rows = coarse[i0] * (1 - w)[:, None] + coarse[i0 + 1] * w[:, None]
        t = rows[:, i0] * (1 - w)[None, :] + rows[:, i0 + 1] * w[None, :]
        t = np.tanh(style.blotch_sharpness * t)
    if style.normalise_texture:
        t = t - t.mean()
        t = t / max(float(np.sqrt((t * t).mean())), 1e-6)
    return t, {"phase": float(phase), "frequency": float(f)}


def render(labels: np.ndarray, style: Style, rng: np.random.Generator) -> np.ndarray:
    """B: the regions of `labels` painted in `style`, RGB uint8."""
    return render_with_factors(labels, style, rng)[0]


FACTORS = ("band", "frequency", "frequency_jitter", "angle", "light_angle", "light_strength", "light_jitter",
           "hue_jitter", "gain", "phase")


def render_with_factors(labels: np.ndarray, style: Style, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """`render`, and the values of the image's generating factors (`FACTORS`): the style's frequency band
    (1: above the coarse band), angle and light direction, and the per-image draws (frequency and light
    strength with their jitter factors, hue jitter, brightness gain, texture phase). Within one family of
    the shared_palette design, band fixes angle and light direction (two styles a family), while the
    jitters, gain and phase are independent draws: the ground truth of disentanglement scores."""
    size = labels.shape[0]
    hue_jitter = rng.uniform(-0.02, 0.02)
    palette = np.array(
        [colorsys.hsv_to_rgb((h + hue_jitter) % 1.0, style.saturation, 0.45 + 0.15 * i)
         for i, h in enumerate(style.hues)]
    )
    img = palette[labels % len(palette)]
    texture, drawn = _texture(style, size, rng)
    img = img * (1.0 + style.contrast * texture)[:, :, None]
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    light_jitter = rng.uniform(0.8, 1.2)
    light_strength = style.light_strength * light_jitter
    light = 1.0 + light_strength * (np.cos(style.light_angle) * xx + np.sin(style.light_angle) * yy) * 2
    img = img * light[:, :, None]
    if style.noise > 0:
        img = img + rng.normal(0, style.noise, img.shape)
    gain = rng.uniform(1 - style.gain_jitter, 1 + style.gain_jitter) if style.gain_jitter > 0 else 1.0
    img = img * gain
    factors = {"band": int(style.frequency > FREQUENCY_BANDS[0][1]), "frequency": drawn["frequency"],
               "frequency_jitter": drawn["frequency"] / style.frequency, "angle": style.angle,
               "light_angle": style.light_angle, "light_strength": float(light_strength),
               "light_jitter": float(light_jitter), "hue_jitter": float(hue_jitter), "gain": float(gain),
               "phase": drawn["phase"]}
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), factors


def render_pair(index: int, split: str, style: Style, size: int, seed: int) -> np.ndarray:
    """One A|B file as an (size, 2·size, 3) uint8 array, fully determined by its arguments."""
    return render_pair_with_factors(index, split, style, size, seed)[0]


def render_pair_with_factors(index: int, split: str, style: Style, size: int, seed: int) -> tuple[np.ndarray, dict]:
    """`render_pair` and the B side's generating factors (`render_with_factors`)."""
    rng = np.random.default_rng([seed, 104729, 0 if split == "train" else 1, index])
    labels = _layout(rng, size)
    b, factors = render_with_factors(labels, style, rng)
    return np.concatenate([content_map(labels), b], axis=1), factors


def generate_synthetic(out_dir: str | Path, cfg: SyntheticConfig = SyntheticConfig()) -> Path:
    """Write `train/` and `val/` A|B PNGs plus `manifest.parquet` (each image's style id, family and
    generating factors, `FACTORS`) and `styles.json`; returns out_dir.

    Deterministic: the same config gives byte-identical files. Style ids are balanced round-robin.
    An existing dataset written with the same config is kept as it is.
    """
    out = Path(out_dir)
    meta_path = out / "styles.json"
    styles = make_styles(cfg.num_styles, cfg.seed, cfg.design)
    meta = {"config": cfg.__dict__, "styles": [s.__dict__ for s in styles]}
    if meta_path.exists() and (out / MANIFEST).exists():
        # a set written before the factors were recorded is written again (the same bytes, a fuller manifest)
        if (json.loads(meta_path.read_text()).get("config") == cfg.__dict__
                and set(FACTORS) <= set(pq.read_schema(out / MANIFEST).names)):
            return out
    rows: dict[str, list] = {"image_id": [], "split": [], "file": [], "style_id": [], "family": [],
                             **{name: [] for name in FACTORS}}
    for split, n in (("train", cfg.num_train), ("val", cfg.num_val)):
        (out / split).mkdir(parents=True, exist_ok=True)
        order = np.random.default_rng([cfg.seed, 31, len(split)]).permutation(n)
        for i in range(n):
            style = styles[int(order[i]) % cfg.num_styles]
            name = f"{i:05d}.png"
            pair, factors = render_pair_with_factors(i, split, style, cfg.image_size, cfg.seed)
            Image.fromarray(pair).save(out / split / name)
            rows["image_id"].append(f"{split}/{i:05d}")
            rows["split"].append(split)
            rows["file"].append(f"{split}/{name}")
            rows["style_id"].append(style.style_id)
            rows["family"].append(style.family)
            for key, value in factors.items():
                rows[key].append(value)
    pq.write_table(pa.table(rows), out / MANIFEST)
    meta_path.write_text(json.dumps(meta, indent=1, default=list))
    return out


def main(argv=None) -> None:
    """`python -m step_ray.data.synthetic OUT_DIR [num_styles=8 num_train=800 ...]`"""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit("usage: python -m step_ray.data.synthetic OUT_DIR [key=value ...]")
    cfg = load_config(SyntheticConfig, None, args[1:])
    print(generate_synthetic(args[0], cfg))


if __name__ == "__main__":
    main()
