"""The main job and one generator stage at a given dataset size: seconds, sampled peak memory of every
process, disk written and the quality figures, step by step.

    python benchmarks/scale.py --n 137000 --json benchmarks/results/scale/n137000.json
    python benchmarks/scale.py --n 2000 --json /tmp/n2000.json --stage1-steps 50 --generator-steps 20

The steps, as `jobs/pretrain.py --config configs/scale.yaml` and `jobs/train_generator.py` run them, on the
synthetic set (shared-palette design, 32 px, `--n` training and 400 validation images; generated first,
untimed, or reused): style statistics, triplet mining, the exact validation distances, stage 1 for each
encoder of `--encoders` with a step budget (the job itself, style and mining then found in its cache), and
stage 2 of the generator from the first encoder's checkpoint with a step budget.

Memory is sampled, not estimated: every `--interval` seconds a thread reads the resident set (RSS) and its
private part (RSS less the pages shared with other processes: Ray's object store, the image cache) of this
process ("driver") and of every process it started (the Ray system and its workers, by process title:
`ray::MapWorker(MapBatches(StyleDescriptorModel))`, `ray::RayTrainWorker`, ...). A step's `peak_rss_mb`
per process kind is the largest RSS seen of one process of that kind during the step. Disk: bytes written
to the block devices during the step (everything: outputs, spilled objects, temporary files) and the growth
of the work folder.

Quality: mining's close-set recall and far-set precision on `--recall-anchors` random anchors against an
exhaustive search of the same stored descriptors (the distance the sketch estimates; the mined far set is
ranked without the sketch), and each stage's validation metrics (stage 1: held-out triplet order and k-NN
style accuracy; the generator: validation PSNR).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

import harness

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "scale.yaml"


def process_kind(proc: psutil.Process, driver: int) -> str | None:
    """What a process is, from its title: the driver, a Ray worker (by what it runs) or a Ray system process."""
    if proc.pid == driver:
        return "driver"
    try:
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    if not cmd:
        return None
    title = cmd[0]
    if title.startswith("ray::"):
        name = title[5:].split(" ")[0]
        # "RayTrainWorker.train_func" and "RayTrainWorker" are one kind: the actor, not the method it runs
        return "ray::" + (name.split(".")[0] if "(" not in name else name)
    exe = os.path.basename(title)
    if exe in ("raylet", "gcs_server"):
        return exe
    if any("moto" in os.path.basename(c) for c in cmd[:3]):
        return "s3 server (moto)"
    scripts = [os.path.basename(c) for c in cmd[1:] if c.endswith(".py")]
    return f"ray system: {scripts[0] if scripts else exe}"


def start_s3_server(work: str) -> subprocess.Popen:
    """A local S3-compatible server (moto, as the tests use) in its own process on 127.0.0.1 (the caller
    stops it). The AWS variables are set before Ray starts, so every Ray worker reaches it too."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = open(os.path.join(work, "moto.log"), "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                              stderr=log)
    url = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1")
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return server
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the S3 server did not start on {url} (see {log.name})")


def start_cluster(nodes: int):
    """A real Ray cluster of `nodes` raylets of 1 CPU each on 127.0.0.1 (ray.cluster_utils.Cluster, as the
    multi-node tests use), this driver connected; local paths declared shared (they are: one machine)."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from step_ray.cluster import SHARED_STORAGE_ENV

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False  # everything on 127.0.0.1 (step_ray.cluster's single-node switch)
    os.environ[SHARED_STORAGE_ENV] = "1"
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, node_ip_address="127.0.0.1",
                                                                include_dashboard=False))
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=True)
    return cluster


def upload_folder(folder: str, bucket: str, prefix: str, threads: int = 8) -> int:
    """Every file under `folder` to s3://bucket/prefix/..., in parallel; the number of files."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    client.create_bucket(Bucket=bucket)
    files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]

    def put(path: str) -> None:
        with open(path, "rb") as handle:
            client.put_object(Bucket=bucket, Key=f"{prefix}/{os.path.relpath(path, folder)}", Body=handle.read())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, files))
    return len(files)


