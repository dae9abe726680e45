"""The IMLE mapper on a toy Gaussian mixture of codes: the loss falls and every cluster gets samples."""
import numpy as np
import torch

from step_ray.models import MapperConfig
from step_ray.eval.generator_eval import load_mapper
from step_ray.losses.imle import imle_objective
from step_ray.pipelines.mapper import IMLEConfig, save_mapper, train_mapper


def _mixture(k=6, n=480, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (k, dim))
    labels = np.arange(n) % k
    return (centres[labels] + 0.2 * rng.normal(size=(n, dim))).astype(np.float32), centres


def test_mapper_covers_every_cluster(tmp_path):
    codes, centres = _mixture()
    cfg = IMLEConfig(epochs=40, lr_decay_every=20, recompute_every=5)
    untrained = imle_objective(train_mapper(codes, IMLEConfig(epochs=1, lr=1e-9))[0], codes, 10 * len(codes))
    mapper, info = train_mapper(codes, cfg, log_every=0)
    losses = [h["loss"] for h in info["history"]]
    assert losses[-1] < 0.05 * losses[0]
    after = imle_objective(mapper, codes, 10 * len(codes), seed=1)
    assert after < 0.1 * untrained  # every code now has a nearby sample
    samples = mapper.sample(3000, torch.Generator().manual_seed(0)).numpy()
    nearest = ((samples[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(nearest, minlength=len(centres))
    assert (counts >= 0.03 * len(samples)).all(), counts  # no mode dropped
    # saved with the run, loaded back identically
    save_mapper(str(tmp_path / "mapper"), mapper, cfg, info)
    again = load_mapper(str(tmp_path / "mapper"))
    r = torch.randn(4, 8)
    torch.testing.assert_close(again(r), mapper(r))
    assert torch.get_num_threads() >= 1


def test_mapper_config_and_max_codes():
    codes, _ = _mixture(n=200, dim=4)
    mapper, info = train_mapper(codes, IMLEConfig(mapper=MapperConfig(nz=4, hidden=(16,)), epochs=2, max_codes=50),
                                log_every=0)
    assert info["num_codes"] == 50 and mapper(torch.randn(3, 8)).shape == (3, 4)
