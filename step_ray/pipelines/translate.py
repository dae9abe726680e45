"""Translate new inputs with a trained generator (a StEP or baseline stage, or MUNIT A -> B), at any
scale: `jobs/translate.py`.

Inputs are a folder or s3:// prefix of content images (single images of any size, or pix2pix pair files
whose A half is used); each is resized as the model was trained. Styles come from reference photos (their
codes E(B), or MUNIT's B style codes: each input with each reference, or input i with reference i), from
the run's IMLE mapper (MUNIT: its N(0, I) style prior; `samples` codes per input, seeded per input so a
rerun draws the same), or from a .npy file of codes.

A Ray Data stream: read -> decode (bad files become rows with their reason) -> an actor pool that holds G
(and the mapper) once per actor, one GPU per actor where the cluster has GPUs, CPU actors otherwise ->
each actor writes its PNGs and returns manifest rows -> the driver writes manifest.parquet, errors.csv and
a contact sheet. Memory stays at a few batches per actor whatever the number of inputs; a rerun skips
every input whose outputs all exist.
"""
from __future__ import annotations

import io
import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from step_ray import storage
from step_ray.checkpoints import read_record, recipe_section
from step_ray.config import ConfigError
from step_ray.data.pix2pix import (IMAGE_SUFFIXES, BadImageError, decode_image, decode_pair, input_resample, resize,
                                   to_tensor)

DECODE_CPUS = 0.25
OUTPUT_SEPARATOR = "__"  # <input id>__<style id>.png
MANIFEST_FILE, ERRORS_FILE, SHEET_FILE = "manifest.parquet", "errors.csv", "contact_sheet.png"
# one row per (input, style), or per bad input with its reason; `node`: the Ray node whose actor made it
MANIFEST_COLUMNS = ("input", "style", "style_source", "code", "output", "error", "node")


@dataclass(frozen=True)
class StyleSourceConfig:
    reference: str = ""  # an image, or a folder / s3:// prefix of photos: their style codes E(photo)
    pairing: Literal["each", "in_order"] = "each"  # each input × each reference, or input i with reference i
    reference_half: Literal["whole", "A", "B"] = "whole"  # pix2pix pair files as references: the half to encode
    samples: int = 0  # codes drawn from the IMLE mapper per input
    mapper: str = ""  # a mapper folder; empty: the checkpoint's run folder's `mapper`
    codes: str = ""  # a .npy file of codes [K, nz]: each input × each code
    seed: int = 0
    domain: int = -1  # the multi-domain model: the target domain of `samples`, or the references' domain

    def kinds(self) -> list[str]:
        return [k for k, on in (("reference", self.reference), ("samples", self.samples), ("codes", self.codes)) if on]


@dataclass(frozen=True)
class TranslateJobConfig:
    """`jobs/translate.py`: a generator checkpoint's outputs for every input × style."""

    checkpoint: str = ""  # a stage-2/3 (or baseline) generator or a MUNIT checkpoint folder, local or s3://
    input: str = ""  # a folder or s3:// prefix of content images
    output: str = ""  # a folder or s3:// prefix: one PNG per (input, style), manifest.parquet, errors.csv
    input_half: Literal["whole", "A", "B"] = "whole"  # single images, or the A (left) / B (right) half of pair files
    style: StyleSourceConfig = field(default_factory=StyleSourceConfig)
    image_size: int = 0  # 0: the size the checkpoint was trained at
    a_resample: str = "auto"  # how inputs are resized: nearest for label maps (few colours), else bicubic
    use_ema: bool = True
    batch_size: int = 16  # inputs per actor batch
    num_actors: int = 0  # 0: one per GPU when the cluster has GPUs, else one per 2 CPUs (at least 1)
    use_gpu: Literal["auto", "never", "always"] = "auto"
    contact_sheet: int = 8  # inputs shown in contact_sheet.png with every style (0: none)
    overwrite: bool = False  # false: a rerun skips inputs whose outputs all exist

    def __post_init__(self):
        if not (self.checkpoint and self.input and self.output):
            raise ConfigError("translate needs checkpoint=, input= and output=")
        kinds = self.style.kinds()
        if len(kinds) != 1:
            raise ConfigError("set exactly one of style.reference, style.samples, style.codes"
                              + (f" (got {', '.join(kinds)})" if kinds else ""))
        if self.batch_size < 1 or self.style.samples < 0 or self.num_actors < 0:
            raise ValueError("batch_size must be >= 1; style.samples and num_actors >= 0")


