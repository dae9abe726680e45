"""Ray Tune sweeps over the ablation grid (variants × seeds) and over loss weights (docs/method.md §7).

The driver (`run_sweep`) owns what a sweep is: the grid of variants and seeds, the sampled settings from
a YAML search space, the scheduler (ASHA, optional), the resources and the experiment's storage (local
or s3://). Each trial (`run_trial`) is one `run_train_generator`: a Ray Train run per stage with its own
workers, its per-epoch reports forwarded to Tune, its evaluation reported once at the end. An interrupted
sweep is continued with `resume=true` (Tuner.restore): finished trials are kept, not rerun; an
unfinished one starts again and its stages continue from their own last checkpoints.

Search space YAML (keys are GeneratorJobConfig settings, dotted):

    train.lambda_l1: {grid: [5, 10, 20]}            # every value, for every variant and seed
    train.lambda_z_l2: {loguniform: [0.001, 0.1]}   # num_samples draws per grid point
    train.lambda_gan: {choice: [0.5, 1.0]}          # also: uniform [lo, hi], randint [lo, hi]

Every trial's config is: defaults <- its variant <- `trial` (this sweep's settings for all trials) <-
its sampled values <- train.seed.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import pathlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import ray
import ray.tune
import yaml
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from step_ray import storage
from step_ray.cluster import alive_nodes, check_placement, check_shared_storage, dataset_location, groups_that_fit
from step_ray.config import ConfigError, config_from_dict, config_to_yaml, dotted_to_tree, merge_trees
from step_ray.engine.launch import wants_gpu
from step_ray.eval.ablation_table import write_results
from step_ray.pipelines.train_generator import GeneratorJobConfig, run_train_generator
from step_ray.pipelines.train_multidomain import MultiDomainJobConfig, run_train_multidomain
from step_ray.pipelines.train_munit import MUNITJobConfig, run_train_munit
from step_ray.recipes.variants import VARIANTS, components, get_variant, variant_base

SEARCH_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class SweepJobConfig:
    """`jobs/sweep.py`: which trials, how they are scheduled, where the experiment lives."""

    name: str = ""  # experiment folder; empty: sweep-<UTC time> (resume=true needs the name)
    storage_path: str = "runs/sweeps"  # local folder or s3://bucket/prefix
    resume: bool = False  # continue the experiment `name` (Tuner.restore): finished trials are not rerun
    variants: tuple[str, ...] = tuple(VARIANTS)
    seeds: tuple[int, ...] = (0,)
    search_space: str = ""  # YAML file of sampled/gridded settings (see the module docstring); empty: none
    num_samples: int = 1  # draws of the sampled settings per (variant, seed, grid point)
    trial: dict[str, Any] = field(default_factory=dict)  # GeneratorJobConfig settings every trial gets
    munit_trial: dict[str, Any] = field(default_factory=dict)  # MUNITJobConfig settings of the `munit` variant
                                                               # (its data and val_split default to trial's)
    multidomain_trial: dict[str, Any] = field(default_factory=dict)  # MultiDomainJobConfig settings of the
                                                                     # multidomain variants (image_size from trial's)
    asha: bool = False  # ASHA early stopping on the per-epoch `asha_metric`
    asha_metric: str = "val_psnr"
    asha_mode: Literal["max", "min"] = "max"
    asha_grace_period: int = 1  # epochs every trial gets before it can be stopped
    asha_reduction_factor: int = 2
    trial_cpus: float = 1.0  # the trial's own process (its stages' driver, the mapper, the evaluation)
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs (or GPUs) hold at once
    max_failures: int = 0  # Tune restarts of a failed trial (each stage also retries: trial.run.max_failures)
    table_only: bool = False  # rebuild the results table of an existing experiment, train nothing
    # the table's "time to a validation LPIPS": a trial's wall time (Tune's time_total_s, stage start-ups
    # included) at its first epoch report with val_lpips <= this; 0: not reported. A trial rerun after an
    # interruption (resume=true) starts Tune's record afresh: its stages restored from their checkpoints
    # report only the epochs they train again, so it may have no time ("–")
    lpips_target: float = 0.0

    def __post_init__(self):
        if not self.variants or not self.seeds:
            raise ValueError("a sweep needs at least one variant and one seed")
        for name in self.variants:
            try:
                get_variant(name)
            except KeyError as exc:  # a config error: one line through the loader, not a traceback
                raise ValueError(exc.args[0]) from None
        if self.num_samples < 1 or self.asha_grace_period < 1 or self.asha_reduction_factor < 2:
            raise ValueError("num_samples and asha_grace_period must be >= 1, asha_reduction_factor >= 2")
        if self.resume and not self.name:
            raise ValueError("resume=true continues a named experiment: set name=<the experiment folder>")
        if self.table_only and not self.name:
            raise ValueError("table_only=true reads a named experiment: set name=<the experiment folder>")
        if self.lpips_target < 0:
            raise ValueError(f"lpips_target must be >= 0 (0: not reported), got {self.lpips_target}")


# ----------------------------------------------------------------------------------------------------
# the search space


def read_search_space(path: str) -> dict[str, dict[str, Any]]:
    """{dotted key: {kind: values}} from YAML, checked (one kind per key, known kinds, sane ranges)."""
    if not path:
        return {}
    try:
        tree = yaml.safe_load(storage.read_bytes(path)) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"search_space {path} is not valid YAML: {exc}") from exc
    if not isinstance(tree, dict):
        raise ConfigError(f"search_space {path}: expected a mapping of settings")
    for key, spec in tree.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SEARCH_KINDS:
            raise ConfigError(f"search_space {path}: {key}: expected one of {{{', '.join(SEARCH_KINDS)}: ...}}, "
                              f"got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"search_space {path}: {key}.{kind}: expected a non-empty list")
        if kind in ("uniform", "loguniform", "randint") and (len(values) != 2 or not values[0] < values[1]):
            raise ConfigError(f"search_space {path}: {key}.{kind}: expected [low, high] with low < high")
        if kind == "loguniform" and values[0] <= 0:
            raise ConfigError(f"search_space {path}: {key}.loguniform: the low end must be > 0")
    return tree


def tune_domains(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values) for key, spec in space.items() for kind, values in spec.items()}


def representative_values(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One value per key (the first listed, or the low end) to check the settings exist before launching."""
    return {key: values[0] for key, spec in space.items() for values in spec.values()}


