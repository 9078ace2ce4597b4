"""What every benchmark script here shares: alternating timing and the machine's description."""

from __future__ import annotations

import os
import platform
import statistics
import time

import jax


def alternate(fns, reps: int, warmup: int = 2) -> list[float]:
  """Median seconds of each fn (each must block on its result), calling them in turn
  `warmup + reps` times, so that both sides see the same machine state."""
  times = [[] for _ in fns]
  for r in range(warmup + reps):
    for i, fn in enumerate(fns):
      t = time.perf_counter()
      fn()
      if r >= warmup:
        times[i].append(time.perf_counter() - t)
  return [statistics.median(t) for t in times]


def machine() -> str:
  return (f"{platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__} on "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}")
