"""The way users run step_ray on a cluster, on one machine: a Ray head with its dashboard on 127.0.0.1,
jobs submitted through the Job Submission API with the repository as working directory, step_ray's
metrics read back from the node's Prometheus endpoint, checkpoints found in a bucket of the local S3
server.

The head is this module's own (`ray start --head --block` in a new session, every port free and on
127.0.0.1, its own short --temp-dir, token authentication) and is stopped by killing exactly the
processes it started: never `ray stop`, which would stop every Ray instance on the machine. Test
credentials reach the cluster the way an instance profile's do, through the nodes' environment; they
are not part of any job submission, and the tests check they appear in no log or job record.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
# What `ray job submit --working-dir .` should not upload (.gitignore is honoured by Ray as well).
EXCLUDES = [".venv", ".venv/**", "data", "runs", ".git", ".pytest_cache", "**/__pycache__", "*.egg-info", ".ci"]

pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class PrivateHead:
    """A Ray head in its own process session, reachable only on 127.0.0.1."""

    def __init__(self, env: dict[str, str]):
        (self.gcs_port, self.dashboard_port, self.metrics_port, self.agent_port, self.client_port,
         self.agent_grpc_port, self.runtime_env_port) = _free_ports(7)
        # Ray's socket paths (AF_UNIX, <108 bytes) live under the temp dir: keep it short.
        self.temp_dir = tempfile.mkdtemp(prefix="rE", dir="/tmp")
        self.token = secrets.token_hex(32)
        token_file = Path(self.temp_dir, "token")
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        self.env = {
            **{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")},
            **env,
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # advertise and bind 127.0.0.1, not the host's address
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            "RAY_metrics_report_interval_ms": "1000",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        }
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log = Path(self.temp_dir, "head.log")
        self.proc: subprocess.Popen | None = None
        self._client = None

    def start(self, timeout: float = 150.0) -> "PrivateHead":
        cmd = [RAY, "start", "--head", "--block", "--disable-usage-stats",
               "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--dashboard-agent-listen-port={self.agent_port}",
               f"--dashboard-agent-grpc-port={self.agent_grpc_port}",
               f"--runtime-env-agent-port={self.runtime_env_port}", f"--ray-client-server-port={self.client_port}",
               f"--metrics-export-port={self.metrics_port}", "--num-cpus=2", "--num-gpus=0",
               f"--temp-dir={self.temp_dir}"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.temp_dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                from ray.job_submission import JobSubmissionClient

                self._client = JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {self.token}"})
                self._client.list_jobs()
                return self
            except Exception:
                time.sleep(1.0)
        raise TimeoutError(f"the Ray dashboard at {self.dashboard} did not answer in {timeout:.0f}s:\n"
                           f"{self.log.read_text()[-3000:]}")

    @property
    def client(self):
        return self._client

    def submit(self, entrypoint: str, runtime_env: dict, timeout: float = 60.0) -> str:
        """Submit, retrying while the job agent is still starting ('No available agent')."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            except RuntimeError as exc:
                if "agent" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def wait(self, job_id: str, timeout: float) -> str:
        from ray.job_submission import JobStatus

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.client.get_job_status(job_id)
            if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
                return status
            time.sleep(1.0)
        self.client.stop_job(job_id)
        raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f}s:\n"
                           f"{self.client.get_job_logs(job_id)[-4000:]}")

    def scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return r.read().decode()

    def stop(self) -> None:
        """Kill what this head started (its process session and any descendant that left it)."""
        if self.proc is None:
            return
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)  # the session leader's group: ray start and what it spawned
            except ProcessLookupError:
                pass
            for p in procs:
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            _, alive = psutil.wait_procs(procs, timeout=4 if sig == signal.SIGTERM else 5)
            if not alive:
                break
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head(s3_server):
    """One private head for this module. The S3 endpoint and its (dummy) credentials are in the nodes'
    environment, as an instance profile's would be on a real cluster."""
    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                      "AWS_DEFAULT_REGION")}
    h = PrivateHead(env)
    try:
        yield h.start()
    finally:
        h.stop()


def _runtime_env(**env_vars) -> dict:
    return {"working_dir": str(REPO), "excludes": EXCLUDES, "env_vars": env_vars}


def _secret() -> str:
    return os.environ["AWS_SECRET_ACCESS_KEY"]


# ----------------------------------------------------------------------------------------------------

PROBE = """
import time, ray
ray.init()
from step_ray import prometheus as M

@ray.remote(num_cpus=0)
class Trainer:  # stands in for a Ray Train worker: metrics recorded inside an actor
    def epoch(self):
        M.record_epoch("stage1", {"epoch": 0, "step": 6, "epoch_seconds": 2.0, "images_per_s": 123.5,
                                  "triplets_per_s": 41.25, "train_loss": 0.25, "train_triplet": 0.2,
                                  "train_active_fraction": 0.5, "val_triplet_acc": 0.75}, rank=0)
        return True

@ray.remote(num_cpus=0)
def mine():  # and a task: sharded mining progress
    M.record_mining_progress(40, 100)
    M.record_mining_progress(100, 100)
    return True

t = Trainer.remote()
assert ray.get([t.epoch.remote(), mine.remote()]) == [True, True]
M.record_style_images(32, split="train")  # the driver records too
print("metrics recorded", flush=True)
time.sleep(120)  # stay alive until the test has scraped them (it stops the job)
"""


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of `name` in Prometheus text format."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out.append((dict(s.labels), float(s.value)))
    return out


