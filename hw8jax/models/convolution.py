"""2-D convolutions in the form that is fastest for their shape on this backend.

XLA's CPU backend runs some conv shapes far below its usual speed: a window larger than the
image (ResNet-18's last stage, 3x3 over 2x2 maps: 272 ms forward at batch 32 against 5 ms as a
matmul), and the input gradient of strided convs on small maps (256->512 stride 2 on 4x4: 75 ms
against 4 ms; XLA runs it as a conv over a zero-dilated gradient). `bench/conv_forms.py` times
every conv shape of the variants in each form; `plan` holds the choice it supports (the table
is in docs/performance.md):

- "xla": `lax.conv_general_dilated`, the conv XLA would run anyway.
- "patches": the k*k shifted (strided) slices of the padded input side by side, then one
  matmul. Its gradients are a matmul and a sum of pads for the input, a matmul for the kernel.

They run where the config's `cpu_fast_paths` is on ("auto": on CPU only); elsewhere every conv is
XLA's own (GPUs call cuDNN, expected to win there; unmeasured).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hw8jax.runtime import cpu_fast_paths

DN = ("NHWC", "HWIO", "NHWC")


def xla_conv(x, w, stride: int, padding: tuple[int, int], precision=None):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), (padding, padding),
                                      dimension_numbers=DN, precision=precision)


def patches_conv(x, w, stride: int, padding: tuple[int, int], precision=None):
  """The patches' channels are ordered (row, column, channel), the kernel's own order, so the
  kernel reshapes to the (k*k*c, o) matrix without a transpose."""
  b, h, wd, c = x.shape
  k, o = w.shape[0], w.shape[-1]
  oh, ow = out_size(h, k, stride, padding), out_size(wd, k, stride, padding)
  xp = jnp.pad(x, ((0, 0), padding, padding, (0, 0)))
  cols = [jax.lax.slice(xp, (0, i, j, 0), (b, i + stride * (oh - 1) + 1,
                                           j + stride * (ow - 1) + 1, c), (1, stride, stride, 1))
          for i in range(k) for j in range(k)]
  patches = cols[0] if k == 1 else jnp.concatenate(cols, axis=-1)
  return jnp.dot(patches, w.reshape(k * k * c, o), precision=precision)


FORMS = {"xla": xla_conv, "patches": patches_conv}


def out_size(size: int, k: int, stride: int, padding: tuple[int, int]) -> int:
  return (size + padding[0] + padding[1] - k) // stride + 1


def plan(shape, kernel_shape, stride: int) -> str:
  """The form of a conv of NHWC input `shape` and HWIO `kernel_shape` on CPU, from
  `bench/conv_forms.py` at batch 32 and 128 (docs/performance.md): patches for 1x1 kernels (a
  matmul; its gradients up to 2.5x faster than XLA's), for maps of at most 2x2 (XLA: 1 s forward
  at batch 128, patches 13 ms) and for strided convs on maps of at most 8x8 (the input gradient:
  397 ms against 25 ms on 4x4); XLA's conv otherwise, where it is as fast or faster."""
  k, size = kernel_shape[0], max(shape[1], shape[2])
  if k == 1 or size <= 2 or (stride > 1 and size <= 8):
    return "patches"
  return "xla"


def conv2d(x, w, stride: int, padding: tuple[int, int], fast_paths: str = "auto",
           precision=None):
  """The sums of `nn.Conv2d` (no bias) of NHWC `x` and HWIO `w`, padded by `padding` (low, high)
  on both spatial axes: in `plan`'s form where the `cpu_fast_paths` setting `fast_paths` is on,
  else in XLA's."""
  form = plan(x.shape, w.shape, stride) if cpu_fast_paths(fast_paths) else "xla"
  return FORMS[form](x, w, stride, padding, precision)
