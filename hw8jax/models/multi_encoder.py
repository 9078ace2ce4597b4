"""The seed's multi-encoder autoencoder: FCN, CNN and VAE encoders fused into one conv decoder.

The seed's unused `FeatureFusion` attention module is not reproduced: no model calls it and it
holds no weights of any trained original.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from hw8jax.models import layers
from hw8jax.models.cnn import down, reparameterize, up
from hw8jax.models.fcn import IMAGE_CHW, IMAGE_DIM

FEATURE_CHW = (48, 8, 8)


def bn2d_lrelu(ch: int) -> list:
  return [layers.BatchNorm(ch), layers.leaky_relu]


class ResidualBlock(nnx.Module):
  """Two 3x3 convs with BatchNorm, plus a 1x1 conv shortcut when channels change; LeakyReLU(0.2)."""

  def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
    self.conv = nnx.Sequential(layers.conv(in_ch, out_ch, 3, 1, 1, rngs=rngs),
                               layers.BatchNorm(out_ch), layers.leaky_relu,
                               layers.conv(out_ch, out_ch, 3, 1, 1, rngs=rngs),
                               layers.BatchNorm(out_ch))
    self.shortcut = layers.conv(in_ch, out_ch, 1, rngs=rngs) if in_ch != out_ch else None

  def __call__(self, x: jax.Array) -> jax.Array:
    skip = x if self.shortcut is None else self.shortcut(x)
    return layers.leaky_relu(self.conv(x) + skip)


class FCNEncoder(nnx.Module):
  """12288-2048-1024-512-256-64-10, BatchNorm + LeakyReLU(0.2) after each hidden layer."""

  def __init__(self, *, rngs: nnx.Rngs):
    dims = [IMAGE_DIM, 2048, 1024, 512, 256, 64]
    entries = []
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
      entries += [layers.Linear(din, dout, rngs=rngs, in_chw=IMAGE_CHW if i == 0 else None),
                  *bn2d_lrelu(dout)]
    entries.append(layers.Linear(64, 10, rngs=rngs))
    self.net = nnx.Sequential(*entries)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.net(x.reshape(x.shape[0], -1))


class CNNEncoder(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.net = nnx.Sequential(down(3, 12, rngs=rngs), *bn2d_lrelu(12),
                              down(12, 24, rngs=rngs), *bn2d_lrelu(24),
                              ResidualBlock(24, 48, rngs=rngs),
                              down(48, 48, rngs=rngs), *bn2d_lrelu(48))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.net(x)


class VAEEncoder(nnx.Module):
  """Two convs with BatchNorm + LeakyReLU, then plain conv heads for mu and logvar."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.encoder = nnx.Sequential(down(3, 12, rngs=rngs), *bn2d_lrelu(12),
                                  down(12, 24, rngs=rngs), *bn2d_lrelu(24))
    self.fc_mu = down(24, 48, rngs=rngs)
    self.fc_logvar = down(24, 48, rngs=rngs)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    h = self.encoder(x)
    return self.fc_mu(h), self.fc_logvar(h)


class MultiEncoderAE(nnx.Module):
  """`multi_encoder`. The latent `encode` returns is the fused 8x8x144 feature map (VAE part at
  z = mu); `__call__` samples the VAE part from `rngs.noise` when rngs are given."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.encoder_fcn = FCNEncoder(rngs=rngs)
    self.encoder_cnn = CNNEncoder(rngs=rngs)
    self.encoder_vae = VAEEncoder(rngs=rngs)
    self.fcn_to_feature = nnx.Sequential(
        layers.Linear(10, 128, rngs=rngs), layers.leaky_relu,
        layers.Linear(128, 256, rngs=rngs), layers.leaky_relu,
        layers.Linear(256, 48 * 8 * 8, rngs=rngs, out_chw=FEATURE_CHW), layers.leaky_relu)
    self.feature_fusion = nnx.Sequential(layers.conv(144, 144, 1, rngs=rngs), *bn2d_lrelu(144))
    self.decoder = nnx.Sequential(
        ResidualBlock(144, 128, rngs=rngs), up(128, 128, rngs=rngs), *bn2d_lrelu(128),
        ResidualBlock(128, 64, rngs=rngs), up(64, 64, rngs=rngs), *bn2d_lrelu(64),
        ResidualBlock(64, 32, rngs=rngs), up(32, 32, rngs=rngs), *bn2d_lrelu(32),
        layers.conv(32, 3, 3, 1, 1, rngs=rngs), layers.tanh)

  def features(self, x: jax.Array, rngs: nnx.Rngs | None = None):
    """The fused feature map and what the loss needs from the three encoders."""
    fcn_feat = self.fcn_to_feature(self.encoder_fcn(x)).reshape(x.shape[0], 8, 8, 48)
    cnn_feat = self.encoder_cnn(x)
    mu, logvar = self.encoder_vae(x)
    z_vae = reparameterize(mu, logvar, rngs)
    fused = self.feature_fusion(jnp.concatenate([fcn_feat, cnn_feat, z_vae], axis=-1))
    return fused, {"mu": mu, "logvar": logvar, "fcn_feat": fcn_feat, "cnn_feat": cnn_feat}

  def encode(self, x: jax.Array) -> jax.Array:
    return self.features(x)[0]

  def decode(self, z: jax.Array) -> jax.Array:
    return self.decoder(z)

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None):
    fused, aux = self.features(x, rngs)
    return self.decode(fused), aux


def multi_encoder(*, rngs: nnx.Rngs) -> MultiEncoderAE:
  return MultiEncoderAE(rngs=rngs)
