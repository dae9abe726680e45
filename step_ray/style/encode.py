"""Inference with a trained style encoder: `encode(images, checkpoint) -> z` (checkpoint local or s3://)."""
from __future__ import annotations

import numpy as np
import torch

from step_ray.checkpoints import load_checkpoint, local_checkpoint_dir, read_record, recipe_section
from step_ray.data.pix2pix import to_tensor
from step_ray.models import EncoderConfig, StyleEncoder
from step_ray.style.vgg import VGGConfig, load_vgg


def build_encoder(cfg: EncoderConfig) -> StyleEncoder:
    """A fresh E for its config: backbone vgg_gram gets its frozen VGG (weights from step_ray.weights, never
    downloaded; without any, load_vgg's fixed-seed random VGG, with its loud warning)."""
    if cfg.backbone != "vgg_gram":
        return StyleEncoder(cfg)
    return StyleEncoder(cfg, vgg=load_vgg(VGGConfig(arch=cfg.vgg_arch, layers=cfg.vgg_layers, weights=cfg.vgg_weights)))


def encoder_config_of(checkpoint: str) -> EncoderConfig:
    """The EncoderConfig a checkpoint's encoder was built with (every recipe with an E saves it as `encoder`)."""
    return recipe_section(read_record(checkpoint), "encoder", EncoderConfig)


def load_encoder(checkpoint: str, device: str | torch.device = "cpu") -> StyleEncoder:
    """The encoder of a checkpoint folder (stage 1, 2 or 3, or a baseline's): its settings from the
    recipe section of config.yaml, its weights (weights only). An S3 checkpoint is fetched once."""
    folder, tmp = local_checkpoint_dir(checkpoint)
    try:
        return load_encoder_weights(folder, build_encoder(encoder_config_of(folder)), device).to(device).eval()
    finally:
        if tmp is not None:
            tmp.cleanup()


def load_encoder_weights(checkpoint: str, encoder: StyleEncoder, device: str | torch.device = "cpu") -> StyleEncoder:
    """A checkpoint's encoder weights into `encoder`, built for the same settings (returned)."""
    folder, tmp = local_checkpoint_dir(checkpoint)
    try:
        load_checkpoint(folder, {"encoder": encoder}, map_location=device)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return encoder


@torch.no_grad()
def encode(images, encoder: StyleEncoder | str, batch_size: int = 64, device: str | torch.device = "cpu") -> np.ndarray:
    """Style codes z [N, nz] of images given as uint8 NHWC arrays or float NCHW tensors in [-1, 1]."""
    model = load_encoder(encoder, device) if isinstance(encoder, str) else encoder.eval()
    x = to_tensor(np.asarray(images)) if isinstance(images, np.ndarray) else images
    dev = next(model.parameters()).device
    return torch.cat([model(x[i : i + batch_size].to(dev)).float().cpu() for i in range(0, len(x), batch_size)]).numpy()
