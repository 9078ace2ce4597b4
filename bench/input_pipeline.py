"""Input-pipeline overhead and host memory for fcn_boss training (not a test).

Times, in one process and alternating, after warm-up:
  A) the real pipeline: grain iterator over a memory-mapped uint8 .npy file -> device -> the
     jitted train step, which applies the crop transform on the device;
  B) the same train step fed batches that are already transformed float32 arrays in memory
     (the transform removed from the step);
and reports medians of the per-step times and the overhead A/B - 1. First, before any model
exists, it streams one whole epoch of the training file through the loader alone and reports the
process's peak resident memory.

  python bench/input_pipeline.py --num_images=100000 --batch_size=256 --steps=8
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from hw8jax import data, train_step
from hw8jax.assemble import assemble
from hw8jax.configs import default
from hw8jax.plan import plan


def machine() -> str:
  return (f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or '?'}; "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}")


def rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--num_images", type=int, default=100_000)
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--steps", type=int, default=8, help="timed steps per side")
  p.add_argument("--dir", default="", help="folder for the generated training file")
  args = p.parse_args()
  print("machine:", machine())

  folder = args.dir or tempfile.mkdtemp()
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, data.TRAIN_FILE)
  if not os.path.exists(path):
    rng = np.random.default_rng(0)
    mm = np.lib.format.open_memmap(path, "w+", np.uint8, (args.num_images, 64, 64, 3))
    for s in range(0, args.num_images, 10_000):
      mm[s:s + 10_000] = rng.integers(0, 256, (min(10_000, args.num_images - s), 64, 64, 3),
                                      dtype=np.uint8)
    mm.flush()
    del mm
  images = data.open_images(path)

  before = rss_mib()
  t = time.perf_counter()
  spe = data.steps_per_epoch(len(images), 2000)
  total = 0
  for batch in data.train_dataset(images, batch_size=2000, seed=0, num_steps=spe):
    total += batch["image"].shape[0]
  dt = time.perf_counter() - t
  print(f"loader alone, one epoch of {total} images at batch 2000: {dt:.1f} s "
        f"({total / dt:.0f} img/s); peak RSS {rss_mib():.0f} MiB "
        f"(was {before:.0f} MiB before the epoch; no model loaded yet)")

  cfg = default.for_model("fcn_boss")
  cfg.schedule.name = "warmup_cosine"
  tx = train_step.make_optimizer(cfg, train_step.make_schedule(cfg, 1000))
  run = plan(cfg)
  model = assemble(run, key=jax.random.key(0))
  train_def, (params, stats), loss = model.train_def, model.state, run.variant.loss
  key = jax.random.key(0)
  with_transform = jax.jit(train_step.make_train_step(
      train_def, tx, loss, data.crop_transform, key), donate_argnums=0)
  no_transform = jax.jit(train_step.make_train_step(train_def, tx, loss, lambda x: x, key),
                         donate_argnums=0)
  state_a = train_step.init_state(params, stats, tx)
  state_b = jax.tree.map(jnp.copy, state_a)

  n_batches = args.steps + 2
  it = iter(data.train_dataset(images, batch_size=args.batch_size, seed=0,
                               num_steps=2 * n_batches))
  pre = [jax.device_put(data.crop_transform(next(it)["image"])) for _ in range(n_batches)]
  jax.block_until_ready(pre)

  times_a, times_b = [], []
  for i in range(n_batches):
    t = time.perf_counter()
    state_a, m = with_transform(state_a, jax.device_put(next(it)["image"]))
    jax.block_until_ready(m)
    ta = time.perf_counter() - t
    t = time.perf_counter()
    state_b, m = no_transform(state_b, pre[i])
    jax.block_until_ready(m)
    tb = time.perf_counter() - t
    if i >= 2:  # warm-up: compilation and the first reads
      times_a.append(ta)
      times_b.append(tb)
  a, b = statistics.median(times_a), statistics.median(times_b)
  print(f"fcn_boss train step, batch {args.batch_size}, median of {len(times_a)}:")
  print(f"  A pipeline (grain + memmap + crop in step): {a * 1e3:8.1f} ms "
        f"({args.batch_size / a:.0f} img/s)")
  print(f"  B pre-transformed in-memory float32:        {b * 1e3:8.1f} ms "
        f"({args.batch_size / b:.0f} img/s)")
  print(f"  overhead A/B - 1: {100 * (a / b - 1):+.1f}%")


if __name__ == "__main__":
  main()
