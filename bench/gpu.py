"""The GPU figures, in one run of under 10 minutes on one GPU (not a test; needs no torch).

1. Every variant's train step (batch 256) and scorer (batch 500), images/s, with XLA's own
   conv forms (`cpu_fast_paths` off, what "auto" runs on a GPU) and with hw8jax's CPU forms
   (on: sub-pixel transposed convs, patches + matmul), alternating.
2. One fcn_boss epoch of 100,000 images with the crop transform at batch 2000 through the grain
   pipeline, float32 and bfloat16 compute (after one compiling step).
3. Transposed convs alone, forward and both gradients: XLA's against the sub-pixel form.

  python bench/gpu.py | tee gpu_figures.txt
  python bench/gpu.py --smoke      # tiny sizes: checks the script runs (on any machine)

Record the output in docs/performance.md.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import timing
from flax import nnx

from hw8jax import data, models, train_step
from hw8jax.configs import default
from hw8jax.data.demo import synthetic_images
from hw8jax.models import layers


def variant_rates(variant: str, batch: int, score_batch: int, reps: int, images) -> dict:
  """{fast_paths: (train img/s, score img/s)} for "off" and "on"."""
  params, stats = timing.assembled(variant).state
  x, xs = jax.device_put(images[:batch]), jax.device_put(images[:score_batch])
  index, key = jnp.arange(score_batch), jax.random.key(1)
  trains, scores = [], []
  for setting in ("off", "on"):
    model = timing.assembled(variant, setting)
    train_def = model.train_def
    # Copies: the step donates its state, and the scorer still reads params and stats.
    trains.append(timing.train_step_runner(
        variant, train_def, *jax.tree.map(jnp.copy, (params, stats)), x)[0])
    scorer = model.scorer
    scores.append(lambda scorer=scorer: jax.block_until_ready(
        scorer((params, stats), xs, index, key)))
  t_train, t_score = timing.alternate(trains, reps), timing.alternate(scores, reps)
  return {s: (batch / a, score_batch / b)
          for s, a, b in zip(("off", "on"), t_train, t_score, strict=True)}


def epoch_seconds(images, batch: int, compute_dtype) -> float:
  """One fcn_boss epoch with the crop transform, the grain pipeline feeding the step."""
  cfg = default.for_model("fcn_boss")
  steps = len(images) // batch
  tx = train_step.make_optimizer(cfg, train_step.make_schedule(cfg, steps))
  model = timing.assembled("fcn_boss")
  train_def, (params, stats) = model.train_def, model.state
  step = jax.jit(train_step.make_train_step(train_def, tx, models.variant("fcn_boss").loss,
                                            data.crop_transform,
                                       jax.random.key(0), compute_dtype), donate_argnums=0)
  state, m = step(train_step.init_state(params, stats, tx), jnp.asarray(images[:batch]))
  jax.block_until_ready(m)
  t = time.perf_counter()
  for b in data.train_dataset(images, batch_size=batch, seed=0, num_steps=steps):
    state, m = step(state, b["image"])
  jax.block_until_ready(m)
  return time.perf_counter() - t


def conv_transpose_ms(batch: int, reps: int) -> list:
  """(shape, XLA ms, sub-pixel ms) of forward + both gradients of the variants' conv-Ts."""
  rows = []
  for cin, cout, size in [(48, 24, 8), (24, 12, 16), (12, 3, 32), (512, 256, 2), (256, 128, 4),
                          (128, 128, 8), (64, 64, 16), (32, 32, 32)]:
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, size, size, cin)), jnp.float32)
    fns = []
    for setting in ("off", "on"):
      layer = layers.conv_transpose(cin, cout, rngs=nnx.Rngs(0))
      layer.fast_paths = setting == "on"
      graphdef, state = nnx.split(layer)
      grad = jax.jit(jax.grad(lambda s, x, g=graphdef: jnp.sum(nnx.merge(g, s)(x) ** 2),
                              argnums=(0, 1)))
      fns.append(lambda grad=grad, state=state, x=x: jax.block_until_ready(grad(state, x)))
    xla, sub = timing.alternate(fns, reps)
    rows.append((f"{cin}->{cout} on {size}x{size}", 1e3 * xla, 1e3 * sub))
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
  args = p.parse_args()
  batch, score_batch, reps, epoch_images, epoch_batch = 256, 500, 5, 100_000, 2000
  variants = models.VARIANTS
  if args.smoke:
    batch, score_batch, reps, epoch_images, epoch_batch = 8, 16, 1, 64, 16
    variants = ("ta_cnn", "fcn_boss")
  print("machine:", timing.machine(), flush=True)
  images = synthetic_images(max(epoch_images, score_batch), 0)
  print(f"train batch {batch}, score batch {score_batch}, median of {reps}, images/s; "
        "fast paths off (XLA's forms, the GPU default) / on")
  for v in variants:
    r = variant_rates(v, batch, score_batch, reps, images)
    print(f"  {v:14s} train {r['off'][0]:9.1f} / {r['on'][0]:9.1f}   "
          f"score {r['off'][1]:9.1f} / {r['on'][1]:9.1f}", flush=True)
  for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
    t = epoch_seconds(images[:epoch_images], epoch_batch, dtype)
    print(f"fcn_boss epoch with crop, {epoch_images} images, batch {epoch_batch}, {name}: "
          f"{t:.2f} s ({epoch_images / t:.0f} img/s)", flush=True)
  print(f"transposed convs, forward + both gradients, batch {batch}, ms: XLA / sub-pixel")
  for name, xla, sub in conv_transpose_ms(batch, reps):
    print(f"  {name:20s} {xla:8.2f} / {sub:8.2f}", flush=True)


if __name__ == "__main__":
  main()
