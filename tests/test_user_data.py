"""A user's own dataset, with the awkward files real folders hold: every entry is used, converted or reported,
one file is one image id, and the reader, the driver-side scan and the Ray Data pipeline agree.

The files are made here, as a user's own conversion script and a real folder would leave them.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from step_ray.data.pix2pix import DataConfig, DatasetError, colour_count, load_pair, load_split, scan_folder
from step_ray.data.scan import scan_dataset_split

ROOT = Path(__file__).resolve().parents[1]
SIDE = 32
# facades-like labels
PALETTE = np.array([[0, 0, 170], [255, 0, 0], [0, 255, 255], [255, 255, 0], [0, 85, 255]], np.uint8)


def _pair(seed: int, side: int = SIDE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (side, 2 * side, 3), dtype=np.uint8)


def _smooth_pair(side: int = SIDE) -> np.ndarray:
    """Ramps (JPEG keeps them): red grows to the right, green downwards, the B half bluer."""
    y, x = np.mgrid[0:side, 0 : 2 * side]
    return np.stack([x * 255 // (2 * side - 1), y * 255 // (side - 1), np.where(x >= side, 200, 30)],
                    -1).astype(np.uint8)


def _save(path: Path, array: np.ndarray, **kw) -> None:
    Image.fromarray(array).save(path, **kw)


@pytest.fixture(scope="module")
def user_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("user_data")
    train, val = root / "train", root / "val"
    train.mkdir()
    val.mkdir()
    for i in range(6):
        _save(train / f"p{i}.png", _pair(i))
    for i in range(3):
        _save(val / f"v{i}.png", _pair(100 + i))
    os.symlink(train / "p0.png", train / "link_neighbour.png")  # a link to a neighbour
    os.symlink("../val/v0.png", train / "link_val.png")  # a relative link out of the split
    os.symlink(train / "missing.png", train / "broken.png")  # a broken link
    # 16-bit greyscale: a ramp over the whole 16-bit range (PIL's own convert would make it all white)
    ramp = np.tile(np.linspace(0, 65535, 2 * SIDE).astype(np.uint16), (SIDE, 1))
    Image.fromarray(ramp).save(train / "grey16.png")
    bilevel = (np.indices((SIDE, 2 * SIDE)).sum(0) % 2).astype(bool)
    Image.fromarray(bilevel).save(train / "bilevel.png")  # mode "1"
    rgba = np.zeros((SIDE, 2 * SIDE, 4), np.uint8)
    rgba[..., :3] = 40
    rgba[:, : SIDE // 2, 3] = 255  # a quarter opaque dark grey, the rest fully transparent
    Image.fromarray(rgba, "RGBA").save(train / "rgba.png")
    # a camera JPEG stored portrait (32 wide, 64 high) with orientation 6: seen as 64 x 32 after rotating
    stored = np.ascontiguousarray(np.rot90(_smooth_pair(), 1))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(train / "exif.jpg", exif=exif.tobytes(), quality=95)
    # a label map (A, 5 colours) beside a photo (B), larger than the training size
    labels = PALETTE[np.random.default_rng(3).integers(0, len(PALETTE), (8, 8))].repeat(8, 0).repeat(8, 1)
    _save(train / "label.png", np.concatenate([labels, _pair(8, 64)[:, :64]], 1))
    (train / "nested").mkdir()
    _save(train / "nested" / "deep.png", _pair(9))  # a sub-folder
    _save(train / "x.tif", _pair(10))
    _save(train / "y.gif", _pair(11)[..., 0])
    (train / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return root


NOT_READ = {"broken.png": "broken symbolic link", "nested": "sub-folder", "x.tif": "extension .tif is not read",
            "y.gif": "extension .gif is not read", ".DS_Store": "hidden file"}
IMAGES = {"p0", "p1", "p2", "p3", "p4", "p5", "link_neighbour", "link_val", "grey16", "bilevel", "rgba", "exif",
          "label"}


def _names(entries) -> dict[str, str]:
    return {path.rsplit("/", 1)[-1]: reason for path, reason in entries}


def test_the_reader_lists_every_entry_once(user_dataset):
    listing = scan_folder(str(user_dataset), "train")
    assert {Path(p).stem for p in listing.files} == IMAGES
    assert all(Path(p).parent.name == "train" for p in listing.files)  # links under their own names
    skipped = _names(listing.skipped)
    assert set(skipped) == set(NOT_READ)
    for name, words in NOT_READ.items():
        assert words in skipped[name], (name, skipped[name])


def test_awkward_images_are_converted_not_read_wrong(user_dataset):
    train = user_dataset / "train"
    a, b = load_pair(str(train / "grey16.png"))
    whole = np.concatenate([a, b], 1)[..., 0].astype(int)
    assert whole[0, 0] == 0 and whole[0, -1] == 255 and 120 < whole.mean() < 135  # rescaled, not clipped
    a, _ = load_pair(str(train / "bilevel.png"))
    assert set(np.unique(a)) == {0, 255}
    a, b = load_pair(str(train / "rgba.png"))
    assert (a[:, : SIDE // 2] == 40).all() and (a[:, SIDE // 2 :] == 255).all() and (b == 255).all()  # on white
    a, b = load_pair(str(train / "exif.jpg"))  # without the orientation it is 32 x 64: "wrong layout"
    assert a.shape == b.shape == (SIDE, SIDE, 3)
    assert np.abs(np.concatenate([a, b], 1).astype(int) - _smooth_pair()).mean() < 4  # JPEG noise only
    # the label map keeps its classes at 32 px (nearest), the photo is resized bicubically
    a, b = load_pair(str(train / "label.png"), size=SIDE)
    assert colour_count(a) == len(PALETTE) and set(map(tuple, a.reshape(-1, 3))) <= set(map(tuple, PALETTE))
    bicubic, _ = load_pair(str(train / "label.png"), size=SIDE, a_resample="bicubic")
    assert colour_count(bicubic) > len(PALETTE)
    assert colour_count(b) > 64


def test_load_split_and_scan_use_links_under_their_own_names(user_dataset):
    data = DataConfig(root=str(user_dataset), image_size=SIDE)
    split = load_split(data, "train")
    assert sorted(i.split("/", 1)[1] for i in split.ids) == sorted(IMAGES) and len(set(split.ids)) == len(split.ids)
    assert all(i.startswith("train/") for i in split.ids)
    row = split.ids.index("train/link_val")
    np.testing.assert_array_equal(split.b[row], load_pair(str(user_dataset / "val" / "v0.png"))[1])
    scanned = scan_dataset_split(str(user_dataset), "train", data)
    assert {Path(p).stem for p in scanned.good} == IMAGES and not scanned.errors
    assert set(_names(scanned.not_read)) == set(NOT_READ)

    from step_ray.data.scan import prepare_paired_splits

    inputs = prepare_paired_splits(data)
    assert set(_names(inputs.bad_files)) == set(NOT_READ)
    assert {Path(p).stem for p in inputs.train_paths} == IMAGES


def test_duplicate_stems_are_one_error_naming_both(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        _save(tmp_path / split / "a.png", _pair(0))
    Image.fromarray(_pair(1)).save(tmp_path / "train" / "a.jpg")
    with pytest.raises(DatasetError, match=r"a\.jpg and .*a\.png share the image id 'train/a'"):
        scan_folder(str(tmp_path), "train")
    assert len(scan_folder(str(tmp_path), "val").files) == 1
    proc = subprocess.run([sys.executable, "jobs/style_stats.py", f"data.root={tmp_path}",
                           f"output={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert (proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ")
            and "a.jpg" in lines[0]), proc.stderr


def test_the_ray_data_pipeline_agrees(ray_session, user_dataset, tmp_path):
    """Ids and splits from the listed path (not the link's target), the entries not read in errors.csv and
    the summary, and the 16-bit image's descriptor not an outlier."""
    from step_ray.style.statistics import (StyleStatsConfig, compute_style_stats, format_summary, read_descriptors,
                                           read_errors, read_metadata)
    from step_ray.style.reduce import ReductionConfig

    cfg = StyleStatsConfig(data=DataConfig(root=str(user_dataset), image_size=SIDE), output=str(tmp_path / "out"),
                           reduction=ReductionConfig(method="none"), num_actors=1, batch_size=8, splits=("train",))
    output = compute_style_stats(cfg)
    ids, descriptors, table = read_descriptors(output)
    assert sorted(ids) == sorted(f"train/{n}" for n in IMAGES)
    assert set(table["split"]) == {"train"}  # link_val is a train row
    assert table.set_index("image_id").loc["train/link_val", "path"].endswith("/train/link_val.png")
    errors = read_errors(output)
    assert set(_names(zip(errors["path"], errors["reason"]))) == set(NOT_READ)
    summary = read_metadata(output)["summary"]
    assert summary["images"] == len(IMAGES) and summary["not_read"] == len(NOT_READ) == summary["skipped"]
    assert f"{len(NOT_READ)} entries not read" in format_summary(summary)
    norms = np.linalg.norm(descriptors, axis=1)
    assert norms[ids.index("train/grey16")] < 5 * np.median(norms)

    # a symlinked split folder keeps its split name
    other = tmp_path / "linked"
    other.mkdir()
    os.symlink(user_dataset / "val", other / "train")
    cfg2 = StyleStatsConfig(data=DataConfig(root=str(other), image_size=SIDE), output=str(tmp_path / "out2"),
                            reduction=ReductionConfig(method="none"), num_actors=1, batch_size=8, splits=("train",))
    ids2, _, table2 = read_descriptors(compute_style_stats(cfg2))
    assert ids2 == ["train/v0", "train/v1", "train/v2"] and set(table2["split"]) == {"train"}


@pytest.mark.parametrize("job, args, words", [
    ("style_stats.py", ["data.root=/nonexistent/facades"], "/nonexistent/facades does not exist"),
    ("mine_triplets.py", ["descriptors=/nonexistent/stats", "output=/tmp/never"],
     "descriptors /nonexistent/stats does not exist"),
    ("evaluate.py", [], "set checkpoint="),
    ("sweep.py", ["variants=[nope]"], "unknown variant 'nope'"),
])
def test_every_job_fails_in_one_line(job, args, words):
    proc = subprocess.run([sys.executable, f"jobs/{job}", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (len(lines) == 1 and lines[0].startswith(("error: ", "config error: "))
            and words in lines[0]), proc.stderr[-2000:]
