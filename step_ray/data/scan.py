"""Check every file of a split once, before training: which images are usable, and why the others are not.

Stage 1 gets this from its style-statistics step (Ray Data, `errors.csv`). The generator stages and
MUNIT read their images inside the training loop, where a bad file would stop a worker hours in; so their
drivers scan the split first, decoding every file in a thread pool (not in Ray tasks: inside a Tune trial
every CPU may be held by trials, and a task waiting for one would never start). Bad files are reported by path and
reason and left out (`on_bad_image=skip`), or the first one stops the job (`fail`). A greyscale file is not bad: it is
converted to RGB like any other mode.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from step_ray.data.pix2pix import (BadImageError, DataConfig, DatasetError, image_id, load_pair, read_style_ids,
                                   scan_folder)

CHUNK = 64  # files per thread task
THREADS = 8


@dataclass
class ScanResult:
    good: list[str]
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): image files that cannot be used
    not_read: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): other entries of the folder

    @property
    def left_out(self) -> list[tuple[str, str]]:
        return sorted(self.errors + self.not_read)

    def report(self, what: str, shown: int = 20) -> None:
        """Every file left out by path and reason on stdout (the first `shown`; the rest counted)."""
        if not self.left_out:
            return
        print(f"[data] {what}: {len(self.errors)} bad file(s) left out, {len(self.not_read)} entries not read, "
              f"{len(self.good)} used", flush=True)
        for path, reason in self.left_out[:shown]:
            print(f"[data]   {path}: {reason}", flush=True)
        if len(self.left_out) > shown:
            print(f"[data]   ... and {len(self.left_out) - shown} more", flush=True)


def check_files(uris: list[str], direction: str, min_side: int) -> list[str | None]:
    """Per file: None when it decodes to a usable pair, else the reason it cannot be used."""
    out: list[str | None] = []
    for uri in uris:
        try:
            load_pair(uri, direction, None, min_side)
            out.append(None)
        except BadImageError as exc:
            out.append(exc.reason)
    return out


def scan_dataset_split(root: str, split: str, data: DataConfig) -> ScanResult:
    """Every entry of one split folder: the usable images, the bad ones and the entries not read."""
    listing = scan_folder(root, split)
    return scan_split(listing.files, data, f"{root} {split}", not_read=listing.skipped)


def scan_split(uris: list[str], data: DataConfig, what: str = "split",
               not_read: list[tuple[str, str]] = ()) -> ScanResult:
    """The usable files of `uris` (order kept) and the reasons for the rest; honours `data.on_bad_image`.
    `not_read`: the folder's other entries (scan_folder), reported with them."""
    from concurrent.futures import ThreadPoolExecutor

    chunks = [uris[i : i + CHUNK] for i in range(0, len(uris), CHUNK)]
    reasons: list[str | None] = []
    with ThreadPoolExecutor(max_workers=THREADS) as pool:  # reading and PIL's decoding release the GIL
        for part in pool.map(lambda c: check_files(c, data.direction, data.min_side), chunks):
            reasons += part
    result = ScanResult([u for u, r in zip(uris, reasons) if r is None],
                        [(u, r) for u, r in zip(uris, reasons) if r is not None], list(not_read))
    if result.errors and data.on_bad_image == "fail":
        path, reason = result.errors[0]
        raise BadImageError(path, f"{reason} (data.on_bad_image=fail; {len(result.errors)} bad file(s) in {what})")
    if not result.good:
        raise DatasetError(f"{what}: none of the {len(uris)} files is a usable image")
    result.report(what)
    return result


@dataclass
class PairedSplits:
    """A paired set's usable train and validation files (scanned once), the data config with its root
    resolved, and the val images' style ids (-1 unknown): what every paired recipe's workers read."""

    data: DataConfig
    train_paths: list[str]
    val_paths: list[str]
    val_style_ids: np.ndarray
    bad_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), left out of both splits


def prepare_paired_splits(data: DataConfig, val_split: str = "val") -> PairedSplits:
    """The splits' usable files: every file is decoded once here, bad ones are reported and left out."""
    root = data.prepare()
    data = dataclasses.replace(data, root=root)
    styles = read_style_ids(root)
    train = scan_dataset_split(root, "train", data)
    val = scan_dataset_split(root, val_split, data)
    return PairedSplits(data=data, train_paths=train.good, val_paths=val.good,
                        val_style_ids=np.array([styles.get(image_id(p), -1) for p in val.good], np.int64),
                        bad_files=train.left_out + val.left_out)
