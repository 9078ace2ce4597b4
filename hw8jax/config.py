"""Defaults shared by every `configs/<variant>.py`, the `:quick` / `:demo` config args, and
the one check of a run's config (`validate`, then `check_run_facts` once the data and devices
are known).

Where a value comes from is said next to it; the per-variant files override what their original
used. Every key is documented in the README's configuration table.
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


def base_config(model: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = model
  c.seed = 0                  # drives init, shuffling, noise; one seed for everything
  c.init_from = ""            # a PyTorch original's torch.save file (whole model or
                              # state_dict): its weights instead of a fresh initialisation
  c.num_epochs = 50           # sample code
  c.batch_size = 2000         # sample code
  c.max_steps = 0             # > 0 stops training after this many steps (and sets the schedule
                              # length); 0 trains num_epochs full epochs
  c.allow_changes = ""        # resuming a workdir: comma-separated keys of RESUMABLE_CHANGES
                              # that may differ from what its checkpoints were trained with

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"   # sample code: torch.optim.Adam; also "adamw", "sgd"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.0  # torch Adam's default; used by adamw only

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "constant"     # sample code; "warmup_cosine" for the boss recipe
  # Seed: int(1.15 * 0.1 * total_steps) warmup steps. Kept as that product: 1.15 * 0.1 is
  # 0.11499999999999999, and int(0.115 * T) differs from it for T = 1000 (115 vs 114).
  c.schedule.warmup_fraction = 1.15 * 0.1

  c.data = ml_collections.ConfigDict()
  c.data.dir = "data"              # Kaggle layout: trainingset.npy, testingset.npy
  c.data.test_labels = ""          # optional .npy of 0/1 labels for testingset.npy
  c.data.transform = "none"        # "none" (normalise), "crop" (boss crop), or a
                                   # "top,left,height,width" box
  c.data.demo = False              # build the bundled demo set into data.dir (default
                                   # <workdir>/demo_data) if missing; labels from it
  c.data.num_threads = 2           # grain reader threads
  c.data.val_fraction = 0.0        # share of the training images held out (never trained on):
                                   # their mean anomaly score each epoch picks the best
                                   # checkpoint; 0, as the originals, trains on all of them

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_minutes = 10.0  # latest checkpoint cadence in minutes (0: off); always at
                                   # the last step and at SIGTERM / Ctrl-C
  c.checkpoint.every_steps = 0     # also every this many steps (0: off)
  c.checkpoint.keep = 2            # latest checkpoints kept; the best is kept apart
  c.checkpoint.restore = "latest"  # scoring: "latest" (the sample code's) or "best"
  c.checkpoint.best_by = "auto"    # what picks the best checkpoint: "val_score" (held-out
                                   # images), "train_loss" (epoch mean), "test_auc" (on the
                                   # test labels: biased, and eval.json says so); "auto" is
                                   # val_score with a validation split, else train_loss

  c.score = ml_collections.ConfigDict()
  c.score.metric = "l2"            # sample code: sqrt of summed squared error; also "mse",
                                   # "mae", "topk"
  c.score.topk = 256               # pixels (x channels) averaged by the "topk" metric
  c.score.sample = True            # VAE parts: score a sampled z, as the sample code; False: mu
  c.score.batch_size = 500         # rounded up to a multiple of the device count
  c.score.threshold_quantile = 0.95  # predictions.csv: anomalous above this quantile of the
                                     # scores of normal images the model did not train on
                                     # (the validation split), else of training images

  c.log_every_seconds = 5.0
  c.figures = True                 # the PNG figures; False skips them (about 0.3 s each on
                                   # 2 cores) and removes a workdir's earlier ones
  c.compute_dtype = "float32"      # "bfloat16": bf16 compute, fp32 params and optimiser
  c.matmul_precision = "highest"   # float32 matmuls in full float32 on GPUs too (not TF32);
                                   # "default" lets XLA use TF32 / bf16 passes
  c.compilation_cache = "auto"     # folder of XLA's persistent compilation cache ("auto":
                                   # JAX_COMPILATION_CACHE_DIR if set, else
                                   # $XDG_CACHE_HOME/hw8jax/xla or ~/.cache/hw8jax/xla); "": off
  c.cpu_fast_paths = "auto"        # hw8jax's CPU-tuned conv forms and scorer compilation:
                                   # "auto" on CPU only, "on" / "off" on every backend
  c.coordinator_address = ""       # host:port to run multi-process (jax.distributed)
  c.num_processes = 1
  c.process_id = 0
  c.distributed_timeout = 300.0    # seconds the processes wait for each other at the start
  return c


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """`configs/x.py:quick` shrinks a run to a minute or two on a 2-core CPU; `:demo` points it at
  the bundled demo set (see README)."""
  if arg in (None, ""):
    return c
  if arg == "quick":
    c.batch_size = 16
    c.max_steps = 20
    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 1        # a smoke run: one fcn_boss checkpoint is 1.5 GB
    c.score.batch_size = 64
    c.log_every_seconds = 2.0
  elif arg == "demo":
    c.data.dir = ""              # "": <workdir>/demo_data
    c.data.demo = True
    c.batch_size = 14            # 70 training faces: 5 steps an epoch
    c.num_epochs = 60
    c.checkpoint.keep = 1        # a smoke run: one fcn_boss checkpoint is 1.5 GB
    c.score.batch_size = 60
  else:
    raise ConfigError(f"unknown config arg {arg!r}: use 'quick' or 'demo'")
  return c


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


def _type_name(value) -> str:
  return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
      type(value), type(value).__name__)


def validate(c: ml_collections.ConfigDict, mode: str = "train_and_score") -> None:
  """Every key of `c`, alone and against each other: raises ConfigError listing each mistake
  on its own line. Nothing here reads data, starts JAX or writes anything."""
  from hw8jax import cpu_tuning, models

  problems = []
  if mode not in MODES:
    problems.append(f"--mode={mode}: use one of {', '.join(MODES)}")
  if "model" not in c or not isinstance(c.model, str):
    raise ConfigError("config: no model name (key 'model')")
  flat, known = flatten(c), flatten(base_config(c.model))
  for key in flat.keys() - known.keys():
    near = difflib.get_close_matches(key, known, n=1)
    problems.append(f"{key}: no such config key" + (f"; did you mean {near[0]}?" if near else ""))
  for key in known.keys() - flat.keys():
    problems.append(f"{key}: missing from the config (start from hw8jax.config.base_config)")
  for key in sorted(flat.keys() & known.keys()):
    want, got = known[key], flat[key]
    ok = isinstance(got, bool) if isinstance(want, bool) else \
        (isinstance(got, (int, float)) and not isinstance(got, bool)) if isinstance(want, float) \
        else (isinstance(got, int) and not isinstance(got, bool)) if isinstance(want, int) \
        else isinstance(got, type(want))
    if not ok:
      problems.append(f"{key}={got!r}: must be {_type_name(want)}")
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


def trajectory(c: ml_collections.ConfigDict) -> dict:
  """The values of TRAJECTORY_KEYS: what a checkpoint of `c` was trained with."""
  flat = flatten(c)
  return {key: flat[key] for key in TRAJECTORY_KEYS}


def best_by(c: ml_collections.ConfigDict) -> str:
  """What picks the best checkpoint, "auto" resolved."""
  if c.checkpoint.best_by != "auto":
    return c.checkpoint.best_by
  return "val_score" if c.data.val_fraction > 0 else "train_loss"


def num_held_out(num_images: int, val_fraction: float) -> int:
  return int(round(val_fraction * num_images))


def check_run_facts(c: ml_collections.ConfigDict, mode: str, *, num_devices: int,
                    num_train: int, train_path: str) -> None:
  """The keys that depend on the machine and the data, once both are known (and before any
  model is built)."""
  if mode == "score":
    return
  problems = []
  held_out = num_held_out(num_train, c.data.val_fraction)
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
