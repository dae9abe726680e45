"""jobs/translate.py (step_ray.pipelines.translate): new inputs through a generator checkpoint on Ray Data:
every input × reference, mapper samples seeded per input, bad inputs listed and the rest translated, reruns
skipping what exists, S3 in and out, and both nodes of a two-node cluster translating their share."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from step_ray import storage
from step_ray.checkpoints import save_checkpoint
from step_ray.config import ConfigError, config_to_dict, load_config
from step_ray.models import EncoderConfig, GeneratorConfig, MapperConfig, StyleEncoder, UNetGenerator
from step_ray.pipelines.mapper import IMLEConfig, save_mapper, train_mapper
from step_ray.pipelines.translate import TranslateJobConfig, run_translate

SIZE = 32


def make_generator_checkpoint(run: Path) -> str:
    """A generator checkpoint of the trained shape (G, G_ema, E, config.yaml) and its run's IMLE mapper."""
    torch.manual_seed(0)
    g_cfg, e_cfg = GeneratorConfig(base_channels=8, num_downs=5), EncoderConfig(base_channels=8, block_channels=(8, 16))
    g, e = UNetGenerator(g_cfg), StyleEncoder(e_cfg)
    save_checkpoint(run / "checkpoint_epoch0000", {"generator": g, "generator_ema": g, "encoder": e}, {}, {"epoch": 0},
                    {"method": "stage3", "run": {}, "job": {"data": {"image_size": SIZE}},
                     "recipe": {"generator": config_to_dict(g_cfg), "encoder": config_to_dict(e_cfg)}})
    mapper, info = train_mapper(np.random.default_rng(0).normal(size=(64, 8)),
                                IMLEConfig(mapper=MapperConfig(), epochs=3), log_every=0)
    save_mapper(str(run / "mapper"), mapper, IMLEConfig(epochs=3), info)
    return str(run / "checkpoint_epoch0000")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return make_generator_checkpoint(tmp_path_factory.mktemp("run"))


