"""The config's schema and its one check, before any work and once data and devices are known.

`validate` checks every key against `SCHEMA` and the others; `check_run_facts` checks what
depends on the data and the machine. The values live in configs/ (`configs/default.py` and each
variant's changes); every key is documented in the README's configuration table.
"""

from __future__ import annotations

import difflib
import math

import ml_collections

from hw8jax.errors import UserError

MODES = ("train", "score", "train_and_score")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "warmup_cosine")
METRICS = ("l2", "mse", "mae", "topk")
COMPUTE_DTYPES = ("float32", "bfloat16")
MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
BEST_BY = ("auto", "val_score", "train_loss", "test_auc")
IMAGE_SIZE = 64

# What a workdir's checkpoints were made with (see hw8jax.workdir): a run on a workdir that has
# checkpoints must agree on these. Scoring needs only the first group; training, all of them.
MODEL_KEYS = ("model", "data.transform")
TRAJECTORY_KEYS = MODEL_KEYS + ("seed", "init_from", "batch_size", "num_epochs", "max_steps",
                                "optimizer.name", "optimizer.learning_rate",
                                "optimizer.weight_decay", "schedule.name",
                                "schedule.warmup_fraction", "compute_dtype", "data.val_fraction",
                                "checkpoint.best_by")
# Keys a resumed run may change when `allow_changes` names them: training longer (or shorter)
# continues the same trajectory.
RESUMABLE_CHANGES = ("num_epochs", "max_steps")


class ConfigError(UserError, ValueError):
  """A config mistake; one line per mistake, naming the key, its value and what is allowed."""


# Every key of a config and its type (a float key also takes an integer); the values, with the
# sample code's recipe, are configs/default.py's, and the README's table says what each does.
SCHEMA = {
    "model": str, "seed": int, "init_from": str, "num_epochs": int, "batch_size": int,
    "max_steps": int, "allow_changes": str,
    "optimizer.name": str, "optimizer.learning_rate": float, "optimizer.weight_decay": float,
    "schedule.name": str, "schedule.warmup_fraction": float,
    "data.dir": str, "data.test_labels": str, "data.transform": str, "data.demo": bool,
    "data.num_threads": int, "data.val_fraction": float,
    "checkpoint.every_minutes": float, "checkpoint.every_steps": int, "checkpoint.keep": int,
    "checkpoint.restore": str, "checkpoint.best_by": str,
    "score.metric": str, "score.topk": int, "score.sample": bool, "score.batch_size": int,
    "score.threshold_quantile": float, "score.fdr": float,
    "log_every_seconds": float, "figures": bool, "compute_dtype": str, "matmul_precision": str,
    "compilation_cache": str, "cpu_fast_paths": str,
    "coordinator_address": str, "num_processes": int, "process_id": int,
    "distributed_timeout": float,
}


# --- validation


def flatten(c, prefix: str = "") -> dict:
  """{"data.transform": "crop", ...}: every leaf key of a config (or of one read back from
  JSON), dotted."""
  out = {}
  for key, value in c.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def parse_box(spec: str):
  """(top, left, height, width) of a "top,left,height,width" transform; None for "none" and
  "crop". Raises ValueError saying what is wrong."""
  if spec in ("none", "crop"):
    return None
  parts = spec.split(",")
  if len(parts) != 4:
    raise ValueError("use 'none', 'crop' or a 'top,left,height,width' box")
  try:
    top, left, height, width = (int(p) for p in parts)
  except ValueError:
    raise ValueError("a box is four integers 'top,left,height,width'") from None
  if min(top, left) < 0 or min(height, width) < 1 or top + height > IMAGE_SIZE or \
      left + width > IMAGE_SIZE:
    raise ValueError(f"the box must lie inside the {IMAGE_SIZE}x{IMAGE_SIZE} image "
                     "(top, left >= 0; height, width >= 1; top + height and left + width "
                     f"<= {IMAGE_SIZE})")
  return top, left, height, width


_TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}


