"""Shared fixtures: one local S3 server (moto, 127.0.0.1) and one Ray instance per test session.

The S3 endpoint and dummy credentials are put in the environment *before* Ray starts, so Ray workers
(which inherit the driver's environment) reach the same server through the standard AWS variables.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FACADES = Path(os.environ.get("STEP_RAY_FACADES", REPO.parent / "shared" / "data" / "facades"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_S3: dict = {}  # the session's moto server, for server-side fault injection (tests/faults.py)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    _S3["server"] = server
    url = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="testing-key-id",
        AWS_SECRET_ACCESS_KEY="testing-secret-key",
        AWS_DEFAULT_REGION="us-east-1",
    )
    os.environ.pop("AWS_PROFILE", None)
    yield url
    _S3["server"].stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the local S3 server; yields its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


# Ray Train's controller looks at its workers every 2 s by default: a tiny test run would spend seconds
# of each start, report and end waiting for that poll. No preemption can happen on one machine.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def _start_ray():
    """With its dashboard (on 127.0.0.1): Ray Train's PlacementGroupCleaner asks the dashboard's state API
    whether a run's controller is alive, and without it never removes the placement group of a
    controller that died mid-start (an interrupted sweep trial). That group kept a CPU reserved and the
    next Ray Train run waited for it forever: the CI hang of 2026-11-26."""
    import ray

    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             configure_logging=False)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray instance (2 CPUs) for the whole session."""
    import ray

    if not ray.is_initialized():
        _start_ray()
    yield ray
    ray.shutdown()


def _held_by(ray) -> str:
    """What still holds the session's resources: live actors and placement groups, by name."""
    try:
        from ray._private import state

        actors = [f"{a.get('ActorClassName') or a.get('Name')} ({a.get('State')})" for a in state.actors().values()
                  if a.get("State") not in ("DEAD",)]
        groups = [f"{g.get('name') or pid[:8]} ({g.get('state')})"
                  for pid, g in ray.util.placement_group_table().items() if g.get("state") not in ("REMOVED",)]
        return f"actors {actors}, placement groups {groups}"
    except Exception as e:  # describing the leak must not hide it
        return f"(could not list them: {e!r})"


@pytest.fixture(autouse=True)
def _ray_resources_released(request):
    """Every test that used the shared Ray instance gives all its CPUs back. One that does not (as an
    interrupted sweep trial's placement group did, in CI) would leave every later Ray test waiting for
    CPUs forever: report it on that test, with what holds them, and restart Ray so the rest of the
    session runs."""
    yield
    if "ray_session" not in request.fixturenames:
        return
    import ray

    if not ray.is_initialized():
        return
    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.time() + 60  # actors and placement groups are released asynchronously
    while ray.available_resources().get("CPU", 0) < total:
        if time.time() > deadline:
            held = _held_by(ray)
            ray.shutdown()
            _start_ray()
            pytest.fail(f"Ray resources still held 60 s after the test: {held}. Ray was restarted.")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic dataset shared by the session (8 styles, 32 px halves), in the hue design: every
    threshold the suite measured on it (test_style's recall, the generator and multi-domain runs) was
    measured on that design, the earlier default. The default shared_palette design has its own
    tests in test_data.py (hard for an untrained encoder, separable by the exact VGG descriptors)."""
    from step_ray.data.synthetic import SyntheticConfig, generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, SyntheticConfig(num_styles=8, num_train=96, num_val=32, image_size=32, design="hue"))
    return root


@pytest.fixture(scope="session")
def stage1_cache(tmp_path_factory):
    """One cache_dir for every tiny stage-1 run of the session: the style statistics and mined triplets
    of the synthetic set are computed by the first run and reused (they are keyed by their config)."""
    return tmp_path_factory.mktemp("stage1_cache")


@pytest.fixture
def facades_root():
    if not (FACADES / "train").is_dir():
        pytest.skip(f"real facades data not found at {FACADES} (set STEP_RAY_FACADES)")
    return FACADES
