"""multi_encoder: the seed's multi-encoder autoencoder (which its author reports never beat the
strong baseline). Loss from the seed (summed MSE + 0.1 KLD + 0.05 consistency; see
hw8jax.losses); the seed is silent on the recipe, so it is the sample code's (Adam 1e-3,
batch 2000, 50 epochs, constant rate, no crop)."""

from hw8jax.config import apply_arg, base_config


def get_config(arg=None):
  return apply_arg(base_config("multi_encoder"), arg)
