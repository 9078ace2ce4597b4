"""The seed's boss model: a ResNet-18 encoder, a decoder and a clean-or-noisy classifier.

The transposed-conv decoder is fed a clean and a noisy latent, and the small classifier tells
the two reconstructions apart."""

from __future__ import annotations

import functools

import jax
from flax import nnx

from hw8jax.models import layers
from hw8jax.models.cnn import up

LATENT_DIM = 256
NOISE_STD = 0.1
FEATURE_CHW = (512, 2, 2)

resnet_conv = functools.partial(layers.conv, bias=False, kernel_init=layers.resnet_kernel_init)


class TorchvisionBlock(nnx.Module):
  """torchvision's `BasicBlock` (attribute names kept for the weight import)."""

  def __init__(self, in_ch: int, out_ch: int, stride: int, *, rngs: nnx.Rngs):
    self.conv1 = resnet_conv(in_ch, out_ch, 3, stride, 1, rngs=rngs)
    self.bn1 = layers.BatchNorm(out_ch)
    self.conv2 = resnet_conv(out_ch, out_ch, 3, 1, 1, rngs=rngs)
    self.bn2 = layers.BatchNorm(out_ch)
    projects = stride != 1 or in_ch != out_ch
    self.downsample = nnx.Sequential(resnet_conv(in_ch, out_ch, 1, stride, rngs=rngs),
                                     layers.BatchNorm(out_ch)) if projects else None

  def __call__(self, x: jax.Array) -> jax.Array:
    out = layers.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return layers.relu(out + (x if self.downsample is None else self.downsample(x)))


class ShortcutBlock(nnx.Module):
  """The seed's own decoder `BasicBlock`: like torchvision's, with PyTorch's default init and the
  projection called `shortcut`."""

  def __init__(self, in_ch: int, out_ch: int, stride: int = 1, *, rngs: nnx.Rngs):
    self.conv1 = layers.conv(in_ch, out_ch, 3, stride, 1, bias=False, rngs=rngs)
    self.bn1 = layers.BatchNorm(out_ch)
    self.conv2 = layers.conv(out_ch, out_ch, 3, 1, 1, bias=False, rngs=rngs)
    self.bn2 = layers.BatchNorm(out_ch)
    projects = stride != 1 or in_ch != out_ch
    self.shortcut = nnx.Sequential(layers.conv(in_ch, out_ch, 1, stride, bias=False, rngs=rngs),
                                   layers.BatchNorm(out_ch)) if projects else None

  def __call__(self, x: jax.Array) -> jax.Array:
    out = layers.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return layers.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def resnet_stage(in_ch: int, out_ch: int, stride: int, *, rngs: nnx.Rngs) -> nnx.Sequential:
  return nnx.Sequential(TorchvisionBlock(in_ch, out_ch, stride, rngs=rngs),
                        TorchvisionBlock(out_ch, out_ch, 1, rngs=rngs))


class ResNetEncoder(nnx.Module):
  """ResNet-18 without avgpool/fc (64x64 -> 512x2x2), then Linear(2048, 256)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.encoder = nnx.Sequential(
        resnet_conv(3, 64, 7, 2, 3, rngs=rngs), layers.BatchNorm(64), layers.relu,
        layers.max_pool_3x3_s2,
        resnet_stage(64, 64, 1, rngs=rngs), resnet_stage(64, 128, 2, rngs=rngs),
        resnet_stage(128, 256, 2, rngs=rngs), resnet_stage(256, 512, 2, rngs=rngs))
    self.fc = layers.Linear(512 * 2 * 2, LATENT_DIM, rngs=rngs, in_chw=FEATURE_CHW)

  def __call__(self, x: jax.Array) -> jax.Array:
    feat = self.encoder(x)
    return self.fc(feat.reshape(x.shape[0], -1))


class ResNetDecoder(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.fc = layers.Linear(LATENT_DIM, 512 * 2 * 2, rngs=rngs, out_chw=FEATURE_CHW)

    def up_bn_relu(i, o):
      return [up(i, o, rngs=rngs), layers.BatchNorm(o), layers.relu]

    self.decoder = nnx.Sequential(
        *up_bn_relu(512, 256), ShortcutBlock(256, 128, rngs=rngs),
        *up_bn_relu(128, 128), ShortcutBlock(128, 64, rngs=rngs),
        *up_bn_relu(64, 64), *up_bn_relu(64, 32),
        up(32, 3, rngs=rngs), layers.tanh)

  def __call__(self, z: jax.Array) -> jax.Array:
    return self.decoder(self.fc(z).reshape(z.shape[0], 2, 2, 512))


class ImageClassifier(nnx.Module):
  """Three stride-2 convs with BatchNorm + ReLU, global average pool, Linear(128, 2)."""

  def __init__(self, *, rngs: nnx.Rngs):
    def conv_bn_relu(i, o):
      return [layers.conv(i, o, 3, 2, 1, rngs=rngs), layers.BatchNorm(o), layers.relu]

    self.net = nnx.Sequential(*conv_bn_relu(3, 32), *conv_bn_relu(32, 64),
                              *conv_bn_relu(64, 128), layers.global_avg_pool, layers.flatten,
                              layers.Linear(128, 2, rngs=rngs))

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.net(x)


class ResNetAE(nnx.Module):
  """`resnet_boss`. Scored by the reconstruction of the clean latent; the noisy branch and the
  classifier only shape training. Without `rngs` the noise is zero."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.encoder = ResNetEncoder(rngs=rngs)
    self.decoder = ResNetDecoder(rngs=rngs)
    self.classifier = ImageClassifier(rngs=rngs)

  def encode(self, x: jax.Array) -> jax.Array:
    return self.encoder(x)

  def decode(self, z: jax.Array) -> jax.Array:
    return self.decoder(z)

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None):
    z = self.encode(x)
    recon = self.decode(z)
    z_noise = z
    if rngs is not None:
      z_noise = z + NOISE_STD * layers.normal(rngs, z.shape, z.dtype)
    recon_noise = self.decode(z_noise)
    aux = {"z": z, "recon_noise": recon_noise, "logits": self.classifier(recon),
           "logits_noise": self.classifier(recon_noise)}
    return recon, aux


def resnet_boss(*, rngs: nnx.Rngs) -> ResNetAE:
  return ResNetAE(rngs=rngs)
