"""Training: optimiser and schedule from the config, a jitted data-parallel train step, orbax
checkpoints with exact resume, progress lines and metrics.jsonl.

A run resumes from its newest readable checkpoint, saves only finite states, and on SIGTERM or
Ctrl-C (single-process runs) saves the step it is at before it stops.

The train state is a plain pytree (dict) of params, batch_stats, opt_state, step and the
epoch bookkeeping; the model's structure lives in an nnx graphdef outside it. The step is
`jax.jit` over that state with the state donated: NNX's Python-side object handling runs once,
at trace time, not every step.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from hw8jax import checkpoint, data, metrics, models, report, runtime
from hw8jax import config as config_lib
from hw8jax import workdir as workdir_lib
from hw8jax.errors import Interrupted, UserError
from hw8jax.losses import loss_fn
from hw8jax.runtime import log
from hw8jax.score import score_images, scorer_for

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
  raise ValueError(f"schedule.name {config.schedule.name!r}")  # config.validate lists them


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
  raise ValueError(f"optimizer.name {name!r}")  # config.validate lists them


def total_steps(config, num_images: int) -> int:
  steps = data.steps_per_epoch(num_images, config.batch_size) * config.num_epochs
  return min(steps, config.max_steps) if config.max_steps > 0 else steps


# --- state and step


def init_model(config, key: jax.Array):
  """(train graphdef, eval graphdef, params, batch_stats) of a fresh model, or of one holding
  the weights of `config.init_from` (a PyTorch original's file, read without running it)."""
  if config.init_from:
    from hw8jax.torch_import import load_torch_weights

    model = load_torch_weights(config.model, config.init_from)
  else:
    model = _built(config.model, runtime.draw_key(key, config.cpu_fast_paths))
  models.set_fast_paths(model, config.cpu_fast_paths)
  model.train()
  train_def, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  model.eval()
  eval_def = nnx.graphdef(model)
  return train_def, eval_def, params, stats


def _built(variant: str, key: jax.Array) -> nnx.Module:
  """A fresh model, its weights drawn by one compiled program. Op by op, initialisation ran
  dozens of small programs, each compiled on first use (fcn_boss 3.9 s, multi_encoder 16 s,
  resnet_boss 13 s on 2 cores). Compiled at LLVM optimisation level 1: 1.7 s, 5.4 s and 4.2 s
  (level 2: 2.1 s, 12.6 s, 10 s). The draws equal the op-by-op ones bit for bit, except that
  resnet_boss's normal draws may differ in the last bit (at any level)."""
  graphdefs = []  # the graphdef is static: kept from the one trace (fcn_boss: 0.14 s a trace)

  def draw(key):
    graphdef, state = nnx.split(models.build(variant, rngs=nnx.Rngs(params=key)))
    graphdefs.append(graphdef)
    return state

  compiled = jax.jit(draw, compiler_options={"xla_backend_optimization_level": 1})
  state = compiled(key)
  return nnx.merge(graphdefs[0], state)


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


def jit_train_step(step_fn, mesh, fast_paths: str):
  """`step_fn` compiled for `mesh`: state replicated and donated, the batch sharded; with the
  XLA options of the `cpu_fast_paths` setting `fast_paths`."""
  replicated = runtime.replicated(mesh)
  return jax.jit(step_fn, in_shardings=(replicated, runtime.batch_sharded(mesh)),
                 out_shardings=(replicated, replicated), donate_argnums=0,
                 compiler_options=runtime.compiler_options(fast_paths, "train_step"))


# --- the run


def _all_finite(tree) -> bool:
  """On the host, from this process's copy of each (replicated) array: orbax copies the state
  to the host to save it anyway, and a compiled check would cost a compilation per state
  layout."""
  return all(np.isfinite(np.asarray(x.addressable_data(0))).all() for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.floating))


def _kept(mngrs) -> str:
  last = mngrs["latest"].latest_step()
  return f"the last good checkpoint (step {last}) is kept" if last is not None else \
      "no checkpoint was written"


