"""A real multi-domain set from the facades photos: two domains by colour cast, in the folder-per-domain layout
the multi-domain model reads (`step_ray/data/domains.py`).

The rule: a photo's warmth is the mean of R − B over its pixels (0-255 scale); photos warmer than the median
warmth of the *training* photos are "warm", the others "cool", and the same threshold splits the validation
photos. So the training domains are balanced and nothing of the held-out photos decides the rule. Only the
photo side A of each pix2pix pair is used (the label maps are not photos).

    python -m step_ray.data.facade_domains ../shared/data/facades data/facades-warmcool

writes `<out>/{train,val}/{cool,warm}/<id>.png` (the photos at their own size) and `<out>/rule.json` (the
threshold and each photo's warmth).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "val")


def photo_of_pair(path: Path) -> Image.Image:
    """Side A (the left half) of a pix2pix A|B file."""
    pair = Image.open(path).convert("RGB")
    return pair.crop((0, 0, pair.width // 2, pair.height))


def warmth(photo: Image.Image) -> float:
    """Mean of R − B over the pixels, on the 0-255 scale."""
    rgb = np.asarray(photo, dtype=np.float64)
    return float((rgb[..., 0] - rgb[..., 2]).mean())


def build_facade_domains(source: str | Path, out: str | Path) -> dict:
    """Writes the two-domain set from a pix2pix facades folder (`train/`, `val/` of A|B files); returns the rule
    record that it also writes to `<out>/rule.json`."""
    source, out = Path(source), Path(out)
    files = {split: sorted(p for p in (source / split).glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
             for split in SPLITS}
    if not files["train"]:
        raise FileNotFoundError(f"no pix2pix images in {source / 'train'}")
    # each file decoded once: the set is small (the facades photos: 500 at 256×256, about 100 MB)
    photos = {split: [photo_of_pair(p) for p in paths] for split, paths in files.items()}
    warmths = {split: [warmth(photo) for photo in split_photos] for split, split_photos in photos.items()}
    threshold = float(np.median(warmths["train"]))
    record = {"rule": "warm if mean(R - B) over the photo > the median over the training photos, else cool",
              "threshold": threshold, "source": str(source), "images": {}}
    for split, paths in files.items():
        for path, photo, value in zip(paths, photos[split], warmths[split]):
            domain = "warm" if value > threshold else "cool"
            target = out / split / domain / f"{path.stem}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            photo.save(target)
            record["images"][f"{split}/{path.stem}"] = {"domain": domain, "warmth": round(value, 3)}
    (out / "rule.json").write_text(json.dumps(record, indent=1))
    return record


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a pix2pix facades folder (train/, val/)")
    p.add_argument("out", help="where the <split>/<domain>/ folders go")
    args = p.parse_args(argv)
    record = build_facade_domains(args.source, args.out)
    counts = Counter((key.split("/")[0], image["domain"]) for key, image in record["images"].items())
    print(f"[facade domains] threshold mean(R - B) = {record['threshold']:.2f}; "
          + ", ".join(f"{split}/{domain} {n}" for (split, domain), n in sorted(counts.items())) + f" -> {args.out}")


if __name__ == "__main__":
    main()
