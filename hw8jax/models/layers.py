"""Layers that initialise and compute like their PyTorch counterparts.

The originals were trained from PyTorch's default initialisation, and BatchNorm in PyTorch keeps
an unbiased running variance; Flax's defaults differ in both. Every model in hw8jax is built from
these, so it trains like its original and accepts its weights (`hw8jax.torch_import`).

Models mirror the originals' module trees: an `nn.Sequential` becomes an `nnx.Sequential` with the
same entries in the same order (activations included, as plain functions), so a PyTorch key such as
`encoder.3.weight` names the layer at `model.encoder.layers[3]`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from hw8jax import cpu_tuning
from hw8jax.models import convolution

# PyTorch's kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_kernel_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# torchvision's ResNet convs: kaiming_normal_(mode="fan_out", nonlinearity="relu").
resnet_kernel_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")

relu = jax.nn.relu
tanh = jnp.tanh
leaky_relu = functools.partial(jax.nn.leaky_relu, negative_slope=0.2)


def normal(rngs: nnx.Rngs, shape, dtype=jnp.float32) -> jax.Array:
  """N(0, 1) noise of `shape` (batch first) from the `noise` stream. When `rngs` also has a
  `per_image` stream (one key per batch row: the scorer's, keyed by each image's index in its
  file), row i is drawn from key i alone, so an image's noise does not depend on which batch,
  or which device, it is scored in."""
  key = rngs.noise()
  if "per_image" not in rngs:
    return jax.random.normal(key, shape, dtype)
  draw = jax.random.bits(key)  # tells apart the draws of one call
  rows = jax.vmap(jax.random.fold_in, in_axes=(0, None))(rngs.per_image.key[...], draw)
  return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(rows)


def torch_bias_init(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's bias rule; the bound needs the layer's fan-in."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Linear(nnx.Linear):
  """`nn.Linear` with PyTorch's default initialisation.

  `in_chw` / `out_chw` record the (C, H, W) feature map the original flattens into this layer's
  input or unflattens from its output. hw8jax flattens NHWC arrays in (H, W, C) order, so the weight
  import permutes rows or columns of such layers; the computation is unchanged.
  """

  def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs,
               in_chw: tuple[int, int, int] | None = None,
               out_chw: tuple[int, int, int] | None = None):
    super().__init__(in_features, out_features, kernel_init=torch_kernel_init,
                     bias_init=torch_bias_init(in_features), rngs=rngs)
    self.in_chw = in_chw
    self.out_chw = out_chw


def conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0, *,
         rngs: nnx.Rngs, bias: bool = True, kernel_init=torch_kernel_init) -> Conv:
  """`nn.Conv2d(in_ch, out_ch, kernel, stride, padding)` on NHWC arrays."""
  return Conv(in_ch, out_ch, (kernel, kernel), strides=stride,
              padding=((padding, padding), (padding, padding)), use_bias=bias,
              kernel_init=kernel_init, bias_init=torch_bias_init(in_ch * kernel * kernel),
              rngs=rngs)


class Conv(nnx.Conv):
  """`nnx.Conv` computed in the form `hw8jax.models.convolution` picks for its shape (same
  parameters; the same sums up to float rounding). `fast_paths` is the CPU policy: "auto"'s
  when built (`cpu_tuning.predicted_fast_paths`: the backend is not started for it), the run's
  once assembled (`models.set_fast_paths`)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.fast_paths = cpu_tuning.predicted_fast_paths("auto")

  def __call__(self, inputs: jax.Array) -> jax.Array:
    bias = self.bias[...] if self.bias is not None else None
    x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
    y = convolution.conv2d(x, kernel, self.strides, self.padding[0], self.fast_paths,
                           self.precision)
    return y if bias is None else y + bias


def conv_transpose(in_ch: int, out_ch: int, kernel: int = 4, stride: int = 2, padding: int = 1,
                   *, rngs: nnx.Rngs) -> ConvTranspose:
  """`nn.ConvTranspose2d(in_ch, out_ch, kernel, stride, padding)` on NHWC arrays."""
  return ConvTranspose(in_ch, out_ch, kernel, stride, padding, rngs=rngs)


