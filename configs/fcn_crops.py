"""One member of the multi-crop ensemble: `configs/fcn_crops.py:N` trains on crop N (0, 1, 2),
`:N,quick` shrinks it like :quick (where each value comes from: hw8jax/recipes.py)."""

from hw8jax.recipes import get_config as recipe


def get_config(arg="0"):
  return recipe("fcn_crops", arg)