def make_png(path: Path, side: tuple[int, int], seed: int, colours: int = 0) -> None:
    rng = np.random.default_rng(seed)
    if colours:  # a label map: a few flat colours
        palette = rng.integers(0, 256, (colours, 3), dtype=np.uint8)
        img = palette[rng.integers(0, colours, (side[1] // 8 + 1, side[0] // 8 + 1))].repeat(8, 0).repeat(8, 1)
        img = img[: side[1], : side[0]]
    else:
        img = rng.integers(0, 256, (side[1], side[0], 3), dtype=np.uint8)
    Image.fromarray(img).save(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """4 inputs of different sizes and kinds, one broken file; 3 reference photos."""
    root = tmp_path_factory.mktemp("translate")
    (root / "in").mkdir()
    (root / "refs").mkdir()
    make_png(root / "in" / "a.png", (40, 50), 1, colours=5)
    make_png(root / "in" / "b.png", (32, 32), 2, colours=3)
    make_png(root / "in" / "c.png", (70, 64), 3)
    Image.open(root / "in" / "c.png").convert("RGB").save(root / "in" / "d.jpg")
    (root / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    for i in range(3):
        make_png(root / "refs" / f"r{i}.png", (48, 48), 10 + i)
    return root


def _cfg(checkpoint, inputs, output, *extra) -> TranslateJobConfig:
    return load_config(TranslateJobConfig, None, [f"checkpoint={checkpoint}", f"input={inputs}",
                                                   f"output={output}", *extra])


def test_each_input_with_each_reference_bad_inputs_listed_and_reruns_skip(ray_session, checkpoint, folders, tmp_path):
    from step_ray.eval.generator_eval import load_generator
    from step_ray.pipelines.translate import decode_content
    from step_ray.style.encode import encode, load_encoder

    out = tmp_path / "out"
    summary = run_translate(_cfg(checkpoint, folders / "in", out, f"style.reference={folders / 'refs'}"))
    counts = (summary["inputs"], summary["translated"], summary["outputs_written"], summary["bad_inputs"])
    assert counts == (5, 5, 12, 1)
    table = pq.read_table(out / "manifest.parquet").to_pandas()
    good = table[table["error"] == ""]
    assert len(good) == 12 and set(good["style"]) == {"ref_r0", "ref_r1", "ref_r2"}
    assert table[table["error"] != ""]["input"].str.endswith("broken.png").all()
    assert "broken.png" in (out / "errors.csv").read_text()
    assert (out / "contact_sheet.png").is_file()
    # an output is G(A, E(reference)) at the trained size, as saved PNGs hold it
    row = good[(good["style"] == "ref_r1") & good["input"].str.endswith("a.png")].iloc[0]
    saved = np.asarray(Image.open(row["output"]))
    a = decode_content((folders / "in" / "a.png").read_bytes(), "a.png", "whole", SIZE)
    ref = decode_content((folders / "refs" / "r1.png").read_bytes(), "r1.png", "whole", SIZE, "bicubic")
    z = torch.from_numpy(encode(ref[None], load_encoder(checkpoint)))
    g, _ = load_generator(checkpoint)
    with torch.no_grad():
        direct = g(torch.from_numpy(a[None]).permute(0, 3, 1, 2).float() / 127.5 - 1, z)
    expected = ((direct[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert saved.shape == (SIZE, SIZE, 3) and np.abs(saved.astype(int) - expected).max() <= 1
    assert np.allclose(np.stack(row["code"]), z[0].numpy(), atol=1e-5)

    # a rerun translates only what is missing: the broken input, and one output removed since
    Path(row["output"]).unlink()
    again = run_translate(_cfg(checkpoint, folders / "in", out, f"style.reference={folders / 'refs'}"))
    assert (again["translated"], again["skipped"], again["outputs_written"]) == (2, 3, 3)
    table = pq.read_table(out / "manifest.parquet").to_pandas()
    assert len(table[table["error"] == ""]) == 12 and Path(row["output"]).is_file()


def test_mapper_samples_are_seeded_per_input(ray_session, checkpoint, folders, tmp_path):
    out = tmp_path / "samples"
    cfg = _cfg(checkpoint, folders / "in", out, "style.samples=4", "style.seed=3", "contact_sheet=0")
    run_translate(cfg)
    first = pq.read_table(out / "manifest.parquet").to_pandas()
    first = first[first["error"] == ""].set_index(["input", "style"]).sort_index()
    assert len(first) == 16 and not (out / "contact_sheet.png").exists()
    codes = np.stack(first["code"].map(np.stack).tolist())
    assert len(np.unique(codes.round(5), axis=0)) == 16  # every input and sample its own code
    run_translate(_cfg(checkpoint, folders / "in", out, "style.samples=4", "style.seed=3", "contact_sheet=0",
                       "overwrite=true"))
    second = pq.read_table(out / "manifest.parquet").to_pandas()
    second = second[second["error"] == ""].set_index(["input", "style"]).sort_index()
    assert np.array_equal(np.stack(second["code"].map(np.stack).tolist()), codes)


def test_s3_in_and_out_and_in_order_pairing(ray_session, checkpoint, folders, s3_bucket):
    for sub in ("in", "refs"):
        for path in sorted((folders / sub).iterdir()):
            if path.name != "broken.png":
                storage.write_bytes(f"s3://{s3_bucket}/{sub}/{path.name}", path.read_bytes())
    storage.write_bytes(f"s3://{s3_bucket}/refs/r3.png", (folders / "refs" / "r0.png").read_bytes())
    out = f"s3://{s3_bucket}/translated"
    summary = run_translate(_cfg(checkpoint, f"s3://{s3_bucket}/in", out, f"style.reference=s3://{s3_bucket}/refs",
                                 "style.pairing=in_order"))
    assert (summary["inputs"], summary["outputs_written"], summary["bad_inputs"]) == (4, 4, 0)
    table = pq.read_table(io.BytesIO(storage.read_bytes(f"{out}/manifest.parquet"))).to_pandas()
    assert list(table["style"]) == ["ref_r0", "ref_r1", "ref_r2", "ref_r3"]
    assert all(storage.exists(o) and o.startswith(f"{out}/") for o in table["output"])


def test_one_style_source_and_the_paths_are_required():
    with pytest.raises(ConfigError, match="exactly one"):
        TranslateJobConfig(checkpoint="c", input="i", output="o")
    with pytest.raises(ConfigError, match="exactly one"):
        load_config(TranslateJobConfig, None, ["checkpoint=c", "input=i", "output=o", "style.samples=2",
                                               "style.reference=r"])
    with pytest.raises(ConfigError, match="checkpoint="):
        TranslateJobConfig(input="i", output="o")


def test_munit_translates_a_to_b_with_reference_styles_and_prior_samples(ray_session, folders, tmp_path):
    """A MUNIT checkpoint: A's content decoded by B's generator, with the references' B style codes or
    with samples of its N(0, I) style prior."""
    from step_ray.eval.munit_eval import load_munit
    from step_ray.models import DiscriminatorConfig, PatchDiscriminator
    from step_ray.models.munit import MUNITConfig, MUNITGenerator
    from step_ray.pipelines.translate import decode_content

    torch.manual_seed(0)
    model = MUNITConfig(dim=8, mlp_dim=16, n_res=1, style_n_downsample=2)
    disc = DiscriminatorConfig(base_channels=8, n_layers=1, num_scales=1)
    folder = tmp_path / "munit" / "checkpoint_epoch0000"
    save_checkpoint(folder, {"gen_a": MUNITGenerator(model), "gen_b": MUNITGenerator(model),
                             "dis_a": PatchDiscriminator(disc), "dis_b": PatchDiscriminator(disc)}, {}, {"epoch": 0},
                    {"method": "munit", "run": {}, "job": {"data": {"image_size": SIZE}},
                     "recipe": {"model": config_to_dict(model), "discriminator": config_to_dict(disc)}})
    out = tmp_path / "out"
    run_translate(_cfg(folder, folders / "in", out, f"style.reference={folders / 'refs'}", "contact_sheet=0"))
    table = pq.read_table(out / "manifest.parquet").to_pandas()
    good = table[table["error"] == ""]
    assert len(good) == 12
    row = good[(good["style"] == "ref_r2") & good["input"].str.endswith("b.png")].iloc[0]
    nets = load_munit(str(folder))
    a = decode_content((folders / "in" / "b.png").read_bytes(), "b.png", "whole", SIZE)
    with torch.no_grad():
        z = torch.from_numpy(np.stack(row["code"])).float()[None]
        direct = nets["gen_b"].decode(nets["gen_a"].encode(torch.from_numpy(a[None]).permute(0, 3, 1, 2).float()
                                                           / 127.5 - 1)[0], z)
    expected = ((direct[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.abs(np.asarray(Image.open(row["output"])).astype(int) - expected).max() <= 1
    samples = run_translate(_cfg(folder, folders / "in", tmp_path / "prior", "style.samples=3", "contact_sheet=0"))
    assert samples["outputs_written"] == 12


def test_the_multidomain_model_translates_with_flow_samples_and_references(ray_session, folders, tmp_path):
    """The multi-domain model: G(x, s) with s from its flow at style.domain (samples) or from its style
    encoder at the references' domain; the domain is required."""
    from step_ray.models.multidomain import MultiDomainConfig, build_multidomain

    torch.manual_seed(0)
    cfg = MultiDomainConfig(num_domains=3, style_dim=8, dim=8, max_dim=32, n_bottleneck=1, encoder_down=3,
                            flow_hidden=(16, 16), style_disc_hidden=(16,))
    folder = tmp_path / "md" / "checkpoint_epoch0000"
    save_checkpoint(folder, build_multidomain(cfg), {}, {"epoch": 0},
                    {"method": "multidomain", "run": {}, "job": {"data": {"image_size": SIZE}},
                     "recipe": {"model": config_to_dict(cfg)}})
    with pytest.raises(ConfigError, match="style.domain"):
        run_translate(_cfg(folder, folders / "in", tmp_path / "x", "style.samples=2"))
    flow = run_translate(_cfg(folder, folders / "in", tmp_path / "flow", "style.samples=2", "style.domain=1",
                              "contact_sheet=0"))
    refs = run_translate(_cfg(folder, folders / "in", tmp_path / "refs", f"style.reference={folders / 'refs'}",
                              "style.domain=2", "contact_sheet=0"))
    assert (flow["outputs_written"], refs["outputs_written"]) == (8, 12)
    table = pq.read_table(tmp_path / "flow" / "manifest.parquet").to_pandas()
    assert table[table["error"] == ""]["style_source"].str.contains("of domain 1").all()
