"""The baselines and ablations of docs/method.md §7: which loss terms each variant computes, and what it trains."""
import socket

import pytest
import torch

from step_ray.config import load_config
from step_ray.style.vgg import load_vgg
from step_ray.recipes.generator import D_TERMS, G_TERMS, build_networks, freeze, make_optimizers, train_step
from step_ray.pipelines.train_generator import GeneratorJobConfig
from step_ray.recipes.variants import VARIANTS, components, variant_base

TINY = [
    "train.generator.num_downs=5", "train.generator.base_channels=8",
    "train.discriminator.base_channels=8", "train.discriminator.n_layers=1",
    "train.encoder.base_channels=8", "train.encoder.block_channels=[8, 16]",
    "train.vgg.layers=[conv1_2, conv2_2]", "train.vgg.layer_weights=[0.5, 1.0]", "train.batch_size=4",
]

# Written out from docs/method.md §7, not derived from the code: what each variant must compute.
REC = {"vgg"}
EXPECTED_G = {
    "bicycle_v0": {"gan_g", "l1", "kl", "gan_random", "latent"},
    "bicycle_v1": {"gan_g", *REC, "kl", "gan_random", "latent"},
    "bicycle_v2": {"gan_g", *REC, "gan_random", "latent"},
    "bicycle_v3": {"gan_g", *REC, "z_l2", "gan_random", "latent"},
    "munitp_v1": {"gan_g", *REC, "kl", "cycle", "gan_random", "latent"},
    "munitp_v2": {"gan_g", *REC, "cycle", "gan_random", "latent"},
    "munitp_v3": {"gan_g", *REC, "z_l2", "cycle", "gan_random", "latent"},
    "ours_v1": {"gan_g", *REC, "z_l2", "cycle", "gan_random", "latent"},
    "ours_v2": {"gan_g", *REC, "z_l2", "gan_random", "latent"},
    "ours_v3": {"gan_g", *REC, "z_l2"},
    "ours_v4": {"gan_g", *REC},
}
SCRATCH = {"bicycle_v0", "bicycle_v1", "bicycle_v2", "bicycle_v3", "munitp_v1", "munitp_v2", "munitp_v3"}
VAE = {"bicycle_v0", "bicycle_v1", "munitp_v1"}


def test_the_variant_list_is_the_papers():
    from step_ray.recipes.variants import GENERATOR_VARIANTS

    assert set(GENERATOR_VARIANTS) == set(EXPECTED_G) and set(VARIANTS) == set(EXPECTED_G) | {"munit", "multidomain",
                                                                                              "multidomain_plain"}


def _cfg(name):
    return load_config(GeneratorJobConfig, None, TINY, base=variant_base(name)).train


@pytest.mark.parametrize("name", sorted(EXPECTED_G))
def test_variant_computes_exactly_its_loss_terms(name):
    cfg = _cfg(name)
    assert cfg.variant == name
    parts = components(cfg)
    assert parts["vae"] == (name in VAE) and parts["encoder"] == ("scratch" if name in SCRATCH else "pre-trained")
    torch.manual_seed(0)
    nets = build_networks(cfg, "cpu")
    assert ("discriminator_random" in nets) == (name == "bicycle_v0")  # BicycleGAN's own second D
    if not cfg.train_encoder:
        freeze(nets["encoder"])  # the pre-trained variants start with stage 2
    opt_g, opt_d = make_optimizers(cfg, nets, None, "cpu")
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in nets.items()}
    vgg = load_vgg(cfg.vgg) if cfg.lambda_vgg else None
    a, b = torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(4, 3, 32, 32) * 2 - 1
    for step in range(2):
        logs = train_step(cfg, nets, opt_g, opt_d, a, b, vgg, step)
    assert set(logs) & set(G_TERMS) == EXPECTED_G[name]
    expected_d = {"loss_d"} | ({"loss_d_random"} if "gan_random" in EXPECTED_G[name] else set())
    assert set(logs) & set(D_TERMS) == expected_d
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    total = logs["loss_g"]
    assert total > 0
    changed = {k: any(not torch.equal(p, q) for p, q in zip(m.parameters(), before[k])) for k, m in nets.items()}
    assert changed["generator"] and changed["discriminator"]
    assert changed["encoder"] == (name in SCRATCH)  # scratch: E trains with G; pre-trained: frozen in stage 2
    if "discriminator_random" in nets:
        assert changed["discriminator_random"]


def test_latent_term_trains_g_not_e():
    """cLR-GAN's |E(G(A, z_r)) − z_r| reaches G through E's input but leaves E's weights alone (BicycleGAN)."""
    import dataclasses

    from step_ray.recipes.generator import generator_loss

    cfg = dataclasses.replace(_cfg("bicycle_v2"), lambda_gan=0.0, lambda_gan_random=0.0, lambda_vgg=0.0, lambda_l1=1.0)
    torch.manual_seed(0)
    nets = build_networks(cfg, "cpu")
    a = torch.rand(2, 3, 32, 32)
    z = nets["encoder"](a).detach()  # E's only path to the loss is then the latent term
    z_r = torch.randn(2, cfg.generator.nz)
    loss, logs = generator_loss(cfg, nets, a, a, (z, z, None), nets["generator"](a, z), z_r, nets["generator"](a, z_r),
                                None)
    assert set(logs) == {"l1", "latent", "loss_g"} and logs["latent"] > 0
    loss.backward()
    assert all(p.grad is None for p in nets["encoder"].parameters())
    assert all(p.requires_grad for p in nets["encoder"].parameters())  # restored afterwards
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets["generator"].parameters())


