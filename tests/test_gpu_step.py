"""benchmarks/gpu_step.py, the GPU check of issue 21: its dry run (the same parts and jobs on the CPU, 32 px,
a 16/8-image copy of facades) writes both tables with a row per part and per variant and finite numbers,
and copies them to $OUT; a part that reaches its cap is killed with its whole process group."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("ours_v4", "bicycle_v0", "munitp_v3")


def _gpu_step():
    spec = importlib.util.spec_from_file_location("gpu_step", REPO / "benchmarks" / "gpu_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def test_a_part_past_its_cap_is_killed_with_its_children(tmp_path):
    gpu_step = _gpu_step()
    child = tmp_path / "child.pid"
    # the part starts a grandchild that would outlive a plain kill of the part's own process
    script = f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); open({str(child)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    started = time.perf_counter()
    part = gpu_step.run_part("sleeper", [sys.executable, "-c", script], tmp_path / "sleeper.log", cap_s=gpu_step.KILL_GRACE_S + 3,
                             env=dict(os.environ))
    assert part["status"] == "timeout" and part["returncode"] is None
    assert time.perf_counter() - started < gpu_step.KILL_GRACE_S + 6  # the cap holds, ending included
    pid = int(child.read_text())
    for _ in range(50):  # the grandchild got the group's signal
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        try:  # reaped by nobody (its parent is gone): a zombie counts as ended
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {pid} of the killed part is still running")
    assert gpu_step.run_part("late", [sys.executable, "-c", "pass"], tmp_path / "late.log", cap_s=0.5, env={})["status"] == "skipped"


@pytest.mark.slow
def test_dry_run_writes_the_tables(ray_session, facades_root, tmp_path):
    out = tmp_path / "OUT"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "OUT": str(out),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu_step.py"), "--dry-run", "--data-root", str(facades_root),
           "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "tables"), "--tag", "dry"]
    # the dry run caps itself at 420 s (+ ~15 s); pytest stops a test at 480 s (pyproject.toml)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=465)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    report = json.loads((tmp_path / "tables" / "dry.json").read_text())
    assert report["dry_run"] is True and report["date"] == report["started_utc"][:10]
    assert [p["part"] for p in report["parts"]] == ["stage1", *VARIANTS]
    assert all(p["status"] == "ok" for p in report["parts"]), report["parts"]
    assert all(_finite(p["wall_s"]) and p["wall_s"] > 0 for p in report["parts"])
    assert report["total_wall_s"] < report["settings"]["budget_s"] + 15
    s = report["settings"]
    assert (s["image_size"], s["stage1_epochs"], s["stage2_epochs"], s["stage3_epochs"]) == (32, 1, 1, 1)
    assert (s["train_images_used"], s["val_images_used"], s["images_per_variant"]) == (16, 8, 32)
    m = report["machine"]
    assert m["torch"] and m["cpus"] >= 1 and "gpu" in m  # None on this CPU machine

    st = report["stage1"]
    assert st["epochs"] == 1 and Path(st["checkpoint"]).is_dir()
    for key in ("val_triplet_acc", "val_rank_corr", "images_per_s", "style_stats_s", "mining_s"):
        assert _finite(st[key]), (key, st)
    assert 0 <= st["val_triplet_acc"] <= 1 and -1 <= st["val_rank_corr"] <= 1

    rows = {v["variant"]: v for v in report["variants"]}
    assert list(rows) == list(VARIANTS)
    assert rows["ours_v4"]["encoder"] == "stage 1" and set(rows["ours_v4"]["stages"]) == {"stage2", "stage3"}
    for name in ("bicycle_v0", "munitp_v3"):
        assert rows[name]["encoder"] == "scratch" and set(rows[name]["stages"]) == {"joint"}
    assert rows["bicycle_v0"]["reconstruction"].startswith("L1")
    for name, v in rows.items():
        assert v["status"] == "ok" and v["epochs"] == 2 and v["images_seen"] == v["images_planned"] == 32, v
        for key in ("psnr", "lpips", "diversity_refs", "diversity_mapper", "images_per_s", "train_s", "wall_s"):
            assert _finite(v[key]), (name, key, v.get(key))
        assert 0 < v["psnr"] < 60 and 0 <= v["lpips"] <= 2 and v["images_per_s"] > 0

    md = (tmp_path / "tables" / "dry.md").read_text()
    assert "DRY RUN" in md and "| stage1 | ok |" in md
    for name, v in rows.items():
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {name} | {v['encoder']} |"))
        assert f"| {v['psnr']:.2f} |" in line and f"| {v['lpips']:.3f} |" in line, line
    assert "| Ours | v4 | pre-trained |" in md  # the project's ablation table, embedded
    assert sorted(p.name for p in out.iterdir()) == ["dry.json", "dry.md", "dry_logs.txt"]
    assert json.loads((out / "dry.json").read_text())["variants"][0]["variant"] == "ours_v4"
