"""Reading the standard pix2pix folder layout (`train/`, `val/`, each file A|B side by side).

Works on local folders and `s3://` URIs alike (pyarrow filesystems, see step_ray.storage). Every image
that cannot be used raises `BadImageError` naming the file and the problem; callers decide, by the
`on_bad_image` setting, whether that skips the file (and lists it) or stops the job.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from step_ray import storage
from step_ray.data.synthetic import MANIFEST, SyntheticConfig

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class BadImageError(ValueError):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self):  # survives the trip from a Ray worker (two init arguments, not one message)
        return type(self), (self.path, self.reason)


class DatasetError(RuntimeError):
    """The dataset as a whole cannot be read (missing folder, missing split, empty split)."""


@dataclass(frozen=True)
class DataConfig:
    """Where the paired images are and how to read them.

    `root` empty means the built-in synthetic dataset, generated under `synthetic_dir` from `synthetic`.
    `direction` follows pix2pix: AtoB takes the left half as input A and the right half as target B;
    BtoA swaps them (facades: the photo, the usual target, is the left half, so use BtoA).
    """

    root: str = ""
    direction: Literal["AtoB", "BtoA"] = "AtoB"
    image_size: int = 32
    on_bad_image: Literal["skip", "fail"] = "skip"
    min_side: int = 16  # a half smaller than this is "wrong size"
    synthetic_dir: str = "data/synthetic"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self):
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")

    def resolved_root(self) -> str:
        return self.root or self.synthetic_dir

    def prepare(self) -> str:
        """The dataset root, generating the synthetic set first when `root` is empty."""
        if not self.root:
            from step_ray.data.synthetic import generate_synthetic

            generate_synthetic(self.synthetic_dir, self.synthetic)
            return self.synthetic_dir
        storage.check_readable(self.root, "dataset root")
        return self.root


def list_split(root: str, split: str) -> list[str]:
    """Image URIs of one split, sorted; a clear DatasetError when the folder is missing or empty."""
    folder = storage.join(root, split)
    try:
        storage.check_readable(folder, f"dataset split '{split}'")
    except storage.StorageError as exc:
        raise DatasetError(str(exc)) from exc
    files = storage.list_files(folder, IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"dataset split folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def image_id(uri: str) -> str:
    """`<split>/<stem>`: stable across local and S3 copies of the same dataset."""
    parts = str(uri).rstrip("/").split("/")
    return f"{parts[-2]}/{parts[-1].rsplit('.', 1)[0]}"


def read_style_ids(root: str) -> dict[str, int]:
    """image_id -> style id from the synthetic manifest; empty for real datasets without one."""
    uri = storage.join(root, MANIFEST)
    if not storage.exists(uri):
        return {}
    fs, path = storage.resolve(uri)
    table = pq.read_table(path, filesystem=fs, columns=["image_id", "style_id"]).to_pydict()
    return dict(zip(table["image_id"], table["style_id"]))


def decode_pair(data: bytes, path: str, direction: str = "AtoB", min_side: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Split one A|B file into (A, B) RGB uint8 arrays, or raise BadImageError saying why not."""
    if not data:
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes fully: truncated files fail here, not later
            mode = im.mode
            rgb = im.convert("RGB")
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(path, f"corrupt or truncated image ({exc})") from None
    if mode not in ("RGB", "RGBA", "L", "P", "LA", "CMYK", "YCbCr", "I;16", "I", "F"):
        raise BadImageError(path, f"unsupported image mode {mode}")
    arr = np.asarray(rgb)
    h, w = arr.shape[:2]
    if w != 2 * h:
        raise BadImageError(path, f"wrong layout: {w}x{h} is not two square halves side by side (width = 2 x height)")
    if h < min_side:
        raise BadImageError(path, f"wrong size: halves of {h}x{h} are smaller than {min_side}x{min_side}")
    left, right = arr[:, :h], arr[:, h:]
    return (left, right) if direction == "AtoB" else (right, left)


def resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def load_pair(uri: str, direction: str = "AtoB", size: int | None = None, min_side: int = 16):
    """(A, B) uint8 arrays for one file, resized to `size` when given."""
    try:
        data = storage.read_bytes(uri)
    except OSError as exc:
        raise BadImageError(str(uri), f"cannot be read ({exc})") from None
    a, b = decode_pair(data, str(uri), direction, min_side)
    if size:
        a, b = resize(a, size), resize(b, size)
    return a, b


@dataclass
class SplitImages:
    """A split loaded into memory: ids, paths, A and B as uint8 NHWC, style ids (-1 unknown), errors."""

    ids: list[str]
    paths: list[str]
    a: np.ndarray
    b: np.ndarray
    style_ids: np.ndarray
    errors: list[tuple[str, str]]


def load_split(cfg: DataConfig, split: str, root: str | None = None, limit: int | None = None) -> SplitImages:
    """Read a whole split (small datasets, tests, evaluation); bad files skipped or fatal per config."""
    root = root or cfg.prepare()
    files = list_split(root, split)[:limit]
    styles = read_style_ids(root)
    ids, paths, a_list, b_list, errors = [], [], [], [], []
    for uri in files:
        try:
            a, b = load_pair(uri, cfg.direction, cfg.image_size, cfg.min_side)
        except BadImageError as exc:
            if cfg.on_bad_image == "fail":
                raise
            errors.append((exc.path, exc.reason))
            continue
        ids.append(image_id(uri))
        paths.append(uri)
        a_list.append(a)
        b_list.append(b)
    if not ids:
        raise DatasetError(f"no readable images in {storage.join(root, split)} ({len(errors)} bad files)")
    return SplitImages(
        ids=ids,
        paths=paths,
        a=np.stack(a_list),
        b=np.stack(b_list),
        style_ids=np.array([styles.get(i, -1) for i in ids], np.int64),
        errors=errors,
    )


def to_tensor(images: np.ndarray):
    """uint8 NHWC -> float NCHW in [-1, 1], the range every network here takes."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
