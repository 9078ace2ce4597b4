"""The course sample code's fully connected autoencoder (12288-128-64-12-3), with its recipe."""

from hw8jax.configs import default


def get_config(arg=None):
  """`:quick` shrinks the run to 20 steps, `:demo` trains on the bundled demo set."""
  return default.for_model("ta_fcn", arg)
