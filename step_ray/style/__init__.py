"""Style statistics (docs/method.md §2): VGG features, Gram matrices, the exact style distance, its descriptor
form, descriptor reduction, and the Ray Data job that computes descriptors for a whole dataset (statistics.py).

Names are imported on first use (PEP 562): Ray task workers import `step_ray.style.stages` through this
package and must not pay for torch, which the other modules need.
"""
from importlib import import_module

_EXPORTS = {
    "VGGConfig": "vgg",
    "VGGFeatures": "vgg",
    "load_vgg": "vgg",
    "vgg_weight_source": "vgg",
    "gram_matrices": "gram",
    "style_distance": "gram",
    "style_descriptor": "gram",
    "descriptor_size": "gram",
    "descriptors_from_images": "gram",
    "exact_distance_matrix": "gram",
    "Reduction": "reduce",
    "ReductionConfig": "reduce",
    "StyleStatsConfig": "statistics",
    "compute_style_stats": "statistics",
    "read_descriptors": "statistics",
    "read_descriptor_rows": "statistics",
    "read_metadata": "statistics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'step_ray.style' has no attribute '{name}'")
    value = getattr(import_module(f"step_ray.style.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
