"""Stage 1 of StEP in one job: style statistics -> triplet mining -> style-encoder training.

    python jobs/pretrain.py                                   # embedded default: local Ray, ./runs, synthetic data
    python jobs/pretrain.py --config configs/facades.yaml run.num_workers=2
    python jobs/pretrain.py --resume                          # continue the newest stage-1 run
    ray job submit --working-dir . -- python jobs/pretrain.py run.storage_path=s3://bucket/step_ray
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from step_ray.config import job_config  # noqa: E402
from step_ray.train.pretrain import PretrainConfig, run_pretrain  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["run.resume=true" if a == "--resume" else a for a in argv]
    cfg = job_config(PretrainConfig, argv, description=__doc__)
    import ray

    # A cluster address (RAY_ADDRESS, set by `ray job submit`) is joined; otherwise a local instance starts.
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    run_pretrain(cfg)


if __name__ == "__main__":
    main()