def model_kind(record: dict[str, Any], checkpoint: str) -> Literal["generator", "munit", "multidomain"]:
    """What a checkpoint (its config.yaml `record`) holds: a generator stage (StEP or a baseline: G(A, z), E),
    MUNIT (A -> B) or the multi-domain model (G(x, s) with s from its flow or its style encoder)."""
    method = record.get("method")
    if method in ("stage2", "stage3", "joint"):
        return "generator"
    if method in ("munit", "multidomain"):
        return method
    raise ValueError(f"{checkpoint}: a {method!r} checkpoint; translate takes a generator stage's, MUNIT's or "
                     "the multi-domain model's")


def trained_size(record: dict[str, Any], checkpoint: str) -> int:
    """The image side a checkpoint (its config.yaml `record`) was trained at (its job's data.image_size)."""
    size = (record.get("job") or {}).get("data", {}).get("image_size") or record["recipe"].get("image_size")
    if not size:
        raise ValueError(f"{checkpoint}: its config.yaml does not say the image size; set image_size=")
    return int(size)


def decode_content(data: bytes, path: str, half: str, size: int, a_resample: str = "auto") -> np.ndarray:
    """One input file as a uint8 HWC image of `size`², or BadImageError."""
    if half in ("A", "B"):
        left, right = decode_pair(data, path, "AtoB")
        image = left if half == "A" else right
    else:
        image = decode_image(data, path)
    if image.shape[0] != image.shape[1]:  # centre square crop: the model was trained on squares
        h, w = image.shape[:2]
        side = min(h, w)
        image = image[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]
    return resize(image, size, input_resample(image, a_resample))


def decode_batch(batch: dict[str, Any], half: str, size: int, a_resample: str, uri_prefix: str) -> dict[str, Any]:
    """Ray Data stage: bytes -> images, with every bad file kept as a row with its reason."""
    paths, images, errors = [], [], []
    for data, path in zip(batch["bytes"], batch["path"]):
        uri = uri_prefix + str(path)
        try:
            images.append(decode_content(bytes(data), uri, half, size, a_resample))
            errors.append("")
        except BadImageError as exc:
            images.append(np.zeros((size, size, 3), np.uint8))
            errors.append(exc.reason)
        paths.append(uri)
    return {"path": np.array(paths, dtype=object), "image": np.stack(images), "error": np.array(errors, dtype=object)}


def sample_seed(seed: int, input_id: str) -> int:
    """The mapper's noise for an input depends on the input's id and the seed only (not on the order)."""
    return (zlib.crc32(input_id.encode()) ^ (seed * 2654435761)) & 0x7FFFFFFF


def output_name(input_id: str, style_id: str) -> str:
    return f"{input_id.replace('/', '_')}{OUTPUT_SEPARATOR}{style_id}.png"