class MemorySampler:
    """Samples every process of the tree under this one; `mark(step)` starts a step's record."""

    def __init__(self, interval: float, per_node: bool = False):
        self.interval, self.driver, self.per_node = interval, os.getpid(), per_node
        self.lock = threading.Lock()
        self.step: str | None = None
        self.rss: dict[str, float] = {}
        self.private: dict[str, float] = {}
        self.total = self.used = 0.0  # the sum of RSS (shared pages counted in each) and the machine's used memory
        self.samples = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def mark(self, step: str | None) -> dict:
        """Ends the current step's record (returned) and starts one for `step`."""
        with self.lock:
            record = {
                "peak_rss_mb": dict(sorted(self.rss.items())),
                "peak_private_mb": dict(sorted(self.private.items())),
                "peak_total_rss_mb": round(self.total, 1),
                "peak_machine_used_mb": round(self.used, 1),
                "memory_samples": self.samples,
            }
            self.step, self.rss, self.private, self.total, self.used, self.samples = step, {}, {}, 0.0, 0.0, 0
        return record

    def _sample(self) -> None:
        root = psutil.Process(self.driver)
        rss, private, total = {}, {}, 0.0
        procs = [root, *root.children(recursive=True)]
        raylets = sorted(p.pid for p in procs if process_kind(p, self.driver) == "raylet")
        for proc in procs:
            kind = process_kind(proc, self.driver)
            if kind is None:
                continue
            if self.per_node and kind.startswith("ray::"):
                # which node's raylet started it: "each node does its share", seen per process
                try:
                    node = next((raylets.index(p.pid) for p in proc.parents() if p.pid in raylets), None)
                except psutil.Error:
                    node = None
                kind += f" @node{node + 1}" if node is not None else ""
            try:
                mem = proc.memory_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            mb, own = mem.rss / 2**20, (mem.rss - mem.shared) / 2**20
            rss[kind] = max(rss.get(kind, 0.0), mb)
            private[kind] = max(private.get(kind, 0.0), own)
            total += mb
        with self.lock:
            if self.step is None:
                return
            for kind, mb in rss.items():
                self.rss[kind] = round(max(self.rss.get(kind, 0.0), mb), 1)
                self.private[kind] = round(max(self.private.get(kind, 0.0), private[kind]), 1)
            self.total = max(self.total, total)
            # what the kernel holds for everyone: private pages once, shared ones (/dev/shm: Ray's object
            # store) once, page cache excluded
            vm = psutil.virtual_memory()
            self.used = max(self.used, (vm.total - vm.available) / 2**20)
            self.samples += 1

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self._sample()
            except psutil.Error:
                pass

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def folder_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class StepRecorder:
    """Times a step and collects its memory, disk and quality figures into the report (written after
    every step, so a run stopped half-way keeps what it measured)."""

    def __init__(self, sampler: MemorySampler, work: str, report: dict, out: str):
        self.sampler, self.work, self.report, self.out = sampler, work, report, out

    def run(self, name: str, fn, *args, **kwargs):
        print(f"[scale] {name} ...", flush=True)
        disk0, folder0 = psutil.disk_io_counters().write_bytes, folder_bytes(self.work)
        self.sampler.mark(name)
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
        record = {"seconds": round(seconds, 2), **self.sampler.mark(None),
                  "disk_written_mb": round((psutil.disk_io_counters().write_bytes - disk0) / 2**20, 1),
                  "work_folder_growth_mb": round((folder_bytes(self.work) - folder0) / 2**20, 1),
                  "load_average": [round(v, 2) for v in os.getloadavg()]}
        self.report["figures"]["steps"][name] = record
        self.save()
        peak = max(record["peak_rss_mb"].items(), key=lambda kv: kv[1], default=("-", 0))
        print(f"[scale] {name}: {seconds:.1f} s, largest process {peak[0]} {peak[1]:.0f} MB", flush=True)
        return value

    def quality(self, name: str, **figures) -> None:
        self.report["figures"]["steps"][name].setdefault("quality", {}).update(figures)
        self.save()

    def save(self) -> None:
        Path(self.out).parent.mkdir(parents=True, exist_ok=True)
        Path(self.out).write_text(json.dumps(self.report, indent=1))  # not harness.write: quietly, after every step


