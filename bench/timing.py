"""What the benchmark scripts here share: alternating timing, the machine's description and a
variant's train step as a runnable."""

from __future__ import annotations

import math
import os
import platform
import statistics
import time

import jax

from hw8jax import data, runtime, train_step
from hw8jax.assemble import Assembled, assemble
from hw8jax.configs import default
from hw8jax.plan import plan


def alternate(fns, reps: int, warmup: int = 2, turn_s: float = 0.25) -> list[float]:
  """Median seconds a call of each fn (each must block on its result), taking turns `reps`
  times after `warmup` rounds, so that both sides see the same machine state. In a turn a fn
  runs back to back for about `turn_s` (calls counted from its last warm-up call), as in a
  training or scoring loop: single calls in turn ran each small step just after the other
  side's, and slowed them (ta_cnn's train step 25.1 -> 29.8 ms, PyTorch's 16.1 -> 17.8)."""
  calls = [1] * len(fns)
  times = [[] for _ in fns]
  for r in range(warmup + reps):
    for i, fn in enumerate(fns):
      t = time.perf_counter()
      for _ in range(calls[i]):
        fn()
      per_call = (time.perf_counter() - t) / calls[i]
      if r >= warmup:
        times[i].append(per_call)
      elif r == warmup - 1:
        calls[i] = max(1, math.ceil(turn_s / per_call))
  return [statistics.median(t) for t in times]


def machine() -> str:
  return (f"{platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} on "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}")


def assembled(variant: str, fast_paths: str = "auto", init_from: str = "") -> Assembled:
  """The model a run of `variant` assembles, its weights drawn from key 0 or read from
  `init_from`, its convs following `fast_paths`."""
  cfg = default.for_model(variant)
  cfg.cpu_fast_paths, cfg.init_from = fast_paths, init_from
  return assemble(plan(cfg), key=jax.random.key(0))


def train_step_runner(variant: str, train_def, params, stats, images, compiler_options=None):
  """A function running one train step of `variant` (Adam, the config's defaults, `images`
  normalised in the step) and blocking on its loss; and one giving the step's current
  arguments. Compiled as a run compiles it, or with the XLA `compiler_options` given instead of
  the run's. The step donates its state: `params` and `stats` are used up."""
  run = plan(default.for_model(variant))
  tx = train_step.make_optimizer(run.config, train_step.make_schedule(run.config, 100))
  mesh = runtime.make_mesh()
  step_fn = train_step.make_train_step(train_def, tx, run.variant.loss, data.normalize,
                                       jax.random.key(0))
  if compiler_options is None:
    step = train_step.jit_train_step(step_fn, mesh, run.fast_paths)
  else:
    step = jax.jit(step_fn, donate_argnums=0, compiler_options=compiler_options)
  state = train_step.init_state(params, stats, tx)
  box = {"state": jax.device_put(state, runtime.replicated(mesh))}

  def run():
    box["state"], m = step(box["state"], images)
    jax.block_until_ready(m["loss"])

  return run, step, lambda: [box["state"], images]
