"""Mining recall on real VGG-16 descriptors: which reduction (and d) keeps the exact close/far sets.

    export RAY_TMPDIR=/tmp/ray_mining
    python experiments/mining_recall.py --json experiments/results/mining_recall_real_vgg.json

Two databases, descriptors computed once and cached under --cache (a second run reuses them):
* synthetic: the first --n target images of the synthetic style set (design `shared_palette`, --styles
  styles, --image-size px, rendered in memory). The unreduced descriptors
  (D = 305,888) are kept whole on disk as float16 (scaled by 2^10 so Gram entries stay normal numbers):
  6.1 GB at n = 10k, memory-mapped. The exact reference is computed in float32 *during* the descriptor
  pass (ExactAccumulator, the fp16 copy plays no part in it), for --anchors random anchors.
* facades: every image of /work/shared/data/facades (train + val = 500) at --facades-size px, float32;
  exact reference for all 500 anchors.

Reductions compared (all linear, all fitted on a random sample of the database's own images):
* pca: whole-descriptor PCA (Gram trick), fit samples --fit-sizes, d in --dims;
* blocks-pca: PCA per VGG layer block, d split across the five blocks either in proportion to each
  block's share of the variance (= of the mean squared style distance), "share", or greedily by the
  merged eigenvalue spectra, "eig" (the block-diagonal projection that keeps the most variance);
* random: one Gaussian projection (JL), d in --dims; blocks-random: a Gaussian per block, d split by share;
* "+res": a PCA variant whose database vectors carry one extra coordinate, the residual norm
  sqrt(‖x − μ‖² − ‖y‖²) (what the projection dropped), with 0 in that coordinate for queries, so the
  search ranks by ‖y_a − y_x‖² + ρ_x: the lower bound of PCA plus the residual of the candidate, exact
  when residuals of different images are orthogonal. FAISS cost is that of d + 1 dims.
* re-ranking: FAISS on a reduction retrieves K' candidates, which are re-ranked with the exact distances
  from the stored float16 full descriptors (recall = candidate recall; cost measured on the anchors).

Quality: recall@k_c of the exact close set and precision of the far set (k_f), on the anchors, against
the exact sets on unreduced float32 descriptors. Cost: fit time, projection time per image, bytes of the
saved reduction, and FAISS flat mining time for all n anchors (`mine_neighbours`, 1 shard, in-process),
timed in rounds alternating with the exact search (500-anchor slices, matrix products only) so that the
speed-up is a ratio measured under the same load; the load average is recorded with every round.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch


from step_ray.mining import ExactAccumulator, MiningConfig, close_recall, far_precision, mine_neighbours

SCALE16 = 1024.0  # fp16 storage scale (power of two: exact); Gram entries of ~1e-4 stay normal numbers
FACADES = "/work/shared/data/facades"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {loadavg()}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------- descriptors


def _vgg():
    from step_ray.style.vgg import VGGConfig, load_vgg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return load_vgg(VGGConfig())


class SyntheticImages:
    """Target halves of the synthetic style set, rendered on demand (no 10k PNGs on disk)."""

    def __init__(self, num_styles: int, size: int, seed: int = 0):
        from step_ray.data.synthetic import make_styles

        self.styles = make_styles(num_styles, seed)
        self.size, self.seed = size, seed

    def batch(self, indices) -> torch.Tensor:
        from step_ray.data.pix2pix import to_tensor
        from step_ray.data.synthetic import render_pair

        return to_tensor(np.stack([render_pair(int(i), "train", self.styles[int(i) % len(self.styles)], self.size,
                                               self.seed)[:, self.size:] for i in indices]))


def synthetic_set(args, cache: Path, vgg) -> dict:
    """fp16 store [n, D] (memmap) + exact reference of the anchors (float32), cached."""
    from step_ray.style.gram import descriptors_from_images

    tag = f"synth_{args.design}_s{args.styles}_{args.image_size}px_n{args.n}_a{args.anchors}"
    store_path, ref_path = cache / f"{tag}.f16.npy", cache / f"{tag}.ref.npz"
    if store_path.exists() and ref_path.exists():
        ref = dict(np.load(ref_path))
        log(f"synthetic: cached {store_path}")
        return {"name": "synthetic", "store": np.load(store_path, mmap_mode="r"), **ref, "cached": True,
                "meta": json.loads(str(ref["meta"]))}
    images = SyntheticImages(args.styles, args.image_size)
    if args.design != "shared_palette":
        from step_ray.data.synthetic import make_styles

        images.styles = make_styles(args.styles, 0, args.design)
    n = args.n
    rng = np.random.default_rng(0)
    anchors = np.sort(rng.choice(n, min(args.anchors, n), replace=False))
    t_desc = 0.0

    def desc(ids):
        nonlocal t_desc
        t0 = time.perf_counter()
        out = descriptors_from_images(vgg, images.batch(ids))
        t_desc += time.perf_counter() - t0
        return out

    queries = torch.cat([desc(anchors[s : s + args.chunk]) for s in range(0, len(anchors), args.chunk)])
    acc = ExactAccumulator(queries, args.k_close, args.k_far, query_ids=anchors)
    dim = queries.shape[1]
    tmp = store_path.with_suffix(".tmp.npy")
    store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
    exact_s = 0.0
    for start in range(0, n, args.chunk):
        stop = min(n, start + args.chunk)
        chunk = desc(np.arange(start, stop))
        store[start:stop] = (chunk * SCALE16).to(torch.float16).numpy()
        t0 = time.perf_counter()
        acc.add(chunk)
        exact_s += time.perf_counter() - t0
        if (start // args.chunk) % 8 == 0:
            log(f"synthetic: {stop}/{n} descriptors, VGG {t_desc:.0f} s, exact {exact_s:.0f} s")
    store.flush()
    del store
    os.replace(tmp, store_path)
    ref = acc.result()
    meta = {"vgg_s": round(t_desc, 1), "exact_stream_s": round(exact_s, 1), "weights": vgg.weight_source}
    np.savez(ref_path, anchors=anchors, close_ids=ref.close_ids, far_ids=ref.far_ids,
             queries=queries.numpy(), meta=np.array(json.dumps(meta)))
    return {"name": "synthetic", "store": np.load(store_path, mmap_mode="r"), "anchors": anchors,
            "close_ids": ref.close_ids, "far_ids": ref.far_ids, "queries": queries.numpy(), "meta": meta,
            "cached": False}


def facades_set(args, cache: Path, vgg) -> dict:
    from step_ray.data.pix2pix import list_split, load_target, to_tensor
    from step_ray.style.gram import descriptors_from_images

    path = cache / f"facades_{args.facades_size}px.npz"
    if path.exists():
        data = dict(np.load(path))
        log(f"facades: cached {path}")
        full = data.pop("full")
        return {"name": "facades", "store": full, "anchors": np.arange(len(full)), **data,
                "meta": json.loads(str(data["meta"])), "cached": True}
    files = list_split(FACADES, "train") + list_split(FACADES, "val")
    t0 = time.perf_counter()
    parts = []
    for s in range(0, len(files), 50):
        batch = np.stack([load_target(u, size=args.facades_size) for u in files[s : s + 50]])
        parts.append(descriptors_from_images(vgg, to_tensor(batch)))
    full = torch.cat(parts)
    vgg_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc = ExactAccumulator(full, args.k_close, args.k_far, query_ids=np.arange(len(full)))
    acc.add(full)
    exact_s = time.perf_counter() - t0
    ref = acc.result()
    meta = {"vgg_s": round(vgg_s, 1), "exact_all_s": round(exact_s, 2), "weights": vgg.weight_source,
            "files": len(files)}
    full = full.numpy()
    np.savez(path, full=full, close_ids=ref.close_ids, far_ids=ref.far_ids, meta=np.array(json.dumps(meta)))
    log(f"facades: {len(files)} images at {args.facades_size} px, VGG {vgg_s:.0f} s, exact {exact_s:.1f} s")
    return {"name": "facades", "store": full, "anchors": np.arange(len(full)), "close_ids": ref.close_ids,
            "far_ids": ref.far_ids, "meta": meta, "cached": False}


def rows_f32(store: np.ndarray, ids) -> np.ndarray:
    x = np.asarray(store[ids])
    if x.dtype == np.float16:
        return (torch.from_numpy(np.ascontiguousarray(x)).float() / SCALE16).numpy()
    return np.asarray(x, dtype=np.float32)


def cols_f32(sample: np.ndarray, s: int, e: int, scale: float) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(sample[:, s:e])).float() / scale


# ----------------------------------------------------------------------------------------- reductions


def block_slices(channels) -> list[slice]:
    sizes = [c * (c + 1) // 2 for c in channels]
    edges = np.cumsum([0] + sizes)
    return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


class BlockPCA:
    """Per-block eigen-decompositions of one fit sample (Gram trick), from which whole-descriptor PCA
    (sum of the block Grams) and per-block PCA of any size are cut without refitting."""

    def __init__(self, sample16: np.ndarray, blocks: list[slice], col_block: int = 16384, scale: float = 1.0):
        t0 = time.perf_counter()
        m = len(sample16)
        self.blocks, self.m, self.scale = blocks, m, scale
        self.mean = np.zeros(sample16.shape[1], np.float32)
        grams = []
        for b in blocks:
            g = np.zeros((m, m), np.float64)
            for s in range(b.start, b.stop, col_block):
                e = min(b.stop, s + col_block)
                x = cols_f32(sample16, s, e, scale)
                mu = x.double().mean(0).float()
                self.mean[s:e] = mu.numpy()
                x -= mu
                g += (x @ x.T).double().numpy()
            grams.append(g)
        self.gram_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.block_eig = [self._eig(g) for g in grams]
        self.whole_eig = self._eig(sum(grams))
        self.eig_s = time.perf_counter() - t0
        self.block_var = np.array([e[0].sum() for e in self.block_eig])
        self.sample16 = sample16

    @staticmethod
    def _eig(g):
        vals, vecs = np.linalg.eigh(g)
        order = np.argsort(vals)[::-1]
        return np.clip(vals[order], 0, None), vecs[:, order]

    def share_split(self, d: int) -> list[int]:
        return split_by_share(self.block_var / self.block_var.sum(), d,
                              [min(b.stop - b.start, self.m - 1) for b in self.blocks])

    def eig_split(self, d: int) -> list[int]:
        merged = np.concatenate([e[0][: self.m - 1] for e in self.block_eig])
        owner = np.concatenate([np.full(min(len(e[0]), self.m - 1), i) for i, e in enumerate(self.block_eig)])
        top = owner[np.argsort(merged)[::-1][:d]]
        return [int((top == i).sum()) for i in range(len(self.blocks))]

    def components(self, vals, vecs, k, cols: slice) -> np.ndarray:
        """[k, |cols|] orthonormal rows: S⁻¹ Uᵀ Xc restricted to `cols`."""
        inv = np.where(vals[:k] > vals[0] * 1e-10, 1.0 / np.sqrt(np.maximum(vals[:k], 1e-300)), 0.0)
        coeff = torch.from_numpy((vecs[:, :k] * inv).T.astype(np.float32))  # [k, m]
        out = np.empty((k, cols.stop - cols.start), np.float32)
        for s in range(cols.start, cols.stop, 16384):
            e = min(cols.stop, s + 16384)
            x = cols_f32(self.sample16, s, e, self.scale) - torch.from_numpy(self.mean[s:e])
            out[:, s - cols.start : e - cols.start] = (coeff @ x).numpy()
        return out


def split_by_share(share: np.ndarray, d: int, caps: list[int]) -> list[int]:
    """d dims over blocks ∝ share (largest remainders), each block at least 1 and at most its cap."""
    raw = share * d
    k = np.maximum(1, np.floor(raw)).astype(int)
    k = np.minimum(k, caps)
    while k.sum() < d:
        room = np.array([k[i] < caps[i] for i in range(len(k))])
        gap = np.where(room, raw - k, -np.inf)
        k[int(np.argmax(gap))] += 1
    while k.sum() > d:
        k[int(np.argmax(np.where(k > 1, k - raw, -np.inf)))] -= 1
    return [int(v) for v in k]


class Projector:
    """A block-diagonal linear map: per block (slice, mean or None, [D_b, k_b] matrix). Also the squared
    centred norm per block, for the residual coordinate."""

    def __init__(self, name: str, parts: list[tuple[slice, np.ndarray | None, np.ndarray]], fit_s: float,
                 orthonormal: bool):
        self.name, self.parts, self.fit_s, self.orthonormal = name, parts, fit_s, orthonormal
        self.dim = sum(p[2].shape[1] for p in parts)
        self.proj_s = 0.0
        self.nbytes = sum(p[2].nbytes + (p[1].nbytes if p[1] is not None else 0) for p in parts)
        self.torch_parts = [(p[0], None if p[1] is None else torch.from_numpy(p[1]), torch.from_numpy(p[2]))
                            for p in parts]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        ys, res = [], torch.zeros(len(x), dtype=torch.float64)
        for sl, mu, mat in self.torch_parts:
            xb = x[:, sl]
            if mu is not None:
                xb = xb - mu
            y = xb @ mat
            ys.append(y)
            if self.orthonormal:
                res += (xb.double() ** 2).sum(1) - (y.double() ** 2).sum(1)
        self.proj_s += time.perf_counter() - t0
        return torch.cat(ys, 1), res.clamp_min(0)


def make_projectors(ds: dict, args, blocks: list[slice]) -> list[Projector]:
    """Every projector for one database; nested variants (smaller d) are cut from these later."""
    store, n = ds["store"], len(ds["store"])
    dmax = max(args.dims)
    rng = np.random.default_rng(1)
    fit_sizes = sorted({min(f, n) for f in args.fit_sizes})
    order = rng.permutation(n)
    projectors = []
    big = fit_sizes[-1]
    t0 = time.perf_counter()
    sample16 = np.ascontiguousarray(store[np.sort(order[:big])])
    load_s = time.perf_counter() - t0
    for f in fit_sizes:
        # The f-sample is the first f of one random order (nested samples).
        rows = np.searchsorted(np.sort(order[:big]), np.sort(order[:f]))
        sub = sample16 if f == big else sample16[rows]
        scale = SCALE16 if store.dtype == np.float16 else 1.0
        t0 = time.perf_counter()
        bp = BlockPCA(sub, blocks, scale=scale)
        k_whole = min(dmax, f - 1)
        whole = bp.components(*bp.whole_eig, k_whole, slice(0, store.shape[1]))
        whole_s = time.perf_counter() - t0
        projectors.append(Projector(f"pca-f{f}", [(slice(0, store.shape[1]), bp.mean.copy(), whole.T.copy())],
                                    whole_s + load_s * f / big, True))
        projectors[-1].eigvals = bp.whole_eig[0]
        log(f"{ds['name']}: PCA fit on {f}: Grams {bp.gram_s:.0f} s, eigh {bp.eig_s:.0f} s, total {whole_s:.0f} s")
        if f == big or args.blocks_all_fits:
            t0 = time.perf_counter()
            kmax = [0] * len(blocks)
            for d in args.dims:
                for split in (bp.share_split(d), bp.eig_split(d)):
                    kmax = [max(a, b) for a, b in zip(kmax, split)]
            parts = []
            for i, b in enumerate(blocks):
                comp = bp.components(*bp.block_eig[i], kmax[i], b)
                parts.append((b, bp.mean[b].copy(), comp.T.copy()))
            blk = Projector(f"blocks-f{f}", parts, time.perf_counter() - t0 + bp.gram_s + bp.eig_s, True)
            blk.splits = {d: {"share": bp.share_split(d), "eig": bp.eig_split(d)} for d in args.dims}
            blk.kmax = kmax
            blk.block_share = (bp.block_var / bp.block_var.sum()).tolist()
            projectors.append(blk)
            log(f"{ds['name']}: blocks-PCA on {f}: per-block components {kmax}")
        del bp, sub
    del sample16
    # Random projections (no fit): one Gaussian for the whole descriptor, one per block (split by the
    # variance share of the largest fit sample, i.e. the last blocks projector).
    share = np.array(projectors[-1].block_share)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    mat = (torch.randn(store.shape[1], dmax, generator=g) / math.sqrt(dmax)).numpy()
    projectors.append(Projector("random", [(slice(0, store.shape[1]), None, mat)], time.perf_counter() - t0, False))
    t0 = time.perf_counter()
    split = split_by_share(share, dmax, [b.stop - b.start for b in blocks])
    parts = [(b, None, (torch.randn(b.stop - b.start, k, generator=g) / math.sqrt(k)).numpy())
             for b, k in zip(blocks, split)]
    rb = Projector("blocks-random", parts, time.perf_counter() - t0, False)
    rb.split = split
    projectors.append(rb)
    return projectors


def project_all(ds: dict, projectors: list[Projector], chunk: int) -> dict:
    store, n = ds["store"], len(ds["store"])
    out = {p.name: (np.empty((n, p.dim), np.float32), np.empty(n, np.float64)) for p in projectors}
    for s in range(0, n, chunk):
        x = torch.from_numpy(rows_f32(store, slice(s, min(n, s + chunk))))
        for p in projectors:
            y, r = p(x)
            out[p.name][0][s : s + len(x)] = y.numpy()
            out[p.name][1][s : s + len(x)] = r.numpy()
    return out


def variants(projectors: list[Projector], reduced: dict, dims: list[int], n: int):
    """(name, method, fit, d, db vectors, residual or None, saved bytes, fit_s, per-image projection s)."""
    for p in projectors:
        y, res = reduced[p.name]
        per_image = p.proj_s / n
        if p.name.startswith("pca-"):
            f = int(p.name.split("-f")[1])
            for d in dims:
                if d >= f:
                    continue
                frac = d / p.dim
                ratio = float(p.eigvals[:d].sum() / p.eigvals.sum())
                base = dict(method="pca", fit=f, d=d, bytes=int(p.nbytes * frac), fit_s=p.fit_s,
                            proj_s_per_image=per_image * frac, explained=ratio)
                yc = y[:, :d]
                # residual of the d-dim cut: the full centred norm minus the dropped components' part
                rd = res + (y[:, d:].astype(np.float64) ** 2).sum(1)
                yield {"name": f"pca-{d} (fit {f})", **base}, yc, None
                yield {"name": f"pca-{d}+res (fit {f})", **base, "method": "pca+res"}, yc, rd
        elif p.name.startswith("blocks-f"):
            f = int(p.name.split("-f")[1])
            offsets = np.cumsum([0] + p.kmax)
            for d in dims:
                for rule in ("share", "eig"):
                    split = p.splits[d][rule]
                    cols = np.concatenate([np.arange(offsets[i], offsets[i] + k) for i, k in enumerate(split)])
                    frac = d / p.dim
                    yc = y[:, cols]
                    base = dict(method=f"blocks-pca-{rule}", fit=f, d=d, split=split, bytes=int(p.nbytes * frac),
                                fit_s=p.fit_s, proj_s_per_image=per_image * frac)
                    yield {"name": f"blocks-pca-{rule}-{d} (fit {f})", **base}, yc, None
                    dropped = np.setdiff1d(np.arange(p.dim), cols)
                    rd = res + (y[:, dropped].astype(np.float64) ** 2).sum(1)
                    yield {"name": f"blocks-pca-{rule}-{d}+res (fit {f})", **base,
                           "method": f"blocks-pca-{rule}+res"}, yc, rd
        elif p.name == "random":
            for d in dims:
                yc = y[:, :d] * math.sqrt(p.dim / d)
                yield {"name": f"random-{d}", "method": "random", "fit": 0, "d": d, "bytes": 8,
                       "matrix_bytes_if_stored": int(p.nbytes * d / p.dim), "fit_s": 0.0,
                       "proj_s_per_image": per_image * d / p.dim}, yc, None
        elif p.name == "blocks-random":
            yield {"name": f"blocks-random-{p.dim}", "method": "blocks-random", "fit": 0, "d": p.dim,
                   "split": p.split, "bytes": 8, "fit_s": 0.0, "proj_s_per_image": per_image}, y, None
    # PCA-d plus a Gaussian sketch of the residual (x − μ − Cᵀy): symmetric, d + m dims; the sketch is
    # cut from the random projection already computed: S r = S x − (C S)ᵀ y + const.
    pcas = [p for p in projectors if p.name.startswith("pca-")]
    rnd = next((p for p in projectors if p.name == "random"), None)
    if pcas and rnd is not None:
        p = pcas[-1]
        f = int(p.name.split("-f")[1])
        if not hasattr(p, "cs"):
            p.cs = (torch.from_numpy(p.parts[0][2]).T @ torch.from_numpy(rnd.parts[0][2])).numpy()  # [k, M]
        y, _ = reduced[p.name]
        z, _ = reduced[rnd.name]
        for d, m in ((64, 64), (128, 128), (256, 256), (384, 128)):
            if d >= p.dim or d + m > max(dims) or m > rnd.dim:
                continue
            scale = math.sqrt(rnd.dim / m)
            sketch = (z[:, :m] - y[:, :d] @ p.cs[:d, :m]) * scale
            vec = np.ascontiguousarray(np.hstack([y[:, :d], sketch]), dtype=np.float32)
            yield {"name": f"pca-{d}+sketch-{m} (fit {f})", "method": "pca+sketch", "fit": f, "d": d + m,
                   "bytes": int(p.nbytes * d / p.dim), "fit_s": p.fit_s,
                   "proj_s_per_image": (p.proj_s * d / p.dim + rnd.proj_s * m / rnd.dim) / n,
                   "explained": float(p.eigvals[:d].sum() / p.eigvals.sum())}, vec, None


# ----------------------------------------------------------------------------------------- quality


def reduced_search(y: np.ndarray, res: np.ndarray | None, anchors: np.ndarray, k_close: int, k_far: int,
                   k_cand: int, f_cand: int):
    """Brute force in the reduced space (what a flat FAISS index returns): anchors against all rows."""
    yt = torch.from_numpy(y).double()
    q = yt[anchors]
    d = (q * q).sum(1, keepdim=True) - 2 * q @ yt.T + (yt * yt).sum(1)[None]
    if res is not None:
        d = d + torch.from_numpy(res)[None]
    rows = torch.arange(len(anchors))
    a = torch.from_numpy(anchors)
    near, far = d.clone(), d.clone()
    near[rows, a] = torch.inf
    far[rows, a] = -torch.inf
    close = torch.topk(near, max(k_close, k_cand), dim=1, largest=False).indices.numpy()
    furthest = torch.topk(far, max(k_far, f_cand), dim=1, largest=True).indices.numpy()
    return close, furthest


def rerank_exact(ds: dict, cand: np.ndarray, k: int, furthest: bool) -> tuple[np.ndarray, float]:
    """Re-rank each anchor's candidates with exact distances from the stored (fp16) full descriptors;
    returns the top-k ids and the seconds per anchor."""
    store, anchors = ds["store"], ds["anchors"][: len(cand)]
    out = np.empty((len(anchors), k), np.int64)
    gather_s = compute_s = 0.0
    for i, a in enumerate(anchors):
        t0 = time.perf_counter()
        ids = np.sort(cand[i])
        x = torch.from_numpy(rows_f32(store, ids))
        q = torch.from_numpy(rows_f32(store, [a]))
        t1 = time.perf_counter()
        dist = ((x - q) ** 2).sum(1)
        top = torch.topk(dist, k, largest=furthest).indices.numpy()
        out[i] = ids[top]
        gather_s += t1 - t0
        compute_s += time.perf_counter() - t1
    return out, compute_s / len(anchors), gather_s / len(anchors)


def evaluate(ds: dict, args, projectors, reduced) -> list[dict]:
    rows = []
    anchors, n = ds["anchors"], len(ds["store"])
    kc, kf = args.k_close, args.k_far
    kc_cand, kf_cand = max(args.rerank_factors) * kc, max(args.rerank_factors) * kf
    for info, y, res in variants(projectors, reduced, args.dims, n):
        close, far = reduced_search(y, res, anchors, kc, kf, kc_cand, kf_cand)
        entry = {**info, "dim_searched": y.shape[1] + (res is not None),
                 "close_recall": round(close_recall(close[:, :kc], ds["close_ids"]), 4),
                 "far_precision": round(far_precision(far[:, :kf], ds["far_ids"]), 4)}
        for r in args.rerank_factors:
            entry[f"cand_recall_x{r}"] = round(close_recall(close[:, : r * kc], ds["close_ids"]), 4)
            entry[f"cand_far_recall_x{r}"] = round(close_recall(far[:, : r * kf], ds["far_ids"]), 4)
        entry["_close"], entry["_far"] = close, far
        rows.append(entry)
        log(f"{ds['name']}: {info['name']}: recall {entry['close_recall']} far {entry['far_precision']} "
            f"(x{args.rerank_factors[-1]} candidates: {entry[f'cand_recall_x{args.rerank_factors[-1]}']} / "
            f"{entry[f'cand_far_recall_x{args.rerank_factors[-1]}']})")
    return rows


# ----------------------------------------------------------------------------------------- timing


def faiss_seconds(y: np.ndarray, res: np.ndarray | None, args) -> float:
    """Flat FAISS close + far sets of all n rows (1 shard, in-process). With a residual coordinate the
    database carries sqrt(ρ) and queries 0 there: same index kind, one dimension more."""
    cfg = MiningConfig(k_close=args.k_close, k_far=args.k_far, index="flat", num_shards=1, use_gpu="never")
    t0 = time.perf_counter()
    if res is None:
        mine_neighbours(y, cfg)
    else:
        from step_ray.mining.index import ShardIndex

        db = np.ascontiguousarray(np.hstack([y, np.sqrt(res)[:, None].astype(np.float32)]))
        q = np.ascontiguousarray(np.hstack([y, np.zeros((len(y), 1), np.float32)]))
        shard = ShardIndex(db, 0, cfg)
        ids = np.arange(len(y))
        for s in range(0, len(y), cfg.query_batch):
            shard.search_close(q[s : s + cfg.query_batch], ids[s : s + cfg.query_batch], cfg.k_close)
            shard.search_far(q[s : s + cfg.query_batch], ids[s : s + cfg.query_batch], cfg.k_far)
    return time.perf_counter() - t0


def timing_rounds(ds: dict, args, timed: list[tuple[str, np.ndarray, np.ndarray | None]]) -> dict:
    """Exact (a slice of anchors against the whole database, float32 matrix products only) alternating
    with each FAISS configuration, --rounds times; medians and the load of each round."""
    store, n = ds["store"], len(ds["store"])
    q_ids = ds["anchors"][: args.exact_slice]
    queries = torch.from_numpy(rows_f32(store, q_ids))
    chunks = [torch.from_numpy(rows_f32(store, slice(s, min(n, s + args.chunk)))) for s in
              range(0, n, args.chunk)] if store.dtype != np.float16 else None
    results = {"exact_per_anchor_s": [], "load": [], "faiss": {name: [] for name, _, _ in timed}}
    faiss_seconds(timed[0][1], timed[0][2], args)  # warm-up (FAISS/OpenMP start), not counted
    for r in range(args.rounds):
        acc = ExactAccumulator(queries.numpy(), args.k_close, args.k_far, query_ids=q_ids)
        spent = 0.0
        for s in range(0, n, args.chunk):
            c = (
                chunks[s // args.chunk]
                if chunks is not None
                else torch.from_numpy(rows_f32(store, slice(s, min(n, s + args.chunk))))
            )
            t0 = time.perf_counter()
            acc.add(c)
            spent += time.perf_counter() - t0
        results["exact_per_anchor_s"].append(spent / len(q_ids))
        results["load"].append(loadavg())
        for name, y, res in timed:
            results["faiss"][name].append(faiss_seconds(y, res, args))
        log(f"{ds['name']}: timing round {r}: exact {spent / len(q_ids) * n:.0f} s for all anchors; " +
            ", ".join(f"{k} {v[-1]:.2f} s" for k, v in results["faiss"].items()))
    exact_all = float(np.median(results["exact_per_anchor_s"])) * n
    out = {"exact_all_anchors_s": round(exact_all, 1), "exact_slice_anchors": len(q_ids), "rounds": args.rounds,
           "load_per_round": results["load"],
           "exact_all_anchors_s_per_round": [round(v * n, 1) for v in results["exact_per_anchor_s"]],
           "faiss": {}}
    for name, ts in results["faiss"].items():
        # Ratio per round (same load), then the median of the ratios.
        ratios = [e * n / t for e, t in zip(results["exact_per_anchor_s"], ts)]
        out["faiss"][name] = {"seconds_per_round": [round(t, 3) for t in ts], "seconds": round(float(np.median(ts)), 3),
                              "speedup_vs_exact": round(float(np.median(ratios)), 1)}
    return out


# ----------------------------------------------------------------------------------------- main


def run_dataset(ds: dict, args, vgg) -> dict:
    blocks = block_slices(vgg.channels)
    n = len(ds["store"])
    log(f"{ds['name']}: n={n}, {len(ds['anchors'])} anchors, fitting reductions")
    projectors = make_projectors(ds, args, blocks)
    log(f"{ds['name']}: projecting {n} images with {len(projectors)} projectors")
    reduced = project_all(ds, projectors, args.chunk)
    rows = evaluate(ds, args, projectors, reduced)

    # Exact re-ranking of FAISS candidates from the best few reductions (by recall at the largest factor).
    rerank = []
    top_fit = max(e["fit"] for e in rows)
    picks = [e for e in rows if e["fit"] == top_fit and e["d"] == min(args.dims) and e["method"] in ("pca", "pca+res")]
    m = args.rerank_anchors
    for e in picks:
        for r in args.rerank_factors:
            close, t_close, g_close = rerank_exact(ds, e["_close"][:m, : r * args.k_close], args.k_close, False)
            far, t_far, g_far = rerank_exact(ds, e["_far"][:m, : r * args.k_far], args.k_far, True)
            item = {"first_stage": e["name"], "factor": r, "anchors": len(close),
                    "close_recall": round(close_recall(close, ds["close_ids"][:m]), 4),
                    "far_precision": round(far_precision(far, ds["far_ids"][:m]), 4),
                    "rerank_s_per_anchor": round(t_close + t_far, 5),
                    "rerank_all_anchors_s": round((t_close + t_far) * n, 1),
                    "gather_fp16_rows_s_per_anchor": round(g_close + g_far, 5),
                    "gather_all_anchors_s": round((g_close + g_far) * n, 1),
                    "stored_bytes_per_image": int(ds["store"].shape[1] * 2)}
            rerank.append(item)
            log(f"{ds['name']}: re-rank {item}")

    # FAISS timing against exact, for one variant per (method family, d) at the largest fit.
    seen = set()
    for e in rows:
        key = (e["method"], e["d"])
        if (
            e["d"] in args.time_dims
            and key not in seen
            and e["fit"] == max([x["fit"] for x in rows if x["method"] == e["method"]] or [0])
        ):
            seen.add(key)
    want = {e["name"] for e in rows if (e["method"], e["d"]) in seen and e["fit"] == max(
        [x["fit"] for x in rows if x["method"] == e["method"]] or [0])}
    # one time per distinct (searched dim, residual?) is enough: flat cost depends on n, d, k only
    by_shape = {}
    for info, y, res in variants(projectors, reduced, args.dims, n):
        if info["name"] in want:
            by_shape.setdefault(
                (y.shape[1], res is not None), (f"d={y.shape[1]}" + ("+res" if res is not None else ""), y, res)
            )
    timing = timing_rounds(ds, args, list(by_shape.values()))
    for e in rows:
        key = f"d={e['d']}" + ("+res" if "+res" in e["method"] else "")
        if key in timing["faiss"]:
            e["faiss_s"] = timing["faiss"][key]["seconds"]
            e["speedup_vs_exact"] = timing["faiss"][key]["speedup_vs_exact"]
    for item in rerank:
        first = next(e for e in rows if e["name"] == item["first_stage"])
        if "faiss_s" in first:
            total = first["faiss_s"] + item["rerank_all_anchors_s"]
            item["total_s"] = round(total, 2)
            item["speedup_vs_exact"] = round(timing["exact_all_anchors_s"] / total, 1)
    for e in rows:
        e.pop("_close"), e.pop("_far")
    extra = {}
    blk = [p for p in projectors if p.name.startswith("blocks-f")]
    if blk:
        extra["block_variance_share"] = [round(v, 4) for v in blk[-1].block_share]
    return {"n": n, "anchors": len(ds["anchors"]), "descriptor_meta": ds["meta"], "cached": ds["cached"],
            "timing": timing, "rows": rows, "rerank": rerank, **extra}


def markdown(name: str, res: dict, args) -> str:
    r = args.rerank_factors[-1]
    lines = [
        f"**{name}** (n = {res['n']}, {res['anchors']} anchors; "
        f"exact all anchors {res['timing']['exact_all_anchors_s']} s)",
        "",
        f"| reduction | d | fit sample | explained var. | recall@{args.k_close} | far precision@{args.k_far} "
        f"| cand. recall ×{r} (close / far) | FAISS s | speed-up vs exact | fit s | matrix MB | projection ms/image |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in res["rows"]:
        ev = f"{e['explained']:.3f}" if "explained" in e else "-"
        lines.append(
            f"| {e['name'].split(' (')[0]} | {e['d']} | {e['fit'] or '-'} | {ev} | {e['close_recall']:.3f} | "
            f"{e['far_precision']:.3f} | "
            f"{e[f'cand_recall_x{r}']:.3f} / {e[f'cand_far_recall_x{r}']:.3f} | {e.get('faiss_s', '-')} | "
            f"{str(e['speedup_vs_exact']) + '×' if 'speedup_vs_exact' in e else '-'} | {e['fit_s']:.1f} | "
            f"{e['bytes'] / 2**20:.1f} | {e['proj_s_per_image'] * 1e3:.3f} |"
        )
    if res["rerank"]:
        lines += [
            "",
            "| first stage (then exact re-rank from fp16 full descriptors) | candidates | anchors | recall "
            "| far precision "
            "| re-rank s, all anchors (+ gathering rows) | FAISS + re-rank s | speed-up vs exact |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for it in res["rerank"]:
            lines.append(
                f"| {it['first_stage']} | ×{it['factor']} | {it['anchors']} | {it['close_recall']:.3f} | "
                f"{it['far_precision']:.3f} | "
                f"{it['rerank_all_anchors_s']} (+ {it['gather_all_anchors_s']}) | {it.get('total_s', '-')} | "
                f"{str(it.get('speedup_vs_exact', '-')) + '×'} |"
            )
    return "\n".join(lines)


def dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that name the cached descriptor sets (synthetic_set / facades_set), shared with
    experiments/mining_sketch.py, which reads the same cache."""
    parser.add_argument("--cache", default="/tmp/mining_recall_cache")
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "facades"])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--anchors", type=int, default=500)
    parser.add_argument("--styles", type=int, default=32)
    parser.add_argument("--design", default="shared_palette", choices=["shared_palette", "hue"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--facades-size", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--k-close", type=int, default=5)
    parser.add_argument("--k-far", type=int, default=13)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dataset_arguments(parser)
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--fit-sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument(
        "--blocks-all-fits", action="store_true", help="blocks-PCA for every fit size, not only the largest"
    )
    parser.add_argument("--rerank-factors", type=int, nargs="+", default=[4, 10])
    parser.add_argument("--rerank-anchors", type=int, default=50, help="anchors whose candidates are re-ranked exactly")
    parser.add_argument("--time-dims", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--exact-slice", type=int, default=100, help="anchors per exact timing round")
    parser.add_argument("--json", default="experiments/results/mining_recall_real_vgg.json")
    parser.add_argument("--cache-only", action="store_true", help="compute and cache the descriptors, then stop")
    args = parser.parse_args(argv)
    args.dims = sorted(args.dims)
    args.rerank_factors = sorted(args.rerank_factors)
    torch.set_num_threads(os.cpu_count() or 1)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    vgg = _vgg()
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "load_start": loadavg(),
        "vgg_weights": vgg.weight_source,
        "args": vars(args),
        "datasets": {},
    }
    for name in args.datasets:
        ds = synthetic_set(args, cache, vgg) if name == "synthetic" else facades_set(args, cache, vgg)
        if args.cache_only:
            continue
        if name == "facades":
            sizes = sorted({min(f, len(ds["store"])) for f in args.fit_sizes})
            saved, args.fit_sizes = args.fit_sizes, sizes
            dims_saved = args.dims
            results["datasets"][name] = run_dataset(ds, args, vgg)
            args.fit_sizes, args.dims = saved, dims_saved
        else:
            results["datasets"][name] = run_dataset(ds, args, vgg)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(results, indent=1))
        del ds
    results["total_s"] = round(time.perf_counter() - started, 1)
    results["load_end"] = loadavg()
    for name, res in results["datasets"].items():
        print(markdown(name, res, args))
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
