r"""Evaluate any stage-2/3 checkpoint (local or s3://): PSNR, LPIPS, diversity, mapper coverage, pictures.

    python jobs/evaluate.py checkpoint=runs/stage3-.../checkpoint_epoch0009 data.root=../shared/data/facades \
        data.direction=BtoA data.image_size=64
    python jobs/evaluate.py checkpoint=s3://bucket/runs/stage3-.../checkpoint_epoch0009 output=s3://bucket/eval/x

Writes metrics.json, table_row.md, transfer.png, interpolation.png, sampling.png (with a mapper) and
embedding.png to `output` (default <checkpoint>/eval). No Ray needed: evaluation runs in this process.
"""

from step_ray.config import job_config
from step_ray.eval.generator_eval import EvalConfig, evaluate
from step_ray.preflight import PreflightError, check_checkpoint, check_data_root, check_weights, fail_fast


@fail_fast
def main(argv=None):
    cfg = job_config(EvalConfig, argv, description=__doc__)
    if not cfg.checkpoint:
        raise PreflightError("set checkpoint=<a stage-2/3 checkpoint folder, local or s3://>")
    check_checkpoint(cfg.checkpoint, "checkpoint")
    check_data_root(cfg.data.root)
    check_weights(lpips=cfg.lpips)
    record = evaluate(cfg)
    print(record["table_row"], flush=True)
    for key, value in record["metrics"].items():
        print(f"[evaluate] {key:<32} {value}", flush=True)
    print(f"[evaluate] LPIPS trunk: {record['lpips_weights']}; VGG: {record['vgg_weights']}", flush=True)
    print(f"[evaluate] outputs in {record['output']}", flush=True)


if __name__ == "__main__":
    main()
