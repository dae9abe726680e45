"""MUNIT evaluation (docs/method.md §9 for a two-generator model): numbers, pictures, files. CPU, tiny networks."""
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from step_ray.data.pix2pix import DataConfig
from step_ray.data.synthetic import SyntheticConfig, generate_synthetic
from step_ray.eval.metrics import LPIPSConfig, load_lpips
from step_ray.eval.munit_eval import PAIRED_KEYS, evaluate_munit, evaluate_munit_models, munit_pictures
from step_ray.models.munit import MUNITConfig, MUNITGenerator

TINY = MUNITConfig(dim=8, mlp_dim=16, n_res=1, style_dim=4)
ALL_KEYS = {"psnr", "lpips", "psnr_random_style", "diversity_refs", "diversity_random", "recon_psnr_a", "recon_psnr_b"}
SIDE, PAD = 32, 2  # image side; image_grid's padding


@pytest.fixture(autouse=True)
def _one_thread():
    # Networks this small run fastest on one thread; several threads on a busy machine cost 100x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # offline: a labelled random AlexNet trunk
        return load_lpips(LPIPSConfig())


@pytest.fixture(scope="module")
def gens():
    torch.manual_seed(0)
    return MUNITGenerator(TINY).eval(), MUNITGenerator(TINY).eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _grid_shape(rows: int, cols: int) -> tuple[int, int, int]:
    return rows * (SIDE + PAD) + PAD, cols * (SIDE + PAD) + PAD, 3


def test_metrics_keys_finite_and_reproducible(gens, lp):
    a, b = _images(5, 1), _images(5, 2)
    kw = dict(num_inputs=3, num_styles=3, seed=7, batch_size=4)
    m = evaluate_munit_models(*gens, a, b, lp, **kw)
    assert set(m) == ALL_KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in m.values()), m
    assert evaluate_munit_models(*gens, a, b, lp, **kw) == m  # same seed, same numbers
    rebatched = evaluate_munit_models(*gens, a, b, lp, **{**kw, "batch_size": 2})  # batching must not matter
    assert rebatched == pytest.approx(m, rel=1e-4)
    assert evaluate_munit_models(*gens, a, b, lp, **{**kw, "seed": 8})["psnr_random_style"] != m["psnr_random_style"]


def test_random_styles_change_the_output(gens, lp):
    m = evaluate_munit_models(*gens, _images(2, 3), _images(3, 4), lp, num_inputs=2, num_styles=3, paired=False)
    assert m["diversity_random"] > 0


def test_unpaired_leaves_out_paired_keys(gens, lp):
    m = evaluate_munit_models(*gens, _images(2, 5), _images(3, 6), lp, num_inputs=2, num_styles=2, paired=False)
    assert set(m) == ALL_KEYS - set(PAIRED_KEYS)
    with pytest.raises(ValueError, match="paired"):
        evaluate_munit_models(*gens, _images(2, 5), _images(3, 6), lp, num_inputs=2, num_styles=2)
    with pytest.raises(ValueError, match="num_styles"):
        evaluate_munit_models(*gens, _images(2, 5), _images(2, 6), lp, num_styles=3)


def test_picture_grid_shapes(gens):
    a, b = _images(4, 8), _images(5, 9)
    grids = munit_pictures(*gens, a, b, inputs=3, references=4, samples=2)
    assert grids["transfer"].shape == _grid_shape(1 + 3, 1 + 4)  # header row of references; input column
    assert grids["sampling"].shape == _grid_shape(3, 1 + 2)
    assert all(g.dtype == np.uint8 for g in grids.values())


def test_evaluate_munit_writes_files(gens, tmp_path):
    root = tmp_path / "data"
    generate_synthetic(root, SyntheticConfig(num_styles=4, num_train=8, num_val=8, image_size=SIDE))
    out = tmp_path / "eval"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        record = evaluate_munit(*gens, DataConfig(root=str(root), image_size=SIDE), "val", str(out), LPIPSConfig(),
                                grid_inputs=2, grid_references=3, grid_samples=2, num_inputs=2, num_styles=2)
    saved = json.loads((out / "metrics.json").read_text())
    assert set(saved["metrics"]) == ALL_KEYS and saved["metrics"] == pytest.approx(record["metrics"])
    assert saved["lpips_weights"].startswith(("RANDOM AlexNet", "alexnet pretrained"))
    assert saved["counts"]["images"] == 8
    assert record["output"] == str(out)
    assert set(record["pictures"]) == {"transfer", "sampling"}
    from PIL import Image

    for name, rows, cols in (("transfer", 1 + 2, 1 + 3), ("sampling", 2, 1 + 2)):
        assert Path(record["pictures"][name]) == out / f"{name}.png"
        assert np.asarray(Image.open(out / f"{name}.png")).shape == _grid_shape(rows, cols)
