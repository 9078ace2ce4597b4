"""Batched, jit-able image transforms on NHWC uint8 input.

torchvision's Resize on tensors (bilinear, antialiased) is linear and separable, and so are crops;
a whole crop-and-resize chain is therefore one small matrix per image axis. hw8jax builds that
matrix once, in float64 numpy, from PyTorch's antialiased bilinear weights, and applies it as two
matmuls: the seed's Resize(256) -> CenterCrop(196) -> Resize(64) costs 3 MFLOP per image instead
of materialising a 256x256 intermediate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SIZE = 64


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) weights of PyTorch's `interpolate(mode="bilinear", antialias=True,
  align_corners=False)` along one axis: a triangle filter widened by the scale when shrinking,
  clipped to the image and renormalised."""
  scale = in_size / out_size
  support = scale if scale >= 1.0 else 1.0
  inv = 1.0 / scale if scale >= 1.0 else 1.0
  m = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    j = np.arange(lo, hi)
    w = np.clip(1.0 - np.abs((j - center + 0.5) * inv), 0.0, None)
    m[i, lo:hi] = w / w.sum()
  return m


def crop_matrix(in_size: int, start: int, length: int) -> np.ndarray:
  if not (0 <= start and start + length <= in_size and length > 0):
    raise ValueError(f"crop [{start}, {start + length}) does not fit in {in_size} pixels")
  return np.eye(in_size)[start:start + length]


@functools.cache
def _axis_operators(top: int, left: int, height: int, width: int, upscale: int):
  """Row and column operators of: resize to `upscale` (if not SIZE), crop, resize to SIZE."""
  pre = resize_matrix(SIZE, upscale) if upscale != SIZE else np.eye(SIZE)
  rows = resize_matrix(height, SIZE) @ crop_matrix(upscale, top, height) @ pre
  cols = resize_matrix(width, SIZE) @ crop_matrix(upscale, left, width) @ pre
  return rows.astype(np.float32), cols.astype(np.float32)


def _apply(images: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
  x = images.astype(jnp.float32)
  # HIGHEST: on GPUs the default matmul precision (TF32) would cost about 1e-3 here.
  y = jnp.einsum("oh,bhwc,pw->bopc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)
  return y * (2.0 / 255.0) - 1.0


def normalize(images: jax.Array) -> jax.Array:
  """uint8 0..255 -> float32 2x/255 - 1 in [-1, 1], the sample code's normalisation."""
  return images.astype(jnp.float32) * (2.0 / 255.0) - 1.0


def crop_transform(images: jax.Array) -> jax.Array:
  """The boss baseline's transform: Resize(256, bilinear, antialias) -> CenterCrop(196) ->
  Resize(64, bilinear, antialias) -> 2x/255 - 1."""
  return _apply(images, *_axis_operators(30, 30, 196, 196, 256))


def crop(images: jax.Array, top: int, left: int, height: int, width: int) -> jax.Array:
  """The (top, left, height, width) box of the 64x64 image, resized to 64x64 (bilinear,
  antialiased), normalised: the multi-crop recipe's transform."""
  return _apply(images, *_axis_operators(top, left, height, width, SIZE))


def get_transform(spec) -> callable:
  """The transform a config names: "none" (normalise), "crop" (the boss crop), or a
  (top, left, height, width) box, also written "top,left,height,width"."""
  if spec in (None, "none", "normalize"):
    return normalize
  if spec == "crop":
    return crop_transform
  if isinstance(spec, str) and spec.count(",") == 3:
    spec = spec.split(",")
  if isinstance(spec, (tuple, list)) and len(spec) == 4:
    return functools.partial(crop, **dict(zip(("top", "left", "height", "width"),
                                              map(int, spec), strict=True)))
  raise ValueError(f"unknown transform {spec!r}: use 'none', 'crop' or (top, left, height, width)")
