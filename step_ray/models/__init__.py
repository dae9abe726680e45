"""Networks: plain nn.Modules, no training logic, no parallelism (wrapping happens in step_ray.train)."""
from step_ray.models.encoder import EncoderConfig, StyleEncoder

__all__ = ["EncoderConfig", "StyleEncoder"]
