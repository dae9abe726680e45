"""A real two-node Ray cluster (ray.cluster_utils.Cluster: two raylets of 1 CPU each on 127.0.0.1, with
custom resources node_a / node_b): style statistics complete with actors that fit one node, preflight
refuses what no node can hold, init_ray does not join a cluster it was not given, run folders are
absolute, local paths on more than one node need declaring shared, stage 1 and a generator stage train
one worker per node with equal weights, mining shards run on both nodes, and a run that loses a node
stops after run.node_loss_wait_s with the command that resumes it.

One Ray instance at a time (the CI rule): the module's cluster replaces the session's instance while
these tests run, the driver connected to it, and the session's instance is started again afterwards. The
cluster cannot be a second instance beside it, because a driver process joins one instance only.
Processes that must start their own driver (init_ray's choice, a job's error line) run as subprocesses.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from step_ray import checkpoints
from step_ray.cluster import alive_nodes, copies_that_fit, even_share
from step_ray.config import load_config
from step_ray.data.pix2pix import DataConfig
from step_ray.data.synthetic import SyntheticConfig, generate_synthetic
from step_ray.engine.launch import START_TIMEOUT_ENV, WorkersLostError, start_rounds
from step_ray.engine.settings import RunSettings
from step_ray.preflight import (SHARED_STORAGE_ENV, PreflightError, check_placement, check_resources,
                                check_shared_storage)
from step_ray.style.statistics import StyleStatsConfig, compute_style_stats, plan_resources, read_metadata
from step_ray.style.reduce import ReductionConfig

pytestmark = pytest.mark.filterwarnings("ignore:NO PRETRAINED:RuntimeWarning")

REPO = Path(__file__).resolve().parents[1]
ONE_CPU_NODE = {"CPU": 1.0}


@pytest.fixture(scope="module")
def two_nodes():
    """The cluster, with this process's driver connected to it; yields the Cluster (its `address` is the
    head's GCS address, 127.0.0.1:port)."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from conftest import _start_ray

    session_was_running = ray.is_initialized()
    if session_was_running:
        ray.shutdown()
    with pytest.MonkeyPatch.context() as patch:
        # Everything on 127.0.0.1: without Ray's single-node switch (step_ray.cluster) a driver given
        # 127.0.0.1:port dials the host's address instead, where nothing listens here, and waits for ever.
        # Set for this process and the jobs the tests start; restored before the session's Ray restarts.
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        cluster = Cluster(initialize_head=True, head_node_args=dict(
            num_cpus=1, resources={"node_a": 1}, node_ip_address="127.0.0.1", include_dashboard=False))
        try:
            cluster.add_node(num_cpus=1, resources={"node_b": 1}, node_ip_address="127.0.0.1")
            cluster.wait_for_nodes()
            ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()  # also removes the ray_current_cluster file it wrote
    if session_was_running:
        _start_ray()


@pytest.fixture
def not_declared_shared(monkeypatch):
    monkeypatch.delenv(SHARED_STORAGE_ENV, raising=False)


@pytest.fixture
def declared_shared(monkeypatch):
    """Both 'nodes' run on this machine, so every local path is indeed shared."""
    monkeypatch.setenv(SHARED_STORAGE_ENV, "1")


# ----------------------------------------------------------------------------------------------------
# Sizing per node (no Ray needed)


def test_style_actors_are_sized_to_pack_onto_the_nodes():
    """Two 1-CPU nodes: every actor fits on one node and decode_cpus stays free on one of them; a single
    node keeps its old plan (the whole of it less the decode room)."""
    nodes = [ONE_CPU_NODE, ONE_CPU_NODE]
    for actors, expected in ((1, 1.0), (2, 0.75), (3, 0.5)):
        plan = plan_resources(StyleStatsConfig(num_actors=actors, decode_cpus=0.25), nodes)
        assert plan.num_actors == actors and plan.cpus_per_actor == pytest.approx(expected), actors
        assert copies_that_fit({"CPU": plan.cpus_per_actor}, nodes) >= actors
    assert plan_resources(StyleStatsConfig(num_actors=1), {"CPU": 2.0}).cpus_per_actor == pytest.approx(1.75)
    # GPU actors: one GPU each, their CPUs on the GPU's node (a CPU-only head keeps the decode room)
    gpu_nodes = [{"CPU": 8.0}, {"CPU": 4.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}]
    plan = plan_resources(StyleStatsConfig(num_actors=5, cpus_per_actor=4), gpu_nodes)
    assert plan.use_gpu and plan.num_actors == 3 and plan.cpus_per_actor == pytest.approx(2.0)
    with pytest.raises(PreflightError, match="no room on the nodes"):
        plan_resources(StyleStatsConfig(decode_cpus=1.0), nodes[:1])
    assert even_share([{"CPU": 2.0}], 3) == pytest.approx(0.6666)  # rounded down: Ray keeps 4 decimals