def test_step_ray_metrics_reach_the_prometheus_endpoint(head):
    job = head.submit(f"{shlex.quote(sys.executable)} -c {shlex.quote(PROBE)}", _runtime_env())
    wanted = {
        "ray_step_ray_images_per_second": ({"stage": "stage1"}, 123.5),
        "ray_step_ray_triplets_per_second": ({"stage": "stage1"}, 41.25),
        "ray_step_ray_loss": ({"stage": "stage1", "term": "loss"}, 0.25),
        "ray_step_ray_active_fraction": ({"stage": "stage1"}, 0.5),
        "ray_step_ray_validation": ({"stage": "stage1", "metric": "val_triplet_acc"}, 0.75),
        "ray_step_ray_epoch": ({"stage": "stage1"}, 1.0),
        "ray_step_ray_mining_progress": ({}, 1.0),
        "ray_step_ray_mining_queries_total": ({}, 100.0),
        "ray_step_ray_style_images_total": ({"split": "train"}, 32.0),
    }
    # Ray's own node metrics share the endpoint (the Grafana dashboard plots them beside step_ray's)
    wanted["ray_node_cpu_utilization"] = ({}, None)
    missing, text = dict(wanted), ""
    deadline = time.monotonic() + 90
    try:
        while missing and time.monotonic() < deadline:
            time.sleep(1)
            try:
                text = head.scrape()
            except OSError:  # the metrics agent starts a little after the dashboard
                continue
            for name, (labels, value) in list(missing.items()):
                if any(all(s.get(k) == v for k, v in labels.items())
                       and (value is None or s_value == pytest.approx(value))
                       for s, s_value in _samples(text, name)):
                    del missing[name]
            if head.client.get_job_status(job) in ("FAILED", "STOPPED"):
                break
    finally:
        logs = head.client.get_job_logs(job)
        head.client.stop_job(job)
    assert not missing, (f"not exported: {sorted(missing)}\njob logs:\n{logs[-3000:]}\nendpoint (step_ray lines):\n"
                         + "\n".join(line for line in text.splitlines() if "step_ray" in line))
    # every metric step_ray defines is the one Prometheus sees, with Ray's prefix
    from step_ray.prometheus import METRICS, exported_name

    exported = {exported_name(n) + ("_total" if METRICS[n][0] == "counter" else "") for n in METRICS}
    assert {n for n in wanted if "step_ray" in n} <= exported


# ----------------------------------------------------------------------------------------------------

def _tiny_overrides() -> list[str]:
    from test_pretrain import TINY

    return list(TINY)


def test_pretrain_job_submitted_end_to_end(head, s3_bucket, tmp_path):
    """`ray job submit --working-dir . -- python jobs/pretrain.py ...`, through the SDK, to SUCCEEDED; the
    checkpoint lands in the bucket and `python -m step_ray.checkpoints` finds and pulls it."""
    from ray.job_submission import JobStatus

    storage_path = f"s3://{s3_bucket}/step_ray"
    overrides = [
        *_tiny_overrides(),
        f"data.synthetic_dir={tmp_path / 'synthetic'}",  # generated by the job itself
        "data.synthetic.num_train=96", "data.synthetic.num_val=32",
        "data.synthetic.image_size=32", "data.synthetic.num_styles=8",
        f"cache_dir={tmp_path / 'cache'}",
        f"run.storage_path={storage_path}",
        "train.max_epochs=1",
    ]
    entrypoint = " ".join(shlex.quote(a) for a in [sys.executable, "jobs/pretrain.py", *overrides])
    started = time.monotonic()
    job = head.submit(entrypoint, _runtime_env(AWS_ENDPOINT_URL=os.environ["AWS_ENDPOINT_URL"]))
    status = head.wait(job, timeout=240)
    logs = head.client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-6000:]
    print(f"pretrain job {job}: {status} in {time.monotonic() - started:.0f}s")

    # what the job printed: its progress and where the checkpoint is
    assert "[stage1] epoch 1/1" in logs
    # a quiet console: the epoch line once, none of Ray Train's per-report records (--verbose shows them),
    # and the best checkpoint ranked by what the labelled set's picture shows
    assert logs.count("[stage1] epoch 1/1") == 1, logs[-3000:]
    assert "Reporting training result" not in logs and "best checkpoint by val_knn_acc" in logs, logs[-3000:]
    ckpt_lines = [line for line in logs.splitlines() if line.startswith("[pretrain] checkpoint")]
    assert ckpt_lines, logs[-3000:]
    checkpoint = ckpt_lines[-1].split()[-1]
    assert checkpoint.startswith(f"{storage_path}/stage1-") and checkpoint.endswith("checkpoint_epoch0000")

    # the checkpoint is in the bucket (read with boto3 straight from the S3 server)
    import boto3

    keys = {o["Key"] for o in boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
            .list_objects_v2(Bucket=s3_bucket, Prefix="step_ray/")["Contents"]}
    prefix = checkpoint[len(f"s3://{s3_bucket}/"):]
    assert {f"{prefix}/encoder.pt", f"{prefix}/state.json", f"{prefix}/config.yaml"} <= keys
    run_prefix = prefix.rsplit("/", 1)[0]
    assert f"{run_prefix}/metrics.json" in keys and f"{run_prefix}/embedding.png" in keys

    # ... and the checkpoint CLI finds it and pulls it
    from step_ray import checkpoints

    best = checkpoints.best_checkpoint(storage_path, "val_triplet_acc", "max")
    assert best.uri == checkpoint and best.epoch == 0
    _, local = checkpoints.pull(storage_path, tmp_path / "pulled")
    assert (Path(local) / "encoder.pt").stat().st_size > 0

    # no credential in the job's logs or in its record on the cluster
    secret = _secret()
    assert secret not in logs
    info = head.client.get_job_info(job)
    record = info.model_dump() if hasattr(info, "model_dump") else vars(info)
    assert secret not in json.dumps(record, default=str)
