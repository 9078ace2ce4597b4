"""Every convolution shape of the variants, timed in each form of `hw8jax.models.convolution`
(not a test): forward, and forward plus both gradients, at one batch; medians of alternating
calls after warm-up, in ms. The table behind `convolution.plan`; docs/performance.md has it.

  python bench/conv_forms.py               # batch 32, about 3 minutes on a 2-core CPU
  python bench/conv_forms.py --batch=256 --only=resnet
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import timing

from hw8jax.models import convolution

# (where, input size, in channels, out channels, kernel, stride, padding); inputs are square.
SHAPES = [
    ("ta/multi down", 64, 3, 12, 4, 2, 1), ("ta/multi down", 32, 12, 24, 4, 2, 1),
    ("ta/multi down", 16, 24, 48, 4, 2, 1), ("multi down", 16, 48, 48, 4, 2, 1),
    ("resnet stem", 64, 3, 64, 7, 2, 3),
    ("resnet s1", 16, 64, 64, 3, 1, 1),
    ("resnet s2", 16, 64, 128, 3, 2, 1), ("resnet proj", 16, 64, 128, 1, 2, 0),
    ("resnet s1", 8, 128, 128, 3, 1, 1),
    ("resnet s2", 8, 128, 256, 3, 2, 1), ("resnet proj", 8, 128, 256, 1, 2, 0),
    ("resnet s1", 4, 256, 256, 3, 1, 1),
    ("resnet s2", 4, 256, 512, 3, 2, 1), ("resnet proj", 4, 256, 512, 1, 2, 0),
    ("resnet s1", 2, 512, 512, 3, 1, 1),
    ("resnet classifier", 64, 3, 32, 3, 2, 1), ("resnet classifier", 32, 32, 64, 3, 2, 1),
    ("resnet classifier", 16, 64, 128, 3, 2, 1),
    ("resnet decoder", 4, 256, 128, 3, 1, 1), ("resnet decoder", 4, 128, 128, 3, 1, 1),
    ("resnet decoder proj", 4, 256, 128, 1, 1, 0),
    ("resnet decoder", 8, 128, 64, 3, 1, 1), ("resnet decoder", 8, 64, 64, 3, 1, 1),
    ("resnet decoder proj", 8, 128, 64, 1, 1, 0),
    ("multi block", 16, 24, 48, 3, 1, 1), ("multi block", 16, 48, 48, 3, 1, 1),
    ("multi proj", 16, 24, 48, 1, 1, 0), ("multi fusion", 8, 144, 144, 1, 1, 0),
    ("multi block", 8, 144, 128, 3, 1, 1), ("multi block", 8, 128, 128, 3, 1, 1),
    ("multi proj", 8, 144, 128, 1, 1, 0),
    ("multi block", 16, 128, 64, 3, 1, 1), ("multi block", 16, 64, 64, 3, 1, 1),
    ("multi proj", 16, 128, 64, 1, 1, 0),
    ("multi block", 32, 64, 32, 3, 1, 1), ("multi block", 32, 32, 32, 3, 1, 1),
    ("multi proj", 32, 64, 32, 1, 1, 0), ("multi out", 64, 32, 3, 3, 1, 1),
]


def bench_shape(batch, size, cin, cout, k, stride, padding, reps):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
  pad = (padding, padding)
  o = convolution.out_size(size, k, stride, pad)
  ct = jnp.asarray(rng.normal(size=(batch, o, o, cout)), jnp.float32)
  forms = list(convolution.FORMS)
  fwds, dxs, dws = [], [], []
  for f in forms:
    fn = convolution.FORMS[f]
    fwd = jax.jit(lambda x, w, fn=fn: fn(x, w, stride, pad))
    dx = jax.jit(jax.grad(lambda x, w, fn=fn: jnp.vdot(fn(x, w, stride, pad), ct), argnums=0))
    dw = jax.jit(jax.grad(lambda x, w, fn=fn: jnp.vdot(fn(x, w, stride, pad), ct), argnums=1))
    fwds.append(lambda fwd=fwd: jax.block_until_ready(fwd(x, w)))
    dxs.append(lambda dx=dx: jax.block_until_ready(dx(x, w)))
    dws.append(lambda dw=dw: jax.block_until_ready(dw(x, w)))
  ms = [[1e3 * t for t in timing.alternate(fns, reps)] for fns in (fwds, dxs, dws)]
  return forms, *ms


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--only", default="", help="only shapes whose name contains this")
  args = p.parse_args()
  print("machine:", timing.machine())
  print(f"batch {args.batch}, median of {args.reps}, ms; per form: forward, input gradient, "
        "kernel gradient (each alone; XLA drops the unused forward); plan = convolution.plan's "
        "forms for the three")
  for name, size, cin, cout, k, stride, padding in SHAPES:
    if args.only not in name:
      continue
    forms, *times = bench_shape(args.batch, size, cin, cout, k, stride, padding, args.reps)
    cells = "  ".join(f"{f} {a:6.2f} {b:6.2f} {c:6.2f}"
                      for f, a, b, c in zip(forms, *times, strict=True))
    chosen = convolution.plan((args.batch, size, size, cin), (k, k, cin, cout), stride)
    print(f"{name:20s} {size:2d}x{size:<2d} {cin:3d}->{cout:<3d} k{k} s{stride} p{padding}  "
          f"{cells}  plan {chosen}", flush=True)


if __name__ == "__main__":
  main()
