"""A run's facts, resolved once from its validated config: the `Plan` every stage takes.

`plan(config)` resolves the variant, the transform, the keys, the compute dtype, what picks the
best checkpoint, the trajectory the checkpoints are trained with and the CPU policy; training,
scoring and `hw8jax.load` read these from the plan rather than look each up again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import ml_collections

from hw8jax import config as config_lib
from hw8jax import cpu_tuning, data, models, runtime


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run's stages take instead of looking each fact up again in the config."""
  config: ml_collections.ConfigDict  # validated: the keys a stage reads as they are
  variant: models.Variant            # builder, loss, whether it draws noise
  transform: Callable                # uint8 images -> the model's input (data.get_transform)
  keys: dict                         # init, noise, score (runtime.run_keys of the seed)
  compute_dtype: object              # jnp.float32 or jnp.bfloat16
  best_by: str                       # what picks the best checkpoint, "auto" resolved
  trajectory: dict                   # what the checkpoints are trained with (TRAJECTORY_KEYS)
  fast_paths: bool                   # the CPU policy (cpu_tuning), fixed on the model's convs


def plan(config: ml_collections.ConfigDict, mode: str = "score",
         inputs: data.RunData | None = None) -> Plan:
  """The run of a validated `config`, resolved; given the run's `inputs`, the keys that depend
  on them and on the devices are checked first (`config.check_run_facts`, one line each).
  Starts JAX's backend (the keys and the policy's "auto" need it), so a multi-process run calls
  it after `runtime.init_distributed`."""
  facts = None if inputs is None else dict(
      num_devices=jax.device_count(), num_train=len(inputs.train),
      held_out=len(inputs.val_index), train_path=inputs.train_path)
  best_by, trajectory = config_lib.resolve(config, mode, facts)
  return Plan(config, models.variant(config.model), data.get_transform(config.data.transform),
              runtime.run_keys(config.seed), runtime.COMPUTE_DTYPES[config.compute_dtype],
              best_by, trajectory, cpu_tuning.cpu_fast_paths(config.cpu_fast_paths))
