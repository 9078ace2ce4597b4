"""The training loss of every variant, as its original defines it.

Each loss takes `(x, recon, aux)` from a model call and returns `(loss, metrics)`, where `metrics`
holds the loss's named terms (scalars) for logging.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def mse(recon: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(recon - x))


def kld(mu: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mu, exp(logvar)) || N(0, 1)), summed over the batch and every latent element."""
  return -0.5 * jnp.sum(1 + logvar - jnp.square(mu) - jnp.exp(logvar))


def reconstruction_loss(x, recon, aux):
  del aux
  loss = mse(recon, x)
  return loss, {"mse": loss}


def vae_loss(x, recon, aux):
  """Sample code: MSE (mean) + KLD (sum)."""
  rec, kl = mse(recon, x), kld(aux["mu"], aux["logvar"])
  return rec + kl, {"mse": rec, "kld": kl}


def multi_encoder_loss(x, recon, aux):
  """Summed squared error + 0.1 KLD + 0.05 consistency.

  The seed's consistency term averages the FCN latent over dims 2 and 3, which it does not have
  (it is (B, 10)), so it cannot run. Here consistency is the MSE (mean) between the spatial means
  of the FCN branch's 48x8x8 feature map and the CNN encoder's 48x8x8 output: both (B, 48), the
  same "do the two encoders agree" intent, and it runs.
  """
  rec = jnp.sum(jnp.square(recon - x))
  kl = kld(aux["mu"], aux["logvar"])
  consistency = mse(aux["fcn_feat"].mean(axis=(1, 2)), aux["cnn_feat"].mean(axis=(1, 2)))
  loss = rec + 0.1 * kl + 0.05 * consistency
  return loss, {"sse": rec, "kld": kl, "consistency": consistency}


def resnet_loss(x, recon, aux):
  """MSE + 0.1 * (BCEWithLogits(clf(recon), 1) + BCEWithLogits(clf(recon_noise), 0))."""
  rec = mse(recon, x)
  real = optax.sigmoid_binary_cross_entropy(aux["logits"], jnp.ones_like(aux["logits"])).mean()
  fake = optax.sigmoid_binary_cross_entropy(aux["logits_noise"],
                                            jnp.zeros_like(aux["logits_noise"])).mean()
  clf = real + fake
  return rec + 0.1 * clf, {"mse": rec, "clf": clf}
