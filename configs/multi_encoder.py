"""The seed's multi-encoder autoencoder (FCN + CNN + VAE encoders), on the sample code's recipe.

Its author reports it never beat the strong baseline. Its loss (summed MSE + 0.1 KLD + 0.05
consistency) is the variant's (hw8jax.models); the seed gives no recipe."""

from hw8jax.configs import default


def get_config(arg=None):
  """`:quick` shrinks the run to 20 steps, `:demo` trains on the bundled demo set."""
  return default.for_model("multi_encoder", arg)
