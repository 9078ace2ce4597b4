"""2-D convolutions in the form that is fastest for their shape on this backend.

XLA's CPU backend runs some conv shapes far below its usual speed: a window larger than the
image (ResNet-18's last stage, 3x3 over 2x2 maps) and the input gradient of strided convs on
small maps (XLA runs it as a conv over a zero-dilated gradient). `bench/conv_forms.py` times
every conv shape of the variants in each form; `plan` holds the choice it supports (the
figures are in docs/performance.md):

- "xla": `lax.conv_general_dilated`, the conv XLA would run anyway.
- "patches": the k*k shifted (strided) slices of the padded input side by side, then one
  matmul. Its gradients are a matmul and a sum of pads for the input, a matmul for the kernel.

They run where the run's CPU policy is on (`cpu_tuning`; the config's `cpu_fast_paths`, "auto":
on CPU only); elsewhere every conv is XLA's own (GPUs call cuDNN, expected to win there;
unmeasured).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

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
  matmul, its gradients too), for maps of at most 2x2 and for strided convs on maps of at most
  8x8 (their input gradient); XLA's conv otherwise, where it is as fast or faster."""
  k, size = kernel_shape[0], max(shape[1], shape[2])
  if k == 1 or size <= 2 or (stride > 1 and size <= 8):
    return "patches"
  return "xla"


def conv2d(x, w, stride: int, padding: tuple[int, int], fast_paths: bool = False,
           precision=None):
  """The sums of `nn.Conv2d` (no bias) of NHWC `x` and HWIO `w`, padded by `padding` (low, high)
  on both spatial axes: in `plan`'s form where the CPU policy `fast_paths` is on, else in
  XLA's."""
  form = plan(x.shape, w.shape, stride) if fast_paths else "xla"
  return FORMS[form](x, w, stride, padding, precision)


def subpixel_kernel(kernel: jax.Array, s: int, p: int, taps: int) -> jax.Array:
  """The (taps, taps, in, s*s*out) stride-1 kernel of a transposed conv with kernel
  (k, k, out, in) (PyTorch's flipped layout), stride s and PyTorch padding p; output channels
  are ordered (phase_y, phase_x, out)."""
  return _subpixel_kernel(kernel, s, p, taps)


def _subpixel_rows(k: int, s: int, p: int, taps: int) -> dict:
  """{(window row d, phase a): kernel row} for the rows that exist: window row d holds
  x[m + d - t_max], and phase a of output s*m + a reads kernel row s*(t_max - d) + a + p.
  Each kernel row appears once."""
  t_max = (k - 1 - p) // s
  rows = {(d, a): s * (t_max - d) + a + p for d in range(taps) for a in range(s)}
  return {da: r for da, r in rows.items() if 0 <= r < k}


# Both directions are static slices stacked together: a gather (and autodiff's transpose of the
# stacking, 36 padded copies summed) was far slower (docs/performance.md).
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _subpixel_kernel(kernel, s, p, taps):
  rows = _subpixel_rows(kernel.shape[0], s, p, taps)
  kt = kernel.transpose(0, 1, 3, 2)  # (k, k, in, out)
  zero = jnp.zeros(kt.shape[2:], kt.dtype)

  def tap(d, a, e, b):
    if (d, a) in rows and (e, b) in rows:
      return kt[rows[d, a], rows[e, b]]
    return zero

  g = jnp.stack([jnp.stack([
      jnp.stack([jnp.stack([tap(d, a, e, b) for b in range(s)], axis=1) for a in range(s)],
                axis=1)
      for e in range(taps)]) for d in range(taps)])              # (d, e, in, a, b, out)
  return g.reshape(taps, taps, kernel.shape[3], s * s * kernel.shape[2])


def _subpixel_kernel_fwd(kernel, s, p, taps):
  return _subpixel_kernel(kernel, s, p, taps), kernel.shape


def _subpixel_kernel_bwd(s, p, taps, shape, grad):
  k, _, out_ch, in_ch = shape
  g = grad.reshape(taps, taps, in_ch, s, s, out_ch)
  where = {r: da for da, r in _subpixel_rows(k, s, p, taps).items()}
  # Every kernel row has exactly one place in the window (the row set covers 0..k-1).
  dk = jnp.stack([jnp.stack([g[where[r][0], where[c][0], :, where[r][1], where[c][1]]
                             for c in range(k)]) for r in range(k)])  # (k, k, in, out)
  return (dk.transpose(0, 1, 3, 2),)


_subpixel_kernel.defvjp(_subpixel_kernel_fwd, _subpixel_kernel_bwd)