def test_sweep_trials_are_counted_per_node(monkeypatch):
    """A Tune trial is its process plus its workers, each whole on one node: concurrency counts what the
    nodes hold, not the cluster's total CPUs, and a trial whose workers fit nowhere is refused."""
    from step_ray.cluster import groups_that_fit
    from step_ray.pipelines import sweep as sweep_module

    small = [{"CPU": 1.0}] * 4
    trial = [{"CPU": 0.125}, {"CPU": 0.625}]
    assert int(4.0 // 0.75) == 5 and groups_that_fit(trial, small) == 4  # the total says 5: one worker a node
    gpus = [{"CPU": 8.0, "GPU": 1.0}] * 2
    assert groups_that_fit([{"CPU": 1.0}] + [{"CPU": 1.0, "GPU": 1.0}] * 2, gpus) == 1  # its 2 GPUs on 2 nodes
    assert groups_that_fit([{"CPU": 1.0}, {"CPU": 1.5}], [ONE_CPU_NODE] * 2) == 0
    assert groups_that_fit([{"CPU": 0.0}], small, limit=7) == 7  # asks for nothing: the limit

    cfg = sweep_module.SweepJobConfig(variants=("bicycle_v2",), trial_cpus=0.125,
                                   trial={"run": {"num_workers": 1, "cpus_per_worker": 0.625}})
    assert sweep_module.trial_bundles(cfg) == [{"CPU": 0.125}, {"CPU": 0.625, "GPU": 0.0}]
    monkeypatch.setattr(sweep_module, "alive_nodes", lambda: small)
    assert sweep_module.default_concurrency(cfg) == 4


def test_node_loss_wait_is_cut_into_ray_start_rounds(monkeypatch):
    """run.node_loss_wait_s in rounds of Ray's 60 s start timeout (or the user's own), and the resume
    command a job prints: the job's arguments with the run's resume settings in place of earlier ones."""
    monkeypatch.delenv(START_TIMEOUT_ENV, raising=False)
    assert start_rounds(RunSettings()) == (pytest.approx(60.0), 5)  # the default 300 s
    assert start_rounds(RunSettings(node_loss_wait_s=20)) == (pytest.approx(20.0), 1)
    assert start_rounds(RunSettings(node_loss_wait_s=90)) == (pytest.approx(45.0), 2)
    monkeypatch.setenv(START_TIMEOUT_ENV, "30")
    assert start_rounds(RunSettings(node_loss_wait_s=90)) == (30.0, 3)
    with pytest.raises(ValueError, match="node_loss_wait_s must be > 0"):
        RunSettings(node_loss_wait_s=0)

    lost = WorkersLostError("stage1", RunSettings(num_workers=2, node_loss_wait_s=20), "/runs/stage1-20261201-101500",
                            "/runs/stage1-20261201-101500/checkpoint_epoch0001", "1 node of 1 CPU 0 GPU")
    message = str(lost)
    assert "\n" not in message and "run.num_workers=2" in message and "run.node_loss_wait_s=20" in message
    assert message.endswith("which now has 1 node of 1 CPU 0 GPU; last complete checkpoint "
                            "/runs/stage1-20261201-101500/checkpoint_epoch0001")
    assert lost.resume_command("jobs/pretrain.py", ["--config", "my settings.yaml", "--resume", "run.name=old",
                                                    "train.max_epochs=5"]) == (
        "python jobs/pretrain.py --config 'my settings.yaml' train.max_epochs=5 run.resume=true "
        "run.name=stage1-20261201-101500")


# ----------------------------------------------------------------------------------------------------
# On the cluster


def test_style_statistics_complete_on_two_one_cpu_nodes(two_nodes, declared_shared, tmp_path):
    """The reported hang: one actor was given 1.75 CPUs (the cluster's total less the decode room), which
    neither node has, and Ray waited for it forever."""
    root = tmp_path / "data"
    generate_synthetic(root, SyntheticConfig(num_styles=4, num_train=24, num_val=8, image_size=16, seed=2))
    cfg = StyleStatsConfig(data=DataConfig(root=str(root), image_size=16), output=str(tmp_path / "out"),
                           reduction=ReductionConfig(method="random", dim=8, seed=1), num_actors=1, batch_size=8,
                           images_per_read_task=8)
    nodes = alive_nodes()
    assert len(nodes) == 2 and all(n["CPU"] == 1.0 for n in nodes)
    plan = plan_resources(cfg, nodes)
    assert copies_that_fit({"CPU": plan.cpus_per_actor}, nodes) >= plan.num_actors  # else the run below hangs
    compute_style_stats(cfg)
    summary = read_metadata(cfg.output)["summary"]
    assert summary["images"] == 32 and summary["skipped"] == 0
    assert summary["actors"] == 1 and 0 < summary["cpus_per_actor"] <= 1.0


def test_preflight_refuses_a_bundle_no_node_holds(two_nodes, tmp_path):
    """The cluster has 2 CPUs and one of each custom resource in total, but no node holds 1.5 CPUs or both
    custom resources: refused in one line instead of waiting forever."""
    with pytest.raises(PreflightError) as refused:
        check_resources(RunSettings(num_workers=1, cpus_per_worker=1.5, use_gpu="never"))
    message = str(refused.value)
    assert "\n" not in message and "run.cpus_per_worker=1.5" in message and "2 nodes of 1 CPU 0 GPU" in message
    with pytest.raises(PreflightError, match="no node of the Ray cluster has that"):
        check_placement("pinned actor", {"node_a": 1, "node_b": 1})
    check_placement("two 1-CPU actors", {"CPU": 1}, 2)
    with pytest.raises(PreflightError, match="hold only 2 at once"):
        check_placement("three 1-CPU actors", {"CPU": 1}, 3)
    check_resources(RunSettings(num_workers=2, cpus_per_worker=1.0, use_gpu="never"))  # one per node: fine

    # the same from a job: one `error:` line and exit status 2
    env = {**os.environ, "RAY_ADDRESS": two_nodes.address, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "jobs/pretrain.py", f"run.storage_path={tmp_path / 'runs'}",
                           "run.cpus_per_worker=1.5", "run.use_gpu=never"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and "no node of the Ray cluster has that" in errors[0], errors


PROBE = """
import json, os, ray
from step_ray.cluster import init_ray
from step_ray.preflight import PreflightError, check_shared_storage

init_ray(**({} if os.environ.get("RAY_ADDRESS") else dict(num_cpus=1, include_dashboard=False)))
try:
    check_shared_storage({"run.storage_path": "runs"})
    refused = ""
except PreflightError as exc:
    refused = str(exc)
alive = [n for n in ray.nodes() if n["Alive"]]
print("PROBE", json.dumps({"nodes": len(alive), "gcs": ray.get_runtime_context().gcs_address, "refused": refused}))
"""


def _probe(env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("PROBE "):])


def test_init_ray_joins_only_the_cluster_ray_address_names(two_nodes):
    """The Cluster, like `ray start`, recorded its address in Ray's temp folder, which a plain ray.init()
    joins. init_ray without RAY_ADDRESS starts its own single-node instance instead (where local paths
    need no declaring); with RAY_ADDRESS it joins that cluster (where they do)."""
    from ray._common.utils import get_ray_address_file

    recorded = Path(get_ray_address_file(None))  # under RAY_TMPDIR, which the subprocesses inherit
    assert recorded.read_text().strip() == two_nodes.address
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", SHARED_STORAGE_ENV)}

    local = _probe(env)
    assert local["nodes"] == 1 and local["gcs"] != two_nodes.address and local["refused"] == ""

    joined = _probe({**env, "RAY_ADDRESS": two_nodes.address})
    assert joined["nodes"] == 2 and joined["gcs"] == two_nodes.address
    assert SHARED_STORAGE_ENV in joined["refused"]


def test_local_paths_on_two_nodes_need_declaring_shared(two_nodes, not_declared_shared, monkeypatch, tmp_path):
    with pytest.raises(PreflightError) as refused:
        check_shared_storage({"run.storage_path": str(tmp_path / "runs"), "data.root": "s3://bucket/facades"})
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"run.storage_path={tmp_path / 'runs'} is a local path")
    assert "2 nodes" in message and f"{SHARED_STORAGE_ENV}=1" in message
    check_shared_storage({"run.storage_path": "s3://bucket/runs", "data.root": "s3://bucket/facades", "cache_dir": ""})
    # the style job checks its dataset and output itself (it starts Ray only when there is work to do)
    root = tmp_path / "data"
    generate_synthetic(root, SyntheticConfig(num_styles=2, num_train=4, num_val=2, image_size=16))
    with pytest.raises(PreflightError, match=r"^data\.root=.* is a local path"):
        compute_style_stats(StyleStatsConfig(data=DataConfig(root=str(root), image_size=16),
                                             output=str(tmp_path / "o")))

    monkeypatch.setenv(SHARED_STORAGE_ENV, "1")
    check_shared_storage({"run.storage_path": str(tmp_path / "runs"), "data.root": str(root)})


