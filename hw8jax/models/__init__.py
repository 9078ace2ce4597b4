"""Every autoencoder variant behind one registry.

All models take NHWC float32 images (B, 64, 64, 3) in [-1, 1] and have `encode(x)`, `decode(z)`
and `__call__(x, rngs=None) -> (reconstruction, aux)`. `decode(encode(x))` is the deterministic
reconstruction; `__call__` samples (VAE z, resnet latent noise) from `rngs.noise` when given.
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from hw8jax import losses, runtime
from hw8jax.models import layers
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
# The originals, in the order the README lists them; `register` adds to REGISTRY, not to these.
VARIANTS = tuple(REGISTRY)
# Variants whose `__call__` draws noise when given rngs.
STOCHASTIC = {"ta_vae", "multi_encoder", "resnet_boss"}


def register(name: str, builder: Callable[..., nnx.Module], *, loss: Callable,
             stochastic: bool = False) -> None:
  """Add a variant: `builder(rngs=...)` returns a model with the contract above and `loss(x,
  recon, aux) -> (loss, terms)` is its training loss (`hw8jax.losses`). After this, configs may
  name it in `model` (in this process: a launch in another process must register it too).
  The builder is run once abstractly (no weights drawn) to check what the model keeps."""
  if name in VARIANTS:
    raise ValueError(f"model {name!r} is an original variant; choose another name")
  _check_state(name, builder)
  REGISTRY[name] = builder
  losses.LOSSES[name] = loss
  if stochastic:
    STOCHASTIC.add(name)
  else:
    STOCHASTIC.discard(name)


def _check_state(name: str, builder: Callable[..., nnx.Module]) -> None:
  """A run trains, checkpoints and restores a model's `nnx.Param`s and `nnx.BatchStat`s; any other
  state (a key kept by `nnx.Dropout(..., rngs=...)`, a custom variable) would be lost."""
  _, _, _, other = nnx.split(nnx.eval_shape(lambda: builder(rngs=nnx.Rngs(0))),
                             nnx.Param, nnx.BatchStat, ...)
  paths = [".".join(map(str, path)) for path, _ in nnx.to_flat_state(other)]
  if paths:
    raise ValueError(f"model {name!r} keeps state other than nnx.Param and nnx.BatchStat "
                     f"({', '.join(paths)}); hw8jax trains and checkpoints only those: take "
                     "randomness as a call argument (`rngs`) instead of keeping it")


def build(name: str, *, rngs: nnx.Rngs) -> nnx.Module:
  """A freshly initialised model of variant `name` (in training mode, as PyTorch builds it)."""
  if name not in REGISTRY:
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(REGISTRY)}")
  return REGISTRY[name](rngs=rngs)


def set_fast_paths(model: nnx.Module, setting: str) -> None:
  """Every conv of `model` follows the `cpu_fast_paths` setting ("auto", "on" or "off";
  `hw8jax.models.convolution`). A static attribute, so a function jitted with one setting is
  not reused for another."""
  runtime.cpu_fast_paths(setting)  # checks the name
  for _, module in nnx.iter_modules(model):
    if isinstance(module, (layers.Conv, layers.ConvTranspose)):
      module.fast_paths = setting
