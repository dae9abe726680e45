"""Ray Tune sweeps over StEP's baselines and ablations (variants × seeds) and over loss weights,
ending in the paper's ablation table (results.md / results.csv / results.png in the experiment folder).

    python jobs/sweep.py --config configs/sweeps/ablation_synthetic.yaml \\
        trial.encoder_checkpoint=runs/stage1-.../checkpoint_epoch0003
    python jobs/sweep.py --config configs/sweeps/ablation_synthetic.yaml variants=[bicycle_v2,ours_v4] seeds=[0,1,2]
    python jobs/sweep.py variants=[ours_v4] search_space=configs/sweeps/loss_weights.yaml num_samples=4 asha=true \\
        trial.encoder_checkpoint=... storage_path=s3://bucket/sweeps
    python jobs/sweep.py name=sweep-20261125-120000 resume=true   # continue an interrupted sweep (same config)
    python jobs/sweep.py name=sweep-20261125-120000 table_only=true   # rebuild the table

`trial.*` are the GeneratorJobConfig settings every trial gets (over its variant's preset), e.g.
trial.stage2_epochs=5 trial.run.num_workers=2 trial.data.root=s3://bucket/facades.
"""
import sys

from step_ray.cluster import init_ray
from step_ray.config import job_config
from step_ray.preflight import fail_fast
from step_ray.pipelines.sweep import SweepJobConfig, run_sweep


@fail_fast
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["resume=true" if a == "--resume" else a for a in argv]
    cfg = job_config(SweepJobConfig, argv, description=__doc__)
    # A cluster address (RAY_ADDRESS, set by `ray job submit`) is joined; otherwise a local instance starts.
    # table_only reads Tune's saved experiment and needs no Ray (nor does it disturb a sweep running beside it).
    if not cfg.table_only:
        init_ray()
    out = run_sweep(cfg)
    print(f"[sweep] {'experiment':<10} {out.experiment}", flush=True)
    for key in ("md", "csv", "png", "curves_png"):
        print(f"[sweep] {key:<10} {out.tables[key]}", flush=True)


if __name__ == "__main__":
    main()
