"""Defaults shared by every `configs/<variant>.py`, and the `:quick` / `:demo` config args.

Where a value comes from is said next to it; the per-variant files override what their original
used. Every key is documented in the README's configuration table.
"""

from __future__ import annotations

import ml_collections


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

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 100   # latest checkpoint cadence (and at the last step)
  c.checkpoint.keep = 2            # latest checkpoints kept; the best is kept apart
  c.checkpoint.restore = "latest"  # scoring: "latest" (the sample code's) or "best"

  c.score = ml_collections.ConfigDict()
  c.score.metric = "l2"            # sample code: sqrt of summed squared error; also "mse",
                                   # "mae", "topk"
  c.score.topk = 256               # pixels (x channels) averaged by the "topk" metric
  c.score.sample = True            # VAE parts: score a sampled z, as the sample code; False: mu
  c.score.batch_size = 500

  c.log_every_seconds = 5.0
  c.compute_dtype = "float32"      # "bfloat16": bf16 compute, fp32 params and optimiser
  c.matmul_precision = "highest"   # float32 matmuls in full float32 on GPUs too (not TF32);
                                   # "default" lets XLA use TF32 / bf16 passes
  c.coordinator_address = ""       # host:port to run multi-process (jax.distributed)
  c.num_processes = 1
  c.process_id = 0
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
    c.checkpoint.keep = 1        # a smoke run: one fcn_boss checkpoint is 1.3 GB
    c.score.batch_size = 64
    c.log_every_seconds = 2.0
  elif arg == "demo":
    c.data.dir = ""              # "": <workdir>/demo_data
    c.data.demo = True
    c.batch_size = 14            # 70 training faces: 5 steps an epoch
    c.num_epochs = 60
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 1        # a smoke run: one fcn_boss checkpoint is 1.3 GB
    c.score.batch_size = 60
  else:
    raise ValueError(f"unknown config arg {arg!r}: use 'quick' or 'demo'")
  return c
