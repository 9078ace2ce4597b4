"""Fully connected autoencoders: the sample code's `ta_fcn` and the seed's medium, strong, boss."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from flax import nnx

from hw8jax.models import layers

IMAGE_CHW = (3, 64, 64)
IMAGE_DIM = 3 * 64 * 64


def relu_block(width: int) -> list:
  del width
  return [layers.relu]


def bn_prelu_block(width: int) -> list:
  return [layers.BatchNorm(width), layers.prelu()]


def mlp(dims: Sequence[int], block: Callable[[int], list], *, rngs: nnx.Rngs, last: list = (),
        in_chw=None, out_chw=None) -> nnx.Sequential:
  """Linear layers through `dims`, `block(width)` after each but the last, `last` after that."""
  entries = []
  for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
    is_first, is_last = i == 0, i == len(dims) - 2
    entries.append(layers.Linear(din, dout, rngs=rngs, in_chw=in_chw if is_first else None,
                                 out_chw=out_chw if is_last else None))
    entries.extend(last if is_last else block(dout))
  return nnx.Sequential(*entries)


class FullyConnectedAE(nnx.Module):
  """Image -> flat vector -> latent -> flat vector -> image, Tanh at the end.

  `encoder` and `decoder` hold the layers of the original's two `nn.Sequential`s, in order.
  """

  def __init__(self, encoder_dims: Sequence[int], decoder_dims: Sequence[int],
               block: Callable[[int], list], *, rngs: nnx.Rngs):
    self.encoder = mlp([IMAGE_DIM, *encoder_dims], block, rngs=rngs, in_chw=IMAGE_CHW)
    self.decoder = mlp([*decoder_dims, IMAGE_DIM], block, rngs=rngs, last=[layers.tanh],
                       out_chw=IMAGE_CHW)

  def encode(self, x: jax.Array) -> jax.Array:
    return self.encoder(x.reshape(x.shape[0], -1))

  def decode(self, z: jax.Array) -> jax.Array:
    return self.decoder(z).reshape(z.shape[0], 64, 64, 3)

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None):
    del rngs  # deterministic
    z = self.encode(x)
    return self.decode(z), {"z": z}


def ta_fcn(*, rngs: nnx.Rngs) -> FullyConnectedAE:
  # The sample code's final encoder layer (12 -> 3) has a ReLU before it, none after.
  return FullyConnectedAE([128, 64, 12, 3], [3, 12, 64, 128], relu_block, rngs=rngs)


def fcn_medium(*, rngs: nnx.Rngs) -> FullyConnectedAE:
  return FullyConnectedAE([1024, 512, 256, 64, 10], [10, 64, 256, 512, 1024], relu_block,
                          rngs=rngs)


def fcn_strong(*, rngs: nnx.Rngs) -> FullyConnectedAE:
  return FullyConnectedAE([2048, 1024, 512, 256, 128], [128, 256, 512, 1024, 2048], relu_block,
                          rngs=rngs)


def fcn_boss(*, rngs: nnx.Rngs) -> FullyConnectedAE:
  return FullyConnectedAE([4096, 2048, 1024, 256, 128], [128, 256, 1024, 2048, 4096],
                          bn_prelu_block, rngs=rngs)
