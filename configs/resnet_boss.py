"""The resnet_boss recipe (where each value comes from: hw8jax/recipes.py)."""

from hw8jax.recipes import get_config as recipe


def get_config(arg=None):
  return recipe("resnet_boss", arg)
