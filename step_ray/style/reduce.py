"""Reduction of style descriptors (~306k numbers) to d dimensions for nearest/furthest-neighbour mining.

Two methods, chosen by `ReductionConfig.method`:

* ``pca``: principal components fitted on a sample of n descriptors. With n << D the eigenvectors come
  from the n × n Gram matrix of the centred sample (the "Gram trick": X Xᵀ = U S² Uᵀ, components =
  S⁻¹ Uᵀ X), accumulated over column blocks in float64, so no D × D matrix and no float64 copy of the
  sample ever exists. Orthogonal projection: reduced distances never exceed the exact ones.
  With `residual` (the default), one more coordinate carries the residual norm ρ(x)^½ = ‖x − μ − Cᵀy‖,
  what the projection dropped. Mining then searches *asymmetrically*: database rows [y, ρ^½], queries
  [y, 0], so it ranks by ‖y_a − y_x‖² + ρ(x) (and reports + ρ(a)): the lower bound plus both residuals,
  exact when the residuals of two images are orthogonal. Measured on real VGG-16 descriptors, 10k
  synthetic images (experiments/README.md, "Choosing the reduction"): PCA-256 fitted on
  2,048 images, recall@5 0.738 and far precision 0.955 plain, 0.805 / 0.997 with the residual, for one
  search dimension more. Per-layer block PCA and random projections were worse at every d tried.
  With `sketch` m > 0, m more columns carry a CountSketch s(x) = S(x − μ − Cᵀy) of the residual itself
  (S: every descriptor coordinate added, with a seeded random sign, into one of m seeded buckets), so
  that r_a·r_b ≈ s_a·s_b without bias. Mining then re-ranks the reduced search's candidates by
  ‖y_a − y_b‖² + ρ_a + ρ_b − 2 s_a·s_b, an unbiased estimate of the exact distance whose error falls as
  1/√m (measured at n = 10k: recall@5 0.805 → 0.96-0.97 for m = 8,192-16,384; experiments/README.md, "Re-ranking
  with a sketch of the residual"). The sketch never enters the FAISS index.
* ``random``: a Gaussian matrix with N(0, 1/d) entries (Johnson–Lindenstrauss: squared distances are
  preserved in expectation). It is regenerated from the seed in fixed row blocks, so the saved file
  holds the seed, not D × d floats (150 MB for D = 306k, d = 128).
* ``none``: descriptors are kept whole (small data sets, exact mining, tests).

`save`/`load` use step_ray.storage, so the reduction of a run can live next to it on S3.
"""
from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from step_ray import storage

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 2: the `residual` flag (version 1 loads as residual=False); 3: `sketch` (older: 0)
READABLE_VERSIONS = (1, 2, 3)
_SKETCH_STREAM = 0x5CE7C4  # second seed word: the sketch's hash never shares a stream with other draws


@dataclass(frozen=True)
class ReductionConfig:
    """How descriptors are reduced before they are written.

    `fit_sample` descriptors (chosen with `seed` from all images) fit the PCA; they are held in memory
    at full size (4·D bytes each: 1.2 MB for VGG-16; 2,048 of them = 2.5 GB on the driver), so keep it
    in the hundreds to low thousands.
    `block_rows` is the row-block size in which the random matrix is generated; it is part of the
    definition of the matrix, so it is saved with it. `residual` (pca only) appends the residual-norm
    coordinate (module docstring): `output_dim` is then dim + 1, and the last column must be mined
    asymmetrically (`step_ray.mining.mine_neighbours(..., residual_column=True)`; the mining job reads
    the flag from the descriptors' metadata). `sketch` (pca with `residual` only, like `residual` itself
    without effect for the other methods; `describe()` records what was written) appends that many
    CountSketch columns of the residual after it (module docstring; `output_dim` = dim + 1 + sketch),
    which mining uses to re-rank its candidates (`mining.rerank_factor`). They cost 4·sketch bytes per
    image in the descriptor files (32 KB at the default 8,192) and one scatter-add over D per image.
    """

    # Defaults chosen on real VGG-16 descriptors at n = 10k (experiments/README.md, "Choosing the
    # reduction"): PCA-256 + residual fitted on 2,048 images, recall@5 0.805 and far
    # precision 0.997 (the old PCA-128 on 512-1,024 images: 0.65 / 0.93), ~900× faster than exact search.
    method: Literal["pca", "random", "none"] = "pca"
    dim: int = 256
    fit_sample: int = 2048
    seed: int = 0
    block_rows: int = 8192
    residual: bool = True
    sketch: int = 8192

    def __post_init__(self):
        if self.sketch < 0:
            raise ValueError(f"reduction.sketch must be >= 0 (0 = none), got {self.sketch}")
        if self.dim < 1:
            raise ValueError(f"reduction.dim must be >= 1, got {self.dim}")
        if self.block_rows < 1:
            raise ValueError(f"reduction.block_rows must be >= 1, got {self.block_rows}")
        if self.method == "pca" and self.fit_sample <= self.dim:
            raise ValueError(
                f"reduction.fit_sample={self.fit_sample} must exceed reduction.dim={self.dim}: "
                "n centred samples span at most n-1 principal directions"
            )


