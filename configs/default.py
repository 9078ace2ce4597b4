"""Every key at its default, with the course sample code's recipe: the base of each variant.

Each `configs/<variant>.py` starts from `get_config()` and states what its original changes,
with the source. `apply_arg` holds the `:quick` and `:demo` args every recipe takes. The keys,
their types and what they allow are `hw8jax.config.SCHEMA` and `hw8jax.config.validate`; the
README's configuration table says what each does.
"""

import ml_collections

from hw8jax.config import ConfigError


def get_config(arg=None):
  """The sample code's recipe for its convolutional autoencoder (`ta_cnn`), the seed's simple
  baseline; `arg` as `apply_arg`."""
  c = ml_collections.ConfigDict()
  c.model = "ta_cnn"
  c.seed = 0                       # drives init, shuffling, noise, sampling at scoring
  c.init_from = ""                 # a PyTorch original's torch.save file: its weights instead
                                   # of a fresh initialisation
  # The course sample code's recipe.
  c.num_epochs = 50
  c.batch_size = 2000
  c.max_steps = 0                  # > 0: stop after this many steps (also the schedule length)
  c.allow_changes = ""             # resuming: keys that may differ from the checkpoints' run

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"        # torch.optim.Adam (PyTorch's betas and eps)
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.0   # torch Adam's default; used by adamw only

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "constant"
  # The seed's warmup: int(1.15 * 0.1 * total_steps) steps, kept as that product: 1.15 * 0.1
  # is 0.11499999999999999, and int(0.115 * T) differs from it for T = 1000 (115 vs 114).
  c.schedule.warmup_fraction = 1.15 * 0.1

  c.data = ml_collections.ConfigDict()
  c.data.dir = "data"              # Kaggle layout: trainingset.npy, testingset.npy
  c.data.test_labels = ""          # optional .npy of 0/1 labels for testingset.npy
  c.data.transform = "none"        # 2x/255 - 1, no crop
  c.data.demo = False              # build the bundled demo set into data.dir if missing
  c.data.num_threads = 2           # grain reader threads
  c.data.val_fraction = 0.0        # held-out training images; 0, as the originals

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_minutes = 10.0
  c.checkpoint.every_steps = 0
  c.checkpoint.keep = 2
  c.checkpoint.restore = "latest"  # the sample code scores its last model
  c.checkpoint.best_by = "auto"

  c.score = ml_collections.ConfigDict()
  c.score.metric = "l2"            # sqrt of summed squared error
  c.score.topk = 256
  c.score.sample = True            # VAE parts: a sampled z, as the sample code scores them
  c.score.batch_size = 500
  c.score.threshold_quantile = 0.95
  c.score.fdr = 0.0                # 0: is_anomaly above the quantile threshold; else BH at this

  c.log_every_seconds = 5.0
  c.figures = True
  c.compute_dtype = "float32"
  c.matmul_precision = "highest"   # float32 matmuls stay float32 on GPUs too (not TF32)
  c.compilation_cache = "auto"
  c.cpu_fast_paths = "auto"
  c.coordinator_address = ""
  c.num_processes = 1
  c.process_id = 0
  c.distributed_timeout = 300.0
  return apply_arg(c, arg)


def for_model(model: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """Every key at its default, for `model`: what a variant without changes of its own, a model
  added with `hw8jax.models.register`, the tests and the benchmarks start from."""
  c = get_config()
  c.model = model
  return apply_arg(c, arg)


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """`:quick` shrinks a run to a minute or two on a 2-core CPU, on whatever `data.dir` holds;
  `:demo` trains on the bundled demo set. Both keep one `latest` checkpoint (one fcn_boss
  checkpoint is 1.5 GB)."""
  if arg in (None, ""):
    return c
  if arg == "quick":
    c.batch_size = 16
    c.max_steps = 20
    c.checkpoint.every_steps = 10
    c.checkpoint.keep = 1
    c.score.batch_size = 64
    c.log_every_seconds = 2.0
  elif arg == "demo":
    c.data.dir = ""                # "": <workdir>/demo_data
    c.data.demo = True
    c.batch_size = 14              # 70 training faces: 5 steps an epoch
    c.num_epochs = 60
    c.checkpoint.keep = 1
    c.score.batch_size = 60
  else:
    raise ConfigError(f"unknown config arg {arg!r}: use 'quick' or 'demo'")
  return c
