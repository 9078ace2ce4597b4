"""The course sample code's convolutional autoencoder (three k4 s2 convs to 48x8x8).

Its recipe is the sample code's, `configs/default.py`, unchanged."""

from hw8jax.configs import default


def get_config(arg=None):
  """`:quick` shrinks the run to 20 steps, `:demo` trains on the bundled demo set."""
  return default.for_model("ta_cnn", arg)