class Reduction:
    """A fitted (or seed-defined) linear map from D-dim descriptors to `output_dim` dims."""

    def __init__(self, cfg: ReductionConfig, input_dim: int):
        if cfg.method != "none" and cfg.dim > input_dim:
            raise ValueError(f"reduction.dim={cfg.dim} exceeds the descriptor size {input_dim}")
        if cfg.method == "pca" and cfg.residual and cfg.sketch >= input_dim:
            raise ValueError(f"reduction.sketch={cfg.sketch} exceeds the descriptor size {input_dim}: a sketch must be "
                             "narrower than what it sketches (set reduction.sketch smaller or 0, or "
                             "reduction.method=none to keep descriptors this small whole)")
        self.cfg = cfg
        self.input_dim = int(input_dim)
        self.mean: np.ndarray | None = None  # pca: [D] float32
        self.components: np.ndarray | None = None  # pca: [d, D] float32, orthonormal rows
        self.explained_variance_ratio: float | None = None
        self._torch_cache: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}
        self._sketch_cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def method(self) -> str:
        return self.cfg.method

    @property
    def residual(self) -> bool:
        """True when the last output column is the residual norm (pca with `residual`)."""
        return self.cfg.method == "pca" and self.cfg.residual

    @property
    def sketch(self) -> int:
        """Width of the residual's CountSketch at the end of each output row (0: none)."""
        return self.cfg.sketch if self.residual else 0

    @property
    def output_dim(self) -> int:
        return self.input_dim if self.cfg.method == "none" else self.cfg.dim + int(self.residual) + self.sketch

    @property
    def needs_fit(self) -> bool:
        return self.cfg.method == "pca" and self.components is None

    def fit(self, sample: np.ndarray | None = None) -> "Reduction":
        """PCA: fit on `sample` [n, D]. random/none: nothing to learn (a sample, if given, is ignored)."""
        if self.cfg.method != "pca":
            return self
        if sample is None:
            raise ValueError("PCA reduction needs a sample of descriptors to fit on")
        sample = np.asarray(sample, dtype=np.float32)
        n, dim = sample.shape
        if dim != self.input_dim:
            raise ValueError(f"sample has {dim} columns, the reduction expects {self.input_dim}")
        if n <= self.cfg.dim:
            raise ValueError(f"PCA to {self.cfg.dim} dims needs more than {self.cfg.dim} samples, got {n}")
        block = self.cfg.block_rows * 4
        mean = sample.mean(axis=0, dtype=np.float64)
        gram = np.zeros((n, n), np.float64)
        for start in range(0, dim, block):
            centred = sample[:, start : start + block] - mean[start : start + block]
            gram += centred @ centred.T
        eigvals, eigvecs = np.linalg.eigh(gram)
        order = np.argsort(eigvals)[::-1]
        eigvals, eigvecs = np.clip(eigvals[order], 0.0, None), eigvecs[:, order]
        top = eigvals[: self.cfg.dim]
        # Directions with (numerically) zero variance have no defined axis: leave their rows at zero,
        # which adds nothing to any distance, rather than dividing by ~0.
        usable = top > eigvals[0] * 1e-10 if eigvals[0] > 0 else np.zeros_like(top, bool)
        if not usable.all():
            log.warning("PCA: only %d of %d components have non-zero variance", usable.sum(), self.cfg.dim)
        inv_sv = np.where(usable, 1.0 / np.sqrt(np.where(usable, top, 1.0)), 0.0)
        coeff = eigvecs[:, : self.cfg.dim] * inv_sv  # [n, d]
        components = np.empty((self.cfg.dim, dim), np.float32)
        for start in range(0, dim, block):
            centred = sample[:, start : start + block] - mean[start : start + block]
            components[:, start : start + block] = coeff.T @ centred
        self.mean = mean.astype(np.float32)
        self.components = components
        total = eigvals.sum()
        self.explained_variance_ratio = float(top.sum() / total) if total > 0 else 0.0
        self._torch_cache.clear()
        self._sketch_cache.clear()
        return self

    def sketch_hash(self) -> tuple[np.ndarray, np.ndarray]:
        """The CountSketch's bucket [D] int64 in [0, sketch) and sign [D] ±1 float32, from the seed."""
        rng = np.random.default_rng([self.cfg.seed, _SKETCH_STREAM])
        bucket = rng.integers(0, self.cfg.sketch, self.input_dim, dtype=np.int64)
        sign = rng.integers(0, 2, self.input_dim, dtype=np.int8).astype(np.float32) * 2.0 - 1.0
        return bucket, sign

    def _sketch_matrices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._sketch_cache:
            with torch.inference_mode(False):
                bucket, sign = self.sketch_hash()
                bucket_t = torch.from_numpy(bucket).to(device)
                sign_t = torch.from_numpy(sign).to(device)
                _, matrix = self._torch_matrices(device)  # [D, d]
                # S Cᵀ, [d, m]: S r = S(x − μ) − (S Cᵀ) y, so the residual itself is never formed.
                sketched = torch.zeros(matrix.shape[1], self.cfg.sketch, device=device)
                sketched.index_add_(1, bucket_t, matrix.T * sign_t)
            self._sketch_cache[key] = (bucket_t, sign_t, sketched)
        return self._sketch_cache[key]

    def _sketch_residual(self, centred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bucket, sign, sketched = self._sketch_matrices(centred.device)
        out = torch.zeros(centred.shape[0], self.cfg.sketch, device=centred.device, dtype=centred.dtype)
        out.index_add_(1, bucket, centred * sign)
        return out - y @ sketched

    def _random_block(self, index: int) -> np.ndarray:
        rows = min(self.cfg.block_rows, self.input_dim - index * self.cfg.block_rows)
        rng = np.random.default_rng([self.cfg.seed, index])
        return rng.standard_normal((rows, self.cfg.dim), dtype=np.float32) / np.float32(math.sqrt(self.cfg.dim))

    def projection_matrix(self) -> np.ndarray:
        """[D, d] float32: the PCA components transposed, or the seed's Gaussian matrix."""
        if self.cfg.method == "pca":
            if self.components is None:
                raise RuntimeError("PCA reduction used before fit()")
            return self.components.T
        if self.cfg.method == "random":
            blocks = math.ceil(self.input_dim / self.cfg.block_rows)
            return np.concatenate([self._random_block(i) for i in range(blocks)], axis=0)
        raise RuntimeError("method 'none' has no projection matrix")

    def _torch_matrices(self, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
        key = str(device)
        if key not in self._torch_cache:
            # Made outside inference mode so they can serve callers with and without gradients.
            with torch.inference_mode(False):
                matrix = torch.from_numpy(np.ascontiguousarray(self.projection_matrix())).to(device)
                mean = torch.from_numpy(self.mean).to(device) if self.mean is not None else None
            self._torch_cache[key] = (mean, matrix)
        return self._torch_cache[key]

    def transform_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [N, d] float32 on x's device (the projection matrix is cached per device)."""
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"descriptors have {x.shape[-1]} columns, the reduction expects {self.input_dim}")
        x = x.float()
        if self.cfg.method == "none":
            return x
        mean, matrix = self._torch_matrices(x.device)
        if mean is not None:
            x = x - mean
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = x @ matrix
            if not self.residual:
                return y
            # ‖x − μ‖² − ‖y‖² (rows of C orthonormal; zero rows add nothing), summed in float64: the
            # difference of two large sums.
            rho = (x.double().pow(2).sum(-1) - y.double().pow(2).sum(-1)).clamp_min(0.0)
            parts = [y, rho.sqrt().to(y.dtype).unsqueeze(-1)]
            if self.sketch:
                parts.append(self._sketch_residual(x, y))
            return torch.cat(parts, dim=-1)

    def transform(self, x: np.ndarray, chunk_rows: int = 128) -> np.ndarray:
        """[N, D] -> [N, d] float32, `chunk_rows` rows at a time: transform_tensor's temporaries (the
        centred rows, their float64 squares, the sketch's signed copy) are several times the rows' own
        size, so 2,048 full descriptors in one call took ~12 GB on top of the 2.5 GB they occupy."""
        x = np.asarray(x, dtype=np.float32)
        squeeze = x.ndim == 1
        x = np.atleast_2d(x)
        out = np.empty((len(x), self.output_dim), np.float32)
        for start in range(0, len(x), chunk_rows):
            out[start : start + chunk_rows] = self.transform_tensor(
                torch.from_numpy(x[start : start + chunk_rows])).numpy()
        return out[0] if squeeze else out

    def describe(self) -> dict:
        """JSON-ready summary for metadata files."""
        info = {"method": self.cfg.method, "input_dim": self.input_dim, "output_dim": self.output_dim}
        if self.cfg.method == "random":
            info.update(seed=self.cfg.seed, block_rows=self.cfg.block_rows)
        if self.cfg.method == "pca":
            info.update(fit_sample=self.cfg.fit_sample, seed=self.cfg.seed)
            if self.cfg.residual:
                info["residual"] = True
            if self.sketch:
                info["sketch"] = self.sketch
            if self.explained_variance_ratio is not None:
                info["explained_variance_ratio"] = self.explained_variance_ratio
        return info

    def save(self, uri: str) -> None:
        if self.needs_fit:
            raise RuntimeError("cannot save a PCA reduction before fit()")
        arrays = {
            "format_version": np.int64(FORMAT_VERSION),
            "method": np.array(self.cfg.method),
            "input_dim": np.int64(self.input_dim),
            "dim": np.int64(self.cfg.dim),
            "fit_sample": np.int64(self.cfg.fit_sample),
            "seed": np.int64(self.cfg.seed),
            "block_rows": np.int64(self.cfg.block_rows),
            "residual": np.bool_(self.cfg.residual),
            "sketch": np.int64(self.cfg.sketch),
        }
        if self.cfg.method == "pca":
            arrays.update(
                mean=self.mean,
                components=self.components,
                explained_variance_ratio=np.float64(self.explained_variance_ratio),
            )
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        storage.write_bytes(uri, buffer.getvalue())

    @classmethod
    def load(cls, uri: str) -> "Reduction":
        with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as data:
            version = int(data["format_version"])
            if version not in READABLE_VERSIONS:
                raise ValueError(f"{uri}: reduction format {version}, this code reads {READABLE_VERSIONS}")
            method = str(data["method"])
            cfg = ReductionConfig(
                method=method,
                dim=int(data["dim"]),
                fit_sample=int(data["fit_sample"]),
                seed=int(data["seed"]),
                block_rows=int(data["block_rows"]),
                residual=bool(data["residual"]) if "residual" in data.files else False,
                sketch=int(data["sketch"]) if "sketch" in data.files else 0,
            )
            reduction = cls(cfg, int(data["input_dim"]))
            if method == "pca":
                reduction.mean = data["mean"].astype(np.float32)
                reduction.components = data["components"].astype(np.float32)
                reduction.explained_variance_ratio = float(data["explained_variance_ratio"])
        return reduction
