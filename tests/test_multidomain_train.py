"""The multi-domain style model under training: switchable terms, falling losses, the Ray job with resume
and its evaluation (grids, diversity per domain, unification, smoothness)."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from step_ray.config import load_config
from step_ray.losses.multidomain import MultiDomainLossWeights
from step_ray.models.multidomain import MultiDomainConfig, build_multidomain
from step_ray.recipes.multidomain import MultiDomainTraining, make_optimizers, multidomain_step

TINY_MODEL = MultiDomainConfig(num_domains=3, style_dim=8, dim=8, max_dim=32, n_down=2, n_bottleneck=1, encoder_down=3,
                               flow_hidden=(16, 16), style_disc_hidden=(16,))
TINY = MultiDomainTraining(model=TINY_MODEL, batch_size=4)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    return (x, torch.tensor([0, 0, 1, 2]), torch.rand(4, 3, 32, 32, generator=g) * 2 - 1,
            torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, torch.tensor([1, 2, 0, 0]))


@pytest.mark.parametrize("uni, smooth, form", [(1.0, 1.0, "adversarial"), (0.0, 0.0, "adversarial"),
                                               (1.0, 0.0, "likelihood")])
def test_step_computes_the_switched_terms(uni, smooth, form):
    cfg = dataclasses.replace(TINY, weights=MultiDomainLossWeights(uni=uni, smooth=smooth), uni_form=form)
    adversarial = bool(uni) and form == "adversarial"
    torch.manual_seed(0)
    nets = build_multidomain(cfg.model)
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in nets.items()}
    logs = multidomain_step(cfg, nets, make_optimizers(cfg, nets), *_batch(), step=0)
    latent = {k[: -len("_latent")] for k in logs if k.endswith("_latent")}
    assert {"adv", "sty", "ds", "cyc"} <= latent
    likelihood = bool(uni) and form == "likelihood"
    assert ("uni" in latent) == adversarial and ("uni_nll" in logs) == likelihood
    assert ("uni_prior_kl" in latent) == likelihood  # E's pull towards the flow's base (uni_moves both)
    assert ("smooth" in latent) == bool(smooth)
    assert ("uni_d" in logs) == adversarial and "r1" in {k[2:] for k in logs if k.startswith("d_")}
    assert not any(k.startswith(("uni", "smooth")) for k in logs if k.endswith("_ref"))  # latent pass only
    changed = {k: any(not torch.equal(p, q) for p, q in zip(m.parameters(), before[k])) for k, m in nets.items()}
    assert changed["generator"] and changed["style_encoder"] and changed["discriminator"] and changed["flow"]
    assert changed["style_discriminator"] == adversarial  # D_s is trained only by the adversarial L_uni
    assert all(v == v for v in logs.values())


def test_a_few_steps_lower_the_reconstruction_terms():
    cfg = dataclasses.replace(TINY, weights=MultiDomainLossWeights(adv=0.0, r1=0.0, ds=0.0, uni=0.0),
                              optim=dataclasses.replace(TINY.optim, lr=1e-3))
    torch.manual_seed(0)
    nets = build_multidomain(cfg.model)
    opts = make_optimizers(cfg, nets)
    batch = _batch()
    first = multidomain_step(cfg, nets, opts, *batch, step=0)
    for step in range(1, 25):
        last = multidomain_step(cfg, nets, opts, *batch, step=step)
    assert last["cyc_latent"] < 0.8 * first["cyc_latent"]
    assert last["sty_latent"] < first["sty_latent"]


def test_the_likelihood_form_fits_the_flow_to_the_reference_styles():
    """uni_form=likelihood, uni_moves=latent, every other term off: the flow's density of E's (fixed)
    reference styles rises, and E does not move towards the flow (its codes are detached). A faint λ_ds keeps
    a term in the reference pass; it reaches G and the flow only."""
    weights = MultiDomainLossWeights(adv=0.0, sty=0.0, cyc=0.0, ds=1e-3, smooth=0.0, r1=0.0, uni=1.0)
    cfg = dataclasses.replace(TINY, weights=weights, uni_form="likelihood", uni_moves="latent", uni_flow_lr=1e-2,
                              optim=dataclasses.replace(TINY.optim, weight_decay=0.0))
    torch.manual_seed(0)
    nets = build_multidomain(cfg.model)
    opts = make_optimizers(cfg, nets)
    encoder = [p.detach().clone() for p in nets["style_encoder"].parameters()]
    batch = _batch()
    first = multidomain_step(cfg, nets, opts, *batch, step=0)["uni_nll"]
    for step in range(1, 40):
        last = multidomain_step(cfg, nets, opts, *batch, step=step)["uni_nll"]
    assert last < first - 0.2, (first, last)  # nats per style dimension
    assert all(torch.equal(p, q) for p, q in zip(nets["style_encoder"].parameters(), encoder))
    # the affine layer holds the moments of the step's styles (the real images' and both references'),
    # 40 steps of the same batch: 6, 3 and 3 styles of domains 0, 1, 2 a step
    x_real, y_org, x_ref, x_ref2, y_trg = batch
    with torch.no_grad():
        codes = torch.cat([nets["style_encoder"](x, y) for x, y in ((x_ref, y_trg), (x_ref2, y_trg), (x_real, y_org))])
    domains = torch.cat([y_trg, y_trg, y_org])
    flow = nets["flow"]
    assert flow.style_count.tolist() == [240.0, 120.0, 120.0]
    for dom in range(3):
        assert torch.allclose(flow.style_mean[dom], codes[domains == dom].mean(0), atol=1e-5)


def test_the_likelihood_form_with_both_sides_moves_the_encoder_towards_the_flows_base():
    """uni_moves=both (the default) adds E's side: with every other term off, E moves, and the running KL of
    its styles' Gaussian to the flow's base falls from the collapsed start (a fresh E puts its variance in
    few directions); uni_moves=reference has no likelihood form."""
    weights = MultiDomainLossWeights(adv=0.0, sty=0.0, cyc=0.0, ds=1e-3, smooth=0.0, r1=0.0, uni=1.0)
    cfg = dataclasses.replace(TINY, weights=weights, uni_form="likelihood", uni_flow_lr=1e-2,
                              optim=dataclasses.replace(TINY.optim, lr=1e-3, weight_decay=0.0))
    torch.manual_seed(0)
    nets = build_multidomain(cfg.model)
    opts = make_optimizers(cfg, nets)
    encoder = [p.detach().clone() for p in nets["style_encoder"].parameters()]
    kls = [multidomain_step(cfg, nets, opts, *_batch(step % 4), step=step)["uni_prior_kl_latent"] for step in range(60)]
    assert not all(torch.equal(p, q) for p, q in zip(nets["style_encoder"].parameters(), encoder))
    assert np.mean(kls[-10:]) < 0.5 * np.mean(kls[2:12]), kls
    with pytest.raises(ValueError, match="adversarial form"):
        dataclasses.replace(cfg, uni_moves="reference")


def test_a_nan_loss_skips_the_update_or_flags_a_rollback():
    from step_ray.engine.guard import NonFiniteConfig, NonFiniteGuard

    for action in ("skip", "rollback"):
        torch.manual_seed(0)
        nets = build_multidomain(TINY.model)
        opts = make_optimizers(TINY, nets)
        before = {k: [p.detach().clone() for p in nets[k].parameters()] for k in ("flow", "style_encoder")}
        guard = NonFiniteGuard(NonFiniteConfig(action=action, inject_at_steps=(0,)), "multidomain")
        state = {"step": 0, "epoch": 0}
        assert multidomain_step(TINY, nets, opts, *_batch(), step=0, guard=guard, state=state) is None
        for k, params in before.items():  # the latent G/F/E update was dropped (F and E take no other update)
            assert all(torch.equal(p, q) for p, q in zip(nets[k].parameters(), params)), k
        assert state["nonfinite"]["events"] == [{"step": 0, "epoch": 0, "loss": "loss_g (latent)", "action": action}]
        assert guard.rollback_pending == (action == "rollback")


def test_protocol_inputs_come_evenly_from_the_other_domains():
    from step_ray.eval.multidomain_eval import _inputs_from_other_domains

    domains = np.array([0] * 10 + [1] * 3 + [2] * 10)
    rows = _inputs_from_other_domains(domains, 0, 8, np.random.default_rng(0))
    assert len(rows) == 8 and len(set(rows.tolist())) == 8 and (domains[rows] != 0).all()
    assert np.bincount(domains[rows], minlength=3).tolist() == [0, 3, 5]  # domain 1 gives all it has
    assert len(_inputs_from_other_domains(domains, 0, 100, np.random.default_rng(0))) == 13


def test_unification_accuracy_reads_chance_and_separation():
    from step_ray.eval.multidomain_eval import unification_accuracy

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (400,), generator=g)
    same = unification_accuracy(torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g), y)
    apart = unification_accuracy(torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g) + 3.0, y)
    assert 0.35 < same < 0.65 and apart > 0.95


def test_multidomain_job_trains_resumes_and_evaluates(ray_session, synthetic_root, tmp_path):
    from step_ray.pipelines.train_multidomain import MultiDomainJobConfig, run_train_multidomain
    from step_ray.eval.multidomain_eval import load_multidomain

    # data.root: the shared fixture is read as it is, never regenerated with other settings
    overrides = [f"data.root={synthetic_root}", "data.image_size=32", f"run.storage_path={tmp_path / 'runs'}",
                 "run.name=md", "run.max_failures=0", "train.model.num_domains=4", "train.model.style_dim=8",
                 "train.model.dim=8", "train.model.max_dim=32", "train.model.n_bottleneck=1",
                 "train.model.encoder_down=3",
                 "train.model.flow_hidden=[16, 16]", "train.model.style_disc_hidden=[16]", "train.batch_size=8",
                 "train.val_images=16", "eval_inputs=2", "eval_styles=2", "train.uni_form=likelihood",
                 "train.style_flow_refit_steps=20"]  # the refit's path; the study runs 500
    first = run_train_multidomain(load_config(MultiDomainJobConfig, None, [*overrides, "train.max_epochs=1",
                                                                             "train.max_steps=2", "evaluate=false",
                                                                             "train.nonfinite.inject_at_steps=[0]"]))
    out = run_train_multidomain(load_config(MultiDomainJobConfig, None, [*overrides, "train.max_epochs=2",
                                                                           "train.max_steps=4", "run.resume=true"]))
    assert out.details["domains"] == ["stripes", "checks", "dots", "blotches"]
    assert Path(first.checkpoint).parent == Path(out.checkpoint).parent
    state = json.loads((Path(out.checkpoint) / "state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [0, 1] and state["step"] == 4
    assert state["restarts"] == [{"epoch": 1, "step": 2}]  # the resume, recorded
    assert [e["step"] for e in state["nonfinite"]["events"]] == [0] and state["nonfinite"]["skipped"] == 1
    assert [h["nonfinite_steps"] for h in state["history"]] == [1, 0]
    m = out.eval_metrics
    assert set(m["diversity_per_domain"]) == set(out.details["domains"]) and 0 <= m["unification_accuracy"] <= 1
    for key in ("diversity_latent", "diversity_reference", "interp_lpips_mean", "interp_lpips_var"):
        assert m[key] == m[key], key
    # StarGAN v2's protocol: every target domain, latent- and reference-guided, inputs from the other domains
    assert sorted((r["domain"], r["mode"]) for r in m["protocol"]) == sorted(
        (d, mode) for d in out.details["domains"] for mode in ("latent", "reference"))
    assert all(r["inputs"] == 2 and r["styles"] == 2 and r["diversity"] >= 0 for r in m["protocol"])
    if m["fid_weights"].startswith("inception-v3-tf"):  # the real FID Inception is installed (CI installs it)
        assert all(r["fid"] >= 0 and r["kid"] == r["kid"] and r["fid_floor"] >= 0 for r in m["protocol"])
        assert {"fid_latent", "fid_reference", "kid_latent", "kid_reference", "fid_floor"} <= set(m)
    else:
        assert "fid_latent" not in m and "fid" not in m["protocol"][0]
    # 32 held-out images over 4 domains: too few for DCI's held-out half, and it says so
    assert m["dci"].startswith("not computed")
    for name in ("latent_guided", "reference_guided"):
        assert Path(out.outputs["eval"], f"{name}.png").stat().st_size > 300
    nets = load_multidomain(out.checkpoint)
    assert nets["flow"](torch.zeros(2, 8), torch.tensor([0, 3])).shape == (2, 8)
    # the likelihood form's end-of-epoch refit: the saved flow holds the moments of E's training styles
    from step_ray.data.domains import DomainDataConfig, list_domain_split
    from step_ray.data.store import domain_store

    data = DomainDataConfig(root=str(synthetic_root), image_size=32)
    train = list_domain_split(data, "train")
    rows = np.arange(min(len(train.paths), 4096))
    y = torch.as_tensor(train.domains[rows])
    with torch.no_grad():
        styles = nets["style_encoder"](domain_store(train, data, 0).batch(rows), y)
    assert float(nets["flow"].style_count.sum()) == len(rows)
    for d in range(4):
        assert torch.allclose(nets["flow"].style_mean[d], styles[y == d].mean(0), atol=1e-4)
    samples = Path(out.checkpoint).parent / "samples"
    assert (samples / "multidomain_epoch0001.png").is_file(), (
        out.checkpoint, sorted(p.name for p in Path(out.checkpoint).parent.rglob("*")))
    # one checkpoint schema: the checkpoint CLI ranks this run by its own metric (val_style_gap, lower is better)
    from step_ray import checkpoints

    record = yaml.safe_load((Path(out.checkpoint) / "config.yaml").read_text())
    assert record["method"] == "multidomain" and record["run"]["checkpoint_metric"] == "val_style_gap"
    assert record["recipe"]["model"]["style_dim"] == 8 and record["job"]["data"]["image_size"] == 32
    gaps = {f"checkpoint_epoch{h['epoch']:04d}": h["val_style_gap"] for h in state["history"]}
    assert checkpoints.best_checkpoint(out.last.run_folder).name == min(gaps, key=gaps.get)
