"""Losses: pure functions of tensors returning (loss, dict of floats for logging)."""
from step_ray.losses.triplet import embedding_l2_penalty, triplet_loss

__all__ = ["embedding_l2_penalty", "triplet_loss"]
