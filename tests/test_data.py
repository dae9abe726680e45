import hashlib
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
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
)
from step_ray.data.synthetic import SyntheticConfig, generate_synthetic, make_styles, render_pair


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.png")):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_synthetic_is_deterministic_and_layout(tmp_path):
    cfg = SyntheticConfig(num_styles=4, num_train=12, num_val=4, image_size=32, seed=3)
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
    c = generate_synthetic(tmp_path / "c", SyntheticConfig(num_styles=4, num_train=12, num_val=4, image_size=32, seed=4))
    assert _digest(c) != _digest(a)


def test_same_content_different_styles():
    styles = make_styles(8)
    x0 = render_pair(5, "train", styles[0], 32, seed=0)
    x1 = render_pair(5, "train", styles[1], 32, seed=0)
    np.testing.assert_array_equal(x0[:, :32], x1[:, :32])  # A, the content, is the same
    assert np.abs(x0[:, 32:].astype(int) - x1[:, 32:]).mean() > 20  # B differs by style
    a = x0[:, :32, 0]
    assert set(np.unique(a)) <= {0, 255} and (a == 0).any()  # A is an edge map


def test_styles_are_separable_by_colour_statistics(synthetic_root):
    """Ground truth is meaningful: nearest neighbour on simple B statistics finds the style."""
    split = load_split(DataConfig(root=str(synthetic_root), image_size=32), "train")
    b = split.b.reshape(len(split.b), -1, 3).astype(float) / 255
    feats = np.concatenate([b.mean(1), b.std(1)], 1)
    d = ((feats[:, None] - feats[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    acc = (split.style_ids[d.argmin(1)] == split.style_ids).mean()
    assert acc > 0.6, acc


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
