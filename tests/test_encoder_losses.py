import numpy as np
import pytest
import torch

from step_ray.config import ConfigError, load_config
from step_ray.losses import embedding_l2_penalty, triplet_loss
from step_ray.models import EncoderConfig, StyleEncoder
from step_ray.recipes.stage1 import Stage1Training, held_out_triplets, knn_accuracy


def test_encoder_shapes_and_official_widths():
    e = StyleEncoder(EncoderConfig(nz=8))
    z = e(torch.randn(4, 3, 64, 64))
    assert z.shape == (4, 8)
    convs = [m.out_channels for m in e.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0] == 64 and 256 in convs  # 3->64 stem, residual blocks up to 256
    assert StyleEncoder(EncoderConfig(nz=3, block_channels=(16, 32), base_channels=8))(
        torch.randn(2, 3, 32, 32)).shape == (2, 3)


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
        load_config(Stage1Training, None, ["batch_size=0"])
    assert load_config(Stage1Training, None, ["encoder.nz=16"]).encoder.nz == 16


def _facades_photos(root, count=24, side=64):
    from step_ray.data.pix2pix import list_split, load_target, to_tensor

    return to_tensor(np.stack([load_target(f, "BtoA", side) for f in list_split(root, "train")[:count]]))


def test_vgg_gram_encoder_keeps_the_vgg_out_of_its_state_and_follows_dtype():
    from step_ray.style.encode import build_encoder

    e = build_encoder(EncoderConfig(backbone="vgg_gram", sketch_channels=8, vgg_layers=("relu1_2", "relu2_2")))
    keys = set(e.state_dict())
    assert keys == {"features.0.proj0", "features.0.proj1", "features.1.mean", "features.1.scale", "mean.weight",
                    "mean.bias"}
    # trainable: the linear head only (the sketch is fixed, the VGG frozen and not a parameter at all)
    assert [n for n, p in e.named_parameters() if p.requires_grad] == ["mean.weight", "mean.bias"]
    e.double()  # _apply reaches the VGG held outside the module tree
    assert e(torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1).dtype == torch.float64
    with pytest.raises(ValueError, match="build_encoder"):
        StyleEncoder(EncoderConfig(backbone="vgg_gram"))
    with pytest.raises(ValueError, match="vgg_layers"):
        EncoderConfig(backbone="vgg_gram", vgg_layers=("pool9",))


def test_vgg_gram_sketch_tracks_the_exact_style_distance(facades_root):
    """The random channel sketch keeps the order of the exact Gram distance (the style distance), and the
    fitted centring leaves features of zero mean and unit average spread on the images it was fitted on."""
    from scipy.stats import spearmanr

    from step_ray.style.encode import build_encoder
    from step_ray.style.gram import style_descriptor

    x = _facades_photos(facades_root)
    e = build_encoder(EncoderConfig(backbone="vgg_gram", sketch_channels=32))
    sketch, centre = e.features
    with torch.no_grad():
        exact = torch.cdist(style_descriptor(sketch._vgg[0](x)).double(), style_descriptor(sketch._vgg[0](x)).double())
        approx = torch.cdist(sketch(x).double(), sketch(x).double())
    iu = np.triu_indices(len(x), 1)
    rho = spearmanr(exact.numpy()[iu], approx.numpy()[iu]).statistic
    assert rho > 0.8, rho  # measured 0.92 (32 channels, real VGG, these 24 photos)
    e.fit_input_statistics(x)
    with torch.no_grad():
        f = centre(sketch(x))
    assert f.mean(0).abs().max() < 1e-4 and f.std(0).mean() == pytest.approx(1.0, rel=1e-4)


def test_stem_bank_gives_the_codes_of_the_images_and_their_mirrors():
    """Stage 1's bank of frozen-stem outputs: E(lookup(i, 0), from_stem) is E(image i), lookup(i, 1) its
    mirror; rows are computed on first use, once; a bank smaller than the set keeps its first rows and
    computes the rest at every use, with the same values; the conv encoder has no frozen stem."""
    from step_ray.recipes.stage1 import StemBank, stem_bank
    from step_ray.style.encode import build_encoder

    class Store:
        def __init__(self, x):
            self.x, self.paths = x, [str(i) for i in range(len(x))]

        def batch(self, rows):
            return self.x[list(rows)]

    x = torch.rand(5, 3, 32, 32) * 2 - 1
    e = build_encoder(EncoderConfig(backbone="vgg_gram", sketch_channels=8)).eval()
    e.fit_input_statistics(x)
    rows, zeros, ones = np.arange(5), np.zeros(5, np.int64), np.ones(5, np.int64)
    bank = stem_bank(e, Store(x), 64, "cpu")
    assert bank.capacity == 5 and bank.forwards == 0  # nothing computed before it is asked for
    with torch.no_grad():
        torch.testing.assert_close(e(bank.lookup(rows, zeros), from_stem=True), e(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(e(bank.lookup(rows, ones), from_stem=True), e(x.flip(3)), rtol=1e-5, atol=1e-5)
    assert bank.forwards == 10  # each image and its mirror once, however often they are looked up
    # A budget for 2 of the 5 images (and their mirrors): rows 0-1 kept, 2-4 computed at every use.
    small = StemBank(e.frozen_stem, Store(x), 2, "cpu")
    mirror = np.array([0, 1, 0, 1, 1])
    with torch.no_grad():
        torch.testing.assert_close(small.lookup(rows, mirror), bank.lookup(rows, mirror), rtol=1e-5, atol=1e-5)
        first = small.forwards
        small.lookup(rows, mirror)
    assert first == 2 * 2 + 3 and small.forwards == first + 3
    assert "holds 2 of 5 training images" in small.shortfall("train.stem_cache_mb", 1)
    assert bank.shortfall("train.stem_cache_mb", 64) is None
    assert stem_bank(e, Store(x), 0, "cpu") is None
    conv = StyleEncoder(EncoderConfig(base_channels=8, block_channels=(8,)))
    assert stem_bank(conv, Store(x), 64, "cpu") is None
    with pytest.raises(ValueError, match="frozen stem"):
        conv(x, from_stem=True)
