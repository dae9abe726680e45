"""`python -m step_ray.checkpoints list|best|pull` over local and s3:// run folders (local S3 server)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml

from step_ray import checkpoints, storage
from step_ray.checkpoints import save_checkpoint, write_manifest

REPO = Path(__file__).resolve().parents[1]


def _checkpoint(folder: Path, epoch: int, metrics: dict, run_metric="val_triplet_acc", mode="max"):
    folder.mkdir(parents=True)
    history = [{"epoch": e, "train_loss": 1.0 / (e + 1)} for e in range(epoch)]
    history.append({"epoch": epoch, "step": 10 * (epoch + 1), "train_loss": 0.5, **metrics})
    (folder / "state.json").write_text(json.dumps({"epoch": epoch + 1, "history": history}))
    (folder / "config.yaml").write_text(yaml.safe_dump({"run": {"checkpoint_metric": run_metric,
                                                                "checkpoint_mode": mode}}))
    (folder / "encoder.pt").write_bytes(os.urandom(2048))
    write_manifest(folder)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two stage-1 runs (best val_triplet_acc: run b epoch 1; best val_knn_acc: run a epoch 2) and a
    cache folder that is not a run."""
    root = tmp_path_factory.mktemp("runs")
    a, b = root / "stage1-20260101-000000", root / "stage1-20260102-000000"
    _checkpoint(a / "checkpoint_epoch0000", 0, {"val_triplet_acc": 0.70, "val_knn_acc": 0.50})
    _checkpoint(a / "checkpoint_epoch0002", 2, {"val_triplet_acc": 0.74, "val_knn_acc": 0.95})
    _checkpoint(b / "checkpoint_epoch0001", 1, {"val_triplet_acc": 0.81, "val_knn_acc": 0.90})
    _checkpoint(b / "checkpoint_epoch0003", 3, {"val_triplet_acc": float("nan")})
    (a / "metrics.json").write_text(json.dumps({"best_checkpoint": str(a / "checkpoint_epoch0002")}))
    (a / "checkpoint_manager_snapshot.json").write_text("{}")
    (root / "cache" / "style-abc").mkdir(parents=True)
    (root / "cache" / "style-abc" / "metadata.json").write_text("{}")
    return root


@pytest.fixture
def s3_runs(runs, s3_bucket):
    uri = f"s3://{s3_bucket}/step_ray/runs"
    fs, path = storage.resolve(uri)
    pafs.copy_files(str(runs), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def test_list_runs_local(runs):
    found = checkpoints.list_runs(str(runs))
    assert [r.name for r in found] == ["stage1-20260101-000000", "stage1-20260102-000000"]  # not cache/
    a, b = found
    assert [c.epoch for c in a.checkpoints] == [0, 2] and [c.epoch for c in b.checkpoints] == [1, 3]
    assert a.checkpoints[1].metrics["val_knn_acc"] == 0.95  # the checkpoint's own epoch, not an earlier one
    assert a.best_checkpoint.endswith("checkpoint_epoch0002")
    # one run folder lists just that run
    (only,) = checkpoints.list_runs(str(runs / "stage1-20260102-000000"))
    assert only.name == "stage1-20260102-000000"


def test_best_by_metric_and_mode(runs):
    best = checkpoints.best_checkpoint(str(runs))  # the run's own metric: val_triplet_acc, max (NaN ignored)
    assert best.run == "stage1-20260102-000000" and best.epoch == 1
    assert checkpoints.best_checkpoint(str(runs), "val_knn_acc", "max").uri.endswith(
        "stage1-20260101-000000/checkpoint_epoch0002")
    assert checkpoints.best_checkpoint(str(runs), "val_knn_acc", "min").epoch == 0
    assert checkpoints.best_checkpoint(str(runs), "train_loss", "min").metrics["train_loss"] == 0.5
    with pytest.raises(checkpoints.CheckpointError, match="no_such_metric"):
        checkpoints.best_checkpoint(str(runs), "no_such_metric")


def test_pull_local(runs, tmp_path):
    info, dest = checkpoints.pull(str(runs), tmp_path / "best")
    assert info.epoch == 1 and sorted(p.name for p in Path(dest).iterdir()) == ["config.yaml", "encoder.pt",
                                                                                "manifest.json", "state.json"]
    with pytest.raises(checkpoints.CheckpointError, match="already holds files"):
        checkpoints.pull(str(runs), tmp_path / "best")
    # a checkpoint URI is pulled as it is, whatever the metric
    ckpt = runs / "stage1-20260101-000000" / "checkpoint_epoch0000"
    info, dest = checkpoints.pull(str(ckpt), tmp_path / "best", overwrite=True)
    assert info.epoch == 0 and (Path(dest) / "encoder.pt").read_bytes() == (ckpt / "encoder.pt").read_bytes()
    assert not list(tmp_path.glob(".best.partial*"))


def test_cli_on_s3_never_shows_credentials(s3_runs, tmp_path):
    """The CLI as users run it, in a fresh process: credentials from the AWS environment chain."""
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]

    def cli(*args):
        out = subprocess.run([sys.executable, "-m", "step_ray.checkpoints", *args], capture_output=True, text=True,
                             cwd=REPO, env=os.environ.copy(), timeout=120)
        assert secret not in out.stdout and secret not in out.stderr
        return out

    listed = cli("list", s3_runs)
    assert listed.returncode == 0, listed.stderr
    assert "stage1-20260101-000000  (2 checkpoints)" in listed.stdout
    assert f"{s3_runs}/stage1-20260102-000000/checkpoint_epoch0001" in listed.stdout
    best_line = next(line for line in listed.stdout.splitlines() if "<- best" in line and "20260102" in line)
    assert "checkpoint_epoch0001" in best_line

    best = cli("best", s3_runs, "--metric", "val_knn_acc", "--mode", "max")
    assert best.stdout.strip() == f"{s3_runs}/stage1-20260101-000000/checkpoint_epoch0002"

    as_json = json.loads(cli("best", s3_runs, "--json").stdout)
    assert as_json["epoch"] == 1 and as_json["metrics"]["val_triplet_acc"] == 0.81

    pulled = cli("pull", s3_runs, str(tmp_path / "ckpt"))
    assert pulled.returncode == 0 and "pulled" in pulled.stdout
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["history"][-1]["val_triplet_acc"] == 0.81
    for f in (tmp_path / "ckpt").iterdir():  # nothing written carries a credential either
        assert secret.encode() not in f.read_bytes()

    missing = cli("list", s3_runs.replace("/step_ray/", "/nothing_here/"))
    assert missing.returncode in (0, 1) and "Traceback" not in missing.stderr
    no_bucket = cli("best", "s3://no-such-bucket-xyz/runs")
    assert no_bucket.returncode == 1 and no_bucket.stderr.startswith("error:") and "Traceback" not in no_bucket.stderr


