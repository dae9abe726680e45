import numpy as np
import pytest
import torch

from step_ray.config import ConfigError, load_config
from step_ray.losses import embedding_l2_penalty, triplet_loss
from step_ray.models import EncoderConfig, StyleEncoder
from step_ray.recipes.stage1 import Stage1Config, held_out_triplets, knn_accuracy


def test_encoder_shapes_and_official_widths():
    e = StyleEncoder(EncoderConfig(nz=8))
    z = e(torch.randn(4, 3, 64, 64))
    assert z.shape == (4, 8)
    convs = [m.out_channels for m in e.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0] == 64 and 256 in convs  # 3->64 stem, residual blocks up to 256
    assert StyleEncoder(EncoderConfig(nz=3, block_channels=(16, 32), base_channels=8))(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_variational_head():
    e = StyleEncoder(EncoderConfig(nz=4, variational=True, base_channels=8, block_channels=(8,)))
    x = torch.randn(2, 3, 16, 16)
    mu, logvar = e.distribution(x)
    assert mu.shape == logvar.shape == (2, 4)
    torch.testing.assert_close(e(x), mu)
    with pytest.raises(RuntimeError, match="variational=True"):
        StyleEncoder(EncoderConfig(nz=4, base_channels=8, block_channels=(8,))).distribution(x)


def test_triplet_loss_by_hand():
    za = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    zp = torch.tensor([[0.1, 0.0], [1.0, 0.0]])
    zn = torch.tensor([[0.2, 0.0], [3.0, 0.0]])
    loss, logs = triplet_loss(za, zp, zn, margin=0.1, l2_weight=0.5)
    # row 0: 0.01 - 0.04 + 0.1 = 0.07 active; row 1: 0 - 4 + 0.1 < 0 inactive
    reg = (0.01 + 0.04 + 1 + 1 + 9) / 12  # mean(z²) over a, p, n (6 codes x 2 dims)
    assert logs["active_fraction"] == 0.5
    assert logs["triplet"] == pytest.approx(0.035)
    assert loss.item() == pytest.approx(0.035 + 0.5 * reg)
    assert embedding_l2_penalty(za, zp, zn).item() == pytest.approx(reg)


def test_triplet_loss_gradient_pulls_positive_in():
    za = torch.zeros(1, 2)
    zp = torch.tensor([[1.0, 0.0]], requires_grad=True)
    zn = torch.tensor([[0.5, 0.0]], requires_grad=True)
    loss, _ = triplet_loss(za, zp, zn, margin=0.1, l2_weight=0.0)
    loss.backward()
    assert zp.grad[0, 0] > 0 and zn.grad[0, 0] < 0  # descent moves p towards a, n away


def test_knn_accuracy_and_held_out_triplets():
    ref = np.array([[0.0], [0.1], [5.0], [5.1]])
    labels = np.array([0, 0, 1, 1])
    assert knn_accuracy(np.array([[0.05], [5.05]]), np.array([0, 1]), ref, labels, k=3) == 1.0
    assert knn_accuracy(np.array([[0.05], [5.05]]), np.array([1, 0]), ref, labels, k=3) == 0.0
    d = np.abs(np.arange(6)[:, None] - np.arange(6)[None]).astype(float)
    t = held_out_triplets(d, 50, seed=0)
    assert len(t) > 10 and (t[:, 0] != t[:, 1]).all() and (d[t[:, 0], t[:, 1]] != d[t[:, 0], t[:, 2]]).all()


def test_stage1_config_checks():
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        load_config(Stage1Config, None, ["batch_size=0"])
    assert load_config(Stage1Config, None, ["encoder.nz=16"]).encoder.nz == 16
