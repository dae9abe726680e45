"""The results of a sweep as the paper's ablation table (docs/method.md §7, §9): Markdown, CSV and a plot.

Input: one row per trial (variant, seed, sampled settings, status, which parts the variant switches on,
and its numbers). Output, in the experiment folder (local or s3://):

* results.md  — one line per (variant, sampled settings), grouped BicycleGAN / MUNIT-p / Ours in the
  paper's order, check marks for the parts, mean ± std over seeds; then every trial;
* results.csv — the same per-variant lines (mean and std columns), and trials.csv, one line per trial;
* results.png — reconstruction LPIPS (lower is better) against diversity (higher is better), one point
  per variant: filled from reference styles, hollow from mapper samples;
* curves.png — each trial's validation LPIPS against its wall time (rows with a `history` of epoch
  reports {time_total_s, val_lpips}), the sweep's LPIPS target drawn across.
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any

import numpy as np

from step_ray import storage

METRICS = (  # (row key, column title)
    ("psnr", "PSNR ↑"),
    ("lpips", "LPIPS ↓"),
    ("diversity_refs", "div. refs ↑"),
    ("diversity_mapper", "div. samples ↑"),
    ("fid_refs", "FID refs ↓"),  # FID/KID: absent (–) where no FID Inception was found
    ("kid_refs", "KID refs ↓"),
    ("fid_mapper", "FID samples ↓"),
    ("fid_real_floor", "FID real floor"),
    ("train_seconds", "train s"),
    ("images_per_s", "img/s"),
    ("seconds_to_lpips", "s to val LPIPS"),  # the sweep's lpips_target; a column only when it is set
)
PARTS = (("encoder", "E"), ("vae", "VAE"), ("kl", "KL"), ("l2_z", "L2 z"), ("cycle", "cycle"), ("random_z", "random z"),
         ("rec", "rec"))
FAMILY_ORDER = ("BicycleGAN", "MUNIT", "MUNIT-p", "Ours", "Multi-domain")


def _mark(value: Any) -> str:
    if isinstance(value, bool):
        return "✓" if value else ""
    return str(value)


def _finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (variant, params): mean and std of each metric over the trials that reported it."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row.get("params", "{}")), []).append(row)

    def order(key):
        first = groups[key][0]
        family = FAMILY_ORDER.index(first["family"]) if first["family"] in FAMILY_ORDER else len(FAMILY_ORDER)
        return family, first["version"], key[1]

    out = []
    for key in sorted(groups, key=order):
        trials = groups[key]
        line = {k: trials[0][k] for k in ("variant", "family", "version", "params")}
        line.update({name: trials[0].get(name) for name, _ in PARTS})
        line["trials"] = len(trials)
        line["finished"] = sum(t.get("status") == "TERMINATED" for t in trials)
        for name, _ in METRICS:
            values = _finite([t.get(name) for t in trials])
            line[name] = float(np.mean(values)) if values else float("nan")
            line[f"{name}_std"] = float(np.std(values)) if len(values) > 1 else 0.0 if values else float("nan")
            line[f"{name}_n"] = len(values)
        # a trial that never reached the LPIPS target has nan (no target: None)
        line["seconds_to_lpips_of"] = sum(t.get("seconds_to_lpips") is not None for t in trials)
        out.append(line)
    return out


def _fmt(line: dict[str, Any], name: str) -> str:
    mean, std, n = line[name], line[f"{name}_std"], line[f"{name}_n"]
    of = line.get("seconds_to_lpips_of", 0) if name == "seconds_to_lpips" else n
    if not n:
        return "not reached" if of else "–"
    one_decimal = name in ("train_seconds", "images_per_s") or name.startswith("fid")
    digits = (0 if name == "seconds_to_lpips" else 1 if one_decimal
              else 2 if name == "psnr" else 4 if name.startswith("kid") else 3)
    return (f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")
            + (f" ({n}/{of} reached)" if n < of else ""))


def shown_metrics(lpips_target: float) -> list[tuple[str, str]]:
    """The table's metric columns: "s to val LPIPS" only with a target, which its title then states."""
    return [(name, f"s to val LPIPS ≤ {lpips_target:g}" if name == "seconds_to_lpips" else title)
            for name, title in METRICS if name != "seconds_to_lpips" or lpips_target]


