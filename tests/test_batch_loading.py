"""Batches loaded ahead of the step (step_ray.data.loader): the same batches and the same training
numbers with 0 and 2 loader workers, one image cache in shared memory within its budget, the loop's
data_wait_share; and the loader workers forked inside a Ray Train worker."""
from __future__ import annotations

import pickle
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from step_ray.data.loader import prefetch, resolve_workers
from step_ray.data.store import ImageStore
from step_ray.engine.distributed import seed_everything
from step_ray.engine.guard import NonFiniteGuard
from step_ray.engine.loop import Worker
from step_ray.engine.precision import MixedPrecision

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pngs(folder: Path, count: int, side: int = 12) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (side, 2 * side, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def _read(path: str):
    x = np.asarray(Image.open(path).convert("RGB"))
    side = x.shape[0]
    return x[:, :side], x[:, side:]


def test_the_cache_is_one_shared_block_within_its_budget(tmp_path):
    paths = _pngs(tmp_path, 10)
    row_mb = 2 * 12 * 12 * 3 / 2**20
    store = ImageStore(paths, _read, 12, budget_mb=4 * row_mb + 1e-9, arrays=2, crop=8)
    assert store.capacity == 4 and store.cached_rows() == 0
    items = [
        (2, (np.array(r), store.windows(2, np.random.default_rng(i))))
        for i, r in enumerate([[0, 5], [1, 6], [2, 7], [3, 8], [4, 9]])
    ]
    load = lambda b: store.batch(b[0], windows=b[1])  # noqa: E731
    in_process = [batch for _, batch in prefetch(items, load, 0)]
    assert store.cached_rows() == 4  # rows 0-3: the budget; rows 4-9 are decoded on every use
    fresh = ImageStore(paths, _read, 12, budget_mb=4 * row_mb + 1e-9, arrays=2, crop=8)
    loaded = prefetch(items, lambda b: fresh.batch(b[0], windows=b[1]), 2)
    ahead = [batch for _, batch in loaded]
    assert loaded.workers == 2
    assert fresh.cached_rows() == 4  # written by the forked workers, seen here: one cache, not one per process
    for (a0, b0), (a1, b1) in zip(in_process, ahead):
        assert torch.equal(a0, a1) and torch.equal(b0, b1)
    again = [batch for _, batch in prefetch(items, lambda b: fresh.batch(b[0], windows=b[1]), 0)]  # now from the cache
    assert all(torch.equal(x[0], y[0]) for x, y in zip(in_process, again))
    assert pickle.loads(pickle.dumps(fresh)).capacity == 0  # a pickled copy cannot share the block: it decodes
    assert ImageStore(paths, _read, 12, budget_mb=0, arrays=2).shared is None


def test_windows_are_the_draws_batch_makes_from_an_rng(tmp_path):
    store = ImageStore(_pngs(tmp_path, 3), _read, 12, budget_mb=1, arrays=2, crop=8)
    a, b = store.batch([0, 1, 2, 1], np.random.default_rng(7))
    a2, b2 = store.batch([0, 1, 2, 1], windows=store.windows(4, np.random.default_rng(7)))
    assert torch.equal(a, a2) and torch.equal(b, b2) and torch.equal(a, b) is False
    assert ImageStore(store.paths, _read, 12, 1, arrays=2).windows(3, np.random.default_rng(0)) is None
    assert resolve_workers(-1, None) == 0 and resolve_workers(-1, 1.0) == 0 and resolve_workers(-1, 3.0) == 2
    assert resolve_workers(2, 1.0) == 2


def _steps(recipe, workers: int, steps: int = 3):
    """`steps` steps of epoch 0 as the loop runs them (fresh networks from the same seed): the loaded
    batches' checksums and the logged losses."""
    w = Worker(0, 1, CPU, MixedPrecision("fp32", CPU))
    seed_everything(recipe.cfg.seed)
    modules = recipe.build(w)
    recipe.initialise(w, modules)
    state = {"stage": recipe.name, "epoch": 0, "step": 0}
    recipe.prepare(w, state)
    guard = NonFiniteGuard(recipe.cfg.nonfinite, recipe.name, 0)
    seed_everything(recipe.cfg.seed, 0, 0)
    batches = recipe.batches(w, 0, (0, 0))[:steps]
    recipe.begin_epoch(w, 0)
    loaded = prefetch(batches, recipe.load, workers)
    sums, logs = [], []
    for _, batch in loaded:
        sums.append([float(x.double().sum()) for x in batch if torch.is_tensor(x)])
        logs.append(recipe.step(w, batch, state, guard))
        state["step"] += 1
    assert loaded.workers == workers
    return sums, logs


def test_a_generator_stage_trains_the_same_numbers_with_0_and_2_loader_workers(synthetic_root):
    from step_ray.config import load_config
    from step_ray.data.scan import prepare_paired_splits
    from step_ray.engine.settings import RunSettings
    from step_ray.pipelines.train_generator import GeneratorJobConfig, resolve_stage_config
    from step_ray.recipes.generator import GeneratorRecipe

    cfg = load_config(GeneratorJobConfig, None, [
        f"data.root={synthetic_root}", "data.image_size=32", "train.generator.num_downs=5",
        "train.generator.base_channels=8", "train.discriminator.base_channels=8", "train.discriminator.n_layers=1",
        "train.lambda_vgg=0", "train.lambda_l1=10", "train.batch_size=4", "train.val_images=4", "train.val_lpips=false",
        "train.encoder_init=scratch", "train.train_encoder=true", "train.encoder.base_channels=8",
        "train.encoder.block_channels=[8, 16]", "train.monitor.enabled=false"])
    inputs = prepare_paired_splits(cfg.data)
    tcfg, reconstruction = resolve_stage_config(cfg.train, RunSettings(), inputs, "joint")
    assert tcfg.resolved_load_size(32) > 32  # random crops: their windows travel in the batch descriptions
    make = lambda: GeneratorRecipe(tcfg, inputs, name="joint", reconstruction=reconstruction)  # noqa: E731
    sums0, logs0 = _steps(make(), 0)
    sums2, logs2 = _steps(make(), 2)
    assert sums0 == sums2 and logs0 == logs2 and all(np.isfinite(list(g.values())).all() for g in logs0)


def test_multidomain_draws_its_references_before_loading(synthetic_root):
    from step_ray.config import load_config
    from step_ray.data.domains import list_domain_split
    from step_ray.pipelines.train_multidomain import MultiDomainJobConfig
    from step_ray.recipes.multidomain import MultiDomainRecipe

    cfg = load_config(MultiDomainJobConfig, None, [
        f"data.root={synthetic_root}", "data.image_size=32", "train.model.num_domains=4", "train.model.style_dim=8",
        "train.model.dim=8", "train.model.max_dim=32", "train.model.n_bottleneck=1", "train.model.encoder_down=3",
        "train.model.flow_hidden=[16, 16]", "train.model.style_disc_hidden=[16]", "train.batch_size=4",
        "train.val_images=4", "train.monitor.enabled=false"])
    train_images, val_images = list_domain_split(cfg.data, "train"), list_domain_split(cfg.data, cfg.val_split)
    make = lambda: MultiDomainRecipe(cfg.train, cfg.data, train_images, val_images)  # noqa: E731
    sums0, logs0 = _steps(make(), 0, steps=2)
    sums2, logs2 = _steps(make(), 2, steps=2)
    assert sums0 == sums2 and logs0 == logs2


def _toy_recipe():
    from step_ray.engine.loop import Recipe, epoch_batches
    from step_ray.engine.settings import LoopConfig

    @dataclass
    class LoadedLine(Recipe):
        """Fit y = 2x on inputs `load` computes from the rows (in the loader workers when there are some)."""

        cfg: LoopConfig
        name: str = "line"

        def build(self, w):
            return {"line": torch.nn.Linear(1, 1)}

        def make_optimizers(self, w, modules):
            self.net = modules["line"]
            self.opt = torch.optim.SGD(self.net.parameters(), lr=0.5)
            return {"optimizer": self.opt}

        def batches(self, w, epoch, streams):
            return [
                (len(r), r) for r in epoch_batches(16, self.cfg.batch_size, [self.cfg.seed, epoch], w.rank, w.world)
            ]

        def load(self, rows):
            import os

            return torch.as_tensor(rows, dtype=torch.float32)[:, None] / 16, os.getpid()

        def step(self, w, batch, state, guard):
            x, pid = batch
            loss = ((self.net(x) - 2 * x) ** 2).mean()
            self.opt.zero_grad()
            if not guard.finite(state, "loss", loss):
                return None
            loss.backward()
            self.opt.step()
            import os

            return {"loss": float(loss), "loaded_elsewhere": float(pid != os.getpid())}

        def validate(self, w, state):
            return {"val_slope": float(self.net.weight)}

    return LoadedLine


def test_the_loop_forks_loader_workers_in_a_ray_train_worker_and_reports_the_wait(ray_session, tmp_path):
    import ray.cloudpickle

    from step_ray.config import config_from_dict
    from step_ray.engine.loop import train
    from step_ray.engine.settings import LoopConfig, RunSettings

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    LoadedLine = _toy_recipe()
    histories = {}
    for workers in (0, 2):
        run = RunSettings(storage_path=str(tmp_path / "runs"), name=f"w{workers}", checkpoint_metric="val_slope",
                          max_failures=0, cpus_per_worker=1)
        cfg = config_from_dict(LoopConfig, {"batch_size": 4, "max_epochs": 2, "loader_workers": workers,
                                            "monitor": {"enabled": False}})
        result, _ = train(LoadedLine(cfg), run)
        state = yaml.safe_load((Path(result.checkpoint.path) / "state.json").read_text())
        histories[workers] = state["history"]
    for workers, history in histories.items():
        assert [h["loader_workers"] for h in history] == [workers, workers]
        assert all(0 <= h["data_wait_share"] <= 1 for h in history)
        assert [h["train_loaded_elsewhere"] for h in history] == [float(workers > 0)] * 2  # forked loaders did it
    assert [h["val_slope"] for h in histories[0]] == [h["val_slope"] for h in histories[2]]
    assert [h["train_loss"] for h in histories[0]] == [h["train_loss"] for h in histories[2]]
