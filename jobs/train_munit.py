"""MUNIT (unpaired content/style translation, docs/method.md §7) on a pix2pix-layout set used without its pairs,
then its evaluation (example-guided transfer, random-style sampling, LPIPS diversity, PSNR/LPIPS with the
true B's style where pairs exist).

    python jobs/train_munit.py                                           # the synthetic set, local Ray, ./runs
    python jobs/train_munit.py data.root=/data/edges2shoes data.image_size=256 run.num_workers=4
    python jobs/train_munit.py train.weights.cyc=10 train.weights.vgg=1   # the optional terms
    python jobs/train_munit.py --resume
"""
import sys

from step_ray.cluster import init_ray
from step_ray.config import job_config
from step_ray.eval.metrics import LPIPSConfig
from step_ray.preflight import (check_data_root, check_resources, check_shared_storage, check_storage, check_weights,
                                dataset_location, fail_fast)
from step_ray.pipelines.train_munit import MUNITJobConfig, run_train_munit


@fail_fast
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["run.resume=true" if a == "--resume" else a for a in argv]
    cfg = job_config(MUNITJobConfig, argv, description=__doc__)
    check_storage(cfg.run, "munit")
    check_data_root(cfg.data.root)
    check_weights(vgg=cfg.train.vgg if cfg.train.weights.vgg else None, lpips=LPIPSConfig())
    init_ray()
    check_resources(cfg.run)
    check_shared_storage({"run.storage_path": cfg.run.storage_path, **dataset_location(cfg.data)})
    run_train_munit(cfg).print_summary()


if __name__ == "__main__":
    main()