def exhaustive_truth(search: np.ndarray, sketch, rows: np.ndarray, k_close: int, k_far: int, residual: bool):
    """The k_close nearest and k_far furthest of each anchor row over all rows, by the sketch-estimated
    distance ‖y_a − y_b‖² + ρ_a + ρ_b − 2 s_a·s_b (without a sketch: the reduced distance)."""
    import torch

    n = len(search)
    y = torch.from_numpy(search[:, :-1] if residual else search)
    rho = torch.from_numpy(search[:, -1].astype(np.float64) ** 2).float() if residual else torch.zeros(n)
    a_sketch = torch.from_numpy(sketch[rows]) if sketch is not None else None
    dist = torch.empty(len(rows), n)
    for start in range(0, n, 8192):
        stop = min(n, start + 8192)
        d = torch.cdist(y[rows], y[start:stop]).square() + rho[rows, None] + rho[None, start:stop]
        if a_sketch is not None:
            d -= 2.0 * a_sketch @ torch.from_numpy(sketch[np.arange(start, stop)]).T
        dist[:, start:stop] = d
    dist[torch.arange(len(rows)), torch.from_numpy(rows)] = torch.nan
    close = torch.topk(torch.nan_to_num(dist, nan=torch.inf), k_close, largest=False).indices.numpy()
    far = torch.topk(torch.nan_to_num(dist, nan=-torch.inf), k_far, largest=True).indices.numpy()
    return close, far


def mining_recall(style_out: str, mine_out: str, anchors: int, seed: int, spill: str) -> dict:
    """Close recall and far precision of the mined sets on sampled anchors, against an exhaustive search
    of the same stored descriptors by the sketch-estimated distance ‖y_a − y_b‖² + ρ_a + ρ_b − 2 s_a·s_b."""
    from step_ray.mining import close_recall, far_precision, load_neighbours
    from step_ray.mining.job import _descriptor_layout, read_for_mining

    mined = load_neighbours(mine_out)
    residual, width = _descriptor_layout(style_out)
    ids, search, sketch = read_for_mining(style_out, "train", width, os.path.join(spill, "recall_sketch.f32"))
    if list(mined.image_ids) != ids:
        raise RuntimeError("mined rows and descriptor rows are not in the same order")
    rows = np.sort(np.random.default_rng(seed).choice(len(ids), min(anchors, len(ids)), replace=False))
    close, far = exhaustive_truth(search, sketch, rows, mined.k_close, mined.k_far, residual)
    return {"recall_anchors": int(len(rows)), "close_recall": round(close_recall(mined.close_ids[rows], close), 4),
            "far_precision": round(far_precision(mined.far_ids[rows], far), 4),
            "truth": "exhaustive search of the stored descriptors (sketch-estimated distance)"}


def nprobe_sweep(style_out: str, values: list[int], anchors: int, k_close: int, k_far: int, rerank_factor: int,
                 out: str) -> list[dict]:
    """IVF recall against exhaustive search for each nprobe (far_nprobe the same), on sampled anchors:
    the index built as mining builds it, the close candidates re-ranked by the sketch as mining does.

        python benchmarks/scale.py nprobe <style output folder> OUT.json 16 32 64 128
    """
    from step_ray.mining import MiningConfig, close_recall, far_precision
    from step_ray.mining.index import ShardIndex
    from step_ray.mining.job import _descriptor_layout, read_for_mining

    residual, width = _descriptor_layout(style_out)
    with tempfile.TemporaryDirectory() as spill:
        ids, search, sketch = read_for_mining(style_out, "train", width, os.path.join(spill, "s.f32"))
        rows = np.sort(np.random.default_rng(0).choice(len(ids), min(anchors, len(ids)), replace=False))
        true_close, true_far = exhaustive_truth(search, sketch, rows, k_close, k_far, residual)
        queries = search.copy()
        if residual:
            queries[:, -1] = 0.0
        results = []
        for nprobe in values:
            cfg = MiningConfig(
                k_close=k_close * rerank_factor, k_far=k_far, index="ivf", nprobe=nprobe, far_nprobe=nprobe
            )
            started = time.perf_counter()
            shard = ShardIndex(search, 0, cfg)
            build = time.perf_counter() - started
            started = time.perf_counter()
            candidates, _ = shard.search_close(queries[rows], rows, cfg.k_close)
            far, _ = shard.search_far(queries[rows], rows, k_far)
            per_query = (time.perf_counter() - started) / len(rows)
            # re-ranked by the sketch estimate, as mining's rerank_with_sketch does for every anchor
            close = []
            for anchor, cand in zip(rows, candidates):
                est = (
                    ((search[cand, :-1] - search[anchor, :-1]) ** 2).sum(1)
                    + search[cand, -1].astype(np.float64) ** 2
                    + float(search[anchor, -1]) ** 2
                )
                if sketch is not None:
                    est = est - 2.0 * sketch[cand] @ sketch[np.array([anchor])][0]
                close.append(cand[np.argsort(est, kind="stable")[:k_close]])
            close = np.array(close)
            results.append({"nprobe": nprobe, "nlist": int(shard.near.nlist), "build_seconds": round(build, 1),
                            "search_ms_per_query": round(per_query * 1e3, 2),
                            "close_recall": round(close_recall(close, true_close), 4),
                            "far_precision": round(far_precision(far, true_far), 4)})
            print(results[-1], flush=True)
    Path(out).write_text(json.dumps({"style_output": style_out, "n": len(ids), "anchors": len(rows), "k_close": k_close,
                                     "k_far": k_far, "runs": results}, indent=1))
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, required=True, help="training images")
    parser.add_argument("--json", default="", help="write the record (command, date, machine, figures) here")
    parser.add_argument("--data", default="", help="where the synthetic set is (generated there if absent); "
                        "default <work>/data")
    parser.add_argument("--work", default="", help="cache and runs; default a temporary folder, removed after")
    parser.add_argument("--encoders", nargs="+", default=["conv", "vgg_gram"])
    parser.add_argument("--stage1-steps", type=int, default=300)
    parser.add_argument("--generator-steps", type=int, default=100)
    parser.add_argument("--recall-anchors", type=int, default=500)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--s3", action="store_true", help="read the data set from a local S3 server (moto, started "
                        "here; the upload is not timed) instead of the local folder")
    parser.add_argument("--nodes", type=int, default=0, help="run on a Ray cluster of this many 1-CPU nodes on "
                        "this machine (ray.cluster_utils.Cluster) instead of one local Ray")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers of stage 1 and the generator")
    parser.add_argument("--steps", nargs="+", default=list(MEASURED), help="the steps to measure (style statistics "
                        "always runs: later steps read its output, from the cache when there); the others keep their "
                        "records in --json")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="another PretrainJobConfig override after configs/scale.yaml's; repeatable")
    args = parser.parse_args(argv)
    if not args.json:
        parser.error("--json is required: the record is written after every step")
    return args


