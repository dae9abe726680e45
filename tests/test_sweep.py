"""jobs/sweep.py on CPU: a tiny sweep of two variants is interrupted, resumed without rerunning the
finished trial, and ends with the results table (Markdown, CSV, plot)."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from faults import train_worker_pids
from step_ray.models import EncoderConfig, StyleEncoder
from step_ray.checkpoints import save_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_TRIAL = {
    "stage2_epochs": 1, "stage3_epochs": 0,  # stage 3 has its own tests; here each trial is one run
    "train": {"generator": {"num_downs": 5, "base_channels": 8}, "discriminator": {"base_channels": 8, "n_layers": 1},
              "encoder": {"base_channels": 8, "block_channels": [8, 16]},
              "lambda_vgg": 0.0, "lambda_l1": 10.0, "batch_size": 16, "val_images": 16},
    "run": {"max_failures": 0, "keep_checkpoints": 1},
    "mapper": {"epochs": 5},
    # FID/KID off: their path is tested with the generator job (tests/test_generator_train.py); here they
    # would add an Inception pass per trial and change nothing the sweep tests assert
    "eval": {"num_inputs": 4, "num_styles": 4, "mapper_samples": 100, "grid_inputs": 2, "grid_references": 3,
             "interpolation_steps": 3, "fid": {"enabled": False}},
}


@pytest.fixture(scope="module")
def stage1_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep_stage1") / "checkpoint_epoch0000"
    torch.manual_seed(1)
    enc = StyleEncoder(EncoderConfig(base_channels=8, block_channels=(8, 16)))
    save_checkpoint(folder, {"encoder": enc}, {}, {"epoch": 1},
                    {"method": "stage1", "run": {},
                     "recipe": {"encoder": {"base_channels": 8, "block_channels": [8, 16]}}})
    return str(folder)


def _trial_folders(experiment: Path) -> dict[str, dict]:
    """trial id -> {starts: number of start markers, finished: its summary exists, variant}."""
    out = {}
    for folder in sorted((experiment / "trials").glob("*")):
        starts = sorted(folder.glob("start-*.json"))
        if starts:
            out[folder.name] = {"starts": len(starts), "variant": json.loads(starts[0].read_text())["variant"],
                                "finished": any(folder.glob("runs/**/train_generator.json"))}
    return out


def test_sweep_interrupted_resumed_and_tabled(ray_session, synthetic_root, stage1_checkpoint, tmp_path):
    from step_ray.config import load_config
    from step_ray.pipelines.sweep import SweepJobConfig, run_sweep

    storage_path = tmp_path / "sweeps"
    settings = {"name": "abl", "storage_path": str(storage_path), "variants": ["bicycle_v2", "ours_v4"], "seeds": [0],
                "max_concurrent_trials": 1, "lpips_target": 5.0,  # every epoch's LPIPS is below 5: reached at the first
                "trial": {**TINY_TRIAL, "data": {"root": str(synthetic_root), "image_size": 32},
                          "encoder_checkpoint": stage1_checkpoint}}
    config_file = tmp_path / "sweep.yaml"
    config_file.write_text(yaml.safe_dump(settings))
    experiment = storage_path / "abl"

    # 1. the sweep job, interrupted (SIGINT, as Ctrl-C) once one trial has finished and the other started
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "sweep.py"), "--config", str(config_file)],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 420
    try:
        while time.time() < deadline:
            trials = _trial_folders(experiment)
            if len(trials) == 2 and sum(t["finished"] for t in trials.values()) == 1:
                break
            assert proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
            time.sleep(1)
        else:
            pytest.fail("the first trial did not finish in time:\n" + (tmp_path / "sweep.log").read_text()[-3000:])
        # Ctrl-C once the second trial's Ray Train workers run: its placement groups are then reserved,
        # and none may outlive the interrupted sweep (the resumed trial would wait for CPUs forever)
        while not train_worker_pids():
            assert time.time() < deadline and proc.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:  # Tune stops the running trial, saves the experiment state and tables what it has
            proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail("the sweep did not stop within 300 s of SIGINT:\n"
                        + (tmp_path / "sweep.log").read_text()[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    before = _trial_folders(experiment)
    finished_first = [tid for tid, t in before.items() if t["finished"]]
    assert len(finished_first) == 1, (before, (tmp_path / "sweep.log").read_text()[-3000:])
    partial = (experiment / "results.md").read_text()  # the interrupted sweep still tables what it has
    assert "partial: 1 of 2 trials unfinished" in partial and "UNFINISHED" in partial

    # 2. resume: the finished trial is kept, the other runs again and finishes
    cfg = load_config(SweepJobConfig, config_file, ["resume=true"])
    out = run_sweep(cfg)
    after = _trial_folders(experiment)
    assert after[finished_first[0]]["starts"] == 1  # not rerun
    other = next(tid for tid in after if tid != finished_first[0])
    assert after[other]["starts"] == before[other]["starts"] + 1 and after[other]["finished"]

    # 3. the results table
    rows = {r["variant"]: r for r in out.rows}
    assert set(rows) == {"bicycle_v2", "ours_v4"}
    for name, row in rows.items():
        assert row["status"] == "TERMINATED" and row["evaluated"], row
        for key in ("psnr", "lpips", "diversity_refs", "diversity_mapper", "train_seconds", "images_per_s"):
            assert isinstance(row[key], float) and row[key] == row[key], (name, key, row[key])
    # the trial that was not interrupted has every epoch's validation LPIPS; the time to the target is its
    # wall time at its first epoch report, within its training (the rerun one keeps only the epochs its
    # restored stages trained again: Tune's record of it starts afresh)
    kept = next(r for r in out.rows if r["trial_id"] == finished_first[0])
    assert isinstance(kept["val_lpips"], float) and len(kept["history"]) == kept["epochs"] > 0, kept
    assert 0 < kept["seconds_to_lpips"] < kept["train_seconds"] + 60, kept
    assert rows["bicycle_v2"]["encoder"] == "scratch" and rows["bicycle_v2"]["random_z"]
    assert rows["ours_v4"]["encoder"] == "pre-trained" and not rows["ours_v4"]["random_z"]
    md = Path(out.tables["md"]).read_text()
    assert "| BicycleGAN | v2 |" in md and "| Ours | v4 |" in md and md.count("1/1") == 2
    assert "s to val LPIPS ≤ 5" in md
    with open(out.tables["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [r["variant"] for r in table] == ["bicycle_v2", "ours_v4"]  # the paper's order
    assert float(table[1]["psnr"]) == pytest.approx(rows["ours_v4"]["psnr"])
    assert Path(out.tables["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path(out.tables["curves_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # 4. the table is rebuilt from the saved experiment alone
    again = run_sweep(load_config(SweepJobConfig, config_file, ["table_only=true"]))
    assert [r["psnr"] for r in again.rows] == [r["psnr"] for r in out.rows] or \
        sorted(r["psnr"] for r in again.rows) == sorted(r["psnr"] for r in out.rows)
    assert ({r["trial_id"]: r["seconds_to_lpips"] for r in again.rows}
            == {r["trial_id"]: r["seconds_to_lpips"] for r in out.rows})
    # ... and with a target nobody reached, from the saved epoch reports (nothing is trained again)
    unreached = run_sweep(load_config(SweepJobConfig, config_file, ["table_only=true", "lpips_target=0.000001"]))
    kept_again = next(r for r in unreached.rows if r["trial_id"] == finished_first[0])
    assert kept_again["seconds_to_lpips"] != kept_again["seconds_to_lpips"]  # nan: its epochs never reached it
    assert "not reached" in Path(unreached.tables["md"]).read_text()


def test_munit_is_a_sweep_variant_with_its_own_config(tmp_path):
    from step_ray.config import ConfigError
    from step_ray.pipelines.train_munit import MUNITJobConfig
    from step_ray.pipelines.sweep import SweepJobConfig, check_sweep, trial_config

    sweep = SweepJobConfig(variants=("munit", "bicycle_v2"), trial={"data": {"image_size": 32}, "stage2_epochs": 1},
                        munit_trial={"train": {"max_epochs": 3, "discriminator": {"n_layers": 1, "num_scales": 2}}})
    cfg = trial_config(sweep, "munit", 7)
    assert isinstance(cfg, MUNITJobConfig) and cfg.data.image_size == 32 and cfg.train.max_epochs == 3
    assert cfg.train.seed == 7 and cfg.train.weights.x == 10.0  # the official weights
    check_sweep(sweep)
    too_deep = SweepJobConfig(variants=("munit",), trial={"data": {"image_size": 32}})  # the official D needs 192 px
    with pytest.raises(ConfigError, match="discriminator"):
        check_sweep(too_deep)


def test_multidomain_variants_in_a_sweep():
    from step_ray.pipelines.train_multidomain import MultiDomainJobConfig
    from step_ray.pipelines.sweep import SweepJobConfig, check_sweep, trial_config
    from step_ray.recipes.variants import components

    sweep = SweepJobConfig(variants=("multidomain", "multidomain_plain"), trial={"data": {"image_size": 32}},
                        multidomain_trial={"train": {"max_epochs": 2}})
    full, plain = trial_config(sweep, "multidomain", 3), trial_config(sweep, "multidomain_plain", 3)
    assert isinstance(full, MultiDomainJobConfig) and full.data.image_size == 32 and full.train.seed == 3
    assert (full.train.weights.uni, full.train.weights.smooth) == (1.0, 1.0)
    assert (plain.train.weights.uni, plain.train.weights.smooth) == (0.0, 0.0) and plain.train.max_epochs == 2
    assert components(full.train)["random_z"] and components(full.train)["encoder"] == "scratch"
    check_sweep(sweep)


def test_search_space_is_read_checked_and_mapped(tmp_path):
    from ray import tune

    from step_ray.config import ConfigError
    from step_ray.pipelines.sweep import read_search_space, representative_values, tune_domains

    space = read_search_space(str(REPO / "configs" / "sweeps" / "loss_weights.yaml"))
    assert set(space) == {"train.lambda_vgg", "train.lambda_gan", "train.lambda_z_l2"}
    domains = tune_domains(space)
    assert domains["train.lambda_vgg"] == {"grid_search": [0.01, 0.02, 0.05]}
    assert isinstance(domains["train.lambda_gan"], tune.search.sample.Float)
    assert representative_values(space)["train.lambda_gan"] == 0.3
    for bad in ("train.lambda_l1: {normal: [0, 1]}", "train.lambda_l1: {uniform: [2, 1]}",
                "train.lambda_l1: {loguniform: [0, 1]}", "train.lambda_l1: 3"):
        (tmp_path / "s.yaml").write_text(bad)
        with pytest.raises(ConfigError):
            read_search_space(str(tmp_path / "s.yaml"))


def test_asha_and_concurrency_settings(ray_session, tmp_path):
    from ray.tune.schedulers import ASHAScheduler

    from step_ray.config import ConfigError
    from step_ray.pipelines.sweep import SweepJobConfig, _tuner, check_sweep, default_concurrency

    sweep = SweepJobConfig(name="a", storage_path=str(tmp_path), variants=("bicycle_v2",), seeds=(0, 1), asha=True,
                        search_space=str(REPO / "configs" / "sweeps" / "loss_weights.yaml"),
                        trial={"stage2_epochs": 2, "stage3_epochs": 3})
    tuner = _tuner(sweep, str(tmp_path / "a"))
    tc = tuner._local_tuner._tune_config
    assert isinstance(tc.scheduler, ASHAScheduler) and tc.metric == "val_psnr" and tc.mode == "max"
    assert tc.max_concurrent_trials == default_concurrency(sweep) == 1  # 2 CPUs: a trial process + its worker
    with pytest.raises(ConfigError, match="trial.encoder_checkpoint"):  # a pre-trained variant needs its stage-1 E
        check_sweep(SweepJobConfig(variants=("ours_v4",)))
    with pytest.raises(ValueError, match="resume"):
        SweepJobConfig(resume=True)


def test_relative_paths_become_absolute_for_the_trials(tmp_path, monkeypatch):
    """Tune runs a trial in its own working directory: a relative path given to the sweep must not reach it."""
    from step_ray.pipelines.sweep import SweepJobConfig, absolute_paths

    monkeypatch.chdir(tmp_path)
    sweep = absolute_paths(SweepJobConfig(storage_path="runs/sweeps", trial={"encoder_checkpoint": "runs/s1/ckpt",
                                                                         "data": {"root": "s3://b/facades"}},
                                       munit_trial={"data": {"root": "data/x"}}))
    assert sweep.storage_path == str(tmp_path / "runs" / "sweeps")
    assert sweep.trial["encoder_checkpoint"] == str(tmp_path / "runs" / "s1" / "ckpt")
    assert sweep.trial["data"]["root"] == "s3://b/facades"  # URIs untouched
    assert sweep.trial["data"]["synthetic_dir"] == str(tmp_path / "data" / "synthetic")
    assert sweep.munit_trial["data"]["root"] == str(tmp_path / "data" / "x")
    assert sweep.multidomain_trial["data"]["synthetic_dir"] == str(tmp_path / "data" / "synthetic")


def test_seconds_to_lpips_reads_the_first_report_at_the_target():
    from step_ray.eval.ablation_table import aggregate, markdown
    from step_ray.pipelines.sweep import lpips_history, seconds_to_lpips

    reports = [{"time_total_s": 50.0, "val_lpips": 0.62}, {"time_total_s": 90.0, "val_lpips": 0.44},
               {"time_total_s": 130.0, "val_lpips": 0.47}, {"time_total_s": 170.0, "val_lpips": 0.40},
               {"time_total_s": 180.0}, {"time_total_s": 181.0, "val_lpips": float("nan")}]  # the final report: none
    history = lpips_history(reports)
    assert [h["time_total_s"] for h in history] == [50.0, 90.0, 130.0, 170.0]
    assert seconds_to_lpips(history, 0.45) == 90.0
    assert seconds_to_lpips(history, 0.41) == 170.0
    assert seconds_to_lpips(history, 0.3) != seconds_to_lpips(history, 0.3)  # nan: never reached
    assert seconds_to_lpips(history, 0.0) is None and seconds_to_lpips([], 0.45) is None

    base = {"variant": "ours_v4", "family": "Ours", "version": "v4", "params": "{}", "status": "TERMINATED",
            "encoder": "pre-trained", "vae": False, "kl": False, "l2_z": False, "cycle": False, "random_z": False,
            "rec": "VGG",
            "seed": 0, "epochs": 4}
    rows = [{**base, "seconds_to_lpips": 90.0}, {**base, "seed": 1, "seconds_to_lpips": float("nan")}]
    md = markdown(aggregate(rows), rows, lpips_target=0.45)
    assert "s to val LPIPS ≤ 0.45" in md and "90 (1/2 reached)" in md
    assert "s to val LPIPS" not in markdown(aggregate(rows), rows)  # no target, no column


def test_generalisation_table_reads_the_sweeps_trials_csv(tmp_path):
    """The generalisation table (experiments/generalisation.py) reads the trials.csv a sweep writes
    (write_results), one row per sweep."""
    from step_ray.eval.ablation_table import write_results
    from step_ray.eval.generalisation import generalisation_table, read_trials

    base = {"variant": "ours_v4", "family": "Ours", "version": "v4", "params": "{}", "status": "TERMINATED",
            "evaluated": True, "encoder": "pre-trained", "vae": False, "kl": False, "l2_z": False, "cycle": False,
            "random_z": False, "rec": "VGG", "epochs": 4, "lpips": 0.4, "diversity_refs": 0.1, "diversity_mapper": 0.12}
    for name, psnr in (("facades", (12.0, 12.2)), ("synthetic", (11.0, 11.0))):
        rows = [{**base, "seed": seed, "psnr": p, "psnr_other_style": p - (0.3 if name == "facades" else 0.0),
                 "history": [{"time_total_s": 10.0, "val_lpips": 0.5}]} for seed, p in enumerate(psnr)]
        rows.append({**base, "variant": "bicycle_v0", "seed": 0, "psnr": 99.0, "psnr_other_style": 0.0})  # not read
        write_results(rows, str(tmp_path / name))
    groups = [(name, read_trials(str(tmp_path / name), "ours_v4")) for name in ("facades", "synthetic")]
    assert [len(trials) for _, trials in groups] == [2, 2]
    text = generalisation_table(groups, "ours_v4")
    assert "| facades | 12.10 ± 0.10 |" in text and "| 0.300 ± 0.000 |" in text  # the margin: how much G uses z
    assert "| synthetic | 11.00 ± 0.00 |" in text and "| 0.000 ± 0.000 |" in text and text.count("| 0, 1 |") == 2
