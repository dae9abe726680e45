"""Stage 1 end to end on tiny images: the job runs, checkpoints (local and S3), resumes exactly, DDP runs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from step_ray import storage
from step_ray.config import load_config
from step_ray.style.encode import encode, load_encoder
from step_ray.pipelines.pretrain import PretrainJobConfig, run_pretrain

TINY = [
    "data.image_size=32",
    "style.reduction.dim=16",
    "mining.k_far=40",
    "style.num_actors=1",
    "style.batch_size=32",
    "train.encoder.base_channels=16",
    "train.encoder.block_channels=[16, 32]",
    "train.batch_size=8",
    "train.knn_reference=96",
    "train.val_triplets=300",
    "run.keep_checkpoints=3",
    "run.max_failures=0",
]


def _cfg(root, cache, *extra):
    return load_config(PretrainJobConfig, None, [f"data.root={root}", f"cache_dir={cache}", *TINY, *extra])


def test_best_checkpoint_metric_auto_follows_the_labels():
    """run.checkpoint_metric=auto (the job's default): style-id k-NN on a labelled set, held-out triplet
    order otherwise; a metric the user names is kept as it is."""
    from types import SimpleNamespace

    from step_ray.engine.settings import RunSettings
    from step_ray.pipelines.pretrain import resolved_run

    labelled = SimpleNamespace(train_style_ids=np.arange(4), val_style_ids=np.arange(3))
    unlabelled = SimpleNamespace(train_style_ids=np.full(4, -1), val_style_ids=np.full(3, -1))
    auto = PretrainJobConfig().run
    assert auto.checkpoint_metric == "auto"
    assert resolved_run(auto, labelled).checkpoint_metric == "val_knn_acc"
    assert resolved_run(auto, unlabelled).checkpoint_metric == "val_triplet_acc"
    named = RunSettings(checkpoint_metric="val_rank_corr", checkpoint_mode="max")
    assert resolved_run(named, labelled) is named


def _weights(checkpoint: str) -> dict:
    return {k: v.clone() for k, v in load_encoder(checkpoint).state_dict().items()}


@pytest.fixture(scope="module")
def resumed_run(ray_session, synthetic_root, stage1_cache, tmp_path_factory):
    """One epoch, then --resume to two: the run folder and the outputs of both calls."""
    tmp = tmp_path_factory.mktemp("pretrain")
    first = run_pretrain(_cfg(synthetic_root, stage1_cache, f"run.storage_path={tmp / 'runs'}", "train.max_epochs=1"))
    second = run_pretrain(_cfg(synthetic_root, stage1_cache, f"run.storage_path={tmp / 'runs'}", "train.max_epochs=2",
                               "run.resume=true"))
    return stage1_cache, first, second


def test_outputs_beside_the_checkpoint(resumed_run, synthetic_root):
    tmp, first, second = resumed_run
    run_dir = Path(second.summary).parent
    assert Path(first.summary).parent == run_dir  # resume continued the same run
    metrics = json.loads(Path(second.summary).read_text())
    assert [h["epoch"] for h in metrics["history"]] == [0, 1]  # no duplicated or skipped epoch
    final = metrics["final"]
    for key in ("train_loss", "train_active_fraction", "images_per_s", "val_knn_acc", "val_triplet_acc",
                "val_rank_corr"):
        assert np.isfinite(final[key]), key
    assert metrics["vgg_weights"].startswith(("random", "pretrained"))
    assert (Path(second.outputs["embedding"]).stat().st_size > 5000
            and Path(second.outputs["neighbours"]).stat().st_size > 1000)
    saved = (Path(second.checkpoint) / "config.yaml").read_text()
    assert "margin: 0.1" in saved and "storage_path" in saved  # the config travels with the checkpoint
    # the cached style statistics and mining were reused by the second call
    assert (first.outputs["style_stats"] == second.outputs["style_stats"]
            and first.outputs["mining"] == second.outputs["mining"])



def test_stage1_is_watched_in_tensorboard(resumed_run):
    """Scalars every `monitor.scalars_every` steps and per epoch, and the neighbour grid per epoch, across the
    resume."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, second = resumed_run
    run_dir = Path(second.summary).parent
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    history = json.loads(Path(second.summary).read_text())["history"]
    steps = [e.step for e in acc.Scalars("stage1/train_loss")]
    # interval points (every 20 steps) and the epoch means (at each epoch's last step), in order
    assert steps == sorted(steps) and {h["step"] for h in history} <= set(steps)
    assert [e.step for e in acc.Scalars("stage1/val_knn_acc")] == [h["step"] for h in history]
    assert len(acc.Images("stage1/neighbours")) == 2
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == ["stage1_epoch0000.png",
                                                                           "stage1_epoch0001.png"]


def test_resume_equals_uninterrupted_run_on_s3(resumed_run, synthetic_root, s3_bucket):
    cache, _, resumed = resumed_run
    straight = run_pretrain(_cfg(synthetic_root, cache, f"run.storage_path=s3://{s3_bucket}/runs",
                                 "train.max_epochs=2"))
    assert straight.checkpoint.startswith(f"s3://{s3_bucket}/runs/stage1-")
    assert storage.exists(storage.join(straight.checkpoint, "encoder.pt"))
    assert storage.exists(straight.outputs["embedding"]) and storage.exists(straight.summary)
    a, b = _weights(resumed.checkpoint), _weights(straight.checkpoint)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    # inference from the S3 checkpoint
    from step_ray.data.pix2pix import DataConfig, load_split

    val = load_split(DataConfig(root=str(synthetic_root), image_size=32), "val", limit=4)
    z = encode(val.b, straight.checkpoint)
    assert z.shape == (4, 8) and np.isfinite(z).all()


def test_two_ddp_workers(resumed_run, synthetic_root, tmp_path):
    cached = resumed_run[0]  # reuses the cached style statistics and neighbours
    out = run_pretrain(_cfg(synthetic_root, cached, f"run.storage_path={tmp_path / 'runs'}", "train.max_epochs=1",
                            "run.num_workers=2"))
    final = json.loads(Path(out.summary).read_text())["final"]
    # each of the 2 workers took its half of the anchors: 96 anchors / 8 per batch / 2 workers = 6 steps
    assert final["step"] == 6
    assert np.isfinite(final["train_loss"])
