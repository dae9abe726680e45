r"""Translate new inputs with a trained generator: one PNG per (input, style), a manifest, a contact sheet.

    python jobs/translate.py checkpoint=runs/stage3-.../checkpoint_epoch0009 input=my_label_maps \
        style.reference=my_photos output=runs/translated                 # each input x each reference photo
    python jobs/translate.py checkpoint=runs/stage3-.../checkpoint_epoch0009 input=my_label_maps \
        style.samples=8 output=runs/samples                              # 8 codes from the IMLE mapper per input
    python jobs/translate.py checkpoint=s3://bucket/runs/stage3-.../checkpoint_epoch0009 \
        input=s3://bucket/facades/val input_half=B style.reference=s3://bucket/facades/val style.reference_half=A \
        style.pairing=in_order output=s3://bucket/translated
    python jobs/translate.py checkpoint=runs/multidomain-.../checkpoint_epoch0009 input=my_photos \
        style.samples=4 style.domain=2 output=runs/to_domain2          # the multi-domain model, its flow

The checkpoint: a generator stage's (StEP or a baseline; samples from the run's IMLE mapper), MUNIT's
(A -> B; reference styles from B's style encoder, samples from its N(0, I) prior) or the multi-domain
model's (style.domain: the target domain of its flow's samples, or the references' domain). Inputs: single images
of any size (centre square, resized as the model was trained), or pix2pix pair files (input_half=A or B).
A rerun skips every input whose outputs exist (overwrite=true redoes them).
Bad inputs are listed in errors.csv with their reason; the rest are translated.
"""
import sys

from step_ray.config import job_config
from step_ray.pipelines.translate import TranslateJobConfig, run_translate
from step_ray.preflight import check_checkpoint, fail_fast


@fail_fast
def main(argv: list[str]) -> None:
    cfg = job_config(TranslateJobConfig, argv)
    check_checkpoint(cfg.checkpoint, "checkpoint")
    run_translate(cfg)  # starts (or joins, with RAY_ADDRESS) Ray only when there is something to translate


if __name__ == "__main__":
    main(sys.argv[1:])
