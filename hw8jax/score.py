"""Anomaly scores: one scorer factory, used by training-time evaluation, scoring runs and tests.

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
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from hw8jax import checkpoint, data, models, report, runtime
from hw8jax import config as config_lib
from hw8jax import workdir as workdir_lib
from hw8jax.config import METRICS


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


def _unknown_metric(metric: str) -> ValueError:
  return ValueError(f"unknown score metric {metric!r}; choose one of {', '.join(METRICS)}")


def make_scorer(graphdef, *, metric: str = "l2", topk: int = 256, sample: bool = True,
                stochastic: bool = True, transform=data.normalize,
                compute_dtype=jnp.float32, fast_paths: str = "auto"):
  """jit(fn(model_state, images_uint8, index, key) -> (B,) float32 scores).

  `graphdef` must be of a model in eval mode; `model_state` is its (params, batch_stats);
  `index` holds each image's index in its file. With `sample`, image i's noise is keyed by
  fold_in(key, i) (`models.layers.normal`); `stochastic=False` (a model that draws no noise)
  skips the keys. `fast_paths` is the `cpu_fast_paths` setting (it chooses XLA's options).
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

  @functools.partial(jax.jit, compiler_options=runtime.compiler_options(fast_paths, "scorer"))
  def score(model_state, images, index, key):
    params, stats = model_state
    model = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(compute_dtype), params), stats)
    x = transform(images)
    recon = reconstruct(model, x.astype(compute_dtype), index, key)
    return jax.vmap(functools.partial(image_error, metric=metric, topk=topk))(
        recon.astype(jnp.float32), x)

  return score


def scorer_for(config, eval_def):
  """The scorer a config describes, for the eval graphdef of its model."""
  return make_scorer(eval_def, metric=config.score.metric, topk=config.score.topk,
                     sample=config.score.sample,
                     stochastic=config.model in models.STOCHASTIC,
                     transform=data.get_transform(config.data.transform),
                     compute_dtype=runtime.COMPUTE_DTYPES[config.compute_dtype],
                     fast_paths=config.cpu_fast_paths)


