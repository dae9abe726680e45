"""Stages 2 and 3 of StEP from a stage-1 checkpoint, then the IMLE mapper and the evaluation.

    python jobs/train_generator.py encoder_checkpoint=runs/stage1-.../checkpoint_epoch0009
    python jobs/train_generator.py --config configs/facades_generator.yaml run.num_workers=2
    python jobs/train_generator.py encoder_checkpoint=s3://bucket/runs/stage1-.../checkpoint_epoch0009 \
        run.storage_path=s3://bucket/runs stage2_epochs=20 stage3_epochs=20 train.generator.z_injection=input
    python jobs/train_generator.py stage2_checkpoint=runs/stage2-.../checkpoint_epoch0019   # stage 3 (+ mapper, eval) only
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from step_ray.config import job_config  # noqa: E402
from step_ray.train.generator import TrainGeneratorConfig, run_train_generator  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["run.resume=true" if a == "--resume" else a for a in argv]
    cfg = job_config(TrainGeneratorConfig, argv, description=__doc__)
    if not (cfg.encoder_checkpoint or cfg.stage2_checkpoint):
        print("config error: set encoder_checkpoint=<stage-1 checkpoint folder, local or s3://> "
              "(or stage2_checkpoint=<stage-2 checkpoint> to run stage 3 only)", file=sys.stderr)
        raise SystemExit(2)
    import ray

    # A cluster address (RAY_ADDRESS, set by `ray job submit`) is joined; otherwise a local instance starts.
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    out = run_train_generator(cfg)
    for key in ("stage2", "stage3", "mapper", "eval", "metrics"):
        if key in out:
            print(f"[train_generator] {key:<7} {out[key]}", flush=True)


if __name__ == "__main__":
    main()
