"""Finding pretrained weight files offline: a configured path, else torchvision's file in the torch cache.

Nothing here downloads. The style VGG and LPIPS's AlexNet both look their weights up this way.
"""
from __future__ import annotations

from pathlib import Path

import torch


def find_weight_file(configured: str, setting: str, standard_name: str, stem: str) -> str | None:
    """The file to load, or None when there is none (the caller falls back to a random network).

    `configured` (the value of config field `setting`) must exist when given. Otherwise the torch hub
    cache is searched for torchvision's `standard_name`, then any hash suffix of the same `stem`
    (`<stem>-*.pth`, a newer torchvision release; not variants such as vgg16_bn).
    """
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{setting}={configured!r}: no such file")
        return str(path.resolve())
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    if (checkpoints / standard_name).is_file():
        return str(checkpoints / standard_name)
    others = sorted(checkpoints.glob(f"{stem}-*.pth")) if checkpoints.is_dir() else []
    return str(others[0]) if others else None