class Translator:
    """Ray Data actor: G (and the mapper) loaded once; a batch of decoded inputs -> its PNGs, written to
    `output`, and one manifest row per (input, style), or per bad input with its reason."""

    def __init__(self, checkpoint: str, use_ema: bool, output: str, styles: dict[str, Any], device: str = "cpu",
                 torch_threads: int = 0):
        import ray
        import torch

        from step_ray.eval.generator_eval import load_generator, load_mapper  # deferred: torch in the actor only
        from step_ray.eval.multidomain_eval import load_multidomain  # deferred: torch in the actor only
        from step_ray.eval.munit_eval import load_munit  # deferred: torch in the actor only

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.torch = torch
        self.device = torch.device(device)
        self.output, self.styles = output, styles
        self.mapper = self.flow = None
        if styles["kind"] == "munit":  # A -> B: A's content, decoded by B's generator with a B style
            nets = load_munit(checkpoint, self.device)
            self.g = MUNITAtoB(nets["gen_a"], nets["gen_b"])
        elif styles["kind"] == "multidomain":  # G(x, s): s from the flow (samples) or given (references)
            nets = load_multidomain(checkpoint, self.device)
            self.g, self.flow = nets["generator"], nets["flow"]
        else:
            self.g, _ = load_generator(checkpoint, use_ema, self.device)
            self.mapper = load_mapper(styles["mapper"]) if styles.get("samples") else None
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

    def _codes_for(self, input_uri: str) -> tuple[list[str], list[str], np.ndarray]:
        """(style ids, their sources, codes [k, nz]) for one input."""
        s = self.styles
        if s.get("samples"):
            gen = self.torch.Generator().manual_seed(sample_seed(s["seed"], _input_id(input_uri)))
            ids = [f"sample{j:03d}" for j in range(s["samples"])]
            if self.flow is not None:  # the multi-domain model: its flow, at the target domain
                noise = self.torch.randn(s["samples"], s["style_dim"], generator=gen)
                domains = self.torch.full((s["samples"],), s["domain"], dtype=self.torch.long)
                with self.torch.no_grad():
                    z = self.flow(noise.to(self.device), domains.to(self.device)).float().cpu().numpy()
                return ids, [f"flow sample {j} of domain {s['domain']} (seed {s['seed']})"
                             for j in range(s["samples"])], z
            if self.mapper is None:  # MUNIT: its style prior, N(0, I)
                z = self.torch.randn(s["samples"], s["style_dim"], generator=gen).numpy()
                return ids, [f"N(0, I) sample {j} (seed {s['seed']})" for j in range(s["samples"])], z
            with self.torch.no_grad():
                z = self.mapper(self.torch.randn(s["samples"], self.mapper.cfg.noise_dim, generator=gen)).numpy()
            return ids, [f"mapper sample {j} (seed {s['seed']})" for j in range(s["samples"])], z
        rows = [s["order"][input_uri]] if s["pairing"] == "in_order" else list(range(len(s["ids"])))
        return [s["ids"][r] for r in rows], [s["sources"][r] for r in rows], s["codes"][rows]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from step_ray.eval.embedding import save_png  # deferred: matplotlib only where PNGs are written
        from step_ray.eval.pictures import generate, to_uint8  # deferred: torch in the actor only

        rows: dict[str, list] = {k: [] for k in MANIFEST_COLUMNS}
        a_list, z_list, names = [], [], []
        for path, image, error in zip(batch["path"], batch["image"], batch["error"]):
            if error:
                for k, v in (("input", path), ("style", ""), ("style_source", ""), ("output", ""), ("error", error)):
                    rows[k].append(v)
                rows["code"].append(None)
                continue
            ids, sources, codes = self._codes_for(path)
            for style_id, source, code in zip(ids, sources, codes):
                names.append(storage.join(self.output, output_name(_input_id(path), style_id)))
                a_list.append(image)
                z_list.append(code)
                for k, v in (("input", path), ("style", style_id), ("style_source", source), ("output", names[-1]),
                             ("error", "")):
                    rows[k].append(v)
                rows["code"].append(np.asarray(code, np.float32).tolist())
        rows["node"] = [self.node] * len(rows["input"])
        if a_list:
            z = self.torch.from_numpy(np.stack(z_list).astype(np.float32))
            for name, out in zip(names, to_uint8(generate(self.g, to_tensor(np.stack(a_list)), z))):
                save_png(name, out)
        return {k: np.array(v, dtype=object) for k, v in rows.items()}


class MUNITAtoB:
    """MUNIT's A -> B translation as a G(A, z): A's content code decoded by B's generator with style z."""

    def __init__(self, gen_a, gen_b):
        self.gen_a, self.gen_b = gen_a, gen_b

    def parameters(self):
        return self.gen_b.parameters()

    def __call__(self, a, z):
        return self.gen_b.decode(self.gen_a.encode(a)[0], z)


