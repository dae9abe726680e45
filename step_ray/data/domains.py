"""Images with a domain label, for the multi-domain style model (docs/method.md §7).

Two sources:
* the synthetic style set (`root` empty, generated into `synthetic_dir` when missing): the target side B of
  each pair, its domain the style family (the texture kind: stripes, checks, dots, blotches);
* a folder per domain: `<root>/<split>/<domain name>/*.png|jpg` (plain images, resized to image_size),
  local or s3://. Domains are numbered in sorted name order, the same for every split.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from step_ray import storage
from step_ray.data.pix2pix import BadImageError, DataConfig, DatasetError, image_id, list_split, load_pair, resize
from step_ray.data.synthetic import FACTORS, MANIFEST, TEXTURES, SyntheticConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class DomainDataConfig:
    root: str = ""  # "": the synthetic set (generated); a synthetic set's folder; else <root>/<split>/<domain>/ folders
    synthetic_dir: str = "data/synthetic"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    image_size: int = 32
    min_side: int = 16

    def __post_init__(self):
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")


@dataclass
class DomainImages:
    """One split: where each image is, its domain id, the domain names, and how to read a file."""

    paths: list[str]
    domains: np.ndarray
    names: list[str]
    kind: Literal["pix2pix_b", "plain"]
    # each image's generating factors (a synthetic set's manifest records them): name -> [N] values
    factors: dict[str, np.ndarray] = field(default_factory=dict)

    def rows_of(self, domain: int) -> np.ndarray:
        return np.flatnonzero(self.domains == domain)


def _synthetic(cfg: DomainDataConfig, split: str) -> DomainImages:
    # an existing synthetic set given as root is read as it is (never regenerated with other settings)
    root = cfg.root or DataConfig(root="", synthetic_dir=cfg.synthetic_dir, synthetic=cfg.synthetic,
                                  image_size=cfg.image_size).prepare()
    fs, path = storage.resolve(storage.join(root, MANIFEST))
    schema = pq.read_schema(path, filesystem=fs).names
    table = pq.read_table(path, filesystem=fs, columns=["image_id", "family", *(f for f in FACTORS if f in schema)])
    table = table.to_pydict()
    row_of = {key: i for i, key in enumerate(table["image_id"])}
    paths = list_split(root, split)
    rows = [row_of[image_id(p)] for p in paths]
    family = np.asarray(table["family"])[rows]
    present = sorted(set(family.tolist()))
    index = {f: i for i, f in enumerate(present)}  # only the families this set has, numbered densely
    factors = {f: np.asarray(table[f], np.float64)[rows] for f in FACTORS if f in table}
    return DomainImages(paths, np.array([index[f] for f in family], np.int64), [TEXTURES[f] for f in present],
                        "pix2pix_b", factors)


def _folders(cfg: DomainDataConfig, split: str) -> DomainImages:
    fs, base = storage.resolve(storage.join(cfg.root, split))
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
    if len(names) < 2:
        raise DatasetError(f"{storage.join(cfg.root, split)}: expected one folder per domain (at least 2), "
                           f"found {names}")
    paths, domains = [], []
    for d, name in enumerate(names):
        files = storage.list_files(storage.join(cfg.root, split, name), IMAGE_SUFFIXES)
        paths += files
        domains += [d] * len(files)
    return DomainImages(paths, np.array(domains, np.int64), names, "plain")


def list_domain_split(cfg: DomainDataConfig, split: str) -> DomainImages:
    synthetic = not cfg.root or storage.exists(storage.join(cfg.root, MANIFEST))
    images = _synthetic(cfg, split) if synthetic else _folders(cfg, split)
    if len(images.names) < 2 or not len(images.paths):
        raise DatasetError(f"{split}: a multi-domain set needs images in at least 2 domains; got {images.names}")
    return images


def load_domain_image(path: str, kind: str, size: int, min_side: int = 16) -> np.ndarray:
    """One image as uint8 HWC RGB at size × size (BadImageError saying why not)."""
    if kind == "pix2pix_b":
        return load_pair(path, "AtoB", size, min_side)[1]
    data = storage.read_bytes(path)
    if not data:
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = np.asarray(im.convert("RGB"))
    except Exception as exc:
        raise BadImageError(path, f"not a readable image ({type(exc).__name__}: {exc})") from exc
    if min(rgb.shape[:2]) < min_side:
        raise BadImageError(path, f"too small ({rgb.shape[1]}x{rgb.shape[0]} < {min_side})")
    return resize(rgb, size)
