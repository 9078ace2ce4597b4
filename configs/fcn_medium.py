"""fcn_medium: the seed's medium baseline. The seed changes only the architecture, so the rest
is the sample code's recipe (Adam 1e-3, batch 2000, 50 epochs, constant rate, no crop)."""

from hw8jax.config import apply_arg, base_config


def get_config(arg=None):
  return apply_arg(base_config("fcn_medium"), arg)