def test_redact_hides_environment_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    assert checkpoints.redact("failed with key s3cr3t-value") == "failed with key ***"
    assert "abc" not in checkpoints.redact("X-Amz-Security-Token=abc&x=1")


def test_incomplete_checkpoints_are_never_listed_ranked_or_pulled(tmp_path):
    """What an interrupted upload leaves (some files, no manifest; or a manifest and a short file) is not a
    checkpoint: the best complete one is still found, and loading a damaged one fails by name."""
    import torch

    from step_ray.checkpoints import IncompleteCheckpointError, load_checkpoint, save_checkpoint

    run = tmp_path / "stage1-20260101-000000"
    _checkpoint(run / "checkpoint_epoch0000", 0, {"val_triplet_acc": 0.5})
    partial = run / "checkpoint_epoch0001"  # the upload stopped before encoder.pt and the manifest
    _checkpoint(partial, 1, {"val_triplet_acc": 0.9})
    (partial / "manifest.json").unlink()
    (partial / "encoder.pt").unlink()
    short = run / "checkpoint_epoch0002"  # every file there, one of them cut short
    _checkpoint(short, 2, {"val_triplet_acc": 0.95})
    (short / "encoder.pt").write_bytes(os.urandom(100))
    assert [c.name for c in checkpoints.list_checkpoints(str(run))] == ["checkpoint_epoch0000"]
    assert checkpoints.best_checkpoint(str(tmp_path)).name == "checkpoint_epoch0000"
    with pytest.raises(checkpoints.CheckpointError, match="incomplete"):
        checkpoints.pull(str(partial), tmp_path / "out")

    real = tmp_path / "real"
    net = torch.nn.Linear(3, 2)
    save_checkpoint(real, {"encoder": net}, {}, {"epoch": 1}, {"a": 1})
    assert load_checkpoint(real, {"encoder": torch.nn.Linear(3, 2)})["epoch"] == 1
    data = bytearray((real / "encoder.pt").read_bytes())
    data[-5] ^= 0xFF  # same size, one byte flipped
    (real / "encoder.pt").write_bytes(bytes(data))
    with pytest.raises(IncompleteCheckpointError, match="sha256"):
        load_checkpoint(real, {"encoder": torch.nn.Linear(3, 2)})


def test_checkpoints_written_before_the_one_schema_still_load(tmp_path):
    """Runs trained before 2026-12-01 saved stage 1's whole job config, or a loop's own settings, as
    config.yaml: their encoders and generators load as they did."""
    import torch

    from step_ray.eval.generator_eval import load_generator
    from step_ray.models import EncoderConfig, GeneratorConfig, StyleEncoder, UNetGenerator
    from step_ray.style.encode import load_encoder

    enc_cfg = {"base_channels": 8, "block_channels": [8, 16]}
    torch.manual_seed(0)
    stage1 = tmp_path / "stage1" / "checkpoint_epoch0003"
    save_checkpoint(stage1, {"encoder": StyleEncoder(EncoderConfig(base_channels=8, block_channels=(8, 16)))}, {},
                    {"epoch": 4},
                    {"train": {"encoder": enc_cfg, "margin": 0.1}, "run": {"checkpoint_metric": "val_knn_acc"}})
    assert load_encoder(str(stage1)).cfg.block_channels == (8, 16)
    assert checkpoints.read_record(str(stage1))["run"]["checkpoint_metric"] == "val_knn_acc"
    gen_cfg = GeneratorConfig(num_downs=5, base_channels=8)
    stage2 = tmp_path / "stage2" / "checkpoint_epoch0000"
    save_checkpoint(stage2, {"generator": UNetGenerator(gen_cfg),
                             "encoder": StyleEncoder(EncoderConfig(**{**enc_cfg, "block_channels": (8, 16)}))},
                    {}, {"epoch": 1},
                    {"generator": {"num_downs": 5, "base_channels": 8}, "encoder": enc_cfg, "lambda_vgg": 0.02})
    g, tree = load_generator(str(stage2))
    assert g.cfg.num_downs == 5 and tree["lambda_vgg"] == 0.02 and load_encoder(str(stage2)).cfg.base_channels == 8
