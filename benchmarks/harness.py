"""What the benchmarks here share: timed rounds, alternating sides, the machine, one JSON record.

Run a benchmark as `python benchmarks/<name>.py` (its folder is then first on the path, so `import harness`
finds this file). Every benchmark writes one record with `--json PATH`:

    {"command": "python benchmarks/X.py ...", "date": "...", "machine": {...}, "figures": {...}}

`machine()` is read when the record is made, so its load average is the end of the run's; a benchmark that
compares sides also records the load average around each run (`load()`).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable


def load() -> list[float]:
    """The 1, 5 and 15 minute load averages."""
    return [round(v, 2) for v in os.getloadavg()]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU model and count, load average, torch's version and threads, the GPU (None without one), Python."""
    import torch

    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "load_average": load(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda, "gpu": gpu,
            "python": platform.python_version(), "platform": platform.platform()}


def timed(
    fn: Callable[[], Any], rounds: int = 3, warmup: int = 1, sync: Callable[[], Any] | None = None
) -> list[float]:
    """Seconds of each of `rounds` calls of fn after `warmup` untimed ones (`sync`, e.g.
    torch.cuda.synchronize, runs before each clock reading)."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(rounds):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return out


def order(sides: list[str], rounds: int) -> list[str]:
    """The sides in turn, reversed every other round (A B, B A, A B, ...): neither always runs first."""
    out = []
    for r in range(rounds):
        out += sides if r % 2 == 0 else sides[::-1]
    return out


def alternate(sides: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[Any]]:
    """Each side's results over `rounds` rounds, the sides run in `order`."""
    results: dict[str, list[Any]] = {name: [] for name in sides}
    for name in order(list(sides), rounds):
        results[name].append(sides[name]())
    return results


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Round by round: each ratio is of two runs made under the same load."""
    return [a / b for a, b in zip(numerators, denominators)]


def record(figures: dict[str, Any], argv: list[str] | None = None) -> dict[str, Any]:
    """The one record format: command line, date, machine, figures."""
    args = sys.argv if argv is None else argv
    return {"command": "python " + " ".join(shlex.quote(a) for a in args),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(), "figures": figures}


def write(path: str, rec: dict[str, Any]) -> None:
    """The record to `path` (nothing when empty), folders made."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rec, indent=1, default=str) + "\n")
    print(f"wrote {path}", flush=True)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {load()[0]:.1f}] {message}", flush=True)

