"""Fault injection: lost workers and jobs, S3 outages and a full disk during checkpoint uploads, bad files,
NaN losses, bad configurations and commands, and what never leaks. RELIABILITY.md tabulates these tests.

Every fault is real: worker and driver processes get SIGKILL, the S3 server (moto on 127.0.0.1) is
stopped and restarted, writes hit ENOSPC (/dev/full), files are really corrupt. Nothing in the code under
test is patched.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from faults import S3Outage, WhenReady, kill_one_train_worker
from step_ray import checkpoints, storage
from step_ray.config import load_config
from step_ray.engine.guard import NonFiniteConfig

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 12  # 96 synthetic training images (anchors), batch 8, one worker

TINY1 = [
    "data.image_size=32", "style.reduction.dim=16", "mining.k_far=40", "style.num_actors=1",
    "style.batch_size=32", "train.encoder.base_channels=16", "train.encoder.block_channels=[16, 32]",
    "train.batch_size=8", "train.knn_reference=96", "train.val_triplets=300", "train.monitor.enabled=false",
    "run.keep_checkpoints=10",
]
TINY2 = [
    "data.image_size=32", "train.generator.num_downs=5", "train.generator.base_channels=8",
    "train.discriminator.base_channels=8", "train.discriminator.n_layers=1", "train.lambda_vgg=0", "train.lambda_l1=10",
    "train.batch_size=8", "train.val_images=16", "train.monitor.enabled=false", "run.keep_checkpoints=10",
]


def _complete(uri) -> bool:
    try:
        checkpoints.check_complete(str(uri))
        return True
    except checkpoints.CheckpointError:
        return False


def _state(checkpoint_uri: str) -> dict:
    return json.loads(storage.read_bytes(storage.join(checkpoint_uri, "state.json")))


def _assert_whole_history(state: dict, epochs: int, steps_per_epoch: int = STEPS_PER_EPOCH) -> None:
    """The run reached the same final step as an uninterrupted one, each epoch reported exactly once."""
    assert [h["epoch"] for h in state["history"]] == list(range(epochs))
    assert [h["step"] for h in state["history"]] == [steps_per_epoch * (e + 1) for e in range(epochs)]
    assert state["epoch"] == epochs and state["step"] == steps_per_epoch * epochs


# ----------------------------------------------------------------------------------------------------
# stage 1


@pytest.fixture(scope="module")
def stage1(ray_session, synthetic_root, stage1_cache):
    """Stage 1's config and inputs (style statistics and triplets: the session's, computed once)."""
    from step_ray.pipelines.pretrain import PretrainJobConfig, prepare_inputs

    cfg = load_config(PretrainJobConfig, None, [f"data.root={synthetic_root}", f"cache_dir={stage1_cache}", *TINY1])
    inputs, _ = prepare_inputs(cfg)
    return cfg, inputs, stage1_cache


def _train1(stage1, storage_path, name, epochs, max_failures=0, run_settings=None, **train):
    from step_ray.engine.loop import train as train_recipe
    from step_ray.recipes.stage1 import Stage1Recipe

    cfg, inputs, _ = stage1
    run = replace(cfg.run, storage_path=str(storage_path), name=name, max_failures=max_failures, **(run_settings or {}))
    return train_recipe(Stage1Recipe(replace(cfg.train, max_epochs=epochs, **train), inputs, job=cfg), run)


def _registered(run_folder: Path, name: str) -> bool:
    """Ray Train has registered checkpoint `name` (its snapshot lists it): a restart would start there."""
    snapshot = run_folder / "checkpoint_manager_snapshot.json"
    return snapshot.is_file() and name in snapshot.read_text()


def test_stage1_worker_killed_restarts_from_last_checkpoint(stage1, tmp_path):
    """Killed as soon as epoch 1's checkpoint is complete in the run folder, which is usually before Ray
    Train has registered it: the restart still continues from it (resume_folder), not from epoch 0.
    The same run skips a NaN loss injected at step 5 (one run shows both: each run costs a Ray Train start)."""
    killer = WhenReady(lambda: _complete(tmp_path / "killed" / "checkpoint_epoch0001"), kill_one_train_worker)
    result, _ = _train1(stage1, tmp_path, "killed", epochs=5, max_failures=2,
                        nonfinite=NonFiniteConfig(action="skip", inject_at_steps=(5,)))
    assert killer.result is not None, "no worker was killed"
    assert result.error is None
    state = _state(result.checkpoint.path)
    _assert_whole_history(state, 5)  # the skipped update still counts as a step
    assert len(state["restarts"]) == 1 and 2 <= state["restarts"][0]["epoch"] <= 4, state["restarts"]
    assert all(_complete(c.uri) for c in checkpoints.list_checkpoints(str(tmp_path / "killed")))
    # the NaN: skipped once on every rank, recorded, and remembered across the restart (not injected again)
    assert state["nonfinite"]["skipped"] == 1 and state["nonfinite"]["events"] == [
        {"step": 5, "epoch": 0, "loss": "triplet loss", "action": "skip"}]
    assert [h["nonfinite_steps"] for h in state["history"]] == [1, 0, 0, 0, 0]
    assert np.isfinite(state["history"][0]["train_loss"])


def test_stage1_nan_loss_fail_stops_with_finite_checkpoints(stage1, tmp_path):
    """An injected NaN loss with nonfinite.action=fail stops the run with one clear line; never a NaN
    checkpoint. (Skipping rides on the worker-kill run above, rolling back on the job-kill run below.)"""
    with pytest.raises(Exception, match="non-finite triplet loss at step 15 .epoch 1.: stopping"):
        _train1(stage1, tmp_path, "fail", epochs=2,
                nonfinite=NonFiniteConfig(action="fail", inject_at_steps=(STEPS_PER_EPOCH + 3,)))
    listed = checkpoints.list_checkpoints(str(tmp_path / "fail"))
    assert [c.epoch for c in listed] == [0]  # the last good one; nothing was written after the NaN
    from step_ray.style.encode import load_encoder

    assert all(torch.isfinite(t).all() for t in load_encoder(listed[0].uri).state_dict().values())


def test_stage1_s3_outage_during_checkpoint_upload(stage1, s3_bucket, capfd):
    """The S3 server stops while epoch 1's checkpoint is uploading and comes back 4 s later. Either the
    upload's retries outlast the outage, or the run fails (Ray Train's controller cannot write its run
    state) and step_ray resumes it (run.storage_retries) from the last complete checkpoint; either way it
    finishes. No incomplete checkpoint is ever listed. And no credential reaches anything the run wrote
    or printed (security)."""
    from conftest import _S3

    outage = S3Outage(_S3["server"], trigger="checkpoint_epoch0001/", down_seconds=4)
    run_uri = f"s3://{s3_bucket}/runs/outage"
    seen: list[list[str]] = []

    def watch():  # what a user listing the run would see, through the outage
        while outage.restarted_at is None or time.time() < outage.restarted_at + 2:
            try:
                seen.append([c.name for c in checkpoints.list_checkpoints(run_uri)])
            except Exception:
                pass
            time.sleep(0.2)

    watcher = WhenReady(lambda: outage.stopped_at is not None, watch)
    result, _ = _train1(stage1, f"s3://{s3_bucket}/runs", "outage", epochs=3, max_failures=3,
                        run_settings={"storage_retries": 3, "storage_retry_wait_s": 6.0},
                        monitor=replace(stage1[0].train.monitor, enabled=True))
    assert outage.stopped_at is not None and outage.restarted_at is not None, "the outage never happened"
    assert result.error is None, result.error
    state = _state(f"s3://{result.checkpoint.path}")
    _assert_whole_history(state, 3)
    # Where the outage falls decides the path: the S3 client's own retries can ride it out (the upload
    # goes through once the server is back), or the run fails and step_ray resumes it from the newest
    # complete checkpoint (both seen on this machine). Neither may lose a finished epoch.
    assert all(r["epoch"] >= 1 for r in state.get("restarts", [])), state.get("restarts")
    watcher.join(timeout=30)
    final = checkpoints.list_checkpoints(run_uri)
    assert [c.epoch for c in final] == [0, 1, 2] and all(_complete(c.uri) for c in final)
    assert seen and all(set(names) <= {"checkpoint_epoch0000", "checkpoint_epoch0001", "checkpoint_epoch0002"}
                        for names in seen)
    printed = capfd.readouterr()
    _assert_no_credentials(s3_bucket, printed.out + printed.err)


def test_stage1_full_disk_during_checkpoint_write(stage1, tmp_path, capfd):
    """Epoch 1's checkpoint write hits ENOSPC (its files lead to /dev/full), again after a resume: the run
    stops with that error, and epoch 0's checkpoint stays the latest complete one."""
    folder = tmp_path / "full" / "checkpoint_epoch0001"
    folder.mkdir(parents=True)
    for name in ("encoder.pt", "optimizer.pt"):  # (a symlinked manifest would read as endless zeros)
        (folder / name).symlink_to("/dev/full")
    with pytest.raises(Exception, match="No space left on device"):
        _train1(stage1, tmp_path, "full", epochs=3, run_settings={"storage_retries": 1, "storage_retry_wait_s": 0.0})
    assert "storage failure: " in capfd.readouterr().out  # resumed once (retry 1/1), then the error
    assert [c.epoch for c in checkpoints.list_checkpoints(str(tmp_path / "full"))] == [0]
    assert not _registered(tmp_path / "full", "checkpoint_epoch0001")


