"""The seed's strong baseline (12288-2048-1024-512-256-128), on the sample code's recipe.

The seed changes only the architecture."""

from hw8jax.configs import default


def get_config(arg=None):
  """`:quick` shrinks the run to 20 steps, `:demo` trains on the bundled demo set."""
  return default.for_model("fcn_strong", arg)
