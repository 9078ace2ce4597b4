"""The course sample code's VAE (MSE + KLD), on its recipe.

Scored on a sampled z, as the sample code scores it (`score.sample`, the default).
"""

from hw8jax.configs import default


def get_config(arg=None):
  """`:quick` shrinks the run to 20 steps, `:demo` trains on the bundled demo set."""
  return default.for_model("ta_vae", arg)
