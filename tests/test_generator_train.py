"""Stages 2 and 3 under Ray Train on tiny images: frozen E, checkpoints, resume, S3, the whole job, 2 workers."""
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from step_ray import storage
from step_ray.config import load_config
from step_ray.models import EncoderConfig, StyleEncoder
from step_ray.checkpoints import save_checkpoint

TINY = [
    "data.image_size=32",
    "train.generator.num_downs=5",
    "train.generator.base_channels=8",
    "train.discriminator.base_channels=8",
    "train.discriminator.n_layers=1",
    "train.vgg.layers=[conv1_2, conv2_2, conv3_2]",
    "train.vgg.layer_weights=[0.25, 0.5, 1.0]",
    "train.batch_size=8",
    "train.val_images=16",
    "run.max_failures=0",
    "run.keep_checkpoints=3",
]


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory):
    """A stage-1-shaped checkpoint folder: encoder.pt + config.yaml with an `encoder` mapping."""
    folder = tmp_path_factory.mktemp("stage1") / "checkpoint_epoch0000"
    torch.manual_seed(1)
    enc = StyleEncoder(EncoderConfig(base_channels=8, block_channels=(8, 16)))
    save_checkpoint(folder, {"encoder": enc}, {}, {"epoch": 1},
                    {"method": "stage1", "run": {},
                     "recipe": {"encoder": {"base_channels": 8, "block_channels": [8, 16]}}})
    return str(folder)


def _upload(folder: str, uri: str) -> str:
    for path in Path(folder).iterdir():
        storage.write_bytes(storage.join(uri, path.name), path.read_bytes())
    return uri


def _cfg(root, storage_path, *extra):
    from step_ray.pipelines.train_generator import GeneratorJobConfig

    return load_config(GeneratorJobConfig, None,
                       [f"data.root={root}", f"run.storage_path={storage_path}", *TINY, *extra])


def _tensors(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def stage2_run(ray_session, synthetic_root, stage1_checkpoint, s3_server, tmp_path_factory):
    """Stage 2 on S3 (E from an S3 stage-1 checkpoint): one epoch, then --resume to two."""
    import boto3

    from step_ray.data.scan import prepare_paired_splits
    from step_ray.pipelines.train_generator import train_generator_stage

    s3_bucket = "stage2-run"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=s3_bucket)
    enc_uri = _upload(stage1_checkpoint, f"s3://{s3_bucket}/stage1/checkpoint_epoch0000")
    cfg = _cfg(synthetic_root, f"s3://{s3_bucket}/runs", "run.name=r")
    inputs = prepare_paired_splits(cfg.data)

    def train(epochs, resume):  # 3 steps an epoch (a step budget), 2 epochs in all
        return train_generator_stage(replace(cfg.train, encoder_checkpoint=enc_uri, max_epochs=epochs,
                                             max_steps=3 * epochs),
                                     replace(cfg.run, resume=resume), inputs, "stage2")

    _, run_uri, resolved = train(1, False)
    assert resolved.encoder.block_channels == (8, 16)  # taken from the stage-1 checkpoint
    result2, run_uri2, _ = train(2, True)
    assert run_uri2 == run_uri == f"s3://{s3_bucket}/runs/r"
    return f"s3://{result2.checkpoint.path}", tmp_path_factory.mktemp("stage2")


