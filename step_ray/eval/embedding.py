"""Pictures of a style space: a 2-D projection of z coloured by style, and nearest-neighbour grids."""
from __future__ import annotations

import io

import numpy as np

from step_ray import storage


def project_2d(z: np.ndarray) -> np.ndarray:
    """PCA to two dimensions (deterministic: the sign of each axis is fixed by its largest loading)."""
    centred = z - z.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(1)])[:, None]
    return centred @ axes.T


def plot_embedding(z: np.ndarray, labels: np.ndarray, uri: str, title: str, label_name: str = "style id") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = project_2d(z) if z.shape[1] > 2 else z
    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    cmap = plt.get_cmap("tab10" if labels.max() < 10 else "tab20")
    for label in np.unique(labels):
        m = labels == label
        ax.scatter(xy[m, 0], xy[m, 1], s=14, color=cmap(int(label) % cmap.N), label=f"{label_name} {label}", alpha=0.85)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("PC 1 of z")
    ax.set_ylabel("PC 2 of z")
    ax.legend(fontsize=7, markerscale=1.2, loc="best", ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def image_grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """uint8 HWC images laid out row by row on a white canvas."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y : y + h, x : x + w] = img
    return canvas


def save_png(uri: str, image: np.ndarray) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    storage.write_bytes(uri, buf.getvalue())


def neighbour_grid(images: np.ndarray, z: np.ndarray, exact: np.ndarray, anchors: np.ndarray, k: int = 5) -> np.ndarray:
    """Per anchor, two rows: [anchor | its k nearest by z] and [anchor | its k nearest by exact distance]."""
    dz = ((z[:, None] - z[None]) ** 2).sum(-1)
    rows = []
    for a in anchors:
        by_z = [i for i in np.argsort(dz[a]) if i != a][:k]
        by_exact = [i for i in np.argsort(exact[a]) if i != a][:k]
        rows.append([images[a]] + [images[i] for i in by_z])
        rows.append([images[a]] + [images[i] for i in by_exact])
    return image_grid(rows)