def _ray_env(ray_session) -> dict:
    return {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}


def _kill_job_when(proc: subprocess.Popen, ready) -> WhenReady:
    """SIGKILL the job's driver (the whole job: Ray then ends its workers) once `ready()`."""
    return WhenReady(ready, lambda: proc.kill() or proc.pid)


def test_stage1_job_killed_then_resumed(stage1, ray_session, tmp_path):
    """`jobs/pretrain.py` loses its driver mid-run; `--resume` continues from the last checkpoint. The
    resumed run then meets a NaN loss and rolls back (nonfinite.action=rollback)."""
    from step_ray.pipelines.pretrain import run_pretrain

    cfg, _, tmp = stage1
    rollback_at = 4 * STEPS_PER_EPOCH + 3  # a NaN in epoch 4, after the resume: rolled back to epoch 3's end
    args = [f"data.root={cfg.data.root}", f"cache_dir={tmp}", *TINY1,
            f"run.storage_path={tmp_path}", "run.name=job", "train.max_epochs=5",
            "train.nonfinite.action=rollback", f"train.nonfinite.inject_at_steps=[{rollback_at}]"]
    log = open(tmp_path / "job.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "pretrain.py"), *args], env=_ray_env(ray_session),
                            stdout=log, stderr=subprocess.STDOUT)
    killer = _kill_job_when(proc, lambda: _complete(tmp_path / "job" / "checkpoint_epoch0001"))
    proc.wait(timeout=600)
    assert killer.result == proc.pid and proc.returncode == -9, (tmp_path / "job.log").read_text()[-3000:]
    time.sleep(2)  # Ray notices the dead driver and ends its workers
    run_pretrain(load_config(type(cfg), None, [*args, "run.resume=true"]))
    state = _state(checkpoints.list_checkpoints(str(tmp_path / "job"))[-1].uri)
    _assert_whole_history(state, 5)  # epoch 4 replayed from the epoch-3 state, reported once
    assert len(state["restarts"]) == 1 and state["restarts"][0]["epoch"] >= 2, state["restarts"]
    assert state["nonfinite"]["rollbacks"] == 1 and state["nonfinite"]["events"] == [
        {"step": rollback_at, "epoch": 4, "loss": "triplet loss", "action": "rollback"}]