def _save(mngrs, which: str, step: int, state, iterator=None) -> None:
  """Save only a finite state: a checkpoint is what a run resumes and scores from, so one
  holding NaN would lose the run's work as surely as none. The parameters and statistics are
  checked (the optimiser's moments follow from the same gradients, and with Adam they would
  triple what is copied to the host at every save)."""
  if not _all_finite((state["params"], state["batch_stats"])):
    raise UserError(f"training stopped: the parameters became non-finite by step {step}; "
                    f"{_kept(mngrs)}. Try a lower optimizer.learning_rate")
  checkpoint.save(mngrs[which], step, state, iterator)


def _check_loss(value: float, step: int, mngrs) -> None:
  if not math.isfinite(value):
    raise UserError(f"training stopped: loss became {value} at step {step}; {_kept(mngrs)}. "
                    "Try a lower optimizer.learning_rate")


@contextlib.contextmanager
def _stop_signals():
  """A dict whose "signal" is set when SIGTERM or SIGINT arrives, so the loop can save the step
  it is at and stop. A second signal acts at once, as it would without this. Only where Python
  can take signals (the main thread) and in single-process runs: processes of a multi-process
  run would stop at different steps and wait on each other."""
  requested = {}
  if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
    yield requested
    return
  previous = {}

  def handler(signum, frame):
    requested["signal"] = signum
    for s, h in previous.items():
      signal.signal(s, h)

  for s in (signal.SIGTERM, signal.SIGINT):
    previous[s] = signal.signal(s, handler)
  try:
    yield requested
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _eta(now: float, done: int, num_steps: int, steady, steps_per_s: float) -> float:
  """Seconds left at the mean pace since the first log (compilation excluded); at the first
  log, at that interval's pace. Epoch-end evaluation and checkpoints are part of the pace."""
  if steady is not None and done > steady[1]:
    steps_per_s = (done - steady[1]) / max(now - steady[0], 1e-9)
  return (num_steps - done) / max(steps_per_s, 1e-9)


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _resume(mngrs, state, iterator, replicated, num_steps: int):
  """(state, step) to continue from: `state` itself and 0 when there is no checkpoint, else the
  newest readable latest checkpoint, with `iterator` moved to match; None when that one has
  reached `num_steps`. The step is known without reading `state`, so a fresh state's
  initialisation may still be running while the train step compiles. The iterator is restored
  only to continue: a run shortened below its checkpoint has an iterator shorter than the saved
  position."""
  mngr = mngrs["latest"]
  target = checkpoint.abstract(state, replicated)
  found = checkpoint.newest_intact(mngr, lambda step: checkpoint.restore(mngr, target, None, step))
  if found is None:
    return state, 0
  step, restored = found
  if step >= num_steps:
    log(f"training already finished ({step} steps); not retraining")
    return None
  checkpoint.restore_iterator(mngr, iterator, step)
  return restored, step


