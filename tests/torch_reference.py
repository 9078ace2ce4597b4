"""PyTorch references of every variant, written for the parity tests from the spec.

Parameter names follow the originals' classes (what their `state_dict`s hold). `forward` takes
NCHW images in [-1, 1] and returns `(recon NCHW, aux)` with aux named as in hw8jax; noise is
injected (`eps`/`noise` arguments) so both sides can use the same draw. The ResNet-18 encoder is
built here with torchvision's module names because torchvision is not a test dependency.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fc_stack(dims, hidden, last=()):
  mods = []
  for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
    mods.append(nn.Linear(a, b))
    mods.extend(last if i == len(dims) - 2 else hidden(b))
  return nn.Sequential(*mods)


def relu_hidden(width):
  return [nn.ReLU()]


def bn_prelu_hidden(width):
  return [nn.BatchNorm1d(width), nn.PReLU()]


class FCN(nn.Module):
  def __init__(self, enc, dec, hidden):
    super().__init__()
    self.encoder = fc_stack([12288, *enc], hidden)
    self.decoder = fc_stack([*dec, 12288], hidden, last=[nn.Tanh()])

  def forward(self, x):
    z = self.encoder(x.flatten(1))
    return self.decoder(z).view(-1, 3, 64, 64), {"z": z}


def ta_fcn():
  return FCN([128, 64, 12, 3], [3, 12, 64, 128], relu_hidden)


def fcn_medium():
  return FCN([1024, 512, 256, 64, 10], [10, 64, 256, 512, 1024], relu_hidden)


def fcn_strong():
  return FCN([2048, 1024, 512, 256, 128], [128, 256, 512, 1024, 2048], relu_hidden)


def fcn_boss():
  return FCN([4096, 2048, 1024, 256, 128], [128, 256, 1024, 2048, 4096], bn_prelu_hidden)


def down(a, b):
  return nn.Conv2d(a, b, 4, 2, 1)


def up(a, b):
  return nn.ConvTranspose2d(a, b, 4, 2, 1)


def ta_decoder():
  return nn.Sequential(up(48, 24), nn.ReLU(), up(24, 12), nn.ReLU(), up(12, 3), nn.Tanh())


class TACNN(nn.Module):
  def __init__(self):
    super().__init__()
    self.encoder = nn.Sequential(down(3, 12), nn.ReLU(), down(12, 24), nn.ReLU(), down(24, 48),
                                 nn.ReLU())
    self.decoder = ta_decoder()

  def forward(self, x):
    z = self.encoder(x)
    return self.decoder(z), {"z": z}


class TAVAE(nn.Module):
  def __init__(self):
    super().__init__()
    self.encoder = nn.Sequential(down(3, 12), nn.ReLU(), down(12, 24), nn.ReLU())
    self.enc_out_1 = nn.Sequential(down(24, 48), nn.ReLU())
    self.enc_out_2 = nn.Sequential(down(24, 48), nn.ReLU())
    self.decoder = ta_decoder()

  def forward(self, x, eps=None):
    h = self.encoder(x)
    mu, logvar = self.enc_out_1(h), self.enc_out_2(h)
    z = mu if eps is None else mu + eps * torch.exp(0.5 * logvar)
    return self.decoder(z), {"mu": mu, "logvar": logvar}


def bn_lrelu(c, one_d=False):
  return [nn.BatchNorm1d(c) if one_d else nn.BatchNorm2d(c), nn.LeakyReLU(0.2)]


class ResidualBlock(nn.Module):
  def __init__(self, a, b):
    super().__init__()
    self.conv = nn.Sequential(nn.Conv2d(a, b, 3, 1, 1), nn.BatchNorm2d(b), nn.LeakyReLU(0.2),
                              nn.Conv2d(b, b, 3, 1, 1), nn.BatchNorm2d(b))
    self.shortcut = nn.Conv2d(a, b, 1) if a != b else nn.Identity()

  def forward(self, x):
    return F.leaky_relu(self.conv(x) + self.shortcut(x), 0.2)


class FCNEncoder(nn.Module):
  def __init__(self):
    super().__init__()
    dims = [12288, 2048, 1024, 512, 256, 64]
    mods = []
    for a, b in zip(dims[:-1], dims[1:], strict=True):
      mods += [nn.Linear(a, b), *bn_lrelu(b, one_d=True)]
    self.net = nn.Sequential(*mods, nn.Linear(64, 10))

  def forward(self, x):
    return self.net(x)


class CNNEncoder(nn.Module):
  def __init__(self):
    super().__init__()
    self.net = nn.Sequential(down(3, 12), *bn_lrelu(12), down(12, 24), *bn_lrelu(24),
                             ResidualBlock(24, 48), down(48, 48), *bn_lrelu(48))

  def forward(self, x):
    return self.net(x)


class VAEEncoder(nn.Module):
  def __init__(self):
    super().__init__()
    self.encoder = nn.Sequential(down(3, 12), *bn_lrelu(12), down(12, 24), *bn_lrelu(24))
    self.fc_mu = down(24, 48)
    self.fc_logvar = down(24, 48)

  def forward(self, x):
    h = self.encoder(x)
    return self.fc_mu(h), self.fc_logvar(h)


class MultiEncoder(nn.Module):
  def __init__(self):
    super().__init__()
    self.encoder_fcn = FCNEncoder()
    self.encoder_cnn = CNNEncoder()
    self.encoder_vae = VAEEncoder()
    self.fcn_to_feature = nn.Sequential(nn.Linear(10, 128), nn.LeakyReLU(0.2),
                                        nn.Linear(128, 256), nn.LeakyReLU(0.2),
                                        nn.Linear(256, 48 * 8 * 8), nn.LeakyReLU(0.2))
    self.feature_fusion = nn.Sequential(nn.Conv2d(144, 144, 1), *bn_lrelu(144))
    self.decoder = nn.Sequential(
        ResidualBlock(144, 128), up(128, 128), *bn_lrelu(128),
        ResidualBlock(128, 64), up(64, 64), *bn_lrelu(64),
        ResidualBlock(64, 32), up(32, 32), *bn_lrelu(32),
        nn.Conv2d(32, 3, 3, 1, 1), nn.Tanh())

  def forward(self, x, eps=None):
    fcn_feat = self.fcn_to_feature(self.encoder_fcn(x.flatten(1))).view(-1, 48, 8, 8)
    cnn_feat = self.encoder_cnn(x)
    mu, logvar = self.encoder_vae(x)
    z = mu if eps is None else mu + eps * torch.exp(0.5 * logvar)
    fused = self.feature_fusion(torch.cat([fcn_feat, cnn_feat, z], dim=1))
    aux = {"mu": mu, "logvar": logvar, "fcn_feat": fcn_feat, "cnn_feat": cnn_feat}
    return self.decoder(fused), aux


class TVBasicBlock(nn.Module):
  """torchvision.models.resnet.BasicBlock's structure and names."""

  def __init__(self, a, b, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(a, b, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(b)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(b, b, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(b)
    self.downsample = None
    if stride != 1 or a != b:
      self.downsample = nn.Sequential(nn.Conv2d(a, b, 1, stride, bias=False), nn.BatchNorm2d(b))

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet18_trunk():
  """conv1, bn1, relu, maxpool, layer1..layer4 of torchvision's resnet18, with its init."""
  def stage(a, b, s):
    return nn.Sequential(TVBasicBlock(a, b, s), TVBasicBlock(b, b, 1))
  trunk = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                        nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
                        stage(64, 64, 1), stage(64, 128, 2), stage(128, 256, 2),
                        stage(256, 512, 2))
  for m in trunk.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
  return trunk


class SeedBasicBlock(nn.Module):
  def __init__(self, a, b, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(a, b, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(b)
    self.conv2 = nn.Conv2d(b, b, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(b)
    self.shortcut = nn.Sequential()
    if stride != 1 or a != b:
      self.shortcut = nn.Sequential(nn.Conv2d(a, b, 1, stride, bias=False), nn.BatchNorm2d(b))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class ResNetEncoder(nn.Module):
  def __init__(self):
    super().__init__()
    self.encoder = resnet18_trunk()
    self.fc = nn.Linear(2048, 256)

  def forward(self, x):
    return self.fc(self.encoder(x).view(x.size(0), -1))


class ResNetDecoder(nn.Module):
  def __init__(self):
    super().__init__()
    self.fc = nn.Linear(256, 2048)

    def ubr(a, b):
      return [up(a, b), nn.BatchNorm2d(b), nn.ReLU(True)]
    self.decoder = nn.Sequential(*ubr(512, 256), SeedBasicBlock(256, 128), *ubr(128, 128),
                                 SeedBasicBlock(128, 64), *ubr(64, 64), *ubr(64, 32),
                                 up(32, 3), nn.Tanh())

  def forward(self, z):
    return self.decoder(self.fc(z).view(-1, 512, 2, 2))


class Classifier(nn.Module):
  def __init__(self):
    super().__init__()

    def cbr(a, b):
      return [nn.Conv2d(a, b, 3, 2, 1), nn.BatchNorm2d(b), nn.ReLU()]
    self.net = nn.Sequential(*cbr(3, 32), *cbr(32, 64), *cbr(64, 128), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(128, 2))

  def forward(self, x):
    return self.net(x)


class ResNetAE(nn.Module):
  def __init__(self):
    super().__init__()
    self.encoder = ResNetEncoder()
    self.decoder = ResNetDecoder()
    self.classifier = Classifier()

  def forward(self, x, noise=None):
    z = self.encoder(x)
    recon = self.decoder(z)
    recon_noise = self.decoder(z if noise is None else z + 0.1 * noise)
    aux = {"z": z, "recon_noise": recon_noise, "logits": self.classifier(recon),
           "logits_noise": self.classifier(recon_noise)}
    return recon, aux


BUILDERS = {
    "ta_fcn": ta_fcn, "ta_cnn": TACNN, "ta_vae": TAVAE, "fcn_medium": fcn_medium,
    "fcn_strong": fcn_strong, "fcn_boss": fcn_boss, "multi_encoder": MultiEncoder,
    "resnet_boss": ResNetAE,
}


def mse(a, b):
  return F.mse_loss(a, b)


def kld(mu, logvar):
  return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def loss(variant, x, recon, aux):
  """The originals' losses (multi_encoder with hw8jax's runnable consistency term)."""
  if variant == "ta_vae":
    return mse(recon, x) + kld(aux["mu"], aux["logvar"])
  if variant == "multi_encoder":
    consistency = mse(aux["fcn_feat"].mean(dim=[2, 3]), aux["cnn_feat"].mean(dim=[2, 3]))
    return (F.mse_loss(recon, x, reduction="sum") + 0.1 * kld(aux["mu"], aux["logvar"])
            + 0.05 * consistency)
  if variant == "resnet_boss":
    bce = nn.BCEWithLogitsLoss()
    clf = (bce(aux["logits"], torch.ones_like(aux["logits"]))
           + bce(aux["logits_noise"], torch.zeros_like(aux["logits_noise"])))
    return mse(recon, x) + 0.1 * clf
  return mse(recon, x)
