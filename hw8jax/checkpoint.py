"""orbax checkpoints of a run: `latest` and `best`, in separate managers.

`latest` keeps the last `keep`, with the grain iterator; `best` one, by `checkpoint.best_by`.
Apart, keeping the best never deletes a latest one and vice versa.

Layout: WORKDIR/checkpoints/{latest,best}/<step>/{state,data}. In `latest`, `state` is the whole
train state pytree (params, batch_stats, opt_state, step, ...) and `data` the grain iterator's
state. `best` is only ever scored, so its `state` holds just params, batch_stats and step: a third
of the size with Adam (fcn_boss: 0.43 GB instead of 1.3 GB).

Reading falls back: a checkpoint that cannot be read (a truncated or garbled file) is skipped
with one line naming it and why, and the next older one is read instead.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import sys
import time

import grain
import jax
import orbax.checkpoint as ocp

from hw8jax import atomic, runtime
from hw8jax.errors import UserError


def _not_the_ocdbt_merge_note(record: logging.LogRecord) -> bool:
  # orbax warns at every save that it found no OCDBT files to merge: true of every checkpoint
  # written here (use_ocdbt=False, below), so not worth a line in the user's terminal.
  return "Skipping merge of OCDBT checkpoints" not in str(record.msg)


logging.getLogger("absl").addFilter(_not_the_ocdbt_merge_note)


def check_writable(workdir: str) -> None:
  """Fail in one line now, rather than after a training epoch (orbax waits minutes on a folder
  it cannot write before it gives up)."""
  for which in ("latest", "best"):
    folder = os.path.join(os.path.abspath(workdir), "checkpoints", which)
    probe = os.path.join(folder, f".probe{os.getpid()}")
    try:
      os.makedirs(folder, exist_ok=True)
      with open(probe, "w"):
        pass
      os.remove(probe)
    except OSError as e:
      raise UserError(f"{folder}: cannot write checkpoints there ({e.strerror})") from None


def exists(workdir: str, which: str = "latest") -> bool:
  """Whether a workdir holds a finished `which` checkpoint, from its folders' names (orbax
  writes into a temporary name and renames it to the step when done)."""
  folder = os.path.join(os.path.abspath(workdir), "checkpoints", which)
  return os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder))


def managers(workdir: str, keep: int) -> dict[str, ocp.CheckpointManager]:
  """Managers of the latest and best checkpoints. Saves are asynchronous; the training loop
  waits for a latest save before its next step (on CPU orbax writes from views of the state,
  which the step would otherwise copy). Arrays are written one folder each, uncompressed,
  rather than zstd-compressed into one OCDBT database: several times faster to write for a
  little more disk, and no compression taking CPU (docs/performance.md). Either layout
  restores."""
  root = os.path.join(os.path.abspath(workdir), "checkpoints")

  def manager(which: str, keep: int) -> ocp.CheckpointManager:
    for attempt in range(10):
      try:
        return ocp.CheckpointManager(
            os.path.join(root, which), options=ocp.CheckpointManagerOptions(max_to_keep=keep),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=False,
                                                                use_compression=False),
                           "data": grain.checkpoint.CheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})
      except FileNotFoundError:  # a step the run writing the workdir deleted as it was listed
        if attempt == 9:
          raise
        time.sleep(0.1)

  return {"latest": manager("latest", keep), "best": manager("best", 1)}


def model_part(state: dict) -> dict:
  """The part of a train state that scoring restores."""
  return {k: state[k] for k in ("params", "batch_stats", "step")}


def save(mngr: ocp.CheckpointManager, step: int, state, trained_with: dict,
         iterator=None) -> None:
  """Save `state` (and the iterator) as `step`. A step already there was written by a run that
  was killed after it (a best checkpoint newer than the latest one the run resumed from); the
  resumed run recomputes it bit-identically, so it is replaced. `trained_with` (the config keys
  that define the model and its trajectory) is saved with it: a checkpoint says what made it.

  The disk must hold the state before the save starts: a save that runs out of space midway
  fails in orbax's writer threads, hundreds of lines of tracebacks later. Orbax waits for the
  previous save before it starts a new one anyway, so the free space is counted after it."""
  mngr.wait_until_finished()
  need = int(1.05 * sum(x.nbytes for x in jax.tree.leaves(state))) + 2**20
  free = atomic.free_bytes(mngr.directory)
  if free < need:
    raise UserError(f"{mngr.directory}: no space left for checkpoint {step} ({atomic.size(need)} "
                    f"needed, {atomic.size(free)} free); the checkpoints already saved are "
                    "kept: free some space and run the same command to resume")
  if step in mngr.all_steps():
    mngr.delete(step)
  items = {"state": ocp.args.PyTreeSave(state), "config": ocp.args.JsonSave(trained_with)}
  if iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(iterator)
  mngr.save(step, args=ocp.args.Composite(**items), force=True)


def remove_unfinished(workdir: str) -> None:
  """Remove the temporary folders of saves that did not finish (orbax renames a save's folder
  to its step only when it is complete): after a failed run, none is left behind."""
  root = os.path.join(os.path.abspath(workdir), "checkpoints")
  for which in ("latest", "best"):
    folder = os.path.join(root, which)
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
      if ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def finish(mngrs, workdir: str) -> None:
  """Wait for the saves in progress, close the managers and remove what an unfinished save left;
  a save that failed in orbax's writer threads (a disk that filled up meanwhile) is one line."""
  failed = None
  for m in mngrs.values():
    try:
      m.wait_until_finished()
    except Exception as e:  # orbax and tensorstore raise many kinds
      failed = failed or (m.directory, e)
    m.close()
  if runtime.is_main_process():
    remove_unfinished(workdir)
  if failed is not None:
    folder, e = failed
    reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    raise UserError(f"{folder}: a checkpoint could not be written ({reason}; "
                    f"{atomic.size(atomic.free_bytes(folder))} free); the checkpoints already "
                    "saved are kept: run the same command to resume") from None


