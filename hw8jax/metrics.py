"""Where training's numbers go: metrics.jsonl and TensorBoard events, written by process 0.

metrics.jsonl holds a line per progress report and per epoch end; the events are under
tensorboard/ (`tensorboard --logdir runs/`). A resumed run drops what a killed run wrote past its
checkpoint: lines from metrics.jsonl, and events through TensorBoard's purge step (TensorBoard
hides the older files' events from that step on when it reads them)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from hw8jax import atomic, report, runtime

METRICS_FILE = "metrics.jsonl"
EVENTS_DIR = "tensorboard"
# Keys of a record that are bookkeeping, not a curve.
_NOT_PLOTTED = ("step", "epoch", "best", "elapsed_s", "eta_s")


def open_sinks(workdir: str, start_step: int) -> dict | None:
  """The sinks of a run continuing from `start_step` (0: afresh); None off process 0."""
  if not runtime.is_main_process():
    return None
  SummaryWriter = _summary_writer_class()

  path = os.path.join(workdir, METRICS_FILE)
  _truncate(path, start_step)
  # One file per run (a name of its own: two runs within a second would share one otherwise).
  # TensorBoard hides events at steps >= the purge step; this run logs from start_step + 1.
  writer = SummaryWriter(logdir=os.path.join(workdir, EVENTS_DIR), purge_step=start_step + 1,
                         flush_secs=10, filename_suffix=f".{os.getpid()}.from{start_step}")
  return {"path": path, "writer": writer}


def _summary_writer_class():
  """tensorboardX's SummaryWriter. Its module imports torch when torch is installed (to accept
  torch tensors, which hw8jax never passes), a second of every run's start-up
  (docs/performance.md). Unless torch is already loaded, the import sees none (an entry of None
  makes `import torch` fail), and the entry is removed at once, so a later `import torch` works
  as usual."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


def write(sinks: dict | None, record: dict, group: str) -> None:
  """Append `record` to metrics.jsonl and its numbers to TensorBoard as `group/<key>`."""
  if sinks is None:
    return
  try:
    with open(sinks["path"], "a") as f:
      f.write(json.dumps(report.json_safe(record)) + "\n")
  except OSError as e:
    raise atomic.write_error(sinks["path"], e) from None
  for key, value in record.items():
    if key not in _NOT_PLOTTED and isinstance(value, (int, float)) and np.isfinite(value):
      sinks["writer"].add_scalar(f"{group}/{key}", value, record["step"])


def write_image(sinks: dict | None, tag: str, image: np.ndarray, step: int) -> None:
  """An (H, W, 3) image in [0, 1]."""
  if sinks is not None:
    sinks["writer"].add_image(tag, np.clip(image, 0, 1), step, dataformats="HWC")


def close(sinks: dict | None) -> None:
  if sinks is not None:
    sinks["writer"].close()


def _record(line: bytes) -> dict | None:
  """The record of one metrics.jsonl line, or None for a damaged one (cut short by a kill, torn
  by the filesystem, not JSON)."""
  try:
    record = json.loads(line.decode("utf-8")) if line.endswith(b"\n") else None
  except ValueError:  # bad bytes or bad JSON
    return None
  return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _truncate(path: str, step: int) -> None:
  """Keep the lines of steps up to `step` (none when starting afresh: a run that saved nothing
  describes no checkpoint); damaged lines are dropped, with one line saying so."""
  if not os.path.exists(path):
    return
  with open(path, "rb") as f:
    lines = f.readlines()
  records = [(line, _record(line)) for line in lines]
  damaged = sum(record is None for _, record in records)
  if damaged:
    runtime.log(f"{path}: dropped {damaged} damaged line(s) (cut short, bad bytes or not JSON)")
  keep = [line for line, record in records if step and record and record["step"] <= step]
  with atomic.replaced(path, "wb") as f:
    f.writelines(keep)
