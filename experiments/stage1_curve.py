"""Stage-1 learning curves: held-out triplet-order accuracy and rank correlation against training steps,
one line per run, with the linear PCA-8 ceiling (experiments/stage1_hypotheses.py's JSON) drawn across.

    python experiments/stage1_curve.py --runs runs/fac-vgg:vgg_gram runs/fac-s1-e100:conv \
        --ceiling experiments/results/stage1_heads_facades64.json --out docs/images/stage1_learning_curve_facades64.png

Each run is a stage-1 run folder (its metrics.json, written by jobs/pretrain.py) or a JSON file holding
the same `history`, optionally `:label`. The picture in docs/ was drawn from the two kept in experiments/results/:

    python experiments/stage1_curve.py --runs "experiments/results/stage1_facades64_vgg_gram.json:vgg_gram E" \
        "experiments/results/stage1_facades64_conv_e100.json:official conv E" \
        --ceiling experiments/results/stage1_heads_facades64.json --out docs/images/stage1_learning_curve_facades64.png
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from step_ray import storage  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="run folder[:label]")
    p.add_argument("--ceiling", default="", help="stage1_hypotheses.py JSON (its ceiling_pca8)")
    p.add_argument("--title", default="stage 1 on facades, 64 px, real VGG-16")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for spec in args.runs:
        folder, _, label = spec.partition(":")
        m = json.loads(storage.read_bytes(folder if folder.endswith(".json") else storage.join(folder, "metrics.json")))
        hist = m["history"]
        first = hist[0]
        steps = [0] + [h["step"] for h in hist]
        for ax, key in zip(axes, ("val_triplet_acc", "val_rank_corr")):
            ax.plot(steps, [first[f"untrained_{key}"]] + [h[key] for h in hist], marker=".", label=label or folder)
    if args.ceiling:
        heads = json.loads(storage.read_bytes(args.ceiling))
        ceiling = heads["ceiling_pca8"]["val"]
        oracle = [r["val"] for r in heads["rows"] if r["feature"] == "pca-32"]  # triplet-trained, exact input
        for ax, key in zip(axes, ("triplet_acc", "rank_corr")):
            ax.axhline(
                ceiling[key], color="k", ls="--", lw=1, label=f"PCA-8 of the exact descriptors ({ceiling[key]:.2f})"
            )
            best = max(o[key] for o in oracle)
            ax.axhline(best, color="grey", ls="-.", lw=1, label=f"best triplet-trained code of them ({best:.2f})")
    for ax, name in zip(axes, ("held-out triplet-order accuracy", "held-out rank correlation")):
        ax.axhline(0.85, color="r", ls=":", lw=1, label="target 0.85")
        ax.set_xlabel("training steps")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
