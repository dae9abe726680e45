"""Losses: pure functions of tensors returning (loss, dict of floats for logging)."""
from step_ray.losses.gan import lsgan_discriminator_loss, lsgan_generator_loss
from step_ray.losses.latent import kl_to_standard_normal, latent_reconstruction_loss
from step_ray.losses.perceptual import feature_matching_loss, l1_loss, vgg_perceptual_loss
from step_ray.losses.triplet import embedding_l2_penalty, triplet_loss

__all__ = ["embedding_l2_penalty", "triplet_loss", "lsgan_discriminator_loss", "lsgan_generator_loss",
           "kl_to_standard_normal", "latent_reconstruction_loss", "feature_matching_loss", "l1_loss",
           "vgg_perceptual_loss"]
