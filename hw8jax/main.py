"""One run of launch.py or of the Python API: check, hold the workdir, read, train and score."""

from __future__ import annotations

import contextlib
import os

import jax
import ml_collections

from hw8jax import atomic, checkpoint, data, runtime, train
from hw8jax import config as config_lib
from hw8jax import workdir as workdir_lib
from hw8jax.errors import UserError
from hw8jax.plan import plan
from hw8jax.score_run import score_run


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "train_and_score"):
  """Train and/or score as `mode` says; returns the eval record (or None without labels).
  `config` may also be a plain dict of the same keys (`ConfigDict.to_dict()`)."""
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"config: a {type(config).__name__}; give a ConfigDict "
                    "(hw8jax.get_config) or a dict of the same keys")
  if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
    raise UserError(f"workdir={workdir!r}: give the path of a folder for the run's outputs")
  workdir = os.fspath(workdir)
  config_lib.validate(config, mode)  # every key, before anything is started, read or written
  runtime.use_compilation_cache(config.compilation_cache)
  atomic.check_folder(workdir, "--workdir")
  workdir_lib.check_layout(workdir)
  runtime.init_distributed(config)
  inputs = data.open_run_data(config, workdir)  # headers only (the demo set is written once)
  run_plan = plan(config, mode, inputs)  # the run's facts, checked and resolved once
  held = workdir_lib.lock(workdir) if runtime.is_main_process() else contextlib.nullcontext()
  # Explicit, because the default on GPUs computes float32 matmuls in TF32 (PyTorch's default
  # does not); "highest" keeps float32 runs float32. It changes nothing on CPU.
  training = mode in ("train", "train_and_score")
  train_set = data.fingerprint(inputs.train) if training else None
  with held, jax.default_matmul_precision(config.matmul_precision):
    workdir_lib.check_agrees(config, workdir, mode,
                             (inputs.train_path, train_set) if training else None)
    trained = False
    if training:
      checkpoint.check_writable(workdir)
      trained = train.train(run_plan, workdir, inputs, train_set=train_set)
    if mode in ("score", "train_and_score"):  # one record a run: training's, if it trained
      return score_run(run_plan, workdir, inputs, record=not trained)
  return None
