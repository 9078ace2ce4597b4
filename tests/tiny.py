"""A test-only variant for pipeline tests: every path the real variants take through training
and scoring (train/eval BatchNorm, a PReLU, sampled VAE noise, strided convs and the sub-pixel
transposed convs under a sharded batch), on a model of about 3,000 parameters.

Tests of resume, multi-device runs, scoring outputs, the NaN stop and mixed precision are about
the pipeline, not the model; on fcn_boss (122 M parameters) they spent most of the suite's time
and memory setting up. Register it in-process with `register()`; a subprocess runs launch.py
through `tests/tiny_launch.py`, which registers it first.
"""

from __future__ import annotations

import jax
from flax import nnx

from hw8jax import losses, models
from hw8jax.models import layers
from hw8jax.models.cnn import reparameterize

NAME = "tiny"


class TinyVAE(nnx.Module):
  """64x64x3 -> 16x16x8 (conv, BatchNorm, PReLU, conv) -> mu, logvar 8x8x4 -> sampled z ->
  three transposed convs (BatchNorm after the first) -> 64x64x3, Tanh."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.encoder = nnx.Sequential(layers.conv(3, 4, 4, 2, 1, rngs=rngs), layers.BatchNorm(4),
                                  layers.prelu(), layers.conv(4, 8, 4, 2, 1, rngs=rngs),
                                  layers.relu)
    self.mu = layers.conv(8, 4, 4, 2, 1, rngs=rngs)
    self.logvar = layers.conv(8, 4, 4, 2, 1, rngs=rngs)
    self.decoder = nnx.Sequential(layers.conv_transpose(4, 8, rngs=rngs), layers.BatchNorm(8),
                                  layers.relu, layers.conv_transpose(8, 4, rngs=rngs),
                                  layers.relu, layers.conv_transpose(4, 3, rngs=rngs),
                                  layers.tanh)

  def encode(self, x: jax.Array) -> jax.Array:
    return self.mu(self.encoder(x))

  def decode(self, z: jax.Array) -> jax.Array:
    return self.decoder(z)

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None):
    h = self.encoder(x)
    mu, logvar = self.mu(h), self.logvar(h)
    return self.decode(reparameterize(mu, logvar, rngs)), {"mu": mu, "logvar": logvar}


def register() -> None:
  models.register(NAME, TinyVAE, loss=losses.vae_loss, stochastic=True)
