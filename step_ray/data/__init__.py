"""Datasets: the built-in synthetic style set and the pix2pix folder layout (local or s3://)."""
from step_ray.data.pix2pix import BadImageError, DataConfig, DatasetError, load_split
from step_ray.data.synthetic import SyntheticConfig, generate_synthetic

__all__ = ["BadImageError", "DataConfig", "DatasetError", "SyntheticConfig", "generate_synthetic", "load_split"]
