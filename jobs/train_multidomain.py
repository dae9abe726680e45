"""The multi-domain disentangled style model (docs/method.md §7, seed 004): a domain-conditioned neural spline flow
for latent styles, a per-domain style encoder, L_uni (latent and reference styles in one space) and
L_smooth (a smooth encoder), then its evaluation (grids, diversity per domain, unification, smoothness).

    python jobs/train_multidomain.py                                   # synthetic set: domains = style families
    python jobs/train_multidomain.py data.root=s3://bucket/afhq data.image_size=256 train.model.num_domains=3
    python jobs/train_multidomain.py train.weights.uni=0 train.weights.smooth=0   # the ablation without both
    python jobs/train_multidomain.py --resume
"""
import sys

from step_ray.cluster import init_ray
from step_ray.config import job_config
from step_ray.eval.metrics import LPIPSConfig
from step_ray.preflight import (check_data_root, check_resources, check_shared_storage, check_storage, check_weights,
                                dataset_location, fail_fast)
from step_ray.pipelines.train_multidomain import MultiDomainJobConfig, run_train_multidomain


@fail_fast
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["run.resume=true" if a == "--resume" else a for a in argv]
    cfg = job_config(MultiDomainJobConfig, argv, description=__doc__)
    check_storage(cfg.run, "multidomain")
    check_data_root(cfg.data.root)
    check_weights(lpips=LPIPSConfig())
    init_ray()
    check_resources(cfg.run)
    check_shared_storage({"run.storage_path": cfg.run.storage_path, **dataset_location(cfg.data)})
    run_train_multidomain(cfg).print_summary()


if __name__ == "__main__":
    main()
