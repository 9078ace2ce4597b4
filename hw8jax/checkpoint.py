"""orbax checkpoints of a run: `latest` (the last `keep`, with the grain iterator) and `best`
(one, by `checkpoint.best_by`) in separate managers, so keeping the best never deletes a
latest one and vice versa.

Layout: WORKDIR/checkpoints/{latest,best}/<step>/{state,data}. In `latest`, `state` is the whole
train state pytree (params, batch_stats, opt_state, step, ...) and `data` the grain iterator's
state. `best` is only ever scored, so its `state` holds just params, batch_stats and step: a third
of the size with Adam (fcn_boss: 0.43 GB instead of 1.3 GB).

Reading falls back: a checkpoint that cannot be read (a truncated or garbled file) is skipped
with one line naming it and why, and the next older one is read instead.
"""

from __future__ import annotations

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp

from hw8jax import runtime
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
  """Managers of the latest and best checkpoints. Saves are asynchronous (the step loop goes
  on while they are written); a run waits for them only before it returns. Arrays are written
  one folder each, uncompressed, rather than zstd-compressed into one OCDBT database: a 1.5 GB
  state took 4.0 s to write that way and 0.5 s this way, for 8 % more disk, and compressing
  took CPU from the steps that run meanwhile (docs/performance.md). Either layout restores."""
  root = os.path.join(os.path.abspath(workdir), "checkpoints")

  def manager(which: str, keep: int) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        os.path.join(root, which), options=ocp.CheckpointManagerOptions(max_to_keep=keep),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=False,
                                                            use_compression=False),
                       "data": grain.checkpoint.CheckpointHandler()})

  return {"latest": manager("latest", keep), "best": manager("best", 1)}


def model_part(state: dict) -> dict:
  """The part of a train state that scoring restores."""
  return {k: state[k] for k in ("params", "batch_stats", "step")}


def save(mngr: ocp.CheckpointManager, step: int, state, iterator=None) -> None:
  """Save `state` (and the iterator) as `step`. A step already there was written by a run that
  was killed after it (a best checkpoint newer than the latest one the run resumed from); the
  resumed run recomputes it bit-identically, so it is replaced."""
  if step in mngr.all_steps():
    mngr.delete(step)
  items = {"state": ocp.args.PyTreeSave(state)}
  if iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(iterator)
  mngr.save(step, args=ocp.args.Composite(**items), force=True)


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


def newest_intact(mngr: ocp.CheckpointManager, read, below: int | None = None):
  """(step, read(step)) for the newest step (below `below`, if given) that reads, skipping
  unreadable ones with a line each; None when the manager holds no step at all."""
  steps = sorted((s for s in mngr.all_steps() if below is None or s < below), reverse=True)
  if not steps:
    return None
  skipped = []
  for step in steps:
    try:
      return step, read(step)
    except Exception as e:  # orbax and tensorstore raise many kinds on damaged files
      skipped.append(f"step {step} ({_reason(e)})")
      runtime.log(f"skipped checkpoint {mngr.directory}/{step}: cannot read it: {_reason(e)}")
  raise UserError(f"{mngr.directory}: no readable checkpoint: {'; '.join(skipped)}; move the "
                  "workdir aside to start over")
