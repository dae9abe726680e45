"""Light Ray Data map stages that run in Ray tasks: decoding target halves and splitting result rows.

Kept free of torch (and the package's `__init__` imports nothing eagerly) because every Ray worker that
runs one of these functions imports this module first: a torch import costs seconds and ~0.7 GB per
process, which only the model actors should pay.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from step_ray.data.pix2pix import BadImageError, decode_pair, image_id, resize

OUTPUT_COLUMNS = ["image_id", "path", "split", "style_id", "descriptor"]


class _PicklableBadImageError(BadImageError):
    """BadImageError that survives the trip from a Ray worker: BadImageError.__init__ takes two
    arguments, so default exception pickling (cls(*args) with the one-string args) fails and Ray
    would hand the driver only a traceback string."""

    def __reduce__(self):
        return type(self), (self.path, self.reason)


def decode_target_batch(
    batch: dict[str, np.ndarray],
    *,
    direction: str,
    image_size: int,
    min_side: int,
    fail_on_bad: bool,
    style_ids: dict[str, int],
    uri_prefix: str,
) -> dict[str, np.ndarray]:
    """Raw files -> resized target halves (uint8 NHWC). A bad file becomes a row with `error` set and a
    blank image, or raises BadImageError when `fail_on_bad`."""
    count = len(batch["path"])
    images = np.zeros((count, image_size, image_size, 3), np.uint8)
    uris, ids, splits, styles, errors = [], [], [], [], []
    for row, (data, path) in enumerate(zip(batch["bytes"], batch["path"])):
        uri = uri_prefix + str(path)
        ident = image_id(uri)
        error = ""
        try:
            _, target = decode_pair(bytes(data), uri, direction, min_side)
            images[row] = resize(target, image_size)
        except BadImageError as exc:
            if fail_on_bad:
                raise _PicklableBadImageError(exc.path, exc.reason) from None
            error = exc.reason
        uris.append(uri)
        ids.append(ident)
        splits.append(ident.split("/", 1)[0])
        styles.append(style_ids.get(ident, -1))
        errors.append(error)
    return {
        "image": images,
        "image_id": np.array(ids, dtype=object),
        "path": np.array(uris, dtype=object),
        "split": np.array(splits, dtype=object),
        "style_id": np.array(styles, dtype=np.int64),
        "error": np.array(errors, dtype=object),
    }


def good_rows(table: pa.Table) -> pa.Table:
    return table.filter(pc.equal(table["error"], "")).select(OUTPUT_COLUMNS)


def bad_rows(table: pa.Table) -> pa.Table:
    bad = table.filter(pc.not_equal(table["error"], ""))
    return pa.table({"path": bad["path"], "reason": bad["error"]})
