r"""Style descriptors of every target image of a pix2pix dataset (docs/method.md §2), with Ray Data.

    python jobs/style_stats.py                                   # built-in synthetic data, local Ray
    python jobs/style_stats.py data.root=s3://bucket/facades data.direction=BtoA data.image_size=256 \
        output=s3://bucket/runs/facades/style_stats reduction.method=pca reduction.dim=128

Connects to the Ray cluster named by RAY_ADDRESS, else starts a local one. Writes
<output>/descriptors/*.parquet, metadata.json, errors.csv and reduction.npz; a second run with the same
config finds metadata.json and does nothing (`force=true` recomputes).
"""
from __future__ import annotations

import logging

from step_ray.config import job_config
from step_ray.preflight import check_data_root, check_weights, fail_fast
from step_ray.style.statistics import StyleStatsConfig, compute_style_stats, format_summary, read_metadata


@fail_fast
def main(argv=None) -> str:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = job_config(StyleStatsConfig, argv, description=__doc__)
    check_data_root(cfg.data.root)
    check_weights(vgg=cfg.vgg)
    # No ray.init here: compute_style_stats calls ray.init() (which follows RAY_ADDRESS) only when there
    # is work to do, so a re-run on a finished output costs seconds, not a cluster start.
    before = read_metadata(cfg.output)
    output = compute_style_stats(cfg)
    metadata = read_metadata(output)
    reused = before is not None and before.get("created") == metadata.get("created")
    print(f"style stats -> {output}" + (" (already computed for this config: nothing done)" if reused else ""))
    print(f"  VGG weights: {metadata['vgg']['weight_source']}; reduction: {metadata['reduction']}")
    print(f"  {format_summary(metadata['summary'])}")
    return output


if __name__ == "__main__":
    main()
