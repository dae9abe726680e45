"""Evaluation metrics on known inputs, the LPIPS weight loading, and the picture grids."""
import numpy as np
import pytest
import torch

from step_ray.eval.metrics import (LPIPSConfig, diversity, load_lpips, lpips_distance, lpips_features,
                                   lpips_from_features, pairwise_lpips, psnr)
from step_ray.eval.pictures import interpolation_grid, sampling_grid, to_uint8, transfer_grid


@pytest.fixture(scope="module")
def lp():
    with pytest.warns(RuntimeWarning, match="RANDOM AlexNet") if not _has_alexnet() else _nothing():
        return load_lpips(LPIPSConfig())


def _has_alexnet():
    from step_ray.eval.metrics import find_alexnet_weights

    return find_alexnet_weights(LPIPSConfig()) is not None


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_psnr_known_values():
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    assert (psnr(x, x) >= 100).all()
    y = torch.full((1, 3, 4, 4), -1.0)
    z = torch.full((1, 3, 4, 4), 1.0)  # [0, 1] scale: all-0 vs all-1, mse 1 -> 0 dB
    assert psnr(y, z).item() == pytest.approx(0.0)
    w = torch.full((1, 3, 4, 4), -0.8)  # mse 0.01 on the [0, 1] scale -> 20 dB
    assert psnr(y, w).item() == pytest.approx(20.0, abs=1e-4)


def test_lpips_identical_is_zero_and_features_match(lp):
    x, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    assert lpips_distance(lp, x, x).abs().max() < 1e-6
    d = lpips_distance(lp, x, y)
    assert (d > 0).all()
    torch.testing.assert_close(lpips_from_features(lp, lpips_features(lp, x), lpips_features(lp, y)), d)
    assert lp.weight_source.startswith(("RANDOM AlexNet", "alexnet pretrained"))


def test_diversity_known_values(lp):
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    same = x[None].expand(3, 4, -1, -1, -1)  # 3 inputs x 4 identical outputs
    assert diversity(lp, same) < 1e-6
    outs = torch.rand(2, 4, 3, 32, 32) * 2 - 1
    expected = np.mean([float(np.mean([lpips_distance(lp, o[i:i + 1], o[j:j + 1]).item()
                                       for i in range(4) for j in range(i + 1, 4)])) for o in outs])
    assert diversity(lp, outs) == pytest.approx(expected, rel=1e-4)
    assert pairwise_lpips(lp, outs[0]).item() == pytest.approx(float(np.mean(
        [lpips_distance(lp, outs[0][i:i + 1], outs[0][j:j + 1]).item() for i in range(4) for j in range(i + 1, 4)])),
        rel=1e-4)
    with pytest.raises(ValueError):
        diversity(lp, outs[:, :1])


def test_lpips_loads_a_local_alexnet_file(tmp_path):
    import torchvision

    from step_ray.weights import WeightFileError

    state = torchvision.models.alexnet(weights=None).state_dict()
    path = tmp_path / "alexnet.pth"
    torch.save(state, path)
    model = load_lpips(LPIPSConfig(alexnet_weights=str(path)))
    assert model.weight_source == f"alexnet pretrained:{path}"
    torch.testing.assert_close(model.net.slice1[0].weight, state["features.0.weight"])
    torch.testing.assert_close(model.net.slice5._modules["10"].weight, state["features.10.weight"])
    with pytest.raises(WeightFileError, match="no such file"):
        load_lpips(LPIPSConfig(alexnet_weights=str(tmp_path / "missing.pth")))


def test_grids():
    a = torch.zeros(2, 3, 8, 8)
    refs = torch.ones(3, 3, 8, 8)
    outs = torch.zeros(2, 3, 3, 8, 8)
    g = transfer_grid(a, refs, outs)
    assert g.shape == (3 * 10 + 2, 4 * 10 + 2, 3) and g.dtype == np.uint8
    assert sampling_grid(a, outs).shape == (2 * 10 + 2, 4 * 10 + 2, 3)
    assert interpolation_grid(a, torch.zeros(2, 5, 3, 8, 8), refs[0], refs[1]).shape == (3 * 10 + 2, 6 * 10 + 2, 3)
    assert to_uint8(torch.tensor([[[[-1.0]], [[0.0]], [[1.0]]]])).tolist() == [[[[0, 128, 255]]]]
