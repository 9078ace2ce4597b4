"""The training loop: the data-parallel step over the grain pipeline, checkpoints and logs.

The step (`train_step`) runs over the grain pipeline, with orbax checkpoints and exact resume,
progress lines, metrics.jsonl and TensorBoard, and each epoch's evaluation (`epoch_eval`) and
best checkpoint.

A run resumes from its newest readable checkpoint, saves only finite states, and on SIGTERM or
Ctrl-C (single-process runs) saves the step it is at before it stops.
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
import numpy as np

from hw8jax import checkpoint, data, figures, metrics, report, runtime, train_step
from hw8jax import workdir as workdir_lib
from hw8jax.assemble import assemble
from hw8jax.cpu_tuning import release_free_memory
from hw8jax.epoch_eval import EpochEvaluator
from hw8jax.errors import Interrupted, NonFinite, UserError
from hw8jax.plan import Plan
from hw8jax.runtime import log


def _all_finite(tree) -> bool:
  """On the host, from this process's copy of each (replicated) array: orbax copies the state
  to the host to save it anyway, and a compiled check would cost a compilation per state
  layout."""
  return all(np.isfinite(np.asarray(x.addressable_data(0))).all() for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.floating))


def _save(mngrs, which: str, step: int, state, trajectory: dict, iterator=None) -> None:
  """Save only a finite state: a checkpoint is what a run resumes and scores from, so one
  holding NaN would lose the run's work as surely as none. The parameters and statistics are
  checked (the optimiser's moments follow from the same gradients, and with Adam they would
  triple what is copied to the host at every save)."""
  if not _all_finite((state["params"], state["batch_stats"])):
    raise NonFinite(f"training stopped: the parameters became non-finite by step {step}")
  checkpoint.save(mngrs[which], step, state, trajectory, iterator)


def _check_loss(value: float, step: int) -> None:
  if not math.isfinite(value):
    raise NonFinite(f"training stopped: the loss became {value} by step {step}")


def _keep_verified(mngrs, verified: int, stopped: NonFinite) -> UserError:
  """After a non-finite loss, parameters or scores: delete every checkpoint whose weights were
  not seen to give a finite loss (the loss of step s + 1 is that of the weights saved at step
  s, so only checkpoints before `verified`, the last step whose losses were all seen finite,
  stand), and say which one is left."""
  dropped = []
  for m in mngrs.values():
    m.wait_until_finished()
    dropped += [s for s in m.all_steps() if s >= verified]
    for step in [s for s in m.all_steps() if s >= verified]:
      m.delete(step)
  last = mngrs["latest"].latest_step()
  kept = f"the last good checkpoint (step {last}) is kept" if last is not None else \
      "no checkpoint held weights with a finite loss, so none is kept" if dropped else \
      "no checkpoint was written"
  return UserError(f"{stopped}; {kept}. Try a lower optimizer.learning_rate")


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


def _load_step(step_fn, state, batch: jax.ShapeDtypeStruct, preload: bool) -> None:
  """Trace and lower the train step, then load it from the compilation cache (or compile it)
  while matplotlib is imported beside it for training_curves.png (`preload`): loading leaves
  the interpreter free, and the steps are not slowed by an import. The step's first call
  finds the program ready (JAX keeps it for the function)."""
  lowered = step_fn.trace(state, batch).lower()
  importing = figures.preload() if preload else None
  lowered.compile()
  if importing is not None:
    importing.join()


def train(run: Plan, workdir: str, inputs: data.RunData, train_set: str | None = None) -> bool:
  """Train (or resume) the plan `run` on `inputs` (their training images less the validation
  split) to its number of steps, leaving its checkpoints in `workdir`; a workdir that has
  already finished is left as it is (returns False: no step run, no run record written).
  `train_set`, the images' fingerprint, goes into the run's record (computed when not given)."""
  config = run.config
  train_images, train_index, val_index = inputs.train, inputs.train_index, inputs.val_index
  mesh = runtime.make_mesh()
  replicated = runtime.replicated(mesh)
  batch_sharding = runtime.batch_sharded(mesh)
  num_steps, schedule, tx = train_step.optimization(config, len(train_index))
  spe = data.steps_per_epoch(len(train_index), config.batch_size)
  lr_at = jax.jit(schedule)  # for the log; op by op it compiled eight programs at the first line
  mngrs = checkpoint.managers(workdir, config.checkpoint.keep)
  sinks = None
  try:
    model = assemble(run, "init")
    # One program: op by op, the optimiser's zero moments compiled many small programs. The
    # drawn weights are donated: kept, they were a second copy all run (0.49 GB for fcn_boss).
    state = jax.device_put(jax.jit(lambda p, s: train_step.init_state(p, s, tx),
                                   donate_argnums=(0, 1))(*model.state), replicated)
    step_fn = train_step.jit_train_step(
        train_step.make_train_step(model.train_def, tx, run.variant.loss, run.transform,
                                   run.keys["noise"], run.compute_dtype), mesh, run.fast_paths)
    evaluator = EpochEvaluator(model, train_images, val_index, inputs.test, inputs.labels,
                               mesh=mesh)

    shard = data.Shard(jax.process_index(), jax.process_count())
    dataset = data.train_dataset(train_images, batch_size=config.batch_size, seed=config.seed,
                                 num_steps=num_steps, shard=shard,
                                 num_threads=config.data.num_threads,
                                 index=train_index if len(val_index) else None)
    iterator = iter(dataset)
    fresh = not mngrs["latest"].all_steps()
    resumed = _resume(mngrs, state, iterator, replicated, num_steps)
    if resumed is None:
      return False
    state, start = resumed
    if runtime.is_main_process():
      workdir_lib.record(config, workdir, "train", fresh=fresh, facts={
          workdir_lib.TRAIN_SET: train_set or data.fingerprint(train_images)})
    if start:
      log(f"resumed from step {start} of {num_steps} ({workdir})")
    sinks = metrics.open_sinks(workdir, start)

    _load_step(step_fn, state, jax.ShapeDtypeStruct(
        (config.batch_size, *train_images.shape[1:]), train_images.dtype, sharding=batch_sharding),
        preload=config.figures and runtime.is_main_process())
    log(f"training {config.model}: {num_steps} steps ({spe} an epoch), batch "
        f"{config.batch_size}, {jax.device_count()} device(s) [{jax.devices()[0].platform}]")
    every_steps, every_s = config.checkpoint.every_steps, 60 * config.checkpoint.every_minutes
    with _stop_signals() as stop:
      began = last_log = last_save = time.time()
      log_step, steady = start, None  # steady: (time, step) of the first log, after compiling
      best = None  # (step, model part) of the best epoch not yet written
      verified = start  # every loss up to this step was seen finite (see _keep_verified)
      try:
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
            _check_loss(loss, done)
            _check_loss(float(state["epoch_loss_sum"]), done)  # every step's since the epoch began
            verified = done
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
            state, improved = _end_epoch(state, done, spe, evaluator, mngrs, sinks)
            if improved:  # the state is donated: the best epoch's weights are copied out
              best = None  # the previous copy first: two would be held at once
              best = (done, jax.tree.map(jnp.copy, checkpoint.model_part(state)))
            release_free_memory()  # what the evaluation freed, back to the system
          due = (every_steps and done % every_steps == 0) or done == num_steps or \
              (every_s and time.time() - last_save >= every_s)
          if due or stop.get("signal"):
            _check_loss(float(state["epoch_loss_sum"]), done)
            verified = done
            if best is not None:  # written with the latest one that records its quality
              _save(mngrs, "best", *best, run.trajectory)
              best = None
            _save(mngrs, "latest", done, state, run.trajectory, iterator)
            if done < num_steps:  # orbax writes from views of the state (on CPU): a step
              mngrs["latest"].wait_until_finished()  # now could not reuse it, and made a copy
            last_save = time.time()
          if done == num_steps and runtime.is_main_process():
            # While orbax writes the last checkpoint, mostly waiting on the disk: the figure
            # costs the run's end less here than before the save (docs/performance.md).
            if config.figures:
              figures.plot_training_curves(os.path.join(workdir, metrics.METRICS_FILE),
                                           os.path.join(workdir, "training_curves.png"))
            else:  # an earlier run's: it no longer describes this one
              report.remove_outputs(workdir, ["training_curves.png"])
          if stop.get("signal") and done < num_steps:
            mngrs["latest"].wait_until_finished()
            raise Interrupted(stop["signal"], done, num_steps)
      except NonFinite as e:
        raise _keep_verified(mngrs, verified, e) from None
    state = best = None  # orbax writes from views of them (on CPU): ours go before the wait
  finally:
    metrics.close(sinks)
    checkpoint.finish(mngrs, workdir)
  return True


def _end_epoch(state, done: int, spe: int, evaluator: EpochEvaluator, mngrs, sinks):
  """The epoch's record (mean loss and what `evaluator` measures) and the reconstruction grid;
  (state, whether this epoch is the best so far). The best epoch's weights are written with the
  next latest checkpoint (the one whose state records its quality), not at every improved
  epoch: a `best` fcn_boss checkpoint is 0.49 GB, and a run resumes from the latest one anyway."""
  model_state = (state["params"], state["batch_stats"])
  mean_loss = float(state["epoch_loss_sum"]) / spe
  record = {"step": done, "epoch": done // spe, "epoch_mean_loss": mean_loss,
            **evaluator.run(model_state)}
  quality = evaluator.quality(record)
  # Host values go back as replicated global arrays (what orbax saves in multi-process runs).
  sharding = state["step"].sharding
  state = dict(state, epoch_loss_sum=jax.device_put(np.float32(0), sharding))
  improved = quality > float(state["best"])
  if improved:
    state = dict(state, best=jax.device_put(np.float32(quality), sharding))
    record["best"] = True
  log(f"epoch {done // spe} done: mean loss {mean_loss:.6g}"
      + (f", validation score {record['val_score']:.6g}" if "val_score" in record else "")
      + (f", test AUC {record['test_auc']:.4f}" if "test_auc" in record else "")
      + (f" (best so far by {evaluator.best_by})" if record.get("best") else ""))
  metrics.write(sinks, record, "epoch")
  grid = evaluator.grid(model_state)
  if grid is not None:
    metrics.write_image(sinks, "epoch/reconstructions", grid, done)
  return state, improved
