"""step_ray: StEP (style-based encoder pre-training) for multi-modal image-to-image translation on Ray."""

__version__ = "0.1.0"
