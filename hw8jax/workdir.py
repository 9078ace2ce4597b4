"""What a workdir holds about its runs, and the rules for sharing one between runs.

- `config.json`: the config its checkpoints were trained with, written when training starts on
  a workdir without checkpoints and never rewritten while checkpoints exist.
- `runs/NNN-<mode>.json`: the config of every run that started work there, in order.
- `.lock`: held (flock) by the run working there; the kernel releases it when that process
  ends in any way, SIGKILL included, so a killed run never blocks the next one.

A run on a workdir that has checkpoints must agree with the newest training record on the keys
that made them (`config.TRAJECTORY_KEYS` to train on, `config.MODEL_KEYS` to score); the keys a
user may knowingly change when resuming are opted into with `allow_changes`.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket
import sys

import ml_collections

from hw8jax import atomic, checkpoint, metrics, report
from hw8jax import config as config_lib
from hw8jax.configs import default
from hw8jax.errors import UserError

RECORD = "config.json"
RUNS = "runs"
LOCK = ".lock"
TRAIN_SET = "train_set"  # a train record's fingerprint of its training images, beside the config


def _prepare(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise UserError(f"--workdir={workdir}: cannot create it ({e.strerror})") from None


@contextlib.contextmanager
def lock(workdir: str):
  """Hold `workdir` (checked by `atomic.check_folder` first) for this run; another run holding it is
  one line naming its process."""
  _prepare(workdir)
  path = os.path.join(workdir, LOCK)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise UserError(f"--workdir={workdir}: cannot write in it ({e.strerror})") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
      raise UserError(f"--workdir={workdir} is in use by {holder}; wait for it to finish or "
                      "use another --workdir") from None
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    holder = f"process {os.getpid()} on {socket.gethostname()} (started {stamp}: " \
        f"{' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))})"
    try:
      os.ftruncate(fd, 0)
      os.pwrite(fd, holder.encode(), 0)
    except OSError as e:
      raise atomic.write_error(path, e) from None
    yield
  finally:
    os.close(fd)  # releases the lock


# What a run writes in its workdir, by kind: a path there of the other kind (a file named
# `runs`, a folder named `metrics.jsonl`) or a broken link would fail the run midway.
FIT_DATA = "fit_data"  # hw8jax.fit's copy of the images it was given
FOLDERS = (RUNS, "checkpoints", metrics.EVENTS_DIR, FIT_DATA)
FILES = (RECORD, LOCK, metrics.METRICS_FILE, "submission.csv", "scores.npy", "predictions.csv",
         "threshold.json", report.REFERENCE_FILE, "eval.json", "training_curves.png",
         *report.SCORING_FIGURES)


def check_layout(workdir: str) -> None:
  """Before any work: every path a run writes in `workdir` is absent or of the kind it writes
  (a folder or a file), and no link there is broken; one line naming the first that is not."""
  for names, folder in ((FOLDERS, True), (FILES, False)):
    for name in names:
      path = os.path.join(workdir, name)
      if not os.path.lexists(path):
        continue
      if not os.path.exists(path):
        raise UserError(f"{path}: a broken link (to {os.readlink(path)}); remove it or point it "
                        "at a " + ("folder" if folder else "file"))
      if folder and not os.path.isdir(path):
        raise UserError(f"{path}: a file where the run keeps a folder; move it away or use "
                        "another --workdir")
      if not folder and os.path.isdir(path):
        raise UserError(f"{path}: a folder where the run writes a file; move it away or use "
                        "another --workdir")


def _number(name: str) -> int | None:
  head = name.split("-")[0]
  return int(head) if head.isdigit() else None


def run_records(workdir: str) -> list[str]:
  """The paths of runs/NNN-<mode>.json, oldest first: ordered by their number (as text, run
  1000 would come before run 999)."""
  runs = os.path.join(workdir, RUNS)
  names = os.listdir(runs) if os.path.isdir(runs) else []
  numbered = sorted((_number(n), n) for n in names if _number(n) is not None)
  return [os.path.join(runs, n) for _, n in numbered]


def trained_with(workdir: str) -> dict | None:
  """The flattened config of the newest training run recorded in `workdir` (None: none)."""
  record = trained_config(workdir)
  return config_lib.flatten(record) if record is not None else None


def trained_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config of the newest training run recorded in `workdir`, as a ConfigDict."""
  paths = [path for path in run_records(workdir) if path.endswith("-train.json")]
  for path in [*reversed(paths), os.path.join(workdir, RECORD)]:
    record = report.read_json(path)
    if isinstance(record, dict) and isinstance(record.get("model"), str):
      # On today's defaults: a record written before a key existed gets the key's default.
      config = default.for_model(record["model"])
      known = config_lib.flatten(config)
      config.update_from_flattened_dict({k: v for k, v in config_lib.flatten(record).items()
                                         if k in known})
      return config
  return None