# ----------------------------------------------------------------------------------------------------
# stage 2


@pytest.fixture(scope="module")
def stage2(ray_session, synthetic_root, tmp_path_factory):
    from step_ray.models import EncoderConfig, StyleEncoder
    from step_ray.checkpoints import save_checkpoint
    from step_ray.pipelines.train_generator import GeneratorJobConfig
    from step_ray.data.scan import prepare_paired_splits

    tmp = tmp_path_factory.mktemp("reliability2")
    encoder = tmp / "stage1" / "checkpoint_epoch0000"
    torch.manual_seed(1)
    save_checkpoint(encoder, {"encoder": StyleEncoder(EncoderConfig(base_channels=8, block_channels=(8, 16)))}, {},
                    {"epoch": 1},
                    {"method": "stage1", "run": {},
                     "recipe": {"encoder": {"base_channels": 8, "block_channels": [8, 16]}}})
    args = [f"data.root={synthetic_root}", f"encoder_checkpoint={encoder}", *TINY2]
    cfg = load_config(GeneratorJobConfig, None, args)
    return cfg, prepare_paired_splits(cfg.data), args


def _train2(stage2, storage_path, name, epochs, max_failures=0, inputs=None, **train):
    from step_ray.pipelines.train_generator import train_generator_stage

    cfg, default_inputs, _ = stage2
    run = replace(cfg.run, storage_path=str(storage_path), name=name, max_failures=max_failures)
    result, run_uri, _ = train_generator_stage(replace(cfg.train, encoder_checkpoint=cfg.encoder_checkpoint,
                                                       max_epochs=epochs, **train),
                                               run, inputs or default_inputs, "stage2")
    return result, run_uri


