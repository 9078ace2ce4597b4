"""ta_cnn: the sample code's conv autoencoder (the seed's "simple" baseline), with the sample
code's recipe (Adam 1e-3, batch 2000, 50 epochs, constant rate, MSE, no crop)."""

from hw8jax.config import apply_arg, base_config


def get_config(arg=None):
  return apply_arg(base_config("ta_cnn"), arg)
