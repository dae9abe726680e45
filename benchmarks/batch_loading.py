"""Batch loading: the share of step time spent waiting for the next batch, per stage, with the batches
loaded in the training process (loader_workers 0) and ahead of the step in loader worker processes; and
the peak memory of a whole epoch's loading against the image cache budget.

    python benchmarks/batch_loading.py                 # facades, 256 px, 0 against 1 loader worker
    python benchmarks/batch_loading.py --stages stage1,generator,munit --workers 1 --steps 6 --threads 2 --rounds 2

No Ray: each stage's recipe is built and prepared in this process with a Worker (rank 0 of 1, CPU), and
the steps run through the loop's own code path: `step_ray.data.loader.prefetch(recipe.batches(...),
recipe.load, workers)` feeding `recipe.step`. The waiting share is the time blocked in the loader's
`next()` over the wall time of the step loop (what the loop reports as `data_wait_share`), measured over
every step after the first ("steady") and over all of them ("all": the first step has nothing prefetched).
The two sides run in alternating rounds (0 workers, N, N, 0, ...), each with a freshly built recipe.
`train.image_cache_mb=0` for the timing: every image is decoded in every step, as for a set larger than
the cache (edges2handbags, 137k pairs, ~27 GB decoded at 256 px).

Stages: stage 1 with the conv encoder (encoder.backbone=conv, the default; the vgg_gram encoder's stem
bank reads no images), triplets of target halves at 256 px (random mined neighbours: the timing does not
depend on which rows); a generator stage ("joint": G, D, E, VGG loss with a fixed random VGG, 286 px loads
cropped to 256); MUNIT (batch 1, its default).

Memory (`--memory`): one epoch of generator batches through the loader alone (no compute) with
image_cache_mb 0, a budget smaller than the set, and one that holds it; peak PSS of this process plus its
loader workers (shared cache pages counted once), sampled every 0.1 s, and the cached rows at the end.
"""
from __future__ import annotations

import argparse
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import harness
from step_ray.config import load_config
from step_ray.data.loader import prefetch
from step_ray.data.pix2pix import DataConfig
from step_ray.data.scan import prepare_paired_splits
from step_ray.engine.distributed import seed_everything
from step_ray.engine.guard import NonFiniteGuard
from step_ray.engine.loop import Worker
from step_ray.engine.precision import MixedPrecision

FACADES = Path(__file__).resolve().parents[2] / "shared" / "data" / "facades"

CPU = torch.device("cpu")


def build_stage1(data: DataConfig, inputs, args):
    import ray.train.torch

    from step_ray.models import EncoderConfig
    from step_ray.recipes.stage1 import Stage1Training, Stage1Inputs, Stage1Recipe

    ray.train.torch.prepare_model = lambda model, *a, **k: model  # no Ray Train session here: no DDP wrap
    n, rng = len(inputs.train_paths), np.random.default_rng(0)
    m = 8
    d = rng.random((m, m))
    d = d + d.T
    np.fill_diagonal(d, 0)
    s1 = Stage1Inputs(data, inputs.train_paths, np.full(n, -1), rng.integers(0, n, (n, 5)), rng.integers(0, n, (n, 50)),
                      inputs.val_paths[:m], np.full(m, -1), d)
    cfg = Stage1Training(encoder=EncoderConfig(), batch_size=args.stage1_batch, image_cache_mb=0, val_triplets=50)
    return Stage1Recipe(replace(cfg, monitor=replace(cfg.monitor, enabled=False)), s1)


def build_generator(data: DataConfig, inputs, args):
    from step_ray.engine.settings import RunSettings
    from step_ray.pipelines.train_generator import GeneratorJobConfig, resolve_stage_config
    from step_ray.recipes.generator import GeneratorRecipe

    cfg = load_config(
        GeneratorJobConfig,
        None,
        [
            f"data.root={data.root}",
            f"data.image_size={data.image_size}",
            "data.direction=BtoA",
            "train.encoder_init=scratch",
            "train.train_encoder=true",
            "train.vgg.weights=random",
            "train.vgg_fallback=random_vgg",
            f"train.batch_size={args.generator_batch}",
            "train.image_cache_mb=0",
            "train.val_images=4",
            "train.monitor.enabled=false",
        ],
    )
    tcfg, reconstruction = resolve_stage_config(cfg.train, RunSettings(), inputs, "joint")
    return GeneratorRecipe(tcfg, inputs, name="joint", reconstruction=reconstruction)


def build_munit(data: DataConfig, inputs, args):
    from step_ray.pipelines.train_munit import MUNITJobConfig
    from step_ray.recipes.munit import MUNITRecipe

    cfg = load_config(MUNITJobConfig, None, [f"data.root={data.root}", f"data.image_size={data.image_size}",
                                                "data.direction=BtoA", "train.image_cache_mb=0", "train.val_images=4",
                                                "train.val_lpips=false", "train.monitor.enabled=false"])
    return MUNITRecipe(cfg.train, inputs)


BUILD = {"stage1": build_stage1, "generator": build_generator, "munit": build_munit}


def ready(recipe, w: Worker):
    seed_everything(recipe.cfg.seed)
    modules = recipe.build(w)
    recipe.initialise(w, modules)
    state = {"stage": recipe.name, "epoch": 0, "step": 0}
    recipe.prepare(w, state)
    return state