MEASURED = ("style_statistics", "mining", "validation_distances", "stage1", "generator_stage2")


def prepare(args, work: str) -> tuple[object, list[str], dict | None, subprocess.Popen | None, float]:
    """The pretrain config, its overrides, the synthetic set (generated, untimed) and, with --s3, the set
    uploaded to a local S3 server and listed from there."""
    from step_ray.config import load_config
    from step_ray.data.synthetic import generate_synthetic
    from step_ray.pipelines.pretrain import PretrainJobConfig

    data_dir = args.data or os.path.join(work, "data")
    overrides = [f"data.synthetic_dir={data_dir}", f"data.synthetic.num_train={args.n}", f"cache_dir={work}/cache",
                 f"run.storage_path={work}/runs", f"train.max_steps={args.stage1_steps}",
                 f"run.num_workers={args.workers}", *args.set]
    cfg = load_config(PretrainJobConfig, CONFIG, overrides)
    started = time.perf_counter()
    generate_synthetic(data_dir, cfg.data.synthetic)
    generation_s = time.perf_counter() - started
    if not args.s3:
        return cfg, overrides, None, None, generation_s
    from step_ray.data.pix2pix import scan_folder

    server = start_s3_server(work)
    uploaded = upload_folder(data_dir, "scale", "data")
    overrides.append("data.root=s3://scale/data")
    cfg = load_config(PretrainJobConfig, CONFIG, overrides)
    t0 = time.perf_counter()
    listed = len(scan_folder("s3://scale/data", "train").files)
    listing = {"objects_uploaded": uploaded, "train_listed": listed, "list_seconds": round(time.perf_counter() - t0, 2)}
    return cfg, overrides, listing, server, generation_s


