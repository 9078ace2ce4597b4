"""The conv variants' train steps and scorers with their convs in YNNPACK (XLA's CPU default)
and on XLA's own path (`cpu_tuning.YNN_FUSIONS`, what a run compiles under `cpu_fast_paths`), not a
test: medians of alternating turns, ms a call. The measurements behind `cpu_tuning.YNN_FUSIONS`;
docs/performance.md ("Convolutions off YNNPACK") has them.

  python bench/ynn_convs.py                          # batch 32 and 256, score batch 500
  python bench/ynn_convs.py --variants=ta_cnn --batches=32,64,128
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import timing

from hw8jax import cpu_tuning, models
from hw8jax.configs import default
from hw8jax.data.demo import synthetic_images
from hw8jax.score import make_scorer

# XLA's CPU default for the train step (jaxlib 0.10.2), and the scorer's options before its
# convs left YNNPACK: the "YNNPACK convs" side of each comparison.
YNN_CONVS = {"train_step": {},
             "scorer": {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                        "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}}


def train_steps(variant: str, batch: int):
  """Two train-step runners of `variant` (YNNPACK convs, XLA's own), each blocking on its loss."""
  images = jax.device_put(synthetic_images(batch, 0))
  runs = []
  for options in (YNN_CONVS["train_step"], cpu_tuning.compiler_options(True, "train_step")):
    model = timing.assembled(variant)
    run, _, _ = timing.train_step_runner(variant, model.train_def, *model.state, images,
                                         compiler_options=options)
    runs.append(run)
  return runs


def scorers(variant: str, batch: int):
  """Two scorer runners of `variant` (YNNPACK convs, XLA's own), each blocking on its scores."""
  model = timing.assembled(variant)
  # The scorer's function before make_scorer's jit, compiled here with each side's options.
  score = make_scorer(model.eval_def, stochastic=models.variant(variant).stochastic).__wrapped__
  args = (model.state, jax.device_put(synthetic_images(batch, 0)), jnp.arange(batch),
          jax.random.key(0))
  compiled = [jax.jit(score, compiler_options=options)
              for options in (YNN_CONVS["scorer"], cpu_tuning.compiler_options(True, "scorer"))]
  return [lambda fn=fn: jax.block_until_ready(fn(*args)) for fn in compiled]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variants", default="ta_cnn,ta_vae,multi_encoder,resnet_boss")
  p.add_argument("--batches", default="32,256", help="train batches")
  p.add_argument("--score_batch", type=int,
                 default=default.for_model("fcn_boss").score.batch_size)
  p.add_argument("--reps", type=int, default=5)
  args = p.parse_args()
  cpu_tuning.tune_allocator("auto")  # as a run does, before JAX starts
  print("machine:", timing.machine())
  print(f"median of {args.reps} turns, ms a call: YNNPACK convs / XLA's own convs")
  for variant in args.variants.split(","):
    for batch in map(int, args.batches.split(",")):
      ynn, own = timing.alternate(train_steps(variant, batch), args.reps)
      print(f"  {variant:14s} train step, batch {batch:4d}  {ynn * 1e3:9.2f} / {own * 1e3:9.2f}",
            flush=True)
    ynn, own = timing.alternate(scorers(variant, args.score_batch), args.reps)
    print(f"  {variant:14s} scorer, batch {args.score_batch:4d}      {ynn * 1e3:9.2f} / "
          f"{own * 1e3:9.2f}", flush=True)


if __name__ == "__main__":
  main()
