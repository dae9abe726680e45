"""Mine close and far sets from the style-statistics output (local or s3://).

    python jobs/mine_triplets.py descriptors=s3://bucket/style_stats output=s3://bucket/mining \
        mining.k_far=2048 mining.index=ivf mining.num_shards=4

Connects to a running Ray cluster when one is reachable (RAY_ADDRESS or `ray start`), else starts a
local one; sharded mining (mining.num_shards > 1) places one index actor per shard.
"""
from __future__ import annotations

import logging
import os

from step_ray.config import job_config
from step_ray.mining import MineTripletsConfig, mine_triplets
from step_ray.preflight import check_data_root, fail_fast


@fail_fast
def main(argv=None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = job_config(MineTripletsConfig, argv, description=__doc__)
    check_data_root(cfg.descriptors, "descriptors")
    if cfg.mining.num_shards > 1:
        from step_ray.cluster import init_ray

        if _cluster_running():
            os.environ.setdefault("RAY_ADDRESS", "auto")
        init_ray()
    output = mine_triplets(cfg)
    print(output)
    return output


def _cluster_running() -> bool:
    import os

    if os.environ.get("RAY_ADDRESS"):
        return True
    try:
        import ray._private.services as services

        return bool(services.find_gcs_addresses())
    except Exception:  # private API moved: fall back to a local instance
        return False


if __name__ == "__main__":
    main()