# ----------------------------------------------------------------------------------------------------
# one trial


@dataclass(frozen=True)
class TrialPipeline:
    """How a sweep runs a variant of one recipe: its job config, its pipeline, the SweepJobConfig field with
    its settings, what it takes from `trial` (the generator variants' settings), and the evaluation
    metric that stands for "diversity of sampled outputs" in the table (each samples styles its own way)."""

    config: type
    run: Callable[..., dict[str, Any]]
    settings_field: str
    shared: Callable[[dict[str, Any]], dict[str, Any]]
    sampled_diversity: str = "diversity_mapper"


def _munit_shared(trial: dict[str, Any]) -> dict[str, Any]:
    return {k: trial[k] for k in ("data", "val_split") if k in trial}  # MUNIT reads the same paired set


def _multidomain_shared(trial: dict[str, Any]) -> dict[str, Any]:  # its own domains; the same image size
    return {"data": {"image_size": trial["data"]["image_size"]}} if "image_size" in trial.get("data", {}) else {}


PIPELINES: dict[str, TrialPipeline] = {
    "generator": TrialPipeline(GeneratorJobConfig, run_train_generator, "trial", lambda trial: {}),
    "munit": TrialPipeline(MUNITJobConfig, run_train_munit, "munit_trial", _munit_shared, "diversity_random"),
    "multidomain": TrialPipeline(MultiDomainJobConfig, run_train_multidomain, "multidomain_trial", _multidomain_shared,
                                 "diversity_latent"),
}


