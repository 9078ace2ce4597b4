"""ta_vae: the sample code's VAE with its recipe (Adam 1e-3, batch 2000, 50 epochs, constant
rate, MSE + KLD, no crop); scored on a sampled z as the sample code does (score.sample)."""

from hw8jax.config import apply_arg, base_config


def get_config(arg=None):
  return apply_arg(base_config("ta_vae"), arg)