def measure_steps(args, cfg, overrides: list[str], rec: "StepRecorder", work: str) -> None:
    """The job's steps, each one measured that --steps names (the others run uncounted or from the cache)."""
    from step_ray.config import load_config
    from step_ray.pipelines.pretrain import PretrainJobConfig, mining_step, run_pretrain, stage1_inputs, style_step

    def measured(step: str) -> bool:
        return step in args.steps

    if measured("style_statistics"):
        style_out, data = rec.run("style_statistics", style_step, cfg)
        meta = json.loads(Path(style_out, "metadata.json").read_text())
        rec.quality("style_statistics", images=meta["summary"]["images"],
                    images_per_second=meta["summary"]["images_per_second"],
                    steady_images_per_second=meta["summary"]["steady_images_per_second"])
    else:
        style_out, data = style_step(cfg)
    mine_out = rec.run("mining", mining_step, cfg, style_out) if measured("mining") else mining_step(cfg, style_out)
    if measured("mining"):
        mined = json.loads(Path(mine_out, "metadata.json").read_text())
        with tempfile.TemporaryDirectory(dir=work) as spill:
            recall = mining_recall(style_out, mine_out, args.recall_anchors, 0, spill)
        rec.quality("mining", index=cfg.mining.resolved_index(args.n), nprobe=cfg.mining.nprobe,
                    read_seconds=mined["read_seconds"], mine_seconds=mined["mine_seconds"],
                    rerank_seconds=mined["rerank_seconds"], **recall)
    if measured("validation_distances"):
        rec.run("validation_distances", stage1_inputs, cfg, data, style_out, mine_out)
    checkpoints = {}
    for encoder in (args.encoders if measured("stage1") else []):
        enc_cfg = load_config(PretrainJobConfig, CONFIG, [*overrides, f"train.encoder.backbone={encoder}"])
        result = rec.run(f"stage1_{encoder}", run_pretrain, enc_cfg)
        checkpoints[encoder] = result.checkpoint
        metrics = result.stages[-1].metrics  # one epoch within the step budget: the last is the best
        rate = metrics.get("images_per_s")
        rec.quality(f"stage1_{encoder}", steps=args.stage1_steps, images_per_second=rate,
                    epoch_seconds_projected=round(3 * args.n / rate, 1) if rate else None,
                    **{k: metrics.get(k) for k in ("val_triplet_acc", "val_knn_acc", "val_rank_corr",
                                                    "untrained_val_triplet_acc", "untrained_val_knn_acc")})
    if args.generator_steps and measured("generator_stage2"):
        generator_step(args, data, checkpoints[args.encoders[0]], rec, work)


def generator_step(args, data, checkpoint: str, rec: "StepRecorder", work: str) -> None:
    from step_ray.pipelines.train_generator import GeneratorJobConfig, run_train_generator
    from step_ray.recipes.generator import GeneratorTraining

    gen_cfg = GeneratorJobConfig(
        encoder_checkpoint=checkpoint, data=data, stage2_epochs=1, stage3_epochs=0,
        train=GeneratorTraining(max_steps=args.generator_steps), train_mapper=False, evaluate=False,
        run=dataclasses.replace(GeneratorJobConfig().run, storage_path=f"{work}/runs", num_workers=args.workers))
    result = rec.run("generator_stage2", run_train_generator, gen_cfg)
    metrics = result.stages[-1].metrics
    rec.quality("generator_stage2", encoder=args.encoders[0], steps=args.generator_steps,
                images_per_second=metrics.get("images_per_s"), val_psnr=metrics.get("val_psnr"))


def main(argv=None) -> None:
    args = parse_args(argv)
    from step_ray.cluster import init_ray

    work = args.work or tempfile.mkdtemp(prefix="scale_")
    os.makedirs(work, exist_ok=True)
    started = time.perf_counter()
    cfg, overrides, listing, s3_server, generation_s = prepare(args, work)
    report = harness.record({
        "n": args.n, "image_size": cfg.data.image_size, "val_images": cfg.data.synthetic.num_val,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "data_root": cfg.data.root or args.data,
        "s3_listing": listing, "generation_seconds": round(generation_s, 1), "stage1_steps": args.stage1_steps,
        "generator_steps": args.generator_steps, "config": str(CONFIG.relative_to(CONFIG.parents[1])),
        "overrides": overrides, "steps": {}, "ray_nodes": args.nodes or 1, "train_workers": args.workers})
    keep_earlier(args, report)
    sampler = MemorySampler(args.interval, per_node=args.nodes > 1)
    rec = StepRecorder(sampler, work, report, args.json)
    cluster = None
    try:
        if args.nodes:
            cluster = rec.run("ray_start", start_cluster, args.nodes)
        else:
            rec.run("ray_start", init_ray)
        measure_steps(args, cfg, overrides, rec, work)
    finally:
        sampler.stop()
        if s3_server is not None:
            s3_server.terminate()
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.shutdown()
        report["figures"]["seconds"] = round(time.perf_counter() - started, 1)
        rec.save()
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"[scale] n={args.n}: {report['figures']['seconds']:.0f} s in all -> {args.json}", flush=True)


