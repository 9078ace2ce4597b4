"""Every autoencoder variant behind one registry.

All models take NHWC float32 images (B, 64, 64, 3) in [-1, 1] and have `encode(x)`, `decode(z)`
and `__call__(x, rngs=None) -> (reconstruction, aux)`. `decode(encode(x))` is the deterministic
reconstruction; `__call__` samples (VAE z, resnet latent noise) from `rngs.noise` when given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax import nnx

from hw8jax import losses
from hw8jax.models import layers
from hw8jax.models.cnn import ta_cnn, ta_vae
from hw8jax.models.fcn import fcn_boss, fcn_medium, fcn_strong, ta_fcn
from hw8jax.models.multi_encoder import multi_encoder
from hw8jax.models.resnet import resnet_boss


@dataclasses.dataclass(frozen=True)
class Variant:
  """Everything hw8jax knows of a variant."""
  build: Callable[..., nnx.Module]  # build(rngs=...): a fresh model, in training mode
  loss: Callable                    # loss(x, recon, aux) -> (loss, named terms), `hw8jax.losses`
  stochastic: bool = False          # whether __call__ draws noise when given rngs


REGISTRY: dict[str, Variant] = {
    "ta_fcn": Variant(ta_fcn, losses.reconstruction_loss),
    "ta_cnn": Variant(ta_cnn, losses.reconstruction_loss),
    "ta_vae": Variant(ta_vae, losses.vae_loss, stochastic=True),
    "fcn_medium": Variant(fcn_medium, losses.reconstruction_loss),
    "fcn_strong": Variant(fcn_strong, losses.reconstruction_loss),
    "fcn_boss": Variant(fcn_boss, losses.reconstruction_loss),
    "multi_encoder": Variant(multi_encoder, losses.multi_encoder_loss, stochastic=True),
    "resnet_boss": Variant(resnet_boss, losses.resnet_loss, stochastic=True),
}
# The originals, in the order the README lists them; `register` adds to REGISTRY only.
VARIANTS = tuple(REGISTRY)


def variant(name: str) -> Variant:
  if name not in REGISTRY:
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(REGISTRY)}")
  return REGISTRY[name]


def register(name: str, builder: Callable[..., nnx.Module], *, loss: Callable,
             stochastic: bool = False) -> None:
  """Add a variant: `builder(rngs=...)` returns a model with the contract above and `loss(x,
  recon, aux) -> (loss, terms)` is its training loss (`hw8jax.losses`). After this, configs may
  name it in `model` (in this process: a launch in another process must register it too).
  The builder is run once abstractly (no weights drawn) to check what the model keeps."""
  if name in VARIANTS:
    raise ValueError(f"model {name!r} is an original variant; choose another name")
  _check_state(name, builder)
  REGISTRY[name] = Variant(builder, loss, stochastic)


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
  return variant(name).build(rngs=rngs)


def set_fast_paths(model: nnx.Module, fast_paths: bool) -> None:
  """Every conv of `model` follows the CPU policy `fast_paths` (`hw8jax.cpu_tuning`; its forms
  in `hw8jax.models.convolution`). A static attribute, so a function jitted under one policy is
  not reused for the other."""
  if not isinstance(fast_paths, bool):
    raise TypeError(f"fast_paths={fast_paths!r}: a bool, the resolved CPU policy")
  for _, module in nnx.iter_modules(model):
    if isinstance(module, (layers.Conv, layers.ConvTranspose)):
      module.fast_paths = fast_paths