def trial_config(sweep: SweepJobConfig, variant: str, seed: int, values: dict[str, Any] | None = None):
    """The job config of one trial (GeneratorJobConfig, MUNITJobConfig or MultiDomainJobConfig, per the
    variant's recipe), without its storage (the trial sets that): defaults <- variant <- the sweep's settings
    <- sampled values <- train.seed."""
    spec = PIPELINES[get_variant(variant).recipe]
    tree = merge_trees(variant_base(variant), spec.shared(sweep.trial), getattr(sweep, spec.settings_field),
                       dotted_to_tree(values or {}), {"train": {"seed": seed}})
    return config_from_dict(spec.config, tree, where=f"{spec.settings_field}[{variant}, seed {seed}]")


def experiment_uri(sweep: SweepJobConfig) -> str:
    return storage.join(sweep.storage_path, sweep.name)


def run_trial(params: dict[str, Any], sweep: SweepJobConfig, experiment: str) -> None:
    """One trial: train the variant (stages forward their epoch reports to Tune), evaluate, report once."""
    variant, seed, values = params["variant"], int(params["seed"]), dict(params.get("params") or {})
    trial_id = ray.tune.get_context().get_trial_id()
    folder = storage.join(experiment, "trials", trial_id)
    # one marker per start of this trial: a resumed sweep that reran a finished trial would show two
    storage.write_bytes(storage.join(folder, f"start-{time.time_ns()}-{uuid.uuid4().hex[:6]}.json"),
                        json.dumps({"variant": variant, "seed": seed, "params": values}).encode())
    cfg = trial_config(sweep, variant, seed, values)
    spec = PIPELINES[get_variant(variant).recipe]
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, storage_path=storage.join(folder, "runs"),
                                                           name=f"{variant}-seed{seed}"))
    if isinstance(cfg, GeneratorJobConfig):  # the evaluation's row is named after the variant
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, method=variant))
    out = spec.run(cfg, callbacks=(TuneReportCallback(),))
    metrics = {k: v for k, v in (out.eval_metrics or {}).items() if isinstance(v, (int, float))}
    metrics.setdefault("diversity_mapper", metrics.get(spec.sampled_diversity))  # each samples styles its own way
    final = {"variant": variant, "seed": seed, "params": json.dumps(values, sort_keys=True), "trial_folder": folder,
             "train_seconds": out.train_seconds, "train_images_per_s": out.images_per_s,
             "val_psnr": out.last.metrics.get("val_psnr"), "summary": out.summary,
             "evaluated": out.eval_metrics is not None, "epochs": out.epochs}
    if out.eval_metrics is not None:
        final.update({f"eval_{k}": v for k, v in metrics.items()})
    ray.tune.report(final)


# ----------------------------------------------------------------------------------------------------
# the driver


def trial_bundles(sweep: SweepJobConfig) -> list[dict[str, float]]:
    """What one trial holds while it trains: its own process (trial_cpus) and its run's workers, each
    placed whole on some node."""
    run = trial_config(sweep, sweep.variants[0], sweep.seeds[0]).run
    worker = {"CPU": run.cpus_per_worker, "GPU": 1.0 if wants_gpu(run) else 0.0}
    return [{"CPU": sweep.trial_cpus}] + [worker] * run.num_workers


def default_concurrency(sweep: SweepJobConfig) -> int:
    """Trials that fit at once on the alive nodes, each with its process and its workers (trial_bundles),
    every one whole on one node: counted per node, since the cluster's total CPUs would count fractions of
    nodes no worker can use. Without this cap Tune would start trial processes until no CPU is left for
    their workers. At least 1; a trial that fits nowhere is refused by run_sweep (check_placement)."""
    return max(1, groups_that_fit(trial_bundles(sweep), alive_nodes()))


