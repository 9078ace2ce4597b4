"""Every autoencoder variant behind one registry.

All models take NHWC float32 images (B, 64, 64, 3) in [-1, 1] and have `encode(x)`, `decode(z)`
and `__call__(x, rngs=None) -> (reconstruction, aux)`. `decode(encode(x))` is the deterministic
reconstruction; `__call__` samples (VAE z, resnet latent noise) from `rngs.noise` when given.
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from hw8jax.models.cnn import ta_cnn, ta_vae
from hw8jax.models.fcn import fcn_boss, fcn_medium, fcn_strong, ta_fcn
from hw8jax.models.multi_encoder import multi_encoder
from hw8jax.models.resnet import resnet_boss

REGISTRY: dict[str, Callable[..., nnx.Module]] = {
    "ta_fcn": ta_fcn,
    "ta_cnn": ta_cnn,
    "ta_vae": ta_vae,
    "fcn_medium": fcn_medium,
    "fcn_strong": fcn_strong,
    "fcn_boss": fcn_boss,
    "multi_encoder": multi_encoder,
    "resnet_boss": resnet_boss,
}
VARIANTS = tuple(REGISTRY)
# Variants whose `__call__` draws noise when given rngs.
STOCHASTIC = ("ta_vae", "multi_encoder", "resnet_boss")


def build(name: str, *, rngs: nnx.Rngs) -> nnx.Module:
  """A freshly initialised model of variant `name` (in training mode, as PyTorch builds it)."""
  if name not in REGISTRY:
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)}")
  return REGISTRY[name](rngs=rngs)
