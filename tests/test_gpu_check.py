"""tools/gpu/check.py, the GPU check, run on the CPU: its dry run (the same parts, jobs and benchmarks at tiny
sizes) writes both tables with a row per part and finite numbers and copies them to $OUT; a part past its cap
is ended with every process it started; and the bundle's shell helpers (tools/gpu/bundle.sh, sourced by
tools/gpu/check.sh) stage, check and unpack parts as the device machine will."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECK = [sys.executable, "tools/gpu/check.py", "--dry-run"]
VARIANTS = ("ours_v4", "bicycle_v0")


def _finite(value, positive: bool = False) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value > 0 or not positive))


def _session_alive(sid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


def _dry_run(tmp_path: Path, env: dict, *args: str, timeout: float) -> dict:
    cmd = [*CHECK, "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "tables"), "--tag", "dry", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads((tmp_path / "tables" / "dry.json").read_text())


def _failed(report: dict) -> str:
    return "\n\n".join(f"{p['part']}: {p['status']} after {p['wall_s']} s (cap {p['cap_s']} s); the log's end:\n"
                       + "\n".join(p.get("log_tail") or []) for p in report["parts"] if p["status"] != "ok")


def test_bundle_parts_are_staged_checked_and_unpacked(tmp_path):
    """gpu_bundle_stage / gpu_bundle_unpack (sourced by check.sh) on a small fake bundle: parts from two
    carried folders are joined, their sha256 checked, and a missing part refused."""
    src = tmp_path / "src"
    (src / "gpu_site" / "pkg").mkdir(parents=True)
    (src / "gpu_site" / "pkg" / "__init__.py").write_text("X = 1\n")
    (src / "outer" / "facades" / "train").mkdir(parents=True)
    with tarfile.open(src / "outer" / "gpu_site.tar.xz", "w:xz") as t:
        t.add(src / "gpu_site", "gpu_site")
    with tarfile.open(src / "bundle.tar", "w") as t:
        for name in ("gpu_site.tar.xz", "facades"):
            t.add(src / "outer" / name, name)
    repo = tmp_path / "repo"
    script = (f"set -u; source {REPO}/tools/gpu/bundle.sh; cd {src} && split -n 2 -d -a 2 bundle.tar bundle.part. && "
              f"sha256sum bundle.part.* > bundle.sha256 && mkdir -p {repo}/.gpu_run1 {repo}/.gpu_run2 && "
              f"mv bundle.part.00 {repo}/.gpu_run1/ && mv bundle.part.01 {repo}/.gpu_run2/ && "
              f"cp bundle.sha256 {repo}/.gpu_run1/ && cp bundle.sha256 {repo}/.gpu_run2/ && cd {repo} && ")
    bundle = tmp_path / "bundle"
    run = subprocess.run(["bash", "-c", script + f"rm -r .gpu_run2 && gpu_bundle_stage .gpu_run {bundle} && "
                          f"gpu_bundle_unpack {bundle} 'again'; echo rc=$?"], capture_output=True, text=True)
    assert "rc=3" in run.stdout and "run every 'again' call again" in run.stderr, run  # one part missing
    run = subprocess.run(
        [
            "bash",
            "-c",
            script + f"gpu_bundle_stage .gpu_run {bundle} && gpu_bundle_unpack {bundle} x && "
            f"gpu_bundle_unpack {bundle} x && PYTHON={sys.executable} gpu_bundle_site {bundle} 'import pkg' && "
            f"python3 -c 'import pkg; print(\"X\", pkg.X)'",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run
    assert "X 1" in run.stdout and (bundle / ".unpacked").is_file() and (bundle / "facades" / "train").is_dir()
    assert not list(bundle.glob("bundle.part.*"))


def test_a_part_past_its_cap_is_ended_with_its_children(tmp_path, facades_root):
    """memory.py runs each measurement in a child process; cut at its cap, the part's whole session ends (the
    child too) and the cap holds."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    report = _dry_run(tmp_path, env, "--parts", "memory", "--data-root", str(facades_root), "--cap", "memory=16",
                      timeout=240)
    (part,) = report["parts"]
    assert part["part"] == "memory" and part["status"] == "timeout" and part["returncode"] is None
    assert part["wall_s"] < part["cap_s"] + 6  # the cap holds, ending included
    assert not _session_alive(part["session"])  # nothing of the part is left running
    assert report["speed"]["memory"]["status"] == "timeout"