def _tuner(sweep: SweepJobConfig, experiment: str):
    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep, experiment=experiment),
                                    {"CPU": sweep.trial_cpus})
    fs, root = storage.resolve(sweep.storage_path)
    restore_path = storage.resolve(experiment)[1]
    if sweep.resume:
        if not tune.Tuner.can_restore(restore_path, storage_filesystem=fs):
            raise FileNotFoundError(f"resume=true: no Tune experiment at {experiment}")
        print(f"[sweep] resuming {experiment}: finished trials are kept, unfinished ones run again", flush=True)
        tuner = tune.Tuner.restore(restore_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
        # Tune 2.60 does not keep max_concurrent_trials across a restore: a restored sweep started every
        # trial at once, and their trial processes held every CPU their own workers waited for.
        local = getattr(tuner, "_local_tuner", None)
        if local is not None and hasattr(local, "_tune_config"):
            local._tune_config.max_concurrent_trials = sweep.max_concurrent_trials or default_concurrency(sweep)
        return tuner
    scheduler = None
    if sweep.asha:
        configs = [trial_config(sweep, v, sweep.seeds[0]) for v in sweep.variants]
        total_epochs = max(c.train.max_epochs if not hasattr(c, "stage2_epochs") else c.stage2_epochs + c.stage3_epochs
                           for c in configs)
        scheduler = tune.schedulers.ASHAScheduler(time_attr="training_iteration", max_t=total_epochs + 1,
                                                  grace_period=sweep.asha_grace_period,
                                                  reduction_factor=sweep.asha_reduction_factor)
    space = read_search_space(sweep.search_space)
    param_space = {"variant": tune.grid_search(list(sweep.variants)), "seed": tune.grid_search(list(sweep.seeds))}
    if space:
        param_space["params"] = tune_domains(space)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            num_samples=sweep.num_samples,
            scheduler=scheduler,
            metric=sweep.asha_metric if sweep.asha else None,
            mode=sweep.asha_mode if sweep.asha else None,
            max_concurrent_trials=sweep.max_concurrent_trials or default_concurrency(sweep),
        ),
        run_config=tune.RunConfig(name=sweep.name, storage_path=root, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=sweep.max_failures)),
    )


def check_sweep(sweep: SweepJobConfig) -> None:
    """Every (variant, sampled setting) builds a valid config before anything is launched."""
    if "method" in (sweep.trial.get("eval") or {}):
        raise ConfigError("trial.eval.method: a sweep names each evaluation after its variant")
    values = representative_values(read_search_space(sweep.search_space))
    for variant in sweep.variants:
        cfg = trial_config(sweep, variant, sweep.seeds[0], values)
        if isinstance(cfg, MultiDomainJobConfig):
            continue  # its config checks the image size itself
        if isinstance(cfg, MUNITJobConfig):
            if cfg.data.image_size < cfg.train.discriminator.min_side():
                raise ConfigError(f"munit: data.image_size={cfg.data.image_size} is below its discriminator's minimum "
                                  f"{cfg.train.discriminator.min_side()}: set "
                                  "munit_trial.train.discriminator.n_layers/num_scales")
            continue
        if cfg.train.encoder_init == "checkpoint" and not (cfg.encoder_checkpoint or cfg.stage2_checkpoint):
            raise ConfigError(f"variant {variant} starts from a pre-trained encoder: set trial.encoder_checkpoint")


def shared_paths(sweep: SweepJobConfig) -> dict[str, str]:
    """The local paths a sweep's trials read or write wherever Tune places them: the experiment folder,
    and each variant's dataset and starting checkpoints (for check_shared_storage)."""
    paths = {"storage_path": sweep.storage_path}
    for variant in sweep.variants:
        cfg = trial_config(sweep, variant, sweep.seeds[0])
        paths.update({f"{variant}: {k}": v for k, v in dataset_location(cfg.data).items()})
        for name in ("encoder_checkpoint", "stage2_checkpoint"):
            paths[f"{variant}: {name}"] = getattr(cfg, name, "")
    return paths