def train(config: ml_collections.ConfigDict, workdir: str, train_images, test_images=None,
          test_labels=None) -> dict | None:
  """Train (or resume) to the configured number of steps; returns the final train state
  (None when the workdir had already finished)."""
  mesh = runtime.make_mesh()
  replicated = runtime.replicated(mesh)
  batch_sharding = runtime.batch_sharded(mesh)
  compute_dtype = runtime.COMPUTE_DTYPES[config.compute_dtype]
  train_index, val_index = data.validation_split(
      len(train_images), config_lib.num_held_out(len(train_images), config.data.val_fraction),
      config.seed)
  num_steps = total_steps(config, len(train_index))
  spe = data.steps_per_epoch(len(train_index), config.batch_size)
  schedule = make_schedule(config, num_steps)
  tx = make_optimizer(config, schedule)
  lr_at = jax.jit(schedule)  # for the log; op by op it compiled eight programs at the first line
  keys = runtime.run_keys(config.seed)
  mngrs = checkpoint.managers(workdir, config.checkpoint.keep)
  sinks = None
  try:
    train_def, eval_def, params, stats = init_model(config, keys["init"])
    # One program: op by op, the optimiser's zero moments compiled for about 1 s (fcn_boss).
    state = jax.device_put(jax.jit(lambda p, s: init_state(p, s, tx))(params, stats), replicated)
    transform = data.get_transform(config.data.transform)
    step_fn = jit_train_step(make_train_step(train_def, tx, config.model, transform,
                                             keys["noise"], compute_dtype), mesh,
                             config.cpu_fast_paths)
    evaluation = _epoch_evaluation(config, eval_def, train_images, val_index, test_images,
                                   test_labels)

    shard = data.Shard(jax.process_index(), jax.process_count())
    dataset = data.train_dataset(train_images, batch_size=config.batch_size, seed=config.seed,
                                 num_steps=num_steps, shard=shard,
                                 num_threads=config.data.num_threads,
                                 index=train_index if len(val_index) else None)
    iterator = iter(dataset)
    fresh = not mngrs["latest"].all_steps()
    resumed = _resume(mngrs, state, iterator, replicated, num_steps)
    if resumed is None:
      return None
    state, start = resumed
    if runtime.is_main_process():
      workdir_lib.record(config, workdir, "train", fresh=fresh)
    if start:
      log(f"resumed from step {start} of {num_steps} ({workdir})")
    sinks = metrics.open_sinks(workdir, start)

    log(f"training {config.model}: {num_steps} steps ({spe} an epoch), batch "
        f"{config.batch_size}, {jax.device_count()} device(s) [{jax.devices()[0].platform}]")
    with _stop_signals() as stop:
      began = last_log = time.time()
      log_step, steady = start, None  # steady: (time, step) of the first log, after compiling
      for step in range(start, num_steps):
        batch = jax.make_array_from_process_local_data(batch_sharding,
                                                       next(iterator)["image"])
        state, out = step_fn(state, batch)
        done = step + 1
        end_of_epoch = done % spe == 0
        if time.time() - last_log >= config.log_every_seconds or done == num_steps or \
            end_of_epoch:
          loss = float(out["loss"])  # waits for this step: the rate counts finished steps
          now = time.time()
          _check_loss(loss, done, mngrs)
          rate = (done - log_step) * config.batch_size / max(now - last_log, 1e-9)
          eta = _eta(now, done, num_steps, steady, rate / config.batch_size)
          steady = steady or (now, done)
          record = {"step": done, "epoch": done / spe, "loss": loss,
                    "lr": float(lr_at(step)), "images_per_s": rate,
                    "elapsed_s": now - began, "eta_s": eta,
                    **{k: float(v) for k, v in out.items() if k != "loss"}}
          log(f"epoch {done / spe:6.2f}  step {done}/{num_steps}  loss {loss:.6g}  "
              f"lr {record['lr']:.3g}  {rate:.1f} img/s  elapsed {_clock(now - began)}  "
              f"eta {_clock(eta)}")
          metrics.write(sinks, record, "train")
          last_log, log_step = now, done
        if end_of_epoch:
          state = _end_epoch(state, done, spe, evaluation, config, keys["score"], mesh, mngrs,
                             sinks)
        saved = done % config.checkpoint.every_steps == 0 or done == num_steps
        if saved or stop.get("signal"):
          _check_loss(float(state["epoch_loss_sum"]), done, mngrs)
          _save(mngrs, "latest", done, state, iterator)
        if done == num_steps and runtime.is_main_process():
          # While orbax writes the last checkpoint, mostly waiting on the disk: the end of an
          # fcn_boss demo run took 2.06 s with the figure drawn first, 1.80 s so (2 cores).
          report.plot_training_curves(os.path.join(workdir, metrics.METRICS_FILE),
                                      os.path.join(workdir, "training_curves.png"))
        if stop.get("signal") and done < num_steps:
          mngrs["latest"].wait_until_finished()
          raise Interrupted(stop["signal"], done, num_steps)
    return state
  finally:
    metrics.close(sinks)
    for m in mngrs.values():
      m.wait_until_finished()
      m.close()


