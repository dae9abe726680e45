"""Translation throughput: `jobs/translate.py`'s Ray Data stream against a plain in-process loop, in one run.

    python benchmarks/translate.py --inputs 200 --references 4 --rounds 2 --json benchmarks/results/translate.json

Both sides translate the same inputs (label maps of --input-side px, saved as PNG) with the same generator
checkpoint (a facades-shaped G at --size px, 32 base channels; its weights do not change the cost) and every
input × every reference photo, and write one PNG per output. The loop is what a user would write: G and E
loaded once, then per input read, decode, resize, generate its outputs in one batch, write them; torch's
default threads. The stream is `run_translate` with its defaults (actors sized to the machine), Ray started
before the clock. Sides alternate (loop, stream, stream, loop, ...); each round's ratio is of two runs under
the same load.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import harness
import numpy as np
import torch
from PIL import Image

from step_ray.checkpoints import save_checkpoint
from step_ray.config import config_to_dict, load_config
from step_ray.models import EncoderConfig, GeneratorConfig, StyleEncoder, UNetGenerator
from step_ray.pipelines.translate import TranslateJobConfig, decode_content, output_name, run_translate


def make_inputs(root: Path, inputs: int, references: int, side: int) -> None:
    rng = np.random.default_rng(0)
    (root / "in").mkdir(parents=True)
    (root / "refs").mkdir()
    palette = rng.integers(0, 256, (12, 3), dtype=np.uint8)
    for i in range(inputs):  # label maps: flat regions of a few colours
        cells = rng.integers(0, 12, (side // 16, side // 16))
        Image.fromarray(palette[cells].repeat(16, 0).repeat(16, 1)).save(root / "in" / f"in{i:05d}.png")
    for j in range(references):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / "refs" / f"ref{j}.png")


def make_checkpoint(root: Path, size: int, base_channels: int) -> str:
    g_cfg = GeneratorConfig(base_channels=base_channels, num_downs=0).fitted(size)
    e_cfg = EncoderConfig()
    folder = root / "run" / "checkpoint_epoch0000"
    save_checkpoint(folder, {"generator": UNetGenerator(g_cfg), "encoder": StyleEncoder(e_cfg)}, {}, {"epoch": 0},
                    {"method": "stage3", "run": {}, "job": {"data": {"image_size": size}},
                     "recipe": {"generator": config_to_dict(g_cfg), "encoder": config_to_dict(e_cfg)}})
    return str(folder)


def plain_loop(checkpoint: str, root: Path, out: Path, size: int) -> int:
    """The in-process loop a user would write; returns the outputs written."""
    from step_ray.eval.generator_eval import load_generator
    from step_ray.eval.pictures import generate, to_uint8
    from step_ray.style.encode import encode, load_encoder

    g, _ = load_generator(checkpoint)
    refs = sorted((root / "refs").iterdir())
    ref_images = np.stack([decode_content(p.read_bytes(), str(p), "whole", size, "bicubic") for p in refs])
    z = torch.from_numpy(encode(ref_images, load_encoder(checkpoint)))
    written = 0
    for path in sorted((root / "in").iterdir()):
        a = decode_content(path.read_bytes(), str(path), "whole", size)
        batch = torch.from_numpy(np.repeat(a[None], len(z), 0)).permute(0, 3, 1, 2).float() / 127.5 - 1
        for ref, image in zip(refs, to_uint8(generate(g, batch, z))):
            Image.fromarray(image).save(out / output_name(path.stem, f"ref_{ref.stem}"))
            written += 1
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=200)
    p.add_argument("--references", type=int, default=4)
    p.add_argument("--input-side", type=int, default=256, help="the inputs' side (they are resized to --size)")
    p.add_argument("--size", type=int, default=64, help="the side the model was trained at")
    p.add_argument("--base-channels", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default="")
    args = p.parse_args()

    from step_ray.cluster import init_ray

    work = Path(tempfile.mkdtemp(prefix="bench_translate_"))
    make_inputs(work, args.inputs, args.references, args.input_side)
    checkpoint = make_checkpoint(work, args.size, args.base_channels)
    init_ray()
    outputs = args.inputs * args.references

    def run(side: str) -> dict:
        out = work / f"out_{side}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        load_before, start = harness.load(), time.perf_counter()
        if side == "loop":
            written = plain_loop(checkpoint, work, out, args.size)
        else:
            cfg = load_config(TranslateJobConfig, None, [f"checkpoint={checkpoint}", f"input={work / 'in'}",
                                                        f"style.reference={work / 'refs'}", f"output={out}",
                                                        "contact_sheet=0"])
            written = run_translate(cfg)["outputs_written"]
        seconds = time.perf_counter() - start
        assert written == outputs, (side, written)
        harness.log(f"{side}: {outputs / seconds:.1f} outputs/s ({seconds:.1f} s)")
        return {"seconds": seconds, "outputs_per_s": outputs / seconds, "load_before": load_before,
                "load_after": harness.load()}

    results = harness.alternate({"loop": lambda: run("loop"), "stream": lambda: run("stream")}, args.rounds)
    speedups = harness.ratios([r["outputs_per_s"] for r in results["stream"]],
                              [r["outputs_per_s"] for r in results["loop"]])
    figures = {"inputs": args.inputs, "references": args.references, "outputs": outputs, "size": args.size,
               "input_side": args.input_side, "base_channels": args.base_channels, "rounds": results,
               "speedup_rounds": speedups, "speedup": harness.median(speedups),
               "loop_outputs_per_s": harness.median([r["outputs_per_s"] for r in results["loop"]]),
               "stream_outputs_per_s": harness.median([r["outputs_per_s"] for r in results["stream"]])}
    print(f"\n{outputs} outputs ({args.inputs} inputs × {args.references} references, {args.size} px): loop "
          f"{figures['loop_outputs_per_s']:.1f} outputs/s, stream {figures['stream_outputs_per_s']:.1f} "
          f"({figures['speedup']:.2f}×)")
    harness.write(args.json, harness.record(figures))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