def trial_status(sweep: SweepJobConfig, metrics: dict | None, error: Any) -> str:
    """TERMINATED: trained and evaluated (its final report came); ERROR; STOPPED: ended early by ASHA;
    UNFINISHED: interrupted before its end (resume=true runs it again)."""
    if error:
        return "ERROR"
    if "evaluated" in (metrics or {}):
        return "TERMINATED"
    return "STOPPED" if sweep.asha and (metrics or {}).get("training_iteration") else "UNFINISHED"


def lpips_history(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The epoch reports that carry a validation LPIPS, as {time_total_s, val_lpips}, in report order
    (the trial's final report has none: a NaN in Tune's dataframe)."""
    return [{"time_total_s": float(r["time_total_s"]), "val_lpips": float(r["val_lpips"])} for r in records
            if isinstance(r.get("val_lpips"), (int, float)) and math.isfinite(r["val_lpips"]) and "time_total_s" in r]


def history_records(frame) -> list[dict[str, Any]]:
    """lpips_history of a trial's reports (Tune's metrics dataframe); [] when Tune kept none."""
    if frame is None or len(frame) == 0 or "val_lpips" not in frame.columns:
        return []
    return lpips_history(frame[["time_total_s", "val_lpips"]].to_dict("records"))


def seconds_to_lpips(history: list[dict[str, Any]], target: float) -> float | None:
    """The trial's wall time at its first report (of `lpips_history`) with val_lpips <= target (None:
    target 0, or no history; nan: never reached)."""
    if not target or not history:
        return None
    return next((h["time_total_s"] for h in history if h["val_lpips"] <= target), float("nan"))


def trial_rows(sweep: SweepJobConfig, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results table's input: per trial {config, metrics (its last report), status, trial_id, history
    (its epoch reports, for the time to `lpips_target`)}."""
    rows = []
    for t in trials:
        config, m, history = t["config"], t["metrics"] or {}, t.get("history") or []
        variant, seed = config["variant"], int(config["seed"])
        values = dict(config.get("params") or {})
        v = get_variant(variant)
        row = {"trial_id": t["trial_id"], "variant": variant, "family": v.family, "version": v.version, "seed": seed,
               "params": json.dumps(values, sort_keys=True) if values else "{}", "status": t["status"],
               "evaluated": bool(m.get("evaluated", False)), "epochs": m.get("epochs", m.get("training_iteration")),
               "val_psnr": m.get("val_psnr"), "error": t.get("error", "")}
        row.update(components(trial_config(sweep, variant, seed, values).train))
        row.update({"psnr": m.get("eval_psnr"), "lpips": m.get("eval_lpips"),
                    "diversity_refs": m.get("eval_diversity_refs"), "diversity_mapper": m.get("eval_diversity_mapper"),
                    "psnr_other_style": m.get("eval_psnr_other_style"),
                    "fid_refs": m.get("eval_fid_refs"), "kid_refs": m.get("eval_kid_refs"),
                    "fid_mapper": m.get("eval_fid_mapper"), "fid_real_floor": m.get("eval_fid_real_floor"),
                    "train_seconds": m.get("train_seconds"), "images_per_s": m.get("train_images_per_s"),
                    "val_lpips": history[-1]["val_lpips"] if history else None,
                    "seconds_to_lpips": seconds_to_lpips(history, sweep.lpips_target), "history": history})
        rows.append(row)
    return rows


PATH_KEYS = ("encoder_checkpoint", "stage2_checkpoint", "data.root", "data.synthetic_dir")