def test_run_folder_is_absolute_with_a_relative_storage_path(two_nodes, declared_shared, synthetic_root, stage1_cache,
                                                             tmp_path, monkeypatch):
    """run.storage_path=runs (the default): the workers used to get the relative folder and wrote their
    TensorBoard files and sample grids under their own working directory, in Ray's session folder. Now
    they land in <cwd>/runs/<run>, which is what the job prints; the saved config keeps `runs`."""
    from test_pretrain import TINY  # the same tiny stage 1, so the session's cached statistics are reused

    from step_ray.pipelines.pretrain import PretrainJobConfig, run_pretrain

    monkeypatch.chdir(tmp_path)
    cfg = load_config(PretrainJobConfig, None, [f"data.root={synthetic_root}", f"cache_dir={stage1_cache}", *TINY,
                                             "run.storage_path=runs", "train.max_epochs=1"])
    out = run_pretrain(cfg)
    run_dir = Path(out.summary).parent
    assert run_dir.is_absolute() and run_dir.parent == tmp_path / "runs", run_dir
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert [p.name for p in (run_dir / "samples").glob("*.png")] == ["stage1_epoch0000.png"]
    assert "storage_path: runs\n" in (Path(out.checkpoint) / "config.yaml").read_text()


# ----------------------------------------------------------------------------------------------------
# Training, mining and a lost node on the cluster


