"""Stage 1 of StEP in one job: style statistics -> triplet mining -> style-encoder training.

    python jobs/pretrain.py                                   # embedded default: local Ray, ./runs, synthetic data
    python jobs/pretrain.py --config configs/facades.yaml run.num_workers=2
    python jobs/pretrain.py --resume                          # continue the newest stage-1 run
    ray job submit --working-dir . -- python jobs/pretrain.py run.storage_path=s3://bucket/step_ray
"""
import sys

from step_ray.cluster import init_ray
from step_ray.config import job_config
from step_ray.preflight import (check_data_root, check_resources, check_shared_storage, check_storage, check_weights,
                                dataset_location, fail_fast)
from step_ray.pipelines.pretrain import PretrainJobConfig, run_pretrain


@fail_fast
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["run.resume=true" if a == "--resume" else a for a in argv]
    cfg = job_config(PretrainJobConfig, argv, description=__doc__)
    check_storage(cfg.run, "stage1")
    check_data_root(cfg.data.root, "data.root")
    check_weights(vgg=cfg.style.vgg)
    # A cluster address (RAY_ADDRESS, set by `ray job submit`) is joined; otherwise a local instance starts.
    init_ray()
    check_resources(cfg.run)
    check_shared_storage({"run.storage_path": cfg.run.storage_path, **dataset_location(cfg.data),
                          "cache_dir": cfg.cache_dir})
    run_pretrain(cfg)


if __name__ == "__main__":
    main()