def absolute_paths(sweep: SweepJobConfig) -> SweepJobConfig:
    """Local paths made absolute in the driver: Tune runs each trial in its own working directory, where a
    relative checkpoint or data path would not exist (and the default synthetic set would be generated
    again). s3:// URIs are left alone."""
    def fix(value: str) -> str:
        return value if not value or storage.is_s3(value) else os.path.abspath(value)

    def fixed_tree(tree: dict, default_synthetic: bool) -> dict:
        out = merge_trees(tree)
        for dotted in PATH_KEYS:
            node, *rest = dotted.split(".")
            if rest and isinstance(out.get(node), dict) and rest[0] in out[node]:
                out[node][rest[0]] = fix(out[node][rest[0]])
            elif not rest and node in out:
                out[node] = fix(out[node])
        if default_synthetic:
            data = out.setdefault("data", {})
            data.setdefault("synthetic_dir", os.path.abspath("data/synthetic"))
        return out

    return dataclasses.replace(sweep, storage_path=fix(sweep.storage_path), search_space=fix(sweep.search_space),
                               trial=fixed_tree(sweep.trial, True), munit_trial=fixed_tree(sweep.munit_trial, True),
                               multidomain_trial=fixed_tree(sweep.multidomain_trial, True))


@dataclass
class SweepResult:
    experiment: str  # the experiment folder (local or s3://)
    rows: list[dict[str, Any]]  # one per trial: variant, seed, components, metrics, status
    seconds: float
    tables: dict[str, str]  # md, csv, trials_csv, png: the written results


def run_sweep(sweep: SweepJobConfig) -> SweepResult:
    """Run (or resume) the sweep, then write the results table.
    `table_only=true` rebuilds the table of an existing experiment from Tune's saved state."""
    if not sweep.name:
        sweep = dataclasses.replace(sweep, name=f"sweep-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}")
    sweep = absolute_paths(sweep)
    experiment = experiment_uri(sweep)
    started = time.perf_counter()
    if sweep.table_only:
        fs, _ = storage.resolve(sweep.storage_path)
        analysis = tune.ExperimentAnalysis(storage.resolve(experiment)[1], storage_filesystem=fs)
        frames = analysis.trial_dataframes
        trials = [{"config": t.config, "metrics": t.last_result, "trial_id": t.trial_id,
                   "status": trial_status(sweep, t.last_result, t.status == "ERROR"),
                   "history": history_records(frames.get(t.trial_id)),
                   "error": str(t.get_error() or "")[-300:] if t.status == "ERROR" else ""} for t in analysis.trials]
    else:
        check_sweep(sweep)
        if ray.is_initialized():  # else Tune starts a local, single-node Ray: nothing to share
            check_shared_storage(shared_paths(sweep))
            # One trial's workers must fit on the nodes, each whole on one, or every trial waits for ever.
            process, *workers = trial_bundles(sweep)
            check_placement("trial process (trial_cpus)", process)
            if workers:
                check_placement(f"a trial's run.num_workers={len(workers)} workers", workers[0], len(workers))
        if storage.is_s3(sweep.storage_path):
            storage.check_writable(sweep.storage_path, "storage_path")
        else:
            pathlib.Path(sweep.storage_path).mkdir(parents=True, exist_ok=True)
        grid = _tuner(sweep, experiment).fit()
        storage.write_bytes(storage.join(experiment, "sweep.yaml"), config_to_yaml(sweep).encode())
        trials = [{"config": r.config, "metrics": r.metrics, "status": trial_status(sweep, r.metrics, r.error),
                   "trial_id": (r.metrics or {}).get("trial_id", ""), "error": str(r.error or "")[-300:],
                   "history": history_records(r.metrics_dataframe)} for r in grid]
    rows = trial_rows(sweep, trials)
    title = f"Ablation sweep {sweep.name}"
    unfinished = sum(r["status"] == "UNFINISHED" for r in rows)
    if unfinished:
        title += f" (partial: {unfinished} of {len(rows)} trials unfinished)"
        print(f"[sweep] {unfinished} trials unfinished; continue with: python jobs/sweep.py <same settings> "
              f"name={sweep.name} resume=true", flush=True)
    files = write_results(rows, experiment, title=title, lpips_target=sweep.lpips_target)
    seconds = time.perf_counter() - started
    print(f"[sweep] {len(rows)} trials, {sum(r['evaluated'] for r in rows)} evaluated, in {seconds:.0f}s; "
          f"table {files['md']}", flush=True)
    return SweepResult(experiment, rows, seconds, files)