def _input_id(uri: str) -> str:
    """An input's name without its folder and suffix: what its outputs are named after."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]


def list_images(uri: str) -> list[str]:
    """One image file, or every image file directly under a folder / s3:// prefix (sorted)."""
    if str(uri).lower().endswith(IMAGE_SUFFIXES) and storage.exists(uri):
        return [str(uri)]
    files = storage.list_files(uri, IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{uri}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def style_table(cfg: TranslateJobConfig, size: int, inputs: list[str], record: dict[str, Any]) -> dict[str, Any]:
    """What the actors need to know of the styles: ids, sources and codes of references or of a codes file,
    or the mapper and the number of samples."""
    kind = model_kind(record, cfg.checkpoint)
    return {"kind": kind, **_style_sources(cfg, size, inputs, kind, record)}


def _style_sources(cfg: TranslateJobConfig, size: int, inputs: list[str], kind: str,
                   record: dict[str, Any]) -> dict[str, Any]:
    s = cfg.style
    if kind == "multidomain" and not s.codes and s.domain < 0:
        raise ConfigError("the multi-domain model needs style.domain: the target domain of style.samples, or "
                          "the domain of the style.reference photos")
    if s.samples and kind in ("munit", "multidomain"):  # MUNIT's prior or the flow's noise: the style's size
        from step_ray.models.multidomain import MultiDomainConfig  # deferred: torch only where codes are made
        from step_ray.models.munit import MUNITConfig  # deferred: torch only where codes are made

        model = recipe_section(record, "model", MUNITConfig if kind == "munit" else MultiDomainConfig)
        return {"samples": s.samples, "seed": s.seed, "style_dim": model.style_dim, "domain": s.domain}
    if s.samples:
        mapper = s.mapper or storage.join(cfg.checkpoint.rstrip("/").rsplit("/", 1)[0], "mapper")
        if not storage.exists(storage.join(mapper, "mapper.pt")):
            raise ValueError(f"style.samples needs an IMLE mapper: none at {mapper} (set style.mapper=)")
        return {"samples": s.samples, "mapper": mapper, "seed": s.seed}
    if s.codes:
        codes = np.load(io.BytesIO(storage.read_bytes(s.codes))).astype(np.float32)
        if codes.ndim != 2:
            raise ValueError(f"style.codes: expected an array [K, nz], got shape {codes.shape}")
        ids = [f"code{k:03d}" for k in range(len(codes))]
        return {"pairing": "each", "ids": ids, "sources": [f"{s.codes}[{k}]" for k in range(len(codes))],
                "codes": codes}
    refs = list_images(s.reference)
    if s.pairing == "in_order" and len(refs) != len(inputs):
        raise ValueError(f"style.pairing=in_order pairs input i with reference i: {len(inputs)} inputs, "
                         f"{len(refs)} references")
    codes = encode_references(cfg.checkpoint, refs, s.reference_half, size, kind, s.domain)
    return {"pairing": s.pairing, "ids": [f"ref_{_input_id(r)}" for r in refs], "sources": refs, "codes": codes,
            "order": {u: i for i, u in enumerate(inputs)} if s.pairing == "in_order" else {}}


def encode_references(checkpoint: str, refs: list[str], half: str, size: int, kind: str = "generator",
                      domain: int = -1) -> np.ndarray:
    """The style code of each reference photo, at the size the model was trained at: E(photo), MUNIT's
    domain-B style encoder, or the multi-domain style encoder at the references' `domain`."""
    import torch

    from step_ray.eval.multidomain_eval import load_multidomain  # deferred: torch only where codes are made
    from step_ray.eval.munit_eval import load_munit  # deferred: torch only where codes are made
    from step_ray.style.encode import encode, load_encoder  # deferred: torch only where codes are made

    images = np.stack([decode_content(storage.read_bytes(r), r, half, size, "bicubic") for r in refs])
    if kind == "munit":
        with torch.no_grad():
            return load_munit(checkpoint)["gen_b"].encode(to_tensor(images))[1].numpy().astype(np.float32)
    if kind == "multidomain":
        with torch.no_grad():
            domains = torch.full((len(images),), domain, dtype=torch.long)
            return load_multidomain(checkpoint)["style_encoder"](to_tensor(images), domains).numpy().astype(np.float32)
    return encode(images, load_encoder(checkpoint)).astype(np.float32)


def _plan(cfg: TranslateJobConfig) -> tuple[int, bool, int]:
    """(actors, GPU each, torch threads each) for the cluster Ray has now."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if cfg.use_gpu == "always" and not gpus:
        raise RuntimeError("use_gpu=always but the Ray cluster has no GPU")
    use_gpu = gpus > 0 and cfg.use_gpu != "never"
    cpus = max(1, int(resources.get("CPU", 1)))
    actors = cfg.num_actors or (gpus if use_gpu else max(1, cpus // 2))
    return actors, use_gpu, 0 if use_gpu else max(1, cpus // actors - 1)


def _previous_manifest(output: str) -> pa.Table | None:
    import pyarrow.parquet as pq

    uri = storage.join(output, MANIFEST_FILE)
    return pq.read_table(io.BytesIO(storage.read_bytes(uri))) if storage.exists(uri) else None


def _stream(cfg: TranslateJobConfig, todo: list[str], size: int, styles: dict[str, Any]):
    """The lazy Ray Dataset: files -> decoded inputs -> the actors' manifest rows."""
    import ray.data

    actors, use_gpu, threads = _plan(cfg)
    fs, _ = storage.resolve(todo[0])
    # a block per batch while that keeps every actor busy, then blocks of up to 256 files
    blocks = min(math.ceil(len(todo) / cfg.batch_size), max(4 * actors, math.ceil(len(todo) / 256)))
    # reads and decoding are light: a quarter of a CPU a task leaves each node room beside its actor (at a
    # whole CPU, the reads of a cluster of 1-CPU nodes never started beside the actors)
    files = ray.data.read_binary_files([storage.resolve(u)[1] for u in todo], include_paths=True, filesystem=fs,
                                       override_num_blocks=max(1, blocks), num_cpus=DECODE_CPUS)
    prefix = "s3://" if storage.is_s3(todo[0]) else ""
    decoded = files.map_batches(decode_batch, batch_size=cfg.batch_size, num_cpus=DECODE_CPUS, fn_kwargs=dict(
        half=cfg.input_half, size=size, a_resample=cfg.a_resample, uri_prefix=prefix))
    print(f"[translate] {len(todo)} inputs, {actors} actor(s) ({'1 GPU' if use_gpu else f'{threads} CPU thread(s)'}"
          f" each), {size} px", flush=True)
    return decoded.map_batches(
        Translator, fn_constructor_kwargs=dict(checkpoint=cfg.checkpoint, use_ema=cfg.use_ema,
                                               output=storage.absolute(cfg.output), styles=styles,
                                               device="cuda" if use_gpu else "cpu", torch_threads=threads),
        batch_size=cfg.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=0 if use_gpu else max(0.5, threads - DECODE_CPUS), num_gpus=1 if use_gpu else 0)


def _manifest_table(rows: dict[str, list]) -> pa.Table:
    return pa.table({"input": pa.array(rows["input"], pa.string()), "style": pa.array(rows["style"], pa.string()),
                     "style_source": pa.array(rows["style_source"], pa.string()),
                     "code": pa.array(rows["code"], pa.list_(pa.float32())),
                     "output": pa.array(rows["output"], pa.string()), "error": pa.array(rows["error"], pa.string()),
                     "node": pa.array(rows["node"], pa.string())})


def _expected_outputs(cfg: TranslateJobConfig, inputs: list[str], styles: dict[str, Any]) -> dict[str, list[str]]:
    """input -> the output names it gets (what a rerun checks for)."""
    if styles.get("samples"):
        ids = [f"sample{j:03d}" for j in range(styles["samples"])]
        return {u: [output_name(_input_id(u), s) for s in ids] for u in inputs}
    if styles["pairing"] == "in_order":
        return {u: [output_name(_input_id(u), styles["ids"][i])] for i, u in enumerate(inputs)}
    return {u: [output_name(_input_id(u), s) for s in styles["ids"]] for u in inputs}


def _contact_sheet(cfg: TranslateJobConfig, table: pa.Table, size: int) -> str:
    """contact_sheet.png: the first inputs, each followed by up to 8 of its outputs."""
    from PIL import Image

    from step_ray.eval.embedding import image_grid, save_png  # deferred: matplotlib only for the picture

    good = table.filter(pa.compute.equal(table["error"], "")).to_pydict()
    by_input: dict[str, list[str]] = {}
    for inp, out in zip(good["input"], good["output"]):
        by_input.setdefault(inp, []).append(out)
    rows = []
    for inp in sorted(by_input)[: cfg.contact_sheet]:
        image = decode_content(storage.read_bytes(inp), inp, cfg.input_half, size, cfg.a_resample)
        outs = [np.asarray(Image.open(io.BytesIO(storage.read_bytes(o))).convert("RGB"))
                for o in sorted(by_input[inp])[:8]]
        rows.append([image] + outs)
    if not rows:
        return ""
    uri = storage.join(cfg.output, SHEET_FILE)
    save_png(uri, image_grid(rows))
    return uri


def run_translate(cfg: TranslateJobConfig) -> dict[str, Any]:
    """Every input × style through G; returns the summary (also printed)."""
    import pyarrow.parquet as pq

    from step_ray.cluster import init_ray  # deferred: Ray only when there is work

    started = time.perf_counter()
    record = read_record(cfg.checkpoint)  # what the checkpoint is and the size it was trained at
    size = cfg.image_size or trained_size(record, cfg.checkpoint)
    inputs = list_images(cfg.input)
    seen: dict[str, str] = {}
    for u in inputs:
        if seen.setdefault(_input_id(u), u) != u:
            raise ValueError(f"two inputs share the name {_input_id(u)!r} ({seen[_input_id(u)]}, {u}): outputs are "
                             "named after it")
    storage.check_writable(cfg.output, "output")
    styles = style_table(cfg, size, inputs, record)
    expected = _expected_outputs(cfg, inputs, styles)
    written = storage.list_files(cfg.output, (".png",)) if storage.exists(cfg.output) else []
    existing = {f.rsplit("/", 1)[-1] for f in written}
    todo = [u for u in inputs if cfg.overwrite or not all(n in existing for n in expected[u])]
    previous = None if cfg.overwrite else _previous_manifest(cfg.output)
    rows: dict[str, list] = {k: [] for k in MANIFEST_COLUMNS}
    if todo:
        init_ray()
        last, done = time.perf_counter(), set()
        for batch in _stream(cfg, todo, size, styles).iter_batches(batch_size=None, batch_format="numpy"):
            for k in rows:
                rows[k].extend(batch[k].tolist())
            done.update(batch["input"].tolist())
            if time.perf_counter() - last > 10:
                last = time.perf_counter()
                print(f"[translate] {len(done)}/{len(todo)} inputs, {len(rows['output']) / (last - started):.1f} "
                      "outputs/s", flush=True)
    table = _manifest_table(rows)
    if previous is not None:  # the rows of the inputs skipped, as the earlier run wrote them
        kept = previous.filter(pa.compute.is_in(previous["input"], pa.array(sorted(set(inputs) - set(todo)))))
        table = pa.concat_tables([kept.cast(table.schema), table])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    storage.write_bytes(storage.join(cfg.output, MANIFEST_FILE), buf.getvalue())
    bad = table.filter(pa.compute.not_equal(table["error"], "")).select(["input", "error"])
    storage.write_bytes(storage.join(cfg.output, ERRORS_FILE), bad.to_pandas().to_csv(index=False).encode())
    sheet = _contact_sheet(cfg, table, size) if cfg.contact_sheet else ""
    seconds = time.perf_counter() - started
    new_outputs = sum(1 for e in rows["error"] if not e)
    summary = {"inputs": len(inputs), "translated": len(todo), "skipped": len(inputs) - len(todo),
               "outputs_written": new_outputs, "bad_inputs": bad.num_rows, "seconds": round(seconds, 2),
               "outputs_per_s": round(new_outputs / seconds, 2) if seconds > 0 else None, "image_size": size,
               "manifest": storage.join(cfg.output, MANIFEST_FILE), "contact_sheet": sheet}
    print(f"[translate] {new_outputs} outputs from {len(todo)} inputs in {seconds:.0f}s ({len(inputs) - len(todo)} "
          f"already done, {bad.num_rows} bad: {ERRORS_FILE}); manifest {summary['manifest']}", flush=True)
    return summary


__all__ = ["StyleSourceConfig", "TranslateJobConfig", "run_translate"]
