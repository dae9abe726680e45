"""The generalisation table (docs/method.md §9): one generator variant trained on one set with style encoders
pre-trained on different sets, read from each sweep's trials.csv (step_ray.eval.ablation_table.write_results)."""
from __future__ import annotations

import csv
import io
import math

import numpy as np

from step_ray import storage

COLUMNS = (("psnr", "PSNR ↑", 2), ("lpips", "LPIPS ↓", 3), ("psnr_other_style", "PSNR, another photo's code", 2),
           ("margin", "margin (dB) ↑", 3), ("diversity_refs", "div. refs ↑", 3),
           ("diversity_mapper", "div. samples ↑", 3))


def read_trials(folder: str, variant: str) -> list[dict[str, float]]:
    """The evaluated trials of `variant` in a sweep's trials.csv, with margin = PSNR − PSNR other style."""
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(storage.join(folder, "trials.csv")).decode())))
    out = []
    for row in rows:
        if row["variant"] != variant or row.get("evaluated") not in ("True", "true", "1"):
            continue
        values = {k: float(row[k]) if row.get(k) not in (None, "") else math.nan
                  for k in ("psnr", "lpips", "psnr_other_style", "diversity_refs", "diversity_mapper")}
        values["margin"] = values["psnr"] - values["psnr_other_style"]
        values["seed"] = int(row["seed"])
        out.append(values)
    return out


def _cell(values: list[float], digits: int) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "–"
    mean = f"{np.mean(values):.{digits}f}"
    return mean + (f" ± {np.std(values):.{digits}f}" if len(values) > 1 else "")


def generalisation_table(groups: list[tuple[str, list[dict[str, float]]]], variant: str,
                         order: list[dict[str, float]] | None = None) -> str:
    """Markdown: one row per (label, trials) group, mean ± std over its seeds; `order`, one per group, adds
    each E's held-out style order on the target set (accuracy / rank correlation)."""
    head = ["E pre-trained on"] + (["E's style order on facades val (acc / rho)"] if order else []) + \
        [title for _, title, _ in COLUMNS] + ["seeds"]
    lines = [f"Generalisation: {variant} trained on facades, E pre-trained on each set", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (label, trials) in enumerate(groups):
        cells = [label] + ([f"{order[i]['order_acc']:.3f} / {order[i]['order_rho']:.3f}"] if order else [])
        cells += [_cell([t[key] for t in trials], digits) for key, _, digits in COLUMNS]
        cells.append(", ".join(str(t["seed"]) for t in sorted(trials, key=lambda t: t["seed"])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
