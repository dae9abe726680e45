"""MUNIT as a trainable baseline: which terms a step computes, that training lowers reconstruction, and the
Ray Train job (checkpoints, resume, evaluation) on tiny unpaired data."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from step_ray.config import load_config
from step_ray.losses.munit import MUNITLossWeights
from step_ray.models.munit import MUNITConfig, munit_discriminator_config
from step_ray.recipes.munit import MUNITTraining, build_munit, make_munit_optimizers, munit_step

TINY = MUNITTraining(model=MUNITConfig(dim=8, mlp_dim=16, n_res=1, style_dim=4),
                        discriminator=munit_discriminator_config(base_channels=8, n_layers=1, num_scales=2))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("cyc, vgg", [(0.0, 0.0), (10.0, 1.0)])
def test_step_computes_exactly_the_weighted_terms(cyc, vgg):
    from step_ray.style.vgg import VGGConfig, load_vgg

    cfg = dataclasses.replace(TINY, weights=MUNITLossWeights(cyc=cyc, vgg=vgg),
                              vgg=VGGConfig(layers=("relu2_2",), layer_weights=(1.0,)))
    torch.manual_seed(0)
    nets = build_munit(cfg, "cpu")
    opt_gen, opt_dis = make_munit_optimizers(cfg, nets)
    x_a, x_b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    logs = munit_step(cfg, nets, opt_gen, opt_dis, x_a, x_b, load_vgg(cfg.vgg) if vgg else None)
    families = {k.rsplit("_", 1)[0] for k in logs if k.endswith(("_a", "_b"))}
    expected = {"gan_g", "recon_x", "recon_c", "recon_s"} | ({"cycle", "vgg_in"} if cyc else set())
    assert families - {"vgg_in_l0"} == expected, families
    assert "loss_g" in logs and "loss_d" in logs and all(v == v for v in logs.values())


def test_training_lowers_reconstruction():
    cfg = dataclasses.replace(TINY, optim=dataclasses.replace(TINY.optim, lr=1e-3))
    torch.manual_seed(0)
    nets = build_munit(cfg, "cpu")
    opt_gen, opt_dis = make_munit_optimizers(cfg, nets)
    x_a, x_b = torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    first = munit_step(cfg, nets, opt_gen, opt_dis, x_a, x_b)
    for _ in range(40):
        last = munit_step(cfg, nets, opt_gen, opt_dis, x_a, x_b)
    assert last["recon_x_a"] < 0.8 * first["recon_x_a"] and last["recon_x_b"] < 0.8 * first["recon_x_b"]


def test_a_nan_loss_skips_the_update_or_flags_a_rollback():
    from step_ray.engine.guard import NonFiniteConfig, NonFiniteGuard

    x_a, x_b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    for action in ("skip", "rollback"):
        torch.manual_seed(0)
        nets = build_munit(TINY, "cpu")
        opt_gen, opt_dis = make_munit_optimizers(TINY, nets)
        before = [p.detach().clone() for p in nets["gen_a"].parameters()]
        guard = NonFiniteGuard(NonFiniteConfig(action=action, inject_at_steps=(0,)), "munit")
        state = {"step": 0, "epoch": 0}
        assert munit_step(TINY, nets, opt_gen, opt_dis, x_a, x_b, guard=guard, state=state) is None
        assert all(torch.equal(p, q) for p, q in zip(nets["gen_a"].parameters(), before))  # G's update dropped
        assert state["nonfinite"]["events"] == [{"step": 0, "epoch": 0, "loss": "loss_g", "action": action}]
        assert guard.rollback_pending == (action == "rollback")
    # injected once: the same step again trains
    assert munit_step(TINY, nets, opt_gen, opt_dis, x_a, x_b, guard=NonFiniteGuard(guard.cfg, "munit"), state=state)


def test_munit_job_trains_resumes_and_evaluates(ray_session, synthetic_root, tmp_path):
    from step_ray.pipelines.train_munit import MUNITJobConfig, run_train_munit
    from step_ray.eval.munit_eval import load_munit

    overrides = [f"data.root={synthetic_root}", "data.image_size=32", f"run.storage_path={tmp_path / 'runs'}",
                 "run.name=m", "run.max_failures=0", "train.model.dim=8", "train.model.mlp_dim=16",
                 "train.model.n_res=1", "train.model.style_dim=4", "train.discriminator.base_channels=8",
                 "train.discriminator.n_layers=1", "train.discriminator.num_scales=2", "train.batch_size=8",
                 "train.val_images=8", "eval_inputs=4", "eval_styles=3"]
    first = run_train_munit(load_config(MUNITJobConfig, None, [*overrides, "train.max_epochs=1", "train.max_steps=3",
                                                                 "train.nonfinite.inject_at_steps=[1]",
                                                                 "evaluate=false"]))
    out = run_train_munit(load_config(MUNITJobConfig, None, [*overrides, "train.max_epochs=2", "train.max_steps=6",
                                                               "run.resume=true"]))
    assert Path(first.checkpoint).parent == Path(out.checkpoint).parent  # the same run, continued
    state = json.loads((Path(out.checkpoint) / "state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [0, 1] and state["step"] == 6
    assert state["restarts"] == [{"epoch": 1, "step": 3}]  # the resume, recorded
    # the NaN injected at step 1 was skipped, counted, and remembered across the resume
    assert state["nonfinite"]["events"] == [{"step": 1, "epoch": 0, "loss": "loss_g", "action": "skip"}]
    assert [h["nonfinite_steps"] for h in state["history"]] == [1, 0]
    for key in ("train_loss_g", "train_recon_x_a", "val_psnr", "val_psnr_random_style", "val_recon_psnr_b"):
        assert state["history"][-1][key] == state["history"][-1][key], key
    m = out.eval_metrics
    for key in ("psnr", "lpips", "psnr_random_style", "diversity_refs", "diversity_random"):
        assert m[key] == m[key], key
    nets = load_munit(out.checkpoint)
    assert nets["gen_a"].encode(torch.zeros(1, 3, 32, 32))[1].shape == (1, 4)
    run_folder = Path(out.checkpoint).parent
    assert (run_folder / "samples" / "munit_epoch0001.png").is_file() and any((run_folder / "tensorboard").iterdir())