def _node_ids() -> set[str]:
    import ray

    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


def _state(checkpoint_uri: str) -> dict:
    return json.loads((Path(checkpoint_uri) / "state.json").read_text())


def test_stage1_trains_one_worker_per_node_with_equal_weights(two_nodes, declared_shared, synthetic_root,
                                                              stage1_cache, tmp_path):
    """run.num_workers=2 on two 1-CPU nodes: a worker on each (the node each rank's Ray runtime reports,
    recorded in the checkpoint's state.json), both holding the weights the checkpoint holds."""
    from test_pretrain import TINY

    from step_ray.engine.distributed import parameters_sha256
    from step_ray.pipelines.pretrain import PretrainJobConfig, run_pretrain
    from step_ray.style.encode import load_encoder

    cfg = load_config(PretrainJobConfig, None, [f"data.root={synthetic_root}", f"cache_dir={stage1_cache}", *TINY,
                                             f"run.storage_path={tmp_path}", "run.num_workers=2", "train.max_epochs=1",
                                             "train.monitor.enabled=false"])
    out = run_pretrain(cfg)
    state = _state(out.checkpoint)
    ranks = state["ranks"]
    assert len(ranks) == 2 and {r["node_id"] for r in ranks} == _node_ids(), ranks  # one per node
    assert state["weights_in_sync"] and ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert parameters_sha256({"encoder": load_encoder(out.checkpoint)}) == ranks[0]["weights_sha256"]
    assert state["step"] == 6  # 96 anchors, 48 a worker, batches of 8: the data was split over both


