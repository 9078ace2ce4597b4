"""What a run shares between training and scoring: the processes and devices it runs on, its
mesh, its random keys and its compute dtypes."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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
  init, noise, score = jax.random.split(jax.random.key(seed), 3)
  return {"init": init, "noise": noise, "score": score}


def is_main_process() -> bool:
  return jax.process_index() == 0


def log(message: str) -> None:
  """A progress line, printed once per run (by process 0)."""
  if is_main_process():
    print(message, flush=True)