def timed_steps(recipe, w: Worker, state, workers: int, steps: int, depth: int) -> dict:
    """`steps` steps of epoch 0 as the loop runs them; the wait in next() and the step loop's wall time."""
    guard = NonFiniteGuard(recipe.cfg.nonfinite, recipe.name, 0)
    seed_everything(recipe.cfg.seed, 0, 0)
    batches = recipe.batches(w, 0, (0, 0))[:steps]
    recipe.begin_epoch(w, 0)
    loaded = prefetch(batches, recipe.load, workers, depth)
    waits, loops, losses = [], [], []
    tick = time.perf_counter()
    for _, batch in loaded:
        fetched = time.perf_counter()
        logs = recipe.step(w, batch, state, guard)
        state["step"] += 1
        losses.append(float(next(iter(logs.values()))) if logs else float("nan"))
        done = time.perf_counter()
        waits.append(fetched - tick)
        loops.append(done - tick)
        tick = done
    loaded.close()
    waits, loops = np.array(waits), np.array(loops)
    return {"workers": loaded.workers, "steps": len(loops), "step_s": float(loops[1:].mean()),
            "wait_s": float(waits[1:].mean()), "share_steady": float(waits[1:].sum() / loops[1:].sum()),
            "share_all": float(waits.sum() / loops.sum()), "first_wait_s": float(waits[0]), "losses": losses}


def pss_sampler(stop: threading.Event, peak: dict) -> None:
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        peak["pss"] = max(peak.get("pss", 0), total)
        peak["processes"] = max(peak.get("processes", 0), 1 + len(me.children(recursive=True)))
        time.sleep(0.1)


def memory_pass(data: DataConfig, inputs, args, budget_mb: int) -> dict:
    """One epoch of generator batches through the loader alone, with `budget_mb` of image cache."""
    import psutil

    from step_ray.data.store import pair_store
    from step_ray.engine.loop import epoch_batches

    load_size = int(round(data.image_size * 286 / 256))
    store = pair_store(inputs.train_paths, data, budget_mb, load_size)
    rng = np.random.default_rng(0)
    items = [(len(r), (r, store.windows(len(r), rng))) for r in epoch_batches(len(store), 8, [0, 0], 0, 1)]
    before = psutil.Process().memory_full_info().pss
    stop, peak = threading.Event(), {}
    sampler = threading.Thread(target=pss_sampler, args=(stop, peak), daemon=True)
    sampler.start()
    started = time.perf_counter()
    for _ in prefetch(items, lambda b: store.batch(b[0], windows=b[1]), args.workers, args.depth):
        pass
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    row_mb = 2 * load_size * load_size * 3 / 2**20
    return {"budget_mb": budget_mb, "rows": len(store), "set_mb": round(len(store) * row_mb, 1),
            "capacity": store.capacity, "cached_rows": store.cached_rows(),
            "cached_mb": round(store.cached_rows() * row_mb, 1), "pss_before_mb": round(before / 2**20, 1),
            "peak_pss_mb": round(peak.get("pss", 0) / 2**20, 1), "processes": peak.get("processes", 1),
            "seconds": round(seconds, 2)}


def stage_rounds(stage: str, data: DataConfig, inputs, args, w: Worker) -> dict:
    """0 loader workers against args.workers, in alternating rounds, a fresh recipe each run."""
    def side(workers: int):
        def run():
            recipe = BUILD[stage](data, inputs, args)
            r = timed_steps(recipe, w, ready(recipe, w), workers, args.steps, args.depth)
            harness.log(
                f"[{stage}] workers {r['workers']}: step {r['step_s']:.3f} s, waiting {r['wait_s']:.3f} s, "
                f"share {r['share_steady']:.3f} (all steps {r['share_all']:.3f}, first wait {r['first_wait_s']:.2f} s)"
            )
            return r
        return run

    runs = harness.alternate({"in_process": side(0), "ahead": side(args.workers)}, args.rounds)
    return {**runs, "same_losses": runs["in_process"][0]["losses"] == runs["ahead"][0]["losses"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(FACADES), help="a pix2pix-layout set (default ../shared/data/facades)")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--stages", default="stage1,generator,munit")
    p.add_argument("--workers", type=int, default=1, help="loader workers compared with 0")
    p.add_argument("--depth", type=int, default=2, help="loader_depth (prefetch_factor)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=1, help="rounds of the two sides, alternating")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads of the step")
    p.add_argument("--stage1-batch", type=int, default=12, help="triplets a step (stage 1's default)")
    p.add_argument("--generator-batch", type=int, default=2)
    p.add_argument("--memory", default="0,64,4096", help="image_cache_mb budgets of the memory pass ('' for none)")
    p.add_argument("--json", default="", help="write the record (command, date, machine, figures) here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = DataConfig(root=args.root, image_size=args.image_size, direction="BtoA")
    inputs = prepare_paired_splits(data)
    data = inputs.data
    w = Worker(0, 1, CPU, MixedPrecision("fp32", CPU))
    figures = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "stages": {}, "memory": []}
    for stage in [s for s in args.stages.split(",") if s]:
        figures["stages"][stage] = stage_rounds(stage, data, inputs, args, w)
    for budget in [int(b) for b in args.memory.split(",") if b]:
        figures["memory"].append(memory_pass(data, inputs, args, budget))
        harness.log(f"[memory] image_cache_mb {budget}: {figures['memory'][-1]}")
    rec = harness.record(figures)
    harness.write(args.json, rec)
    return rec


if __name__ == "__main__":
    main()