def test_stage2_frozen_encoder_from_s3_and_resume(stage2_run, stage1_checkpoint):
    ckpt, local = stage2_run
    for name in ("encoder.pt", "generator.pt", "generator_ema.pt", "discriminator.pt", "optimizer_g.pt",
                 "optimizer_d.pt", "state.json", "config.yaml"):
        (local / name).parent.mkdir(exist_ok=True)
        (local / name).write_bytes(storage.read_bytes(storage.join(ckpt, name)))
    state = json.loads((local / "state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [0, 1] and state["step"] == 6  # resumed, no repeats
    for key in ("train_loss_g", "train_loss_d", "train_vgg", "val_psnr", "val_psnr_other_style", "images_per_s"):
        assert np.isfinite(state["history"][-1][key]), key
    # E is the stage-1 encoder, byte for byte, after 6 stage-2 steps
    original, saved = _tensors(Path(stage1_checkpoint) / "encoder.pt"), _tensors(local / "encoder.pt")
    assert original.keys() == saved.keys()
    for name in original:
        assert torch.equal(original[name], saved[name]), name
    assert len(_tensors(local / "optimizer_g.pt")["param_groups"]) == 1  # E is in no optimiser
    assert "train_encoder: false" in (local / "config.yaml").read_text()
    # watching it: TensorBoard events and the epoch grids reached the S3 run folder (two processes: two event files)
    run_folder = ckpt.rsplit("/", 1)[0]
    events = [f for f in storage.list_files(storage.join(run_folder, "tensorboard")) if "tfevents" in f]
    assert len(events) == 2, events
    assert storage.exists(storage.join(run_folder, "samples", "stage2_epoch0000.png"))
    assert storage.exists(storage.join(run_folder, "samples", "stage2_epoch0001.png"))


@pytest.fixture(scope="module")
def job_run(ray_session, synthetic_root, stage2_run, tmp_path_factory):
    """The job from the S3 stage-2 checkpoint: stage 3 (2 DDP workers) -> mapper -> eval."""
    from step_ray.pipelines.train_generator import run_train_generator

    tmp = tmp_path_factory.mktemp("generator_job")
    cfg = _cfg(synthetic_root, tmp / "runs", f"stage2_checkpoint={stage2_run[0]}",
               "stage3_epochs=1", "train.max_steps=0", "run.num_workers=2", "mapper.epochs=10",
               "eval.num_inputs=4", "eval.num_styles=4", "eval.mapper_samples=200", "eval.grid_inputs=3",
               "eval.grid_references=4", "eval.interpolation_steps=4")
    return cfg, run_train_generator(cfg)


def test_job_outputs(job_run):
    cfg, out = job_run
    assert [s.name for s in out.stages] == ["stage3"] and "/stage3-" in out.checkpoint
    # 96 images / 2 workers / 8 per batch: 6 steps per epoch on each worker
    assert out.stage("stage3").metrics["step"] == 6
    assert (Path(out.outputs["mapper"]) / "mapper.pt").is_file()
    summary = json.loads(Path(out.summary).read_text())
    assert summary["config"]["stage3_epochs"] == 1
    # which reconstruction term trained, saved with the run and with every checkpoint (real VGG: no fallback)
    assert (summary["details"]["reconstruction"].startswith("VGG x 0.02 (activation scale 5.76")
            and "pretrained:" in summary["details"]["reconstruction"])
    state = json.loads((Path(out.stage("stage3").checkpoint) / "state.json").read_text())
    assert state["reconstruction"] == summary["details"]["reconstruction"]
    record = json.loads((Path(out.outputs["eval"]) / "metrics.json").read_text())
    m = record["metrics"]
    for key in ("psnr", "lpips", "psnr_other_style", "diversity_refs", "diversity_mapper", "diversity_fixed_code"):
        assert np.isfinite(m[key]), key
    assert m["diversity_fixed_code"] < 1e-6  # one code for all: a deterministic G gives identical outputs
    # realism with the real FID Inception: every kind of output, beside the real-vs-real floor
    assert m["fid_inception"].startswith("inception-v3-tf:") and m["fid_real_images"] == 32
    for kind, images in (("recon", 32), ("refs", 16), ("mapper", 16), ("real_floor", 96)):
        assert np.isfinite(m[f"fid_{kind}"]) and np.isfinite(m[f"kid_{kind}"]) and m[f"fid_{kind}_images"] == images
    assert m["fid_refs"] > m["fid_real_floor"]  # a 2-epoch G on 32 px is further from the photos than they are
    assert m["num_style_ids"] == 8 and 1 <= m["mapper_styles_reached"] <= 8
    assert record["lpips_weights"].startswith("alexnet pretrained:") and record["vgg_weights"].startswith("pretrained:")
    for name in ("transfer", "interpolation", "sampling", "embedding"):
        assert Path(record["pictures"][name]).stat().st_size > 500, name
    assert (Path(out.outputs["eval"]) / "table_row.md").read_text().count("|") > 10


def test_stage3_and_mapper_are_watched_in_tensorboard(job_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = job_run
    run_folder = Path(out.stage("stage3").checkpoint).parent
    acc = EventAccumulator(str(run_folder / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    scalars, images = set(acc.Tags()["scalars"]), set(acc.Tags()["images"])
    assert {"stage3/train_loss_g", "stage3/train_loss_d", "stage3/images_per_s", "stage3/val_psnr",
            "mapper/loss"} <= scalars
    assert {"stage3/samples", "mapper/samples_mapper"} <= images
    # 6 steps, 1 epoch: the per-epoch point at step 6 (scalars_every=20 is longer than the run)
    assert [e.step for e in acc.Scalars("stage3/val_psnr")] == [6]
    grid = acc.Images("stage3/samples")[0]
    # 4 inputs + a header row; 1 input column + 4 references + 2 sampled codes; 32 px tiles, 2 px gaps
    assert (grid.height, grid.width) == (5 * 34 + 2, 7 * 34 + 2)
    for png in ("stage3_epoch0000.png", "mapper_samples.png"):
        assert (run_folder / "samples" / png).stat().st_size > 500, png


def test_stage3_trained_the_encoder(job_run, stage2_run):
    _, out = job_run
    e2 = torch.load(io.BytesIO(storage.read_bytes(storage.join(stage2_run[0], "encoder.pt"))), weights_only=True)
    e3 = _tensors(Path(out.stage("stage3").checkpoint) / "encoder.pt")
    assert any(not torch.equal(e2[k], e3[k]) for k in e2)
    opt = _tensors(Path(out.stage("stage3").checkpoint) / "optimizer_g.pt")
    assert len(opt["param_groups"]) == 2  # G's group, then E's
    assert "train_encoder: true" in (Path(out.stage("stage3").checkpoint) / "config.yaml").read_text()
    from step_ray.style.encode import load_encoder

    # stage-3 checkpoints work as encoders too
    assert load_encoder(out.stage("stage3").checkpoint).cfg.block_channels == (8, 16)


def test_evaluate_job_writes_to_s3(job_run, s3_bucket, synthetic_root):
    from step_ray.eval.generator_eval import EvalConfig, evaluate
    from step_ray.data.pix2pix import DataConfig

    _, out = job_run
    ev = EvalConfig(checkpoint=out.stage("stage3").checkpoint, data=DataConfig(root=str(synthetic_root), image_size=32),
                    num_inputs=2, num_styles=3, output=f"s3://{s3_bucket}/eval", grid_inputs=2, grid_references=3,
                    mapper_samples=50)
    record = evaluate(ev)
    assert record["mapper"] == out.outputs["mapper"]  # found beside the checkpoint
    assert storage.exists(f"s3://{s3_bucket}/eval/metrics.json") and storage.exists(f"s3://{s3_bucket}/eval/transfer.png")