def score_images(scorer, model_state, images, *, batch_size: int, key,
                 mesh=None) -> np.ndarray:
  """Scores of all `images` (N, 64, 64, 3) uint8, in file order, each scored exactly once.

  Batches are padded to `batch_size` (rounded up to a multiple of the mesh's devices) so
  `scorer` compiles once; with a mesh, each batch is sharded over its `data` axis and each
  process reads only its rows.
  """
  devices = mesh.size if mesh is not None else 1
  batch_size = -(-batch_size // devices) * devices
  n = len(images)
  scores = np.full(n, np.nan, np.float32)
  shard = data.Shard(jax.process_index(), jax.process_count())
  for batch in data.eval_dataset(images, batch_size=batch_size, shard=shard):
    imgs, index, mask = batch["image"], batch["index"], batch["mask"]
    if mesh is not None:
      sharding = runtime.batch_sharded(mesh)
      imgs, index, mask = (jax.make_array_from_process_local_data(sharding, a)
                           for a in (imgs, index, mask))
    out = scorer(model_state, imgs, index, key)
    if jax.process_count() > 1:
      out, index, mask = (multihost_utils.process_allgather(a, tiled=True)
                          for a in (out, index, mask))
    out, index, mask = np.asarray(out), np.asarray(index), np.asarray(mask)
    scores[index[mask]] = out[mask]
  assert not np.isnan(scores).any(), "an image was not scored"
  return scores


# --- a scoring run


def _model_state(config, workdir: str, mesh):
  """(eval graphdef, model state, step, where the weights came from) for scoring: the
  workdir's checkpoint, or the PyTorch file of `init_from` while the workdir has none."""
  which = config.checkpoint.restore
  if config.init_from and not checkpoint.exists(workdir, which):
    from hw8jax.torch_import import load_torch_weights

    model = load_torch_weights(config.model, config.init_from)
    model.eval()
    eval_def, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    state = jax.device_put((params, stats), runtime.replicated(mesh))
    return eval_def, state, 0, f"the PyTorch weights in {config.init_from}"
  eval_def, state, step = checkpoint.restore_for_scoring(config, workdir, which, mesh)
  return eval_def, state, step, f"the {which} checkpoint (step {step})"


THRESHOLD_SAMPLE = 2000  # training images scored for the threshold without a validation split


def _threshold(config, inputs, scorer, model_state, mesh) -> dict:
  """The predictions' threshold: the `score.threshold_quantile` quantile of the scores of
  normal images the model did not train on (the held-out validation images) or, without a
  validation split, of a seeded sample of up to THRESHOLD_SAMPLE training images."""
  num_train = len(inputs.train)
  held = config_lib.num_held_out(num_train, config.data.val_fraction)
  if held:
    index = data.validation_split(num_train, held, config.seed)[1]
    source = f"{len(index)} held-out training images"
  else:
    index = np.sort(np.random.default_rng([config.seed, 0, 2]).permutation(num_train)
                    [:THRESHOLD_SAMPLE])
    source = f"{len(index)} training images (the model trained on them)"
  reference = score_images(scorer, model_state, np.asarray(inputs.train[index]),
                           batch_size=config.score.batch_size,
                           key=runtime.run_keys(config.seed)["score"], mesh=mesh)
  q = config.score.threshold_quantile
  return {"threshold": float(np.quantile(reference, q)), "quantile": q, "from": source}


def score_run(config, workdir: str, inputs) -> dict | None:
  """Score every test image; write submission.csv, scores.npy, predictions.csv,
  threshold.json, figures, and with labels eval.json and roc.png. Returns the eval record
  (None without labels)."""
  mesh = runtime.make_mesh()
  eval_def, model_state, step, source = _model_state(config, workdir, mesh)
  if runtime.is_main_process():
    workdir_lib.record(config, workdir, "score")
  scorer = scorer_for(config, eval_def)
  scores = score_images(scorer, model_state, inputs.test, batch_size=config.score.batch_size,
                        key=runtime.run_keys(config.seed)["score"], mesh=mesh)
  threshold = _threshold(config, inputs, scorer, model_state, mesh)
  if not runtime.is_main_process():
    return None
  csv_path = os.path.join(workdir, "submission.csv")
  report.write_submission(csv_path, scores)
  data.write_npy_atomic(os.path.join(workdir, "scores.npy"), scores)
  report.write_predictions(os.path.join(workdir, "predictions.csv"), scores,
                           threshold["threshold"])
  report.write_json(os.path.join(workdir, "threshold.json"), threshold)
  print(f"wrote {csv_path} ({len(scores)} rows) from {source}; predictions.csv: "
        f"{int(np.sum(scores > threshold['threshold']))} above the threshold "
        f"{threshold['threshold']:.6g} ({threshold['from']})", flush=True)
  # Figures are small eager computations: on this process's first device, from a local copy of
  # the replicated parameters (whatever mesh they were restored onto).
  local = jax.tree.map(lambda a: jax.device_put(a.addressable_data(0), jax.local_devices()[0]),
                       model_state)
  report.plot_model_figures(workdir, nnx.merge(eval_def, *local),
                            data.get_transform(config.data.transform), inputs, scores)
  if inputs.labels is None:
    report.remove_label_outputs(workdir)  # a previous run's, which no longer describe this one
    return None
  record = {**report.evaluate(inputs.labels, scores, threshold["threshold"]),
            "checkpoint": config.checkpoint.restore, "step": int(step), "model": config.model,
            "metric": config.score.metric, "weights": source, "threshold_from": threshold}
  if config.checkpoint.restore == "best" and source.startswith("the best"):
    record["best_by"] = config_lib.best_by(config)
    if record["best_by"] == "test_auc":
      record["best_chosen_on_test_set"] = True  # this AUC is biased upward
  report.write_json(os.path.join(workdir, "eval.json"), record)
  report.print_evaluation(record)
  if record["auc"] is not None:
    report.plot_roc_and_histogram(os.path.join(workdir, "roc.png"), inputs.labels, scores,
                                  record["auc"])
  else:
    report.remove_label_outputs(workdir, keep=("eval.json",))
  return record