def markdown(lines: list[dict[str, Any]], rows: list[dict[str, Any]], title: str = "Ablation sweep",
             lpips_target: float = 0.0) -> str:
    with_params = any(line["params"] not in ("", "{}") for line in lines)
    metrics = shown_metrics(lpips_target)
    head = (["method", "ver."] + (["settings"] if with_params else []) + [t for _, t in PARTS]
            + [t for _, t in metrics] + ["trials"])
    out = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    family = None
    for line in lines:
        name = line["family"] if line["family"] != family else ""
        family = line["family"]
        cells = [name, line["version"]] + ([line["params"]] if with_params else [])
        cells += [_mark(line[p]) for p, _ in PARTS] + [_fmt(line, m) for m, _ in metrics]
        cells.append(f"{line['finished']}/{line['trials']}")
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Mean ± std over seeds. PSNR and LPIPS: reconstruction G(A, E(B)) against B on the validation "
            "split; div.: mean pairwise LPIPS of one input's outputs under reference styles / sampled styles "
            "(the IMLE mapper's samples; MUNIT: N(0, I) style codes, its own sampling); MUNIT's PSNR/LPIPS use "
            "the true B's style code; train s: wall time of the training stages; img/s: the last epoch's "
            "training throughput; "
            + (f"s to val LPIPS ≤ {lpips_target:g}: the trial's wall time at its first epoch whose validation LPIPS "
               "(G_ema, 64 val pairs) reached it, mean over the seeds that reached it (not reached: none did); "
               if lpips_target else "")
            + "trials: evaluated / run.", "", "## Trials", "",
            "| trial | variant | seed | settings | status | epochs | last val PSNR | last val LPIPS | PSNR | LPIPS "
            "| error |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        def num(key, digits=3):
            value = row.get(key)
            return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "–"
        out.append(f"| {row.get('trial_id', '')} | {row['variant']} | {row['seed']} | {row.get('params', '')} "
                   f"| {row.get('status', '')} | {row.get('epochs', '–')} | {num('val_psnr', 2)} "
                   f"| {num('val_lpips')} | {num('psnr', 2)} | {num('lpips')} "
                   f"| {_short_error(row.get('error', ''))} |")
    return "\n".join(out) + "\n"


def _short_error(text: str) -> str:
    """The last line of an error (its type and message), cut to fit a table cell."""
    lines = [ln.strip() for ln in str(text or "").splitlines() if ln.strip()]
    return (lines[-1][:120] if lines else "").replace("|", "/")


def _csv(records: list[dict[str, Any]]) -> bytes:
    keys: list[str] = []
    for record in records:
        keys += [k for k in record if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue().encode()


def _png(fig) -> bytes:
    """The figure, gridded and laid out, as PNG bytes (and closed)."""
    import matplotlib.pyplot as plt

    for ax in fig.axes:
        ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot(lines: list[dict[str, Any]]) -> bytes:
    """Reconstruction LPIPS against diversity, one point per variant (PNG bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"BicycleGAN": "tab:blue", "MUNIT": "tab:red", "MUNIT-p": "tab:orange", "Ours": "tab:green",
               "Multi-domain": "tab:purple"}
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for line in lines:
        if not line["lpips_n"]:
            continue
        colour = colours.get(line["family"], "tab:gray")
        label = line["variant"] + ("" if line["params"] in ("", "{}") else f" {line['params']}")
        if line["diversity_refs_n"]:
            ax.errorbar(line["lpips"], line["diversity_refs"], xerr=line["lpips_std"] or None,
                        yerr=line["diversity_refs_std"] or None, fmt="o", color=colour)
            ax.annotate(label, (line["lpips"], line["diversity_refs"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        if line["diversity_mapper_n"]:
            ax.plot(line["lpips"], line["diversity_mapper"], "o", mfc="none", color=colour)
    for family, colour in colours.items():
        ax.plot([], [], "o", color=colour, label=family)
    ax.plot([], [], "o", mfc="none", color="k", label="sampled styles")
    ax.set_xlabel("reconstruction LPIPS ↓")
    ax.set_ylabel("diversity (mean pairwise LPIPS) ↑")
    ax.set_title("Reconstruction against diversity, one point per variant")
    ax.legend(fontsize=8)
    return _png(fig)


def curves_plot(rows: list[dict[str, Any]], lpips_target: float = 0.0) -> bytes:
    """Validation LPIPS against wall time, one line per trial (a colour per variant, the seeds alike)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(line["variant"] for line in aggregate(rows)))  # the table's order
    colours = plt.get_cmap("tab20" if len(variants) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    labelled = set()
    for row in rows:
        history = row.get("history") or []
        if not history:
            continue
        colour = colours(variants.index(row["variant"]) % colours.N)
        label = None if row["variant"] in labelled else row["variant"]
        labelled.add(row["variant"])
        ax.plot([h["time_total_s"] for h in history], [h["val_lpips"] for h in history], "o-", ms=3, lw=1,
                color=colour, label=label)
    if lpips_target:
        ax.axhline(lpips_target, color="k", ls="--", lw=0.8, label=f"target {lpips_target:g}")
    ax.set_xlabel("trial wall time (s)")
    ax.set_ylabel("validation LPIPS ↓")
    ax.set_title("Validation LPIPS during training, one line per trial")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def write_results(rows: list[dict[str, Any]], folder: str, title: str = "Ablation sweep",
                  lpips_target: float = 0.0) -> dict[str, str]:
    """results.md, results.csv, trials.csv, results.png and curves.png under `folder`; returns their URIs."""
    lines = aggregate(rows)
    files = {"md": storage.join(folder, "results.md"), "csv": storage.join(folder, "results.csv"),
             "trials_csv": storage.join(folder, "trials.csv"), "png": storage.join(folder, "results.png"),
             "curves_png": storage.join(folder, "curves.png")}
    storage.write_bytes(files["md"], markdown(lines, rows, title, lpips_target).encode())
    storage.write_bytes(files["csv"], _csv(lines))
    storage.write_bytes(files["trials_csv"], _csv([{k: v for k, v in row.items() if k != "history"} for row in rows]))
    storage.write_bytes(files["png"], plot(lines))
    storage.write_bytes(files["curves_png"], curves_plot(rows, lpips_target))
    return files
