"""Networks: plain nn.Modules, no training logic, no parallelism (wrapping happens in step_ray.engine)."""
from step_ray.models.encoder import EncoderConfig, StyleEncoder

__all__ = ["EncoderConfig", "StyleEncoder"]
from step_ray.models.discriminator import DiscriminatorConfig, PatchDiscriminator, PatchGAN  # noqa: E402
from step_ray.models.generator import GeneratorConfig, UNetGenerator  # noqa: E402
from step_ray.models.mapper import MapperConfig, StyleMapper  # noqa: E402

__all__ += ["DiscriminatorConfig", "PatchDiscriminator", "PatchGAN", "GeneratorConfig", "UNetGenerator",
            "MapperConfig", "StyleMapper"]