@pytest.mark.slow
def test_stage_check_dry_run(ray_session, facades_root, tmp_path):
    out = tmp_path / "OUT"
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "OUT": str(out),
           "OMP_NUM_THREADS": "1"}
    # the run caps itself at 420 s (+ ~15 s); pytest stops a test at 480 s (pyproject.toml)
    report = _dry_run(tmp_path, env, "--parts", "stage1", *VARIANTS, "--data-root", str(facades_root),
                      "--budget-s", "420", timeout=465)
    assert report["dry_run"] is True and report["date"].startswith(time.strftime("%Y-"))
    assert [p["part"] for p in report["parts"]] == ["stage1", *VARIANTS]
    assert all(p["status"] == "ok" for p in report["parts"]), _failed(report)
    assert all(_finite(p["wall_s"], positive=True) and not p["leftover_killed"] for p in report["parts"])
    assert report["total_wall_s"] < report["settings"]["budget_s"] + 15
    s = report["settings"]
    assert (s["image_size"], s["stage1_epochs"], s["stage2_epochs"], s["stage3_epochs"]) == (32, 1, 1, 1)
    assert (s["train_images_used"], s["val_images_used"]) == (16, 8)
    m = report["machine"]
    assert m["torch"] and m["cpus"] >= 1 and m["gpu"] is None

    st = report["stage1"]
    assert st["epochs"] == 1 and Path(st["checkpoint"]).is_dir()
    for key in ("val_triplet_acc", "val_rank_corr", "images_per_s", "style_stats_s", "mining_s"):
        assert _finite(st[key]), (key, st)
    assert 0 <= st["val_triplet_acc"] <= 1 and -1 <= st["val_rank_corr"] <= 1

    rows = {v["variant"]: v for v in report["variants"]}
    assert list(rows) == list(VARIANTS)
    assert rows["ours_v4"]["encoder"] == "stage 1" and set(rows["ours_v4"]["stages"]) == {"stage2", "stage3"}
    assert rows["bicycle_v0"]["encoder"] == "scratch" and set(rows["bicycle_v0"]["stages"]) == {"joint"}
    assert rows["bicycle_v0"]["reconstruction"].startswith("L1")
    for name, v in rows.items():
        assert v["status"] == "ok" and v["epochs"] == 2 and v["images_seen"] == v["images_planned"] == 32, v
        for key in ("psnr", "lpips", "diversity_refs", "diversity_mapper", "images_per_s", "train_s"):
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


@pytest.mark.slow
def test_speed_check_dry_run(facades_root, tmp_path):
    out = tmp_path / "OUT"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(OUT=str(out), OMP_NUM_THREADS="1")
    report = _dry_run(tmp_path, env, "--parts", "style_stats", "mining", "generator_step", "memory",
                      "--data-root", str(facades_root), "--budget-s", "420", timeout=465)
    parts = ["style_stats", "mining", "generator_step", "memory"]
    assert [p["part"] for p in report["parts"]] == parts
    assert all(p["status"] == "ok" for p in report["parts"]), _failed(report)
    for p in report["parts"]:  # every part's processes (a Ray instance's too) ended with it
        assert p["wall_s"] < p["cap_s"] and not p["leftover_killed"], p
    speed = {name: report["speed"][name]["figures"] for name in parts}

    (ray_run,) = speed["style_stats"]["runs"]["ray x1"]
    assert ray_run["images"] == 16 and ray_run["device"] == "cpu"
    assert _finite(ray_run["images_per_second_pipeline"], True) and _finite(
        ray_run["images_per_second_end_to_end"], True
    )
    assert "gpu" not in speed["style_stats"]["runs"]  # no GPU here

    mi = speed["mining"]
    assert mi["n"] == 128 and mi["index"] == "flat" and mi["gpu"] is False
    assert 0 <= mi["close_recall"] <= 1 and 0 <= mi["far_precision"] <= 1
    assert _finite(mi["timing"]["mining_s"], True) and _finite(mi["timing"]["speedup"], True)
    assert mi["reduction"]["residual"] and mi["reduction"]["sketch"] == 1024  # the default layout, narrower

    runs = speed["generator_step"]["summary"]
    assert set(runs) == {"ours_v4 fp32", "ours_v4 bf16", "bicycle_v0 fp32", "bicycle_v0 bf16"}, runs
    assert all(_finite(x["images_per_s"], True) and _finite(x["images_per_s_with_data"], True) for x in runs.values())
    profiles = speed["generator_step"]["profiles"]
    assert set(profiles) == set(runs) and all(v >= 0 for p in profiles.values() for v in p["parts_ms"].values())
    assert speed["generator_step"]["settings"]["image_size"] == 32 and speed["generator_step"]["settings"]["steps"] == 1

    rows = speed["memory"]["rows"]
    assert {(row["size"], row["mode"], row["batch"]) for row in rows} == {(64, "plain", 1), (64, "bf16", 1)}
    assert all(
        not row.get("oom") and _finite(row["peak_mib"], True) and _finite(row["images_per_s"], True) for row in rows
    )

    md = (tmp_path / "tables" / "dry.md").read_text()
    assert "DRY RUN" in md and all(f"| {name} | ok |" in md for name in parts)
    assert "| mining | n 128, index flat: close recall" in md and "ours_v4 bf16:" in md
    assert sorted(p.name for p in out.iterdir()) == ["dry.json", "dry.md", "dry_logs.txt"]
