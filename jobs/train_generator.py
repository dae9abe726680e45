r"""Stages 2 and 3 of StEP from a stage-1 checkpoint, then the IMLE mapper and the evaluation; or any
baseline/ablation of docs/method.md §7 with --variant (bicycle_v0..v3, munitp_v1..v3, ours_v1..v4).

    python jobs/train_generator.py encoder_checkpoint=runs/stage1-.../checkpoint_epoch0009
    python jobs/train_generator.py --config configs/facades_generator.yaml run.num_workers=2
    python jobs/train_generator.py encoder_checkpoint=s3://bucket/runs/stage1-.../checkpoint_epoch0009 \
        run.storage_path=s3://bucket/runs stage2_epochs=20 stage3_epochs=20 train.generator.z_injection=input
    # stage 3 (+ mapper, eval) only
    python jobs/train_generator.py stage2_checkpoint=runs/stage2-.../checkpoint_epoch0019
    # a baseline: E from scratch
    python jobs/train_generator.py --variant bicycle_v2 stage2_epochs=10 stage3_epochs=10
    # the variants and their terms
    python jobs/train_generator.py --variant list

A variant is a preset under the YAML file and the command line (which can change any of its settings).
"""
import sys

from step_ray.cluster import init_ray
from step_ray.config import job_config
from step_ray.preflight import (check_checkpoint, check_data_root, check_resources, check_shared_storage, check_storage,
                                check_weights, dataset_location, fail_fast)
from step_ray.pipelines.train_generator import GeneratorJobConfig, run_train_generator
from step_ray.recipes.variants import VARIANTS, variant_base


def pop_variant(argv: list[str]) -> tuple[str, list[str]]:
    """`--variant NAME` / `--variant=NAME` out of argv."""
    rest, name = [], ""
    i = 0
    while i < len(argv):
        if argv[i] == "--variant" and i + 1 < len(argv):
            name, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--variant="):
            name = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    return name, rest


@fail_fast
def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["run.resume=true" if a == "--resume" else a for a in argv]
    variant, argv = pop_variant(argv)
    if variant == "list":
        for v in VARIANTS.values():
            print(f"{v.name:<11} {v.family:<10} {v.version}  {v.summary}")
        return
    if variant and variant not in VARIANTS:
        print(f"config error: unknown variant {variant!r}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        raise SystemExit(2)
    if variant and VARIANTS[variant].recipe != "generator":
        print(f"config error: variant {variant} has its own trainer: python jobs/train_{VARIANTS[variant].recipe}.py",
              file=sys.stderr)
        raise SystemExit(2)
    cfg = job_config(GeneratorJobConfig, argv, description=__doc__, base=variant_base(variant) if variant else None)
    if not (cfg.encoder_checkpoint or cfg.stage2_checkpoint or cfg.train.encoder_init == "scratch"):
        print("config error: set encoder_checkpoint=<stage-1 checkpoint folder, local or s3://> "
              "(or stage2_checkpoint=<stage-2 checkpoint> to run stage 3 only)", file=sys.stderr)
        raise SystemExit(2)
    check_storage(cfg.run)
    check_data_root(cfg.data.root)
    check_checkpoint(cfg.encoder_checkpoint, "encoder_checkpoint")
    check_checkpoint(cfg.stage2_checkpoint, "stage2_checkpoint")
    check_weights(vgg=cfg.train.vgg if cfg.train.lambda_vgg else None, lpips=cfg.eval.lpips if cfg.evaluate else None)
    # A cluster address (RAY_ADDRESS, set by `ray job submit`) is joined; otherwise a local instance starts.
    init_ray()
    check_resources(cfg.run)
    check_shared_storage({"run.storage_path": cfg.run.storage_path, **dataset_location(cfg.data),
                          "encoder_checkpoint": cfg.encoder_checkpoint, "stage2_checkpoint": cfg.stage2_checkpoint})
    run_train_generator(cfg).print_summary()


if __name__ == "__main__":
    main()
