"""Reading the standard pix2pix folder layout (`train/`, `val/`, each file A|B side by side).

Works on local folders and `s3://` URIs alike (pyarrow filesystems, see step_ray.storage). The rules:

* A split is a flat folder. Every entry is used, converted or reported: image files (`IMAGE_SUFFIXES`)
  are read; other extensions, sub-folders, hidden files and broken links are listed as skipped with the
  reason (`scan_folder`); they never stop a job.
* One file = one image id, `<split>/<stem>`, taken from the path as listed: a symbolic link is read under
  its own name and split, wherever it points. Two files of one split with the same stem (`a.jpg`,
  `a.png`) are a `DatasetError` naming both, before any work.
* Each file holds two square halves side by side (width = 2 × height). Modes are converted to RGB:
  16-bit greyscale is rescaled to 8 bits (value / 257, never clipped), bilevel (mode `1`) and palette
  images convert exactly, transparency is composited on white, and the EXIF orientation is applied.
* When resized, the A half (the input: a label map, an edge map) is resized by nearest neighbour if it
  holds a small palette (`data.a_resample=auto`: at most `PALETTE_MAX` colours), so its classes survive;
  photos are resized bicubically.

Every image that cannot be used raises `BadImageError` naming the file and the problem; callers decide, by
the `on_bad_image` setting, whether that skips the file (and lists it) or stops the job.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from step_ray import storage
from step_ray.data.synthetic import MANIFEST, SyntheticConfig, generate_synthetic

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PALETTE_MAX = 64  # an A half with at most this many colours is a label/edge map: resized by nearest neighbour


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
    # how the A half is resized: "auto" = nearest neighbour when it has <= PALETTE_MAX colours (a label
    # map keeps its classes), bicubic otherwise; "nearest" or "bicubic" for every file
    a_resample: Literal["auto", "nearest", "bicubic"] = "auto"
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
            generate_synthetic(self.synthetic_dir, self.synthetic)
            return self.synthetic_dir
        storage.check_readable(self.root, "dataset root")
        return self.root


@dataclass
class SplitListing:
    """What one split folder holds: the image files to read (URIs as listed, sorted, one per image id)
    and every other entry with the reason it is not read."""

    files: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _skip_reason(name: str, kind: str) -> str | None:
    if kind == "dir":
        return "a sub-folder: only files directly in the split folder are read (flat layout)"
    if kind == "broken_link":
        return "a broken symbolic link (its target does not exist)"
    if kind != "file":
        return "not a regular file"
    if name.startswith("."):
        return "a hidden file"
    if not name.lower().endswith(IMAGE_SUFFIXES):
        suffix = name.rsplit(".", 1)[1].lower() if "." in name else ""
        return (f"extension {'.' + suffix if suffix else '(none)'} is not read "
                f"(image files: {', '.join(IMAGE_SUFFIXES)})")
    return None


def scan_folder(root: str, split: str) -> SplitListing:
    """The image files of one split and the entries skipped; a clear DatasetError when the folder is
    missing, holds no image, or two of its files share an image id."""
    folder = storage.join(root, split)
    try:
        storage.check_readable(folder, f"dataset split '{split}'")
    except storage.StorageError as exc:
        raise DatasetError(str(exc)) from exc
    files, skipped = [], []
    for uri, kind in storage.list_entries(folder):
        reason = _skip_reason(uri.rstrip("/").rsplit("/", 1)[-1], kind)
        if reason:
            skipped.append((uri, reason))
        else:
            files.append(uri)
    if not files:
        raise DatasetError(f"dataset split folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})"
                           + (f"; {len(skipped)} other entries, e.g. {skipped[0][0]}: {skipped[0][1]}"
                              if skipped else ""))
    by_id: dict[str, str] = {}
    for uri in files:
        ident = image_id(uri)
        if ident in by_id:
            raise DatasetError(f"{by_id[ident]} and {uri} share the image id '{ident}': one file per stem in a split "
                               "(rename or remove one)")
        by_id[ident] = uri
    return SplitListing(files, skipped)


def list_split(root: str, split: str) -> list[str]:
    """Image URIs of one split, sorted (see `scan_folder` for what else the folder held)."""
    return scan_folder(root, split).files


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


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(im: Image.Image, path: str) -> np.ndarray:
    """An opened image as RGB uint8 (see the module's rules), or BadImageError."""
    mode = im.mode
    if mode in _SIXTEEN_BIT:  # PIL's own convert would clip every value above 255 to white
        values = np.asarray(im, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise BadImageError(path, f"mode {mode} values {values.min()}..{values.max()} are outside 16 bits")
        grey = ((values + 128) // 257).astype(np.uint8)  # 0..65535 -> 0..255, rounded
        return np.repeat(grey[..., None], 3, axis=2)
    if mode == "F":
        raise BadImageError(path, "32-bit float image (mode F): its value range is undefined; save it as 8 or 16 bits")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info) or (
            mode in ("RGB", "L") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    if mode not in ("RGB", "L", "P", "1", "CMYK", "YCbCr"):
        raise BadImageError(path, f"unsupported image mode {mode}")
    return np.asarray(im.convert("RGB"))


def decode_image(data: bytes, path: str) -> np.ndarray:
    """One image file as an RGB uint8 array (see the module's rules), or BadImageError saying why not."""
    if not data:
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes fully: truncated files fail here, not later
            im = ImageOps.exif_transpose(im)  # a camera's orientation tag: the picture as it is meant to be seen
            return to_rgb(im, path)
    except UnidentifiedImageError:
        raise BadImageError(path, "not an image file") from None
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(path, f"corrupt or truncated image ({exc})") from None


def decode_pair(data: bytes, path: str, direction: str = "AtoB", min_side: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Split one A|B file into (A, B) RGB uint8 arrays, or raise BadImageError saying why not."""
    arr = decode_image(data, path)
    h, w = arr.shape[:2]
    if w != 2 * h:
        raise BadImageError(path, f"wrong layout: {w}x{h} is not two square halves side by side (width = 2 x height)")
    if h < min_side:
        raise BadImageError(path, f"wrong size: halves of {h}x{h} are smaller than {min_side}x{min_side}")
    left, right = arr[:, :h], arr[:, h:]
    return (left, right) if direction == "AtoB" else (right, left)


def colour_count(img: np.ndarray, most: int = PALETTE_MAX) -> int:
    """Distinct RGB colours of a uint8 image, counted up to `most` + 1."""
    packed = (img[..., 0].astype(np.uint32) << 16) | (img[..., 1].astype(np.uint32) << 8) | img[..., 2]
    return min(len(np.unique(packed)), most + 1)


def resize(img: np.ndarray, size: int, resample: Literal["bicubic", "nearest"] = "bicubic") -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    method = Image.NEAREST if resample == "nearest" else Image.BICUBIC
    return np.asarray(Image.fromarray(img).resize((size, size), method))


def input_resample(a: np.ndarray, setting: str = "auto") -> str:
    """How the A half is resized: nearest for a small palette under "auto" (a label or edge map)."""
    if setting != "auto":
        return setting
    return "nearest" if colour_count(a) <= PALETTE_MAX else "bicubic"


def load_pair(uri: str, direction: str = "AtoB", size: int | None = None, min_side: int = 16,
              a_resample: str = "auto"):
    """(A, B) uint8 arrays for one file, resized to `size` when given (A per `a_resample`)."""
    try:
        data = storage.read_bytes(uri)
    except OSError as exc:
        raise BadImageError(str(uri), f"cannot be read ({exc})") from None
    a, b = decode_pair(data, str(uri), direction, min_side)
    if size:
        if a.shape[0] != size:
            a = resize(a, size, input_resample(a, a_resample))
        b = resize(b, size)
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


def load_target(uri: str, direction: str = "AtoB", size: int | None = None, min_side: int = 16):
    """The target half B of one file (what stage 1 and the style statistics read)."""
    return load_pair(uri, direction, size, min_side)[1]


def load_split(cfg: DataConfig, split: str, root: str | None = None, limit: int | None = None) -> SplitImages:
    """Read a whole split (small datasets, tests, evaluation); bad files skipped or fatal per config."""
    root = root or cfg.prepare()
    files = list_split(root, split)[:limit]
    styles = read_style_ids(root)
    ids, paths, a_list, b_list, errors = [], [], [], [], []
    for uri in files:
        try:
            a, b = load_pair(uri, cfg.direction, cfg.image_size, cfg.min_side, cfg.a_resample)
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
