"""Training: optimiser and schedule from the config, a jitted data-parallel train step, orbax
checkpoints with exact resume, progress lines and metrics.jsonl.

The train state is a plain pytree (dict) of params, batch_stats, opt_state, step and the
epoch bookkeeping; the model's structure lives in an nnx graphdef outside it. The step is
`jax.jit` over that state with the state donated: NNX's Python-side object handling runs once,
at trace time, not every step.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hw8jax import checkpoint, data, models
from hw8jax.errors import UserError
from hw8jax.losses import loss_fn
from hw8jax.score import make_scorer, score_images

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# --- optimiser and schedule


def warmup_cosine(base_lr: float, total_steps: int, warmup_fraction: float):
  """transformers' get_cosine_schedule_with_warmup with W = int(warmup_fraction * T):
  base * s / W for s < W, then base * 0.5 * (1 + cos(pi * (s - W) / (T - W)))."""
  warmup = int(warmup_fraction * total_steps)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    rise = s / max(1, warmup)
    progress = (s - warmup) / max(1, total_steps - warmup)
    fall = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    return base_lr * jnp.where(s < warmup, rise, fall)

  return schedule


def make_schedule(config: ml_collections.ConfigDict, total_steps: int):
  lr = config.optimizer.learning_rate
  if config.schedule.name == "constant":
    return optax.constant_schedule(lr)
  if config.schedule.name == "warmup_cosine":
    return warmup_cosine(lr, total_steps, config.schedule.warmup_fraction)
  raise UserError(f"schedule.name {config.schedule.name!r}: use 'constant' or 'warmup_cosine'")


def make_optimizer(config: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
  """Adam / AdamW with PyTorch's defaults (betas 0.9, 0.999; eps 1e-8 added to sqrt(v)), or
  plain SGD."""
  name = config.optimizer.name
  if name == "adam":
    return optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-8)
  if name == "adamw":
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,
                       weight_decay=config.optimizer.weight_decay)
  if name == "sgd":  # torch.optim.SGD without momentum
    return optax.sgd(schedule)
  raise UserError(f"optimizer.name {name!r}: use 'adam', 'adamw' or 'sgd'")


def total_steps(config, num_images: int) -> int:
  steps = data.steps_per_epoch(num_images, config.batch_size) * config.num_epochs
  return min(steps, config.max_steps) if config.max_steps > 0 else steps


# --- state and step


def run_keys(seed: int) -> dict:
  """Every key of a run, from the config's one seed: model init, training noise (folded with
  the step) and scoring noise (folded with the batch)."""
  init, noise, score = jax.random.split(jax.random.key(seed), 3)
  return {"init": init, "noise": noise, "score": score}


def init_model(config, key: jax.Array):
  """(train graphdef, eval graphdef, params, batch_stats) of a fresh model, or of one holding
  the weights of `config.init_from` (a PyTorch original's file, read without running it)."""
  if config.init_from:
    model = load_torch_weights(config.model, config.init_from)
  else:
    model = models.build(config.model, rngs=nnx.Rngs(params=key))
  model.train()
  train_def, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.eval()
  eval_def = nnx.graphdef(model)
  return train_def, eval_def, params, stats


def load_torch_weights(variant: str, path: str) -> nnx.Module:
  """The variant holding a PyTorch file's weights; a file that does not fit is one line."""
  from hw8jax.torch_import import load_state_dict

  if not os.path.isfile(path):
    raise UserError(f"init_from {path}: no such file")
  try:
    return load_state_dict(nnx.eval_shape(lambda: models.build(variant, rngs=nnx.Rngs(0))), path)
  except UserError:  # the file itself refused or unreadable, already one line naming it
    raise
  except ValueError as e:  # weights that do not fit the variant
    raise UserError(f"init_from {path}: {e}") from None


def init_state(params, batch_stats, tx) -> dict:
  return {
      "params": params,
      "batch_stats": batch_stats,
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "epoch_loss_sum": jnp.zeros((), jnp.float32),  # resumes mid-epoch exactly
      "best": jnp.asarray(-jnp.inf, jnp.float32),    # best score so far (higher is better)
  }


def make_train_step(graphdef, tx, variant: str, transform, key, compute_dtype=jnp.float32):
  """fn(state, images_uint8) -> (state, metrics). Noise for step s is fold_in(key, s)."""
  loss = loss_fn(variant)

  def step_fn(state, images):
    x = transform(images)
    noise = jax.random.fold_in(key, state["step"])

    def objective(params, batch_stats):
      # bf16 compute: params cast in, fp32 master params and optimiser state kept.
      model = nnx.merge(graphdef, jax.tree.map(lambda p: p.astype(compute_dtype), params),
                        batch_stats)
      recon, aux = model(x.astype(compute_dtype), rngs=nnx.Rngs(noise=noise))
      value, terms = loss(x, recon.astype(x.dtype), aux)
      stats = jax.tree.map(lambda new, old: new.astype(old.dtype),
                           nnx.state(model, nnx.BatchStat), batch_stats)
      return value.astype(x.dtype), (terms, stats)

    # batch_stats are differentiated too (and their zero gradient dropped, XLA removes it) so
    # that the BatchStat variables merged inside are at the same trace level as the params:
    # NNX refuses to update a variable created from a value of an outer trace.
    (value, (terms, stats)), (grads, _) = jax.value_and_grad(
        objective, argnums=(0, 1), has_aux=True)(state["params"], state["batch_stats"])
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = dict(state, params=optax.apply_updates(state["params"], updates),
                     batch_stats=stats, opt_state=opt_state, step=state["step"] + 1,
                     epoch_loss_sum=state["epoch_loss_sum"] + value)
    return new_state, {"loss": value, **terms}

  return step_fn


# --- the run


def make_mesh() -> jax.sharding.Mesh:
  """One `data` axis over every device of every process."""
  return jax.make_mesh((jax.device_count(),), ("data",))


def _append_jsonl(path: str, record: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: str, step: int) -> None:
  """Drop lines a killed run wrote past the checkpoint it resumes from."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    keep = [line for line in f if json.loads(line).get("step", 0) <= step]
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def _log(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def _check_finite(value: float, step: int, mngrs) -> None:
  if not math.isfinite(value):
    last = mngrs["latest"].latest_step()
    kept = f"the last good checkpoint (step {last}) is kept" if last is not None else \
        "no checkpoint was written"
    raise UserError(f"training stopped: loss became {value} at step {step}; {kept}. Try a "
                    "lower optimizer.learning_rate")


def train(config: ml_collections.ConfigDict, workdir: str, train_images, test_images=None,
          test_labels=None) -> dict:
  """Train (or resume) to the configured number of steps; returns the final train state."""
  mesh = make_mesh()
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  if config.batch_size % jax.device_count():
    raise UserError(f"batch_size {config.batch_size} does not split over "
                    f"{jax.device_count()} devices")
  compute_dtype = COMPUTE_DTYPES[config.compute_dtype]
  num_steps = total_steps(config, len(train_images))
  spe = data.steps_per_epoch(len(train_images), config.batch_size)
  schedule = make_schedule(config, num_steps)
  tx = make_optimizer(config, schedule)
  keys = run_keys(config.seed)
  train_def, eval_def, params, stats = init_model(config, keys["init"])
  state = jax.device_put(init_state(params, stats, tx), replicated)
  transform = data.get_transform(config.data.transform)
  step_fn = jax.jit(make_train_step(train_def, tx, config.model, transform, keys["noise"],
                                    compute_dtype),
                    in_shardings=(replicated, batch_sharding),
                    out_shardings=(replicated, replicated), donate_argnums=0)
  # Validation AUC at each epoch end when labels are configured (and best-by-AUC).
  scorer = make_scorer(eval_def, metric=config.score.metric, topk=config.score.topk,
                       sample=config.score.sample, transform=transform,
                       compute_dtype=compute_dtype) if test_labels is not None else None

  shard = data.Shard(jax.process_index(), jax.process_count())
  dataset = data.train_dataset(train_images, batch_size=config.batch_size, seed=config.seed,
                               num_steps=num_steps, shard=shard,
                               num_threads=config.data.num_threads)
  iterator = iter(dataset)
  mngrs = checkpoint.managers(workdir, config.checkpoint.keep)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  try:
    if mngrs["latest"].latest_step() is not None:
      state = checkpoint.restore(mngrs["latest"], checkpoint.abstract(state, replicated),
                                 iterator)
      if jax.process_index() == 0:
        _truncate_metrics(metrics_path, int(state["step"]))
      _log(f"resumed from step {int(state['step'])} of {num_steps} ({workdir})")
    start = int(state["step"])
    if start >= num_steps:
      _log(f"training already finished ({num_steps} steps); not retraining")
      return state

    _log(f"training {config.model}: {num_steps} steps ({spe} an epoch), batch "
         f"{config.batch_size}, {jax.device_count()} device(s) [{jax.devices()[0].platform}]")
    last_log, log_step = time.time(), start
    for step in range(start, num_steps):
      batch = jax.make_array_from_process_local_data(batch_sharding, next(iterator)["image"])
      state, metrics = step_fn(state, batch)
      done = step + 1
      end_of_epoch = done % spe == 0
      now = time.time()
      if now - last_log >= config.log_every_seconds or done == num_steps or end_of_epoch:
        loss = float(metrics["loss"])
        _check_finite(loss, done, mngrs)
        rate = (done - log_step) * config.batch_size / max(now - last_log, 1e-9)
        record = {"step": done, "epoch": done / spe, "loss": loss,
                  "lr": float(schedule(step)), "images_per_s": rate,
                  **{k: float(v) for k, v in metrics.items() if k != "loss"}}
        _log(f"epoch {done / spe:6.2f}  step {done}/{num_steps}  loss {loss:.6g}  "
             f"lr {record['lr']:.3g}  {rate:.1f} img/s")
        if jax.process_index() == 0:
          _append_jsonl(metrics_path, record)
        last_log, log_step = now, done
      if end_of_epoch:
        state = _end_epoch(state, done, spe, scorer, test_images, test_labels, config,
                           keys["score"], mesh, mngrs, metrics_path)
      if done % config.checkpoint.every_steps == 0 or done == num_steps:
        _check_finite(float(state["epoch_loss_sum"]), done, mngrs)
        checkpoint.save(mngrs["latest"], done, state, iterator)
    return state
  finally:
    for m in mngrs.values():
      m.wait_until_finished()
      m.close()


def _end_epoch(state, done, spe, scorer, test_images, test_labels, config, score_key, mesh,
               mngrs, metrics_path):
  """Epoch bookkeeping: mean loss, validation AUC when labels exist, the best checkpoint."""
  mean_loss = float(state["epoch_loss_sum"]) / spe
  record = {"step": done, "epoch": done // spe, "epoch_mean_loss": mean_loss}
  if scorer is not None:
    from sklearn.metrics import roc_auc_score

    scores = score_images(scorer, (state["params"], state["batch_stats"]), test_images,
                          batch_size=config.score.batch_size, key=score_key, mesh=mesh)
    record["val_auc"] = float(roc_auc_score(test_labels, scores))
    quality = record["val_auc"]
  else:
    quality = -mean_loss
  # Host values go back as replicated global arrays (what orbax saves in multi-process runs).
  sharding = state["step"].sharding
  state = dict(state, epoch_loss_sum=jax.device_put(np.float32(0), sharding))
  if quality > float(state["best"]):
    state = dict(state, best=jax.device_put(np.float32(quality), sharding))
    checkpoint.save(mngrs["best"], done, checkpoint.model_part(state))
    record["best"] = True
  _log(f"epoch {done // spe} done: mean loss {mean_loss:.6g}"
       + (f", validation AUC {record['val_auc']:.4f}" if "val_auc" in record else "")
       + (" (best so far)" if record.get("best") else ""))
  if jax.process_index() == 0:
    _append_jsonl(metrics_path, record)
  return state
