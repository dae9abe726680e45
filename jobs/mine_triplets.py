r"""Mine close and far sets from the style-statistics output (local or s3://).

    python jobs/mine_triplets.py descriptors=s3://bucket/style_stats output=s3://bucket/mining \
        mining.k_far=2048 mining.index=ivf mining.num_shards=4

Sharded mining (mining.num_shards > 1) places one index actor per shard, each sized to fit on one node,
on the cluster RAY_ADDRESS names (`ray job submit` sets it; `RAY_ADDRESS=auto` for the cluster `ray start`
recorded on this machine), else on a fresh local instance (step_ray.cluster.init_ray).
"""
from __future__ import annotations

import logging

from step_ray.cluster import init_ray
from step_ray.config import job_config
from step_ray.mining import MineTripletsJobConfig, mine_triplets
from step_ray.preflight import check_data_root, fail_fast


@fail_fast
def main(argv=None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = job_config(MineTripletsJobConfig, argv, description=__doc__)
    check_data_root(cfg.descriptors, "descriptors")
    if cfg.mining.num_shards > 1:
        init_ray()  # the driver reads descriptors and writes neighbours: shard actors get arrays, not paths
    output = mine_triplets(cfg)
    print(output)
    return output


if __name__ == "__main__":
    main()