def _is(value, kind: type) -> bool:
  """Whether `value` is of the schema's `kind`: a bool is not a number, an int is a float."""
  if kind is bool or isinstance(value, bool):
    return kind is bool and isinstance(value, bool)
  return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def validate(c: ml_collections.ConfigDict, mode: str = "train_and_score") -> None:
  """Every key of `c`, alone and against each other: raises ConfigError listing each mistake
  on its own line. Nothing here reads data, starts JAX or writes anything."""
  # Here, not at the top: configs/ import this module at flag parsing, which must stay cheap
  # (hw8jax/__init__.py), and these import JAX and Flax.
  from hw8jax import cpu_tuning, models

  problems = []
  if mode not in MODES:
    problems.append(f"--mode={mode}: use one of {', '.join(MODES)}")
  if "model" not in c or not isinstance(c.model, str):
    raise ConfigError("config: no model name (key 'model')")
  flat = flatten(c)
  for key in flat.keys() - SCHEMA.keys():
    near = difflib.get_close_matches(key, SCHEMA, n=1)
    problems.append(f"{key}: no such config key" + (f"; did you mean {near[0]}?" if near else ""))
  for key in SCHEMA.keys() - flat.keys():
    problems.append(f"{key}: missing from the config (start from hw8jax.get_config)")
  for key in sorted(flat.keys() & SCHEMA.keys()):
    if not _is(flat[key], SCHEMA[key]):
      problems.append(f"{key}={flat[key]!r}: must be {_TYPE_NAMES[SCHEMA[key]]}")
  if problems:
    raise ConfigError("\n".join(problems))

  def check(key, ok, allowed):
    if not ok:
      problems.append(f"{key}={flat[key]!r}: {allowed}")

  def choice(key, options):
    check(key, flat[key] in options, f"use one of {', '.join(options)}")

  def at_least(key, low):
    check(key, flat[key] >= low, f"must be at least {low}")

  if c.model not in models.REGISTRY:
    problems.append(f"model={c.model!r}: use one of {', '.join(models.REGISTRY)}")
  check("seed", 0 <= c.seed < 2**32, "must be between 0 and 2**32 - 1")
  at_least("num_epochs", 1)
  at_least("batch_size", 1)
  at_least("max_steps", 0)
  changes = [k.strip() for k in c.allow_changes.split(",") if k.strip()]
  check("allow_changes", set(changes) <= set(RESUMABLE_CHANGES),
        f"comma-separated keys among {', '.join(RESUMABLE_CHANGES)}")
  choice("optimizer.name", OPTIMIZERS)
  lr = c.optimizer.learning_rate
  check("optimizer.learning_rate", math.isfinite(lr) and lr > 0, "must be a finite number > 0")
  wd = c.optimizer.weight_decay
  check("optimizer.weight_decay", math.isfinite(wd) and wd >= 0, "must be a finite number >= 0")
  choice("schedule.name", SCHEDULES)
  wf = c.schedule.warmup_fraction
  check("schedule.warmup_fraction", math.isfinite(wf) and 0 <= wf < 1,
        "must be in [0, 1)")
  try:
    parse_box(c.data.transform)
  except ValueError as e:
    problems.append(f"data.transform={c.data.transform!r}: {e}")
  at_least("data.num_threads", 0)
  vf = c.data.val_fraction
  check("data.val_fraction", math.isfinite(vf) and 0 <= vf < 1, "must be in [0, 1)")
  choice("checkpoint.best_by", BEST_BY)
  check("checkpoint.best_by", c.checkpoint.best_by != "val_score" or vf > 0,
        "needs a validation split (data.val_fraction > 0)")
  check("checkpoint.best_by", c.checkpoint.best_by != "test_auc" or c.data.test_labels or
        c.data.demo, "needs test labels (data.test_labels)")
  at_least("checkpoint.every_steps", 0)
  em = c.checkpoint.every_minutes
  check("checkpoint.every_minutes", math.isfinite(em) and em >= 0, "must be a finite number >= 0")
  check("checkpoint.keep", c.checkpoint.keep >= 1,
        "must be at least 1 (the latest checkpoint is what a run resumes and scores from)")
  choice("checkpoint.restore", ("latest", "best"))
  choice("score.metric", METRICS)
  pixels = IMAGE_SIZE * IMAGE_SIZE * 3
  check("score.topk", 1 <= c.score.topk <= pixels,
        f"must be between 1 and {pixels} (the pixel-channel values of an image)")
  at_least("score.batch_size", 1)
  q = c.score.threshold_quantile
  check("score.threshold_quantile", math.isfinite(q) and 0 < q < 1, "must be in (0, 1)")
  fdr = c.score.fdr
  check("score.fdr", math.isfinite(fdr) and 0 <= fdr < 1,
        "must be in [0, 1): 0 keeps the quantile threshold, 0 < alpha < 1 decides by "
        "Benjamini-Hochberg at false discovery rate alpha")
  check("log_every_seconds", math.isfinite(c.log_every_seconds) and c.log_every_seconds >= 0,
        "must be a finite number >= 0")
  choice("compute_dtype", COMPUTE_DTYPES)
  choice("matmul_precision", MATMUL_PRECISIONS)
  choice("cpu_fast_paths", cpu_tuning.SETTINGS)
  at_least("num_processes", 1)
  check("process_id", 0 <= c.process_id < c.num_processes,
        f"must be in [0, num_processes={c.num_processes})")
  check("coordinator_address", c.num_processes == 1 or c.coordinator_address,
        "a run of several processes needs host:port of process 0")
  dt = c.distributed_timeout
  check("distributed_timeout", math.isfinite(dt) and dt > 0, "must be a finite number > 0")
  if problems:
    raise ConfigError("\n".join(problems))


def resolve(c: ml_collections.ConfigDict, mode: str, facts: dict | None = None
            ) -> tuple[str, dict]:
  """(what picks the best checkpoint, "auto" resolved; the values of TRAJECTORY_KEYS, what a
  checkpoint of `c` is trained with) of a validated `c`, once `facts` (`check_run_facts`'s
  keywords), when given, are checked."""
  if facts is not None:
    check_run_facts(c, mode, **facts)
  best_by = c.checkpoint.best_by
  if best_by == "auto":
    best_by = "val_score" if c.data.val_fraction > 0 else "train_loss"
  flat = flatten(c)
  return best_by, {key: flat[key] for key in TRAJECTORY_KEYS}


def check_run_facts(c: ml_collections.ConfigDict, mode: str, *, num_devices: int,
                    num_train: int, held_out: int, train_path: str) -> None:
  """The keys that depend on the machine and the data, once both are known (and before any
  model is built): `num_train` images in `train_path`, `held_out` of them for validation."""
  if mode == "score":
    return
  problems = []
  if c.data.val_fraction > 0 and held_out == 0:
    problems.append(f"data.val_fraction={c.data.val_fraction}: holds out no image of the "
                    f"{num_train} in {train_path}")
  num_train -= held_out
  if c.batch_size % num_devices:
    problems.append(f"batch_size={c.batch_size}: does not split over {num_devices} devices; "
                    f"use a multiple of {num_devices}")
  if c.batch_size > num_train:
    problems.append(f"batch_size={c.batch_size}: larger than the {num_train} training images "
                    f"in {train_path}" + (" left after the validation split" if held_out else ""))
  if problems:
    raise ConfigError("\n".join(problems))
