"""step_ray/prometheus.py maps reported metric dicts onto its named metrics (read back from the Prometheus
endpoint in tests/test_e2e.py); here, without Ray, the mapping itself."""
import math

import pytest

from step_ray import prometheus as M


class Fake:
    def __init__(self, name):
        self.name, self.calls = name, []

    def set(self, value, tags=None):
        self.calls.append(("set", value, tags or {}))

    def inc(self, value, tags=None):
        self.calls.append(("inc", value, tags or {}))


@pytest.fixture
def recorded(monkeypatch):
    fakes = {}
    monkeypatch.setattr(M, "_ray_ready", lambda: True)
    monkeypatch.setattr(M, "_metric", lambda name: fakes.setdefault(name, Fake(name)))
    monkeypatch.setattr(M, "_ensure_keepalive", lambda: None)
    monkeypatch.setattr(M, "_mining_done", 0)
    return fakes


def test_record_epoch_maps_stage1_metrics(recorded):
    M.record_epoch("stage1", {"epoch": 2, "step": 30, "epoch_seconds": 4.0, "images_per_s": 300.0,
                              "triplets_per_s": 100.0, "train_loss": 0.2, "train_triplet": 0.1,
                              "train_active_fraction": 0.4, "val_triplet_acc": 0.8, "val_knn_acc": math.nan,
                              "untrained_val_triplet_acc": 0.5, "stage": "stage1"})
    sets = {(n, tuple(sorted(t.items()))): v for n, f in recorded.items() for (_, v, t) in f.calls}
    assert sets[("step_ray_images_per_second", (("stage", "stage1"),))] == 300.0
    assert sets[("step_ray_triplets_per_second", (("stage", "stage1"),))] == 100.0
    assert sets[("step_ray_epoch", (("stage", "stage1"),))] == 3  # epochs finished
    assert sets[("step_ray_loss", (("stage", "stage1"), ("term", "loss")))] == 0.2
    assert sets[("step_ray_loss", (("stage", "stage1"), ("term", "triplet")))] == 0.1
    assert sets[("step_ray_active_fraction", (("stage", "stage1"),))] == 0.4
    assert sets[("step_ray_validation", (("metric", "val_triplet_acc"), ("stage", "stage1")))] == 0.8
    assert not any("val_knn_acc" in str(k) for k in sets)  # NaN is not exported
    assert not any("untrained" in str(k) for k in sets)
    for name, f in recorded.items():  # every metric used is declared, with exactly its tag keys
        kind, _, keys = M.METRICS[name]
        for _, _, tags in f.calls:
            assert set(tags) == set(keys), name


def test_generator_losses_and_other_ranks(recorded):
    M.record_epoch("stage2", {"train_loss_g": 1.5, "train_loss_d": 0.7, "images_per_s": 20.0, "val_psnr": 14.0}, rank=1)
    assert not recorded  # rank 1: rates are global, rank 0 reports them (GPU memory only with CUDA)
    M.record_epoch("stage2", {"train_loss_g": 1.5, "train_loss_d": 0.7, "images_per_s": 20.0, "val_psnr": 14.0})
    terms = {c[2]["term"] for c in recorded["step_ray_loss"].calls}
    assert terms == {"loss_g", "loss_d"}
    assert recorded["step_ray_validation"].calls[0][2] == {"stage": "stage2", "metric": "val_psnr"}


def test_mining_progress_counts_deltas(recorded):
    M.record_mining_progress(250, 1000)
    M.record_mining_progress(1000, 1000)
    M.record_mining_progress(100, 400)  # a new mining run in the same process
    assert [c[1] for c in recorded["step_ray_mining_queries"].calls] == [250.0, 750.0, 100.0]
    assert [c[1] for c in recorded["step_ray_mining_progress"].calls] == [0.25, 1.0, 0.25]
    M.record_style_images(32, split="train")
    assert recorded["step_ray_style_images"].calls == [("inc", 32.0, {"split": "train"})]


def test_no_op_outside_ray_and_never_raises(monkeypatch):
    monkeypatch.setattr(M, "_ray_ready", lambda: False)
    M.record_epoch("stage1", {"images_per_s": 1.0})  # nothing to export to: silently nothing

    def broken(name):
        raise RuntimeError("metrics agent gone")

    monkeypatch.setattr(M, "_ray_ready", lambda: True)
    monkeypatch.setattr(M, "_metric", broken)
    M.record_epoch("stage1", {"images_per_s": 1.0})  # logged, not raised: training goes on
    M.record_mining_progress(1, 2)


def test_metric_names_are_valid_prometheus_names():
    import re

    for name, (kind, description, tags) in M.METRICS.items():
        assert re.fullmatch(r"step_ray_[a-z0-9_]+", name) and kind in ("gauge", "counter") and description
        assert not name.endswith("_total")  # Prometheus adds _total to counters