def keep_earlier(args, report: dict) -> None:
    """Measuring only some steps: the other steps' records are kept from the earlier --json."""
    if set(args.steps) == set(MEASURED) or not Path(args.json).exists():
        return
    kept = json.loads(Path(args.json).read_text())
    earlier = kept.get("figures", kept)
    report["figures"]["steps"] = {
        k: v for k, v in earlier["steps"].items() if not any(k.startswith(s) for s in args.steps)
    }
    report["figures"]["remeasured"] = {"steps": args.steps, "date": report["date"], "earlier_date": kept.get("date")}
    report["date"] = kept.get("date")


STEPS = ("style_statistics", "mining", "validation_distances", "stage1_conv", "stage1_vgg_gram", "generator_stage2")


def load_reports(paths: list[str]) -> list[dict]:
    """The figures of each record (records written before the shared record format hold them at the top)."""
    reports = (json.loads(Path(p).read_text()) for p in paths)
    return sorted((r.get("figures", r) for r in reports), key=lambda r: r["n"])


def cost_table(paths: list[str]) -> str:
    """Markdown: one row per (n, step): seconds, the largest process's peak RSS and its private part, disk."""
    lines = [
        "| n | step | seconds | largest process (peak RSS MB) | its private MB | driver RSS / private MB "
        "| disk written MB | quality |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for report in load_reports(paths):
        for step in STEPS:
            rec = report["steps"].get(step)
            if rec is None:
                continue
            kind, rss = max(rec["peak_rss_mb"].items(), key=lambda kv: kv[1])
            quality = rec.get("quality", {})
            shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in quality.items()
                              if k in ("close_recall", "far_precision", "index", "val_triplet_acc", "val_knn_acc",
                                       "images_per_second", "val_psnr") and v is not None)
            lines.append(f"| {report['n']:,} | {step} | {rec['seconds']:.1f} | {kind} {rss:,.0f} | "
                         f"{rec['peak_private_mb'][kind]:,.0f} | {rec['peak_rss_mb'].get('driver', 0):,.0f} / "
                         f"{rec['peak_private_mb'].get('driver', 0):,.0f} | {rec['disk_written_mb']:,.0f} | {shown} |")
    return "\n".join(lines)


def plot(paths: list[str], out: str) -> None:
    """Log-log seconds and peak memory (the largest process, RSS and private) against n, one line per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = load_reports(paths)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for step in STEPS:
        points = [(r["n"], r["steps"][step]) for r in reports if step in r["steps"]]
        if not points:
            continue
        n = [p[0] for p in points]
        line, = axes[0].loglog(n, [p[1]["seconds"] for p in points], "o-", label=step)
        axes[1].loglog(n, [max(p[1]["peak_rss_mb"].values()) for p in points], "o-", color=line.get_color(), label=step)
        axes[1].loglog(n, [max(p[1]["peak_private_mb"].values()) for p in points], "o:", color=line.get_color())
    ref = np.array([min(r["n"] for r in reports), max(r["n"] for r in reports)], float)
    last = reports[-1]["steps"].get("style_statistics")
    if last:  # through the largest point: the small ones carry the PCA sample pass's fixed cost
        axes[0].loglog(ref, last["seconds"] * ref / ref[1], "k--", lw=0.8, label="linear in n")
    axes[0].set(xlabel="training images n", ylabel="seconds",
                title="wall time per step (32 px, 2-core VM)\nstage 1 and generator: fixed step budgets")
    axes[1].set(
        xlabel="training images n",
        ylabel="MB",
        title="peak memory of the largest process\n(solid: RSS; dotted: private)",
    )
    axes[1].axhline(6 * 1024, color="r", lw=0.8, ls="--")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("plot", "table", "nprobe"):
        # python benchmarks/scale.py plot OUT.png RESULT.json ... | table RESULT.json ... |
        #                            nprobe STYLE_OUTPUT OUT.json NPROBE ...
        if sys.argv[1] == "plot":
            plot(sys.argv[3:], sys.argv[2])
        elif sys.argv[1] == "table":
            print(cost_table(sys.argv[2:]))
        else:
            nprobe_sweep(sys.argv[2], [int(v) for v in sys.argv[4:]], anchors=500, k_close=5, k_far=700,
                         rerank_factor=4, out=sys.argv[3])
    else:
        main()