class ConvTranspose(nnx.ConvTranspose):
  """`nn.ConvTranspose2d`, computed as a sub-pixel convolution when it upsamples exactly by its
  stride (kernel - 2 * padding == stride, as every one in the originals: k4 s2 p1).

  PyTorch's transposed conv is the gradient of a conv: a flipped kernel (`transpose_kernel`) and
  `kernel - 1 - padding` of padding on each side. The kernel is (k, k, out_ch, in_ch), so the
  default fan-in axis gives PyTorch's fan-in of out_ch * k * k.

  XLA runs a transposed conv as a conv over a zero-dilated input, and its gradients as two more
  such convs; on CPU that made them several times slower than PyTorch's (docs/performance.md).
  Output phase (a, b) of each input pixel depends on a small window of undilated input pixels, so
  one stride-1 conv with stride**2 * out_ch output channels, followed by a pixel shuffle, computes
  the same sums with no zeros (its stride-1 conv in `convolution`'s form for its shape). Same
  parameters, same result up to float rounding. Where `fast_paths` (the CPU policy, as on `Conv`)
  is off, it runs XLA's transposed conv.
  """

  def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, padding: int, *,
               rngs: nnx.Rngs):
    pad = kernel - 1 - padding
    super().__init__(in_ch, out_ch, (kernel, kernel), strides=stride,
                     padding=((pad, pad), (pad, pad)), transpose_kernel=True,
                     kernel_init=torch_kernel_init,
                     bias_init=torch_bias_init(out_ch * kernel * kernel), rngs=rngs)
    self.torch_padding = padding
    self.fast_paths = cpu_tuning.predicted_fast_paths("auto")

  def __call__(self, inputs: jax.Array) -> jax.Array:
    plan = self._subpixel_plan()
    if plan is None or not self.fast_paths:
      return super().__call__(inputs)
    taps, lo, hi = plan
    x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], self.bias[...]),
                                         dtype=self.dtype)
    s, out_ch = self.strides, kernel.shape[2]
    k = convolution.subpixel_kernel(kernel, s, self.torch_padding, taps)
    b, h, w, _ = x.shape
    y = convolution.conv2d(x, k, 1, (lo, hi), self.fast_paths, self.precision)
    y = y.reshape(b, h, w, s, s, out_ch).transpose(0, 1, 3, 2, 4, 5)
    shape = (b, h * s, w * s, out_ch)
    sharding = jax.typeof(y).sharding
    batch_axis = (sharding.spec or (None,))[0]
    if batch_axis is not None:
      # An explicitly sharded batch: JAX asks where the merged dims go; the batch's axis stays.
      out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(batch_axis))
      return jax.lax.reshape(y, shape, out_sharding=out) + bias
    return y.reshape(shape) + bias

  def _subpixel_plan(self):
    """(taps, pad_lo, pad_hi) of the sub-pixel form, or None where it does not apply."""
    k, s, p = self.kernel_size[0], self.strides, self.torch_padding
    if k - 2 * p != s:
      return None
    # Output s*m + a takes x[m - t] * w[s*t + a + p] over the t with 0 <= s*t + a + p < k.
    t_min, t_max = -((s - 1 + p) // s), (k - 1 - p) // s
    return t_max - t_min + 1, t_max, -t_min


class BatchNorm(nnx.Module):
  """`nn.BatchNorm1d/2d` over the last axis, with PyTorch's statistics.

  Training normalises with the biased batch variance and updates the running variance with the
  unbiased one; `momentum` is PyTorch's (weight of the new batch). `model.train()` and
  `model.eval()` switch `use_running_average`.
  """

  def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
               use_running_average: bool = False):
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.momentum = momentum
    self.epsilon = epsilon
    self.use_running_average = use_running_average

  def __call__(self, x: jax.Array) -> jax.Array:
    axes = tuple(range(x.ndim - 1))
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      # Statistics in float32 whatever the compute dtype; they are tiny vectors.
      x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
      mean = x32.mean(axes)
      var = jnp.square(x32 - mean).mean(axes)
      n = x.size // x.shape[-1]
      m = self.momentum
      self.mean[...] = (1 - m) * self.mean[...] + m * mean
      self.var[...] = (1 - m) * self.var[...] + m * var * (n / max(n - 1, 1))
    inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
    return ((x - mean.astype(x.dtype)) * inv.astype(x.dtype)
            + self.bias[...].astype(x.dtype))


def prelu() -> nnx.PReLU:
  """`nn.PReLU()`: one learned slope, initially 0.25."""
  return nnx.PReLU(negative_slope_init=0.25)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """`nn.MaxPool2d(3, 2, 1)`; padding counts as -inf, and the gradient goes to the first
  maximum of each window in row-major order, as in PyTorch. The maximum of the nine strided
  windows: XLA's CPU gradient of a max reduce-window builds index arrays for every input, far
  slower (docs/performance.md)."""
  return _max_pool_3x3_s2(x)


def _pool_windows(x: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  oh, ow = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
  return xp, [xp[:, i:i + 2 * oh - 1:2, j:j + 2 * ow - 1:2] for i in range(3) for j in range(3)]


@jax.custom_vjp
def _max_pool_3x3_s2(x):
  return functools.reduce(jnp.maximum, _pool_windows(x)[1])


def _max_pool_fwd(x):
  y = _max_pool_3x3_s2(x)
  return y, (x, y)


def _max_pool_bwd(res, g):
  x, y = res
  xp, windows = _pool_windows(x)
  taken = jnp.zeros(y.shape, bool)
  dxp = jnp.zeros(xp.shape, g.dtype)
  for n, win in enumerate(windows):
    hit = (win == y) & ~taken
    taken = taken | hit
    i, j = divmod(n, 3)
    # Window (i, j) read xp[:, i::2, j::2]: pad its share back to those places.
    hi_h, hi_w = xp.shape[1] - i - 2 * y.shape[1] + 1, xp.shape[2] - j - 2 * y.shape[2] + 1
    dxp = dxp + jax.lax.pad(jnp.where(hit, g, 0), jnp.zeros((), g.dtype),
                            ((0, 0, 0), (i, hi_h, 1), (j, hi_w, 1), (0, 0, 0)))
  return (dxp[:, 1:-1, 1:-1],)


_max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """`nn.AdaptiveAvgPool2d(1)`."""
  return x.mean(axis=(1, 2), keepdims=True)


def flatten(x: jax.Array) -> jax.Array:
  """`nn.Flatten()`; only used on (B, 1, 1, C), where NHWC and NCHW orders agree."""
  return x.reshape(x.shape[0], -1)
