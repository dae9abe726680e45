"""step_ray's own metrics, exported through `ray.util.metrics` to the Ray dashboard and Prometheus.

Each Ray node's metrics agent serves every metric recorded by a process on that node (driver, task, actor,
Ray Train worker) at `http://<node>:<metrics-export-port>/metrics`, with the name prefixed `ray_`: the
Gauge `step_ray_images_per_second` is scraped as `ray_step_ray_images_per_second{stage="stage1",...}`.
`infra/prometheus.yml` scrapes those endpoints and `infra/grafana-dashboard.json` plots the names below.

Recording is best effort: outside Ray (`ray.init` not called) every function here does nothing, and a
failure to record never reaches the training loop. Only numbers are exported (no paths, no config).

    record_epoch("stage1", metrics, rank=rank)     # once per epoch, before ray.train.report(metrics)
    record_mining_progress(done, total)            # as query batches finish
    record_style_images(n, split="train")          # per batch of images whose descriptors were computed
"""
from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any, Mapping

log = logging.getLogger(__name__)

PREFIX = "ray_"  # what Ray's exporter puts before every application metric name

# name -> (kind, description, tag keys). The names are the contract with infra/ (Grafana, Prometheus);
# tests/test_infra.py checks that every step_ray metric the dashboard queries is defined here.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "step_ray_images_per_second": ("gauge", "Training images per second over the last epoch, all workers", ("stage",)),
    "step_ray_triplets_per_second": ("gauge", "Stage-1 triplets per second over the last epoch, all workers",
                                     ("stage",)),
    "step_ray_loss": ("gauge", "Mean training loss term over the last epoch (train_<term> metrics)", ("stage", "term")),
    "step_ray_validation": ("gauge", "Validation metric after the last epoch (val_<name> metrics)",
                            ("stage", "metric")),
    "step_ray_active_fraction": ("gauge", "Stage-1 fraction of triplets with a non-zero hinge loss over the last epoch",
                                 ("stage",)),
    "step_ray_epoch": ("gauge", "Epochs finished in the current run", ("stage",)),
    "step_ray_step": ("gauge", "Optimiser steps taken in the current run", ("stage",)),
    "step_ray_epoch_seconds": ("gauge", "Wall time of the last epoch", ("stage",)),
    "step_ray_data_wait_share": ("gauge", "Share of the last epoch's step loop spent waiting for the next batch",
                                 ("stage",)),
    "step_ray_gpu_memory_bytes": ("gauge", "CUDA memory of a training worker (allocated, reserved, peak)",
                                  ("stage", "rank", "kind")),
    "step_ray_mining_queries": ("counter", "Triplet-mining queries answered", ()),
    "step_ray_mining_progress": ("gauge", "Fraction of the triplet-mining queries answered in the current run", ()),
    "step_ray_style_images": ("counter", "Images whose style descriptors were computed", ("split",)),
}

_lock = threading.Lock()
_instances: dict[str, Any] = {}
_gauge_values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}  # last value of each gauge series
_keepalive: threading.Thread | None = None
_mining_done = 0


def exported_name(name: str) -> str:
    """The name Prometheus sees for one of METRICS (`ray_` + name)."""
    return PREFIX + name


def _ray_ready() -> bool:
    try:
        import ray

        return ray.is_initialized()
    except Exception:  # pragma: no cover - ray is a dependency, but recording must never fail a job
        return False


def _metric(name: str):
    """The process's one instance of a metric (created on first use, in the recording process)."""
    with _lock:
        m = _instances.get(name)
        if m is None:
            from ray.util import metrics as rm

            kind, description, tags = METRICS[name]
            cls = {"gauge": rm.Gauge, "counter": rm.Counter}[kind]
            m = _instances[name] = cls(name, description=description, tag_keys=tags)
        return m


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _set(name: str, value: Any, **tags: str) -> None:
    v = _finite(value)
    if v is None:
        return
    tags = {k: str(t) for k, t in tags.items()}
    _metric(name).set(v, tags=tags)
    with _lock:
        _gauge_values[(name, tuple(sorted(tags.items())))] = v
    _ensure_keepalive()


