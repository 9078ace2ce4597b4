"""The seed's medium baseline (12288-1024-512-256-64-10), on the sample code's recipe.

The seed changes only the architecture."""

from hw8jax.configs import default


def get_config(arg=None):
  """`:quick` shrinks the run to 20 steps, `:demo` trains on the bundled demo set."""
  return default.for_model("fcn_medium", arg)
