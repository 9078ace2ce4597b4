"""Anomaly scores: one scorer, used by training-time evaluation, scoring runs and tests.

The score of an image is its reconstruction error on normalised (transformed) images:
- "l2" (default, the sample code's): sqrt(sum over pixels and channels of (recon - x)^2);
- "mse": mean squared error; "mae": mean absolute error;
- "topk": mean of the `topk` largest squared errors (pixel-channel values), for anomalies
  that touch a small part of the image.
Models score in eval mode. With `sample=True` the reconstruction is `model(x, rngs)[0]`: a
sampled z for the VAE parts (the sample code's choice), the clean-latent reconstruction for
resnet_boss; with `sample=False` it is the deterministic `decode(encode(x))` (z = mu).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from hw8jax import data

METRICS = ("l2", "mse", "mae", "topk")


def image_error(recon: jax.Array, x: jax.Array, metric: str, topk: int = 256) -> jax.Array:
  """The score of one image (no batch axis)."""
  d = (recon - x).astype(jnp.float32)
  if metric == "l2":
    return jnp.sqrt(jnp.sum(d * d))
  if metric == "mse":
    return jnp.mean(d * d)
  if metric == "mae":
    return jnp.mean(jnp.abs(d))
  if metric == "topk":
    return jnp.mean(jax.lax.top_k((d * d).ravel(), topk)[0])
  raise ValueError(f"unknown score metric {metric!r}; choose one of {', '.join(METRICS)}")


def make_scorer(graphdef, *, metric: str = "l2", topk: int = 256, sample: bool = True,
                transform=data.normalize, compute_dtype=jnp.float32):
  """jit(fn(model_state, images_uint8, key) -> (B,) float32 scores), vmapped over the batch.

  `graphdef` must be of a model in eval mode; `model_state` is its (params, batch_stats).
  """
  image_error(jnp.zeros((1,)), jnp.zeros((1,)), metric, 1)  # fail early on a bad metric

  @jax.jit
  def score(model_state, images, key):
    params, stats = model_state
    model = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(compute_dtype), params), stats)
    x = transform(images)
    xin = x.astype(compute_dtype)
    if sample:
      recon = model(xin, rngs=nnx.Rngs(noise=key))[0]
    else:
      recon = model.decode(model.encode(xin))
    return jax.vmap(functools.partial(image_error, metric=metric, topk=topk))(
        recon.astype(jnp.float32), x)

  return score


def score_images(scorer, model_state, images, *, batch_size: int, key,
                 mesh=None) -> np.ndarray:
  """Scores of all `images` (N, 64, 64, 3) uint8, in file order, each scored exactly once.

  Batches are padded to `batch_size` so `scorer` compiles once; with a mesh, each batch is
  sharded over its `data` axis and each process reads only its rows.
  """
  n = len(images)
  scores = np.full(n, np.nan, np.float32)
  shard = data.Shard(jax.process_index(), jax.process_count())
  for b, batch in enumerate(data.eval_dataset(images, batch_size=batch_size, shard=shard)):
    imgs, index, mask = batch["image"], batch["index"], batch["mask"]
    if mesh is not None:
      sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
      imgs = jax.make_array_from_process_local_data(sharding, imgs)
      index = jax.make_array_from_process_local_data(sharding, index)
      mask = jax.make_array_from_process_local_data(sharding, mask)
    out = scorer(model_state, imgs, jax.random.fold_in(key, b))
    if jax.process_count() > 1:
      out, index, mask = (multihost_utils.process_allgather(a, tiled=True)
                          for a in (out, index, mask))
    out, index, mask = np.asarray(out), np.asarray(index), np.asarray(mask)
    scores[index[mask]] = out[mask]
  assert not np.isnan(scores).any(), "an image was not scored"
  return scores