def test_cycle_pairs_each_image_with_its_own_recovered_code():
    """With an identity-like G and E the cross cycle rebuilds B exactly: the roll directions are right."""
    from step_ray.recipes.generator import generator_loss

    class CodeIsImage(torch.nn.Module):  # E(x) = mean colour; G(a, z) = a plane of that colour
        def forward(self, x, with_logvar=False):
            return x.mean((2, 3))

    class PaintCode(torch.nn.Module):
        def forward(self, a, z):
            return z[:, :, None, None].expand_as(a)

    import dataclasses

    base = _cfg("munitp_v2")
    cfg = dataclasses.replace(base, lambda_gan=0.0, lambda_gan_random=0.0, lambda_latent=0.0, lambda_vgg=0.0,
                              lambda_l1=1.0, generator=dataclasses.replace(base.generator, nz=3),
                              encoder=dataclasses.replace(base.encoder, nz=3))
    b = torch.rand(5, 3, 1, 1).expand(5, 3, 4, 4).contiguous()
    a = torch.zeros_like(b)
    nets = {"generator": PaintCode(), "encoder": CodeIsImage()}
    z = nets["encoder"](b)
    _, logs = generator_loss(cfg, nets, a, b, (z, z, None), b, None, None, None)
    assert logs["cycle"] == pytest.approx(0.0, abs=1e-7) and logs["l1"] == pytest.approx(0.0, abs=1e-7)


def test_unknown_variant_and_impossible_settings():
    with pytest.raises(KeyError, match="known: bicycle_v0"):
        variant_base("bicycle_v9")
    with pytest.raises(ValueError, match="variational"):
        load_config(GeneratorJobConfig, None, [*TINY, "train.lambda_kl=0.1"])
    with pytest.raises(ValueError, match="train_encoder"):
        load_config(GeneratorJobConfig, None, [*TINY, "train.encoder_init=scratch"])
    # a variant is a preset: the command line still wins
    cfg = load_config(GeneratorJobConfig, None, [*TINY, "train.lambda_kl=0.05"], base=variant_base("bicycle_v1")).train
    assert cfg.lambda_kl == 0.05 and cfg.encoder.variational and cfg.encoder.base_channels == 8
    assert VARIANTS["bicycle_v1"].train["lambda_kl"] == 0.01  # the preset itself is untouched


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _average_worker(rank, port, out):
    import torch.distributed as dist

    from step_ray.engine.distributed import average_gradients, broadcast_parameters

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different initial weights on each rank
    net = torch.nn.Linear(3, 2)
    unused = torch.nn.Linear(2, 2)  # no gradient on this rank: counts as zero
    broadcast_parameters(net, unused)
    x = torch.full((1, 3), float(rank + 1))
    (net(x).sum() + net(2 * x).sum()).backward()  # two passes before one backward: fine without DDP
    if rank == 1:
        unused(torch.ones(1, 2)).sum().backward()
    average_gradients(net, unused)
    # plain lists: no shared memory
    out.put((rank, net.weight.tolist(), net.weight.grad.tolist(), unused.bias.grad.tolist()))
    dist.destroy_process_group()


def test_average_gradients_over_two_processes():
    ctx = torch.multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_average_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict((r, rest) for r, *rest in (out.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(30)
    (w0, g0, u0), (w1, g1, u1) = ([torch.tensor(t) for t in got[r]] for r in (0, 1))
    assert torch.equal(w0, w1)  # rank 0's weights everywhere
    # d/dW of sum(W x) + sum(W 2x) = 3x per output row; mean over ranks of 3·1 and 3·2
    assert torch.allclose(g0, torch.full((2, 3), 4.5)) and torch.equal(g0, g1)
    assert torch.allclose(u0, torch.full((2,), 0.5)) and torch.equal(u0, u1)  # (0 + 1) / 2


def test_train_generator_job_variant_switch(capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("job_train_generator",
                                                  Path(__file__).resolve().parents[1] / "jobs" / "train_generator.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.pop_variant(["a=1", "--variant", "ours_v2", "b=2"]) == ("ours_v2", ["a=1", "b=2"])
    assert job.pop_variant(["--variant=bicycle_v0"]) == ("bicycle_v0", [])
    job.main(["--variant", "list"])
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == list(VARIANTS)
    with pytest.raises(SystemExit) as exc:
        job.main(["--variant", "bicycle_v9"])
    assert exc.value.code == 2 and "unknown variant" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        job.main(["--variant", "munit"])
    assert exc.value.code == 2 and "train_munit.py" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # a pre-trained variant without its stage-1 checkpoint: one clear line
        job.main(["--variant", "ours_v1"])
    assert exc.value.code == 2 and "encoder_checkpoint" in capsys.readouterr().err


def test_steps_discriminator_for_its_variants_bicycleganss_for_v0():
    """docs/method.md §5: StEP's D has 32 filters and 3 scales; BicycleGAN v0 keeps its official D (64, 2 scales,
    no minibatch statistic), so v1 ("BicycleGAN with StEP's networks") differs from v0 in D as well."""
    for name in EXPECTED_G:
        d = load_config(GeneratorJobConfig, None, [], base=variant_base(name)).train.discriminator
        expected = (64, 2, False) if name == "bicycle_v0" else (32, 3, True)
        assert (d.base_channels, d.num_scales, d.minibatch_stddev) == expected, name