def saved_config(mngr: ocp.CheckpointManager, step: int) -> dict | None:
  """What trained the checkpoint `step` (the keys `save` was given); None for a checkpoint
  written before checkpoints carried it."""
  if not os.path.isdir(os.path.join(str(mngr.directory), str(step), "config")):
    return None
  return dict(mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"])


def trained_with(workdir: str, keep: int = 1) -> dict | None:
  """What trained the newest checkpoint of `workdir` that says so (latest, else best)."""
  mngrs = managers(workdir, keep)
  try:
    for which in ("latest", "best"):
      for step in sorted(mngrs[which].all_steps(), reverse=True):
        try:
          found = saved_config(mngrs[which], step)
        except Exception:  # a damaged checkpoint: the next older one may say
          continue
        if found is not None:
          return found
    return None
  finally:
    for m in mngrs.values():
      m.close()


def check_model(mngr: ocp.CheckpointManager, step: int, model: str) -> None:
  """Refuse, before any tensor is read, a checkpoint of another model."""
  found = saved_config(mngr, step)
  if found is not None and found.get("model") != model:
    raise UserError(f"{mngr.directory}/{step}: a checkpoint of {found.get('model')!r}, not of "
                    f"{model!r}; use --config.model={found.get('model')} or another --workdir")


def restore_iterator(mngr: ocp.CheckpointManager, iterator, step: int) -> None:
  """Move `iterator` to where it was when `step` was saved."""
  mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))


