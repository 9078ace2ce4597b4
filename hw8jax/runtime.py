"""What a run shares between training and scoring: the processes and devices it runs on, its
mesh and shardings, its random keys, its compute dtypes and the compilation cache. (CPU tuning
is apart, in `hw8jax.cpu_tuning`.)"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from hw8jax.errors import UserError

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compilation_cache_dir(setting: str) -> str:
  """The folder of the persistent compilation cache for the config's `compilation_cache`
  ("" when off). "auto" keeps a folder JAX was already given (JAX_COMPILATION_CACHE_DIR)."""
  if setting != "auto":
    return os.path.expanduser(setting)
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "hw8jax", "xla")


def use_compilation_cache(setting: str) -> None:
  """Keep compiled programs across processes, so that a resumed run, a rescoring or the next
  run of the same model loads its programs instead of compiling them again (fcn_boss's train
  step: 2.4 s to compile). Programs that compile in under 0.2 s are not kept: loading one costs
  about as much. JAX reads the folder once, at the next compilation; a different folder later in
  the same process starts it afresh."""
  from jax.experimental.compilation_cache import compilation_cache as cc

  path = compilation_cache_dir(setting)
  if path == (jax.config.jax_compilation_cache_dir or ""):
    return
  if path:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      raise UserError(f"compilation_cache={setting!r}: cannot create {path}: {e.strerror}; "
                      "name another folder, or '' to turn the cache off") from None
  jax.config.update("jax_compilation_cache_dir", path or None)
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  cc.reset_cache()


def init_distributed(config) -> None:
  """Join a multi-process run when the config names a coordinator (each process is started
  with its own process_id). CPU processes exchange collectives through gloo."""
  if config.coordinator_address and not jax.distributed.is_initialized():
    if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(config.coordinator_address, num_processes=config.num_processes,
                               process_id=config.process_id)


def make_mesh() -> jax.sharding.Mesh:
  """One `data` axis over every device of every process."""
  return jax.make_mesh((jax.device_count(),), ("data",))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharded(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))


def run_keys(seed: int) -> dict:
  """Every key of a run, from the config's one seed: model init, training noise (folded with
  the step) and scoring noise (folded with each image's index in the test file)."""
  init, noise, score = _split_seed(seed)
  return {"init": init, "noise": noise, "score": score}


@jax.jit
def _split_seed(seed):
  # One program: op by op, the key, the split and the unstacking compiled four (0.2 s).
  return tuple(jax.random.split(jax.random.key(seed), 3))


def is_main_process() -> bool:
  return jax.process_index() == 0


def log(message: str) -> None:
  """A progress line, printed once per run (by process 0)."""
  if is_main_process():
    print(message, flush=True)
