"""Inference with a trained style encoder: `encode(images, checkpoint) -> z` (checkpoint local or s3://)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import yaml

from step_ray.config import config_from_dict
from step_ray.models import EncoderConfig, StyleEncoder


def _find_encoder_config(tree: Any) -> dict | None:
    """The first mapping stored under an `encoder` key in a saved config (stage 1, 2 and 3 all have one)."""
    if isinstance(tree, dict):
        if isinstance(tree.get("encoder"), dict):
            return tree["encoder"]
        for value in tree.values():
            found = _find_encoder_config(value)
            if found is not None:
                return found
    return None


def load_encoder(checkpoint: str, device: str | torch.device = "cpu") -> StyleEncoder:
    """The encoder of a checkpoint folder: its config from config.yaml, its weights (weights only)."""
    from pathlib import Path

    from step_ray.checkpoints import CONFIG_FILE, load_checkpoint, local_checkpoint_dir

    folder, tmp = local_checkpoint_dir(checkpoint)
    try:
        tree = yaml.safe_load((Path(folder) / CONFIG_FILE).read_text())
        enc_cfg = config_from_dict(EncoderConfig, _find_encoder_config(tree) or {}, where="encoder")
        model = StyleEncoder(enc_cfg)
        load_checkpoint(folder, {"encoder": model}, map_location=device)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return model.to(device).eval()


@torch.no_grad()
def encode(images, encoder: StyleEncoder | str, batch_size: int = 64, device: str | torch.device = "cpu") -> np.ndarray:
    """Style codes z [N, nz] of images given as uint8 NHWC arrays or float NCHW tensors in [-1, 1]."""
    from step_ray.data.pix2pix import to_tensor

    model = load_encoder(encoder, device) if isinstance(encoder, str) else encoder.eval()
    x = to_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    dev = next(model.parameters()).device
    return torch.cat([model(x[i : i + batch_size].to(dev)).float().cpu() for i in range(0, len(x), batch_size)]).numpy()