def test_stage2_worker_killed_restarts_from_last_checkpoint(stage2, tmp_path):
    killer = WhenReady(lambda: _registered(tmp_path / "killed", "checkpoint_epoch0001"), kill_one_train_worker)
    result, _ = _train2(stage2, tmp_path, "killed", epochs=4, max_failures=2,
                        nonfinite=NonFiniteConfig(action="skip", inject_at_steps=(3,)))
    assert killer.result is not None, "no worker was killed"
    state = _state(result.checkpoint.path)
    _assert_whole_history(state, 4)
    assert len(state["restarts"]) == 1 and state["restarts"][0]["epoch"] >= 2, state["restarts"]
    # the NaN injected at step 3 (G's loss) was skipped once, and stays recorded across the restart
    assert state["nonfinite"]["events"] == [{"step": 3, "epoch": 0, "loss": "loss_g", "action": "skip"}]
    assert [h["nonfinite_steps"] for h in state["history"]] == [1, 0, 0, 0]


def test_stage2_job_killed_then_resumed(stage2, ray_session, tmp_path):
    from step_ray.pipelines.train_generator import GeneratorJobConfig, run_train_generator

    _, _, base = stage2
    args = [*base, f"run.storage_path={tmp_path}", "run.name=job", "stage2_epochs=4", "stage3_epochs=0",
            "train_mapper=false", "evaluate=false"]
    log = open(tmp_path / "job.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "jobs" / "train_generator.py"), *args],
                            env=_ray_env(ray_session), stdout=log, stderr=subprocess.STDOUT)
    killer = _kill_job_when(proc, lambda: _registered(tmp_path / "stage2-job", "checkpoint_epoch0001"))
    proc.wait(timeout=600)
    assert killer.result == proc.pid and proc.returncode == -9, (tmp_path / "job.log").read_text()[-3000:]
    time.sleep(2)
    out = run_train_generator(load_config(GeneratorJobConfig, None, [*args, "run.resume=true"]))
    state = _state(out.stage("stage2").checkpoint)
    _assert_whole_history(state, 4)
    assert len(state["restarts"]) == 1 and state["restarts"][0]["epoch"] >= 2, state["restarts"]


# ----------------------------------------------------------------------------------------------------
# bad data