def _report_interval_s() -> float:
    try:
        import ray

        return max(1.0, ray._config.metrics_report_interval_ms() / 1000.0)
    except Exception:
        return 10.0


def _ensure_keepalive() -> None:
    """Ray (2.60) exports a gauge value once and drops it after two report intervals unless it is set
    again, so a value set once per epoch would vanish from Prometheus between epochs. A daemon thread
    re-sets this process's last values every half interval; they go when the process does."""
    global _keepalive
    with _lock:
        if _keepalive is not None and _keepalive.is_alive():
            return
        _keepalive = threading.Thread(target=_refresh_forever, name="step_ray-metrics", daemon=True)
        _keepalive.start()


def _refresh_forever() -> None:
    period = _report_interval_s() / 2
    while True:
        time.sleep(period)
        with _lock:
            values = list(_gauge_values.items())
        for (name, tags), value in values:
            try:
                _metric(name).set(value, tags=dict(tags))
            except Exception:  # e.g. Ray shut down in this process
                pass


def _safely(fn):
    def wrapper(*args, **kwargs):
        if not _ray_ready():
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # metrics are advisory: never break a training or mining loop
            log.warning("step_ray metrics: %s failed: %s", fn.__name__, exc)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def gpu_memory() -> dict[str, int]:
    """This process's CUDA memory on its current device (empty without CUDA)."""
    try:
        import torch

        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return {}
        return {
            "allocated": int(torch.cuda.memory_allocated()),
            "reserved": int(torch.cuda.memory_reserved()),
            "peak": int(torch.cuda.max_memory_allocated()),
        }
    except Exception:
        return {}


@_safely
def record_epoch(stage: str, metrics: Mapping[str, Any], rank: int = 0) -> None:
    """Map one epoch's reported metrics onto the step_ray gauges.

    Rates are already global (world × local) in the reported dicts, so throughput, losses and validation
    metrics are recorded by rank 0 only; GPU memory is per worker and recorded by every rank.
    """
    for kind, value in gpu_memory().items():
        _set("step_ray_gpu_memory_bytes", value, stage=stage, rank=str(rank), kind=kind)
    if rank != 0:
        return
    _set("step_ray_images_per_second", metrics.get("images_per_s"), stage=stage)
    _set("step_ray_triplets_per_second", metrics.get("triplets_per_s"), stage=stage)
    _set("step_ray_epoch_seconds", metrics.get("epoch_seconds"), stage=stage)
    _set("step_ray_data_wait_share", metrics.get("data_wait_share"), stage=stage)
    if _finite(metrics.get("epoch")) is not None:
        _set("step_ray_epoch", metrics["epoch"] + 1, stage=stage)  # epochs finished
    _set("step_ray_step", metrics.get("step"), stage=stage)
    for key, value in metrics.items():
        if key == "train_active_fraction":
            _set("step_ray_active_fraction", value, stage=stage)
        elif key.startswith("train_"):
            _set("step_ray_loss", value, stage=stage, term=key[len("train_"):])
        elif key.startswith("val_"):
            _set("step_ray_validation", value, stage=stage, metric=key)


@_safely
def record_mining_progress(done: int, total: int) -> None:
    """Queries answered so far in this mining run (`done` of `total`): a counter and a progress gauge."""
    global _mining_done
    with _lock:
        delta = done - _mining_done if done >= _mining_done else done  # a smaller `done`: a new run began
        _mining_done = done
    if delta > 0:
        _metric("step_ray_mining_queries").inc(float(delta))
    if total > 0:
        _set("step_ray_mining_progress", min(1.0, done / total))


@_safely
def record_style_images(count: int, split: str = "") -> None:
    """`count` more images had their style descriptors computed."""
    if count > 0:
        _metric("step_ray_style_images").inc(float(count), tags={"split": split or "all"})


__all__ = ["METRICS", "exported_name", "record_epoch", "record_mining_progress", "record_style_images", "gpu_memory"]
