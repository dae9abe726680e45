"""Watching a run: the monitor's event files and grids (local and S3), activation checkpointing, precision."""
import dataclasses
import time

import numpy as np
import pytest
import torch

from step_ray import storage
from step_ray.models import EncoderConfig, GeneratorConfig, StyleEncoder, UNetGenerator
from step_ray.engine.precision import MixedPrecision, checkpoint_activations
from step_ray.engine.monitor import RunMonitor


def _read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0}).Reload()


def test_monitor_writes_scalars_images_and_pngs(tmp_path):
    run = tmp_path / "run"
    monitor = RunMonitor(str(run), "stage2")
    started = time.perf_counter()
    for step in range(1, 51):
        monitor.scalars(step, {"train_loss_g": 1.0 / step, "images_per_s": 10.0, "stage": "stage2",
                               "bad": float("nan")})
    enqueue_seconds = time.perf_counter() - started
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8)
    monitor.image("samples", 50, image, png_name="stage2_epoch0000.png")
    monitor.close()
    assert not monitor.errors and monitor.written == 51
    acc = _read_events(run / "tensorboard")
    assert set(acc.Tags()["scalars"]) == {"stage2/train_loss_g", "stage2/images_per_s"}  # strings and NaN dropped
    assert [e.step for e in acc.Scalars("stage2/train_loss_g")] == list(range(1, 51))
    assert acc.Scalars("stage2/train_loss_g")[-1].value == pytest.approx(1 / 50)
    assert (acc.Images("stage2/samples")[0].height, acc.Images("stage2/samples")[0].width) == (20, 30)
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(run / "samples" / "stage2_epoch0000.png")), image)
    assert enqueue_seconds < 5  # generous: the loop only enqueues (BENCHMARKS.md has the real overhead)


def test_monitor_uploads_to_s3_and_disabled_is_inert(s3_bucket, tmp_path):
    run = f"s3://{s3_bucket}/runs/r1"
    monitor = RunMonitor(run, "stage1")
    monitor.scalars(1, {"train_loss": 0.5})
    monitor.image("neighbours", 1, np.zeros((8, 8, 3), np.uint8), png_name="stage1_epoch0000.png")
    monitor.close()
    assert not monitor.errors
    events = [f for f in storage.list_files(f"{run}/tensorboard") if "tfevents" in f]
    assert len(events) == 1
    local = tmp_path / "tb"
    local.mkdir()
    (local / events[0].rsplit("/", 1)[1]).write_bytes(storage.read_bytes(events[0]))
    assert _read_events(local).Scalars("stage1/train_loss")[0].value == 0.5
    assert storage.exists(f"{run}/samples/stage1_epoch0000.png")
    off = RunMonitor(str(tmp_path / "off"), "stage1", enabled=False)
    off.scalars(1, {"x": 1.0})
    off.close()
    assert not (tmp_path / "off").exists()


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


def test_activation_checkpointing_matches_the_plain_path():
    """Same loss and gradients (float32 on CPU: within 1e-5 relative), same state-dict keys."""
    torch.manual_seed(0)
    g = UNetGenerator(GeneratorConfig(num_downs=5, base_channels=8))
    e = StyleEncoder(EncoderConfig(base_channels=8, block_channels=(8, 16)))
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1

    def loss_of(g, e):
        g.zero_grad()
        e.zero_grad()
        loss = (g(a, e(b)) - b).abs().mean()
        loss.backward()
        return loss.item(), _grads(g) + _grads(e)

    plain_loss, plain_grads = loss_of(g, e)
    keys = list(g.state_dict()) + list(e.state_dict())
    g_ck, e_ck = checkpoint_activations(g, lambda m: any(m is x for x in [*g.downs, *g.ups])), None
    from step_ray.models.encoder import ResidualDownBlock

    e_ck = checkpoint_activations(e, lambda m: isinstance(m, ResidualDownBlock))
    wrapped = sum(type(m).__name__ == "CheckpointWrapper" for m in [*g_ck.modules(), *e_ck.modules()])
    assert wrapped == 2 * 5 + 2  # every G block, both E blocks
    ck_loss, ck_grads = loss_of(g_ck, e_ck)
    assert ck_loss == pytest.approx(plain_loss, rel=1e-6)
    for p, q in zip(plain_grads, ck_grads):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)
    assert list(g_ck.state_dict()) + list(e_ck.state_dict()) == keys  # checkpoints load either way


def test_generator_step_with_checkpointing_equals_plain():
    from step_ray.recipes.generator import (GeneratorTraining, apply_activation_checkpointing, build_networks,
                                            make_optimizers, train_step)
    from step_ray.models import DiscriminatorConfig

    cfg = GeneratorTraining(encoder=EncoderConfig(base_channels=8, block_channels=(8, 16)),
                               generator=GeneratorConfig(num_downs=5, base_channels=8),
                               discriminator=DiscriminatorConfig(base_channels=8, n_layers=1), lambda_vgg=0.0,
                               lambda_l1=10.0, train_encoder=True)
    a, b = torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    logs = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        nets = build_networks(dataclasses.replace(cfg, activation_checkpointing=checkpointing), "cpu")
        if checkpointing:
            apply_activation_checkpointing(cfg, nets)
        opt_g, opt_d = make_optimizers(cfg, nets, None, "cpu")
        torch.manual_seed(1)
        logs.append([train_step(cfg, nets, opt_g, opt_d, a, b, None, step) for step in range(3)])
    for plain, ck in zip(*logs):
        for key in ("loss_g", "loss_d", "l1", "gan_g"):
            assert ck[key] == pytest.approx(plain[key], rel=1e-4), key


def test_vgg_segment_recompute_matches_and_discriminator_bodies_are_wrapped():
    from step_ray.losses import vgg_perceptual_loss
    from step_ray.models import DiscriminatorConfig
    from step_ray.style.vgg import VGGConfig, load_vgg
    from step_ray.recipes.generator import GeneratorTraining, apply_activation_checkpointing, build_networks

    vgg = load_vgg(VGGConfig(layers=("conv1_2", "conv2_2", "conv3_2"), layer_weights=(1.0, 1.0, 1.0)))
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    grads = []
    for recompute in (False, True):
        vgg.recompute_in_backward = recompute
        fake = (real * 0.5).requires_grad_(True)
        loss, _ = vgg_perceptual_loss(vgg, fake, real, (1.0, 1.0, 1.0))
        loss.backward()
        grads.append((loss.item(), fake.grad.clone()))
    assert grads[1][0] == pytest.approx(grads[0][0], rel=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-8)
    cfg = GeneratorTraining(encoder=EncoderConfig(base_channels=8, block_channels=(8, 16)),
                               generator=GeneratorConfig(num_downs=5, base_channels=8),
                               discriminator=DiscriminatorConfig(base_channels=8, n_layers=1), train_encoder=True)
    nets = build_networks(cfg, "cpu")
    vgg.recompute_in_backward = False
    apply_activation_checkpointing(cfg, nets, vgg)
    assert vgg.recompute_in_backward
    assert sum(type(m).__name__ == "CheckpointWrapper" for m in nets["discriminator"].modules()) == 2  # one per scale


def test_precision_is_fp32_on_cpu_and_checked():
    amp = MixedPrecision("bf16", torch.device("cpu"))
    assert not amp.enabled and amp.name == "fp32" and amp.stateful() == {}
    with amp.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        MixedPrecision("fp8", torch.device("cpu"))
