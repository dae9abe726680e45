"""benchmarks/gpu.py, the GPU run of issue 22: its dry run (every part, the same scripts and flags, on the CPU
at tiny sizes, ~2.5 min and ~190 CPU-seconds on an idle 2-core machine) runs every part to the end with finite
numbers, writes both tables and copies them to $OUT; and the bundle's shared shell helpers stage, check and
unpack parts as the device machine will."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = ["style_stats", "descriptor_precision", "mining", "knn_torch", "stage1", "generator", "memory"]


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_bundle_parts_are_staged_checked_and_unpacked(tmp_path):
    """gpu_bundle_stage / gpu_bundle_unpack (sourced by gpu.sh and gpu_step.sh) on a small fake bundle:
    parts from two carried folders are joined, their sha256 checked, and a damaged part refused."""
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
    script = (f"set -u; source {REPO}/benchmarks/gpu_bundle.sh; cd {src} && split -n 2 -d -a 2 bundle.tar bundle.part. && "
              f"sha256sum bundle.part.* > bundle.sha256 && mkdir -p {repo}/.gpu_run1 {repo}/.gpu_run2 && "
              f"mv bundle.part.00 {repo}/.gpu_run1/ && mv bundle.part.01 {repo}/.gpu_run2/ && "
              f"cp bundle.sha256 {repo}/.gpu_run1/ && cp bundle.sha256 {repo}/.gpu_run2/ && cd {repo} && ")
    bundle = tmp_path / "bundle"
    run = subprocess.run(["bash", "-c", script + f"rm -r .gpu_run2 && gpu_bundle_stage .gpu_run {bundle} && "
                          f"gpu_bundle_unpack {bundle} 'again'; echo rc=$?"], capture_output=True, text=True)
    assert "rc=3" in run.stdout and "run every 'again' call again" in run.stderr, run  # one part missing
    run = subprocess.run(["bash", "-c", script + f"gpu_bundle_stage .gpu_run {bundle} && gpu_bundle_unpack {bundle} x && "
                          f"gpu_bundle_unpack {bundle} x && PYTHON={sys.executable} gpu_bundle_site {bundle} 'import pkg' && "
                          f"python3 -c 'import pkg; print(\"X\", pkg.X)'"], capture_output=True, text=True)
    assert run.returncode == 0, run
    assert "X 1" in run.stdout and (bundle / ".unpacked").is_file() and (bundle / "facades" / "train").is_dir()
    assert not list(bundle.glob("bundle.part.*"))


@pytest.mark.slow
@pytest.mark.timeout(700)  # the dry run's budget is 600 s (~150 s on an idle 2-core machine)
def test_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "OUT"
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--dry-run", "--work-dir", str(tmp_path / "work"),
           "--out-dir", str(tmp_path / "tables"), "--tag", "dry"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=660)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    report = json.loads((tmp_path / "tables" / "dry.json").read_text())
    assert report["dry_run"] is True and report["date"] == report["started_utc"][:10]
    assert report["settings"]["device"] == "cpu" and report["total_wall_s"] < report["settings"]["budget_s"] + 15
    status = {p["part"]: p["status"] for p in report["parts"]}
    assert list(status) == PARTS
    # every part, the generator too, to the end: a part cut at its cap or failed shows its log's end here
    failed = "\n\n".join(f"{p['part']}: {p['status']} after {p['wall_s']} s (cap {p['cap_s']} s), CPU {p.get('cpu_s')} s, "
                          f"load {p.get('load_before')} -> {p.get('load_after')}; the log's end:\n" + "\n".join(p.get("log_tail") or [])
                          for p in report["parts"] if p["status"] != "ok")
    assert all(s == "ok" for s in status.values()), failed
    for p in report["parts"]:
        assert _finite(p["cpu_s"]) and p["wall_s"] < p["cap_s"] and len(p["load_before"]) == 3, p
        assert p["ray_instances_at_once"] <= 1 and not p.get("leftover_killed"), p  # one Ray at a time, none left over
    ray = {p["part"]: p["ray_instances"] for p in report["parts"]}
    assert ray["style_stats"] >= 1 and ray["mining"] >= 2 and ray["stage1"] == 1 and ray["memory"] == 0, ray  # seen
    r = report["results"]
    for name in PARTS:
        assert "read_error" not in r[name], (name, r[name])

    st = r["style_stats"]["cpu_32px"]
    assert st["images"] == 16 and _finite(st["images_per_s_pipeline"]) and _finite(st["images_per_s_end_to_end"])
    assert r["style_stats"]["gpu_fp32"] is None  # no GPU here

    dp = r["descriptor_precision"]
    assert dp["images"] == 16 and dp["device"] == "cpu"
    for p in ("fp32", "bf16"):
        assert _finite(dp[p]["images_per_s"]), dp
    assert 0 <= dp["bf16"]["recall@5"] <= 1 and 0 <= dp["bf16"]["far_precision@13"] <= 1
    assert dp["fp32"]["recall@5"] == 1.0  # the warm fp32 pass is the reference

    mi = r["mining"]
    assert [(lv["n"], lv["stand_in"]) for lv in mi["levels"]] == [(64, False), (1370, True)]
    for lv in mi["levels"]:
        assert {(run["index"], run["shards"]) for run in lv["runs"]} >= {("flat", 1), ("flat", 2)}
        assert all(_finite(run["seconds"]) for run in lv["runs"]), lv
    assert any(run["index"] == "ivf" for run in mi["levels"][-1]["runs"])
    assert mi["faiss_gpus"] == 0 and mi["backend"] == "faiss (CPU)"

    kn = r["knn_torch"]
    assert kn["device"] == "cpu" and [lv["n"] for lv in kn["levels"]] == [1370]
    assert all(_finite(lv["seconds"]) and _finite(lv["tflops"]) for lv in kn["levels"])
    assert kn["faiss_check"]["faiss_gpus"] == 0 and "error" not in kn["faiss_check"]

    s1 = r["stage1"]
    assert s1["workers"] == 1 and s1["device"] == "cpu" and _finite(s1["triplets_per_s"]) and _finite(s1["images_per_s"])
    assert _finite(s1["epoch_seconds"]) and _finite(s1["wall_seconds"])

    g = r["generator"]
    runs = g["runs"]
    assert set(runs) == {"ours_v4 fp32", "ours_v4 bf16", "bicycle_v0 fp32", "bicycle_v0 bf16"}, runs
    for key, x in runs.items():
        assert _finite(x["images_per_s"]) and _finite(x["images_per_s_with_data"]), (key, x)
        assert x["parts_ms"] and all(v is not None and v >= 0 for v in x["parts_ms"].values()), (key, x)  # the profile
    assert g["args"]["image_size"] == 32 and g["args"]["steps"] == 1 and g["args"]["rounds"] == 1

    rows = r["memory"]["rows"]
    assert {(row["size"], row["mode"], row["batch"]) for row in rows} == {(64, "plain", 1), (64, "bf16", 1)}
    assert all(not row.get("oom") and _finite(row["peak_mib"]) and _finite(row["images_per_s"]) for row in rows), rows

    md = (tmp_path / "tables" / "dry.md").read_text()
    assert "DRY RUN" in md and all(f"| {name} | ok |" in md for name in PARTS)
    assert "| ours_v4 bf16 |" in md and "| bicycle_v0 fp32 |" in md
    assert f"| {mi['levels'][-1]['n']} | stand-in | flat | 2 |" in md
    assert sorted(p.name for p in out.iterdir()) == ["dry.json", "dry.md", "dry_logs.txt"]