def _salted(synthetic_root: Path, dest: Path) -> dict[str, str]:
    """A copy of the synthetic set with bad files added to train/; returns {bad file name: expected reason}."""
    import shutil

    from PIL import Image

    shutil.copytree(synthetic_root, dest)
    train = dest / "train"
    good = sorted(train.glob("*.png"))[0].read_bytes()
    (train / "zz_truncated.png").write_bytes(good[: len(good) // 2])
    (train / "zz_empty.png").write_bytes(b"")
    (train / "zz_text.png").write_bytes(b"this is not an image\n")
    Image.new("RGB", (40, 40), (200, 10, 10)).save(train / "zz_square.png")  # not two halves side by side
    Image.new("RGB", (16, 8), (200, 10, 10)).save(train / "zz_tiny.png")  # halves of 8 px
    grey = Image.new("L", (64, 32), 128)
    grey.save(train / "zz_greyscale.png")  # usable: converted to RGB
    return {"zz_truncated.png": "truncated", "zz_empty.png": "empty file", "zz_text.png": "not an image",
            "zz_square.png": "wrong layout", "zz_tiny.png": "wrong size"}


def test_bad_files_reported_and_every_good_file_used_once_per_epoch(stage1, stage2, synthetic_root, tmp_path, capsys):
    from step_ray.mining import TripletSampler
    from step_ray.engine.loop import epoch_batches
    from step_ray.data.scan import prepare_paired_splits
    from step_ray.pipelines.pretrain import PretrainJobConfig, prepare_inputs

    root = tmp_path / "salted"
    expected = _salted(synthetic_root, root)
    originals = sorted(str(p) for p in (synthetic_root / "train").glob("*.png"))
    good = sorted(originals + [str(root / "train" / "zz_greyscale.png")])

    # stages 2/3 (and MUNIT): the driver's scan
    cfg2 = stage2[0]
    inputs = prepare_paired_splits(replace(cfg2.data, root=str(root)))
    assert sorted(Path(p).name for p in inputs.train_paths) == sorted(Path(p).name for p in good)
    reasons = {Path(p).name: r for p, r in inputs.bad_files}
    assert set(reasons) == set(expected) and all(expected[n] in reasons[n] for n in expected), reasons
    printed = capsys.readouterr().out
    assert all(f"{root / 'train' / n}: {reasons[n]}" in printed for n in expected)
    for world in (1, 2, 3):  # each good row exactly once per epoch, the same number of steps on every rank
        shares = [epoch_batches(len(inputs.train_paths), 8, [0, 1], r, world) for r in range(world)]
        rows = np.concatenate([b for share in shares for b in share])
        assert sorted(rows.tolist()) == list(range(len(inputs.train_paths)))
        assert len({len(share) for share in shares}) == 1
    result, _ = _train2(stage2, tmp_path / "runs", "salted", epochs=1, inputs=inputs)
    assert _state(result.checkpoint.path)["step"] == int(np.ceil(len(good) / 8))

    # stage 1: the style-statistics pipeline's report, and the triplet sampler's anchors
    cfg1 = load_config(PretrainJobConfig, None, [f"data.root={root}", f"cache_dir={tmp_path / 'cache'}", *TINY1])
    inputs1, steps = prepare_inputs(cfg1)
    assert sorted(Path(p).name for p in inputs1.train_paths) == sorted(Path(p).name for p in good)
    from step_ray.style.statistics import read_errors

    errors = read_errors(steps["style_stats"])
    assert {Path(p).name for p in errors["path"]} == set(expected)
    anchors = TripletSampler(inputs1.close_ids, inputs1.far_ids, seed=0).epoch_triplets(3)[:, 0]
    assert sorted(anchors.tolist()) == list(range(len(good)))


# ----------------------------------------------------------------------------------------------------
# bad configuration and commands: one clear line, before any expensive work


@pytest.fixture(scope="module")
def strict_s3():
    """A second local S3 server that checks credentials (moto's IAM auth on): every key is unknown to it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.kill()


SECRET = "wrong-secret-do-not-print-0123456789"


@pytest.mark.parametrize("job,args,message", [
    ("pretrain.py", ["train.lr=0.1"], "unknown config key 'lr' for Stage1Training"),
    ("pretrain.py", ["train.batch_size=twelve"], "expected an integer, got 'twelve'"),
    ("pretrain.py", ["run.use_gpu=always"], "error: run.use_gpu=always needs 1 GPUs; the Ray cluster has 0"),
    ("pretrain.py", ["run.num_workers=8"],
     "error: run.num_workers=8 x run.cpus_per_worker=1.0 needs 8 CPUs; the Ray cluster has 2"),
    ("pretrain.py", ["--resume"], "error: run.resume=true: no earlier stage1 run under"),
    ("train_generator.py", ["encoder_checkpoint=/no/such/checkpoint_epoch0003"],
     "error: encoder_checkpoint /no/such/checkpoint_epoch0003 does not exist"),
    ("train_generator.py", ["encoder_checkpoint=s3://no-such-bucket/ckpt"], "does not exist"),
    ("pretrain.py", ["run.storage_path=s3://some-bucket/runs"], "S3 refused the credentials"),
])
def test_bad_config_or_command_fails_fast_with_one_line(job, args, message, ray_session, strict_s3, tmp_path):
    env = _ray_env(ray_session)
    if "S3 refused" in message:  # wrong credentials against a server that checks them
        env.update(AWS_ENDPOINT_URL=strict_s3, AWS_ACCESS_KEY_ID="AKIAWRONGKEY0000", AWS_SECRET_ACCESS_KEY=SECRET)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / job), f"run.storage_path={tmp_path / 'runs'}",
                           f"cache_dir={tmp_path / 'cache'}" if job == "pretrain.py" else "train_mapper=false", *args],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "config error:"))]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and SECRET not in proc.stderr + proc.stdout
    # before any expensive work: no style statistics, no run folder
    assert not (tmp_path / "cache").exists() and not list((tmp_path / "runs").glob("*-*"))
    print(f"{job} {args}: exit 2 in {seconds:.1f}s: {errors[0]}")


# ----------------------------------------------------------------------------------------------------
# security


# The credentials check reads the S3 run of test_stage1_s3_outage_during_checkpoint_upload:
# a stage-1 run with monitoring on, stored on S3 (one Ray Train run less for the suite).


def _assert_no_credentials(bucket: str, printed: str) -> None:
    """No credential in anything a run wrote to the bucket (checkpoints, configs, metrics, TensorBoard
    events) nor in what it printed."""
    import boto3

    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]]
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.endswith("config.yaml") for k in keys) and any("tfevents" in k for k in keys)
    for key in keys:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert not any(s.encode() in body for s in secrets), key
    assert not any(s in printed for s in secrets)


def test_local_ray_listens_on_localhost_only(tmp_path):
    """A job's own Ray instance: dashboard, dashboard agent and metrics endpoint bind 127.0.0.1."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import json, ray, psutil\n"
        "from step_ray.cluster import init_ray\n"
        "ctx = init_ray(num_cpus=1, include_dashboard=True)\n"
        "node = ray._private.worker._global_node\n"
        "ports = {'dashboard': int(ctx.dashboard_url.rsplit(':', 1)[1]), 'metrics': node.metrics_export_port}\n"
        "if node.dashboard_agent_listen_port > 0:\n"
        "    ports['dashboard_agent'] = node.dashboard_agent_listen_port\n"
        "import time; time.sleep(3)\n"
        "listening = {}\n"
        "for c in psutil.net_connections('tcp'):\n"
        "    if c.status == 'LISTEN' and c.laddr.port in ports.values():\n"
        "        listening.setdefault(c.laddr.port, set()).add(c.laddr.ip)\n"
        "print(json.dumps({'ports': ports, 'url': ctx.dashboard_url, "
        "'listening': {str(k): sorted(v) for k, v in listening.items()}}))\n"
        "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["url"].startswith("127.0.0.1:"), report
    for name, port in report["ports"].items():
        assert report["listening"].get(str(port)) == ["127.0.0.1"], (name, report)


def test_checkpoints_load_weights_only(tmp_path):
    """A checkpoint whose .pt holds a pickled object with code in it is refused, and the code never runs."""
    import pickle

    from step_ray.style.encode import load_encoder
    from step_ray.checkpoints import load_checkpoint

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "checkpoint_epoch0000"
    folder.mkdir()
    torch.save({"weight": Payload()}, folder / "encoder.pt", pickle_protocol=pickle.DEFAULT_PROTOCOL)
    (folder / "state.json").write_text("{}")
    (folder / "config.yaml").write_text("train: {}\n")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(folder, {"encoder": torch.nn.Linear(2, 2)})
    with pytest.raises(Exception):
        load_encoder(str(folder))
    assert not marker.exists()