def _epoch_evaluation(config, eval_def, train_images, val_index, test_images,
                      test_labels) -> dict:
  """What each epoch end measures, and which measure picks the best checkpoint: the mean
  anomaly score of the held-out training images (a validation split), the test AUC (with
  two-class labels; reported as what it is, and picking the best only when asked), or the
  epoch's mean training loss."""
  val_images = np.asarray(train_images[val_index]) if len(val_index) else None
  labels_reason = report.single_class(test_labels) if test_labels is not None else None
  with_labels = test_labels is not None and labels_reason is None
  best_by = config_lib.best_by(config)
  if labels_reason:
    log(f"no test AUC: {labels_reason}" + ("; the best checkpoint follows the epoch loss"
                                           if best_by == "test_auc" else ""))
    best_by = "train_loss" if best_by == "test_auc" else best_by
  if val_images is not None:
    log(f"validation: {len(val_images)} held-out training images, never trained on")
  scorer = scorer_for(config, eval_def) if val_images is not None or with_labels else None
  return {"scorer": scorer, "val_images": val_images, "best_by": best_by,
          "test_images": test_images if with_labels else None, "test_labels": test_labels,
          "grid": _reconstruction_grid(config, eval_def, test_images)}


def _reconstruction_grid(config, eval_def, images, count: int = 8):
  """(the first `count` test images, fn(model_state, images) -> an (2 * 64, count * 64, 3)
  image in [0, 1]: originals over their reconstructions), for TensorBoard at each epoch end;
  None without test images."""
  if images is None or not len(images):
    return None
  transform = data.get_transform(config.data.transform)

  @jax.jit
  def grid(model_state, x):
    model = nnx.merge(eval_def, *model_state)
    shown = transform(x)
    rows = jnp.stack([shown, model.decode(model.encode(shown))])  # (2, n, 64, 64, 3)
    rows = rows.transpose(0, 2, 1, 3, 4).reshape(2 * 64, -1, 3)
    return (rows + 1) / 2

  sample = np.asarray(images[:count])
  # This process's copy of the (replicated) result: in a multi-process run it is global.
  return sample, lambda model_state, x: np.asarray(grid(model_state, x).addressable_data(0))


def _end_epoch(state, done, spe, evaluation, config, score_key, mesh, mngrs, sinks):
  """Epoch bookkeeping: mean loss, validation score and test AUC when there is what they need,
  and the best checkpoint by the measure `evaluation["best_by"]` names."""
  mean_loss = float(state["epoch_loss_sum"]) / spe
  record = {"step": done, "epoch": done // spe, "epoch_mean_loss": mean_loss}
  model_state = (state["params"], state["batch_stats"])
  if evaluation["val_images"] is not None:
    scores = score_images(evaluation["scorer"], model_state, evaluation["val_images"],
                          batch_size=config.score.batch_size, key=score_key, mesh=mesh)
    record["val_score"] = float(np.mean(scores))
  if evaluation["test_images"] is not None:
    from sklearn.metrics import roc_auc_score

    scores = score_images(evaluation["scorer"], model_state, evaluation["test_images"],
                          batch_size=config.score.batch_size, key=score_key, mesh=mesh)
    record["test_auc"] = float(roc_auc_score(evaluation["test_labels"], scores))
  quality = {"val_score": lambda: -record["val_score"], "train_loss": lambda: -mean_loss,
             "test_auc": lambda: record["test_auc"]}[evaluation["best_by"]]()
  # Host values go back as replicated global arrays (what orbax saves in multi-process runs).
  sharding = state["step"].sharding
  state = dict(state, epoch_loss_sum=jax.device_put(np.float32(0), sharding))
  if quality > float(state["best"]):
    state = dict(state, best=jax.device_put(np.float32(quality), sharding))
    _save(mngrs, "best", done, checkpoint.model_part(state))
    record["best"] = True
  log(f"epoch {done // spe} done: mean loss {mean_loss:.6g}"
      + (f", validation score {record['val_score']:.6g}" if "val_score" in record else "")
      + (f", test AUC {record['test_auc']:.4f}" if "test_auc" in record else "")
      + (f" (best so far by {evaluation['best_by']})" if record.get("best") else ""))
  metrics.write(sinks, record, "epoch")
  if evaluation["grid"] is not None:
    images, reconstruct = evaluation["grid"]
    metrics.write_image(sinks, "epoch/reconstructions", reconstruct(model_state, images), done)
  return state
