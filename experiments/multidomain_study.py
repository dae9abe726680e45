"""The multi-domain style model's claims, measured: the full model against itself without L_uni, without
L_smooth and without both (StarGAN v2's objective with the flow mapper), over seeds (docs/method.md §7, §9).

    python experiments/multidomain_study.py --config configs/multidomain_synthetic.yaml --seeds 0 1 \
        --json experiments/results/multidomain_study.json [key=value ...]

Every run is `jobs/train_multidomain.py`'s pipeline with the given config and overrides, plus each arm's
switches; the evaluation is the job's (StarGAN v2's protocol per target domain, unification, smoothness,
DCI disentanglement). Prints two tables, each figure's mean ± std (or mean) over the seeds: the arms, and
per target domain and mode; writes every run's metrics and per-epoch history to --json (`--table-only`
prints the tables of an existing one).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ARMS = {
    "full": [],
    "no L_uni": ["train.weights.uni=0"],
    "no L_smooth": ["train.weights.smooth=0"],
    "neither (StarGAN v2 + flow)": ["train.weights.uni=0", "train.weights.smooth=0"],
}
RUN_NAMES = {"full": "full", "no L_uni": "no-uni", "no L_smooth": "no-smooth", "neither (StarGAN v2 + flow)": "neither"}
COLUMNS = [  # (metrics key, header); the protocol's means over target domains
    ("unification_accuracy", "unification acc ↓"),
    ("interp_lpips_mean", "interp. step"), ("interp_lpips_var", "interp. var ↓"),
    ("interp_lpips_max_over_mean", "largest/mean step ↓"),
    ("dci.disentanglement", "DCI D ↑"), ("dci.completeness", "DCI C ↑"), ("dci.informativeness", "DCI I ↑"),
    ("diversity_latent", "LPIPS div. latent ↑"), ("diversity_reference", "LPIPS div. ref ↑"),
    ("fid_latent", "FID latent ↓"), ("fid_reference", "FID ref ↓"), ("kid_latent", "KID latent ↓"),
    ("kid_reference", "KID ref ↓"), ("fid_floor", "FID floor"),
]


def _get(metrics: dict, key: str):
    value = metrics
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value if isinstance(value, (int, float)) else None


def table(runs: list[dict]) -> str:
    import numpy as np

    lines = ["| arm | seeds | " + " | ".join(h for _, h in COLUMNS) + " | train s |",
             "|---" * (len(COLUMNS) + 3) + "|"]
    for arm in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == arm]
        cells = []
        for key, _ in COLUMNS:
            values = [v for v in (_get(r["metrics"], key) for r in mine) if v is not None]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "—")
        seconds = np.mean([r["train_seconds"] for r in mine])
        lines.append(f"| {arm} | {len(mine)} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    return "\n".join(lines)


def domain_table(runs: list[dict]) -> str:
    """StarGAN v2's per-domain view: for each arm, target domain and mode, FID, KID and LPIPS diversity
    (means over the seeds), beside the domain's real-vs-real floor."""
    import numpy as np

    lines = ["| arm | target domain | mode | FID ↓ | KID ↓ | LPIPS div. ↑ | FID floor |", "|---" * 7 + "|"]
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rows = [p for r in runs if r["arm"] == arm for p in r["metrics"].get("protocol", [])]
        for domain, mode in dict.fromkeys((p["domain"], p["mode"]) for p in rows):
            mine = [p for p in rows if (p["domain"], p["mode"]) == (domain, mode)]
            cells = [f"{np.mean([p[k] for p in mine]):.{digits}f}" if all(k in p for p in mine) else "—"
                     for k, digits in (("fid", 1), ("kid", 3), ("diversity", 3), ("fid_floor", 1))]
            lines.append(f"| {arm} | {domain} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/multidomain_synthetic.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--storage", default="runs/multidomain_study")
    p.add_argument("--json", default="experiments/results/multidomain_study.json")
    p.add_argument("--table-only", action="store_true", help="print the tables of an existing --json; train nothing")
    args, overrides = p.parse_known_args(argv)
    if args.table_only:
        runs = json.loads(Path(args.json).read_text())["runs"]
        print(table(runs) + "\n\n" + domain_table(runs))
        return

    from step_ray.cluster import init_ray
    from step_ray.config import load_config
    from step_ray.pipelines.train_multidomain import MultiDomainJobConfig, run_train_multidomain

    init_ray()
    runs, started = [], time.time()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for arm in args.arms:
            name = f"{RUN_NAMES[arm]}-seed{seed}"  # distinct per arm: a run of the same name is resumed
            cfg = load_config(MultiDomainJobConfig, args.config,
                              [*overrides, *ARMS[arm], f"train.seed={seed}", f"run.storage_path={args.storage}",
                               f"run.name={name}"])
            result = run_train_multidomain(cfg)
            history = json.loads((Path(result.checkpoint) / "state.json").read_text())["history"]
            runs.append({"arm": arm, "seed": seed, "checkpoint": result.checkpoint, "metrics": result.eval_metrics,
                         "train_seconds": result.train_seconds,
                         "history": [{k: h.get(k) for k in ("epoch", "val_unification_accuracy", "val_ds_accuracy",
                                                            "val_style_gap")} for h in history]})
            print(f"[study] {arm} seed {seed}: unification acc {result.eval_metrics['unification_accuracy']:.3f}, "
                  f"{result.train_seconds:.0f} s", flush=True)
            out.write_text(json.dumps({"command": " ".join(["python experiments/multidomain_study.py",
                                                                   *(sys.argv[1:] if argv is None else argv)]),
                                       "overrides": overrides, "machine": platform.platform(),
                                       "date": time.strftime("%Y-%m-%d"), "runs": runs}, indent=1, default=float))
    print(table(runs) + "\n\n" + domain_table(runs))
    print(f"[study] {len(runs)} runs in {time.time() - started:.0f} s -> {out}")


if __name__ == "__main__":
    main()
