"""The sample code's convolutional autoencoder (`ta_cnn`) and VAE (`ta_vae`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hw8jax.models import layers


def down(in_ch: int, out_ch: int, *, rngs: nnx.Rngs) -> nnx.Conv:
  return layers.conv(in_ch, out_ch, 4, 2, 1, rngs=rngs)


def up(in_ch: int, out_ch: int, *, rngs: nnx.Rngs) -> nnx.ConvTranspose:
  return layers.conv_transpose(in_ch, out_ch, 4, 2, 1, rngs=rngs)


def ta_decoder(*, rngs: nnx.Rngs) -> nnx.Sequential:
  """48x8x8 -> 3x64x64: three k4 s2 p1 transposed convs, ReLU between, Tanh at the end."""
  return nnx.Sequential(up(48, 24, rngs=rngs), layers.relu, up(24, 12, rngs=rngs), layers.relu,
                        up(12, 3, rngs=rngs), layers.tanh)


def reparameterize(mu: jax.Array, logvar: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
  """z = mu + eps * exp(logvar / 2) with eps ~ N(0, 1) from `rngs.noise`; z = mu without rngs."""
  if rngs is None:
    return mu
  eps = layers.normal(rngs, mu.shape, mu.dtype)
  return mu + eps * jnp.exp(0.5 * logvar)


class ConvAE(nnx.Module):
  """`ta_cnn`: three k4 s2 p1 convs down to a 48x8x8 latent and three transposed convs back."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.encoder = nnx.Sequential(down(3, 12, rngs=rngs), layers.relu, down(12, 24, rngs=rngs),
                                  layers.relu, down(24, 48, rngs=rngs), layers.relu)
    self.decoder = ta_decoder(rngs=rngs)

  def encode(self, x: jax.Array) -> jax.Array:
    return self.encoder(x)

  def decode(self, z: jax.Array) -> jax.Array:
    return self.decoder(z)

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None):
    del rngs  # deterministic
    z = self.encode(x)
    return self.decode(z), {"z": z}


class ConvVAE(nnx.Module):
  """`ta_vae`: two shared convs, then a mu head and a logvar head (each a conv and a ReLU, as
  the sample code has it), a sampled 48x8x8 z, and `ta_cnn`'s decoder."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.encoder = nnx.Sequential(down(3, 12, rngs=rngs), layers.relu, down(12, 24, rngs=rngs),
                                  layers.relu)
    self.enc_out_1 = nnx.Sequential(down(24, 48, rngs=rngs), layers.relu)
    self.enc_out_2 = nnx.Sequential(down(24, 48, rngs=rngs), layers.relu)
    self.decoder = ta_decoder(rngs=rngs)

  def moments(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = self.encoder(x)
    return self.enc_out_1(h), self.enc_out_2(h)

  def encode(self, x: jax.Array) -> jax.Array:
    return self.moments(x)[0]

  def decode(self, z: jax.Array) -> jax.Array:
    return self.decoder(z)

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None):
    """Reconstruction of a sampled z (z = mu when `rngs` is None)."""
    mu, logvar = self.moments(x)
    return self.decode(reparameterize(mu, logvar, rngs)), {"mu": mu, "logvar": logvar}


def ta_cnn(*, rngs: nnx.Rngs) -> ConvAE:
  return ConvAE(rngs=rngs)


def ta_vae(*, rngs: nnx.Rngs) -> ConvVAE:
  return ConvVAE(rngs=rngs)
