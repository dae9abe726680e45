"""Shared fixtures: one local S3 server (moto, 127.0.0.1) and one Ray instance per test session.

The S3 endpoint and dummy credentials are put in the environment *before* Ray starts, so Ray workers
(which inherit the driver's environment) reach the same server through the standard AWS variables.
"""
from __future__ import annotations

import os
import socket
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


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray instance (2 CPUs) for the whole session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A small synthetic dataset shared by the session (8 styles, 32 px halves)."""
    from step_ray.data.synthetic import SyntheticConfig, generate_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    generate_synthetic(root, SyntheticConfig(num_styles=8, num_train=96, num_val=32, image_size=32))
    return root


@pytest.fixture
def facades_root():
    if not (FACADES / "train").is_dir():
        pytest.skip(f"real facades data not found at {FACADES} (set STEP_RAY_FACADES)")
    return FACADES