def trained_on(workdir: str) -> str | None:
  """The fingerprint (`data.fingerprint`) of the images the newest training run recorded in
  `workdir` trained on (None: no record says)."""
  paths = [path for path in run_records(workdir) if path.endswith("-train.json")]
  record = report.read_json(paths[-1]) if paths else None
  value = record.get(TRAIN_SET) if record else None
  return value if isinstance(value, str) else None


def check_agrees(config, workdir: str, mode: str, train_set: tuple[str, str] | None = None):
  """Stop, in one line, a run that would mix its config, or (training) its images
  `train_set` = (path, fingerprint), with the checkpoints already there."""
  if not (checkpoint.exists(workdir, "latest") or checkpoint.exists(workdir, "best")):
    return
  recorded_set = trained_on(workdir) if mode != "score" and train_set else None
  if recorded_set is not None and recorded_set != train_set[1]:
    raise UserError(f"--workdir={workdir} holds checkpoints trained on other images than "
                    f"{train_set[0]} ({train_set[1].split(':')[0]} images, another content "
                    f"than the {recorded_set.split(':')[0]} it trained on); train on these "
                    "in another --workdir, or --mode=score to score them with this model")
  # The workdir's records, else what the checkpoints themselves say (records deleted or damaged).
  recorded = trained_with(workdir) or checkpoint.trained_with(workdir)
  if recorded is None:
    return
  keys = config_lib.MODEL_KEYS if mode == "score" else config_lib.TRAJECTORY_KEYS
  flat = config_lib.flatten(config)
  allowed = {k.strip() for k in config.allow_changes.split(",")} if mode != "score" else set()
  differ = [k for k in keys if k in recorded and recorded[k] != flat[k] and k not in allowed]
  if not differ:
    return
  listing = "; ".join(f"{k} {flat[k]!r} (trained with {recorded[k]!r})" for k in differ)
  way = "use another --workdir"
  resumable = [k for k in differ if k in config_lib.RESUMABLE_CHANGES]
  if resumable and len(resumable) == len(differ):
    way += f", or continue with --config.allow_changes={','.join(resumable)}"
  elif mode == "score":
    way = "score with the config the workdir was trained with (its config.json), or " + way
  raise UserError(f"--workdir={workdir} holds checkpoints trained with another config: "
                  f"{listing}. To keep them apart, {way}")


def record(config, workdir: str, what: str, fresh: bool = False, facts: dict | None = None):
  """Write the config of what a run is starting (`train` steps, or `score`) to
  runs/NNN-<what>.json, and to config.json when training starts afresh (`fresh`: no checkpoint
  yet). A run that finds its training finished starts no steps and writes no train record, so
  the newest train record is always one the checkpoints continue from."""
  runs = os.path.join(workdir, RUNS)
  os.makedirs(runs, exist_ok=True)
  numbers = [_number(n) for n in os.listdir(runs) if _number(n) is not None]
  content = {**config.to_dict(), **(facts or {})}
  report.write_json(os.path.join(runs, f"{max(numbers, default=0) + 1:03d}-{what}.json"),
                    content)
  if fresh:
    report.write_json(os.path.join(workdir, RECORD), content)