def test_generator_stage_trains_one_worker_per_node(two_nodes, declared_shared, synthetic_root, tmp_path):
    """Stage 2 (explicit gradient averaging, no DDP) with a worker on each node, replicas equal."""
    import torch

    from test_reliability import TINY2

    from step_ray.checkpoints import save_checkpoint
    from step_ray.data.scan import prepare_paired_splits
    from step_ray.models import EncoderConfig, StyleEncoder
    from step_ray.pipelines.train_generator import GeneratorJobConfig, train_generator_stage

    encoder = tmp_path / "stage1" / "checkpoint_epoch0000"
    torch.manual_seed(1)
    save_checkpoint(encoder, {"encoder": StyleEncoder(EncoderConfig(base_channels=8, block_channels=(8, 16)))}, {},
                    {"epoch": 1}, {"method": "stage1", "run": {},
                                   "recipe": {"encoder": {"base_channels": 8, "block_channels": [8, 16]}}})
    cfg = load_config(GeneratorJobConfig, None, [f"data.root={synthetic_root}", f"encoder_checkpoint={encoder}", *TINY2,
                                                   f"run.storage_path={tmp_path / 'runs'}", "run.num_workers=2"])
    result, _, _ = train_generator_stage(replace(cfg.train, encoder_checkpoint=str(encoder), max_epochs=1, max_steps=2),
                                         cfg.run, prepare_paired_splits(cfg.data), "stage2")
    state = _state(result.checkpoint.path)
    assert {r["node_id"] for r in state["ranks"]} == _node_ids() and len(state["ranks"]) == 2, state["ranks"]
    assert state["weights_in_sync"] and state["step"] == 2


def test_mining_shards_run_on_both_nodes_and_match_one_shard(two_nodes):
    """mining.num_shards=2: the same close and far sets as one in-process index, from a shard actor on
    each node (Ray's actor table, read from the GCS: the cluster runs no dashboard for the state API)."""
    from ray._private import state as ray_state

    from step_ray.mining import MiningConfig
    from step_ray.mining.neighbours import mine_neighbours

    x = np.random.default_rng(3).normal(size=(300, 12)).astype(np.float32)
    one = mine_neighbours(x, MiningConfig(k_close=5, k_far=20, use_gpu="never"))
    before = set(ray_state.actors())
    two = mine_neighbours(x, MiningConfig(k_close=5, k_far=20, num_shards=2, use_gpu="never"))
    np.testing.assert_array_equal(two.close_ids, one.close_ids)
    np.testing.assert_array_equal(two.far_ids, one.far_ids)
    np.testing.assert_allclose(two.close_dist, one.close_dist, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(two.far_dist, one.far_dist, rtol=1e-5, atol=1e-5)
    assert [s["size"] for s in two.info["shards"]] == [150, 150]
    shards = [a for actor_id, a in ray_state.actors().items()
              if actor_id not in before and a["ActorClassName"] == "_ShardWorker"]
    assert len(shards) == 2 and {a["Address"]["NodeID"] for a in shards} == _node_ids(), shards


def _complete_checkpoints(storage_path: Path) -> list[Path]:
    found = []
    for folder in sorted(storage_path.glob("stage1-*/checkpoint_epoch*")):
        try:
            checkpoints.check_complete(str(folder))
            found.append(folder)
        except checkpoints.CheckpointError:
            pass
    return found


def test_translation_runs_an_actor_on_each_node(two_nodes, declared_shared, tmp_path, monkeypatch):
    """jobs/translate.py on the cluster: one actor per 1-CPU node, and both nodes translate their share."""
    import pyarrow.parquet as pq
    import ray.data

    from step_ray.config import load_config
    from step_ray.pipelines.translate import TranslateJobConfig, run_translate
    from test_translate import make_generator_checkpoint, make_png

    (tmp_path / "in").mkdir()
    (tmp_path / "run").mkdir()
    for i in range(24):
        make_png(tmp_path / "in" / f"x{i:02d}.png", (32, 32), i, colours=4)
    checkpoint = make_generator_checkpoint(tmp_path / "run")
    # Ray Data hands blocks to whichever actor is up: on a loaded 2-core machine the second node's actor can
    # start after the first has translated everything (seen in CI). What is under test is where the work
    # runs once both actors exist, so the pool starts both before the first block, holds one block per
    # actor at a time and ignores where a block was read.
    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "wait_for_min_actors_s", 300)
    monkeypatch.setattr(context, "max_tasks_in_flight_per_actor", 1)
    monkeypatch.setattr(context.execution_options, "actor_locality_enabled", False)
    summary = run_translate(load_config(TranslateJobConfig, None, [
        f"checkpoint={checkpoint}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}", "style.samples=2",
        "num_actors=2", "batch_size=1", "contact_sheet=0"]))
    table = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pandas()
    assert summary["outputs_written"] == 48 and (table["error"] == "").all()
    per_node = table.groupby("node")["input"].nunique()
    assert len(per_node) == 2 and per_node.min() >= 1, per_node.to_dict()