def restore(mngr: ocp.CheckpointManager, abstract_state, iterator=None, step: int | None = None):
  """The state saved at `step` (default: the newest), laid out as `abstract_state` says
  (shapes, dtypes and shardings: so a checkpoint restores onto any number of devices), and the
  iterator moved to where it was."""
  step = mngr.latest_step() if step is None else step
  items = {"state": ocp.args.PyTreeRestore(
      abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
  if iterator is not None:
    items["data"] = grain.checkpoint.CheckpointRestore(iterator)
  return mngr.restore(step, args=ocp.args.Composite(**items))["state"]


def restore_model(mngr: ocp.CheckpointManager, abstract_model: dict, step: int | None = None):
  """Only {"params", "batch_stats"} of a saved train state, laid out as `abstract_model` says:
  scoring needs neither the optimiser state nor the config that shaped it."""
  step = mngr.latest_step() if step is None else step
  item = ocp.args.PyTreeRestore(
      item=abstract_model,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_model),
      partial_restore=True)
  return mngr.restore(step, args=ocp.args.Composite(state=item))["state"]


def abstract(state, sharding=None):
  """ShapeDtypeStructs of `state`, placed with `sharding` (default: each leaf's own)."""
  def leaf(x):
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=sharding if sharding is not None else x.sharding)
  return jax.tree.map(leaf, state)


def _reason(e: Exception) -> str:
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  text = lines[0] if lines else ""
  return f"{type(e).__name__}: {text[:200]}"


def _vanished(mngr: ocp.CheckpointManager, step: int) -> bool:
  """Whether `step` went away while it was read: the run writing the workdir keeps only its
  newest checkpoints and deletes older ones as it saves (a concurrent reader, not damage)."""
  for _ in range(10):
    if not os.path.isdir(os.path.join(str(mngr.directory), str(step))):
      return True
    time.sleep(0.1)
  return False


def _reload(mngr: ocp.CheckpointManager, attempts: int = 10) -> None:
  """`mngr.reload()`, which lists the steps as `managers` does, with the same retries: a run
  writing the workdir may delete a step between orbax's listing and its look at that step."""
  for attempt in range(attempts):
    try:
      return mngr.reload()
    except FileNotFoundError:
      if attempt == attempts - 1:
        raise
      time.sleep(0.1)


def newest_intact(mngr: ocp.CheckpointManager, read, below: int | None = None,
                  tries: int = 30):
  """(step, read(step)) for the newest step (below `below`, if given) that reads, skipping
  unreadable ones with a line each and, silently, ones a run writing the workdir deleted
  meanwhile; None when the manager holds no step at all."""
  steps = sorted((s for s in mngr.all_steps() if below is None or s < below), reverse=True)
  if not steps:
    return None
  skipped, vanished = [], False
  for step in steps:
    # A failed read leaves orbax's reads of the other arrays abandoned; Python reports each when
    # it is collected. hw8jax says what happened in one line, so they are collected here, unsaid.
    unraisable, failed = [], False
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
      return step, read(step)
    except UserError:  # a refusal that names its reason (another model's checkpoint)
      raise
    except Exception as e:  # orbax and tensorstore raise many kinds on damaged files
      failed = True
      if _vanished(mngr, step):
        vanished = True
        continue
      skipped.append(f"step {step} ({_reason(e)})")
      runtime.log(f"skipped checkpoint {mngr.directory}/{step}: cannot read it: {_reason(e)}")
    finally:
      if failed:  # the exception's frames are gone now: collect what they held, unsaid
        gc.collect()
        unraisable.clear()
      sys.unraisablehook = hook
      for args in unraisable:
        hook(args)
  if vanished and tries > 1:  # newer steps were saved meanwhile: look again
    _reload(mngr)
    return newest_intact(mngr, read, below, tries - 1)
  if not skipped:
    raise UserError(f"{mngr.directory}: each checkpoint was replaced by a newer one while it "
                    "was read (a run is saving here often); try again")
  raise UserError(f"{mngr.directory}: no readable checkpoint: {'; '.join(skipped)}; if no run "
                  "is writing this workdir, its checkpoints are damaged: move it aside to "
                  "start over")
