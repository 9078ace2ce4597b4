"""Anomaly scores: the one scorer factory and the one jitted decode(encode(x)).

Training-time evaluation, scoring runs, the detector and the benchmarks all score with
`make_scorer` (an assembled model carries its scorer, `assemble.Assembled.scorer`).

The score of an image is its reconstruction error on normalised (transformed) images:
- "l2" (default, the sample code's): sqrt(sum over pixels and channels of (recon - x)^2);
- "mse": mean squared error; "mae": mean absolute error;
- "topk": mean of the `topk` largest squared errors (pixel-channel values), for anomalies
  that touch a small part of the image.
Models score in eval mode. With `sample=True` the reconstruction is `model(x, rngs)[0]`: a
sampled z for the VAE parts (the sample code's choice), the clean-latent reconstruction for
resnet_boss; with `sample=False` it is the deterministic `decode(encode(x))` (z = mu).
A sampled image's noise is keyed by its index in the test file, so its score does not depend
on the scoring batch size or the device count.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from hw8jax import cpu_tuning, data, runtime
from hw8jax.config import METRICS
from hw8jax.errors import NonFinite


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
  raise _unknown_metric(metric)


def pixel_error(recon: jax.Array, x: jax.Array, metric: str) -> jax.Array:
  """The anomaly map of one image (H, W): its error per pixel, summed over channels, in the
  terms of `metric`: squared for "l2", "mse" and "topk", absolute for "mae". The "l2" score is
  the square root of the map's sum, "mse" and "mae" its mean over pixels and channels."""
  d = (recon - x).astype(jnp.float32)
  return jnp.sum(jnp.abs(d) if metric == "mae" else d * d, axis=-1)


def _unknown_metric(metric: str) -> ValueError:
  return ValueError(f"unknown score metric {metric!r}; choose one of {', '.join(METRICS)}")


def make_scorer(graphdef, *, metric: str = "l2", topk: int = 256, sample: bool = True,
                stochastic: bool = True, transform=data.normalize,
                compute_dtype=jnp.float32, fast_paths: bool = False, maps: bool = False):
  """jit(fn(model_state, images_uint8, index, key) -> (B,) float32 scores), or with `maps`
  the (B, H, W) anomaly maps of the same reconstructions (`pixel_error`).

  `graphdef` must be of a model in eval mode; `model_state` is its (params, batch_stats);
  `index` holds each image's index in its file. With `sample`, image i's noise is keyed by
  fold_in(key, i) (`models.layers.normal`); `stochastic=False` (a model that draws no noise)
  skips the keys. `fast_paths` is the run's CPU policy (it chooses XLA's options).
  """
  if metric not in METRICS:  # now, not at the first batch
    raise _unknown_metric(metric)

  def reconstruct(model, x, index, key):
    if not sample:
      return model.decode(model.encode(x))
    if not stochastic:
      return model(x)[0]
    per_image = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, index)
    return model(x, rngs=nnx.Rngs(noise=key, per_image=per_image))[0]

  @functools.partial(jax.jit, compiler_options=cpu_tuning.compiler_options(fast_paths, "scorer"))
  def score(model_state, images, index, key):
    params, stats = model_state
    model = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(compute_dtype), params), stats)
    x = transform(images)
    recon = reconstruct(model, x.astype(compute_dtype), index, key)
    per_image = functools.partial(pixel_error, metric=metric) if maps else \
        functools.partial(image_error, metric=metric, topk=topk)
    return jax.vmap(per_image)(recon.astype(jnp.float32), x)

  return score


def batch_size_for(batch_size: int, num_images: int, devices: int = 1) -> int:
  """The batch `score_images` pads to: `batch_size`, but no larger than `num_images` rounded up
  to a power of two (a few images are not padded to a large batch, and a detector compiles one
  program per power of two), rounded up to a multiple of `devices`."""
  size = min(batch_size, 1 << max(num_images - 1, 0).bit_length())
  return -(-size // devices) * devices


def score_images(scorer, model_state, images, *, batch_size: int, key, mesh=None,
                 weights: str = "the model", index=None) -> np.ndarray:
  """Scores (or maps, from a scorer of maps) of all `images` (N, 64, 64, 3) uint8, in their
  order, each scored exactly once. Image i's noise is keyed by `index[i]` (default i: its place
  in a file scored whole).

  Batches are padded to `batch_size_for(batch_size, N)` so `scorer` compiles once per size;
  with a mesh, each batch is sharded over its `data` axis and each process reads only its rows.
  A score that is not finite (weights that overflow) is a NonFinite error naming `weights`.
  """
  devices = mesh.size if mesh is not None else 1
  n = len(images)
  batch_size = batch_size_for(batch_size, n, devices)
  scores, done = None, np.zeros(n, bool)
  keyed = None if index is None else np.asarray(index, np.int32)
  shard = data.Shard(jax.process_index(), jax.process_count())
  for batch in data.eval_dataset(images, batch_size=batch_size, shard=shard):
    imgs, place, mask = batch["image"], batch["index"], batch["mask"]
    index = place if keyed is None else np.where(mask, keyed[place], -1).astype(place.dtype)
    if mesh is not None:
      sharding = runtime.batch_sharded(mesh)
      imgs, index, mask = (jax.make_array_from_process_local_data(sharding, a)
                           for a in (imgs, index, mask))
    out = scorer(model_state, imgs, index, key)
    if jax.process_count() > 1:
      out, place, mask = (multihost_utils.process_allgather(a, tiled=True)
                          for a in (out, place, mask))
    out, place, mask = np.asarray(out), np.asarray(place), np.asarray(mask)
    if scores is None:
      scores = np.zeros((n, *out.shape[1:]), np.float32)
    scores[place[mask]] = out[mask]
    done[place[mask]] = True
  if not done.all():  # the batching's own promise, checked whatever Python's -O says
    raise RuntimeError(f"{int((~done).sum())} of {n} images were not scored")
  if scores is None:
    scores = np.zeros(n, np.float32)
  bad = int((~np.isfinite(scores).reshape(n, -1).all(axis=1)).sum())
  if bad:
    raise NonFinite(f"{weights}: {bad} of {n} anomaly scores are not finite (NaN or infinite): "
                    "its weights overflow float32 arithmetic")
  return scores


def autoencode(graphdef):
  """jit(fn(model_state, x) -> decode(encode(x))): the deterministic reconstruction of
  transformed images `x` by the model of `graphdef` and (params, batch_stats)."""

  @jax.jit
  def reconstruct(model_state, x):
    model = nnx.merge(graphdef, *model_state)
    return model.decode(model.encode(x))

  return reconstruct