def test_node_lost_mid_run_stops_with_the_resume_command_then_resumes(two_nodes, declared_shared, synthetic_root,
                                                                      stage1_cache, tmp_path):
    """The reported hang: a node removed mid-run (stage 1, a worker on each node, run.max_failures=1). Ray
    Train restarts the worker group, which cannot get its second worker: it used to wait for ever. Now the
    job stops after run.node_loss_wait_s with one error line naming the last complete checkpoint and the
    command that resumes the run; with a node back, that very command finishes the run.
    Last in the module: it removes the worker node and adds a new one."""
    from test_pretrain import TINY

    runs = tmp_path / "runs"
    wait_s = 20
    args = [f"data.root={synthetic_root}", f"cache_dir={stage1_cache}", *TINY, f"run.storage_path={runs}",
            "run.num_workers=2", "run.max_failures=1", f"run.node_loss_wait_s={wait_s}", "train.max_epochs=4",
            "train.monitor.enabled=false"]
    env = {**os.environ, "RAY_ADDRESS": two_nodes.address, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "job.log"
    with open(log, "w") as out, open(tmp_path / "job.err", "w") as err:
        job = subprocess.Popen([sys.executable, "jobs/pretrain.py", *args], cwd=REPO, env=env, stdout=out, stderr=err)
        try:
            deadline = time.time() + 240
            while not _complete_checkpoints(runs) and job.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            assert _complete_checkpoints(runs) and job.poll() is None, (tmp_path / "job.err").read_text()[-3000:]
            # the driver (and Ray Train's controller, which runs beside it) is on the head node
            two_nodes.remove_node(next(iter(two_nodes.worker_nodes)))
            removed = time.time()
            job.wait(timeout=wait_s + 120)
        finally:
            if job.poll() is None:
                job.kill()
    stopped_after = time.time() - removed
    stderr = (tmp_path / "job.err").read_text()
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert job.returncode == 2 and len(errors) == 1, stderr[-3000:]
    assert wait_s <= stopped_after < wait_s + 60, stopped_after  # the restart, one round of 20 s, the exit
    line = errors[0]
    last = _complete_checkpoints(runs)[-1]
    run_name = last.parent.name
    assert f"stage1 run {run_name} stopped: Ray could not start its run.num_workers=2 workers within " \
           f"run.node_loss_wait_s={wait_s}" in line, line
    assert "which now has 1 node of 1 CPU 0 GPU" in line and f"last complete checkpoint {last}; " in line, line
    command = line.split("; continue with: ", 1)[1]
    assert command == shlex.join(["python", "jobs/pretrain.py", *args, "run.resume=true", f"run.name={run_name}"])

    # a node joins again; the printed command, as printed, continues the run to its end
    two_nodes.add_node(num_cpus=1, resources={"node_b": 1}, node_ip_address="127.0.0.1")
    two_nodes.wait_for_nodes()
    resumed = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = _state(str(_complete_checkpoints(runs)[-1]))
    assert state["epoch"] == 4 and [h["epoch"] for h in state["history"]] == [0, 1, 2, 3]
    assert state["restarts"][-1]["epoch"] == int(last.name[-4:]) + 1, state["restarts"]  # from the named checkpoint
    assert {r["node_id"] for r in state["ranks"]} == _node_ids() and state["weights_in_sync"]
