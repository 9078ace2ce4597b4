"""ta_fcn: the course sample code's fully connected autoencoder, with its recipe (Adam 1e-3,
batch 2000, 50 epochs, constant rate, MSE, no crop: all from the sample code)."""

from hw8jax.config import apply_arg, base_config


def get_config(arg=None):
  return apply_arg(base_config("ta_fcn"), arg)
